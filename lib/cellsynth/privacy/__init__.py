"""Privacy you can state: exact distance checks in metres and dB, membership-inference audits,
and the epsilon-DP mode (DP density, DP radio models from noisy sufficient statistics, their accountant)."""

from cellsynth.privacy.distance import (
    DEFAULT_METRES_PER_DB,
    DistanceStats,
    distance_stats,
    guard_problems,
    partition_distances,
)
from cellsynth.privacy.mia import MiaResult, domias_scores, distance_attack_scores, membership_audit

__all__ = [
    "DEFAULT_METRES_PER_DB", "DistanceStats", "MiaResult", "distance_attack_scores", "distance_stats", "domias_scores",
    "guard_problems", "membership_audit", "partition_distances",
]
