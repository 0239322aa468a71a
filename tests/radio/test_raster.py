"""radio/raster.py: a cell's posterior raster gives the exact GP's predictions within 0.05 dB at
random points of its footprint (mean and epistemic std; the aleatoric std is untouched), exact
values outside it, survives save / load and `take`, and a raster that fails its check is not kept."""

import numpy as np
import pytest

from cellsynth.radio import raster
from cellsynth.radio.geometry import prior_mean
from cellsynth.radio.model import FitSettings, FittedCells


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fitted(uses_load: bool, *, n: int = 400, length_m: float = 60.0, n_cells: int = 1, seed: int = 0) -> FittedCells:
    """Cells as generation meets them: rows where the cell is heard around its site, a
    log-distance field + noise, IPW-like weights, calibrated factors as the radio stage writes them."""
    rng = np.random.default_rng(seed)
    arrays = {k: [] for k in ("origin_xy_m", "azimuth_deg", "ant_on", "beta0", "train_xy_m", "train_y", "train_rho", "train_w")}
    for c in range(n_cells):
        site = np.array([500.0 * c, 100.0])
        pts = site + rng.normal(0, 200, (n, 2))
        d = np.maximum(np.linalg.norm(pts - site, axis=1), 10.0)
        rho = rng.uniform(0.1, 0.9, n)
        y = (-12.0 - 3.0 * (rho - 0.5) if uses_load else -60.0 - 35.0 * np.log10(d / 1000.0)) + rng.normal(0, 4.0, n)
        b0, _ = prior_mean(pts, y, site, 30.0, rho if uses_load else None, None)
        for k, v in (("origin_xy_m", site), ("azimuth_deg", 30.0), ("ant_on", 1.0), ("beta0", b0), ("train_xy_m", pts),
                     ("train_y", y), ("train_rho", rho), ("train_w", rng.uniform(0.5, 1.5, n))):
            arrays[k].append(v)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    arrays.update({"theta": np.tile(np.log([length_m, 6.0, 3.0]), (n_cells, 1)), "scale": np.tile([1.3, 1.1], (n_cells, 1)),
                   "ep_scale": np.full((n_cells, 4), 1.3), "blend_w": np.full((n_cells, 4), 0.2), "blend_support": np.ones(n_cells),
                   "ep_slope": np.full(n_cells, 0.3), "knn_k": np.full(n_cells, 5.0), "cv_mae_db": np.full((n_cells, 2), np.nan),
                   "mask": np.ones((n_cells, n), dtype=bool)})
    if uses_load:
        arrays["blend_w"][:] = 0.0
    return FittedCells([f"c{i}" for i in range(n_cells)], "rsrq" if uses_load else "rsrp", FitSettings(uses_load=uses_load),
                       arrays, np.zeros(n_cells), np.full(n_cells, n))


def _points(fc: FittedCells, m: int, spread_m: float, seed: int = 3):
    rng = np.random.default_rng(seed)
    site = fc.arrays["origin_xy_m"][0]
    return site + rng.normal(0, spread_m, (m, 2)), rng.uniform(0.0, 1.0, m)


@pytest.mark.parametrize("uses_load", [False, True])
def test_raster_matches_exact_within_tolerance(uses_load):
    fc = _fitted(uses_load)
    xy, rho = _points(fc, 3000, 250.0)
    idx = np.zeros(len(xy), dtype=np.int64)
    exact = fc.predict(idx, xy, rho)
    fc.rasters = raster.build_all(fc)
    assert set(fc.rasters) == {0}
    before = dict(raster.STATS)
    got = fc.predict(idx, xy, rho)
    assert raster.STATS["raster_rows"] - before["raster_rows"] >= 0.95 * len(xy)  # the footprint holds the rows
    assert np.abs(got.mean - exact.mean).max() <= raster.TOLERANCE_DB
    # the epistemic std is the latent std times the calibration factor (1.3 e^{0.3 v} here)
    assert np.abs(got.epistemic_std - exact.epistemic_std).max() <= raster.TOLERANCE_DB * 1.3 * np.exp(0.3)
    np.testing.assert_array_equal(got.aleatoric_std, exact.aleatoric_std)
    assert not np.array_equal(got.mean, exact.mean)  # the raster was used, not the exact path


def test_rows_outside_the_raster_are_exact():
    fc = _fitted(False)
    far = fc.arrays["origin_xy_m"][0] + np.array([[3000.0, 0.0], [0.0, -2500.0], [4000.0, 4000.0]])
    idx = np.zeros(len(far), dtype=np.int64)
    exact = fc.predict(idx, far)
    fc.rasters = raster.build_all(fc)
    got = fc.predict(idx, far)
    np.testing.assert_array_equal(got.mean, exact.mean)
    np.testing.assert_array_equal(got.epistemic_std, exact.epistemic_std)


def test_save_load_and_take_keep_the_rasters(tmp_path):
    fc = _fitted(False, n=200, n_cells=2)
    fc.save(tmp_path / "shard=0")
    built = raster.save_for(fc, tmp_path / "shard=0")
    assert set(built) == {0, 1}
    loaded = FittedCells.load(tmp_path / "shard=0")
    assert set(loaded.rasters) == {0, 1}
    xy, _ = _points(fc, 500, 150.0)
    idx = np.zeros(len(xy), dtype=np.int64)
    fc.rasters = built
    np.testing.assert_allclose(loaded.predict(idx, xy).mean, fc.predict(idx, xy).mean, rtol=0, atol=1e-12)
    second = loaded.take([1])
    assert set(second.rasters) == {0}
    xy1 = xy + (fc.arrays["origin_xy_m"][1] - fc.arrays["origin_xy_m"][0])
    np.testing.assert_allclose(second.predict(idx, xy1).epistemic_std, loaded.predict(idx + 1, xy1).epistemic_std, rtol=0, atol=1e-12)
    # models written without rasters load with none
    fc.save(tmp_path / "plain")
    assert FittedCells.load(tmp_path / "plain").rasters == {}


def test_a_raster_that_fails_its_check_is_not_kept(monkeypatch):
    fc = _fitted(False, n=200)
    monkeypatch.setattr(raster, "TOLERANCE_DB", 1e-9)
    before = raster.STATS["refused_check"]
    assert raster.build_all(fc) == {}
    assert raster.STATS["refused_check"] == before + 1
