"""Ingest benchmark: the Spark ingest stage vs a straightforward pandas cleaning of the same input,
per CPU-second, beside the rate at which pyarrow alone reads the same files.

    .venv/bin/python bench/ingest.py --sim data/sim                               # 1M and 10M reports
    .venv/bin/python bench/ingest.py --sim data/sim --sizes 1000000

Goal (issue 15): Spark cleans at least as many reports per CPU-second as pandas at 10M reports
(`per_cpu_ratio` >= 1). Wall-time ratios on a 2-core box shared by several people measure the
neighbours as much as the code; CPU seconds do not depend on how many cores were free.

The input is simulator output (`jobs/simulate.py`) replicated to the wanted size: replica k shifts
every timestamp k whole weeks back (windows and weekdays unchanged, no overlap between replicas,
never in the future, which the ingest rejects) and suffixes report ids with k, so every replica
cleans to the same rows and the clean count must be exactly proportional. MDT and traffic go to
several Parquet files, as a real export would.

Each implementation runs in its own process (pandas one core, Spark with conf/local.yaml's
runtime.spark), one after the other, so peak memory is measured per implementation: the pandas
process's peak RSS, and for Spark the peak RSS of the Python driver and of the local JVM.
pandas runs under an address-space limit (--pandas-limit-gb); a MemoryError is a recorded result.

The pandas baseline applies the Spark job's rules (every reason code, exact and near duplicates in
UE order, the area's lat/lon box, swapped-position repair, nearest-hour load join, neighbour rows):
tests/ingest/test_bench_baseline.py holds it to the same hand-worked corpus counts as the Spark
job, and every run records whether both sides kept and rejected the same rows (`counts_match`).
CPU seconds per side (`cpu_s`; for Spark the local JVM plus the driver) give the per-core
throughput, which on a shared box is steadier than wall time. pandas needs more memory than the
box can spare at 10M (a MemoryError under a 12 GB limit), so it runs only up to
--baseline-max-reports and `per_cpu_ratio` compares Spark at the largest size with pandas at the
largest size it ran (`per_cpu_ratio_basis` says which; pandas's per-row cost does not fall with
size). The physical limit is `read`: pyarrow reading every input file, nothing else.

Spark stage timings come from Spark's own event log (`spark_stages`: the costliest stages by
executor CPU, with wall time and shuffle bytes).

Writes bench/results/ingest.json (every figure in it comes from this script).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WEEK = pd.Timedelta(days=7)
FILE_ROWS = 1_000_000  # rows per MDT Parquet file


# ------------------------------------------------------------------------------- input
def replicate(sim: Path, folder: Path, n_reports: int) -> dict:
    """Simulator output replicated (whole-week shifts) to about n_reports MDT rows."""
    base = pq.read_table(sim / "mdt.parquet").to_pandas()
    traffic = pd.read_csv(sim / "traffic.csv", dtype=str)
    n_rep = max(1, round(n_reports / len(base)))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(sim / "cells.csv", folder / "cells.csv")
    (folder / "mdt").mkdir()
    (folder / "traffic").mkdir()
    ts = pd.to_datetime(base["timestamp"], utc=True, errors="coerce", format="ISO8601")
    tts = pd.to_datetime(traffic["timestamp"], utc=True, errors="coerce", format="ISO8601")
    per_file = max(1, FILE_ROWS // len(base))
    for first in range(0, n_rep, per_file):
        parts, tparts = [], []
        for k in range(first, min(n_rep, first + per_file)):
            df = base.copy()
            df["report_id"] = df["report_id"] + f"_{k}"
            shifted = (ts - k * WEEK).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
            df["timestamp"] = shifted.where(ts.notna(), base["timestamp"])  # unparseable stays as is
            parts.append(df)
            tr = traffic.copy()
            tr["timestamp"] = (tts - k * WEEK).dt.strftime("%Y-%m-%dT%H:%M:%SZ").where(tts.notna(), traffic["timestamp"])
            tparts.append(tr)
        pq.write_table(pa.Table.from_pandas(pd.concat(parts, ignore_index=True), preserve_index=False),
                       folder / "mdt" / f"part-{first:05d}.parquet")
        pq.write_table(pa.Table.from_pandas(pd.concat(tparts, ignore_index=True), preserve_index=False),
                       folder / "traffic" / f"part-{first:05d}.parquet")
    return {"replicas": n_rep, "base_reports": len(base), "n_reports": n_rep * len(base),
            "n_traffic": n_rep * len(traffic), "mdt_files": len(list((folder / "mdt").iterdir()))}


def bench_config(data: Path, lake: Path):
    from cellsynth.config import load_config

    return load_config(ROOT / "conf" / "local.yaml", [
        f"run.lake_root={lake}", f"run.data_dir={data}", "scenario.enabled=false",
        f"sources.mdt.path={data / 'mdt'}", "sources.mdt.format=parquet",
        f"sources.traffic.path={data / 'traffic'}", "sources.traffic.format=parquet",
        f"sources.cells.path={data / 'cells.csv'}",
    ])


# ----------------------------------------------------------------------------- baseline
MISSING = ("", "NA", "NaN", "null", "-")  # the default sources.*.missing_values
LINE = "__malformed_line__"  # a CSV line whose field count differs from the header


def _read_csv(path: Path) -> pd.DataFrame:
    """All columns as strings; a line with another field count than the header becomes a row
    whose fields are all missing and whose text is in LINE (the Spark reader's corrupt record)."""
    import pyarrow.csv as pacsv

    names = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip")).schema.names
    bad: list[str] = []

    def keep_text(row) -> str:
        bad.append(row.text)
        return "skip"

    table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(invalid_row_handler=keep_text),
                           convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                strings_can_be_null=False))
    df = table.to_pandas()
    df[LINE] = None
    if bad:
        df = pd.concat([df, pd.DataFrame({LINE: bad})], ignore_index=True)
    return df


def _read_any(path: Path) -> pd.DataFrame:
    """A CSV file (all strings) or a Parquet file/folder (native types); missing markers -> NaN."""
    df = _read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    for c in df.columns:
        if df[c].dtype == object and c != LINE:
            # Touch only the values that need it: stripping every string would copy each one
            # (pyarrow shares repeated strings; new copies tripled peak memory at 1M reports).
            s = df[c]
            odd = s.str.match(r"\s|.*\s$", na=False) | s.isin(MISSING)
            if odd.any():
                fixed = s[odd].str.strip()
                s = s.copy()
                s[odd] = fixed.where(~fixed.isin(MISSING))
                df[c] = s
    return df


def _number(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(value, unparseable): NaN/inf count as unparseable, as in the Spark job."""
    val = pd.to_numeric(raw, errors="coerce").astype(float)
    val = val.where(np.isfinite(val))
    return val, raw.notna() & val.isna()


def _reasons(checks: dict[str, pd.Series], index) -> pd.Series:
    """'code;code' per row ('' when clean), in the Spark job's reason order."""
    out = pd.Series("", index=index, dtype=object)
    for code, cond in checks.items():
        cond = cond.fillna(False).astype(bool)
        out[cond] = out[cond] + ";" + code
    return out.str.lstrip(";")


def _malformed(df: pd.DataFrame, reasons: pd.Series) -> pd.Series:
    """`malformed_row` alone for malformed lines (their fields are misaligned)."""
    if LINE not in df:
        return reasons
    return reasons.where(df[LINE].isna(), "malformed_row")


def _count(source: str, reasons: pd.Series, counts: dict) -> pd.Series:
    bad = reasons != ""
    counts["rows_in"][source] = len(reasons)
    counts["rejected"][source] = int(bad.sum())
    for codes, n in reasons[bad].value_counts().items():
        for code in codes.split(";"):
            counts["by_reason"][code] = counts["by_reason"].get(code, 0) + int(n)
    return bad


def pandas_ingest(cells_path: Path, traffic_path: Path, mdt_path: Path, ic, out: Path) -> dict:
    """The Spark job's cleaning in plain pandas on one core: the same reasons, duplicate rules,
    area (the lat/lon box around the local-frame box), swapped-position repair, windows, shards,
    nearest-hour load join and neighbour rows; writes the clean tables and the rejects."""
    import zlib
    from datetime import datetime, timedelta, timezone

    from cellsynth.config import utc_instant
    from cellsynth.geo import LocalFrame
    from cellsynth.windows import window_of

    counts: dict = {"rows_in": {}, "rejected": {}, "by_reason": {}, "clean": {}}
    rejects = []
    start, end = utc_instant("period_start", ic.period_start), utc_instant("period_end", ic.period_end)
    # Plausible times: from 2000 to a day after now, widened by a period that reaches beyond.
    lo = min(datetime(2000, 1, 1, tzinfo=timezone.utc), start or datetime.max.replace(tzinfo=timezone.utc))
    hi = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
    hi = max(hi, end) if end else hi
    lo, hi, start, end = (pd.Timestamp(t) if t else None for t in (lo, hi, start, end))

    def shard(ids: pd.Series) -> pd.Series:
        uniq = {c: zlib.crc32(c.encode()) % ic.n_cell_shards for c in ids.dropna().unique()}
        return ids.map(uniq)

    def time_checks(raw: pd.Series, ts: pd.Series) -> dict[str, pd.Series]:
        implausible = (ts < lo) | (ts > hi)
        outside = pd.Series(False, index=ts.index)
        if start is not None:
            outside |= ts < start
        if end is not None:
            outside |= ts >= end
        return {"bad_timestamp": (raw.notna() & ts.isna()) | implausible, "out_of_period": ~implausible & outside}

    def parse_ts(raw: pd.Series) -> pd.Series:
        return pd.to_datetime(raw, utc=True, errors="coerce", format="ISO8601")

    # ---------------------------------------------------------------- cells
    cells = _read_any(cells_path)
    lat, bad_lat = _number(cells["latitude"])
    lon, bad_lon = _number(cells["longitude"])
    bad_num = pd.Series(False, index=cells.index)
    for c in ("azimuth_deg", "height_m", "tx_power_dbm", "freq_mhz"):
        if c in cells:
            bad_num |= _number(cells[c])[1]
    reasons = _reasons({
        "missing_value": cells["cell_id"].isna(), "bad_number": bad_num | bad_lat | bad_lon,
        "missing_position": cells["latitude"].isna() | cells["longitude"].isna(),
        "outside_area": ~((lat.abs() <= 90) & (lon.abs() <= 180)) & lat.notna() & lon.notna(),
        "duplicate_cell": cells["cell_id"].notna() & cells["cell_id"].duplicated(),
    }, cells.index)
    reasons = _malformed(cells, reasons)
    bad = _count("cells", reasons, counts)
    rejects.append(pd.DataFrame({"source": "cells", "reason_code": reasons[bad]}))
    known = set(cells.loc[~bad, "cell_id"])
    frame = LocalFrame.around(lat[~bad].to_numpy(), lon[~bad].to_numpy())
    cx, cy = frame.to_xy(lat[~bad].to_numpy(), lon[~bad].to_numpy())
    m = ic.area_margin_m
    x0, y0, x1, y1 = ic.area_bbox_m or (cx.min() - m, cy.min() - m, cx.max() + m, cy.max() + m)
    t = np.linspace(0.0, 1.0, 5)  # the lat/lon box that holds the metric box (16 edge points)
    bl, bo = frame.to_latlon(np.concatenate([x0 + (x1 - x0) * t, x0 + (x1 - x0) * t, np.full(5, x0), np.full(5, x1)]),
                             np.concatenate([np.full(5, y0), np.full(5, y1), y0 + (y1 - y0) * t, y0 + (y1 - y0) * t]))
    box = (bl.min(), bl.max(), bo.min(), bo.max())
    pad = ((box[1] - box[0]) * 0.01 + 1e-4, (box[3] - box[2]) * 0.01 + 1e-4)
    clean_cells = cells.loc[~bad].assign(lat=lat[~bad], lon=lon[~bad], x_m=cx, y_m=cy)
    clean_cells["cell_shard"] = shard(clean_cells["cell_id"])
    counts["clean"]["cells"] = len(clean_cells)
    out.mkdir(parents=True, exist_ok=True)
    clean_cells.to_parquet(out / "cells.parquet")

    # -------------------------------------------------------------- traffic
    tr = _read_any(traffic_path)
    tr["ts"] = parse_ts(tr["timestamp"])
    vol, bad_vol = _number(tr["traffic_mb"])
    prb, bad_prb = _number(tr["prb_util_pct"])
    tr["load_rho"] = prb / 100
    reasons = _reasons({
        "missing_value": tr["cell_id"].isna() | tr["timestamp"].isna() | (tr["traffic_mb"].isna() & tr["prb_util_pct"].isna()),
        **time_checks(tr["timestamp"], tr["ts"]),
        "bad_number": bad_vol | bad_prb,
        "load_out_of_range": (tr["load_rho"].notna() & ~tr["load_rho"].between(0, 1)) | (vol < 0),
        "unknown_cell": tr["cell_id"].notna() & ~tr["cell_id"].isin(known),
        "duplicate": tr["cell_id"].notna() & tr["ts"].notna() & tr.duplicated(["cell_id", "ts"]),
    }, tr.index)
    reasons = _malformed(tr, reasons)
    bad = _count("traffic", reasons, counts)
    rejects.append(pd.DataFrame({"source": "traffic", "reason_code": reasons[bad]}))
    tr = tr.loc[~bad].assign(traffic_mb=vol[~bad])
    tr["window"] = window_of(tr["ts"], ic.windows)
    tr["cell_shard"] = shard(tr["cell_id"])
    counts["clean"]["traffic"] = len(tr)
    tr.to_parquet(out / "traffic.parquet")
    # (cell, hour) -> load: each counter spread to the hours within the tolerance, nearest wins,
    # ties to the earlier counter.
    hour = tr["ts"].dt.floor("h")
    tol = ic.load_join_tolerance_h
    cand = pd.concat([
        pd.DataFrame({"cell_id": tr["cell_id"].to_numpy(), "hour": (hour + pd.Timedelta(hours=off)).to_numpy(),
                      "d": abs(off), "o": -off, "load_rho": tr["load_rho"].to_numpy()})
        for off in range(-tol, tol + 1)
    ])
    cand = cand[cand["load_rho"].notna()]
    lookup = cand.sort_values(["cell_id", "hour", "d", "o"]).drop_duplicates(["cell_id", "hour"])[["cell_id", "hour", "load_rho"]]

    # ------------------------------------------------------------------ mdt
    md = _read_any(mdt_path)
    md["ts"] = parse_ts(md["timestamp"])
    lat, bad_lat = _number(md["latitude"])
    lon, bad_lon = _number(md["longitude"])
    rsrp, bad_rsrp = _number(md["serving_rsrp_dbm"])
    rsrq, bad_rsrq = _number(md["serving_rsrq_db"])

    def inside(a, b, bx):
        return a.between(bx[0], bx[1]) & b.between(bx[2], bx[3])

    swapped = lat.notna() & lon.notna() & ~inside(lat, lon, box) & inside(lon, lat, box)
    if ic.repair_swapped_latlon:
        lat, lon = lat.where(~swapped, lon), lon.where(~swapped, lat)
    counts["swapped_latlon"] = int(swapped.sum())
    x, y = frame.to_xy(lat.to_numpy(), lon.to_numpy())
    in_pad = inside(lat, lon, (box[0] - pad[0], box[1] + pad[0], box[2] - pad[1], box[3] + pad[1]))
    md["lat"], md["lon"], md["rsrp_dbm"], md["rsrq_db"] = lat, lon, rsrp, rsrq
    md["x_m"], md["y_m"] = np.where(in_pad, x, np.nan), np.where(in_pad, y, np.nan)
    ks = sorted(int(c.split("_")[1]) for c in md.columns if c.startswith("neighbour_") and c.endswith("_cell_id"))
    nb_cols = [c for k in ks for c in (f"neighbour_{k}_cell_id", f"neighbour_{k}_rsrp_dbm")]
    # Exact twins: same content and neighbour list; they sit next to each other in this order.
    content = ["ts", "lat", "lon", "serving_cell_id", "rsrp_dbm", "rsrq_db"]
    md["_h"] = pd.util.hash_pandas_object(md[content + nb_cols], index=False)
    md["_ue"] = md["ue_id"].fillna("")
    order = md[["_ue", *content, "_h", "report_id", "ue_id", "x_m", "y_m"]].sort_values(
        ["_ue", *content, "_h", "report_id"], na_position="first", kind="stable")
    g = order.groupby("_ue", sort=False)
    prev = g[["_h", "ts", "x_m", "y_m"]].shift()
    exact = (order["_h"] == prev["_h"]).reindex(md.index)
    dt_s = (order["ts"] - prev["ts"]).dt.total_seconds().abs()
    near = (order["ue_id"].notna() & (dt_s <= ic.near_duplicate_s)
            & (np.hypot(order["x_m"] - prev["x_m"], order["y_m"] - prev["y_m"]) <= ic.near_duplicate_m)).reindex(md.index)
    del order, g, prev
    # A repeated report id keeps its first row in content order.
    twins = md.loc[md["report_id"].notna() & md["report_id"].duplicated(keep=False), ["report_id", *content]]
    dup_id = pd.Series(False, index=md.index)
    dup_id[twins.sort_values(["report_id", *content], na_position="first").duplicated("report_id").loc[lambda s: s].index] = True
    reasons = _reasons({
        "missing_value": md["report_id"].isna() | md["serving_cell_id"].isna() | md["serving_rsrp_dbm"].isna() | md["timestamp"].isna(),
        **time_checks(md["timestamp"], md["ts"]),
        "bad_number": bad_lat | bad_lon | bad_rsrp | bad_rsrq,
        "missing_position": md["latitude"].isna() | md["longitude"].isna(),
        "outside_area": lat.notna() & lon.notna() & ~inside(lat, lon, box),
        "rsrp_out_of_range": rsrp.notna() & ~rsrp.between(*ic.rsrp_range_dbm),
        "rsrq_out_of_range": rsrq.notna() & ~rsrq.between(*ic.rsrq_range_db),
        "unknown_cell": md["serving_cell_id"].notna() & ~md["serving_cell_id"].isin(known),
        "duplicate": exact | dup_id,
        "near_duplicate": ~exact & near,
    }, md.index)
    reasons = _malformed(md, reasons)
    bad = _count("mdt", reasons, counts)
    rejects.append(pd.DataFrame({"source": "mdt", "reason_code": reasons[bad]}))
    clean = md.loc[~bad].drop(columns=["_h", "_ue"])
    del md
    clean["window"] = window_of(clean["ts"], ic.windows)
    clean["cell_shard"] = shard(clean["serving_cell_id"])
    clean["hour"] = clean["ts"].dt.floor("h")
    lk = lookup.rename(columns={"cell_id": "serving_cell_id"})
    reports = clean.merge(lk, on=["serving_cell_id", "hour"], how="left")
    counts["clean"]["mdt_reports"] = len(reports)
    counts["no_load_match"] = int(reports["load_rho"].isna().sum())
    keep = ["report_id", "ts", "window", "x_m", "y_m", "serving_cell_id", "rsrp_dbm", "rsrq_db", "load_rho", "cell_shard"]
    reports[keep].to_parquet(out / "mdt_reports.parquet")

    # ------------------------------------------------------------ neighbours
    parts = []
    for k in ks:
        c_raw, r_raw = clean[f"neighbour_{k}_cell_id"], clean[f"neighbour_{k}_rsrp_dbm"]
        present = c_raw.notna() | r_raw.notna()
        nb = clean.loc[present, ["report_id", "ts", "window", "x_m", "y_m", "serving_cell_id", "hour"]].assign(
            rank=k, cell_id=c_raw[present], _rsrp_raw=r_raw[present])
        # duplicate: an earlier entry of the same list names the same cell
        dup = pd.Series(False, index=nb.index)
        for j in ks[:ks.index(k)]:
            dup |= clean.loc[present, f"neighbour_{j}_cell_id"] == nb["cell_id"]
        nb["_dup"] = dup
        parts.append(nb)
    nb = pd.concat(parts, ignore_index=True)
    nb["rsrp_dbm"], bad_nb = _number(nb["_rsrp_raw"])
    reasons = _reasons({
        "missing_value": nb["cell_id"].isna() | nb["_rsrp_raw"].isna(),
        "bad_number": bad_nb,
        "rsrp_out_of_range": nb["rsrp_dbm"].notna() & ~nb["rsrp_dbm"].between(*ic.rsrp_range_dbm),
        "neighbour_is_serving": nb["cell_id"] == nb["serving_cell_id"],
        "unknown_cell": nb["cell_id"].notna() & ~nb["cell_id"].isin(known),
        "duplicate": nb["cell_id"].notna() & nb["_dup"],
    }, nb.index)
    bad = _count("neighbour", reasons, counts)
    rejects.append(pd.DataFrame({"source": "neighbour", "reason_code": reasons[bad]}))
    nb = nb.loc[~bad].merge(lookup, on=["cell_id", "hour"], how="left")
    nb["cell_shard"] = shard(nb["cell_id"])
    serving = reports[keep].rename(columns={"serving_cell_id": "cell_id"}).assign(role="serving", rank=0)
    meas = pd.concat([serving, nb.assign(role="neighbour", rsrq_db=np.nan)[serving.columns]], ignore_index=True)
    counts["clean"]["mdt_measurements"] = len(meas)
    meas.to_parquet(out / "mdt_measurements.parquet")
    rej = pd.concat(rejects, ignore_index=True)
    counts["clean"]["rejects"] = len(rej)
    rej.to_parquet(out / "rejects.parquet")
    return counts


# ------------------------------------------------------------------------ child processes
def _peak_rss_mb(pid: int | str = "self") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    """Every live descendant of pid (the local JVM, its Python workers, their children)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out.extend(kids)
        frontier = kids
    return out


def _cpu_s(pids: list[int] | None = None) -> float:
    """User + system CPU seconds of this process, of every live descendant (the local Spark JVM,
    Python workers) and of the children they have reaped (cutime/cstime): the whole process tree."""
    total = sum(os.times()[:4])
    for pid in (_children(os.getpid()) if pids is None else pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[11:15] = utime, stime, cutime, cstime
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def _thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of a JVM's live threads by kind (JIT compilers, GC, the rest): where Spark's
    CPU goes besides the task threads (ended task threads are only in the process total)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = ("jit" if "CompilerThre" in name else "gc" if name.startswith(("GC ", "G1 ")) else
                "tasks" if name.startswith("Executor task") else "other")
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def child_pandas(data: Path) -> dict:
    cfg = bench_config(data, data / "unused-lake")
    out = Path(tempfile.mkdtemp(prefix="pandas-ingest-"))
    c0, t0 = _cpu_s(), time.perf_counter()
    try:
        counts = pandas_ingest(data / "cells.csv", data / "traffic", data / "mdt", cfg.ingest, out)
    except MemoryError:
        return {"error": "MemoryError", "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "peak_rss_mb": _peak_rss_mb(),
            "mdt_reports": counts["clean"]["mdt_reports"],
            "mdt_measurements": counts["clean"]["mdt_measurements"], "rows_in": counts["rows_in"],
            "rows_rejected": sum(counts["rejected"].values()), "rejects_by_reason": counts["by_reason"]}


def child_read(data: Path) -> dict:
    """pyarrow alone reading every input file (all threads): the physical limit on this box."""
    import pyarrow.csv as pacsv

    c0, t0 = _cpu_s(), time.perf_counter()
    rows = {"cells": pacsv.read_csv(data / "cells.csv").num_rows}
    for kind in ("traffic", "mdt"):
        rows[kind] = sum(pq.read_table(f).num_rows for f in sorted((data / kind).glob("*.parquet")))
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "rows_in": rows,
            "peak_rss_mb": _peak_rss_mb()}


def _stage_profile(log_dir: Path, top: int = 12) -> list[dict]:
    """The costliest Spark stages by executor CPU, from the event log."""
    stages = []
    # Spark 4 writes each application's log as a folder of rolled files (eventlog_v2_<app>/events_*)
    for path in sorted(q for q in log_dir.rglob("*") if q.is_file()):
        for line in path.read_text(errors="replace").splitlines():
            if '"SparkListenerStageCompleted"' not in line:
                continue
            info = json.loads(line)["Stage Info"]
            acc = {a["Name"]: a.get("Value") for a in info.get("Accumulables", [])}
            stages.append({
                "stage_id": info["Stage ID"], "name": info["Stage Name"][:80], "tasks": info["Number of Tasks"],
                "wall_s": (info.get("Completion Time", 0) - info.get("Submission Time", 0)) / 1e3,
                "executor_cpu_s": int(acc.get("internal.metrics.executorCpuTime") or 0) / 1e9,
                "executor_run_s": int(acc.get("internal.metrics.executorRunTime") or 0) / 1e3,
                "gc_s": int(acc.get("internal.metrics.jvmGCTime") or 0) / 1e3,
                "shuffle_write_mb": int(acc.get("internal.metrics.shuffle.write.bytesWritten") or 0) / 2**20,
                "shuffle_read_mb": (int(acc.get("internal.metrics.shuffle.read.remoteBytesRead") or 0)
                                    + int(acc.get("internal.metrics.shuffle.read.localBytesRead") or 0)) / 2**20,
                "spill_disk_mb": int(acc.get("internal.metrics.diskBytesSpilled") or 0) / 2**20,
            })
    total = sum(s["executor_cpu_s"] for s in stages)
    stages.sort(key=lambda s: -s["executor_cpu_s"])
    return [{"executor_cpu_s_all_stages": total, "n_stages": len(stages)}, *stages[:top]]


def child_spark(data: Path, lake: Path, master: str | None = None, extra_conf: list[str] | None = None) -> dict:
    from cellsynth.cluster import runtime
    from cellsynth.ingest import stage

    cfg = bench_config(data, lake)
    log_dir = lake.parent / f"{lake.name}-eventlog"
    log_dir.mkdir(parents=True, exist_ok=True)
    spark_cfg = cfg.runtime.spark.model_copy(update={
        "conf": {**cfg.runtime.spark.conf, **dict(kv.split("=", 1) for kv in extra_conf or []),
                 "spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{log_dir}",
                 "spark.eventLog.compress": "false"},  # Spark 4 compresses event logs by default
        **({"master": master} if master else {})})
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"spark": spark_cfg})})
    with runtime(cfg, quiet=True) as rt:
        rt.spark.range(1).count()  # session start is not ingest work
        jvms = _children(os.getpid())
        sc = rt.spark.sparkContext
        n_jobs0 = len(sc.statusTracker().getJobIdsForGroup())
        threads0 = _jvm_threads(jvms)
        c0, t0, py0 = _cpu_s(), time.perf_counter(), sum(os.times()[:2])
        res = stage.run(cfg, rt, run_id="bench")
        seconds, cpu_s, py_cpu = time.perf_counter() - t0, _cpu_s() - c0, sum(os.times()[:2]) - py0
        threads1 = _jvm_threads(jvms)
        tree = _children(os.getpid())
        n_jobs = len(sc.statusTracker().getJobIdsForGroup()) - n_jobs0
        jvm_rss = max((_peak_rss_mb(p) or 0.0) for p in jvms) if jvms else None
        jvm_threads = {k: round(v, 2) for k, v in threads1.items()}
    spark_conf = cfg.runtime.spark.model_dump()
    spark_conf["conf"] = {k: v for k, v in spark_conf["conf"].items() if not k.startswith("spark.eventLog")}
    return {"seconds": seconds, "cpu_s": cpu_s, "cpu_s_counts": "the whole process tree: driver, JVM, Python workers",
            "process_tree": sorted({_comm(p) for p in tree}), "spark_jobs": n_jobs,
            "jvm_live_thread_cpu_s": jvm_threads,
            # the same during the ingest alone (a thread that ended in between is only in cpu_s)
            "jvm_thread_cpu_s_during_ingest": {k: round(v - threads0.get(k, 0.0), 2) for k, v in threads1.items()},
            "driver_python_cpu_s": round(py_cpu, 2), "driver_python_peak_rss_mb": _peak_rss_mb(), "jvm_peak_rss_mb": jvm_rss,
            "mdt_reports": res.rows_written.get("mdt_reports"), "mdt_measurements": res.rows_written.get("mdt_measurements"),
            "rows_in": res.rows_in, "rows_rejected": res.rows_rejected, "spark": spark_conf,
            "spark_stages": _safe_profile(log_dir)}


def _jvm_threads(jvms: list[int]) -> dict[str, float]:
    """CPU seconds of the local JVM's live threads by kind (whole JVM life so far)."""
    try:
        out: dict[str, float] = {}
        for p in jvms:
            if _comm(p) == "java":
                for k, v in _thread_cpu_s(p).items():
                    out[k] = out.get(k, 0.0) + v
        return out
    except (OSError, ValueError, IndexError):
        return {}


def _safe_profile(log_dir: Path) -> list[dict]:
    # The profile is an extra: an unreadable event log must not void the measured run.
    try:
        return _stage_profile(log_dir)
    except (OSError, ValueError, KeyError) as err:
        return [{"error": f"{type(err).__name__}: {err}"}]


def _run_child(args: list[str], *, limit_gb: float | None = None, timeout_s: float) -> dict:
    def limit():
        if limit_gb:
            lim = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    cmd = [sys.executable, __file__, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def machine() -> dict:
    load1, load5, _ = os.getloadavg()
    return {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": sys.version.split()[0], "load_avg_1m_at_end": round(load1, 2), "load_avg_5m_at_end": round(load5, 2)}


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        # only the code the bench runs: a README edit during a run does not make it "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "lib", "bench/ingest.py", "conf"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return rev + ("+uncommitted" if dirty else "")


def _per_cpu(row: dict, side: str) -> float | None:
    res = row.get(side, {})
    return row["n_reports"] / res["cpu_s"] if res.get("cpu_s") else None


def _runs_on_file(args, *, complete: bool = True) -> list[dict]:
    """Sizes already in --out (complete: the Spark side measured), for --resume."""
    try:
        runs = json.loads(Path(args.out).read_text()).get("runs", [])
    except (OSError, ValueError):
        return []
    return [r for r in runs if r.get("requested") and (not complete or r.get("ours", {}).get("cpu_s"))]


def write_result(args, runs: list[dict]) -> dict:
    """bench/results JSON from the sizes run so far (with --resume, beside the completed sizes
    already on file, re-read at each write: another size may be running at the same time)."""
    mine = {r["requested"] for r in runs}
    kept = [r for r in _runs_on_file(args, complete=False) if r["requested"] not in mine] if args.resume else []
    runs = sorted(kept + runs, key=lambda r: r["n_reports"])
    spark_runs = [r for r in runs if _per_cpu(r, "ours")]
    pandas_runs = [r for r in runs if _per_cpu(r, "baseline")]
    both = [r for r in runs if _per_cpu(r, "ours") and _per_cpu(r, "baseline")]
    big_s = spark_runs[-1] if spark_runs else None
    big_p = pandas_runs[-1] if pandas_runs else None
    result = {
        "goal": "Spark ingest cleans >= as many reports per CPU-second as pandas at 10M reports (per_cpu_ratio >= 1)",
        "baseline": "pandas, one process, the Spark job's cleaning rules (tests/ingest/test_bench_baseline.py: same corpus counts), same Parquet input",
        "ours": "Spark ingest stage, conf/local.yaml runtime.spark (session start excluded)",
        "read": "pyarrow alone reading every input file (all threads), nothing else: the physical limit",
        "input": f"simulator output {args.sim} replicated by whole-week shifts",
        "code": _git_rev(),
        "per_cpu_ratio": _per_cpu(big_s, "ours") / _per_cpu(big_p, "baseline") if big_s and big_p else None,
        "per_cpu_ratio_basis": {"spark_n_reports": big_s["n_reports"] if big_s else None,
                                "pandas_n_reports": big_p["n_reports"] if big_p else None},
        "per_cpu_ratio_same_size": ({"n_reports": both[-1]["n_reports"],
                                     "ratio": _per_cpu(both[-1], "ours") / _per_cpu(both[-1], "baseline")} if both else None),
        "spark_rows_per_cpu_s": _per_cpu(big_s, "ours") if big_s else None,
        "pandas_rows_per_cpu_s": _per_cpu(big_p, "baseline") if big_p else None,
        "read_rows_per_cpu_s": _per_cpu(big_s, "read") if big_s else None,
        "spark_share_of_read_rate": (_per_cpu(big_s, "ours") / _per_cpu(big_s, "read")
                                     if big_s and _per_cpu(big_s, "read") else None),
        # Spark's rate at each size against pandas's at the largest size it ran: the JVM's start-up
        # and JIT compilation are a fixed cost, so Spark's per-report cost falls with size.
        "per_cpu_ratio_by_size": [{"spark_n_reports": r["n_reports"], "pandas_n_reports": big_p["n_reports"],
                                   "ratio": _per_cpu(r, "ours") / _per_cpu(big_p, "baseline")}
                                  for r in spark_runs] if big_p else None,
        "scaling_cpu": (spark_runs[-1]["ours"]["cpu_s"] / spark_runs[0]["ours"]["cpu_s"]
                        if len(spark_runs) > 1 else None),
        "scaling_size": spark_runs[-1]["n_reports"] / spark_runs[0]["n_reports"] if len(spark_runs) > 1 else None,
        "sizes": [r["n_reports"] for r in runs], "runs": runs, "machine": machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("per_cpu_ratio", "per_cpu_ratio_basis", "spark_rows_per_cpu_s",
                                             "pandas_rows_per_cpu_s", "read_rows_per_cpu_s")}), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sim", default=str(ROOT / "data" / "sim"), help="simulator output folder to replicate")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest.json"))
    parser.add_argument("--pandas-limit-gb", type=float, default=12.0)
    parser.add_argument("--baseline-max-reports", type=int, default=2_000_000,
                        help="run pandas only up to this size (at 10M it needs more memory than the box can spare)")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--master", help="Spark master for the Spark runs (default: conf/local.yaml's)")
    parser.add_argument("--spark-conf", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Spark settings for the Spark runs (recorded in the JSON)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the sizes already in --out and run only the others")
    parser.add_argument("--work-dir", help="where the replicated input and the lakes go (default: the temp dir)")
    parser.add_argument("--child", choices=["pandas", "spark", "read"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "pandas":
        print(json.dumps(child_pandas(Path(args.data))), flush=True)
        return 0
    if args.child == "spark":
        print(json.dumps(child_spark(Path(args.data), Path(args.lake), args.master, args.spark_conf)), flush=True)
        return 0
    if args.child == "read":
        print(json.dumps(child_read(Path(args.data))), flush=True)
        return 0

    runs = []
    done = {r["requested"] for r in _runs_on_file(args)} if args.resume else set()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.work_dir))
    try:
        for n in args.sizes:
            if n in done:
                print(json.dumps({"skip": n, "why": "already in " + args.out}), flush=True)
                continue
            data = work / f"data-{n}"
            info = replicate(Path(args.sim), data, n)
            print(json.dumps({"input": info}), flush=True)
            row = {"requested": n, "n_reports": info["n_reports"], "code": _git_rev(), "input": info,
                   "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
            partial = runs + [row]  # written after each side: a long size leaves what it has measured
            row["read"] = _run_child(["--child", "read", "--data", str(data)], timeout_s=args.timeout_s)
            write_result(args, partial)
            if info["n_reports"] <= args.baseline_max_reports:
                row["baseline"] = _run_child(["--child", "pandas", "--data", str(data)], limit_gb=args.pandas_limit_gb,
                                             timeout_s=args.timeout_s)
            else:
                row["baseline"] = {"skipped": f"above --baseline-max-reports {args.baseline_max_reports}"}
            write_result(args, partial)
            master = ["--master", args.master] if args.master else []
            extra = ["--spark-conf", *args.spark_conf] if args.spark_conf else []
            row["ours"] = _run_child(["--child", "spark", "--data", str(data), "--lake", str(work / f"lake-{n}"), *master, *extra],
                                     timeout_s=args.timeout_s)
            row["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
            base, ours = row["baseline"], row["ours"]
            for side in ("baseline", "ours", "read"):
                if row[side].get("seconds") and "error" not in row[side]:
                    row[f"{side}_rows_per_s"] = info["n_reports"] / row[side]["seconds"]
                    row[f"{side}_rows_per_cpu_s"] = _per_cpu(row, side)
            if row.get("baseline_rows_per_cpu_s") and row.get("ours_rows_per_cpu_s"):
                # Same cleaning: both sides must keep and reject the same rows.
                row["counts_match"] = all(base[k] == ours[k] for k in ("mdt_reports", "mdt_measurements", "rows_in", "rows_rejected"))
                row["per_cpu_ratio"] = row["ours_rows_per_cpu_s"] / row["baseline_rows_per_cpu_s"]
            if "error" not in ours:
                # Every replica cleans to the same rows: the clean count is the replica count times one's.
                row["clean_per_replica"] = ours["mdt_reports"] / info["replicas"]
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ours"}), flush=True)
            write_result(args, runs)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(work / f"lake-{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
