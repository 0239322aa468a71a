"""Ingest stage (Spark): raw MDT, traffic counters and cell sites -> clean, partitioned Delta tables.

Spark reads each raw source once, validates every row into a staging Parquet copy (typed
columns + reason codes), then writes each output table's Parquet files into
`<table>/spark-<run_id>-<attempt>/` (hive layout by window and cell_shard, sorted by cell).
Nothing is visible until the driver commits all tables in quick succession at the very end;
a crash before that leaves every table untouched, a crash between commits is rolled back by
`RunRegistry.recover()`. Counts are reconciled (rows in = clean + rejected, per source) before
any commit.

New files for a new day append: after every successful run the stage records which raw files
(path, size, mtime) the tables hold, with the tables' versions, in `_ingest/files.json` in the
lake. A later run whose file set is a superset of the recorded one (same cells file, same
ingest config, tables still at the recorded versions) reads only the new files and appends
their rows: report ids (and traffic (cell, hour) keys) already in the tables are rejected as
`duplicate`, and the load join also sees the traffic rows already ingested. Anything else
(a changed or removed file, a restored table, no record) is a full rewrite, as the note says.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from cellsynth.config import PipelineConfig
from cellsynth.errors import ConfigError, StageError
from cellsynth.geo import LocalFrame
from cellsynth.ingest import long_layout
from cellsynth.ingest import transforms as tf
from cellsynth.ingest.sources import (
    META_COLUMNS, ResolvedSource, column_mapping, fingerprint_files, neighbour_earfcn_columns, read_raw, resolve_source, sim_dir,
    with_filled, with_joined_timestamp,
)
from cellsynth.schemas import spec
from cellsynth.stages import StageResult, StageSpec

NAME = "ingest"
INPUTS: tuple[str, ...] = ()
OUTPUTS: tuple[str, ...] = ("cells", "mdt_reports", "mdt_measurements", "traffic", "rejects")


def external_fingerprint(cfg: PipelineConfig) -> str:
    """Hash of path, size and mtime of every raw input file."""
    parts = []
    for kind in ("cells", "traffic", "mdt"):
        try:
            src = resolve_source(cfg, kind)  # type: ignore[arg-type]
        except ConfigError as err:
            parts.append(f"{kind}:error:{err}")
            continue
        parts.append(f"{kind}:" + ("none" if src is None else ",".join(fingerprint_files(list(src.files)))))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    reads=("ingest", "sources", "run.data_dir", "scenario.enabled", "scenario.output_dir"),
    external_fingerprint=external_fingerprint,
)


def spark_uri(uri: str) -> str:
    """Spark's Hadoop filesystem wants s3a:// where delta-rs and pyarrow take s3://."""
    return "s3a://" + uri[len("s3://"):] if uri.startswith("s3://") else uri


class _Writer:
    """Writes a table's Parquet files for Spark and counts rows from the file footers."""

    def __init__(self, rt, run_id: str, max_records_per_file: int):
        self.lake = rt.lake
        self.tag = f"spark-{run_id}-{uuid.uuid4().hex[:6]}"
        self.max_records = max_records_per_file
        self.written: list[str] = []
        self.commit_tried: set[str] = set()
        self.persisted: list[DataFrame] = []

    def write_table(self, table: str, df: DataFrame, *, few_rows: bool = False,
                    after_sort: dict[str, Column] | None = None) -> None:
        """`after_sort`: columns computed from the others after the sort (rows the sort moves are
        that much narrower; none of them may be a sort key)."""
        tspec = spec(table)
        cols = [f.name for f in tspec.schema]
        after_sort = after_sort or {}
        df = df.select(*[F.col(c) if c in df.columns else F.lit(None).alias(c) for c in cols if c not in after_sort])
        sort = [c for c in (*tspec.partition_by, "cell_id", "serving_cell_id") if c in cols]
        if set(sort) & set(after_sort):
            raise ValueError(f"{table}: sort keys cannot be computed after the sort: {sorted(set(sort) & set(after_sort))}")
        if not tspec.partition_by:
            df = df.coalesce(1)
        elif few_rows:  # (rejects) one file per partition folder costs little here
            df = df.repartition(*tspec.partition_by)
        # Partitioned tables are not shuffled by (window, shard) first: that shuffle moved every
        # output row once more to save files. Each task writes its rows sorted by (window, shard,
        # cell), so a partition folder gets at most one file per task (the validated frame's
        # partitions: 1 for a small run, at most runtime.spark.shuffle_partitions).
        df = df.sortWithinPartitions(*sort)
        if after_sort:
            df = df.select(*[after_sort[c].alias(c) if c in after_sort else F.col(c) for c in cols])
        writer = df.write.mode("overwrite").option("maxRecordsPerFile", self.max_records)
        if tspec.partition_by:
            writer = writer.partitionBy(*tspec.partition_by)
        writer.parquet(spark_uri(self.lake.uri(table) + "/" + self.tag))
        self.written.append(table)

    def stage(self, name: str, df: DataFrame, spark) -> DataFrame:
        """Materialise a validated frame once (memory, spilling to disk) for its several readers."""
        from pyspark import StorageLevel

        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        self.persisted.append(df)
        return df

    def rows(self, table: str, partition: str | None = None) -> int:
        fs, base = self.lake.filesystem()
        root = f"{base}/{table}/{self.tag}" + (f"/{partition}" if partition else "")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sum(pq.read_metadata(i.path, filesystem=fs).num_rows for i in infos
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def nulls(self, table: str, column: str) -> int:
        """Null count of a column from the written files' Parquet footer statistics."""
        fs, base = self.lake.filesystem()
        root = f"{base}/{table}/{self.tag}"
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        total = 0
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            meta = pq.read_metadata(info.path, filesystem=fs)
            idx = meta.schema.to_arrow_schema().get_field_index(column)
            for g in range(meta.num_row_groups):
                st = meta.row_group(g).column(idx).statistics
                if st is None or not st.has_null_count:
                    raise StageError(f"ingest: {table}: no null count in the footer of {info.path}")
                total += st.null_count
        return total

    def cleanup(self) -> None:
        """Unpersist, and delete the staged files of every table this run wrote and did not try to commit (a
        failed run). A table whose commit raised keeps them (the commit may have landed before the error), as
        does a killed run: `cellsynth vacuum` deletes files no commit took once older than the retention."""
        for df in self.persisted:
            df.unpersist()
        fs, base = self.lake.filesystem()
        for table in set(self.written) - self.commit_tried:
            try:
                fs.delete_dir(f"{base}/{table}/{self.tag}")
            except (FileNotFoundError, OSError):
                pass


def _read(spark, src: ResolvedSource) -> tuple[DataFrame, dict[str, str], list[tuple[str, str]], ResolvedSource, int | None]:
    """The raw frame, its column mapping and neighbour pairs, the source as read (a long layout's
    becomes the wide one its pivot produces) and a long layout's raw rows grouped into reports."""
    raw = read_raw(spark, src)
    mapping, pairs = column_mapping(src, [c for c in raw.columns if c not in META_COLUMNS])
    raw = with_joined_timestamp(with_filled(raw, src), src)
    long_rows = None
    if src.kind == "mdt" and src.cfg.neighbour_layout == "long":
        raw, src, long_rows = long_layout.pivot(raw, src, mapping)
        mapping, pairs = column_mapping(src, [c for c in raw.columns if c not in META_COLUMNS])
    return raw, mapping, pairs, src, long_rows


def _clean(df: DataFrame) -> DataFrame:
    return df.where(F.size("reasons") == 0)


def _input_stats(frames: list[tuple[str, DataFrame]]) -> tuple[dict[str, int], int, int]:
    """Rows in per source, swapped positions and the neighbour entries of clean reports, one job.

    Only reads the cached validated frames: neighbour rows in are the clean reports' list
    lengths, so the neighbour explosion is not run again for counting.
    """
    if not frames:
        return {}, 0, 0
    parts = [
        df.select(
            F.lit(source).alias("source"),
            (F.col("swapped") if "swapped" in df.columns else F.lit(False)).cast("long").alias("swapped"),
            (F.when(F.size("reasons") == 0, F.size("neighbours")) if "neighbours" in df.columns else F.lit(0))
            .cast("long").alias("n_neighbours"),
        )
        for source, df in frames
    ]
    union = parts[0]
    for p in parts[1:]:
        union = union.unionByName(p)
    rows = union.groupBy("source").agg(
        F.count(F.lit(1)).alias("n"), F.sum("swapped").alias("swapped"), F.sum("n_neighbours").alias("n_neighbours"),
    ).collect()
    rows_in = {source: 0 for source, _ in frames}
    for row in rows:
        rows_in[row["source"]] = row["n"]
    return rows_in, sum(r["swapped"] or 0 for r in rows), sum(r["n_neighbours"] or 0 for r in rows)


def _reason_counts(spark, w: _Writer) -> dict[str, int]:
    """Rejected rows per reason code, from the staged rejects files (few rows, few distinct lists)."""
    if "rejects" not in w.written or w.rows("rejects") == 0:  # clean input: Spark wrote no Parquet file to read
        return {}
    rows = spark.read.parquet(spark_uri(w.lake.uri("rejects") + "/" + w.tag)).groupBy("reason_code").count().collect()
    by_reason: dict[str, int] = {}
    for row in rows:
        for code in filter(None, row["reason_code"].split(";")):
            by_reason[code] = by_reason.get(code, 0) + row["count"]
    return by_reason


def _filter_text(f) -> str:
    """A row filter as its YAML reads: {column: Type, in: [Serving]}."""
    if f is None:
        return "unset"
    parts = [f"column: {f.column}"]
    for name, value in (("in", f.in_), ("not_in", f.not_in), ("min", f.min), ("max", f.max)):
        if value is not None:
            parts.append(f"{name}: [{', '.join(value)}]" if isinstance(value, tuple) else f"{name}: {value:g}")
    return "{" + ", ".join(parts) + "}"


def _nothing_clean(spark, w: _Writer, source: str, n_in: int, src_cfg) -> str:
    """The error of a source none of whose rows is clean: its commonest reasons and a row of the commonest."""
    rej = spark.read.parquet(spark_uri(w.lake.uri("rejects") + "/" + w.tag)).where(F.col("source") == source)
    counts: dict[str, int] = {}
    for row in rej.groupBy("reason_code").count().collect():
        for code in filter(None, row["reason_code"].split(";")):
            counts[code] = counts.get(code, 0) + row["count"]
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{c} {n:,}" for c, n in ranked[:3])
    first = rej.where(F.col("reason_code").contains(ranked[0][0])).select("raw_row").first() if ranked else None
    key = f"sources.{source}"
    hints = {  # what to check for the commonest reason
        "bad_timestamp": f"{key}.timestamp_format is {src_cfg.timestamp_format!r}" + (
            f" (read on the {', '.join(src_cfg.timestamp_columns)} texts joined by a space)" if src_cfg.timestamp_columns else ""),
        "out_of_period": "check ingest.period_start / period_end",
        "unknown_cell": f"its cell ids match no cell_id of the cells table (check {key}.columns and sources.cells.columns)",
        "missing_position": f"check the position columns of {key}.columns",
        "bad_number": (f"check {key}.columns, decimal and options.sep"
                       + (f" ({key}.units is {dict(src_cfg.units)}: are the values in those units?)" if src_cfg.units else "")),
        "rsrp_out_of_range": f"RSRP outside ingest.rsrp_range_dbm (report indices, not dBm? set {key}.units.rsrp_dbm: lte_index)",
        "unresolved_pci": (f"no cell of the cells table has the logged PCIs near the reports (check {key}.columns, "
                           "sources.cells.columns.pci and ingest.pci_max_distance_m)"),
        "outside_area": f"positions fall outside the cells' area (check {key}.columns, crs and ingest.area_margin_m)",
        "excluded_by_filter": f"check {key}.filters",
        "malformed_row": f"check {key}.options.sep",
        "no_serving_row": f"{key}.serving_rows ({_filter_text(src_cfg.serving_rows)}) picks no row of these reports",
        "several_serving_rows": (f"{key}.report_columns (or the UE and timestamp columns) group several reports "
                                 f"together, or {key}.serving_rows picks neighbour rows too"),
    }
    hint = hints.get(ranked[0][0] if ranked else "", f"check {key}.columns and filters")
    example = f"; a row rejected as {ranked[0][0]}: {first['raw_row'][:200]}" if first is not None and first["raw_row"] else ""
    return (f"ingest: none of the {n_in:,} {source} rows is clean ({top}): {hint}{example}. "
            "Nothing was committed")


# 5G NR's SS-RSRP reporting range (TS 38.133 Table 10.1.6.1-1); ingest's default is LTE's (-140 to -44 dBm).
NR_RSRP_RANGE_DBM = (-156.0, -31.0)


def _nr_rsrp_rejects(spark, w: _Writer, rsrp_column: str, range_dbm: tuple[float, float]) -> int:
    """MDT reports rejected as rsrp_out_of_range whose logged serving RSRP lies in NR's reporting range: 5G NR data
    read with LTE's range loses its cell-edge reports (rejected whole), which the counts alone do not say."""
    rej = spark.read.parquet(spark_uri(w.lake.uri("rejects") + "/" + w.tag)).where(
        (F.col("source") == "mdt") & F.col("reason_code").contains("rsrp_out_of_range"))
    # try_cast: a rejected value may be any text ('abc' is why some rows are rejected); under ANSI a cast fails the job
    value = F.from_json("raw_row", "map<string,string>")[rsrp_column].try_cast("double")
    lo, hi = NR_RSRP_RANGE_DBM
    return rej.where(value.between(lo, hi) & ~value.between(*range_dbm)).count()


_RECORD = "_ingest/files.json"


def _load_record(lake) -> dict | None:
    """The files and table versions of the last successful ingest, or None (absent or
    unreadable: the next run rewrites everything)."""
    record = lake.read_json(_RECORD)
    return record if isinstance(record, dict) else None


def _write_record(lake, record: dict) -> None:
    lake.write_json(_RECORD, record)


def _append_plan(
    config_hash: str, versions: dict[str, int | None], sources: dict[str, ResolvedSource],
    files_now: dict[str, list[str]], record: dict | None,
) -> tuple[dict[str, list[str]] | None, str]:
    """({kind: new file paths}, "") when the run may append, else (None, why it rewrites all).

    Without a cells source an append keeps the estimated cells' positions and the local frame of the
    ingest that estimated them (the record's `estimated_frame`); only cells first seen in the new files are added."""
    if record is None:
        return None, "no record of ingested files"
    if record.get("config") != config_hash:
        return None, "ingest or source config changed"
    if record.get("versions") != versions:
        return None, "tables changed since the recorded ingest"
    if "cells" not in sources and "mdt" in sources and not record.get("estimated_frame"):
        return None, "no cells table and no recorded frame of the estimated cells"
    if any(s.cfg.format == "delta" for s in sources.values()):
        return None, "Delta sources are read whole"
    if set(record.get("files", {})) != set(files_now):
        return None, "the set of sources changed"
    if "cells" in files_now and record["files"]["cells"] != files_now["cells"]:
        return None, "cells file changed"
    new: dict[str, list[str]] = {}
    for kind in ("traffic", "mdt"):
        if kind not in files_now:
            continue
        old, now = set(record["files"][kind]), set(files_now[kind])
        if not old <= now:
            return None, f"{kind}: {len(old - now)} ingested file(s) changed or removed"
        if now - old:
            # fingerprint entries are "path:size:mtime_ns"
            new[kind] = sorted(e.rsplit(":", 2)[0] for e in now - old)
    if not new:
        return None, "no new files since the last ingest"
    return new, ""


def _lake_frame(spark, lake, table: str, columns: list[str]) -> DataFrame | None:
    """Columns of a lake table's current files (None when it has none)."""
    if not lake.exists(table):
        return None
    uris = lake.file_uris(table)
    return spark.read.parquet(*[spark_uri(u) for u in uris]).select(*columns) if uris else None


def run(cfg: PipelineConfig, rt, *, run_id: str) -> StageResult:
    """Validate, clean, window, partition and commit every configured raw source."""
    ic = cfg.ingest
    sources = {k: s for k in ("cells", "traffic", "mdt") if (s := resolve_source(cfg, k)) is not None}  # type: ignore[arg-type]
    if not sources.keys() & {"mdt", "traffic"}:
        if cfg.scenario.enabled:  # the scenario is the input, but nothing was simulated yet
            raise ConfigError(f"sources: no simulated MDT or traffic under {sim_dir(cfg)}: run `cellsynth simulate` first "
                              "(or `cellsynth run`), or set sources.mdt.path / sources.traffic.path")
        raise ConfigError("sources: no MDT or traffic input found (set sources.mdt.path / sources.traffic.path, or enable the scenario)")
    app_ids = {t: f"{run_id}:ingest:{t}" for t in OUTPUTS}
    if all(rt.lake.committed_app_ids(t, app_ids[t]) for t in OUTPUTS if rt.lake.exists(t)) and any(
        rt.lake.committed_app_ids(t, app_ids[t]) for t in OUTPUTS
    ):
        return StageResult(stage=NAME, run_id=run_id, skipped=True, note=f"run {run_id} already committed")

    files_now = {k: fingerprint_files(list(s.files)) for k, s in sources.items()}
    config_hash = cfg.section_hash("ingest", "sources")
    record = _load_record(rt.lake)
    new_files, why_full = _append_plan(config_hash, {t: rt.lake.version(t) for t in OUTPUTS}, sources, files_now, record)
    appending = new_files is not None
    if appending:
        sources = {k: s if k == "cells" else replace(s, files=tuple(new_files[k]))
                   for k, s in sources.items() if k == "cells" or k in new_files}

    spark = rt.spark
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    w = _Writer(rt, run_id, ic.max_records_per_file)
    rules = tf.Rules(
        rsrp_range_dbm=ic.rsrp_range_dbm, rsrq_range_db=ic.rsrq_range_db, period_start=ic.period_start,
        period_end=ic.period_end, repair_swapped_latlon=ic.repair_swapped_latlon,
        near_duplicate_m=ic.near_duplicate_m, near_duplicate_s=ic.near_duplicate_s, n_cell_shards=ic.n_cell_shards,
        plausible_end=(datetime.now(timezone.utc) + timedelta(days=1)).replace(microsecond=0).isoformat(),
    )
    rows_in: dict[str, int] = {}
    stats: list[tuple[str, DataFrame]] = []
    rejects: list[DataFrame] = []
    metrics: dict[str, float] = {}
    nr_check: str | None = None
    frame: LocalFrame | None = None
    estimated_ids = None  # appending without a cells source: the ids of the cells already estimated
    if appending and "cells" not in sources and "mdt" in sources:
        # keep the frame (every x_m, y_m in the lake is in it) and the cells' estimated positions
        lat0, lon0 = record["estimated_frame"]
        frame = LocalFrame(float(lat0), float(lon0))
        estimated_ids = _lake_frame(spark, rt.lake, "cells", ["cell_id"])
    known = None
    cells_mapping: dict[str, str] = {}
    bbox_m = ic.area_bbox_m
    try:
        # ---------------------------------------------------------------- cells
        if "cells" in sources:
            src = sources["cells"]
            raw, mapping, *_ = _read(spark, src)
            v = w.stage("cells", tf.clean_cells(raw, mapping, n_cell_shards=ic.n_cell_shards, units=src.cfg.units,
                                                 crs=src.cfg.crs if src.projected else None, filters=src.cfg.filters), spark)
            if not appending:  # an append keeps the (unchanged) cells table and its rejects
                stats.append(("cells", v))
            clean = _clean(v)
            # The site table is small (10^5 rows at operator scale): frame and area on the driver,
            # one job instead of a median aggregation plus a read-back of the written cells.
            site_ll = clean.select("lat", "lon").toPandas()
            if site_ll.empty:
                raise StageError("ingest: the cells table has no valid row")
            frame = LocalFrame.around(site_ll["lat"].to_numpy(float), site_ll["lon"].to_numpy(float))
            site_box = tf.pad_box((float(site_ll["lat"].min()), float(site_ll["lat"].max()),
                                   float(site_ll["lon"].min()), float(site_ll["lon"].max())))
            cells = clean.withColumn("_xy", tf.project_col(F.col("lat"), F.col("lon"), frame, site_box)).select(
                "*", F.col("_xy.x_m").alias("x_m"), F.col("_xy.y_m").alias("y_m"),
                F.lit(False).alias("location_estimated"), F.lit(frame.lat0).alias("frame_lat0"),
                F.lit(frame.lon0).alias("frame_lon0"),
            ).drop("_xy")
            if not appending:  # PCI and carrier serve the neighbour resolution below only
                w.write_table("cells", cells.drop("pci", "earfcn"))
            if bbox_m is None:
                x_m, y_m = frame.to_xy(site_ll["lat"].to_numpy(float), site_ll["lon"].to_numpy(float))
                m = ic.area_margin_m
                bbox_m = (float(x_m.min()) - m, float(y_m.min()) - m, float(x_m.max()) + m, float(y_m.max()) + m)
            known = clean.select("cell_id")
            if not appending:
                rejects.append(tf.rejects_of(v, "cells", run_id))
            cells_mapping = mapping

        # -------------------------------------------------------------- traffic
        lookup, broadcast_lookup = None, False
        # An append also joins the loads of counters already ingested (a report of the new day's
        # first hour may take the previous day's last counter).
        old_traffic = _lake_frame(spark, rt.lake, "traffic", ["cell_id", "ts", "load_rho"]) if appending else None
        counters = old_traffic
        if "traffic" in sources:
            src = sources["traffic"]
            raw, mapping, *_ = _read(spark, src)
            v = w.stage("traffic", tf.clean_traffic(
                raw, mapping, windows=ic.windows, rules=rules, timestamp_format=src.cfg.timestamp_format,
                timezone=src.cfg.timezone, units=src.cfg.units, known_cells=known,
                seen_keys=old_traffic.select("cell_id", "ts") if old_traffic is not None else None,
                filters=src.cfg.filters), spark)
            stats.append(("traffic", v))
            w.write_table("traffic", _clean(v))
            new_counters = _clean(v).select("cell_id", "ts", "load_rho")
            counters = new_counters if old_traffic is None else old_traffic.unionByName(new_counters)
            rejects.append(tf.rejects_of(v, "traffic", run_id))
        if counters is not None:
            lookup = w.stage("load_lookup", tf.load_lookup(counters, tolerance_h=ic.load_join_tolerance_h), spark)
            # Counting materialises the cached lookup (its readers need it anyway).
            broadcast_lookup = lookup.count() <= ic.load_broadcast_max_rows

        # ------------------------------------------------------------------ mdt
        if "mdt" in sources:
            src = sources["mdt"]
            raw, mapping, pairs, src, long_rows = _read(spark, src)
            # the serving RSRP's raw column, for the NR-range hint after the counts (dBm sources only)
            nr_check = None if src.cfg.units.get("rsrp_dbm") else mapping.get("rsrp_dbm")
            if long_rows is not None:
                metrics["mdt_long_rows"] = float(long_rows)
            pci_cells = None
            for key, used in (("serving_id", True), ("neighbour_id", bool(pairs))):
                if getattr(src.cfg, key) == "pci" and used and ("cells" not in sources or "pci" not in cells_mapping):
                    raise ConfigError(f"sources.mdt.{key}: 'pci' needs a cells table with each cell's PCI "
                                      "(sources.cells.path, and sources.cells.columns.pci naming its column)")
            if src.cfg.serving_id == "pci" or (src.cfg.neighbour_id == "pci" and pairs):
                pci_cells = tf.pci_candidates(cells)
            earfcn_cols = neighbour_earfcn_columns(src, pairs, [c for c in raw.columns if c not in META_COLUMNS])
            parsed = tf.parse_mdt(raw, mapping, pairs, timestamp_format=src.cfg.timestamp_format,
                                  timezone=src.cfg.timezone, crs=src.cfg.crs if src.projected else None,
                                  filters=src.cfg.filters, earfcn_cols=earfcn_cols, units=src.cfg.units,
                                  serving_by_pci=src.cfg.serving_id == "pci")
            if frame is None:  # no cells table: the frame is centred on the reports
                ok = parsed.where((F.abs("lat") <= 90) & (F.abs("lon") <= 180))
                if src.cfg.filters:
                    ok = ok.where(~F.col("_excluded"))
                med = ok.agg(F.median("lat").alias("lat"), F.median("lon").alias("lon")).first()
                if med is None or med["lat"] is None:
                    raise StageError("ingest: no MDT report has a valid position")
                frame = LocalFrame(round(float(med["lat"]), 4), round(float(med["lon"]), 4))
            rules = tf.Rules(**{**rules.__dict__, "area": tf.area_box_latlon(frame, bbox_m) if bbox_m else None})
            seen_ids = _lake_frame(spark, rt.lake, "mdt_reports", ["report_id"]) if appending else None
            validated = tf.validate_mdt(parsed, frame=frame, windows=ic.windows, rules=rules, known_cells=known,
                                        seen_ids=seen_ids, pci_max_distance_m=ic.pci_max_distance_m, pci_rule=ic.pci_rule,
                                        pci_cells=pci_cells if src.cfg.serving_id == "pci" else None)
            # Cached are only the columns a later job reads (the raw timestamp and RSRQ text served
            # validation; positions only estimate cells when there is no cells table).
            unused = ["_ts_raw", "_rsrq_raw", *(["lat", "lon"] if "cells" in sources else [])]
            v = w.stage("mdt", validated.drop(*unused), spark)
            stats.append(("mdt", v))
            clean = _clean(v)
            reports = tf.with_load(clean, lookup, cell_col="serving_cell_id", broadcast=broadcast_lookup).withColumn(
                "ingest_run_id", F.lit(run_id))
            w.write_table("mdt_reports", reports)
            # One pass over the cached reports gives every measurement row: the serving entry as
            # rank 0, then the neighbour entries (not persisted: exploding again is cheaper than
            # caching 4x the rows).
            meas = tf.explode_neighbours(clean, rules=rules, known_cells=known, serving=True,
                                         pci_cells=pci_cells if src.cfg.neighbour_id == "pci" and pairs else None,
                                         pci_max_distance_m=ic.pci_max_distance_m, pci_rule=ic.pci_rule,
                                         rsrp_unit=src.cfg.units.get("rsrp_dbm"))
            meas_clean = tf.with_load(_clean(meas), lookup, cell_col="cell_id", broadcast=broadcast_lookup).select(
                "report_id", "ts", "window", "cell_id", "rank",
                "rsrp_dbm", F.when(F.col("rank") == 0, F.col("rsrq_db")).alias("rsrq_db"), "x_m", "y_m", "load_rho",
                tf.shard_col(F.col("cell_id"), ic.n_cell_shards).alias("cell_shard"),
            )
            # The role text is added after the sort (43M rows at 10M reports: 16 bytes less each).
            w.write_table("mdt_measurements", meas_clean, after_sort={
                "role": F.when(F.col("rank") == 0, F.lit("serving")).otherwise(F.lit("neighbour"))})
            rejects.append(tf.rejects_of(v, "mdt", run_id))
            rejects.append(tf.rejects_of(meas, "neighbour", run_id))
            if "cells" not in sources:
                if estimated_ids is None:
                    w.write_table("cells", _estimated_cells(clean, frame, ic.n_cell_shards))
                else:  # an append: only the cells first seen now (an empty write would still move the version)
                    new_cells = clean.join(estimated_ids.withColumnRenamed("cell_id", "serving_cell_id"),
                                           "serving_cell_id", "left_anti")
                    if new_cells.limit(1).count():
                        w.write_table("cells", _estimated_cells(new_cells, frame, ic.n_cell_shards))

        all_rejects = rejects[0]
        for r in rejects[1:]:
            all_rejects = all_rejects.unionByName(r)
        w.write_table("rejects", all_rejects, few_rows=True)

        # -------------------------------------------------------- reconciliation
        # One aggregation over the cached validated frames gives rows in and the swapped count;
        # the reasons come from the (small) staged rejects, counted independently of rows in.
        rows_in, n_swapped, n_neighbours = _input_stats(stats)
        if "mdt" in sources:
            rows_in["neighbour"] = n_neighbours
        by_reason = _reason_counts(spark, w)
        if "mdt" in sources:
            metrics["swapped_latlon"] = float(n_swapped)
        rows_written = {t: w.rows(t) for t in w.written}
        rejected = {s: w.rows("rejects", f"source={s}") for s in rows_in}
        clean_n = {
            "cells": rows_written.get("cells", 0) if "cells" in sources and not appending else None,
            "traffic": rows_written.get("traffic"),
            "mdt": rows_written.get("mdt_reports"),
            "neighbour": (rows_written.get("mdt_measurements", 0) - rows_written.get("mdt_reports", 0)),
        }
        problems = [
            f"{s}: rows in {n} != clean {clean_n[s]} + rejected {rejected[s]}"
            for s, n in rows_in.items() if clean_n[s] is not None and n != clean_n[s] + rejected[s]
        ]
        if problems:
            raise StageError("ingest: reconciliation failed: " + "; ".join(problems))
        for s in ("mdt", "traffic"):
            if rows_in.get(s, 0) > 0 and not clean_n[s]:
                # nothing usable: a mapping or format mistake, not bad rows; stop before any commit, saying why
                raise StageError(_nothing_clean(spark, w, s, rows_in[s], sources[s].cfg))
        if rows_written.get("mdt_reports"):
            metrics["no_load_match"] = float(w.nulls("mdt_reports", "load_rho"))
        for code, n in sorted(by_reason.items()):
            metrics[f"rejects.{code}"] = float(n)
        if by_reason.get("rsrp_out_of_range") and "mdt" in sources and nr_check:
            n_nr = _nr_rsrp_rejects(spark, w, nr_check, ic.rsrp_range_dbm)
            if n_nr:
                rt.warn(f"ingest: {n_nr:,} MDT reports were rejected as rsrp_out_of_range with an RSRP inside 5G NR's "
                        f"reporting range ({NR_RSRP_RANGE_DBM[0]:g} to {NR_RSRP_RANGE_DBM[1]:g} dBm, TS 38.133); for NR "
                        f"data set ingest.rsrp_range_dbm: [{NR_RSRP_RANGE_DBM[0]:g}, {NR_RSRP_RANGE_DBM[1]:g}]")

        # The frame the estimated cells' positions are in: this run's, or (an append of traffic alone) the last one's.
        estimated_frame = None
        if "cells" not in sources:
            estimated_frame = ([frame.lat0, frame.lon0] if "mdt" in sources and frame is not None
                               else (record or {}).get("estimated_frame"))

        # ------------------------------------------------------------- commits
        # Every table is staged: commit them back to back (recover() undoes a partial set).
        versions = {}
        for table in w.written:
            w.commit_tried.add(table)
            versions[table] = rt.lake.commit_spark_dir(
                table, w.tag, mode="append" if appending else "overwrite", app_id=app_ids[table])
        # Written after every commit: a crash before this leaves the old record, whose versions
        # no longer match the tables, so the next run rewrites everything.
        _write_record(rt.lake, {"run_id": run_id, "config": config_hash, "files": files_now,
                                "versions": {t: rt.lake.version(t) for t in OUTPUTS},
                                **({"estimated_frame": estimated_frame} if estimated_frame else {})})
    finally:
        w.cleanup()
    note = json.dumps({
        "frame": [frame.lat0, frame.lon0] if frame else None, "rejected": rejected,
        "mode": "append" if appending else "full rewrite",
        **({"new_files": {k: len(v) for k, v in new_files.items()}} if appending else {"why": why_full}),
    }, sort_keys=True)
    return StageResult(
        stage=NAME, run_id=run_id, rows_in=rows_in, rows_written=rows_written,
        rows_rejected=sum(rejected.values()), table_versions=versions, note=note, metrics=metrics,
    )


def _estimated_cells(clean_reports: DataFrame, frame: LocalFrame, n_shards: int) -> DataFrame:
    """Cells located at the robust centroid (median) of their own serving reports."""
    return clean_reports.groupBy(F.col("serving_cell_id").alias("cell_id")).agg(
        F.median("lat").alias("lat"), F.median("lon").alias("lon"),
        F.median("x_m").alias("x_m"), F.median("y_m").alias("y_m"),
    ).select(
        "cell_id", F.lit(None).cast("string").alias("site_id"), "x_m", "y_m", "lat", "lon",
        F.lit(True).alias("location_estimated"), tf.shard_col(F.col("cell_id"), n_shards).alias("cell_shard"),
        F.lit(frame.lat0).alias("frame_lat0"), F.lit(frame.lon0).alias("frame_lon0"),
    )
