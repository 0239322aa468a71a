"""The log-distance term near the site: d = sqrt(d_2D^2 + H^2) (geometry.SITE_HEIGHT_M, SITE_SPREAD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import geometry
from cellsynth.radio.geometry import basis, estimate_site, site_offset
from cellsynth.radio.model import CellData, FitSettings, FittedCells, fit_cells


def _cells(n_cells: int = 3, n: int = 120, seed: int = 8, site_given: bool = False) -> list[CellData]:
    """Sector cells at (200, 300) pointing east: the strongest rows lie in front of the mast, so
    the estimated site is off the true one."""
    rng = np.random.default_rng(seed)
    site = np.array([200.0, 300.0])
    out = []
    for c in range(n_cells):
        xy = site + rng.uniform(-700.0, 700.0, (n, 2))
        d = np.linalg.norm(xy - site, axis=1)
        theta = np.degrees(np.arctan2(*(xy - site).T[::-1]))  # bearing from east, degrees
        y = (-60.0 - 30.0 * np.log10(np.hypot(d, 25.0) / 1000.0) - np.minimum(12.0 * (theta / 65.0) ** 2, 20.0)
             + 3.0 * np.sin(xy[:, 0] / 80.0 + c) + rng.normal(0.0, 2.0, n))
        out.append(CellData(f"c{c}", xy, y, origin_xy_m=site if site_given else None))
    return out


@pytest.fixture
def near_site(monkeypatch):
    def set_(height: float, spread: bool) -> None:
        monkeypatch.setattr(geometry, "SITE_HEIGHT_M", height)
        monkeypatch.setattr(geometry, "SITE_SPREAD", spread)
    return set_


def test_site_offset_is_height_plus_the_strongest_decile_spread(near_site):
    rng = np.random.default_rng(0)
    xy, y = rng.uniform(0.0, 500.0, (200, 2)), rng.normal(-90.0, 8.0, 200)
    top = y >= np.quantile(y, 0.9)
    r2 = np.mean(np.sum((xy[top] - estimate_site(xy, y)) ** 2, axis=1))
    near_site(25.0, True)
    assert site_offset(xy, y, True) == pytest.approx(np.sqrt(25.0**2 + r2))
    assert site_offset(xy, y, False) == pytest.approx(25.0)  # a given site: the antenna height only
    near_site(25.0, False)
    assert site_offset(xy, y, True) == pytest.approx(25.0)
    near_site(0.0, False)
    assert site_offset(xy, y, True) == 0.0


def test_basis_uses_the_3d_distance_and_height_zero_is_the_2d_clamp():
    xy = np.array([[0.0, 0.0], [3.0, 4.0], [300.0, 400.0]])
    h0 = basis(xy, np.zeros(2), 0.0, False, None)
    np.testing.assert_allclose(h0[:, 1], np.log10(np.array([10.0, 10.0, 500.0]) / 1000.0))
    h = basis(xy, np.zeros(2), 0.0, False, None, 120.0)
    np.testing.assert_allclose(h[:, 1], np.log10(np.hypot([0.0, 5.0, 500.0], 120.0) / 1000.0))
    np.testing.assert_array_equal(h[:, [0, 2, 3, 4]], h0[:, [0, 2, 3, 4]])


def test_fit_stores_the_offset_and_predicts_with_it(near_site, tmp_path):
    torch.set_num_threads(1)
    near_site(25.0, True)
    cells = _cells()
    f = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    want = [site_offset(c.xy_m, c.y, True) for c in cells]
    np.testing.assert_allclose(f.arrays["site_h_m"], want)
    assert all(h > 25.0 for h in want)
    q = np.random.default_rng(1).uniform(-500.0, 900.0, (60, 2))
    idx = np.repeat(np.arange(3), 20)
    p = f.predict(idx, q)
    # the stored offset is what prediction uses: the module setting no longer matters, and a
    # save / load round trip predicts the same
    near_site(0.0, False)
    np.testing.assert_array_equal(f.predict(idx, q).mean, p.mean)
    f.save(tmp_path / "m")
    g = FittedCells.load(tmp_path / "m")
    np.testing.assert_allclose(g.predict(idx, q).mean, p.mean, rtol=0, atol=1e-9)
    # a given site: H is the antenna height alone
    near_site(25.0, True)
    given = fit_cells(_cells(site_given=True), target="rsrp", settings=FitSettings(), seed=0)
    np.testing.assert_allclose(given.arrays["site_h_m"], 25.0)


def test_off_is_the_2d_model_and_weights_without_the_offset_predict_as_before(near_site):
    torch.set_num_threads(1)
    near_site(0.0, False)
    f = fit_cells(_cells(), target="rsrp", settings=FitSettings(), seed=0)
    np.testing.assert_array_equal(f.arrays["site_h_m"], 0.0)
    q = np.random.default_rng(2).uniform(-500.0, 900.0, (30, 2))
    idx = np.repeat(np.arange(3), 10)
    p = f.predict(idx, q)
    old = FittedCells(f.cell_ids, f.target, f.settings, {k: v for k, v in f.arrays.items() if k != "site_h_m"},
                      f.elbo, f.n_train)
    po = old.predict(idx, q)
    np.testing.assert_array_equal(po.mean, p.mean)
    np.testing.assert_array_equal(po.epistemic_std, p.epistemic_std)


def test_refitted_folds_use_the_offset_of_the_folds_own_rows(near_site):
    """A refitted CV fold (foldcv) predicts its rows as a fit on the other folds' rows does:
    site, offset H, prior mean and hyperparameters all from those rows."""
    from cellsynth.radio import foldcv, gp
    from cellsynth.radio.model import _batch_of

    torch.set_num_threads(1)
    near_site(25.0, True)
    cell = _cells(n_cells=1, n=150)[0]
    groups = np.arange(150) % 3
    k = np.ones(1, dtype=np.int64)
    f = foldcv.fold_errors([cell.xy_m], [cell.y], [np.ones(150)], None, [None], [None], [groups], k, nu=1.5,
                           floor_db=0.5, rngs=[np.random.default_rng(0)], batch_of=_batch_of, device=torch.device("cpu"))[0]
    tr, te = groups != 0, groups == 0
    alone = fit_cells([CellData("c", cell.xy_m[tr], cell.y[tr])], target="rsrp",
                      settings=FitSettings(calibrate=False), seed=0)
    assert alone.arrays["site_h_m"][0] == pytest.approx(site_offset(cell.xy_m[tr], cell.y[tr], True))
    pred = alone.predict(np.zeros(te.sum(), dtype=int), cell.xy_m[te])
    np.testing.assert_allclose(f[0, te], cell.y[te] - pred.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(f[6, te], np.hypot(*(cell.xy_m[te] - alone.arrays["origin_xy_m"][0]).T))
    assert gp.MATERN_NU[FitSettings().kernel] == 1.5


def test_site_term_columns_are_the_log_distance_spread_over_site_positions_and_vanish_for_a_given_site(monkeypatch):
    """geometry.SITE_TERM (rule Z, off): N_SITE columns of log10 d at the quadrature's site positions, centred; 0 when H
    is the antenna height alone (a site the cells table gives); the prior std of each is SITE_SLOPE_STD_DB."""
    xy = np.array([[0.0, 0.0], [30.0, 0.0], [1000.0, 0.0]])
    site = np.zeros(2)
    h = basis(xy, site, 0.0, False, None, 125.0, site_term=True)
    assert h.shape == (3, geometry.N_BASIS + geometry.N_SITE)
    np.testing.assert_allclose(h[:, geometry.N_BASIS:].sum(axis=1), 0.0, atol=1e-12)  # centred over the nodes
    spread = np.sqrt(125.0**2 - geometry.SITE_HEIGHT_M**2)
    # at the estimate the columns' spread is the std of log10 d over site errors of RMS `spread`: ~0.3 decades
    sd_site, sd_far = (np.sqrt(np.sum(h[i, geometry.N_BASIS:] ** 2)) for i in (0, 2))
    assert 0.2 < sd_site < 0.45 and sd_far < 0.1
    # far out the linearised spread / (sqrt(2) ln 10 d): only the radial half of the site error moves log10 d
    assert sd_far == pytest.approx(spread / (np.log(10.0) * 1000.0) / np.sqrt(2.0), rel=0.35)
    np.testing.assert_array_equal(basis(xy, site, 0.0, False, None, geometry.SITE_HEIGHT_M, site_term=True)[:, geometry.N_BASIS:], 0.0)
    np.testing.assert_array_equal(basis(xy, site, 0.0, False, None, 125.0)[:, :geometry.N_BASIS], h[:, :geometry.N_BASIS])
    assert geometry.basis_prior_std(h.shape[1])[geometry.N_BASIS:] == (geometry.SITE_SLOPE_STD_DB,) * geometry.N_SITE
    # on: the prior mean leaves the site columns at 0 (centred on the estimate) and the fit predicts through them
    torch.set_num_threads(1)
    cells = _cells(n_cells=2)
    off = fit_cells(cells, target="rsrp", settings=FitSettings())
    monkeypatch.setattr(geometry, "SITE_TERM", True)
    on = fit_cells(cells, target="rsrp", settings=FitSettings())
    assert on.arrays["beta0"].shape[1] == geometry.N_BASIS + geometry.N_SITE
    np.testing.assert_array_equal(on.arrays["beta0"][:, geometry.N_BASIS:], 0.0)
    monkeypatch.setattr(geometry, "SITE_TERM", False)  # the weights say which basis they were fitted with
    near = on.arrays["origin_xy_m"][0][None] + np.array([[20.0, 0.0]])
    p_on, p_off = on.predict(np.zeros(1, dtype=int), near), off.predict(np.zeros(1, dtype=int), near)
    assert np.isfinite(p_on.mean).all() and p_on.epistemic_std[0] != pytest.approx(p_off.epistemic_std[0], rel=1e-6)


def _patch_cells(n_cells: int = 4, seed: int = 12) -> tuple[list[CellData], list[tuple[np.ndarray, np.ndarray]]]:
    """Cells whose rows all lie within 50 m of a spot 600 m from the mast (a cell heard on one street corner), and
    test points 150-600 m from the spot: a least-squares slope over the patch is shadowing, not a distance law."""
    rng = np.random.default_rng(seed)
    site = np.array([0.0, 0.0])
    cells, tests = [], []

    def field(xy, phase):
        d = np.hypot(np.linalg.norm(xy - site, axis=1), 25.0)
        return -70.0 - 35.0 * np.log10(d / 600.0) + 4.0 * np.sin(xy[:, 0] / 25.0 + phase) * np.cos(xy[:, 1] / 30.0)

    for c in range(n_cells):
        spot = 600.0 * np.array([np.cos(c), np.sin(c)])
        xy = spot + rng.uniform(-50.0, 50.0, (80, 2))
        cells.append(CellData(f"p{c}", xy, field(xy, c) + rng.normal(0.0, 2.0, len(xy))))
        ang, r = rng.uniform(0.0, 2 * np.pi, 200), rng.uniform(150.0, 600.0, 200)
        xt = spot + np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
        tests.append((xt, field(xt, c)))
    return cells, tests


def test_a_cell_seen_in_a_small_patch_gets_a_flat_prior_mean(monkeypatch):
    cells, tests = _patch_cells()
    c = cells[3]  # its least-squares slope over the patch, -16 dB/decade, passes the plausibility check
    w = np.ones(len(c.y))
    assert geometry.patch_rms_m(c.xy_m, w) < geometry.PATCH_FLAT_RMS_M
    origin = estimate_site(c.xy_m, c.y)
    h = site_offset(c.xy_m, c.y, True)
    flat, ant = geometry.prior_mean(c.xy_m, c.y, origin, None, None, None, h, estimated=True)
    assert not ant and flat[1] == 0.0 and flat[2] == 0.0 and flat[0] == pytest.approx(np.mean(c.y))
    # a site from the cells table keeps the least-squares trend, as the guard off gives it
    given = geometry.prior_mean(c.xy_m, c.y, origin, None, None, None, h, estimated=False)[0]
    monkeypatch.setattr(geometry, "PATCH_FLAT_RMS_M", 0.0)
    np.testing.assert_array_equal(given, geometry.prior_mean(c.xy_m, c.y, origin, None, None, None, h, estimated=True)[0])
    assert not np.allclose(given, flat)
    monkeypatch.undo()

    def pooled_mae() -> float:
        f = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
        return float(np.mean(np.concatenate([np.abs(f.predict(np.full(len(yt), i), xt).mean - yt)
                                             for i, (xt, yt) in enumerate(tests)])))

    guarded = pooled_mae()
    monkeypatch.setattr(geometry, "PATCH_FLAT_RMS_M", 0.0)
    extrapolated = pooled_mae()
    # the patch's slope extrapolated outwards: 8.9 dB; flat: 7.7 dB
    assert guarded < extrapolated - 0.8
