"""Batched GP fits per shard vs one fit per cell: same model, objective, search and data.

Baseline: `fit_cells` called once per cell (the same grid + refinement on the same MAP
objective, the same CV calibration), the way one would train one model per cell. Ours: the
product's path, one `fit_cells` per shard of cells (padded, masked, batched Cholesky). The ratio
of the two is `ratio_batching` (same loss on both sides). A third side, the Pyro reference
(`fit_path="pyro"`: Pyro model + AutoDelta guide, Adam on Trace_ELBO) on a few cells alone,
gives `ratio_vs_pyro_per_cell`.

Simulated log-distance fields with a smooth residual and 4 dB noise, >= 500 cells in shards of
`--cells-per-shard`. The batched side trains every shard; the per-cell sides train samples of
the same cells alone, and their rate is what cells/s means for them.
Writes bench/results/radio.json: baseline_s / ours_s are seconds per cell, ratio = baseline/ours.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
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


def time_shares(cells: list[CellData], settings: FitSettings, seed: int) -> dict:
    """Where one shard's fit spends its time (cProfile of one more fit of that shard): shares of
    the LAPACK factorisations, the triangular solves, the numpy calibration / stacking searches,
    the per-cell numpy geometry (site, prior mean, basis, blocks), and the rest (elementwise
    torch kernels building K, Python)."""
    prof = cProfile.Profile()
    prof.enable()
    fit_cells(cells, target="rsrp", settings=settings, seed=seed)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())

    def tot(names):  # C functions appear as "<built-in method torch._C._linalg.NAME>"
        return sum(v[2] for k, v in stats.items() if k[2].split(".")[-1].rstrip(">") in names)

    def cum(files, names):
        return sum(v[3] for k, v in stats.items() if k[0].endswith(files) and k[2] in names)

    shares = {
        "cholesky": tot({"linalg_cholesky", "linalg_cholesky_ex"}),
        "triangular_solves": tot({"linalg_solve_triangular", "cholesky_solve", "cholesky_inverse"}),
        "calibration_and_stacking_numpy": cum("calibration.py", {"interval_scales_by_distance"})
        + cum("stacking.py", {"blend_weights"}),
        "geometry_numpy": cum("geometry.py", {"prior_mean", "estimate_site"}) + cum("calibration.py", {"block_groups"}),
    }
    shares["other_elementwise_and_python"] = total - sum(shares.values())
    return {"profiled_s": total, "cells": len(cells), **{k: v / total for k, v in shares.items()},
            "note": "cProfile of one shard's fit_cells (shares of its total); numpy parts are cumulative times of "
                    "interval_scales_by_distance + blend_weights and of prior_mean + estimate_site + block_groups"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--cells-per-shard", type=int, default=64)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of the Pyro reference")
    ap.add_argument("--per-cell-sample", type=int, default=32)
    ap.add_argument("--pyro-sample", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "radio.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: 2 threads were ~50x slower on these machines
    cells, tests = simulate(args.cells, args.rows, seed=0)
    settings = FitSettings(n_steps=args.steps)
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
    shares = time_shares([cells[i] for i in shards[0]], settings, seed=0)

    sample = list(range(0, args.cells, max(1, args.cells // args.per_cell_sample)))[: args.per_cell_sample]
    t0 = time.perf_counter()
    alone = {i: fit_cells([cells[i]], target="rsrp", settings=settings, seed=100 + i) for i in sample}
    per_cell_s = time.perf_counter() - t0
    pyro_sample = sample[: args.pyro_sample]
    pyro_settings = dataclasses.replace(settings, fit_path="pyro")
    t0 = time.perf_counter()
    alone_pyro = {i: fit_cells([cells[i]], target="rsrp", settings=pyro_settings, seed=100 + i) for i in pyro_sample}
    per_cell_pyro_s = time.perf_counter() - t0

    def mae_of(fitted, j, i):
        xt, yt = tests[i]
        return float(np.mean(np.abs(fitted.predict(np.full(len(xt), j), xt).mean - yt)))

    mae_batched = float(np.mean([mae_of(*batched[i], i) for i in sample]))
    mae_alone = float(np.mean([mae_of(alone[i], 0, i) for i in sample]))
    mae_pyro = float(np.mean([mae_of(alone_pyro[i], 0, i) for i in pyro_sample]))
    mae_batched_pyro_sample = float(np.mean([mae_of(*batched[i], i) for i in pyro_sample]))
    mae_batched_all = float(np.mean([mae_of(*batched[i], i) for i in range(args.cells)]))
    ours = batched_s / args.cells
    base = per_cell_s / len(sample)
    base_pyro = per_cell_pyro_s / len(pyro_sample)
    out = {
        "baseline": "fit_cells once per cell (same grid MAP fit, objective and CV calibration)",
        "ours": "fit_cells once per shard of cells (padded, masked, batched Cholesky: the radio default)",
        "baseline_s": base, "ours_s": ours, "ratio": base / ours, "ratio_batching": base / ours,
        "per_cell_pyro_s": base_pyro, "ratio_vs_pyro_per_cell": base_pyro / ours,
        "cells_per_s_batched": 1 / ours, "cells_per_s_per_cell": 1 / base,
        "mae_batched_db": mae_batched, "mae_per_cell_db": mae_alone, "mae_diff_db": mae_batched - mae_alone,
        "mae_per_cell_pyro_db": mae_pyro, "mae_batched_on_pyro_sample_db": mae_batched_pyro_sample,
        "mae_batched_all_cells_db": mae_batched_all, "irreducible_mae_db": 4 * np.sqrt(2 / np.pi),
        "sizes": {"cells": args.cells, "cells_per_shard": args.cells_per_shard, "rows_per_cell": args.rows,
                  "pyro_steps": args.steps, "per_cell_sample": len(sample), "pyro_sample": len(pyro_sample)},
        "time_shares_batched_shard": shares,
        "memory": {"peak_rss_mb_after_batched": rss_batched_mb, "rss_mb_before": rss0 / 1024,
                   "note": "one process = one actor's work: peak RSS while training a shard"},
        "machine": {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "torch_threads": torch.get_num_threads(), "device": "cpu", "load_avg_1m_end": os.getloadavg()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("baseline_s", "ours_s", "ratio", "ratio_vs_pyro_per_cell", "mae_diff_db")}))
    return out


if __name__ == "__main__":
    main()
