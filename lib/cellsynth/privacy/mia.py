"""Membership-inference audit: can an attacker holding the synthetic table tell training rows
(members) from held-out real rows (non-members)?

Two attacks, both scored on the same members and non-members:
- distance: score = -(distance from the target record to the nearest synthetic row of its own
  window and serving cell), in the metres+dB metric of `privacy.distance`;
- DOMIAS (van Breugel et al. 2023): score = log p_syn(z) - log p_ref(z), a Gaussian KDE of the
  synthetic rows against one of a reference sample of real non-member rows (same metric, 50 m
  bandwidth), so that points the generator over-represents relative to the population stand out.

The reference sample and the non-member targets are disjoint halves of the held-out rows. AUC
(Mann-Whitney) comes with a percentile bootstrap interval over targets, plus the TPR at 1% FPR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.neighbors import KernelDensity

from cellsynth.privacy.distance import DEFAULT_METRES_PER_DB, partition_distances


@dataclass
class MiaResult:
    attack: str  # distance | domias
    auc: float
    auc_lower: float
    auc_upper: float
    tpr_at_fpr01: float
    n_members: int
    n_non_members: int
    roc_fpr: np.ndarray
    roc_tpr: np.ndarray


def auc_score(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted half."""
    m, n = len(members), len(non_members)
    if not (m and n):
        return float("nan")
    ranks = rankdata(np.concatenate([members, non_members]))
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = 0.01) -> float:
    """Share of members scored above the threshold that only `fpr` of non-members exceed."""
    thr = np.quantile(non_members, 1.0 - fpr)
    return float(np.mean(members > thr))


def roc_curve(members: np.ndarray, non_members: np.ndarray, n_points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    thr = np.quantile(np.concatenate([members, non_members]), np.linspace(1.0, 0.0, n_points))
    fpr = np.array([np.mean(non_members > t) for t in thr] + [1.0])
    tpr = np.array([np.mean(members > t) for t in thr] + [1.0])
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def bootstrap_auc(members: np.ndarray, non_members: np.ndarray, *, n_boot: int = 200, confidence: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """Two-sided percentile bootstrap interval of the AUC (members and non-members resampled apart)."""
    rng = np.random.default_rng(seed)
    aucs = np.array([
        auc_score(rng.choice(members, len(members)), rng.choice(non_members, len(non_members))) for _ in range(n_boot)
    ])
    a = (1.0 - confidence) / 2.0
    return float(np.quantile(aucs, a)), float(np.quantile(aucs, 1.0 - a))


def distance_attack_scores(synthetic: pd.DataFrame, targets: pd.DataFrame, *,
                           metres_per_db: float = DEFAULT_METRES_PER_DB) -> np.ndarray:
    """-(combined distance to the closest synthetic row of the target's window and cell); targets
    whose (window, cell) has no synthetic rows get the lowest score seen (they look like outsiders)."""
    _, d = partition_distances(synthetic, targets, metres_per_db=metres_per_db)
    return distance_attack_from(d)


def distance_attack_from(d: np.ndarray) -> np.ndarray:
    """The distance attack's scores from each target's combined distance to the closest synthetic
    row of its (window, cell) (NaN where none): the minimum over any split of the synthetic rows."""
    d = np.asarray(d, dtype=float)
    worst = np.nanmax(d) if np.isfinite(d).any() else 0.0
    return -np.where(np.isfinite(d), d, worst)


def _points(frame: pd.DataFrame, metres_per_db: float) -> np.ndarray:
    return np.column_stack([frame["x_m"].to_numpy(float), frame["y_m"].to_numpy(float),
                            metres_per_db * frame["rsrp_dbm"].to_numpy(float)])


def domias_scores(synthetic: pd.DataFrame, reference: pd.DataFrame, targets: pd.DataFrame, *,
                  metres_per_db: float = DEFAULT_METRES_PER_DB, bandwidth_m: float = 50.0) -> np.ndarray:
    """log p_syn - log p_ref at each target: Gaussian KDEs on (x_m, y_m, k * rsrp_db), both with
    `bandwidth_m` in the metres+dB metric (fixed a priori at the guard's 50 m scale: an attacker
    looks for over-representation at the scale where a copy still identifies a record)."""
    syn, ref, tgt = (_points(f, metres_per_db) for f in (synthetic, reference, targets))
    syn, ref = syn[np.isfinite(syn).all(axis=1)], ref[np.isfinite(ref).all(axis=1)]
    ok = np.isfinite(tgt).all(axis=1)
    out = np.zeros(len(tgt))
    logs = [KernelDensity(bandwidth=bandwidth_m, rtol=1e-4).fit(sample).score_samples(tgt[ok]) for sample in (syn, ref)]
    out[ok] = logs[0] - logs[1]
    return out


def membership_audit(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, *, n_targets: int = 5000,
                     max_synthetic_rows: int = 20_000, metres_per_db: float = DEFAULT_METRES_PER_DB,
                     bandwidth_m: float = 50.0, n_boot: int = 200, confidence: float = 0.95, seed: int = 0,
                     distance_scores: Callable[[pd.DataFrame], np.ndarray] | None = None) -> list[MiaResult]:
    """Both attacks on min(n_targets, |held-out|/2) members and as many non-members.

    Frames need window, serving_cell_id, x_m, y_m, rsrp_dbm. The distance attack sees every
    synthetic row; the DOMIAS KDE a uniform sample of `max_synthetic_rows`. `distance_scores`
    (targets -> the distance attack's scores) stands in for `distance_attack_scores(synthetic,
    targets)` when the synthetic rows are streamed rather than passed (evaluate at scale); then
    `synthetic` need only hold the KDE's sample.
    """
    rng = np.random.default_rng(seed)
    ho = holdout.iloc[rng.permutation(len(holdout))]
    half = len(ho) // 2
    reference, non_members = ho.iloc[:half], ho.iloc[half:]
    k = int(min(n_targets, len(non_members), len(train)))
    if k < 10 or len(synthetic) == 0:
        return []
    non_members = non_members.iloc[:k]
    members = train.iloc[rng.choice(len(train), k, replace=False)]
    targets = pd.concat([members, non_members], ignore_index=True)
    syn_kde = synthetic if len(synthetic) <= max_synthetic_rows else synthetic.iloc[
        rng.choice(len(synthetic), max_synthetic_rows, replace=False)]
    ref_kde = reference if len(reference) <= max_synthetic_rows else reference.iloc[:max_synthetic_rows]
    scores = {
        "distance": (distance_attack_scores(synthetic, targets, metres_per_db=metres_per_db) if distance_scores is None
                     else np.asarray(distance_scores(targets), dtype=float)),
        "domias": domias_scores(syn_kde, ref_kde, targets, metres_per_db=metres_per_db, bandwidth_m=bandwidth_m),
    }
    out = []
    for name, s in scores.items():
        sm, sn = s[:k], s[k:]
        lo, hi = bootstrap_auc(sm, sn, n_boot=n_boot, confidence=confidence, seed=seed)
        fpr, tpr = roc_curve(sm, sn)
        out.append(MiaResult(name, auc_score(sm, sn), lo, hi, tpr_at_fpr(sm, sn, 0.01), k, k, fpr, tpr))
    return out
