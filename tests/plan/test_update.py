"""The planning proof's update: a cell's GP conditioned on new rows, nothing refitted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.plan.update import condition_on_rows
from cellsynth.radio import CellData, FitSettings, fit_cells


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(11)
    torch.set_num_threads(1)
    cells = []
    for c in range(2):
        xy = rng.uniform(-500, 500, (70, 2))
        d_km = np.maximum(np.hypot(*xy.T), 10.0) / 1000
        y = -72.0 - 35.0 * np.log10(d_km) + 4.0 * np.sin(xy[:, 0] / 60.0 + c) + 2.0 * rng.standard_normal(70)
        cells.append(CellData(f"c{c}", xy, y, origin_xy_m=np.zeros(2)))
    return fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)


def _predict(f, i, xy):
    return f.predict(np.full(len(xy), i), xy, n_samples=8, seed=0)


def test_no_new_rows_is_the_model_itself(fitted):
    xy = np.random.default_rng(1).uniform(-800, 800, (40, 2))
    same = condition_on_rows(fitted, 1, np.empty((0, 2)), np.empty(0))
    a, b = _predict(fitted, 1, xy), _predict(same, 0, xy)
    np.testing.assert_allclose(b.mean, a.mean, atol=1e-9)
    np.testing.assert_allclose(b.epistemic_std, a.epistemic_std, atol=1e-9)
    assert same.cell_ids == ["c1"] and int(same.n_train[0]) == int(fitted.n_train[1])


def test_new_rows_never_widen_the_epistemic_std_and_narrow_it_where_they_are(fitted):
    rng = np.random.default_rng(2)
    new_xy = np.column_stack([np.linspace(600, 900, 13), np.full(13, 700.0)])  # outside the old rows
    new_y = -110.0 + rng.standard_normal(13)
    cond = condition_on_rows(fitted, 0, new_xy, new_y)
    assert int(cond.n_train[0]) == int(fitted.n_train[0]) + 13
    xy = np.vstack([rng.uniform(-1000, 1000, (200, 2)), new_xy + 5.0])
    before, after = _predict(fitted, 0, xy), _predict(cond, 0, xy)
    assert np.all(after.epistemic_std <= before.epistemic_std + 1e-9)
    near = slice(200, None)
    assert np.all(after.epistemic_std[near] < before.epistemic_std[near] - 0.1)
    # the covariance the planner scores shrinks the same way (diagonal)
    dc_before = np.diag(fitted.epistemic_cov(0, xy[near]))
    dc_after = np.diag(cond.epistemic_cov(0, xy[near]))
    assert np.all(dc_after < dc_before)


def test_bad_rows_are_refused(fitted):
    with pytest.raises(ValueError, match="positions for"):
        condition_on_rows(fitted, 0, np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        condition_on_rows(fitted, 0, np.zeros((1, 2)), np.array([np.nan]))
