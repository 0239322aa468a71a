"""`cellsynth evaluate`: score models and the synthetic table on the held-out real reports.

Held-out rows are `splits.random_test_mask` (the density and radio stages trained on the rest).
Everything lands in `metrics` (stage = "evaluate"), curves as JSON in `detail`; the report reads
them back. Sections whose inputs are absent (no RSRQ, no synthetic table, no simulator truth) are
left out, and the stage note says which.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.spatial import cKDTree
from threadpoolctl import threadpool_limits

from cellsynth.config import PipelineConfig
from cellsynth.errors import StageError
from cellsynth.evaluate import fidelity, fingerprint
from cellsynth.evaluate import metrics as M
from cellsynth import sampling as S
from cellsynth.lake.partitions import PartitionReader
from cellsynth.memory import release_freed_memory
from cellsynth.splits import SPLIT_KEYS, random_test_mask, spatial_block_test_mask, split_seed, stable_order
from cellsynth.splits import held_out as split_held_out
from cellsynth.stages import StageResult, StageSpec

NAME = "evaluate"
INPUTS = ("mdt_reports", "mdt_measurements", "synthetic_mdt", "radio_models", "kde_models", "spatial_maps", "cells")
OUTPUTS = ("metrics",)
STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    # radio.max_train_per_cell: the baselines train on up to the rows per cell ours had.
    reads=("evaluate", *SPLIT_KEYS, "split.block_m", "generate.n_neighbours", "generate.neighbour_candidates",
           "density.prune_k_bandwidths",
           "density.association", "density.association_bandwidth_scales",
           "report.n_example_cells", "radio.max_train_per_cell",
           "scenario.enabled", "scenario.output_dir", "run.data_dir", "privacy",
           # issue 16: dp-mode association candidates; the per-shard distance tasks run on Ray or not
           "generate.use_ray"),
)
# Baselines at parity with ours (issue 20): RF 200 trees, kNN k by CV inside training, GP
# hyperparameters by marginal likelihood on up to 1,000 rows per cell (an exact GP is O(n^3):
# 1,000 is the smallest cap the issue allows).
GP_MAX_TRAIN = 1000
_REFIT_TRAIN_CAP = 3000  # rows per cell of the few refits of our model (downsampling, blocks, IPW): cost only


@dataclass
class Inputs:
    """What evaluation reads, already loaded (tests build these from small fakes).

    Whole frames, or (`run`, issue 15) the rows evaluation samples from them plus `summary`, the
    whole tables' counts gathered while streaming: every sample is a bottom-k of a stable hash
    (`sampling`), so both give the same figures."""

    reports: pd.DataFrame  # mdt_reports
    measurements: pd.DataFrame  # mdt_measurements
    cells: pd.DataFrame
    radio: Any | None = None  # RadioModels-like
    density: Any | None = None  # DensityModels-like
    synthetic: pd.DataFrame | None = None
    # Exact per-partition distance stats computed where the data lives (run() on Ray); None: the
    # privacy section computes them per shard in-process from the frames above.
    distance: Any | None = None
    epsilon_spent: dict[str, float] | None = None  # dp mode: epsilon per stage and "total"
    truth_reports: pd.DataFrame | None = None  # simulator truth: report_id, true_serving_cell_id
    radio_model_factory: Callable[..., Any] | None = None  # RadioModel(**kwargs) for the refits
    skipped: list[str] = field(default_factory=list)
    # run(): evaluate() drops `reports` once it is split into train and held-out rows (the three
    # frames at once were ~0.7 GB of the driver at 10^3 cells; issue 15).
    release_reports: bool = False
    # run(): the whole tables' counts (None: computed from the frames above) and the distance
    # attack's scores over every synthetic row, streamed from the lake (None: from `synthetic`).
    summary: S.Summary | None = None
    synthetic_distance: Callable[[pd.DataFrame], np.ndarray] | None = None


class _Out:
    def __init__(self, run_id: str):
        self.run_id = run_id
        self.rows: list[dict] = []

    def add(self, metric: str, value: float, *, cell_id: str | None = None, window: str | None = None,
            split: str | None = "test", model: str | None = None, detail: Any = None) -> None:
        self.rows.append({
            "run_id": self.run_id, "stage": NAME, "metric": metric,
            "value": None if value is None or not np.isfinite(value) else float(value),
            "cell_id": cell_id, "window": window, "split": split, "model": model,
            "detail": None if detail is None else json.dumps(detail, default=_json_default),
        })

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["run_id", "stage", "metric", "value", "cell_id", "window", "split", "model", "detail"])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return np.round(obj.astype(float), 4).tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


# Cells whose solved posteriors (a Cholesky factor of up to 1,500 rows and its work arrays,
# ~32 MB per cell measured at 10^3 cells) one prediction call keeps before they are released
# (issue 15: predicting every held-out row of a 10^3-cell run in one call held ~16 GB of factors
# on the driver; 64 cells a call still added 2 GB to the driver's peak).
_CELLS_PER_CALL = 16


def _predict_released(radio: Any, target: str, cell_ids: np.ndarray, xy_m: np.ndarray, *,
                      load_rho: np.ndarray | None = None) -> Any:
    """`radio.predict` over groups of `_CELLS_PER_CALL` cells, releasing the solved posteriors
    after each group: the same rows (each row is predicted by its own cell's model, all of a
    cell's rows in one call) at bounded memory."""
    from cellsynth.radio.model import RadioPrediction

    cell_ids = np.asarray(cell_ids).astype(str)
    codes, inv = np.unique(cell_ids, return_inverse=True)
    n = len(cell_ids)
    mean, ep, al, pooled = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=bool)
    dof = np.full(n, np.inf)  # the predictive's Student-t dof (radio calibration.TAIL_MODE); inf: Gaussian
    for first in range(0, len(codes), _CELLS_PER_CALL):
        rows = np.flatnonzero((inv >= first) & (inv < first + _CELLS_PER_CALL))
        kw = {} if load_rho is None else {"load_rho": np.asarray(load_rho, dtype=float)[rows]}
        p = radio.predict(target, cell_ids[rows], np.asarray(xy_m, dtype=float)[rows], **kw)
        mean[rows], ep[rows], al[rows] = p.mean, p.epistemic_std, p.aleatoric_std
        if getattr(p, "pooled", None) is not None:
            pooled[rows] = p.pooled
        if getattr(p, "dof", None) is not None:
            dof[rows] = p.dof
        if hasattr(radio, "release"):
            radio.release()
    return RadioPrediction(mean, ep, al, pooled, dof)


def _meas_test_mask(cfg: PipelineConfig, inp: Inputs) -> np.ndarray:
    """Held-out flag of every measurement row (the split's hash of its report id, as for the
    reports), computed once per measurements frame: several sections need it."""
    cached = getattr(inp, "_meas_test", None)
    if cached is None or cached[0] is not inp.measurements:
        cached = (inp.measurements, split_held_out(cfg, inp.measurements["report_id"].to_numpy()))
        inp._meas_test = cached  # type: ignore[attr-defined]
    return cached[1]


def _summary(cfg: PipelineConfig, inp: Inputs) -> S.Summary:
    """The whole tables' counts: `inp.summary` (run() gathers it while streaming), else from the frames."""
    if inp.summary is None:
        summ = S.Summary()
        summ.add_reports(split_held_out(cfg, inp.reports["report_id"].to_numpy()))
        m = inp.measurements
        summ.add_measurements(m["cell_id"].to_numpy(), _meas_test_mask(cfg, inp), m["x_m"].to_numpy(), m["y_m"].to_numpy())
        inp.summary = summ
    return inp.summary


def _subsample(frame: pd.DataFrame, n_max: int, seed: int) -> pd.DataFrame:
    if len(frame) <= n_max:
        return frame
    return frame.sample(n=n_max, random_state=seed).sort_index()


def _scored_cells(cell_ids: np.ndarray, n_max: int, seed: int) -> np.ndarray:
    """The cells whose held-out rows are scored: all of them, or a seeded sample of n_max."""
    cell_ids = np.sort(np.asarray(cell_ids, dtype=object))
    if len(cell_ids) <= n_max:
        return cell_ids
    return np.sort(np.random.default_rng(seed).choice(cell_ids, size=n_max, replace=False))


def _prob_scores(out: _Out, y: np.ndarray, mean: np.ndarray, std: np.ndarray, *, target: str, model: str,
                 split: str = "test", cell_id: str | None = None, epistemic: np.ndarray | None = None,
                 dof: np.ndarray | None = None) -> None:
    unit = "dbm" if target == "rsrp" else "db"
    # Scored on a sample of the held-out rows (evaluate.max_test_rows): state its size and a 95%
    # normal interval of the mean absolute error (issue 15).
    err = np.abs(np.asarray(y, dtype=float) - np.asarray(mean, dtype=float))
    half = 1.96 * float(np.std(err, ddof=1)) / np.sqrt(len(err)) if len(err) > 1 else float("nan")
    out.add(f"{target}_mae_{unit}", M.mae(y, mean), model=model, split=split, cell_id=cell_id,
            detail={"n": int(len(err)), "ci95": [M.mae(y, mean) - half, M.mae(y, mean) + half]})
    out.add(f"{target}_rmse_{unit}", M.rmse(y, mean), model=model, split=split, cell_id=cell_id)
    levels, observed = M.calibration_curve(y, mean, std, dof=dof)  # dof: our model's Student-t predictive
    out.add(f"{target}_calibration_error", M.calibration_error(y, mean, std, dof=dof), model=model, split=split, cell_id=cell_id,
            detail={"expected": levels, "observed": observed})
    s_mean, s_std = M.sharpness(std)
    out.add(f"{target}_sharpness_mean_db", s_mean, model=model, split=split, cell_id=cell_id)
    out.add(f"{target}_sharpness_std_db", s_std, model=model, split=split, cell_id=cell_id)
    if epistemic is not None:
        out.add(f"{target}_mean_epistemic_db", M.mean_epistemic(epistemic), model=model, split=split, cell_id=cell_id)


# ------------------------------------------------------------------------------ sections
def radio_scores(out: _Out, inp: Inputs, cfg: PipelineConfig, *, settings: Any = None,
                 cap: int | None = None) -> dict[str, float]:
    """RSRP of every measured cell on held-out reports: the Bayesian model and the baselines,
    each baseline on the same rows per cell (capped like ours) and its settings in `metrics`."""
    meas = inp.measurements
    scored = _scored_radio_cells(cfg, inp)
    out.add("rsrp_scored_cells", float(len(scored)), split="test",
            detail={"of_cells": int(len(_radio_test_cells(cfg, inp))), "cap": cfg.evaluate.max_scored_cells})
    settings = settings or baseline_settings(cfg)  # (settings, cap): bench/evaluate_parity.py times others
    cap = cap or our_row_cap(cfg)
    keep = meas["cell_id"].isin(set(scored)).to_numpy()
    meas, is_test = meas[keep], _meas_test_mask(cfg, inp)[keep]
    # Deterministic samples (issue 15, `sampling`): at most max_test_rows held-out rows of the
    # scored cells, and per scored cell at most `cap` training rows (as many as ours trained on).
    test = S.bottom_k(meas[is_test], S.MEAS_KEY, cfg.evaluate.max_test_rows, cfg.run.seed)
    train = S.bottom_k(meas[~is_test], S.MEAS_KEY, cap, cfg.run.seed, per="cell_id")
    del meas, is_test
    headline: dict[str, float] = {}
    if test.empty:
        inp.skipped.append("radio (no held-out measurements)")
        return headline
    pred = _predict_released(inp.radio, "rsrp", test["cell_id"].to_numpy(dtype=object), test[["x_m", "y_m"]].to_numpy())
    std = np.hypot(pred.epistemic_std, pred.aleatoric_std)
    y = test["rsrp_dbm"].to_numpy(dtype=float)
    _prob_scores(out, y, pred.mean, std, target="rsrp", model="bnn", epistemic=np.asarray(pred.epistemic_std), dof=getattr(pred, "dof", None))
    headline["rsrp_mae_bnn"] = M.mae(y, pred.mean)
    for name, (mean, sd) in _baseline_predictions(cfg, settings, train, test, cell_col="cell_id", y_col="rsrp_dbm").items():
        ok = np.isfinite(mean)
        if ok.any():
            _prob_scores(out, y[ok], mean[ok], sd[ok], target="rsrp", model=name)
            headline[f"rsrp_mae_{name}"] = M.mae(y[ok], mean[ok])
    for name, text in baseline_descriptions(cfg).items():
        out.add("baseline_settings", None, model=name, split=None, detail={"settings": text})
    return headline


def _radio_test_cells(cfg: PipelineConfig, inp: Inputs) -> np.ndarray:
    """Cells with an own RSRP model and held-out measurements."""
    have = set(inp.radio.cells("rsrp"))
    return np.array(sorted(c for c in _summary(cfg, inp).test_cells if c in have), dtype=object)


def _scored_radio_cells(cfg: PipelineConfig, inp: Inputs) -> np.ndarray:
    """The cells whose held-out rows the radio sections score (RSRP, and RSRQ among them)."""
    return _scored_cells(_radio_test_cells(cfg, inp), cfg.evaluate.max_scored_cells, cfg.run.seed)


def _baseline_predictions(cfg: PipelineConfig, settings: Any, train: pd.DataFrame, test: pd.DataFrame, *, cell_col: str,
                          y_col: str, train_cell_col: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per baseline of `evaluate.baselines`: (mean, std) at every `test` row, each cell's baseline fitted on
    its `train` rows from position alone (NaN where the cell has fewer than 5)."""
    from cellsynth.radio.baselines import fit_predict

    train_by_cell = train.groupby(train_cell_col or cell_col).indices
    jobs = []
    for cell_id, idx in test.groupby(cell_col).indices.items():
        tr = train.iloc[train_by_cell.get(cell_id, [])]
        if len(tr) >= 5:
            jobs.append((idx, tr[["x_m", "y_m"]].to_numpy(), tr[y_col].to_numpy(), test.iloc[idx][["x_m", "y_m"]].to_numpy()))
    preds = {}
    for name in cfg.evaluate.baselines:
        mean = np.full(len(test), np.nan)
        sd = np.full(len(test), np.nan)
        # Cells are independent: one thread per core (the fits spend their time in BLAS and
        # Cython, which release the GIL).
        # BLAS on one thread per fit: the threads already fill the cores (BLAS threads on top
        # of them only contend), and a fit's rounding then does not depend on the core count.
        with threadpool_limits(limits=1, user_api="blas"):
            fits = Parallel(n_jobs=min(len(jobs), os.cpu_count() or 1) or 1, prefer="threads")(
                delayed(fit_predict)(name, xy, yy, xy_te, settings=settings) for _, xy, yy, xy_te in jobs)
        for (idx, *_), (m, s) in zip(jobs, fits):
            mean[idx], sd[idx] = m, s
        preds[name] = (mean, sd)
    return preds


def baseline_settings(cfg: PipelineConfig):
    """The baselines' settings for this run (seeded by run.seed)."""
    from cellsynth.radio.baselines import BaselineSettings

    return BaselineSettings(gp_max_train=GP_MAX_TRAIN, seed=cfg.run.seed)


def our_row_cap(cfg: PipelineConfig) -> int:
    """Training rows per cell our model fits on: radio.max_train_per_cell, or the model's own
    lower cap (FitSettings.max_rows) where it has one. The baselines get the same cap."""
    from cellsynth.radio.model import FitSettings

    own = getattr(FitSettings(), "max_rows", None)
    return int(min(cfg.radio.max_train_per_cell, own or cfg.radio.max_train_per_cell))


def baseline_descriptions(cfg: PipelineConfig) -> dict[str, str]:
    """One line per model on what it was given, for the report's settings table."""
    cap = our_row_cap(cfg)
    text = baseline_settings(cfg).describe()
    out = {"bnn": f"cellsynth radio model (radio stage, its config): up to {cap} training rows per cell"}
    for name in cfg.evaluate.baselines:
        out[name] = f"up to {cap} training rows per cell (our cap); {text[name]}"
    return out


def load_deciles(load_rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decile index (0-9) of each load value, on the sample's own decile edges."""
    edges = np.quantile(load_rho, np.linspace(0, 1, 11))
    return np.clip(np.searchsorted(edges[1:-1], load_rho, side="right"), 0, 9), edges


def rsrq_scores(out: _Out, inp: Inputs, test: pd.DataFrame, cfg: PipelineConfig) -> None:
    """RSRQ of the serving cell on held-out reports with their observed load, per load decile; where the
    models have no load terms (no load in the lake), on every held-out report with RSRQ, without deciles.
    The scored cells are RSRP's (`_scored_radio_cells`). Beside ours, the baselines of `evaluate.baselines`
    on the same rows from position alone, each cell's fitted on up to `our_row_cap` of the training rows
    ours could use (serving, with RSRQ, and a load where ours has load terms): where the lake has loads,
    what a spatial interpolator without them gives is the reference our load terms have to beat."""
    uses_load = _rsrq_uses_load(inp)
    have = set(inp.radio.cells("rsrq"))
    scored = have & set(_scored_radio_cells(cfg, inp))
    ok = test["rsrq_db"].notna() & test["serving_cell_id"].isin(scored)
    rows = (test[ok & test["load_rho"].notna()] if uses_load else test[ok]).reset_index(drop=True)
    if rows.empty:
        inp.skipped.append("rsrq (no RSRQ models or no load)")
        return
    out.add("rsrq_scored_cells", float(rows["serving_cell_id"].nunique()), split="test",
            detail={"of_cells": int(len(have)), "cap": cfg.evaluate.max_scored_cells})
    load = rows["load_rho"].to_numpy(dtype=float)
    pred = _predict_released(inp.radio, "rsrq", rows["serving_cell_id"].to_numpy(dtype=object), rows[["x_m", "y_m"]].to_numpy(),
                             load_rho=load if uses_load else None)
    y = rows["rsrq_db"].to_numpy(dtype=float)
    _prob_scores(out, y, pred.mean, np.hypot(pred.epistemic_std, pred.aleatoric_std), target="rsrq", model="bnn",
                 epistemic=np.asarray(pred.epistemic_std), dof=getattr(pred, "dof", None))
    if uses_load:
        _decile_maes(out, y, np.asarray(pred.mean), load, model="bnn")
    if not cfg.evaluate.baselines:
        return
    fit_rows = S.bottom_k(_rsrq_train_rows(cfg, inp.measurements, scored, uses_load), S.MEAS_KEY, our_row_cap(cfg),
                          cfg.run.seed, per="cell_id")
    for name, (mean, sd) in _baseline_predictions(cfg, baseline_settings(cfg), fit_rows, rows, cell_col="serving_cell_id",
                                                  y_col="rsrq_db", train_cell_col="cell_id").items():
        good = np.isfinite(mean)
        if good.any():
            _prob_scores(out, y[good], mean[good], sd[good], target="rsrq", model=name)


def _rsrq_uses_load(inp: Inputs) -> bool:
    """Whether the RSRQ models have load terms (the DP models have them whenever they fit RSRQ)."""
    return inp.radio.uses_load("rsrq") if hasattr(inp.radio, "uses_load") else True


def _rsrq_fit_mask(meas: pd.DataFrame, uses_load: bool) -> np.ndarray:
    """Measurement rows an RSRQ model could learn from: serving, with RSRQ, and a load when it uses one."""
    keep = (meas["role"] == "serving") & meas["rsrq_db"].notna()
    return (keep & meas["load_rho"].notna() if uses_load else keep).to_numpy()


def _rsrq_train_rows(cfg: PipelineConfig, meas: pd.DataFrame, cells: set[str], uses_load: bool) -> pd.DataFrame:
    """Held-in rows of `cells` an RSRQ model could learn from: the rows the RSRQ baselines sample from."""
    rows = meas[_rsrq_fit_mask(meas, uses_load) & meas["cell_id"].isin(cells).to_numpy()]
    return rows[~split_held_out(cfg, rows["report_id"].to_numpy())]


def _decile_maes(out: _Out, y: np.ndarray, mean: np.ndarray, load: np.ndarray, *, model: str, cell_id: str | None = None) -> None:
    dec, edges = load_deciles(load)
    maes = [M.mae(y[dec == d], mean[dec == d]) if (dec == d).any() else float("nan") for d in range(10)]
    for d, value in enumerate(maes):
        out.add("rsrq_mae_db_by_load_decile", value, model=model, split=f"decile_{d}", cell_id=cell_id,
                detail={"decile": d, "load_lo": float(edges[d]), "load_hi": float(edges[d + 1])})


def refit_scores(out: _Out, inp: Inputs, cfg: PipelineConfig) -> None:
    """For a few well-measured cells: the downsampling curve (GUMBLE Table 2), the spatial-block
    (extrapolation) split, and RSRQ with vs without IPW, refitting cellsynth.radio's model."""
    ev = cfg.evaluate
    meas = inp.measurements
    # the cells with the most measurement rows (ties by cell id), every row of theirs
    cells = S.Summary.top(_summary(cfg, inp).cell_rows, ev.n_downsampling_cells)
    test_all = _meas_test_mask(cfg, inp)
    factory = inp.radio_model_factory
    for cell_id in cells:
        sel = (meas["cell_id"] == cell_id).to_numpy()
        rows, is_test = meas[sel], test_all[sel]
        train, test = rows[~is_test], _subsample(rows[is_test], 2000, cfg.run.seed)
        if len(train) < 20 or len(test) < 5:
            continue
        curve = []
        for frac_removed in (0.0, *ev.downsampling):
            n_keep = max(10, int(round(len(train) * (1 - frac_removed))))
            sub = _subsample(train, n_keep, cfg.run.seed)
            model = factory(target="rsrp").fit(sub[["x_m", "y_m"]].to_numpy(), sub["rsrp_dbm"].to_numpy())
            p = model.predict(test[["x_m", "y_m"]].to_numpy())
            y = test["rsrp_dbm"].to_numpy(dtype=float)
            sd = np.hypot(p.epistemic_std, p.aleatoric_std)
            point = {"removed": frac_removed, "n_train": int(len(sub)), "mae": M.mae(y, p.mean),
                     "ce": M.calibration_error(y, p.mean, sd, dof=getattr(p, "dof", None)), "sharpness": M.sharpness(sd)[0]}
            curve.append(point)
            out.add("rsrp_mae_dbm_downsampled", point["mae"], cell_id=cell_id, split=f"removed_{frac_removed:g}", model="bnn_refit", detail=point)
        out.add("rsrp_downsampling_curve", curve[-1]["mae"] - curve[0]["mae"], cell_id=cell_id, model="bnn_refit", detail=curve)
        # Extrapolation: hold out whole square blocks and score the model there.
        block = spatial_block_test_mask(rows["x_m"].to_numpy(), rows["y_m"].to_numpy(), block_m=cfg.split.block_m,
                                        test_fraction=cfg.split.test_fraction, seed=split_seed(cfg))
        if block.sum() >= 5 and (~block).sum() >= 20:
            tr, te = _subsample(rows[~block], _REFIT_TRAIN_CAP, cfg.run.seed), _subsample(rows[block], 2000, cfg.run.seed)
            p = factory(target="rsrp").fit(tr[["x_m", "y_m"]].to_numpy(), tr["rsrp_dbm"].to_numpy()).predict(te[["x_m", "y_m"]].to_numpy())
            _prob_scores(out, te["rsrp_dbm"].to_numpy(dtype=float), p.mean, np.hypot(p.epistemic_std, p.aleatoric_std),
                         target="rsrp", model="bnn_refit", split="spatial_block", cell_id=cell_id, epistemic=p.epistemic_std,
                         dof=getattr(p, "dof", None))
        s_sel = ((rows["role"] == "serving") & rows["rsrq_db"].notna() & rows["load_rho"].notna()).to_numpy() \
            if "role" in rows else np.zeros(len(rows), dtype=bool)
        serving, s_test = rows[s_sel], is_test[s_sel]
        if (~s_test).sum() >= 20 and s_test.sum() >= 10:
            tr, te = _subsample(serving[~s_test], _REFIT_TRAIN_CAP, cfg.run.seed), serving[s_test]
            for ipw in (True, False):
                mdl = factory(target="rsrq", ipw=ipw).fit(tr[["x_m", "y_m"]].to_numpy(), tr["rsrq_db"].to_numpy(), load_rho=tr["load_rho"].to_numpy())
                p = mdl.predict(te[["x_m", "y_m"]].to_numpy(), load_rho=te["load_rho"].to_numpy())
                _decile_maes(out, te["rsrq_db"].to_numpy(dtype=float), np.asarray(p.mean), te["load_rho"].to_numpy(dtype=float),
                             model="bnn_ipw" if ipw else "bnn_no_ipw", cell_id=cell_id)


def field_axes(xy_m: np.ndarray, n: int, *, margin_share: float = 0.25, min_margin_m: float = 500.0) -> tuple[np.ndarray, np.ndarray]:
    """x and y axes (n points each) of a square grid around rows xy_m: their bounding box's centre, its
    longer side plus a margin on each side (a quarter of that side, at least 500 m) so the figure shows
    the field beyond the data as well as on it."""
    xy = np.asarray(xy_m, dtype=float)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    side = float((hi - lo).max())
    half = side / 2.0 + max(margin_share * side, min_margin_m)
    centre = (lo + hi) / 2.0
    return np.linspace(centre[0] - half, centre[0] + half, n), np.linspace(centre[1] - half, centre[1] + half, n)


def epistemic_map_scores(out: _Out, inp: Inputs, cfg: PipelineConfig) -> None:
    """GUMBLE eq. 30 inside vs outside the data on a grid, plus one RSRP field map for the report."""
    ev = cfg.evaluate
    meas = inp.measurements
    is_train = ~_meas_test_mask(cfg, inp)
    have = set(inp.radio.cells("rsrp"))
    summ = _summary(cfg, inp)
    # the modelled cells with the most training rows (ties by cell id); the grid spans every
    # training row (the summary's bounding box: NaN positions skipped)
    cells = S.Summary.top(summ.cell_train_rows, max(cfg.report.n_example_cells, 1), among=have)
    if not cells:
        return
    lo, hi = summ.train_lo - 500.0, summ.train_hi + 500.0
    n = ev.field_grid_px
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    inside_all, outside_all = [], []
    for i, cell_id in enumerate(cells):
        pts = meas.loc[is_train & (meas["cell_id"] == cell_id).to_numpy(), ["x_m", "y_m"]].to_numpy()
        dist, _ = cKDTree(pts).query(grid, k=1)
        p = inp.radio.predict("rsrp", np.full(len(grid), cell_id, dtype=object), grid)
        epi = np.asarray(p.epistemic_std, dtype=float)
        inside, outside = epi[dist <= ev.epistemic_inside_m], epi[dist >= ev.epistemic_outside_m]
        inside_all.append(inside)
        outside_all.append(outside)
        if i == 0:
            # The figure's own grid, around this cell's rows: the grid above spans every cell's (15 km
            # on the UCC traces, where one cell's rows filled a few of its 40 x 40 squares).
            fx, fy = field_axes(pts, n)
            fxy = np.column_stack([a.ravel() for a in np.meshgrid(fx, fy)])
            fp = inp.radio.predict("rsrp", np.full(len(fxy), cell_id, dtype=object), fxy)
            out.add("rsrp_field", float(np.mean(fp.mean)), cell_id=cell_id, split="grid", model="bnn", detail={
                "x_m": fx, "y_m": fy, "mean_dbm": np.asarray(fp.mean).reshape(n, n),
                "epistemic_std_db": np.asarray(fp.epistemic_std, dtype=float).reshape(n, n),
                "train_xy_m": pts[:: max(1, len(pts) // 500)],
            })
    for split, parts in (("inside", inside_all), ("outside", outside_all)):
        vals = np.concatenate(parts) if parts else np.empty(0)
        if len(vals):
            hist, edges = np.histogram(vals, bins=30, range=(0.0, max(float(np.concatenate(inside_all + outside_all).max()), 1e-6)))
            out.add("rsrp_mean_epistemic_db", M.mean_epistemic(vals), split=split, model="bnn",
                    detail={"counts": hist, "edges": edges, "n": int(len(vals))})


def association_scores(out: _Out, inp: Inputs, test: pd.DataFrame) -> None:
    """Serving-cell association of held-out positions against the observed serving cell and
    (simulator) the true strongest cell: the KDE rule in use (`kde`: density.association), GUMBLE
    eq. 15 without prior (`kde_ml`, when the rule in use is MAP) and the nearest site. One row per
    window and one overall row per (split, model)."""
    from cellsynth.density import nearest_site_associate

    cells = inp.cells
    targets = {"observed": test.set_index("report_id")["serving_cell_id"]}
    if inp.truth_reports is not None and "true_serving_cell_id" in inp.truth_reports:
        targets["truth"] = inp.truth_reports.set_index("report_id")["true_serving_cell_id"]
    rule = getattr(inp.density, "association", None)
    hits: dict[tuple[str, str], list[int]] = {}
    for window, part in test.groupby("window"):
        if window not in set(inp.density.windows):
            continue
        xy = part[["x_m", "y_m"]].to_numpy()
        preds = {"kde": np.asarray(inp.density.associate(window, xy), dtype=object)}
        if rule == "map":
            preds["kde_ml"] = np.asarray(inp.density.associate(window, xy, rule="ml"), dtype=object)
        # Sectors share their site's position: the baseline picks the sector by bearing.
        preds["nearest_site"] = np.asarray(nearest_site_associate(cells, xy), dtype=object)
        for split, target in targets.items():
            truth = target.reindex(part["report_id"]).to_numpy(dtype=object)
            known = pd.notna(truth)
            for model, pred in preds.items():
                if known.any():
                    n_hit = int(np.sum(pred[known] == truth[known]))
                    tally = hits.setdefault((split, model), [0, 0])
                    tally[0] += n_hit
                    tally[1] += int(known.sum())
                    out.add("association_accuracy", n_hit / int(known.sum()), window=window,
                            split=split, model=model, detail={"n": int(known.sum()), "ci95": S.wilson_ci(n_hit, int(known.sum())),
                                                              "rule": rule if model == "kde" else model})
    for (split, model), (n_hit, n) in sorted(hits.items()):
        out.add("association_accuracy", n_hit / n, split=split, model=model,
                detail={"n": n, "ci95": S.wilson_ci(n_hit, n), "rule": rule if model == "kde" else model})


def synthetic_scores(out: _Out, inp: Inputs, train: pd.DataFrame, test: pd.DataFrame, cfg: PipelineConfig) -> dict[str, float]:
    """Fidelity, downstream fingerprinting utility and DCR privacy of the synthetic table."""
    ev, headline, seed = cfg.evaluate, {}, cfg.run.seed
    syn = inp.synthetic
    # Fidelity on max_privacy_rows held-out reports against as many synthetic rows (bottom-k
    # samples, `sampling`; the sizes in each row's detail).
    real = S.bottom_k(test, ["report_id"], ev.max_privacy_rows, seed)
    syn_f = S.bottom_k(syn, ["sample_id"], ev.max_privacy_rows, seed)
    numeric = [c for c in ("x_m", "y_m", "rsrp_dbm", "rsrq_db", "load_rho") if c in syn_f and syn_f[c].notna().any()]
    for rec in fidelity.fidelity_scores(real, syn_f, numeric=numeric, categorical=["serving_cell_id", "window"]):
        out.add(rec["metric"], rec["value"], split="test", model="synthetic", cell_id=None,
                detail={"column": rec["column"], "n_real": int(len(real)), "n_synthetic": int(len(syn_f))})
    # Downstream: RF fingerprinting, trained on real vs on the same number of synthetic rows.
    meas = inp.measurements
    cell_ids = _summary(cfg, inp).cells()
    tr_ids = S.bottom_k(train[["report_id"]], ["report_id"], ev.max_fingerprint_train_rows, seed)["report_id"]
    te_ids = S.bottom_k(test[["report_id"]], ["report_id"], min(ev.max_test_rows, 5000), seed)["report_id"]
    # Sparse fingerprints (`rsrp_matrix`): the same vectors as `rsrp_vectors`, without one dense
    # column per cell of the network (issue 15).
    tr_reports, real_x = fingerprint.rsrp_matrix(meas[meas["report_id"].isin(set(tr_ids))], cell_ids)
    te_reports, test_x = fingerprint.rsrp_matrix(meas[meas["report_id"].isin(set(te_ids))], cell_ids)
    syn_rows = S.bottom_k(syn, ["sample_id"], len(tr_reports), seed)
    syn_reports, syn_x = fingerprint.rsrp_matrix(fingerprint.synthetic_long(syn_rows, cfg.generate.n_neighbours), cell_ids)
    pos = train.set_index("report_id")[["x_m", "y_m"]]
    tpos = test.set_index("report_id")[["x_m", "y_m"]]
    spos = syn_rows.set_index("sample_id")[["x_m", "y_m"]]
    if len(tr_reports) and len(te_reports) and len(syn_reports):
        res = fingerprint.fingerprint_compare(
            real_x, pos.loc[tr_reports].to_numpy(), syn_x, spos.loc[syn_reports].to_numpy(),
            test_x, tpos.loc[te_reports].to_numpy(), n_trees=ev.fingerprint_trees, seed=cfg.run.seed,
        )
        k = min(400, len(te_reports))
        true_xy = tpos.loc[te_reports].to_numpy()
        n = {"n_test": int(len(te_reports)), "n_train": int(len(tr_reports))}
        out.add("fingerprint_rmse_m", res.rmse_real_m, model="rf_on_real", detail={
            **n, "ci95": _rmse_ci(true_xy, res.predicted_real_xy_m), "true_xy_m": true_xy[:k], "pred_xy_m": res.predicted_real_xy_m[:k]})
        out.add("fingerprint_rmse_m", res.rmse_synthetic_m, model="rf_on_synthetic", detail={
            **n, "ci95": _rmse_ci(true_xy, res.predicted_synthetic_xy_m), "true_xy_m": true_xy[:k],
            "pred_xy_m": res.predicted_synthetic_xy_m[:k]})
        out.add("fingerprint_rmse_ratio", res.ratio, model="synthetic_over_real", detail=n)
        headline["fingerprint_ratio"] = res.ratio
    return headline


def _rmse_ci(true_xy: np.ndarray, pred_xy: np.ndarray) -> list[float]:
    """95% interval of a localisation RMSE over its test rows: a normal interval of the mean
    squared error (its standard error over rows), square-rooted."""
    se2 = ((np.asarray(pred_xy, dtype=float) - np.asarray(true_xy, dtype=float)) ** 2).sum(axis=1)
    if len(se2) < 2:
        return [float("nan"), float("nan")]
    half = 1.96 * float(np.std(se2, ddof=1)) / np.sqrt(len(se2))
    mse = float(np.mean(se2))
    return [float(np.sqrt(max(mse - half, 0.0))), float(np.sqrt(mse + half))]


# ------------------------------------------------------------------ privacy (issue 16)
_PRIVACY_COLS = ["window", "serving_cell_id", "x_m", "y_m", "rsrp_dbm"]


def _partition_distance_task(lake: Any, shard: int, settings: dict[str, Any]) -> Any:
    """One cell shard's exact distance stats, read straight from the lake by the task."""
    from cellsynth.privacy import distance_stats

    flt = [("cell_shard", "=", int(shard))]
    real = stable_order(lake.read_pandas("mdt_reports", columns=["report_id", *_PRIVACY_COLS], filters=flt))
    syn = stable_order(lake.read_pandas("synthetic_mdt", columns=_PRIVACY_COLS, filters=flt), _PRIVACY_COLS)
    held_out = random_test_mask(real["report_id"].to_numpy(), test_fraction=settings["test_fraction"],
                                seed=settings["split_seed"])
    return distance_stats(real[~held_out], syn, real[held_out], metres_per_db=settings["metres_per_db"],
                          radii_m=settings["radii_m"])


def _distance_settings(cfg: PipelineConfig) -> dict[str, Any]:
    return {"test_fraction": cfg.split.test_fraction, "split_seed": split_seed(cfg),
            "metres_per_db": cfg.privacy.metres_per_db, "radii_m": tuple(cfg.privacy.near_radii_m)}


def lake_distance_stats(cfg: PipelineConfig, rt: Any) -> Any:
    """Exact distance stats over every (window, cell shard) of the lake: one Ray task per shard
    reads its own partitions and returns a mergeable summary (no rows reach the driver)."""
    from cellsynth.privacy import DistanceStats

    lake = rt.lake
    shards = sorted(int(s) for s in lake.read_pandas("synthetic_mdt", columns=["cell_shard"])["cell_shard"].unique())
    settings = _distance_settings(cfg)
    if not cfg.generate.use_ray:
        return DistanceStats.merge_all([_partition_distance_task(lake, s, settings) for s in shards])
    ray = rt.ray()
    task = ray.remote(num_cpus=1, max_retries=cfg.runtime.ray.max_task_retries)(_partition_distance_task)
    lake_ref = ray.put(lake)
    return DistanceStats.merge_all(ray.get([task.remote(lake_ref, s, settings) for s in shards]))


def privacy_scores(out: _Out, inp: Inputs, train: pd.DataFrame, test: pd.DataFrame, cfg: PipelineConfig) -> dict[str, float]:
    """Exact distances to every training row (metres, dB) and the membership-inference audit."""
    from cellsynth.privacy import DistanceStats, distance_attack_scores, distance_stats, guard_problems, membership_audit

    pc, headline = cfg.privacy, {}
    syn = inp.synthetic
    stats = inp.distance
    if stats is None:
        # In-process fallback (tests, fakes): the same per-shard computation as the Ray tasks.
        real_shard = train.get("cell_shard"), test.get("cell_shard")
        if real_shard[0] is not None and "cell_shard" in syn:
            stats = DistanceStats.merge_all([
                distance_stats(train[train["cell_shard"] == s], part, test[test["cell_shard"] == s],
                               metres_per_db=pc.metres_per_db, radii_m=pc.near_radii_m)
                for s, part in syn.groupby("cell_shard")])
        else:
            stats = distance_stats(train, syn, test, metres_per_db=pc.metres_per_db, radii_m=pc.near_radii_m)
    det = {"metres_per_db": pc.metres_per_db, **stats.to_json()}
    out.add("privacy_dcr_median_m", stats.synthetic_median_m, model="synthetic", split="to_train", detail=det)
    out.add("privacy_dcr_median_m", stats.holdout_median_m, model="holdout_real", split="to_train")
    upper = stats.ratio_upper(confidence=cfg.privacy.confidence, seed=cfg.run.seed)
    out.add("privacy_dcr_ratio", stats.ratio, model="synthetic_over_holdout", split="to_train",
            detail={"upper": upper, "confidence": cfg.privacy.confidence})
    out.add("privacy_exact_copies", float(stats.n_exact), model="synthetic", split="to_train")
    for r in pc.near_radii_m:
        out.add(f"privacy_share_within_{r:g}m", stats.share_within(r), model="synthetic", split="to_train")
        out.add(f"privacy_share_within_{r:g}m", stats.share_within(r, holdout=True), model="holdout_real", split="to_train")
        out.add(f"privacy_share_within_{r:g}m", stats.share_within(r, combined=True), model="synthetic",
                split="to_train_position_and_rsrp")
        out.add(f"privacy_share_within_{r:g}m", stats.share_within(r, holdout=True, combined=True), model="holdout_real",
                split="to_train_position_and_rsrp")
        headline[f"privacy_share_within_{r:g}m"] = stats.share_within(r)
    problems = guard_problems(stats, min_dcr_ratio=cfg.privacy.min_dcr_ratio, confidence=cfg.privacy.confidence,
                              max_near_excess=pc.max_near_excess, seed=cfg.run.seed)
    out.add("privacy_dcr_flag", 1.0 if problems else 0.0, model="synthetic", split="to_train", detail={"problems": problems})
    headline["privacy_dcr_flag"] = 1.0 if problems else 0.0
    for stage_name, eps in (inp.epsilon_spent or {}).items():
        out.add("privacy_epsilon_spent", eps, model=stage_name, split="dp")
    if inp.epsilon_spent:
        headline["privacy_epsilon_total"] = inp.epsilon_spent.get("total", float("nan"))
    cols = [c for c in _PRIVACY_COLS if c in syn]
    # Members, held-out reports (half reference, half non-members) and the DOMIAS KDE's synthetic
    # rows are bottom-k samples (`sampling`; sizes in the detail); the distance attack sees every
    # synthetic row (streamed from the lake by run()).
    seed, ev = cfg.run.seed, cfg.evaluate
    members = S.bottom_k(train, ["report_id"], ev.max_privacy_rows, seed)[_PRIVACY_COLS]
    holdout = S.bottom_k(test, ["report_id"], ev.max_privacy_rows, seed)[_PRIVACY_COLS]
    syn_kde = S.bottom_k(syn, ["sample_id"], pc.mia_max_synthetic_rows, seed)[cols]
    every_row = inp.synthetic_distance or (
        lambda targets: distance_attack_scores(syn[cols], targets, metres_per_db=pc.metres_per_db))
    results = membership_audit(members, holdout, syn_kde, n_targets=pc.mia_targets,
                               max_synthetic_rows=pc.mia_max_synthetic_rows, metres_per_db=pc.metres_per_db,
                               bandwidth_m=pc.mia_bandwidth_m,
                               n_boot=pc.mia_bootstrap, seed=cfg.run.seed, distance_scores=every_row)
    sampled = {"train_reports": int(len(members)), "held_out_reports": int(len(holdout)), "synthetic_kde_rows": int(len(syn_kde))}
    for r in results:
        roc = {"fpr": r.roc_fpr, "tpr": r.roc_tpr, "n_members": r.n_members, "n_non_members": r.n_non_members,
               "sampled_from": sampled}
        out.add("privacy_mia_auc", r.auc, model=r.attack, split="members_vs_holdout", detail=roc)
        out.add("privacy_mia_auc_lower", r.auc_lower, model=r.attack, split="members_vs_holdout")
        out.add("privacy_mia_auc_upper", r.auc_upper, model=r.attack, split="members_vs_holdout")
        out.add("privacy_mia_tpr_at_fpr01", r.tpr_at_fpr01, model=r.attack, split="members_vs_holdout")
    if results:
        worst = max(results, key=lambda r: r.auc)
        headline["privacy_mia_auc"] = worst.auc
        headline["privacy_mia_auc_upper"] = max(r.auc_upper for r in results)
        out.add("privacy_mia_auc", worst.auc, model="max", split="members_vs_holdout",
                detail={"attack": worst.attack, "upper": headline["privacy_mia_auc_upper"]})
    return headline


def evaluate(cfg: PipelineConfig, inp: Inputs, *, run_id: str) -> tuple[pd.DataFrame, dict[str, float]]:
    """Every metric row for this run plus the headline figures."""
    summ = _summary(cfg, inp)  # whole-table counts (run() gathers them while it streams)
    reports = inp.reports
    held_out = split_held_out(cfg, reports["report_id"].to_numpy())
    test, train = reports[held_out], reports[~held_out]
    del reports, held_out
    if inp.release_reports:
        inp.reports = None  # type: ignore[assignment]
    if summ.n_test == 0 or summ.n_train == 0:
        raise StageError(f"evaluate: the split left {summ.n_train} train and {summ.n_test} held-out reports; need both")
    out, headline = _Out(run_id), {}
    out.add("n_reports", float(summ.n_train), split="train")
    out.add("n_reports", float(summ.n_test), split="test")
    # RSRQ and association on max_test_rows held-out reports (a bottom-k sample, `sampling`)
    test_rows = S.bottom_k(test, ["report_id"], cfg.evaluate.max_test_rows, cfg.run.seed)
    # Between sections the freed heap goes back to the OS (`release_freed_memory`): each section's
    # temporaries (a group of cells' factorisations, a refit's batch) were freed into glibc's arenas,
    # which kept them, so the next section's working set came on top (issue 15: at 3,000 cells the
    # driver entered the refits at 1.78 GB with 1.20 GB before the radio sections).
    if inp.radio is not None:
        headline.update(radio_scores(out, inp, cfg))
        rsrq_scores(out, inp, test_rows, cfg)
        epistemic_map_scores(out, inp, cfg)
        release_freed_memory()
    else:
        inp.skipped.append("radio (no radio_models)")
    if inp.radio_model_factory is not None:
        refit_scores(out, inp, cfg)
        release_freed_memory()
    if inp.density is not None:
        association_scores(out, inp, test_rows)
        release_freed_memory()
    if inp.synthetic is not None and len(inp.synthetic):
        headline.update(synthetic_scores(out, inp, train, test, cfg))
        release_freed_memory()
        headline.update(privacy_scores(out, inp, train, test, cfg))
    else:
        inp.skipped.append("synthetic (no synthetic_mdt)")
    return out.frame(), headline


def _truth_reports(cfg: PipelineConfig, report_ids: set[str] | None = None) -> pd.DataFrame | None:
    """Simulator truth (report_id, true_serving_cell_id); only the rows of `report_ids` when
    given, read in batches (the whole file grows with the reports)."""
    base = cfg.evaluate.truth_dir or str(Path(cfg.scenario.output_dir or Path(cfg.run.data_dir) / "sim") / "truth")
    path = Path(base) / "reports.parquet"
    if not path.is_file():
        return None
    cols = ["report_id", "true_serving_cell_id"]
    if report_ids is None:
        truth = pd.read_parquet(path, columns=cols)
    else:
        import pyarrow.parquet as pq

        parts = [b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=262_144, columns=cols)]
        truth = pd.concat([p[p["report_id"].isin(report_ids)] for p in parts], ignore_index=True) if parts \
            else pd.DataFrame(columns=cols)
    # Injected duplicate reports share their original's report_id; one truth row per id.
    return truth.drop_duplicates("report_id")


def _radio_model_factory(cfg: PipelineConfig) -> Callable[..., Any]:
    from cellsynth.radio.model import RadioModel

    def make(**kwargs: Any) -> Any:
        return RadioModel(n_steps=cfg.evaluate.refit_n_steps, random_state=cfg.run.seed, **kwargs)

    return make


_REPORT_COLS = ["report_id", "window", "x_m", "y_m", "serving_cell_id", "rsrp_dbm", "rsrq_db", "load_rho", "cell_shard"]
_MEAS_COLS = ["report_id", "cell_id", "role", "rsrp_dbm", "rsrq_db", "x_m", "y_m", "load_rho"]


def stream_inputs(cfg: PipelineConfig, lake: Any, inp: Inputs) -> Inputs:
    """Fill `inp` with what evaluation samples from the lake, reading every table one (window,
    cell shard) partition at a time (issue 15: the driver held mdt_reports, mdt_measurements and
    synthetic_mdt whole, ~2.3 GB at 10^3 cells): bottom-k samples of the held-out and training
    reports, the measurement rows the sections use (the scored cells' sampled rows, every row of
    the refit and example cells, the fingerprint reports' rows), a sample of the synthetic rows,
    the whole tables' counts (`summary`) and the distance attack over every synthetic row. The
    radio models (`inp.radio`) must be loaded: the scored and example cells are among theirs.
    Every sample is a superset of the one `evaluate` draws, so the figures equal those from the
    whole frames."""
    ev, pc, seed = cfg.evaluate, cfg.privacy, cfg.run.seed
    summ = S.Summary()
    # reports: counts and the two samples (as large as the largest draw evaluate makes of each)
    tests = S.BottomK(["report_id"], max(ev.max_test_rows, ev.max_privacy_rows), seed)
    trains = S.BottomK(["report_id"], max(ev.max_fingerprint_train_rows, ev.max_privacy_rows), seed)
    reports = PartitionReader(lake, "mdt_reports")
    for flt in reports.filters:
        part = reports.read(_REPORT_COLS, flt)
        held = split_held_out(cfg, part["report_id"].to_numpy())
        summ.add_reports(held)
        tests.add(part[held])
        trains.add(part[~held])
    test_s, train_s = tests.frame(), trains.frame()
    inp.reports = stable_order(pd.concat([test_s, train_s], ignore_index=True))
    # measurements, first pass: counts per cell, the cells with held-out rows, the training box
    measurements = PartitionReader(lake, "mdt_measurements")
    meas_parts = measurements.filters
    for flt in meas_parts:
        part = measurements.read(["report_id", "cell_id", "x_m", "y_m"], flt)
        summ.add_measurements(part["cell_id"].to_numpy(), split_held_out(cfg, part["report_id"].to_numpy()),
                              part["x_m"].to_numpy(), part["y_m"].to_numpy())
    inp.summary = summ
    have = set(inp.radio.cells("rsrp")) if inp.radio is not None else set()
    scored = set(_scored_cells(np.array(sorted(c for c in summ.test_cells if c in have), dtype=object),
                               ev.max_scored_cells, seed)) if have else set()
    whole_cells = set(S.Summary.top(summ.cell_rows, ev.n_downsampling_cells)) if inp.radio_model_factory else set()
    example_cells = set(S.Summary.top(summ.cell_train_rows, max(cfg.report.n_example_cells, 1), among=have))
    fp_reports = set(S.bottom_k(train_s, ["report_id"], ev.max_fingerprint_train_rows, seed)["report_id"]) | set(
        S.bottom_k(test_s, ["report_id"], min(ev.max_test_rows, 5000), seed)["report_id"])
    # second pass: the rows themselves
    radio_test = S.BottomK(S.MEAS_KEY, ev.max_test_rows, seed)
    radio_train = S.BottomK(S.MEAS_KEY, our_row_cap(cfg), seed, per="cell_id")
    # the RSRQ baselines' rows, drawn as rsrq_scores draws them (`_rsrq_train_rows`)
    rsrq_train = S.BottomK(S.MEAS_KEY, our_row_cap(cfg), seed, per="cell_id")
    q_load = _rsrq_uses_load(inp)
    kept = []
    for i, flt in enumerate(meas_parts):
        part = measurements.read(_MEAS_COLS, flt)
        part["_row"] = (np.int64(i) << 32) + np.arange(len(part), dtype=np.int64)  # drops the copies below
        held = split_held_out(cfg, part["report_id"].to_numpy())
        cell = part["cell_id"]
        in_scored = cell.isin(scored).to_numpy()
        radio_test.add(part[in_scored & held])
        radio_train.add(part[in_scored & ~held])
        rsrq_train.add(part[in_scored & ~held & _rsrq_fit_mask(part, q_load)])
        keep = cell.isin(whole_cells).to_numpy() | (cell.isin(example_cells).to_numpy() & ~held) | \
            part["report_id"].isin(fp_reports).to_numpy()
        kept.append(part[keep])
    meas = pd.concat([radio_test.frame(), radio_train.frame(), rsrq_train.frame(), *kept],
                     ignore_index=True).drop_duplicates("_row")
    inp.measurements = stable_order(meas.drop(columns="_row"))
    del meas, kept
    # synthetic rows: a sample as large as the largest draw, and the distance attack over all
    if lake.exists("synthetic_mdt"):
        synthetic = PartitionReader(lake, "synthetic_mdt")
        syns = S.BottomK(["sample_id"], max(ev.max_privacy_rows, ev.max_fingerprint_train_rows, pc.mia_max_synthetic_rows), seed)
        for flt in synthetic.filters:
            syns.add(synthetic.read(_synthetic_cols(lake, cfg), flt))
        inp.synthetic = syns.frame()
        inp.synthetic_distance = _streamed_distance_attack(synthetic, pc.metres_per_db)
    truth = _truth_reports(cfg, set(test_s["report_id"]))
    inp.truth_reports = truth
    return inp


def _streamed_distance_attack(synthetic: Any, metres_per_db: float) -> Callable[[pd.DataFrame], np.ndarray]:
    """The distance attack's scores of the targets against every synthetic row, one partition at a
    time (the minimum of each target's distance over the partitions: exact)."""
    from cellsynth.privacy import partition_distances
    from cellsynth.privacy.mia import distance_attack_from

    def scores(targets: pd.DataFrame) -> np.ndarray:
        d = np.full(len(targets), np.nan)
        for flt in synthetic.filters:
            sel = np.ones(len(targets), dtype=bool) if flt is None else (targets["window"] == flt[0][2]).to_numpy()
            if not sel.any():
                continue
            syn = synthetic.read(_PRIVACY_COLS, flt)
            _, dc = partition_distances(syn, targets[sel], metres_per_db=metres_per_db)
            d[sel] = np.fmin(d[sel], dc)
        return distance_attack_from(d)

    return scores


def _synthetic_cols(lake: Any, cfg: PipelineConfig) -> list[str]:
    """The synthetic_mdt columns evaluation reads (fidelity, fingerprints, privacy): not the
    timestamps, lat/lon, the ten predictive-std columns or the run labels (issue 15)."""
    have = set(_table_columns(lake, "synthetic_mdt"))
    want = ["sample_id", "window", "serving_cell_id", "x_m", "y_m", "rsrp_dbm", "rsrq_db", "load_rho", "cell_shard"]
    for k in range(1, cfg.generate.n_neighbours + 1):
        want += [f"neighbour_{k}_cell_id", f"neighbour_{k}_rsrp_dbm"]
    return [c for c in want if c in have]


def _table_columns(lake: Any, table: str) -> list[str]:
    return list(lake.dataset(table).schema.names)


def run(cfg: PipelineConfig, rt: Any, *, run_id: str) -> StageResult:
    lake = rt.lake
    for table in ("mdt_reports", "mdt_measurements", "cells"):
        if not lake.exists(table):
            raise StageError(f"evaluate: lake table '{table}' is missing; run ingest first")
    inp = Inputs(reports=None, measurements=None, cells=stable_order(lake.read_pandas("cells"), ("cell_id",)),  # type: ignore[arg-type]
                 release_reports=True)
    if cfg.privacy.mode == "dp":  # issue 16: score the DP models the synthetic table came from
        from cellsynth.privacy import dp_stage

        inp.radio = dp_stage.load_radio(lake)
        inp.density = dp_stage.load_density(lake, inp.radio, n_candidates=cfg.generate.neighbour_candidates)
        inp.epsilon_spent = dp_stage.spent(lake)
    elif lake.exists("radio_models"):
        from cellsynth.radio import RadioModels

        inp.radio = RadioModels.load(lake)
        inp.radio_model_factory = _radio_model_factory(cfg)
    if cfg.privacy.mode != "dp" and lake.exists("kde_models"):
        from cellsynth.density import DensityModels

        inp.density = DensityModels.load(lake, prune_k_bandwidths=cfg.density.prune_k_bandwidths,
                                      association=cfg.density.association,
                                      association_bandwidth_scales=cfg.density.association_bandwidth_scales)
    # Samples and counts, read one partition at a time (issue 15: a flat driver); in an order
    # fixed by content (the samples are bottom-k of a stable hash, then stable_order).
    with rt.progress("sampling the lake by partition", None):
        stream_inputs(cfg, lake, inp)
    n_reports = inp.summary.n_train + inp.summary.n_test
    if inp.synthetic is not None and len(inp.synthetic):
        with rt.progress("exact privacy distances per partition", None):
            inp.distance = lake_distance_stats(cfg, rt)
    with rt.progress("evaluating", None):
        frame, headline = evaluate(cfg, inp, run_id=run_id)
    version = lake.write("metrics", frame, mode="overwrite", predicate=f"stage = '{NAME}'", app_id=f"{run_id}:{NAME}")
    note = "skipped: " + "; ".join(inp.skipped) if inp.skipped else ""
    return StageResult(stage=NAME, run_id=run_id, rows_in={"mdt_reports": n_reports},
                       rows_written={"metrics": len(frame)}, table_versions={"metrics": version},
                       metrics=headline, note=note)
