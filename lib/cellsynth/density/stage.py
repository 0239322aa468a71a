"""Density stage: per-(window, cell) KDEs on Ray actors, area densities, spatial maps, scores.

Actors each own a group of cell shards and read those partitions straight from the Delta
table at a pinned version; they fit the KDEs, write the training positions beside the lake,
stage the KDE map files and return small rows. The driver commits `kde_models` and
`spatial_maps` once each (idempotent via app_id), then adds the site-only maps (Voronoi,
DEEPMEND teacher/student) and the scores to `metrics`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellsynth.config import DensityConfig, PipelineConfig
from cellsynth.density._files import positions_rel_path, write_positions
from cellsynth.density._grid import square_centre_m
from cellsynth.density._voronoi import nearest_site_associate, voronoi_maps
from cellsynth.density.model import DensityModels, GaussianKDE2D, kde_from_config, kde_seed
from cellsynth.density.transforms import kde_map, ks_2d_maps
from cellsynth.errors import StageError
from cellsynth.sampling import BottomK
from cellsynth.lake.partitions import read_partitions
from cellsynth.schemas import AREA_CELL_ID
from cellsynth.splits import SPLIT_KEYS, random_test_mask, split_seed, stable_order
from cellsynth.splits import held_out as split_held_out
from cellsynth.stages import AreaRefit, Incremental, StageResult, StageSpec
from cellsynth.windows import window_labels

NAME = "density"
INPUTS = ("mdt_reports", "cells")
OUTPUTS = ("kde_models", "spatial_maps", "metrics")
STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    # KDEs train on the held-in reports of the split; the truth folder feeds the map metrics.
    reads=("density", *SPLIT_KEYS, "ingest.windows", "evaluate.truth_dir", "scenario.output_dir", "run.data_dir",
           "evaluate.max_test_rows", "run.seed",  # the association score's sample of held-out reports
           # issue 16: the dp mode replaces the KDEs by a DP grid density
           "privacy.mode", "privacy.epsilon", "privacy.delta", "privacy.epsilon_split", "privacy.max_reports_per_ue", "privacy.grid_m",
           "privacy.smoothing_squares"),
    incremental=Incremental(partitioned_inputs={"mdt_reports": "serving_cell_id"}, takes_cells=True,
                            area=AreaRefit(table="mdt_reports", models="kde_models")),
)
SITE_ONLY_WINDOW = "all"  # Voronoi / teacher / student maps do not depend on the window
_REPORT_COLUMNS = ["report_id", "window", "x_m", "y_m", "serving_cell_id", "cell_shard"]


_seed_of = kde_seed


def _kde(dcfg: DensityConfig, seed: int, window: str, cell_id: str) -> GaussianKDE2D:
    return kde_from_config(dcfg, seed=seed, window=window, cell_id=cell_id)


def _model_row(kde: GaussianKDE2D, window: str, cell_id: str, shard: int, path: str, version: int, run_id: str) -> dict:
    x0, y0, x1, y1 = kde.support_box_m
    cx, cy = kde.positions_.mean(axis=0)
    return {
        "window": window, "cell_id": cell_id, "bandwidth_m": kde.bandwidth_m_, "n_reports": kde.n_reports_,
        "x_min_m": x0, "x_max_m": x1, "y_min_m": y0, "y_max_m": y1, "centroid_x_m": float(cx),
        "centroid_y_m": float(cy), "bandwidth_source": kde.bandwidth_source_, "path": path,
        "source_version": version, "cell_shard": shard, "run_id": run_id,
    }


def _pool(maps: list[tuple[pd.DataFrame, int]]) -> pd.DataFrame:
    # Report-weighted mixture of one cell's window maps.
    frame = pd.concat([m.assign(prob=m["prob"] * n) for m, n in maps])
    agg = frame.groupby(["gx", "gy"], as_index=False)["prob"].sum()
    agg["prob"] /= agg["prob"].sum()
    return agg


def _read_truth(truth_file: str | None, cell_ids: list[str]) -> dict[tuple[str, str], pd.DataFrame]:
    if truth_file is None:
        return {}
    import pyarrow.parquet as pq

    # Dictionary-encoded keys: one Python string per distinct window / cell, not one per row
    # (~1,000 rows a cell; per-row strings took ~0.4 GB of the driver at 3,000 cells).
    tbl = pq.read_table(truth_file, columns=["window", "cell_id", "gx", "gy", "prob"], filters=[("cell_id", "in", cell_ids)],
                        read_dictionary=["window", "cell_id"])
    frame = tbl.to_pandas()
    return {(str(w), str(c)): grp[["gx", "gy", "prob"]] for (w, c), grp in frame.groupby(["window", "cell_id"], observed=True, sort=True)}


class _ShardTrainer:
    """Ray actor: fits the KDEs of its cell shards, reading them straight from the lake."""

    def __init__(self, lake_root: str, storage_options: dict[str, str], dcfg: dict, *, test_fraction: float, seed: int, run_id: str) -> None:
        from cellsynth.lake import Lake

        self.lake = Lake(lake_root, storage_options=storage_options)
        self.dcfg = DensityConfig.model_validate(dcfg)
        self.test_fraction, self.seed, self.run_id = test_fraction, seed, run_id

    def train(self, shards: list[int], version: int, truth_file: str | None,
              only: list[tuple[str, int]] | None = None, cells: list[str] | None = None) -> dict[str, Any]:
        import torch

        torch.set_num_threads(1)
        df = stable_order(self.lake.read_pandas("mdt_reports", version=version, columns=_REPORT_COLUMNS,
                                                filters=[("cell_shard", "in", shards)]))
        held_out = random_test_mask(df["report_id"].to_numpy(), test_fraction=self.test_fraction, seed=self.seed)
        train = df[~held_out]
        if only is not None:  # incremental: just these (window, shard) partitions (and cells)
            keys = pd.MultiIndex.from_arrays([train["window"], train["cell_shard"].astype(int)])
            keep = keys.isin(pd.MultiIndex.from_tuples(only)) if only else np.zeros(len(train), dtype=bool)
            if cells is not None:
                keep &= train["serving_cell_id"].isin(cells).to_numpy()
            train = train[keep]
        truth = _read_truth(truth_file, sorted(train["serving_cell_id"].unique().tolist()))
        rows, maps, scores, per_cell = [], [], [], {}
        for (window, shard), part in train.groupby(["window", "cell_shard"], sort=True):
            rel = positions_rel_path(self.run_id, str(window), int(shard))
            write_positions(self.lake, rel, part.rename(columns={"serving_cell_id": "cell_id"}))
            for cell_id, pts in part.groupby("serving_cell_id", sort=True):
                kde = _kde(self.dcfg, self.seed, window, cell_id).fit(pts[["x_m", "y_m"]].to_numpy())
                rows.append(_model_row(kde, window, cell_id, int(shard), rel, version, self.run_id))
                cmap = kde_map(kde, resolution_m=self.dcfg.map_resolution_m, min_mass=self.dcfg.map_min_mass)
                maps.append(cmap.assign(window=window, cell_id=cell_id))
                per_cell.setdefault(cell_id, []).append((cmap, kde.n_reports_))
                if (window, cell_id) in truth:
                    scores.append({"window": window, "cell_id": cell_id, "ks": ks_2d_maps(cmap, truth[(window, cell_id)])})
        actions, frame = [], None
        if maps:
            frame = pd.concat(maps, ignore_index=True)
            frame = _with_centres(frame, self.dcfg.map_resolution_m).assign(method="kde", run_id=self.run_id)
            if only is None:
                actions, frame = self.lake.stage_files("spatial_maps", frame), None
        pooled = {c: _pool(m) for c, m in per_cell.items()}
        return {"rows": rows, "actions": actions, "maps": frame, "ks": scores, "pooled": pooled, "n_read": len(df),
                "n_train": len(train)}


def _fit_area(lake_root: str, storage_options: dict[str, str], dcfg: dict, version: int, window: str, *, test_fraction: float, seed: int, run_id: str) -> dict | None:
    """Ray task: the area density f_j^O of one window (subsampled to area_max_reports)."""
    import torch

    from cellsynth.lake import Lake

    torch.set_num_threads(1)
    cfg = DensityConfig.model_validate(dcfg)
    lake = Lake(lake_root, storage_options=storage_options)
    df = stable_order(lake.read_pandas("mdt_reports", version=version, columns=["report_id", "x_m", "y_m"],
                                       filters=[("window", "=", window)]))
    df = df[~random_test_mask(df["report_id"].to_numpy(), test_fraction=test_fraction, seed=seed)]
    if df.empty:
        return None
    n_total = len(df)
    if n_total > cfg.area_max_reports:
        df = df.sample(cfg.area_max_reports, random_state=_seed_of(seed, window, "area") % 2**31)
    rel = positions_rel_path(run_id, window, "area")
    write_positions(lake, rel, df.assign(window=window, cell_id=AREA_CELL_ID))
    kde = _kde(cfg, seed, window, AREA_CELL_ID).fit(df[["x_m", "y_m"]].to_numpy())
    row = _model_row(kde, window, AREA_CELL_ID, -1, rel, version, run_id)
    row["n_reports"] = n_total
    return row


def _with_centres(frame: pd.DataFrame, resolution_m: float) -> pd.DataFrame:
    return frame.assign(x_m=square_centre_m(frame["gx"], resolution_m), y_m=square_centre_m(frame["gy"], resolution_m))


def _truth_file(cfg: PipelineConfig) -> str | None:
    base = cfg.evaluate.truth_dir or str(Path(cfg.scenario.output_dir or Path(cfg.run.data_dir) / "sim") / "truth")
    path = Path(base) / "spatial_maps.parquet"
    return str(path.resolve()) if path.is_file() else None


def _metric(run_id: str, metric: str, value: float, **extra: Any) -> dict:
    return {"run_id": run_id, "stage": NAME, "metric": metric, "value": float(value), **extra}


def run(cfg: PipelineConfig, rt: Any, *, run_id: str, partitions: set[tuple[str, int]] | None = None,
        cells: set[str] | None = None, area_windows: set[str] | None = None) -> StageResult:
    """Train the KDEs, write `kde_models`, `spatial_maps` and the density scores in `metrics`.

    `partitions` (incremental runs): retrain only these (window, cell_shard) partitions, and
    within them only `cells` when given, plus the area density of their windows (only of
    `area_windows` when given); other rows of `kde_models` and `spatial_maps` are kept as they are.
    """
    if cfg.privacy.mode == "dp":  # issue 16: the DP grid density replaces the per-cell KDEs
        from cellsynth.privacy.dp_stage import run_density_dp

        return run_density_dp(cfg, rt, run_id=run_id)
    if partitions is not None:
        return _train_partitions(cfg, rt, run_id=run_id, partitions=partitions, only_cells=cells, area_windows=area_windows)
    return train(cfg, rt, run_id=run_id)


def _gather(ray: Any, actors: list[Any], calls: list[tuple], area_refs: list[Any]) -> tuple[list[dict], list[dict]]:
    """Run `_ShardTrainer.train(*args)` for every args tuple of `calls` (one cell shard each) on
    whichever actor is free next, and return the shard results and area-density rows; the actors
    are released whatever happens. One shard per call, handed out as actors free up, so no actor
    holds the stage with a fixed share of big shards while the others idle (issue 15: a static
    round-robin split made the slowest actor's share the stage's wall time)."""
    from ray.util import ActorPool

    try:
        pool = ActorPool(actors)
        parts = list(pool.map(lambda actor, args: actor.train.remote(*args), calls))  # results in shard order
        return parts, [r for r in ray.get(area_refs) if r is not None]
    finally:
        for actor in actors:
            ray.kill(actor)


def _already_committed(lake: Any, run_id: str) -> StageResult | None:
    """The result of a rerun whose commits already landed (same run_id), or None."""
    app_id = f"{NAME}:{run_id}"
    if not all(lake.committed_app_ids(t, app_id) for t in OUTPUTS):
        return None
    return StageResult(stage=NAME, run_id=run_id, skipped=True, note=f"run {run_id} already committed",
                       table_versions={t: lake.version(t) for t in OUTPUTS})


def train(cfg: PipelineConfig, rt: Any, *, run_id: str) -> StageResult:
    """`run` on every partition: fit all KDEs, rewrite `kde_models` and `spatial_maps`."""
    lake, dcfg = rt.lake, cfg.density
    app_id = f"{NAME}:{run_id}"
    if (done := _already_committed(lake, run_id)) is not None:
        return done
    result = StageResult(stage=NAME, run_id=run_id)
    versions = {t: lake.version(t) for t in INPUTS}
    missing = [t for t, v in versions.items() if v is None]
    if missing:
        raise StageError(f"density: input table(s) {', '.join(missing)} missing in {lake.root}; run ingest first")
    cells = stable_order(lake.read_pandas("cells", version=versions["cells"]), ("cell_id",))
    shards = sorted(int(s) for s in cells["cell_shard"].unique())
    rcfg = cfg.runtime.ray
    n_actors = max(1, min(rcfg.n_actors, len(shards)))
    truth_file = _truth_file(cfg)
    common = {"test_fraction": cfg.split.test_fraction, "seed": split_seed(cfg), "run_id": run_id}
    dump = dcfg.model_dump(mode="json")

    ray = rt.ray()
    trainer = ray.remote(num_cpus=rcfg.cpus_per_actor, max_restarts=rcfg.max_restarts, max_task_retries=rcfg.max_task_retries)(_ShardTrainer)
    area_task = ray.remote(num_cpus=rcfg.cpus_per_actor, max_retries=rcfg.max_task_retries)(_fit_area)
    actors = [trainer.remote(lake.root, lake.storage_options, dump, **common) for _ in range(n_actors)]
    area_refs = [
        area_task.remote(lake.root, lake.storage_options, dump, versions["mdt_reports"], w, **common)
        for w in window_labels(cfg.ingest.windows)
    ]
    rt.log(f"density: {n_actors} actors over {len(shards)} shards")
    calls = [([s], versions["mdt_reports"], truth_file) for s in shards]
    parts, area_rows = _gather(ray, actors, calls, area_refs)

    model_rows = [r for p in parts for r in p["rows"]] + area_rows
    if not model_rows:
        raise StageError(f"density: no training reports in mdt_reports v{versions['mdt_reports']}")
    kde_rows = pd.DataFrame(model_rows)
    result.rows_in = {"mdt_reports": sum(p["n_read"] for p in parts), "cells": len(cells)}
    result.table_versions["kde_models"] = lake.write("kde_models", kde_rows, mode="overwrite", app_id=app_id)
    result.rows_written["kde_models"] = len(kde_rows)

    # Site-only maps: Voronoi baseline and DEEPMEND teacher/student (window-independent).
    pooled = {c: m for p in parts for c, m in p["pooled"].items()}
    site_maps, metrics = _site_only_maps(cfg, cells, kde_rows, pooled, truth_file, run_id, trainer=_student_trainer(cfg, rt),
                                         mapper=_cell_mapper(cfg, rt))
    actions = [a for p in parts for a in p["actions"]]
    n_site_rows = 0
    while site_maps:  # one method at a time, dropped once staged; a frame of _STAGE_CELLS cells at a time
        method, by_cell = site_maps.pop(0)
        ids = sorted(by_cell)
        for at in range(0, len(ids), _STAGE_CELLS):
            frame = _method_frame({c: by_cell[c] for c in ids[at:at + _STAGE_CELLS]}, method)
            actions += lake.stage_files("spatial_maps", _with_centres(frame, dcfg.map_resolution_m).assign(run_id=run_id))
            n_site_rows += len(frame)
        del by_cell
    result.table_versions["spatial_maps"] = lake.commit_files("spatial_maps", actions, mode="overwrite", app_id=app_id)
    result.rows_written["spatial_maps"] = n_site_rows + sum(
        int(json.loads(a["stats"]).get("numRecords", 0)) for p in parts for a in p["actions"]
    )
    del pooled
    for p in parts:
        p.pop("pooled", None)

    # Scores: KDE vs Voronoi maps against the simulator's truth, association on held-out reports.
    kde_ks = pd.DataFrame([s for p in parts for s in p["ks"]], columns=["window", "cell_id", "ks"])
    metrics += _kde_map_scores(kde_ks, metrics, run_id, result)
    models = DensityModels.load(lake, version=result.table_versions["kde_models"], prune_k_bandwidths=dcfg.prune_k_bandwidths,
                                association=dcfg.association,
                                association_bandwidth_scales=dcfg.association_bandwidth_scales)
    metrics += _association_scores(cfg, lake, versions["mdt_reports"], models, cells, run_id, result)
    metrics.append(_metric(run_id, "bandwidth_m_median", kde_rows.loc[kde_rows.cell_id != AREA_CELL_ID, "bandwidth_m"].median()))
    metrics.append(_metric(run_id, "fallback_bandwidth_share", (kde_rows["bandwidth_source"] == "fallback").mean()))
    result.table_versions["metrics"] = lake.write("metrics", pd.DataFrame(metrics), mode="append", app_id=app_id)
    result.rows_written["metrics"] = len(metrics)
    return result


def _sql_str(values: Any) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in sorted(values))


def _train_partitions(cfg: PipelineConfig, rt: Any, *, run_id: str, partitions: set[tuple[str, int]],
                      only_cells: set[str] | None, area_windows: set[str] | None = None) -> StageResult:
    """Incremental body of `run`: refit the given partitions, overwrite only their rows.

    The site-only maps (Voronoi, teacher/student) and the association scores are kept from the
    last full run: they depend on the whole layout, and evaluate rescores the models anyway.
    """
    lake, dcfg = rt.lake, cfg.density
    app_id = f"{NAME}:{run_id}"
    if (done := _already_committed(lake, run_id)) is not None:
        return done
    result = StageResult(stage=NAME, run_id=run_id)
    versions = {t: lake.version(t) for t in INPUTS}
    if any(v is None for v in versions.values()) or not lake.exists("kde_models"):
        raise StageError("density: an incremental run needs mdt_reports, cells and an earlier kde_models")
    only = sorted((str(w), int(s)) for w, s in partitions)
    shards = sorted({s for _, s in only})
    windows = sorted({w for w, _ in only} if area_windows is None else set(area_windows))
    rcfg = cfg.runtime.ray
    n_actors = max(1, min(rcfg.n_actors, len(shards)))
    common = {"test_fraction": cfg.split.test_fraction, "seed": split_seed(cfg), "run_id": run_id}
    dump = dcfg.model_dump(mode="json")
    cell_list = None if only_cells is None else sorted(only_cells)
    ray = rt.ray()
    trainer = ray.remote(num_cpus=rcfg.cpus_per_actor, max_restarts=rcfg.max_restarts, max_task_retries=rcfg.max_task_retries)(_ShardTrainer)
    area_task = ray.remote(num_cpus=rcfg.cpus_per_actor, max_retries=rcfg.max_task_retries)(_fit_area)
    actors = [trainer.remote(lake.root, lake.storage_options, dump, **common) for _ in range(n_actors)]
    truth_file = _truth_file(cfg)
    calls = [([s], versions["mdt_reports"], truth_file, [p for p in only if p[1] == s], cell_list) for s in shards]
    area_refs = [area_task.remote(lake.root, lake.storage_options, dump, versions["mdt_reports"], w, **common) for w in windows]
    rt.log(f"density: {len(only)} partitions on {n_actors} actors")
    parts, area_rows = _gather(ray, actors, calls, area_refs)
    kde_rows = pd.DataFrame([r for p in parts for r in p["rows"]] + area_rows)
    # Rows replaced: the refit partitions (only the refit cells when the change named them) and
    # the area density of their windows. Everything else keeps its values and run_id.
    by_window: dict[str, list[int]] = {}
    for w, s in only:
        by_window.setdefault(w, []).append(s)
    cell_clause = "" if cell_list is None else f" AND cell_id IN ({_sql_str(cell_list)})"
    terms = [f"(window = '{w}' AND cell_shard IN ({', '.join(map(str, sorted(ss)))}){cell_clause})" for w, ss in sorted(by_window.items())]
    terms += [f"(window = '{w}' AND cell_id = '{AREA_CELL_ID}')" for w in windows]
    predicate = " OR ".join(terms)
    result.rows_in = {"mdt_reports": sum(p["n_read"] for p in parts)}
    result.table_versions["kde_models"] = lake.write("kde_models", kde_rows, mode="overwrite", predicate=predicate, app_id=app_id)
    result.rows_written["kde_models"] = len(kde_rows)
    maps = [p["maps"] for p in parts if p["maps"] is not None]
    if maps:
        refit = kde_rows[kde_rows["cell_id"] != AREA_CELL_ID]
        map_terms = [f"(window = '{w}' AND cell_id IN ({_sql_str(g['cell_id'])}))" for w, g in refit.groupby("window")]
        frame = pd.concat(maps, ignore_index=True)
        result.table_versions["spatial_maps"] = lake.write(
            "spatial_maps", frame, mode="overwrite", predicate=f"method = 'kde' AND ({' OR '.join(map_terms)})", app_id=app_id)
        result.rows_written["spatial_maps"] = len(frame)
    kde_ks = pd.DataFrame([s for p in parts for s in p["ks"]], columns=["window", "cell_id", "ks"])
    metrics = [_metric(run_id, "map_ks", r.ks, cell_id=r.cell_id, window=r.window, split="all", model="kde") for r in kde_ks.itertuples()]
    metrics.append(_metric(run_id, "incremental_cells_refit", len(kde_rows) - len(area_rows)))
    result.table_versions["metrics"] = lake.write("metrics", pd.DataFrame(metrics), mode="append", app_id=app_id)
    result.rows_written["metrics"] = len(metrics)
    result.metrics["cells_refit"] = float(len(kde_rows) - len(area_rows))
    result.note = f"incremental: {len(only)} partitions, {len(kde_rows) - len(area_rows)} (window, cell) KDEs refit"
    return result


def _student_trainer(cfg: PipelineConfig, rt: Any):
    """The student's CV folds and final fit as Ray tasks (a GPU share on a GPU node), not on the driver."""
    from cellsynth.density._student import ray_trainer

    from cellsynth.cluster.ray_ import gpu_share

    rcfg = cfg.runtime.ray
    ray = rt.ray()
    share = gpu_share(ray, rcfg.gpus_per_actor, want_gpu=str(rt.device) == "cuda", n_workers=rcfg.n_actors)
    if share:
        return ray_trainer(ray, num_cpus=rcfg.cpus_per_actor, num_gpus=share, device="cuda")
    return ray_trainer(ray, num_cpus=rcfg.cpus_per_actor, device="cpu")


def _cell_mapper(cfg: PipelineConfig, rt: Any):
    """The teacher/prior's per-cell work as Ray tasks (chunks of cells), not on the driver."""
    from cellsynth.density._student import ray_mapper

    return ray_mapper(rt.ray(), num_cpus=cfg.runtime.ray.cpus_per_actor)


# Cells per staged frame of a site-only map method (~10^3 squares a cell): the whole method's
# frame, its centres and its Arrow copy took the density driver from 2.1 to 2.7 GB at 3,000 cells.
_STAGE_CELLS = 256

# Cells per chunk of the teacher/prior's per-cell work: ~0.1 s a cell, so a chunk is a few
# seconds of work (Ray's per-task overhead is ~10 ms) and a 10^3-cell layout makes 16 tasks.
_CELLS_PER_CHUNK = 64


def _method_frame(maps: dict[str, pd.DataFrame], method: str) -> pd.DataFrame:
    """One method's per-cell maps as one frame (window SITE_ONLY_WINDOW), built without a
    frame per cell."""
    ids = list(maps)
    frame = pd.concat([maps[c][["gx", "gy", "prob"]] for c in ids], ignore_index=True) if ids else \
        pd.DataFrame({"gx": np.empty(0, np.int64), "gy": np.empty(0, np.int64), "prob": np.empty(0)})
    frame["cell_id"] = np.repeat(np.asarray(ids, dtype=object), [len(maps[c]) for c in ids])
    return frame.assign(method=method, window=SITE_ONLY_WINDOW)


def _site_only_maps(cfg: PipelineConfig, cells: pd.DataFrame, kde_rows: pd.DataFrame, pooled: dict[str, pd.DataFrame],
                    truth_file: str | None, run_id: str, *, trainer=None, mapper=None) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The window-independent maps (Voronoi; the DEEPMEND teacher and student when enabled), as
    (method, {cell_id: map frame (gx, gy, prob)}) per method, and their scores."""
    from cellsynth.density._student import serial_mapper, serial_trainer, teacher_student_maps

    dcfg, res = cfg.density, cfg.density.map_resolution_m
    pad = 2 * res
    box = (
        min(kde_rows["x_min_m"].min(), cells["x_m"].min()) - pad, min(kde_rows["y_min_m"].min(), cells["y_m"].min()) - pad,
        max(kde_rows["x_max_m"].max(), cells["x_m"].max()) + pad, max(kde_rows["y_max_m"].max(), cells["y_m"].max()) + pad,
    )
    vor = voronoi_maps(cells, box_m=box, resolution_m=res)
    vor_by_cell = {c: g[["gx", "gy", "prob"]] for c, g in vor.groupby("cell_id")}
    del vor
    sources: list[tuple[str, dict]] = [("voronoi", vor_by_cell)]
    truth = _read_truth(truth_file, sorted(cells["cell_id"].tolist()))
    metrics: list[dict] = []
    for (window, cell_id), tmap in truth.items():
        if cell_id in vor_by_cell:
            metrics.append(_metric(run_id, "map_ks", ks_2d_maps(vor_by_cell[cell_id], tmap), cell_id=cell_id, window=window, split="all", model="voronoi"))
    cell_ids = np.asarray(sorted(pooled), dtype=object)
    held = set(cell_ids[random_test_mask(cell_ids, test_fraction=dcfg.student_holdout_fraction, seed=cfg.run.seed)]) \
        if dcfg.student and len(cell_ids) else set()
    # only the held-out cells' truth is scored from here on (a quarter of ~12,000 maps at 3,000 cells)
    truth = {k: v for k, v in truth.items() if k[1] in held}
    if dcfg.student:
        # Site layout alone (no user-density context): a cell without measurements has none of
        # its users in the measured area density, so the held-out score must not see them either.
        ts = teacher_student_maps(
            cells, pooled, resolution_m=res, patch_px=dcfg.student_patch_px, neighbour_radius_m=dcfg.student_context_radius_m,
            beta_grid=dcfg.teacher_beta_grid, holdout_cells=held, n_epochs=dcfg.student_epochs,
            min_mass=dcfg.map_min_mass, seed=cfg.run.seed, trainer=trainer or serial_trainer,
            mapper=mapper or serial_mapper, n_chunks=max(1, -(-len(cells) // _CELLS_PER_CHUNK)),
        )
        metrics.append(_metric(run_id, "student_temperature_db", ts["temperature_db"], model="student"))
        metrics.append(_metric(run_id, "student_used_by_cv", float(ts["student_used"]), model="student",
                               detail=json.dumps(ts["cv_ks"])))
        sources += [(method, ts[method]) for method in ("teacher", "student")]
        for cell_id, ks in ts["teacher_ks"].items():
            metrics.append(_metric(run_id, "teacher_ks_to_measured", ks, cell_id=cell_id, model="teacher", detail=f'{{"beta": {ts["beta"][cell_id]}}}'))
        # Student vs Voronoi vs the layout prior on cells the student never saw, against truth.
        per_model: dict[str, list[float]] = {"student": [], "voronoi": [], "prior": []}
        for cell_id in sorted(held):
            tmaps = [m for (w, c), m in truth.items() if c == cell_id]
            if not tmaps or cell_id not in ts["student"]:
                continue
            for model, src in (("student", ts["student"]), ("voronoi", vor_by_cell), ("prior", ts["prior"])):
                ks = float(np.mean([ks_2d_maps(src[cell_id], t) for t in tmaps]))
                per_model[model].append(ks)
                metrics.append(_metric(run_id, "map_ks", ks, cell_id=cell_id, split="holdout_cells", model=model))
        if per_model["student"]:
            means = {m: float(np.mean(v)) for m, v in per_model.items()}
            for model, value in means.items():
                metrics.append(_metric(run_id, "map_ks_mean", value, split="holdout_cells", model=model))
            metrics.append(_metric(run_id, "student_vs_voronoi_ks_gain", 1 - means["student"] / means["voronoi"], split="holdout_cells", model="student"))
    return sources, metrics


def _kde_map_scores(kde_ks: pd.DataFrame, metrics: list[dict], run_id: str, result: StageResult) -> list[dict]:
    out = [_metric(run_id, "map_ks", r.ks, cell_id=r.cell_id, window=r.window, split="all", model="kde") for r in kde_ks.itertuples()]
    vor = pd.DataFrame([m for m in metrics if m["metric"] == "map_ks" and m.get("model") == "voronoi" and m.get("split") == "all"])
    if kde_ks.empty or vor.empty:
        return out
    both = kde_ks.merge(vor.rename(columns={"value": "vor"})[["window", "cell_id", "vor"]], on=["window", "cell_id"])
    if both.empty:
        return out
    kde_mean, vor_mean = float(both["ks"].mean()), float(both["vor"].mean())
    gain = 1 - kde_mean / vor_mean
    out += [
        _metric(run_id, "map_ks_mean", kde_mean, split="all", model="kde"),
        _metric(run_id, "map_ks_mean", vor_mean, split="all", model="voronoi"),
        _metric(run_id, "kde_vs_voronoi_ks_gain", gain, split="all", model="kde"),
    ]
    result.metrics["kde_vs_voronoi_ks_gain"] = gain
    student_gain = [m for m in metrics if m["metric"] == "student_vs_voronoi_ks_gain"]
    if student_gain:
        result.metrics["student_vs_voronoi_ks_gain"] = student_gain[0]["value"]
    return out


def _share_detail(n_hit: int, n: int) -> str:
    """Sample size and 95% Wilson interval of a share scored on a sample."""
    z, p = 1.96, n_hit / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return json.dumps({"n": int(n), "ci95": [float(centre - half), float(centre + half)]})


def _association_scores(cfg: PipelineConfig, lake: Any, version: int, models: DensityModels, cells: pd.DataFrame, run_id: str, result: StageResult) -> list[dict]:
    # A uniform sample of the held-out reports (evaluate.max_test_rows, the bottom-k sample evaluate
    # scores on), read one partition at a time so the driver holds the sample, not the reports
    # (issue 15: reading every report here took ~1.3 GB of the driver at 3*10^6 reports); the
    # rows state n and a 95% CI.
    windows = set(models.windows)
    sample = BottomK(["report_id"], cfg.evaluate.max_test_rows, cfg.run.seed)
    for part in read_partitions(lake, "mdt_reports", ["report_id", "window", "x_m", "y_m", "serving_cell_id"], version=version):
        part = part[part["window"].isin(windows).to_numpy()]
        sample.add(part[split_held_out(cfg, part["report_id"].to_numpy())])
    df = stable_order(sample.frame())
    if df.empty:
        return []
    # kde: the configured rule (density.association); kde_ml: eq. 15 without prior, for reference.
    out, hits = [], {"kde": 0, "kde_ml": 0, "nearest_site": 0}
    if models.association == "ml":
        del hits["kde_ml"]
    for window, part in df.groupby("window"):
        xy = part[["x_m", "y_m"]].to_numpy()
        truth = part["serving_cell_id"].to_numpy(dtype=object)
        preds = {"kde": models.associate(window, xy), "nearest_site": nearest_site_associate(cells, xy)}
        if "kde_ml" in hits:
            preds["kde_ml"] = models.associate(window, xy, rule="ml")
        for model, pred in preds.items():
            n_hit = int((pred == truth).sum())
            hits[model] += n_hit
            out.append(_metric(run_id, "association_accuracy", n_hit / len(part), window=window, split="test", model=model,
                               detail=_share_detail(n_hit, len(part))))
    for window, scale in sorted(models.association_scale_.items()):
        cv = {f"{k:g}": v for k, v in models.association_cv_.get(window, {}).items()}
        out.append(_metric(run_id, "association_bandwidth_scale", scale, window=window, split="train_cv", model="kde",
                           detail=json.dumps({"cv_accuracy_by_scale": cv})))
    for model, n_hit in hits.items():
        out.append(_metric(run_id, "association_accuracy", n_hit / len(df), split="test", model=model,
                           detail=_share_detail(n_hit, len(df))))
        result.metrics[f"association_accuracy_{model}"] = n_hit / len(df)
    return out
