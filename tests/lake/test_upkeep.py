import pandas as pd
import pytest

from cellsynth.errors import LakeError
from cellsynth.lake import Lake, RunRegistry
from cellsynth.lake.upkeep import optimize, referenced_versions, vacuum


def _m(tag, n=3):
    return pd.DataFrame({"run_id": [tag] * n, "stage": ["s"] * n, "metric": [f"{tag}{i}" for i in range(n)], "value": [1.0] * n})


def _lake_with_versions(tmp_path):
    lake = Lake(tmp_path / "lake")
    for tag in ("v0", "v1", "v2", "v3"):
        lake.write("metrics", _m(tag), mode="overwrite")
    return lake


def test_vacuum_keeps_versions_a_run_references(tmp_path):
    lake = _lake_with_versions(tmp_path)
    reg = RunRegistry(lake)
    rec = reg.start("run-1", "evaluate", "h", {})
    reg.succeed(rec, {"metrics": 1}, {})
    assert referenced_versions(reg) == {"metrics": {1}}
    removed = vacuum(lake, retention_hours=0)
    assert len(removed["metrics"]) == 2  # versions 0 and 2 were only ever in unreferenced versions
    assert sorted(lake.read_pandas("metrics", version=1)["run_id"]) == ["v1"] * 3
    assert sorted(lake.read_pandas("metrics")["run_id"]) == ["v3"] * 3
    with pytest.raises(Exception):  # version 0's files are gone
        lake.read("metrics", version=0)


def test_vacuum_deletes_old_files_no_commit_took(tmp_path):
    """A killed run's staged files (in the table folder, in no version) go once older than the retention."""
    import os
    import time

    lake = _lake_with_versions(tmp_path)
    old = tmp_path / "lake" / "metrics" / "spark-killed-abc123" / "part-0.parquet"
    young = tmp_path / "lake" / "metrics" / "stage=s" / "part-young.parquet"
    for f in (old, young):
        f.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"x": [1]}).to_parquet(f)
    t = time.time() - 200 * 3600
    os.utime(old, (t, t))
    assert vacuum(lake, retention_hours=168)["metrics"] == ["spark-killed-abc123/part-0.parquet"]
    assert not old.exists() and young.exists()
    assert lake.read("metrics", version=0).num_rows == 3  # the versions' own files are younger: kept


def test_vacuum_lists_only_files_it_can_delete(tmp_path):
    # delta-rs lists every expired tombstone: the files an earlier vacuum deleted came back as "deleted" each time
    lake = _lake_with_versions(tmp_path)
    assert len(vacuum(lake, retention_hours=0)["metrics"]) == 3
    assert vacuum(lake, retention_hours=0)["metrics"] == []
    assert vacuum(lake, retention_hours=0, dry_run=True)["metrics"] == []


def test_vacuum_dry_run_and_retention_window_delete_nothing(tmp_path):
    lake = _lake_with_versions(tmp_path)
    assert len(vacuum(lake, retention_hours=0, dry_run=True)["metrics"]) == 3
    assert vacuum(lake, retention_hours=1)["metrics"] == []
    assert lake.read("metrics", version=0).num_rows == 3


def test_optimize_compacts_and_is_recorded_as_good(tmp_path):
    lake = Lake(tmp_path / "lake")
    for tag in ("a", "b", "c"):
        lake.write("metrics", _m(tag))
    reg = RunRegistry(lake)
    rec = reg.start("run-1", "evaluate", "h", {})
    reg.succeed(rec, {"metrics": 2}, {})
    out = optimize(lake)
    assert out["metrics"]["from_version"] == 2 and out["metrics"]["to_version"] == 3
    assert out["metrics"]["files_removed"] == 3 and out["metrics"]["files_added"] == 1
    assert len(lake.file_uris("metrics")) == 1 and lake.read("metrics").num_rows == 9
    assert reg.recover() == {}  # the compaction is not mistaken for a killed run's commit


def test_vacuum_unknown_table_is_lake_error(tmp_path):
    with pytest.raises(LakeError, match="lake table 'nope' not found"):
        vacuum(Lake(tmp_path / "lake"), tables=["nope"])


def test_cli_vacuum_and_optimize(tmp_path, capsys):
    from cellsynth.cli import main

    lake = _lake_with_versions(tmp_path)
    args = ["--set", f"run.lake_root={tmp_path / 'lake'}", "--set", "lake.retention_hours=0"]
    assert main(["vacuum", "--dry-run", *args]) == 0
    printed = capsys.readouterr().out
    assert "metrics: would delete 3 files" in printed and "models/radio: would delete 0 run folders" in printed
    assert lake.read("metrics", version=0).num_rows == 3
    assert main(["optimize", *args]) == 0
    assert main(["vacuum", *args]) == 0
    assert "metrics: deleted 3 files" in capsys.readouterr().out
    assert lake.read("metrics").num_rows == 3


def test_vacuum_models_deletes_only_old_folders_no_kept_version_names(tmp_path):
    """Model folders (models/<kind>/<run_id>/) of killed or failed runs go; those the latest or a recorded version of
    radio_models / kde_models names, traffic weights of runs that did not fail, and young folders stay."""
    import os
    import time

    from cellsynth.lake.upkeep import vacuum_models

    lake = Lake(tmp_path / "lake")
    root = tmp_path / "lake" / "models"

    def folder(kind: str, run: str, age_h: float) -> None:
        f = root / kind / run / "rsrp" / "shard=0.safetensors"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"w")
        t = time.time() - age_h * 3600.0
        for p in (f, f.parent, f.parent.parent):
            os.utime(p, (t, t))

    def radio_rows(run: str) -> pd.DataFrame:
        return pd.DataFrame({"cell_id": ["A"], "target": ["rsrp"], "window": [None], "n_train": [10], "elbo": [None],
                             "val_mae": [1.0], "pooled": [False], "path": [f"models/radio/{run}/rsrp/shard=0"],
                             "source_version": [0], "cell_shard": [0], "run_id": [run]})

    reg = RunRegistry(lake)
    lake.write("radio_models", radio_rows("r-old"), mode="overwrite")  # version 0: a recorded run's output
    reg.succeed(reg.start("r-old", "radio", "h", {}), {"radio_models": 0}, {})
    lake.write("radio_models", radio_rows("r-between"), mode="overwrite")  # version 1: nobody's
    lake.write("radio_models", radio_rows("r-new"), mode="overwrite")  # version 2: the latest
    reg.fail(reg.start("t-failed", "traffic", "h", {}), RuntimeError("killed"))
    reg.succeed(reg.start("t-ok", "traffic", "h", {}), {}, {})
    for run in ("r-old", "r-between", "r-new", "r-killed"):
        folder("radio", run, age_h=200.0)
    folder("radio", "r-young", age_h=1.0)  # e.g. a run still writing
    folder("kde", "k-orphan", age_h=200.0)
    folder("traffic", "t-failed", age_h=200.0)
    folder("traffic", "t-ok", age_h=200.0)

    dry = vacuum_models(lake, retention_hours=168, dry_run=True)
    assert dry == {"models/radio": ["r-between", "r-killed"], "models/kde": ["k-orphan"], "models/traffic": ["t-failed"]}
    assert (root / "radio" / "r-killed").is_dir()
    assert vacuum_models(lake, retention_hours=168) == dry
    assert sorted(p.name for p in (root / "radio").iterdir()) == ["r-new", "r-old", "r-young"]
    assert sorted(p.name for p in (root / "traffic").iterdir()) == ["t-ok"]
    assert vacuum_models(lake, retention_hours=168) == {"models/radio": [], "models/kde": [], "models/traffic": []}


def test_optimize_and_vacuum_compact_the_run_registry(tmp_path):
    # a file per record, and every stage reads it whole: a daily schedule made it thousands of files
    lake = Lake(tmp_path / "lake")
    reg = RunRegistry(lake)
    for k in range(6):
        reg.succeed(reg.start(f"run-{k}", "evaluate", "h", {}), {}, {})
    before = reg.frame().drop(columns=["started_at", "ended_at"]).reset_index(drop=True)
    files_before = {t.name: t.n_files for t in lake.tables()}["runs"]
    assert optimize(lake)["runs"]["files_removed"] == files_before
    vacuum(lake, retention_hours=0)
    after = reg.frame().drop(columns=["started_at", "ended_at"]).reset_index(drop=True)
    assert {t.name: t.n_files for t in lake.tables()}["runs"] == 1
    assert len(list((tmp_path / "lake" / "runs").glob("*.parquet"))) == 1  # the old files are gone
    pd.testing.assert_frame_equal(after, before)


def _r(tag, n=3):
    return pd.DataFrame({"source": ["mdt"] * n, "raw_row": [f"{tag}{i}" for i in range(n)], "reason_code": ["bad_number"] * n,
                         "reason_text": ["x"] * n, "ingest_run_id": [tag] * n})


def _scheduled_lake(tmp_path):
    """Five scheduled runs: evaluate rewrites `metrics` each time (versions 0-4); ingest wrote `rejects` once (run-0)
    and was skipped since; a killed run-5 then committed `rejects` version 1 and never recorded success."""
    lake = Lake(tmp_path / "lake")
    reg = RunRegistry(lake)
    lake.write("rejects", _r("m0"), mode="overwrite")
    reg.succeed(reg.start("run-0", "ingest", "h", {}), {"rejects": 0}, {})
    for k in range(5):
        lake.write("metrics", _m(f"v{k}"), mode="overwrite")
        reg.succeed(reg.start(f"run-{k}", "evaluate", "h", {"rejects": 0}), {"metrics": k}, {})
    reg.start("run-5", "ingest", "h", {})
    lake.write("rejects", _r("m1"), mode="overwrite")
    return lake, reg


def test_keep_runs_bounds_what_vacuum_keeps(tmp_path):
    """lake.keep_runs: only the N newest runs pin versions; every stage's last success and every table's last good
    version stay, so recover() and the skip check still work after the vacuum."""
    lake, reg = _scheduled_lake(tmp_path)
    assert referenced_versions(reg) == {"rejects": {0}, "metrics": {0, 1, 2, 3, 4}}  # default: every run, forever
    assert referenced_versions(reg, keep_runs=2) == {"rejects": {0}, "metrics": {3, 4}}
    removed = vacuum(lake, retention_hours=0, keep_runs=2)
    assert len(removed["metrics"]) == 3 and removed["rejects"] == []  # run-0 is old, but rejects v0 is the last good
    for version in (3, 4):
        assert lake.read("metrics", version=version).num_rows == 3
    with pytest.raises(Exception):
        lake.read("metrics", version=2)
    assert reg.recover() == {"rejects": (1, 0)}  # the killed run's commit is rolled back onto files vacuum kept
    assert sorted(lake.read_pandas("rejects")["raw_row"]) == ["m00", "m01", "m02"]


def test_runs_that_only_skipped_do_not_count(tmp_path):
    """A schedule where nothing changed makes runs that skip every stage: they do not push the runs that wrote the
    versions out of the N kept (their records since the oldest kept run stay, and name the same versions)."""
    lake, reg = _scheduled_lake(tmp_path)
    for k in range(6, 9):
        reg.skip(reg.start(f"run-{k}", "evaluate", "h", {"rejects": 0}), "unchanged", outputs={"metrics": 4})
    assert referenced_versions(reg, keep_runs=2) == {"rejects": {0}, "metrics": {3, 4}}


def test_keep_runs_keeps_compactions_between_kept_runs_only(tmp_path):
    """Records since the oldest kept run stay (a compaction after it); a restore before it pins only its result."""
    lake, reg = _scheduled_lake(tmp_path)
    reg.recover()  # rejects 1 (the killed run's) -> 2, recorded as a succeeded "recover" run
    lake.write("metrics", _m("v5"))  # an append: metrics 5 holds two files
    reg.succeed(reg.start("run-6", "evaluate", "h", {}), {"metrics": 5}, {})
    assert optimize(lake, tables=["metrics"])["metrics"]["to_version"] == 6  # upkeep record 5 -> 6
    kept = referenced_versions(reg, keep_runs=1)
    assert kept == {"metrics": {5, 6}, "rejects": {0, 2}}  # not rejects 1: the killed run's commit goes
    assert len(vacuum(lake, retention_hours=0, keep_runs=1)["rejects"]) == 1
    with pytest.raises(Exception):
        lake.read("rejects", version=1)
    assert sorted(lake.read_pandas("rejects")["raw_row"]) == ["m00", "m01", "m02"]
    assert lake.read("metrics", version=5).num_rows == 6
    with pytest.raises(LakeError, match="keep_runs"):
        referenced_versions(reg, keep_runs=-1)


def test_keep_runs_and_model_folders(tmp_path):
    """Traffic weights of runs beyond the kept ones go; the last succeeded traffic run's stay."""
    import os
    import time

    from cellsynth.lake.upkeep import vacuum_models

    lake = Lake(tmp_path / "lake")
    reg = RunRegistry(lake)
    for run in ("t-1", "t-2", "t-3"):
        reg.succeed(reg.start(run, "traffic", "h", {}), {}, {})
        f = tmp_path / "lake" / "models" / "traffic" / run / "w.safetensors"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"w")
        t = time.time() - 200 * 3600.0
        for p in (f, f.parent):
            os.utime(p, (t, t))
    reg.succeed(reg.start("e-4", "evaluate", "h", {}), {}, {})  # the newest run trained no traffic model
    assert vacuum_models(lake, retention_hours=168, keep_runs=1) == {"models/radio": [], "models/kde": [],
                                                                     "models/traffic": ["t-1", "t-2"]}
    assert vacuum_models(lake, retention_hours=168) == {"models/radio": [], "models/kde": [], "models/traffic": []}


def test_cli_vacuum_reads_keep_runs(tmp_path, capsys):
    from cellsynth.cli import main

    lake, _ = _scheduled_lake(tmp_path)
    args = ["--set", f"run.lake_root={tmp_path / 'lake'}", "--set", "lake.retention_hours=0"]
    assert main(["vacuum", "--dry-run", *args, "--set", "lake.keep_runs=2"]) == 0
    assert "metrics: would delete 3 files" in capsys.readouterr().out
    assert main(["vacuum", "--dry-run", *args]) == 0
    assert "metrics: would delete 0 files" in capsys.readouterr().out
    assert main(["vacuum", *args, "--set", "lake.keep_runs=0"]) == 2
    assert "lake.keep_runs" in capsys.readouterr().err
