"""`cellsynth generate`: GUMBLE Algorithm 1 per window, radio regression per shard on Ray.

The driver samples positions from f_j^O and associates them (eq. 15); Ray tasks, one per cell
shard of the serving cell, load the radio models from the lake, predict serving/neighbour RSRP
and RSRQ, and stage Parquet files; the driver commits them once. Every task's randomness comes
from (run.seed, window, shard), so a rerun with the same seed and inputs writes the same rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from cellsynth.config import PipelineConfig
from cellsynth.errors import StageError
from cellsynth.generate import transforms as T
from cellsynth.geo import LocalFrame
from cellsynth.splits import SPLIT_KEYS, random_test_mask, stable_order
from cellsynth.splits import held_out as split_held_out
from cellsynth.stages import Incremental, StageResult, StageSpec

NAME = "generate"
# synthetic_traffic is read only by the "synthetic_traffic" load scenario; listing it always
# means a new traffic version regenerates, which is the safe side.
INPUTS = ("kde_models", "radio_models", "cells", "mdt_reports", "mdt_measurements", "synthetic_traffic")
OUTPUTS = ("synthetic_mdt",)


def _unread_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    # synthetic_traffic is read only for that load scenario; traffic rewrites it whole.
    return () if cfg.generate.load_scenario == "synthetic_traffic" else ("synthetic_traffic",)


STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    # Sizes and the privacy guard use the split's held-in rows; radio's threshold marks `reliable`;
    # values keep to ingest's reporting ranges.
    reads=("generate", "privacy", *SPLIT_KEYS, "ingest.n_cell_shards", "ingest.rsrp_range_dbm", "ingest.rsrq_range_db",
           "radio.epistemic_threshold_db",
           "density.prune_k_bandwidths", "density.association", "density.association_bandwidth_scales",
           "density.map_resolution_m"),
    incremental=Incremental(
        partitioned_inputs={"mdt_reports": "serving_cell_id"}, model_inputs=("kde_models", "radio_models"),
        # mdt_measurements feeds only the neighbour-detection maps; a cell whose measurements changed
        # materially gets a new radio model, and the radio_models diff regenerates its partitions.
        covered_inputs=("mdt_measurements",), unread_inputs=_unread_inputs,
    ),
)


def _shards_task(
    lake: Any,
    radio_factory: Callable[[], T.RadioLike],
    jobs: list[tuple[int, dict[str, list[Any]]]],
    cells: pd.DataFrame,
    settings: dict[str, Any],
    detection: T.DetectionMaps | None = None,
    load_table: pd.DataFrame | None = None,
    *frames: pd.DataFrame,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """A group of shards, (shard, {window: the tiles' position frames}) each: the radio models
    load once per group (the load, not the prediction, dominates a small shard's task). In a Ray
    task the frames are the tile tasks' outputs, passed as top-level object references (so the
    task starts once they exist and the rows never pass through the driver); `jobs` then holds
    their positions in `frames` instead of the frames."""
    import torch

    torch.set_num_threads(1)
    radio = radio_factory()
    return _stage_shards(lake, radio, _group_shards(jobs, settings, load_table, frames), cells, settings, detection)


def _concat_parts(parts: list[Any]) -> pd.DataFrame:
    """One window's positions of a shard from its tiles, in tile order (object refs resolved)."""
    refs = [i for i, p in enumerate(parts) if not isinstance(p, pd.DataFrame)]
    if refs:
        import ray

        got = ray.get([parts[i] for i in refs])
        parts = list(parts)
        for i, frame in zip(refs, got):
            parts[i] = frame
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else T.empty_positions()


def _loads(settings: dict[str, Any], load_table: pd.DataFrame | None, window: str, group: pd.DataFrame) -> np.ndarray:
    if settings["load_scenario_fixed"] or load_table is None:
        return np.full(len(group), settings["load_rho"])
    return T.loads_for(window, group["serving_cell_id"].to_numpy(), load_table, default_rho=settings["load_rho"])


def _tile_task(density: Any, window: str, tile: dict[str, Any], seed: int, n_cell_shards: int) -> tuple[pd.DataFrame, ...]:
    """Algorithm 1 for one spatial tile of a window: draw its positions from f_j^O, associate
    them (eq. 15 / MAP, loading only the KDEs of cells around the tile), and split the rows by
    the cell shard of their serving cell (one frame per shard, empty where none)."""
    positions = T.tile_positions(density, window, tile, rng=T.derived_seed(seed, "positions", window, tile["tile"]))
    groups = T.shard_groups(positions, n_cell_shards)
    return tuple(groups.get(s, positions.iloc[:0]) for s in range(n_cell_shards))


def _plan_task(density: Any, window: str, n_samples: int, seed: int, rows_per_tile: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The tiles of one window and the association scale (a CV over the window's cells, so it
    runs here, not on the driver)."""
    tiles = T.plan_tiles(density, window, n_samples, rng=T.derived_seed(seed, "positions", window), rows_per_tile=rows_per_tile)
    scales = {}
    if hasattr(density, "association_scale"):
        scales[window] = float(density.association_scale(window))
    return tiles, scales


def _fit_detection(resolution_m: float, smoothing_squares: int, measurements: Any) -> Any:
    """The neighbour detection maps of the held-in measurements (a frame, or a loader of one)."""
    rows = measurements() if callable(measurements) else measurements
    if rows is None:  # no mdt_measurements table: every candidate may be reported
        return None
    return T.DetectionMaps(resolution_m=resolution_m, smoothing_squares=smoothing_squares).fit(rows)


def _detection_task(rt: Any, cfg: PipelineConfig, measurements: Any) -> Any:
    """A Ray task reading the held-in rows (`measurements`: a loader) and fitting the detection maps: its reference."""
    fit = rt.ray().remote(num_cpus=1, max_retries=cfg.runtime.ray.max_task_retries)(_fit_detection)
    return fit.remote(cfg.density.map_resolution_m, cfg.generate.detection_smoothing_squares, measurements)


# Positions per re-association task of a reused window (areas of about this many rows, so the
# tasks spread over the CPUs and each loads only the KDEs around its area); a priori, as
# `rows_per_tile` for fresh draws.
REASSOCIATE_ROWS_PER_TASK = 40_000


def _ray_reassociate(ray: Any, density: Any, reuse: dict[str, Any], olds: dict[str, pd.DataFrame], *, retries: int,
                     rt: Any) -> dict[str, np.ndarray]:
    """{window: every row's serving cell now} for the reused windows, by Ray tasks over strips of
    the window's area (positions sorted by x, cut into runs of REASSOCIATE_ROWS_PER_TASK; each
    task loads only the KDEs of the cells around its strip)."""
    from cellsynth.generate.reuse import reassociate

    light = density.without_cache() if hasattr(density, "without_cache") else density
    density_ref = ray.put(light)
    task = ray.remote(num_cpus=1, max_retries=retries)(reassociate)
    pending = []
    for w, old in olds.items():
        xy = old[["x_m", "y_m"]].to_numpy(dtype=float)
        serving = old["serving_cell_id"].to_numpy(dtype=object)
        order = np.argsort(xy[:, 0], kind="stable")
        for idx in np.array_split(order, max(1, -(-len(order) // REASSOCIATE_ROWS_PER_TASK))):
            if len(idx):
                pending.append((w, idx, task.remote(density_ref, w, sorted(reuse[w].kde_cells), xy[idx], serving[idx])))
    out = {w: old["serving_cell_id"].to_numpy(dtype=object).copy() for w, old in olds.items()}
    with rt.progress("re-associating reused positions", len(pending)) as advance:
        for w, idx, ref in pending:
            out[w][idx] = ray.get(ref)
            advance(1)
    return out


def _reused_windows(lake: Any, density: Any, reuse: dict[str, Any], n_shards: int, rt: Any,
                    reassociate_all: Callable[[dict[str, pd.DataFrame]], dict[str, np.ndarray]] | None = None,
                    ) -> tuple[dict[int, dict[str, pd.DataFrame]], list[pd.DataFrame], set[int], int]:
    """The reused windows' rows to regenerate, as positions by shard ({shard: {window: frame}}),
    the rows kept (whole windows; the caller keeps those of the partitions it rewrites), the
    shards whose rows change, and how many rows are regenerated. `reassociate_all` ({window: old
    rows} -> {window: serving cells now}; Ray tasks) re-associates every window at once; without
    it each window is re-associated here."""
    from cellsynth.generate.reuse import rows_to_regenerate, unshard_ids
    from cellsynth.lake.partitions import PartitionReader

    table = PartitionReader(lake, "synthetic_mdt")  # one dataset for every window's read
    parts: dict[int, dict[str, pd.DataFrame]] = {}
    kept, touched, n_regen = [], set(), 0
    olds = {}
    for w, plan in sorted(reuse.items()):
        if hasattr(density, "association_scale_"):
            density.association_scale_[w] = plan.scale  # the scale the rows were drawn with
        olds[w] = stable_order(table.read(None, [("window", "=", w)]), ("sample_id",))
    nows = reassociate_all(olds) if reassociate_all is not None else {}
    with rt.progress("reusing positions (incremental)", len(reuse)) as advance:
        for w, plan in sorted(reuse.items()):
            old = olds.pop(w)
            regen, serving = rows_to_regenerate(density, plan, old, nows.pop(w, None))
            positions = pd.DataFrame({
                "sample_id": unshard_ids(old["sample_id"][regen], w).to_numpy(dtype=object), "window": w,
                "x_m": old["x_m"].to_numpy()[regen], "y_m": old["y_m"].to_numpy()[regen],
                "serving_cell_id": serving[regen],
            })
            for s, group in T.shard_groups(positions, n_shards).items():
                parts.setdefault(s, {})[w] = group
                touched.add(int(s))
            touched.update(int(s) for s in np.unique(old["cell_shard"].to_numpy()[regen]))
            kept.append(old[~regen])
            n_regen += int(regen.sum())
            advance(1)
    return parts, kept, touched, n_regen


def _shard_groups(shards: list[int], n_groups: int) -> list[list[int]]:
    """Shards dealt round-robin into at most n_groups non-empty groups (one Ray task each)."""
    n = max(1, min(n_groups, len(shards)))
    return [shards[i::n] for i in range(n) if shards[i::n]]


def _shard_task(
    lake: Any,
    radio: T.RadioLike,
    by_window: dict[str, pd.DataFrame],
    loads: dict[str, np.ndarray | None],
    cells: pd.DataFrame,
    settings: dict[str, Any],
    shard: int,
    detection: T.DetectionMaps | None = None,
) -> tuple[list[dict[str, Any]], Any]:
    """One shard on its own (`_stage_shards` with a single shard)."""
    actions, stats = _stage_shards(lake, radio, {shard: (by_window, loads)}, cells, settings, detection)
    return actions, (stats[0] if stats else None)


def _stage_shards(
    lake: Any,
    radio: T.RadioLike,
    shards: dict[int, tuple[dict[str, pd.DataFrame], dict[str, np.ndarray | None]]],
    cells: pd.DataFrame,
    settings: dict[str, Any],
    detection: T.DetectionMaps | None = None,
    plans: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Predict radio values for every (shard, window)'s positions and stage one table per shard.
    Each (shard, window) draws from its own seed (run.seed, window, shard), so grouping shards
    into tasks changes no row; the predictions are pooled over the group (`synthesize_many`),
    so each cell's radio posterior is solved once per task. Returns the staged actions and the
    exact privacy distance stats of every shard that staged rows (when the guard is on)."""
    keys, outs = _synthesize(radio, shards, cells, settings, detection, plans=plans)
    frame = LocalFrame(settings["frame_lat0"], settings["frame_lon0"])
    actions: list[dict[str, Any]] = []
    stats = []
    reader = None
    if settings.get("privacy_distance") and keys:
        from cellsynth.lake.partitions import PartitionReader

        reader = PartitionReader(lake, "mdt_reports")
    for shard in sorted(set(keys)):
        parts = [o for k, o in zip(keys, outs) if k == shard]
        out = pd.concat(parts, ignore_index=True)
        out["lat"], out["lon"] = frame.to_latlon(out["x_m"].to_numpy(), out["y_m"].to_numpy())
        table = T.to_table(out, n_neighbours=settings["n_neighbours"], scenario=settings["scenario"],
                           run_id=settings["run_id"], n_cell_shards=settings["n_cell_shards"])
        stats.append(_shard_distance_stats(lake, table, shard, settings, reader) if settings.get("privacy_distance") else None)
        actions.extend(lake.stage_files("synthetic_mdt", table))
    return actions, stats


def _synthesize(
    radio: T.RadioLike,
    shards: dict[int, tuple[dict[str, pd.DataFrame], dict[str, np.ndarray | None]]],
    cells: pd.DataFrame,
    settings: dict[str, Any],
    detection: T.DetectionMaps | None = None,
    requests_only: bool = False,
    plans: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[Any]]:
    """`synthesize_many` over every (shard, window) of `shards`, in (shard, window) order: the
    shard of each output and the outputs (with `requests_only` each job's draws instead: the
    radio is asked, no rows are built; `plans` gives those draws back)."""
    index = T.CellIndex(cells["cell_id"].tolist(), cells[["x_m", "y_m"]].to_numpy())
    keys, jobs = [], []
    for shard in sorted(shards):
        by_window, loads = shards[shard]
        for window in sorted(by_window):
            if len(by_window[window]):
                keys.append(shard)
                jobs.append((by_window[window], loads[window], T.derived_seed(settings["seed"], "generate", window, shard)))
    outs = T.synthesize_many(
        jobs, radio, index, n_neighbours=settings["n_neighbours"], neighbour_radius_m=settings["neighbour_radius_m"],
        neighbour_candidates=settings["neighbour_candidates"], epistemic_threshold_db=settings["epistemic_threshold_db"],
        values=settings["values"], detection=detection, requests_only=requests_only, plans=plans,
        rsrp_range_dbm=settings["rsrp_range_dbm"], rsrq_range_db=settings["rsrq_range_db"],
    )
    return keys, outs


# ------------------------------------------- Ray: radio predictions grouped by the predicted cell
# A shard group's rows need RSRP predictions of nearly every cell of the network (their
# neighbours), so when each group's task predicted its own rows every task factorised nearly
# every cell's GP (issue 15: at 10^3 cells the Cholesky factors were ~a quarter of the
# prediction time, paid once per task, i.e. once per CPU of the cluster), and each task asked a
# cell for only its share of the rows, too few to pay for the cell's variance grid
# (`radio/fastvar.py`). So with Ray the shard groups run in three steps: (1) each group's task
# runs `synthesize_many` with a recording radio (its random draws come before the predictions
# and do not depend on them) and splits the prediction requests by the owner of the predicted
# cell (a bucket: a hash of its id); (2) each prediction task owns some buckets and predicts
# every request for their cells, all groups' rows of a cell in one call (each cell factorised
# once in the whole stage); (3) each group's task runs `synthesize_many` again with the answers
# replayed, and stages its rows.
#
# Task sizes. Ray keeps the arguments of the tasks running on a node within a share of its
# object store (`max_task_args_memory_fraction`, 0.7 by default) and queues a task whose
# arguments would pass it. At 3,000 cells with one prediction task per CPU each task's
# arguments were ~220 MB against a 512 MB store, so the two tasks ran one after the other in one
# worker while the other CPU idled (issue 15). So the requests are split into many buckets and
# the driver packs them into prediction tasks whose arguments fit that share with one task per
# CPU running, and at least one task per CPU; the shard groups are sized the same way from the
# planned rows before step 1 runs.
RAY_TASK_ARGS_FRACTION = 0.7  # Ray's default max_task_args_memory_fraction
TASK_ARGS_MARGIN = 0.5  # of that share: other objects stay pinned meanwhile (tile frames, answers)
# Step 3's arguments per synthetic row, an estimate that only sizes the groups: at 10^3 cells with
# the default 4 neighbours the draws and layout pickled to ~120 bytes a row and the answers to
# ~150; the tile frames (positions and serving cell) add about 50.
REPLAY_ARG_BYTES_PER_ROW = 320


def _n_buckets(n_cpus: int) -> int:
    """Buckets of predicted cells: enough to pack into tasks of even size on any cluster."""
    return max(64, 4 * n_cpus)


def _task_args_budget_bytes(nodes: list[dict[str, Any]]) -> float:
    """The argument bytes one task may have so that one task per CPU fits every node's share
    of its object store (`ray.nodes()` rows; unbounded where none reports a store)."""
    per_cpu = [n["Resources"]["object_store_memory"] / n["Resources"]["CPU"] for n in nodes
               if n.get("Alive", True) and n.get("Resources", {}).get("CPU") and n["Resources"].get("object_store_memory")]
    return RAY_TASK_ARGS_FRACTION * TASK_ARGS_MARGIN * min(per_cpu) if per_cpu else float("inf")


def _n_groups(n_rows: int, n_cpus: int, budget_bytes: float, n_shards: int) -> int:
    """Shard groups for `n_rows` planned synthetic rows: one per CPU at least, more when a
    group's step-3 arguments would not fit the budget, never more than the shards."""
    need = int(np.ceil(n_rows * REPLAY_ARG_BYTES_PER_ROW / budget_bytes)) if np.isfinite(budget_bytes) else 1
    return max(1, min(n_shards, max(n_cpus, need)))


def _pack_buckets(sizes: np.ndarray, n_cpus: int, budget_bytes: float) -> list[list[int]]:
    """The non-empty buckets packed into prediction tasks (largest first onto the lightest
    task): at least one task per CPU, enough that each fits the budget where the buckets allow."""
    sizes = np.asarray(sizes, dtype=float)
    nonempty = np.flatnonzero(sizes > 0)
    if not len(nonempty):
        return []
    need = int(np.ceil(sizes.sum() / budget_bytes)) if np.isfinite(budget_bytes) else 1
    n = min(len(nonempty), max(n_cpus, need))
    loads, tasks = np.zeros(n), [[] for _ in range(n)]
    for b in nonempty[np.argsort(-sizes[nonempty], kind="stable")]:
        i = int(np.argmin(loads))
        tasks[i].append(int(b))
        loads[i] += sizes[b]
    return [sorted(t) for t in tasks]


def _request_bytes(part: dict[str, tuple]) -> float:
    """About what a bucket's requests weigh in the object store (ids pickle as their text)."""
    total = 0.0
    for ids, xy, rho in part.values():
        total += sum(map(len, ids)) + 8.0 * len(ids) + xy.nbytes + (0 if rho is None else rho.nbytes)
    return total


class _RecordingRadio:
    """A RadioLike that answers NaN and records every predict call (target, cell ids, positions, loads)."""

    def __init__(self, cells: dict[str, list[str]]):
        self._cells = cells
        self.calls: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = []

    def cells(self, target: str) -> list[str]:
        return self._cells[target]

    def predict(self, target: str, cell_ids: np.ndarray, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
                seed: int = 0) -> Any:
        from cellsynth.radio.model import RadioPrediction

        ids = np.asarray(cell_ids, dtype=object).astype(str)
        self.calls.append((target, ids, np.asarray(xy_m, dtype=float).reshape(-1, 2),
                           None if load_rho is None else np.asarray(load_rho, dtype=float)))
        nan = np.full(len(ids), np.nan)
        return RadioPrediction(nan, nan.copy(), nan.copy(), dof=np.full(len(ids), np.inf))


class _ReplayRadio:
    """A RadioLike that answers each predict call with the next prediction of `answers`."""

    def __init__(self, cells: dict[str, list[str]], answers: list[Any]):
        self._cells, self._answers, self._next = cells, answers, 0

    def cells(self, target: str) -> list[str]:
        return self._cells[target]

    def predict(self, target: str, cell_ids: np.ndarray, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
                seed: int = 0) -> Any:
        if self._next >= len(self._answers) or len(self._answers[self._next].mean) != len(cell_ids):
            raise StageError("generate: the replayed radio predictions do not match the calls (internal error)")
        self._next += 1
        return self._answers[self._next - 1]


def _group_shards(jobs: list[tuple[int, dict[str, list[Any]]]], settings: dict[str, Any], load_table: pd.DataFrame | None,
                  frames: tuple[pd.DataFrame, ...]) -> dict[int, tuple[dict[str, pd.DataFrame], dict[str, np.ndarray]]]:
    """A group's {shard: (positions by window, loads by window)} from its tile frames (`_shards_task`'s jobs)."""
    shards = {}
    for shard, parts in jobs:
        if frames:
            parts = {w: [frames[i] for i in idx] for w, idx in parts.items()}
        by_window = {w: _concat_parts(p) for w, p in parts.items()}
        shards[shard] = (by_window, {w: _loads(settings, load_table, w, f) for w, f in by_window.items()})
    return shards


def _requests_task(cells_by_target: dict[str, list[str]], jobs: list[tuple[int, dict[str, list[Any]]]], cells: pd.DataFrame,
                   settings: dict[str, Any], detection: T.DetectionMaps | None, load_table: pd.DataFrame | None,
                   n_buckets: int, *frames: pd.DataFrame) -> tuple[Any, ...]:
    """Step 1 for one shard group: its prediction requests split by the bucket of the predicted
    cell (one return value per bucket: {target: (cell ids, positions, loads)}, the calls' rows in
    call order), then each bucket's approximate size in bytes (an array: the driver packs the
    prediction tasks by it), then the calls' layout with the jobs' draws ((layout, plans); layout
    = target and each row's bucket per call; plans = `synthesize_many`'s draws, which step 3 reuses)."""
    rec = _RecordingRadio(cells_by_target)
    with np.errstate(all="ignore"):
        _, plans = _synthesize(rec, _group_shards(jobs, settings, load_table, frames), cells, settings, detection,
                               requests_only=True)
    layout, parts = [], [{} for _ in range(n_buckets)]
    for target, ids, xy, rho in rec.calls:
        bucket = T.shards_of_ids(ids, n_buckets)
        layout.append((target, bucket))
        for b, sel in enumerate(T.rows_by_layer(bucket, n_buckets)):
            parts[b].setdefault(target, []).append((ids[sel], xy[sel], None if rho is None else rho[sel]))
    out = []
    for part in parts:
        merged = {}
        for target, pieces in part.items():
            rhos = [r for _, _, r in pieces]
            merged[target] = (np.concatenate([i for i, _, _ in pieces]), np.concatenate([x for _, x, _ in pieces]).reshape(-1, 2),
                              None if any(r is None for r in rhos) else np.concatenate(rhos))
        out.append(merged)
    return (*out, np.array([_request_bytes(p) for p in out]), (layout, plans))


def _predict_task(radio_factory: Callable[[], T.RadioLike], buckets: list[int], *parts: dict[str, tuple]) -> Any:
    """Step 2 for the cells of some buckets: every group's requests for them predicted together
    (all rows of a cell in one call); `parts` are group-major (group k's bucket buckets[i] at
    k * len(buckets) + i). One return value per group: {bucket: {target: (mean, epistemic std,
    aleatoric std, dof)}}."""
    import torch

    torch.set_num_threads(1)
    radio = radio_factory()
    nb = len(buckets)
    keys = [(k, buckets[i]) for k in range(len(parts) // nb) for i in range(nb)]
    out: list[dict[int, dict[str, tuple]]] = [{b: {} for b in buckets} for _ in range(len(parts) // nb)]
    for target in sorted({t for p in parts for t in p}):
        have = [j for j, p in enumerate(parts) if target in p and len(p[target][0])]
        if not have:
            continue
        ids = np.concatenate([parts[j][target][0] for j in have])
        xy = np.concatenate([parts[j][target][1] for j in have]).reshape(-1, 2)
        rhos = [parts[j][target][2] for j in have]
        rho = None if any(r is None for r in rhos) else np.concatenate(rhos)
        got = T.predict_pooled(radio, target, ids, xy, load_rho=rho, with_dof=True)
        at = 0
        for j in have:
            n = len(parts[j][target][0])
            k, b = keys[j]
            out[k][b][target] = tuple(v[at:at + n] for v in got)
            at += n
    return tuple(out) if len(out) > 1 else out[0]


def _replay_task(lake: Any, cells_by_target: dict[str, list[str]], jobs: list[tuple[int, dict[str, list[Any]]]],
                 cells: pd.DataFrame, settings: dict[str, Any], detection: T.DetectionMaps | None,
                 load_table: pd.DataFrame | None, n_frames: int, calls: tuple[list[tuple[str, np.ndarray]], list[Any]],
                 *rest: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Step 3 for one shard group: `synthesize_many` with step 1's draws and the owners' answers
    replayed call by call, then staged as `_stage_shards` stages."""
    from cellsynth.radio.model import RadioPrediction

    layout, plans = calls

    frames = rest[:n_frames]
    by_bucket: dict[int, dict[str, tuple]] = {}
    for got in rest[n_frames:]:
        by_bucket.update(got)
    cursor: dict[tuple[int, str], int] = {}
    answers = []
    for target, bucket in layout:
        vals = [np.empty(len(bucket)) for _ in range(4)]
        for b, sel in enumerate(T.rows_by_layer(bucket, int(bucket.max()) + 1 if len(bucket) else 0)):
            if not len(sel):
                continue
            at = cursor.get((b, target), 0)
            for v, got in zip(vals, by_bucket[b][target]):
                v[sel] = got[at:at + len(sel)]
            cursor[(b, target)] = at + len(sel)
        answers.append(RadioPrediction(vals[0], vals[1], vals[2], dof=vals[3]))
    return _stage_shards(lake, _ReplayRadio(cells_by_target, answers), _group_shards(jobs, settings, load_table, frames),
                         cells, settings, detection, plans=plans)


class _ModelCells:
    """`RadioModels.cells` from the radio_models rows alone (no weight files loaded)."""

    def __init__(self, rows: pd.DataFrame):
        self._rows = rows

    def cells(self, target: str) -> list[str]:
        from cellsynth.radio.collection import own_cells

        return own_cells(self._rows, target)


def _load_radio(lake: Any, version: int | None) -> T.RadioLike:
    from cellsynth.radio import RadioModels

    return RadioModels.load(lake, version=version)


def _observed_loads(lake: Any, cfg: PipelineConfig) -> pd.DataFrame:
    """The held-in reports' (window, serving_cell_id, load_rho) in an order fixed by content (the
    loads are averaged per cell in row order), read one window at a time with the report ids
    only for the split: the whole table's ids and labels, one string object per row, took the
    driver from 0.35 to 1.4 GB at 3,000 cells (issue 15). Each window sorted by report id keeps
    every (window, cell)'s rows in the order the whole table sorted by report id had."""
    from cellsynth.lake.partitions import PartitionReader

    parts = []
    reader = PartitionReader(lake, "mdt_reports")
    for flt in reader.window_filters:
        reports = stable_order(reader.read(["report_id", "window", "serving_cell_id", "load_rho"], flt))
        held_out = split_held_out(cfg, reports["report_id"].to_numpy())
        kept = reports.loc[~held_out, ["window", "serving_cell_id", "load_rho"]]
        for col in ("window", "serving_cell_id"):  # one string object per label, not per row
            kept[col] = kept[col].astype("category").astype(object)
        parts.append(kept)
    return pd.concat(parts, ignore_index=True)


def _held_in_measurements(lake: Any, cfg: PipelineConfig) -> pd.DataFrame | None:
    """The held-in rows the detection maps learn from (cell_id, role, x_m, y_m), read one
    (window, cell shard) partition at a time with the ids and labels as categories: the report
    ids (only for the split) and one string per row for every measurement of the network made
    this the driver's largest frame (~0.7 GB at 10^3 cells; a window at a time still took the
    driver 1 GB above its base at 3,000 cells; issue 15). The maps count rows, so the order of
    the partitions does not matter."""
    from pandas.api.types import union_categoricals

    from cellsynth.lake.partitions import PartitionReader

    if not lake.exists("mdt_measurements"):
        return None
    parts = []
    reader = PartitionReader(lake, "mdt_measurements")
    for flt in reader.filters:
        meas = stable_order(reader.read(["report_id", "cell_id", "role", "x_m", "y_m"], flt))
        held_out = split_held_out(cfg, meas["report_id"].to_numpy())
        meas = meas.loc[~held_out, ["cell_id", "role", "x_m", "y_m"]]
        parts.append(meas.astype({"cell_id": "category", "role": "category"}))
    if len(parts) == 1:
        return parts[0].reset_index(drop=True)
    return pd.DataFrame({
        "cell_id": union_categoricals([p["cell_id"] for p in parts]),
        "role": union_categoricals([p["role"] for p in parts]),
        "x_m": np.concatenate([p["x_m"].to_numpy() for p in parts]),
        "y_m": np.concatenate([p["y_m"].to_numpy() for p in parts]),
    })


def generate(
    cfg: PipelineConfig,
    rt: Any,
    *,
    run_id: str,
    density: Any,
    radio: T.RadioLike,
    radio_factory: Callable[[], T.RadioLike],
    cells: pd.DataFrame,
    observed_loads: pd.DataFrame | None,
    synthetic_traffic: pd.DataFrame | None,
    measurements: pd.DataFrame | Callable[[], pd.DataFrame | None] | None = None,
    partitions: set[tuple[str, int]] | None = None,
    detection: Any = None,
    reuse: dict[str, Any] | None = None,
    detection_ref: Any = None,
) -> StageResult:
    """The stage body with its inputs already loaded (tests pass small fakes).

    `partitions` (incremental runs): regenerate only the windows x cell shards these
    (window, cell_shard) pairs span and overwrite just those partitions of `synthetic_mdt`.

    `measurements` are the held-in mdt_measurements rows the neighbour detection maps learn
    from, or a callable that reads them (with Ray a task then reads and fits them while the driver
    plans); None, or generate.neighbour_detection off: every candidate may be reported.
    `detection` is a prebuilt `DetectionMaps`-like object (`prob(cell_ids, xy_m)`) used instead
    (the dp mode's DP detection counts). `detection_ref` (Ray runs): the maps as a Ray object
    reference, already being fitted by a task (`run` starts it before it loads anything).

    `reuse` (incremental runs, `reuse.plan_reuse`): {window: WindowReuse} of the windows whose
    positions are taken from the table instead of drawn again; only their rows whose serving cell
    changed or moved are regenerated, the rest of their rewritten partitions is kept.
    """
    g = cfg.generate
    windows = T.check_windows(g.windows, density.windows)
    keep_shards = None
    if partitions is not None:
        windows = [w for w in windows if w in {p[0] for p in partitions}]
        keep_shards = {int(p[1]) for p in partitions}
    T.check_n_neighbours(g.n_neighbours, len(radio.cells("rsrp")))
    scenario = T.effective_load_scenario(g.load_scenario, observed_loads)
    scenario_note = (f"scenario={scenario} at load_rho {g.load_rho:g} (generate.load_scenario {g.load_scenario!r}: no report "
                     "has a load)" if scenario != g.load_scenario else f"scenario={scenario}")
    if scenario != g.load_scenario:
        rt.log(f"generate: {scenario_note}")
    load_table = T.cell_loads(
        scenario, observed=observed_loads, synthetic_traffic=synthetic_traffic,
        fixed_rho=g.load_rho, quantile=g.load_quantile,
    )
    if cells.empty:
        raise StageError("generate: the cells table is empty; run ingest first")
    settings = {
        "seed": cfg.run.seed, "n_neighbours": g.n_neighbours, "neighbour_radius_m": g.neighbour_radius_m,
        "neighbour_candidates": g.neighbour_candidates, "epistemic_threshold_db": cfg.radio.epistemic_threshold_db,
        "values": g.values, "scenario": scenario, "run_id": run_id, "n_cell_shards": cfg.ingest.n_cell_shards,
        # the ranges real values were accepted in: synthetic values keep to them (issue 20 item 8)
        "rsrp_range_dbm": tuple(cfg.ingest.rsrp_range_dbm), "rsrq_range_db": tuple(cfg.ingest.rsrq_range_db),
        "frame_lat0": float(cells["frame_lat0"].iloc[0]), "frame_lon0": float(cells["frame_lon0"].iloc[0]),
    }
    settings.update({"load_scenario_fixed": scenario == "fixed", "load_rho": g.load_rho})
    # Algorithm 1 by spatial tiles (`plan_tiles`): each tile's positions are drawn and associated
    # by one task that loads only the KDEs of the cells around it, then split by the serving
    # cell's shard; the shard tasks predict the radio values. With Ray the rows travel from tile
    # tasks to shard tasks as object references: the driver plans and commits, nothing more.
    # Seeds are per (window, tile) and (window, shard), so Ray and the driver write the same rows.
    n_samples = {w: T.sample_size(density.n_reports(w), g.multiple) for w in windows}
    n_real = sum(density.n_reports(w) for w in windows)
    n_shards = cfg.ingest.n_cell_shards
    wanted = sorted(keep_shards) if keep_shards is not None else list(range(n_shards))
    if g.n_neighbours == 0 or not g.use_ray or detection is not None:
        detection_ref = None  # a prebuilt `detection` wins; without Ray the maps are fitted here
    if g.n_neighbours == 0:
        detection = None
    elif detection is None and detection_ref is None and g.neighbour_detection and measurements is not None:
        if g.use_ray and callable(measurements):
            # read and fitted by a task while the driver plans (and re-associates reused positions)
            detection_ref = _detection_task(rt, cfg, measurements)
        else:
            detection = _fit_detection(cfg.density.map_resolution_m, g.detection_smoothing_squares, measurements)
    measurements = None  # the maps hold what generation needs; the rows leave the driver
    cell_cols = cells[["cell_id", "x_m", "y_m"]].reset_index(drop=True)
    actions: list[dict[str, Any]] = []
    shard_stats: list[Any] = []
    guard_on = cfg.privacy.guard and not cfg.privacy.publish_despite_guard and rt.lake.exists("mdt_reports")
    settings.update(_guard_settings(cfg) if guard_on else {})
    windows = [w for w in windows if n_samples[w] > 0]
    # Reused windows: positions from the table, regenerated rows only (`cellsynth.generate.reuse`).
    reuse = {w: r for w, r in (reuse or {}).items() if w in windows} if keep_shards is not None else {}
    reused_parts: dict[int, dict[str, pd.DataFrame]] = {}
    kept_rows: list[pd.DataFrame] = []
    kept_staged: tuple[list[dict[str, Any]], int] | None = None
    scales_used: dict[str, float] = {}
    if reuse:
        reassociate_all = None
        if g.use_ray:
            ray = rt.ray()
            reassociate_all = functools.partial(_ray_reassociate, ray, density, reuse, retries=cfg.runtime.ray.max_task_retries,
                                                rt=rt)
        reused_parts, kept_rows, touched, n_regen = _reused_windows(rt.lake, density, reuse, n_shards, rt, reassociate_all)
        keep_shards = keep_shards | touched
        wanted = sorted(keep_shards)
        scales_used.update({w: r.scale for w, r in reuse.items()})
    drawn = [w for w in windows if w not in reuse]
    if g.use_ray and windows:
        ray = rt.ray()
        retries = cfg.runtime.ray.max_task_retries
        light = density.without_cache() if hasattr(density, "without_cache") else density
        density_ref = ray.put(light)
        plan = ray.remote(num_cpus=1, max_retries=retries)(_plan_task)
        plans = ray.get([plan.remote(density_ref, w, n_samples[w], cfg.run.seed, g.rows_per_tile) for w in drawn])
        for _, scales in plans:  # the tile tasks reuse each window's association scale
            scales_used.update(scales)
            if hasattr(light, "association_scale_"):
                light.association_scale_.update(scales)
        density_ref = ray.put(light)
        tile = ray.remote(num_cpus=1, max_retries=retries, num_returns=n_shards)(_tile_task)
        parts: dict[int, dict[str, list[Any]]] = {s: {w: [f] for w, f in reused_parts.get(s, {}).items()} for s in wanted}
        with rt.progress("sampling and associating (tiles)", sum(len(p[0]) for p in plans)) as advance:
            for w, (tiles, _) in zip(drawn, plans):
                for t in tiles:
                    refs = tile.remote(density_ref, w, t, cfg.run.seed, n_shards)
                    refs = refs if isinstance(refs, list) else [refs]
                    for s in wanted:
                        parts[s].setdefault(w, []).append(refs[s])
                    advance(1)
        lake_ref, cells_ref, loads_ref = ray.put(rt.lake), ray.put(cell_cols), ray.put(load_table)
        detection_ref = detection_ref if detection_ref is not None else ray.put(detection)
        # Shard groups and prediction tasks: one per CPU at least, more where their arguments
        # would not fit the object store's share (see `_task_args_budget_bytes`), not one per
        # shard (a small incremental job's tasks would each load every radio model).
        n_cpus = int(ray.cluster_resources().get("CPU", 1))
        budget = _task_args_budget_bytes(ray.nodes())
        n_rows = sum(n_samples.values()) * len(wanted) // max(1, n_shards)
        groups = _shard_groups(wanted, _n_groups(n_rows, n_cpus, budget, len(wanted)))
        n_buckets = _n_buckets(n_cpus)
        model_cells = ray.put({t: list(radio.cells(t)) for t in ("rsrp", "rsrq")})
        requests = ray.remote(num_cpus=1, max_retries=retries, num_returns=n_buckets + 2)(_requests_task)
        predict = ray.remote(num_cpus=1, max_retries=retries, num_returns=len(groups))(_predict_task)
        task = ray.remote(num_cpus=1, max_retries=retries)(_replay_task)
        specs = []
        for group in groups:
            flat: list[Any] = []
            spec = []
            for s in group:
                by_w = {}
                for w, refs in parts[s].items():
                    by_w[w] = list(range(len(flat), len(flat) + len(refs)))
                    flat.extend(refs)
                spec.append((s, by_w))
            specs.append((spec, flat))
        asked = [requests.remote(model_cells, spec, cells_ref, settings, detection_ref, loads_ref, n_buckets, *flat)
                 for spec, flat in specs]
        with rt.progress("recording radio requests", 1) as advance:
            sizes = np.sum(ray.get([a[n_buckets] for a in asked]), axis=0)
            advance(1)
        answered = [predict.remote(radio_factory, task_buckets, *[asked[k][b] for k in range(len(groups)) for b in task_buckets])
                    for task_buckets in _pack_buckets(sizes, n_cpus, budget)]
        answered = [a if isinstance(a, list) else [a] for a in answered]
        with rt.progress("regressing radio values", len(wanted)) as advance:
            pending = {}
            # Results are kept in group order, not completion order: the commit's file order is
            # the order a later read returns rows in, and the guard merges the shards' distances.
            by_group: dict[int, tuple[list[Any], list[Any]]] = {}
            for k, (group, (spec, flat)) in enumerate(zip(groups, specs)):
                ref = task.remote(lake_ref, model_cells, spec, cells_ref, settings, detection_ref, loads_ref, len(flat),
                                  asked[k][-1], *flat, *[a[k] for a in answered])
                pending[ref] = (len(pending), len(group))
            # The kept rows are written while the tasks run: the driver's CPU is otherwise idle
            # here, and a CPU would idle behind the last task (incremental runs, issue 15).
            kept_staged = _stage_kept(rt.lake, kept_rows, keep_shards)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                k, n = pending.pop(done[0])
                by_group[k] = ray.get(done[0])
                advance(n)
            for k in sorted(by_group):
                actions.extend(by_group[k][0])
                shard_stats.extend(by_group[k][1])
    elif windows:
        import torch

        torch.set_num_threads(1)  # as in a Ray task: the same rows either way
        local_parts: dict[int, dict[str, list[Any]]] = {s: {w: [f] for w, f in reused_parts.get(s, {}).items()} for s in wanted}
        with rt.progress("sampling and associating (tiles)", len(drawn)) as advance:
            for w in drawn:
                tiles, scales = _plan_task(density, w, n_samples[w], cfg.run.seed, g.rows_per_tile)
                scales_used.update(scales)
                for t in tiles:
                    frames = _tile_task(density, w, t, cfg.run.seed, n_shards)
                    for s in wanted:
                        local_parts[s].setdefault(w, []).append(frames[s])
                advance(1)
        with rt.progress("regressing radio values", len(wanted)) as advance:
            # all shards in one pooled pass: each cell's radio posterior is solved once
            acts, stats = _shards_task(rt.lake, lambda: radio, [(s, local_parts[s]) for s in wanted], cell_cols, settings,
                                       detection, load_table)
            actions.extend(acts)
            shard_stats.extend(stats)
            advance(len(wanted))
    n_rows = sum(int(_num_records(a)) for a in actions)
    if kept_staged is None:
        kept_staged = _stage_kept(rt.lake, kept_rows, keep_shards)
    kept_actions, n_kept = kept_staged
    actions.extend(kept_actions)  # after the regenerated rows' files, as they always were
    if not actions and keep_shards is None:
        raise StageError("generate: no synthetic rows were produced (every window has zero training reports)")
    if guard_on and actions:
        _privacy_guard(cfg, rt.lake, actions, shard_stats)
    # One atomic commit; overwrite because a regeneration replaces the table.
    filters = None if keep_shards is None else [("window", "in", windows), ("cell_shard", "in", sorted(keep_shards))]
    # The commit records the association scales the table's rows were drawn with (reuse needs them).
    from cellsynth.generate.reuse import SCALES_KEY, recorded_scales

    scales = {**(recorded_scales(rt.lake) if keep_shards is not None else {}), **scales_used}
    version = rt.lake.commit_files("synthetic_mdt", actions, mode="overwrite", partition_filters=filters,
                                   app_id=f"{run_id}:generate", note={SCALES_KEY: scales} if scales else None)
    return StageResult(
        stage=NAME, run_id=run_id, rows_in={"mdt_reports_held_in": n_real}, rows_written={"synthetic_mdt": n_rows},
        table_versions={"synthetic_mdt": version}, metrics={"synthetic_rows": float(n_rows)},
        note=f"{len(windows)} windows, {scenario_note}, multiple={g.multiple:g}" + (
            f"; reused the positions of {len(reuse)} windows: regenerated {n_regen} rows whose serving cell changed or "
            f"moved, kept {n_kept} rows in the partitions rewritten" if reuse else ""),
    )


def _stage_kept(lake: Any, kept_rows: list[pd.DataFrame], keep_shards: set[int] | None) -> tuple[list[dict[str, Any]], int]:
    """The reused windows' rows that stay, in the partitions rewritten: their staged files and row count."""
    actions, n_kept = [], 0
    for frame in kept_rows:
        frame = frame[frame["cell_shard"].isin(sorted(keep_shards or ())).to_numpy()]
        if len(frame):
            actions.extend(lake.stage_files("synthetic_mdt", frame))
            n_kept += len(frame)
    return actions, n_kept


# ---------------------------------------------------------------------- privacy guard (issue 16)
def _guard_settings(cfg: PipelineConfig) -> dict[str, Any]:
    from cellsynth.splits import split_seed

    pc = cfg.privacy
    return {"privacy_distance": True, "test_fraction": cfg.split.test_fraction, "split_seed": split_seed(cfg),
            "metres_per_db": pc.metres_per_db, "near_radii_m": tuple(pc.near_radii_m)}


def _shard_distance_stats(lake: Any, table: Any, shard: int, settings: dict[str, Any], reader: Any = None) -> Any:
    """Exact DCR of one shard's synthetic rows against every training row of the shard (the
    partition this task owns), with the shard's held-out rows as the reference. `reader`: a
    `PartitionReader` of mdt_reports shared by the task's shards (one dataset build, not one per
    shard: 0.3 s each at 10^3 cells)."""
    from cellsynth.privacy import distance_stats

    syn = table.to_pandas() if hasattr(table, "to_pandas") else table
    syn = syn[["window", "serving_cell_id", "x_m", "y_m", "rsrp_dbm"]]
    windows = sorted(syn["window"].unique().tolist())
    cols = ["report_id", "window", "serving_cell_id", "x_m", "y_m", "rsrp_dbm"]
    if reader is not None:  # same rows as the filtered read; stable_order fixes their order either way
        real = stable_order(pd.concat([reader.read(cols, [("window", "=", w), ("cell_shard", "=", int(shard))]) for w in windows],
                                      ignore_index=True))
    else:
        real = stable_order(lake.read_pandas("mdt_reports", columns=cols,
                                             filters=[("cell_shard", "=", int(shard)), ("window", "in", windows)]))
    held_out = random_test_mask(real["report_id"].to_numpy(), test_fraction=settings["test_fraction"],
                                seed=settings["split_seed"])
    return distance_stats(real[~held_out], syn, real[held_out], metres_per_db=settings["metres_per_db"],
                          radii_m=settings["near_radii_m"])


def _read_staged_rows(lake: Any, actions: list[dict[str, Any]]) -> pd.DataFrame:
    """Staged synthetic rows with their partition columns (window, cell_shard live in the action)."""
    parts = []
    for a in actions:
        frame = lake.read_staged("synthetic_mdt", [a], columns=["serving_cell_id", "x_m", "y_m", "rsrp_dbm"]).to_pandas()
        pv = a.get("partition_values") or {}
        parts.append(frame.assign(window=pv.get("window"), cell_shard=int(pv.get("cell_shard") or 0)))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["serving_cell_id", "x_m", "y_m", "rsrp_dbm", "window", "cell_shard"])


def _privacy_guard(cfg: PipelineConfig, lake: Any, actions: list[dict[str, Any]], shard_stats: list[Any] | None = None) -> None:
    """Refuse to publish (raise before the commit) when the staged synthetic rows sit closer to the
    training rows than held-out real rows do. Distances are exact against every training row of the
    same window and cell (metres and dB, `privacy.metres_per_db`), computed by the shard tasks that
    staged the rows (`shard_stats`; recomputed here per shard when absent)."""
    from cellsynth.privacy import DistanceStats, guard_problems

    if not lake.exists("mdt_reports"):
        return
    pc = cfg.privacy
    settings = {"seed": cfg.run.seed, **_guard_settings(cfg)}
    if shard_stats is None or any(s is None for s in shard_stats):
        staged = _read_staged_rows(lake, actions)
        shard_stats = [_shard_distance_stats(lake, part, int(s), settings) for s, part in staged.groupby("cell_shard")]
    stats = DistanceStats.merge_all(shard_stats)
    if stats.n_synthetic == 0 or stats.n_holdout == 0:
        return
    problems = guard_problems(stats, min_dcr_ratio=pc.min_dcr_ratio, confidence=pc.confidence,
                              max_near_excess=pc.max_near_excess, seed=cfg.run.seed)
    if pc.guard_mia:
        problems += _mia_guard_problems(cfg, lake, actions)
    if problems:
        raise StageError(
            "generate: privacy guard: the synthetic rows give away training rows: " + "; ".join(problems)
            + f" (exact distances to all {stats.n_training} training rows); nothing was published. "
            "Set privacy.publish_despite_guard=true to publish anyway"
        )


def _mia_guard_problems(cfg: PipelineConfig, lake: Any, actions: list[dict[str, Any]]) -> list[str]:
    """privacy.guard_mia: the membership-inference audit on the staged rows (driver side: it reads
    the staged synthetic columns it needs and samples the targets)."""
    from cellsynth.privacy import membership_audit

    cols = ["window", "serving_cell_id", "x_m", "y_m", "rsrp_dbm"]
    reports = stable_order(lake.read_pandas("mdt_reports", columns=["report_id", *cols]))
    held_out = split_held_out(cfg, reports["report_id"].to_numpy())
    syn = _read_staged_rows(lake, actions)
    pc = cfg.privacy
    results = membership_audit(reports[~held_out], reports[held_out], syn, n_targets=pc.mia_targets,
                               max_synthetic_rows=pc.mia_max_synthetic_rows, metres_per_db=pc.metres_per_db,
                               bandwidth_m=pc.mia_bandwidth_m,
                               n_boot=pc.mia_bootstrap, seed=cfg.run.seed)
    return [f"membership-inference {r.attack} attack AUC {r.auc:.3f} (interval {r.auc_lower:.3f}-{r.auc_upper:.3f}) with "
            f"upper bound above privacy.max_mia_auc_upper={pc.max_mia_auc_upper:g}"
            for r in results if r.auc_upper > pc.max_mia_auc_upper]


def _num_records(action: dict[str, Any]) -> int:
    import json

    return int(json.loads(action["stats"]).get("numRecords", 0))


def _run_dp(cfg: PipelineConfig, rt: Any, *, run_id: str, partitions: set[tuple[str, int]] | None) -> StageResult:
    """privacy.mode=dp: positions from the DP grid density, serving cell and radio values from the
    DP radio models (noisy sufficient statistics), neighbours thinned by the DP detection counts
    (release C of the RSRP model) instead of the detection maps, which learn from real rows
    without a guarantee."""
    from cellsynth.privacy import dp_stage

    dp_stage.check_generate(cfg)
    lake = rt.lake
    radio = dp_stage.load_radio(lake)
    density = dp_stage.load_density(lake, radio, n_candidates=cfg.generate.neighbour_candidates)
    observed = _observed_loads(lake, cfg) if cfg.generate.load_scenario in ("observed", "quantile") else None
    detection = radio.detection if cfg.generate.neighbour_detection else None
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"neighbour_detection": False})})
    result = generate(cfg, rt, run_id=run_id, density=density, radio=radio,
                      radio_factory=functools.partial(dp_stage.load_radio, lake), cells=lake.read_pandas("cells"),
                      observed_loads=observed, synthetic_traffic=None, measurements=None, partitions=partitions,
                      detection=detection)
    spent = dp_stage.spent(lake)
    result.note += (f"; dp: total epsilon {spent.get('total', float('nan')):.4g} ("
                    + ", ".join(f"{k} {v:.4g}" for k, v in spent.items() if k != "total")
                    + f"), delta {dp_stage.spent_delta(lake):.3g}; {dp_stage.noise_source(cfg)}")
    result.metrics.update({f"epsilon_{k}": v for k, v in spent.items()})
    return result


def _reports_neighbours(lake: Any) -> bool:
    """Whether any mdt_measurements row is a neighbour's (True when that cannot be told). Serving-only
    drive tests (UCC's G-NetTrack logs) have none: detection maps learned from them report no
    neighbour anywhere, so the neighbour columns would only ever be null."""
    import pyarrow.compute as pc

    if not lake.exists("mdt_measurements"):
        return True
    try:
        dataset = lake.dataset("mdt_measurements")
    except Exception:  # an engine without a dataset view (delta-spark): keep the config's neighbours
        return True
    # head() stops at the first match: one file's column where neighbours exist, a scan where none do
    return dataset.head(1, columns=["role"], filter=pc.field("role") == "neighbour").num_rows > 0


NO_NEIGHBOURS_NOTE = ("no neighbour measurements in mdt_measurements: serving cell only "
                      "(generate.n_neighbours {n} would give empty columns; generate.neighbour_detection false "
                      "predicts neighbours without them)")


def run(cfg: PipelineConfig, rt: Any, *, run_id: str, partitions: set[tuple[str, int]] | None = None) -> StageResult:
    no_neighbours = ""
    g = cfg.generate
    # the table scan only where the rule can drop neighbours (some asked for, detection maps on)
    if g.n_neighbours > 0 and g.neighbour_detection and T.listed_neighbours(g.n_neighbours, True, _reports_neighbours(rt.lake)) == 0:
        no_neighbours = NO_NEIGHBOURS_NOTE.format(n=g.n_neighbours)
        rt.log(f"generate: {no_neighbours}")
        cfg = cfg.model_copy(update={"generate": g.model_copy(update={"n_neighbours": 0})})
    result = _run(cfg, rt, run_id=run_id, partitions=partitions)
    result.note += f"; {no_neighbours}" if no_neighbours else ""
    return result


def _run(cfg: PipelineConfig, rt: Any, *, run_id: str, partitions: set[tuple[str, int]] | None = None) -> StageResult:
    from cellsynth.density import DensityModels
    from cellsynth.generate.reuse import plan_reuse

    if cfg.privacy.mode == "dp":
        return _run_dp(cfg, rt, run_id=run_id, partitions=partitions)
    lake = rt.lake
    for table in ("kde_models", "radio_models", "cells"):
        if not lake.exists(table):
            raise StageError(f"generate: lake table '{table}' is missing; run the earlier stages first")
    g = cfg.generate
    measurements = functools.partial(_held_in_measurements, lake, cfg) if g.neighbour_detection else None
    detection_ref = None
    if g.use_ray and g.n_neighbours > 0 and measurements is not None:
        # With Ray a task reads the held-in rows and fits the detection maps from here on: the
        # driver's loading below (models, observed loads, the reuse plan) leaves a CPU idle
        # that the task fills (at 10^3 cells ~10 CPU-s; it used to start after that loading).
        detection_ref = _detection_task(rt, cfg, measurements)
    density = DensityModels.load(lake, prune_k_bandwidths=cfg.density.prune_k_bandwidths,
                                      association=cfg.density.association,
                                      association_bandwidth_scales=cfg.density.association_bandwidth_scales)
    radio_version = lake.version("radio_models")
    # With Ray the shard tasks load the radio models; the driver needs only which cells have one.
    radio = _ModelCells(lake.read_pandas("radio_models", version=radio_version)) if cfg.generate.use_ray \
        else _load_radio(lake, radio_version)
    cells = stable_order(lake.read_pandas("cells"), ("cell_id",))
    observed = _observed_loads(lake, cfg) if cfg.generate.load_scenario in ("observed", "quantile") and lake.exists("mdt_reports") else None
    traffic = None
    if cfg.generate.load_scenario == "synthetic_traffic" and lake.exists("synthetic_traffic"):
        traffic = stable_order(lake.read_pandas("synthetic_traffic", columns=["window", "cell_id", "load_rho"]),
                               ("window", "cell_id", "load_rho"))
    return generate(
        cfg, rt, run_id=run_id, density=density, radio=radio,
        radio_factory=functools.partial(_load_radio, lake, radio_version),
        cells=cells, observed_loads=observed, synthetic_traffic=traffic,
        measurements=measurements, detection_ref=detection_ref,
        partitions=partitions, reuse=plan_reuse(lake, rt.registry, density.windows) if partitions is not None else None,
    )
