"""Ingest transforms on tiny frames: the built-in projection against pyproj, neighbour duplicates
found inside each report's list, and the one-pass input statistics."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from cellsynth.geo import LocalFrame
from cellsynth.ingest import transforms as tf
from cellsynth.ingest.stage import _input_stats

FRAME = LocalFrame(44.495, 11.343)
BOX = (44.40, 44.60, 11.20, 11.50)


@pytest.mark.parametrize("box", [BOX, (43.0, 46.0, 9.0, 14.0)])
def test_polynomial_projection_matches_pyproj(spark, box):
    rng = np.random.default_rng(3)
    lat = rng.uniform(box[0], box[1], 300)
    lon = rng.uniform(box[2], box[3], 300)
    df = spark.createDataFrame([(float(a), float(b)) for a, b in zip(lat, lon)], "lat double, lon double")
    assert tf.fit_projection(FRAME, box) is not None  # this box takes the built-in path
    got = df.select(tf.project_col(F.col("lat"), F.col("lon"), FRAME, box).alias("p")).select("p.x_m", "p.y_m").toPandas()
    x_m, y_m = FRAME.to_xy(lat, lon)  # pyproj is the reference
    np.testing.assert_allclose(got["x_m"], x_m, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["y_m"], y_m, rtol=0, atol=1e-6)


def test_projection_outside_the_box_is_null_and_without_box_uses_pyproj(spark):
    df = spark.createDataFrame([(44.5, 11.3), (45.5, 11.3)], "lat double, lon double")
    boxed = df.select(tf.project_col(F.col("lat"), F.col("lon"), FRAME, BOX).alias("p")).select("p.x_m").toPandas()
    assert boxed["x_m"].notna().tolist() == [True, False]
    free = df.select(tf.project_col(F.col("lat"), F.col("lon"), FRAME).alias("p")).select("p.x_m").toPandas()
    assert free["x_m"].to_numpy() == pytest.approx(FRAME.to_xy(np.array([44.5, 45.5]), np.array([11.3, 11.3]))[0], abs=1e-6)


def test_fit_projection_declines_a_hemisphere():
    assert tf.fit_projection(FRAME, (-80.0, 80.0, -170.0, 170.0)) is None


def test_neighbour_duplicates_within_a_report(spark):
    nb = "array<struct<rank:int,cell_id:string,rsrp_raw:string>>"
    df = spark.createDataFrame(
        [("r1", "C1", [(1, "C2", "-90"), (2, "C3", "-95"), (3, "C2", "-99"), (4, "C3", "-100")]),
         ("r2", "C1", [(1, "C2", "-91"), (2, None, "-92"), (3, None, "-93")])],
        f"report_id string, serving_cell_id string, neighbours {nb}",
    ).select("*", F.lit(None).cast("timestamp").alias("ts"), F.lit("all").alias("window"),
             F.lit(0.0).alias("x_m"), F.lit(0.0).alias("y_m"))
    out = tf.explode_neighbours(df, rules=tf.Rules()).toPandas()
    codes = {(r.report_id, r.rank): list(r.reasons) for r in out.itertuples()}
    # hand-worked: r1 repeats C2 at rank 3 and C3 at rank 4; r2's null cells are missing, not duplicates
    assert codes == {("r1", 1): [], ("r1", 2): [], ("r1", 3): ["duplicate"], ("r1", 4): ["duplicate"],
                     ("r2", 1): [], ("r2", 2): ["missing_value"], ("r2", 3): ["missing_value"]}
    assert out.loc[out["reasons"].str.len() == 0, "raw_row"].isna().all()
    assert out.loc[(out["report_id"] == "r1") & (out["rank"] == 3), "raw_row"].item() == (
        '{"report_id":"r1","rank":3,"cell_id":"C2","rsrp_dbm":"-99"}')


def test_input_stats_one_pass(spark):
    nb = "array<struct<rank:int,cell_id:string,rsrp_raw:string>>"
    mdt = spark.createDataFrame(
        [(["duplicate"], False, [(1, "C2", "-90")]), ([], True, [(1, "C2", "-90"), (2, "C3", "-91")]),
         (["rsrp_out_of_range", "unknown_cell"], True, []), ([], False, [(1, None, "-80")])],
        f"reasons array<string>, swapped boolean, neighbours {nb}")
    traffic = spark.createDataFrame([(["bad_timestamp"],), ([],), (["bad_timestamp"],)], "reasons array<string>")
    rows_in, n_swapped, n_neighbours = _input_stats([("traffic", traffic), ("mdt", mdt)])
    assert rows_in == {"traffic": 3, "mdt": 4}
    assert n_swapped == 2
    assert n_neighbours == 3  # entries of the two clean reports only (2 + 1)


def test_parsed_duplicate_flags_match_the_reference_explosion(spark):
    # parse_mdt flags in-list repeats with plain column expressions; explode_neighbours' own
    # (higher-order function) path on the same lists without the flag is the reference.
    cols = ["report_id", "serving_cell_id", "n1", "r1", "n2", "r2", "n3", "r3"]
    raw = spark.createDataFrame(
        [("a", "C1", "C2", "-90", "C3", "-95", "C2", "-99"), ("b", "C1", None, None, "C2", "-91", None, "-93"),
         ("c", "C1", "C3", "-90", None, None, "C3", "-97")], ", ".join(f"{c} string" for c in cols))
    mapping = {"report_id": "report_id", "serving_cell_id": "serving_cell_id"}
    parsed = tf.parse_mdt(raw, mapping, [("n1", "r1"), ("n2", "r2"), ("n3", "r3")]).select(
        "report_id", "serving_cell_id", "neighbours", F.lit(None).cast("timestamp").alias("ts"),
        F.lit("all").alias("window"), F.lit(0.0).alias("x_m"), F.lit(0.0).alias("y_m"))
    plain = parsed.withColumn("neighbours", F.transform("neighbours", lambda e: F.struct(
        e["rank"].alias("rank"), e["cell_id"].alias("cell_id"), e["rsrp_raw"].alias("rsrp_raw"))))

    def codes(df):
        out = tf.explode_neighbours(df, rules=tf.Rules()).toPandas()
        return {(r.report_id, r.rank): list(r.reasons) for r in out.itertuples()}

    got = codes(parsed)
    assert got == codes(plain)
    # hand-worked: a repeats C2 at rank 3; b's absent first pair is dropped, its rank 3 has no
    # cell; c repeats C3 at rank 3 across an absent pair
    assert got == {("a", 1): [], ("a", 2): [], ("a", 3): ["duplicate"], ("b", 2): [], ("b", 3): ["missing_value"],
                   ("c", 1): [], ("c", 3): ["duplicate"]}


def test_typed_parquet_numbers_stay_numbers_and_rejects_keep_their_text(spark, tmp_path):
    # read_raw keeps a typed source's doubles and integers (no text round trip); NaN is a missing
    # marker as its text was; a rejected report's raw_row is rebuilt after the shuffle from the
    # carried columns and reads as the text the old all-string reader gave.
    import json

    import pandas as pd

    from cellsynth.config import SourceConfig, WindowConfig
    from cellsynth.ingest.sources import ResolvedSource, column_mapping, read_raw

    pd.DataFrame({
        "report_id": ["a", "b", "c"], "ue_id": [7, 8, 9], "timestamp": ["2026-01-05T08:00:00Z"] * 3,
        "latitude": [44.495, float("nan"), 44.495], "longitude": [11.342, 11.342, float("inf")],
        "serving_cell_id": ["C1", "C1", "C1"], "serving_rsrp_dbm": [-30.0, -80.0, -80.5],
        "serving_rsrq_db": [-10.0, -10.0, -10.0], "neighbour_1_cell_id": ["C2", None, "C2"],
        "neighbour_1_rsrp_dbm": [-90.25, None, -91.0], "extra": [1.5, 2.5, 3.5],
    }).to_parquet(tmp_path / "mdt.parquet")
    src = ResolvedSource("mdt", (str(tmp_path / "mdt.parquet"),), SourceConfig(format="parquet"))
    raw = read_raw(spark, src)
    types = dict(raw.dtypes)
    assert types["latitude"] == "double" and types["ue_id"] == "bigint" and types["report_id"] == "string"
    got = raw.select("latitude", "longitude").toPandas()
    assert got["latitude"].isna().tolist() == [False, True, False]  # NaN: missing, as "NaN" text was
    assert got["longitude"].tolist()[2] == float("inf")  # not a marker: a bad number later
    mapping, pairs = column_mapping(src, [c for c in raw.columns if not c.startswith("__")])
    parsed = tf.parse_mdt(raw, mapping, pairs)
    frame = LocalFrame(44.495, 11.342)
    out = tf.validate_mdt(parsed, frame=frame, windows=WindowConfig(), rules=tf.Rules(area=BOX)).toPandas().set_index("report_id")
    assert list(out.loc["a", "reasons"]) == ["rsrp_out_of_range"]
    assert list(out.loc["b", "reasons"]) == ["missing_position"]
    assert list(out.loc["c", "reasons"]) == ["bad_number"]
    assert json.loads(out.loc["a", "raw_row"]) == {
        "report_id": "a", "ue_id": "7", "timestamp": "2026-01-05T08:00:00Z", "latitude": "44.495",
        "longitude": "11.342", "serving_cell_id": "C1", "serving_rsrp_dbm": "-30.0", "serving_rsrq_db": "-10.0",
        "neighbour_1_cell_id": "C2", "neighbour_1_rsrp_dbm": "-90.25", "extra": "1.5"}
    assert list(json.loads(out.loc["a", "raw_row"])) == list(pd.read_parquet(tmp_path / "mdt.parquet").columns)
    assert json.loads(out.loc["b", "raw_row"])["latitude"] is None
    assert json.loads(out.loc["b", "raw_row"])["neighbour_1_cell_id"] is None
    assert json.loads(out.loc["c", "raw_row"])["longitude"] == "Infinity"


def test_chebyshev_to_power_keeps_trailing_zero_coefficients():
    # numpy trims them; a BLAS kernel that fits an exact zero made the projection fit crash
    import numpy as np

    from cellsynth.ingest.transforms import _cheb2poly_full

    got = _cheb2poly_full(np.array([1.0, 2.0, 0.5, 0.0, 0.0]))
    np.testing.assert_allclose(got, [0.5, 2.0, 1.0, 0.0, 0.0])  # T2 = 2u^2 - 1


def test_shard_col_matches_the_python_bucket_for_any_utf8_id(spark):
    from cellsynth.schemas import cell_shard_of

    ids = ["C1", "S00005_2", "Zelle_ä1", "小区-7", "cell 🙂", ""]
    df = spark.createDataFrame([(i,) for i in ids], "cell_id string")
    for n in (1, 8, 13):
        got = [r["s"] for r in df.select(tf.shard_col(F.col("cell_id"), n).alias("s")).collect()]
        assert got == [cell_shard_of(i, n) for i in ids]


def test_projected_positions_unproject_and_bad_ones_are_rejected(spark):
    # sources.<kind>.crs with easting/northing (an Irish Transverse Mercator export): the rows land at the WGS84
    # position pyproj gives, text that is no number is bad_number, an absent coordinate missing_position, and a
    # coordinate outside the projection's domain is outside_area (as a latitude beyond 90 is); a missing easting was also
    # tagged bad_number (the unprojected latitude was null while the northing was not)
    from pyproj import Transformer

    raw = spark.createDataFrame(
        [("c1", "565468.552", "571464.852"), ("c2", "abc", "571464.852"), ("c3", None, "571464.852"),
         ("c4", "1e30", "571464.852")], "id string, e string, n string")
    out = tf.clean_cells(raw, {"cell_id": "id", "easting": "e", "northing": "n"}, n_cell_shards=2,
                         crs="EPSG:2157").toPandas().set_index("cell_id")
    lon, lat = Transformer.from_crs("EPSG:2157", "EPSG:4326", always_xy=True).transform(565468.552, 571464.852)
    assert out.loc["c1", "lat"] == pytest.approx(lat, abs=1e-9) and out.loc["c1", "lon"] == pytest.approx(lon, abs=1e-9)
    assert 51.8 < out.loc["c1", "lat"] < 52.0 and -8.6 < out.loc["c1", "lon"] < -8.3  # Cork
    assert list(out.loc["c1", "reasons"]) == []
    assert list(out.loc["c2", "reasons"]) == ["bad_number"]
    assert list(out.loc["c3", "reasons"]) == ["missing_position"]
    assert list(out.loc["c4", "reasons"]) == ["outside_area"]  # pyproj: inf


def test_whole_number_cell_ids_read_as_integers_whatever_their_type(spark):
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from cellsynth.ingest.transforms import id_text

    nums = spark.createDataFrame([(1025.0,), (1025.5,), (None,), (-3.0,)], T.StructType([T.StructField("c", T.DoubleType())]))
    assert [r[0] for r in nums.select(id_text(F.col("c"), T.DoubleType())).collect()] == ["1025", "1025.5", None, "-3"]
    texts = ["1025.0", "1025", "12.00", "S1.0", "310.260.1", "1.5", None]
    df = spark.createDataFrame([(t,) for t in texts], T.StructType([T.StructField("c", T.StringType())]))
    assert [r[0] for r in df.select(id_text(F.col("c"), T.StringType())).collect()] == [
        "1025", "1025", "12", "S1.0", "310.260.1", "1.5", None]


def test_an_hours_load_is_the_mean_of_its_counters(spark):
    # 15-minute counters: the lookup took the lowest of the hour's four loads
    from datetime import datetime, timezone

    from cellsynth.ingest.transforms import load_lookup

    t = [datetime(2026, 1, 5, 8, m, tzinfo=timezone.utc) for m in (0, 15, 30, 45)]
    df = spark.createDataFrame([("A", ts, rho) for ts, rho in zip(t, [0.2, 0.4, 0.6, 0.8], strict=True)],
                               "cell_id string, ts timestamp, load_rho double")
    got = {(r["hour"].hour, round(r["load_rho"], 6)) for r in load_lookup(df, tolerance_h=1).collect()}
    assert got == {(7, 0.5), (8, 0.5), (9, 0.5)}  # its own hour, and the neighbours within the tolerance
