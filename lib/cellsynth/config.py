"""Typed pipeline configuration: one pydantic model per stage, nested in `PipelineConfig`.

`load_config` is the only YAML parser in cellsynth. Defaults give the embedded local run, so an
empty file is a valid config. Every validation problem becomes one line naming the dotted key.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from cellsynth.errors import ConfigDeprecationWarning, ConfigError
from cellsynth.schemas import RSRP_RANGE_DBM, RSRQ_EXTENDED_RANGE_DB


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_range(name: str, rng: tuple[float, float]) -> None:
    if not rng[0] < rng[1]:
        raise ValueError(f"{name}: expected [min, max] with min < max, got [{rng[0]}, {rng[1]}]")


# ------------------------------------------------------------------------------- renames
# Old dotted key -> new one. Accepted for one release with a ConfigDeprecationWarning.
RENAMED_KEYS: dict[str, str] = {
    "evaluate.test_fraction": "split.test_fraction",
    "evaluate.spatial_block_m": "split.block_m",
    "evaluate.privacy_guard": "privacy.guard",
    "generate.publish_despite_privacy": "privacy.publish_despite_guard",
    "generate.privacy_check_rows": "privacy.check_rows",
    "generate.privacy_min_dcr_ratio": "privacy.min_dcr_ratio",
    "generate.privacy_confidence": "privacy.confidence",
    "radio.hidden_units": "radio.n_rbf_centres",
    "density.neighbour_radius_m": "generate.neighbour_radius_m",
}


# Keys that no code reads any more: still accepted so old configs load, with a warning so a user
# does not believe they change anything.
UNUSED_KEYS: dict[str, str] = {
    "radio.n_rbf_centres": "the GP residual model has no RBF network",
    "radio.n_weight_samples": "the GP predictive is analytic, nothing is sampled",
    "radio.epistemic_growth_db_per_km": "the epistemic std is bounded by the GP prior",
    "radio.local_cv": "the intervals are always calibrated by leave-one-out and block CV",
    "privacy.check_rows": "the guard compares against every training row",
    "privacy.dp_steps": "the dp radio model is a Gaussian release, not DP-SGD",
    "privacy.dp_users_per_step": "the dp radio model is a Gaussian release, not DP-SGD",
    "privacy.dp_clip_norm": "the dp radio model is a Gaussian release, not DP-SGD",
    "privacy.dp_learning_rate": "the dp radio model is a Gaussian release, not DP-SGD",
}


def _warn_unused(data: dict) -> None:
    # Only a value other than the default warns: a saved full config (every key, defaults
    # included) must reload silently.
    sections = {"radio": RadioConfig, "privacy": PrivacyConfig}
    for dotted, why in UNUSED_KEYS.items():
        sec, key = dotted.split(".")
        given = data.get(sec)
        if not isinstance(given, dict) or key not in given:
            continue
        default = sections[sec].model_fields[key].default
        try:
            same = type(default)(given[key]) == default
        except (TypeError, ValueError):
            same = False
        if not same:
            warnings.warn(f"config key {dotted} is unused ({why}) and goes in the next release; drop it",
                          ConfigDeprecationWarning, stacklevel=3)


def _apply_renames(data: Any) -> Any:
    """Move renamed keys of a raw config dict to their new place, warning once per key."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for old, new in RENAMED_KEYS.items():
        (old_sec, old_key), (new_sec, new_key) = old.split("."), new.split(".")
        section = out.get(old_sec)
        if not isinstance(section, dict) or old_key not in section:
            continue
        section = out[old_sec] = dict(section)
        target = out.get(new_sec)
        if target is not section:
            target = out[new_sec] = dict(target) if isinstance(target, dict) else {}
        if new_key in target:
            raise ConfigError(f"{old}: renamed to {new}; give only {new}")
        target[new_key] = section.pop(old_key)
        warnings.warn(f"config key {old} is deprecated, use {new} (the old name goes in the next release)",
                      ConfigDeprecationWarning, stacklevel=2)
    return out


# --------------------------------------------------------------------------------------- run
class RunConfig(_Section):
    """Identity of a deployment: where the lake lives and the base seed."""

    name: str = "local"
    seed: NonNegativeInt = 42
    lake_root: str = "./lake"
    # Where raw inputs (simulated or mapped operator files) are read from when `sources` is
    # left at its defaults; relative paths resolve against the working directory.
    data_dir: str = "./data"
    # `run --incremental`: a cell's radio model is retrained when its serving rows changed or
    # its added/removed measurement rows (held-in) reach this share of the rows it was trained
    # on; below it the cell keeps its model and the registry says so. 0: any change retrains.
    incremental_min_changed_share: float = Field(0.1, ge=0.0, le=1.0)


# --------------------------------------------------------------------------------- runtime
class SparkConfig(_Section):
    master: str = "local[*]"
    app_name: str = "cellsynth"
    driver_memory: str = "2g"
    shuffle_partitions: PositiveInt = 4
    # Spark UI off by default on the embedded run; bound to 127.0.0.1 when turned on.
    ui_enabled: bool = False
    bind_host: str = "127.0.0.1"
    conf: dict[str, str] = Field(default_factory=dict)


class RayConfig(_Section):
    # None starts Ray in-process; "auto" or "ray://host:port" joins a running cluster.
    address: str | None = None
    num_cpus: PositiveInt | None = 2
    n_actors: PositiveInt = 2
    cpus_per_actor: PositiveFloat = 0.5
    # GPUs per training actor/task; 0: with runtime.device auto/cuda the cluster's GPUs are split
    # over the actors (Ray hides GPUs from a worker that requests none).
    gpus_per_actor: NonNegativeFloat = 0.0
    max_restarts: NonNegativeInt = 2
    max_task_retries: NonNegativeInt = 2
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    object_store_memory_mb: PositiveInt | None = 512
    # Job API of a running cluster for `cellsynth submit` (the head's dashboard), e.g.
    # "http://127.0.0.1:8265"; jobs submitted there join the cluster with address "auto".
    job_address: str | None = None

    @model_validator(mode="after")
    def _leave_a_cpu(self) -> RayConfig:
        # Actors holding every CPU deadlock the tasks they wait on.
        if self.num_cpus is not None and self.n_actors * self.cpus_per_actor >= self.num_cpus:
            raise ValueError(
                f"n_actors * cpus_per_actor = {self.n_actors * self.cpus_per_actor:g} must stay "
                f"below num_cpus = {self.num_cpus} so tasks keep a CPU"
            )
        return self


class RuntimeConfig(_Section):
    spark: SparkConfig = SparkConfig()
    ray: RayConfig = RayConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: PositiveInt = 1


# ------------------------------------------------------------------------------------ lake
class LakeConfig(_Section):
    engine: Literal["delta-rs", "delta-spark"] = "delta-rs"
    # Names of environment variables that hold object-store credentials; the values are read at
    # the entry point and never written to the lake or logs.
    storage_options_env: dict[str, str] = Field(default_factory=dict)
    # Plain (non-secret) storage options, e.g. {"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"}.
    storage_options: dict[str, str] = Field(default_factory=dict)
    target_file_size_mb: PositiveInt = 64
    commit_retries: NonNegativeInt = 5
    retention_hours: NonNegativeInt = 168
    # Vacuum keeps the versions of this many newest runs in which a stage succeeded (plus every stage's
    # last success and every table's last good version); null keeps every recorded run's versions
    # forever (time travel to any run).
    keep_runs: PositiveInt | None = None
    # A run waits this long for another run's lake lock before failing (local roots).
    lock_timeout_s: NonNegativeFloat = 600.0
    report_dir: str | None = None  # default: <lake_root>/report


# -------------------------------------------------------------------------------- scenario
class ScenarioConfig(_Section):
    """Simulator settings (issue 4)."""

    enabled: bool = True
    n_sites: PositiveInt = 20
    sectors_per_site: PositiveInt = 3
    area_km: PositiveFloat = 6.0
    origin_lat: float = Field(44.4949, ge=-90, le=90)
    origin_lon: float = Field(11.3426, ge=-180, le=180)
    n_days: PositiveInt = 7
    start_date: str = "2026-01-05"
    n_reports: PositiveInt = 60_000
    n_neighbours: NonNegativeInt = 4
    dirt_fraction: float = Field(0.03, ge=0.0, le=0.5)
    sites_csv: str | None = None
    output_dir: str | None = None  # default: <run.data_dir>/sim
    # Layout: share of sites in the urban core (radius area_km / 6); the rest spread over suburbs.
    core_site_fraction: float = Field(0.5, ge=0.0, le=1.0)
    umi_fraction: float = Field(0.25, ge=0.0, le=1.0)  # core sites that are street-level UMi
    freq_mhz: PositiveFloat = 1800.0
    n_prb: PositiveInt = 100
    tx_power_dbm: float = 46.0  # UMa, whole carrier
    umi_tx_power_dbm: float = 40.0
    downtilt_deg: float = Field(6.0, ge=0.0, le=30.0)
    los: bool = True  # spatially consistent LOS/NLOS per TR 38.901; False = NLOS everywhere
    shadowing_sigma_db: NonNegativeFloat = 6.0
    decorrelation_m: PositiveFloat = 50.0
    site_shadowing_share: float = Field(0.8, ge=0.0, le=1.0)  # variance shared by a site's cells
    measurement_noise_db: NonNegativeFloat = 2.0
    hysteresis_noise_db: NonNegativeFloat = 1.5
    rsrq_noise_db: NonNegativeFloat = 0.5
    detection_threshold_dbm: float = -124.0
    noise_figure_db: NonNegativeFloat = 7.0
    n_candidate_sites: PositiveInt = 12  # nearest sites whose cells a report measures
    user_margin_m: NonNegativeFloat = 500.0  # users stay within the cells' bbox plus this
    n_hotspots: NonNegativeInt = 8
    n_roads: NonNegativeInt = 4
    reports_per_ue: PositiveInt = 20
    mean_load: PositiveFloat = 0.45  # mean offered load in units of cell capacity
    cell_capacity_mb_per_h: PositiveFloat = 20_000.0
    traffic_noise: NonNegativeFloat = 0.15  # log-normal sigma of hourly demand
    dirt_kinds: tuple[
        Literal["missing_value", "missing_position", "rsrp_out_of_range", "bad_timestamp", "duplicate",
                "unknown_cell", "outside_area", "swapped_latlon"], ...
    ] = ("missing_value", "missing_position", "rsrp_out_of_range", "bad_timestamp", "duplicate",
         "unknown_cell", "outside_area", "swapped_latlon")
    truth_fine_grid_m: PositiveFloat = 20.0  # integration grid of the true maps and cell shares
    association_draws: PositiveInt = 4  # noise draws per fine point for the true association
    chunk_reports: PositiveInt = 250_000


# ------------------------------------------------------------------------------- sources
# Canonical column -> raw column name the simulator writes (the default mapping).
CANONICAL: dict[str, dict[str, str]] = {
    "mdt": {
        "report_id": "report_id", "ue_id": "ue_id", "timestamp": "timestamp",
        "latitude": "latitude", "longitude": "longitude", "serving_cell_id": "serving_cell_id",
        "rsrp_dbm": "serving_rsrp_dbm", "rsrq_db": "serving_rsrq_db",
        "serving_earfcn": "serving_earfcn",  # read only with serving_id: pci
    },
    "traffic": {"cell_id": "cell_id", "timestamp": "timestamp", "traffic_mb": "traffic_mb", "prb_util_pct": "prb_util_pct"},
    "cells": {
        "cell_id": "cell_id", "site_id": "site_id", "latitude": "latitude", "longitude": "longitude",
        "azimuth_deg": "azimuth_deg", "height_m": "height_m", "tx_power_dbm": "tx_power_dbm", "freq_mhz": "freq_mhz",
        # Physical cell id and carrier (EARFCN / NR-ARFCN): only read to resolve neighbours that an
        # MDT source names by PCI (sources.mdt.neighbour_id: pci); not stored in the cells table.
        "pci": "pci", "earfcn": "earfcn",
    },
    # Per-cell radio measurements with no report structure (bench/radio_real.py's datasets, e.g. a
    # per-grid-square table): position and the measured values.
    "radio": {"latitude": "latitude", "longitude": "longitude", "rsrp_dbm": "rsrp_dbm", "rsrq_db": "rsrq_db"},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "mdt": ("timestamp", "latitude", "longitude", "serving_cell_id", "rsrp_dbm"),
    "traffic": ("cell_id", "timestamp"),
    "cells": ("cell_id", "latitude", "longitude"),
    "radio": ("latitude", "longitude", "rsrp_dbm"),
}
# Projected sources map easting/northing instead of latitude/longitude.
PROJECTED = {"easting": "latitude", "northing": "longitude"}


def known_order(kind: str, projected: bool) -> list[str]:
    """The canonical columns a source of this kind may map, in the table's order."""
    return list(CANONICAL[kind]) + (list(PROJECTED) if projected else [])


class RowFilter(_Section):
    """Keep rows whose raw `column` is in `in` / not in `not_in` (compared as text) / within [min, max]
    (parsed as a number; a value that is not one fails). Every condition given must hold; a null value is
    in no list, so `in` drops it and `not_in` keeps it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    column: str
    in_: tuple[str, ...] | None = Field(None, alias="in")
    not_in: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None

    @field_validator("in_", "not_in", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        # YAML reads `in: [4, 5]` as numbers; raw values are compared as text
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else value

    @model_validator(mode="after")
    def _some_condition(self) -> RowFilter:
        if self.in_ is None and self.not_in is None and self.min is None and self.max is None:
            raise ValueError(f"column: filter on {self.column!r} sets none of in, not_in, min, max")
        if self.min is not None and self.max is not None and not self.min <= self.max:
            raise ValueError(f"max: expected a value >= min ({self.min}), got {self.max}")
        return self


class SourceConfig(_Section):
    """Where one raw input lives and how its columns map onto the canonical ones (issue 4)."""

    path: str | None = None
    # excel: .xlsx / .xlsm workbooks, one sheet each (options.sheet_name, default the first), converted
    # once to Parquet under <run.data_dir>/_converted and read as such (cell types kept)
    format: Literal["csv", "parquet", "delta", "excel"] = "csv"
    delta_version: NonNegativeInt | None = None
    columns: dict[str, str] = Field(default_factory=dict)  # canonical -> raw column name
    crs: str = "EPSG:4326"
    timestamp_format: str = "iso"  # iso | epoch_s | epoch_ms | a Spark datetime pattern ("dd.MM.yyyy HH:mm:ss")
    # A timestamp split over several raw columns (e.g. [Date, Time]): their texts joined with one space
    # are the timestamp, which timestamp_format then reads (e.g. "dd.MM.yyyy HH:mm:ss"); instead of columns.timestamp.
    timestamp_columns: tuple[str, ...] = ()
    # The date of a log whose timestamps are a time of day only (e.g. Nemo exports: "9:41:07.250"): written
    # before the time text with a space ("2022-12-06 9:41:07.250"), which timestamp_format then reads
    # (e.g. "yyyy-MM-dd H:mm:ss.SSS").
    timestamp_date: str | None = None
    # Raw columns a log writes only when they change (event exports of drive-test tools: the serving cell
    # id on rows of its own): each empty value takes the last value above it in the same file.
    fill_forward: tuple[str, ...] = ()
    timezone: str = "UTC"  # the zone of wall-clock timestamps without an offset of their own
    missing_values: tuple[str, ...] = ("", "NA", "NaN", "null", "-")
    options: dict[str, str] = Field(default_factory=dict)  # passed to the Spark reader
    # Decimal mark of the numeric columns in a CSV: "," for exports that write 51,9 (then the field
    # separator, options.sep, is another character, e.g. ";").
    decimal: Literal[".", ","] = "."
    # A .zip `path` is unpacked (members matching this glob) under <run.data_dir>/_unpacked.
    archive_glob: str | None = None
    # Neighbour layout: "wide" = column pairs named by the patterns ({k} = 1, 2, ...); "none"; "long" = one
    # row per measured cell (cell list exports of drive-test tools): the rows of one report (same file and
    # `report_columns`) are one report, the `serving_rows` row its serving cell and report fields, the
    # others its neighbours (their cell and RSRP in the columns the serving row's are mapped from).
    neighbour_layout: Literal["wide", "none", "long"] = "wide"
    # long: raw columns naming a report (default: columns.report_id when mapped, else the UE and timestamp
    # columns); long: which rows are the serving cell's, e.g. {column: CellType, in: [Serving, PCell]}.
    report_columns: tuple[str, ...] = ()
    serving_rows: RowFilter | None = None
    neighbour_cell_pattern: str = "neighbour_{k}_cell_id"
    neighbour_rsrp_pattern: str = "neighbour_{k}_rsrp_dbm"
    # What the neighbour cell columns hold: network-wide cell ids, or PCIs (3GPP MDT and most drive-test
    # loggers name neighbours by PCI and carrier only), resolved at ingest to the nearest cell of the
    # cells table with that PCI (and carrier, from neighbour_earfcn_pattern's columns when given).
    neighbour_id: Literal["cell_id", "pci"] = "cell_id"
    # Likewise for the serving cell column (columns.serving_cell_id; its carrier: columns.serving_earfcn).
    serving_id: Literal["cell_id", "pci"] = "cell_id"
    neighbour_earfcn_pattern: str | None = None  # e.g. "neighbour_{k}_earfcn"; only with neighbour_id: pci
    # Units of raw columns when not the canonical ones, e.g. {traffic_mb: gb, prb_util_pct: fraction}.
    units: dict[str, str] = Field(default_factory=dict)
    # Rows to keep, on raw columns (e.g. [{column: NetworkMode, in: [LTE, 5G]}]); the others go to
    # `rejects` as excluded_by_filter (counted, never silently dropped) and take part in no other check.
    filters: tuple[RowFilter, ...] = ()

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _check_zone(value)

    @field_validator("timestamp_date", mode="before")
    @classmethod
    def _a_date(cls, value: Any) -> Any:
        # YAML reads an unquoted 2022-12-06 as a date; text must be an ISO date too
        if isinstance(value, datetime):
            raise ValueError("expected a date (YYYY-MM-DD), not a date-time")
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, str):
            try:
                return date.fromisoformat(value.strip()).isoformat()
            except ValueError:
                raise ValueError("expected a date (YYYY-MM-DD)") from None
        return value

    @property
    def separator(self) -> str:
        """The CSV field separator the reader options name (Spark's `sep` or `delimiter`; ',')."""
        return self.options.get("sep", self.options.get("delimiter", ","))

    @model_validator(mode="after")
    def _decimal_mark(self) -> SourceConfig:
        if self.decimal == "," and self.separator == ",":
            raise ValueError("decimal: ',' needs another field separator: set options.sep (e.g. ';')")
        if self.timestamp_columns and "timestamp" in self.columns:
            raise ValueError("timestamp_columns: give the timestamp either as columns.timestamp or as "
                             "timestamp_columns, not both")
        if self.neighbour_layout == "long" and self.serving_rows is None:
            raise ValueError("serving_rows: neighbour_layout 'long' needs the rule that picks each report's serving "
                             "row, e.g. {column: CellType, in: [Serving]}")
        if self.neighbour_layout != "long" and (self.serving_rows is not None or self.report_columns):
            raise ValueError("neighbour_layout: serving_rows and report_columns are read only with neighbour_layout: long")
        if self.neighbour_earfcn_pattern is not None:
            if self.neighbour_layout == "long":
                raise ValueError("neighbour_earfcn_pattern: a long layout's carriers are in columns.serving_earfcn")
            if self.neighbour_id != "pci":
                raise ValueError("neighbour_earfcn_pattern: only read with neighbour_id: pci (cell ids need no carrier)")
            if "{k}" not in self.neighbour_earfcn_pattern:
                raise ValueError(f"neighbour_earfcn_pattern: expected a pattern containing '{{k}}', "
                                 f"got {self.neighbour_earfcn_pattern!r}")
        return self

    @property
    def projected(self) -> bool:
        """Easting/northing in `crs` instead of WGS84 latitude/longitude."""
        return self.crs.upper() not in ("EPSG:4326", "WGS84")


class SourcesConfig(_Section):
    mdt: SourceConfig = SourceConfig()
    traffic: SourceConfig = SourceConfig()
    cells: SourceConfig = SourceConfig()

    @model_validator(mode="after")
    def _known_columns(self) -> SourcesConfig:
        # At load, not at ingest: a mapping key that names no canonical column (`ts:` for `timestamp:`)
        # would otherwise pass until Spark has read the files.
        for kind in ("mdt", "traffic", "cells"):
            src: SourceConfig = getattr(self, kind)
            unknown = sorted(set(src.columns) - set(known_order(kind, src.projected)))
            if unknown:
                raise ValueError(f"{kind}.columns: unknown canonical column(s) {', '.join(unknown)} "
                                 f"(expected: {', '.join(known_order(kind, src.projected))})")
        return self


# ---------------------------------------------------------------------------------- ingest
def _check_zone(value: str) -> str:
    """An IANA time zone name ("Europe/Dublin") or UTC; anything else fails (pydantic adds the value)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if str(value).upper() == "UTC":
        return value
    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("unknown time zone (an IANA name such as 'Europe/Dublin', or 'UTC')") from None
    return value


class WindowConfig(_Section):
    kind: Literal["all", "hour_of_day", "part_of_day", "weekday_part_of_day"] = "hour_of_day"
    hours_per_window: PositiveInt = Field(6, le=24)
    # Whose wall clock the windows follow (hours of day, weekday / weekend): an IANA zone. Unset in a
    # config, it is the MDT source's `timezone` (the traffic source's without an MDT source), so a
    # network's "morning" is its users' morning; UTC where no source names a zone.
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _check_zone(value)


class IngestConfig(_Section):
    rsrp_range_dbm: tuple[float, float] = RSRP_RANGE_DBM
    # LTE's extended RSRQ reporting range (TS 36.133 Rel-12+, -34 to 2.5 dB), which today's UEs and loggers
    # report: the normal range's -19.5 dB floor rejected whole reports (their RSRP too) at the cell edge and
    # under load. NR's range is wider (TS 38.133: -43 to 20 dB).
    rsrq_range_db: tuple[float, float] = RSRQ_EXTENDED_RANGE_DB
    windows: WindowConfig = WindowConfig()
    n_cell_shards: PositiveInt = 8
    load_join_tolerance_h: NonNegativeInt = 1
    near_duplicate_m: NonNegativeFloat = 1.0
    near_duplicate_s: NonNegativeFloat = 1.0
    repair_swapped_latlon: bool = True
    # Area of interest in the local frame; None derives it from the cells (+ margin).
    area_margin_m: NonNegativeFloat = 2000.0
    # Period of the data (ISO 8601 date or date-time, UTC unless it names a zone; end exclusive).
    # Rows outside it are `out_of_period`. Timestamps before 2000-01-01 or more than a day after
    # the run are implausible (`bad_timestamp`) unless the period reaches beyond those bounds.
    period_start: str | None = None
    period_end: str | None = None
    # Area of interest as (x_min, y_min, x_max, y_max) in the local frame; overrides the derived one.
    area_bbox_m: tuple[float, float, float, float] | None = None
    # Target file size as rows per Parquet file (Spark maxRecordsPerFile).
    max_records_per_file: PositiveInt = 2_000_000
    # The (cell, hour) load lookup is broadcast to the report and neighbour joins up to this many
    # rows (about 40 bytes each); above it, a shuffle join. Local mode holds several copies of a
    # broadcast on the one heap, beside the cached reports: keep it well under the heap.
    load_broadcast_max_rows: NonNegativeInt = 1_000_000
    # A neighbour named by PCI (sources.mdt.neighbour_id: pci) is the nearest cell with that PCI (and
    # carrier) within this distance of the report; none that near: rejected as unresolved_pci. 30 km a
    # priori: about the reach of a rural LTE 800 MHz macro; a same-PCI cell farther cannot be the one heard.
    pci_max_distance_m: PositiveFloat = 30_000.0
    # Which of those cells: "strongest" (the highest predicted gain: TR 38.901's UMa distance slope plus
    # the sector pattern where the cells table gives azimuths) or "nearest" (distance alone).
    pci_rule: Literal["strongest", "nearest"] = "strongest"

    @field_validator("period_start", "period_end", mode="before")
    @classmethod
    def _iso_text(cls, value: Any) -> Any:
        # YAML reads an unquoted 2026-01-05 as a date: keep it as its ISO text.
        return value.isoformat() if isinstance(value, (date, datetime)) else value

    @model_validator(mode="after")
    def _ranges(self) -> IngestConfig:
        _check_range("rsrp_range_dbm", self.rsrp_range_dbm)
        _check_range("rsrq_range_db", self.rsrq_range_db)
        bounds = {k: utc_instant(k, getattr(self, k)) for k in ("period_start", "period_end")}
        if None not in bounds.values() and not bounds["period_start"] < bounds["period_end"]:
            raise ValueError(f"period_end: expected a time after period_start ({self.period_start}), got {self.period_end!r}")
        return self


def utc_instant(key: str, text: str | None) -> datetime | None:
    """An ISO 8601 date or date-time as an aware UTC datetime (zone-less text is UTC).

    Raises:
        ValueError: `key: expected ...` for text that is not ISO 8601.
    """
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{key}: expected an ISO 8601 date or date-time (e.g. 2026-01-05), got {text!r}") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# --------------------------------------------------------------------------------- density
class DensityConfig(_Section):
    bandwidth_grid_m: tuple[PositiveFloat, ...] = (25.0, 50.0, 100.0, 200.0, 400.0)
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    min_reports: PositiveInt = 20
    bandwidth_floor_m: PositiveFloat = 20.0
    map_resolution_m: PositiveFloat = 100.0
    map_min_mass: NonNegativeFloat = 1e-6
    student: bool = True
    # Pruned association (GUMBLE eq. 15): a cell is scored at a point only when the point lies
    # within prune_k_bandwidths * bandwidth of the cell's support box.
    prune_k_bandwidths: PositiveFloat = Field(6.0, ge=3.0)
    # Serving-cell rule: `map` weighs each cell's density by its share of the window's reports
    # (Bayes rule); `ml` is GUMBLE eq. 15 as printed (argmax of the per-cell density alone).
    association: Literal["map", "ml"] = "map"
    # MAP only: association bandwidths are scale x each cell's eq. 14 bandwidth, the scale picked
    # per window by 3-fold CV accuracy on the training reports (density NLL over-smooths across
    # cell borders for classification). (1.0,) turns the search off.
    association_bandwidth_scales: tuple[PositiveFloat, ...] = (0.25, 0.5, 0.75, 1.0)
    # Cap on the reports the area density f_j^O keeps per window (uniform subsample).
    area_max_reports: PositiveInt = 200_000
    # DEEPMEND teacher: power-attenuation exponents searched per cell (2-D KS to measured map).
    teacher_beta_grid: tuple[PositiveFloat, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
    # Fraction of measured cells held out from the student to score it (by cell-id hash).
    student_holdout_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    student_patch_px: PositiveInt = Field(32, ge=8, le=128)
    # Competing cells within this distance of a patch enter the student's site-layout patch.
    student_context_radius_m: PositiveFloat = 3000.0
    student_epochs: PositiveInt = 300


# ----------------------------------------------------------------------------------- radio
class RadioConfig(_Section):
    # Unused since the GP residual model (accepted so old configs load): n_rbf_centres,
    # n_weight_samples (the GP predictive is analytic), epistemic_growth_db_per_km (the epistemic
    # std is bounded by the GP prior), local_cv.
    n_rbf_centres: PositiveInt = 32  # (was hidden_units) unused, see above
    n_steps: PositiveInt = 2000  # Adam steps of the Pyro reference hyperparameter fit (svi_loss: pyro)
    learning_rate: PositiveFloat = 0.02  # its learning rate
    n_weight_samples: PositiveInt = 64  # unused, see above
    min_measurements: PositiveInt = 50
    load_bins: PositiveInt = 10
    ipw: bool = True
    epistemic_threshold_db: PositiveFloat = 3.0
    max_train_per_cell: PositiveInt = 5000
    # Aleatoric std floor: 1 dB report quantisation alone is 0.29 dB (GUMBLE appendix).
    aleatoric_floor_db: PositiveFloat = 0.5
    epistemic_growth_db_per_km: PositiveFloat = 10.0  # unused, see above
    # Block side of the internal spatial-block CV of the training rows that calibrates the
    # intervals (None = 200 m).
    gap_cv_block_m: PositiveFloat | None = 200.0
    # Scale the epistemic and aleatoric std by factors chosen on training-row CV (leave-one-out
    # and block folds).
    calibrate_aleatoric: bool = True
    local_cv: bool = True  # unused, see above
    # "fused": the fast grid MAP fit of the GP hyperparameters; "pyro": the Pyro reference
    # (PyroModule with PyroSample hyperpriors, AutoDelta guide, Trace_ELBO by Adam).
    svi_loss: Literal["fused", "pyro"] = "fused"
    # Write each cell's posterior raster next to its weights (radio/raster.py): generation then
    # interpolates (within 0.05 dB of the exact GP, checked per cell when built) instead of
    # factorising every cell per task. Off by default: at 10^3 cells building the rasters costs
    # more CPU than one generation saves (bench/results/generate.json); it pays when the same
    # models generate several times (reruns, other seeds, scenarios, multiples).
    posterior_raster: bool = False

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        # RadioConfig(hidden_units=...) built directly, outside a PipelineConfig.
        return _apply_renames({"radio": data}).get("radio", data) if isinstance(data, dict) else data


# --------------------------------------------------------------------------------- traffic
class TrafficConfig(_Section):
    enabled: bool = True
    n_steps: PositiveInt = 1500  # ~1 min on one shared CPU core at the default sizes
    diffusion_steps: PositiveInt = 100
    sampling_steps: PositiveInt | None = 50  # the reference sampler's respaced DDPM steps (None = all)
    # "fast": fewer DDPM steps, count calibrated at fit against the reference sampler on
    # training contexts (falls back to the reference when none matches); "reference": DDPM above.
    sampler: Literal["fast", "reference"] = "fast"
    hidden_channels: PositiveInt = Field(64, multiple_of=8)
    n_blocks: PositiveInt = Field(4, le=12)
    batch_size: PositiveInt = 32
    learning_rate: PositiveFloat = 2e-3
    cond_drop_prob: float = Field(0.1, ge=0.0, lt=1.0)
    guidance_scale: NonNegativeFloat = 1.0  # OpenDiff eq. 8's mu; 0 = purely conditional
    n_samples_per_cell: PositiveInt = 5
    # Whole cells held out of training and scored (generation for cells without data).
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    external_context_csv: str | None = None  # cell_id + numeric columns (population, POI counts)
    # Train and score the unconditional ablation (OpenDiff's CSDI) beside the model.
    evaluate_unconditional: bool = True


# -------------------------------------------------------------------------------- generate
class GenerateConfig(_Section):
    multiple: PositiveFloat = 1.0  # synthetic rows per held-in real report of the window ("augment 10x")
    n_neighbours: NonNegativeInt = 4
    load_scenario: Literal["observed", "fixed", "quantile", "synthetic_traffic"] = "observed"
    load_rho: float = Field(0.5, ge=0.0, le=1.0)
    load_quantile: float = Field(0.9, ge=0.0, le=1.0)
    windows: tuple[str, ...] | None = None  # None = every window in the clean data
    # Neighbour candidates per position: the nearest cells within neighbour_radius_m of it.
    neighbour_radius_m: PositiveFloat = 3000.0
    neighbour_candidates: PositiveInt = 24
    # Thin candidate neighbours by their smoothed detection rate in held-in reports (grid of
    # density.map_resolution_m squares, Gaussian-smoothed by this many squares); off: every candidate.
    neighbour_detection: bool = True
    detection_smoothing_squares: PositiveFloat = 1.0
    # "sample" draws each value from N(mean, epistemic^2 + aleatoric^2) (GUMBLE eq. 17);
    # "mean" writes the predictive mean.
    values: Literal["sample", "mean"] = "sample"
    use_ray: bool = True  # False runs the per-shard tasks in the driver (tiny runs, debugging)
    # Algorithm 1 draws per spatial tile task (sampling + association); a memory/parallelism
    # bound, not a tuned value: the rows of a tile are held by one task at a time.
    rows_per_tile: PositiveInt = 50_000

    @field_validator("windows")
    @classmethod
    def _some_window(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # [] generated nothing and failed after training, saying every window had zero training reports
        if value is not None and not value:
            raise ValueError("expected at least one window name; leave it unset (null) for every window")
        return value


# ----------------------------------------------------------------------------------- split
class SplitConfig(_Section):
    """The train/test split of the real reports. Density, radio and generate train on the held-in
    rows and evaluate scores on the held-out ones, so all of them read this one section."""

    # Share of reports held out (GUMBLE's random 65/35 split), decided by hashing report ids.
    test_fraction: float = Field(0.35, gt=0.0, lt=1.0)
    # Seed of the id hash; None: run.seed (a seed change then redraws the split everywhere).
    seed: NonNegativeInt | None = None
    # Side of the held-out squares of the spatial-block (extrapolation) split in evaluate.
    block_m: PositiveFloat = 200.0


# --------------------------------------------------------------------------------- privacy
class PrivacyConfig(_Section):
    """The privacy guard generate applies before it commits a synthetic table, the distance and
    membership-inference audit, and the epsilon-DP mode (issue 16)."""

    # Refuse to commit a synthetic table whose rows sit closer to the training rows than held-out
    # real rows do (distance to closest record, metres and dB).
    guard: bool = True
    # Publish even when the guard refuses (the refusal is still logged).
    publish_despite_guard: bool = False
    # Unused since the guard compares against every training row (kept so old configs load).
    check_rows: PositiveInt = 20_000
    # Refuse when the synthetic/held-out median-DCR ratio is below this with `confidence`
    # (one-sided bootstrap bound): small held-out sets make the bare ratio swing by +-15%.
    min_dcr_ratio: float = Field(0.9, gt=0.0, le=1.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)

    # ---- issue 16: distance units, membership-inference audit, epsilon-DP mode
    # off: the GUMBLE pipeline as is; dp: positions from a DP grid density and radio models from
    # Gaussian releases of per-user-clipped sufficient statistics (privacy/dp_stats.py), with an
    # (epsilon, delta) accountant; traffic synthesis is excluded from dp mode.
    mode: Literal["off", "dp"] = "off"
    epsilon: PositiveFloat = 10.0  # total budget of the dp mode (per user, basic composition of stages)
    delta: float = Field(1e-6, gt=0.0, lt=1.0)  # must also be < 1/n_users (checked on the data)
    # Share of epsilon (positions, RSRP, RSRQ): most to RSRP, the value users share for. Positions
    # spend theirs as a Laplace (pure) epsilon; the RSRP and RSRQ shares together are the radio
    # stage's (epsilon, delta), one exactly composed Gaussian mechanism that the two targets share in
    # 1/z^2 in the same proportion (privacy/dp.py `radio_multipliers`).
    epsilon_split: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.2, 0.5, 0.3)
    # Contribution bounding: each ue_id enters the DP training with at most this many reports (a
    # uniform draw of its reports), which bounds every mechanism's sensitivity. 20 over 8 chosen on a
    # public simulated scenario (run.seed=7) by the DP radio model's MAE (privacy/dp_stats.py).
    max_reports_per_ue: PositiveInt = 20
    # Seed of the dp mechanisms' noise (and of the contribution-bounding draw). None, the default:
    # fresh operating-system entropy each run, because noise drawn from a seed an adversary knows
    # (run.seed is in the config and defaults to 42) can be regenerated and subtracted, and the
    # release is then not differentially private at all. An integer makes dp runs reproducible, for
    # benchmarks and tests on data that is not personal; never set it for a release.
    noise_seed: int | None = None
    grid_m: PositiveFloat = 200.0  # DP position histogram squares
    smoothing_squares: PositiveFloat = 1.0  # Gaussian smoothing of the noisy counts (post-processing)
    # Unused since the dp radio model is no longer trained by DP-SGD (kept so old configs load).
    dp_steps: PositiveInt = 400
    dp_users_per_step: PositiveFloat = Field(0.05, gt=0.0, le=1.0)
    dp_clip_norm: PositiveFloat = 1.0
    dp_learning_rate: PositiveFloat = 0.5
    # Distance metric: d = sqrt(dx_m^2 + dy_m^2 + (metres_per_db * d_rsrp_db)^2); 10 m per dB, fixed a
    # priori: 1 dB is the RSRP report quantum and ~10 m the GNSS position error (privacy/distance.py).
    metres_per_db: PositiveFloat = 10.0
    near_radii_m: tuple[PositiveFloat, ...] = (10.0, 50.0)
    # Guard: refuse when the share of synthetic rows within a radius of a training position of their
    # cell and window exceeds the held-out share by more than this (lower confidence bound), i.e.
    # one extra row in a hundred sits on a training position; fixed a priori.
    max_near_excess: float = Field(0.01, ge=0.0, lt=1.0)
    guard_mia: bool = False  # also run the membership-inference audit in the generate guard
    max_mia_auc_upper: float = Field(0.6, gt=0.5, le=1.0)
    mia_targets: PositiveInt = 5000  # members and as many non-members per attack
    mia_max_synthetic_rows: PositiveInt = 20_000  # DOMIAS KDE sample
    mia_bandwidth_m: PositiveFloat = 50.0  # DOMIAS KDE bandwidth in the metres+dB metric (the guard's 50 m scale)
    mia_bootstrap: PositiveInt = 200

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False: `privacy: {mode: off}` means "off".
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if abs(sum(self.epsilon_split) - 1.0) > 1e-6:
            raise ValueError(f"epsilon_split: expected three shares summing to 1, got {list(self.epsilon_split)}")
        return self


# -------------------------------------------------------------------------------- evaluate
class EvaluateConfig(_Section):
    baselines: tuple[Literal["knn", "rf", "gp"], ...] = ("knn", "rf", "gp")
    downsampling: tuple[float, ...] = (0.9, 0.99, 0.999)
    truth_dir: str | None = None  # simulator ground truth; default <scenario output>/truth
    # Caps that keep evaluation fast on 2 cores (uniform subsamples, seeded by run.seed).
    max_test_rows: PositiveInt = 20_000
    max_fingerprint_train_rows: PositiveInt = 20_000
    max_privacy_rows: PositiveInt = 20_000
    # RSRP of ours and the baselines is scored on the held-out rows of at most this many cells
    # (a seeded sample, stated in `metrics`): the baselines' cost is ~one exact-GP fit on up to
    # 1,000 rows per scored cell (5-8 CPU-s each), so this bounds it whatever the network's size.
    # 60 = the default scenario's cell count (a priori, issue 15): a larger network is scored on
    # a sample as large as the default network, whose cells are all scored, at the default's cost
    # (200 cells took 1,363 CPU-s of baselines at 10^3 cells, most of evaluate there).
    max_scored_cells: PositiveInt = 60
    n_downsampling_cells: PositiveInt = 1  # cells refitted (downsampling curve, spatial block, IPW); ~7 fits each
    fingerprint_trees: PositiveInt = 60
    epistemic_inside_m: PositiveFloat = 50.0  # grid point within this of a training report: inside
    epistemic_outside_m: PositiveFloat = 500.0  # farther than this from every report: outside
    field_grid_px: PositiveInt = Field(40, ge=8, le=200)  # RSRP field map for the report
    refit_n_steps: PositiveInt = 300  # SVI steps of the radio refits (downsampling, spatial block, IPW)


class ReportConfig(_Section):
    enabled: bool = True
    n_example_cells: PositiveInt = 4
    max_points: PositiveInt = 20_000  # scatter maps subsample to this many points


# ------------------------------------------------------------------------------------ plan
class PlanConfig(_Section):
    """Measurement planning (issue 17): where to measure next, within a budget."""

    # On demand (`cellsynth plan`); True also runs it in `cellsynth run`, before the report.
    enabled: bool = False
    window: str | None = None  # None: the window with the most training reports
    # Budget: km driven along roads, a number of stationary points, or a number of MDT-triggered
    # UEs in the window (set one, the others None).
    budget_km: PositiveFloat | None = 20.0
    n_points: PositiveInt | None = None
    n_ues: PositiveInt | None = None
    # UE mode: the operator picks whom to trigger among the window's UEs, modelled as
    # ue_pool_factor x n_ues positions drawn from f_j^O (run.seed); each triggered UE sends one
    # report from there. 20, a priori: a busy window has far more UEs than one triggers.
    ue_pool_factor: PositiveInt = 20
    grid_spacing_m: PositiveFloat = 100.0  # stationary candidates and the map
    # Targets: the window's users as draws from f_j^O (run.seed), the population the user-weighted
    # error is an average over. 2,000, a priori: the Monte Carlo error of a weighted mean is then
    # ~2% of its spread, and each cell's matrices stay (its targets + candidates)^2.
    n_target_samples: PositiveInt = 2000
    # A greedy route spends its budget around where it starts: grow it from this many starts (the
    # best edges per metre, more than start_separation_m apart) and keep the best. 4 and 500 m, a
    # priori: 4x the cost of one route, starts a street block and more apart.
    route_starts: PositiveInt = 4
    start_separation_m: PositiveFloat = 500.0
    # The planner's expectation under the GP hyperparameters: "map" (the fitted ones) or
    # "ensemble" (averaged over their grid posterior, `cellsynth.plan.hyper`). "map": the
    # ensemble did not beat it on the planning bench's development seeds (README, planning).
    hyperparameters: Literal["map", "ensemble"] = "map"
    # How the candidate routes (greedy and coverage) are compared: "own", by the expected reduction
    # over the same f_j^O draws they were grown on; "independent", over a second, independent set
    # of as many draws (a greedy route is fitted to its draws, so its own ones flatter it).
    route_selection: Literal["own", "independent"] = "own"
    # How the users are drawn: "density", from f_j^O as it is; "matched", from f_j^O's positions
    # with its kernel shrunk until the draws lie, on the mean, as far from the measurements (every
    # window's report positions) as a new user does, leave-one-out (`plan.transforms.matched_draws`:
    # f_j^O's likelihood bandwidth spreads the draws into the gaps where the model is least sure).
    user_draws: Literal["density", "matched"] = "density"
    # Roads: a GeoJSON (LineString/MultiLineString, lon/lat) or CSV of straight segments
    # (segment_id, x0_m, y0_m, x1_m, y1_m or lat0, lon0, lat1, lon1). None: the simulator's roads
    # (scenario enabled) with streets every `street_spacing_m`.
    road_path: str | None = None
    street_spacing_m: PositiveFloat = 400.0
    sample_spacing_m: PositiveFloat = 25.0  # one report per this many metres driven
    reports_per_point: PositiveInt = 10  # reports taken at a stationary point
    # Used only for a radio model that exposes no posterior covariance (the GP model does, and
    # the planner conditions on it): an a-priori correlation length of a cell's field; 150 m, so
    # one report informs the next few street blocks, not the district.
    correlation_length_m: PositiveFloat = 150.0
    n_nearest_cells: PositiveInt = 12  # cells predicted per position (nearest sites first)
    detection_threshold_dbm: float = -124.0  # a cell predicted above this is heard (measured)
    max_targets: PositiveInt = 40_000  # grid points; above it, a coarser grid_spacing_m is needed

    @model_validator(mode="before")
    @classmethod
    def _default_budget_yields(cls, data: Any) -> Any:
        # `plan: {n_points: 20}` means points: the km budget's default gives way unless it is set too
        if isinstance(data, dict) and "budget_km" not in data and any(data.get(k) is not None for k in ("n_points", "n_ues")):
            return {**data, "budget_km": None}
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> PlanConfig:
        if sum(v is not None for v in (self.budget_km, self.n_points, self.n_ues)) != 1:
            raise ValueError(f"budget_km: set exactly one of plan.budget_km, plan.n_points and plan.n_ues, "
                             f"got budget_km={self.budget_km}, n_points={self.n_points}, n_ues={self.n_ues}")
        return self


# --------------------------------------------------------------------------------- pipeline
def _window_zone_from_sources(data: dict[str, Any]) -> dict[str, Any]:
    """`ingest.windows.timezone` left unset: the MDT source's zone, else the traffic source's (WindowConfig)."""
    ingest = data.get("ingest") or {}
    windows = (ingest.get("windows") or {}) if isinstance(ingest, dict) else None
    if not isinstance(windows, dict) or "timezone" in windows:
        return data  # set, or sections given as objects: as they are
    sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    for kind in ("mdt", "traffic"):
        src = sources.get(kind)
        if isinstance(src, dict) and src.get("path") and str(src.get("timezone", "UTC")).upper() != "UTC":
            return {**data, "ingest": {**ingest, "windows": {**windows, "timezone": src["timezone"]}}}
    return data


class PipelineConfig(_Section):
    run: RunConfig = RunConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    lake: LakeConfig = LakeConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    sources: SourcesConfig = SourcesConfig()
    ingest: IngestConfig = IngestConfig()
    density: DensityConfig = DensityConfig()
    radio: RadioConfig = RadioConfig()
    traffic: TrafficConfig = TrafficConfig()
    generate: GenerateConfig = GenerateConfig()
    split: SplitConfig = SplitConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    plan: PlanConfig = PlanConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        data = _apply_renames(data)
        if isinstance(data, dict):
            _warn_unused(data)
            data = _window_zone_from_sources(data)
        return data

    @model_validator(mode="after")
    def _dp_needs_public_sites(self) -> PipelineConfig:
        # Ingest estimates cell positions from the reports when no cells source is given; the dp mode
        # takes the cells table as public, so those positions would leak (`privacy.dp.check_public_cells`
        # refuses a lake that already holds them).
        if self.privacy.mode == "dp" and not self.scenario.enabled and self.sources.mdt.path and not self.sources.cells.path:
            raise ValueError("privacy.mode: dp treats the cells table as public, but without sources.cells ingest "
                             "estimates the cell positions from the reports, which are private: give the site table "
                             "(sources.cells) or set privacy.mode=off")
        return self

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named sections or dotted keys (all when none), for the run registry.

        `section_hash("radio", "split", "run.seed")` covers the whole radio and split sections
        and only the seed of `run`.
        """
        data = self.model_dump(mode="json")
        if keys:
            picked: dict[str, Any] = {}
            for key in sorted(set(keys)):
                node: Any = data
                for part in key.split("."):
                    if not isinstance(node, dict) or part not in node:
                        raise ConfigError(f"{key}: not a config key")
                    node = node[part]
                picked[key] = node
            data = picked
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def storage_options(self) -> dict[str, str]:
        """Plain options plus credentials read from the environment variables named in config."""
        options = dict(self.lake.storage_options)
        for option, env_name in self.lake.storage_options_env.items():
            value = os.environ.get(env_name)
            if value is not None:
                options[option] = value
        return options


# ------------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"] if not isinstance(part, int)) or "<root>"
        msg = item["msg"].removeprefix("Value error, ")
        # Section validators name their own field ("rsrp_range_dbm: ..."): fold it into the key.
        head, sep, rest = msg.partition(": ")
        if sep and all(part.isidentifier() for part in head.split(".")) and item["type"] == "value_error":
            key, msg = f"{key}.{head}" if key != "<root>" else head, rest
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
            continue
        got = item.get("input")
        shown = "" if isinstance(got, dict) or got is None else f", got {got!r}"
        lines.append(f"{key}: {msg}{shown}")
    return lines


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping: a second `radio:` section at the end of a
    file replaced the whole first one, silently. A merge (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # a complex key: PyYAML's own error
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKeyError(f"key {key!r} given twice (lines {seen[key]} and {line}); "
                                         "the later would silently replace the earlier")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(p: Path, what: str) -> Any:
    """The file's YAML, or a ConfigError naming `what` and the file (invalid YAML, a repeated key)."""
    try:
        return yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as err:
        raise ConfigError(f"{what}: {p}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{what}: {p} is not valid YAML ({err.__class__.__name__})") from err


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as YAML) to a raw config dict."""
    # (a deep copy; YAML's unquoted dates and date-times become their ISO text, as the fields read them)
    out = json.loads(json.dumps(data, default=lambda v: v.isoformat() if isinstance(v, (date, datetime)) else str(v)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key.path=value")
        path, _, raw = item.partition("=")
        node = out
        parts = path.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{path}: '{part}' is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return out


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Validate a raw dict into a `PipelineConfig`, raising one `ConfigError` line per problem."""
    data = _apply_renames(data)  # here, not only in the validator: a clash is one plain ConfigError line
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from err


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (None = all defaults) and apply `--set` overrides.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or value out of range.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        loaded = _read_yaml(p, "config")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must hold a mapping at the top level")
        data = loaded or {}
    return config_from_dict(apply_overrides(data, overrides))


def read_yaml_mapping(path: str | Path, *, what: str) -> dict[str, Any]:
    """Read a YAML file holding a mapping (other validated inputs, e.g. the what-if change file).

    Raises:
        ConfigError: missing file, invalid YAML or not a mapping, naming `what`.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file not found: {p}")
    loaded = _read_yaml(p, what)
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what}: {p} must hold a mapping at the top level")
    return loaded
