"""The fast paths of gp.py compute the same numbers as the textbook forms they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellsynth.radio import foldcv, gp
from cellsynth.radio.model import _batch_of


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _batch(sizes=(50, 35), seed=0) -> gp.Batch:
    """Cells of different sizes (so padding is exercised), random weights and a 2-column basis."""
    rng = np.random.default_rng(seed)
    xy = [rng.uniform(0, 600, (n, 2)) for n in sizes]
    y = [4.0 * np.sin(x[:, 0] / 90.0) + rng.normal(0, 2.0, len(x)) for x in xy]
    w = [rng.uniform(0.5, 2.0, len(x)) for x in xy]
    h = [np.column_stack([np.ones(len(x)), np.log10(np.linalg.norm(x, axis=1) / 1000.0 + 0.01), np.zeros((len(x), 3))]) for x in xy]
    return _batch_of(xy, y, w, h, np.zeros((len(sizes), 5)), "cpu")


def _reference_covariance(b: gp.Batch, theta: torch.Tensor, nu: float, floor_db: float) -> torch.Tensor:
    """K as gp.covariance computed it before the in-place rewrite."""
    length, signal2, noise2 = gp.unpack(theta, floor_db)
    dist, hbh, long = b.parts(nu)
    m = b.mask.to(b.r.dtype)
    k = signal2[:, None, None] * (gp.matern(dist / length[:, None, None], nu) * (m[:, :, None] * m[:, None, :]) + hbh)
    k = k + gp.LONG_RANGE_STD_DB**2 * long
    diag = torch.where(b.mask, noise2[:, None] / b.w, torch.ones_like(b.r))
    scale = (k.diagonal(dim1=-2, dim2=-1).sum(-1) / m.sum(-1).clamp_min(1.0)).clamp_min(1.0)
    return k + torch.diag_embed(diag + gp.JITTER * scale[:, None] * m)


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_in_place_matern_equals_matern(nu):
    d = torch.as_tensor(np.random.default_rng(1).uniform(0, 900, (2, 7, 7)), dtype=torch.float64)
    length = torch.tensor([40.0, 300.0], dtype=torch.float64)
    np.testing.assert_allclose(gp._matern_cells(d, length, nu).numpy(), gp.matern(d / length[:, None, None], nu).numpy(),
                               rtol=1e-12, atol=1e-15)


def test_covariance_with_the_kernel_cache_equals_the_reference():
    b = _batch()
    theta = torch.tensor([[math.log(70.0), math.log(5.0), math.log(2.0)], [math.log(200.0), math.log(3.0), math.log(1.0)]],
                         dtype=torch.float64)
    ref = _reference_covariance(b, theta, 1.5, 0.5)
    first = gp.covariance(b, theta, nu=1.5, floor_db=0.5)  # fills the cache
    other = theta + torch.tensor([0.0, 0.3, -0.2], dtype=torch.float64)  # same lengths: a cache hit
    hit = gp.covariance(b, other, nu=1.5, floor_db=0.5)
    np.testing.assert_allclose(first.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hit.numpy(), _reference_covariance(b, other, 1.5, 0.5).numpy(), rtol=1e-12, atol=1e-12)
    moved = theta + torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64)  # new lengths: recomputed
    np.testing.assert_allclose(gp.covariance(b, moved, nu=1.5, floor_db=0.5).numpy(),
                               _reference_covariance(b, moved, 1.5, 0.5).numpy(), rtol=1e-12, atol=1e-12)
    # the cached part is not modified by the evaluations that reuse it
    np.testing.assert_allclose(gp.covariance(b, theta, nu=1.5, floor_db=0.5).numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_triangular_solves_equal_cholesky_solve():
    b = _batch()
    theta = torch.tensor([[math.log(70.0), math.log(5.0), math.log(2.0)]] * 2, dtype=torch.float64)
    chol = torch.linalg.cholesky(_reference_covariance(b, theta, 1.5, 0.5))
    alpha = torch.cholesky_solve(b.r[..., None], chol)[..., 0]
    np.testing.assert_allclose(gp._chol_solve(chol, b.r).numpy(), alpha.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gp._quad(chol, b.r).numpy(), (b.r * alpha).sum(-1).numpy(), rtol=1e-10)
    k = _reference_covariance(b, theta, 1.5, 0.5)
    nlml = 0.5 * (b.r * alpha).sum(-1) + 0.5 * torch.logdet(k) + 0.5 * b.r.shape[-1] * math.log(2 * math.pi)
    np.testing.assert_allclose(gp.neg_log_marginal(b, theta, nu=1.5, floor_db=0.5).numpy(), nlml.numpy(), rtol=1e-10)


def test_grid_table_equals_one_cholesky_per_grid_point():
    """The vectorised grid (diagonal rewritten per ratio, s profiled for the whole table at once)
    equals the per-point computation with cholesky_solve and a scalar profile."""
    b = _batch()
    table, log_s = gp.grid_table(b, nu=1.5, floor_db=0.5)
    dist, hbh, long = b.parts(1.5)
    m = b.mask.to(b.r.dtype)
    mm = m[:, :, None] * m[:, None, :]
    long = long * (gp.LONG_RANGE_STD_DB**2 / gp.initial_theta(b, 0.5)[:, 1].mul(2).exp())[:, None, None]
    loc, scale = gp.prior_loc_scale(b.r.dtype, b.r.device)
    for i, length in enumerate(gp.LENGTH_GRID_M):
        base = gp.matern(dist / length, 1.5) * mm + hbh + long
        for j, lam in enumerate(gp.NOISE_RATIO_GRID):
            k = base + torch.diag_embed(torch.where(b.mask, lam / b.w, torch.ones_like(b.r)) + gp.JITTER * m)
            chol = torch.linalg.cholesky(k)
            q = (b.r * torch.cholesky_solve(b.r[..., None], chol)[..., 0]).sum(-1)
            ls, g = gp._profile_log_s(q, m.sum(-1), math.log(lam))
            value = g + chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) + 0.5 * ((math.log(length) - loc[0]) / scale[0]) ** 2
            np.testing.assert_allclose(table[:, i, j].numpy(), value.numpy(), rtol=1e-10)
            np.testing.assert_allclose(log_s[:, i, j].numpy(), ls.numpy(), rtol=1e-10, atol=1e-12)


def test_fold_errors_batched_equal_each_cell_alone():
    """The refitted block CV of a shard gives every cell the numbers it gets alone."""
    rng = np.random.default_rng(5)
    xy = [rng.uniform(0, 900, (n, 2)) for n in (90, 60, 75)]
    y = [-70.0 - 30.0 * np.log10(np.maximum(np.linalg.norm(x - 450.0, axis=1), 10.0) / 1000.0) + rng.normal(0, 3.0, len(x))
         for x in xy]
    w = [np.ones(len(x)) for x in xy]
    groups = [(x[:, 0] // 300).astype(int) % 3 for x in xy]
    kw = dict(nu=1.5, floor_db=0.5, batch_of=_batch_of, device="cpu")
    together = foldcv.fold_errors(xy, y, w, None, [None, np.array([450.0, 450.0]), None], [None, 30.0, None], groups,
                                  np.array([3, 5, 1]), rngs=[np.random.default_rng(i) for i in range(3)], **kw)
    for i in range(3):
        alone = foldcv.fold_errors([xy[i]], [y[i]], [w[i]], None, [[None, np.array([450.0, 450.0]), None][i]],
                                   [[None, 30.0, None][i]], [groups[i]], np.array([[3, 5, 1][i]]),
                                   rngs=[np.random.default_rng(i)], **kw)[0]
        assert np.isfinite(alone).any()
        np.testing.assert_allclose(together[i], alone, rtol=1e-7, atol=1e-8, equal_nan=True)


def test_calibration_error_by_sorted_counts_equals_the_pit_comparison():
    from scipy.stats import norm

    from cellsynth.radio import calibration as cal

    rng = np.random.default_rng(2)
    for n in (1, 7, 3000):
        z = rng.standard_t(4, n)
        z[: min(n, 4)] = norm.ppf(cal.CE_LEVELS[[0, 9, 10, 18][: min(n, 4)]])  # rows exactly at the level quantiles
        for scale in (0.6, 1.0, 1.7):
            pit = norm.cdf(z / scale)
            broadcast = float(np.mean(np.abs((pit[:, None] <= cal.CE_LEVELS[None, :]).mean(0) - cal.CE_LEVELS)))
            assert cal.calibration_error_z(z, scale) == broadcast  # same counts, same float operations
    assert cal.calibration_error_z(np.array([0.0, 10.0])) == pytest.approx(np.mean(np.abs(np.where(cal.CE_LEVELS >= 0.5, 0.5, 0.0) - cal.CE_LEVELS)))


def test_batch_size_does_not_change_the_fit(monkeypatch):
    """Cache-sized CPU batches (several per shard) give the arrays of one batch per shard."""
    from cellsynth.radio import model as radio_model
    from cellsynth.radio.model import CellData, FitSettings, fit_cells

    rng = np.random.default_rng(7)
    cells = []
    for i, n in enumerate((40, 70, 55, 90)):
        xy = rng.uniform(0, 700, (n, 2))
        y = -75.0 - 30.0 * np.log10(np.maximum(np.linalg.norm(xy - 350.0, axis=1), 10.0) / 1000.0) + rng.normal(0, 3.0, n)
        cells.append(CellData(f"c{i}", xy, y, origin_xy_m=None if i % 2 else np.array([350.0, 350.0])))
    monkeypatch.setattr(radio_model, "CPU_BATCH_ELEMENTS", 10**9)
    one = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=4)
    monkeypatch.setattr(radio_model, "CPU_BATCH_ELEMENTS", 1)  # every cell its own batch
    many = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=4)
    for key in ("theta", "scale", "blend_w", "knn_k", "cv_mae_db", "beta0"):
        np.testing.assert_allclose(many.arrays[key], one.arrays[key], rtol=1e-9, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(many.elbo, one.elbo, rtol=1e-12)


# --- The grid fit's overhead cuts (session 17) change no float: main's 75c0567 forms, verbatim, as references ---

def _reference_neg_log_prior(theta: torch.Tensor) -> torch.Tensor:
    loc, scale = gp.prior_loc_scale(theta.dtype, theta.device)
    return -torch.distributions.Normal(loc, scale).log_prob(theta).sum(-1)


def _reference_grid_table(b: gp.Batch, nu: float, floor_db: float) -> tuple[torch.Tensor, torch.Tensor]:
    dist, hbh, long = b.parts(nu)
    m = b.mask.to(b.r.dtype)
    mm = b.pair_mask()
    n = m.sum(-1)
    long = long * (gp.LONG_RANGE_STD_DB**2 / gp.initial_theta(b, floor_db)[:, 1].mul(2).exp())[:, None, None]
    loc, scale = gp.prior_loc_scale(b.r.dtype, b.r.device)
    n_cells, n_l, n_lam = b.r.shape[0], len(gp.LENGTH_GRID_M), len(gp.NOISE_RATIO_GRID)
    quad = torch.zeros((n_cells, n_l, n_lam), dtype=b.r.dtype)
    logdet, ok = torch.zeros_like(quad), torch.zeros(quad.shape, dtype=torch.bool)
    lengths = torch.as_tensor(gp.LENGTH_GRID_M, dtype=b.r.dtype)
    for i, _ in enumerate(gp.LENGTH_GRID_M):
        base = gp._matern_cells(dist, lengths[i].expand(n_cells), nu)
        if mm is not None:
            base.mul_(mm)
        base.add_(hbh).add_(long)
        d0 = base.diagonal(dim1=-2, dim2=-1).clone()
        for j, lam in enumerate(gp.NOISE_RATIO_GRID):
            base.diagonal(dim1=-2, dim2=-1).copy_(d0 + (torch.where(b.mask, lam / b.w, torch.ones_like(b.r)) + gp.JITTER * m))
            chol, info = torch.linalg.cholesky_ex(base)
            quad[:, i, j] = gp._quad(chol, b.r)
            logdet[:, i, j] = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            ok[:, i, j] = info == 0
    log_ratios = torch.log(torch.as_tensor(gp.NOISE_RATIO_GRID, dtype=b.r.dtype))
    log_s, g = gp._profile_log_s(quad, n[:, None, None], log_ratios[None, None, :])
    prior_l = 0.5 * ((torch.log(lengths) - loc[0]) / scale[0]) ** 2
    return torch.where(ok, g + 0.5 * logdet + prior_l[None, :, None], torch.full_like(g, float("inf"))), log_s


def _reference_refine(theta: torch.Tensor, objective, calls: list) -> torch.Tensor:
    def f(th):
        calls.append(1)
        return objective(th)

    best = f(theta)
    for step in gp.REFINE_STEPS:
        for axis in range(theta.shape[-1]):
            e = torch.zeros_like(theta)
            e[:, axis] = step
            lo, hi = theta - e, theta + e
            f_lo, f_hi = f(lo), f(hi)
            curv = f_lo - 2.0 * best + f_hi
            ok = torch.isfinite(curv) & (curv > 0)
            shift = torch.where(ok, 0.5 * (f_lo - f_hi) / torch.where(ok, curv, torch.ones_like(curv)), torch.zeros_like(curv))
            vertex = theta + e * shift.clamp(-1.0, 1.0)[:, None]
            new_theta, new_best = theta, best
            for trial, value in ((lo, f_lo), (hi, f_hi), (vertex, f(vertex))):
                better = value < new_best
                new_theta = torch.where(better[:, None], trial, new_theta)
                new_best = torch.where(better, value, new_best)
            theta, best = new_theta, new_best
    return theta


def _reference_fit_theta_grid(b: gp.Batch, nu: float, floor_db: float, calls: list) -> tuple[torch.Tensor, torch.Tensor]:
    """gp.fit_theta_grid as of main 75c0567 (every vertex evaluated, log ML recomputed at the end);
    a fresh Batch so that no cache of the optimised path is shared."""
    b = gp.Batch(b.xy, b.r, b.h, b.w, b.mask)
    with torch.no_grad():
        table, log_s = _reference_grid_table(b, nu, floor_db)
        n_cells = b.r.shape[0]
        flat = table.reshape(n_cells, -1).argmin(-1)
        bi, bj = flat // len(gp.NOISE_RATIO_GRID), flat % len(gp.NOISE_RATIO_GRID)
        log_l = torch.log(torch.as_tensor(gp.LENGTH_GRID_M, dtype=b.r.dtype))[bi]
        log_lam = torch.log(torch.as_tensor(gp.NOISE_RATIO_GRID, dtype=b.r.dtype))[bj]
        ls = log_s[torch.arange(n_cells), bi, bj]
        theta = torch.stack([log_l, ls, ls + 0.5 * log_lam], dim=-1)
        objective = lambda th: gp.neg_log_marginal(b, th, nu=nu, floor_db=floor_db) + _reference_neg_log_prior(th)  # noqa: E731
        theta = _reference_refine(theta, objective, calls)
        pad = (~b.mask).sum(-1).to(theta.dtype)
        calls.append(1)
        return theta, -gp.neg_log_marginal(b, theta, nu=nu, floor_db=floor_db) + 0.5 * pad * gp._LOG_2PI


def test_neg_log_prior_is_normal_log_prob_bit_for_bit():
    theta = torch.as_tensor(np.random.default_rng(3).normal(2.0, 2.0, (50, 3)), dtype=torch.float64)
    assert torch.equal(gp.neg_log_prior(theta), _reference_neg_log_prior(theta))


@pytest.mark.parametrize("sizes,weighted", [((50, 35), True), ((60,), False), ((40, 40, 40), False), ((45, 30, 45), True)])
def test_grid_fit_equals_the_reference_bit_for_bit(sizes, weighted):
    """Same theta and log marginal likelihood, to the last bit, with fewer objective evaluations
    (the refinement's known vertices skipped, the final -log ML taken from the refinement)."""
    b = _batch(sizes, seed=len(sizes))
    if not weighted:
        b = gp.Batch(b.xy, b.r, b.h, torch.ones_like(b.w), b.mask)
    calls: list = []
    ref_theta, ref_ml = _reference_fit_theta_grid(b, 1.5, 0.5, calls)
    evals = []
    orig = gp.neg_log_marginal

    def counted(*a, **k):
        evals.append(1)
        return orig(*a, **k)

    fresh = gp.Batch(b.xy, b.r, b.h, b.w, b.mask)
    try:
        gp.neg_log_marginal = counted
        theta, ml = gp.fit_theta_grid(fresh, nu=1.5, floor_db=0.5)
    finally:
        gp.neg_log_marginal = orig
    assert torch.equal(theta, ref_theta) and torch.equal(ml, ref_ml)
    assert torch.equal(gp.grid_table(gp.Batch(b.xy, b.r, b.h, b.w, b.mask), nu=1.5, floor_db=0.5)[0],
                       _reference_grid_table(gp.Batch(b.xy, b.r, b.h, b.w, b.mask), 1.5, 0.5)[0])
    assert len(evals) <= len(calls) - 1  # at least the final recomputation saved


def test_refine_without_aux_returns_theta_alone():
    b = _batch((30,), seed=9)
    theta = gp.initial_theta(b, 0.5)
    objective = lambda th: gp.neg_log_marginal(b, th, nu=1.5, floor_db=0.5) + gp.neg_log_prior(th)  # noqa: E731
    out = gp._refine(theta, objective)
    assert isinstance(out, torch.Tensor) and torch.equal(out, _reference_refine(theta, objective, []))
