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
