"""Stacking the GP posterior mean with a k-nearest-neighbour mean of the same residuals.

The GP's mean is smooth at its fitted length; drive-test fields also have sharp local structure
(street canyons, building shadows) that a neighbour average keeps. Per cell the kNN averages the
k nearest training residuals of the physical mean (so far from the data it keeps the distance
trend, not the edge values); k per cell by leave-one-out MAE of the training rows over K_GRID.
Support-aware weight (BLEND_MODE "support", the default): mean = gp + w0 s(x) (knn - gp) with
s(x) = 1 - v(x), v = the GP's posterior variance at x over its stationary prior variance
(`gp.stationary_prior_var`, clipped to 1): a neighbour average is
evidence only where there are neighbours, so in a gap (v -> 1) the mean falls back to the GP.
Per shard w0 minimises the mean over the held-out training-row sets (leave-one-out and the
refitted block CV, the same rows the intervals are calibrated on) of their MAE. "flat" (s = 1)
is the previous form: one w per shard everywhere; per distance bin in `blend_weights`. The
support form was chosen over the flat one by the nested harness (bench/radio_inner.py: the
outer split's training rows split again, UCC and Purdue, random and blocks; lower mean pooled
MAE, bench/results/radio_inner.json). The intervals are then
calibrated on the errors of this final mean. Nothing here sees held-out rows.
"""

from __future__ import annotations

import numpy as np
import torch

from cellsynth.radio import calibration as cal

# Candidate k, a priori (the kNN baseline's grid, cut at 32: the GP already covers longer ranges).
K_GRID = (1, 2, 3, 5, 8, 12, 16, 24, 32)
# Candidate weights of the kNN mean, a priori: 0 to 1 in steps of 0.05.
W_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)
# "support": the kNN weight times the row's data support 1 - posterior / prior variance; "flat": one weight.
BLEND_MODE = "support"


def support(latent_var: np.ndarray, prior_var: np.ndarray) -> np.ndarray:
    """Data support of a row in [0, 1]: 1 - posterior / prior variance, clipped (1 on a dense
    cluster of rows, 0 where the data say nothing)."""
    v = np.asarray(latent_var, dtype=float) / np.maximum(np.asarray(prior_var, dtype=float), 1e-12)
    return np.clip(1.0 - v, 0.0, 1.0)


def blend_weight(sets: list[tuple[np.ndarray, ...]]) -> float:
    """w0 of mean = gp + w0 s (knn - gp) from held-out sets of (GP error, kNN error, support s[,
    row weight]): the W_GRID value with the lowest mean over the sets of their (row-weighted) MAE
    (each set counts equally).
    A row's error under w0 is (1 - w0 s) e_gp + w0 s e_knn. 0 with fewer than
    calibration.MIN_ROWS_BIN rows (no evidence for the kNN)."""
    sets = [tuple(np.asarray(a, dtype=float) for a in st) for st in sets if len(st[0])]
    if sum(len(st[0]) for st in sets) < cal.MIN_ROWS_BIN:
        return 0.0
    mae = [np.mean([np.average(np.abs(st[0] + v * st[2] * (st[1] - st[0])), weights=st[3] if len(st) > 3 else None)
                    for st in sets]) for v in W_GRID]
    return float(W_GRID[int(np.argmin(mae))])


def knn_means(dist: torch.Tensor, r: torch.Tensor, k_max: int, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running means of the residuals of the 1 .. k_max nearest usable rows: (C, M, k_max), and how
    many usable rows there are (C, M). `dist` (C, M, N) is +inf where a row must not be used.
    With `w` (C, N) the means are weighted (a row's noise precision: the GP's likelihood weight)."""
    k = min(k_max, dist.shape[-1])
    d, idx = torch.topk(dist, k, dim=-1, largest=False)
    vals = torch.gather(r[:, None, :].expand(-1, dist.shape[1], -1), 2, idx)
    ok = torch.isfinite(d)
    vals = torch.where(ok, vals, torch.zeros_like(vals))
    count = ok.sum(-1)
    if w is not None:
        ws = torch.where(ok, torch.gather(w[:, None, :].expand(-1, dist.shape[1], -1), 2, idx), torch.zeros_like(vals))
        csum, wsum = (vals * ws).cumsum(-1), ws.cumsum(-1)
        mean = csum / wsum.clamp_min(1e-300)
        last = torch.gather(mean, 2, (count.clamp(1, k) - 1)[..., None].long())[..., 0]
        mean = torch.where(ok, mean, last[..., None])  # fewer usable rows than k: the mean of all of them
        mean = torch.where(count[..., None] > 0, mean, torch.zeros_like(mean))
        if k < k_max:
            mean = torch.cat([mean, mean[..., -1:].expand(-1, -1, k_max - k)], dim=-1)
        return mean, count
    csum = vals.cumsum(-1)
    n = torch.arange(1, k + 1, dtype=r.dtype, device=r.device)
    mean = csum / torch.minimum(n[None, None, :], count[..., None].clamp_min(1).to(r.dtype))
    # fewer usable rows than k: the mean of all of them
    last = torch.gather(csum, 2, (count.clamp(1, k) - 1)[..., None].long())[..., 0] / count.clamp_min(1).to(r.dtype)
    mean = torch.where(n[None, None, :] > count[..., None].to(r.dtype), last[..., None], mean)
    if k < k_max:
        mean = torch.cat([mean, mean[..., -1:].expand(-1, -1, k_max - k)], dim=-1)
    return mean, count


def choose_k(loo_mean: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, row_weight: torch.Tensor | None = None) -> np.ndarray:
    """Per cell the K_GRID value with the lowest (row-weighted) leave-one-out MAE: (C,) ints."""
    cols = torch.as_tensor([k - 1 for k in K_GRID], device=r.device)
    m = mask.to(r.dtype) if row_weight is None else mask.to(r.dtype) * row_weight
    err = (r[..., None] - loo_mean[..., cols]).abs() * m[..., None]
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
