"""Baselines for the radio tables (evaluate stage and `bench/radio_real.py`), fitted per cell on
the same rows as the Bayesian model, with comparable care (issue 20 item 4, issue 14):

- kNN on position, k chosen by K-fold CV inside the cell's training rows (lowest CV MAE); its
  predictive std is the CV RMSE of that k (homoscedastic: the neighbours' own spread is 0 at
  k = 1 and says nothing about the error of their mean).
- Random forest, 200 trees; std = sqrt(spread across trees^2 + out-of-bag residual variance).
- Exact GP, constant x RBF + white noise, hyperparameters by marginal likelihood, on up to
  `gp_max_train` rows (the same per-cell cap as ours where the O(n^3) fit allows). Its
  epistemic std is the latent function's posterior std (the white-noise part removed).

Row weights (rows that aggregate several raw samples, e.g. a grid square's count), when the
caller gives them and `fit_weighted` is on: kNN takes weighted neighbour means and picks k by
weighted CV MAE; the forest takes them as `sample_weight`; the GP's white noise of row i is
n^2 (w_ref / w_i)^gamma (gamma = `gp_weight_power`, the same form and power as our model's,
w_ref the geometric mean of the cell's weights), fitted by marginal likelihood as before
(sklearn's per-row `alpha` would fix the noise instead of fitting it, so the row factor rides in
a third input column that only the white-noise kernel reads).

Every estimator follows the house API: keyword-only hyperparameters in `__init__`,
`fit(xy_m, y, *, weight=None) -> self`, `predict(xy_m) -> (mean, std)` in dB.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cellsynth.radio.transforms import subsample_index

STD_FLOOR_DB = 0.5  # 1 dB report quantisation alone is 0.29 dB; no baseline claims less than this


@dataclass(frozen=True)
class BaselineSettings:
    """What every baseline is allowed; written next to each table that uses them."""

    knn_k_grid: tuple[int, ...] = (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64)
    knn_cv_folds: int = 3
    rf_n_estimators: int = 200
    rf_min_samples_leaf: int = 3
    gp_max_train: int = 1500
    gp_restarts: int = 0
    fit_weighted: bool = True  # row weights (when the data has them) go into every baseline's fit
    gp_weight_power: float = 0.5  # gamma of the GP's per-row noise (w_ref / w)^gamma: our model.ROW_WEIGHT_POWER
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def describe(self) -> dict[str, str]:
        """One plain line per baseline, for reports and README tables."""
        return {
            "knn": f"k by {self.knn_cv_folds}-fold CV inside training (lowest MAE) from {list(self.knn_k_grid)}; "
                   "std = CV RMSE of that k",
            "rf": f"{self.rf_n_estimators} trees, min_samples_leaf {self.rf_min_samples_leaf}; "
                  "std = tree spread + out-of-bag residual",
            "gp": f"constant x RBF + white noise, marginal likelihood ({self.gp_restarts} restarts), "
                  f"up to {self.gp_max_train} training rows per cell",
            **({"row_weights": "where rows carry weights: kNN weighted means and weighted CV; RF sample_weight; "
                               f"GP white noise x (w_ref / w)^{self.gp_weight_power:g} per row"} if self.fit_weighted else {}),
        }

    def hash(self, name: str | None = None) -> str:
        """Short hash of the settings that change `name`'s predictions (all of them when None)."""
        d = self.as_dict()
        if name is not None:
            d = {k: v for k, v in d.items() if k.startswith(name) or k in ("seed", "fit_weighted")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _xy(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=float).reshape(-1, 2)


class KNNBaseline:
    """k nearest neighbours on position (weighted mean when rows carry weights)."""

    def __init__(self, *, k_grid: tuple[int, ...] = BaselineSettings.knn_k_grid, cv_folds: int = 3, seed: int = 0):
        self.k_grid = k_grid
        self.cv_folds = cv_folds
        self.seed = seed

    @staticmethod
    def _predict(xy_tr, y, w, xy_te, ks: list[int]) -> np.ndarray:
        """(len(ks), n_test) predictions for each k from one neighbour query."""
        from scipy.spatial import cKDTree

        kmax = min(max(ks), len(y))
        _, idx = cKDTree(xy_tr).query(xy_te, k=kmax)
        idx = idx.reshape(len(xy_te), kmax)
        vals, ws = y[idx], w[idx]
        cum_wy, cum_w = np.cumsum(vals * ws, axis=1), np.cumsum(ws, axis=1)
        return np.stack([cum_wy[:, min(k, kmax) - 1] / np.maximum(cum_w[:, min(k, kmax) - 1], 1e-12) for k in ks])

    def fit(self, xy_m: np.ndarray, y: np.ndarray, *, weight: np.ndarray | None = None) -> KNNBaseline:
        xy, y = _xy(xy_m), np.asarray(y, dtype=float)
        w = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=float)
        ks = [k for k in self.k_grid if k <= max(1, len(y) * (self.cv_folds - 1) // self.cv_folds)] or [1]
        folds = np.random.default_rng(self.seed).permutation(len(y)) % self.cv_folds
        abs_err = np.zeros(len(ks))
        sq_err = np.zeros(len(ks))
        for f in range(self.cv_folds):
            te = folds == f
            if te.all() or not te.any():
                continue
            pred = self._predict(xy[~te], y[~te], w[~te], xy[te], ks)
            abs_err += (np.abs(pred - y[te]) * w[te]).sum(axis=1)
            sq_err += ((pred - y[te]) ** 2 * w[te]).sum(axis=1)
        best = int(np.argmin(abs_err))
        self.k_ = ks[best]
        self.cv_mae_db_ = float(abs_err[best] / w.sum())
        self.cv_rmse_db_ = float(np.sqrt(sq_err[best] / w.sum()))
        self.xy_, self.y_, self.w_ = xy, y, w
        return self

    def predict(self, xy_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = self._predict(self.xy_, self.y_, self.w_, _xy(xy_m), [self.k_])[0]
        return mean, np.full(len(mean), max(self.cv_rmse_db_, STD_FLOOR_DB))


class RFBaseline:
    """Random forest on position."""

    def __init__(self, *, n_estimators: int = 200, min_samples_leaf: int = 3, seed: int = 0):
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.seed = seed

    def fit(self, xy_m: np.ndarray, y: np.ndarray, *, weight: np.ndarray | None = None) -> RFBaseline:
        from sklearn.ensemble import RandomForestRegressor

        xy, y = _xy(xy_m), np.asarray(y, dtype=float)
        if weight is not None and np.all(np.asarray(weight) == np.asarray(weight).flat[0]):
            weight = None  # equal weights are no weights (sklearn draws different bootstrap samples when given any)
        self.rf_ = RandomForestRegressor(n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf,
                                         oob_score=len(y) >= 20, random_state=self.seed, n_jobs=1)
        self.rf_.fit(xy, y, sample_weight=weight)
        oob = getattr(self.rf_, "oob_prediction_", None)
        ok = np.isfinite(oob) if oob is not None else np.zeros(len(y), bool)
        if oob is not None:
            # rows in every tree's bootstrap have no out-of-bag prediction; sklearn reports 0 for
            # them, not NaN (with sample_weight heavy rows are drawn into nearly every bag)
            never_oob = np.ones(len(y), bool)
            for drawn in self.rf_.estimators_samples_:
                in_bag = np.zeros(len(y), bool)
                in_bag[drawn] = True
                never_oob &= in_bag
            ok &= ~never_oob
        w = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=float)
        self.oob_var_ = float(np.average((oob[ok] - y[ok]) ** 2, weights=w[ok])) if ok.any() else 0.0
        return self

    def predict(self, xy_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xy = _xy(xy_m)
        per_tree = np.stack([t.predict(xy) for t in self.rf_.estimators_])
        std = np.sqrt(per_tree.var(axis=0) + self.oob_var_)
        return per_tree.mean(axis=0), np.maximum(std, STD_FLOOR_DB)


def _gp_kernels():
    """(RBF on the first two input columns, white noise times the third column) for sklearn."""
    from sklearn.gaussian_process.kernels import RBF, WhiteKernel

    class PlaneRBF(RBF):
        """RBF on columns 0-1 only (column 2 is the row's noise factor)."""

        def __call__(self, X, Y=None, eval_gradient=False):
            return super().__call__(np.asarray(X)[:, :2], None if Y is None else np.asarray(Y)[:, :2], eval_gradient)

        def diag(self, X):
            return super().diag(np.asarray(X)[:, :2])

    class RowWhite(WhiteKernel):
        """White noise whose variance on row i is noise_level * X[i, 2]."""

        def __call__(self, X, Y=None, eval_gradient=False):
            X = np.asarray(X)
            if Y is not None and eval_gradient:
                raise ValueError("Gradient can only be evaluated when Y is None.")
            if Y is None:
                K = self.noise_level * np.diag(X[:, 2])
                if eval_gradient:
                    grad = (self.noise_level * np.diag(X[:, 2]))[:, :, None] if not self.hyperparameter_noise_level.fixed \
                        else np.empty((len(X), len(X), 0))
                    return K, grad
                return K
            return np.zeros((len(X), len(np.asarray(Y))))

        def diag(self, X):
            return self.noise_level * np.asarray(X)[:, 2]

    return PlaneRBF, RowWhite


class GPBaseline:
    """Exact GP (constant x RBF + white noise, normalised target) on at most `max_train` rows.

    With `weight` (row weights), the white noise of row i is n^2 (w_ref / w_i)^weight_power
    (module docstring); predictions carry the noise of a row at w_ref, as ours do."""

    def __init__(self, *, max_train: int = 1500, restarts: int = 0, weight_power: float = 0.5, seed: int = 0):
        self.max_train = max_train
        self.restarts = restarts
        self.weight_power = weight_power
        self.seed = seed

    def fit(self, xy_m: np.ndarray, y: np.ndarray, *, weight: np.ndarray | None = None) -> GPBaseline:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        idx = subsample_index(len(y), self.max_train, seed=self.seed)
        x, yy = _xy(xy_m)[idx], np.asarray(y, dtype=float)[idx]
        self.centre_ = x.mean(axis=0)
        w = None if weight is None else np.asarray(weight, dtype=float)[idx]
        self.hetero_ = bool(w is not None and self.weight_power != 0.0 and not np.all(w == w[0]))
        if self.hetero_:
            plane_rbf, row_white = _gp_kernels()
            kernel = ConstantKernel(1.0, (1e-3, 1e3)) * plane_rbf(200.0, (10.0, 1e5)) + row_white(0.3, (1e-4, 10.0))
            g = (np.exp(np.mean(np.log(w))) / w) ** self.weight_power
            x_in = np.column_stack([x - self.centre_, g])
        else:
            kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(200.0, (10.0, 1e5)) + WhiteKernel(0.3, (1e-4, 10.0))
            x_in = x - self.centre_
        self.gp_ = GaussianProcessRegressor(kernel=kernel, normalize_y=True, random_state=self.seed,
                                            n_restarts_optimizer=self.restarts)
        with warnings.catch_warnings():
            # Tiny or flat cells put a hyperparameter at its bound; the fit is still the ML one.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.gp_.fit(x_in, yy)
        self.n_train_ = len(yy)
        # white-noise variance in dB^2 (normalize_y scales the kernel by the target's variance)
        self.noise_var_ = float(self.gp_.kernel_.k2.noise_level * self.gp_._y_train_std**2)
        return self

    def predict(self, xy_m: np.ndarray, *, return_epistemic: bool = False):
        x = _xy(xy_m) - self.centre_
        if getattr(self, "hetero_", False):
            x = np.column_stack([x, np.ones(len(x))])  # a row at the reference weight
        mean, std = self.gp_.predict(x, return_std=True)
        total = np.maximum(std, STD_FLOOR_DB)
        if not return_epistemic:
            return mean, total
        return mean, total, np.sqrt(np.maximum(std**2 - self.noise_var_, 0.0))

    def epistemic_std(self, xy_m: np.ndarray) -> np.ndarray:
        return self.predict(xy_m, return_epistemic=True)[2]

    @property
    def hyperparameters_(self) -> dict[str, float]:
        k = self.gp_.kernel_
        return {"length_m": float(k.k1.k2.length_scale), "noise_std_db": float(np.sqrt(self.noise_var_))}


def make_baseline(name: str, settings: BaselineSettings | None = None):
    """A fresh, unfitted baseline `name` ("knn", "rf", "gp") with `settings`."""
    s = settings or BaselineSettings()
    if name == "knn":
        return KNNBaseline(k_grid=s.knn_k_grid, cv_folds=s.knn_cv_folds, seed=s.seed)
    if name == "rf":
        return RFBaseline(n_estimators=s.rf_n_estimators, min_samples_leaf=s.rf_min_samples_leaf, seed=s.seed)
    if name == "gp":
        return GPBaseline(max_train=s.gp_max_train, restarts=s.gp_restarts, weight_power=s.gp_weight_power, seed=s.seed)
    raise ValueError(f"baseline: unknown name {name!r} (expected knn, rf, gp)")


def fit_predict(name: str, xy_train_m: np.ndarray, y_train: np.ndarray, xy_test_m: np.ndarray, *,
                settings: BaselineSettings | None = None, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit baseline `name` on one cell's training rows and return (mean, std) at `xy_test_m`."""
    return make_baseline(name, settings).fit(xy_train_m, y_train, weight=weight).predict(xy_test_m)


BASELINE_NAMES = ("knn", "rf", "gp")


# Function forms (tests and older callers): the same estimators with their defaults.
def knn_fit_predict(xy_train_m: np.ndarray, y_train: np.ndarray, xy_test_m: np.ndarray, *,
                    n_neighbors: int | None = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """kNN with a fixed k (10, the former default, which older tests were written against);
    `n_neighbors=None` chooses k by CV inside the training rows as the evaluation tables do."""
    grid = BaselineSettings.knn_k_grid if n_neighbors is None else (int(n_neighbors),)
    return KNNBaseline(k_grid=grid, seed=seed).fit(xy_train_m, y_train).predict(xy_test_m)


def rf_fit_predict(xy_train_m: np.ndarray, y_train: np.ndarray, xy_test_m: np.ndarray, *,
                   n_estimators: int = 200, min_samples_leaf: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return RFBaseline(n_estimators=n_estimators, min_samples_leaf=min_samples_leaf, seed=seed).fit(
        xy_train_m, y_train).predict(xy_test_m)


def gp_fit_predict(xy_train_m: np.ndarray, y_train: np.ndarray, xy_test_m: np.ndarray, *,
                   max_train: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return GPBaseline(max_train=max_train, seed=seed).fit(xy_train_m, y_train).predict(xy_test_m)
