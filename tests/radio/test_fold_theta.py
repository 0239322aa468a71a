"""foldcv.FOLD_THETA (session 18, rule F): "cell" folds take the cell's own hyperparameters and run no
grid search; "refit" folds refit them as before; the rng draws are the same under both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _count_grid(monkeypatch) -> list:
    calls = []
    real = gp.fit_theta_grid
    monkeypatch.setattr(gp, "fit_theta_grid", lambda b, **k: (calls.append(b.r.shape[0]), real(b, **k))[1])
    return calls


def _folds(theta, rng_seed=2, **extra):
    """Two cells (one above FOLD_HYPER_ROWS training rows per fold, so its subsample is drawn), 3 random folds."""
    cells = [_cell(420, seed=5), _cell(90, seed=6)]
    rngs = [np.random.default_rng([rng_seed, i]) for i in range(2)]
    groups = [np.random.default_rng(1).permutation(np.arange(len(c[2])) % 3) for c in cells]
    out = foldcv.fold_errors([c[1] for c in cells], [c[2] for c in cells], [np.ones(len(c[2])) for c in cells], None,
                             [cells[0][0], None], [45.0, None], groups, np.array([4, 3]), nu=1.5, floor_db=0.5, rngs=rngs,
                             batch_of=_batch_of, device="cpu", theta=theta, **extra)
    return out, [r.integers(1 << 30) for r in rngs]  # the folds' output, and each stream's next draw


THETA = np.array([[np.log(120.0), np.log(4.0), np.log(2.5)], [np.log(60.0), np.log(3.0), np.log(2.0)]])


def test_cell_mode_runs_no_grid_search_and_draws_as_refit(monkeypatch):
    monkeypatch.setattr(foldcv, "FOLD_THETA", "cell")
    calls = _count_grid(monkeypatch)
    cell, after_cell = _folds(THETA)
    assert calls == []
    # refit mode with a grid search that returns the same theta: the same floats and the same rng streams after
    monkeypatch.setattr(foldcv, "FOLD_THETA", "refit")
    fixed = torch.as_tensor(THETA, dtype=torch.float64)
    monkeypatch.setattr(gp, "fit_theta_grid", lambda b, **k: (fixed[: b.r.shape[0]], torch.zeros(b.r.shape[0])))
    refit, after_refit = _folds(None)
    assert after_cell == after_refit
    for a, b in zip(cell, refit):
        assert np.isfinite(a).any()
        np.testing.assert_array_equal(a, b)


def test_cell_mode_needs_theta(monkeypatch):
    monkeypatch.setattr(foldcv, "FOLD_THETA", "cell")
    with pytest.raises(ValueError, match="theta"):
        _folds(None)
    monkeypatch.setattr(foldcv, "FOLD_THETA", "both")
    with pytest.raises(ValueError, match="FOLD_THETA"):
        _folds(THETA)


def test_refit_mode_refits_every_fold_and_ignores_theta(monkeypatch):
    monkeypatch.setattr(foldcv, "FOLD_THETA", "refit")
    calls = _count_grid(monkeypatch)
    plain, after_plain = _folds(None)
    assert len(calls) == 3  # one grid search per fold (both cells in one batch)
    given, after_given = _folds(THETA)
    assert after_plain == after_given
    for a, b in zip(plain, given):
        np.testing.assert_array_equal(a, b)


def _shard():
    cells = []
    for i in range(3):
        site, xy, y = _cell(80 + 40 * i, seed=30 + i)
        cells.append(CellData(f"c{i}", xy, y, origin_xy_m=site if i != 1 else None, azimuth_deg=30.0 * i))
    return cells


def test_fit_cells_cell_mode_grid_searches_only_the_cells_own_theta(monkeypatch):
    calls = _count_grid(monkeypatch)
    fit_cells(_shard(), target="rsrp", settings=FitSettings(calibrate=False), seed=3)
    n_own = len(calls)  # the cells' own hyper fits only
    assert n_own >= 1
    calls.clear()
    monkeypatch.setattr(foldcv, "FOLD_THETA", "refit")
    refit = fit_cells(_shard(), target="rsrp", settings=FitSettings(), seed=3)
    assert len(calls) > n_own  # the folds' grid searches besides
    calls.clear()
    monkeypatch.setattr(foldcv, "FOLD_THETA", "cell")
    cell = fit_cells(_shard(), target="rsrp", settings=FitSettings(), seed=3)
    assert len(calls) == n_own
    # the same hyperparameters (fitted before the folds), calibrated from other folds' theta
    np.testing.assert_array_equal(cell.arrays["theta"], refit.arrays["theta"])
