"""Fidelity of a synthetic table against held-out real rows (SDMetrics-style column and pair
scores; the synthesis survey's EMD and JSD). Pure numpy/scipy on frames."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance


def column_wasserstein(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Earth mover's distance between two 1-D samples, in the column's own unit (NaNs dropped)."""
    r = np.asarray(real, dtype=float)
    s = np.asarray(synthetic, dtype=float)
    r, s = r[np.isfinite(r)], s[np.isfinite(s)]
    if len(r) == 0 or len(s) == 0:
        return float("nan")
    return float(wasserstein_distance(r, s))


def categorical_jsd(real: Sequence, synthetic: Sequence) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two category frequency tables."""
    r = pd.Series(real).dropna().value_counts(normalize=True)
    s = pd.Series(synthetic).dropna().value_counts(normalize=True)
    if r.empty or s.empty:
        return float("nan")
    cats = r.index.union(s.index)
    p, q = r.reindex(cats, fill_value=0.0).to_numpy(), s.reindex(cats, fill_value=0.0).to_numpy()
    return float(jensenshannon(p, q, base=2) ** 2)


def binned_jsd(real: np.ndarray, synthetic: np.ndarray, *, n_bins: int = 20) -> float:
    """JSD of a numeric column after binning both samples on the real data's quantile edges."""
    r = np.asarray(real, dtype=float)
    s = np.asarray(synthetic, dtype=float)
    r, s = r[np.isfinite(r)], s[np.isfinite(s)]
    if len(r) == 0 or len(s) == 0:
        return float("nan")
    edges = np.unique(np.quantile(r, np.linspace(0, 1, n_bins + 1)))
    if len(edges) < 2:
        edges = np.array([r.min() - 0.5, r.max() + 0.5])
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.histogram(r, edges)[0].astype(float)
    q = np.histogram(s, edges)[0].astype(float)
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2) ** 2)


def correlation_difference(real: pd.DataFrame, synthetic: pd.DataFrame, columns: Sequence[str]) -> float:
    """Mean absolute difference of the pairwise Pearson correlations (upper triangle).

    SDMetrics' CorrelationSimilarity is 1 - this / 2.
    """
    cols = [c for c in columns if c in real and c in synthetic]
    if len(cols) < 2:
        return float("nan")
    cr = real[cols].astype(float).corr().to_numpy()
    cs = synthetic[cols].astype(float).corr().to_numpy()
    iu = np.triu_indices(len(cols), k=1)
    diff = np.abs(cr[iu] - cs[iu])
    return float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan")


def fidelity_scores(
    real: pd.DataFrame, synthetic: pd.DataFrame, *, numeric: Sequence[str], categorical: Sequence[str] = ()
) -> list[dict]:
    """One record per (metric, column): wasserstein (column unit), jsd, and correlation_difference.

    Returns:
        Dicts with metric, value, column (None for the table-level correlation score).
    """
    out: list[dict] = []
    for col in numeric:
        if col not in real or col not in synthetic:
            continue
        out.append({"metric": "fidelity_wasserstein", "value": column_wasserstein(real[col], synthetic[col]), "column": col})
        out.append({"metric": "fidelity_jsd", "value": binned_jsd(real[col], synthetic[col]), "column": col})
    for col in categorical:
        if col in real and col in synthetic:
            out.append({"metric": "fidelity_jsd", "value": categorical_jsd(real[col], synthetic[col]), "column": col})
    out.append({"metric": "fidelity_correlation_difference", "value": correlation_difference(real, synthetic, numeric), "column": None})
    return out
