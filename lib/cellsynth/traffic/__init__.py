"""Synthetic per-cell traffic: a conditional diffusion model over cell-weeks (issue 9)."""

from cellsynth.traffic.model import HOURS_PER_WEEK, TrafficDiffusion

__all__ = ["HOURS_PER_WEEK", "TrafficDiffusion"]
