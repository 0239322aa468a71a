"""Bench: serving-cell association accuracy on held-out reports, MAP vs GUMBLE eq. 15 (ML) vs the
nearest-site baseline, on ingested lakes (the simulator's default scenario and the UCC 5G traces).

Each lake is read as the density stage reads it: the same train/test split (`splits.held_out`),
the same per-(window, cell) KDEs (`density.model.kde_from_config`), scored on the held-out
reports against their observed serving cell. Writes bench/results/association.json.

Make the lakes first (the commands the JSON records):
    cellsynth run --config conf/local.yaml --set run.lake_root=LAKE_SIM ...
    cellsynth ingest --config conf/examples/ucc-5g.yaml --set run.lake_root=LAKE_UCC
then: python bench/association.py --lake sim=LAKE_SIM --lake ucc=LAKE_UCC
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellsynth.config import PipelineConfig
from cellsynth.density import DensityModels, nearest_site_associate
from cellsynth.density.model import kde_from_config
from cellsynth.lake import Lake
from cellsynth.splits import held_out, split_seed

RULES = ("map", "ml")


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": sys.version.split()[0]}


def score_lake(root: str, cfg: PipelineConfig) -> dict:
    lake = Lake(root)
    reports = lake.read_pandas("mdt_reports", columns=["report_id", "window", "x_m", "y_m", "serving_cell_id"])
    cells = lake.read_pandas("cells")
    test = held_out(cfg, reports["report_id"].to_numpy())
    train, held = reports[~test], reports[test]
    t0 = time.perf_counter()
    kdes: dict[str, dict[str, object]] = {}
    for (window, cell_id), pts in train.groupby(["window", "serving_cell_id"], sort=True):
        kdes.setdefault(window, {})[cell_id] = kde_from_config(cfg.density, seed=split_seed(cfg), window=window, cell_id=cell_id).fit(pts[["x_m", "y_m"]].to_numpy())
    fit_s = time.perf_counter() - t0
    models = DensityModels.from_kdes(kdes, prune_k_bandwidths=cfg.density.prune_k_bandwidths, association="map",
                                     association_bandwidth_scales=cfg.density.association_bandwidth_scales)
    hits = {r: 0 for r in (*RULES, "nearest_site")}
    n = 0
    for window, part in held.groupby("window"):
        if window not in kdes:
            continue
        xy = part[["x_m", "y_m"]].to_numpy()
        truth = part["serving_cell_id"].to_numpy(dtype=object)
        for rule in RULES:
            hits[rule] += int((models.associate(window, xy, rule=rule) == truth).sum())
        hits["nearest_site"] += int((nearest_site_associate(cells, xy) == truth).sum())
        n += len(part)
    sources = [str(s) for s in (kdes[w][c].bandwidth_source_ for w in kdes for c in kdes[w])]
    return {
        "lake": root,
        "n_train_reports": int(len(train)), "n_test_reports": int(n), "n_cells": int(len(cells)),
        "n_window_cell_kdes": len(sources), "fallback_kde_share": float(np.mean([s == "fallback" for s in sources])),
        "location_estimated": bool(cells.get("location_estimated", pd.Series([False])).any()),
        "accuracy": {f"kde_{r}" if r in RULES else r: hits[r] / max(n, 1) for r in hits},
        "kde_fit_s": round(fit_s, 2),
        "map_bandwidth_scale_by_window": dict(models.association_scale_),
        "map_cv_accuracy_by_window": {w: {f"{k:g}": v for k, v in cv.items()} for w, cv in models.association_cv_.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lake", action="append", required=True, help="NAME=PATH of an ingested lake")
    args = ap.parse_args(argv)
    cfg = PipelineConfig()
    result = {
        "name": "association",
        "baseline": "nearest site (sector by bearing), same held-out reports",
        "ours": "per-(window, cell) KDEs, MAP rule (density.association: map; bandwidth scale by 3-fold CV on "
                "training reports, density.association_bandwidth_scales) and GUMBLE eq. 15 (ml, no prior, scale 1)",
        "scales": list(cfg.density.association_bandwidth_scales),
        "split": {"test_fraction": cfg.split.test_fraction, "seed": split_seed(cfg), "target": "observed serving cell"},
        "datasets": {},
        "machine": machine(),
    }
    for item in args.lake:
        name, root = item.split("=", 1)
        result["datasets"][name] = score_lake(root, cfg)
        print(name, json.dumps(result["datasets"][name]["accuracy"]), flush=True)
    out = Path(__file__).resolve().parent / "results" / "association.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
