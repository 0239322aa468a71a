"""Radio-field models of a shard of cells: `fit_cells` trains C cells as one batched GP and
returns `FittedCells` (predict, save, load). The one-cell estimator is `RadioModel`
(`estimator.py`), the lake-side collection `RadioModels` (`collection.py`).

Per cell: physical mean (log-distance + sector pattern [+ load], `geometry.py`) with its
coefficients integrated out, plus a Matern GP residual with MAP hyperparameters (`gp.py`), then
one factor on the predictive std per shard chosen by cross-validation on the training rows
(`calibration.py`). Model choices and where each constant comes from are in those modules.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from cellsynth.errors import SchemaError
from cellsynth.radio import calibration as cal
from cellsynth.radio import farfield as ff
from cellsynth.radio import fastvar, foldcv, gp
from cellsynth.radio import geometry as geo
from cellsynth.radio import stacking as stk
from cellsynth.radio.geometry import basis, estimate_site, prior_mean, site_offset
from cellsynth.radio.persist import load_fitted, save_fitted

Target = Literal["rsrp", "rsrq"]
# Padded elements (cells x rows x rows) per Cholesky batch on a GPU: ~160 MB in float64, several
# copies live during the backward pass; a memory bound, not a tuned value.
BATCH_ELEMENTS = 20_000_000
# On CPU a batch's (C, N, N) tensors are sized to a core's L2 cache (~2 MB of float64), so the
# elementwise passes that build K can stay in cache. Measured: peak RSS of a 64-cell shard of 200
# rows 464 MB against 1,035 MB (bench/radio.json); CPU time of a 32-cell shard 101 / 96 / 92 ms a
# cell against 132 / 103 / 115 at 20M (interleaved in one process, load ~10 on 2 cores). The
# Python cost per batch is ~1 ms. Which cells share a batch does not change any cell's fit (tests/radio/test_gp_fast.py).
CPU_BATCH_ELEMENTS = 250_000
PREDICT_CHUNK_ROWS = 4096
# Rows that aggregate several raw samples (CellData.row_weight, e.g. a grid square's mean RSRP
# over its `sample` reports): the GP's noise variance of row i is n^2 (w_ref / w_i)^gamma,
# w_ref = the geometric mean of the cell's row weights (the typical row; an arithmetic mean of a
# heavy-tailed count is set by a few rows), so n^2 is the noise of a typical row and predictions
# (which know no row weight) carry it. gamma = 1 is a mean of independent samples; 0 ignores the
# counts in the fit; samples of one square share position error and a drive's slow fading, so
# the truth lies between. Chosen among (0, 0.5, 1) by the nested harness (bench/radio_inner.py,
# variants w0 / w05 / w1; see the README). The row weights also weight every training-row
# objective: k and the kNN weight (row-weighted MAE) and the interval factors (weighted shares).
ROW_WEIGHT_POWER = 0.5

# The calibration a shard's cells share (per kind: its own cells, or the pooled fallback): fit_cells
# fits it once on the kind's pooled held-out training-row sets, so every cell of a shard carries the
# same values of these arrays. An incremental run that retrains some of a shard's cells takes them
# from the shard's last fit (`shard_calibration`, `fit_cells(calibration=...)`) instead of refitting
# them on the retrained cells alone (issue 15; see radio/stage.py).
SHARD_CALIBRATION_KEYS = ("scale", "ep_scale", "blend_w", "blend_support", "ep_slope", "far_var", "far_len", "dof",
                          "site_scale", "site_edges_m", "dist_edges_m", "dof_bins", "pos_sigma_m", "tree_fade_m")
# Shared constants that a cell carries only when it takes part (else 0): the mean shift (cells whose
# row weights differ, calibration.SHIFT_WEIGHTED_ONLY) and the forest weight (cells with a forest).
GATED_CALIBRATION_KEYS = ("mean_shift", "tree_w")


@dataclass
class RadioPrediction:
    """Predictive mean and its uncertainty split by GUMBLE eq. 19 (all dB, shape (n,))."""

    mean: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray
    pooled: np.ndarray | None = None  # True where a cell had no model of its own
    # Shape of the predictive: Student-t degrees of freedom per row, the t scaled to total_std
    # (calibration.TAIL_MODE); None or inf: Gaussian.
    dof: np.ndarray | None = None

    @property
    def total_std(self) -> np.ndarray:
        return np.sqrt(self.epistemic_std**2 + self.aleatoric_std**2)

    def dof_or_inf(self) -> np.ndarray:
        """Degrees of freedom per row (inf where Gaussian)."""
        return np.full(len(self.mean), np.inf) if self.dof is None else np.broadcast_to(np.asarray(self.dof, dtype=float), np.shape(self.mean))

    def cdf(self, y: np.ndarray) -> np.ndarray:
        """Predictive CDF at y per row (the PIT of observed values)."""
        z = (np.asarray(y, dtype=float) - self.mean) / np.maximum(self.total_std, 1e-12)
        dof, out = self.dof_or_inf(), np.empty(len(z))
        for d in np.unique(dof):
            k = dof == d
            out[k] = cal.std_t_cdf(z[k], float(d))
        return out

    def interval(self, q: float) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) of the central q interval per row."""
        dof, half = self.dof_or_inf(), np.empty(len(self.mean))
        for d in np.unique(dof):
            half[dof == d] = float(cal.std_t_ppf(0.5 + q / 2, float(d)))
        half = half * self.total_std
        return self.mean - half, self.mean + half

    def reliable(self, threshold_db: float) -> np.ndarray:
        """True where the epistemic std is below `threshold_db` (GUMBLE section 6.2)."""
        return self.epistemic_std < threshold_db


@dataclass
class CellData:
    """One cell's training rows."""

    cell_id: str
    xy_m: np.ndarray  # (n, 2)
    y: np.ndarray  # (n,) RSRP dBm or RSRQ dB
    load_rho: np.ndarray | None = None
    weight: np.ndarray | None = None  # per-row likelihood scale (IPW), mean ~1
    origin_xy_m: np.ndarray | None = None  # site position when the cells table has one
    azimuth_deg: float | None = None  # sector azimuth when the cells table has one (antenna term)
    local: bool = True  # False for a pooled model over several cells' rows (calibrated apart)
    row_weight: np.ndarray | None = None  # raw samples a row stands for (aggregated rows); None: 1 each


def cell_problems(c: CellData, *, uses_load: bool, min_rows: int = 1) -> list[str]:
    """What makes a cell's rows unfittable, one line each (empty: fine). Shapes, non-finite values, fewer than
    `min_rows` rows (a batch fits a one-row cell, e.g. a shard's pooled fallback over one held-in row; `RadioModel`
    asks for 2), and likelihood / row weights that are not positive: a zero weight is an infinite noise variance,
    which the Cholesky of K reports as a matrix that is not positive definite, naming nothing."""
    xy, y = np.asarray(c.xy_m, dtype=float), np.asarray(c.y, dtype=float)
    problems = []
    if xy.ndim != 2 or xy.shape[1] != 2:
        problems.append(f"xy_m: expected shape (n, 2), got {xy.shape}")
    elif y.shape != (len(xy),):
        problems.append(f"y: expected {len(xy)} values to match xy_m, got shape {y.shape}")
    if y.size < min_rows:
        problems.append(f"y: expected at least {min_rows} row{'s' if min_rows > 1 else ''}, got {y.size}")
    if not (np.all(np.isfinite(xy)) and np.all(np.isfinite(y))):
        problems.append("xy_m/y: expected finite values, got NaN or inf")
    for name, w in (("weight", c.weight), ("row_weight", c.row_weight)):
        if w is not None:
            w = np.asarray(w, dtype=float)
            if w.shape != y.shape or not np.all(np.isfinite(w)) or np.any(w <= 0):
                problems.append(f"{name}: expected {y.size} finite positive values, one per row")
    if uses_load and c.load_rho is not None:
        rho = np.asarray(c.load_rho, dtype=float)
        if rho.shape != y.shape or not np.all(np.isfinite(rho)):
            problems.append(f"load_rho: expected {y.size} finite loads, one per row")
    return problems


def noise_weight(row_weight: np.ndarray | None, n: int, power: float | None = None) -> np.ndarray:
    """(w_i / w_ref)^gamma (ROW_WEIGHT_POWER): the factor dividing row i's noise variance; ones without row weights."""
    if row_weight is None:
        return np.ones(n)
    w = np.asarray(row_weight, dtype=float)
    gamma = ROW_WEIGHT_POWER if power is None else power
    if gamma == 0.0 or np.all(w == w[0]):
        return np.ones(n)
    return (w / np.exp(np.mean(np.log(w)))) ** gamma


@dataclass
class FitSettings:
    n_steps: int = 300  # Adam steps of the reference ("pyro") hyperparameter fit
    learning_rate: float = 0.05  # its rate on the log hyperparameters, decaying 10x over the run
    floor_db: float = 0.5  # aleatoric floor: 1 dB report steps alone give 0.29 dB
    uses_load: bool = False  # RSRQ: load terms in the mean
    kernel: str = "matern32"  # Matern smoothness of the residual GP (gp.MATERN_NU)
    max_rows: int = 1500  # rows per cell in the exact GP (O(n^3)); the GP baseline's cap
    hyper_rows: int = 500  # rows per cell for the hyperparameter fit (3 numbers; O(n^3) a step)
    cv_block_m: float = 200.0  # block side of the internal block CV of the calibration
    calibrate: bool = True  # one factor on the predictive std per shard from training-row CV
    fit_path: str = "grid"  # "grid": profiled grid search (gp.fit_theta_grid); "pyro": Pyro model + AutoDelta by Adam

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FittedCells:
    """Posterior of C cells trained together (or one, C = 1). Arrays have a leading cell axis;
    `train_*` are padded to the longest cell (mask marks real rows)."""

    cell_ids: list[str]
    target: str
    settings: FitSettings
    arrays: dict[str, np.ndarray]  # origin_xy_m, azimuth_deg, ant_on, beta0, theta, scale, train_xy_m, train_y, train_rho, train_w, mask
    elbo: np.ndarray  # (C,) log marginal likelihood of each cell's fitted GP
    n_train: np.ndarray
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _solved: dict[int, tuple] = field(default_factory=dict, repr=False)  # per cell: (batch, theta, L, alpha)
    # per cell: its posterior raster (`raster.py`, saved next to the weights); absent: exact prediction
    rasters: dict[int, Any] = field(default_factory=dict, repr=False)
    # per cell: its forest (stacking.TREE_STACK), saved with the weights (`forest_arrays`), or refitted from the
    # stored rows and seed on first use (weights saved before forests were)
    _forests: dict[int, Any] = field(default_factory=dict, repr=False)
    # per cell: its forest's node arrays as loaded (`forest_arrays`' layout), turned into trees on first use
    _stored_forests: dict[int, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.cell_ids)}

    def index_of(self, cell_ids: np.ndarray) -> np.ndarray:
        return np.array([self._index.get(str(c), -1) for c in cell_ids], dtype=np.int64)

    def release_cell(self, i: int) -> None:
        """Drop cell i's cached factorisation (~n^2 floats, rebuilt on next use): a caller going through every
        cell of a large batch once keeps its memory flat. Its forest (~150 KB, node arrays) stays: it is saved
        with the weights."""
        self._solved.pop(i, None)

    def take(self, idx: list[int]) -> FittedCells:
        """The sub-model of cells `idx` (e.g. one shard out of an actor's batch)."""
        arrays = {k: np.asarray(v)[idx] for k, v in self.arrays.items()}
        n = int(max(1, np.asarray(arrays["mask"]).sum(1).max()))
        arrays.update({k: arrays[k][:, :n] for k in ("train_xy_m", "train_y", "train_rho", "train_w", "mask")})
        out = FittedCells([self.cell_ids[i] for i in idx], self.target, self.settings, arrays, self.elbo[idx], self.n_train[idx])
        out.rasters = {j: self.rasters[i] for j, i in enumerate(idx) if i in self.rasters}
        out._forests = {j: self._forests[i] for j, i in enumerate(idx) if i in self._forests}
        out._stored_forests = {j: self._stored_forests[i] for j, i in enumerate(idx) if i in self._stored_forests}
        return out

    def calibration(self) -> dict[str, Any]:
        """What the training-row procedures chose (for reports): hyperparameters and std factor."""
        length, signal2, noise2 = gp.unpack(torch.as_tensor(self.arrays["theta"]), self.settings.floor_db)
        return {"length_m": length.numpy().tolist(), "signal_db": signal2.sqrt().numpy().tolist(),
                "noise_db": noise2.sqrt().numpy().tolist(), "epistemic_factor": self.arrays["scale"][:, 0].tolist(),
                "aleatoric_factor": self.arrays["scale"][:, 1].tolist(),
                "epistemic_factor_by_distance": self._ep_scale().tolist(), "distance_edges_m": list(self._dist_edges(0)) if len(self.cell_ids) else [],
                "knn_weight_by_distance": np.asarray(self.arrays.get("blend_w", np.zeros_like(self._ep_scale()))).tolist(),
                "knn_weight_times_support": np.asarray(self.arrays.get("blend_support", np.zeros(len(self.cell_ids)))).astype(bool).tolist(),
                "dof": np.asarray(self.arrays.get("dof", np.full(len(self.cell_ids), np.inf))).tolist(),
                "mean_shift_db": np.asarray(self.arrays.get("mean_shift", np.zeros(len(self.cell_ids)))).tolist(),
                "epistemic_factor_slope": np.asarray(self.arrays.get("ep_slope", np.zeros(len(self.cell_ids)))).tolist(),
                "knn_k": np.asarray(self.arrays.get("knn_k", np.ones(len(self.cell_ids)))).astype(int).tolist(),
                "tree_weight": np.asarray(self.arrays.get("tree_w", np.zeros(len(self.cell_ids)))).tolist(),
                "cv_loo_mae_db": self.arrays["cv_mae_db"][:, 0].tolist(), "cv_block_mae_db": self.arrays["cv_mae_db"][:, 1].tolist()}

    def _ep_scale(self) -> np.ndarray:
        """(C, bins) epistemic factor per distance bin; weights without it: one factor for all."""
        if "ep_scale" in self.arrays:
            return np.asarray(self.arrays["ep_scale"], dtype=float)
        return np.repeat(np.asarray(self.arrays["scale"], dtype=float)[:, :1], len(cal.DIST_EDGES_M), axis=1)

    def _dist_edges(self, ci: int) -> tuple[float, ...]:
        """Edges of cell ci's distance-to-nearest-row bins as fitted; weights saved without them:
        one bin if they carry one factor, else the first edges of calibration.DIST_EDGES_M."""
        if "dist_edges_m" in self.arrays:
            return tuple(np.asarray(self.arrays["dist_edges_m"][ci], dtype=float))
        n = self._ep_scale().shape[1]
        return (0.0,) if n == 1 else tuple(cal.DIST_EDGES_M)[:n]

    def _ep_factor(self, ci: int, kbin: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Factor on the latent std of cell ci's rows, as `predict` and `epistemic_cov` both apply it
        (times the site factor): the factor of each row's distance-to-nearest-row bin `kbin`, times
        a exp(b v), v = posterior / prior variance (weights without the slope: b = 0)."""
        slope = float(self.arrays["ep_slope"][ci]) if "ep_slope" in self.arrays else 0.0
        return self._ep_scale()[ci][kbin] * np.exp(slope * v)

    def _site_factor(self, ci: int, xy_m: np.ndarray) -> np.ndarray | float:
        """Factor on the whole std of rows xy_m of cell ci by their distance to its site
        (calibration.SITE_EDGES_M as fitted; weights without it, or one bin: 1)."""
        f = np.asarray(self.arrays["site_scale"][ci], dtype=float) if "site_scale" in self.arrays else np.ones(1)
        if len(f) == 1:
            return float(f[0])
        edges = tuple(np.asarray(self.arrays["site_edges_m"][ci], dtype=float))
        return f[cal.distance_bin(np.hypot(*(np.asarray(xy_m, dtype=float) - self.arrays["origin_xy_m"][ci]).T), edges)]

    def basis(self, i: int, xy_m: np.ndarray, load_rho: np.ndarray | None) -> np.ndarray:
        """geometry.basis of cell i as fitted: its site, azimuth, antenna term and H of the
        log-distance term (`geometry.site_offset`; weights saved without it: 0, the 2-D distance)."""
        a = self.arrays
        height_m = float(a["site_h_m"][i]) if "site_h_m" in a else 0.0
        return basis(xy_m, a["origin_xy_m"][i], a["azimuth_deg"][i], bool(a["ant_on"][i]), load_rho, height_m,
                     site_term=np.shape(a["beta0"])[-1] > geo.N_BASIS)  # as fitted (geometry.SITE_TERM)

    def _train(self, i: int, device: torch.device) -> tuple:
        """(training batch, theta) of cell i, without the factorisation (cheap)."""
        if i in self._solved:
            return self._solved[i][:2]
        a = self.arrays
        n = int(a["mask"][i].sum())
        rho = a["train_rho"][i, :n] if self.settings.uses_load else None
        b = _batch_of([a["train_xy_m"][i, :n] - a["origin_xy_m"][i]], [a["train_y"][i, :n]], [a["train_w"][i, :n]],
                      [self.basis(i, a["train_xy_m"][i, :n], rho)],
                      a["beta0"][i:i + 1], device)
        return b, torch.as_tensor(a["theta"][i:i + 1], dtype=torch.float64, device=device)

    def forest(self, i: int) -> stk.CellForest:
        """Cell i's forest (stacking.TREE_STACK): as loaded with the weights, else fitted from its stored training
        rows, residuals and seed (the same inputs as in the fit, so the same trees); cached."""
        if i not in self._forests and i in self._stored_forests:
            try:
                self._forests[i] = stk.CellForest.from_arrays(self._stored_forests[i])
            except ValueError:  # a state this sklearn refuses: refitted below
                pass
        if i not in self._forests:
            b, _ = self._train(i, torch.device("cpu"))
            self._forests[i] = stk.CellForest(b.xy[0].numpy(), b.r[0].numpy(), b.w[0].numpy(), int(self.arrays["tree_seed"][i]))
        return self._forests[i]

    def training_batch(self, i: int, device: str | torch.device = "cpu") -> tuple:
        """(training batch, theta) of cell i: its rows, residuals and fitted hyperparameters,
        without factorising the covariance (for callers outside radio, e.g. the planner)."""
        return self._train(int(i), torch.device(device))

    def _cell(self, i: int, device: torch.device) -> tuple:
        if i not in self._solved:
            b, theta = self._train(i, device)
            chol, alpha = fastvar.solve(b, theta, nu=gp.MATERN_NU[self.settings.kernel], floor_db=self.settings.floor_db)
            self._solved[i] = (b, theta, chol, alpha)
        return self._solved[i]

    def predict(self, cell_index: np.ndarray, xy_m: np.ndarray, load_rho: np.ndarray | None = None, *,
                n_samples: int = 0, seed: int = 0, device: str | torch.device = "cpu") -> RadioPrediction:
        """Predict rows whose model is `self.cell_ids[cell_index[i]]` (grouped by cell). The GP
        posterior is analytic: `n_samples` and `seed` are accepted for API compatibility only."""
        del n_samples, seed
        xy_m = np.asarray(xy_m, dtype=float)
        cell_index = np.asarray(cell_index)
        n = len(xy_m)
        problems = []
        if xy_m.ndim != 2 or xy_m.shape[1] != 2 or not np.all(np.isfinite(xy_m)):
            problems.append(f"xy_m: expected finite positions of shape (n, 2), got shape {xy_m.shape}"
                            + (" with NaN or inf" if xy_m.size and not np.all(np.isfinite(xy_m)) else ""))
        if cell_index.shape != (n,) or (n and (cell_index.min() < 0 or cell_index.max() >= len(self.cell_ids))):
            problems.append(f"cell_index: expected {n} indices in [0, {len(self.cell_ids)}) (index_of gives -1 for an "
                            "unknown cell id)")
        if problems:
            raise SchemaError(problems)
        mean, ep, al, dof = np.empty(n), np.empty(n), np.empty(n), np.full(n, np.inf)
        a, s = self.arrays, self.settings
        device = torch.device(device)
        with torch.no_grad():
            for ci in np.unique(cell_index):
                ci = int(ci)
                # theta alone (as `_train` gives it): a cell its raster covers needs no training
                # batch (built per call, ~0.4 ms a cell), only its rows' k-d tree (the raster's)
                theta = torch.as_tensor(a["theta"][ci:ci + 1], dtype=torch.float64, device=device)
                _, _, noise2 = gp.unpack(theta, s.floor_db)
                cell_raster = self.rasters.get(ci)
                f_al = float(np.asarray(a["scale"][ci]).reshape(-1)[1])
                f_bins = self._ep_scale()[ci]
                w_bins = np.asarray(a["blend_w"][ci]) if "blend_w" in a else np.zeros(len(f_bins))
                k = int(a["knn_k"][ci]) if "knn_k" in a else 1
                # weights written before the support-aware forms: flat kNN weight, one epistemic factor
                on_support = bool(a["blend_support"][ci]) if "blend_support" in a else False
                far_v = float(a["far_var"][ci]) if "far_var" in a else 0.0
                far_l = float(a["far_len"][ci]) if "far_len" in a else 1.0
                dof[cell_index == ci] = float(a["dof"][ci]) if "dof" in a else np.inf  # weights before the t: Gaussian
                for start in np.array_split(np.flatnonzero(cell_index == ci), max(1, int(np.ceil((cell_index == ci).sum() / PREDICT_CHUNK_ROWS)))):
                    rows = start
                    rho = None if (load_rho is None or not s.uses_load) else np.asarray(load_rho, dtype=float)[rows]
                    h = self.basis(ci, xy_m[rows], rho if s.uses_load else None)
                    if s.uses_load and rho is None:  # no load given: the mean at rho = 0.5
                        h[:, 3:] = 0.0
                    tt = lambda v: torch.as_tensor(v, dtype=torch.float64, device=device)[None]  # noqa: E731
                    mu, var = self._latent(ci, cell_raster, theta, xy_m[rows] - a["origin_xy_m"][ci], h, device,
                                           int((cell_index == ci).sum()))
                    # distance to the nearest training row picks the epistemic factor and the kNN weight
                    w_tree = float(a["tree_w"][ci]) if "tree_w" in a else 0.0
                    fade_m = float(a["tree_fade_m"][ci]) if "tree_fade_m" in a else 0.0
                    need_dist = len(f_bins) > 1 or far_v > 0 or (w_tree > 0.0 and fade_m > 0.0)
                    need_knn = bool(np.any(w_bins))
                    tree = cell_raster.tree(int(a["mask"][ci].sum())) if cell_raster is not None and not need_knn else None
                    if not (need_dist or need_knn):
                        dmin, knn = np.zeros(len(rows)), None  # as fastvar.nearest answers
                    elif tree is not None:  # fastvar.nearest's query, on the raster's tree of the same rows
                        dmin, knn = tree.query(xy_m[rows] - a["origin_xy_m"][ci], k=1)[0].reshape(-1), None
                    else:
                        b, _ = self._train(ci, device)
                        dmin, knn = fastvar.nearest(b, tt(xy_m[rows] - a["origin_xy_m"][ci])[0], k,
                                                    need_dist=need_dist, need_knn=need_knn)
                    kbin = cal.distance_bin(dmin, self._dist_edges(ci))
                    if "dof_bins" in a:  # calibration.FAR_DOF: the tail of the row's distance bin
                        dof[rows] = np.asarray(a["dof_bins"][ci], dtype=float)[kbin]
                    mu_np, var_np = mu, var
                    knn = mu_np if knn is None else knn  # weight 0 everywhere: the GP alone
                    # posterior / stationary prior variance (clipped): 0 on dense data, 1 where the data say nothing
                    v = 1.0 - stk.support(var_np, float(gp.stationary_prior_var(theta, floor_db=s.floor_db)[0]))
                    w = w_bins[kbin] * ((1.0 - v) if on_support else 1.0)
                    mean[rows] = h @ a["beta0"][ci] + mu_np + w * (knn - mu_np) + (float(a["mean_shift"][ci]) if "mean_shift" in a else 0.0)
                    if w_tree > 0.0:  # stacking.TREE_STACK: the forest's component, support-weighted as the kNN's
                        tree_mean = self.forest(ci).predict(xy_m[rows] - a["origin_xy_m"][ci])
                        fade = stk.tree_fade(dmin, fade_m) if fade_m > 0.0 else 1.0  # rule T': faded by the nearest row's distance
                        mean[rows] += w_tree * (1.0 - v) * fade * (tree_mean - mu_np)
                    f_ep = self._ep_factor(ci, kbin, v)
                    f_site = self._site_factor(ci, xy_m[rows])
                    ep[rows] = np.minimum(f_site * f_ep * np.sqrt(var_np + ff.term(dmin, far_v, far_l)), gp.MAX_EPISTEMIC_DB)
                    al[rows] = f_site * f_al * float(noise2[0].sqrt())
                    if "pos_sigma_m" in a and float(a["pos_sigma_m"][ci]) > 0.0:  # calibration.POSITION_NOISE (rule X)
                        dsite = np.hypot(*(xy_m[rows] - a["origin_xy_m"][ci]).T)
                        h_m = float(a["site_h_m"][ci]) if "site_h_m" in a else 0.0
                        al[rows] = np.sqrt(al[rows] ** 2 + float(a["pos_sigma_m"][ci]) ** 2
                                           * cal.position_grad2(dsite, float(a["beta0"][ci][1]), h_m))
        return RadioPrediction(mean, ep, al, dof=dof)

    def _latent(self, ci: int, cell_raster, theta, xy: np.ndarray, h: np.ndarray, device: torch.device,
                rows_in_cell: int) -> tuple[np.ndarray, np.ndarray]:
        """Latent posterior mean and variance of cell ci at rows xy (relative to its origin): from
        the cell's raster where it covers them (`raster.py`, checked against the exact path when
        built), exactly otherwise (`fastvar`, which factorises the cell once)."""
        from cellsynth.radio import raster

        s = self.settings
        todo = np.ones(len(xy), dtype=bool)
        mean, var = np.empty(len(xy)), np.empty(len(xy))
        if cell_raster is not None:
            mean, var, inside = cell_raster.latent(xy, h)
            todo = ~inside
            raster.STATS["raster_rows"] += int(inside.sum())
        if todo.any():
            b, _, chol, alpha = self._cell(ci, device)
            tt = lambda v: torch.as_tensor(v[todo], dtype=torch.float64, device=device)[None]  # noqa: E731
            mu, v = fastvar.predict_latent(b, theta, chol, alpha, tt(xy), tt(h), nu=gp.MATERN_NU[s.kernel],
                                           floor_db=s.floor_db, rows_in_cell=rows_in_cell)
            mean[todo], var[todo] = mu[0].cpu().numpy(), v[0].cpu().numpy()
            raster.STATS["exact_rows"] += int(todo.sum())
        return mean, var

    def epistemic_cov(self, cell_index: int, xy_m: np.ndarray) -> np.ndarray:
        """Posterior covariance (M, M) of cell `cell_index`'s latent field between positions xy_m
        (M, 2), dB^2, calibrated as `predict` is: times the epistemic factor squared, and rows and
        columns scaled down where the std would pass MAX_EPISTEMIC_DB, so its diagonal is
        `predict(...).epistemic_std ** 2`. Load terms (RSRQ) at the mean load, as in `predict`
        without `load_rho`. Measurement planning conditions on it (one report at x with noise
        `aleatoric_std(x) ** 2` lowers the variance at x' by cov[x', x]^2 / (cov[x, x] + noise))."""
        a, s = self.arrays, self.settings
        ci = int(cell_index)
        xy_m = np.asarray(xy_m, dtype=float).reshape(-1, 2)
        with torch.no_grad():
            b, theta, chol, _ = self._cell(ci, torch.device("cpu"))
            h = self.basis(ci, xy_m, None)  # load terms 0
            x = torch.as_tensor(xy_m - a["origin_xy_m"][ci], dtype=torch.float64)[None]
            ht = torch.as_tensor(h, dtype=torch.float64)[None]
            kw = {"nu": gp.MATERN_NU[s.kernel], "floor_db": s.floor_db}
            prior = gp.latent_cov(x, ht, x, ht, theta, **kw)[0]
            ks = gp.latent_cov(x, ht, b.xy, b.h, theta, **kw) * b.mask.to(torch.float64)[:, None, :]
            v = torch.linalg.solve_triangular(chol, ks.transpose(-1, -2), upper=False)[0]
            cov = (prior - v.T @ v).numpy()
            prior_var = float(gp.stationary_prior_var(theta, floor_db=s.floor_db)[0])
        cov = 0.5 * (cov + cov.T)
        # the per-row epistemic factor of `predict`
        v = 1.0 - stk.support(np.clip(np.diag(cov), 0.0, None), prior_var)
        far_v = float(a["far_var"][ci]) if "far_var" in a else 0.0
        dmin = np.zeros(len(xy_m))
        if self._ep_scale().shape[1] > 1 or far_v > 0:
            dmin = fastvar.nearest(b, torch.as_tensor(xy_m - a["origin_xy_m"][ci], dtype=torch.float64), 1, need_dist=True,
                                   need_knn=False)[0]
        f = self._ep_factor(ci, cal.distance_bin(dmin, self._dist_edges(ci)), v) * self._site_factor(ci, xy_m)
        cov = cov * f[:, None] * f[None, :]
        if far_v > 0:  # the far-field term, independent per position (it is a variance of the extrapolation, farfield.py)
            cov = cov + np.diag(f**2 * ff.term(dmin, far_v, float(a["far_len"][ci])))
        sd = np.sqrt(np.clip(np.diag(cov), 1e-12, None))
        shrink = np.minimum(1.0, gp.MAX_EPISTEMIC_DB / sd)
        return cov * shrink[:, None] * shrink[None, :]

    def forest_arrays(self) -> dict[str, np.ndarray]:
        """The forests of every cell whose mean uses one (tree_w > 0; fitted here if no prediction did yet), as
        flat arrays: "cells" (K,) their cell indices, `CellForest.to_arrays` of each concatenated, "nodes" (K + 1,)
        and "trees" (K + 1,) each cell's first node and first tree. Generation then loads the trees instead of
        refitting them for every cell it predicts (~25 ms a cell at 1,500 rows; issue 15, incremental runs)."""
        w = np.asarray(self.arrays.get("tree_w", np.zeros(len(self.cell_ids))), dtype=float)
        cells = [i for i in range(len(self.cell_ids)) if w[i] > 0.0]
        parts = [self.forest(i).to_arrays() for i in cells]
        out = {"cells": np.asarray(cells, dtype=np.int64)}
        for k in ("nodes", "trees"):
            size = [len(p["left" if k == "nodes" else "starts"]) for p in parts]
            out[k] = np.concatenate([[0], np.cumsum(size, dtype=np.int64)]).astype(np.int64)
        for k in (*stk.CellForest.NODE_FIELDS, *stk.CellForest.TREE_FIELDS):
            dt = float if k in ("threshold", "value") else np.int64
            out[k] = np.concatenate([p[k] for p in parts]).astype(dt) if parts else np.zeros(0, dt)
        return out

    def _load_forests(self, f: dict[str, np.ndarray]) -> None:
        """Each cell's forest arrays from `forest_arrays`' layout (views; trees are built by `forest` on first use,
        so a caller that predicts a few cells of a file holds no other cell's trees)."""
        nodes, trees = f["nodes"], f["trees"]
        for j, i in enumerate(np.asarray(f["cells"], dtype=np.int64)):
            one = {k: f[k][nodes[j]:nodes[j + 1]] for k in stk.CellForest.NODE_FIELDS}
            one.update({k: f[k][trees[j]:trees[j + 1]] for k in stk.CellForest.TREE_FIELDS})
            self._stored_forests[int(i)] = one

    def save(self, path, *, extra_meta: dict[str, Any] | None = None) -> None:
        """Write `<path>.safetensors` (arrays, forests) and `<path>.json` (ids, settings)."""
        save_fitted(self, path, extra_meta=extra_meta)

    @classmethod
    def load(cls, path, *, device="cpu") -> FittedCells:
        del device  # arrays load to host memory; prediction moves them where it runs
        from cellsynth.radio import raster

        ids, target, settings, arrays, elbo, n_train, forests = load_fitted(path)
        out = cls(ids, target, FitSettings(**settings), arrays, elbo, n_train)
        out.rasters = raster.load(path)
        if forests:
            out._load_forests(forests)
        return out


def take_cells(fitted: FittedCells, idx: list[int]) -> FittedCells:
    return fitted.take(idx)


def _calibration_keys() -> set[str]:
    """The shard-calibration arrays fit_cells writes under the current module settings."""
    written = {"pos_sigma_m": cal.POSITION_NOISE, "mean_shift": cal.MEAN_SHIFT, "dof_bins": cal.FAR_DOF,
               "tree_w": stk.TREE_STACK, "tree_fade_m": stk.TREE_STACK and stk.TREE_FADE}
    return {k for k in SHARD_CALIBRATION_KEYS + GATED_CALIBRATION_KEYS if written.get(k, True)}


def shard_calibration(fitted: FittedCells) -> dict[str, np.ndarray] | None:
    """The calibration the cells of a shard's model file share (`SHARD_CALIBRATION_KEYS`, one cell's
    value each; for `GATED_CALIBRATION_KEYS` the shard's constant: the value of largest magnitude, 0 when
    no cell took part). None when the file cannot give what the current fit writes (weights of older
    code, other distance or site bins) or its cells disagree (not one shard's fit)."""
    a, n = fitted.arrays, len(fitted.cell_ids)
    keys = _calibration_keys()
    if not n or not keys <= set(a):
        return None
    out: dict[str, np.ndarray] = {}
    for k in sorted(keys):
        v = np.asarray(a[k], dtype=float)
        if k in GATED_CALIBRATION_KEYS:
            out[k] = np.asarray(v[int(np.argmax(np.abs(v)))])
            if not np.all((v == 0.0) | (v == out[k])):
                return None
        else:
            if not all(np.array_equal(v[0], v[i], equal_nan=True) for i in range(1, n)):
                return None
            out[k] = v[0].copy()
    if not (np.array_equal(out["dist_edges_m"], np.asarray(cal.DIST_EDGES_M, dtype=float))
            and np.array_equal(out["site_edges_m"], np.asarray(cal.SITE_EDGES_M, dtype=float))
            and ("tree_fade_m" not in out or float(out["tree_fade_m"]) == float(stk.TREE_FADE_M))):
        return None
    return out


def _batch_of(xy: list[np.ndarray], y: list[np.ndarray], w: list[np.ndarray], h: list[np.ndarray], beta0: np.ndarray,
              device) -> gp.Batch:
    n_max = max(len(v) for v in y)
    mask = gp.pad_rows([np.ones(len(v)) for v in y], n_max) > 0
    hp = gp.pad_rows(h, n_max)
    r = gp.pad_rows(y, n_max) - np.einsum("cnp,cp->cn", hp, beta0)
    t = lambda v: torch.as_tensor(v, dtype=torch.float64, device=device)  # noqa: E731
    return gp.Batch(t(gp.pad_rows(xy, n_max)), t(np.where(mask, r, 0.0)), t(hp), t(gp.pad_rows(w, n_max, 1.0)),
                    torch.as_tensor(mask, device=device))


def _chunks(sizes: np.ndarray, limit: int = BATCH_ELEMENTS) -> list[list[int]]:
    """Cells grouped by size (ascending) so each batch's cells x rows^2 stays under `limit`."""
    order = np.argsort(sizes, kind="stable")
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * int(sizes[i]) ** 2 > limit:
            out.append(cur)
            cur = []
        cur.append(int(i))
    return out + ([cur] if cur else [])


def fit_cells(cells: list[CellData], *, target: Target, settings: FitSettings, seed: int = 0,
              device: torch.device | str = "cpu", calibration: dict[str, np.ndarray] | None = None) -> FittedCells:
    """Fit every cell in `cells` as one batched GP model (cells in size-sorted Cholesky batches;
    every cell's fit is its own, so batching does not change it).

    `calibration` (local cells only; `shard_calibration` of the shard's last fit): the shard's
    calibration is taken as given instead of fitted on these cells' held-out sets, so the refitted
    folds are not run; each cell's own fit (site, prior mean, hyperparameters, kNN k from its
    leave-one-out rows) is the same as without it."""
    if not cells:
        raise ValueError("fit_cells: no cells given")
    if calibration is not None:
        missing = sorted(_calibration_keys() - set(calibration))
        if missing:
            raise ValueError(f"fit_cells: calibration lacks {', '.join(missing)}")
        if not all(c.local for c in cells):
            raise ValueError("fit_cells: a given calibration is a shard's own cells'; fit the pooled fallback apart")
    if settings.kernel not in gp.MATERN_NU:
        raise ValueError(f"fit_cells: kernel must be one of {sorted(gp.MATERN_NU)}, got {settings.kernel!r}")
    bad = [f"cell {c.cell_id}: {p}" for c in cells for p in cell_problems(c, uses_load=settings.uses_load)]
    # two fits under one id: `index_of` would answer the last one, and predictions for the first would vanish
    bad += [f"cell {c}: given {n} times; expected one CellData per cell"
            for c, n in Counter(c.cell_id for c in cells).items() if n > 1]
    if bad:
        raise SchemaError(bad[:5] + ([f"... and {len(bad) - 5} more"] if len(bad) > 5 else []))
    device = torch.device(device)
    # each cell draws from its own stream, so its subsample and folds do not depend on its batch
    rngs = [np.random.default_rng([seed, zlib.crc32(c.cell_id.encode())]) for c in cells]
    n_cells = len(cells)
    use_load = settings.uses_load
    if geo.SLOPE_PRIOR not in ("cell", "shard"):
        raise ValueError(f"geometry.SLOPE_PRIOR must be 'cell' or 'shard', got {geo.SLOPE_PRIOR!r}")
    rows, hyper, origins, azimuths, ant, beta0, heights = [], [], [], [], [], [], []
    site_estimated = []  # per cell: the site came from its rows (no cells table): calibration.LOO_SMALL_SAMPLE's p
    prior_fits = []  # SLOPE_PRIOR "shard": per cell, the (xy, y, rho, weight) its prior mean was fitted on
    # likelihood weight per row: IPW (RSRQ) times the row-weight noise factor (ROW_WEIGHT_POWER)
    lik_w = [(np.ones(len(c.y)) if c.weight is None else np.asarray(c.weight, dtype=float)) * noise_weight(c.row_weight, len(c.y))
             for c in cells]
    for c, rng, lw in zip(cells, rngs, lik_w):
        xy, y = np.asarray(c.xy_m, dtype=float), np.asarray(c.y, dtype=float)
        keep = np.sort(rng.choice(len(y), settings.max_rows, replace=False)) if len(y) > settings.max_rows else np.arange(len(y))
        rows.append(keep)
        hyper.append(np.sort(rng.choice(len(keep), settings.hyper_rows, replace=False)) if len(keep) > settings.hyper_rows
                     else np.arange(len(keep)))
        given = c.origin_xy_m is not None and np.all(np.isfinite(c.origin_xy_m))
        origin = np.asarray(c.origin_xy_m, dtype=float) if given else estimate_site(xy, y)
        site_estimated.append(not given)
        heights.append(site_offset(xy, y, not given))
        rho = np.asarray(c.load_rho, dtype=float) if use_load and c.load_rho is not None else (np.full(len(y), 0.5) if use_load else None)
        prior_w = None if c.weight is None and np.all(lw == 1.0) else lw
        b0, on = prior_mean(xy, y, origin, c.azimuth_deg, rho, prior_w, heights[-1], estimated=not given)
        origins.append(origin)
        azimuths.append(float(c.azimuth_deg) if on else 0.0)
        ant.append(float(on))
        beta0.append(b0)
        if geo.SLOPE_PRIOR == "shard":
            prior_fits.append((xy, y, rho, prior_w))
    origins, beta0 = np.array(origins), np.array(beta0)
    # a cell whose least-squares slope was implausible keeps its flat trend (slope 0: a poor site estimate)
    pooled = [i for i, c in enumerate(cells) if c.local and beta0[i, 1] != 0.0] if prior_fits else []
    if len(pooled) >= geo.SLOPE_POOL_MIN_CELLS:
        slope = float(np.median(beta0[pooled, 1]))
        for i in pooled:
            xy, y, rho, prior_w = prior_fits[i]
            beta0[i] = geo.refit_given_slope(xy, y, origins[i], azimuths[i], bool(ant[i]), rho, prior_w, heights[i], slope)
    # Per cell (capped rows): positions, targets, loads, weights, basis.
    xy_c = [np.asarray(c.xy_m, dtype=float)[k] for c, k in zip(cells, rows)]
    y_c = [np.asarray(c.y, dtype=float)[k] for c, k in zip(cells, rows)]
    rho_c = [(np.asarray(c.load_rho, dtype=float)[k] if c.load_rho is not None else np.full(len(k), 0.5)) for c, k in zip(cells, rows)]
    w_c = [lw[k] for lw, k in zip(lik_w, rows)]
    # the row weights themselves (metric weights of the training-row objectives) and the noise factor alone
    rw_c = [(np.asarray(c.row_weight, dtype=float)[k] if c.row_weight is not None else np.ones(len(k))) for c, k in zip(cells, rows)]
    g_c = [noise_weight(c.row_weight, len(c.y))[k] for c, k in zip(cells, rows)]
    weighted = any(not np.all(rw == rw[0]) for rw in rw_c)  # row weights that differ: weighted objectives
    knn_w = any(not np.all(w == 1.0) for w in w_c)
    h_c = [basis(xy_c[i], origins[i], azimuths[i], bool(ant[i]), rho_c[i] if use_load else None, heights[i]) for i in range(n_cells)]
    nu = gp.MATERN_NU[settings.kernel]
    theta = np.zeros((n_cells, 3))
    log_ml = np.zeros(n_cells)
    # per cell: (leave-one-out rows, block-CV rows), each (3, n): error, latent variance, noise variance
    cv: dict[int, tuple[np.ndarray, ...]] = {}
    far_rows: dict[int, np.ndarray] = {}  # per cell, half-plane extrapolation rows: error, latent, noise, distance, row weight
    knn_k = np.ones(n_cells, dtype=np.int64)
    # stacking.TREE_STACK: a forest per cell beside the kNN (not with load terms, as the kNN; support stacking only)
    tree_on = stk.TREE_STACK and not use_load and stk.BLEND_MODE == "support"
    tree_seeds = np.array([stk.tree_seed(c.cell_id, seed) for c in cells], dtype=np.int64)
    # stacking.TREE_FADE (rule T'): a forest only for cells with >= TREE_MIN_ROWS rows; the others' tree term is 0
    tree_cell = np.array([tree_on and stk.tree_gate(len(c.y)) for c in cells], dtype=bool)
    limit = BATCH_ELEMENTS if device.type == "cuda" else CPU_BATCH_ELEMENTS
    for idx in _chunks(np.array([len(k) for k in hyper]), limit):
        hb = _batch_of([xy_c[i][hyper[i]] - origins[i] for i in idx], [y_c[i][hyper[i]] for i in idx],
                       [w_c[i][hyper[i]] for i in idx], [h_c[i][hyper[i]] for i in idx], beta0[idx], device)
        if settings.fit_path == "pyro":
            from cellsynth.radio.pyro_gp import fit_theta_pyro

            th, ml = fit_theta_pyro(hb, nu=nu, floor_db=settings.floor_db, n_steps=settings.n_steps,
                                    learning_rate=settings.learning_rate)
        else:
            th, ml = gp.fit_theta_grid(hb, nu=nu, floor_db=settings.floor_db)
        theta[idx], log_ml[idx] = th.cpu().numpy(), ml.cpu().numpy()
    if settings.calibrate:
        for idx in _chunks(np.array([len(y) for y in y_c]), limit):
            b = _batch_of([xy_c[i] - origins[i] for i in idx], [y_c[i] for i in idx], [w_c[i] for i in idx],
                          [h_c[i] for i in idx], beta0[idx], device)
            th = torch.as_tensor(theta[idx], dtype=torch.float64, device=device)
            with torch.no_grad():
                chol, alpha = gp.solve(b, th, nu=nu, floor_db=settings.floor_db)
                kinv = torch.cholesky_inverse(chol)
                dist = b.parts(nu)[0]
                # a lone cell (no padding) with its site given: its folds take their distances and
                # long-range correlations from these (foldcv.fold_errors `shared`, one entry per cell of the
                # chunk; the same floats)
                lone_parts = [(dist[0], b.parts(nu)[2][0])] if len(idx) == 1 else [None] * len(idx)
                far = torch.where(b.mask[:, None, :], dist, torch.full_like(dist, float("inf")))
                eye = torch.eye(far.shape[-1], dtype=torch.bool, device=device)
                # leave-one-out: distance to the nearest other row; kNN of the other rows (k by its LOO MAE)
                loo_far = far.masked_fill(eye, float("inf"))
                loo_knn = stk.knn_means(loo_far, b.r, max(stk.K_GRID), b.w if knn_w else None)[0]
                rw_b = torch.as_tensor(gp.pad_rows([rw_c[i] for i in idx], b.r.shape[-1], 0.0), dtype=b.r.dtype, device=device)
                knn_k[idx] = stk.choose_k(loo_knn, b.r, b.mask, rw_b if weighted else None)
                kcol = torch.as_tensor(knn_k[idx] - 1, device=device)[:, None, None]
                take = lambda means: torch.gather(means, 2, kcol.expand(-1, means.shape[1], 1))[..., 0]  # noqa: E731
                # noise variance a prediction carries (no row weight known there): the IPW-scaled
                # noise of a typical row, i.e. without the row-weight factor g
                g_b = torch.as_tensor(gp.pad_rows([g_c[i] for i in idx], b.r.shape[-1], 1.0), dtype=b.r.dtype, device=device)
                noise = gp.unpack(th, settings.floor_db)[2][:, None] / b.w * g_b
                prior = gp.stationary_prior_var(th, floor_db=settings.floor_db)[:, None].expand_as(b.r)
                # one device-to-host copy per array (not per cell): (C, N) each
                results = [tuple(v.cpu().numpy() for v in (*gp.loo(kinv, alpha), loo_far.amin(-1), b.r - take(loo_knn), prior))]
                mask_np, noise_np = b.mask.cpu().numpy(), noise.cpu().numpy()
            for j, i in enumerate(idx):
                m = mask_np[j]
                nv = noise_np[j][m]
                # per set, rows: GP error, latent variance, noise variance, distance to the nearest row used, kNN error,
                # stationary prior variance, row weight, distance to the site (latent = LOO variance minus the row's own noise)
                nv_own = nv / g_c[i]
                cv[i] = tuple(np.stack([err[j][m], np.maximum(var[j][m] - nv_own, 0.0), nv, np.minimum(d[j][m], 1e9), ek[j][m],
                                        pv[j][m], rw_c[i], np.hypot(*(xy_c[i] - origins[i]).T)])
                              for err, var, d, ek, pv in results)
            if calibration is not None:  # the shard's calibration is given: no held-out sets to fit it on
                continue
            given = [None if cells[i].origin_xy_m is None or not np.all(np.isfinite(cells[i].origin_xy_m)) else origins[i]
                     for i in idx]

            def refit_rows(groups: list[np.ndarray], kind: str, tree_rows: dict | None = None) -> list[np.ndarray]:
                """Per cell of idx the calibration rows of a CV that redoes the whole fit (site, prior
                mean, and hyperparameters unless foldcv.cell_theta(kind): then the cell's own theta)
                without each group, in the leave-one-out rows' layout."""
                folds = foldcv.fold_errors(
                    [xy_c[i] for i in idx], [y_c[i] for i in idx], [w_c[i] for i in idx],
                    [rho_c[i] for i in idx] if use_load else None, given,
                    [cells[i].azimuth_deg for i in idx], groups, knn_k[idx], nu=nu, floor_db=settings.floor_db,
                    rngs=[rngs[i] for i in idx], batch_of=_batch_of, device=device, knn_weighted=knn_w,
                    tree_seeds=[int(tree_seeds[i]) if tree_cell[i] else None for i in idx] if tree_on else None,
                    shared=lone_parts, theta=theta[idx] if foldcv.cell_theta(kind) else None)
                out = []
                for i, f in zip(idx, folds):
                    ok = np.isfinite(f).all(0)
                    if tree_rows is not None and tree_cell[i]:
                        tree_rows[i] = np.where(ok, f[7], np.nan)  # every row's forest error, in the rows' order
                    f[2] = f[2] * g_c[i]  # the noise a prediction carries (see the leave-one-out rows)
                    out.append(np.vstack([f[:3, ok], np.minimum(f[3:4, ok], 1e9), f[4:6, ok], rw_c[i][None, ok], f[6:7, ok]]
                                         + ([f[7:8, ok]] if tree_on else [])))
                return out

            tree_rows: dict[int, np.ndarray] = {}  # stacking.TREE_STACK: per cell the random folds' forest error per row
            # spatial blocks: the whole fit redone without each fold
            for mult in cal.CV_BLOCK_MULTIPLES:
                groups = [cal.block_groups(xy_c[i], block_m=mult * settings.cv_block_m, n_folds=cal.BLOCK_FOLDS, rng=rngs[i])
                          for i in idx]
                for i, rows_b in zip(idx, refit_rows(groups, "block")):
                    cv[i] = (*cv[i], rows_b)
            # the random set refitted per fold (instead of / beside the leave-one-out)
            if cal.RANDOM_CV in cal.RANDOM_FOLD_MODES:
                groups = [rngs[i].permutation(np.arange(len(y_c[i])) % cal.RANDOM_FOLDS) for i in idx]
                for i, rows_f in zip(idx, refit_rows(groups, "random", tree_rows if tree_on else None)):
                    # "kfold": replaces the leave-one-out set; "kfold_mean": a third set, for the kNN weight only;
                    # "kfold_split": a third set, for the kNN weight and the epistemic factors
                    cv[i] = (rows_f, *cv[i][1:]) if cal.RANDOM_CV == "kfold" else (*cv[i], rows_f)
            if tree_on:
                # the leave-one-out set's tree error: the random folds' forest error at the row (a forest refitted
                # without the row's fold; an out-of-bag mean of a 10-tree forest averages ~4 trees and overstates
                # the forest's error); a row no fold predicted, or no random folds: the GP's error (tree neutral)
                for i in idx:
                    loo = cv[i][0]
                    if loo.shape[0] == 8:
                        e_tree = tree_rows.get(i, np.full(loo.shape[1], np.nan))
                        cv[i] = (np.vstack([loo, np.where(np.isfinite(e_tree), e_tree, loo[0])[None]]), *cv[i][1:])
            if ff.FAR_MODE == "halfplane":  # extrapolation CV: each half-plane of the rows predicted from the other
                folds = foldcv.fold_errors(
                    [xy_c[i] for i in idx], [y_c[i] for i in idx], [w_c[i] for i in idx],
                    [rho_c[i] for i in idx] if use_load else None, given,
                    [cells[i].azimuth_deg for i in idx], [ff.halfplane_groups(xy_c[i], rngs[i]) for i in idx], knn_k[idx],
                    nu=nu, floor_db=settings.floor_db, rngs=[rngs[i] for i in idx], batch_of=_batch_of, device=device,
                    knn_weighted=knn_w, shared=lone_parts, theta=theta[idx] if foldcv.cell_theta("halfplane") else None)
                for i, f in zip(idx, folds):
                    ok = np.isfinite(f[:4]).all(0)
                    far_rows[i] = np.vstack([f[:2, ok], (f[2] * g_c[i])[None, ok], f[3:4, ok], rw_c[i][None, ok]])
    cv_mae = np.full((n_cells, 2), np.nan)  # per cell: leave-one-out and (first) block-CV MAE of its training rows
    for i, parts in cv.items():
        # a cell whose rows all fall in one block has no block-CV rows: NaN, not a numpy warning
        cv_mae[i, :len(parts[:2])] = [float(np.mean(np.abs(p[0]))) if p.shape[1] else np.nan for p in parts[:2]]
    scale = np.ones((n_cells, 2))  # (epistemic factor at the training rows, aleatoric factor)
    ep_scale = np.ones((n_cells, len(cal.DIST_EDGES_M)))  # epistemic factor per distance bin
    blend_w = np.zeros((n_cells, len(cal.DIST_EDGES_M)))  # kNN weight in the mean per distance bin (w0 when support-aware)
    # support-aware forms (stacking.BLEND_MODE, calibration.EP_MODE): 1 where the kNN weight is
    # w0 (1 - v), and the slope b of the epistemic factor a exp(b v); v = posterior / prior latent variance
    blend_support = np.zeros(n_cells)
    ep_slope = np.zeros(n_cells)
    far_var = np.zeros(n_cells)  # far-field term F^2 (farfield.py), per shard and kind
    far_len = np.full(n_cells, ff.FAR_LENGTH_GRID_M[-1])
    dof = np.full(n_cells, np.inf)  # Student-t degrees of freedom of the predictive (calibration.TAIL_MODE), per shard and kind
    dof_bins = np.full((n_cells, len(cal.DIST_EDGES_M)), np.inf)  # calibration.FAR_DOF: dof per distance bin
    site_scale = np.ones((n_cells, len(cal.SITE_EDGES_M)))  # factor on the whole std per distance-to-site bin
    shift = np.zeros(n_cells)  # constant added to the mean (calibration.MEAN_SHIFT), per shard and kind
    tree_w = np.zeros(n_cells)  # stacking.TREE_STACK: the forest's weight wt, per shard and kind
    pos_sigma = np.zeros(n_cells)  # calibration.POSITION_NOISE: position error sigma [m], per shard and kind
    # calibration.SHIFT_WEIGHTED_ONLY: only the cells whose row weights differ take part in the mean shift
    shift_cell = np.array([not cal.SHIFT_WEIGHTED_ONLY or not np.all(rw == rw[0]) for rw in rw_c], dtype=bool)
    for kind in (True, False) if calibration is None else ():
        idx = [i for i, c in enumerate(cells) if c.local == kind and i in cv]
        if idx:
            n_sets = len(cv[idx[0]])
            sets = [np.concatenate([cv[i][k] for i in idx], axis=1) for k in range(n_sets)]
            if tree_on and stk.TREE_FADE:  # rule T': the forest's error faded by f(d), d = row 3 (to the set's own training rows)
                for st in sets:
                    st[8] = st[0] + stk.tree_fade(st[3]) * (st[8] - st[0])
            # calibration.RANDOM_CV "kfold_mean": the kNN weight from the refitted sets (block CV and the
            # random folds), the intervals on the leave-one-out and block sets, on the errors of that mean;
            # "kfold_split": the same mean, the sets (leave-one-out, blocks, random folds) all kept for the intervals
            split_mean = cal.RANDOM_CV in cal.SPLIT_MEAN_MODES
            drop_last = cal.RANDOM_CV == "kfold_mean"
            mean_sets = sets[1:] if split_mean else sets
            if split_mean:
                mean_v = [1.0 - stk.support(s[1], s[5]) for s in mean_sets]
                mean_rw = [s[6] if weighted else None for s in mean_sets]
                if drop_last:
                    sets = sets[:-1]
            v_sets = [1.0 - stk.support(s[1], s[5]) for s in sets]
            # RSRQ with load terms: no kNN (neighbours at other loads would carry load into the spatial mean)
            rw_sets = [s[6] if weighted else None for s in sets]
            if stk.BLEND_MODE == "support":
                if not split_mean:
                    mean_v, mean_rw = v_sets, rw_sets
                if tree_on:  # (w0, wt) jointly on the same held-out sets; the rows' tree error is row 8
                    w0, wt = stk.blend_weight_tree([(s[0], s[4], s[8], 1.0 - v) + ((rw,) if rw is not None else ())
                                                    for s, v, rw in zip(mean_sets, mean_v, mean_rw)])
                    tree_w[idx] = wt
                    tree_w[idx] *= tree_cell[idx]  # a cell without a forest: weight 0 (its tree term was 0 in the sets too)
                else:
                    wt = 0.0
                    w0 = stk.blend_weight([(s[0], s[4], 1.0 - v) + ((rw,) if rw is not None else ())
                                           for s, v, rw in zip(mean_sets, mean_v, mean_rw)]) if not use_load else 0.0
                errs = [stk.stacked_error(s[0], s[4], s[8] if tree_on else None, 1.0 - v, w0, wt) for s, v in zip(sets, v_sets)]
                mean_errs = [stk.stacked_error(s[0], s[4], s[8] if tree_on else None, 1.0 - v, w0, wt)
                             for s, v in zip(mean_sets, mean_v)]
                w = np.full(len(cal.DIST_EDGES_M), w0)
                blend_support[idx] = 1.0
            else:
                if not split_mean:
                    mean_rw = rw_sets
                w = stk.blend_weights([(s[0], s[4], s[3]) for s in mean_sets]) if not use_load else np.zeros(len(cal.DIST_EDGES_M))
                errs = [(1.0 - w[cal.distance_bin(s[3])]) * s[0] + w[cal.distance_bin(s[3])] * s[4] for s in sets]
                mean_errs = [(1.0 - w[cal.distance_bin(s[3])]) * s[0] + w[cal.distance_bin(s[3])] * s[4] for s in mean_sets]
            blend_w[idx] = w
            if cal.MEAN_SHIFT:  # one constant on the mean, from the same held-out sets as the kNN weight
                on = shift_cell[idx]
                masks = [np.concatenate([np.full(cv[i][k].shape[1], o) for i, o in zip(idx, on)]) for k in range(n_sets)]
                mean_masks = masks[1:] if split_mean else masks
                set_masks = masks[:-1] if drop_last else masks
                c = cal.mean_shift([(e[m],) + ((rw[m],) if rw is not None else ()) for e, rw, m in zip(mean_errs, mean_rw, mean_masks)])
                shift[np.asarray(idx)[on]] = c
                errs = [e - c * m for e, m in zip(errs, set_masks)]  # the intervals are calibrated on the shifted mean's errors
            if cal.LOO_SMALL_SAMPLE and cal.RANDOM_CV != "kfold":  # rule AA: sets[0] is the leave-one-out set
                errs[0] = errs[0] * np.concatenate([np.full(cv[i][0].shape[1], cal.loo_inflation(len(y_c[i]), site_estimated[i]))
                                                    for i in idx])
            far = [far_rows[i] for i in idx if i in far_rows]
            if far:
                fr = np.concatenate(far, axis=1)
                far_var[idx], far_len[idx], _ = ff.fit(fr[0], fr[1], fr[2], fr[3], fr[4] if weighted else None, seed=seed)
            # the far-field term joins the latent variance the interval factors scale
            sets = [np.vstack([s[:1], s[1:2] + ff.term(s[3], float(far_var[idx[0]]), float(far_len[idx[0]])), s[2:]])
                    for s in sets]
            # intervals calibrated on the errors of the final (stacked) mean
            if cal.EP_MODE == "support":
                f0, slope, f_al = cal.interval_scales_support([(e, s[1], s[2], v) + ((rw,) if rw is not None else ())
                                                               for e, s, v, rw in zip(errs, sets, v_sets, rw_sets)], seed=seed)
                f_ep = np.full(len(cal.DIST_EDGES_M), f0)
                ep_slope[idx] = slope
            else:
                held = [(e, s[1], s[2], s[3]) + ((rw,) if rw is not None else ()) for e, s, rw in zip(errs, sets, rw_sets)]
                # "kfold_split" (sets: leave-one-out, blocks, random folds): the aleatoric factor and dof from the
                # leave-one-out and block sets (the default's fit), the epistemic bins refitted on the refitted sets
                # (blocks, random folds) with that aleatoric factor fixed
                # "kfold_split_far": only the bins beyond the one holding the median leave-one-out distance refitted
                # "kfold_split_first": only bin 0 (a report at an existing position) kept (rule R, session 22)
                # "kfold_split_first_max": then per bin the larger of that factor and the default's (rule S)
                split_ivl = cal.RANDOM_CV in cal.SPLIT_INTERVAL_MODES and len(held) == 3
                f_ep, f_al, dof[idx] = cal.interval_scales_tail(held[:2] if split_ivl else held, seed=seed)
                if split_ivl and sum(len(h[0]) for h in held[1:]) >= cal.MIN_ROWS:
                    near = None
                    if cal.RANDOM_CV == "kfold_split_far" and len(held[0][3]):
                        near = f_ep[: int(cal.distance_bin(np.median(held[0][3]))) + 1]
                    elif cal.RANDOM_CV in ("kfold_split_first", "kfold_split_first_max"):
                        near = f_ep[:1]
                    refit_ep = cal.interval_scales_by_distance(held[1:], seed=seed, dof=float(dof[idx[0]]), aleatoric=f_al,
                                                               near=near)[0]
                    f_ep = np.maximum(refit_ep, f_ep) if cal.RANDOM_CV == "kfold_split_first_max" else refit_ep
                dof_bins[idx] = dof[idx[0]]
                if cal.FAR_DOF and len(held) >= 2 and len(held[0][3]):  # rule M: the far bins' tail from the block set
                    m = int(cal.distance_bin(np.median(held[0][3])))
                    f_ep, d_far = cal.far_tail(held[1], f_ep, f_al, m, seed=seed)
                    if d_far is not None:
                        dof_bins[idx, m + 1:] = d_far
                site_scale[idx] = cal.site_factors([(e, s[1], s[2], s[3], s[7]) + ((rw,) if rw is not None else ())
                                                    for e, s, rw in zip(errs, sets, rw_sets)], f_ep, f_al, float(dof[idx[0]]))
                if cal.POSITION_NOISE:  # rule X: the held-out rows' squared mean gradient from their site distance (row 7)
                    owner = [np.concatenate([np.full(cv[i][k].shape[1], i) for i in idx]) for k in range(len(sets))]
                    g2 = [cal.position_grad2(s[7], beta0[o, 1], np.asarray(heights, dtype=float)[o]) for s, o in zip(sets, owner)]
                    pos_sigma[idx] = cal.position_sigma([(e, s[1], s[2], s[3], g) + ((rw,) if rw is not None else ())
                                                         for e, s, g, rw in zip(errs, sets, g2, rw_sets)],
                                                        f_ep, f_al, float(dof[idx[0]]))
            ep_scale[idx] = f_ep
            scale[idx] = (f_ep[0], f_al)
    n_max = max(len(y) for y in y_c)
    arrays = {
        "origin_xy_m": origins, "site_h_m": np.array(heights), "azimuth_deg": np.array(azimuths), "ant_on": np.array(ant), "beta0": beta0,
        "theta": theta, "scale": scale, "ep_scale": ep_scale, "blend_w": blend_w, "blend_support": blend_support,
        "ep_slope": ep_slope, "far_var": far_var, "far_len": far_len, "dof": dof, "site_scale": site_scale,
        **({"pos_sigma_m": pos_sigma} if cal.POSITION_NOISE else {}),
        "site_edges_m": np.tile(np.asarray(cal.SITE_EDGES_M, dtype=float), (n_cells, 1)),
        "dist_edges_m": np.tile(np.asarray(cal.DIST_EDGES_M, dtype=float), (n_cells, 1)),
        "knn_k": knn_k.astype(float), "cv_mae_db": cv_mae, "train_xy_m": gp.pad_rows(xy_c, n_max), "train_y": gp.pad_rows(y_c, n_max),
        "train_rho": gp.pad_rows(rho_c, n_max, 0.5), "train_w": gp.pad_rows(w_c, n_max, 1.0),
        "mask": gp.pad_rows([np.ones(len(y)) for y in y_c], n_max) > 0,
    }
    if cal.MEAN_SHIFT:
        arrays["mean_shift"] = shift
    if cal.FAR_DOF:
        arrays["dof_bins"] = dof_bins
    if stk.TREE_STACK:
        arrays["tree_w"], arrays["tree_seed"] = tree_w, tree_seeds.astype(float)
        if stk.TREE_FADE:  # rule T': the fade's scale per cell (absent: T's unfaded forest)
            arrays["tree_fade_m"] = np.full(n_cells, float(stk.TREE_FADE_M))
    if calibration is not None:  # the shard's: every cell carries its values; the gated ones where the cell takes part
        for k in _calibration_keys():
            arrays[k] = np.broadcast_to(np.asarray(calibration[k], dtype=float), np.shape(arrays[k])).copy()
        if cal.MEAN_SHIFT:
            arrays["mean_shift"] *= shift_cell
        if stk.TREE_STACK:  # cells with a forest
            arrays["tree_w"] *= tree_cell
    # no forest is kept from the fit: `FittedCells.forest` fits a cell's from its stored rows and seed when a
    # prediction first needs it (the same trees), so a shard whose forest weight is 0 never pays for one
    return FittedCells([c.cell_id for c in cells], target, settings, arrays, log_ml,
                       np.array([len(c.y) for c in cells], dtype=np.int64))


def __getattr__(name: str):
    # the estimator and the lake-side collection live in their own modules; old imports keep working
    if name == "RadioModel":
        from cellsynth.radio.estimator import RadioModel

        return RadioModel
    if name in ("RadioModels", "POOLED_CELL_ID"):
        from cellsynth.radio import collection

        return getattr(collection, name)
    raise AttributeError(name)
