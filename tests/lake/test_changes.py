import pandas as pd

from cellsynth.lake import Lake
from cellsynth.lake.changes import changed_partitions


def _reports(ids, window, shard):
    n = len(ids)
    return pd.DataFrame({
        "report_id": [f"r{i}" for i in ids], "ts": pd.to_datetime(["2026-01-05T01:00:00Z"] * n, utc=True),
        "window": [window] * n, "x_m": [0.0] * n, "y_m": [0.0] * n, "serving_cell_id": ["c"] * n,
        "rsrp_dbm": [-80.0] * n, "cell_shard": [shard] * n, "ingest_run_id": ["run"] * n,
    })


def test_appending_one_partition_changes_only_that_partition(tmp_path):
    lake = Lake(tmp_path / "lake")
    base = pd.concat([_reports(range(i * 10, i * 10 + 10), w, s) for i, (w, s) in
                      enumerate([(w, s) for w in ("h00_06", "h06_12") for s in range(4)])])
    v0 = lake.write("mdt_reports", base)
    assert changed_partitions(lake, "mdt_reports", None) == {(w, str(s)) for w in ("h00_06", "h06_12") for s in range(4)}
    assert changed_partitions(lake, "mdt_reports", v0) == set()
    lake.write("mdt_reports", _reports(range(100, 105), "h06_12", 2))
    assert changed_partitions(lake, "mdt_reports", v0) == {("h06_12", "2")}
    lake.write("mdt_reports", _reports(range(200, 203), "h00_06", 1), mode="overwrite",
               predicate="window = 'h00_06' AND cell_shard = 1")
    assert changed_partitions(lake, "mdt_reports", v0) == {("h06_12", "2"), ("h00_06", "1")}
    assert changed_partitions(lake, "mdt_reports", v0, until_version=v0 + 1) == {("h06_12", "2")}
