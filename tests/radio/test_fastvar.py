"""radio/fastvar.py: the fused exact path equals gp.py's; the interpolated variance stays within
its tolerance against the exact one on cells of the real size (1,500 rows); kNN by k-d tree
equals stacking.knn_means."""

import numpy as np
import pytest
import torch

from cellsynth.radio import fastvar, gp
from cellsynth.radio import stacking as stk
from cellsynth.radio.geometry import basis, prior_mean
from cellsynth.radio.model import _batch_of


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cell(n: int, length_m: float, *, uses_load: bool, seed: int = 0):
    """A cell as the generate bench builds them: rows around the site, log-distance field + noise."""
    rng = np.random.default_rng(seed)
    pts = rng.normal(0, 400, (n, 2))
    d = np.maximum(np.linalg.norm(pts, axis=1), 10.0)
    rho = rng.uniform(0.1, 0.9, n) if uses_load else None
    y = -60.0 - 35.0 * np.log10(d / 1000.0) + rng.normal(0, 4.0, n)
    b0, _ = prior_mean(pts, y, np.zeros(2), 30.0, rho, None)
    h = basis(pts, np.zeros(2), 30.0, True, rho)
    b = _batch_of([pts], [y], [rng.uniform(0.5, 1.5, n)], [h], b0[None], "cpu")
    theta = torch.tensor([[np.log(length_m), np.log(6.0), np.log(3.0)]], dtype=torch.float64)
    return b, theta


def _rows(m: int, half_m: float, *, uses_load: bool, seed: int = 1):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-half_m, half_m, (m, 2))
    h = basis(xy, np.zeros(2), 30.0, True, rng.uniform(0.0, 1.0, m) if uses_load else None)
    t = lambda v: torch.as_tensor(v, dtype=torch.float64)[None]  # noqa: E731
    return t(xy), t(h)


@pytest.mark.parametrize("uses_load", [False, True])
def test_fused_solve_and_exact_prediction_equal_gp(uses_load):
    b, theta = _cell(300, 60.0, uses_load=uses_load)
    chol0, alpha0 = gp.solve(b, theta, nu=1.5, floor_db=0.5)
    chol1, alpha1 = fastvar.solve(b, theta, nu=1.5, floor_db=0.5)
    assert torch.allclose(chol1, chol0, rtol=1e-10, atol=1e-10)
    assert torch.allclose(alpha1, alpha0, rtol=1e-8, atol=1e-12)
    xy, h = _rows(200, 700.0, uses_load=uses_load)
    m0, v0 = gp.predict_latent(b, theta, chol0, alpha0, xy, h, nu=1.5, floor_db=0.5)
    m1, v1 = fastvar.predict_latent(b, theta, chol1, alpha1, xy, h, nu=1.5, floor_db=0.5, mode="exact")
    assert torch.allclose(m1, m0, rtol=1e-9, atol=1e-9)
    assert torch.allclose(v1, v0, rtol=1e-9, atol=1e-9)
    assert float(v0.min()) > 0.1  # a real variance, not the clamp


@pytest.mark.parametrize("length_m,uses_load", [(80.0, False), (40.0, True)])
def test_interpolated_variance_within_tolerance_of_exact_on_real_size_cells(length_m, uses_load, monkeypatch):
    """1,500 training rows (radio.max_rows), rows over a 1.2 km square: the grid (step fixed a
    priori from the length) against the exact variance at every row, not just its check rows."""
    monkeypatch.setattr(fastvar, "GRID_MAX_SHARE", 50.0)  # force the grid at this row count
    b, theta = _cell(1500, length_m, uses_load=uses_load)
    chol, alpha = fastvar.solve(b, theta, nu=1.5, floor_db=0.5)
    xy, h = _rows(3000, 600.0, uses_load=uses_load)
    m0, v0 = fastvar.predict_latent(b, theta, chol, alpha, xy, h, nu=1.5, floor_db=0.5, mode="exact")
    before = dict(fastvar.STATS)
    m1, v1 = fastvar.predict_latent(b, theta, chol, alpha, xy, h, nu=1.5, floor_db=0.5, mode="auto")
    assert fastvar.STATS["grid_calls"] == before["grid_calls"] + 1  # the grid was used, not the fallback
    assert torch.equal(m1, m0)  # the mean is exact on both paths
    err = (v1.sqrt() - v0.sqrt()).abs()
    assert float(err.max()) < fastvar.TOLERANCE_DB
    assert float(v0.sqrt().max() - v0.sqrt().min()) > 1.0  # the std field does vary over the rows


def test_grid_too_coarse_fails_its_check_and_falls_back_to_exact(monkeypatch):
    monkeypatch.setattr(fastvar, "GRID_MAX_SHARE", 10.0)
    monkeypatch.setattr(fastvar, "GRID_STEPS_PER_LENGTH", 0.5)  # a node every two lengths
    b, theta = _cell(600, 50.0, uses_load=False)
    chol, alpha = fastvar.solve(b, theta, nu=1.5, floor_db=0.5)
    xy, h = _rows(400, 500.0, uses_load=False)
    before = dict(fastvar.STATS)
    _, v_auto = fastvar.predict_latent(b, theta, chol, alpha, xy, h, nu=1.5, floor_db=0.5, mode="auto")
    _, v_exact = fastvar.predict_latent(b, theta, chol, alpha, xy, h, nu=1.5, floor_db=0.5, mode="exact")
    assert fastvar.STATS["grid_rejected"] == before["grid_rejected"] + 1
    assert torch.allclose(v_auto, v_exact, rtol=1e-12, atol=1e-12)


def test_grid_is_skipped_when_it_would_cost_more_than_the_rows():
    b, theta = _cell(300, 60.0, uses_load=False)
    chol, alpha = fastvar.solve(b, theta, nu=1.5, floor_db=0.5)
    xy, h = _rows(100, 700.0, uses_load=False)  # 100 rows over 1.4 km: thousands of nodes
    before = dict(fastvar.STATS)
    fastvar.predict_latent(b, theta, chol, alpha, xy, h, nu=1.5, floor_db=0.5)
    assert fastvar.STATS["exact_calls"] == before["exact_calls"] + 1
    assert fastvar.STATS["grid_calls"] == before["grid_calls"]


def test_nearest_equals_knn_means():
    b, _ = _cell(200, 60.0, uses_load=False)
    xy, _ = _rows(50, 600.0, uses_load=False)
    import dataclasses

    # rows with likelihood weights (training uses weighted kNN means then) and without
    for bb, w in ((b, b.w), (dataclasses.replace(b, w=torch.ones_like(b.w)), None)):
        for k in (1, 5, 32):
            dmin, knn = fastvar.nearest(bb, xy[0], k, need_dist=True, need_knn=True)
            dist = torch.cdist(xy[0], bb.xy[0])
            ref = stk.knn_means(dist[None], bb.r, k, w)[0][0, :, k - 1].numpy()
            np.testing.assert_allclose(knn, ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(dmin, dist.amin(-1).numpy(), rtol=1e-9)
    zeros, none = fastvar.nearest(b, xy[0], 5, need_dist=False, need_knn=False)
    assert none is None and np.all(zeros == 0.0)


def test_fitted_cells_predict_uses_one_grid_over_its_chunks_within_tolerance(monkeypatch):
    """Through FittedCells.predict: 10,000 rows of one cell come in 3 chunks; the grid is built
    once (on the first chunk) and the calibrated epistemic std stays within the tolerance (times
    the epistemic factor, 1 here) of the exact path at every row; the mean is identical."""
    from cellsynth.radio.model import FitSettings, FittedCells

    b, theta = _cell(1500, 200.0, uses_load=False, seed=4)
    n = b.xy.shape[1]
    xy = b.xy[0].numpy()
    arrays = {"origin_xy_m": np.zeros((1, 2)), "azimuth_deg": np.array([30.0]), "ant_on": np.ones(1),
              "beta0": np.zeros((1, 5)), "theta": theta.numpy(), "scale": np.ones((1, 2)), "cv_mae_db": np.full((1, 2), np.nan),
              "train_xy_m": xy[None], "train_y": (b.r[0].numpy() - 70.0)[None], "train_rho": np.full((1, n), 0.5),
              "train_w": b.w.numpy(), "mask": np.ones((1, n), dtype=bool)}
    fc = FittedCells(["c"], "rsrp", FitSettings(), arrays, np.zeros(1), np.array([n]))
    rows = np.random.default_rng(9).uniform(-600, 600, (10_000, 2))
    monkeypatch.setattr(fastvar, "MODE", "exact")
    exact = fc.predict(np.zeros(len(rows), dtype=np.int64), rows)
    monkeypatch.setattr(fastvar, "MODE", "auto")
    fc._solved.clear()
    before = dict(fastvar.STATS)
    fast = fc.predict(np.zeros(len(rows), dtype=np.int64), rows)
    assert fastvar.STATS["grid_calls"] - before["grid_calls"] == 3  # every chunk from the one grid
    assert fastvar.STATS["grid_rows"] - before["grid_rows"] >= 9_000
    np.testing.assert_array_equal(fast.mean, exact.mean)
    assert np.abs(fast.epistemic_std - exact.epistemic_std).max() < fastvar.TOLERANCE_DB


def test_solve_builds_the_lower_triangle_only_and_cholesky_reads_no_more():
    """fastvar.solve leaves K's upper triangle unbuilt: torch's Cholesky must read the lower triangle alone (NaN
    above the diagonal gives the same factor), and the lower triangle is the full build's."""
    b, theta = _cell(300, 60.0, uses_load=True)
    length, signal2, _ = fastvar._params(theta, 0.5)
    lower = fastvar._kernel_lower(b.xy[0], b.h[0], length, signal2, 1.5)
    full = fastvar._kernel(b.xy[0], b.xy[0], length, signal2, 1.5)
    full = full + signal2 * (b.h[0] * gp.basis_prior_var(b.h[0])) @ b.h[0].T
    tril = torch.tril(torch.ones(300, 300, dtype=torch.bool))
    assert torch.allclose(lower[tril], full[tril], rtol=1e-12, atol=1e-12)
    k = full + torch.eye(300, dtype=torch.float64) * 4.0
    nan_above = k.masked_fill(~tril, float("nan"))
    assert torch.equal(torch.linalg.cholesky(nan_above), torch.linalg.cholesky(k))
