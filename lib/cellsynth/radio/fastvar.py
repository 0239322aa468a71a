"""Fast prediction path of one cell's exact GP (`FittedCells.predict` calls it; issue 15 item 4).

Two parts, both for a single unpadded cell (the Batch `FittedCells._cell` builds):

1. `solve` / `predict_latent`: the same numbers as `gp.solve` / `gp.predict_latent` (tested to
   1e-9 relative), with K and the cross-covariance built in place from one distance matrix
   (`gp.covariance` keeps distances, H V H^T and the long-range term as separate (N, N) parts
   for the hyperparameter search; prediction needs K once). At 1,500 rows the elementwise
   build cost ~7x the Cholesky itself.
2. An interpolated epistemic variance for calls with many rows. With k(x) = a(x) + s^2 H V h(x)
   (a: the two Matern terms, h: the mean basis, which carries the load for RSRQ),

       var(x, h) = s^2 (1 + h'Vh) + S^2 - |u(x)|^2 - 2 h'W'u(x) - h'W'W h,   u = L^-1 a(x), W = s^2 L^-1 H V,

   so the variance is exact given two smooth functions of position only, q(x) = |u(x)|^2 and
   g(x) = W'u(x) (P values). They are solved on a regular grid over the rows' bounding box
   (one triangular solve with G right-hand sides, BLAS3) and interpolated bilinearly; W'W and
   the basis terms stay exact. The grid step is fixed a priori from the fitted length:
   min(length, long-range length) / GRID_STEPS_PER_LENGTH (the kernel's correlation changes
   by ~3% over a quarter length). The grid is used only when it is cheaper than the exact
   solve (G nodes < GRID_MAX_SHARE x the rows), and every grid call checks itself: the exact
   variance at CHECK_ROWS of its rows; a latent std off by more than TOLERANCE_DB at any of them
   sends the whole call to the exact path. `MODE = "exact"` switches the grid off.
The predictive mean is exact on both paths (O(N) a row).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cellsynth.radio import gp

# "auto": grid where cheaper and within TOLERANCE_DB on its check rows; "exact": never;
# "reference": gp.solve / gp.predict_latent themselves (the code before this module, for benches)
MODE = "auto"
GRID_STEPS_PER_LENGTH = 6.0
GRID_MAX_SHARE = 0.5  # grid nodes at most half the rows (the grid's solve must pay for itself)
CHECK_ROWS = 16
TOLERANCE_DB = 0.05  # latent std, before the calibration factors (which are <= a few)
# Counters for benches and tests: calls and rows by path, and grid calls refused by the check.
STATS = {"exact_calls": 0, "exact_rows": 0, "grid_calls": 0, "grid_rows": 0, "grid_rejected": 0}


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, N) distances, smoothed at 0 as gp._dist (same values), without an (M, N, 2) temporary."""
    dx = a[:, 0, None] - b[None, :, 0]
    d2 = dx.mul_(dx)
    dy = a[:, 1, None] - b[None, :, 1]
    d2.add_(dy.mul_(dy)).add_(1e-9)
    return d2.sqrt_()


def _matern_(d_scaled: torch.Tensor, nu: float) -> torch.Tensor:
    """gp.matern in place on its argument (overwritten by the result)."""
    if nu == 0.5:
        return d_scaled.neg_().exp_()
    if nu == 1.5:
        s = d_scaled.mul_(math.sqrt(3.0))
        e = torch.exp(-s)
        return s.add_(1.0).mul_(e)
    s = d_scaled.mul_(math.sqrt(5.0))
    e = torch.exp(-s)
    return s.mul(s).div_(3.0).add_(s).add_(1.0).mul_(e)


def _spatial(d: torch.Tensor, length: float, signal2: float, nu: float) -> torch.Tensor:
    """a = s^2 k_nu(d / l) + S^2 k_nu(d / L) for distances d (consumed)."""
    out = _matern_(d / length, nu).mul_(signal2)
    return out.add_(_matern_(d.div_(gp.LONG_RANGE_LENGTH_M), nu), alpha=gp.LONG_RANGE_STD_DB**2)


def _v(h: torch.Tensor) -> torch.Tensor:
    return (torch.as_tensor(gp.BASIS_PRIOR_STD_DB, dtype=h.dtype, device=h.device) / gp.COEF_PRIOR_REF_DB) ** 2


def _params(theta: torch.Tensor, floor_db: float) -> tuple[float, float, float]:
    length, signal2, noise2 = gp.unpack(theta, floor_db)
    return float(length.reshape(-1)[0]), float(signal2.reshape(-1)[0]), float(noise2.reshape(-1)[0])


def _single(b: gp.Batch) -> None:
    if b.xy.shape[0] != 1 or not bool(b.mask.all()):
        raise ValueError("fastvar: one unpadded cell per call (FittedCells._cell's batch)")


def solve(b: gp.Batch, theta: torch.Tensor, *, nu: float, floor_db: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gp.solve for one unpadded cell: Cholesky factor L (1, N, N) of K and alpha = K^-1 r (1, N)."""
    if MODE == "reference":
        return gp.solve(b, theta, nu=nu, floor_db=floor_db)
    _single(b)
    length, signal2, noise2 = _params(theta, floor_db)
    xy, h = b.xy[0], b.h[0]
    k = _spatial(_dist(xy, xy), length, signal2, nu)
    k.add_(torch.matmul(h * _v(h), h.T), alpha=signal2)
    diag = k.diagonal()
    scale = max(float(diag.mean()), 1.0)
    diag.add_(noise2 / b.w[0] + gp.JITTER * scale)
    chol = torch.linalg.cholesky(k)[None]
    return chol, torch.cholesky_solve(b.r[..., None], chol)[..., 0]


def predict_latent(b: gp.Batch, theta: torch.Tensor, chol: torch.Tensor, alpha: torch.Tensor, xy: torch.Tensor,
                   h: torch.Tensor, *, nu: float, floor_db: float, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gp.predict_latent for one unpadded cell: posterior mean and variance of the latent field at
    rows xy (1, M, 2) with basis h (1, M, P), each (1, M). The variance comes from the grid
    (module docstring) when `mode` (default MODE) is "auto", the grid is cheaper and it passes
    its check; otherwise from the exact triangular solve."""
    mode = MODE if mode is None else mode
    if mode == "reference":
        return gp.predict_latent(b, theta, chol, alpha, xy, h, nu=nu, floor_db=floor_db)
    _single(b)
    length, signal2, _ = _params(theta, floor_db)
    x, hx, L = xy[0], h[0], chol[0]
    bh_v = b.h[0] * _v(h)  # H V (N, P)
    ks = _spatial(_dist(x, b.xy[0]), length, signal2, nu)  # a(x) rows (M, N)
    mean = ks @ alpha[0] + signal2 * (hx @ (bh_v.T @ alpha[0]))
    prior = signal2 * (1.0 + ((hx * _v(hx)) * hx).sum(-1)) + gp.LONG_RANGE_STD_DB**2
    var = None
    if mode == "auto" and len(x) >= CHECK_ROWS:
        var = _grid_variance(b, L, x, hx, bh_v, prior, length, signal2, nu, ks)
    if var is None:
        ks.add_(hx @ bh_v.T, alpha=signal2)
        v = torch.linalg.solve_triangular(L, ks.T, upper=False)
        var = (prior - (v * v).sum(0)).clamp_min(0.0)
        STATS["exact_calls"] += 1
        STATS["exact_rows"] += len(x)
    return mean[None], var[None]


def grid_step_m(length_m: float) -> float:
    """Grid step of the interpolated variance, a priori from the fitted length (module docstring)."""
    return min(length_m, gp.LONG_RANGE_LENGTH_M) / GRID_STEPS_PER_LENGTH


def _grid_variance(b: gp.Batch, L: torch.Tensor, x: torch.Tensor, hx: torch.Tensor, bh_v: torch.Tensor,
                   prior: torch.Tensor, length: float, signal2: float, nu: float, ks: torch.Tensor) -> torch.Tensor | None:
    step = grid_step_m(length)
    lo = x.min(0).values - step  # one node of margin each side for the cubic stencil
    n_xy = torch.floor((x.max(0).values - x.min(0).values) / step).long() + 4
    nx, ny = int(n_xy[0]), int(n_xy[1])
    if nx * ny > GRID_MAX_SHARE * len(x):
        return None
    gx = lo[0] + step * torch.arange(nx, dtype=x.dtype, device=x.device)
    gy = lo[1] + step * torch.arange(ny, dtype=x.dtype, device=x.device)
    nodes = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
    u = torch.linalg.solve_triangular(L, _spatial(_dist(nodes, b.xy[0]), length, signal2, nu).T, upper=False)  # (N, G)
    w = torch.linalg.solve_triangular(L, signal2 * bh_v, upper=False)  # (N, P)
    fields = torch.cat([(u * u).sum(0)[:, None], u.T @ w], dim=1)  # (G, 1 + P): q, g
    # Catmull-Rom (cubic convolution) weights of the 4 x 4 nodes around every row
    f = (x - lo) / step
    i0 = f.floor().long().clamp(1, None).minimum(n_xy - 3)
    t = f - i0
    wx, wy = _cubic_weights(t[:, 0]), _cubic_weights(t[:, 1])
    val = torch.zeros(len(x), fields.shape[1], dtype=x.dtype, device=x.device)
    for a in range(4):
        for c in range(4):
            val += fields[(i0[:, 0] + a - 1) * ny + i0[:, 1] + c - 1] * (wx[:, a] * wy[:, c])[:, None]
    wtw = w.T @ w
    var = (prior - val[:, 0] - 2.0 * (hx * val[:, 1:]).sum(-1) - ((hx @ wtw) * hx).sum(-1)).clamp_min(0.0)
    # self-check on evenly spaced rows against the exact solve
    pick = torch.linspace(0, len(x) - 1, CHECK_ROWS, device=x.device).round().long()
    kc = ks[pick] + signal2 * (hx[pick] @ bh_v.T)
    vc = torch.linalg.solve_triangular(L, kc.T, upper=False)
    exact = (prior[pick] - (vc * vc).sum(0)).clamp_min(0.0)
    if float((exact.sqrt() - var[pick].sqrt()).abs().max()) > TOLERANCE_DB:
        STATS["grid_rejected"] += 1
        return None
    var[pick] = exact
    STATS["grid_calls"] += 1
    STATS["grid_rows"] += len(x)
    return var


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Catmull-Rom weights (M, 4) of nodes -1, 0, 1, 2 at offsets t in [0, 1] (Keys 1981, a = -1/2)."""
    t2, t3 = t * t, t * t * t
    return torch.stack([(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2], -1)


def nearest(b: gp.Batch, x: torch.Tensor, k: int, *, need_dist: bool, need_knn: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Distance to the nearest training row and the mean residual of the k nearest (what
    `stacking.knn_means` gives at k, ties aside) for rows x (M, 2) of one unpadded cell, by a
    k-d tree instead of the (M, N) distance matrix and its top-k; each only when asked for
    (zeros / None otherwise: one distance bin, or every kNN weight 0)."""
    from scipy.spatial import cKDTree

    m = len(x)
    if not (need_dist or need_knn):
        return np.zeros(m), None
    train = b.xy[0].cpu().numpy()
    kk = min(int(k), len(train)) if need_knn else 1
    dist, idx = cKDTree(train).query(x.cpu().numpy(), k=kk)
    dist, idx = dist.reshape(m, kk), idx.reshape(m, kk)
    knn = b.r[0].cpu().numpy()[idx].mean(1) if need_knn else None
    return dist[:, 0], knn
