"""Where our model loses to a baseline on one outer split of `bench/radio_real.py`: per cell, report only.

Refits ours on the split's rows exactly as radio_real.py does (same cells, caps, shards and seed), takes the
baseline's predictions from radio_real.py's cache (run that first), and lists the cells that carry the pooled-MAE
gap: their training rows, the least-squares log-distance slope and the distances of the training and held-out rows
from the site the model estimated, and both models' mean error. It reads held-out rows, so nothing here may choose
a constant; it says why a split was lost.

Usage:
    python bench/radio_gap.py --dataset uav-lte --split blocks --seed 44 [--baseline gp] [--top 8]
Writes bench/results/radio_gap_<dataset>_<split>_seed<K>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import radio_real as rr  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", choices=rr.SPLITS, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--baseline", default="gp")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--cells-per-shard", type=int, default=80)
    args = ap.parse_args(argv)
    from cellsynth.radio.geometry import estimate_site, prior_mean, site_offset

    spec, df, cap = rr.bench_rows(args.dataset)
    _, spec_hash = rr.load_spec(args.dataset)
    test = rr.split_mask(df, args.split, seed=args.seed)
    cells = rr.eligible_cells(df, test)
    rows = rr._cell_rows(df, test, cells, cap, args.seed)
    cached = sorted((rr.CACHE / spec.name / spec_hash).glob(f"{args.split}-seed{args.seed}-{args.baseline}-*-{rr._data_hash(rows, cells)}.npz"))
    if not cached:
        raise SystemExit(f"no cached {args.baseline} predictions for this split: run bench/radio_real.py --dataset "
                         f"{args.dataset} --seed {args.seed} first")
    base = rr._cached(cached[0], None)
    ours = rr.run_ours(rows, cells, seed=args.seed, cells_per_shard=args.cells_per_shard, n_samples=0)
    per_cell = []
    for c, r, m_ours, m_base in zip(cells, rows, ours["mean"], base["mean"]):
        site = estimate_site(r["xy_tr"], r["y_tr"])
        height = site_offset(r["xy_tr"], r["y_tr"], True)
        slope = float(prior_mean(r["xy_tr"], r["y_tr"], site, None, None, None, height)[0][1])
        ae_ours, ae_base = np.abs(r["y_te"] - m_ours), np.abs(r["y_te"] - m_base)
        per_cell.append({
            "cell_id": c, "n_train": len(r["y_tr"]), "n_test": len(r["y_te"]),
            "abs_error_sum_gap_db": float(np.sum(ae_ours) - np.sum(ae_base)),
            "mae_ours_db": float(ae_ours.mean()), "mae_baseline_db": float(ae_base.mean()),
            "mean_error_ours_db": float(np.mean(m_ours - r["y_te"])), "mean_error_baseline_db": float(np.mean(m_base - r["y_te"])),
            "ls_slope_db_per_decade": slope,
            "train_max_distance_from_estimated_site_m": float(np.hypot(*(r["xy_tr"] - site).T).max()),
            "test_median_distance_from_estimated_site_m": float(np.median(np.hypot(*(r["xy_te"] - site).T))),
            "test_minus_train_mean_rsrp_db": float(r["y_te"].mean() - r["y_tr"].mean()),
        })
    per_cell.sort(key=lambda p: -p["abs_error_sum_gap_db"])
    n_test = sum(p["n_test"] for p in per_cell)
    gap = sum(p["abs_error_sum_gap_db"] for p in per_cell)
    top = per_cell[: args.top]
    out = {
        "dataset": spec.name, "split": args.split, "outer_seed": args.seed, "baseline": args.baseline,
        "procedure": __doc__.split("\n\n")[0].replace("\n", " "),
        "n_cells": len(cells), "n_test": n_test,
        "pooled_mae_gap_db": gap / n_test,  # ours minus baseline (weights 1; radio_real.py's figure on unweighted sets)
        "top_cells_share_of_gap": float(sum(p["abs_error_sum_gap_db"] for p in top) / gap) if gap else None,
        "top_cells": top, **rr._commit(),
    }
    path = Path(__file__).parent / "results" / f"radio_gap_{spec.name}_{args.split}_seed{args.seed}.json"
    rr.write_result(path, out)
    print(json.dumps({k: v for k, v in out.items() if k != "top_cells"}, indent=1))
    for p in top:
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in p.items()})
    return out


if __name__ == "__main__":
    main()
