"""Real-data adapters: where a raw source lives and how its columns map onto canonical ones.

A source is read with every column as a string (so nothing is lost before validation), the
configured missing-value markers become nulls, and the mapped raw columns are renamed to the
canonical names the transforms expect. Mapping problems raise one `ConfigError` listing them.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cellsynth.config import CANONICAL, PROJECTED, REQUIRED, PipelineConfig, SourceConfig
from cellsynth.errors import ConfigError

SourceKind = Literal["mdt", "traffic", "cells", "radio"]

FILE_COLUMN = "__file__"  # map a canonical column to this to take the input file's name (e.g. ue_id)
# The raw text of a CSV line whose field count differs from the header (null for good lines).
MALFORMED_COLUMN = "__malformed_line__"
# The timestamp text joined from `timestamp_columns` (a Date and a Time column): added by with_joined_timestamp.
TIMESTAMP_COLUMN = "__timestamp__"
# A long layout's report that has no serving row, or several (long_layout.pivot): the reject reason.
REPORT_PROBLEM_COLUMN = "__report_problem__"
# A row's place in its file, for `fill_forward` (read_raw adds them then, with_filled drops them): the
# file split's start offset, and an id increasing along the rows of a split.
BLOCK_COLUMN, SEQ_COLUMN = "__block__", "__seq__"
# Added by the readers, not columns of the source.
META_COLUMNS = (FILE_COLUMN, MALFORMED_COLUMN, TIMESTAMP_COLUMN, REPORT_PROBLEM_COLUMN, BLOCK_COLUMN, SEQ_COLUMN)

# Multipliers from a raw unit to the canonical one.
UNITS: dict[str, dict[str, float]] = {
    "traffic_mb": {"mb": 1.0, "kb": 1e-3, "gb": 1e3, "bytes": 1e-6, "mbit": 0.125, "gbit": 125.0},
    "prb_util_pct": {"pct": 1.0, "fraction": 100.0},
    "rsrp_dbm": {"dbm": 1.0},
    "rsrq_db": {"db": 1.0},
    "height_m": {"m": 1.0, "ft": 0.3048},
    "freq_mhz": {"mhz": 1.0, "ghz": 1e3, "hz": 1e-6},
}
# Measurement reports as the UE sends them: a whole-number index k (RRC's reported value) instead of
# dBm / dB, read as the centre of its bin, base + step * k (k from 0 to k_max). The end bins are open
# (LTE RSRP_00 "below -140 dBm", RSRP_97 "-44 dBm or more") and read as their finite edge, the end of
# the reporting range (-140 / -44 dBm): what a logger writing dBm shows for a saturated value, and
# inside the valid range. 3GPP TS 36.133 Tables 9.1.4-1 / 9.1.7-1 (LTE), TS 38.133 Tables 10.1.6.1-1 /
# 10.1.11.1-1 (NR, L3).
REPORT_INDEX: dict[str, dict[str, tuple[float, float, int]]] = {  # canon -> unit -> (base, step, k_max)
    "rsrp_dbm": {"lte_index": (-140.5, 1.0, 97), "nr_index": (-156.5, 1.0, 126)},
    "rsrq_db": {"lte_index": (-19.75, 0.5, 34), "nr_index": (-43.25, 0.5, 127)},
}


def known_units(canon: str) -> list[str]:
    """The unit names `sources.<kind>.units.<canon>` accepts."""
    return [*UNITS.get(canon, {}), *REPORT_INDEX.get(canon, {})]


@dataclass(frozen=True)
class ResolvedSource:
    """A source whose files exist: what to read and how its columns map."""

    kind: SourceKind
    files: tuple[str, ...]
    cfg: SourceConfig

    @property
    def projected(self) -> bool:
        return self.cfg.projected


def sim_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.scenario.output_dir or Path(cfg.run.data_dir) / "sim")


def _unpack(archive: Path, member_glob: str | None, data_dir: Path) -> list[str]:
    """Unpack the matching members of a zip once (keyed by archive size+mtime) and list them."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}:{member_glob}".encode()).hexdigest()[:12]
    out = data_dir / "_unpacked" / f"{archive.stem}-{key}"
    with zipfile.ZipFile(archive) as zf:
        members = [
            m for m in zf.namelist()
            if not m.endswith("/") and "__MACOSX" not in m and not Path(m).name.startswith(".")
            and (member_glob is None or fnmatch.fnmatch(m, member_glob))
        ]
        if not (out / ".done").exists():
            out.mkdir(parents=True, exist_ok=True)
            for m in members:
                zf.extract(m, out)
            (out / ".done").write_text("\n".join(members))
    return sorted(str(out / m) for m in members)


EXCEL_SUFFIXES = (".xlsx", ".xlsm")


def _excel_to_parquet(workbook: Path, sheet: str | None, data_dir: Path, kind: str) -> str:
    """One sheet of a workbook as a Parquet file, converted once (keyed by the file's size and mtime
    and the sheet). The file keeps the workbook's name, so `__file__` mappings read it unchanged.

    Cell types are kept: numbers stay numbers, date-times are naive timestamps (a workbook's wall
    clock, which the source's `timezone` places), a column mixing types (numbers and text) is text.

    Raises:
        ConfigError: the workbook cannot be read or has no such sheet.
    """
    import pandas as pd

    st = workbook.stat()
    key = hashlib.sha256(f"{workbook.resolve()}:{st.st_size}:{st.st_mtime_ns}:{sheet}".encode()).hexdigest()[:12]
    out = data_dir / "_converted" / f"{workbook.stem}-{key}" / workbook.name
    if out.is_file():
        return str(out)
    try:
        frame = pd.read_excel(workbook, sheet_name=sheet if sheet is not None else 0, dtype=None,
                              keep_default_na=False, na_values=[""], engine="openpyxl")
    except ValueError as err:  # an unknown sheet name, a file that is no workbook
        raise ConfigError(f"sources.{kind}.options.sheet_name: {workbook.name}: {err}") from None
    except Exception as err:  # noqa: BLE001 (openpyxl raises its own types for damaged files)
        raise ConfigError(f"sources.{kind}.path: {workbook.name} is not a readable .xlsx workbook ({err})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for col in frame.columns:
        values = frame[col]
        if values.dtype.kind == "M":
            frame[col] = values.astype("datetime64[us]")
        elif values.dtype == object:  # text, or a mix (numbers and text, times of day): the text of each value
            frame[col] = values.map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v).strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(out)  # never half-written
    return str(out)


def resolve_source(cfg: PipelineConfig, kind: SourceKind) -> ResolvedSource | None:
    """The files of one source, or None when it is not configured.

    With `sources.<kind>.path` unset and the simulator enabled, the simulator's output folder
    is used with its own column names.

    Raises:
        ConfigError: a configured path matches no file.
    """
    src: SourceConfig = getattr(cfg.sources, kind)
    if src.path is None:
        if not cfg.scenario.enabled:
            return None
        sim = sim_dir(cfg)
        for name, fmt in ((f"{kind}.parquet", "parquet"), (f"{kind}.csv", "csv")):
            if (sim / name).is_file() and (kind == "mdt" or fmt == "csv"):
                return ResolvedSource(kind, (str(sim / name),), src.model_copy(update={"format": fmt}))
        return None
    path = Path(src.path)
    if path.suffix == ".zip" and path.is_file():
        files = _unpack(path, src.archive_glob, Path(cfg.run.data_dir))
    elif path.is_dir() and src.format != "delta":
        suffixes = ([*EXCEL_SUFFIXES] if src.format == "excel" else
                    [f".{src.format}", *([f".csv{c}" for c in CSV_COMPRESSED_SUFFIXES] if src.format == "csv" else [])])
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
    elif src.format == "delta":
        files = [str(path)] if path.exists() else []
    else:
        files = sorted(glob.glob(str(path)))
    if not files:
        raise ConfigError(f"sources.{kind}.path: no input files match {src.path!r}")
    if src.format == "excel":  # read as the Parquet files they convert to
        sheet = src.options.get("sheet_name")
        files = [_excel_to_parquet(Path(f), sheet, Path(cfg.run.data_dir), kind) for f in files]
        src = src.model_copy(update={"format": "parquet", "options": {k: v for k, v in src.options.items() if k != "sheet_name"}})
    return ResolvedSource(kind, tuple(files), src)


def fingerprint_files(files: list[str]) -> list[str]:
    """path:size:mtime of every file (folders are walked)."""
    out = []
    for f in files:
        p = Path(f)
        paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in paths:
            st = q.stat()
            out.append(f"{q.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return out


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A neighbour column pattern ("neighbour_{k}_cell_id") as a regex whose group 1 is k."""
    return re.compile("^" + re.escape(pattern).replace(r"\{k\}", r"(\d+)") + "$")


def _near_names(raw: str, raw_columns: list[str]) -> str:
    """What the input has instead of `raw`: Spark's names for a header that repeats it, the same name
    in another case or with other spaces, or close spellings; else its first columns."""
    import difflib

    repeated = [c for c in raw_columns if re.fullmatch(re.escape(raw) + r"\d+", c)]
    if len(repeated) > 1:
        return (f"the header names it {len(repeated)} times, read as {', '.join(repeated)}: map one of those, "
                "or rename the columns")
    def norm(name: str) -> str:
        return re.sub(r"[\s_]+", "", name).lower()
    same = [c for c in raw_columns if norm(c) == norm(raw)]
    close = same or difflib.get_close_matches(raw, raw_columns, n=3, cutoff=0.75)
    if close:
        return f"did you mean {' or '.join(map(repr, close))}?"
    return f"have: {', '.join(raw_columns[:12])}{', ...' if len(raw_columns) > 12 else ''}"


def column_mapping(src: ResolvedSource, raw_columns: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Canonical -> raw column for this source, and the wide neighbour (cell, rsrp) column pairs.

    Raises:
        ConfigError: unknown canonical names, mapped raw columns the file lacks, required
            canonical columns with no raw column, unknown units (one line each).
    """
    kind, cfg = src.kind, src.cfg
    prefix = f"sources.{kind}"
    known = dict(CANONICAL[kind])
    if src.projected:
        known.update({k: k for k in PROJECTED})
    problems = []
    unknown = sorted(set(cfg.columns) - set(known))
    if unknown:
        problems.append(f"{prefix}.columns: unknown canonical column(s) {', '.join(unknown)} (expected: {', '.join(known)})")
    have = set(raw_columns)
    mapping: dict[str, str] = {}
    for canon, default_raw in known.items():
        if canon in PROJECTED and canon not in cfg.columns:
            continue
        raw = cfg.columns.get(canon, default_raw)
        if raw == FILE_COLUMN or raw in have:
            mapping[canon] = raw
        elif canon in cfg.columns:
            problems.append(f"{prefix}.columns.{canon}: raw column {raw!r} not in the input ({_near_names(raw, raw_columns)})")
    required = list(REQUIRED[kind])
    if src.projected:
        required = [c for c in required if c not in ("latitude", "longitude")] + list(PROJECTED)
    if timestamp_parts(cfg):
        absent = [c for c in timestamp_parts(cfg) if c not in have]
        for c in absent:
            key = "timestamp_columns" if cfg.timestamp_columns else "columns.timestamp"
            problems.append(f"{prefix}.{key}: raw column {c!r} not in the input ({_near_names(c, raw_columns)})")
        if not absent:
            mapping["timestamp"] = TIMESTAMP_COLUMN
    absent = [c for c in cfg.fill_forward if c not in have]
    if absent:
        problems.append(f"{prefix}.fill_forward: raw column(s) {', '.join(map(repr, absent))} not in the input "
                        f"({_near_names(absent[0], raw_columns)})")
    missing = [c for c in required if c not in mapping]
    if missing:
        problems.append(
            f"{prefix}.columns: no raw column for required {', '.join(missing)} "
            f"(map them under {prefix}.columns; have: {', '.join(raw_columns[:12])})"
        )
    for canon, unit in cfg.units.items():
        if unit.lower() not in known_units(canon):
            allowed = ", ".join(f"{c}: {'|'.join(known_units(c))}" for c in UNITS)
            problems.append(f"{prefix}.units.{canon}: unknown unit {unit!r} (supported: {allowed})")
    pairs: list[tuple[str, str]] = []
    if kind == "mdt" and cfg.neighbour_layout == "wide":
        for pat_name in ("neighbour_cell_pattern", "neighbour_rsrp_pattern"):
            if "{k}" not in getattr(cfg, pat_name):
                problems.append(f"{prefix}.{pat_name}: expected a pattern containing '{{k}}', got {getattr(cfg, pat_name)!r}")
        if not problems:
            regex = pattern_regex(cfg.neighbour_cell_pattern)
            ks = sorted(int(m.group(1)) for c in raw_columns if (m := regex.match(c)))
            for k in ks:
                rsrp_col = cfg.neighbour_rsrp_pattern.format(k=k)
                if rsrp_col not in have:
                    problems.append(f"{prefix}: neighbour column {rsrp_col!r} missing for {cfg.neighbour_cell_pattern.format(k=k)!r}")
                else:
                    pairs.append((cfg.neighbour_cell_pattern.format(k=k), rsrp_col))
    problems += [f"{prefix}.filters.column: raw column {f.column!r} not in the input" for f in cfg.filters if f.column not in have]
    if problems:
        raise ConfigError(problems[:10])
    return mapping, pairs


def neighbour_earfcn_columns(src: ResolvedSource, pairs: list[tuple[str, str]], raw_columns: list[str]) -> list[str]:
    """The carrier column of each neighbour pair (`neighbour_earfcn_pattern` with the pair's k), in
    pair order; none without the pattern.

    Raises:
        ConfigError: the pattern is set but a pair's carrier column is not in the input.
    """
    pattern = src.cfg.neighbour_earfcn_pattern
    if src.kind != "mdt" or pattern is None or not pairs:
        return []
    regex = pattern_regex(src.cfg.neighbour_cell_pattern)
    cols = [pattern.format(k=int(regex.match(cell).group(1))) for cell, _ in pairs]  # type: ignore[union-attr]
    missing = [c for c in cols if c not in set(raw_columns)]
    if missing:
        raise ConfigError(f"sources.mdt.neighbour_earfcn_pattern: column(s) {', '.join(map(repr, missing[:4]))} "
                          f"not in the input (have: {', '.join(raw_columns[:12])})")
    return cols


def timestamp_parts(cfg: SourceConfig) -> tuple[str, ...]:
    """The raw columns whose texts make the timestamp when it is joined (TIMESTAMP_COLUMN): the
    `timestamp_columns`, or with a `timestamp_date` the mapped time column; () when not joined."""
    if cfg.timestamp_columns:
        return cfg.timestamp_columns
    if cfg.timestamp_date is not None:
        return (cfg.columns.get("timestamp", CANONICAL["mdt"]["timestamp"]),)
    return ()


def with_joined_timestamp(raw, src: ResolvedSource):  # -> pyspark DataFrame
    """Adds TIMESTAMP_COLUMN, the `timestamp_columns` texts joined by one space (null when one of them
    is: a date without its time is no timestamp), after the `timestamp_date` when set; the source
    unchanged when neither is set."""
    from pyspark.sql import functions as F

    wanted = timestamp_parts(src.cfg)
    cols = [c for c in wanted if c in raw.columns]
    if not wanted or len(cols) < len(wanted):
        return raw  # (a missing column is column_mapping's one-line error)
    parts = [F.trim(F.col(f"`{c}`").cast("string")) for c in cols]
    if src.cfg.timestamp_date is not None:
        parts = [F.lit(src.cfg.timestamp_date), *parts]
    complete = F.lit(True)
    for p in parts:
        complete = complete & p.isNotNull()
    return raw.withColumn(TIMESTAMP_COLUMN, F.when(complete, F.concat_ws(" ", *parts)))


def read_raw(spark, src: ResolvedSource):  # -> pyspark DataFrame
    """Read a source with every column as a string (doubles and integers of typed sources stay
    numbers) and missing markers as nulls.

    Typed numbers stay as they are because their text form adds nothing: the cast to text and
    the parse back cost two conversions per value (most of the 10M-report input). A number
    column is null where its text form would be a missing marker (by default NaN), as before.
    Adds FILE_COLUMN (the file's name) and MALFORMED_COLUMN (a CSV line's text when its field
    count differs from the header; its other columns are then null).
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    cfg = src.cfg
    files = list(src.files)
    ordered = bool(cfg.fill_forward)

    def placed(df):  # the split's start offset (only readable right above the file scan, not after a union)
        return df.select("*", F.col("_metadata.file_block_start").alias(BLOCK_COLUMN)) if ordered else df

    if cfg.format == "csv":
        opts = {"header": "true", "inferSchema": "false", "mode": "PERMISSIVE", **cfg.options}
        # Without a schema Spark pads short lines with nulls and drops extra fields silently. With
        # an all-string schema taken from the header plus a corrupt-record column, PERMISSIVE mode
        # keeps the text of every line whose field count differs (truncated, extra fields, wrong
        # delimiter). Column pruning would skip that check for columns nobody selects: off.
        # One schema per distinct header, the groups joined by column name: Spark applies a given
        # schema by position, so a file with the same columns in another order (another export
        # or logger version) had its values read under the wrong names, silently.
        parts = []
        for group in header_groups(files, cfg.separator, csv_encoding(cfg)):
            header = spark.read.options(**opts).csv(group).columns
            schema = T.StructType([T.StructField(c, T.StringType()) for c in header]
                                  + [T.StructField(MALFORMED_COLUMN, T.StringType())])
            parts.append(placed(spark.read.schema(schema).options(
                **opts, columnNameOfCorruptRecord=MALFORMED_COLUMN, columnPruning="false").csv(group)))
        df = union_by_name_widened(parts)  # every column text: nothing to widen
    elif cfg.format == "parquet":
        # mergeSchema: without it Spark takes one file's schema, and a column the other files add
        # (a later export's) vanished from every row
        groups = parquet_schema_groups(files, src.kind)
        # Nanosecond timestamps (what pandas writes by default) are an illegal Parquet type to Spark: read
        # as longs and turned into timestamp text here (`nanos_as_text`)
        nanos = parquet_nanos_columns(groups)
        if nanos:
            spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
        if len(groups) == 1:
            df = nanos_as_text(placed(spark.read.options(**{"mergeSchema": "true", **cfg.options}).parquet(*files)), nanos)
        else:  # files whose column types differ (float32 in one day's export): Spark's merge fails on them
            df = union_by_name_widened([nanos_as_text(placed(spark.read.options(**cfg.options).parquet(*g)), nanos)
                                        for g in groups])
    else:
        # An operator's existing Delta table, pinned to a version: the snapshot's files come from
        # the Delta log (delta-rs), Spark reads them as Parquet; basePath recovers partition columns.
        from cellsynth.lake.external import delta_snapshot

        snap = delta_snapshot(files[0], version=cfg.delta_version)
        # mergeSchema: files written before a column was added lack it (Delta schema evolution)
        df = placed(spark.read.options(**{"basePath": snap.uri, "mergeSchema": "true", **cfg.options}).parquet(*snap.files))
    markers = [m for m in cfg.missing_values if m != ""]
    line = F.col(MALFORMED_COLUMN) if MALFORMED_COLUMN in df.columns else F.lit(None).cast("string")
    comma = decimal_comma_columns(src, df.columns)
    cols = []
    for field in df.schema.fields:
        name = field.name
        if name == MALFORMED_COLUMN:
            continue
        if name == BLOCK_COLUMN:
            cols.append(F.col(name))
            continue
        if is_native_number(field.dataType):
            c = F.col(f"`{name}`")
            cond = numeric_marker(c, field.dataType, markers)
            cols.append((F.when(cond, F.lit(None).cast(field.dataType)).otherwise(c) if cond is not None else c).alias(name))
            continue
        if isinstance(field.dataType, T.TimestampType):  # an instant: its text names UTC, so no source zone shifts it
            c = F.date_format(F.col(f"`{name}`"), ISO_INSTANT)
        else:
            c = F.trim(F.col(f"`{name}`").cast("string"))
        if name in comma:
            c = F.regexp_replace(c, DECIMAL_COMMA, "$1.$2")
        cond = (c == "") | c.isin(markers) if markers else (c == "")
        # A malformed line's fields are misaligned: none of them is used (it is rejected whole).
        cond = cond | line.isNotNull()
        cols.append(F.when(cond, F.lit(None).cast("string")).otherwise(c).alias(name))
    cols.append(F.element_at(F.split(F.input_file_name(), "/"), -1).alias(FILE_COLUMN))
    cols.append(line.alias(MALFORMED_COLUMN))
    if ordered:  # (increasing along each partition, and a split's rows are one run of a partition)
        cols.append(F.monotonically_increasing_id().alias(SEQ_COLUMN))
    return df.select(*cols)


def with_filled(raw, src: ResolvedSource):  # -> pyspark DataFrame
    """The `fill_forward` columns' empty values replaced by the last value above them in the same file
    (one window per file, in file order); the place columns read_raw added are dropped."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if not src.cfg.fill_forward:
        return raw
    above = Window.partitionBy(FILE_COLUMN).orderBy(BLOCK_COLUMN, SEQ_COLUMN).rowsBetween(Window.unboundedPreceding, 0)
    fill = set(src.cfg.fill_forward)
    return raw.select(*[F.last(F.col(f"`{c}`"), ignorenulls=True).over(above).alias(c) if c in fill else F.col(f"`{c}`")
                        for c in raw.columns if c not in (BLOCK_COLUMN, SEQ_COLUMN)])


def is_native_number(dtype) -> bool:
    """Column types read_raw keeps as numbers. Not float: a float's text ("0.1") parses to
    another double than the float widened."""
    from pyspark.sql import types as T

    return isinstance(dtype, (T.DoubleType, T.LongType, T.IntegerType, T.ShortType, T.ByteType))


def numeric_marker(c, dtype, markers: list[str]):  # -> Column | None
    """Where a number column's text form (Spark's cast to string) is a missing marker, or None
    when no marker can be one. NaN and +-Infinity are tested as numbers; any other marker that
    reads as a number is compared in text form, exactly as a string column would be."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    conds = []
    textual = []
    for m in markers:
        if m == "NaN" and isinstance(dtype, T.DoubleType):
            conds.append(F.isnan(c))
        elif m in ("Infinity", "-Infinity") and isinstance(dtype, T.DoubleType):
            conds.append(c == F.lit(float(m)))
        elif m.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            continue  # Spark never writes these forms
        else:
            try:
                float(m)
            except ValueError:
                continue  # not a number's text: cannot match
            textual.append(m)
    if textual:
        conds.append(c.cast("string").isin(textual))
    if not conds:
        return None
    out = conds[0]
    for cond in conds[1:]:
        out = out | cond
    return out


def read_raw_pandas(src: ResolvedSource):  # -> pandas DataFrame of strings
    """`read_raw` without Spark, for small sources read on one machine (the radio benchmark):
    every column a trimmed string, missing markers as nulls, FILE_COLUMN the file's name."""
    import pandas as pd

    cfg = src.cfg
    if cfg.format != "csv":
        frames = [pd.read_parquet(f).astype("string") for f in src.files]
        n_malformed = 0
    else:
        sep, enc = cfg.separator, csv_encoding(cfg)
        try:
            codecs.lookup(enc)
        except LookupError:
            raise ConfigError(f"sources.{src.kind}.options.encoding: unknown character set {enc!r} (e.g. ISO-8859-1, "
                              "windows-1252, UTF-8)") from None
        frames, n_malformed = [], 0
        for f in src.files:
            bad = _malformed_lines(f, sep, enc)
            n_malformed += len(bad)
            # bytes the encoding cannot decode become U+FFFD, as in Spark's reader (a Latin-1 export read
            # as UTF-8 raised UnicodeDecodeError here)
            frames.append(pd.read_csv(f, dtype=str, keep_default_na=False, sep=sep, skiprows=bad or None,
                                      encoding=enc, encoding_errors="replace"))
    for f, frame in zip(src.files, frames):
        frame[FILE_COLUMN] = Path(f).name
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    # Like Spark's corrupt-record rejects: a line whose field count differs from the header's
    # is dropped, never padded with nulls, and counted so callers can reconcile.
    df.attrs["malformed_rows"] = n_malformed
    markers = set(cfg.missing_values) | {""}
    comma = decimal_comma_columns(src, list(df.columns))
    for name in df.columns:
        col = df[name].astype("string").str.strip()
        if name in comma:
            col = col.str.replace(DECIMAL_COMMA, r"\1.\2", regex=True)
        df[name] = col.mask(col.isin(markers))
    fill = [c for c in cfg.fill_forward if c in df.columns]  # (as with_filled: within each file, in file order)
    if fill:
        df[fill] = df.groupby(FILE_COLUMN, sort=False)[fill].ffill()
    return df


# Canonical columns that hold numbers: with `decimal: ","` their raw text 51,9 reads as 51.9.
NUMERIC_CANONICAL = ("latitude", "longitude", "easting", "northing", "rsrp_dbm", "rsrq_db", "traffic_mb",
                     "prb_util_pct", "azimuth_deg", "height_m", "tx_power_dbm", "freq_mhz")
DECIMAL_COMMA = r"^([+-]?[0-9]*),([0-9]+([eE][+-]?[0-9]+)?)$"  # one comma, digits around it: nothing else


def decimal_comma_columns(src: ResolvedSource, raw_columns: list[str]) -> set[str]:
    """The raw columns whose decimal comma becomes a point: the numeric canonical columns' raw names
    and the wide neighbour RSRP columns (none unless `decimal` is ",")."""
    cfg = src.cfg
    if cfg.decimal != ",":
        return set()
    known = CANONICAL[src.kind]
    names = {cfg.columns.get(c, known.get(c, c)) for c in NUMERIC_CANONICAL}
    if src.kind == "mdt" and "{k}" in cfg.neighbour_rsrp_pattern:
        regex = pattern_regex(cfg.neighbour_rsrp_pattern)
        names |= {c for c in raw_columns if regex.match(c)}
    return names & set(raw_columns)


def parquet_schema_groups(files: list[str], kind: str = "mdt") -> list[list[str]]:
    """Parquet files grouped by their schema (footers only), in order of first appearance; one group
    when a file is not here to read (not a local path): Spark then reads them as before.

    Raises:
        SchemaError: a local file is no readable Parquet (truncated, another format): Spark's read
            failed on it with a Py4J traceback; this names the file.
    """
    import pyarrow.parquet as pq

    from cellsynth.errors import SchemaError

    groups: dict[str, list[str]] = {}
    for f in files:
        if not Path(f).is_file():
            return [list(files)]
        try:
            key = str(pq.read_schema(f).remove_metadata())
        except (OSError, ValueError) as err:
            raise SchemaError(f"sources.{kind}.path: {f} is not a readable Parquet file ({err})") from err
        groups.setdefault(key, []).append(f)
    return list(groups.values())


# Text of a timestamp (the Spark session is UTC): an instant, ISO 8601 with "Z"; a wall-clock time, without
ISO_INSTANT = "yyyy-MM-dd'T'HH:mm:ss.SSSSSS'Z'"
ISO_LOCAL = "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"


def parquet_nanos_columns(groups: list[list[str]]) -> dict[str, bool]:
    """Columns stored as nanosecond timestamps in `parquet_schema_groups`' groups (one footer per group:
    its files share the schema): name -> whether the timestamp is an instant (adjusted to UTC) rather
    than a wall-clock time. A group whose files are not local is not looked at."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: dict[str, bool] = {}
    for group in groups:
        if not Path(group[0]).is_file():
            continue
        for field in pq.read_schema(group[0]):
            if pa.types.is_timestamp(field.type) and field.type.unit == "ns":
                out[field.name] = field.type.tz is not None
    return out


def nanos_as_text(df, nanos: dict[str, bool]):  # -> pyspark DataFrame
    """`parquet_nanos_columns`' columns (read as longs: nanoseconds since the epoch) as timestamp text:
    an instant with "Z", a wall-clock time without (the source's timezone then applies to it)."""
    from pyspark.sql import functions as F

    for name, instant in nanos.items():
        if name in df.columns:
            ts = F.timestamp_micros(F.expr(f"`{name}` div 1000"))  # integer division: a double loses the last digits
            df = df.withColumn(name, F.date_format(ts, ISO_INSTANT if instant else ISO_LOCAL))
    return df


def union_by_name_widened(parts: list):  # -> pyspark DataFrame
    """Spark frames joined by column name, a column of several types cast to one: double when every
    type is an integer or a double, text otherwise (a float32's text: 0.1 widened to double is
    0.10000000149, as `is_native_number` says; the checks parse text and reject what is no number)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    types: dict[str, set] = {}
    for part in parts:
        for field in part.schema.fields:
            types.setdefault(field.name, set()).add(field.dataType)
    target = {name: (T.DoubleType() if all(isinstance(t, T.NumericType) and not isinstance(t, T.FloatType) for t in ts)
                     else T.StringType())
              for name, ts in types.items() if len(ts) > 1}
    cast = [part.select(*[F.col(f"`{c}`").cast(target[c]).alias(c) if c in target else F.col(f"`{c}`") for c in part.columns])
            for part in parts]
    df = cast[0]
    for part in cast[1:]:
        df = df.unionByName(part, allowMissingColumns=True)
    return df


def csv_encoding(cfg) -> str:
    """The CSV reader's character set: Spark's `encoding` (or `charset`) option, UTF-8 by default."""
    return cfg.options.get("encoding", cfg.options.get("charset", "utf-8"))


def _python_encoding(encoding: str) -> str:
    # utf-8-sig: Spark drops a byte-order mark from the header too
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


# Compressed CSV the readers take as they are (Spark picks the codec by the same suffixes).
CSV_COMPRESSED_SUFFIXES = (".gz", ".bz2")


def _open_text(path, encoding: str = "utf-8"):
    """A CSV file opened as text for the csv module, gzip / bzip2 files decompressed."""
    import bz2
    import gzip

    name = str(path).lower()
    opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
    return opener(path, "rt", newline="", encoding=_python_encoding(encoding), errors="replace")


def header_groups(files: list[str], sep: str, encoding: str = "utf-8") -> list[list[str]]:
    """CSV files grouped by their header line, groups in order of first appearance. A file this
    process cannot open (not a local path) joins the first group: read as before, by position."""
    import csv

    groups: dict[tuple[str, ...] | None, list[str]] = {}
    for f in files:
        try:
            with _open_text(f, encoding) as fh:
                key: tuple[str, ...] | None = tuple(next(csv.reader(fh, delimiter=sep), []))
        except OSError:
            key = next(iter(groups), None)
        groups.setdefault(key, []).append(f)
    # an empty file has no header and no row: nothing to read (a schema of no column is an error in Spark)
    return [g for k, g in groups.items() if k != ()] or list(groups.values())


def _malformed_lines(path, sep: str, encoding: str = "utf-8") -> list[int]:
    """File line numbers (0 = header) of records whose field count differs from the header's."""
    import csv

    with _open_text(path, encoding) as fh:
        reader = csv.reader(fh, delimiter=sep)
        header = next(reader, None)
        if header is None:
            return []
        bad = []
        for row in reader:
            if row and len(row) != len(header):
                bad.append(reader.line_num - 1)
        return bad


def default_sources_present(cfg: PipelineConfig) -> dict[str, ResolvedSource]:
    """Every configured source that resolves to files, by kind."""
    out = {}
    for kind in ("cells", "traffic", "mdt"):
        res = resolve_source(cfg, kind)  # type: ignore[arg-type]
        if res is not None:
            out[kind] = res
    return out


