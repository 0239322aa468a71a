import pandas as pd
import pyarrow as pa
import pytest

from cellsynth.errors import SchemaError
from cellsynth.lake import Lake


def _reports(n=6, window="h00_06", rsrp=-80.0):
    return pd.DataFrame({
        "report_id": [f"r{i}" for i in range(n)],
        "ts": pd.to_datetime(["2026-01-05T01:00:00Z"] * n, utc=True),
        "window": [window] * n,
        "x_m": [float(i) for i in range(n)], "y_m": [0.0] * n,
        "serving_cell_id": [f"c{i % 2}" for i in range(n)],
        "rsrp_dbm": [rsrp] * n,
        "cell_shard": [i % 2 for i in range(n)],
        "ingest_run_id": ["run"] * n,
    })


def test_round_trip_append_and_time_travel(lake):
    v0 = lake.write("mdt_reports", _reports())
    v1 = lake.write("mdt_reports", _reports(window="h06_12"))
    assert (v0, v1) == (0, 1)
    assert lake.read("mdt_reports").num_rows == 12
    assert lake.read("mdt_reports", version=0).num_rows == 6
    back = lake.read_pandas("mdt_reports", version=0).sort_values("report_id")
    assert back["rsrp_dbm"].tolist() == [-80.0] * 6
    assert back["ts"].dt.tz is not None


def test_predicate_overwrite_replaces_only_matching_rows(lake):
    lake.write("mdt_reports", _reports())
    lake.write("mdt_reports", _reports(window="h06_12"))
    lake.write("mdt_reports", _reports(n=2, window="h06_12", rsrp=-100.0), mode="overwrite", predicate="window = 'h06_12'")
    df = lake.read_pandas("mdt_reports")
    assert len(df) == 8
    assert sorted(df.loc[df.window == "h06_12", "rsrp_dbm"]) == [-100.0, -100.0]
    assert (df.loc[df.window == "h00_06", "rsrp_dbm"] == -80.0).all()


def test_filters_select_partitions(lake):
    lake.write("mdt_reports", _reports())
    shard1 = lake.read("mdt_reports", filters=[("cell_shard", "in", [1]), ("window", "=", "h00_06")])
    assert sorted(shard1.column("report_id").to_pylist()) == ["r1", "r3", "r5"]


def test_same_app_id_commits_once(lake):
    v = lake.write("mdt_reports", _reports(), app_id="run-1:ingest")
    assert lake.write("mdt_reports", _reports(), app_id="run-1:ingest") == v
    assert lake.read("mdt_reports").num_rows == 6


def test_schema_enforced_with_column_named(lake):
    with pytest.raises(SchemaError, match=r"mdt_reports: column 'rsrp_dbm' missing"):
        lake.write("mdt_reports", _reports().drop(columns="rsrp_dbm"))
    with pytest.raises(SchemaError, match=r"mdt_reports: unexpected column 'rsrp'"):
        lake.write("mdt_reports", _reports().assign(rsrp=1.0))
    with pytest.raises(SchemaError, match=r"column 'serving_cell_id' has 1 nulls"):
        lake.write("mdt_reports", _reports().assign(serving_cell_id=["a", None, "b", "c", "d", "e"]))
    assert not lake.exists("mdt_reports")


def test_staged_files_are_invisible_until_committed(lake):
    lake.write("mdt_reports", _reports())
    actions = lake.stage_files("mdt_reports", _reports(window="h06_12"))
    assert {a["partition_values"]["window"] for a in actions} == {"h06_12"}
    assert lake.read("mdt_reports").num_rows == 6  # a killed writer leaves nothing visible
    v = lake.commit_files("mdt_reports", actions, app_id="x")
    assert v == 1
    assert lake.read("mdt_reports").num_rows == 12
    assert lake.commit_files("mdt_reports", actions, app_id="x") == 1


def test_commit_files_overwrites_one_partition(lake):
    lake.commit_files("mdt_reports", lake.stage_files("mdt_reports", _reports()))
    new = lake.stage_files("mdt_reports", _reports(n=2, rsrp=-120.0).assign(cell_shard=[1, 1]))
    lake.commit_files("mdt_reports", new, mode="overwrite", partition_filters=[("window", "=", "h00_06"), ("cell_shard", "=", 1)])
    df = lake.read_pandas("mdt_reports")
    assert sorted(df.loc[df.cell_shard == 1, "rsrp_dbm"]) == [-120.0, -120.0]
    assert (df.loc[df.cell_shard == 0, "rsrp_dbm"] == -80.0).all() and (df.cell_shard == 0).sum() == 3


def test_failed_commit_leaves_previous_version_readable(lake, monkeypatch):
    lake.write("mdt_reports", _reports())
    actions = lake.stage_files("mdt_reports", _reports(window="h06_12"))
    import deltalake

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(deltalake.DeltaTable, "create_write_transaction", boom)
    from cellsynth.errors import LakeError

    with pytest.raises(LakeError, match="mdt_reports.*disk full"):
        lake.commit_files("mdt_reports", actions)
    monkeypatch.undo()
    assert lake.version("mdt_reports") == 0
    assert lake.read("mdt_reports").num_rows == 6


def test_extra_neighbour_columns_allowed_for_synthetic(lake):
    df = pd.DataFrame({
        "sample_id": ["s0"], "window": ["all"], "x_m": [0.0], "y_m": [0.0], "lat": [44.0], "lon": [11.0],
        "serving_cell_id": ["c0"], "rsrp_dbm": [-80.0], "rsrp_dbm_epistemic_std": [1.0],
        "rsrp_dbm_aleatoric_std": [4.0], "reliable": [True], "scenario": ["observed"], "cell_shard": [0],
        "run_id": ["r"], "neighbour_1_cell_id": ["c1"], "neighbour_1_rsrp_dbm": [-90.0],
    })
    lake.commit_files("synthetic_mdt", lake.stage_files("synthetic_mdt", df))
    back = lake.read("synthetic_mdt")
    assert back.column("neighbour_1_rsrp_dbm").to_pylist() == [-90.0]


def test_tables_lists_versions_and_rows(lake):
    lake.write("mdt_reports", _reports())
    lake.write("mdt_reports", _reports())
    info = {t.name: t for t in lake.tables()}
    assert info["mdt_reports"].version == 1 and info["mdt_reports"].n_rows == 12


def test_repr_hides_storage_options(tmp_path):
    lake = Lake(tmp_path, storage_options={"AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    assert "s3cr3t" not in repr(lake)


def test_model_folder_on_a_local_lake_is_the_lake_folder(tmp_path):
    lake = Lake(tmp_path / "lake")
    src = tmp_path / "w"
    src.mkdir()
    (src / "a.json").write_text("{}")
    lake.put_dir(src, "models/x")
    assert (tmp_path / "lake" / "models" / "x" / "a.json").read_text() == "{}"
    assert lake.local_dir("models/x") == tmp_path / "lake" / "models" / "x"
    # writing straight into the lake folder and "putting" it is a no-op
    assert lake.put_dir(tmp_path / "lake" / "models" / "x", "models/x") == "models/x"


def test_json_records_round_trip_and_absent_is_none(tmp_path):
    lake = Lake(tmp_path / "lake")
    assert lake.read_json("_ingest/files.json") is None
    lake.write_json("_ingest/files.json", {"files": ["a.csv"], "versions": {"cells": 0}})
    assert lake.read_json("_ingest/files.json") == {"files": ["a.csv"], "versions": {"cells": 0}}
    lake.write_json("_ingest/files.json", {"files": []})
    assert lake.read_json("_ingest/files.json") == {"files": []}
    assert [p.name for p in (tmp_path / "lake" / "_ingest").iterdir()] == ["files.json"]  # no temp left
    (tmp_path / "lake" / "_ingest" / "files.json").write_text("{not json")
    assert lake.read_json("_ingest/files.json") is None


def test_an_app_id_a_restore_took_back_commits_again(tmp_path):
    # Delta keeps an app id's transaction through a RESTORE: recover() rolled a killed run's commit back,
    # and the rerun under the same run id (jobs/*.py --run-id) skipped its write as already committed,
    # leaving the table without the rows while the stage recorded success.
    lake = Lake(tmp_path / "lake")
    row = pd.DataFrame({"run_id": ["a"], "stage": ["s"], "metric": ["m"], "value": [1.0]})
    lake.write("metrics", row)
    lake.write("metrics", row.assign(value=2.0), app_id="job-1:density")
    assert lake.committed_app_ids("metrics", "job-1:density")
    lake.restore("metrics", 0)
    assert not lake.committed_app_ids("metrics", "job-1:density")
    v = lake.write("metrics", row.assign(value=2.0), app_id="job-1:density")
    assert sorted(lake.read_pandas("metrics")["value"]) == [1.0, 2.0]
    assert lake.write("metrics", row.assign(value=2.0), app_id="job-1:density") == v  # and only once
    assert lake.committed_app_ids("metrics", "job-1:density") and len(lake.read_pandas("metrics")) == 2
