"""Fidelity metrics for synthetic cell-weeks and the baselines they are scored against.

Pure numpy. Shapes: `real` is (n_cells, n_weeks, 168), (n_cells, 168) or a list of per-cell
(n_weeks, 168) arrays; `synthetic` is (n_cells, n_samples, 168). Every metric is averaged over cells; lower is better.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

HOURS_PER_WEEK = 168


def _as_3d(arr: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    """Per-cell (n_weeks, T) arrays; a list allows a different number of weeks per cell."""
    if isinstance(arr, list):
        return [np.atleast_2d(np.asarray(a, dtype=float)) for a in arr]
    a = np.asarray(arr, dtype=float)
    return list(a[:, None, :] if a.ndim == 2 else a)


def jsd(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two non-negative weight vectors."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def _kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def value_jsd(real: np.ndarray, synthetic: np.ndarray, *, n_bins: int = 20) -> float:
    """JSD of the hourly value distributions, per cell on bins spanning both, averaged."""
    r, s = _as_3d(real), _as_3d(synthetic)
    out = []
    for rc, sc in zip(r, s):
        lo = min(rc.min(), sc.min())
        hi = max(rc.max(), sc.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)
        hr, _ = np.histogram(rc.ravel(), bins=edges)
        hs, _ = np.histogram(sc.ravel(), bins=edges)
        out.append(jsd(hr, hs))
    return float(np.mean(out))


def crps_ensemble(observed: np.ndarray, ensemble: np.ndarray) -> float:
    """CRPS of an ensemble forecast, E|X - y| - E|X - X'| / 2, averaged over cells, weeks and hours.

    observed: (n_cells, n_weeks, T) or (n_cells, T); ensemble: (n_cells, n_members, T).
    """
    y, ens = _as_3d(observed), _as_3d(ensemble)
    scores = []
    for yc, ec in zip(y, ens):
        term1 = np.abs(ec[None, :, :] - yc[:, None, :]).mean(axis=1)  # (n_weeks, T)
        sorted_e = np.sort(ec, axis=0)
        m = ec.shape[0]
        # E|X - X'| over all ordered member pairs, via sorted members: 2/m^2 sum_i (2i - m - 1) x_(i).
        weights = (2 * np.arange(1, m + 1) - m - 1)[:, None]
        spread = 2.0 * (weights * sorted_e).sum(axis=0) / m**2
        scores.append((term1 - 0.5 * spread[None, :]).mean())
    return float(np.mean(scores))


def profile_errors(real: np.ndarray, synthetic: np.ndarray) -> tuple[float, float]:
    """(MAE, RMSE) between each cell's real mean weekly profile and its synthetic mean profile."""
    err = np.array([r.mean(axis=0) - s.mean(axis=0) for r, s in zip(_as_3d(real), _as_3d(synthetic))])
    return float(np.mean(np.abs(err))), float(np.mean(np.sqrt(np.mean(err**2, axis=1))))


def autocorrelation(series: np.ndarray, lag: int) -> float:
    """Sample autocorrelation of a 1-D series at `lag` (NaN when the series is too short)."""
    x = np.asarray(series, dtype=float)
    if len(x) <= lag:
        return float("nan")
    x = x - x.mean()
    denom = float(np.sum(x * x))
    if denom == 0.0:
        return float("nan")
    return float(np.sum(x[:-lag] * x[lag:]) / denom) if lag else 1.0


def autocorrelation_error(real: np.ndarray, synthetic: np.ndarray, *, lag: int) -> float:
    """|ACF_real(lag) - ACF_synth(lag)| averaged over cells; weeks (real) and samples (synthetic)
    are concatenated in order, so lag 168 compares week-to-week repeatability. NaN when a
    cell's real history is not longer than `lag`."""
    out = []
    for rc, sc in zip(_as_3d(real), _as_3d(synthetic)):
        out.append(abs(autocorrelation(rc.ravel(), lag) - autocorrelation(sc.ravel(), lag)))
    arr = np.asarray(out)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def peak_hour(series: np.ndarray) -> int:
    """Hour of day (0-23) of the maximum of the mean daily profile of (..., 168) series."""
    daily = np.asarray(series, dtype=float).reshape(-1, 7, 24).mean(axis=(0, 1))
    return int(np.argmax(daily))


def peak_hour_error(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Circular hour-of-day distance (0-12 h) between real and synthetic daily peaks, averaged."""
    out = []
    for rc, sc in zip(_as_3d(real), _as_3d(synthetic)):
        d = abs(peak_hour(rc) - peak_hour(sc))
        out.append(min(d, 24 - d))
    return float(np.mean(out))


def score(real: np.ndarray, synthetic: np.ndarray) -> dict[str, float]:
    """Every fidelity metric for one model on the same held-out cells."""
    mae, rmse = profile_errors(real, synthetic)
    return {
        "jsd": value_jsd(real, synthetic),
        "crps": crps_ensemble(real, synthetic),
        "profile_mae": mae,
        "profile_rmse": rmse,
        "acf24_error": autocorrelation_error(real, synthetic, lag=24),
        "acf168_error": autocorrelation_error(real, synthetic, lag=168),
        "peak_hour_error_h": peak_hour_error(real, synthetic),
    }


# ----------------------------------------------------------------------------- baselines
def hour_of_week_mean_baseline(train_series: np.ndarray, n_cells: int, n_samples: int) -> np.ndarray:
    """The per-hour-of-week mean of the training cell-weeks, copied for every cell and sample."""
    profile = np.asarray(train_series, dtype=float).reshape(-1, HOURS_PER_WEEK).mean(axis=0)
    return np.broadcast_to(profile, (n_cells, n_samples, HOURS_PER_WEEK)).copy()


def nearest_context_baseline(
    train_context: np.ndarray,
    train_series: np.ndarray,
    test_context: np.ndarray,
    n_samples: int,
    *,
    train_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Copy the training cell with the closest standardised context (its weeks cycled as samples).

    train_series is (n_rows, 168), one row per cell-week; `train_groups` names each row's cell
    (default: one row per cell), and `train_context` has one row per training row.
    """
    tc = np.asarray(train_context, dtype=float)
    qc = np.asarray(test_context, dtype=float)
    finite = np.isfinite(tc)
    n = np.maximum(finite.sum(axis=0), 1)
    mean = np.where(finite, tc, 0.0).sum(axis=0) / n
    sd = np.sqrt((np.where(finite, tc - mean, 0.0) ** 2).sum(axis=0) / n)
    sd = np.where(sd > 1e-12, sd, 1.0)
    zt = np.nan_to_num((tc - mean) / sd)
    zq = np.nan_to_num((qc - mean) / sd)
    groups = np.arange(len(tc)) if train_groups is None else np.asarray(train_groups)
    d2 = ((zq[:, None, :] - zt[None, :, :]) ** 2).sum(axis=2)
    series = np.asarray(train_series, dtype=float)
    out = np.empty((len(qc), n_samples, HOURS_PER_WEEK))
    for i in range(len(qc)):
        rows = np.flatnonzero(groups == groups[int(np.argmin(d2[i]))])
        out[i] = series[rows[np.arange(n_samples) % len(rows)]]
    return out


def evaluate_models(
    real: np.ndarray, generators: dict[str, Callable[[], np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Score each named generator (a callable returning (n_cells, n_samples, 168)) on `real`."""
    return {name: score(real, make()) for name, make in generators.items()}
