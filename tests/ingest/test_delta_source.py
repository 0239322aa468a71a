"""An operator's MDT table that already lives in a lake as Delta is read by URI and version."""

from __future__ import annotations

import pandas as pd
import pytest
from deltalake import write_deltalake

from cellsynth.config import config_from_dict
from cellsynth.ingest.sources import read_raw, resolve_source


def test_delta_source_is_read_at_the_pinned_version(spark, tmp_path):
    uri = str(tmp_path / "operator_mdt")
    first = pd.DataFrame({"report_id": ["a", "b"], "rsrp": [-80.0, -90.0], "day": ["d1", "d1"]})
    write_deltalake(uri, first, partition_by=["day"])
    write_deltalake(uri, pd.DataFrame({"report_id": ["c"], "rsrp": [-100.0], "day": ["d2"]}), mode="append")
    cfg = config_from_dict({"scenario": {"enabled": False},
                            "sources": {"mdt": {"path": uri, "format": "delta", "delta_version": 0}}})
    df = read_raw(spark, resolve_source(cfg, "mdt")).toPandas().sort_values("report_id")
    assert df["report_id"].tolist() == ["a", "b"]
    # typed numbers stay numbers (no text round trip); ids and other text arrive as text
    assert df["rsrp"].tolist() == pytest.approx([-80.0, -90.0])
    assert df["day"].tolist() == ["d1", "d1"]  # the partition column survives


def test_a_column_some_files_lack_is_kept_for_the_others(spark, tmp_path):
    # Spark read Parquet with one file's schema: a column only later exports (or, in a Delta table, only
    # files written after a schema evolution) carry vanished from every row.
    from cellsynth.config import SourceConfig
    from cellsynth.ingest.sources import ResolvedSource

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pd.DataFrame({"report_id": ["r1"], "lat": [1.0]}).to_parquet(a)
    pd.DataFrame({"report_id": ["r2"], "lat": [2.0], "rsrq": [-11.0]}).to_parquet(b)
    for files in ((a, b), (b, a)):
        df = read_raw(spark, ResolvedSource("mdt", tuple(map(str, files)), SourceConfig(format="parquet"))).toPandas()
        assert dict(zip(df["report_id"], df["rsrq"])) == pytest.approx({"r1": float("nan"), "r2": -11.0}, nan_ok=True)
    uri = str(tmp_path / "evolved")
    write_deltalake(uri, pd.DataFrame({"report_id": ["a"], "rsrp": [-80.0]}))
    write_deltalake(uri, pd.DataFrame({"report_id": ["b"], "rsrp": [-90.0], "rsrq": [-12.0]}), mode="append",
                    schema_mode="merge")
    cfg = config_from_dict({"scenario": {"enabled": False}, "sources": {"mdt": {"path": uri, "format": "delta"}}})
    df = read_raw(spark, resolve_source(cfg, "mdt")).toPandas().sort_values("report_id")
    assert df["rsrq"].tolist() == pytest.approx([float("nan"), -12.0], nan_ok=True)


def test_files_whose_column_types_differ_are_read_not_crashed(spark, tmp_path):
    # One day's export wrote RSRP as float32, another's cell id as text: Spark's schema merge (and its read
    # with one file's schema) failed with a Py4J traceback, the whole ingest with it.
    from cellsynth.config import SourceConfig
    from cellsynth.ingest.sources import ResolvedSource

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pd.DataFrame({"report_id": ["r1"], "rsrp": pd.Series([-80.5], dtype="float64"), "cell": [7],
                  "rsrq": pd.Series([-11], dtype="int32")}).to_parquet(a)
    pd.DataFrame({"report_id": ["r2"], "rsrp": pd.Series([-90.1], dtype="float32"), "cell": ["x7"],
                  "rsrq": pd.Series([-12.5], dtype="float64")}).to_parquet(b)
    df = read_raw(spark, ResolvedSource("mdt", (str(a), str(b)), SourceConfig(format="parquet"))).toPandas()
    got = {r.report_id: (r.rsrp, r.cell, r.rsrq) for r in df.itertuples()}
    # a float32 arrives as its text (-90.1, not the widened -90.09999847), int and double as a double
    assert got == {"r1": ("-80.5", "7", -11.0), "r2": ("-90.1", "x7", -12.5)}


def test_an_unreadable_parquet_file_is_one_line_naming_it(spark, tmp_path):
    from cellsynth.config import SourceConfig
    from cellsynth.errors import SchemaError
    from cellsynth.ingest.sources import ResolvedSource

    good, bad = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pd.DataFrame({"report_id": ["r1"]}).to_parquet(good)
    bad.write_bytes(good.read_bytes()[:40])  # a copy cut short: no footer
    with pytest.raises(SchemaError, match=r"sources\.mdt\.path: .*b\.parquet is not a readable Parquet file"):
        read_raw(spark, ResolvedSource("mdt", (str(good), str(bad)), SourceConfig(format="parquet")))
