"""Fast prediction path of one cell's exact GP (`FittedCells.predict` calls it; issue 15 item 4).

Two parts, both for a single unpadded cell (the Batch `FittedCells._cell` builds):

1. `solve` / `predict_latent`: the same numbers as `gp.solve` / `gp.predict_latent` (tested to
   1e-9 relative), with K and the cross-covariance built in place from one distance matrix
   (`gp.covariance` keeps distances, H V H^T and the long-range term as separate (N, N) parts
   for the hyperparameter search; prediction needs K once), BLOCK_ROWS rows at a time. At
   1,500 rows the whole-matrix elementwise build cost several times the Cholesky itself.
2. An interpolated epistemic variance for calls with many rows. With k(x) = a(x) + s^2 H V h(x)
   (a: the two Matern terms, h: the mean basis, which carries the load for RSRQ),

       var(x, h) = s^2 (1 + h'Vh) + S^2 - |u(x)|^2 - 2 h'W'u(x) - h'W'W h,   u = L^-1 a(x), W = s^2 L^-1 H V,

   so the variance is exact given two smooth functions of position only, q(x) = |u(x)|^2 and
   g(x) = W'u(x) (P values). They are solved on a regular grid (one triangular solve with G
   right-hand sides, BLAS3) and interpolated by cubic convolution (Catmull-Rom); W'W and the
   basis terms stay exact. The grid step is fixed a priori from the fitted length:
   min(length, long-range length) / GRID_STEPS_PER_LENGTH. On synthetic bench-like cells (lengths
   30, 80 and 200 m) bilinear at a quarter length was off by up to 0.26 dB in latent std, cubic
   at a sixth by 0.047 dB, and by 0.057 dB on a cell with IPW weights 0.5-1.5; so an eighth.
   A cell gets a grid only when it is cheaper than the exact solves of the rows asked of it
   (G nodes <= GRID_MAX_SHARE x the cell's rows); it is built over the first chunk's bounding
   box and kept while the cell's factor lives; rows outside it are solved exactly. Every call
   checks itself: the exact variance at CHECK_ROWS of its grid rows; a latent std off by more
   than TOLERANCE_DB at any of them sends the call, and the cell from then on, to the exact
   path. `MODE = "exact"` switches the grid off.
The predictive mean is exact on both paths (O(N) a row).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from cellsynth.radio import gp

# "auto": grid where cheaper and within TOLERANCE_DB on its check rows; "exact": never;
# "reference": gp.solve / gp.predict_latent themselves (the code before this module, for benches)
MODE = "auto"
GRID_STEPS_PER_LENGTH = 8.0
GRID_MAX_SHARE = 0.5  # grid nodes at most half the rows (the grid's solve must pay for itself)
CHECK_ROWS = 16
TOLERANCE_DB = 0.05  # latent std, before the calibration factors (which are <= a few)
# Counters for benches and tests: calls and rows by path, and grid calls refused by the check.
STATS = {"exact_calls": 0, "exact_rows": 0, "grid_calls": 0, "grid_rows": 0, "grid_rejected": 0}


def _spatial(d: torch.Tensor, length: float, signal2: float, nu: float) -> torch.Tensor:
    """a = s^2 k_nu(d / l) + S^2 k_nu(d / L) for distances d (M, N), by gp's batched Matern."""
    lengths = torch.tensor([length, gp.LONG_RANGE_LENGTH_M], dtype=d.dtype, device=d.device)
    both = gp._matern_cells(d[None], lengths, nu)  # (2, M, N): the local and the long-range term
    return both[0].mul_(signal2).add_(both[1], alpha=gp.LONG_RANGE_STD_DB**2)


# Rows of a kernel matrix built at a time: 128 x 1,500 float64 is ~1.5 MB, so the elementwise
# passes stay in a core's L2 cache (a priori from the cache size; 64-256 rows ran alike, 2.5x faster
# than whole (1,500, 1,500) passes on the shared 2-core machine).
BLOCK_ROWS = 128


def _kernel(x: torch.Tensor, train: torch.Tensor, length: float, signal2: float, nu: float) -> torch.Tensor:
    """a(x) (M, N) for rows x against the training rows, built BLOCK_ROWS rows at a time."""
    out = torch.empty(len(x), len(train), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), BLOCK_ROWS):
        out[i:i + BLOCK_ROWS] = _spatial(gp._dist(x[None, i:i + BLOCK_ROWS], train[None])[0], length, signal2, nu)
    return out


def _kernel_lower(xy: torch.Tensor, h: torch.Tensor, length: float, signal2: float, nu: float) -> torch.Tensor:
    """K without its noise diagonal, a(x_i, x_j) + s^2 h_i' V h_j, on and below the diagonal only (BLOCK_ROWS rows at
    a time; above it the memory is left as allocated): the Cholesky factorisation reads the lower triangle alone
    (LAPACK potrf with uplo L, as torch.linalg.cholesky calls it), so the upper half was half of the build's cost
    for nothing (tests/radio/test_fastvar.py: the same factor as gp.solve's)."""
    n = len(xy)
    out = torch.empty(n, n, dtype=xy.dtype, device=xy.device)
    hv = h * gp.basis_prior_var(h)
    for i in range(0, n, BLOCK_ROWS):
        j = min(i + BLOCK_ROWS, n)
        blk = out[i:j, :j]
        blk.copy_(_spatial(gp._dist(xy[None, i:j], xy[None, :j])[0], length, signal2, nu))
        blk.add_(torch.matmul(hv[i:j], h[:j].T), alpha=signal2)
    return out


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
    k = _kernel_lower(b.xy[0], b.h[0], length, signal2, nu)
    diag = k.diagonal()
    scale = max(float(diag.mean()), 1.0)
    diag.add_(noise2 / b.w[0] + gp.JITTER * scale)
    chol = torch.linalg.cholesky(k)[None]
    return chol, torch.cholesky_solve(b.r[..., None], chol)[..., 0]


def predict_latent(b: gp.Batch, theta: torch.Tensor, chol: torch.Tensor, alpha: torch.Tensor, xy: torch.Tensor,
                   h: torch.Tensor, *, nu: float, floor_db: float, mode: str | None = None,
                   rows_in_cell: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gp.predict_latent for one unpadded cell: posterior mean and variance of the latent field at
    rows xy (1, M, 2) with basis h (1, M, P), each (1, M). With `mode` (default MODE) "auto" the
    variance of rows inside the cell's grid comes from the grid (module docstring); the grid is
    built on the first call whose cell has enough rows (`rows_in_cell`: all rows the caller
    will ask this cell for, over its chunks; default M) and kept while `chol` lives. Other rows,
    and every row of a call whose check fails, get the exact triangular solve."""
    mode = MODE if mode is None else mode
    if mode == "reference":
        return gp.predict_latent(b, theta, chol, alpha, xy, h, nu=nu, floor_db=floor_db)
    _single(b)
    length, signal2, _ = _params(theta, floor_db)
    x, hx, L = xy[0], h[0], chol[0]
    bh_v = b.h[0] * gp.basis_prior_var(h)  # H V (N, P)
    ks = _kernel(x, b.xy[0], length, signal2, nu)  # a(x) rows (M, N)
    mean = ks @ alpha[0] + signal2 * (hx @ (bh_v.T @ alpha[0]))
    prior = signal2 * (1.0 + ((hx * gp.basis_prior_var(hx)) * hx).sum(-1)) + gp.LONG_RANGE_STD_DB**2
    todo = torch.ones(len(x), dtype=torch.bool, device=x.device)  # rows that need the exact solve
    var = torch.empty_like(prior)
    if mode == "auto":
        grid = _grid_of(b, chol, x, bh_v, length, signal2, nu, max(int(rows_in_cell or 0), len(x)))
        inside = grid.covers(x) if grid is not None else None
        if inside is not None and int(inside.sum()) >= CHECK_ROWS:
            rows = torch.nonzero(inside)[:, 0]
            got = grid.variance(x[rows], hx[rows], prior[rows])
            pick = rows[torch.linspace(0, len(rows) - 1, CHECK_ROWS, device=x.device).round().long()]
            exact = _exact_variance(L, ks[pick], hx[pick], bh_v, prior[pick], signal2)
            if float((exact.sqrt() - got[torch.searchsorted(rows, pick)].sqrt()).abs().max()) <= TOLERANCE_DB:
                var[rows] = got
                var[pick] = exact
                todo[rows] = False
                STATS["grid_calls"] += 1
                STATS["grid_rows"] += len(rows)
            else:  # the grid misses its tolerance on this cell: exact from now on
                STATS["grid_rejected"] += 1
                _GRIDS[id(chol)] = (weakref.ref(chol), None)
    if bool(todo.any()):
        rows = torch.nonzero(todo)[:, 0]
        var[rows] = _exact_variance(L, ks[rows], hx[rows], bh_v, prior[rows], signal2)
        STATS["exact_calls"] += 1
        STATS["exact_rows"] += len(rows)
    return mean[None], var[None]


def _exact_variance(L: torch.Tensor, a: torch.Tensor, hx: torch.Tensor, bh_v: torch.Tensor, prior: torch.Tensor,
                    signal2: float) -> torch.Tensor:
    """prior - |L^-1 k(x)|^2 with k(x) = a(x) + s^2 H V h(x) (a consumed when it is a copy)."""
    k = a.add(hx @ bh_v.T, alpha=signal2)
    v = torch.linalg.solve_triangular(L, k.T, upper=False)
    return (prior - (v * v).sum(0)).clamp_min(0.0)


def grid_step_m(length_m: float) -> float:
    """Grid step of the interpolated variance, a priori from the fitted length (module docstring)."""
    return min(length_m, gp.LONG_RANGE_LENGTH_M) / GRID_STEPS_PER_LENGTH


class _Grid:
    """q(x) = |u(x)|^2 and g(x) = W'u(x) on a regular grid, W'W, and cubic interpolation."""

    def __init__(self, lo: torch.Tensor, step: float, n_xy: tuple[int, int], fields: torch.Tensor, wtw: torch.Tensor):
        self.lo, self.step, self.n_xy, self.fields, self.wtw = lo, step, n_xy, fields, wtw

    def covers(self, x: torch.Tensor) -> torch.Tensor:
        """Rows whose 4 x 4 stencil lies inside the grid."""
        f = (x - self.lo) / self.step
        n = torch.as_tensor(self.n_xy, dtype=x.dtype, device=x.device)
        return ((f >= 1.0) & (f < n - 2.0)).all(-1)

    def variance(self, x: torch.Tensor, hx: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        f = (x - self.lo) / self.step
        i0 = f.floor().long()
        t = f - i0
        wx, wy = _cubic_weights(t[:, 0]), _cubic_weights(t[:, 1])
        ny = self.n_xy[1]
        val = torch.zeros(len(x), self.fields.shape[1], dtype=x.dtype, device=x.device)
        for a in range(4):
            for c in range(4):
                val += self.fields[(i0[:, 0] + a - 1) * ny + i0[:, 1] + c - 1] * (wx[:, a] * wy[:, c])[:, None]
        return (prior - val[:, 0] - 2.0 * (hx * val[:, 1:]).sum(-1) - ((hx @ self.wtw) * hx).sum(-1)).clamp_min(0.0)


# Per solved cell (keyed by its Cholesky tensor, dropped with it): its grid, or None when a grid
# does not pay for the cell's rows or failed its check.
_GRIDS: dict[int, tuple[weakref.ref, _Grid | None]] = {}


def _grid_of(b: gp.Batch, chol: torch.Tensor, x: torch.Tensor, bh_v: torch.Tensor, length: float, signal2: float,
             nu: float, n_rows: int) -> _Grid | None:
    key = id(chol)
    hit = _GRIDS.get(key)
    if hit is not None and hit[0]() is chol:
        return hit[1]
    for k in [k for k, (ref, _) in _GRIDS.items() if ref() is None]:  # cells released since
        del _GRIDS[k]
    step = grid_step_m(length)
    span = x.max(0).values - x.min(0).values
    lo = x.min(0).values - 0.05 * span - step  # a little margin for the next chunks, one node for the stencil
    n_xy = tuple(int(v) for v in torch.floor(1.1 * span / step).long() + 4)
    grid = None
    if n_xy[0] * n_xy[1] <= GRID_MAX_SHARE * n_rows and len(x) >= CHECK_ROWS:
        L = chol[0]
        gx = lo[0] + step * torch.arange(n_xy[0], dtype=x.dtype, device=x.device)
        gy = lo[1] + step * torch.arange(n_xy[1], dtype=x.dtype, device=x.device)
        nodes = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
        u = torch.linalg.solve_triangular(L, _kernel(nodes, b.xy[0], length, signal2, nu).T, upper=False)  # (N, G)
        w = torch.linalg.solve_triangular(L, signal2 * bh_v, upper=False)  # (N, P)
        grid = _Grid(lo, step, n_xy, torch.cat([(u * u).sum(0)[:, None], u.T @ w], dim=1), w.T @ w)
    _GRIDS[key] = (weakref.ref(chol), grid)
    return grid


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
    knn = None
    if need_knn:
        w = b.w[0].cpu().numpy()
        if np.all(w == 1.0):
            knn = b.r[0].cpu().numpy()[idx].mean(1)
        else:  # the likelihood weights (row weights, `model.ROW_WEIGHT_POWER`): a weighted mean, as in training
            knn = (b.r[0].cpu().numpy()[idx] * w[idx]).sum(1) / w[idx].sum(1)
    return dist[:, 0], knn
