"""Exact distance-to-closest-record (DCR) in units a person reads: metres and dB.

Every synthetic row is compared with *every* training row of its own (window, serving cell):
one KD-tree per (window, cell), built inside the task that owns the partition (a window x
cell-shard of the lake), so nothing is subsampled and nothing is gathered on the driver. A task
returns a `DistanceStats`: exact counts plus log-binned histograms of the distances, which merge
exactly across partitions, so the median and its bootstrap come out the same at any scale.

Distance: d = sqrt(dx_m^2 + dy_m^2 + (k * d_rsrp_db)^2) with k metres per dB (default 10). Why 10:
MDT reports carry RSRP quantised to 1 dB and a smartphone GNSS fix is good to about 5-10 m, so one
quantisation step of the radio value weighs like one position-error unit; and near a cell's edge
the path-loss slope (35 log10 d) moves RSRP by ~1 dB per 10-30 m. Fixed a priori, not tuned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.neighbors import KDTree

DEFAULT_METRES_PER_DB = 10.0
NEAR_RADII_M = (10.0, 50.0)
KEY = ("window", "serving_cell_id")
# Log-spaced bins (1 mm .. 1000 km, ~2.3% wide) + an exact-zero bin: a histogram merges exactly
# across partitions and its median is within one bin width of the exact one.
HIST_EDGES_M = np.concatenate([[0.0], np.geomspace(1e-3, 1e6, 901)])


def partition_distances(train: pd.DataFrame, query: pd.DataFrame, *,
                        metres_per_db: float = DEFAULT_METRES_PER_DB) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's distance to the nearest training row of the same (window, serving cell).

    Returns:
        (position distance [m], combined position+RSRP distance [m]); NaN where the row's
        (window, cell) has no training rows (combined also NaN where RSRP is missing).
    """
    n = len(query)
    d_pos, d_comb = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0 or len(train) == 0:
        return d_pos, d_comb
    t_xy = train[["x_m", "y_m"]].to_numpy(dtype=float)
    t_r = train["rsrp_dbm"].to_numpy(dtype=float) * metres_per_db
    q_xy = query[["x_m", "y_m"]].to_numpy(dtype=float)
    q_r = query["rsrp_dbm"].to_numpy(dtype=float) * metres_per_db
    t_groups = train.groupby(list(KEY), sort=False).indices
    for key, qi in query.groupby(list(KEY), sort=False).indices.items():
        ti = t_groups.get(key)
        if ti is None:
            continue
        d_pos[qi] = KDTree(t_xy[ti]).query(q_xy[qi], k=1)[0][:, 0]
        ok_t = ti[np.isfinite(t_r[ti])]
        ok_q = qi[np.isfinite(q_r[qi])]
        if len(ok_t) and len(ok_q):
            tree = KDTree(np.column_stack([t_xy[ok_t], t_r[ok_t]]))
            d_comb[ok_q] = tree.query(np.column_stack([q_xy[ok_q], q_r[ok_q]]), k=1)[0][:, 0]
    return d_pos, d_comb


def ratio_quantile(ratios: np.ndarray, q: float) -> float:
    """np.quantile of bootstrap ratios, some of which are inf (a resample whose held-out median distance is 0):
    where the two order statistics around q are both inf the bound is inf (numpy's interpolation gives
    inf - inf = NaN there, with a RuntimeWarning on the user's console)."""
    ratios = np.sort(np.asarray(ratios, dtype=float))
    k = q * (len(ratios) - 1)
    if np.isinf(ratios[int(np.floor(k))]):
        return float("inf")
    return float(np.quantile(ratios, q))


def _hist(d: np.ndarray) -> np.ndarray:
    d = d[np.isfinite(d)]
    counts = np.zeros(len(HIST_EDGES_M), dtype=np.int64)  # bin 0: exactly 0; bin i: (e[i-1], e[i]]
    counts[0] = int(np.sum(d == 0.0))
    pos = d[d > 0.0]
    idx = np.clip(np.searchsorted(HIST_EDGES_M, pos, side="left"), 1, len(HIST_EDGES_M) - 1)
    np.add.at(counts, idx, 1)
    return counts


def _hist_median(counts: np.ndarray) -> float:
    n = counts.sum()
    if n == 0:
        return float("nan")
    i = int(np.searchsorted(np.cumsum(counts), (n + 1) / 2.0))
    if i == 0:
        return 0.0
    return float(np.sqrt(max(HIST_EDGES_M[i - 1], 1e-4) * HIST_EDGES_M[i]))  # geometric bin centre


@dataclass
class DistanceStats:
    """Mergeable distance summary of synthetic and held-out rows against the training rows."""

    n_synthetic: int = 0  # synthetic rows whose (window, cell) has training rows
    n_holdout: int = 0
    n_synthetic_unmatched: int = 0  # synthetic rows of a (window, cell) without training rows
    n_exact: int = 0  # synthetic rows at combined distance 0 (a copied position and RSRP)
    synthetic_within: dict[float, int] = field(default_factory=dict)  # position distance <= r metres
    holdout_within: dict[float, int] = field(default_factory=dict)
    # The same with the combined position + RSRP distance (what the guard tests: a row near a
    # training position *and* near its RSRP; KDE positions with fresh radio draws are not).
    synthetic_within_comb: dict[float, int] = field(default_factory=dict)
    holdout_within_comb: dict[float, int] = field(default_factory=dict)
    hist_synthetic: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES_M), dtype=np.int64))
    hist_holdout: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES_M), dtype=np.int64))
    n_training: int = 0

    def merge(self, other: DistanceStats) -> DistanceStats:
        radii = sorted(set(self.synthetic_within) | set(other.synthetic_within))
        return DistanceStats(
            n_synthetic=self.n_synthetic + other.n_synthetic, n_holdout=self.n_holdout + other.n_holdout,
            n_synthetic_unmatched=self.n_synthetic_unmatched + other.n_synthetic_unmatched,
            n_exact=self.n_exact + other.n_exact,
            synthetic_within={r: self.synthetic_within.get(r, 0) + other.synthetic_within.get(r, 0) for r in radii},
            holdout_within={r: self.holdout_within.get(r, 0) + other.holdout_within.get(r, 0) for r in radii},
            synthetic_within_comb={r: self.synthetic_within_comb.get(r, 0) + other.synthetic_within_comb.get(r, 0)
                                   for r in radii},
            holdout_within_comb={r: self.holdout_within_comb.get(r, 0) + other.holdout_within_comb.get(r, 0)
                                 for r in radii},
            hist_synthetic=self.hist_synthetic + other.hist_synthetic, hist_holdout=self.hist_holdout + other.hist_holdout,
            n_training=self.n_training + other.n_training,
        )

    @staticmethod
    def merge_all(parts: Sequence[DistanceStats]) -> DistanceStats:
        out = DistanceStats()
        for p in parts:
            out = out.merge(p)
        return out

    def share_within(self, radius_m: float, *, holdout: bool = False, combined: bool = False) -> float:
        """Share of rows within radius_m of a training row of their cell and window: by position
        alone, or (`combined`) by the position + RSRP distance."""
        n = self.n_holdout if holdout else self.n_synthetic
        if combined:
            counts = self.holdout_within_comb if holdout else self.synthetic_within_comb
        else:
            counts = self.holdout_within if holdout else self.synthetic_within
        return counts.get(radius_m, 0) / n if n else float("nan")

    def near_excess_lower(self, radius_m: float, *, confidence: float = 0.95, combined: bool = True) -> float:
        """One-sided lower confidence bound of share_within(synthetic) - share_within(held-out)
        (normal approximation of two independent proportions)."""
        from scipy.stats import norm

        if not (self.n_synthetic and self.n_holdout):
            return float("nan")
        p1 = self.share_within(radius_m, combined=combined)
        p0 = self.share_within(radius_m, holdout=True, combined=combined)
        se = np.sqrt(p1 * (1 - p1) / self.n_synthetic + p0 * (1 - p0) / self.n_holdout)
        return float(p1 - p0 - norm.ppf(confidence) * se)

    @property
    def synthetic_median_m(self) -> float:
        return _hist_median(self.hist_synthetic)

    @property
    def holdout_median_m(self) -> float:
        return _hist_median(self.hist_holdout)

    @property
    def ratio(self) -> float:
        """synthetic / held-out median combined DCR; below 1: synthetic sits closer to training rows."""
        ho = self.holdout_median_m
        return self.synthetic_median_m / ho if ho > 0 else float("nan")

    def ratio_upper(self, *, confidence: float = 0.95, n_boot: int = 400, seed: int = 0) -> float:
        """One-sided bootstrap upper bound of the median ratio, resampling each histogram (multinomial)."""
        n_s, n_h = int(self.hist_synthetic.sum()), int(self.hist_holdout.sum())
        if not (n_s and n_h):
            return float("nan")
        rng = np.random.default_rng(seed)
        ps, ph = self.hist_synthetic / n_s, self.hist_holdout / n_h
        ms = np.array([_hist_median(c) for c in rng.multinomial(n_s, ps, size=n_boot)])
        mh = np.array([_hist_median(c) for c in rng.multinomial(n_h, ph, size=n_boot)])
        ratios = np.where(mh > 0, ms / np.where(mh > 0, mh, 1.0), np.inf)
        return ratio_quantile(ratios, confidence)

    def to_json(self) -> dict:
        return {
            "n_synthetic": self.n_synthetic, "n_holdout": self.n_holdout, "n_training": self.n_training,
            "n_synthetic_unmatched": self.n_synthetic_unmatched, "n_exact": self.n_exact,
            "synthetic_within": {str(k): v for k, v in self.synthetic_within.items()},
            "holdout_within": {str(k): v for k, v in self.holdout_within.items()},
            "synthetic_within_combined": {str(k): v for k, v in self.synthetic_within_comb.items()},
            "holdout_within_combined": {str(k): v for k, v in self.holdout_within_comb.items()},
        }


def distance_stats(train: pd.DataFrame, synthetic: pd.DataFrame, holdout: pd.DataFrame, *,
                   metres_per_db: float = DEFAULT_METRES_PER_DB,
                   radii_m: Sequence[float] = NEAR_RADII_M) -> DistanceStats:
    """One partition's exact distances of synthetic and held-out rows to all its training rows.

    Frames need window, serving_cell_id, x_m, y_m, rsrp_dbm.
    """
    ps, cs = partition_distances(train, synthetic, metres_per_db=metres_per_db)
    ph, ch = partition_distances(train, holdout, metres_per_db=metres_per_db)
    ms, mh = np.isfinite(ps), np.isfinite(ph)
    return DistanceStats(
        n_synthetic=int(ms.sum()), n_holdout=int(mh.sum()), n_synthetic_unmatched=int((~ms).sum()),
        n_exact=int(np.sum(cs == 0.0)),
        synthetic_within={float(r): int(np.sum(ps[ms] <= r)) for r in radii_m},
        holdout_within={float(r): int(np.sum(ph[mh] <= r)) for r in radii_m},
        synthetic_within_comb={float(r): int(np.sum(cs[ms] <= r)) for r in radii_m},
        holdout_within_comb={float(r): int(np.sum(ch[mh] <= r)) for r in radii_m},
        hist_synthetic=_hist(cs), hist_holdout=_hist(ch), n_training=len(train),
    )


def guard_problems(stats: DistanceStats, *, min_dcr_ratio: float, confidence: float, max_near_excess: float,
                   seed: int = 0) -> list[str]:
    """Reasons to refuse publication (empty: publish). A copied row, synthetic rows that sit closer
    to the training rows than held-out real rows do (median ratio's upper bound below
    `min_dcr_ratio`), or more synthetic than held-out rows within 10 m / 50 m of a training row of
    their cell and window in the position + RSRP distance (lower bound of the excess above
    `max_near_excess`). The combined distance, not position alone: KDE sampling puts positions
    within a bandwidth of training positions by design, but draws RSRP afresh from the radio
    model; a row that is near a training row in both is a copy."""
    out = []
    if stats.n_exact:
        out.append(f"{stats.n_exact} synthetic rows copy a training row's position and RSRP exactly")
    if stats.n_synthetic and stats.n_holdout:
        upper = stats.ratio_upper(confidence=confidence, seed=seed)
        if upper < min_dcr_ratio:
            out.append(f"median DCR {stats.synthetic_median_m:.3g} m vs held-out {stats.holdout_median_m:.3g} m, ratio "
                       f"{stats.ratio:.3g} with upper bound {upper:.3g} < {min_dcr_ratio:g}")
        radii = sorted(stats.synthetic_within)
        for r in radii:
            # Bonferroni over the radii: each is tested at 1 - (1 - confidence) / len(radii).
            low = stats.near_excess_lower(r, confidence=1.0 - (1.0 - confidence) / len(radii))
            if low > max_near_excess:
                out.append(f"{stats.share_within(r, combined=True):.2%} of synthetic rows within {r:g} m (position and "
                           f"RSRP, metres+dB distance) of a training row of their cell and window vs "
                           f"{stats.share_within(r, holdout=True, combined=True):.2%} of held-out rows "
                           f"(excess lower bound {low:.2%} > {max_near_excess:.2%})")
    return out
