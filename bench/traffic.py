"""Bench: the traffic diffusion model.

1. Speed at 1,000 cells (bench/results/traffic.json): training steps/s and generated
   cell-weeks/s (`cell_weeks_per_s`, n_samples_per_cell weeks for each of the 1,000 cells) with
   the fast sampler (fewer respaced DDPM steps, count calibrated at fit, guidance folded into one forward),
   against the reference sampler as it was before (ancestral DDPM, 50 steps, two forwards,
   4096-row chunks) on the same cells of the same fitted model in the same run: baseline_s,
   ours_s, ratio. One torch thread, as in the stage's Ray task.
2. Held-out fidelity on the simulator (same file, "simulator_holdout"): whole cells held out,
   the model vs its unconditional ablation, the per-hour-of-week mean and the
   nearest-context copy, with the stage's default settings; "diffusion_reference_sampler" is
   the same fitted conditional model sampled with the reference sampler.
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
from cellsynth.traffic import evaluation as ev
from cellsynth.traffic import transforms as tf
from cellsynth.traffic._holdout import holdout_scores
from cellsynth.traffic.stage import make_model

OUT = Path(__file__).resolve().parent / "results"
SHARED = Path(os.environ.get("CELLSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
N_CELLS = int(os.environ.get("BENCH_TRAFFIC_CELLS", 1000))
N_TRAIN_STEPS = int(os.environ.get("BENCH_TRAFFIC_STEPS", 600))
# The old sampler runs ~8x longer: time it on the first cells only (one chunk, rows per second).
N_BASELINE_CELLS = int(os.environ.get("BENCH_TRAFFIC_BASELINE_CELLS", 300))
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
    fit_s = time.perf_counter() - t0
    n_samples = tcfg.n_samples_per_cell
    n_weeks = N_CELLS * n_samples

    t0 = time.perf_counter()
    model.sample(context, n_samples, rng=2)
    ours_s = time.perf_counter() - t0
    n_base = min(N_BASELINE_CELLS, N_CELLS)
    t0 = time.perf_counter()
    model.sample(context[:n_base], n_samples, rng=2, sampler="reference", batch_size=4096)  # the sampler before
    # Scaled to all cells; one smaller chunk runs no slower per row than 4096-row ones, so this favours the baseline.
    baseline_s = (time.perf_counter() - t0) * N_CELLS / n_base
    return {
        "baseline": "reference sampler as before: ancestral DDPM on the respaced schedule, conditional and "
                    "unconditional forwards one after the other, 4096-row chunks; timed on the first "
                    f"{n_base} cells and scaled to {N_CELLS}",
        "ours": f"fast sampler: ancestral DDPM with {model.fast_steps_} respaced steps calibrated at fit, guidance folded into "
                "one forward, 256-row chunks",
        "baseline_s": baseline_s, "ours_s": ours_s, "ratio": baseline_s / ours_s,
        "cell_weeks_per_s": n_weeks / ours_s, "baseline_cell_weeks_per_s": n_weeks / baseline_s,
        "fast_steps": model.fast_steps_, "fast_calibration": model.fast_calibration_,
        # fit_s includes the fast-sampler calibration; train_steps_per_s counts it too.
        "train_steps_per_s": N_TRAIN_STEPS / fit_s, "fit_s": fit_s,
        "sizes": {"n_cells": N_CELLS, "n_samples_per_cell": n_samples, "cell_weeks": n_weeks,
                  "baseline_cells": n_base, "train_steps": N_TRAIN_STEPS, "batch_size": tcfg.batch_size,
                  "sampling_steps": tcfg.sampling_steps, "hidden_channels": tcfg.hidden_channels,
                  "n_blocks": tcfg.n_blocks},
        "device": DEVICE,
    }


def bench_simulator(tcfg: TrafficConfig, save=lambda out: None) -> dict:
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
        # The same fitted model with the reference sampler: the fast sampler's fidelity cost.
        ref = model.sample(c[held], tcfg.n_samples_per_cell, rng=np.random.default_rng(seed), sampler="reference")
        scores["diffusion_reference_sampler"] = ev.score(list(series[held][:, None, :]), ref)
        out["splits"].append({"seed": seed, "n_holdout_cells": int(held.sum()), "fit_s": fit_s,
                              "fast_steps": model.fast_steps_, "scores": scores})
        out["mean"] = _mean_scores([s["scores"] for s in out["splits"]])
        save(out)  # partial results after each split (the machine is shared; runs get cut short)
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
        print({k: result[k] for k in ("baseline_s", "ours_s", "ratio", "fast_steps", "cell_weeks_per_s")}, flush=True)
    def write() -> None:
        target = OUT / "traffic.json"
        old = json.loads(target.read_text()) if target.is_file() else {}
        if "speed" in parts:  # keys of the earlier speed layout (per-cell loop vs batched)
            for stale in ("generated_cell_weeks_per_s", "generate_s", "train_s"):
                old.pop(stale, None)
        old.update(result)
        target.write_text(json.dumps(old, indent=2, default=float))

    if "sim" in parts:
        result["simulator_holdout"] = bench_simulator(tcfg, save=lambda out: (result.update(simulator_holdout=out), write()))
    if "speed" in parts or "sim" in parts:
        write()
    if "real" in parts:
        real = bench_real(tcfg.model_copy(update={"n_steps": int(os.environ.get("BENCH_TRAFFIC_REAL_STEPS", 1000))}))
        if real is not None:
            (OUT / "traffic_real.json").write_text(json.dumps({"machine": machine(), **real}, indent=2, default=float))


if __name__ == "__main__":
    main()
