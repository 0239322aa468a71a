"""Ingest benchmark: the Spark ingest stage vs a straightforward pandas cleaning of the same input.

    .venv/bin/python bench/ingest.py --sim /tmp/try2/data/sim                    # 1M and 10M reports
    .venv/bin/python bench/ingest.py --sim data/sim --sizes 200000 1000000

The input is simulator output (`jobs/simulate.py`) replicated to the wanted size: replica k shifts
every timestamp by k whole weeks (windows and weekdays unchanged, no overlap between replicas) and
suffixes report ids with k, so every replica cleans to the same rows and the clean count must be
exactly proportional. MDT and traffic go to several Parquet files, as a real export would.

Each implementation runs in its own process (pandas one core, Spark with conf/local.yaml's
runtime.spark), one after the other, so peak memory is measured per implementation: the pandas
process's peak RSS, and for Spark the peak RSS of the Python driver and of the local JVM.
pandas runs under an address-space limit (--pandas-limit-gb); a MemoryError is a recorded result.

The pandas baseline applies the Spark job's rules (every reason code, exact and near duplicates in
UE order, the area's lat/lon box, swapped-position repair, nearest-hour load join, neighbour rows):
tests/ingest/test_bench_baseline.py holds it to the same hand-worked corpus counts as the Spark
job, and every run records whether both sides kept and rejected the same rows (`counts_match`).
CPU seconds per side (`cpu_s`; for Spark the local JVM plus the driver) give the per-core
throughput, which on a shared box is steadier than wall time.

Writes bench/results/ingest.json: baseline_s/ours_s/ratio at the largest size (ratio = pandas time /
Spark time), rows/s at every size, scaling = Spark time(largest) / time(smallest).
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
            shifted = (ts + k * WEEK).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
            df["timestamp"] = shifted.where(ts.notna(), base["timestamp"])  # unparseable stays as is
            parts.append(df)
            tr = traffic.copy()
            tr["timestamp"] = (tts + k * WEEK).dt.strftime("%Y-%m-%dT%H:%M:%SZ").where(tts.notna(), traffic["timestamp"])
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


def _read_any(path: Path) -> pd.DataFrame:
    """A CSV file (all strings) or a Parquet file/folder (native types); missing markers -> NaN."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix == ".csv" else pd.read_parquet(path)
    for c in df.columns:
        if df[c].dtype == object:
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

    from cellsynth.geo import LocalFrame
    from cellsynth.windows import window_of

    counts: dict = {"rows_in": {}, "rejected": {}, "by_reason": {}, "clean": {}}
    rejects = []
    period = [pd.Timestamp(t, tz="UTC") if t else None for t in (ic.period_start, ic.period_end)]

    def shard(ids: pd.Series) -> pd.Series:
        uniq = {c: zlib.crc32(c.encode()) % ic.n_cell_shards for c in ids.dropna().unique()}
        return ids.map(uniq)

    def in_period(ts: pd.Series) -> pd.Series:
        ok = pd.Series(True, index=ts.index)
        if period[0] is not None:
            ok &= ts >= period[0]
        if period[1] is not None:
            ok &= ts < period[1]
        return ok | ts.isna()

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
        "bad_timestamp": tr["timestamp"].notna() & tr["ts"].isna(),
        "out_of_period": ~in_period(tr["ts"]),
        "bad_number": bad_vol | bad_prb,
        "load_out_of_range": (tr["load_rho"].notna() & ~tr["load_rho"].between(0, 1)) | (vol < 0),
        "unknown_cell": tr["cell_id"].notna() & ~tr["cell_id"].isin(known),
        "duplicate": tr["cell_id"].notna() & tr["ts"].notna() & tr.duplicated(["cell_id", "ts"]),
    }, tr.index)
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
        "bad_timestamp": md["timestamp"].notna() & md["ts"].isna(),
        "out_of_period": ~in_period(md["ts"]),
        "bad_number": bad_lat | bad_lon | bad_rsrp | bad_rsrq,
        "missing_position": md["latitude"].isna() | md["longitude"].isna(),
        "outside_area": lat.notna() & lon.notna() & ~inside(lat, lon, box),
        "rsrp_out_of_range": rsrp.notna() & ~rsrp.between(*ic.rsrp_range_dbm),
        "rsrq_out_of_range": rsrq.notna() & ~rsrq.between(*ic.rsrq_range_db),
        "unknown_cell": md["serving_cell_id"].notna() & ~md["serving_cell_id"].isin(known),
        "duplicate": exact | dup_id,
        "near_duplicate": ~exact & near,
    }, md.index)
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
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of this process and the given ones (the local Spark JVM)."""
    total = sum(os.times()[:2])
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def child_pandas(data: Path) -> dict:
    cfg = bench_config(data, data / "unused-lake")
    out = Path(tempfile.mkdtemp(prefix="pandas-ingest-"))
    c0, t0 = _cpu_s([]), time.perf_counter()
    try:
        counts = pandas_ingest(data / "cells.csv", data / "traffic", data / "mdt", cfg.ingest, out)
    except MemoryError:
        return {"error": "MemoryError", "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s([]) - c0, "peak_rss_mb": _peak_rss_mb(),
            "mdt_reports": counts["clean"]["mdt_reports"],
            "mdt_measurements": counts["clean"]["mdt_measurements"], "rows_in": counts["rows_in"],
            "rows_rejected": sum(counts["rejected"].values()), "rejects_by_reason": counts["by_reason"]}


def child_spark(data: Path, lake: Path, master: str | None = None) -> dict:
    from cellsynth.cluster import runtime
    from cellsynth.ingest import stage

    cfg = bench_config(data, lake)
    if master:
        spark_cfg = cfg.runtime.spark.model_copy(update={"master": master})
        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"spark": spark_cfg})})
    with runtime(cfg, quiet=True) as rt:
        rt.spark.range(1).count()  # session start is not ingest work
        jvms = _children(os.getpid())
        sc = rt.spark.sparkContext
        n_jobs0 = len(sc.statusTracker().getJobIdsForGroup())
        c0, t0 = _cpu_s(jvms), time.perf_counter()
        res = stage.run(cfg, rt, run_id="bench")
        seconds, cpu_s = time.perf_counter() - t0, _cpu_s(jvms) - c0
        n_jobs = len(sc.statusTracker().getJobIdsForGroup()) - n_jobs0
        jvm_rss = max((_peak_rss_mb(p) or 0.0) for p in jvms) if jvms else None
    return {"seconds": seconds, "cpu_s": cpu_s, "spark_jobs": n_jobs, "driver_python_peak_rss_mb": _peak_rss_mb(), "jvm_peak_rss_mb": jvm_rss,
            "mdt_reports": res.rows_written.get("mdt_reports"), "mdt_measurements": res.rows_written.get("mdt_measurements"),
            "rows_in": res.rows_in, "rows_rejected": res.rows_rejected, "spark": cfg.runtime.spark.model_dump()}


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


def write_result(args, runs: list[dict]) -> dict:
    """bench/results JSON from the sizes run so far (the largest finished size is the headline)."""
    done = [r for r in runs if "skipped" not in r] or runs
    big, small = done[-1], done[0]
    result = {
        "baseline": "pandas, one process, the Spark job's cleaning rules (tests/ingest/test_bench_baseline.py: same corpus counts), same Parquet input",
        "ours": "Spark ingest stage, conf/local.yaml runtime.spark (session start excluded)",
        "input": f"simulator output {args.sim} replicated by whole-week shifts",
        "baseline_s": big.get("baseline_s"), "ours_s": big.get("ours_s"),
        "ratio": big["baseline_s"] / big["ours_s"] if "baseline_s" in big and "ours_s" in big else None,
        "scaling": big["ours_s"] / small["ours_s"] if len(done) > 1 and "ours_s" in big and "ours_s" in small else None,
        "scaling_baseline": big["baseline_s"] / small["baseline_s"] if len(done) > 1 and "baseline_s" in big and "baseline_s" in small else None,
        "sizes": [r["n_reports"] for r in runs], "largest_size_run": big["n_reports"], "runs": runs, "machine": machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("baseline_s", "ours_s", "ratio", "scaling")}), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sim", default=str(ROOT / "data" / "sim"), help="simulator output folder to replicate")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest.json"))
    parser.add_argument("--pandas-limit-gb", type=float, default=12.0)
    parser.add_argument("--timeout-s", type=float, default=1200.0)
    parser.add_argument("--max-load-per-core", type=float, default=1.5,
                        help="skip sizes above 1M while the 1-minute load average per core exceeds this")
    parser.add_argument("--master", help="Spark master for the Spark runs (default: conf/local.yaml's)")
    parser.add_argument("--extra-masters", nargs="*", default=[],
                        help="also run Spark under these masters (e.g. local[1]) at the first size, for core scaling")
    parser.add_argument("--child", choices=["pandas", "spark"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "pandas":
        print(json.dumps(child_pandas(Path(args.data))), flush=True)
        return 0
    if args.child == "spark":
        print(json.dumps(child_spark(Path(args.data), Path(args.lake), args.master)), flush=True)
        return 0

    runs = []
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        for n in args.sizes:
            load1 = os.getloadavg()[0]
            if n > 1_000_000 and load1 / (os.cpu_count() or 1) > args.max_load_per_core:
                # Other engineers share the box: a 10M run under this load measures them, not us.
                runs.append({"n_reports": n, "skipped": f"load average {load1:.1f} on {os.cpu_count()} cores"})
                print(json.dumps(runs[-1]), flush=True)
                write_result(args, runs)
                continue
            data = work / f"data-{n}"
            info = replicate(Path(args.sim), data, n)
            print(json.dumps({"input": info}), flush=True)
            base = _run_child(["--child", "pandas", "--data", str(data)], limit_gb=args.pandas_limit_gb, timeout_s=args.timeout_s)
            master = ["--master", args.master] if args.master else []
            ours = _run_child(["--child", "spark", "--data", str(data), "--lake", str(work / f"lake-{n}"), *master],
                              timeout_s=args.timeout_s)
            row = {"n_reports": info["n_reports"], "input": info, "baseline": base, "ours": ours}
            for extra in args.extra_masters if n == args.sizes[0] else []:
                shutil.rmtree(work / f"lake-{n}", ignore_errors=True)
                row.setdefault("ours_by_master", {})[extra] = _run_child(
                    ["--child", "spark", "--data", str(data), "--lake", str(work / f"lake-{n}"), "--master", extra],
                    timeout_s=args.timeout_s)
            if "error" not in base:
                row["baseline_s"] = base["seconds"]
                row["baseline_rows_per_s"] = info["n_reports"] / base["seconds"]
            if "error" not in ours:
                row["ours_s"] = ours["seconds"]
                row["ours_rows_per_s"] = info["n_reports"] / ours["seconds"]
            if "error" not in base and "error" not in ours:
                # Same cleaning: both sides must keep and reject the same rows.
                row["counts_match"] = all(base[k] == ours[k] for k in ("mdt_reports", "mdt_measurements", "rows_in", "rows_rejected"))
                # Per-core throughput: rows per CPU second (pandas uses one core, Spark all of them).
                row["baseline_rows_per_cpu_s"] = info["n_reports"] / base["cpu_s"]
                row["ours_rows_per_cpu_s"] = info["n_reports"] / ours["cpu_s"]
            runs.append(row)
            print(json.dumps(row), flush=True)
            write_result(args, runs)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(work / f"lake-{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
