"""Bench: the traffic diffusion model.

1. Speed at 1,000 cells (bench/results/traffic.json): training steps/s, generated cell-weeks/s
   with the batched sampler, and the ratio against the plain per-cell sampler (one cell's
   samples per call) on the same 100 cells: baseline_s (per cell), ours_s (batched), ratio.
2. Held-out fidelity on the simulator (same file, "simulator_holdout"): whole cells held out,
   the model vs its unconditional ablation, the per-hour-of-week mean and the
   nearest-context copy, with the stage's default settings.
3. Real cells (bench/results/traffic_real.json): ../shared/data/lte-cell-hourly-traffic, five
   cells, leave-one-cell-out, one year of weeks per cell; skipped when the data is absent.

`python bench/traffic.py [speed] [sim] [real]` (default: all three).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellsynth.config import TrafficConfig
from cellsynth.traffic import transforms as tf
from cellsynth.traffic._holdout import holdout_scores
from cellsynth.traffic.stage import make_model

OUT = Path(__file__).resolve().parent / "results"
SHARED = Path(os.environ.get("CELLSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
N_CELLS = int(os.environ.get("BENCH_TRAFFIC_CELLS", 1000))
N_TRAIN_STEPS = int(os.environ.get("BENCH_TRAFFIC_STEPS", 100))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "torch_threads": torch.get_num_threads(), "gpu": gpu}


def _cells(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cell-weeks mixing an evening and a weekday-noon profile by a context share, level by another."""
    h = np.arange(168) % 24
    weekend = np.arange(168) // 24 >= 5
    res = 0.2 + np.exp(-0.5 * ((h - 20) / 2.5) ** 2)
    bus = np.where(weekend, 0.25, 0.15 + np.exp(-0.5 * ((h - 12) / 3.0) ** 2))
    share, log_users = rng.uniform(0, 1, n), rng.uniform(1.5, 3.0, n)
    shape = share[:, None] * bus + (1 - share[:, None]) * res
    series = 10 ** log_users[:, None] * shape / shape.mean(axis=1, keepdims=True) * rng.lognormal(0, 0.15, (n, 168))
    return series, np.column_stack([share, log_users])


def bench_speed(tcfg: TrafficConfig) -> dict:
    rng = np.random.default_rng(0)
    series, context = _cells(N_CELLS, rng)
    model = make_model(tcfg.model_copy(update={"n_steps": N_TRAIN_STEPS}), device=DEVICE)
    t0 = time.perf_counter()
    model.fit(series, context, rng=1)
    train_s = time.perf_counter() - t0
    n_samples = tcfg.n_samples_per_cell

    t0 = time.perf_counter()
    model.sample(context, n_samples, rng=2)
    gen_s = time.perf_counter() - t0

    sub = context[:100]
    t0 = time.perf_counter()
    for row in sub:  # baseline: the plain per-cell sampler
        model.sample(row[None, :], n_samples, rng=3)
    baseline_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.sample(sub, n_samples, rng=3)
    ours_s = time.perf_counter() - t0
    return {
        "baseline": "per-cell sampling loop (100 cells)", "ours": "batched sampling (same 100 cells)",
        "baseline_s": baseline_s, "ours_s": ours_s, "ratio": baseline_s / ours_s,
        "train_steps_per_s": N_TRAIN_STEPS / train_s, "train_s": train_s,
        "generated_cell_weeks_per_s": N_CELLS * n_samples / gen_s, "generate_s": gen_s,
        "sizes": {"n_cells": N_CELLS, "n_samples_per_cell": n_samples, "train_steps": N_TRAIN_STEPS,
                  "batch_size": tcfg.batch_size, "sampling_steps": tcfg.sampling_steps,
                  "hidden_channels": tcfg.hidden_channels, "n_blocks": tcfg.n_blocks},
        "device": DEVICE,
    }


def bench_simulator(tcfg: TrafficConfig) -> dict:
    """The stage's holdout evaluation on the default scenario, without the lake round trip."""
    from cellsynth.config import ScenarioConfig, WindowConfig
    from cellsynth.scenario.simulate import simulate
    from cellsynth.splits import random_test_mask
    from cellsynth.windows import window_labels, window_of

    windows = WindowConfig()
    sc = simulate(ScenarioConfig(), windows=windows, map_resolution_m=100.0, seed=42)
    cells = sc.cells.merge(sc.cells_xy_m, on="cell_id")
    mdt = sc.mdt.assign(ts=pd.to_datetime(sc.mdt["timestamp"], utc=True, errors="coerce")).dropna(subset=["ts"])
    mdt = mdt[mdt["serving_cell_id"].isin(cells["cell_id"])]
    # Stand-in for kde_models.n_reports: training reports per (window, serving cell).
    mdt = mdt[~random_test_mask(mdt["report_id"].to_numpy(), test_fraction=0.35, seed=42)]
    kde = (mdt.assign(window=window_of(mdt["ts"], windows)).groupby(["window", "serving_cell_id"]).size()
           .rename("n_reports").reset_index().rename(columns={"serving_cell_id": "cell_id"}))
    ctx = tf.cell_context(cells, kde_models=kde, windows=window_labels(windows)).sort_index()
    traffic = sc.traffic.assign(ts=pd.to_datetime(sc.traffic["timestamp"], utc=True))
    ids, _, series = tf.weekly_matrix(traffic)
    out = {"n_cells": len(ids), "context_columns": list(ctx.columns), "splits": []}
    for seed in (42, 7):
        held = random_test_mask(ids, test_fraction=tcfg.holdout_fraction, seed=seed)
        c = ctx.loc[ids].to_numpy(dtype=float)
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        model = make_model(tcfg, device=DEVICE).fit(series[~held], c[~held], rng=rng)
        fit_s = time.perf_counter() - t0
        scores, _ = holdout_scores(
            model=model, train_series=series[~held], train_context=c[~held], train_groups=ids[~held],
            test_series=list(series[held][:, None, :]), test_context=c[held], n_samples=tcfg.n_samples_per_cell,
            rng=rng, make_unconditional=lambda: make_model(tcfg, conditional=False, device=DEVICE),
        )
        out["splits"].append({"seed": seed, "n_holdout_cells": int(held.sum()), "fit_s": fit_s, "scores": scores})
        print(f"sim split {seed}: fit {fit_s:.0f}s\n{pd.DataFrame(scores).T.round(3)}", flush=True)
    out["mean"] = _mean_scores([s["scores"] for s in out["splits"]])
    return out


def _mean_scores(runs: list[dict]) -> dict:
    models = runs[0].keys()
    return {m: {k: float(np.nanmean([r[m][k] for r in runs])) if any(np.isfinite(r[m][k]) for r in runs) else None
                for k in runs[0][m]} for m in models}


def bench_real(tcfg: TrafficConfig) -> dict | None:
    path = SHARED / "lte-cell-hourly-traffic" / "lte_cells_hourly_traffic_merged.csv"
    if not path.is_file():
        print(f"real data absent: {path}")
        return None
    raw = pd.read_csv(path)
    traffic = pd.DataFrame({"cell_id": raw["cell"], "ts": pd.to_datetime(raw["DateTime"]).dt.tz_localize("UTC"),
                            "traffic_mb": raw["Traffic"]})
    ids, _, series = tf.weekly_matrix(traffic)
    cells = sorted(set(ids))
    # The only context these cells have: their site (Cell00011x / Cell00023x) and sector number.
    site = {c: float(c[-3:-1] == "11") for c in cells}
    sector = {c: float(c[-1]) for c in cells}
    ctx = np.array([[site[c], sector[c]] for c in ids])
    out = {"cells": cells, "weeks_per_cell": {c: int((ids == c).sum()) for c in cells}, "folds": []}
    for c in cells:
        held = ids == c
        rng = np.random.default_rng(0)
        model = make_model(tcfg, device=DEVICE).fit(series[~held], ctx[~held], groups=ids[~held], rng=rng)
        scores, _ = holdout_scores(
            model=model, train_series=series[~held], train_context=ctx[~held], train_groups=ids[~held],
            test_series=[series[held]], test_context=ctx[held][:1], n_samples=int(held.sum()), rng=rng,
            make_unconditional=lambda: make_model(tcfg, conditional=False, device=DEVICE),
        )
        out["folds"].append({"held_out": c, "scores": scores})
        print(f"real fold {c}\n{pd.DataFrame(scores).T.round(3)}", flush=True)
    out["mean"] = _mean_scores([f["scores"] for f in out["folds"]])
    return out


def main(argv: list[str] | None = None) -> None:
    parts = set(argv or sys.argv[1:]) or {"speed", "sim", "real"}
    torch.set_num_threads(1)
    tcfg = TrafficConfig()
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "config": tcfg.model_dump(mode="json")}
    if "speed" in parts:
        result.update(bench_speed(tcfg))
        print({k: result[k] for k in ("baseline_s", "ours_s", "ratio", "train_steps_per_s", "generated_cell_weeks_per_s")})
    if "sim" in parts:
        result["simulator_holdout"] = bench_simulator(tcfg)
    if "speed" in parts or "sim" in parts:
        target = OUT / "traffic.json"
        old = json.loads(target.read_text()) if target.is_file() else {}
        old.update(result)
        target.write_text(json.dumps(old, indent=2, default=float))
    if "real" in parts:
        real = bench_real(tcfg.model_copy(update={"n_steps": int(os.environ.get("BENCH_TRAFFIC_REAL_STEPS", 1000))}))
        if real is not None:
            (OUT / "traffic_real.json").write_text(json.dumps({"machine": machine(), **real}, indent=2, default=float))


if __name__ == "__main__":
    main()
