"""Radio stage: per-cell Bayesian RSRP and RSRQ field models, trained per shard group on Ray.

Each actor reads its cell shards of `mdt_measurements` straight from Delta at a pinned version,
drops the held-out reports (`random_test_mask`, the rows evaluation scores on), trains all its
cells as one batched model per target (batched GP fits, each cell's fit its own), writes the
weights per shard as safetensors + JSON under <lake>/models/radio/<run_id>/, and returns small
rows. The driver commits `radio_models` once (app_id makes a rerun a no-op).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import zlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from cellsynth.config import PipelineConfig, RadioConfig
from cellsynth.errors import StageError
from cellsynth.lake import Lake
from cellsynth.radio import raster
from cellsynth.radio.collection import POOLED_CELL_ID
from cellsynth.radio.model import CellData, FitSettings, FittedCells, fit_cells, shard_calibration, take_cells
from cellsynth.radio.transforms import ipw_weights, subsample_index, training_rows
from cellsynth.splits import SPLIT_KEYS, random_test_mask, split_seed, stable_order
from cellsynth.stages import Incremental, MaterialChange, StageResult, StageSpec

NAME = "radio"
INPUTS = ("mdt_measurements", "cells")
OUTPUTS = ("radio_models",)
TARGETS = ("rsrp", "rsrq")
STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    # Models train on the held-in rows of the split; the seed also seeds the fits.
    reads=("radio", *SPLIT_KEYS,
           # issue 16: the dp mode fits Gaussian releases of clipped statistics instead
           "privacy.mode", "privacy.epsilon", "privacy.delta", "privacy.epsilon_split", "privacy.max_reports_per_ue"),
    incremental=Incremental(
        # A cell's model learns from every row that measured it: retrain on material change only.
        material=MaterialChange(table="mdt_measurements", models="radio_models"), takes_cells=True,
        # A small job's cells are two independent jobs, one per target (see `_jobs`).
        jobs_per_group=len(TARGETS),
    ),
)
SPLIT_TARGETS_MAX_CELLS = 32
# Incremental runs (issue 15): the cells retrained in a shard take the shard's calibration (interval
# factors, kNN and forest weights, dof, shift: what `fit_cells` fits once per shard on its cells'
# pooled held-out training-row sets) from the shard's last fit, as long as some of the shard's cells
# keep their models; each retrained cell's own fit (site, prior mean, hyperparameters, k) is redone on
# its rows. Before, the retrained cells of a shard (one or two at 10^3 cells) were calibrated on their
# own held-out rows alone: on the 10^3-cell bench lake (50 cells changed, compared with a full
# retrain of the same appended lake, scratch comparison in issue 15's session-29 note) the shard's
# previous factors came 2-5x closer to the full retrain's than the lone cells' did, and the
# refitted folds that fit them were most of an incremental radio stage's time. A shard whose cells
# are all retrained is calibrated on them, as a full run does. False: the old behaviour.
KEEP_SHARD_CALIBRATION = True
_COLUMNS = ["report_id", "cell_id", "role", "rsrp_dbm", "rsrq_db", "x_m", "y_m", "load_rho", "cell_shard"]
_Y = {"rsrp": "rsrp_dbm", "rsrq": "rsrq_db"}


def _seed_of(seed: int, *parts: Any) -> int:
    return zlib.crc32(":".join([str(seed), *map(str, parts)]).encode()) % 2**31


def settings_for(rcfg: RadioConfig, target: str, *, rsrq_load: bool = True) -> FitSettings:
    # svi_loss "pyro" selects the Pyro reference fit of the GP hyperparameters, "fused" the fast grid;
    # rsrq_load False: RSRQ without load terms (no load in the lake, `transforms.rsrq_uses_load`)
    return FitSettings(n_steps=rcfg.n_steps, learning_rate=rcfg.learning_rate, floor_db=rcfg.aleatoric_floor_db,
                       uses_load=target == "rsrq" and rsrq_load, cv_block_m=rcfg.gap_cv_block_m or FitSettings.cv_block_m,
                       calibrate=rcfg.calibrate_aleatoric, fit_path="pyro" if rcfg.svi_loss == "pyro" else "grid")


def _cell_data(cell_id: str, rows: pd.DataFrame, target: str, rcfg: RadioConfig, site, seed: int, *,
               rsrq_load: bool = True) -> CellData:
    keep = subsample_index(len(rows), rcfg.max_train_per_cell, seed=_seed_of(seed, target, cell_id))
    rows = rows.iloc[keep]
    rho = rows["load_rho"].to_numpy(dtype=float) if target == "rsrq" and rsrq_load else None
    weight = ipw_weights(rho, n_bins=rcfg.load_bins) if (rho is not None and rcfg.ipw) else None
    origin = None if site is None else np.asarray(site[:2], dtype=float)
    azimuth = float(site[2]) if site is not None and len(site) > 2 and np.isfinite(site[2]) else None
    # C-order: a lone cell's positions reach safetensors unpadded, and it refuses strided tensors.
    return CellData(cell_id, np.ascontiguousarray(rows[["x_m", "y_m"]].to_numpy(dtype=float)), rows[_Y[target]].to_numpy(dtype=float),
                    rho, weight, origin, azimuth)


def _jobs(shards: list[int], n_actors: int, *, n_cells: int | None = None) -> list[tuple[list[int], tuple[str, ...]]]:
    """Work units (shards, targets). Normally one shard with both targets each, so the jobs are
    alike (RSRP trains on serving and neighbour rows, RSRQ on serving rows only: an RSRP-only
    actor of a full run took 30% longer than a balanced split). A small
    job (`n_cells` at most SPLIT_TARGETS_MAX_CELLS, e.g. an incremental run) with two or more
    actors runs RSRP and RSRQ on separate actors instead, so both actors work rather than one
    fitting both targets while the other waits."""
    if n_actors >= 2 and n_cells is not None and n_cells <= SPLIT_TARGETS_MAX_CELLS:
        return [(list(shards), (t,)) for t in TARGETS]
    # One shard per job, handed to whichever actor is free (issue 15): no actor holds the stage
    # with a fixed share, and each finished job is a checkpoint a rerun keeps.
    return [([s], TARGETS) for s in shards]


def train_shards(df: pd.DataFrame, sites: dict[str, tuple[float, ...]], rcfg: RadioConfig, *, test_fraction: float,
                 seed: int, run_id: str, lake_root: str, source_version: int, device: str = "cpu",
                 storage_options: dict[str, str] | None = None, targets: tuple[str, ...] = TARGETS,
                 calibrations: dict[str, dict[str, np.ndarray]] | None = None,
                 retrain: Collection[str] | None = None, rsrq_load: bool = True) -> list[dict]:
    """Train `targets` (both by default) for the measurements `df` of some shards; write weights; return rows.

    Weights go to `<lake>/models/radio/<run_id>/`: written in place on a local lake, through a
    temporary folder copied up with the lake's credentials on an object store. `calibrations`
    ("target/shard" -> `shard_calibration`, `_load_calibrations`): shards whose retrained cells take
    that calibration (KEEP_SHARD_CALIBRATION); `retrain` (incremental runs): fit only these cells, `df`
    holding their shards' rows whole, so that the batch seed and the pooled fallback are the ones a full
    run of the same rows gives (`_train_shard`). `rsrq_load`: RSRQ with its load terms (the whole table's
    `transforms.rsrq_uses_load`); False fits RSRQ from position alone on rows without load.
    """
    lake = Lake(lake_root, storage_options=storage_options)
    if lake.is_remote:
        with tempfile.TemporaryDirectory() as tmp:
            rows = _train_shards(df, sites, rcfg, test_fraction=test_fraction, seed=seed, run_id=run_id,
                                 weights_root=Path(tmp), source_version=source_version, device=device, targets=targets,
                                 calibrations=calibrations, retrain=retrain, rsrq_load=rsrq_load)
            lake.put_dir(Path(tmp) / "models" / "radio" / run_id, f"models/radio/{run_id}")
        return rows
    return _train_shards(df, sites, rcfg, test_fraction=test_fraction, seed=seed, run_id=run_id,
                         weights_root=Path(lake.root), source_version=source_version, device=device, targets=targets,
                         calibrations=calibrations, retrain=retrain, rsrq_load=rsrq_load)


def _kept_calibration_files(lake: Lake, only_cells: list[str], shards: list[int]) -> dict[str, str]:
    """Per "target/shard" of an incremental run with kept own-model cells (none kept: no entry), the weight
    file whose calibration the shard's retrained cells take (KEEP_SHARD_CALIBRATION): the one holding most
    of them (ties: the last path, i.e. the latest run)."""
    if not lake.exists("radio_models") or not KEEP_SHARD_CALIBRATION:
        return {}
    rows = lake.read_pandas("radio_models", columns=["cell_id", "target", "pooled", "path", "cell_shard"])
    rows = rows[~rows["pooled"].astype(bool) & ~rows["cell_id"].isin(only_cells) & rows["cell_shard"].astype(int).isin(shards)]
    calibration_from: dict[str, str] = {}
    for (target, shard), group in rows.groupby([rows["target"], rows["cell_shard"].astype(int)], sort=True):
        counts = group["path"].value_counts()
        calibration_from[f"{target}/{shard}"] = sorted(counts.index[counts == counts.max()])[-1]
    return calibration_from


def _load_calibrations(lake: Lake, calibration_from: dict[str, str] | None, df: pd.DataFrame,
                       targets: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """The shard calibrations of `calibration_from` this job needs (a file whose cells do not share one
    calibration the current code can use, e.g. weights of older code, gives none: that shard is
    calibrated on its retrained cells)."""
    if not calibration_from or not len(df):
        return {}
    out = {}
    for shard in sorted(int(s) for s in df["cell_shard"].unique()):
        for target in targets:
            rel = calibration_from.get(f"{target}/{shard}")
            if rel is None:
                continue
            calib = shard_calibration(FittedCells.load(lake.local_dir(str(Path(rel).parent)) / Path(rel).name))
            if calib is not None:
                out[f"{target}/{shard}"] = calib
    return out


def _train_shards(df: pd.DataFrame, sites: dict[str, tuple[float, ...]], rcfg: RadioConfig, *, test_fraction: float,
                  seed: int, run_id: str, weights_root: Path, source_version: int, device: str,
                  targets: tuple[str, ...] = TARGETS, calibrations: dict[str, dict[str, np.ndarray]] | None = None,
                  retrain: Collection[str] | None = None, rsrq_load: bool = True) -> list[dict]:
    # One batch per shard, whatever the job holds: a batch's seed and its pooled fallback depend on
    # which cells it holds, so a job of several shards (an incremental run on two or more actors)
    # must fit exactly what one job per shard (a full run, or one actor) fits.
    out_rows: list[dict] = []
    for shard, part in df.groupby(df["cell_shard"].astype(int), sort=True):
        calib = {t: c for t in targets if (c := (calibrations or {}).get(f"{t}/{shard}")) is not None}
        out_rows += _train_shard(part, sites, rcfg, test_fraction=test_fraction, seed=seed, run_id=run_id,
                                 weights_root=weights_root, source_version=source_version, device=device, targets=targets,
                                 calibration=calib, retrain=retrain, rsrq_load=rsrq_load)
    return out_rows


def _train_shard(df: pd.DataFrame, sites: dict[str, tuple[float, ...]], rcfg: RadioConfig, *, test_fraction: float,
                 seed: int, run_id: str, weights_root: Path, source_version: int, device: str,
                 targets: tuple[str, ...], calibration: dict[str, dict[str, np.ndarray]] | None = None,
                 retrain: Collection[str] | None = None, rsrq_load: bool = True) -> list[dict]:
    # Rows in an order fixed by their content: each cell's seeded subsample picks rows by position.
    df = stable_order(df, ("cell_id", "report_id", "role"))
    held_out = random_test_mask(df["report_id"].to_numpy(), test_fraction=test_fraction, seed=seed)
    out_rows: list[dict] = []
    for target in targets:
        usable = training_rows(df, target, rsrq_load=rsrq_load)
        train, test = usable[~held_out[usable.index.to_numpy()]], usable[held_out[usable.index.to_numpy()]]
        # each cell's held-out rows, grouped once (a mask over the shard's test rows per cell made
        # the validation MAEs O(cells x rows) per shard; groupby keeps the rows' order)
        test_of = {c: g for c, g in test.groupby("cell_id", sort=False)}
        no_test = test.iloc[:0]
        shard_of = dict(zip(df["cell_id"], df["cell_shard"].astype(int)))
        # Every cell of the shard, retrained or not (incremental runs): the batch seed is the shard's
        # first own cell's id and the pooled fallback pools the whole shard's rows, as in a full run;
        # only the `retrain` cells are fitted.
        own_all, few_all = [], []
        for cell_id, rows in train.groupby("cell_id", sort=True):
            data = _cell_data(str(cell_id), rows, target, rcfg, sites.get(cell_id), seed, rsrq_load=rsrq_load)
            (own_all if len(rows) >= rcfg.min_measurements else few_all).append(data)
        own = [c for c in own_all if retrain is None or c.cell_id in retrain]
        few = [c for c in few_all if retrain is None or c.cell_id in retrain]
        settings = settings_for(rcfg, target, rsrq_load=rsrq_load)
        base = weights_root / "models" / "radio" / run_id / target
        merged = _pooled_data(own_all, few_all, target, rcfg, seed) if few else None
        # The pooled fallback is one more "cell" of the batch (flagged local=False, calibrated apart).
        pooled_fit = None
        calib = (calibration or {}).get(target)
        first = own_all[0].cell_id if own_all else None  # the batch seed's cell
        if own and calib is not None:  # the shard's calibration given (KEEP_SHARD_CALIBRATION); the pooled fallback apart
            fitted = fit_cells(own, target=target, settings=settings, seed=_seed_of(seed, target, first), device=device,
                               calibration=calib)
        elif own:
            batch = own + ([merged] if merged is not None else [])
            fitted = fit_cells(batch, target=target, settings=settings, seed=_seed_of(seed, target, first), device=device)
            if merged is not None:
                fitted, pooled_fit = take_cells(fitted, list(range(len(own)))), take_cells(fitted, [len(own)])
        if own:
            by_shard: dict[int, list[int]] = {}
            for i, c in enumerate(fitted.cell_ids):
                by_shard.setdefault(shard_of[c], []).append(i)
            for shard, idx in sorted(by_shard.items()):
                rel = f"models/radio/{run_id}/{target}/shard={shard}"
                part = take_cells(fitted, idx)
                part.save(base / f"shard={shard}", extra_meta=_meta(rcfg))
                if rcfg.posterior_raster:  # generation interpolates these (radio/raster.py)
                    raster.save_for(part, base / f"shard={shard}", seed=_seed_of(seed, target, "raster", shard))
                for j, c in enumerate(part.cell_ids):
                    out_rows.append(_row(c, target, part, j, test_of.get(c, no_test), rel, False, shard, source_version, run_id, rcfg, seed))
                    # the validation prediction cached the cell's Cholesky factor (1,500 rows: 18 MB);
                    # kept until the shard was done, 375 cells a shard at 3,000 cells made ~6.7 GB an actor
                    part.release_cell(j)
        if merged is not None:
            if pooled_fit is None:  # alone, with the seed the shard's batch has (a shard without own cells: its own)
                pooled_fit = fit_cells([merged], target=target, settings=settings, device=device,
                                       seed=_seed_of(seed, target, "pooled" if first is None else first))
            group = min(shard_of[c.cell_id] for c in few)
            rel = f"models/radio/{run_id}/{target}/pooled={group}"
            pooled_fit.save(base / f"pooled={group}", extra_meta=_meta(rcfg))
            for c in few:
                site = np.asarray(c.origin_xy_m) if c.origin_xy_m is not None else None
                out_rows.append(_row(c.cell_id, target, pooled_fit, 0, test_of.get(c.cell_id, no_test), rel, True, shard_of[c.cell_id],
                                     source_version, run_id, rcfg, seed, n_train=len(c.y), offset=site))
    return out_rows


def _pooled_data(own: list[CellData], few: list[CellData], target: str, rcfg: RadioConfig, seed: int) -> CellData | None:
    """Pooled fallback for the cells with too few rows: one model of RSRP/RSRQ against position
    relative to the cell's site, over all this group's training rows whose cell has a known site
    (None when no cell has one)."""
    pool = [c for c in own + few if c.origin_xy_m is not None]
    if not pool:
        return None
    xy = np.concatenate([c.xy_m - c.origin_xy_m for c in pool])
    y = np.concatenate([c.y for c in pool])
    rho = None if any(c.load_rho is None for c in pool) else np.concatenate([c.load_rho for c in pool])
    weight = ipw_weights(rho, n_bins=rcfg.load_bins) if (rho is not None and rcfg.ipw) else None
    keep = subsample_index(len(y), rcfg.max_train_per_cell, seed=_seed_of(seed, target, "pooled"))
    return CellData(POOLED_CELL_ID, xy[keep], y[keep], None if rho is None else rho[keep],
                    None if weight is None else weight[keep], np.zeros(2), local=False)


def _meta(rcfg: RadioConfig) -> dict:
    return {"epistemic_threshold_db": rcfg.epistemic_threshold_db, "n_weight_samples": rcfg.n_weight_samples}


def _row(cell_id: str, target: str, fitted, i: int, rows: pd.DataFrame, rel: str, pooled: bool, shard: int,
         source_version: int, run_id: str, rcfg: RadioConfig, seed: int, *, n_train: int | None = None,
         offset: np.ndarray | None = None) -> dict:
    """The radio_models row of cell_id; `rows` are its held-out rows (the validation MAE's)."""
    val_mae = None
    if len(rows) and (not pooled or offset is not None):
        xy = rows[["x_m", "y_m"]].to_numpy(dtype=float) - (0.0 if offset is None else offset)
        rho = rows["load_rho"].to_numpy(dtype=float) if fitted.settings.uses_load else None
        pred = fitted.predict(np.full(len(rows), i), xy, rho)
        val_mae = float(np.mean(np.abs(pred.mean - rows[_Y[target]].to_numpy(dtype=float))))
    return {"cell_id": cell_id, "target": target, "window": None,
            "n_train": int(fitted.n_train[i] if n_train is None else n_train),
            "elbo": None if pooled else float(fitted.elbo[i]), "val_mae": val_mae, "pooled": pooled, "path": rel,
            "source_version": int(source_version), "cell_shard": int(shard), "run_id": run_id}


def has_load(lake: Lake, version: int) -> bool:
    """`transforms.rsrq_uses_load` of mdt_measurements at `version`, without reading the table: the scan
    stops at the first row with a load (a table without any reads only its null load column)."""
    found = lake.dataset("mdt_measurements", version).head(1, columns=["load_rho"], filter=ds.field("load_rho").is_valid())
    return found.num_rows > 0


CHECKPOINTS = "_checkpoints/radio"


def _checkpoint_dir(cfg: PipelineConfig, versions: dict[str, int], device: str, only_cells: list[str] | None,
                    calibration_from: dict[str, str] | None = None) -> str:
    """Lake-relative folder of this run's job checkpoints: the radio config hash, the input
    versions, the device, the cells asked for and the calibration files their shards' kept cells give
    them name it, so a checkpoint is kept only by a rerun that would have trained the same thing."""
    key = json.dumps([STAGE.config_hash(cfg), versions, device, only_cells] + ([calibration_from] if calibration_from else []),
                     sort_keys=True)
    return f"{CHECKPOINTS}/{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _job_name(job: tuple[list[int], tuple[str, ...]]) -> str:
    return f"shards={'-'.join(map(str, job[0]))}_targets={'-'.join(job[1])}"


def _kept(lake: Lake, ckpt: str, job: tuple[list[int], tuple[str, ...]]) -> dict | None:
    """A finished job's result from an interrupted run, when its weight files are still there."""
    part = lake.read_json(f"{ckpt}/{_job_name(job)}.json")
    if part is None:
        return None
    fs, base = lake.filesystem()
    paths = sorted({r["path"] for r in part["rows"]})
    infos = fs.get_file_info([f"{base}/{p}{ext}" for p in paths for ext in (".safetensors", ".json")]) if paths else []
    return part if all(i.type != pafs.FileType.NotFound for i in infos) else None


def _drop_checkpoints(lake: Lake) -> None:
    """Checkpoints are spent once radio_models is committed (stale keys too: nothing resumes them)."""
    fs, base = lake.filesystem()
    try:
        fs.delete_dir(f"{base}/{CHECKPOINTS}")
    except (FileNotFoundError, OSError):
        pass


def _failpoint(name: str, count: int) -> None:
    """Test hook: CELLSYNTH_FAILPOINT=name:N kills this process (SIGKILL) when `name` reaches N."""
    want = os.environ.get("CELLSYNTH_FAILPOINT", "")
    if want == f"{name}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


class _ShardTrainer:
    """Ray actor: trains the radio models of its cell shards, reading them from the lake itself."""

    def __init__(self, lake_root: str, storage_options: dict[str, str], rcfg: dict, *, test_fraction: float, seed: int,
                 run_id: str, device: str, torch_threads: int) -> None:
        import torch

        from cellsynth.lake import Lake

        torch.set_num_threads(torch_threads)  # small tensors: 1 thread is ~50x faster than 2 here
        self.lake = Lake(lake_root, storage_options=storage_options)
        self.rcfg = RadioConfig.model_validate(rcfg)
        self.test_fraction, self.seed, self.run_id, self.device = test_fraction, seed, run_id, device
        self._reader: Any = None  # mdt_measurements at one version, opened once for all of this actor's jobs

    def train(self, shards: list[int], version: int, sites: dict[str, tuple[float, ...]],
              cells: list[str] | None = None, targets: tuple[str, ...] = TARGETS,
              calibration_from: dict[str, str] | None = None, rsrq_load: bool = True) -> dict[str, Any]:
        import resource

        from cellsynth.lake.partitions import PartitionReader

        # One dataset build per actor, not per job (a filtered Lake.read builds the dataset of every
        # data file: ~0.3 s a job at 10^3 cells, a few seconds of each actor's incremental run).
        # Row order is irrelevant: `_train_shard` orders the rows by content.
        if self._reader is None or self._reader.version != version:
            self._reader = PartitionReader(self.lake, "mdt_measurements", version=version)
        # The shards whole, also in an incremental run: `train_shards` fits only `cells` but takes the
        # batch seed and the pooled fallback's rows from the whole shard.
        df = self._reader.read_shards(_COLUMNS, shards).reset_index(drop=True)
        n_read = len(df) if cells is None else int(df["cell_id"].isin(cells).sum())
        calibrations = _load_calibrations(self.lake, calibration_from, df, tuple(targets))
        rows = train_shards(df, sites, self.rcfg, test_fraction=self.test_fraction, seed=self.seed, run_id=self.run_id,
                            lake_root=self.lake.root, source_version=version, device=self.device,
                            storage_options=self.lake.storage_options, targets=tuple(targets),
                            calibrations=calibrations, retrain=None if cells is None else set(cells),
                            rsrq_load=rsrq_load) if n_read else []
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"rows": rows, "n_read": n_read, "peak_rss_mb": peak_mb, "kept_calibration": sorted(calibrations)}


def run(cfg: PipelineConfig, rt: Any, *, run_id: str, partitions: set[tuple[str, int]] | None = None,
        cells: set[str] | None = None) -> StageResult:
    """Train RSRP and RSRQ models per cell and commit `radio_models`.

    `partitions` (incremental runs): retrain only the cells of these partitions' shards (only
    `cells` among them when given; radio models span every window) and overwrite only their rows.
    """
    if cfg.privacy.mode == "dp":  # issue 16: DP releases of sufficient statistics instead (privacy/dp_stage.py)
        from cellsynth.privacy.dp_stage import run_radio_dp

        return run_radio_dp(cfg, rt, run_id=run_id)
    lake = rt.lake
    cells_arg = cells  # `cells` below is the cells table
    app_id = f"{NAME}:{run_id}"
    result = StageResult(stage=NAME, run_id=run_id)
    if lake.committed_app_ids("radio_models", app_id):
        result.skipped, result.note = True, f"run {run_id} already committed"
        result.table_versions = {"radio_models": lake.version("radio_models")}
        return result
    versions = {t: lake.version(t) for t in INPUTS}
    missing = [t for t, v in versions.items() if v is None]
    if missing:
        raise StageError(f"radio: input table(s) {', '.join(missing)} missing in {lake.root}; run ingest first")
    cells = lake.read_pandas("cells", version=versions["cells"], columns=["cell_id", "x_m", "y_m", "azimuth_deg", "cell_shard"])
    # (x, y, azimuth): the azimuth (NaN when unknown) gives the model its antenna-pattern term
    sites = {c: (float(x), float(y), float("nan") if pd.isna(a) else float(a))
             for c, x, y, a in zip(cells["cell_id"], cells["x_m"], cells["y_m"], cells["azimuth_deg"])}
    shards = sorted(int(s) for s in cells["cell_shard"].unique())
    only_cells = None
    if partitions is not None:
        shards = sorted({int(s) for _, s in partitions})
        in_shards = set(cells.loc[cells["cell_shard"].isin(shards), "cell_id"])
        only_cells = sorted(in_shards if cells_arg is None else in_shards & set(cells_arg))
    rsrq_load = has_load(lake, versions["mdt_measurements"])
    if not rsrq_load:
        rt.log("radio: no cell load in mdt_measurements (no traffic counters joined): RSRQ from position alone")
    rcfg = cfg.runtime.ray
    jobs = _jobs(shards, rcfg.n_actors, n_cells=None if only_cells is None else len(only_cells))
    n_actors = max(1, min(rcfg.n_actors, len(jobs)))
    device = str(rt.device)
    ray = rt.ray()
    from cellsynth.cluster.ray_ import gpu_share

    opts = {"num_cpus": rcfg.cpus_per_actor, "max_restarts": rcfg.max_restarts, "max_task_retries": rcfg.max_task_retries}
    share = gpu_share(ray, rcfg.gpus_per_actor, want_gpu=device == "cuda", n_workers=n_actors)
    if share:
        opts["num_gpus"] = share
    elif device == "cuda":
        device = "cpu"  # the cluster has no GPU share to give: train on the actors' CPUs
    # Resumable (issue 15): each finished job's rows land in a checkpoint keyed by everything the
    # job's result depends on; a rerun after a kill keeps those jobs and trains only the rest.
    calibration_from = _kept_calibration_files(lake, only_cells, shards) if only_cells is not None else {}
    ckpt = _checkpoint_dir(cfg, versions, device, only_cells, calibration_from)
    done = {j: part for j, job in enumerate(jobs) if (part := _kept(lake, ckpt, job)) is not None}
    todo = [j for j in range(len(jobs)) if j not in done]
    if done:
        rt.log(f"radio: {len(done)} of {len(jobs)} jobs kept from an interrupted run")
    n_actors = max(1, min(n_actors, len(todo)))
    trainer = ray.remote(**opts)(_ShardTrainer)
    actors = [trainer.remote(lake.root, lake.storage_options, cfg.radio.model_dump(mode="json"),
                             test_fraction=cfg.split.test_fraction, seed=split_seed(cfg), run_id=run_id, device=device,
                             torch_threads=cfg.runtime.torch_threads) for _ in range(n_actors if todo else 0)]
    rt.log(f"radio: {len(actors)} actors, {len(todo)} jobs over {len(shards)} shards on {device}")
    try:
        from ray.util import ActorPool

        calls = ActorPool(actors).map(
            lambda a, j: a.train.remote(jobs[j][0], versions["mdt_measurements"], sites, only_cells, jobs[j][1],
                                        calibration_from or None, rsrq_load), todo)
        for n, (j, part) in enumerate(zip(todo, calls), start=1):
            lake.write_json(f"{ckpt}/{_job_name(jobs[j])}.json", part)
            done[j] = part
            _failpoint("radio_after_jobs", n)
    finally:
        for a in actors:
            ray.kill(a)
    parts = [done[j] for j in range(len(jobs))]
    rows = [r for p in parts for r in p["rows"]]
    if not rows:
        raise StageError(f"radio: no training measurements in mdt_measurements v{versions['mdt_measurements']}")
    frame = pd.DataFrame(rows)
    result.rows_in = {"mdt_measurements": sum(p["n_read"] for p in parts), "cells": len(cells)}
    # Incremental: replace only the retrained cells' rows; the others keep their values and run_id.
    predicate = None if only_cells is None else "cell_id IN ({})".format(", ".join("'" + c.replace("'", "''") + "'" for c in only_cells))
    result.table_versions["radio_models"] = lake.write("radio_models", frame, mode="overwrite", predicate=predicate, app_id=app_id)
    _drop_checkpoints(lake)
    result.rows_written["radio_models"] = len(frame)
    own = frame[~frame["pooled"]]
    for target in TARGETS:
        vals = own.loc[own["target"] == target, "val_mae"].dropna()
        if len(vals):
            result.metrics[f"{target}_median_val_mae_db"] = float(vals.median())
    result.metrics["pooled_share"] = float(frame["pooled"].mean())
    result.metrics["cells_trained"] = float(frame["cell_id"].nunique())
    if only_cells is not None:
        kept_cal = sorted({k for p in parts for k in p.get("kept_calibration", [])})
        result.note = (f"incremental: {frame['cell_id'].nunique()} cells in {len(shards)} shards retrained; "
                       f"{len(kept_cal)} (target, shard) calibrations taken from the shard's last fit, the others fitted on "
                       f"the retrained cells (KEEP_SHARD_CALIBRATION)")
    result.metrics["actor_peak_rss_mb"] = float(max(p["peak_rss_mb"] for p in parts))
    return result
