"""Long MDT layout: one raw row per measured cell, pivoted to one row per report before parsing.

Cell-list exports of drive-test tools (and many MDT trace decoders) write a report as several rows:
the serving cell's and one per neighbour, all with the report's time and position. The rows of a
report share the file and `sources.mdt.report_columns`; `sources.mdt.serving_rows` tells the serving
row apart. The pivot gives the wide layout the rest of ingest reads: the serving row's columns, then
the neighbour rows' cell, RSRP (and carrier) as pairs `__nb{k}_cell__`, `__nb{k}_rsrp__`
(`__nb{k}_earfcn__`), strongest first.

Bookkeeping: in this layout a row of `rows in` is a report (a group of raw rows), so rows in = clean +
rejected still holds, per report; the stage's metric `mdt_long_rows` counts the raw rows grouped. A group
without a serving row, or with several, is rejected whole (`no_serving_row`, `several_serving_rows`):
its raw row keeps the first serving row's columns (or the report columns alone) and every other row's
cell and RSRP as neighbour pairs, so no measured value is dropped unseen. An exact copy of a line (a
logger's double write) and a malformed line (its fields cannot be trusted to name a report) are rows of
their own, rejected as `duplicate` / `malformed_row`.
"""

from __future__ import annotations

from cellsynth.errors import ConfigError
from cellsynth.ingest.sources import FILE_COLUMN, MALFORMED_COLUMN, REPORT_PROBLEM_COLUMN, ResolvedSource

CELL_PATTERN = "__nb{k}_cell__"
RSRP_PATTERN = "__nb{k}_rsrp__"
EARFCN_PATTERN = "__nb{k}_earfcn__"
REPORT_ID = "__report__"  # the report id of a source without one (see pivot)


def report_columns(src: ResolvedSource, mapping: dict[str, str]) -> list[str]:
    """The raw columns that name a report (besides the file): `report_columns`, else the mapped
    report id, else the UE and timestamp columns."""
    if src.cfg.report_columns:
        return list(src.cfg.report_columns)
    if "report_id" in mapping:
        return [mapping["report_id"]]
    return [c for c in (mapping.get("ue_id"), mapping.get("timestamp")) if c is not None and c != FILE_COLUMN]


def pivot(raw, src: ResolvedSource, mapping: dict[str, str]):  # -> (pyspark DataFrame, ResolvedSource, int)
    """The long frame as one wide row per report, the source as the wide layout that reads it, and the
    number of raw rows grouped into reports (malformed lines aside).

    Raises:
        ConfigError: a report or serving-row column is not in the input.
    """
    from pyspark.sql import functions as F

    from cellsynth.ingest.transforms import excluded_col, parse_number, text_id

    cfg = src.cfg
    keys = report_columns(src, mapping)
    missing = [c for c in [*keys, cfg.serving_rows.column] if c not in raw.columns]
    if missing:
        raise ConfigError(f"sources.mdt.{'serving_rows' if cfg.serving_rows.column in missing else 'report_columns'}: "
                          f"raw column(s) {', '.join(map(repr, missing))} not in the input "
                          f"(have: {', '.join(c for c in raw.columns[:12] if not c.startswith('__'))})")
    keys = [FILE_COLUMN, *keys]
    cell, rsrp = mapping["serving_cell_id"], mapping["rsrp_dbm"]
    earfcn = mapping.get("serving_earfcn") if cfg.neighbour_id == "pci" else None
    malformed = F.col(MALFORMED_COLUMN).isNotNull() if MALFORMED_COLUMN in raw.columns else F.lit(False)
    row_cols = [c for c in raw.columns if c not in (MALFORMED_COLUMN, REPORT_PROBLEM_COLUMN)]
    serving = ~excluded_col(raw, [cfg.serving_rows])
    # Entries sort strongest first: the key is -RSRP (an index sorts as its dBm does), unparsable last.
    entry = F.struct(
        F.coalesce(-parse_number(F.col(f"`{rsrp}`").cast("string")), F.lit(float("inf"))).alias("key"),
        F.col(f"`{cell}`").alias("cell"), F.col(f"`{rsrp}`").alias("rsrp"),
        *([F.col(f"`{earfcn}`").alias("earfcn")] if earfcn else []))
    # The line's place in the input (increasing within a file: splits are numbered in order) breaks RSRP ties.
    rows = raw.where(~malformed).select(*[F.col(f"`{c}`") for c in row_cols], serving.alias("_srv"), entry.alias("_e"),
                                        F.monotonically_increasing_id().alias("_ln"))
    # Per report its lines, sorted so that exact copies of a line sit side by side (the place last). The
    # distinct lines make the report, in the order serving lines first, strongest first, then as read: the
    # first serving line stands for it (several: rejected, the others' cell and RSRP ride as pairs), the
    # pairs are the lines after it. Each extra copy of a line is a row of its own, rejected as `duplicate`
    # (a logger that wrote a report twice).
    line = F.struct(F.struct(*[F.col(f"`{c}`") for c in row_cols]).alias("row"), (~F.col("_srv")).alias("nsrv"),
                    F.col("_e").alias("e"), F.col("_ln").alias("ln"))
    g = rows.groupBy(*[F.col(f"`{k}`") for k in keys]).agg(
        F.count(F.lit(1)).alias("_n_rows"), F.sort_array(F.collect_list(line)).alias("_lines"))
    lines = F.col("_lines")

    def copy(i):  # line i repeats line i - 1 (its raw values, nulls equal)
        return F.get(lines, i)["row"].eqNullSafe(F.get(lines, i - 1)["row"])

    every = F.sequence(F.lit(0), F.size(lines) - 1)
    firsts = F.filter(every, lambda i: (i == 0) | ~copy(i))
    copies = F.filter(every, lambda i: (i > 0) & copy(i))
    g = g.select(*[F.col(f"`{k}`") for k in keys], "_n_rows",
                 F.sort_array(F.transform(firsts, lambda i: F.struct(
                     F.get(lines, i)["nsrv"].alias("nsrv"), F.get(lines, i)["e"]["key"].alias("key"),
                     F.get(lines, i)["ln"].alias("ln"), F.get(lines, i)["e"].alias("e"),
                     F.get(lines, i)["row"].alias("row")))).alias("_all"),
                 F.transform(copies, lambda i: F.get(lines, i)["row"]).alias("_copies"))
    first_nb = F.array_position(F.col("_all.nsrv"), True)  # 1-based; 0: no neighbour line
    g = g.withColumn("_n_srv", F.when(first_nb == 0, F.size("_all")).otherwise(first_nb - 1).cast("int"))
    # One job sizes the pairs (the most lines after the serving one) and counts the rows grouped.
    n_pairs, n_rows = g.agg(F.max(F.size("_all") - F.least(F.col("_n_srv"), F.lit(1))), F.sum("_n_rows")).first()
    n_pairs = n_pairs or 0
    first = F.when(F.col("_n_srv") > 0, F.get(F.col("_all"), 0)["row"])
    out = [F.coalesce(first[c], F.col(f"`{c}`")).alias(c) if c in keys else first[c].alias(c) for c in row_cols]
    skip = F.least(F.col("_n_srv"), F.lit(1))
    for k in range(1, n_pairs + 1):
        e = F.get(F.col("_all"), skip + F.lit(k - 1))["e"]
        out += [e["cell"].alias(CELL_PATTERN.format(k=k)), e["rsrp"].alias(RSRP_PATTERN.format(k=k))]
        if earfcn:
            out.append(e["earfcn"].alias(EARFCN_PATTERN.format(k=k)))
    key_text = [F.coalesce(F.col(f"`{k}`").cast("string"), F.lit("\u2400")) for k in keys]
    if "report_id" not in mapping:  # a report is its group: its id hashes the group key (the file's name and
        # report_columns' texts), so it does not move with the number of pair columns of a run's files
        out.append(text_id(*key_text).alias(REPORT_ID))
    problem = (F.when(F.col("_n_srv") == 0, F.lit("no_serving_row"))
               .when(F.col("_n_srv") > 1, F.lit("several_serving_rows")))
    wide = g.select(*out, F.lit(None).cast("string").alias(MALFORMED_COLUMN), problem.alias(REPORT_PROBLEM_COLUMN))
    pair_cols = [c for c in wide.columns
                 if c not in row_cols and c not in (MALFORMED_COLUMN, REPORT_PROBLEM_COLUMN, REPORT_ID)]

    def own_rows(frame, value, ident, line, problem):
        """Rows of their own (a copied line, a malformed line): their raw values, no pairs, an id of their own."""
        return frame.select(
            *[value(c).alias(c) for c in row_cols], *[F.lit(None).cast(wide.schema[c].dataType).alias(c) for c in pair_cols],
            *([text_id(*ident).alias(REPORT_ID)] if REPORT_ID in wide.columns else []),
            line.alias(MALFORMED_COLUMN), F.lit(problem).cast("string").alias(REPORT_PROBLEM_COLUMN))

    # The copies, rejected as `duplicate`: each id hashes the group key and the copy's place.
    dup = g.select(F.concat_ws("\u241f", *key_text).alias("_key"), F.posexplode("_copies").alias("_pos", "_row"))
    copy_id = [F.col("_key"), F.lit("copy"), F.col("_pos").cast("string")]
    wide = wide.unionByName(own_rows(dup, lambda c: F.col("_row")[c], copy_id, F.lit(None).cast("string"), "duplicate"))
    if MALFORMED_COLUMN in raw.columns:  # malformed lines pass as rows of their own (rejected as such)
        wide = wide.unionByName(own_rows(raw.where(malformed), lambda c: F.col(f"`{c}`"),
                                         [F.col(FILE_COLUMN), F.col(MALFORMED_COLUMN)], F.col(MALFORMED_COLUMN), None))
    # A barrier in the plan (the rows are kept once, memory then disk, as the validated reports are):
    # the optimizer would otherwise inline each pair's list lookup into every later reference of it
    # (the neighbour duplicate flags compare every pair with every earlier one, PCI resolution reads
    # them again), and with PCIs the plan outgrew a 4 GB driver heap at 200 reports of 3 neighbours.
    wide = wide.localCheckpoint(eager=False)
    wide_cfg = cfg.model_copy(update={
        "neighbour_layout": "wide", "neighbour_cell_pattern": CELL_PATTERN, "neighbour_rsrp_pattern": RSRP_PATTERN,
        "neighbour_earfcn_pattern": EARFCN_PATTERN if earfcn else None, "serving_rows": None, "report_columns": (),
        "columns": {**cfg.columns, "report_id": mapping.get("report_id", REPORT_ID)}})
    return wide, ResolvedSource(src.kind, src.files, wide_cfg), int(n_rows or 0)
