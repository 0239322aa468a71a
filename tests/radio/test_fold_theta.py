"""foldcv.FOLD_THETA (session 18, rules F and F'): "cell" folds take the cell's own hyperparameters and run no
grid search; "cell_random": only the random folds do; "refit" folds refit them as before; the rng draws are the
same under all. `fold_errors` uses a theta it is given and refits without one; `fit_cells` decides per call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import foldcv, gp
from cellsynth.radio.model import CellData, FitSettings, _batch_of, fit_cells
from tests.radio.test_fit_speed import _cell  # the same synthetic cell (site, positions, RSRP)

_FIT_THETA_GRID, _FOLD_ERRORS = gp.fit_theta_grid, foldcv.fold_errors  # unwrapped, for the counting wrappers


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _count_grid(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(gp, "fit_theta_grid", lambda b, **k: (calls.append(b.r.shape[0]), _FIT_THETA_GRID(b, **k))[1])
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


def test_given_theta_runs_no_grid_search_and_draws_as_refit(monkeypatch):
    calls = _count_grid(monkeypatch)
    cell, after_cell = _folds(THETA)
    assert calls == []
    # no theta, with a grid search that returns the same theta: the same floats and the same rng streams after
    fixed = torch.as_tensor(THETA, dtype=torch.float64)
    monkeypatch.setattr(gp, "fit_theta_grid", lambda b, **k: (fixed[: b.r.shape[0]], torch.zeros(b.r.shape[0])))
    refit, after_refit = _folds(None)
    assert after_cell == after_refit
    for a, b in zip(cell, refit):
        assert np.isfinite(a).any()
        np.testing.assert_array_equal(a, b)


def test_bad_theta_or_mode_raises(monkeypatch):
    with pytest.raises(ValueError, match="theta"):
        _folds(THETA[:1])
    monkeypatch.setattr(foldcv, "FOLD_THETA", "both")
    with pytest.raises(ValueError, match="FOLD_THETA"):
        foldcv.cell_theta("random")
    monkeypatch.setattr(foldcv, "FOLD_THETA", "refit")
    with pytest.raises(ValueError, match="kind"):
        foldcv.cell_theta("loo")


def test_cell_theta_kinds(monkeypatch):
    kinds = ("block", "random", "halfplane")
    for mode, own in (("refit", ()), ("cell", kinds), ("cell_random", ("random",))):
        monkeypatch.setattr(foldcv, "FOLD_THETA", mode)
        assert [foldcv.cell_theta(k) for k in kinds] == [k in own for k in kinds]


def test_no_theta_refits_every_fold(monkeypatch):
    calls = _count_grid(monkeypatch)
    _folds(None)
    assert len(calls) == 3  # one grid search per fold (both cells in one batch)


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


def _fit_logging_folds(monkeypatch, mode: str, far_mode: str = "off"):
    """fit_cells under FOLD_THETA `mode`; per fold_errors call in order: (grid searches it ran, its output)."""
    from cellsynth.radio import farfield as ff

    monkeypatch.setattr(foldcv, "FOLD_THETA", mode)
    monkeypatch.setattr(ff, "FAR_MODE", far_mode)
    calls = _count_grid(monkeypatch)
    log = []

    def logged(*a, **k):
        n0 = len(calls)
        out = _FOLD_ERRORS(*a, **k)
        log.append((len(calls) - n0, [f.copy() for f in out]))
        return out

    monkeypatch.setattr(foldcv, "fold_errors", logged)
    fit = fit_cells(_shard(), target="rsrp", settings=FitSettings(), seed=3)
    return log, fit


@pytest.mark.parametrize("far_mode", ["off", "halfplane"])
def test_fit_cells_cell_random_mode_skips_the_grid_in_random_folds_only(monkeypatch, far_mode):
    from cellsynth.radio import calibration as cal

    assert cal.RANDOM_CV == "kfold_mean"  # one block call per multiple, then the random folds' call
    n_block = len(cal.CV_BLOCK_MULTIPLES)
    refit, fit_refit = _fit_logging_folds(monkeypatch, "refit", far_mode)
    rand, fit_rand = _fit_logging_folds(monkeypatch, "cell_random", far_mode)
    assert len(rand) == len(refit) == n_block + 1 + (far_mode == "halfplane")
    assert all(n > 0 for n, _ in refit)
    assert [n > 0 for n, _ in rand] == [True] * n_block + [False] + [True] * (far_mode == "halfplane")
    # the block and half-plane folds are the refit's, float for float (the rng streams are unchanged)
    for k in [j for j in range(len(rand)) if j != n_block]:
        assert rand[k][0] == refit[k][0]
        for a, b in zip(rand[k][1], refit[k][1]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fit_rand.arrays["theta"], fit_refit.arrays["theta"])


def test_a_fold_of_only_a_later_cell_with_per_cell_shared():
    """`shared` has one entry per cell: a fold where cell 0 sits out (here: all its rows in fold 0, so folds 1 and 2
    predict only cell 1) looks up shared[1] (a one-entry list for a chunk of two cells raised IndexError there, on a
    real inner split); a list of the wrong length is a ValueError."""
    cells = [_cell(60, seed=7), _cell(90, seed=8)]
    groups = [np.zeros(60, dtype=np.int64), np.random.default_rng(1).permutation(np.arange(90) % 3)]

    def run(shared):
        rngs = [np.random.default_rng([3, i]) for i in range(2)]
        return foldcv.fold_errors([c[1] for c in cells], [c[2] for c in cells], [np.ones(len(c[2])) for c in cells],
                                  None, [cells[0][0], cells[1][0]], [45.0, 45.0], groups, np.array([4, 3]), nu=1.5,
                                  floor_db=0.5, rngs=rngs, batch_of=_batch_of, device="cpu", theta=THETA, shared=shared)

    out = run([None, None])
    assert np.isnan(out[0]).all()  # cell 0: no fold had both training and held-out rows of it
    assert np.isfinite(out[1][:2]).all()  # cell 1: every row predicted, in folds without cell 0 among them
    with pytest.raises(ValueError, match="shared"):
        run([None])
