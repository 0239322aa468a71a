"""`FittedCells.epistemic_cov`: the posterior covariance the measurement planner conditions on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import CellData, FitSettings, fit_cells
from cellsynth.radio.model import FittedCells


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _fitted(calibrate: bool) -> FittedCells:
    rng = np.random.default_rng(4)
    cells = []
    for i in range(2):
        xy = rng.uniform(-600, 600, (120, 2)) + [300.0 * i, 0.0]
        d_km = np.maximum(np.hypot(*xy.T), 10.0) / 1000
        cells.append(CellData(f"c{i}", xy, -70.0 - 35.0 * np.log10(d_km) + 4.0 * rng.standard_normal(120), origin_xy_m=np.zeros(2)))
    return fit_cells(cells, target="rsrp", settings=FitSettings(calibrate=calibrate), seed=0)


def _with_row(fc: FittedCells, i: int, xy_new: np.ndarray) -> FittedCells:
    """Cell i of `fc` with one more training row at xy_new, hyperparameters and factors unchanged."""
    one = fc.take([i])
    a = {k: np.array(v) for k, v in one.arrays.items()}
    pad = {"train_xy_m": xy_new[None, None], "train_y": np.full((1, 1), -90.0), "train_rho": np.full((1, 1), 0.5),
           "train_w": np.ones((1, 1)), "mask": np.ones((1, 1), bool)}
    for k, v in pad.items():
        a[k] = np.concatenate([a[k], v], axis=1)
    return FittedCells(one.cell_ids, one.target, one.settings, a, one.elbo, one.n_train + 1)


def test_diagonal_is_the_calibrated_predicted_epistemic_variance():
    fc = _fitted(calibrate=True)
    xy = np.array([[0.0, 50.0], [400.0, -200.0], [3000.0, 2000.0], [150.0, 150.0]])
    for i in range(2):
        cov = fc.epistemic_cov(i, xy)
        pred = fc.predict(np.full(len(xy), i), xy)
        np.testing.assert_allclose(np.diag(cov), pred.epistemic_std**2, rtol=1e-8)
        np.testing.assert_allclose(cov, cov.T, atol=1e-10)
        assert np.all(np.linalg.eigvalsh(cov) > -1e-6 * np.abs(cov).max())
        # nearby positions are correlated, far ones hardly (but the shared mean terms keep some)
        corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
        assert corr[0, 3] > corr[0, 2]


def test_diagonal_follows_the_factor_of_each_distance_bin():
    """Epistemic factors that differ per distance-to-nearest-row bin (calibration.DIST_EDGES_M,
    since session 13): each position's variance takes its own bin's factor, as in `predict`."""
    fc = _fitted(calibrate=True)
    a = {k: np.array(v) for k, v in fc.arrays.items()}
    assert a["ep_scale"].shape[1] == len(a["dist_edges_m"][0]) == 5
    a["ep_scale"][:] = [1.0, 1.2, 1.5, 2.0, 3.0]
    fb = FittedCells(fc.cell_ids, fc.target, fc.settings, a, fc.elbo, fc.n_train)
    xy = np.array([[0.0, 50.0], [700.0, 0.0], [750.0, 700.0], [3000.0, 2000.0]])  # in the data ... far out
    cov = fb.epistemic_cov(0, xy)
    pred = fb.predict(np.zeros(len(xy), int), xy)
    np.testing.assert_allclose(np.diag(cov), pred.epistemic_std**2, rtol=1e-8)
    assert pred.epistemic_std[-1] > 2.0 * fc.predict(np.zeros(1, int), xy[-1:]).epistemic_std[0]  # factor 3 there


def test_conditioning_on_one_report_equals_the_model_refit_with_that_row():
    fc = _fitted(calibrate=False)
    targets = np.array([[100.0, 100.0], [150.0, 80.0], [-500.0, 400.0], [900.0, 900.0]])
    x_new = np.array([120.0, 90.0])
    pts = np.vstack([targets, x_new])
    cov = fc.epistemic_cov(0, pts)
    noise = fc.predict(np.zeros(1, int), x_new[None]).aleatoric_std[0] ** 2
    expected = np.diag(cov)[:4] - cov[:4, 4] ** 2 / (cov[4, 4] + noise)
    after = _with_row(fc, 0, x_new).predict(np.zeros(4, int), targets).epistemic_std ** 2
    np.testing.assert_allclose(after, expected, rtol=1e-4)
    assert after[0] < 0.9 * np.diag(cov)[0]  # the report next to target 0 teaches it something
