"""Synthetic per-cell traffic: a conditional diffusion model over cell-weeks (issue 9)."""

from cellsynth.traffic.evaluation import crps_ensemble, jsd, score, value_jsd
from cellsynth.traffic.model import HOURS_PER_WEEK, TrafficDiffusion
from cellsynth.traffic.transforms import cell_context, synthetic_frame, weekly_matrix

__all__ = [
    "HOURS_PER_WEEK", "TrafficDiffusion", "cell_context", "crps_ensemble", "jsd", "score",
    "synthetic_frame", "value_jsd", "weekly_matrix",
]
