"""Bench: pruned vs dense association (the product's MAP rule, density.association: map) on a
5,000-cell layout, and our bandwidth selection vs scikit-learn GridSearchCV over the same grid.

Writes bench/results/density.json: baseline_s (dense), ours_s (pruned), ratio = dense / pruned,
agreement (share of positions assigned the same cell), and the bandwidth-selection comparison:
like for like (GridSearchCV on the very same single 80/20 split, refit on all rows, as
GaussianKDE2D.fit does) and, separately, how often one split picks what 5-fold CV picks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity

from cellsynth.density import CellSupportIndex, GaussianKDE2D, associate_dense
from cellsynth.density.transforms import association_log_prior

N_SITES = int(os.environ.get("BENCH_N_SITES", 1667))  # x 3 sectors = 5,001 cells
N_POSITIONS = int(os.environ.get("BENCH_N_POSITIONS", 5000))
GRID_M = (25.0, 50.0, 100.0, 200.0, 400.0)


def layout_positions(rng: np.random.Generator) -> list[np.ndarray]:
    """Sites on a jittered 500 m grid, 3 sectors; each cell's UEs scattered in front of it."""
    side = int(np.ceil(np.sqrt(N_SITES)))
    out = []
    for s in range(N_SITES):
        site = np.array([s % side, s // side], float) * 500.0 + rng.normal(0, 60, 2)
        for az in np.radians([0.0, 120.0, 240.0]):
            centre = site + 220.0 * np.array([np.sin(az), np.cos(az)])
            n = int(rng.integers(15, 90))
            out.append(centre + rng.normal(0, rng.uniform(90, 180), size=(n, 2)))
    return out


def _same_split(n: int, *, seed: int, validation_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    # select_bandwidth's split: the first round(0.2 n) rows of one permutation are validation rows.
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(validation_fraction * n))), n - 1)
    return order[n_val:], order[:n_val]


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": sys.version.split()[0]}


def main() -> None:
    rng = np.random.default_rng(0)
    cells_xy = layout_positions(rng)
    cell_ids = [f"c{i:05d}" for i in range(len(cells_xy))]
    t0 = time.perf_counter()
    kdes = [GaussianKDE2D(bandwidth_grid_m=GRID_M, random_state=i).fit(xy) for i, xy in enumerate(cells_xy)]
    fit_s = time.perf_counter() - t0
    allxy = np.vstack(cells_xy)
    pts = allxy[rng.integers(0, len(allxy), N_POSITIONS)] + rng.normal(0, 100, size=(N_POSITIONS, 2))

    log_prior = association_log_prior([k.n_reports_ for k in kdes], mode="map")
    t0 = time.perf_counter()
    index = CellSupportIndex(cell_ids, kdes, k_bandwidths=6.0, log_prior=log_prior)
    pruned = index.associate(pts)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = associate_dense(cell_ids, kdes, pts, log_prior=log_prior)
    baseline_s = time.perf_counter() - t0
    agreement = float((pruned == dense).mean())

    # Bandwidth selection (GUMBLE eq. 14), like for like: ours (one 80/20 split, then a refit on
    # all rows) vs GridSearchCV scoring the very same split and refitting. Then, separately, the
    # protocol question: how often one split picks the bandwidth 5-fold CV picks.
    sample = [cells_xy[i] for i in rng.choice(len(cells_xy), 200, replace=False)]
    t0 = time.perf_counter()
    ours_h = [GaussianKDE2D(bandwidth_grid_m=GRID_M, validation_fraction=0.2, random_state=1, min_reports=2).fit(xy).bandwidth_m_
              for xy in sample]
    bw_ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    same_split_h = [
        GridSearchCV(KernelDensity(kernel="gaussian", algorithm="kd_tree"), {"bandwidth": list(GRID_M)}, cv=[_same_split(len(xy), seed=1)])
        .fit(xy).best_params_["bandwidth"]
        for xy in sample
    ]
    bw_same_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gs_h = [
        GridSearchCV(KernelDensity(kernel="gaussian", algorithm="kd_tree"), {"bandwidth": list(GRID_M)}, cv=5)
        .fit(xy).best_params_["bandwidth"]
        for xy in sample
    ]
    bw_gs_s = time.perf_counter() - t0
    ours_h, same_split_h, gs_h = np.array(ours_h), np.array(same_split_h), np.array(gs_h)

    result = {
        "name": "density",
        "baseline": "dense MAP scoring (every position against every cell, log f_i + log n_i/n)",
        "ours": "pruned MAP (STR-tree over support boxes inflated by 6 bandwidths, exact fallback)",
        "baseline_s": round(baseline_s, 3),
        "ours_s": round(ours_s, 3),
        "ratio": round(baseline_s / ours_s, 2),
        "agreement": agreement,
        "n_dense_fallback": int(index.n_dense_fallback_),
        "sizes": {"n_cells": len(cell_ids), "n_positions": N_POSITIONS, "n_training_positions": int(len(allxy))},
        "kde_fit_s": round(fit_s, 2),
        "bandwidth_selection": {
            "n_cells": len(sample), "grid_m": list(GRID_M),
            "ours": "GaussianKDE2D.fit: select_bandwidth (one 80/20 held-out split, eq. 14) + refit on all rows",
            "ours_s": round(bw_ours_s, 3),
            "like_for_like": {
                "baseline": "sklearn GridSearchCV(KernelDensity) on the same single 80/20 split, refit=True",
                "baseline_s": round(bw_same_s, 3), "ratio": round(bw_same_s / bw_ours_s, 2),
                "same_bandwidth_share": float(np.mean(ours_h == same_split_h)),
            },
            "versus_5fold_cv": {
                "baseline": "sklearn GridSearchCV(KernelDensity, cv=5), refit=True (5x the fits: a different protocol)",
                "baseline_s": round(bw_gs_s, 3), "ratio": round(bw_gs_s / bw_ours_s, 2),
                "same_bandwidth_share": float(np.mean(ours_h == gs_h)),
                "within_one_grid_step_share": float(np.mean(np.abs(np.log2(ours_h / gs_h)) <= 1.0)),
            },
        },
        "machine": machine(),
    }
    out = Path(__file__).resolve().parent / "results" / "density.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
