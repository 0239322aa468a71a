"""Issues 7/8 under the pipeline's conditions: a sector antenna (30 dB front-to-back), 6 dB
shadowing correlated over 50 m, 2 dB measurement noise and 1 dB reporting steps, dense reports
split at random. The model must beat kNN on held-out RSRP there, and its epistemic std must
grow in a hole left in the data (the spatial-block case)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import RadioModel
from cellsynth.radio.baselines import knn_fit_predict, rf_fit_predict
from cellsynth.scenario import antenna_gain_dbi, gaussian_field, quantise_rsrp, sample_field

SITE = np.array([0.0, 0.0])
AZIMUTH_DEG = 60.0
SHADOW_DB, NOISE_DB, DECORRELATION_M = 6.0, 2.0, 50.0
HOLE = np.array([450.0, 250.0])  # centre of a 200 m square without training reports


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _truth(xy: np.ndarray, shadow: np.ndarray) -> np.ndarray:
    dx, dy = xy[:, 0] - SITE[0], xy[:, 1] - SITE[1]
    d = np.maximum(np.hypot(dx, dy), 10.0)
    gain = antenna_gain_dbi(np.degrees(np.arctan2(dx, dy)) - AZIMUTH_DEG, np.full(len(d), 90.0), downtilt_deg=0.0)
    # field from a 5 m periodic grid, offset so the 1.28 km torus covers the 1.2 km square once
    return -60.0 - 35.0 * np.log10(d / 1000.0) + gain - SHADOW_DB * sample_field(shadow, xy[:, 0] + 600.0, xy[:, 1] + 600.0)


def _shadowed_cell(*, seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n quantised reports on a fresh unit-variance shadowing field, and a 35% random test mask."""
    rng = np.random.default_rng(seed)
    shadow = gaussian_field(rng, decorrelation_m=DECORRELATION_M, n=256)
    shadow = (shadow - shadow.mean()) / shadow.std()
    xy = rng.uniform(-600.0, 600.0, (n, 2))
    y = quantise_rsrp(_truth(xy, shadow) + NOISE_DB * rng.standard_normal(len(xy)))
    return xy, y, rng.random(len(xy)) < 0.35


@pytest.fixture(scope="module")
def field_data():
    xy, y, test = _shadowed_cell(seed=7, n=5000)
    hole = np.all(np.abs(xy - HOLE) < 100.0, axis=1)
    train = ~test & ~hole
    model = RadioModel(random_state=0).fit(xy[train], y[train], site_xy_m=SITE, azimuth_deg=AZIMUTH_DEG)
    return model, xy, y, train, test & ~hole, hole


def test_held_out_mae_beats_knn_and_rf_on_correlated_shadowing(field_data):
    model, xy, y, train, test, _ = field_data
    ours = np.mean(np.abs(model.predict(xy[test]).mean - y[test]))
    knn = np.mean(np.abs(knn_fit_predict(xy[train], y[train], xy[test])[0] - y[test]))
    rf = np.mean(np.abs(rf_fit_predict(xy[train], y[train], xy[test], n_estimators=30)[0] - y[test]))
    assert ours <= knn
    # no row weights: no mean shift (calibration.SHIFT_WEIGHTED_ONLY, session 13; with the shift on
    # every cell this unbiased field got +0.10 dB of noise, MAE 2.4045 -> 2.4108 against the
    # forest's 2.4104)
    assert model.fitted_.arrays["mean_shift"][0] == 0.0
    assert ours <= rf
    # the shadowing is structure, not noise: well below E|N(0, sqrt(6^2 + 2^2))| = 5.05 dB
    assert ours < 0.8 * 5.05


def test_aleatoric_is_not_the_shadowing(field_data):
    model, xy, _, _, test, _ = field_data
    # with 50 m correlation and reports ~15 m apart, most of the 6 dB shadowing is learnable;
    # the old model reported ~7-10 dB here (it treated the shadowing as noise)
    assert np.mean(model.predict(xy[test]).aleatoric_std) < 5.0


def test_epistemic_grows_in_a_hole_in_the_data(field_data):
    model, xy, y, _, test, hole = field_data
    inside = model.predict(xy[test])
    centre = np.all(np.abs(xy - HOLE) < 50.0, axis=1)  # >= 50 m from any training report
    gap = model.predict(xy[centre])
    assert gap.epistemic_std.mean() > 2.0 * inside.epistemic_std.mean()
    # and the total std there covers the error: |z| no larger than a unit normal's on average
    z = (y[centre] - gap.mean) / gap.total_std
    assert np.mean(np.abs(z)) < 1.2 * np.sqrt(2 / np.pi)
