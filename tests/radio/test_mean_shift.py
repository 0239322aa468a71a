"""One constant on the mean per shard from the refitted held-out sets (calibration.MEAN_SHIFT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import calibration as cal
from cellsynth.radio.model import CellData, FitSettings, FittedCells, fit_cells


def test_mean_shift_is_the_weighted_median_over_the_sets():
    rng = np.random.default_rng(0)
    e = rng.normal(0.0, 1.0, 4000)
    assert cal.mean_shift([(e + 1.0,)]) == pytest.approx(1.0, abs=0.1)
    # row weights: the heavy rows' offset wins
    w = np.where(np.arange(4000) < 1000, 20.0, 1.0)
    e2 = np.where(w > 1.0, e + 2.0, e)
    assert 1.5 <= cal.mean_shift([(e2, w)]) <= 2.0  # the weighted median: 87% of the weight at +2
    assert cal.mean_shift([(e2,)]) < 1.0
    # each set counts equally; the grid bounds the value; too few rows: 0
    assert abs(cal.mean_shift([(e + 1.0,), (e - 1.0,)])) <= 1.0 + 1e-9
    assert cal.mean_shift([(e + 10.0,)]) == pytest.approx(cal.SHIFT_GRID_DB[-1])
    assert cal.mean_shift([(np.ones(5),)]) == 0.0


def _cells(n_cells: int = 3, n: int = 150, seed: int = 4) -> list[CellData]:
    """Heavily sampled rows sit 3 dB above the field the light ones follow."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_cells):
        xy = rng.uniform(-800.0, 800.0, (n, 2))
        w = np.where(rng.random(n) < 0.3, 30.0, 1.0)
        y = (-70.0 - 30.0 * np.log10(np.hypot(np.linalg.norm(xy, axis=1), 25.0) / 1000.0)
             + 3.0 * np.sin(xy[:, 0] / 90.0 + c) + 3.0 * (w > 1.0) + rng.normal(0.0, 2.0, n))
        out.append(CellData(f"c{c}", xy, y, origin_xy_m=np.zeros(2), row_weight=w))
    return out


def test_fit_with_the_shift_moves_the_mean_by_the_stored_constant(monkeypatch, tmp_path):
    torch.set_num_threads(1)
    cells = _cells()
    assert cal.MEAN_SHIFT  # the default since session 12 (rule G)
    monkeypatch.setattr(cal, "MEAN_SHIFT", False)
    off = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    assert "mean_shift" not in off.arrays
    monkeypatch.setattr(cal, "MEAN_SHIFT", True)
    on = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    c = on.arrays["mean_shift"]
    assert np.all(c == c[0]) and c[0] > 0.5  # one value per shard; the heavy rows pull it up
    q = np.random.default_rng(1).uniform(-600.0, 600.0, (45, 2))
    idx = np.repeat(np.arange(3), 15)
    p_on, p_off = on.predict(idx, q), off.predict(idx, q)
    np.testing.assert_allclose(p_on.mean, p_off.mean + c[0], rtol=0, atol=1e-9)
    assert on.calibration()["mean_shift_db"] == pytest.approx(list(c))
    # saved and loaded; weights without the key predict without a shift
    on.save(tmp_path / "m")
    np.testing.assert_allclose(FittedCells.load(tmp_path / "m").predict(idx, q).mean, p_on.mean, rtol=0, atol=1e-9)
    bare = FittedCells(on.cell_ids, on.target, on.settings, {k: v for k, v in on.arrays.items() if k != "mean_shift"},
                       on.elbo, on.n_train)
    np.testing.assert_allclose(bare.predict(idx, q).mean, p_on.mean - c[0], rtol=0, atol=1e-9)


def test_shift_weighted_only_leaves_cells_with_uniform_weights_unshifted(monkeypatch):
    """calibration.SHIFT_WEIGHTED_ONLY (rule I): the shift is fitted on and added to the cells whose
    row weights differ; the others keep the unshifted mean (same GP, kNN weight and blend)."""
    torch.set_num_threads(1)
    assert cal.SHIFT_WEIGHTED_ONLY  # the default since session 13 (rule I)
    monkeypatch.setattr(cal, "SHIFT_WEIGHTED_ONLY", False)
    weighted = _cells()
    rng = np.random.default_rng(9)
    flat = []
    for c, rw in enumerate((None, np.ones(150))):  # no weights at all, and weights that are all equal
        xy = rng.uniform(-800.0, 800.0, (150, 2))
        y = -70.0 - 30.0 * np.log10(np.hypot(np.linalg.norm(xy, axis=1), 25.0) / 1000.0) + rng.normal(0.0, 2.0, 150)
        flat.append(CellData(f"u{c}", xy, y, origin_xy_m=np.zeros(2), row_weight=rw))
    cells = weighted + flat
    both = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    monkeypatch.setattr(cal, "SHIFT_WEIGHTED_ONLY", True)
    only = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    c_both, c_only = both.arrays["mean_shift"], only.arrays["mean_shift"]
    assert np.all(c_only[3:] == 0.0)  # uniform weights: no shift
    assert np.all(c_only[:3] > 0.5)  # the weighted cells' heavy rows still pull theirs up
    assert c_only[0] != c_both[0]  # fitted on the weighted cells' rows alone, not on all five
    q = np.random.default_rng(1).uniform(-600.0, 600.0, (75, 2))
    idx = np.repeat(np.arange(5), 15)
    np.testing.assert_allclose(only.predict(idx, q).mean - both.predict(idx, q).mean, (c_only - c_both)[idx], rtol=0, atol=1e-9)
