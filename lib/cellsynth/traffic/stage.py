"""Traffic stage: a conditional diffusion model of per-cell weekly traffic, trained by one Ray
task, generating `synthetic_traffic` for every cell (with or without history) and scoring
generation on whole held-out cells against baselines into `metrics`.

The task reads the `traffic` table straight from the lake at a pinned version, trains, saves
the weights under <lake_root>/models/traffic/<run_id>/ (safetensors + JSON), stages the
synthetic rows as Parquet files and returns their add actions; the driver commits
`synthetic_traffic` once (overwrite, app_id) and appends the scores to `metrics`.
"""

from __future__ import annotations

import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cellsynth.config import PipelineConfig, TrafficConfig
from cellsynth.errors import ConfigError, StageError
from cellsynth.splits import random_test_mask, stable_order
from cellsynth.stages import StageResult, StageSpec
from cellsynth.traffic import transforms as tf
from cellsynth.traffic._holdout import holdout_scores
from cellsynth.traffic.model import TrafficDiffusion
from cellsynth.windows import window_labels

NAME = "traffic"
INPUTS = ("traffic", "cells", "kde_models")
OUTPUTS = ("synthetic_traffic", "metrics")
STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    reads=("traffic", "run.seed", "ingest.windows", "ingest.n_cell_shards", "privacy.mode"),
    enabled_by="traffic.enabled",
)
_TRAFFIC_COLUMNS = ["cell_id", "ts", "traffic_mb", "prb_util_pct"]
N_PLOT_CELLS = 4


def make_model(tcfg: TrafficConfig, *, conditional: bool = True, device: str = "cpu") -> TrafficDiffusion:
    """The stage's TrafficDiffusion for a config section."""
    return TrafficDiffusion(
        hidden_channels=tcfg.hidden_channels, n_blocks=tcfg.n_blocks, diffusion_steps=tcfg.diffusion_steps,
        sampling_steps=min(tcfg.sampling_steps, tcfg.diffusion_steps) if tcfg.sampling_steps else None,
        n_steps=tcfg.n_steps, batch_size=tcfg.batch_size, learning_rate=tcfg.learning_rate,
        cond_drop_prob=tcfg.cond_drop_prob, guidance_scale=tcfg.guidance_scale, conditional=conditional,
        sampler=tcfg.sampler, device=device,
    )


def stage_rng(seed: int) -> np.random.Generator:
    """The traffic model's generator (fit, scoring, sampling), seeded by the run seed and the stage name
    only: the run id (a timestamp and a random suffix) made every run train, score and sample differently
    (traffic JSD 0.071 vs 0.062 on one commit). The in-memory facade draws from the same."""
    return np.random.default_rng([seed, zlib.crc32(b"traffic")])


def gpu_request(ray: Any, gpus_per_actor: float, *, want_gpu: bool) -> float:
    """GPUs for the one trainer task (see `cluster.ray_.gpu_share`)."""
    from cellsynth.cluster.ray_ import gpu_share

    return gpu_share(ray, gpus_per_actor, want_gpu=want_gpu, n_workers=1)


def _save_model(model: TrafficDiffusion, lake, rel: str) -> str:
    """Save beside the lake; object-store roots get the files copied up with the lake's credentials."""
    if not lake.is_remote:
        return str(model.save(os.path.join(lake.root, rel)))
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        lake.put_dir(tmp, rel)
    return lake.path(rel)


def _train_and_generate(
    lake_root: str, storage_options: dict[str, str], tcfg_dump: dict, *, traffic_version: int,
    context: pd.DataFrame, windows: dict, n_cell_shards: int, seed: int, run_id: str, device: str,
) -> dict[str, Any]:
    """Ray task: read traffic, split whole cells, fit, score the held-out cells, stage the rows."""
    import torch

    from cellsynth.config import WindowConfig
    from cellsynth.lake import Lake

    torch.set_num_threads(1)
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    tcfg = TrafficConfig.model_validate(tcfg_dump)
    lake = Lake(lake_root, storage_options=storage_options)
    # In an order fixed by content (a multi-file read need not give one): the PRB lines are fitted over rows.
    traffic = stable_order(lake.read_pandas("traffic", version=traffic_version, columns=_TRAFFIC_COLUMNS),
                           _TRAFFIC_COLUMNS)
    traffic = tf.hourly_counters(traffic)  # 15-minute counters as hours
    cell_ids, week_starts, series = tf.weekly_matrix(traffic)
    known = np.isin(cell_ids, context.index.to_numpy())
    cell_ids, week_starts, series = cell_ids[known], week_starts[known], series[known]
    uniq = np.unique(cell_ids)
    if len(uniq) < 3:
        raise StageError(f"traffic: need complete weeks of hourly counters from at least 3 known cells in traffic "
                         f"v{traffic_version}, got {len(uniq)} (without them set traffic.enabled: false)")
    held = set(uniq[random_test_mask(uniq, test_fraction=tcfg.holdout_fraction, seed=seed)]) if tcfg.holdout_fraction else set()
    if len(held) >= len(uniq) - 1:  # keep at least two training cells
        held = set(sorted(held)[: max(0, len(uniq) - 2)])
    is_train = ~np.isin(cell_ids, list(held))
    ctx_all = context.to_numpy(dtype=float)
    row_ctx = context.loc[cell_ids].to_numpy(dtype=float)
    rng = stage_rng(seed)

    t0 = time.perf_counter()
    model = make_model(tcfg, device=device).fit(series[is_train], row_ctx[is_train], groups=cell_ids[is_train], rng=rng)
    train_s = time.perf_counter() - t0
    model_path = _save_model(model, lake, f"models/traffic/{run_id}/conditional")

    out: dict[str, Any] = {
        "n_read": len(traffic), "n_cell_weeks": len(series), "n_train_cells": len(uniq) - len(held),
        "n_holdout_cells": len(held), "train_s": train_s, "model_path": model_path,
        "loss_first": float(model.loss_history_[: max(1, len(model.loss_history_) // 20)].mean()),
        "loss_last": float(model.loss_history_[-max(1, len(model.loss_history_) // 20):].mean()),
        "scores": {}, "plot": None,
    }
    if held:
        test_cells = sorted(held)
        test_series = [series[cell_ids == c] for c in test_cells]
        test_ctx = context.loc[test_cells].to_numpy(dtype=float)
        scores, samples = holdout_scores(
            model=model, train_series=series[is_train], train_context=row_ctx[is_train],
            train_groups=cell_ids[is_train], test_series=test_series, test_context=test_ctx,
            n_samples=max(tcfg.n_samples_per_cell, 2), rng=rng,
            make_unconditional=(lambda: make_model(tcfg, conditional=False, device=device)) if tcfg.evaluate_unconditional else None,
        )
        out["scores"] = scores
        k = min(N_PLOT_CELLS, len(test_cells))
        out["plot"] = {"cells": test_cells[:k], "real": [s.mean(axis=0) for s in test_series[:k]],
                       "samples": {m: s[:k] for m, s in samples.items()}}

    # Generate one week for every cell in the cells table, history or not.
    synth = model.sample(ctx_all, tcfg.n_samples_per_cell, rng=rng)
    prb_lines, pooled = tf.prb_maps(traffic, set(cell_ids[is_train]))
    week0 = pd.Timestamp(max(week_starts[is_train]))
    frame = tf.synthetic_frame(
        context.index.to_numpy(dtype=object), synth, week_start=week0, windows=WindowConfig.model_validate(windows),
        prb_lines=prb_lines, pooled_line=pooled, n_cell_shards=n_cell_shards, run_id=run_id,
    )
    out["actions"] = lake.stage_files("synthetic_traffic", frame)
    out["n_rows"] = len(frame)
    out["n_cells_generated"] = len(context)
    return out


def _metric(run_id: str, metric: str, value: float, **extra: Any) -> dict:
    value = float(value)
    return {"run_id": run_id, "stage": NAME, "metric": metric, "value": value if np.isfinite(value) else None, **extra}


_METRIC_NAMES = {"jsd": "jsd", "crps": "crps_mb", "profile_mae": "profile_mae_mb", "profile_rmse": "profile_rmse_mb",
                 "acf24_error": "acf24_error", "acf168_error": "acf168_error", "peak_hour_error_h": "peak_hour_error_h"}


def _read_context(cfg: PipelineConfig, rt: Any, versions: dict[str, int | None], traffic_ids: list[str]) -> pd.DataFrame:
    """Context per cell (index cell_id): the cells table's site layout, user densities when the lake has
    KDEs, external columns when configured; with no cells table, the traffic table's cells
    (`traffic_ids`) with only the external columns (or none)."""
    lake = rt.lake
    external = None
    if cfg.traffic.external_context_csv:
        path = Path(cfg.traffic.external_context_csv)
        if not path.is_file():
            raise ConfigError(f"traffic.external_context_csv: file not found: {path}")
        external = pd.read_csv(path, dtype={"cell_id": str})
    if versions["cells"] is None:
        return tf.external_only_context(traffic_ids, external).sort_index()
    cells = lake.read_pandas("cells", version=versions["cells"])
    kde = None
    if versions.get("kde_models") is not None:
        kde = lake.read_pandas("kde_models", version=versions["kde_models"], columns=["window", "cell_id", "n_reports"])
    ctx = tf.cell_context(cells, kde_models=kde, windows=window_labels(cfg.ingest.windows), external=external)
    return ctx.sort_index()


def run(cfg: PipelineConfig, rt: Any, *, run_id: str) -> StageResult:
    """Train the traffic model, write `synthetic_traffic` and the held-out scores to `metrics`."""
    lake, tcfg = rt.lake, cfg.traffic
    app_id = f"{NAME}:{run_id}"
    result = StageResult(stage=NAME, run_id=run_id)
    if cfg.privacy.mode == "dp":  # issue 16: no DP training for traffic; say so in the registry
        from cellsynth.privacy.dp_stage import TRAFFIC_EXCLUDED

        result.skipped, result.note = True, TRAFFIC_EXCLUDED
        return result
    if all(lake.exists(t) and lake.committed_app_ids(t, app_id) for t in OUTPUTS):
        result.skipped, result.note = True, f"run {run_id} already committed"
        result.table_versions = {t: lake.version(t) for t in OUTPUTS}
        return result
    versions = {t: (lake.version(t) if lake.exists(t) else None) for t in INPUTS}
    traffic_ids = (pa.array([], pa.string()) if versions["traffic"] is None else
                   lake.read("traffic", version=versions["traffic"], columns=["cell_id"]).column("cell_id").unique())
    if len(traffic_ids) == 0:
        # Serving-only drive tests (UCC) carry no traffic counters: nothing to learn from.
        if versions["cells"] is None:
            raise StageError(f"traffic: input table(s) traffic, cells missing in {lake.root}; run ingest first")
        result.skipped, result.note = True, "no traffic counters in the lake (sources.traffic not given)"
        return result
    context = _read_context(cfg, rt, versions, traffic_ids.to_pylist())
    if versions["cells"] is None:
        # Counters without a site table or reports (conf/examples/lte-traffic.yaml): the cells are the
        # counters' own, and nothing locates them, so the model learns and generates without context
        # (plus traffic.external_context_csv's columns when given).
        result.note = (f"no cells table: {len(context)} cells of the traffic table, context "
                       f"{', '.join(context.columns) if context.shape[1] else 'none (one model for every cell)'}")

    ray = rt.ray()
    rcfg = cfg.runtime.ray
    num_gpus = gpu_request(ray, rcfg.gpus_per_actor, want_gpu=rt.device.type == "cuda")
    use_gpu = num_gpus > 0
    task = ray.remote(num_cpus=min(1.0, rcfg.cpus_per_actor), num_gpus=num_gpus,
                      max_retries=rcfg.max_task_retries)(_train_and_generate)
    rt.log(f"traffic: one trainer task, {len(context)} cells, device {'cuda' if use_gpu else 'cpu'}")
    out = ray.get(task.remote(
        lake.root, lake.storage_options, tcfg.model_dump(mode="json"), traffic_version=versions["traffic"],
        context=context, windows=cfg.ingest.windows.model_dump(mode="json"), n_cell_shards=cfg.ingest.n_cell_shards,
        seed=cfg.run.seed, run_id=run_id, device="cuda" if use_gpu else "cpu",
    ))

    result.rows_in = {"traffic": out["n_read"], "cells": len(context)}
    result.table_versions["synthetic_traffic"] = lake.commit_files("synthetic_traffic", out["actions"], mode="overwrite", app_id=app_id)
    result.rows_written["synthetic_traffic"] = out["n_rows"]
    result.artifacts["traffic_model"] = out["model_path"]

    metrics = [
        _metric(run_id, "train_seconds", out["train_s"], model="diffusion"),
        _metric(run_id, "train_loss_first", out["loss_first"], model="diffusion"),
        _metric(run_id, "train_loss_last", out["loss_last"], model="diffusion"),
        _metric(run_id, "n_train_cells", out["n_train_cells"]),
        _metric(run_id, "n_holdout_cells", out["n_holdout_cells"]),
        _metric(run_id, "n_context_features", context.shape[1], detail=",".join(context.columns)),
    ]
    for model_name, sc in out["scores"].items():
        for key, value in sc.items():
            metrics.append(_metric(run_id, _METRIC_NAMES[key], value, split="holdout_cells", model=model_name))
    if out["scores"]:
        ours = out["scores"]["diffusion"]
        for key in ("jsd", "crps"):
            best_base = min(v[key] for m, v in out["scores"].items() if m != "diffusion")
            result.metrics[f"traffic_{key}"] = ours[key]
            result.metrics[f"traffic_{key}_gain_vs_best_baseline"] = 1 - ours[key] / best_base if best_base else 0.0
        if out["plot"] is not None and not lake.is_remote:
            from cellsynth.traffic._plots import write_plots

            report_dir = Path(cfg.lake.report_dir or lake.path("report")) / "traffic"
            result.artifacts.update(write_plots(out["plot"], report_dir))
    result.table_versions["metrics"] = lake.write("metrics", pd.DataFrame(metrics), mode="append", app_id=app_id)
    result.rows_written["metrics"] = len(metrics)
    return result
