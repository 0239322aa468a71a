"""Batched exact Gaussian-process residual of C cells: padded rows, masks, one Cholesky per cell.

Per cell, with residuals r = y - H beta0 of the physical mean (`geometry.py`):

    r ~ N(0, K),   K = s^2 (k_nu(|x - x'| / l) + H V H^T) + S^2 k_nu(|x - x'| / L) + diag(n^2 / w)

s^2 H V H^T integrates the mean's coefficients out (Rasmussen & Williams 2006, section 2.7), so
their uncertainty is part of the latent variance; their prior covariance scales with s^2 (the
conjugate normal-inverse-gamma form; V = diag(BASIS_PRIOR_STD_DB)^2 / COEF_PRIOR_REF_DB^2), which
lets s^2 be profiled out in closed form. k_nu is a Matern kernel; S^2 k_nu(./L) a longer-range term of fixed size (below)
for what a cell's own residuals cannot show: how much the field changes far away from them; w
are the IPW weights
(GUMBLE eqs. 20-21: a weighted Gaussian likelihood is a noise variance divided by the weight).
GUMBLE eq. 19's split: epistemic = posterior variance of the latent field (mean + GP), aleatoric
= n^2. The epistemic std is bounded by the prior's s^2 (1 + h V h^T), which it returns to far
from the data. Hyperparameters theta = (log l [m], log s [dB], log n [dB]) are MAP estimates
(marginal likelihood times the weak priors below). Fast path (`fit_theta_grid`): for every
(l, n^2 / s^2) on a grid one Cholesky, s by a 1-D Newton solve of the exact MAP objective;
reference path (`pyro_gp.py`): Pyro model + AutoDelta guide optimised by Adam on the same
objective. Every cell's objective is its own, so a cell's fit does not depend on the others in
its batch. Padding rows get K = identity and r = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cellsynth.radio.geometry import basis_prior_std

MATERN_NU = {"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}
# Weak log-normal hyperpriors, fixed a priori (not tuned on data): shadowing decorrelates over
# tens of metres (3GPP TR 38.901 Table 7.5-6: 10-50 m) while terrain and clutter vary over
# hundreds, so the length prior is centred on 80 m with a factor-e^1.5 spread; log-normal
# shadowing std is 4-8 dB (same table), measurement noise a few dB.
LENGTH_PRIOR_M, LENGTH_PRIOR_LOG_STD = 80.0, 1.5
SIGNAL_PRIOR_DB, SIGNAL_PRIOR_LOG_STD = 6.0, 1.0
NOISE_PRIOR_DB, NOISE_PRIOR_LOG_STD = 3.0, 1.0
# The coefficient spreads of geometry.BASIS_PRIOR_STD_DB hold at a residual std of 2 dB and grow
# in proportion to s beyond (at 6 dB: 30 dB on the intercept). Wide on purpose: the prior is
# centred on the cell's least-squares fit, which ignores the spatial field, so a tight prior
# would pull a load effect towards its position-confounded least-squares value (issue 20 item 3).
COEF_PRIOR_REF_DB = 2.0
# Long-range term: 6 dB fixed a priori (the shadow-fading std of 3GPP TR 38.901 Table 7.4.1-1,
# UMa NLOS); its length by training-row CV among 300 m, 1 km and 3 km (leave-one-out and block-CV
# MAE of the training rows, Purdue 80 cells: 3.68/5.18 and 3.40/5.29 dB at 300 m against
# 3.69/5.19, 3.40/5.30 at 1 km and 3.69/5.20, 3.41/5.31 at 3 km). Near the data the posterior
# pins it; far away it is what the epistemic std returns to together with s^2 (>= ~6 dB there).
LONG_RANGE_STD_DB, LONG_RANGE_LENGTH_M = 6.0, 300.0
# Hard bounds that keep the fit physical and the epistemic std bounded (issue 14: <= ~25 dB).
LENGTH_RANGE_M = (5.0, 5000.0)
MAX_SIGNAL_DB = 15.0
# Ceiling of the epistemic std, a priori: +-2 x 25 dB already spans the whole RSRP reporting
# range (96 dB). Only far extrapolations of a poorly pinned log-distance slope reach it.
MAX_EPISTEMIC_DB = 25.0
# Search grid of the fast path, a priori: lengths from 8 m to 3 km (factor ~2.3 a step) and
# noise-to-signal variance ratios from 1/50 to 50 (factor ~4.8 a step); coarse on purpose, the
# refinement on the exact objective does the rest (its result is tested against Adam on Pyro).
LENGTH_GRID_M = tuple(np.geomspace(8.0, 3000.0, 8))
NOISE_RATIO_GRID = tuple(np.geomspace(0.02, 50.0, 6))
# Step sizes (log units) of the coordinate refinement on the exact objective after the grid.
REFINE_STEPS = (0.4, 0.15, 0.05)
JITTER = 1e-6  # relative diagonal jitter for the Cholesky (dB^2 scale of K ~ 10-400)
_LOG_2PI = math.log(2.0 * math.pi)
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # as torch.distributions.Normal.log_prob writes it


# (dtype, device) -> (loc, scale, 2 scale^2, log scale): built once, not per objective evaluation
_PRIOR: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _prior_tensors(dtype, device) -> tuple[torch.Tensor, ...]:
    key = (dtype, torch.device(device))
    if key not in _PRIOR:
        loc = torch.tensor([math.log(LENGTH_PRIOR_M), math.log(SIGNAL_PRIOR_DB), math.log(NOISE_PRIOR_DB)], dtype=dtype, device=device)
        scale = torch.tensor([LENGTH_PRIOR_LOG_STD, SIGNAL_PRIOR_LOG_STD, NOISE_PRIOR_LOG_STD], dtype=dtype, device=device)
        _PRIOR[key] = (loc, scale, 2 * scale**2, scale.log())
    return _PRIOR[key]


def prior_loc_scale(dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of the log hyperparameters' normal priors (cached tensors: do not modify)."""
    return _prior_tensors(dtype, device)[:2]


@dataclass
class Batch:
    """Padded training rows of C cells (torch, leading axis = cell)."""

    xy: torch.Tensor  # (C, N, 2) positions relative to each cell's origin, metres
    r: torch.Tensor  # (C, N) residual of the prior mean, 0 on padding
    h: torch.Tensor  # (C, N, P) mean basis, 0 on padding
    w: torch.Tensor  # (C, N) likelihood weights, 1 on padding
    mask: torch.Tensor  # (C, N) True on real rows
    # theta-free parts of K, computed once per batch: distances and the mean's H B H^T, masked
    _parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _mm: torch.Tensor | None = None  # (C, N, N) real-row pair mask; None when no row is padding
    # (lengths (C,), masked matern + H V H^T at those lengths): the refinement's steps in the
    # signal and noise axes keep the lengths, so 5 of its 9 evaluations per step reuse this
    _kern: tuple[torch.Tensor, torch.Tensor] | None = None
    _long_var: torch.Tensor | None = None
    _all_real: bool | None = None
    _rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def share_parts(self, dist: torch.Tensor, long: torch.Tensor) -> None:
        """Take the distances and the long-range correlation (C, N, N) from the caller (e.g. the
        submatrix of a cell's full rows, `foldcv`): the entries `parts` would compute, so the same
        floats; only for a batch without padding (its pair mask would multiply them)."""
        if not bool(self.mask.all()):
            raise ValueError("share_parts: a padded batch computes its own parts")
        self._parts = (dist, _prior_cov(self.h, self.h), long)

    def parts(self, nu: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(distances, H V H^T, long-range correlation), each (C, N, N), masked."""
        if self._parts is None:
            mm = self.pair_mask()
            dist = _dist(self.xy, self.xy)
            hbh, long = _prior_cov(self.h, self.h), matern(dist / LONG_RANGE_LENGTH_M, nu)
            if mm is not None:
                hbh, long = hbh * mm, long * mm
            self._parts = (dist, hbh, long)
        return self._parts

    def length_part(self, length: torch.Tensor, nu: float) -> torch.Tensor:
        """matern(d / l) m_i m_j + H V H^T at per-cell lengths (C,): (C, N, N), not to be modified."""
        if self._kern is not None and not length.requires_grad and torch.equal(self._kern[0], length):
            return self._kern[1]
        dist, hbh, _ = self.parts(nu)
        k = _matern_cells(dist, length, nu)
        mm = self.pair_mask()
        k = (k if mm is None else k.mul_(mm)).add_(hbh)
        if not length.requires_grad:  # a graph (Pyro path) must not be reused across steps
            self._kern = (length.clone(), k)
        return k

    def row_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask as floats (C, N), real rows per cell clamped to >= 1 (C,), ones (C, N)): fixed per
        batch, built once instead of per objective evaluation (not to be modified)."""
        if self._rows is None:
            m = self.mask.to(self.r.dtype)
            self._rows = (m, m.sum(-1).clamp_min(1.0), torch.ones_like(self.r))
        return self._rows

    def pair_mask(self) -> torch.Tensor | None:
        """m_i m_j as (C, N, N) floats, or None when every row is real (multiplying by it is a no-op)."""
        if self._all_real is None:
            self._all_real = bool(self.mask.all())  # one device sync per batch, not per evaluation
        if self._mm is None and not self._all_real:
            m = self.mask.to(self.r.dtype)
            self._mm = m[:, :, None] * m[:, None, :]
        return self._mm


def matern(d_scaled: torch.Tensor, nu: float) -> torch.Tensor:
    if nu == 0.5:
        return torch.exp(-d_scaled)
    if nu == 1.5:
        s = math.sqrt(3.0) * d_scaled
        return (1.0 + s) * torch.exp(-s)
    s = math.sqrt(5.0) * d_scaled
    return (1.0 + s + s**2 / 3.0) * torch.exp(-s)


def _matern_cells(dist: torch.Tensor, length: torch.Tensor, nu: float) -> torch.Tensor:
    """matern(dist / length) for per-cell lengths (C,), computed in place on one new (C, N, N)
    tensor (the batched fit is memory-bound on these elementwise passes, not on the Cholesky)."""
    if nu == 0.5:
        return torch.mul(dist, (-1.0 / length)[:, None, None]).exp_()
    c = math.sqrt(3.0) if nu == 1.5 else math.sqrt(5.0)
    s = torch.mul(dist, (-c / length)[:, None, None])  # -s of `matern`
    e = torch.exp(s)
    if nu == 1.5:
        return s.neg_().add_(1.0).mul_(e)  # (1 + s) e^-s
    return s.mul(s).div_(3.0).sub_(s).add_(1.0).mul_(e)  # (1 + s + s^2 / 3) e^-s


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = a[:, :, None, 0] - b[:, None, :, 0]
    dy = a[:, :, None, 1] - b[:, None, :, 1]
    d2 = dx.mul_(dx).add_(dy.mul_(dy))  # = ((a - b) ** 2).sum(-1), without the (C, Na, Nb, 2) temporaries
    return torch.sqrt(d2 + 1e-9)  # smooth at 0 so the length gradient stays finite


def unpack(theta: torch.Tensor, floor_db: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(length m, signal variance dB^2, noise variance dB^2), each (C,), from theta (C, 3)."""
    length = theta[..., 0].exp().clamp(*LENGTH_RANGE_M)
    signal2 = theta[..., 1].clamp(max=math.log(MAX_SIGNAL_DB)).mul(2).exp()
    noise2 = theta[..., 2].mul(2).exp().clamp_min(floor_db**2)
    return length, signal2, noise2


def basis_prior_var(h: torch.Tensor) -> torch.Tensor:
    """diag(V) (P,): the mean coefficients' prior variances per unit signal variance (P: h's last axis)."""
    return (torch.as_tensor(basis_prior_std(h.shape[-1]), dtype=h.dtype, device=h.device) / COEF_PRIOR_REF_DB) ** 2


def _prior_cov(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """H1 V H2^T: the mean coefficients' prior covariance per unit signal variance."""
    return torch.matmul(h1 * basis_prior_var(h1), h2.transpose(-1, -2))


def latent_cov(xa: torch.Tensor, ha: torch.Tensor, xb: torch.Tensor, hb: torch.Tensor, theta: torch.Tensor, *,
               nu: float, floor_db: float, parts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Prior covariance of the latent field (mean + GP) between row sets a and b: (C, Na, Nb).
    `parts`: (distances, long-range correlation) between a and b when the caller already has them
    (the entries `_dist` and `matern(d / LONG_RANGE_LENGTH_M)` would compute, e.g. a submatrix of a
    cell's own; elementwise, so the same floats)."""
    length, signal2, _ = unpack(theta, floor_db)
    dist, long = (_dist(xa, xb), None) if parts is None else parts
    if long is None:
        long = matern(dist / LONG_RANGE_LENGTH_M, nu)
    return (signal2[:, None, None] * (matern(dist / length[:, None, None], nu) + _prior_cov(ha, hb))
            + LONG_RANGE_STD_DB**2 * long)


def covariance(b: Batch, theta: torch.Tensor, *, nu: float, floor_db: float) -> torch.Tensor:
    """K (C, N, N) of the observed residuals; padding rows and columns are the identity."""
    length, signal2, noise2 = unpack(theta, floor_db)
    if b._long_var is None:  # the long-range term's covariance, fixed per batch
        b._long_var = LONG_RANGE_STD_DB**2 * b.parts(nu)[2]
    m, n_real, ones = b.row_parts()
    k = torch.addcmul(b._long_var, b.length_part(length, nu), signal2[:, None, None])  # one pass over (C, N, N)
    diag = torch.where(b.mask, noise2[:, None] / b.w, ones)
    kd = k.diagonal(dim1=-2, dim2=-1)
    scale = (kd.sum(-1) / n_real).clamp_min(1.0)
    kd.add_(diag + JITTER * scale[:, None] * m)
    return k


def neg_log_marginal(b: Batch, theta: torch.Tensor, *, nu: float, floor_db: float) -> torch.Tensor:
    """-log N(r; 0, K) per cell (C,), over the padded vector (each padding row adds log(2 pi) / 2),
    so it equals Pyro's MultivariateNormal log-density of the same padded observation."""
    chol = torch.linalg.cholesky(covariance(b, theta, nu=nu, floor_db=floor_db))
    n = b.r.shape[-1]
    return 0.5 * _quad(chol, b.r) + chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) + 0.5 * n * _LOG_2PI


def _quad(chol: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r^T K^-1 r = |L^-1 r|^2 per cell: one triangular solve instead of cholesky_solve's two
    (torch's batched CPU cholesky_solve is also ~5x slower than solve_triangular here)."""
    v = torch.linalg.solve_triangular(chol, r[..., None], upper=False)
    return (v[..., 0] ** 2).sum(-1)


def _chol_solve(chol: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """K^-1 r (C, N) from the Cholesky factor by two triangular solves (= torch.cholesky_solve)."""
    v = torch.linalg.solve_triangular(chol, r[..., None], upper=False)
    return torch.linalg.solve_triangular(chol.transpose(-1, -2), v, upper=True)[..., 0]


def neg_log_prior(theta: torch.Tensor) -> torch.Tensor:
    """-log prior of theta (C,): torch.distributions.Normal(loc, scale).log_prob's operations, in its
    order (so the same floats), without building a distribution per evaluation (tests pin the two)."""
    loc, _, two_var, log_scale = _prior_tensors(theta.dtype, theta.device)
    log_prob = -((theta - loc) ** 2) / two_var - log_scale - _LOG_SQRT_2PI
    return -log_prob.sum(-1)


def initial_theta(b: Batch, floor_db: float) -> torch.Tensor:
    """Start of the reference path: prior length, 70% / 30% of the residual variance as signal / noise."""
    m = b.mask.to(b.r.dtype)
    var = ((b.r**2) * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    var = var.clamp(min=4.0 * floor_db**2 + 1e-3)
    return torch.stack([torch.full_like(var, math.log(LENGTH_PRIOR_M)), 0.5 * torch.log(0.7 * var),
                        0.5 * torch.log(0.3 * var)], dim=-1)


def _profile_log_s(q: torch.Tensor, n: torch.Tensor, log_ratio, iters: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over ls = log s of g(ls) = q e^{-2 ls} / 2 + n ls + prior(ls) + prior(ls + log_ratio / 2)
    (convex: Newton from the maximum-likelihood value); returns (ls, g(ls)). q, n and log_ratio
    broadcast (the whole grid table in one call)."""
    loc, scale = prior_loc_scale(q.dtype, q.device)
    ms, ss, mn, sn = loc[1], scale[1], loc[2], scale[2]
    ls = 0.5 * torch.log((q / n.clamp_min(1.0)).clamp_min(1e-6))
    for _ in range(iters):
        e = q * torch.exp(-2.0 * ls)
        grad = -e + n + (ls - ms) / ss**2 + (ls + 0.5 * log_ratio - mn) / sn**2
        hess = 2.0 * e + 1.0 / ss**2 + 1.0 / sn**2
        ls = ls - grad / hess
    g = 0.5 * q * torch.exp(-2.0 * ls) + n * ls + 0.5 * ((ls - ms) / ss) ** 2 + 0.5 * ((ls + 0.5 * log_ratio - mn) / sn) ** 2
    return ls, g


def grid_table(b: Batch, *, nu: float, floor_db: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid stage of `fit_theta_grid`: the MAP objective (C, lengths, ratios), s profiled, and
    the profiled log s there (inf where the Cholesky failed). Per length one kernel matrix, per
    ratio only its diagonal rewritten and one Cholesky. (One eigendecomposition per length would
    give every ratio in O(n), but torch's batched eigh costs ~9 Choleskys at n = 200 on CPU, more
    than the 6 ratios' Choleskys it would replace.)"""
    dist, hbh, long = b.parts(nu)
    m = b.mask.to(b.r.dtype)
    mm = b.pair_mask()
    n = m.sum(-1)
    long = long * (LONG_RANGE_STD_DB**2 / initial_theta(b, floor_db)[:, 1].mul(2).exp())[:, None, None]
    loc, scale = prior_loc_scale(b.r.dtype, b.r.device)
    n_cells = b.r.shape[0]
    n_l, n_lam = len(LENGTH_GRID_M), len(NOISE_RATIO_GRID)
    quad = torch.zeros((n_cells, n_l, n_lam), dtype=b.r.dtype, device=b.r.device)
    logdet, ok = torch.zeros_like(quad), torch.zeros(quad.shape, dtype=torch.bool, device=b.r.device)
    lengths = torch.as_tensor(LENGTH_GRID_M, dtype=b.r.dtype, device=b.r.device)
    # each ratio's diagonal term (noise ratio / weight and the jitter), the same for every length
    ones = torch.ones_like(b.r)
    noise = [torch.where(b.mask, lam / b.w, ones) + JITTER * m for lam in NOISE_RATIO_GRID]
    for i in range(n_l):
        base = _matern_cells(dist, lengths[i].expand(n_cells), nu)
        if mm is not None:
            base.mul_(mm)
        base.add_(hbh).add_(long)
        # only the diagonal changes with the ratio: overwrite it (same sums as base + diag)
        d0 = base.diagonal(dim1=-2, dim2=-1).clone()
        for j in range(n_lam):
            base.diagonal(dim1=-2, dim2=-1).copy_(d0 + noise[j])
            chol, info = torch.linalg.cholesky_ex(base)
            quad[:, i, j] = _quad(chol, b.r)
            logdet[:, i, j] = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            ok[:, i, j] = info == 0
    # s profiled exactly for the whole (length, ratio) table at once
    log_ratios = torch.log(torch.as_tensor(NOISE_RATIO_GRID, dtype=b.r.dtype, device=b.r.device))
    log_s, g = _profile_log_s(quad, n[:, None, None], log_ratios[None, None, :])
    prior_l = 0.5 * ((torch.log(lengths) - loc[0]) / scale[0]) ** 2
    table = torch.where(ok, g + 0.5 * logdet + prior_l[None, :, None], torch.full_like(g, float("inf")))
    return table, log_s


def fit_theta_grid(b: Batch, *, nu: float, floor_db: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast MAP hyperparameters (C, 3) and the log marginal likelihood there (C,), no gradients:
    over LENGTH_GRID_M x NOISE_RATIO_GRID, K = s^2 M(l, lambda) with s profiled exactly (1-D
    Newton on the MAP objective; the fixed long-range term enters M at its ratio to the cell's
    starting signal variance, an approximation the refinement corrects), then a coordinate
    refinement of (log l, log s, log n) on the exact objective (`_refine`)."""
    with torch.no_grad():
        table, log_s = grid_table(b, nu=nu, floor_db=floor_db)
        n_cells = b.r.shape[0]
        flat = table.reshape(n_cells, -1).argmin(-1)
        bi, bj = flat // len(NOISE_RATIO_GRID), flat % len(NOISE_RATIO_GRID)
        cells = torch.arange(n_cells, device=b.r.device)
        log_l = torch.log(torch.as_tensor(LENGTH_GRID_M, dtype=b.r.dtype, device=b.r.device))[bi]
        log_lam = torch.log(torch.as_tensor(NOISE_RATIO_GRID, dtype=b.r.dtype, device=b.r.device))[bj]
        ls = log_s[cells, bi, bj]
        theta = torch.stack([log_l, ls, ls + 0.5 * log_lam], dim=-1)

        def objective(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nlm = neg_log_marginal(b, th, nu=nu, floor_db=floor_db)
            return nlm + neg_log_prior(th), nlm

        # the refinement keeps -log marginal at the theta it returns (evaluated there, same floats)
        theta, nlm = _refine(theta, objective, with_aux=True)
        pad = (~b.mask).sum(-1).to(theta.dtype)
        log_ml = -nlm + 0.5 * pad * _LOG_2PI
    return theta, log_ml


def _refine(theta: torch.Tensor, objective, steps: tuple[float, ...] = REFINE_STEPS, *, with_aux: bool = False):
    """Coordinate refinement of theta (C, 3) on the exact objective (C,): per step size and axis,
    the best of theta, theta +- step and the vertex of the parabola through those three.
    `with_aux`: the objective returns (value, aux) with aux (C,) (e.g. -log marginal), and the
    refinement returns (theta, aux at theta). A vertex that is theta, theta - step or theta + step
    (the parabola's shift 0 or clamped to -1 / +1 in every cell) is not evaluated again: its value
    is known and could not win (strict <)."""
    call = objective if with_aux else (lambda th: (objective(th), None))  # noqa: E731
    best, aux = call(theta)
    for step in steps:
        for axis in range(theta.shape[-1]):
            e = torch.zeros_like(theta)
            e[:, axis] = step
            lo, hi = theta - e, theta + e
            (f_lo, a_lo), (f_hi, a_hi) = call(lo), call(hi)
            curv = f_lo - 2.0 * best + f_hi
            ok = torch.isfinite(curv) & (curv > 0)
            shift = torch.where(ok, 0.5 * (f_lo - f_hi) / torch.where(ok, curv, torch.ones_like(curv)), torch.zeros_like(curv))
            shift = shift.clamp(-1.0, 1.0)
            trials = [(lo, f_lo, a_lo), (hi, f_hi, a_hi)]
            if not bool(((shift == 0.0) | (shift.abs() == 1.0)).all()):
                vertex = theta + e * shift[:, None]
                trials.append((vertex, *call(vertex)))
            new_theta, new_best, new_aux = theta, best, aux
            for trial, value, value_aux in trials:
                better = value < new_best
                new_theta = torch.where(better[:, None], trial, new_theta)
                new_best = torch.where(better, value, new_best)
                if with_aux:
                    new_aux = torch.where(better, value_aux, new_aux)
            theta, best, aux = new_theta, new_best, new_aux
    return (theta, aux) if with_aux else theta


def solve(b: Batch, theta: torch.Tensor, *, nu: float, floor_db: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor L (C, N, N) of K and alpha = K^-1 r (C, N)."""
    chol = torch.linalg.cholesky(covariance(b, theta, nu=nu, floor_db=floor_db))
    return chol, _chol_solve(chol, b.r)


def predict_latent(b: Batch, theta: torch.Tensor, chol: torch.Tensor, alpha: torch.Tensor, xy: torch.Tensor,
                   h: torch.Tensor, *, nu: float, floor_db: float,
                   parts: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean (relative to the prior mean) and variance of the latent field at rows
    xy (C, M, 2) with basis h (C, M, P): each (C, M). `parts`: see `latent_cov`."""
    ks = latent_cov(xy, h, b.xy, b.h, theta, nu=nu, floor_db=floor_db, parts=parts) * b.mask.to(xy.dtype)[:, None, :]
    mean = torch.matmul(ks, alpha[..., None])[..., 0]
    v = torch.linalg.solve_triangular(chol, ks.transpose(-1, -2), upper=False)
    _, signal2, _ = unpack(theta, floor_db)
    prior = signal2[:, None] * (1.0 + _prior_cov(h[..., None, :], h[..., None, :])[..., 0, 0]) + LONG_RANGE_STD_DB**2
    return mean, (prior - (v**2).sum(-2)).clamp_min(0.0)


def stationary_prior_var(theta: torch.Tensor, *, floor_db: float) -> torch.Tensor:
    """Prior variance of the stationary part of the latent field (GP + long-range term), (C,):
    what the posterior variance tends to far from the data once the mean's coefficients are
    pinned. Posterior variance over it (clipped to 1) is a row's lack of data support; the
    coefficients' prior is left out because it is wide on purpose (30 dB on the intercept) and
    would make every row look supported."""
    _, signal2, _ = unpack(theta, floor_db)
    return signal2 + LONG_RANGE_STD_DB**2


def held_out(kinv: torch.Tensor, alpha: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Error and predictive variance (each (C, N)) of every real row predicted from the other
    groups' rows: the exact GP cross-validation with hyperparameters fixed (Rasmussen & Williams
    eq. 5.12 for groups of one row; its block form for larger groups): error_G = (K^-1_GG)^-1
    alpha_G, covariance (K^-1_GG)^-1. `groups` (C, N) int: group of every row (-1 on padding).
    `kinv` = K^-1 (C, N, N). Each group's rows are gathered into a compact (C, G, G) block, so a
    fold costs G^3, not N^3."""
    err, var = torch.zeros_like(alpha), torch.ones_like(alpha)
    n = alpha.shape[-1]
    for g in torch.unique(groups[mask]).tolist():
        sel = (groups == g) & mask
        size = int(sel.sum(-1).max())
        # row indices of the group first (stable), padding slots point at row 0 and are masked
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[:, :size]
        real = torch.gather(sel, 1, order)
        sub = torch.gather(torch.gather(kinv, 1, order[:, :, None].expand(-1, -1, n)), 2, order[:, None, :].expand(-1, size, -1))
        r = real.to(alpha.dtype)
        sub = sub * (r[:, :, None] * r[:, None, :]) + torch.diag_embed(1.0 - r)
        sc = torch.linalg.cholesky(sub)
        e = torch.cholesky_solve((torch.gather(alpha, 1, order) * r)[..., None], sc)[..., 0]
        v = torch.cholesky_inverse(sc).diagonal(dim1=-2, dim2=-1)
        err = err.scatter(1, order, torch.where(real, e, torch.gather(err, 1, order)))
        var = var.scatter(1, order, torch.where(real, v, torch.gather(var, 1, order)))
    return err, var


def loo(kinv: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out error alpha_i / [K^-1]_ii and variance 1 / [K^-1]_ii, each (C, N) (R&W eq. 5.12)."""
    kinv_diag = kinv.diagonal(dim1=-2, dim2=-1).clamp_min(1e-12)
    return alpha / kinv_diag, 1.0 / kinv_diag


def pad_rows(arrays: list[np.ndarray], n_max: int, value: float = 0.0) -> np.ndarray:
    """Stack per-cell arrays (n_c, ...) into (C, n_max, ...) filled with `value`."""
    out = np.full((len(arrays), n_max, *arrays[0].shape[1:]), value, dtype=float)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out
