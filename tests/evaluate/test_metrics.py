"""Shared probabilistic-regression metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cellsynth.evaluate.metrics import calibration_curve, calibration_error, mae, mean_epistemic, rmse, sharpness


def test_mae_rmse_hand_computed():
    y, p = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    assert mae(y, p) == pytest.approx(0.75)  # (1 + 0 + 2 + 0) / 4
    assert rmse(y, p) == pytest.approx(np.sqrt(5 / 4))


def test_calibration_curve_hand_computed():
    # F_i = Phi(z): z = -1, 0, 1 -> 0.159, 0.5, 0.841
    y, mu, sd = np.array([-1.0, 0.0, 1.0]), np.zeros(3), np.ones(3)
    p, obs = calibration_curve(y, mu, sd, levels=[0.25, 0.5, 0.9])
    np.testing.assert_allclose(obs, [1 / 3, 2 / 3, 1.0])
    # CE: w = obs / sum(obs) = [1/6, 2/6, 3/6]; |obs - p| = [1/12, 1/6, 1/10]
    expected = (1 / 6) * (1 / 12) + (2 / 6) * (1 / 6) + (3 / 6) * (1 / 10)
    assert calibration_error(y, mu, sd, levels=[0.25, 0.5, 0.9]) == pytest.approx(expected)


def test_calibrated_gaussian_has_small_error_and_overconfident_large():
    rng = np.random.default_rng(0)
    y = rng.normal(0.0, 2.0, 20000)
    assert calibration_error(y, np.zeros_like(y), np.full_like(y, 2.0)) < 0.01
    assert calibration_error(y, np.zeros_like(y), np.full_like(y, 0.5)) > 0.1


def test_sharpness_and_epistemic():
    assert sharpness(np.array([1.0, 3.0])) == pytest.approx((2.0, 1.0))
    assert mean_epistemic(np.array([1.0, 3.0])) == pytest.approx(2.0)
    assert mean_epistemic(np.array([1.0, 3.0]), as_variance=True) == pytest.approx(5.0)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="different lengths"):
        mae(np.zeros(3), np.zeros(2))
