"""Posterior rasters: each cell's GP posterior solved once per model version, interpolated after.

Prediction from the exact GP costs one O(N^3) factorisation per cell and O(N^2) per predicted
value (N = 1,500 training rows); generation asks every cell for ~10^3 values per run, so that
work was redone by every generate task. Here it is done once, when the radio stage writes a
model file (`save_for`), and generate only interpolates (issue 15 item 4).

With the notation of `fastvar` (a(x): the two Matern terms against the training rows, h(x):
the mean basis, u = L^-1 a(x), W = s^2 L^-1 H V, alpha = K^-1 r), the latent posterior is

    mean(x, h) = m(x) + h' c,      m = a'alpha,  c = s^2 (H V)' alpha
    var(x, h)  = s^2 (1 + h'Vh) + S^2 - q(x) - 2 h' g(x) - h'W'W h,   q = |u|^2,  g = W'u

so it is exact given 2 + P functions of position only. They are solved on two regular grids
over the cell's footprint (a cell is asked for values where it is heard or serves, i.e. around
its training rows): a fine one (step min(length, long-range length) / FINE_STEPS_PER_LENGTH) over
the BLOCK_M blocks that hold a training row, widened by FINE_MARGIN_M, and a coarse one
(/ FAR_STEPS_PER_LENGTH) FAR_MARGIN_M around them, where no training row lies within a stencil.
Values in between come from cubic convolution (Catmull-Rom) as in `fastvar`; c, W'W and the
basis terms stay exact, so the load of RSRQ needs nothing more. m(x) has a Matern kink at every
training row, which cubic interpolation smears; the kink of every row within the stencil is
removed exactly at prediction (alpha_j times a_j's own interpolation error, `_kink`). The steps
are a priori, from the check below on bench cells (1,500 rows, length 80 m): without the kink
correction the mean was off by 0.08 dB at a sixth of the length and 0.03 at an eighth; with it,
and the variance at a seventh, mean and latent std stay within 0.03 dB at the generated rows.

Every raster is checked when it is built: at CHECK_POINTS random points of each level the
interpolated mean and latent std (before the calibration factors) are compared with the exact
path; off by more than TOLERANCE_DB at any of them, the cell keeps no raster (a failing coarse
level alone is dropped). Rows outside a raster are predicted exactly. A cell whose fine level
would exceed MAX_NODES nodes (very short fitted lengths) stays exact.

Cost: the rasters are built once per model file by the radio stage (radio.posterior_raster); a
node costs one triangular solve against the cell's N rows, so a cell costs ~10^4 exact
predictions (bench/results/generate.json: radio_stage_raster_build). That is more than one
default generation asks of a cell (~10^3 values), so the rasters pay from the second generation
on the same models.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cellsynth.radio import fastvar, gp

BLOCK_M = 100.0  # footprint block side, metres (the detection maps' square)
# Two levels: a fine grid over the blocks holding training rows widened by FINE_MARGIN_M, and a
# coarse one FAR_MARGIN_M around them, where no training row is within a coarse stencil (so the
# fields are smooth there: no Matern kink to resolve). The neighbour detection maps
# (generate.DetectionMaps: 100 m squares, Gaussian smoothing of one square, truncated at 4) can
# ask a cell for values up to ~400 m from where it was heard.
FINE_MARGIN_M, FAR_MARGIN_M = 100.0, 1000.0
FINE_STEPS_PER_LENGTH, FAR_STEPS_PER_LENGTH = 7.0, 1.5
# A coarse level that fails its check is built again at these finer steps (in order; the first that
# passes is kept), a priori one halving of the step: at length / 1.5 about 3% of the bench's cells
# failed the 0.05 dB check and every row beyond their fine level went to the exact path, which
# factorises the whole cell (~75 ms at 1,500 rows) for a handful of rows; at length / 3 they passed.
FAR_RETRY_STEPS_PER_LENGTH: tuple[float, ...] = (3.0,)
# A cell whose fine level would exceed MAX_NODES nodes (very short fitted lengths) stays exact.
MAX_NODES = 60_000
# the mean's kink correction: a predicted row with NEAR_ROWS[-1] or more training rows within its
# radius (a dense cluster) goes to the exact path (the 32 is the former k-d tree's first query
# size, kept so the limit reads as before)
NEAR_ROWS = (32, 256)
CHECK_POINTS = 256  # per level
TOLERANCE_DB = 0.05  # mean and latent std, as `fastvar.TOLERANCE_DB`
SUFFIX = ".raster"
FORMAT = 1
# Counters for benches and tests.
STATS = {"built": 0, "refused_check": 0, "refused_size": 0, "raster_rows": 0, "exact_rows": 0, "far_retried": 0}


@dataclass
class Level:
    """Fields m, q, g on the nodes of the footprint blocks of one grid."""

    lo: np.ndarray  # (2,) position of node (0, 0), relative to the cell's origin
    step: float
    block: int  # nodes per block side
    block_map: np.ndarray  # (nbx, nby) int32: block id, -1 where the level has none
    fields: np.ndarray  # (n_blocks * block^2, 2 + P) float32 (node-major within a block)
    check_err_db: tuple[float, float] = (float("nan"), float("nan"))

    def node_ids(self, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
        b = self.block
        bx, by = ix // b, iy // b
        nbx, nby = self.block_map.shape
        ok = (ix >= 0) & (iy >= 0) & (bx < nbx) & (by < nby)
        ids = np.full(ix.shape, -1, dtype=np.int64)
        bid = self.block_map[np.where(ok, bx, 0), np.where(ok, by, 0)]
        good = ok & (bid >= 0)
        ids[good] = (bid[good].astype(np.int64) * b + ix[good] % b) * b + iy[good] % b
        return ids

    def stencil_ids(self, i0: np.ndarray) -> np.ndarray:
        """(M, 16) node ids of the 4 x 4 stencils at nodes i0 (M, 2), -1 where the level has none:
        `node_ids(i0[:, 0] + k // 4 - 1, i0[:, 1] + k % 4 - 1)` for k = 0..15, computed from the
        4 + 4 separable columns and rows (the same ids)."""
        b = self.block
        nbx, nby = self.block_map.shape
        ix = i0[:, 0, None] + np.arange(-1, 3)  # (M, 4)
        iy = i0[:, 1, None] + np.arange(-1, 3)
        bx, by = ix // b, iy // b
        okx, oky = (ix >= 0) & (bx < nbx), (iy >= 0) & (by < nby)
        bid = self.block_map[np.where(okx, bx, 0)[:, :, None], np.where(oky, by, 0)[:, None, :]].astype(np.int64)
        ids = (bid * b + (ix % b)[:, :, None]) * b + (iy % b)[:, None, :]
        ids[~(okx[:, :, None] & oky[:, None, :] & (bid >= 0))] = -1
        return ids.reshape(len(i0), 16)


@dataclass
class CellRaster:
    """One cell's posterior raster: its levels and the exact per-cell terms."""

    levels: list[Level]
    c: np.ndarray  # (P,) s^2 (H V)' alpha
    wtw: np.ndarray  # (P, P) W'W
    alpha: np.ndarray  # (N,) K^-1 r, for the mean's kink correction
    train_xy: np.ndarray  # (N, 2) training rows relative to the origin
    params: tuple[float, float, float]  # length, signal variance, Matern nu

    def __post_init__(self) -> None:
        self._tree = None  # k-d tree of the training rows, built on first use

    def tree(self, n_train: int):
        """The k-d tree of the training rows (relative to the origin; built once), or None when the
        raster holds another number of rows than the model's n_train (then it is not the rows the
        caller means)."""
        return self._kdtree() if len(self.train_xy) == n_train else None

    def _kdtree(self):
        """The cached k-d tree of the training rows (built on first use)."""
        from scipy.spatial import cKDTree

        if self._tree is None:
            self._tree = cKDTree(self.train_xy)
        return self._tree

    def kappa(self, d: np.ndarray) -> np.ndarray:
        """a_j as a function of the distance: s^2 k_nu(d / l) + S^2 k_nu(d / L)."""
        return _kappa(np.asarray(d, dtype=float), *self.params)

    def latent(self, xy: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, variance, inside) of the latent field at rows xy (M, 2) relative to the origin,
        basis h (M, P); NaN where `inside` is False (no level covers the row)."""
        xy = np.asarray(xy, dtype=float)
        m = len(xy)
        mean, var = np.full(m, np.nan), np.full(m, np.nan)
        done = np.zeros(m, dtype=bool)
        vb = gp.basis_prior_var(torch.as_tensor(h[:1], dtype=torch.float64)).numpy()
        for lev in self.levels:
            rows = np.flatnonzero(~done)
            if not len(rows):
                break
            x, hx = xy[rows], h[rows]
            f = (x - lev.lo) / lev.step
            i0 = np.floor(f).astype(np.int64)
            t = f - i0
            wx, wy = _cubic_weights(t[:, 0]), _cubic_weights(t[:, 1])
            w16 = (wx[:, :, None] * wy[:, None, :]).reshape(len(rows), 16)
            val = np.zeros((len(rows), lev.fields.shape[1]))
            ids = lev.stencil_ids(i0)
            inside = (ids >= 0).all(1)
            nodes = lev.fields[np.maximum(ids, 0)]  # (M, 16, 2 + P) float32, one gather
            for k in range(16):  # the same sums, in the same order, as one node at a time
                val += nodes[:, k] * w16[:, k, None]
            # the kink correction of the rows this level holds (the others go to the next level)
            at = np.flatnonzero(inside)
            corr = np.zeros(len(rows))
            corr[at], complete = self._kink(x[at], lev, i0[at], w16[at])
            inside[at] &= complete
            mu = val[:, 0] + corr + hx @ self.c
            prior = self.signal2 * (1.0 + ((hx * vb) * hx).sum(-1)) + gp.LONG_RANGE_STD_DB**2
            v = np.maximum(prior - val[:, 1] - 2.0 * (hx * val[:, 2:]).sum(-1) - ((hx @ self.wtw) * hx).sum(-1), 0.0)
            ok = rows[inside]
            mean[ok], var[ok] = mu[inside], v[inside]
            done[ok] = True
        return mean, var, done

    @property
    def signal2(self) -> float:
        return self.params[1]

    def _kink(self, x: np.ndarray, lev: Level, i0: np.ndarray, w16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mean's interpolation error from training rows whose Matern kink lies inside a
        row's 4 x 4 stencil, removed exactly: sum_j alpha_j (a_j(x) - interpolated a_j(x)) over
        the rows j within 2 sqrt(2) steps (elsewhere a_j is smooth over the stencil). Returns the
        correction and False where more than NEAR_ROWS[-1] rows were that close (left to the exact path)."""
        radius = 2.0 * math.sqrt(2.0) * lev.step * (1.0 + 1e-9)
        r, j, d, count = self._near(x, radius)
        # NEAR_ROWS: a row with NEAR_ROWS[-1] or more training rows that close is left to the exact path
        complete = (count < NEAR_ROWS[-1]) | (len(self.train_xy) <= NEAR_ROWS[-1])
        keep = complete[r]
        r, j, d = r[keep], j[keep], d[keep]
        corr = np.zeros(len(x))
        if len(r):
            length, signal2, nu = self.params
            # The 16 node distances of a pair are separable: the stencil's node columns and rows
            # lie lo + step (i0 - 1 + a), a = 0..3, so dx_a, dy_c are 4 values each and
            # |node_ac - x_j|^2 = dx_a^2 + dy_c^2 (the old (pairs, 16, 2) node array rounded the
            # same sums in another order: answers agree to float rounding). Chunks of pairs keep
            # the passes over (chunk, 16) in cache.
            base = lev.lo + lev.step * (i0[r] - 1) - self.train_xy[j]  # (pairs, 2): node (0, 0) - x_j
            ticks = lev.step * np.arange(4.0)
            delta = self.alpha[j] * _kappa(d, length, signal2, nu)
            size = min(KINK_CHUNK, len(r))
            dn_buf, kap_buf, w_buf = np.empty((size, 16)), np.empty((size, 16)), np.empty((size, 16))
            work = (np.empty((size, 16)), np.empty((size, 16)), np.empty((size, 16)))
            for a in range(0, len(r), KINK_CHUNK):
                b = base[a:a + KINK_CHUNK]
                p = len(b)
                dx, dy = b[:, 0, None] + ticks, b[:, 1, None] + ticks
                dx *= dx
                dy *= dy
                dn = dn_buf[:p]
                np.add(dx[:, :, None], dy[:, None, :], out=dn.reshape(p, 4, 4))
                dn += 1e-9
                np.sqrt(dn, out=dn)
                kap = _kappa(dn, length, signal2, nu, out=kap_buf[:p], work=tuple(w[:p] for w in work))
                np.take(w16, r[a:a + KINK_CHUNK], axis=0, out=w_buf[:p])
                delta[a:a + KINK_CHUNK] -= self.alpha[j[a:a + KINK_CHUNK]] * np.einsum("pk,pk->p", kap, w_buf[:p])
            corr = np.bincount(r, weights=delta, minlength=len(x))
        return corr, complete

    def _near(self, x: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every (row, training row j, distance) pair within `radius` and each row's count, by one
        dual-tree pass (scipy's `sparse_distance_matrix` between a tree of the rows and the cell's
        cached tree of training rows; it replaced per-row k-d tree queries at k = 32 / 256: the
        same pairs and distances, about twice as fast at generation's call sizes)."""
        from scipy.spatial import cKDTree

        tree = self._kdtree()
        if not len(x):
            z = np.zeros(0, dtype=np.int64)
            return z, z, np.zeros(0), z
        pairs = cKDTree(x).sparse_distance_matrix(tree, radius, output_type="ndarray")
        r, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
        return r, j, pairs["v"], np.bincount(r, minlength=len(x))

    def n_nodes(self) -> int:
        return int(sum(lev.fields.shape[0] for lev in self.levels))


KINK_CHUNK = 4096  # pairs per pass of the kink correction: (4,096, 16) float64 is 0.5 MB


def _kappa(d: np.ndarray, length: float, signal2: float, nu: float, *, out: np.ndarray | None = None,
           work: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """s^2 k_nu(d / l) + S^2 k_nu(d / L) in numpy (`gp.matern`'s formulas; the torch round trip
    per call cost more than the arithmetic at generation's sizes). `out` and `work` (three arrays
    of d's shape) let a caller's loop reuse its buffers: the same operations in the same order,
    so the same values bit for bit, without allocating ~8 arrays a call."""
    if out is None:
        out = np.empty_like(d)
    s, e, t = work if work is not None else (np.empty_like(d), np.empty_like(d), np.empty_like(d))
    for k, (ell, var) in enumerate(((length, signal2), (gp.LONG_RANGE_LENGTH_M, gp.LONG_RANGE_STD_DB**2))):
        term = out if k == 0 else s  # the first term is built in `out`, the second added to it
        if nu == 0.5:
            np.multiply(d, -1.0 / ell, out=term)
            np.exp(term, out=term)
        else:
            np.multiply(d, (math.sqrt(3.0) if nu == 1.5 else math.sqrt(5.0)) / ell, out=term)
            np.negative(term, out=e)
            np.exp(e, out=e)
            if nu == 1.5:
                term += 1.0
            else:  # s * s / 3 + s + 1
                np.multiply(term, term, out=t)
                t /= 3.0
                t += term
                t += 1.0
                term[...] = t
            term *= e
        term *= var
        if k:
            out += term
    return out


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """fastvar's Catmull-Rom weights (M, 4) of nodes -1, 0, 1, 2, on a numpy array: the same
    formula and operation order in numpy (equal to the torch version bit for bit, tested; the
    torch round trip cost more than the arithmetic at generation's call sizes)."""
    t = np.asarray(t, dtype=np.float64)
    t2, t3 = t * t, t * t * t
    return np.stack([(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2], -1)


def footprint(train_xy: np.ndarray, step: float, margin_m: float) -> tuple[np.ndarray, int, np.ndarray]:
    """(lo, nodes per block, grown block mask) of the blocks holding a training row, widened by margin_m."""
    block = max(4, int(round(BLOCK_M / step)))
    side = block * step
    widen = int(math.ceil(margin_m / side))
    pad = widen + 1
    lo = np.floor(train_xy.min(0) / side) * side - pad * side
    bxy = np.floor((train_xy - lo) / side).astype(np.int64)
    shape = tuple(int(v) for v in bxy.max(0) + pad + 1)
    occ = np.zeros(shape, dtype=bool)
    occ[bxy[:, 0], bxy[:, 1]] = True
    grown = np.zeros_like(occ)
    for dx in range(-widen, widen + 1):
        for dy in range(-widen, widen + 1):
            if dx * dx + dy * dy <= (widen + 0.5) ** 2:  # a disc of blocks, not a square
                grown |= np.roll(np.roll(occ, dx, 0), dy, 1)  # pad > widen: nothing wraps round
    return lo, block, grown


def _level(fitted_cell: tuple, lo: np.ndarray, step: float, block: int, active: np.ndarray, nu: float,
           length: float, signal2: float, w: torch.Tensor) -> Level:
    """The fields on the nodes of the active blocks: m = a'alpha, q = |L^-1 a|^2, g = W'L^-1 a
    (the triangular solve in float32, BLAS3 over NODE_CHUNK nodes at a time; the check decides)."""
    b, _, chol, alpha = fitted_cell
    block_map = np.full(active.shape, -1, dtype=np.int32)
    block_map[active] = np.arange(int(active.sum()), dtype=np.int32)
    bx, by = np.nonzero(active)
    order = np.argsort(block_map[bx, by])
    bx, by = bx[order], by[order]
    jx, jy = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
    ix = (bx[:, None, None] * block + jx[None]).reshape(-1)
    iy = (by[:, None, None] * block + jy[None]).reshape(-1)
    nodes = torch.as_tensor(lo + step * np.stack([ix, iy], -1), dtype=torch.float64)
    l32, w32, train32, alpha32 = chol[0].float(), w.float(), b.xy[0].float(), alpha[0].float()
    fields = np.empty((len(nodes), 2 + w.shape[1]), dtype=np.float32)
    for k, e in node_chunks(len(nodes)):
        at = _kernel32(nodes[k:e].float(), train32, length, signal2, nu)  # (N, chunk)
        fields[k:e, 0] = (alpha32 @ at).numpy()
        u = torch.linalg.solve_triangular(l32, at, upper=False)
        fields[k:e, 1] = (u * u).sum(0).numpy()
        fields[k:e, 2:] = (u.T @ w32).numpy()
    return Level(lo, step, block, block_map, fields)


def node_chunks(n: int) -> list[tuple[int, int]]:
    """(start, end) of the triangular solves over n nodes: NODE_CHUNK nodes at a time over the
    former chunking's whole TAIL_CHUNK blocks, and the remainder (n mod TAIL_CHUNK) as one chunk,
    as before. Each node's column is solved, summed and multiplied on its own, so the fields do not
    depend on the chunk while MKL keeps its kernels; it changes them for right-hand sides of a few
    columns (a 2-node last chunk rounded 11 values of two bench cells 1 ulp apart), which this
    remainder never is unless the former chunking's was too."""
    whole = n - n % TAIL_CHUNK
    out = [(k, k + NODE_CHUNK) for k in range(0, whole, NODE_CHUNK)]
    return out + ([(whole, n)] if n > whole else [])


# Nodes per triangular solve: (N, 256) float32 is 1.5 MB at N = 1,500; 256 took ~17% less CPU per
# level than the former 1,024 (the solve is ~3/4 of the build and runs faster on a right-hand side
# that stays in cache), with the same fields bit for bit (`node_chunks`; tested). TAIL_CHUNK: the
# former chunk, whose remainder is still solved as one chunk.
NODE_CHUNK, TAIL_CHUNK = 256, 1024


def _kernel32(nodes: torch.Tensor, train: torch.Tensor, length: float, signal2: float, nu: float) -> torch.Tensor:
    """a(x)' (N, M) in float32 for M nodes: s^2 k_nu(d / l) + S^2 k_nu(d / L), built in place."""
    dx = train[:, None, 0] - nodes[None, :, 0]
    dy = train[:, None, 1] - nodes[None, :, 1]
    d = dx.mul_(dx).add_(dy.mul_(dy)).add_(1e-9).sqrt_()
    out = None
    for ell, var in ((length, signal2), (gp.LONG_RANGE_LENGTH_M, gp.LONG_RANGE_STD_DB**2)):
        if nu == 0.5:
            term = torch.mul(d, -1.0 / ell).exp_()
        else:
            c = math.sqrt(3.0) if nu == 1.5 else math.sqrt(5.0)
            s = torch.mul(d, c / ell)
            e = torch.neg(s).exp_()
            term = (s.add_(1.0) if nu == 1.5 else s.mul(s).div_(3.0).add_(s).add_(1.0)).mul_(e)
        term.mul_(var)
        out = term if out is None else out.add_(term)
    return out


def build(fitted, i: int, *, rng: np.random.Generator | None = None) -> CellRaster | None:
    """Raster of cell i of a `FittedCells`, or None when it would be too large or its fine level
    fails its check (a coarse level that fails is built again at FAR_RETRY_STEPS_PER_LENGTH, and
    dropped alone when none passes)."""
    rng = np.random.default_rng(0) if rng is None else rng
    s = fitted.settings
    nu = gp.MATERN_NU[s.kernel]
    with torch.no_grad():
        cell = fitted._cell(i, torch.device("cpu"))
        b, theta, chol, alpha = cell
        length, signal2, _ = fastvar._params(theta, s.floor_db)
        base = min(length, gp.LONG_RANGE_LENGTH_M)
        train = b.xy[0].numpy()
        fine_step = base / FINE_STEPS_PER_LENGTH
        lo_f, block_f, act_f = footprint(train, fine_step, FINE_MARGIN_M)
        if int(act_f.sum()) * block_f**2 > MAX_NODES:
            STATS["refused_size"] += 1
            return None
        bh_v = b.h[0] * gp.basis_prior_var(b.h)
        w = torch.linalg.solve_triangular(chol[0], signal2 * bh_v, upper=False)  # (N, P)
        fine = _level(cell, lo_f, fine_step, block_f, act_f, nu, length, signal2, w)
        raster = CellRaster([fine], (signal2 * (bh_v.T @ alpha[0])).numpy(), (w.T @ w).numpy(),
                            alpha[0].numpy().copy(), train.copy(), (length, signal2, nu))
        fine.check_err_db = check(fitted, i, raster, fine, rng=rng)
        if not max(fine.check_err_db) <= TOLERANCE_DB:
            STATS["refused_check"] += 1
            return None
        for k, steps in enumerate((FAR_STEPS_PER_LENGTH, *FAR_RETRY_STEPS_PER_LENGTH)):
            far_step = base / steps
            lo_c, block_c, act_c = footprint(train, far_step, FAR_MARGIN_M)
            act_c &= ~_covered(act_c, lo_c, block_c * far_step, fine, 2.0 * (far_step + fine_step))
            if not act_c.any() or (k and int(act_c.sum()) * block_c**2 > MAX_NODES):  # a retry's size is bounded too
                break
            if k:
                STATS["far_retried"] += 1
            far = _level(cell, lo_c, far_step, block_c, act_c, nu, length, signal2, w)
            raster.levels.append(far)
            far.check_err_db = check(fitted, i, raster, far, rng=rng)
            if max(far.check_err_db) <= TOLERANCE_DB:
                break
            raster.levels.pop()
    STATS["built"] += 1
    return raster


def _covered(active: np.ndarray, lo: np.ndarray, side: float, fine: Level, pad: float) -> np.ndarray:
    """Coarse blocks whose square, grown by `pad` metres, lies inside the fine level's blocks (the
    fine level answers every row there, so the coarse nodes would go unused)."""
    fside = fine.block * fine.step
    ticks = np.linspace(-pad, side + pad, int(math.ceil((side + 2 * pad) / (0.5 * fside))) + 1)
    px, py = np.meshgrid(ticks, ticks, indexing="ij")
    offs = np.stack([px.ravel(), py.ravel()], -1)
    bx, by = np.nonzero(active)
    pts = lo + side * np.stack([bx, by], -1)[:, None, :] + offs[None]  # (blocks, T, 2)
    g = np.floor((pts - fine.lo) / fside).astype(np.int64)
    nbx, nby = fine.block_map.shape
    ok = (g[..., 0] >= 0) & (g[..., 1] >= 0) & (g[..., 0] < nbx) & (g[..., 1] < nby)
    inside = ok & (fine.block_map[np.clip(g[..., 0], 0, nbx - 1), np.clip(g[..., 1], 0, nby - 1)] >= 0)
    out = np.zeros_like(active)
    out[bx, by] = inside.all(-1)
    return out


def check(fitted, i: int, raster: CellRaster, level: Level, *, rng: np.random.Generator,
          n: int = CHECK_POINTS) -> tuple[float, float]:
    """Max |mean| and |latent std| difference (dB) against the exact path at n random points of
    `level`'s blocks (uniform; loads uniform on [0, 1] for a load model), predicted by the raster's
    levels so far; inf when none of them is inside."""

    s, a = fitted.settings, fitted.arrays
    ids = np.flatnonzero(level.block_map.reshape(-1) >= 0)
    pick = rng.choice(ids, n)
    side = level.block * level.step
    bxy = np.stack(np.unravel_index(pick, level.block_map.shape), -1)
    xy = level.lo + side * (bxy + rng.uniform(0.0, 1.0, (n, 2)))
    rho = rng.uniform(0.0, 1.0, n) if s.uses_load else None
    origin = a["origin_xy_m"][i]
    h = fitted.basis(i, xy + origin, rho)
    mean, var, inside = raster.latent(xy, h)
    if not inside.any():
        return (float("inf"), float("inf"))
    b, theta, chol, alpha = fitted._cell(i, torch.device("cpu"))
    tt = lambda v: torch.as_tensor(v[inside], dtype=torch.float64)[None]  # noqa: E731
    mu_x, var_x = fastvar.predict_latent(b, theta, chol, alpha, tt(xy), tt(h), nu=gp.MATERN_NU[s.kernel],
                                         floor_db=s.floor_db, mode="exact")
    return (float(np.abs(mean[inside] - mu_x[0].numpy()).max()),
            float(np.abs(np.sqrt(var[inside]) - np.sqrt(var_x[0].numpy())).max()))


def build_all(fitted, *, seed: int = 0) -> dict[int, CellRaster]:
    """Rasters of every cell of a `FittedCells` that gets one; each cell's factor is released after."""
    out = {}
    for i in range(len(fitted.cell_ids)):
        r = build(fitted, i, rng=np.random.default_rng([seed, i]))
        fitted._solved.pop(i, None)
        if r is not None:
            out[i] = r
    return out


def path_of(model_path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + SUFFIX)


def save(rasters: dict[int, CellRaster], model_path) -> None:
    """`<model_path>.raster.safetensors` (arrays) + `.json` (per cell and level: grid, check errors)."""
    from safetensors.numpy import save_file

    base = path_of(model_path)
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {"format": FORMAT, "cells": {}}
    for i, r in rasters.items():
        for name in ("c", "wtw", "alpha", "train_xy"):
            tensors[f"{i}.{name}"] = np.ascontiguousarray(getattr(r, name), dtype=np.float64)
        levels = []
        for k, lev in enumerate(r.levels):
            tensors[f"{i}.{k}.fields"] = np.ascontiguousarray(lev.fields)
            tensors[f"{i}.{k}.block_map"] = np.ascontiguousarray(lev.block_map)
            levels.append({"lo": lev.lo.tolist(), "step": lev.step, "block": lev.block,
                           "check_err_db": list(lev.check_err_db)})
        meta["cells"][str(i)] = {"params": list(r.params), "levels": levels}
    save_file(tensors, str(base) + ".safetensors") if tensors else None
    Path(str(base) + ".json").write_text(json.dumps(meta))


def save_for(fitted, model_path, *, seed: int = 0) -> dict[int, CellRaster]:
    """Build and save the rasters of a model file just written to `model_path` (the radio stage)."""
    rasters = build_all(fitted, seed=seed)
    save(rasters, model_path)
    return rasters


def load(model_path) -> Mapping[int, CellRaster]:
    """The rasters saved next to a model file ({} when there are none, e.g. older models), as a
    read-only mapping that reads a cell's arrays on first access (`LazyRasters`): a generate
    prediction task owns a share of the cells, and the rasters of 10^3 cells are
    ~0.9 GB of float32 fields, which every task read whole before."""
    base = path_of(model_path)
    meta_path = Path(str(base) + ".json")
    if not meta_path.is_file():
        return {}
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or not meta["cells"]:
        return {}
    return LazyRasters(str(base) + ".safetensors", meta["cells"])


class LazyRasters(Mapping):
    """{cell index: CellRaster} over one `.raster.safetensors` file, each cell read on first
    access (the same arrays `safetensors.numpy.load_file` gives) and kept. Pickles as a plain
    dict of every cell."""

    def __init__(self, path: str, cells_meta: dict):
        self._path, self._meta = path, cells_meta
        self._cells: dict[int, CellRaster] = {}
        self._file, self._stamp = None, None

    def __getitem__(self, i: int) -> CellRaster:
        i = int(i)
        got = self._cells.get(i)
        if got is None:
            m = self._meta.get(str(i))
            if m is None:
                raise KeyError(i)
            # The file is memory-mapped: one rewritten under the mapping (a rerun of the radio
            # stage with the same run id) is refused, never read.
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._file is None:
                from safetensors import safe_open

                self._file, self._stamp = safe_open(self._path, framework="numpy"), stamp
            elif stamp != self._stamp:
                raise RuntimeError(f"{self._path} changed after its models were loaded; load them again")
            t = self._file.get_tensor
            levels = [Level(np.asarray(lv["lo"], dtype=float), float(lv["step"]), int(lv["block"]), t(f"{i}.{k}.block_map"),
                            t(f"{i}.{k}.fields"), tuple(lv["check_err_db"])) for k, lv in enumerate(m["levels"])]
            got = CellRaster(levels, t(f"{i}.c"), t(f"{i}.wtw"), t(f"{i}.alpha"), t(f"{i}.train_xy"), tuple(m["params"]))
            self._cells[i] = got
        return got

    def __contains__(self, i: object) -> bool:
        try:
            return str(int(i)) in self._meta  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def __iter__(self):
        return (int(k) for k in self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __reduce__(self):
        return (dict, (dict(self.items()),))
