"""Baselines for the evaluation table, fitted per cell on the same split as the Bayesian model.

Each `*_fit_predict(xy_train_m, y_train, xy_test_m, *, ...) -> (mean, std)` returns a predictive
mean and a predictive std (dB) so calibration (GUMBLE eq. 26) can be scored for all of them:
kNN: std of the k neighbours' values; random forest: spread across trees plus the out-of-bag
residual; GP: the exact GP posterior (RBF + white noise, hyperparameters by marginal
likelihood) on a subsample where the cell has too many rows for an O(n^3) fit.
"""

from __future__ import annotations

import numpy as np

from cellsynth.radio.transforms import subsample_index

STD_FLOOR_DB = 0.5


def knn_fit_predict(xy_train_m: np.ndarray, y_train: np.ndarray, xy_test_m: np.ndarray, *,
                    n_neighbors: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours on position (uniform weights)."""
    from sklearn.neighbors import NearestNeighbors

    k = int(min(n_neighbors, len(y_train)))
    nn = NearestNeighbors(n_neighbors=k).fit(xy_train_m)
    _, idx = nn.kneighbors(xy_test_m)
    vals = np.asarray(y_train, dtype=float)[idx]
    return vals.mean(axis=1), np.maximum(vals.std(axis=1), STD_FLOOR_DB)


def rf_fit_predict(xy_train_m: np.ndarray, y_train: np.ndarray, xy_test_m: np.ndarray, *,
                   n_estimators: int = 100, min_samples_leaf: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random forest on position; std = sqrt(tree spread^2 + out-of-bag residual variance)."""
    from sklearn.ensemble import RandomForestRegressor

    rf = RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=min_samples_leaf, oob_score=len(y_train) >= 20,
                               random_state=seed, n_jobs=1).fit(xy_train_m, y_train)
    per_tree = np.stack([t.predict(xy_test_m) for t in rf.estimators_])
    oob_var = float(np.mean((rf.oob_prediction_ - y_train) ** 2)) if hasattr(rf, "oob_prediction_") else 0.0
    std = np.sqrt(per_tree.var(axis=0) + oob_var)
    return per_tree.mean(axis=0), np.maximum(std, STD_FLOOR_DB)


def gp_fit_predict(xy_train_m: np.ndarray, y_train: np.ndarray, xy_test_m: np.ndarray, *,
                   max_train: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact GP (constant mean + RBF + white noise) on at most `max_train` rows."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    idx = subsample_index(len(y_train), max_train, seed=seed)
    x, y = np.asarray(xy_train_m, dtype=float)[idx], np.asarray(y_train, dtype=float)[idx]
    centre = x.mean(axis=0)
    kernel = ConstantKernel(25.0, (1e-2, 1e4)) * RBF(200.0, (10.0, 1e5)) + WhiteKernel(9.0, (1e-2, 1e3))
    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, random_state=seed, n_restarts_optimizer=0)
    gp.fit(x - centre, y)
    mean, std = gp.predict(np.asarray(xy_test_m, dtype=float) - centre, return_std=True)
    return mean, np.maximum(std, STD_FLOOR_DB)


BASELINES = {"knn": knn_fit_predict, "rf": rf_fit_predict, "gp": gp_fit_predict}
