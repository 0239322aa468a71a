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
def pandas_ingest(data: Path, cfg) -> dict[str, int]:
    """The same cleaning in plain pandas on one core (reasons, dedup, frame, windows, load join)."""
    from cellsynth.geo import LocalFrame
    from cellsynth.windows import window_of

    ic = cfg.ingest
    cells = pd.read_csv(data / "cells.csv", dtype=str)
    cells = cells.drop_duplicates("cell_id")
    clat, clon = pd.to_numeric(cells["latitude"], errors="coerce"), pd.to_numeric(cells["longitude"], errors="coerce")
    frame = LocalFrame.around(clat.to_numpy(), clon.to_numpy())
    cx, cy = frame.to_xy(clat.to_numpy(), clon.to_numpy())
    m = ic.area_margin_m
    box = (np.nanmin(cx) - m, np.nanmin(cy) - m, np.nanmax(cx) + m, np.nanmax(cy) + m)
    tr = pd.read_parquet(data / "traffic")
    tr["ts"] = pd.to_datetime(tr["timestamp"], utc=True, errors="coerce", format="ISO8601")
    tr["load_rho"] = pd.to_numeric(tr["prb_util_pct"], errors="coerce") / 100
    tr_bad = tr["ts"].isna() | ~tr["load_rho"].between(0, 1) | tr.duplicated(["cell_id", "ts"]) | ~tr["cell_id"].isin(cells["cell_id"])
    tr = tr[~tr_bad]
    tr["window"] = window_of(tr["ts"], ic.windows)
    md = pd.read_parquet(data / "mdt")
    md["ts"] = pd.to_datetime(md["timestamp"], utc=True, errors="coerce", format="ISO8601")
    lat, lon = pd.to_numeric(md["latitude"], errors="coerce"), pd.to_numeric(md["longitude"], errors="coerce")
    rsrp, rsrq = pd.to_numeric(md["serving_rsrp_dbm"], errors="coerce"), pd.to_numeric(md["serving_rsrq_db"], errors="coerce")
    x, y = frame.to_xy(lat.to_numpy(), lon.to_numpy())
    md["x_m"], md["y_m"] = x, y
    outside = ~((md["x_m"] >= box[0]) & (md["x_m"] <= box[2]) & (md["y_m"] >= box[1]) & (md["y_m"] <= box[3]))
    bad = md["ts"].isna() | lat.isna() | lon.isna() | outside | ~rsrp.between(*ic.rsrp_range_dbm)
    bad |= ~(rsrq.between(*ic.rsrq_range_db) | rsrq.isna()) | md["report_id"].isna() | md["serving_cell_id"].isna()
    bad |= ~md["serving_cell_id"].isin(cells["cell_id"]) | md.duplicated("report_id")
    md = md.sort_values(["ue_id", "ts"])
    dt = md.groupby("ue_id")["ts"].diff().dt.total_seconds().abs()
    dist = np.hypot(md.groupby("ue_id")["x_m"].diff(), md.groupby("ue_id")["y_m"].diff())
    bad = bad.reindex(md.index) | ((dt <= ic.near_duplicate_s) & (dist <= ic.near_duplicate_m))
    clean = md[~bad].copy()
    del md
    clean["window"] = window_of(clean["ts"], ic.windows)
    clean["hour"] = clean["ts"].dt.floor("h")
    lk = tr.assign(hour=tr["ts"].dt.floor("h"))[["cell_id", "hour", "load_rho"]].rename(columns={"cell_id": "serving_cell_id"})
    clean = clean.merge(lk, on=["serving_cell_id", "hour"], how="left")
    nbs = []
    for k in range(1, 9):
        if f"neighbour_{k}_cell_id" not in clean:
            break
        nb = clean[["report_id", f"neighbour_{k}_cell_id", f"neighbour_{k}_rsrp_dbm"]].dropna()
        nb.columns = ["report_id", "cell_id", "rsrp_dbm"]
        nb = nb[nb["rsrp_dbm"].between(*ic.rsrp_range_dbm) & nb["cell_id"].isin(cells["cell_id"])]
        nbs.append(nb)
    meas = pd.concat(nbs)
    out = Path(tempfile.mkdtemp(prefix="pandas-ingest-"))
    clean.drop(columns=["hour"]).to_parquet(out / "mdt_reports.parquet")
    meas.to_parquet(out / "mdt_measurements.parquet")
    shutil.rmtree(out)
    return {"mdt_reports": len(clean), "mdt_measurements": len(clean) + len(meas)}


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


def child_pandas(data: Path) -> dict:
    cfg = bench_config(data, data / "unused-lake")
    t0 = time.perf_counter()
    try:
        counts = pandas_ingest(data, cfg)
    except MemoryError:
        return {"error": "MemoryError", "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb(), **counts}


def child_spark(data: Path, lake: Path) -> dict:
    from cellsynth.cluster import runtime
    from cellsynth.ingest import stage

    cfg = bench_config(data, lake)
    with runtime(cfg, quiet=True) as rt:
        rt.spark.range(1).count()  # session start is not ingest work
        jvms = _children(os.getpid())
        sc = rt.spark.sparkContext
        n_jobs0 = len(sc.statusTracker().getJobIdsForGroup())
        t0 = time.perf_counter()
        res = stage.run(cfg, rt, run_id="bench")
        seconds = time.perf_counter() - t0
        n_jobs = len(sc.statusTracker().getJobIdsForGroup()) - n_jobs0
        jvm_rss = max((_peak_rss_mb(p) or 0.0) for p in jvms) if jvms else None
    return {"seconds": seconds, "spark_jobs": n_jobs, "driver_python_peak_rss_mb": _peak_rss_mb(), "jvm_peak_rss_mb": jvm_rss,
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
        "baseline": "pandas, one process, same cleaning rules (input read from the same Parquet files)",
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
    parser.add_argument("--child", choices=["pandas", "spark"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "pandas":
        print(json.dumps(child_pandas(Path(args.data))), flush=True)
        return 0
    if args.child == "spark":
        print(json.dumps(child_spark(Path(args.data), Path(args.lake))), flush=True)
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
            ours = _run_child(["--child", "spark", "--data", str(data), "--lake", str(work / f"lake-{n}")], timeout_s=args.timeout_s)
            row = {"n_reports": info["n_reports"], "input": info, "baseline": base, "ours": ours}
            if "error" not in base:
                row["baseline_s"] = base["seconds"]
                row["baseline_rows_per_s"] = info["n_reports"] / base["seconds"]
            if "error" not in ours:
                row["ours_s"] = ours["seconds"]
                row["ours_rows_per_s"] = info["n_reports"] / ours["seconds"]
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
