"""Probabilistic-regression metrics shared by the radio stage, its benchmarks and evaluation
(GUMBLE section 5.4.1). Pure numpy/scipy on arrays; no tables, no sessions."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

DEFAULT_LEVELS: tuple[float, ...] = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))


def _arrays(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=float).ravel() for a in arrays]
    n = len(out[0])
    for a in out[1:]:
        if len(a) != n:
            raise ValueError(f"metrics: arrays of different lengths ({n} vs {len(a)})")
    return out


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """GUMBLE eq. 23: mean absolute error."""
    y_true, y_pred = _arrays(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """GUMBLE eq. 22: root mean squared error."""
    y_true, y_pred = _arrays(y_true, y_pred)
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def pit(y_true: np.ndarray, mean: np.ndarray, std: np.ndarray, dof: np.ndarray | None = None) -> np.ndarray:
    """GUMBLE eq. 25: F_i(y_i), the predictive CDF at each observation: Gaussian, or with `dof`
    (per row; inf = Gaussian) the Student-t scaled to unit std of the radio model's calibrated
    predictive (`cellsynth.radio.calibration.TAIL_MODE`)."""
    y_true, mean, std = _arrays(y_true, mean, std)
    z = (y_true - mean) / np.maximum(std, 1e-12)
    if dof is None:
        return norm.cdf(z)
    from cellsynth.radio.calibration import std_t_cdf

    dof = np.broadcast_to(np.asarray(dof, dtype=float).ravel(), z.shape)
    out = np.empty(len(z))
    for d in np.unique(dof):
        k = dof == d
        out[k] = std_t_cdf(z[k], float(d))
    return out


def calibration_curve(y_true: np.ndarray, mean: np.ndarray, std: np.ndarray, *,
                      levels: tuple[float, ...] | np.ndarray = DEFAULT_LEVELS,
                      dof: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GUMBLE eq. 24: expected quantile levels P_j and observed frequencies P~_j = #{F_i <= P_j} / n."""
    f = pit(y_true, mean, std, dof)
    p = np.asarray(levels, dtype=float)
    observed = (f[None, :] <= p[:, None]).mean(axis=1)
    return p, observed


def calibration_error(y_true: np.ndarray, mean: np.ndarray, std: np.ndarray, *,
                      levels: tuple[float, ...] | np.ndarray = DEFAULT_LEVELS, dof: np.ndarray | None = None) -> float:
    """GUMBLE eq. 26: CE = sum_j w_j |P~_j - P_j|, w_j proportional to #{F_i <= P_j} (sum 1)."""
    p, observed = calibration_curve(y_true, mean, std, levels=levels, dof=dof)
    w = observed / observed.sum() if observed.sum() > 0 else np.full_like(p, 1.0 / len(p))
    return float(np.sum(w * np.abs(observed - p)))


def sharpness(std: np.ndarray) -> tuple[float, float]:
    """GUMBLE eqs. 28-29: mean and standard deviation of the predictive std over the test set."""
    (s,) = _arrays(std)
    return float(s.mean()), float(s.std())


def mean_epistemic(epistemic_std: np.ndarray, *, as_variance: bool = False) -> float:
    """GUMBLE eq. 30 over an area's positions. Eq. 30 averages the epistemic *variance*
    (as_variance=True); the default returns the mean epistemic std in dB, the unit the paper's
    figures (0.87 vs 21.9 dB) are read in."""
    (e,) = _arrays(epistemic_std)
    return float(np.mean(e**2)) if as_variance else float(np.mean(e))
