"""Batched per-shard SVI vs one SVI loop per cell: same model, steps and data, side by side.

Baseline: one Pyro SVI loop per cell (Trace_ELBO on the traces, `svi_loss="pyro"`), the way a
Pyro user trains one model per cell. Ours: the product's path, one loop per shard of cells with
the written-out Trace_ELBO estimator (`svi_loss="fused"`, the radio default). A third side, one
fused loop per cell, splits the ratio into what batching gives and what the fused loss gives:
ratio = ratio_batching (per-cell fused / batched fused) x ratio_fused_loss (per-cell Pyro /
per-cell fused).

Simulated log-distance fields with a smooth residual and 4 dB noise, >= 500 cells in shards of
`--cells-per-shard`. The batched side trains every shard (one loop each); the per-cell side
trains `--per-cell-sample` of the same cells alone (one loop each), and its rate is what
cells/s means for it (running all 512 alone would take ~10x longer for the same figure).
Writes bench/results/radio.json: baseline_s / ours_s are seconds per cell, ratio = baseline/ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from cellsynth.radio.model import CellData, FitSettings, fit_cells


def simulate(n_cells: int, n_rows: int, seed: int) -> tuple[list[CellData], list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    cells, tests = [], []
    for c in range(n_cells):
        site = rng.uniform(-20000, 20000, 2)
        bump_at = site + rng.uniform(-400, 400, 2)

        def truth(xy):
            d_km = np.maximum(np.linalg.norm(xy - site, axis=1), 10) / 1000
            return -70 - 35 * np.log10(d_km) - 6 * np.exp(-np.sum((xy - bump_at) ** 2, axis=1) / (2 * 250.0**2))

        xy = site + rng.uniform(-700, 700, (n_rows, 2))
        xt = site + rng.uniform(-700, 700, (100, 2))
        cells.append(CellData(f"c{c:04d}", xy, truth(xy) + 4 * rng.standard_normal(n_rows), origin_xy_m=site))
        tests.append((xt, truth(xt) + 4 * rng.standard_normal(100)))
    return cells, tests


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--cells-per-shard", type=int, default=64)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--per-cell-sample", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "radio.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: 2 threads were ~50x slower on these machines
    cells, tests = simulate(args.cells, args.rows, seed=0)
    settings = FitSettings(n_centres=16, n_steps=args.steps)
    shards = [list(range(s, min(s + args.cells_per_shard, args.cells))) for s in range(0, args.cells, args.cells_per_shard)]

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    batched = {}
    for k, idx in enumerate(shards):
        fitted = fit_cells([cells[i] for i in idx], target="rsrp", settings=settings, seed=k)
        for j, i in enumerate(idx):
            batched[i] = (fitted, j)
    batched_s = time.perf_counter() - t0
    rss_batched_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    sample = list(range(0, args.cells, max(1, args.cells // args.per_cell_sample)))[: args.per_cell_sample]
    pyro_settings = dataclasses.replace(settings, svi_loss="pyro")
    t0 = time.perf_counter()
    alone = {i: fit_cells([cells[i]], target="rsrp", settings=pyro_settings, seed=100 + i) for i in sample}
    per_cell_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone_fused = {i: fit_cells([cells[i]], target="rsrp", settings=settings, seed=100 + i) for i in sample}
    per_cell_fused_s = time.perf_counter() - t0

    def mae_of(fitted, j, i):
        xt, yt = tests[i]
        return float(np.mean(np.abs(fitted.predict(np.full(len(xt), j), xt, n_samples=64).mean - yt)))

    mae_batched = float(np.mean([mae_of(*batched[i], i) for i in sample]))
    mae_alone = float(np.mean([mae_of(alone[i], 0, i) for i in sample]))
    mae_alone_fused = float(np.mean([mae_of(alone_fused[i], 0, i) for i in sample]))
    mae_batched_all = float(np.mean([mae_of(*batched[i], i) for i in range(args.cells)]))
    ours = batched_s / args.cells
    base = per_cell_s / len(sample)
    base_fused = per_cell_fused_s / len(sample)
    out = {
        "baseline": "one Pyro SVI loop (Trace_ELBO) per cell",
        "ours": "one SVI loop per shard of cells (batched weights, fused Trace_ELBO estimator: the radio default)",
        "baseline_s": base, "ours_s": ours, "ratio": base / ours,
        "per_cell_fused_s": base_fused, "ratio_batching": base_fused / ours, "ratio_fused_loss": base / base_fused,
        "cells_per_s_batched": 1 / ours, "cells_per_s_per_cell": 1 / base,
        "mae_batched_db": mae_batched, "mae_per_cell_db": mae_alone, "mae_diff_db": mae_batched - mae_alone,
        "mae_per_cell_fused_db": mae_alone_fused,
        "mae_batched_all_cells_db": mae_batched_all, "irreducible_mae_db": 4 * np.sqrt(2 / np.pi),
        "sizes": {"cells": args.cells, "cells_per_shard": args.cells_per_shard, "rows_per_cell": args.rows,
                  "steps": args.steps, "per_cell_sample": len(sample), "n_centres": settings.n_centres},
        "memory": {"peak_rss_mb_after_batched": rss_batched_mb, "rss_mb_before": rss0 / 1024,
                   "note": "one process = one actor's work: peak RSS while training a shard"},
        "machine": {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "torch_threads": torch.get_num_threads(), "device": "cpu", "load_avg_1m_end": os.getloadavg()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("baseline_s", "ours_s", "ratio", "ratio_batching", "ratio_fused_loss", "mae_diff_db")}))
    return out


if __name__ == "__main__":
    main()
