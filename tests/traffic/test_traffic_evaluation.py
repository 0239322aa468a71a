"""Fidelity metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellsynth.traffic import evaluation as ev


def test_jsd_of_disjoint_and_identical_distributions():
    assert ev.jsd([1, 0], [0, 1]) == pytest.approx(1.0)
    assert ev.jsd([2, 3, 5], [4, 6, 10]) == pytest.approx(0.0)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); KL(p||m) = log2(4/3), KL(q||m) = (log2(2/3) + log2(2)) / 2.
    expected = 0.5 * math.log2(4 / 3) + 0.5 * 0.5 * (math.log2(2 / 3) + 1.0)
    assert ev.jsd([1, 0], [1, 1]) == pytest.approx(expected)


def test_value_jsd_zero_for_same_values_and_one_for_separated_values():
    real = np.tile(np.arange(168.0), (2, 1))
    assert ev.value_jsd(real, real[:, None, :]) == pytest.approx(0.0)
    low = np.zeros((1, 168))
    high = np.full((1, 2, 168), 10.0)
    assert ev.value_jsd(low, high) == pytest.approx(1.0)


def test_crps_of_a_two_member_ensemble_by_hand():
    # Members {0, 2}, observation 1: E|X - y| = 1, E|X - X'| = (0 + 2 + 2 + 0) / 4 = 1, CRPS = 1 - 0.5.
    obs = np.ones((1, 3))
    ens = np.stack([np.zeros(3), np.full(3, 2.0)])[None]
    assert ev.crps_ensemble(obs, ens) == pytest.approx(0.5)
    # One member: CRPS is the absolute error.
    assert ev.crps_ensemble(np.array([[3.0, 5.0]]), np.array([[[1.0, 1.0]]])) == pytest.approx(3.0)


def test_crps_matches_pairwise_brute_force():
    rng = np.random.default_rng(0)
    obs, ens = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 5, 6))
    brute = []
    for c in range(2):
        t1 = np.abs(ens[c][None] - obs[c][:, None]).mean(axis=1)
        t2 = np.abs(ens[c][:, None] - ens[c][None, :]).mean(axis=(0, 1))
        brute.append((t1 - 0.5 * t2).mean())
    assert ev.crps_ensemble(obs, ens) == pytest.approx(np.mean(brute))


def test_profile_errors_by_hand():
    real = np.zeros((1, 2, 168))
    real[0, 1] = 2.0  # mean profile 1 everywhere
    synth = np.full((1, 3, 168), 4.0)
    mae, rmse = ev.profile_errors(real, synth)
    assert (mae, rmse) == (pytest.approx(3.0), pytest.approx(3.0))


def test_autocorrelation_of_a_daily_sine_and_short_series():
    x = np.sin(2 * np.pi * np.arange(168) / 24)
    # Lag 24 of a pure daily sine over n points: sum x_t x_{t+24} / sum x_t^2 = (n - 24) / n.
    assert ev.autocorrelation(x, 24) == pytest.approx((168 - 24) / 168, abs=1e-9)
    assert math.isnan(ev.autocorrelation(x, 168))
    assert ev.autocorrelation_error(x[None], np.stack([x, x])[None], lag=24) == pytest.approx(
        abs((168 - 24) / 168 - (336 - 24) / 336), abs=1e-9
    )


def test_peak_hour_error_is_circular():
    h = np.arange(168) % 24
    real = (h == 23).astype(float)[None]
    synth = (h == 1).astype(float)[None, None]
    assert ev.peak_hour_error(real, synth) == 2.0


def test_baselines():
    train = np.stack([np.full(168, 1.0), np.full(168, 3.0), np.full(168, 10.0)])
    how = ev.hour_of_week_mean_baseline(train, 2, 4)
    assert how.shape == (2, 4, 168) and np.allclose(how, 14 / 3)
    ctx = np.array([[0.0], [1.0], [5.0]])
    near = ev.nearest_context_baseline(ctx, train, np.array([[0.9], [4.0]]), 2)
    assert np.allclose(near[0], 3.0) and np.allclose(near[1], 10.0)
