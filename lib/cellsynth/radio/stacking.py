"""Stacking the GP posterior mean with a k-nearest-neighbour mean of the same residuals.

The GP's mean is smooth at its fitted length; drive-test fields also have sharp local structure
(street canyons, building shadows) that a neighbour average keeps. Per cell the kNN averages the
k nearest training residuals of the physical mean (so far from the data it keeps the distance
trend, not the edge values); k per cell by leave-one-out MAE of the training rows over K_GRID.
Per shard and per distance bin (calibration.DIST_EDGES_M: distance to the nearest training row)
the weight w of the kNN in mean = gp + w (knn - gp) minimises the pooled MAE of the held-out
training rows (leave-one-out and the block-CV sets, the same rows the intervals are calibrated
on, with the GP's held-out errors from `gp.loo` / `gp.held_out`). Bins with fewer than
calibration.MIN_ROWS_BIN held-out rows keep w = 0 (the GP alone: no evidence for the kNN there).
The intervals are then calibrated on the errors of this final mean. Nothing here sees held-out rows.
"""

from __future__ import annotations

import numpy as np
import torch

from cellsynth.radio import calibration as cal

# Candidate k, a priori (the kNN baseline's grid, cut at 32: the GP already covers longer ranges).
K_GRID = (1, 2, 3, 5, 8, 12, 16, 24, 32)
# Candidate weights of the kNN mean, a priori: 0 to 1 in steps of 0.05.
W_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def knn_means(dist: torch.Tensor, r: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running means of the residuals of the 1 .. k_max nearest usable rows: (C, M, k_max), and how
    many usable rows there are (C, M). `dist` (C, M, N) is +inf where a row must not be used."""
    k = min(k_max, dist.shape[-1])
    d, idx = torch.topk(dist, k, dim=-1, largest=False)
    vals = torch.gather(r[:, None, :].expand(-1, dist.shape[1], -1), 2, idx)
    ok = torch.isfinite(d)
    vals = torch.where(ok, vals, torch.zeros_like(vals))
    count = ok.sum(-1)
    csum = vals.cumsum(-1)
    n = torch.arange(1, k + 1, dtype=r.dtype, device=r.device)
    mean = csum / torch.minimum(n[None, None, :], count[..., None].clamp_min(1).to(r.dtype))
    # fewer usable rows than k: the mean of all of them
    last = torch.gather(csum, 2, (count.clamp(1, k) - 1)[..., None].long())[..., 0] / count.clamp_min(1).to(r.dtype)
    mean = torch.where(n[None, None, :] > count[..., None].to(r.dtype), last[..., None], mean)
    if k < k_max:
        mean = torch.cat([mean, mean[..., -1:].expand(-1, -1, k_max - k)], dim=-1)
    return mean, count


def choose_k(loo_mean: torch.Tensor, r: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Per cell the K_GRID value with the lowest leave-one-out MAE: (C,) ints."""
    cols = torch.as_tensor([k - 1 for k in K_GRID], device=r.device)
    err = (r[..., None] - loo_mean[..., cols]).abs() * mask[..., None].to(r.dtype)
    return np.asarray(K_GRID)[err.sum(1).argmin(-1).cpu().numpy()]


def blend_weights(sets: list[tuple[np.ndarray, np.ndarray, np.ndarray]], edges_m: tuple[float, ...] | None = None) -> np.ndarray:
    """kNN weight per distance bin from held-out sets of (GP error, kNN error, distance): in each
    bin the weight with the lowest mean over the sets of their MAE (each set counts equally, as
    in the interval calibration)."""
    edges = cal.DIST_EDGES_M if edges_m is None else edges_m
    w = np.zeros(len(edges))
    sets = [tuple(np.asarray(a, dtype=float) for a in s) for s in sets if len(s[0])]
    for b in range(len(edges)):
        parts = [(s[0][sel], s[1][sel]) for s in sets for sel in [cal.distance_bin(s[2], edges) == b] if sel.any()]
        if sum(len(p[0]) for p in parts) >= cal.MIN_ROWS_BIN:
            mae = [np.mean([np.mean(np.abs((1.0 - v) * e_gp + v * e_knn)) for e_gp, e_knn in parts]) for v in W_GRID]
            w[b] = W_GRID[int(np.argmin(mae))]
    return w
