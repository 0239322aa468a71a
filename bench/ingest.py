"""Ingest benchmark: the Spark ingest stage vs a straightforward pandas cleaning of the same input.

    .venv/bin/python bench/ingest.py                 # 1M and 10M reports (the issue's sizes)
    .venv/bin/python bench/ingest.py --sizes 20000 200000

Writes bench/results/ingest.json: baseline_s/ours_s/ratio at the largest size (ratio = pandas time
/ Spark time), rows/s for both at every size, scaling = Spark time(largest) / time(smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellsynth.cluster import runtime
from cellsynth.config import config_from_dict
from cellsynth.geo import LocalFrame
from cellsynth.ingest import stage
from cellsynth.windows import window_of


def make_corpus(folder: Path, n_reports: int, *, n_cells: int = 300, seed: int = 0) -> None:
    """Simulator-shaped raw files (cells.csv, traffic.csv, mdt.csv) with ~3 % dirt."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lat0, lon0 = 44.4949, 11.3426
    cell_ids = np.array([f"C{i:05d}" for i in range(n_cells)])
    clat = lat0 + rng.uniform(-0.03, 0.03, n_cells)
    clon = lon0 + rng.uniform(-0.04, 0.04, n_cells)
    pd.DataFrame({"cell_id": cell_ids, "site_id": cell_ids, "latitude": clat, "longitude": clon, "azimuth_deg": 0.0,
                  "height_m": 25.0, "tx_power_dbm": 46.0, "freq_mhz": 1800.0}).to_csv(folder / "cells.csv", index=False)
    hours = pd.date_range("2026-01-05", periods=24 * 7, freq="h", tz="UTC")
    tr = pd.DataFrame({"cell_id": np.repeat(cell_ids, len(hours)), "timestamp": np.tile(hours.strftime("%Y-%m-%dT%H:%M:%SZ"), n_cells)})
    tr["traffic_mb"] = rng.gamma(2.0, 50.0, len(tr)).round(3)
    tr["prb_util_pct"] = rng.uniform(0, 100, len(tr)).round(2)
    tr.to_csv(folder / "traffic.csv", index=False)
    chunk = 1_000_000
    with open(folder / "mdt.csv", "w") as fh:
        for start in range(0, n_reports, chunk):
            n = min(chunk, n_reports - start)
            serving = rng.integers(0, n_cells, n)
            ts = pd.Timestamp("2026-01-05", tz="UTC") + pd.to_timedelta(rng.uniform(0, 7 * 86400, n), unit="s")
            df = pd.DataFrame({
                "report_id": [f"r{i}" for i in range(start, start + n)], "ue_id": [f"u{i}" for i in rng.integers(0, 5000, n)],
                "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "latitude": (clat[serving] + rng.normal(0, 0.003, n)).round(6),
                "longitude": (clon[serving] + rng.normal(0, 0.004, n)).round(6),
                "serving_cell_id": cell_ids[serving], "serving_rsrp_dbm": rng.normal(-95, 12, n).round(1),
                "serving_rsrq_db": rng.normal(-11, 3, n).round(1),
            })
            for k in (1, 2):
                nb = rng.integers(0, n_cells, n)
                df[f"neighbour_{k}_cell_id"] = cell_ids[nb]
                df[f"neighbour_{k}_rsrp_dbm"] = rng.normal(-105, 10, n).round(1)
            df.to_csv(fh, index=False, header=start == 0)


def pandas_ingest(folder: Path, cfg) -> dict[str, int]:
    """The same cleaning in plain pandas on one core (reasons, dedup, frame, windows, load join)."""
    ic = cfg.ingest
    cells = pd.read_csv(folder / "cells.csv", dtype=str)
    cells = cells.drop_duplicates("cell_id")
    clat, clon = pd.to_numeric(cells["latitude"], errors="coerce"), pd.to_numeric(cells["longitude"], errors="coerce")
    frame = LocalFrame.around(clat.to_numpy(), clon.to_numpy())
    tr = pd.read_csv(folder / "traffic.csv", dtype=str)
    tr["ts"] = pd.to_datetime(tr["timestamp"], utc=True, errors="coerce")
    tr["load_rho"] = pd.to_numeric(tr["prb_util_pct"], errors="coerce") / 100
    tr_bad = tr["ts"].isna() | ~tr["load_rho"].between(0, 1) | tr.duplicated(["cell_id", "ts"]) | ~tr["cell_id"].isin(cells["cell_id"])
    tr = tr[~tr_bad]
    tr["window"] = window_of(tr["ts"], ic.windows)
    md = pd.read_csv(folder / "mdt.csv", dtype=str)
    md["ts"] = pd.to_datetime(md["timestamp"], utc=True, errors="coerce")
    lat, lon = pd.to_numeric(md["latitude"], errors="coerce"), pd.to_numeric(md["longitude"], errors="coerce")
    rsrp, rsrq = pd.to_numeric(md["serving_rsrp_dbm"], errors="coerce"), pd.to_numeric(md["serving_rsrq_db"], errors="coerce")
    x, y = frame.to_xy(lat.to_numpy(), lon.to_numpy())
    md["x_m"], md["y_m"] = x, y
    bad = md["ts"].isna() | lat.isna() | lon.isna() | ~rsrp.between(*ic.rsrp_range_dbm) | ~(rsrq.between(*ic.rsrq_range_db) | rsrq.isna())
    bad |= ~md["serving_cell_id"].isin(cells["cell_id"]) | md.duplicated(md.columns.difference(["report_id", "x_m", "y_m", "ts"]).tolist())
    md = md.sort_values(["ue_id", "ts"])
    dt = md.groupby("ue_id")["ts"].diff().dt.total_seconds().abs()
    dist = np.hypot(md.groupby("ue_id")["x_m"].diff(), md.groupby("ue_id")["y_m"].diff())
    bad = bad.reindex(md.index) | ((dt <= ic.near_duplicate_s) & (dist <= ic.near_duplicate_m))
    clean = md[~bad].copy()
    clean["window"] = window_of(clean["ts"], ic.windows)
    clean["hour"] = clean["ts"].dt.floor("h")
    lk = tr.assign(hour=tr["ts"].dt.floor("h"))[["cell_id", "hour", "load_rho"]].rename(columns={"cell_id": "serving_cell_id"})
    clean = clean.merge(lk, on=["serving_cell_id", "hour"], how="left")
    nbs = []
    for k in (1, 2):
        nb = clean[["report_id", f"neighbour_{k}_cell_id", f"neighbour_{k}_rsrp_dbm"]].dropna()
        nb.columns = ["report_id", "cell_id", "rsrp_dbm"]
        nbs.append(nb)
    meas = pd.concat(nbs)
    out = Path(tempfile.mkdtemp(prefix="pandas-ingest-"))
    clean.drop(columns=["hour"]).to_parquet(out / "mdt_reports.parquet")
    meas.to_parquet(out / "mdt_measurements.parquet")
    shutil.rmtree(out)
    return {"mdt_reports": len(clean), "mdt_measurements": len(clean) + len(meas)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest.json"))
    args = parser.parse_args(argv)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        for n in args.sizes:
            data = work / f"data-{n}"
            make_corpus(data, n)
            cfg = config_from_dict({
                "run": {"lake_root": str(work / f"lake-{n}"), "data_dir": str(work)},
                "scenario": {"enabled": False},
                "runtime": {"spark": {"master": "local[2]", "shuffle_partitions": 8, "driver_memory": "3g"}},
                "sources": {k: {"path": str(data / f"{k}.csv")} for k in ("mdt", "traffic", "cells")},
            })
            t0 = time.perf_counter()
            base_counts = pandas_ingest(data, cfg)
            base_s = time.perf_counter() - t0
            with runtime(cfg, quiet=True) as rt:
                t0 = time.perf_counter()
                res = stage.run(cfg, rt, run_id=f"bench-{n}")
                ours_s = time.perf_counter() - t0
            rows.append({"n_reports": n, "baseline_s": base_s, "ours_s": ours_s,
                         "baseline_rows_per_s": n / base_s, "ours_rows_per_s": n / ours_s,
                         "baseline_clean": base_counts["mdt_reports"], "ours_clean": res.rows_written.get("mdt_reports")})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(work / f"lake-{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    big, small = rows[-1], rows[0]
    result = {
        "baseline": "pandas, one process", "ours": "Spark ingest stage, local[2]",
        "baseline_s": big["baseline_s"], "ours_s": big["ours_s"], "ratio": big["baseline_s"] / big["ours_s"],
        "scaling": big["ours_s"] / small["ours_s"] if len(rows) > 1 else None, "sizes": args.sizes, "runs": rows,
        "machine": {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "python": sys.version.split()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("baseline_s", "ours_s", "ratio", "scaling")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
