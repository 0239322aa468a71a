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
Since session 17 (rule T', TREE_STACK and TREE_FADE below) a per-cell forest of regression trees is a third
component, faded with the distance to the nearest training row: mean = gp + s [w0 (knn - gp) + wt f(d) (tree - gp)].
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


# Candidate T (session 17; rejected alone, on since as the forest of rule T' below): a per-cell forest of regression trees on the same residuals as the
# kNN, a third component of the stack: mean = gp + s(x) [w0 (knn - gp) + wt (tree - gp)], (w0, wt) per shard on
# W_GRID x W_GRID with w0 + wt <= 1 (`blend_weight_tree`), on the refitted held-out sets w0 is fitted on (each
# fold's forest refitted without the fold, `foldcv.fold_errors`); the leave-one-out set (intervals only) takes
# the random folds' forest error at the row (an out-of-bag mean of 10 trees averages ~4 and overstates the
# forest's error: on 6 UCC cells of inner split 1 it moved the nearest epistemic factor 1.04 -> 1.71). Each cell's
# forest of all its rows is saved with the weights (`CellForest.to_arrays`, since session 25); weights written
# before that refit it at prediction from the stored training rows and the stored per-cell seed (`tree_seed`),
# deterministically. RSRQ with load terms: weight 0, as
# the kNN's. The intervals are calibrated on the final mean's errors as before (the forest changes the mean only).
# Session 17, rule T (fixed before the run, notes/s17/radio.md): adopt iff the mean-over-pairs pooled MAE is lower
# than the default's at each of three fresh inner splits (bench/radio_inner.py --inner-seed-start 7), median-cell MAE
# not higher by > 0.01 dB, interval score not higher by > 0.002, the known-noise aleatoric median kept (+-0.05 dB) and
# the UCC fit CPU <= 1.5x. "s17_tree~s3@from7" (bench/results/radio_inner.json): pooled MAE 4.517 -> 4.510 (UCC random
# 3.361 -> 3.331, lower at every seed) but higher at seed 9042 (4.5463 -> 4.5476: UCC blocks +0.045 dB); median-cell
# +0.005 dB, interval score 0.0811 -> 0.0792, aleatoric 1.695 dB kept, UCC CPU 1.20x (Purdue's 365 small cells 2.16x).
# Rejected by the every-seed clause. On since session 17 as the forest of rule T' (TREE_FADE, adopted).
TREE_STACK = True
# 10 trees, a priori by cost (sklearn: ~0.55 ms of fixed cost per tree, a cell needs 7 forests: three block folds,
# three random folds, and the forest of all rows when a prediction first uses it; 10 trees ~1.3x the UCC fit's CPU, 50 ~2.5x);
# min_samples_leaf 3 as the random-forest baseline (`baselines.RFBaseline`).
TREE_TREES = 10
TREE_MIN_LEAF = 3
# Candidate forest weights: the kNN's grid (a priori); (0.0,) reproduces the model without the forest.
TREE_W_GRID = W_GRID


# Rule T' (session 17, written by the lead at 01:05 before any T' code or run; adopted, the default): T with
# the forest's term faded by the distance d to the nearest training row, mean = gp + s [w0 (knn - gp) + wt f(d)
# (tree - gp)], f(d) = exp(-(d / TREE_FADE_M)^2), and a forest only for cells with >= TREE_MIN_ROWS training rows
# (the others: no forest, the tree term 0). In the held-out sets w0 and wt are fitted on, d is each row's distance
# to its fold's own training rows (the leave-one-out set: to the nearest other row). Only with TREE_STACK.
# Rule T' (the lead's, notes/s17/lead.md): T's clauses on fresh inner splits 10-12, the CPU clause on each dataset.
# "s17_tree_fade~s3@from10" against "s13_default~s3@from10" (bench/results/radio_inner.json): pooled MAE lower at
# every seed (4.6436/4.5114/4.5452 -> 4.6309/4.5029/4.5320; UCC random 3.320 -> 3.282, Purdue unchanged to 0.001 dB),
# median-cell 4.066 -> 4.061, interval score 0.1034 -> 0.1045 (+0.0011 <= 0.002), aleatoric 1.695 dB kept, fit CPU
# UCC 1.13x, Purdue 0.97x. Adopted: the default since session 17.
TREE_FADE = True
# 15 m: calibration.DIST_EDGES_M's first nonzero edge, the scale of drive-test row spacing (a priori: a tree's
# leaves are constants that only data close by support).
TREE_FADE_M = 15.0
# Forest only for cells with at least this many training rows (a priori, by cost: sklearn's ~0.55 ms fixed cost per
# tree dominates on Purdue's many small cells).
TREE_MIN_ROWS = 100


def tree_fade(dist_m: np.ndarray, scale_m: float | None = None) -> np.ndarray:
    """f(d) = exp(-(d / scale)^2), the forest term's fade with the distance to the nearest training row (1 at a
    training row, 0.37 at one scale, ~0 beyond two)."""
    sc = TREE_FADE_M if scale_m is None else float(scale_m)
    return np.exp(-np.square(np.asarray(dist_m, dtype=float) / sc))


def tree_gate(n_rows: int) -> bool:
    """Whether a cell with n_rows training rows gets a forest: always under T; under T' (TREE_FADE) only from
    TREE_MIN_ROWS rows."""
    return not TREE_FADE or int(n_rows) >= TREE_MIN_ROWS


def tree_seed(cell_id: str, seed: int) -> int:
    """The forest's seed of a cell: fixed by the fit's seed and the cell id (no draw from the cell's stream)."""
    import zlib

    return int(zlib.crc32(f"{int(seed)}:{cell_id}".encode()) & 0x7FFFFFFF)


# (dx, dy, distance to the site): `tree_features`' columns.
TREE_FEATURES = 3


def tree_features(xy_rel: np.ndarray) -> np.ndarray:
    """Features of positions relative to the cell's origin: (dx, dy) (the random-forest baseline's) and the distance
    to the site (the physical mean's one log-distance slope leaves radial structure that axis splits on dx, dy only
    staircase). float32: the trees' own dtype."""
    xy = np.asarray(xy_rel, dtype=float).reshape(-1, 2)
    return np.ascontiguousarray(np.column_stack([xy, np.hypot(xy[:, 0], xy[:, 1])]), dtype=np.float32)


class CellForest:
    """Bagged regression trees (TREE_TREES, min leaf TREE_MIN_LEAF, every feature at each split, bootstrap
    draws from `seed`) on one cell's residuals, row-weighted by `w` (the kNN's likelihood weights).

    `to_arrays` / `from_arrays` keep a forest as the node arrays prediction reads (`NODE_FIELDS`, the trees' nodes
    one after the other; per tree `TREE_FIELDS`: its first node and depth; ~150 KB at 1,500 rows), so it is saved with the cell's
    model; `from_arrays` hands them back to sklearn's tree (its pickling state, sklearn pinned in pyproject) and
    predicts exactly as the fitted forest (tests/radio/test_tree_stack.py). A state sklearn refuses raises
    ValueError: `FittedCells.forest` then refits from the stored rows."""

    NODE_FIELDS = ("left", "right", "feature", "threshold", "value")
    TREE_FIELDS = ("starts", "depth")

    def __init__(self, xy_rel: np.ndarray, r: np.ndarray, w: np.ndarray | None, seed: int):
        from sklearn.tree import DecisionTreeRegressor

        x = tree_features(xy_rel)
        r = np.asarray(r, dtype=float)
        n = len(r)
        w = np.ones(n) if w is None else np.asarray(w, dtype=float)
        rng = np.random.default_rng(seed)
        y2 = np.ascontiguousarray(r[:, None])
        self.trees = []  # sklearn's Tree objects (the estimators' tree_)
        for _ in range(TREE_TREES):
            counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
            tree = DecisionTreeRegressor(min_samples_leaf=TREE_MIN_LEAF, random_state=int(rng.integers(2**31 - 1)))
            tree.fit(x, y2, sample_weight=counts * w, check_input=False)
            self.trees.append(tree.tree_)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The trees' node arrays, concatenated (children indices local to their tree, -1 at a leaf, as sklearn)."""
        cat = lambda vs, dt: np.concatenate(vs).astype(dt) if vs else np.zeros(0, dt)  # noqa: E731
        t = self.trees
        return {"left": cat([v.children_left for v in t], np.int64), "right": cat([v.children_right for v in t], np.int64),
                "feature": cat([v.feature for v in t], np.int64), "threshold": cat([v.threshold for v in t], float),
                "value": cat([v.value.reshape(v.node_count, -1)[:, 0] for v in t], float),
                "starts": np.concatenate([[0], np.cumsum([v.node_count for v in t])[:-1]]).astype(np.int64),
                "depth": np.array([v.max_depth for v in t], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CellForest:
        """The forest `to_arrays` wrote, as sklearn trees again (no refit)."""
        try:
            from sklearn.tree._tree import NODE_DTYPE, Tree
        except ImportError as e:  # another sklearn layout
            raise ValueError(f"stored forest: {e}") from e
        out = cls.__new__(cls)
        out.trees = []
        bounds = np.append(np.asarray(arrays["starts"], dtype=np.int64), len(arrays["left"]))
        for a, b, depth in zip(bounds[:-1], bounds[1:], np.asarray(arrays["depth"])):
            nodes = np.zeros(b - a, dtype=NODE_DTYPE)  # impurity and sample counts: prediction reads none of them
            for field, key in (("left_child", "left"), ("right_child", "right"), ("feature", "feature"),
                               ("threshold", "threshold")):
                nodes[field] = np.asarray(arrays[key])[a:b]
            tree = Tree(int(TREE_FEATURES), np.ones(1, dtype=np.intp), 1)
            tree.__setstate__({"max_depth": int(depth), "node_count": int(b - a), "nodes": nodes,
                               "values": np.ascontiguousarray(np.asarray(arrays["value"], dtype=float)[a:b].reshape(-1, 1, 1))})
            out.trees.append(tree)
        return out

    @staticmethod
    def _one(tree, x: np.ndarray) -> np.ndarray:
        return tree.predict(x).reshape(len(x), -1)[:, 0]

    def predict(self, xy_rel: np.ndarray) -> np.ndarray:
        x = tree_features(xy_rel)
        return np.mean([self._one(t, x) for t in self.trees], axis=0) if len(x) else np.zeros(0)


def stacked_error(e_gp: np.ndarray, e_knn: np.ndarray, e_tree: np.ndarray | None, support: np.ndarray, w0: float,
                  wt: float) -> np.ndarray:
    """A row's error under mean = gp + s [w0 (knn - gp) + wt (tree - gp)] from its GP, kNN and forest errors; at wt = 0
    `blend_weight`'s own expression (so the forest at weight 0 is the model without it, bit for bit)."""
    if wt == 0.0:
        return e_gp + w0 * support * (e_knn - e_gp)
    return e_gp + support * (w0 * (e_knn - e_gp) + wt * (e_tree - e_gp))


def blend_weight_tree(sets: list[tuple[np.ndarray, ...]]) -> tuple[float, float]:
    """(w0, wt) of mean = gp + s [w0 (knn - gp) + wt (tree - gp)] from held-out sets of (GP error, kNN error, tree
    error, support s[, row weight]): the pair of W_GRID values with w0 + wt <= 1 with the lowest mean over the sets of
    their (row-weighted) MAE (each set counts equally; ties: the lower wt, then the lower w0). A row's error is
    e_gp + s (w0 (e_knn - e_gp) + wt (e_tree - e_gp)). (0, 0) with fewer than calibration.MIN_ROWS_BIN rows."""
    sets = [tuple(np.asarray(a, dtype=float) for a in st) for st in sets if len(st[0])]
    if sum(len(st[0]) for st in sets) < cal.MIN_ROWS_BIN:
        return 0.0, 0.0
    best, out = np.inf, (0.0, 0.0)
    for wt in np.asarray(TREE_W_GRID, dtype=float):
        for w0 in W_GRID[W_GRID <= 1.0 - wt + 1e-9]:
            e = [stacked_error(st[0], st[1], st[2], st[3], w0, wt) for st in sets]
            mae = np.mean([np.average(np.abs(ei), weights=st[4] if len(st) > 4 else None) for ei, st in zip(e, sets)])
            if mae < best:
                best, out = mae, (float(w0), float(wt))
    return out
