"""The README's default-run figures: run the embedded default pipeline (conf/local.yaml) into a fresh
lake, or read a lake such a run wrote, and write bench/results/default_run.json with the report's
summary table (every headline figure against its reference, pass/warn), the headline values the
README quotes, and each stage's wall time from the run registry.

    python bench/default_run.py                 # runs `cellsynth run` into a temporary folder
    python bench/default_run.py --lake LAKE     # a lake a default run already wrote
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from cellsynth.evaluate.report import _overall, summary_table
from cellsynth.lake import Lake

ROOT = Path(__file__).resolve().parents[1]
# (key in the JSON, metric, model, split): the overall rows the README quotes.
HEADLINES = (
    ("rsrp_mae_db", "rsrp_mae_dbm", None, "test"),
    ("rsrp_calibration_error", "rsrp_calibration_error", None, "test"),
    ("rsrq_mae_db", "rsrq_mae_db", None, "test"),
    ("rsrq_calibration_error", "rsrq_calibration_error", None, "test"),
    ("rsrp_epistemic_inside_db", "rsrp_mean_epistemic_db", "bnn", "inside"),
    ("rsrp_epistemic_outside_db", "rsrp_mean_epistemic_db", "bnn", "outside"),
    ("association_accuracy", "association_accuracy", None, "observed"),
    ("map_ks_mean_all", "map_ks_mean", None, "all"),
    ("map_ks_mean_holdout_cells", "map_ks_mean", None, "holdout_cells"),
    ("kde_vs_voronoi_ks_gain", "kde_vs_voronoi_ks_gain", None, "all"),
    ("student_vs_voronoi_ks_gain", "student_vs_voronoi_ks_gain", None, "holdout_cells"),
    ("fingerprint_rmse_m", "fingerprint_rmse_m", None, "test"),
    ("fingerprint_rmse_ratio", "fingerprint_rmse_ratio", None, "test"),
    ("privacy_dcr_ratio", "privacy_dcr_ratio", None, "to_train"),
    ("traffic_jsd_holdout_cells", "jsd", None, "holdout_cells"),
    ("traffic_crps_mb_holdout_cells", "crps_mb", None, "holdout_cells"),
)


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": sys.version.split()[0],
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def figures(lake_root: str) -> dict:
    lake = Lake(lake_root)
    metrics = lake.read_pandas("metrics")
    reports = lake.read_pandas("mdt_reports", columns=["report_id"])
    rejects = lake.read_pandas("rejects", columns=["source", "reason_code"]) if lake.exists("rejects") else None
    table = summary_table(metrics, rejects=rejects, n_clean_reports=len(reports))
    overall = _overall(metrics)
    heads: dict[str, dict[str, float] | float] = {}
    for key, metric, model, split in HEADLINES:
        rows = overall[(overall["metric"] == metric) & (overall["split"] == split)]
        if model is not None:
            rows = rows[rows["model"] == model]
        if rows.empty:
            continue
        by_model = {str(m) or "-": float(v) for m, v in zip(rows["model"], rows["value"])}
        heads[key] = by_model if model is None else next(iter(by_model.values()))
    runs = lake.read_pandas("runs")
    done = runs[runs["status"] == "succeeded"].sort_values("ended_at").groupby("stage").tail(1)
    stage_s = {r.stage: round((r.ended_at - r.started_at).total_seconds(), 1) for r in done.itertuples()}
    return {"summary": table.to_dict(orient="records"), "headline": heads, "stage_s": stage_s,
            "n_clean_reports": int(len(reports)), "n_rejects": 0 if rejects is None else int(len(rejects))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lake", help="lake of an earlier default run (default: run one now)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "default_run.json"))
    args = ap.parse_args(argv)
    result: dict = {"name": "default_run", "config": "conf/local.yaml (embedded default, simulator input)"}
    if args.lake:
        lake_root = args.lake
        result["lake"] = lake_root
    else:
        tmp = tempfile.mkdtemp(prefix="cellsynth-default-")
        lake_root = str(Path(tmp) / "lake")
        cmd = [sys.executable, "-m", "cellsynth.cli", "run", "--config", str(ROOT / "conf" / "local.yaml"),
               "--set", f"run.lake_root={lake_root}", "--set", f"run.data_dir={Path(tmp) / 'data'}", "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        result["run_s"] = round(time.perf_counter() - t0, 1)
    result.update(figures(lake_root))
    result["machine"] = machine()
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result["headline"], indent=1))
    return result


if __name__ == "__main__":
    main()
