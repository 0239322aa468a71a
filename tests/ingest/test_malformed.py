"""Malformed CSV lines and implausible timestamps, on Spark's real CSV reader and tiny frames."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from cellsynth.config import SourceConfig, load_config
from cellsynth.errors import ConfigError
from cellsynth.ingest import transforms as tf
from cellsynth.ingest.sources import MALFORMED_COLUMN, ResolvedSource, read_raw

LINES = [
    "report_id,timestamp,rsrp",
    "a,2026-01-05T08:00:00Z,-80",
    "b,2026-01-05T08:00:00Z",  # truncated
    "c,2026-01-05T08:00:00Z,-80,x,y,z",  # three extra fields
    "d;2026-01-05T08:00:00Z;-80",  # wrong delimiter: one field
    '"e,1",2026-01-05T08:00:00Z,-80',  # a quoted comma is one field
]


@pytest.fixture()
def csv_path(tmp_path: Path) -> Path:
    path = tmp_path / "x.csv"
    path.write_text("\n".join(LINES) + "\n")
    return path


def test_schemaless_spark_reader_pads_and_truncates_silently(spark, csv_path):
    # Why read_raw passes a schema: without one, PERMISSIVE mode keeps every line as a clean row.
    rows = spark.read.options(header="true", mode="PERMISSIVE").csv(str(csv_path)).collect()
    assert [tuple(r) for r in rows][1:4] == [("b", "2026-01-05T08:00:00Z", None), ("c", "2026-01-05T08:00:00Z", "-80"),
                                             ("d;2026-01-05T08:00:00Z;-80", None, None)]


def test_read_raw_keeps_malformed_lines_whole(spark, csv_path):
    src = ResolvedSource("mdt", (str(csv_path),), SourceConfig(format="csv"))
    df = read_raw(spark, src)
    # Selecting one column must not skip the field-count check (CSV column pruning is off).
    got = df.select("report_id", MALFORMED_COLUMN).collect()
    assert [tuple(r) for r in got] == [
        ("a", None), (None, LINES[2]), (None, LINES[3]), (None, LINES[4]), ("e,1", None)]


def _checks(spark, values, fmt, rules):
    df = spark.createDataFrame([(v,) for v in values], "t string")
    ts = tf.parse_timestamp(F.col("t"), fmt, "UTC")
    implausible, outside = tf.timestamp_checks(ts, rules)
    return [(r.i, r.o) for r in df.select(implausible.alias("i"), outside.alias("o")).collect()]


def test_a_source_zone_shifts_only_timestamps_without_their_own(spark):
    # sources.<kind>.timezone says how to read wall-clock text; "Z" or "+08:00" text is an instant already and
    # was shifted by the zone's offset (08:00Z read in Asia/Shanghai became 00:00Z)
    text = ["2026-01-05T08:00:00Z", "2026-01-05T08:00:00+08:00", "2026-01-05T08:00:00", "2026-01-05 08:00:00",
            "2026-01-05T08:00:00.5+0800", "2026-01-05", "2026-01-05T08:00:00-05"]
    df = spark.createDataFrame([(t,) for t in text], "t string")
    got = [r.u for r in df.select(tf.parse_timestamp(F.col("t"), "iso", "Asia/Shanghai").alias("u")).collect()]
    want = ["2026-01-05 08:00:00", "2026-01-05 00:00:00", "2026-01-05 00:00:00", "2026-01-05 00:00:00",
            "2026-01-05 00:00:00.500000", "2026-01-04 16:00:00", "2026-01-05 13:00:00"]
    assert [pd.Timestamp(u) for u in got] == [pd.Timestamp(w) for w in want]
    # the same for a datetime pattern: one with an offset field reads the instant, one without is wall clock
    df = spark.createDataFrame([("2026-01-05 08:00:00+08:00", "2026-01-05 08:00:00")], "a string, b string")
    row = df.select(tf.parse_timestamp(F.col("a"), "yyyy-MM-dd HH:mm:ssXXX", "Asia/Shanghai").alias("a"),
                    tf.parse_timestamp(F.col("b"), "yyyy-MM-dd HH:mm:ss", "Asia/Shanghai").alias("b")).first()
    assert pd.Timestamp(row.a) == pd.Timestamp(row.b) == pd.Timestamp("2026-01-05 00:00:00")
    # a quoted letter is literal text, no zone field
    assert not tf.pattern_has_zone("yyyy.MM.dd_HH.mm.ss") and not tf.pattern_has_zone("yyyy-MM-dd'T'HH:mm:ss'Z'")
    assert tf.pattern_has_zone("yyyy-MM-dd HH:mm:ssXXX") and tf.pattern_has_zone("yyyy-MM-dd HH:mm VV")


def test_epoch_ms_1610_is_implausible(spark):
    # issue 20: a truncated epoch-ms timestamp `1610` became 1970-01-01 and a clean report
    rules = tf.Rules(plausible_end="2026-12-03T00:00:00Z")
    got = _checks(spark, ["1610", "1767600000000", "4102444800000"], "epoch_ms", rules)
    assert got == [(True, False), (False, False), (True, False)]  # 1970, 2026-01-05 08:00, 2100


def test_a_configured_period_widens_the_plausible_bounds(spark):
    rules = tf.Rules(period_start="1995-01-01", period_end="2026-01-12", plausible_end="2026-12-03T00:00:00Z")
    got = _checks(spark, ["1996-06-01T00:00:00Z", "1990-01-01T00:00:00Z", "2026-06-01T00:00:00Z",
                          "2027-01-01T00:00:00Z"], "iso", rules)
    # 1996: inside the period; 1990: before the widened start; June 2026: plausible but after the
    # period; 2027: more than a day after the run
    assert got == [(False, False), (True, False), (False, True), (True, False)]


def test_period_keys_are_validated():
    with pytest.raises(ConfigError, match=r"ingest\.period_start: expected an ISO 8601 date or date-time"):
        load_config(None, ["ingest.period_start=soon"])
    with pytest.raises(ConfigError, match=r"ingest\.period_end: expected a time after period_start"):
        load_config(None, ["ingest.period_start=2026-01-12", "ingest.period_end=2026-01-05"])
    assert load_config(None, ["ingest.period_start=2026-01-05"]).ingest.period_start == "2026-01-05"  # YAML date


def test_files_with_their_columns_in_another_order_are_read_by_name(spark, tmp_path):
    # One schema from the first file's header, applied by position to every file: a second export with the same
    # columns in another order (a logger update) had its longitude read as latitude, silently. The pandas
    # reader (the radio bench) reads each file by its own header; so does Spark now. A file lacking a column
    # gets nulls there (its rows are then rejected for the missing value), one with an extra column keeps it.
    a, b, c, empty = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv", tmp_path / "empty.csv"
    empty.write_text("")  # no header, no row: its own group would be a schema of no column (a Spark error)
    a.write_text("report_id,lat,lon,rsrp\nr1,51.9,-8.4,-80\n")
    b.write_text("report_id,lon,lat,rsrp\nr2,-8.5,51.8,-90\nr3,-8.6\n")
    c.write_text("rsrp,report_id,lat,extra\n-70,r4,51.7,x\n")
    src = ResolvedSource("mdt", (str(empty), str(a), str(b), str(c)), SourceConfig(format="csv"))
    df = read_raw(spark, src)
    got = {r["report_id"]: (r["lat"], r["lon"], r["rsrp"]) for r in df.collect() if r["report_id"]}
    assert got == {"r1": ("51.9", "-8.4", "-80"), "r2": ("51.8", "-8.5", "-90"), "r4": ("51.7", None, "-70")}
    assert [r[MALFORMED_COLUMN] for r in df.collect() if r[MALFORMED_COLUMN]] == ["r3,-8.6"]
    assert "extra" in df.columns


def test_a_decimal_comma_export_reads_its_numbers(spark, tmp_path):
    # A European export (';' between fields, 51,9 for 51.9): every number was a bad_number reject.
    from cellsynth.config import config_from_dict
    from cellsynth.ingest.sources import read_raw_pandas

    path = tmp_path / "mdt.csv"
    path.write_text("report_id;ue;lat;lon;rsrp;neighbour_1_rsrp_dbm;cell\n"
                    "r1;a,b;51,9;-8,47;-80,5;-1,2e2;12,3\nr2;c;51.8;-8.5;-90;NA;7\n")
    src = ResolvedSource("mdt", (str(path),), SourceConfig(format="csv", decimal=",", options={"sep": ";"}, columns={
        "ue_id": "ue", "latitude": "lat", "longitude": "lon", "rsrp_dbm": "rsrp", "serving_cell_id": "cell"}))
    want = [("r1", "a,b", "51.9", "-8.47", "-80.5", "-1.2e2", "12,3"), ("r2", "c", "51.8", "-8.5", "-90", None, "7")]
    cols = ["report_id", "ue", "lat", "lon", "rsrp", "neighbour_1_rsrp_dbm", "cell"]
    spark_rows = sorted(tuple(r) for r in read_raw(spark, src).select(*cols).collect())
    pandas_rows = sorted(tuple(None if v is pd.NA else v for v in r)
                         for r in read_raw_pandas(src)[cols].itertuples(index=False))
    assert spark_rows == pandas_rows == want  # ids and other text keep their commas
    with pytest.raises(Exception, match="decimal"):
        SourceConfig(format="csv", decimal=",")  # ',' between fields and in numbers cannot both hold
    with pytest.raises(ConfigError, match=r"sources\.mdt.*decimal"):
        config_from_dict({"sources": {"mdt": {"decimal": ","}}})


def test_a_latin1_export_reads_alike_in_spark_and_pandas(spark, tmp_path):
    # the pandas reader (radio bench) raised UnicodeDecodeError on a Latin-1 byte; Spark replaces it. Both now
    # replace undecodable bytes, and both honour the `encoding` option
    from cellsynth.ingest.sources import read_raw_pandas

    path = tmp_path / "mdt.csv"
    path.write_bytes("report_id,op,rsrp\nr1,Soci\u00e9t\u00e9,-80\nr2,Orange,-90\n".encode("latin-1"))
    for options, op in (({}, "Soci\ufffdt\ufffd"), ({"encoding": "ISO-8859-1"}, "Soci\u00e9t\u00e9")):
        src = ResolvedSource("mdt", (str(path),), SourceConfig(format="csv", options=options))
        spark_rows = sorted(tuple(r) for r in read_raw(spark, src).select("report_id", "op", "rsrp").collect())
        pandas_rows = sorted(read_raw_pandas(src)[["report_id", "op", "rsrp"]].itertuples(index=False, name=None))
        assert spark_rows == pandas_rows == [("r1", op, "-80"), ("r2", "Orange", "-90")]
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.options\.encoding: unknown character set 'Cp1252x'"):
        read_raw_pandas(ResolvedSource("mdt", (str(path),), SourceConfig(format="csv", options={"encoding": "Cp1252x"})))


def test_parquet_timestamps_nanosecond_or_not_read_as_the_instants_they_are(spark, tmp_path):
    # pandas writes datetime columns as nanosecond Parquet timestamps, an illegal type to Spark: the read failed
    # with a Py4J AnalysisException. A zone-aware timestamp is an instant (no source timezone shifts it), a naive
    # one a wall-clock time (the source's timezone applies), in nanoseconds and in microseconds alike
    instants = pd.to_datetime(["2026-01-05T08:00:00Z", "2026-07-05T08:00:00.25Z"], utc=True, format="ISO8601")
    walls = pd.to_datetime(["2026-01-05T08:00:00", "2026-07-05T08:00:00.25"], format="ISO8601")
    pd.DataFrame({"report_id": ["a", "b"], "t": instants, "w": walls}).to_parquet(tmp_path / "ns.parquet")
    pd.DataFrame({"report_id": ["a", "b"], "t": instants.astype("datetime64[us, UTC]"),
                  "w": walls.astype("datetime64[us]")}).to_parquet(tmp_path / "us.parquet")
    want_t = [pd.Timestamp("2026-01-05 08:00:00"), pd.Timestamp("2026-07-05 08:00:00.25")]
    want_w = [pd.Timestamp("2026-01-05 00:00:00"), pd.Timestamp("2026-07-05 00:00:00.25")]  # Shanghai: UTC+8
    for name in ("ns.parquet", "us.parquet"):
        src = ResolvedSource("mdt", (str(tmp_path / name),), SourceConfig(format="parquet", timezone="Asia/Shanghai"))
        got = read_raw(spark, src).select(
            "report_id", tf.parse_timestamp(F.col("t"), "iso", "Asia/Shanghai").alias("t"),
            tf.parse_timestamp(F.col("w"), "iso", "Asia/Shanghai").alias("w")).orderBy("report_id").collect()
        assert [pd.Timestamp(r.t) for r in got] == want_t, name
        assert [pd.Timestamp(r.w) for r in got] == want_w, name
