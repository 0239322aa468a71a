"""The lake on an S3-compatible object store for real: a moto server on 127.0.0.1, credentials
from environment variables through `lake.storage_options_env`."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from cellsynth.cluster import make_lake
from cellsynth_testkit import test_config as make_test_config
from cellsynth.lake import RunRegistry

from ._s3 import make_bucket, moto_server

KEY_ID, SECRET = "AKIACELLSYNTHTEST", "cellsynth-secret-do-not-log"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        make_bucket(endpoint, "lake", KEY_ID, SECRET)
        yield endpoint


@pytest.fixture
def s3_cfg(s3_endpoint, tmp_path, monkeypatch, request):
    monkeypatch.setenv("CS_TEST_KEY", KEY_ID)
    monkeypatch.setenv("CS_TEST_SECRET", SECRET)
    return make_test_config(
        tmp_path,
        run={"lake_root": f"s3://lake/{request.node.name}"},
        lake={
            "storage_options_env": {"AWS_ACCESS_KEY_ID": "CS_TEST_KEY", "AWS_SECRET_ACCESS_KEY": "CS_TEST_SECRET"},
            "storage_options": {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"},
        },
    )


@pytest.fixture
def s3_lake(s3_cfg):
    return make_lake(s3_cfg)


def _reports(n=6, window="h00_06", rsrp=-80.0, start=0):
    ids = range(start, start + n)
    return pd.DataFrame({
        "report_id": [f"r{i}" for i in ids],
        "ts": pd.to_datetime(["2026-01-05T01:00:00Z"] * n, utc=True),
        "window": [window] * n,
        "x_m": [float(i) for i in ids], "y_m": [0.0] * n,
        "serving_cell_id": [f"c{i % 2}" for i in ids],
        "rsrp_dbm": [rsrp] * n,
        "cell_shard": [i % 2 for i in ids],
        "ingest_run_id": ["run"] * n,
    })


def test_credentials_come_from_env(s3_cfg):
    opts = s3_cfg.storage_options()
    assert opts["AWS_ACCESS_KEY_ID"] == KEY_ID and opts["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert SECRET not in s3_cfg.model_dump_json()


def test_write_read_time_travel_on_s3(s3_lake):
    assert s3_lake.is_remote and s3_lake.uri("mdt_reports").startswith("s3://lake/")
    assert s3_lake.write("mdt_reports", _reports()) == 0
    assert s3_lake.write("mdt_reports", _reports(window="h06_12", start=6)) == 1
    assert s3_lake.read("mdt_reports").num_rows == 12
    old = s3_lake.read_pandas("mdt_reports", version=0)
    assert sorted(old["report_id"]) == [f"r{i}" for i in range(6)]
    shard1 = s3_lake.read("mdt_reports", filters=[("window", "=", "h06_12"), ("cell_shard", "=", 1)])
    assert sorted(shard1.column("report_id").to_pylist()) == ["r11", "r7", "r9"]
    assert [t.name for t in s3_lake.tables()] == ["mdt_reports"]
    (info,) = s3_lake.tables()
    assert (info.version, info.n_rows) == (1, 12)


def test_predicate_overwrite_and_idempotent_app_id_on_s3(s3_lake):
    s3_lake.write("mdt_reports", _reports())
    s3_lake.write("mdt_reports", _reports(window="h06_12", start=6))
    v = s3_lake.write("mdt_reports", _reports(n=2, window="h06_12", rsrp=-101.0, start=6), mode="overwrite",
                      predicate="window = 'h06_12'", app_id="run-x:ingest")
    assert v == 2
    assert s3_lake.write("mdt_reports", _reports(n=2, window="h06_12", rsrp=-101.0, start=6), mode="overwrite",
                         predicate="window = 'h06_12'", app_id="run-x:ingest") == 2
    df = s3_lake.read_pandas("mdt_reports")
    assert len(df) == 8
    assert sorted(df.loc[df.window == "h06_12", "rsrp_dbm"]) == [-101.0, -101.0]
    assert (df.loc[df.window == "h00_06", "rsrp_dbm"] == -80.0).all()


def test_stage_files_then_one_commit_on_s3(s3_lake):
    # Ray-actor style: two workers stage files, the driver commits them once.
    staged = s3_lake.stage_files("mdt_reports", _reports()) + s3_lake.stage_files("mdt_reports", _reports(start=6))
    assert not s3_lake.exists("mdt_reports")  # nothing visible before the commit
    assert s3_lake.commit_files("mdt_reports", staged, app_id="run-1:density") == 0
    df = s3_lake.read_pandas("mdt_reports")
    assert len(df) == 12 and df["report_id"].is_unique
    # Partial overwrite of one partition through staged files.
    redo = s3_lake.stage_files("mdt_reports", _reports(n=3, rsrp=-120.0).assign(cell_shard=0))
    v = s3_lake.commit_files("mdt_reports", redo, mode="overwrite",
                             partition_filters=[("window", "=", "h00_06"), ("cell_shard", "=", 0)])
    assert v == 1
    df = s3_lake.read_pandas("mdt_reports")
    shard0 = df[(df.window == "h00_06") & (df.cell_shard == 0)]
    assert sorted(shard0["rsrp_dbm"]) == [-120.0] * 3
    assert len(df[df.cell_shard == 1]) == 6


def test_registry_and_logs_never_hold_secrets(s3_cfg, s3_lake, caplog):
    caplog.set_level(logging.DEBUG)
    registry = RunRegistry(s3_lake)
    rec = registry.start("run-s3", "ingest", s3_cfg.section_hash(), {"mdt_reports": None})
    registry.fail(rec, RuntimeError(f"boom at {s3_lake!r}"))
    runs = s3_lake.read_pandas("runs")
    blob = runs.astype(str).to_csv()
    assert len(runs) == 2 and SECRET not in blob and KEY_ID not in blob
    assert SECRET not in repr(s3_lake) and SECRET not in str(s3_cfg)
    assert SECRET not in caplog.text


def test_registry_recover_on_s3(s3_lake):
    registry = RunRegistry(s3_lake)
    rec = registry.start("run-a", "ingest", "h", {})
    v0 = s3_lake.write("mdt_reports", _reports())
    registry.succeed(rec, {"mdt_reports": v0}, {})
    s3_lake.write("mdt_reports", _reports(start=100))  # a killed run's commit
    assert registry.recover() == {"mdt_reports": (1, 0)}
    assert np.array_equal(np.sort(s3_lake.read_pandas("mdt_reports")["report_id"]), [f"r{i}" for i in range(6)])


def test_ray_tasks_stage_files_on_s3_driver_commits(s3_lake, ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0.5)
    def stage(lake, start):
        return lake.stage_files("mdt_reports", _reports(n=4, start=start))

    actions = sum(ray.get([stage.remote(s3_lake, start) for start in (0, 4, 8)]), [])
    assert s3_lake.commit_files("mdt_reports", actions) == 0
    df = s3_lake.read_pandas("mdt_reports")
    assert sorted(df["report_id"], key=lambda r: int(r[1:])) == [f"r{i}" for i in range(12)]


def test_read_operator_delta_table_by_uri_and_version(s3_cfg, s3_lake):
    from cellsynth.lake.external import delta_snapshot, read_delta

    s3_lake.write("mdt_reports", _reports())
    s3_lake.write("mdt_reports", _reports(window="h06_12", start=6))
    uri, opts = s3_lake.uri("mdt_reports"), s3_cfg.storage_options()
    snap = delta_snapshot(uri, version=0, storage_options=opts)
    assert snap.version == 0 and snap.partition_columns == ("window", "cell_shard")
    assert len(snap.files) == 2 and all(f.startswith(uri + "/window=h00_06/") for f in snap.files)
    assert read_delta(uri, version=0, storage_options=opts).num_rows == 6
    latest = read_delta(uri, storage_options=opts, columns=["report_id", "window"])
    assert latest.num_rows == 12 and latest.column_names == ["report_id", "window"]


def test_model_folder_round_trip_on_s3(s3_lake, tmp_path):
    src = tmp_path / "weights"
    (src / "shard=3").mkdir(parents=True)
    (src / "shard=3" / "w.safetensors").write_bytes(b"\x00\x01weights")
    (src / "shard=3" / "w.json").write_text('{"n": 1}')
    assert s3_lake.put_dir(src, "models/radio/run1/rsrp") == "models/radio/run1/rsrp"
    local = s3_lake.local_dir("models/radio/run1/rsrp", cache_dir=tmp_path / "cache")
    assert (local / "shard=3" / "w.safetensors").read_bytes() == b"\x00\x01weights"
    assert (local / "shard=3" / "w.json").read_text() == '{"n": 1}'
    # a second read reuses the download instead of fetching again
    assert s3_lake.local_dir("models/radio/run1/rsrp", cache_dir=tmp_path / "cache") == local
    with pytest.raises(Exception, match="cannot read models/radio/nope"):
        s3_lake.local_dir("models/radio/nope", cache_dir=tmp_path / "cache")


def test_model_folder_cache_follows_the_remote_files(s3_lake, tmp_path):
    src = tmp_path / "w"
    src.mkdir()
    (src / "a.json").write_text('{"version": 1}')
    s3_lake.put_dir(src, "models/x/run")
    first = s3_lake.local_dir("models/x/run", cache_dir=tmp_path / "cache")
    assert (first / "a.json").read_text() == '{"version": 1}'
    # same path rewritten (another run, another lake at the same URI): the stale copy is not served
    (src / "a.json").write_text('{"version": 22}')
    s3_lake.put_dir(src, "models/x/run")
    second = s3_lake.local_dir("models/x/run", cache_dir=tmp_path / "cache")
    assert (second / "a.json").read_text() == '{"version": 22}'


def test_vacuum_keeps_the_kept_runs_versions_on_s3(s3_lake):
    """`lake.keep_runs` on an object store: the unkept run's files go, the kept run's version stays readable, and
    a second vacuum finds nothing (it listed the already deleted tombstones again)."""
    from cellsynth.lake.upkeep import vacuum

    registry = RunRegistry(s3_lake)
    for k in range(3):  # three scheduled runs, each rewriting the table
        v = s3_lake.write("mdt_reports", _reports(start=10 * k), mode="overwrite")
        registry.succeed(registry.start(f"day-{k}", "ingest", "h", {}), {"mdt_reports": v}, {})
    assert vacuum(s3_lake, retention_hours=0)["mdt_reports"] == []  # by default every recorded run is kept
    removed = vacuum(s3_lake, retention_hours=0, keep_runs=2)["mdt_reports"]
    assert len(removed) == len(s3_lake.file_uris("mdt_reports", version=0)) > 0
    assert sorted(s3_lake.read_pandas("mdt_reports", version=1)["report_id"]) == sorted(f"r{i}" for i in range(10, 16))
    with pytest.raises(Exception):
        s3_lake.read("mdt_reports", version=0)
    assert vacuum(s3_lake, retention_hours=0, keep_runs=2)["mdt_reports"] == []


def test_vacuum_models_on_s3(s3_lake):
    """Model folders on an object store (no folder mtimes; prefixes as folders): a failed run's traffic weights go,
    a succeeded run's stay."""
    from cellsynth.lake.upkeep import vacuum_models

    fs, base = s3_lake.filesystem()
    for run in ("t-ok", "t-failed"):
        with fs.open_output_stream(f"{base}/models/traffic/{run}/conditional/w.safetensors") as out:
            out.write(b"w")
    registry = RunRegistry(s3_lake)
    registry.succeed(registry.start("t-ok", "traffic", "h", {}), {}, {})
    registry.fail(registry.start("t-failed", "traffic", "h", {}), RuntimeError("x"))
    assert vacuum_models(s3_lake, retention_hours=0)["models/traffic"] == ["t-failed"]
    from pyarrow import fs as pafs

    left = fs.get_file_info(pafs.FileSelector(f"{base}/models/traffic", recursive=True))
    assert sorted(i.path.split("/models/traffic/")[1] for i in left if i.type == pafs.FileType.File) == [
        "t-ok/conditional/w.safetensors"]
