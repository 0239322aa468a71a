"""A shard's calibration taken as given (incremental retrains of some of a shard's cells)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import CellData, FitSettings, fit_cells
from cellsynth.radio.model import SHARD_CALIBRATION_KEYS, _calibration_keys, shard_calibration

SITE = np.array([0.0, 0.0])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cell(name: str, n: int, seed: int, centre: tuple[float, float]) -> CellData:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-500, 500, (n, 2)) + np.asarray(centre)
    d_km = np.maximum(np.hypot(*xy.T), 10.0) / 1000.0
    bump = 5.0 * np.sin(xy[:, 0] / 150.0) * np.cos(xy[:, 1] / 200.0)
    return CellData(name, xy, -75.0 - 35.0 * np.log10(d_km) + bump + 3.0 * rng.standard_normal(n), origin_xy_m=SITE)


@pytest.fixture(scope="module")
def shard():
    torch.set_num_threads(1)
    cells = [_cell(f"c{i}", 140 + 40 * i, i, (300.0 * i, 200.0)) for i in range(3)]
    return cells, fit_cells(cells, target="rsrp", settings=FitSettings(), seed=5)


def test_a_retrained_cell_takes_the_shards_calibration_and_keeps_its_own_fit(shard):
    cells, whole = shard
    calib = shard_calibration(whole)
    assert calib is not None and set(calib) == _calibration_keys()
    # a new day for c1: more rows; its own fit is redone, the shard's calibration is taken as given
    extra = _cell("c1", 260, 11, (300.0, 200.0))
    c1 = CellData("c1", extra.xy_m, extra.y, origin_xy_m=SITE)
    kept = fit_cells([c1], target="rsrp", settings=FitSettings(), seed=5, calibration=calib)
    alone = fit_cells([c1], target="rsrp", settings=FitSettings(), seed=5)
    for k in set(SHARD_CALIBRATION_KEYS) & set(calib):
        np.testing.assert_array_equal(np.asarray(kept.arrays[k][0], dtype=float), calib[k])
    np.testing.assert_array_equal(kept.arrays["tree_w"][0], calib["tree_w"])  # c1 has a forest (>= 100 rows)
    # the cell's own fit is the same with or without the given calibration
    for k in ("theta", "beta0", "origin_xy_m", "knn_k"):
        np.testing.assert_array_equal(kept.arrays[k], alone.arrays[k])
    np.testing.assert_allclose(kept.arrays["cv_mae_db"][:, 0], alone.arrays["cv_mae_db"][:, 0], rtol=1e-12)
    assert np.isnan(kept.arrays["cv_mae_db"][0, 1])  # no block CV was run
    # calibrated alone, the one cell's factors differ from the shard's
    assert not np.allclose(alone.arrays["scale"][0], calib["scale"])
    # the factors reach the predictive: same mean basis, the shard's interval factors
    xy = c1.xy_m[:40] + 30.0
    a, b = kept.predict(np.zeros(40, dtype=int), xy), alone.predict(np.zeros(40, dtype=int), xy)
    ratio = a.aleatoric_std / b.aleatoric_std
    np.testing.assert_allclose(ratio, calib["scale"][1] / alone.arrays["scale"][0, 1], rtol=1e-9)


def test_shard_calibration_refuses_what_is_not_one_shards_fit(shard):
    cells, whole = shard
    other = fit_cells([cells[0]], target="rsrp", settings=FitSettings(), seed=5)
    mixed = whole.take([1, 2])
    mixed.arrays["scale"] = np.vstack([whole.arrays["scale"][1], other.arrays["scale"][0]])
    assert shard_calibration(mixed) is None
    older = whole.take([0, 1])
    del older.arrays["ep_scale"]  # weights of code that did not write it
    assert shard_calibration(older) is None
    binned = whole.take([0, 1])
    binned.arrays["dist_edges_m"] = binned.arrays["dist_edges_m"][:, :3]  # other distance bins
    assert shard_calibration(binned) is None


def test_a_given_calibration_is_checked():
    c = _cell("c0", 120, 0, (0.0, 0.0))
    with pytest.raises(ValueError, match="calibration lacks"):
        fit_cells([c], target="rsrp", settings=FitSettings(), calibration={"scale": np.ones(2)})
    pooled = CellData("p", c.xy_m, c.y, origin_xy_m=np.zeros(2), local=False)
    calib = {k: np.zeros(0) for k in _calibration_keys()}
    with pytest.raises(ValueError, match="pooled"):
        fit_cells([pooled], target="rsrp", settings=FitSettings(), calibration=calib)
