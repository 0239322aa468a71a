"""What baselines at parity cost in `evaluate` (issue 20 item 4), on a default-run lake.

Times the evaluate stage's RSRP section (`evaluate.stage.radio_scores`: our model plus kNN, RF
and GP per cell) twice in the same process on the same held-out rows: with the former settings
(baselines on up to 3,000 rows per cell, kNN k = 10, RF 30 trees, GP on 300 rows) and with the
parity settings (our per-cell row cap, kNN k by CV, RF 200 trees, GP on 1,000 rows).
The former kNN's std (its neighbours' spread) is not reproduced: only its mean and cost are.

Writes bench/results/evaluate_parity.json (baseline_s = former, ours_s = parity, ratio =
former / parity: below 1 means parity costs more). Usage (after `make run`):
    python bench/evaluate_parity.py [--config conf/local.yaml] [--lake ./lake]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cellsynth.config import load_config
from cellsynth.evaluate import stage
from cellsynth.lake import Lake
from cellsynth.radio import RadioModels
from cellsynth.radio.baselines import BaselineSettings

FORMER = {"settings": BaselineSettings(knn_k_grid=(10,), rf_n_estimators=30, gp_max_train=300), "cap": 3000}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="conf/local.yaml")
    ap.add_argument("--lake", default=None, help="lake root (default: the config's run.lake_root)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "evaluate_parity.json"))
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [f"run.lake_root={args.lake}"] if args.lake else [])
    lake = Lake(cfg.run.lake_root)
    if not lake.exists("radio_models"):
        print(f"skipped: no radio_models in {cfg.run.lake_root}; run the pipeline first (make run)")
        return {}
    inp = stage.Inputs(reports=lake.read_pandas("mdt_reports"), measurements=lake.read_pandas("mdt_measurements"),
                       cells=lake.read_pandas("cells"), radio=RadioModels.load(lake))
    runs = {}
    parity = stage.baseline_settings(cfg)
    for label, settings, cap in (("former", FORMER["settings"], FORMER["cap"]),
                                 ("parity", parity, stage.our_row_cap(cfg))):
        out = stage._Out("bench")
        t0 = time.perf_counter()
        headline = stage.radio_scores(out, inp, cfg, settings=settings, cap=cap)
        seconds = time.perf_counter() - t0
        frame = out.frame()
        ce = frame[(frame["metric"] == "rsrp_calibration_error") & frame["cell_id"].isna()].set_index("model")["value"]
        runs[label] = {"seconds": seconds, "row_cap": cap, "settings": settings.as_dict(),
                       "mae_db": {k.removeprefix("rsrp_mae_"): v for k, v in headline.items()},
                       "calibration_error": ce.to_dict()}
        print(label, json.dumps(runs[label]["mae_db"]), f"{seconds:.1f} s", flush=True)
    n_cells = int(inp.measurements["cell_id"].nunique())
    result = {"baseline": "evaluate's RSRP section with the former baseline settings",
              "ours": "the same with baselines at parity",
              "baseline_s": runs["former"]["seconds"], "ours_s": runs["parity"]["seconds"],
              "ratio": runs["former"]["seconds"] / runs["parity"]["seconds"],
              "sizes": {"reports": len(reports), "measurements": len(inp.measurements), "cells": n_cells,
                        "max_test_rows": cfg.evaluate.max_test_rows},
              "runs": runs, "parity_description": stage.baseline_descriptions(cfg),
              "machine": {"cores": os.cpu_count(),
                          "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
