"""MDT in the long layout: the same reports, one row per measured cell, against the wide file.

    .venv/bin/python bench/long_layout.py                  # simulates the default scenario first
    .venv/bin/python bench/long_layout.py --sim data/sim

Cell-list exports write a report as several lines (the serving cell's and one per neighbour, each
with the report's time and position); ingest pivots them back into reports
(`sources.mdt.neighbour_layout: long`). The simulator's wide MDT file is rewritten that way, in the
order read (serving line, then the neighbours in their column order), and ingested three times: the
wide file; the long file grouped by its report id; the long file without that column, grouped by UE
and timestamp (the default `report_columns` then). Per run: rows in, clean reports and measurements,
rejects by reason, the ingest stage's wall time; for the long runs, whether `mdt_reports` and
`mdt_measurements` equal the wide run's row for row (by report id), or else how many clean reports
differ.

Writes bench/results/long_layout.json (every figure in it comes from this script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

from _sim import default_sim  # bench/, the script's folder

ROOT = Path(__file__).resolve().parents[1]
N_NEIGHBOURS = 4
REPORT_COLS = ["report_id", "ue_id", "ts", "serving_cell_id", "rsrp_dbm", "rsrq_db", "x_m", "y_m", "window",
               "cell_shard", "load_rho"]
MEAS_COLS = ["report_id", "rank", "role", "cell_id", "rsrp_dbm", "rsrq_db", "window", "cell_shard", "load_rho"]


def to_long(mdt: pd.DataFrame) -> pd.DataFrame:
    """One line per serving and neighbour measurement, a report's lines together (serving first)."""
    base = ["report_id", "ue_id", "timestamp", "latitude", "longitude"]
    parts = [mdt[base].assign(type="Serving", cell=mdt["serving_cell_id"], rsrp=mdt["serving_rsrp_dbm"],
                              rsrq=mdt["serving_rsrq_db"], _k=0)]
    for k in range(1, N_NEIGHBOURS + 1):
        present = (mdt[f"neighbour_{k}_cell_id"] != "") | (mdt[f"neighbour_{k}_rsrp_dbm"] != "")
        sub = mdt.loc[present]
        parts.append(sub[base].assign(type="Neighbor", cell=sub[f"neighbour_{k}_cell_id"],
                                      rsrp=sub[f"neighbour_{k}_rsrp_dbm"], rsrq="", _k=k))
    out = pd.concat(parts).reset_index().sort_values(["index", "_k"], kind="stable")
    return out.drop(columns=["index", "_k"])


def ingest(work: Path, sim: Path, mdt: dict) -> dict:
    from cellsynth.cluster import Runtime, make_lake
    from cellsynth.config import config_from_dict
    from cellsynth.pipeline import run_stage

    cfg = config_from_dict({
        "run": {"lake_root": str(work / "lake"), "data_dir": str(work / "data")},
        "scenario": {"enabled": False},
        "sources": {"cells": {"path": str(sim / "cells.csv")}, "traffic": {"path": str(sim / "traffic.csv")}, "mdt": mdt},
    })
    rt = Runtime(cfg=cfg, lake=make_lake(cfg), quiet=True)
    try:
        t0 = time.perf_counter()
        result = run_stage("ingest", rt, run_id="long-bench")
        wall_s = time.perf_counter() - t0
        reports = rt.lake.read_pandas("mdt_reports", columns=REPORT_COLS)
        meas = rt.lake.read_pandas("mdt_measurements", columns=MEAS_COLS)
        rejects = rt.lake.read_pandas("rejects", columns=["source", "reason_code"])
    finally:
        rt.close()
    rej = rejects[rejects["source"] == "mdt"]["reason_code"].value_counts()
    return {"rows_in": {k: int(v) for k, v in result.rows_in.items()},
            "mdt_long_rows": int(result.metrics["mdt_long_rows"]) if "mdt_long_rows" in result.metrics else None,
            "clean_reports": len(reports), "clean_measurements": len(meas),
            "mdt_rejects_by_reason": {k: int(v) for k, v in sorted(rej.items())},
            "ingest_wall_s": round(wall_s, 1),
            "_reports": reports.sort_values("report_id").reset_index(drop=True),
            "_meas": meas.sort_values(["report_id", "rank"]).reset_index(drop=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", type=Path, help="simulator output folder (default: simulate conf/local.yaml's scenario)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_layout.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-long-"))
    sim = default_sim(args.sim, tmp)
    mdt = pd.read_csv(sim / "mdt.csv", dtype=str, keep_default_na=False)
    long = to_long(mdt)
    long.to_csv(tmp / "long.csv", index=False)
    long.drop(columns=["report_id"]).to_csv(tmp / "long_no_id.csv", index=False)
    layout = {"neighbour_layout": "long", "serving_rows": {"column": "type", "in": ["Serving"]},
              "columns": {"serving_cell_id": "cell", "rsrp_dbm": "rsrp", "rsrq_db": "rsrq"}}
    runs = {}
    for name, source in (("wide", {"path": str(sim / "mdt.csv")}),
                         ("long_by_report_id", {"path": str(tmp / "long.csv"), **layout}),
                         ("long_by_ue_and_timestamp", {"path": str(tmp / "long_no_id.csv"), **layout})):
        runs[name] = ingest(tmp / name, sim, source)
        print(f"{name}: rows in {runs[name]['rows_in']}, clean {runs[name]['clean_reports']:,} reports / "
              f"{runs[name]['clean_measurements']:,} measurements, {runs[name]['ingest_wall_s']:.0f} s", flush=True)
    wide = runs["wide"]
    for name in ("long_by_report_id", "long_by_ue_and_timestamp"):
        run = runs[name]
        same_reports = run["_reports"].equals(wide["_reports"])
        same_meas = run["_meas"].equals(wide["_meas"])
        run["reports_equal_wide"], run["measurements_equal_wide"] = bool(same_reports), bool(same_meas)
        # (ids differ when grouped by UE and timestamp: compare the content)
        key = ["ue_id", "ts", "serving_cell_id", "rsrp_dbm"]
        both = wide["_reports"][key].merge(run["_reports"][key], how="outer", indicator=True)
        run["clean_reports_only_in_wide"] = int((both["_merge"] == "left_only").sum())
        run["clean_reports_only_here"] = int((both["_merge"] == "right_only").sum())
    out = {
        "what": "the simulator's MDT as one line per measured cell (long layout), ingested against the wide file",
        "sim": str(sim), "n_reports": len(mdt), "n_long_lines": len(long),
        "code": subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "runs": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
