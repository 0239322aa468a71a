"""Distance to closest record (the synthesis survey's DCR): are synthetic rows nearer to the
training rows than fresh real rows are? If so the generator may be copying its training data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cellsynth.privacy.distance import ratio_quantile


@dataclass(frozen=True)
class DcrResult:
    synthetic_median: float  # median DCR of synthetic rows to the training rows (standardised units)
    holdout_median: float  # the same for held-out real rows
    synthetic_p05: float
    holdout_p05: float
    exact_copy_fraction: float  # synthetic rows at distance 0 from a training row
    # One-sided bootstrap upper bound of `ratio` (dcr_check's `confidence`): with a few hundred
    # held-out rows the median ratio alone swings by +-15% between seeds, so a publish guard
    # should refuse only when even this bound is below its threshold.
    ratio_upper: float = float("nan")

    @property
    def ratio(self) -> float:
        """synthetic / held-out median DCR; below 1 means synthetic sits closer to training data."""
        return self.synthetic_median / self.holdout_median if self.holdout_median > 0 else float("inf")

    @property
    def flag(self) -> bool:
        """True when synthetic rows are closer to the training rows than held-out real rows are."""
        return bool(self.synthetic_median < self.holdout_median or self.exact_copy_fraction > 0)


def distance_to_closest_record(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Euclidean distance of each query row to its nearest training row."""
    tree = cKDTree(np.asarray(train, dtype=float))
    dist, _ = tree.query(np.asarray(query, dtype=float), k=1)
    return np.asarray(dist, dtype=float)


def median_ratio_upper(d_syn: np.ndarray, d_ho: np.ndarray, *, confidence: float = 0.95, n_boot: int = 400, seed: int = 0) -> float:
    """One-sided bootstrap upper bound of median(d_syn) / median(d_ho), each side resampled on its own."""
    rng = np.random.default_rng(seed)
    med_syn = np.median(rng.choice(d_syn, size=(n_boot, len(d_syn)), replace=True), axis=1)
    med_ho = np.median(rng.choice(d_ho, size=(n_boot, len(d_ho)), replace=True), axis=1)
    ratios = np.where(med_ho > 0, med_syn / np.where(med_ho > 0, med_ho, 1.0), np.inf)
    return ratio_quantile(ratios, confidence)


def dcr_check(train: pd.DataFrame, synthetic: pd.DataFrame, holdout: pd.DataFrame, *, columns: Sequence[str],
              confidence: float = 0.95, seed: int = 0) -> DcrResult:
    """DCR of synthetic and of held-out rows to the training rows, on columns standardised by the
    training rows' mean and std (so metres and dB weigh alike). Rows with NaNs are dropped.
    `ratio_upper` is the `confidence` bootstrap upper bound of the median ratio (seeded by `seed`).

    Raises:
        ValueError: a column is missing from one of the frames, or a frame has no complete rows.
    """
    cols = list(columns)
    for name, frame in (("train", train), ("synthetic", synthetic), ("holdout", holdout)):
        missing = [c for c in cols if c not in frame]
        if missing:
            raise ValueError(f"dcr_check: {name} lacks column '{missing[0]}' (have: {', '.join(map(str, frame.columns[:8]))})")
    arrays = [f[cols].dropna().to_numpy(dtype=float) for f in (train, synthetic, holdout)]
    if any(len(a) == 0 for a in arrays):
        raise ValueError("dcr_check: a frame has no rows without NaNs in " + ", ".join(cols))
    tr, sy, ho = arrays
    mu, sd = tr.mean(axis=0), tr.std(axis=0)
    sd[sd == 0] = 1.0
    tr, sy, ho = ((a - mu) / sd for a in (tr, sy, ho))
    d_syn = distance_to_closest_record(tr, sy)
    d_ho = distance_to_closest_record(tr, ho)
    return DcrResult(
        synthetic_median=float(np.median(d_syn)), holdout_median=float(np.median(d_ho)),
        synthetic_p05=float(np.quantile(d_syn, 0.05)), holdout_p05=float(np.quantile(d_ho, 0.05)),
        exact_copy_fraction=float(np.mean(d_syn == 0.0)),
        ratio_upper=median_ratio_upper(d_syn, d_ho, confidence=confidence, seed=seed),
    )


def refuse_to_publish(metrics: pd.DataFrame) -> bool:
    """For ops: True when the latest evaluate metrics carry privacy_dcr_flag = 1."""
    rows = metrics[metrics["metric"] == "privacy_dcr_flag"]
    return bool(len(rows) and (rows["value"] >= 1).any())
