"""`PartitionReader`: one partition at a time, the same rows in the same order as `Lake.read`
with the same filter, from a dataset built once."""

import pandas as pd

from cellsynth.lake.partitions import PartitionReader, partition_filters, window_filters


def _reports(n: int, window: str, tag: str) -> pd.DataFrame:
    return pd.DataFrame({
        "report_id": [f"{tag}-{i}" for i in range(n)],
        "ts": pd.to_datetime(["2026-01-05T01:00:00Z"] * n, utc=True),
        "window": [window] * n,
        "x_m": [float(i) for i in range(n)], "y_m": [1.0] * n,
        "serving_cell_id": [f"c{i % 3}" for i in range(n)],
        "rsrp_dbm": [-80.0 - i for i in range(n)],
        "cell_shard": [i % 3 for i in range(n)],
        "ingest_run_id": [tag] * n,
    })


def test_each_partition_and_window_reads_what_a_filtered_lake_read_does(lake):
    # several appends: several files per partition, whose order the reader must keep
    lake.write("mdt_reports", _reports(9, "h00_06", "a"))
    lake.write("mdt_reports", _reports(7, "h06_12", "b"))
    v = lake.write("mdt_reports", _reports(5, "h00_06", "c"))
    reader = PartitionReader(lake, "mdt_reports")
    assert reader.version == v
    assert reader.filters == partition_filters(lake, "mdt_reports")
    assert len(reader.filters) == 6
    assert reader.window_filters == window_filters(lake, "mdt_reports")
    cols = ["report_id", "window", "cell_shard", "rsrp_dbm"]
    n = 0
    for flt in reader.filters + reader.window_filters:
        got = reader.read(cols, flt)
        want = lake.read_pandas("mdt_reports", columns=cols, filters=flt)
        pd.testing.assert_frame_equal(got, want)
        n += len(got)
    assert n == 2 * (9 + 7 + 5)  # every row once by partition, once by window
    assert sorted(reader.read(cols, [("window", "=", "h00_06"), ("cell_shard", "=", 1)])["report_id"]) == \
        ["a-1", "a-4", "a-7", "c-1", "c-4"]
    # a partition with no file reads empty with the columns; another filter goes through Lake.read
    assert list(reader.read(cols, [("window", "=", "h12_18"), ("cell_shard", "=", 0)]).columns) == cols
    assert len(reader.read(cols, [("rsrp_dbm", "<", -85.0)])) == 3 + 1


def test_the_reader_keeps_its_version(lake):
    lake.write("mdt_reports", _reports(6, "h00_06", "a"))
    reader = PartitionReader(lake, "mdt_reports")
    lake.write("mdt_reports", _reports(6, "h00_06", "b"))
    rows = sum(len(reader.read(["report_id"], flt)) for flt in reader.filters)
    assert rows == 6
    assert len(PartitionReader(lake, "mdt_reports").filters) == 3


def test_read_shards_reads_what_a_shard_filter_does(lake):
    lake.write("mdt_reports", _reports(9, "h00_06", "a"))
    lake.write("mdt_reports", _reports(7, "h06_12", "b"))
    reader = PartitionReader(lake, "mdt_reports")
    cols = ["report_id", "window", "cell_shard", "rsrp_dbm"]
    for shards in ([1], [0, 2], [5]):
        got = reader.read_shards(cols, shards)
        want = lake.read_pandas("mdt_reports", columns=cols, filters=[("cell_shard", "in", shards)])
        pd.testing.assert_frame_equal(got.sort_values("report_id", ignore_index=True),
                                      want.sort_values("report_id", ignore_index=True))
    assert sorted(reader.read_shards(["report_id"], [1])["report_id"]) == ["a-1", "a-4", "a-7", "b-1", "b-4"]
    assert list(reader.read_shards(cols, [5]).columns) == cols
