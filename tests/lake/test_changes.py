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


def test_a_compaction_in_between_is_no_change(tmp_path):
    # One new day appended, then `optimize`, then another: the diff is the two appends, not every compacted
    # partition (which made an incremental run after a compaction retrain those partitions in full).
    from cellsynth.lake.changes import _files_by_partition, changed_cells, changed_rows

    lake = Lake(tmp_path / "lake")
    parts = [(w, s) for w in ("h00_06", "h06_12") for s in range(2)]
    for k in range(3):  # several files per partition, so that the compaction has work
        v0 = lake.write("mdt_reports", pd.concat([_reports(range(100 * k + 10 * i, 100 * k + 10 * i + 5), w, s)
                                                 for i, (w, s) in enumerate(parts)]))
    lake.write("mdt_reports", _reports(range(500, 503), "h06_12", 1).assign(serving_cell_id="new"))
    lake.optimize("mdt_reports")
    v_opt = lake.version("mdt_reports")
    assert lake.history("mdt_reports", 1)[0]["operation"] == "OPTIMIZE" and v_opt == v0 + 2
    assert changed_partitions(lake, "mdt_reports", v0 + 1, until_version=v_opt) == set()
    assert changed_partitions(lake, "mdt_reports", v0) == {("h06_12", "1")}
    assert changed_cells(lake, "mdt_reports", v0, cell_col="serving_cell_id") == {("h06_12", 1): {"new"}}
    rows = changed_rows(lake, "mdt_reports", v0, columns=["report_id"])
    assert list(rows) == [("h06_12", 1)] and sorted(rows[("h06_12", 1)]["report_id"]) == ["r500", "r501", "r502"]
    lake.write("mdt_reports", _reports(range(600, 602), "h00_06", 0))
    assert changed_partitions(lake, "mdt_reports", v0) == {("h06_12", "1"), ("h00_06", "0")}
    assert changed_cells(lake, "mdt_reports", v0 + 1, cell_col="serving_cell_id") == {("h00_06", 0): {"c"}}
    # a plain diff of the two versions sees every compacted partition rewritten
    old, new = (_files_by_partition(lake, "mdt_reports", v, ("window", "cell_shard")) for v in (v0 + 1, v_opt + 1))
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} == {(w, str(s)) for w, s in parts}
