"""Pure helpers for the radio stage: IPW weights, per-cell training sets, subsampling."""

from __future__ import annotations

import numpy as np
import pandas as pd

MAX_IPW_WEIGHT = 20.0


def ipw_weights(load_rho: np.ndarray, *, n_bins: int) -> np.ndarray:
    """GUMBLE eqs. 20-21: alpha_i proportional to 1 / P(load bin of sample i).

    P is a histogram over `n_bins` equal-width bins spanning the observed load range. Weights are
    normalised to mean 1 so the likelihood keeps its size against the prior (the KL term), and
    capped at 20 so one sample in an almost empty bin cannot dominate a cell's fit.
    """
    rho = np.asarray(load_rho, dtype=float)
    if rho.size == 0:
        return rho.copy()
    lo, hi = np.nanmin(rho), np.nanmax(rho)
    if not hi > lo:
        return np.ones_like(rho)
    edges = np.linspace(lo, hi, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, rho, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(float)
    alpha = 1.0 / (counts[bins] / rho.size)
    alpha = alpha / alpha.mean()
    alpha = np.minimum(alpha, MAX_IPW_WEIGHT)
    return alpha / alpha.mean()


def subsample_index(n_rows: int, max_rows: int, *, seed: int) -> np.ndarray:
    """Row indices keeping at most `max_rows` (uniform, reproducible), sorted."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=max_rows, replace=False))


def training_rows(measurements: pd.DataFrame, target: str, *, rsrq_load: bool = True) -> pd.DataFrame:
    """Rows a target learns from: RSRP from every measurement (serving or neighbour) of the
    cell; RSRQ from serving measurements that have RSRQ and, when RSRQ is modelled with its load
    terms (`rsrq_load`, see `rsrq_uses_load`), the cell load."""
    if target == "rsrp":
        return measurements[np.isfinite(measurements["rsrp_dbm"].to_numpy(dtype=float))]
    keep = (measurements["role"] == "serving") & measurements["rsrq_db"].notna()
    if rsrq_load:
        keep &= measurements["load_rho"].notna()
    return measurements[keep]


def rsrq_uses_load(load_rho: pd.Series | np.ndarray) -> bool:
    """Whether RSRQ is modelled with its load terms (GUMBLE: RSRQ conditional on cell load): yes
    when any measurement carries a load, i.e. traffic counters were joined. Drive tests without
    counters (the UCC set: RSRQ on every row, no load) get RSRQ from position alone, the load's
    effect left in the noise, rather than no RSRQ model at all. One decision for the whole table,
    so every shard and every incremental job fits the same form."""
    return bool(pd.Series(load_rho).notna().any())
