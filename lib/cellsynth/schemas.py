"""Lake table schemas, valid ranges and reject-reason codes: declared once, enforced on write.

Every lake table is described by a `TableSpec`. `cellsynth.lake` casts frames to the spec's
schema before committing and raises `SchemaError` naming the missing or mistyped column.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import pyarrow as pa

from cellsynth.errors import SchemaError

# ------------------------------------------------------------------------- valid ranges
RSRP_RANGE_DBM: Final = (-140.0, -44.0)  # 3GPP TS 36.133 reporting range
RSRQ_RANGE_DB: Final = (-19.5, -3.0)  # LTE's normal RSRQ range (the simulator's UEs report in it)
# LTE's extended RSRQ reporting range (TS 36.133 Rel-12+): ingest's default, so the values the
# generator keeps to unless ingest.rsrq_range_db says otherwise
RSRQ_EXTENDED_RANGE_DB: Final = (-34.0, 2.5)
# UE measurement report granularity (3GPP TS 36.133 RSRP/RSRQ mapping)
RSRP_STEP_DB: Final = 1.0
RSRQ_STEP_DB: Final = 0.5
LOAD_RANGE: Final = (0.0, 1.0)
NEIGHBOUR_DETECTION_DBM: Final = -124.0
AREA_CELL_ID: Final = "__area__"  # cell_id used for the area density f_j^O in kde_models

# ------------------------------------------------------------------ reject reason codes
REJECT_REASONS: Final[dict[str, str]] = {
    "malformed_row": "field count differs from the header (truncated line, extra fields or wrong delimiter)",
    "bad_timestamp": "timestamp unparseable or implausible (before 2000 or more than a day after the run)",
    "out_of_period": "timestamp outside the configured period",
    "missing_value": "a required value is missing",
    "bad_number": "a numeric field could not be parsed",
    "rsrp_out_of_range": "RSRP outside the valid range",
    "rsrq_out_of_range": "RSRQ outside the valid range",
    "missing_position": "latitude/longitude missing",
    "outside_area": "position outside the configured area",
    "unknown_cell": "cell id not in the cells table",
    "duplicate": "exact duplicate of an earlier report",
    "near_duplicate": "same UE, time and position as an earlier report",
    "neighbour_is_serving": "neighbour entry names the serving cell",
    "unresolved_pci": "no cell with the logged PCI (and carrier) within ingest.pci_max_distance_m of the report",
    "load_out_of_range": "load/PRB utilisation outside [0, 1]",
    "no_load_match": "no traffic counter for the serving cell within the tolerance",
    "duplicate_cell": "cell id listed twice in the cells table",
    "no_serving_row": "long layout: the rows of one report include no serving row (sources.mdt.serving_rows)",
    "several_serving_rows": "long layout: the rows of one report include more than one serving row",
    "excluded_by_filter": "row excluded by the source's filters (sources.<kind>.filters); no other check applied",
}

TS = pa.timestamp("us", tz="UTC")


def cell_shard_of(cell_id: str, n_shards: int) -> int:
    """Stable hash bucket of a cell id: crc32 (same as Spark's `crc32`) modulo the shard count."""
    return zlib.crc32(cell_id.encode("utf-8")) % n_shards


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()
    # Tables with a variable set of columns (synthetic_mdt's neighbour_k_* columns) accept
    # extra columns whose names start with one of these prefixes.
    extra_prefixes: tuple[str, ...] = field(default=())
    # (column, value) filled in when a writer leaves the column out: existing writers keep
    # working when a column is added (what-if's network_scenario = 'baseline').
    defaults: tuple[tuple[str, Any], ...] = field(default=())

    def conform(self, data: pa.Table) -> pa.Table:
        """Cast `data` to this spec: required columns present, types castable, order fixed."""
        problems = []
        have = set(data.column_names)
        defaults = dict(self.defaults)
        for fld in self.schema:
            if fld.name not in have and not fld.nullable and fld.name not in defaults:
                shown = ", ".join(sorted(have)[:8])
                problems.append(f"{self.name}: column '{fld.name}' missing (have: {shown}, ...)")
        extras = [c for c in data.column_names if self.schema.get_field_index(c) < 0]
        bad_extras = [c for c in extras if not c.startswith(self.extra_prefixes or ("\0",))]
        for col in bad_extras:
            problems.append(f"{self.name}: unexpected column '{col}'")
        if problems:
            raise SchemaError(problems)
        arrays, fields = [], []
        for fld in self.schema:
            if fld.name in have:
                col = data.column(fld.name)
                try:
                    col = col.cast(fld.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                    problems.append(f"{self.name}: column '{fld.name}' has type {col.type}, expected {fld.type}")
                    continue
            elif fld.name in defaults:
                col = pa.array([defaults[fld.name]] * data.num_rows, type=fld.type)
            else:
                col = pa.nulls(data.num_rows, fld.type)
            arrays.append(col)
            fields.append(fld)
        for col_name in extras:
            arrays.append(data.column(col_name))
            fields.append(pa.field(col_name, data.schema.field(col_name).type, nullable=True))
        if problems:
            raise SchemaError(problems)
        # Nullability is checked on the data, not only the declaration.
        for fld, arr in zip(fields, arrays):
            if not fld.nullable and arr.null_count:
                problems.append(f"{self.name}: column '{fld.name}' has {arr.null_count} nulls, expected none")
        if problems:
            raise SchemaError(problems)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_S = pa.string()
_D = pa.float64()
_I = pa.int32()
_L = pa.int64()
_B = pa.bool_()

TABLES: Final[dict[str, TableSpec]] = {}


def _register(spec: TableSpec) -> TableSpec:
    TABLES[spec.name] = spec
    return spec


RUNS = _register(TableSpec("runs", pa.schema([
    _f("run_id", _S), _f("stage", _S), _f("status", _S),  # running | succeeded | failed | skipped
    _f("config_hash", _S), _f("input_versions", _S, True),  # JSON {table: version}
    _f("output_versions", _S, True), _f("row_counts", _S, True),  # JSON
    _f("started_at", TS), _f("ended_at", TS, True), _f("error", _S, True), _f("note", _S, True),
])))

CELLS = _register(TableSpec("cells", pa.schema([
    _f("cell_id", _S), _f("site_id", _S, True), _f("x_m", _D), _f("y_m", _D),
    _f("lat", _D), _f("lon", _D), _f("azimuth_deg", _D, True), _f("height_m", _D, True),
    _f("tx_power_dbm", _D, True), _f("freq_mhz", _D, True),
    _f("location_estimated", _B), _f("cell_shard", _I),
    # Origin of the local metric frame (constant per ingest), so every stage projects alike.
    _f("frame_lat0", _D), _f("frame_lon0", _D),
])))

MDT_REPORTS = _register(TableSpec("mdt_reports", pa.schema([
    _f("report_id", _S), _f("ue_id", _S, True), _f("ts", TS), _f("window", _S),
    _f("x_m", _D), _f("y_m", _D), _f("serving_cell_id", _S), _f("rsrp_dbm", _D),
    _f("rsrq_db", _D, True), _f("load_rho", _D, True), _f("cell_shard", _I), _f("ingest_run_id", _S),
]), partition_by=("window", "cell_shard")))

MDT_MEASUREMENTS = _register(TableSpec("mdt_measurements", pa.schema([
    _f("report_id", _S), _f("ts", TS), _f("window", _S), _f("cell_id", _S),
    _f("role", _S),  # serving | neighbour
    _f("rank", _I),  # 0 = serving, 1..N = neighbour order in the report
    _f("rsrp_dbm", _D), _f("rsrq_db", _D, True), _f("x_m", _D), _f("y_m", _D),
    _f("load_rho", _D, True), _f("cell_shard", _I),
]), partition_by=("window", "cell_shard")))

TRAFFIC = _register(TableSpec("traffic", pa.schema([
    _f("cell_id", _S), _f("ts", TS), _f("window", _S), _f("traffic_mb", _D, True),
    _f("prb_util_pct", _D, True), _f("load_rho", _D, True), _f("cell_shard", _I),
]), partition_by=("window", "cell_shard")))

REJECTS = _register(TableSpec("rejects", pa.schema([
    _f("source", _S),  # mdt | traffic | cells | neighbour
    _f("raw_row", _S), _f("reason_code", _S),  # ';'-joined codes, every reason that applies
    _f("reason_text", _S), _f("ingest_run_id", _S),
]), partition_by=("source",)))

KDE_MODELS = _register(TableSpec("kde_models", pa.schema([
    _f("window", _S), _f("cell_id", _S), _f("bandwidth_m", _D), _f("n_reports", _L),
    _f("x_min_m", _D), _f("x_max_m", _D), _f("y_min_m", _D), _f("y_max_m", _D),
    _f("centroid_x_m", _D), _f("centroid_y_m", _D), _f("bandwidth_source", _S),  # nll | fallback
    _f("path", _S), _f("source_version", _L), _f("cell_shard", _I), _f("run_id", _S),
])))

SPATIAL_MAPS = _register(TableSpec("spatial_maps", pa.schema([
    _f("window", _S), _f("cell_id", _S), _f("method", _S),  # kde | voronoi | student | teacher | truth
    _f("gx", _I), _f("gy", _I), _f("x_m", _D), _f("y_m", _D), _f("prob", _D), _f("run_id", _S),
    _f("network_scenario", _S),  # 'baseline' = the measured network; else a what-if change file's name
]), partition_by=("method",), defaults=(("network_scenario", "baseline"),)))

RADIO_MODELS = _register(TableSpec("radio_models", pa.schema([
    _f("cell_id", _S), _f("target", _S),  # rsrp | rsrq
    _f("window", _S, True), _f("n_train", _L), _f("elbo", _D, True), _f("val_mae", _D, True),
    _f("pooled", _B), _f("path", _S), _f("source_version", _L), _f("cell_shard", _I), _f("run_id", _S),
])))

SYNTHETIC_MDT = _register(TableSpec("synthetic_mdt", pa.schema([
    _f("sample_id", _S), _f("window", _S), _f("ts", TS, True), _f("x_m", _D), _f("y_m", _D),
    _f("lat", _D), _f("lon", _D), _f("serving_cell_id", _S),
    _f("rsrp_dbm", _D), _f("rsrp_dbm_epistemic_std", _D), _f("rsrp_dbm_aleatoric_std", _D),
    _f("rsrq_db", _D, True), _f("rsrq_db_epistemic_std", _D, True), _f("rsrq_db_aleatoric_std", _D, True),
    _f("load_rho", _D, True), _f("reliable", _B), _f("scenario", _S), _f("cell_shard", _I), _f("run_id", _S),
    _f("network_scenario", _S),  # what-if tag ('scenario' is the load scenario)
    _f("clipped", _B),  # a serving RSRP/RSRQ draw fell outside the ingest range and was clipped to it
]), partition_by=("window", "cell_shard"), extra_prefixes=("neighbour_",),
    defaults=(("network_scenario", "baseline"), ("clipped", False))))

SYNTHETIC_TRAFFIC = _register(TableSpec("synthetic_traffic", pa.schema([
    _f("cell_id", _S), _f("ts", TS), _f("window", _S), _f("traffic_mb", _D), _f("prb_util_pct", _D),
    _f("load_rho", _D), _f("sample_id", _I), _f("cell_shard", _I), _f("run_id", _S),
    _f("network_scenario", _S),
]), partition_by=("window", "cell_shard"), defaults=(("network_scenario", "baseline"),)))

# What-if (issue 18): the serving field of a network on the map grid, before ('baseline') and
# after a change; one row per (network_scenario, square).
NETWORK_FIELDS = _register(TableSpec("network_fields", pa.schema([
    _f("network_scenario", _S), _f("x_m", _D), _f("y_m", _D), _f("best_cell_id", _S),
    _f("rsrp_dbm", _D), _f("rsrp_dbm_epistemic_std", _D), _f("user_weight", _D), _f("is_changed_cell", _B),
    _f("run_id", _S),
])))

METRICS = _register(TableSpec("metrics", pa.schema([
    _f("run_id", _S), _f("stage", _S), _f("metric", _S), _f("value", _D, True),
    _f("cell_id", _S, True), _f("window", _S, True), _f("split", _S, True), _f("model", _S, True),
    _f("detail", _S, True),  # JSON for curves (calibration, downsampling)
]), partition_by=("stage",)))

MEASUREMENT_PLAN = _register(TableSpec("measurement_plan", pa.schema([
    _f("window", _S), _f("rank", _I),  # 1 = measure first
    _f("mode", _S),  # route | points | ues (an MDT-triggered UE expected at x_m, y_m)
    _f("x_m", _D), _f("y_m", _D),  # the point, or the start of the route edge
    _f("x_end_m", _D, True), _f("y_end_m", _D, True),  # end of the route edge (route mode)
    _f("lat", _D, True), _f("lon", _D, True),  # of (x_m, y_m), when the cells table has the frame
    _f("length_m", _D), _f("cumulative_km", _D),  # driven on this edge / so far (0 for points)
    _f("n_reports", _I),  # reports the plan counts on here
    # expected reduction (on the models) of the user-weighted epistemic std of the serving and
    # strongest-neighbour RSRP (the expected absolute error, up to sqrt(2/pi)), dB, from this
    # step given the earlier ones
    _f("expected_reduction_db", _D),
    _f("cells", _S),  # ';'-joined cells measured here
    _f("segment_id", _S, True),  # road segment of the route edge
    _f("run_id", _S),
]), partition_by=("window",)))


def spec(table: str) -> TableSpec:
    try:
        return TABLES[table]
    except KeyError:
        raise SchemaError(f"table '{table}' is not declared in cellsynth.schemas (have: {', '.join(TABLES)})") from None
