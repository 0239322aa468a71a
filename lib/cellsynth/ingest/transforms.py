"""Ingest transforms: DataFrame -> DataFrame, plain values in, no sessions, paths or tables.

Validation is a column expression per reason; `reasons` is the array of every reason code that
applies, primary first. Clean rows have an empty array; rejected rows keep their raw row as JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cellsynth.config import RowFilter, WindowConfig, utc_instant
from cellsynth.geo import LocalFrame
from cellsynth.ingest._windows_spark import window_col
from cellsynth.ingest.sources import FILE_COLUMN, MALFORMED_COLUMN, META_COLUMNS, REPORT_INDEX, REPORT_PROBLEM_COLUMN, UNITS
from cellsynth.schemas import REJECT_REASONS

LatLonBox = tuple[float, float, float, float]  # lat_min, lat_max, lon_min, lon_max


@dataclass(frozen=True)
class Rules:
    """Plain validation settings the transforms take (from IngestConfig + the cells table)."""

    rsrp_range_dbm: tuple[float, float] = (-140.0, -44.0)
    rsrq_range_db: tuple[float, float] = (-34.0, 2.5)  # (as config.IngestConfig)
    period_start: str | None = None
    period_end: str | None = None
    # Plausible timestamps (the period widens them): nothing in MDT predates LTE; a clock more
    # than a day ahead of the run is wrong. The stage sets the end from the run's own time;
    # None checks no upper bound.
    plausible_start: str = "2000-01-01"
    plausible_end: str | None = None
    area: LatLonBox | None = None
    repair_swapped_latlon: bool = True
    near_duplicate_m: float = 1.0
    near_duplicate_s: float = 1.0
    n_cell_shards: int = 8


# ------------------------------------------------------------------------- column helpers
def reasons_col(*checks: tuple[str, Column]) -> Column:
    """Array of the codes whose condition is true (in the order given; nulls count as false)."""
    for code, _ in checks:
        assert code in REJECT_REASONS, code
    flags = [F.coalesce(cond, F.lit(False)) for _, cond in checks]
    arr = F.array(*[F.when(flag, F.lit(code)) for (code, _), flag in zip(checks, flags)])
    any_bad = flags[0]
    for flag in flags[1:]:
        any_bad = any_bad | flag
    # Clean rows (nearly all) skip building and filtering an array: one boolean test each.
    # array_except(arr, [null]) drops the nulls and repeats in order. Not array_compact: in Spark 4
    # that is filter(x -> x is not null), a lambda, and one lambda anywhere in an operator's
    # expressions takes the whole operator out of whole-stage code generation (the filter of
    # clean measurement rows, the validated reports' projection).
    return F.when(any_bad, F.array_except(arr, F.array(F.lit(None).cast("string")))).otherwise(
        F.array().cast("array<string>"))


def text_id(*parts: Column) -> Column:
    """A 24-hex-digit id hashing texts (joined by a separator no field holds): the same on every rerun."""
    return F.substring(F.sha2(F.concat_ws("\u241f", *parts), 256), 1, 24)


def malformed_col(df: DataFrame) -> Column:
    """True for a CSV line whose field count differs from the header (see sources.read_raw)."""
    return F.col(MALFORMED_COLUMN).isNotNull() if MALFORMED_COLUMN in df.columns else F.lit(False)


def with_malformed(reasons: Column, malformed: Column) -> Column:
    """`malformed_row` alone for a malformed line: its fields are misaligned, other checks are noise."""
    return F.when(malformed, F.array(F.lit("malformed_row"))).otherwise(reasons)


def excluded_col(raw: DataFrame, filters: Sequence[RowFilter]) -> Column:
    """True for a row some filter of `sources.<kind>.filters` does not keep (see `RowFilter`)."""
    keep = F.lit(True)
    for f in filters:
        col = F.col(f"`{f.column}`")
        if f.in_ is not None:
            keep = keep & F.coalesce(col.cast("string").isin(list(f.in_)), F.lit(False))
        if f.not_in is not None:
            keep = keep & F.coalesce(~col.cast("string").isin(list(f.not_in)), F.lit(True))
        if f.min is not None or f.max is not None:
            num = col.cast("double") if isinstance(raw.schema[f.column].dataType, T.NumericType) else parse_number(col)
            ok = num.isNotNull() & ~F.isnan(num)
            if f.min is not None:
                ok = ok & (num >= F.lit(f.min))
            if f.max is not None:
                ok = ok & (num <= F.lit(f.max))
            keep = keep & F.coalesce(ok, F.lit(False))
    return ~keep


def with_excluded(reasons: Column, excluded: Column) -> Column:
    """`excluded_by_filter` alone for a row the source's filters drop: out of scope, its other checks are noise."""
    return F.when(excluded, F.array(F.lit("excluded_by_filter"))).otherwise(reasons)


def reason_text_col(reasons: Column) -> Column:
    mapping = F.create_map(*[F.lit(x) for kv in REJECT_REASONS.items() for x in kv])
    return F.array_join(F.transform(reasons, lambda r: mapping[r]), "; ")


def parse_number(raw: Column, scale: float = 1.0) -> Column:
    val = raw.try_cast("double")
    # NaN/inf strings parse as doubles; they are not usable numbers.
    val = F.when(F.isnan(val) | (F.abs(val) == float("inf")), F.lit(None)).otherwise(val)
    return val * F.lit(scale) if scale != 1.0 else val


MAX_PCI = 1007  # NR physical cell ids are 0..1007 (LTE's 0..503 lie inside)


def parse_index(raw: Column, hi: int | None = None) -> Column:
    """A whole number >= 0 (and <= `hi`) as a long: a PCI or an EARFCN ("7" or "7.0"); null otherwise."""
    val = parse_number(raw)
    ok = (val == F.floor(val)) & (val >= 0) & ((val <= hi) if hi is not None else F.lit(True))
    return F.when(ok, val.cast("long"))


# ISO 8601 text whose time of day ends in a zone designator: "Z" or an offset (+08:00, +0800, +08); a date
# alone ("2026-01-05") has none
ISO_ZONE_SUFFIX = r"[Tt ]\d{2}(:?\d{2}){0,2}([.,]\d+)?\s*(Z|z|[+-]\d{2}(:?\d{2})?)$"


def parse_timestamp(raw: Column, fmt: str, tz: str) -> Column:
    """UTC timestamp from ISO text, epoch seconds/milliseconds or a Spark datetime pattern."""
    if fmt == "iso":
        ts = raw.try_cast("timestamp")
    elif fmt in ("epoch_s", "epoch_ms"):
        num = raw.try_cast("double")
        secs = num if fmt == "epoch_s" else num / 1000.0
        ts = F.when(F.abs(secs) < 1e11, F.timestamp_micros((secs * 1e6).cast("long")))
    else:
        ts = F.try_to_timestamp(raw, F.lit(fmt))
    if tz.upper() != "UTC" and fmt not in ("epoch_s", "epoch_ms"):
        # The session is UTC: a zone-less wall-clock time read in `tz` is shifted to UTC. ISO text that
        # names its own offset ("Z", "+08:00") is an instant already (shifting it moved it by the offset).
        shifted = F.to_utc_timestamp(ts, tz)
        if fmt == "iso":
            ts = F.when(F.trim(raw).rlike(ISO_ZONE_SUFFIX), ts).otherwise(shifted)
        elif not pattern_has_zone(fmt):  # a pattern with a zone field ("XXX", "Z", "VV") reads instants too
            ts = shifted
    return ts


def pattern_has_zone(fmt: str) -> bool:
    """Whether a Spark datetime pattern parses a zone or offset (letters V z O X x Z outside quotes)."""
    return bool(re.search(r"[VzOXxZ]", re.sub(r"'[^']*'", "", fmt)))


def shard_col(cell_id: Column, n_shards: int) -> Column:
    """Same bucket as `cellsynth.schemas.cell_shard_of` (crc32 of the UTF-8 id, modulo n).

    Spark strings are UTF-8 inside: a cast to binary hands crc32 those bytes as they are.
    (`encode(id, 'UTF-8')` decoded every id into a Java String and encoded it back, per row:
    at 1M reports the measurements write took 11.2 executor CPU-s with the cast against 13.0,
    the reports write 3.5 against 4.3; bench/ingest.py profile runs, session 10.)
    """
    return F.pmod(F.crc32(cell_id.cast("binary")), F.lit(n_shards)).cast("int")


def raw_json(df: DataFrame, columns: Sequence[str]) -> Column:
    """A rejected row's raw values as JSON keyed by the source's column names (nulls kept)."""
    return F.to_json(raw_struct(columns, text=True, named=True), {"ignoreNullFields": "false"})


def raw_struct(columns: Sequence[str], *, text: bool = False, named: bool = False) -> Column:
    """The raw values as one struct (`text`: as text, the form rejects keep). Unnamed, a cast field is
    called col1, col2, ...: the form parse_mdt hashes into report ids (kept, so ids stay stable)."""
    cols = [(c, F.col(f"`{c}`")) for c in columns if c not in META_COLUMNS]
    vals = [(v.cast("string") if text else v) for _, v in cols]
    return F.struct(*[v.alias(c) for (c, _), v in zip(cols, vals)] if named else vals)


def rejected_json(reasons: Column, raw: Column) -> Column:
    """raw_row for rejected rows (JSON with nulls kept), null for clean ones."""
    return F.when(F.size(reasons) > 0, F.to_json(raw, {"ignoreNullFields": "false"}))


def parse_measure(raw: Column, canon: str, unit: str | None) -> Column:
    """RSRP / RSRQ in dBm / dB: a number as written, or a 3GPP report index (REPORT_INDEX) as its bin's centre."""
    index = REPORT_INDEX.get(canon, {}).get((unit or "").lower())
    if index is None:
        return parse_number(raw)
    base, step, k_max = index
    k = parse_index(raw, k_max)
    # the open end bins at their finite edge (see REPORT_INDEX)
    k = F.when(k == 0, F.lit(0.5)).when(k == k_max, F.lit(k_max - 0.5)).otherwise(k)
    return F.lit(base) + F.lit(step) * k


def _unit(units: dict[str, str], canon: str) -> float:
    unit = units.get(canon)
    return UNITS[canon][unit.lower()] if unit else 1.0


def _raw(df: DataFrame, mapping: dict[str, str], canon: str) -> Column:
    """A mapped raw column as read (text, or a typed source's number); null when unmapped."""
    raw = mapping.get(canon)
    if raw is None:
        return F.lit(None).cast("string")
    return F.col(f"`{raw}`")


def _text(df: DataFrame, mapping: dict[str, str], canon: str) -> Column:
    """A mapped raw column as text (ids and timestamps are text whatever the source's type)."""
    return _raw(df, mapping, canon).cast("string")


def id_text(col: Column, dtype: T.DataType | None = None) -> Column:
    """A cell id as text, a whole number written as one: 1025.0 and "1025.0" are "1025".

    pandas writes an integer id column that has a missing value as floats (1025.0 in Parquet and
    CSV alike) while the cells table says 1025: read as written, no id of one table matched the
    other. Every cell-id column goes through this, so both sides of a join agree."""
    if isinstance(dtype, (T.DoubleType, T.FloatType)):
        whole = (col == F.floor(col)) & (F.abs(col) < F.lit(2.0 ** 53))
        return F.when(whole, col.cast("long").cast("string")).otherwise(col.cast("string"))
    text = col.cast("string")
    return F.when(text.contains("."), F.regexp_replace(text, r"^(-?[0-9]+)\.0+$", "$1")).otherwise(text)


def _cell_id(df: DataFrame, mapping: dict[str, str], canon: str) -> Column:
    raw = mapping.get(canon)
    if raw is None or raw not in df.columns:
        return _text(df, mapping, canon)
    return id_text(F.col(f"`{raw}`"), df.schema[raw].dataType)


def timestamp_bounds(rules: Rules) -> tuple[datetime, datetime | None, datetime | None, datetime | None]:
    """(plausible start, plausible end, period start, period end) as UTC datetimes (None: open).

    A configured period that reaches beyond the plausible bounds widens them (historic data).
    """
    start, end = utc_instant("period_start", rules.period_start), utc_instant("period_end", rules.period_end)
    lo = utc_instant("plausible_start", rules.plausible_start)
    hi = utc_instant("plausible_end", rules.plausible_end)
    lo = min(lo, start) if start is not None else lo
    hi = max(hi, end) if hi is not None and end is not None else hi
    return lo, hi, start, end


def _instant(t: datetime) -> Column:
    # Microseconds since the epoch: the same instant whatever the session time zone.
    return F.timestamp_micros(F.lit((t - _EPOCH) // timedelta(microseconds=1)))


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def timestamp_checks(ts: Column, rules: Rules) -> tuple[Column, Column]:
    """(implausible, out of period) conditions for a parsed timestamp (null ts: neither)."""
    lo, hi, start, end = timestamp_bounds(rules)
    implausible = ts < _instant(lo)
    if hi is not None:
        implausible = implausible | (ts > _instant(hi))
    outside = F.lit(False)
    if start is not None:
        outside = outside | (ts < _instant(start))
    if end is not None:
        outside = outside | (ts >= _instant(end))
    return implausible, ~implausible & outside


def _inside(lat: Column, lon: Column, box: LatLonBox | None) -> Column:
    if box is None:
        return (F.abs(lat) <= 90) & (F.abs(lon) <= 180)
    return lat.between(box[0], box[1]) & lon.between(box[2], box[3])


def area_box_latlon(frame: LocalFrame, bbox_m: tuple[float, float, float, float]) -> LatLonBox:
    """Lat/lon box that holds a local-frame box (x_min, y_min, x_max, y_max), from 16 edge points."""
    import numpy as np

    x0, y0, x1, y1 = bbox_m
    t = np.linspace(0.0, 1.0, 5)
    xs = np.concatenate([x0 + (x1 - x0) * t, x0 + (x1 - x0) * t, np.full(5, x0), np.full(5, x1)])
    ys = np.concatenate([np.full(5, y0), np.full(5, y1), y0 + (y1 - y0) * t, y0 + (y1 - y0) * t])
    lat, lon = frame.to_latlon(xs, ys)
    return float(lat.min()), float(lat.max()), float(lon.min()), float(lon.max())


# ------------------------------------------------------------------------- projection
_XY = T.StructType([T.StructField("x_m", T.DoubleType()), T.StructField("y_m", T.DoubleType())])


PROJECTION_TOL_M = 1e-7  # largest error the built-in polynomial may have against pyproj


def _cheb2poly_full(c):
    """Chebyshev -> power coefficients, same length: numpy's cheb2poly trims trailing zeros, and
    another BLAS kernel can make a fitted coefficient exactly zero (seen with OPENBLAS_CORETYPE=Haswell)."""
    import numpy as np
    from numpy.polynomial import chebyshev as cheb

    p = cheb.cheb2poly(c)
    return np.pad(p, (0, len(c) - len(p)))


def fit_projection(frame: LocalFrame, box: LatLonBox, *, tol_m: float = PROJECTION_TOL_M):
    """Power-series coefficients of the frame's projection over a lat/lon box, or None.

    The azimuthal-equidistant map is smooth: a tensor Chebyshev fit of degree 4-10 in the box's
    scaled (lat, lon) reproduces pyproj to nanometres over a few degrees. The fit is checked on
    random points and corners against pyproj; None when no degree meets `tol_m` (then the
    caller keeps the pyproj UDF).

    Returns:
        (centre_lat, half_lat, centre_lon, half_lon, coef_x, coef_y) with coef[i, j] the
        coefficient of u**i * v**j, u and v the box-scaled lat and lon in [-1, 1]; or None.
    """
    import numpy as np
    from numpy.polynomial import chebyshev as cheb

    lat_lo, lat_hi, lon_lo, lon_hi = box
    c_lat, h_lat = (lat_lo + lat_hi) / 2, max((lat_hi - lat_lo) / 2, 1e-6)
    c_lon, h_lon = (lon_lo + lon_hi) / 2, max((lon_hi - lon_lo) / 2, 1e-6)
    rng = np.random.default_rng(0)
    u_chk = np.concatenate([rng.uniform(-1, 1, 4096), [-1, -1, 1, 1]])
    v_chk = np.concatenate([rng.uniform(-1, 1, 4096), [-1, 1, -1, 1]])
    x_chk, y_chk = frame.to_xy(c_lat + u_chk * h_lat, c_lon + v_chk * h_lon)
    for deg in (4, 6, 8, 10):
        n = deg + 4
        nodes = np.cos(np.pi * (np.arange(n) + 0.5) / n)
        u, v = (a.ravel() for a in np.meshgrid(nodes, nodes, indexing="ij"))
        x, y = frame.to_xy(c_lat + u * h_lat, c_lon + v * h_lon)
        vander = cheb.chebvander2d(u, v, [deg, deg])
        coefs = []
        for target, check in ((x, x_chk), (y, y_chk)):
            c = np.linalg.lstsq(vander, target, rcond=None)[0].reshape(deg + 1, deg + 1)
            # Chebyshev -> power basis along both axes (well conditioned on [-1, 1] at these degrees)
            power = np.array([_cheb2poly_full(row) for row in c])
            power = np.array([_cheb2poly_full(col) for col in power.T]).T
            coefs.append(power)
        err = max(np.abs(np.polynomial.polynomial.polyval2d(u_chk, v_chk, cf) - chk).max()
                  for cf, chk in zip(coefs, (x_chk, y_chk)))
        if np.isfinite(err) and err <= tol_m:
            return c_lat, h_lat, c_lon, h_lon, coefs[0], coefs[1]
    return None


def _poly_col(u: Column, v: Column, coef) -> Column:
    """sum_ij coef[i, j] u^i v^j by nested Horner (built-in arithmetic, no Python worker)."""
    out = None
    for i in range(coef.shape[0] - 1, -1, -1):
        inner = None
        for j in range(coef.shape[1] - 1, -1, -1):
            inner = F.lit(float(coef[i, j])) if inner is None else inner * v + F.lit(float(coef[i, j]))
        out = inner if out is None else out * u + inner
    return out


def pad_box(box: LatLonBox, fraction: float = 0.01) -> LatLonBox:
    d_lat, d_lon = (box[1] - box[0]) * fraction + 1e-4, (box[3] - box[2]) * fraction + 1e-4
    return box[0] - d_lat, box[1] + d_lat, box[2] - d_lon, box[3] + d_lon


def project_col(lat: Column, lon: Column, frame: LocalFrame, box: LatLonBox | None = None) -> Column:
    """struct(x_m, y_m) in the local frame.

    With a lat/lon `box`, a built-in polynomial expression checked against pyproj to
    `PROJECTION_TOL_M` (points outside the box get null: callers pass a box that holds every
    row they keep); without one, or when no fit is good enough, pyproj in a pandas UDF.
    """
    fit = fit_projection(frame, box) if box is not None else None
    if fit is not None:
        c_lat, h_lat, c_lon, h_lon, coef_x, coef_y = fit
        u = (lat - F.lit(c_lat)) / F.lit(h_lat)
        v = (lon - F.lit(c_lon)) / F.lit(h_lon)
        inside = (F.abs(u) <= 1.0) & (F.abs(v) <= 1.0)
        return F.struct(F.when(inside, _poly_col(u, v, coef_x)).alias("x_m"),
                        F.when(inside, _poly_col(u, v, coef_y)).alias("y_m"))
    lat0, lon0 = frame.lat0, frame.lon0

    @F.pandas_udf(_XY)
    def _project(lat_s: pd.Series, lon_s: pd.Series) -> pd.DataFrame:
        x_m, y_m = LocalFrame(lat0, lon0).to_xy(lat_s.to_numpy(dtype=float, na_value=float("nan")),
                                                 lon_s.to_numpy(dtype=float, na_value=float("nan")))
        return pd.DataFrame({"x_m": x_m, "y_m": y_m})

    return _project(lat, lon)


_LL = T.StructType([T.StructField("lat", T.DoubleType()), T.StructField("lon", T.DoubleType())])


def unproject_col(easting: Column, northing: Column, crs: str) -> Column:
    """struct(lat, lon) from a projected CRS (e.g. "EPSG:32629")."""

    @F.pandas_udf(_LL)
    def _unproject(e: pd.Series, n: pd.Series) -> pd.DataFrame:
        from pyproj import Transformer

        tr = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        lon, lat = tr.transform(e.to_numpy(dtype=float, na_value=float("nan")), n.to_numpy(dtype=float, na_value=float("nan")))
        return pd.DataFrame({"lat": lat, "lon": lon})

    return _unproject(easting, northing)


def _latlon(df: DataFrame, mapping: dict[str, str], crs: str | None) -> tuple[DataFrame, Column, Column, Column]:
    """Adds _lat/_lon (parsed, WGS84) and returns them with a 'bad number' condition."""
    if crs is None:
        lat_raw, lon_raw = _raw(df, mapping, "latitude"), _raw(df, mapping, "longitude")
        df = df.withColumn("_lat", parse_number(lat_raw)).withColumn("_lon", parse_number(lon_raw))
        bad = (lat_raw.isNotNull() & F.col("_lat").isNull()) | (lon_raw.isNotNull() & F.col("_lon").isNull())
    else:
        lat_raw, lon_raw = _raw(df, mapping, "northing"), _raw(df, mapping, "easting")
        north, east = parse_number(lat_raw), parse_number(lon_raw)
        df = df.withColumn("_ll", unproject_col(east, north, crs))
        df = df.withColumn("_lat", F.col("_ll.lat")).withColumn("_lon", F.col("_ll.lon")).drop("_ll")
        # judged on the coordinates as given: one missing makes both unprojected values null, which is a
        # missing position, not a bad number in the other (outside the projection's domain: inf, outside_area)
        bad = (lat_raw.isNotNull() & north.isNull()) | (lon_raw.isNotNull() & east.isNull())
    missing = lat_raw.isNull() | lon_raw.isNull()
    return df, bad, missing, lat_raw


# ------------------------------------------------------------------------------ cells
def clean_cells(
    raw: DataFrame, mapping: dict[str, str], *, n_cell_shards: int, units: dict[str, str] | None = None,
    crs: str | None = None, filters: Sequence[RowFilter] = (),
) -> DataFrame:
    """Typed cells with `reasons` (and `raw_row` where rejected). Positions stay lat/lon here."""
    units = units or {}
    raw_cols = [c for c in raw.columns]
    df = raw.withColumn("raw_row", F.coalesce(F.col(MALFORMED_COLUMN), raw_json(raw, raw_cols))
                        if MALFORMED_COLUMN in raw.columns else raw_json(raw, raw_cols))
    df = df.withColumn("_excluded", excluded_col(raw, filters))
    malformed = malformed_col(raw)
    df, bad_pos, missing_pos, _ = _latlon(df, mapping, crs)
    nums = {c: parse_number(_raw(df, mapping, c), _unit(units, c)) for c in ("azimuth_deg", "height_m", "tx_power_dbm", "freq_mhz")}
    # PCI and carrier: read only to resolve neighbours named by PCI (the stage drops them before writing)
    nums.update({"pci": parse_index(_raw(df, mapping, "pci"), MAX_PCI), "earfcn": parse_index(_raw(df, mapping, "earfcn"))})
    bad_num = F.lit(False)
    for c, val in nums.items():
        bad_num = bad_num | (_raw(df, mapping, c).isNotNull() & val.isNull())
    cell_raw = _cell_id(df, mapping, "cell_id")
    df = df.select(
        cell_raw.alias("cell_id"), _text(df, mapping, "site_id").alias("site_id"),
        F.col("_lat").alias("lat"), F.col("_lon").alias("lon"), *[v.alias(k) for k, v in nums.items()],
        shard_col(cell_raw, n_cell_shards).alias("cell_shard"), "raw_row",
        bad_pos.alias("_bad_pos"), missing_pos.alias("_missing_pos"), bad_num.alias("_bad_num"),
        malformed.alias("_malformed"), "_excluded",
    )
    # an excluded row is no earlier twin of a kept one
    order = Window.partitionBy("cell_id", "_excluded").orderBy(F.col("raw_row"))
    df = df.withColumn("_rn", F.when(F.col("cell_id").isNotNull(), F.row_number().over(order)))
    reasons = reasons_col(
        ("missing_value", F.col("cell_id").isNull()),
        ("bad_number", F.col("_bad_num") | F.col("_bad_pos")),
        ("missing_position", F.col("_missing_pos")),
        ("outside_area", ~_inside(F.col("lat"), F.col("lon"), None)),
        ("duplicate_cell", F.col("_rn") > 1),
    )
    return df.withColumn("reasons", with_malformed(with_excluded(reasons, F.col("_excluded")), F.col("_malformed"))).drop(
        "_bad_pos", "_missing_pos", "_bad_num", "_rn", "_malformed", "_excluded")


# ---------------------------------------------------------------------------- traffic
def clean_traffic(
    raw: DataFrame, mapping: dict[str, str], *, windows: WindowConfig, rules: Rules,
    timestamp_format: str = "iso", timezone: str = "UTC", units: dict[str, str] | None = None,
    known_cells: DataFrame | None = None, seen_keys: DataFrame | None = None, filters: Sequence[RowFilter] = (),
) -> DataFrame:
    """Typed hourly counters with `reasons`: window, cell_shard, load_rho = prb_util_pct / 100.

    `seen_keys` (cell_id, ts) of counters an earlier run already ingested: repeats are duplicates.
    """
    units = units or {}
    df = raw.withColumn("raw_row", F.coalesce(F.col(MALFORMED_COLUMN), raw_json(raw, raw.columns))
                        if MALFORMED_COLUMN in raw.columns else raw_json(raw, raw.columns))
    df = df.withColumn("_excluded", excluded_col(raw, filters))
    malformed = malformed_col(raw)
    ts_raw, cell_raw = _text(df, mapping, "timestamp"), _cell_id(df, mapping, "cell_id")
    vol_raw, prb_raw = _raw(df, mapping, "traffic_mb"), _raw(df, mapping, "prb_util_pct")
    df = df.select(
        cell_raw.alias("cell_id"), ts_raw.alias("_ts_raw"),
        parse_timestamp(ts_raw, timestamp_format, timezone).alias("ts"),
        parse_number(vol_raw, _unit(units, "traffic_mb")).alias("traffic_mb"), vol_raw.alias("_vol_raw"),
        parse_number(prb_raw, _unit(units, "prb_util_pct")).alias("prb_util_pct"), prb_raw.alias("_prb_raw"),
        "raw_row", malformed.alias("_malformed"), "_excluded",
    )
    df = df.withColumn("load_rho", F.col("prb_util_pct") / 100.0)
    df = df.withColumn("window", window_col(F.col("ts"), windows)).withColumn("cell_shard", shard_col(F.col("cell_id"), rules.n_cell_shards))
    unknown = F.lit(False)
    if known_cells is not None:
        df = df.join(F.broadcast(known_cells.select(F.col("cell_id"), F.lit(True).alias("_known"))), "cell_id", "left")
        unknown = F.col("cell_id").isNotNull() & F.col("_known").isNull()
    seen = F.lit(False)
    if seen_keys is not None:
        df = df.join(seen_keys.select("cell_id", "ts", F.lit(True).alias("_seen")), ["cell_id", "ts"], "left")
        seen = F.col("_seen")
    order = Window.partitionBy("cell_id", "ts", "_excluded").orderBy("raw_row")
    df = df.withColumn("_rn", F.when(F.col("cell_id").isNotNull() & F.col("ts").isNotNull(), F.row_number().over(order)))
    implausible, outside = timestamp_checks(F.col("ts"), rules)
    reasons = reasons_col(
        ("missing_value", F.col("cell_id").isNull() | F.col("_ts_raw").isNull() | (F.col("_vol_raw").isNull() & F.col("_prb_raw").isNull())),
        ("bad_timestamp", (F.col("_ts_raw").isNotNull() & F.col("ts").isNull()) | implausible),
        ("out_of_period", outside),
        ("bad_number", (F.col("_vol_raw").isNotNull() & F.col("traffic_mb").isNull()) | (F.col("_prb_raw").isNotNull() & F.col("prb_util_pct").isNull())),
        ("load_out_of_range", ~F.col("load_rho").between(0.0, 1.0) | (F.col("traffic_mb") < 0)),
        ("unknown_cell", unknown),
        ("duplicate", (F.col("_rn") > 1) | seen),
    )
    drop = ["_ts_raw", "_vol_raw", "_prb_raw", "_rn", "_malformed", "_excluded", *(["_known"] if known_cells is not None else []),
            *(["_seen"] if seen_keys is not None else [])]
    return df.withColumn("reasons", with_malformed(with_excluded(reasons, F.col("_excluded")), F.col("_malformed"))).drop(*drop)


def load_lookup(clean_traffic_df: DataFrame, *, tolerance_h: int) -> DataFrame:
    """(cell_id, hour, load_rho): each hour's own load, else the nearest within the tolerance.

    Each counter is spread to the hours within the tolerance and the nearest wins (ties: the
    earlier counter), so the report join stays one equi-join.
    """
    # An hour's load is the mean of its counters (4 for 15-minute PM periods; before, the lowest won).
    t = clean_traffic_df.where(F.col("load_rho").isNotNull()).groupBy(
        "cell_id", F.date_trunc("hour", "ts").alias("_hour")).agg(F.avg("load_rho").alias("load_rho"))
    offsets = F.explode(F.sequence(F.lit(-tolerance_h), F.lit(tolerance_h)))
    t = t.select("cell_id", "_hour", "load_rho", offsets.alias("_off"))
    t = t.select(
        "cell_id", (F.col("_hour") + F.make_dt_interval(hours=F.col("_off"))).alias("hour"),
        F.struct(F.abs("_off").alias("d"), (-F.col("_off")).alias("o"), F.col("load_rho").alias("v")).alias("_k"),
    )
    return t.groupBy("cell_id", "hour").agg(F.min("_k").alias("_k")).select("cell_id", "hour", F.col("_k.v").alias("load_rho"))


# -------------------------------------------------------------------------------- mdt
def parse_mdt(
    raw: DataFrame, mapping: dict[str, str], neighbour_pairs: Sequence[tuple[str, str]], *,
    timestamp_format: str = "iso", timezone: str = "UTC", crs: str | None = None, filters: Sequence[RowFilter] = (),
    earfcn_cols: Sequence[str] = (), units: dict[str, str] | None = None, serving_by_pci: bool = False,
) -> DataFrame:
    """Typed reports (raw values kept where validation needs them) + `neighbours` array; with
    `filters`, an `_excluded` flag (validate_mdt rejects those rows and dedups the others apart).
    `earfcn_cols` (one per neighbour pair, or none): each entry also carries its carrier's text
    (`earfcn_raw`), for neighbours named by PCI. `serving_by_pci`: the serving cell column holds a PCI
    (validate_mdt resolves it); its text is also kept as `_serving_raw`, the raw row's source, with the
    serving carrier's text as `_serving_earfcn_raw`.

    The raw row itself is not a column: every raw value is carried once, either in the columns
    validation keeps anyway (ids, timestamp text, RSRP/RSRQ as read, the neighbour list) or in
    `_rest` (the others: position, unmapped columns). `raw_row_col` rebuilds the row from them,
    for rejected rows only, after the shuffles. The layout rides in `_rest`'s metadata.
    """
    raw_cols = [c for c in raw.columns if c not in META_COLUMNS]
    df, bad_pos, missing_pos, _ = _latlon(raw, mapping, crs)
    if "report_id" in mapping:
        rid = _text(df, mapping, "report_id")
    else:  # no id in the source: a content hash (with the file name) is stable across reruns
        content = F.to_json(raw_struct(raw_cols, text=True), {"ignoreNullFields": "false"})
        rid = text_id(F.col(FILE_COLUMN), content)
    ts_raw = _text(df, mapping, "timestamp")
    rsrp_raw, rsrq_raw = _raw(df, mapping, "rsrp_dbm"), _raw(df, mapping, "rsrq_db")
    # Built from plain column expressions (Spark compiles them; lambdas in higher-order functions
    # are interpreted row by row): `dup` = an earlier pair of the list names the same cell, and
    # absent pairs (no cell, no RSRP) are left out of the list.
    # Each neighbour id normalised once, in its own column: the duplicate flags below compare every pair,
    # and the expression inlined into each comparison was evaluated some 20 times a report.
    nb_ids = [f"_nb_id{k}" for k in range(len(neighbour_pairs))]
    df = df.select("*", *[id_text(F.col(f"`{c}`"), raw.schema[c].dataType).alias(n)
                          for (c, _), n in zip(neighbour_pairs, nb_ids, strict=True)])
    cells = [F.col(n) for n in nb_ids]
    # One element type for the list: doubles stay doubles, anything else is text.
    all_double = all(isinstance(raw.schema[r].dataType, T.DoubleType) for _, r in neighbour_pairs)
    rsrps = [F.col(f"`{r}`") if all_double else F.col(f"`{r}`").cast("string") for _, r in neighbour_pairs]
    earfcns = [F.col(f"`{c}`").cast("string") for c in earfcn_cols]
    entry_type = T.StructType([
        T.StructField("rank", T.IntegerType(), False), T.StructField("cell_id", T.StringType()),
        T.StructField("rsrp_raw", T.DoubleType() if all_double else T.StringType()),
        T.StructField("dup", T.BooleanType(), False),
        *([T.StructField("earfcn_raw", T.StringType())] if earfcns else [])])
    none = F.array().cast(T.ArrayType(entry_type, containsNull=False))
    entries = []
    for k in range(len(neighbour_pairs)):
        dup = F.lit(False)
        for earlier in cells[:k]:
            dup = dup | F.coalesce(earlier == cells[k], F.lit(False))
        present = cells[k].isNotNull() | rsrps[k].isNotNull()
        extra = []
        if earfcns:  # (a PCI list's duplicates are decided after resolution: see explode_neighbours)
            extra = [earfcns[k].alias("earfcn_raw")]
            present = present | earfcns[k].isNotNull()
        entry = F.struct(F.lit(k + 1).alias("rank"), cells[k].alias("cell_id"), rsrps[k].alias("rsrp_raw"),
                         dup.alias("dup"), *extra)
        entries.append(F.when(present, F.array(entry)).otherwise(none))
    # Absent pairs (no cell, no RSRP) add an empty array, present ones a one-entry array, and
    # flatten joins them in rank order. Not array_compact: in Spark 4 that is a lambda (see
    # reasons_col), evaluated per report, which kept the parse projection out of whole-stage code
    # generation. Not array_except(list, [null]) either: on structs with a double field the
    # optimizer normalises NaN and -0.0 in both lists, which would change raw values (and adds
    # a lambda of its own).
    nb = F.flatten(F.array(*entries)) if neighbour_pairs else F.array().cast(
        "array<struct<rank:int,cell_id:string,rsrp_raw:string,dup:boolean>>")
    # Where each raw column's value travels (see raw_row_col).
    carried = {}
    serving_carried = (("serving_cell_id", "_serving_raw"), ("serving_earfcn", "_serving_earfcn_raw")) if serving_by_pci \
        else (("serving_cell_id", "serving_cell_id"),)
    for canon, col in (("report_id", "report_id"), ("ue_id", "ue_id"), ("timestamp", "_ts_raw"),
                       *serving_carried, ("rsrp_dbm", "_rsrp_raw"), ("rsrq_db", "_rsrq_raw")):
        if mapping.get(canon) in raw_cols and mapping[canon] not in carried:
            carried[mapping[canon]] = ["col", col]
    for k, (c, r) in enumerate(neighbour_pairs):
        carried.setdefault(c, ["nb", k + 1, "cell_id"])
        carried.setdefault(r, ["nb", k + 1, "rsrp_raw"])
        if earfcn_cols:
            carried.setdefault(earfcn_cols[k], ["nb", k + 1, "earfcn_raw"])
    rest = [c for c in raw_cols if c not in carried]
    layout = [[c, *carried.get(c, ["rest"])] for c in raw_cols]
    rest_col = F.struct(*[F.col(f"`{c}`").alias(f"c{i}") for i, c in enumerate(rest)]) if rest else F.lit(None)
    layout = [[c, "rest", f"c{rest.index(c)}"] if kind[0] == "rest" else [c, *kind] for c, *kind in layout]
    return df.select(
        rid.alias("report_id"), _text(df, mapping, "ue_id").alias("ue_id"),
        ts_raw.alias("_ts_raw"), parse_timestamp(ts_raw, timestamp_format, timezone).alias("ts"),
        F.col("_lat").alias("lat"), F.col("_lon").alias("lon"),
        _cell_id(df, mapping, "serving_cell_id").alias("serving_cell_id"),
        *([_text(df, mapping, "serving_cell_id").alias("_serving_raw"),
           _text(df, mapping, "serving_earfcn").alias("_serving_earfcn_raw")] if serving_by_pci else []),
        rsrp_raw.alias("_rsrp_raw"), parse_measure(rsrp_raw, "rsrp_dbm", (units or {}).get("rsrp_dbm")).alias("rsrp_dbm"),
        rsrq_raw.alias("_rsrq_raw"), parse_measure(rsrq_raw, "rsrq_db", (units or {}).get("rsrq_db")).alias("rsrq_db"),
        nb.alias("neighbours"),
        bad_pos.alias("_bad_pos"), missing_pos.alias("_missing_pos"),
        rest_col.alias("_rest", metadata={"raw_layout": json.dumps(layout)}),
        (F.col(MALFORMED_COLUMN) if MALFORMED_COLUMN in raw.columns else F.lit(None).cast("string")).alias("_line"),
        *([excluded_col(raw, filters).alias("_excluded")] if filters else []),
        *([F.col(REPORT_PROBLEM_COLUMN).alias("_problem")] if REPORT_PROBLEM_COLUMN in raw.columns else []),
    )


def _entry_of_rank(rank: int) -> Column:
    # The list is in rank order with absent pairs dropped, so rank k sits at one of the first k
    # places: plain compiled lookups. (A filter lambda here was interpreted row by row, and Spark's
    # common-subexpression elimination evaluated it for every row, clean ones included: a fifth
    # of the stage's CPU at 1M reports.)
    nbs = F.col("neighbours")
    return F.coalesce(*[F.when(F.get(nbs, i)["rank"] == F.lit(rank), F.get(nbs, i)) for i in range(rank)])


def raw_row_col(df: DataFrame, *, text: bool) -> Column:
    """The raw row rebuilt from the columns parse_mdt keeps (struct in the source's column order;
    `text`: every field as text, the form rejects keep). Cheap per row except the neighbour
    fields (a lookup in the list): call it only where few rows reach it."""
    fields = []
    for name, kind, *arg in json.loads(df.schema["_rest"].metadata["raw_layout"]):
        if kind == "col":
            val = F.col(arg[0])
        elif kind == "nb":
            val = _entry_of_rank(arg[0])[arg[1]]
        else:
            val = F.col("_rest")[arg[0]]
        fields.append((val.cast("string") if text else val).alias(name))
    return F.struct(*fields)


def repair_swapped(df: DataFrame, *, area: LatLonBox | None, allow: bool) -> DataFrame:
    """Flags (`swapped`) positions outside the area whose swap lies inside; swaps them if allowed."""
    lat, lon = F.col("lat"), F.col("lon")
    swapped = lat.isNotNull() & lon.isNotNull() & ~_inside(lat, lon, area) & _inside(lon, lat, area)
    df = df.withColumn("swapped", F.coalesce(swapped, F.lit(False)))
    if allow:
        df = df.select(
            *[c for c in df.columns if c not in ("lat", "lon")],
            F.when(F.col("swapped"), lon).otherwise(lat).alias("lat"),
            F.when(F.col("swapped"), lat).otherwise(lon).alias("lon"),
        )
    return df


MAX_FILTERED_IDS = 100_000  # repeated report ids filtered by value; more: a broadcast semi-join


def validate_mdt(
    parsed: DataFrame, *, frame: LocalFrame, windows: WindowConfig, rules: Rules,
    known_cells: DataFrame | None = None, seen_ids: DataFrame | None = None,
    pci_cells: DataFrame | None = None, pci_max_distance_m: float = 30_000.0, pci_rule: str = "strongest",
) -> DataFrame:
    """Adds x_m, y_m, window, cell_shard, `swapped` and `reasons` (every report kept).

    `seen_ids` (report_id) of reports an earlier run already ingested: repeats are duplicates.
    `pci_cells` (`pci_candidates`): the serving cell column holds PCIs (parse_mdt's `serving_by_pci`),
    resolved to cells as neighbours are (`_resolve_pci`) before anything reads the serving cell.
    """
    df = repair_swapped(parsed, area=rules.area, allow=rules.repair_swapped_latlon)
    # Rows outside the area are rejected and keep no position; a padded box keeps every row the
    # near-duplicate check compares (outside points are then > 1 % of the box away).
    box = pad_box(rules.area) if rules.area is not None else None
    df = df.withColumn("_xy", project_col(F.col("lat"), F.col("lon"), frame, box))
    df = df.withColumn("x_m", F.col("_xy.x_m")).withColumn("y_m", F.col("_xy.y_m")).drop("_xy")
    df = df.withColumn("window", window_col(F.col("ts"), windows))
    by_pci = pci_cells is not None
    if by_pci:
        df = _resolve_pci(df, pci_cells, pci_max_distance_m, pci_rule, id_col="serving_cell_id",
                          earfcn_col="_serving_earfcn_raw", active=F.lit(True), raw_col="_serving_pci",
                          bad_col="_bad_serving", unresolved_col="_unresolved_serving")
    df = df.withColumn("cell_shard", shard_col(F.col("serving_cell_id"), rules.n_cell_shards))
    unknown = F.lit(False)
    if known_cells is not None and not by_pci:  # resolved ids are cells of the table
        df = df.join(
            F.broadcast(known_cells.select(F.col("cell_id").alias("serving_cell_id"), F.lit(True).alias("_known"))),
            "serving_cell_id", "left",
        )
        unknown = F.col("serving_cell_id").isNotNull() & F.col("_known").isNull()
    # Exact duplicates sit next to each other in this order; near-duplicates follow their twin.
    # Sorting by a 64-bit hash of the neighbour list instead of the array itself (struct-by-struct
    # comparisons dominated the sort): equal lists hash equal, so exact twins still sit together;
    # the lag below still compares the arrays themselves. Key and hash are plain columns and both
    # flags come from one select, so Spark plans one Window (one shuffle), not one per flag.
    content = ["ts", "lat", "lon", "serving_cell_id", "rsrp_dbm", "rsrq_db"]
    df = df.withColumn("_ue", F.coalesce(F.col("ue_id"), F.lit(""))).withColumn("_nb_hash", F.xxhash64("neighbours"))
    # A repeated report id keeps its first row in (content, raw) order. Instead of a second shuffle
    # of every wide row by report_id: count ids on the id column alone (Parquet reads just that
    # column), and take the first key of the few repeated ids (broadcast: repeats are rare; a
    # source that is mostly repeats would fall back to Spark's broadcast limit error, not silence).
    id_key = F.struct(*content, raw_row_col(parsed, text=False))
    # Counted on the parsed reports, not on `df`: there the known-cell join (a left outer join
    # Spark cannot drop) would look up every report's serving cell only to be counted away.
    # (A long layout's rows that are rejected for their report's lines, `_problem`, are nobody's first.)
    problems = "_problem" in parsed.columns
    counted = parsed.where(F.col("_problem").isNull()) if problems else parsed
    repeated = (counted.where(F.col("report_id").isNotNull()).groupBy("report_id").count()
                .where(F.col("count") > 1).select("report_id"))
    # The repeated ids come to the driver (few: repeats are rare): none, no join at all; a few,
    # a filter on the id that Spark applies before parsing, so only their rows are parsed again.
    ids = [r["report_id"] for r in repeated.limit(MAX_FILTERED_IDS + 1).collect()]
    if not ids:
        first_key = None
    else:
        rows = (df.where(F.col("report_id").isin(ids)) if len(ids) <= MAX_FILTERED_IDS
                else df.join(F.broadcast(repeated), "report_id", "left_semi"))
        if problems:
            rows = rows.where(F.col("_problem").isNull())
        first_key = rows.groupBy("report_id").agg(F.min(id_key).alias("_first_key"))
    # Rows the source's filters exclude are no earlier twins of kept ones (a kept report right after an
    # excluded one at the same place and second is not its near-duplicate).
    filtered = "_excluded" in parsed.columns
    apart = [*(["_excluded"] if filtered else []), *([F.col("_problem").isNull()] if problems else [])]
    w_ue = Window.partitionBy("_ue", *apart).orderBy(*content, "_nb_hash", "report_id")
    same = F.lit(True)
    for c in [*content, "neighbours"]:
        same = same & F.lag(c).over(w_ue).eqNullSafe(F.col(c))
    dt_s = F.abs(F.col("ts").cast("double") - F.lag("ts").over(w_ue).cast("double"))
    dist_m = F.sqrt((F.col("x_m") - F.lag("x_m").over(w_ue)) ** 2 + (F.col("y_m") - F.lag("y_m").over(w_ue)) ** 2)
    near = F.col("ue_id").isNotNull() & (dt_s <= rules.near_duplicate_s) & (dist_m <= rules.near_duplicate_m)
    df = df.select("*", F.coalesce(same, F.lit(False)).alias("_exact"), F.coalesce(near, F.lit(False)).alias("_near"))
    seen = F.lit(False)
    if seen_ids is not None:
        df = df.join(seen_ids.select("report_id", F.lit(True).alias("_seen")), "report_id", "left")
        seen = F.col("_seen")
    if first_key is not None:
        df = df.join(F.broadcast(first_key), "report_id", "left")
    # Rows equal to the first key are identical twins: `_exact` (same UE, same content) already
    # rejects all but one of them.
    df = df.withColumn("_rn_id", F.lit(None).cast("int") if first_key is None else
                       F.when(F.col("_first_key").isNotNull() & ~id_key.eqNullSafe(F.col("_first_key")), 2))
    rsrp_lo, rsrp_hi = rules.rsrp_range_dbm
    rsrq_lo, rsrq_hi = rules.rsrq_range_db
    implausible, outside = timestamp_checks(F.col("ts"), rules)
    reasons = reasons_col(
        ("missing_value", F.col("report_id").isNull() | F.col("_serving_pci" if by_pci else "serving_cell_id").isNull()
         | F.col("_rsrp_raw").isNull() | F.col("_ts_raw").isNull()),
        ("bad_timestamp", (F.col("_ts_raw").isNotNull() & F.col("ts").isNull()) | implausible),
        ("out_of_period", outside),
        ("bad_number", F.col("_bad_pos") | (F.col("_rsrp_raw").isNotNull() & F.col("rsrp_dbm").isNull())
         | (F.col("_rsrq_raw").isNotNull() & F.col("rsrq_db").isNull()) | (F.col("_bad_serving") if by_pci else F.lit(False))),
        ("missing_position", F.col("_missing_pos")),
        ("outside_area", F.col("lat").isNotNull() & F.col("lon").isNotNull() & ~_inside(F.col("lat"), F.col("lon"), rules.area)),
        ("rsrp_out_of_range", ~F.col("rsrp_dbm").between(rsrp_lo, rsrp_hi)),
        ("rsrq_out_of_range", ~F.col("rsrq_db").between(rsrq_lo, rsrq_hi)),
        ("unknown_cell", unknown),
        ("unresolved_pci", F.col("_unresolved_serving") if by_pci else F.lit(False)),
        ("duplicate", F.col("_exact") | (F.col("_rn_id") > 1) | seen),
        ("near_duplicate", ~F.col("_exact") & F.col("_near")),
    )
    drop = [*(["_seen"] if seen_ids is not None else []), "_exact", "_near", "_rn_id", "_first_key", "_ue", "_nb_hash",
            "_bad_pos", "_missing_pos", "_rest", *(["_known"] if known_cells is not None and not by_pci else []),
            *(["_serving_raw", "_serving_earfcn_raw", "_serving_pci", "_bad_serving", "_unresolved_serving"] if by_pci else [])]
    if filtered:
        reasons = with_excluded(reasons, F.col("_excluded"))
        drop.append("_excluded")
    if problems:  # a long layout's report without one serving row, or a copied line: that reason alone
        reasons = F.when(F.col("_problem").isNotNull(), F.array(F.col("_problem"))).otherwise(reasons)
        drop.append("_problem")
    df = df.withColumn("reasons", with_malformed(reasons, F.col("_line").isNotNull()))
    # The raw row is rebuilt here, after the shuffle and for rejected rows only.
    raw_row = F.coalesce(F.col("_line"), rejected_json(F.col("reasons"), raw_row_col(parsed, text=True)))
    return df.withColumn("raw_row", raw_row).drop(*drop, "_line")


def pci_candidates(cells: DataFrame) -> DataFrame:
    """Cells grouped by PCI: (pci, _cands = [(cell_id, earfcn, x_m, y_m, azimuth_deg), ...]); cells
    without a PCI left out."""
    return cells.where(F.col("pci").isNotNull()).groupBy("pci").agg(
        F.collect_list(F.struct("cell_id", "earfcn", "x_m", "y_m", "azimuth_deg")).alias("_cands"))


# The "strongest" PCI rule's a priori physics (3GPP TR 38.901): the UMa NLOS distance slope (39.08 dB
# per decade, from 10 m on) and the horizontal sector pattern (65 degree beamwidth, 30 dB front-to-back).
PCI_SLOPE_DB_PER_DECADE = 39.08
PCI_BEAMWIDTH_DEG = 65.0
PCI_FRONT_TO_BACK_DB = 30.0


def _resolve_pci(df: DataFrame, pci_cells: DataFrame, max_distance_m: float, rule: str = "strongest", *,
                 id_col: str = "cell_id", earfcn_col: str = "_earfcn_raw", active: Column | None = None,
                 raw_col: str = "_id_raw", bad_col: str = "_bad_id", unresolved_col: str = "_unresolved") -> DataFrame:
    """Rows whose `id_col` holds a PCI (where `active`, by default neighbour rows, rank > 0): `id_col`
    becomes the cell of `pci_candidates` with that PCI and a matching carrier (`earfcn_col`'s text;
    either side's carrier unknown: any), within `max_distance_m` of the report (x_m, y_m), that the UE
    would hear best (`rule` "strongest": highest predicted gain, distance slope plus the sector
    pattern where the azimuth is known; "nearest": the nearest), else null. The PCI text moves to
    `raw_col`, `bad_col` flags a PCI or carrier that is no whole number in range, `unresolved_col` a
    valid one no cell answers.

    A broadcast join on the PCI (the cells table is small) and one pass over each PCI's few
    candidates: no shuffle of the rows."""
    act = (F.col("rank") > 0) if active is None else active
    pci = parse_index(F.col(id_col), MAX_PCI)
    earfcn = parse_index(F.col(earfcn_col))
    df = df.select("*", F.col(id_col).alias(raw_col), F.when(act, pci).alias("_pci"), earfcn.alias("_earfcn"))
    df = df.join(F.broadcast(pci_cells.withColumnRenamed("pci", "_pci")), "_pci", "left")

    def d2(c):
        return (c["x_m"] - F.col("x_m")) ** 2 + (c["y_m"] - F.col("y_m")) ** 2

    fits = F.filter(F.col("_cands"), lambda c: (F.col("_earfcn").isNull() | c["earfcn"].isNull()
                                                 | (c["earfcn"] == F.col("_earfcn")))
                    & (d2(c) <= F.lit(float(max_distance_m) ** 2)))

    def loss(c):  # predicted loss in dB (lower: heard better); "nearest" ranks by distance alone
        if rule == "nearest":
            return d2(c)
        d_m = F.greatest(F.sqrt(d2(c)), F.lit(10.0))
        bearing = F.degrees(F.atan2(F.col("x_m") - c["x_m"], F.col("y_m") - c["y_m"]))  # from north, clockwise
        off = F.pmod(bearing - c["azimuth_deg"] + 180.0, F.lit(360.0)) - 180.0
        pattern = F.coalesce(F.least(F.lit(12.0) * (off / PCI_BEAMWIDTH_DEG) ** 2, F.lit(PCI_FRONT_TO_BACK_DB)), F.lit(0.0))
        return F.lit(PCI_SLOPE_DB_PER_DECADE) * F.log10(d_m) + pattern

    # Structs compare field by field: the lowest loss, ties to the nearer, then the lower cell id.
    best = F.array_min(F.transform(fits, lambda c: F.struct(
        loss(c).alias("loss"), d2(c).alias("d2"), c["cell_id"].alias("cell_id"))))
    resolved = best["cell_id"]
    bad = ((F.col(raw_col).isNotNull() & F.col("_pci").isNull())
           | (F.col(earfcn_col).isNotNull() & F.col("_earfcn").isNull()))
    return df.select(
        *[c for c in df.columns if c not in (id_col, "_cands", "_pci", "_earfcn")],
        F.when(act, resolved).otherwise(F.col(id_col)).alias(id_col),
        F.when(act, bad).otherwise(F.lit(False)).alias(bad_col),
        F.when(act, F.col("_pci").isNotNull() & ~bad & resolved.isNull()).otherwise(F.lit(False)).alias(unresolved_col),
    )


def explode_neighbours(
    clean_reports: DataFrame, *, rules: Rules, known_cells: DataFrame | None = None, serving: bool = False,
    pci_cells: DataFrame | None = None, pci_max_distance_m: float = 30_000.0, pci_rule: str = "strongest",
    rsrp_unit: str | None = None,
) -> DataFrame:
    """One row per neighbour entry of the clean reports with its own `reasons`.

    With `serving`, each report's serving measurement comes first as rank 0 (`rsrq_db` kept, no
    reasons: the report is clean), so one pass over the reports yields every measurement row.
    With `pci_cells` (`pci_candidates` of the cells table) the neighbour entries name PCIs, resolved
    to cells by `_resolve_pci`; an entry resolving to the same cell as an earlier one of its report
    is its duplicate (one shuffle of the measurement rows by report).
    """
    # A repeated cell inside one report's list is a duplicate of its first (lowest-rank) entry.
    # The array is in rank order, so "an earlier entry names the same cell" needs no shuffle.
    # parse_mdt's lists carry that flag already (`dup`); other lists get it here (the reference).
    nbs = F.col("neighbours")
    elem = clean_reports.schema["neighbours"].dataType.elementType
    flagged = nbs if "dup" in elem.fieldNames() else F.transform(nbs, lambda e, i: F.struct(
        e["rank"].alias("rank"), e["cell_id"].alias("cell_id"), e["rsrp_raw"].alias("rsrp_raw"),
        F.exists(F.slice(nbs, 1, i), lambda p: p["cell_id"] == e["cell_id"]).alias("dup"),
    ))
    has_earfcn = "earfcn_raw" in elem.fieldNames()
    keep = ["report_id", "ts", "window", "x_m", "y_m", "serving_cell_id", *(["rsrq_db"] if serving else [])]
    if serving:
        first = F.struct(F.lit(0).alias("rank"), F.col("serving_cell_id").alias("cell_id"),
                         F.col("_rsrp_raw").try_cast(elem["rsrp_raw"].dataType).alias("rsrp_raw"),
                         F.lit(False).alias("dup"), *([F.lit(None).cast("string").alias("earfcn_raw")] if has_earfcn else []))
        flagged = F.concat(F.array(first), flagged)
    df = clean_reports.select(*keep, F.explode(flagged).alias("_n"))
    df = df.select(
        *keep,
        F.col("_n.rank").cast("int").alias("rank"), F.col("_n.cell_id").alias("cell_id"),
        F.col("_n.rsrp_raw").alias("_rsrp_raw"), parse_measure(F.col("_n.rsrp_raw"), "rsrp_dbm", rsrp_unit).alias("rsrp_dbm"),
        F.coalesce(F.col("_n.dup"), F.lit(False)).alias("_dup"),
        (F.col("_n.earfcn_raw") if has_earfcn else F.lit(None).cast("string")).alias("_earfcn_raw"),
    )
    unknown = F.lit(False)
    by_pci = pci_cells is not None
    if by_pci:
        # resolved ids are cells of the table (no unknown_cell); duplicates by resolved cell, not by PCI text
        df = _resolve_pci(df, pci_cells, pci_max_distance_m, pci_rule)
        first_of = Window.partitionBy("report_id", "cell_id", F.col("rank") > 0).orderBy("rank")  # serving apart
        df = df.withColumn("_dup", F.col("cell_id").isNotNull() & (F.row_number().over(first_of) > 1))
        missing = F.col("_id_raw").isNull() | F.col("_rsrp_raw").isNull()
    else:
        if known_cells is not None:
            df = df.join(F.broadcast(known_cells.select("cell_id", F.lit(True).alias("_known"))), "cell_id", "left")
            unknown = F.col("cell_id").isNotNull() & F.col("_known").isNull()
        missing = F.col("cell_id").isNull() | F.col("_rsrp_raw").isNull()
    lo, hi = rules.rsrp_range_dbm
    reasons = reasons_col(
        ("missing_value", missing),
        ("bad_number", (F.col("_rsrp_raw").isNotNull() & F.col("rsrp_dbm").isNull())
         | (F.col("_bad_id") if by_pci else F.lit(False))),
        ("rsrp_out_of_range", ~F.col("rsrp_dbm").between(lo, hi)),
        ("unresolved_pci", F.col("_unresolved") if by_pci else F.lit(False)),
        ("neighbour_is_serving", F.col("cell_id") == F.col("serving_cell_id")),
        ("unknown_cell", unknown),
        ("duplicate", F.col("cell_id").isNotNull() & F.col("_dup")),
    )
    if serving:  # the serving entry of a clean report is clean (and is its own serving cell)
        reasons = F.when(F.col("rank") == 0, F.array().cast("array<string>")).otherwise(reasons)
    df = df.withColumn("reasons", reasons)
    if by_pci:  # the entry as logged (PCI, carrier) and the cell it was resolved to
        raw = F.struct("report_id", "rank", F.col("_id_raw").alias("pci"), F.col("_earfcn_raw").alias("earfcn"),
                       "cell_id", F.col("_rsrp_raw").cast("string").alias("rsrp_dbm"))
    else:
        raw = F.struct("report_id", "rank", "cell_id", F.col("_rsrp_raw").cast("string").alias("rsrp_dbm"))
    df = df.withColumn("raw_row", F.when(F.size("reasons") > 0, F.to_json(raw)))
    return df.drop("_dup", "_earfcn_raw", *(["_id_raw", "_bad_id", "_unresolved"] if by_pci else []),
                   *(["_known"] if known_cells is not None and not by_pci else []))


def with_load(df: DataFrame, lookup: DataFrame | None, *, cell_col: str, broadcast: bool = False) -> DataFrame:
    """Adds load_rho of `cell_col` for the report's hour (null when no counter is near enough).

    With `broadcast`, the (cell, hour) lookup is shipped whole to every task: no shuffle of the
    (4-5x larger) measurement rows; the caller decides from the lookup's size.
    """
    if lookup is None:
        return df.withColumn("load_rho", F.lit(None).cast("double"))
    lk = lookup.select(F.col("cell_id").alias("_lk_cell"), F.col("hour").alias("_lk_hour"), "load_rho")
    if broadcast:
        lk = F.broadcast(lk)
    joined = df.join(
        lk, (F.col(cell_col) == F.col("_lk_cell")) & (F.date_trunc("hour", F.col("ts")) == F.col("_lk_hour")), "left"
    )
    return joined.drop("_lk_cell", "_lk_hour")


def rejects_of(df: DataFrame, source: str, run_id: str) -> DataFrame:
    """Rows of `df` with reasons, in the rejects table's layout."""
    return df.where(F.size("reasons") > 0).select(
        F.lit(source).alias("source"), F.coalesce(F.col("raw_row"), F.lit("{}")).alias("raw_row"),
        F.array_join("reasons", ";").alias("reason_code"), reason_text_col(F.col("reasons")).alias("reason_text"),
        F.lit(run_id).alias("ingest_run_id"),
    )
