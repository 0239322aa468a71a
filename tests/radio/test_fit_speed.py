"""Session 17's cuts of the radio fit's CPU change no float: the optimised paths against main's forms, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import calibration as cal
from cellsynth.radio import foldcv, gp
from cellsynth.radio.model import CellData, FitSettings, _batch_of, fit_cells


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cell(n: int, seed: int):
    rng = np.random.default_rng(seed)
    site = np.array([300.0, 200.0])
    xy = site + rng.uniform(-600, 600, (n, 2))
    d = np.maximum(np.linalg.norm(xy - site, axis=1), 10.0) / 1000.0
    y = -70.0 - 33.0 * np.log10(d) + 4.0 * np.sin(xy[:, 0] / 80.0) + rng.normal(0, 3.0, n)
    return site, xy, y


def _shared(xy: np.ndarray, site: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration batch's (distances, long-range correlation) of a lone cell, as model.fit_cells hands them on."""
    b = _batch_of([xy - site], [np.zeros(len(xy))], [np.ones(len(xy))], [np.zeros((len(xy), 5))], np.zeros((1, 5)), "cpu")
    dist, _, long = b.parts(1.5)
    return dist[0], long[0]


@pytest.mark.parametrize("n,n_folds", [(120, 3), (700, 3), (300, 2)])
def test_fold_errors_with_shared_parts_equal_recomputed_parts_bit_for_bit(monkeypatch, n, n_folds):
    site, xy, y = _cell(n, seed=n)
    groups = [np.random.default_rng(1).permutation(np.arange(n) % n_folds)]
    kw = dict(nu=1.5, floor_db=0.5, batch_of=_batch_of, device="cpu")
    args = ([xy], [y], [np.ones(n)], None, [site], [45.0], groups, np.array([4]))
    plain = foldcv.fold_errors(*args, rngs=[np.random.default_rng(2)], **kw)[0]
    used = []
    orig = gp.Batch.share_parts
    monkeypatch.setattr(gp.Batch, "share_parts", lambda self, *a: (used.append(1), orig(self, *a))[1])
    shared = foldcv.fold_errors(*args, rngs=[np.random.default_rng(2)], shared=[_shared(xy, site)], **kw)[0]
    assert len(used) == 2 * n_folds  # every fold's training batch and hyperparameter batch took them
    assert np.isfinite(plain).any()
    np.testing.assert_array_equal(shared, plain)  # NaN where not predicted, in both


def test_fold_errors_ignore_shared_parts_without_a_given_site_or_with_several_cells(monkeypatch):
    site, xy, y = _cell(90, seed=4)
    used = []
    orig = gp.Batch.share_parts
    monkeypatch.setattr(gp.Batch, "share_parts", lambda self, *a: (used.append(1), orig(self, *a))[1])
    groups = [np.arange(90) % 3]
    kw = dict(nu=1.5, floor_db=0.5, batch_of=_batch_of, device="cpu")
    foldcv.fold_errors([xy], [y], [np.ones(90)], None, [None], [None], groups, np.array([2]),
                       rngs=[np.random.default_rng(0)], shared=[_shared(xy, site)], **kw)
    foldcv.fold_errors([xy, xy[:60]], [y, y[:60]], [np.ones(90), np.ones(60)], None, [site, site], [None, None],
                       [groups[0], groups[0][:60]], np.array([2, 2]), rngs=[np.random.default_rng(0), np.random.default_rng(1)],
                       shared=[_shared(xy, site), _shared(xy[:60], site)], **kw)
    assert used == []


def test_share_parts_refuses_a_padded_batch():
    b = _batch_of([np.zeros((3, 2)), np.ones((2, 2))], [np.zeros(3), np.zeros(2)], [np.ones(3), np.ones(2)],
                  [np.zeros((3, 5)), np.zeros((2, 5))], np.zeros((2, 5)), "cpu")
    with pytest.raises(ValueError):
        b.share_parts(torch.zeros(2, 3, 3, dtype=torch.float64), torch.zeros(2, 3, 3, dtype=torch.float64))


def test_latent_cov_with_given_parts_equals_computed():
    rng = np.random.default_rng(3)
    xa = torch.as_tensor(rng.uniform(0, 900, (1, 40, 2)))
    xb = torch.as_tensor(rng.uniform(0, 900, (1, 70, 2)))
    ha, hb = torch.as_tensor(rng.normal(0, 1, (1, 40, 5))), torch.as_tensor(rng.normal(0, 1, (1, 70, 5)))
    theta = torch.tensor([[np.log(90.0), np.log(5.0), np.log(2.0)]], dtype=torch.float64)
    dist = gp._dist(xa, xb)
    given = gp.latent_cov(xa, ha, xb, hb, theta, nu=1.5, floor_db=0.5, parts=(dist, gp.matern(dist / gp.LONG_RANGE_LENGTH_M, 1.5)))
    assert torch.equal(given, gp.latent_cov(xa, ha, xb, hb, theta, nu=1.5, floor_db=0.5))


def _reference_calibration_error_z(z, scale=1.0, dof=6.0):
    """calibration_error_z's finite-dof path as of main 75c0567 (argsort, cumulative unit weights)."""
    order = np.argsort(np.asarray(z, dtype=float), kind="stable")
    x = np.asarray(z, dtype=float)[order] / scale
    cw = np.concatenate([[0.0], np.cumsum(np.ones(len(x)))])
    counts = np.searchsorted(x, cal._z_of(dof)[1], side="right")
    return float(np.mean(np.abs(cw[counts] / cw[-1] - cal.CE_LEVELS)))


def test_calibration_error_t_without_weights_equals_the_argsort_form_bit_for_bit():
    rng = np.random.default_rng(11)
    for n in (1, 2, 7, 100, 5000):
        z = rng.standard_t(4, n)
        z[: n // 3] = np.round(z[: n // 3], 1)  # ties
        if n > 3:
            z[:2] = (-0.0, 0.0)
        for dof in (3.0, 6.0, 30.0):
            for scale in (0.5, 1.0, 1.7):
                assert cal.calibration_error_z(z, scale, dof=dof) == _reference_calibration_error_z(z, scale, dof)


def test_shard_fit_takes_the_shared_parts(monkeypatch):
    """A shard whose cells are fitted one per calibration batch (here: forced) hands each cell's
    parts to its folds, and its fit equals the one without sharing bit for bit."""
    from cellsynth.radio import model as radio_model

    cells = []
    for i in range(3):
        site, xy, y = _cell(80 + 15 * i, seed=20 + i)
        cells.append(CellData(f"c{i}", xy, y, origin_xy_m=site, azimuth_deg=30.0 * i))
    monkeypatch.setattr(radio_model, "CPU_BATCH_ELEMENTS", 1)  # every cell its own batch, as at scale
    used = []
    orig = gp.Batch.share_parts
    monkeypatch.setattr(gp.Batch, "share_parts", lambda self, *a: (used.append(1), orig(self, *a))[1])
    shared = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=3)
    assert used
    real = foldcv.fold_errors
    monkeypatch.setattr(foldcv, "fold_errors", lambda *a, shared=None, **k: real(*a, **k))  # no sharing
    plain = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=3)
    for key in plain.arrays:
        np.testing.assert_array_equal(shared.arrays[key], plain.arrays[key], err_msg=key)
    np.testing.assert_array_equal(shared.elbo, plain.elbo)
