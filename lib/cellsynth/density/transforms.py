"""Pure functions of the density stage: association (GUMBLE eq. 15 or MAP), spatial maps, 2-D KS.

Maps are sparse frames (gx, gy, prob) on squares gx = floor(x_m / res_m); each sums to 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import shapely

from cellsynth.density._grid import kde_square_masses, sparse_map, to_dense
from cellsynth.density.model import GaussianKDE2D, check_xy
from cellsynth.splits import stable_argsort

__all__ = [
    "CellSupportIndex",
    "associate_dense",
    "association_log_prior",
    "select_association_scale",
    "kde_map",
    "ks_2d_maps",
]


# Bound grids of the pruned association (CellSupportIndex._grid): squares of h / 3, fixed for cost
# on the generate bench's world (h / 2, 3, 4 cost alike there; answers are identical at any step:
# a centre's distance is known to within one square, so the bounds' gap at distance d is about
# 2d / 3h nats and only the pruning's strength depends on it); BOUND_TOL absorbs rounding of bounds and scores (both far smaller).
GRID_STEPS_PER_BANDWIDTH = 3
GRID_WORK_RATIO = 0.25  # build a cell's grid when its exact scoring would cost more (`_grid_pays`)
BOUND_TOL = 1e-6


def association_log_prior(n_reports: Sequence[int], *, mode: str = "map") -> np.ndarray:
    """log P(cell) for the association rule: log(n_i / n) for `map`, zeros for `ml` (eq. 15).

    `n_reports` are the cells' training reports in the window, so the prior is each cell's share
    of the window's reports. With it, argmax_i [log f_i(x) + log(n_i / n)] is the Bayes rule
    (posterior argmax); without it a cell with 5 reports weighs as much as one with 5,000.
    """
    if mode not in ("map", "ml"):
        raise ValueError(f"association mode: expected 'map' or 'ml', got {mode!r}")
    counts = np.asarray(n_reports, dtype=float)
    if mode == "ml":
        return np.zeros(len(counts))
    if (counts <= 0).any():
        raise ValueError("n_reports: every cell needs at least one report for the map prior")
    return np.log(counts / counts.sum())


def associate_dense(
    cell_ids: Sequence[str], kdes: Sequence[GaussianKDE2D], xy_m: np.ndarray, *, log_prior: Sequence[float] | None = None
) -> np.ndarray:
    """Association by brute force: every position against every cell (test/bench reference).

    Scores log f_i(x) + log_prior[i] (GUMBLE eq. 15 when `log_prior` is None or zeros; the MAP
    rule with `association_log_prior(..., mode="map")`). Ties go to the earlier cell in `cell_ids`.
    """
    xy = check_xy(xy_m)
    prior = np.zeros(len(kdes)) if log_prior is None else np.asarray(log_prior, dtype=float)
    best = np.full(len(xy), -np.inf)
    best_idx = np.zeros(len(xy), dtype=np.int64)
    for i, kde in enumerate(kdes):
        score = kde.score_samples(xy) + prior[i]
        better = score > best
        best[better] = score[better]
        best_idx[better] = i
    return np.asarray(cell_ids, dtype=object)[best_idx]



@functools.lru_cache(maxsize=1)
def _blas_controller():
    """One threadpoolctl controller per process: `threadpool_limits` scans every loaded shared
    library on each call (~0.2 s in a generate worker with torch and pyarrow loaded, per tile)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class CellSupportIndex:
    """Pruned association: score a position only against cells whose support box is near it.

    A cell i is a candidate at p when p lies within k * h_i of the bounding box of its training
    positions (an STR-tree over the inflated boxes finds them). Outside that reach every kernel
    term is below exp(-k^2/2), so log f_i(p) + log_prior_i < -log(2 pi h_i^2) - k^2/2 +
    max_j log_prior_j <= `bound_`. A position whose best candidate scores at least `bound_`
    therefore has the same argmax as dense scoring; the rare rest (no candidate, or all
    candidates below the bound) are scored against every cell whose own bound (kernel peak at
    the distance to its box) reaches the score of their most promising cell, so the answer
    always equals `associate_dense` with the same `log_prior` (None: eq. 15, no prior).

    Candidates are scored in one vectorised pass (every (position, cell) pair against the
    cell's kernel centres, a segmented log-sum-exp). Each position's most promising pair is
    scored first; a pair whose upper bound -log(2 pi h_i^2) - d_i^2 / (2 h_i^2) + log_prior_i
    (d_i: distance to the cell's box, which no kernel centre is nearer than) is below that
    score cannot win and is not scored.

    `kdes` may be a callable i -> KDE (with `boxes_m` and `bandwidths_m` given): only the KDEs of
    cells that are candidates somewhere are then built (a generate tile loads its neighbourhood
    only); the fallback loads only the cells that can win at its positions.
    """

    def __init__(self, cell_ids: Sequence[str], kdes: Sequence[GaussianKDE2D] | Callable[[int], GaussianKDE2D], *,
                 k_bandwidths: float = 6.0, log_prior: Sequence[float] | None = None,
                 boxes_m: np.ndarray | None = None, bandwidths_m: Sequence[float] | None = None) -> None:
        self.cell_ids = np.asarray(cell_ids, dtype=object)
        n = len(self.cell_ids)
        if callable(kdes):
            if boxes_m is None or bandwidths_m is None:
                raise ValueError("kdes: a callable needs boxes_m and bandwidths_m")
            self._kde_of, self._kdes = kdes, {}
        else:
            kdes = list(kdes)
            if len(kdes) != n:
                raise ValueError(f"cell_ids/kdes: expected equal non-zero lengths, got {n} and {len(kdes)}")
            self._kde_of, self._kdes = None, dict(enumerate(kdes))
            boxes_m = np.array([k.support_box_m for k in kdes]) if n else np.empty((0, 4))
            bandwidths_m = [k.bandwidth_m_ for k in kdes]
        if not n:
            raise ValueError(f"cell_ids/kdes: expected equal non-zero lengths, got {n} and 0")
        self.k_bandwidths = float(k_bandwidths)
        self.log_prior = np.zeros(n) if log_prior is None else np.asarray(log_prior, dtype=float)
        if self.log_prior.shape != (n,) or not np.isfinite(self.log_prior).all():
            raise ValueError(f"log_prior: expected {n} finite values, got shape {self.log_prior.shape}")
        self.boxes_m = np.asarray(boxes_m, dtype=float).reshape(n, 4)
        self.bandwidths_m = np.asarray(bandwidths_m, dtype=float).reshape(n)
        reach = self.k_bandwidths * self.bandwidths_m
        b = self.boxes_m
        self._tree = shapely.STRtree(shapely.box(b[:, 0] - reach, b[:, 1] - reach, b[:, 2] + reach, b[:, 3] + reach))
        h_min = float(self.bandwidths_m.min())
        self.bound_ = -math.log(2 * math.pi * h_min**2) - self.k_bandwidths**2 / 2 + float(self.log_prior.max())
        self.n_dense_fallback_ = 0
        self._centres: dict[int, np.ndarray] = {}
        self._centres_aug: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._grids: dict[int, tuple[float, float, float, np.ndarray, np.ndarray]] = {}

    @property
    def kdes(self) -> list[GaussianKDE2D]:
        """Every cell's KDE (builds the ones not loaded yet)."""
        return [self.kde(i) for i in range(len(self.cell_ids))]

    def kde(self, i: int) -> GaussianKDE2D:
        if i not in self._kdes:
            self._kdes[i] = self._kde_of(i)
        return self._kdes[i]

    @property
    def n_loaded_(self) -> int:
        """KDEs built so far (all of them when the index was given a list)."""
        return len(self._kdes)

    def candidates(self, xy_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(point_index, cell_index) pairs of every position with its candidate cells."""
        pairs = self._tree.query(shapely.points(xy_m[:, 0], xy_m[:, 1]), predicate="intersects")
        return pairs[0].astype(np.int64), pairs[1].astype(np.int64)

    def _scores(self, xy: np.ndarray, pidx: np.ndarray, cidx: np.ndarray) -> np.ndarray:
        """log f_c(x_p) + log_prior_c for each pair, exact (segmented log-sum-exp over the
        cell's kernel centres), in chunks of about 2M kernel terms."""
        out = np.empty(len(pidx))
        cells = np.unique(cidx)
        for c in cells.tolist():
            if c not in self._centres:
                self._centres[c] = self.kde(c).positions_
        sizes = np.zeros(len(self.cell_ids), dtype=np.int64)
        sizes[cells] = [len(self._centres[c]) for c in cells.tolist()]
        order = stable_argsort(cidx)
        terms = sizes[cidx[order]]
        ends = np.cumsum(terms)
        start = 0
        while start < len(order):
            stop = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + 2_000_000, side="right"))
            stop = max(stop, start + 1)
            sel = order[start:stop]
            self._score_chunk(xy, pidx[sel], cidx[sel], sizes, out, sel)
            start = stop
        return out

    def _score_chunk(self, xy: np.ndarray, p: np.ndarray, c: np.ndarray, sizes: np.ndarray, out: np.ndarray,
                     sel: np.ndarray) -> None:
        # Pairs sorted by cell: per cell one (points x centres) block. In coordinates relative to
        # the cell's first centre, -|x - c|^2 / (2 h^2) = -|x|^2 / (2 h^2) + (2 x.c - |c|^2) / (2 h^2):
        # the second term of every (point, centre) is one matrix product of [x / h^2, -1 / (2 h^2)]
        # with [c, |c|^2] (cached per cell), and the first, constant per point, comes out of the
        # log-sum-exp (half the passes over the block of the plain expansion; issue 15).
        del sizes
        cuts = np.flatnonzero(np.r_[True, c[1:] != c[:-1], True])
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            cell = int(c[lo])
            aug = self._centres_aug.get(cell)
            if aug is None:
                centres = self._centres[cell]
                ctr = centres - centres[0]
                aug = (centres[0], np.ascontiguousarray(np.column_stack([ctr, np.einsum("ij,ij->i", ctr, ctr)]).T))
                self._centres_aug[cell] = aug
            origin, ctr_aug = aug
            h2 = float(self.bandwidths_m[cell]) ** 2
            pts = xy[p[lo:hi]] - origin
            z = np.column_stack([pts / h2, np.full(len(pts), -0.5 / h2)]) @ ctr_aug
            peak = z.max(axis=1)
            z -= peak[:, None]
            np.exp(z, out=z)
            lse = peak + np.log(z.sum(axis=1)) - 0.5 * np.einsum("ij,ij->i", pts, pts) / h2
            out[sel[lo:hi]] = lse - np.log(2 * math.pi * h2 * ctr_aug.shape[1]) + self.log_prior[cell]

    def may_change(self, xy_m: np.ndarray, serving: np.ndarray, changed: np.ndarray) -> np.ndarray:
        """Positions whose `associate` answer may differ from `serving` (their answer before the
        KDEs of the `changed` cells changed; every other cell's KDE and prior the same): those
        where a changed cell is a candidate or was the answer, and those whose answer was not
        sure to beat every non-candidate cell (its score's lower bound under `bound_`, which
        bounds every non-candidate pair of the index as it is now; scored exactly when the grid
        bound is not enough). Elsewhere no score that decides the argmax changed."""
        xy = check_xy(xy_m)
        n = len(xy)
        out = np.zeros(n, dtype=bool)
        if n == 0:
            return out
        pidx, cidx = self.candidates(xy)
        mine = np.isin(self.cell_ids, changed)
        out[pidx[mine[cidx]]] = True
        own = pd.Index(self.cell_ids).get_indexer(serving)
        out |= np.isin(serving, changed) | (own < 0)
        rest = np.flatnonzero(~out)
        if len(rest):
            with _blas_controller().limit(limits=1, user_api="blas"):
                _, lower = self._grid_bounds(xy, rest, own[rest])
                unsure = rest[lower < self.bound_ + BOUND_TOL]
                if len(unsure):
                    exact = self._scores(xy, unsure, own[unsure])
                    out[unsure[exact < self.bound_ + BOUND_TOL]] = True
        return out

    def reassociate(self, xy_m: np.ndarray, serving: np.ndarray, changed: np.ndarray) -> np.ndarray:
        """`associate`'s answers for positions whose answer was `serving` before the KDEs of the `changed` cells
        changed (every other cell's KDE the same; the priors may all move by one constant, the normaliser).

        A position whose old cell is unchanged compares that cell with the changed cells among its candidates
        only: every other candidate lost to the old cell before and its score moved by the same constant at most,
        so it still loses (ties went, and go, to the lower cell index). Bounds first (`_grid_bounds`): the old
        cell stays unscored where its lower bound clears every changed pair's upper bound and `bound_`; else
        the old cell is scored and the changed pairs whose upper bound reaches that score. A position whose old
        cell changed or is unknown, or whose winner scores under `bound_` (a non-candidate could win), gets
        `associate` itself. Scores are `associate`'s (`_scores`, each pair its own), so the answers are
        `associate`'s (tests/generate/test_reuse.py); at 10^3 cells a new day for 5% of cells makes ~3/4 of the
        positions candidates of a changed cell, whose full association scored ~10 pairs each (issue 15)."""
        xy = check_xy(xy_m)
        n = len(xy)
        serving = np.asarray(serving, dtype=object)
        out = serving.copy()
        if n == 0:
            return out
        mine = np.isin(self.cell_ids, np.asarray(changed, dtype=object))
        own = pd.Index(self.cell_ids).get_indexer(serving)
        full = own < 0
        full[~full] = mine[own[~full]]
        rest = np.flatnonzero(~full)
        if len(rest):
            with _blas_controller().limit(limits=1, user_api="blas"):
                p, c = self.candidates(xy[rest])
                sel = mine[c]
                p, c = rest[p[sel]], c[sel]  # the changed cells' pairs
                upper, lower = self._grid_bounds(xy, np.concatenate([rest, p]), np.concatenate([own[rest], c]))
                own_lower, up_c = lower[:len(rest)], upper[len(rest):]
                top = np.full(n, -np.inf)
                np.maximum.at(top, p, up_c)
                unsure = rest[~((top[rest] < own_lower - BOUND_TOL) & (own_lower >= self.bound_ + BOUND_TOL))]
                if len(unsure):
                    floor = np.full(n, -np.inf)
                    floor[unsure] = self._scores(xy, unsure, own[unsure])
                    live = up_c >= floor[p] - BOUND_TOL  # -inf floor (a sure position): never live
                    pp = np.concatenate([unsure, p[live]])
                    cc = np.concatenate([own[unsure], c[live]])
                    scores = np.concatenate([floor[unsure], self._scores(xy, p[live], c[live])])
                    # first row per point after sorting by (point, -score, cell) = argmax, ties to lowest cell
                    order = np.lexsort((cc, -scores, pp))
                    first = order[np.r_[True, pp[order][1:] != pp[order][:-1]]]
                    ok = scores[first] >= self.bound_
                    out[pp[first][ok]] = self.cell_ids[cc[first][ok]]
                    full[pp[first][~ok]] = True
        if full.any():
            out[full] = self.associate(xy[full])
        return out

    def associate(self, xy_m: np.ndarray) -> np.ndarray:
        # Small products (grids of ~10^2 squares a side, blocks of one cell's centres): one BLAS
        # thread; two threads doubled the CPU of a 50k-position tile on the shared 2 cores (issue 15).
        with _blas_controller().limit(limits=1, user_api="blas"):
            return self._associate(xy_m)

    def _associate(self, xy_m: np.ndarray) -> np.ndarray:
        xy = check_xy(xy_m)
        n = len(xy)
        best_idx = np.full(n, -1, dtype=np.int64)
        best = np.full(n, -np.inf)
        if n == 0:
            return np.empty(0, dtype=object)
        pidx, cidx = self.candidates(xy)
        if len(pidx):
            # Bounds of each pair from the cells' count grids (`_grid_bounds`): a pair whose upper
            # bound is below the best lower bound of its point cannot win and is dropped; a point
            # left with one pair whose lower bound clears `bound_` is resolved without scoring.
            upper, lower = self._grid_bounds(xy, pidx, cidx)
            floor = np.full(n, -np.inf)
            np.maximum.at(floor, pidx, lower)
            live = upper >= floor[pidx] - BOUND_TOL
            pidx, cidx, upper, lower = pidx[live], cidx[live], upper[live], lower[live]
            n_live = np.bincount(pidx, minlength=n)
            alone = (n_live[pidx] == 1) & (lower >= self.bound_ + BOUND_TOL)
            best_idx[pidx[alone]] = cidx[alone]
            best[pidx[alone]] = lower[alone]
            self.n_scored_ = int((~alone).sum())
            pidx, cidx, upper = pidx[~alone], cidx[~alone], upper[~alone]
        if len(pidx):
            # Score each point's most promising pair first; its score is a floor for the rest.
            top = np.lexsort((cidx, -upper, pidx))
            top = top[np.r_[True, pidx[top][1:] != pidx[top][:-1]]]
            floor = np.full(n, -np.inf)
            floor[pidx[top]] = self._scores(xy, pidx[top], cidx[top])
            keep = upper >= floor[pidx] - BOUND_TOL
            keep[top] = False
            pidx = np.concatenate([pidx[top], pidx[keep]])
            cidx = np.concatenate([cidx[top], cidx[keep]])
            scores = np.concatenate([floor[pidx[: len(top)]], self._scores(xy, pidx[len(top):], cidx[len(top):])])
            # First row per point after sorting by (point, -score, cell) = argmax, ties to lowest cell.
            sel = np.lexsort((cidx, -scores, pidx))
            first = sel[np.r_[True, pidx[sel][1:] != pidx[sel][:-1]]]
            best_idx[pidx[first]] = cidx[first]
            best[pidx[first]] = scores[first]
        unresolved = np.flatnonzero(~(best >= self.bound_))
        self.n_dense_fallback_ = len(unresolved)
        out = np.empty(n, dtype=object)
        out[:] = self.cell_ids[np.maximum(best_idx, 0)]
        if len(unresolved):
            out[unresolved] = self.cell_ids[self._associate_bounded(xy[unresolved])]
        return out

    def _grid(self, c: int) -> tuple[float, float, float, np.ndarray, np.ndarray]:
        """Cell c's bound grid: squares of side h / GRID_STEPS_PER_BANDWIDTH over its box + reach
        (+ one square), and per square an upper and a lower bound of log f_c(x) + log_prior_c for
        every x in the square. With the kernel centres counted per square (N), a centre in square
        (i+a, j+b) lies between max(|a|-1, 0) s and (|a|+1) s from x along the first axis (so for
        the second); the kernel factorises over the axes, so the bounds are A N B' with Toeplitz
        factors exp(-(gap s)^2 / 2h^2) — every centre counted, nothing truncated. Stored as
        float32 rounded outward (the upper up, the lower down)."""
        g = self._grids.get(c)
        if g is None:
            if c not in self._centres:
                self._centres[c] = self.kde(c).positions_
            centres = self._centres[c]
            h = float(self.bandwidths_m[c])
            s = h / GRID_STEPS_PER_BANDWIDTH
            reach = self.k_bandwidths * h + s
            x0, y0 = self.boxes_m[c, 0] - reach, self.boxes_m[c, 1] - reach
            x0, y0 = min(x0, float(centres[:, 0].min()) - s), min(y0, float(centres[:, 1].min()) - s)
            nx = int(math.ceil((max(self.boxes_m[c, 2] + reach, float(centres[:, 0].max()) + s) - x0) / s)) + 1
            ny = int(math.ceil((max(self.boxes_m[c, 3] + reach, float(centres[:, 1].max()) + s) - y0) / s)) + 1
            ix = np.clip(np.floor((centres[:, 0] - x0) / s).astype(np.int64), 0, nx - 1)
            iy = np.clip(np.floor((centres[:, 1] - y0) / s).astype(np.int64), 0, ny - 1)
            counts = np.bincount(ix * ny + iy, minlength=nx * ny).reshape(nx, ny).astype(float)

            def factor(m: int, widen: int) -> np.ndarray:
                return _gap_factor(m, widen, s, h)

            norm = -math.log(2 * math.pi * h * h * len(centres)) + float(self.log_prior[c])
            with np.errstate(divide="ignore"):
                up = np.log(factor(nx, -1) @ counts @ factor(ny, -1).T) + norm
                lo = np.log(factor(nx, 1) @ counts @ factor(ny, 1).T) + norm
            up = up.astype(np.float32)
            up = np.where(np.isfinite(up), np.nextafter(up, np.float32(np.inf)), np.float32(np.inf))
            lo = lo.astype(np.float32)
            lo = np.where(np.isfinite(lo), np.nextafter(lo, np.float32(-np.inf)), np.float32(-np.inf))
            g = (x0, y0, s, up, lo)
            self._grids[c] = g
        return g

    def _grid_pays(self, c: int, n_pairs: int) -> bool:
        """Whether cell c's bound grid is worth building for n_pairs pairs: already built, or its
        exact scores (n_pairs x centres kernel terms) cost more than GRID_WORK_RATIO x the grid's
        products (~nx ny (nx + ny) for squares nx x ny, from the box alone). A fixed cost model,
        a priori: the grid can only save exact scoring, and a cell with few pairs (the
        association-scale CV scores ~20k positions spread over every cell of a window) does not
        repay it (issue 15: grids for every cell of every fold made that CV 6-16x slower)."""
        if c in self._grids:
            return True
        if c not in self._centres:
            self._centres[c] = self.kde(c).positions_
        h = float(self.bandwidths_m[c])
        s = h / GRID_STEPS_PER_BANDWIDTH
        span = 2 * (self.k_bandwidths * h + s)
        nx = (self.boxes_m[c, 2] - self.boxes_m[c, 0] + span) / s + 2
        ny = (self.boxes_m[c, 3] - self.boxes_m[c, 1] + span) / s + 2
        return n_pairs * len(self._centres[c]) >= GRID_WORK_RATIO * nx * ny * (nx + ny)

    def _grid_bounds(self, xy: np.ndarray, pidx: np.ndarray, cidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(upper, lower) bound of log f_c(x_p) + log_prior_c per pair: from cell c's grid where
        it pays (`_grid_pays`), else the kernel peak at the box distance and no lower bound; a
        position outside the grid (only by rounding: the grid holds the cell's whole reach) gets
        no bound (upper +inf, lower -inf)."""
        upper = np.empty(len(pidx))
        lower = np.empty(len(pidx))
        if not len(pidx):
            return upper, lower
        # Per cell (ascending) whether its grid pays, building it if so; then every pair's bound
        # in one vectorised pass over per-pair gathers of its cell's constants (the same
        # element-wise operations, in the same order, as a loop over cells).
        n_pairs = np.bincount(cidx, minlength=len(self.cell_ids))
        on_grid = np.zeros(len(self.cell_ids), dtype=bool)
        x0s, y0s, steps = np.zeros(len(self.cell_ids)), np.zeros(len(self.cell_ids)), np.ones(len(self.cell_ids))
        nxs, nys, offsets = (np.zeros(len(self.cell_ids), dtype=np.int64) for _ in range(3))
        neg_log_peak, two_h2 = np.zeros(len(self.cell_ids)), np.ones(len(self.cell_ids))
        ups, lows, at = [], [], 0
        for c in np.flatnonzero(n_pairs).tolist():
            if not self._grid_pays(c, int(n_pairs[c])):
                h = float(self.bandwidths_m[c])
                neg_log_peak[c], two_h2[c] = -math.log(2 * math.pi * h * h), 2 * h * h
                continue
            x0, y0, step, up, low = self._grid(c)
            on_grid[c] = True
            x0s[c], y0s[c], steps[c], nxs[c], nys[c], offsets[c] = x0, y0, step, up.shape[0], up.shape[1], at
            ups.append(up.ravel())
            lows.append(low.ravel())
            at += up.size
        pts = xy[pidx]
        grid_pair = on_grid[cidx]
        if grid_pair.any():
            g = np.flatnonzero(grid_pair)
            c, px, py = cidx[g], pts[g, 0], pts[g, 1]
            ix = np.floor((px - x0s[c]) / steps[c]).astype(np.int64)
            iy = np.floor((py - y0s[c]) / steps[c]).astype(np.int64)
            nx, ny = nxs[c], nys[c]
            inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
            flat = offsets[c] + np.clip(ix, 0, nx - 1) * ny + np.clip(iy, 0, ny - 1)
            upper[g] = np.where(inside, np.concatenate(ups)[flat], np.inf)
            lower[g] = np.where(inside, np.concatenate(lows)[flat], -np.inf)
        if not grid_pair.all():
            # the kernel peak at the box distance (no centre is nearer), no lower bound
            k = np.flatnonzero(~grid_pair)
            c, px, py = cidx[k], pts[k, 0], pts[k, 1]
            b = self.boxes_m[c]
            dx = np.maximum(np.maximum(b[:, 0] - px, px - b[:, 2]), 0.0)
            dy = np.maximum(np.maximum(b[:, 1] - py, py - b[:, 3]), 0.0)
            upper[k] = neg_log_peak[c] - (dx * dx + dy * dy) / two_h2[c] + self.log_prior[c]
            lower[k] = -np.inf
        return upper, lower

    def _associate_bounded(self, xy: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """`associate_dense`'s answer (cell indices) for positions the candidates did not
        resolve, scoring only the cells that can win: every cell's upper bound (kernel peak at the
        distance to its box, plus its prior) against a floor, the KDE score of each position's
        most promising cell. A cell whose bound is below the floor cannot win, so its KDE is not
        built or scored (the dense rule built every cell's KDE for a single position, which made
        each generate tile's cost grow with the network's cell count). Scores are the KDEs'
        own `score_samples`, as in `associate_dense`; ties go to the lower cell index."""
        out = np.empty(len(xy), dtype=np.int64)
        b, h = self.boxes_m, self.bandwidths_m
        peak = -np.log(2 * math.pi * h * h) + self.log_prior
        for lo in range(0, len(xy), chunk):
            p = xy[lo:lo + chunk]
            dx = np.maximum(np.maximum(b[None, :, 0] - p[:, :1], p[:, :1] - b[None, :, 2]), 0.0)
            dy = np.maximum(np.maximum(b[None, :, 1] - p[:, 1:], p[:, 1:] - b[None, :, 3]), 0.0)
            upper = peak[None, :] - (dx * dx + dy * dy) / (2 * h * h)[None, :]
            rows = np.arange(len(p))
            top = np.argmax(upper, axis=1)
            floor = self._kde_scores(p, rows, top)
            # A bound within 1e-6 of the floor is scored too (rounding of the bound or the score).
            cand_p, cand_c = np.nonzero(upper >= floor[:, None] - 1e-6)
            scores = self._kde_scores(p, cand_p, cand_c)
            order = np.lexsort((cand_c, -scores, cand_p))
            first = order[np.r_[True, cand_p[order][1:] != cand_p[order][:-1]]]
            out[lo:lo + len(p)][cand_p[first]] = cand_c[first]
        return out

    def _kde_scores(self, xy: np.ndarray, pidx: np.ndarray, cidx: np.ndarray) -> np.ndarray:
        """kde(c).score_samples(x_p) + log_prior_c per pair (`associate_dense`'s scores)."""
        out = np.empty(len(pidx))
        for c, sel in _pairs_by_cell(cidx):
            out[sel] = self.kde(c).score_samples(xy[pidx[sel]]) + self.log_prior[c]
        return out


def _gap_factor(m: int, widen: int, s: float, h: float) -> np.ndarray:
    """The (m, m) Toeplitz factor exp(-(max(|i - j| + widen, 0) s)^2 / 2h^2) of `_grid`: its m
    distinct values evaluated once and gathered (the same floats as evaluating all m^2 entries,
    at m exps instead of m^2)."""
    d = np.arange(m)
    vals = np.exp(-(np.maximum(d + widen, 0) * s) ** 2 / (2 * h * h))
    return vals[np.abs(d[:, None] - d[None, :])]


def _pairs_by_cell(cidx: np.ndarray):
    """(cell index, positions in `cidx` of its pairs) per cell, cells ascending, pairs in input order."""
    order = stable_argsort(cidx)
    cuts = np.flatnonzero(np.r_[True, cidx[order][1:] != cidx[order][:-1], True])
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        sel = order[lo:hi]
        yield int(cidx[sel[0]]), sel


def scaled_kdes(kdes: Sequence[GaussianKDE2D], scale: float) -> list[GaussianKDE2D]:
    """The same KDEs with every bandwidth multiplied by `scale` (no refit of the selection)."""
    if scale == 1.0:
        return list(kdes)
    return [GaussianKDE2D.from_positions(k.positions_, k.bandwidth_m_ * scale, source=k.bandwidth_source_) for k in kdes]


def select_association_scale(
    kdes: Sequence[GaussianKDE2D],
    scales: Sequence[float],
    *,
    n_folds: int = 3,
    max_reports: int = 3000,
    k_bandwidths: float = 6.0,
    rng: int | np.random.Generator | None = 0,
) -> tuple[float, dict[float, float]]:
    """The bandwidth scale for MAP association, by K-fold CV accuracy on the KDEs' own positions.

    Eq. 14 picks each cell's bandwidth for density (held-out likelihood); classifying a position
    between neighbouring cells wants less smoothing across their border, so the association
    scores log f_i(x; scale * h_i) + log(n_i / n). The positions are the cells' training reports:
    up to `max_reports` of them (seeded subsample) are split into folds; each fold is associated
    by KDEs and priors rebuilt from the other folds' positions at each scale. Ties go to the
    larger scale (closer to eq. 14).

    Returns:
        (scale, {scale: CV accuracy}).
    """
    from cellsynth.density.model import as_rng

    grid = sorted(float(v) for v in scales)
    if len(grid) == 1 or not len(kdes):
        return grid[-1], {}
    gen = as_rng(rng)
    labels = np.concatenate([np.full(k.n_reports_, i) for i, k in enumerate(kdes)])
    xy = np.vstack([k.positions_ for k in kdes])
    pick = gen.permutation(len(xy))[: min(max_reports, len(xy))]
    fold = np.full(len(xy), -1)
    fold[pick] = np.arange(len(pick)) % n_folds
    hits = dict.fromkeys(grid, 0)
    # Each cell's rows are one contiguous run of `xy` (stacked in order): per fold, its training
    # rows are a slice of that run, so a fold costs O(rows), not O(cells x rows) (issue 15: the
    # per-cell masks over all rows took minutes per window at 10^3 cells).
    bounds = np.concatenate([[0], np.cumsum([k.n_reports_ for k in kdes])])
    for f in range(n_folds):
        held = fold == f
        train = ~held
        rows = [xy[a:b][train[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
        keep_cells = [i for i in range(len(kdes)) if len(rows[i])]
        if not keep_cells or not held.any():
            continue
        counts = np.array([len(rows[i]) for i in keep_cells])
        prior = association_log_prior(counts, mode="map")
        for scale in grid:
            fold_kdes = [
                GaussianKDE2D.from_positions(rows[i], kdes[i].bandwidth_m_ * scale, source=kdes[i].bandwidth_source_)
                for i in keep_cells
            ]
            index = CellSupportIndex(np.asarray(keep_cells, dtype=object), fold_kdes, k_bandwidths=k_bandwidths, log_prior=prior)
            pred = index.associate(xy[held]).astype(np.int64)
            hits[scale] += int((pred == labels[held]).sum())
    n = max(int((fold >= 0).sum()), 1)
    accuracy = {scale: hits[scale] / n for scale in grid}
    best = max(accuracy.values())
    return max(s for s, a in accuracy.items() if a == best), accuracy


def kde_map(kde: GaussianKDE2D, *, resolution_m: float, min_mass: float) -> pd.DataFrame:
    """DEEPMEND spatial diffusion of one cell: P(UE in square | served by the cell) from its KDE."""
    gx, gy, masses = kde_square_masses(kde.positions_, kde.bandwidth_m_, resolution_m=resolution_m)
    return sparse_map(gx, gy, masses, min_mass=min_mass)


def _quadrant_gap(dense_a: np.ndarray, dense_b: np.ndarray) -> np.ndarray:
    # For every square as origin, the largest |A - B| quadrant mass difference, with the split
    # lines taken at each of the square's four corners (x <= a or x < a, y <= b or y < b).
    def padded_cum(arr: np.ndarray) -> np.ndarray:
        return np.pad(arr.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))

    ca, cb = padded_cum(dense_a), padded_cum(dense_b)
    nx, ny = dense_a.shape
    gap = np.zeros((nx, ny))
    for sx in (0, 1):  # 1: the origin column counts as "left" (x <= a); 0: it does not (x < a)
        for sy in (0, 1):
            qa = _quadrants(ca, sx, sy, nx, ny)
            qb = _quadrants(cb, sx, sy, nx, ny)
            gap = np.maximum(gap, np.abs(qa - qb).max(axis=0))
    return gap


def _quadrants(cum: np.ndarray, sx: int, sy: int, nx: int, ny: int) -> np.ndarray:
    xs = np.arange(nx) + sx
    ys = np.arange(ny) + sy
    total = cum[-1, -1]
    q1 = cum[np.ix_(xs, ys)]  # left-below
    left = cum[xs, -1][:, None]
    below = cum[-1, ys][None, :]
    return np.stack([q1, left - q1, below - q1, total - left - below + q1])


def ks_2d_maps(map_a: pd.DataFrame, map_b: pd.DataFrame) -> float:
    """Fasano-Franceschini 2-D Kolmogorov-Smirnov distance between two gridded maps.

    Each square holding mass in a map serves as an origin; the statistic at an origin is the
    largest absolute difference between the two maps' masses over the four quadrants around it,
    with the dividing lines at any of the square's four corners (on a grid the origin's own
    mass has no side; continuous FF never meets that tie), D_a is the maximum over a's squares,
    D_b over map b's, and D = (D_a + D_b) / 2 as in Fasano & Franceschini (1987). Both maps are
    normalised to sum to 1 first. Returns a value in [0, 1]; 1.0 when exactly one map is empty.
    """
    if len(map_a) == 0 or len(map_b) == 0:
        return 0.0 if len(map_a) == len(map_b) else 1.0
    _, _, (dense_a, dense_b) = to_dense([map_a, map_b])
    dense_a = dense_a / dense_a.sum()
    dense_b = dense_b / dense_b.sum()
    gap = _quadrant_gap(dense_a, dense_b)
    d_a = gap[dense_a > 0].max()
    d_b = gap[dense_b > 0].max()
    return float((d_a + d_b) / 2)
