"""Spatial-block cross-validation of the whole per-cell fit, inside the training rows.

The closed-form block CV (`gp.held_out`) keeps everything fitted on all rows: the site estimate
(the centre of the strongest rows), the mean's least-squares centre and the GP hyperparameters.
All three have seen the held-out block, so that CV is optimistic about gaps (issue 14: block-gap
intervals too narrow). Here every fold refits them from the other folds' rows only: site
(unless the cells table gave one), prior mean, and hyperparameters (on up to
FOLD_HYPER_ROWS rows, the cost bound), then predicts the fold's rows with the exact GP. Returned
per cell and row: error of the GP mean, latent and noise variance, distance to the nearest
fold-training row, error of the kNN mean (k as chosen for the cell), stationary prior variance
(`gp.stationary_prior_var` with the fold's hyperparameters), distance to the fold's site
estimate (or the given site), and with `tree_seeds` (stacking.TREE_STACK) the error of the cell's forest
refitted on the fold's training residuals (`stacking.CellForest`; a cell whose seed is None has no forest: the GP's
error there). Rows of a fold whose
training side has fewer than MIN_FOLD_TRAIN rows are not predicted (NaN).

FOLD_THETA (session 18, rules F and F') says where a fold's hyperparameters come from: "refit" re-runs the
grid search on the fold's training rows (the hyperparameters see no held-out row); "cell" takes the cell's
own theta as `fit_cells` fitted it on the cell's hyper rows, which skips the folds' grid searches (23-35% of
the radio fit's CPU, session 17's profile) at the price of a mild leak: 3 numbers fitted on rows that
include the held-out fold's; "cell_random" does so only for the random folds (the set that feeds the mean's
stack weights under calibration.RANDOM_CV "kfold_mean"), while the block and half-plane folds (which the
epistemic factors are fitted on) refit. `cell_theta(kind)` says which; `fit_cells` passes `theta` to
`fold_errors` exactly for those calls, and `fold_errors` uses a given theta and refits without one. Either
way a fold draws its hyper subsample from the cell's rng, so the rng streams (and every later draw) are the
same under all modes.
"""

from __future__ import annotations

import numpy as np
import torch

from cellsynth.radio import gp
from cellsynth.radio import stacking as stk
from cellsynth.radio.geometry import basis, estimate_site, prior_mean, site_offset

# Hyperparameter refit per fold on at most this many rows (a priori: half the full fit's 500, so
# the three folds together cost about as much as the full fit; fewer rows only widen the
# hyperparameters' spread, which errs on the side of wider intervals).
FOLD_HYPER_ROWS = 250
MIN_FOLD_TRAIN = 10
# "refit": each fold refits the hyperparameters (gp.fit_theta_grid on its FOLD_HYPER_ROWS rows); "cell": each
# fold uses the cell's own theta from fit_cells (rule F, session 18: 0.62x the fit's CPU, but rejected: the
# ratio of the epistemic std 3 km out to that at the training rows fell 8.5%; README, radio model choices);
# "cell_random": only the random folds do (rule F', session 18: 0.81x the fit's CPU, but rejected: that ratio fell
# 2.8%, mostly one UCC blocks split whose epistemic std at the training rows rose; README, radio model choices).
FOLD_THETA = "refit"
# per FOLD_THETA, the kinds of fold ("block", "random", "halfplane") that use the cell's own theta
_CELL_THETA_KINDS = {"refit": (), "cell": ("block", "random", "halfplane"), "cell_random": ("random",)}


def cell_theta(kind: str) -> bool:
    """Whether folds of `kind` ("block", "random" or "halfplane") use the cell's own theta under FOLD_THETA."""
    if FOLD_THETA not in _CELL_THETA_KINDS:
        raise ValueError(f"foldcv: FOLD_THETA must be one of {sorted(_CELL_THETA_KINDS)}, got {FOLD_THETA!r}")
    if kind not in _CELL_THETA_KINDS["cell"]:
        raise ValueError(f"foldcv.cell_theta: unknown fold kind {kind!r}")
    return kind in _CELL_THETA_KINDS[FOLD_THETA]


def fold_errors(xy: list[np.ndarray], y: list[np.ndarray], w: list[np.ndarray], rho: list[np.ndarray] | None,
                origins_given: list[np.ndarray | None], azimuths: list[float | None], groups: list[np.ndarray],
                knn_k: np.ndarray, *, nu: float, floor_db: float, rngs: list[np.random.Generator], batch_of,
                device, knn_weighted: bool = False, tree_seeds: list[int] | None = None,
                shared: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                theta: np.ndarray | None = None) -> list[np.ndarray]:
    """(7, n) per cell: GP error, latent variance, noise variance, distance, kNN error, stationary
    prior variance, distance to the site (NaN where
    the row was not predicted); with `tree_seeds` (one per cell) (8, n), the forest's error last.
    `groups` gives each row's fold; `batch_of` is model._batch_of.
    `shared` (optional, per cell): (distances, long-range correlation) (n, n) between the cell's
    rows relative to its given site; a fold that fits the cell alone (a batch of one, no padding)
    takes its submatrices instead of recomputing them (the same entries: the same floats).
    `theta` (n_cells, 3) (optional): the cells' own hyperparameters, which every fold then uses instead of
    its grid search (`fit_cells` passes it where `cell_theta` says so); None: every fold refits them."""
    own_theta = theta is not None
    if own_theta and np.shape(theta) != (len(y), 3):
        raise ValueError("fold_errors: theta needs one row of 3 per cell")
    n_cells = len(y)
    # one entry per cell: a fold where only cell j > 0 takes part looks up shared[j] (a one-entry list for a
    # chunk of several cells raised IndexError there, on a real split where cell 0 sat out a block fold)
    if shared is not None and len(shared) != n_cells:
        raise ValueError(f"fold_errors: shared needs one entry per cell ({len(shared)} for {n_cells})")
    out = [np.full((7 if tree_seeds is None else 8, len(v)), np.nan) for v in y]
    for g in range(int(max(gr.max() for gr in groups)) + 1):
        cells, parts = [], []
        for i in range(n_cells):
            te = np.flatnonzero(groups[i] == g)
            tr = np.flatnonzero(groups[i] != g)
            if len(te) == 0 or len(tr) < MIN_FOLD_TRAIN:
                continue
            r_tr = None if rho is None else rho[i][tr]
            origin = origins_given[i] if origins_given[i] is not None else estimate_site(xy[i][tr], y[i][tr])
            hgt = site_offset(xy[i][tr], y[i][tr], origins_given[i] is None)
            b0, on = prior_mean(xy[i][tr], y[i][tr], origin, azimuths[i], r_tr, w[i][tr], hgt,
                                estimated=origins_given[i] is None)
            az = float(azimuths[i]) if on else 0.0
            h_tr = basis(xy[i][tr], origin, az, on, r_tr, hgt)
            h_te = basis(xy[i][te], origin, az, on, None if rho is None else rho[i][te], hgt)
            cells.append(i)
            parts.append((tr, te, origin, b0, h_tr, h_te))
        if not cells:
            continue
        b = batch_of([xy[i][p[0]] - p[2] for i, p in zip(cells, parts)], [y[i][p[0]] for i, p in zip(cells, parts)],
                     [w[i][p[0]] for i, p in zip(cells, parts)], [p[4] for p in parts], np.array([p[3] for p in parts]), device)
        # drawn under both FOLD_THETA modes: the cells' rng streams stay the same
        sub_rows = [np.sort(rngs[i].choice(len(p[0]), FOLD_HYPER_ROWS, replace=False)) if len(p[0]) > FOLD_HYPER_ROWS
                    else np.arange(len(p[0])) for i, p in zip(cells, parts)]
        hb = None if own_theta else batch_of([xy[i][p[0]][s] - p[2] for i, p, s in zip(cells, parts, sub_rows)],
                      [y[i][p[0]][s] for i, p, s in zip(cells, parts, sub_rows)],
                      [w[i][p[0]][s] for i, p, s in zip(cells, parts, sub_rows)], [p[4][s] for p, s in zip(parts, sub_rows)],
                      np.array([p[3] for p in parts]), device)
        cross = None
        # one cell with its site given: its rows' distances and long-range correlation are the
        # cell's own (origin fixed), so every fold's matrices are submatrices of the shared ones
        if len(cells) == 1 and shared is not None and shared[cells[0]] is not None and origins_given[cells[0]] is not None:
            dist_all, long_all = shared[cells[0]]
            tr, te = (torch.as_tensor(v, device=dist_all.device) for v in parts[0][:2])
            sub = lambda m, a, c: m.index_select(0, a).index_select(1, c)[None]  # noqa: E731
            b.share_parts(sub(dist_all, tr, tr), sub(long_all, tr, tr))
            if hb is not None:
                tr_h = tr[torch.as_tensor(sub_rows[0], device=tr.device)]
                hb.share_parts(sub(dist_all, tr_h, tr_h), sub(long_all, tr_h, tr_h))
            cross = (sub(dist_all, te, tr), sub(long_all, te, tr))
        with torch.no_grad():
            if own_theta:
                th = torch.as_tensor(np.asarray(theta, dtype=np.float64)[cells], dtype=torch.float64, device=device)
            else:
                th, _ = gp.fit_theta_grid(hb, nu=nu, floor_db=floor_db)
            chol, alpha = gp.solve(b, th, nu=nu, floor_db=floor_db)
            m_te = max(len(p[1]) for p in parts)
            t = lambda v: torch.as_tensor(v, dtype=torch.float64, device=device)  # noqa: E731
            xte = t(gp.pad_rows([xy[i][p[1]] - p[2] for i, p in zip(cells, parts)], m_te))
            hte = t(gp.pad_rows([p[5] for p in parts], m_te))
            mu, var = gp.predict_latent(b, th, chol, alpha, xte, hte, nu=nu, floor_db=floor_db, parts=cross)
            dist = torch.cdist(xte, b.xy).masked_fill(~b.mask[:, None, :], float("inf"))
            knn = stk.knn_means(dist, b.r, int(max(knn_k)), b.w if knn_weighted else None)[0]
            noise2 = gp.unpack(th, floor_db)[2]
            # each cell's kNN column (its own k), then one device-to-host copy per array, not per cell
            kcol = torch.as_tensor(np.asarray(knn_k, dtype=np.int64) - 1, device=knn.device)[cells]
            knn = torch.gather(knn, 2, kcol[:, None, None].expand(-1, knn.shape[1], 1))[..., 0]
            mu, var, near, knn, noise2, prior = (v.cpu().numpy() for v in (mu, var, dist.amin(-1), knn, noise2,
                                                                   gp.stationary_prior_var(th, floor_db=floor_db)))
            if tree_seeds is not None:
                b_xy, b_r, b_w = b.xy.cpu().numpy(), b.r.cpu().numpy(), b.w.cpu().numpy()
        for j, (i, p) in enumerate(zip(cells, parts)):
            n_te = len(p[1])
            r_te = y[i][p[1]] - p[5] @ p[3]
            out[i][0, p[1]] = r_te - mu[j, :n_te]
            out[i][1, p[1]] = var[j, :n_te]
            out[i][2, p[1]] = float(noise2[j]) / w[i][p[1]]
            out[i][3, p[1]] = near[j, :n_te]
            out[i][4, p[1]] = r_te - knn[j, :n_te]
            out[i][5, p[1]] = float(prior[j])
            out[i][6, p[1]] = np.hypot(*(xy[i][p[1]] - p[2]).T)
            if tree_seeds is not None and tree_seeds[i] is None:  # a cell without a forest (rule T'): the tree term 0
                out[i][7, p[1]] = out[i][0, p[1]]
            elif tree_seeds is not None:  # the forest refitted on the fold's training residuals (its own seed per fold)
                n_tr = len(p[0])
                forest = stk.CellForest(b_xy[j, :n_tr], b_r[j, :n_tr], b_w[j, :n_tr], tree_seeds[i] + 7919 * (g + 1))
                out[i][7, p[1]] = r_te - forest.predict(xy[i][p[1]] - p[2])
    return out
