"""Student-t predictive (calibration.TAIL_MODE): the unit-std t, the dof chosen on training-row
errors, and the prediction/bench side that reads it."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from cellsynth.radio import calibration as cal
from cellsynth.radio.model import RadioPrediction


def test_unit_std_t_is_a_t_with_unit_variance_and_inf_is_the_normal():
    z = np.linspace(-4.0, 4.0, 17)
    np.testing.assert_allclose(cal.std_t_cdf(z, np.inf), norm.cdf(z), atol=1e-15)
    np.testing.assert_allclose(cal.std_t_ppf(cal.std_t_cdf(z, 5.0), 5.0), z, atol=1e-9)
    assert cal.std_t_cdf(z, 1e6) == pytest.approx(norm.cdf(z), abs=1e-6)
    draws = cal.std_t_draws(np.random.default_rng(0), 5.0, 400_000)
    assert np.var(draws) == pytest.approx(1.0, rel=0.03)
    # the 90% half-width of a unit-std t5 is narrower than the normal's (more mass in the centre and tails)
    assert cal.std_t_ppf(0.95, 5.0) < norm.ppf(0.95)
    # Gaussian rows draw exactly the standard normal stream
    np.testing.assert_array_equal(cal.std_t_draws(np.random.default_rng(1), np.inf, 10), np.random.default_rng(1).standard_normal(10))


def test_objective_with_inf_dof_is_the_gaussian_objective():
    z = np.random.default_rng(2).standard_t(4, 3000)
    w = np.random.default_rng(3).uniform(0.5, 2.0, 3000)
    assert cal.interval_error_z(z, 1.3, dof=np.inf) == cal.interval_error_z(z, 1.3)
    assert cal.interval_error_z(z, 1.3, weight=w, dof=np.inf) == cal.interval_error_z(z, 1.3, weight=w)


@pytest.mark.parametrize("true_dof, lo, hi", [(4.0, 3.0, 6.0), (np.inf, 15.0, np.inf)])
def test_dof_is_recovered_from_training_row_errors(true_dof, lo, hi):
    """Errors with std 2 (latent variance 1 stated, noise variance 1 stated: factor sqrt 2 on
    both), t4 or Gaussian in shape: the chosen dof brackets the truth and the std is recovered."""
    rng = np.random.default_rng(4)
    n = 8000
    shape = rng.standard_normal(n) if not np.isfinite(true_dof) else rng.standard_t(true_dof, n) * np.sqrt((true_dof - 2) / true_dof)
    e = 2.0 * shape
    sets = [(e[: n // 2], np.ones(n // 2), np.ones(n // 2), np.zeros(n // 2)), (e[n // 2:], np.ones(n // 2), np.ones(n // 2), np.zeros(n // 2))]
    f_ep, f_al, dof = cal.interval_scales_tail(sets, dofs=cal.DOF_CANDIDATES)
    assert lo <= dof <= hi
    assert np.sqrt(f_ep[0] ** 2 + f_al**2) == pytest.approx(2.0, rel=0.12)
    # TAIL_MODE "gauss": always the normal
    old = cal.TAIL_MODE
    try:
        cal.TAIL_MODE = "gauss"
        assert cal.interval_scales_tail(sets)[2] == np.inf
    finally:
        cal.TAIL_MODE = old


def test_prediction_cdf_and_interval_agree_and_the_bench_scores_the_t():
    rng = np.random.default_rng(5)
    n = 20000
    mean, ep, al = np.zeros(n), np.full(n, 1.0), np.full(n, 2.0)
    dof = np.where(np.arange(n) < n // 2, 4.0, np.inf)
    pred = RadioPrediction(mean, ep, al, dof=dof)
    lo, hi = pred.interval(0.9)
    np.testing.assert_allclose(pred.cdf(lo), 0.05, atol=1e-9)
    np.testing.assert_allclose(pred.cdf(hi), 0.95, atol=1e-9)
    assert RadioPrediction(mean, ep, al).dof_or_inf().tolist() == [np.inf] * n
    y = pred.total_std * cal.std_t_draws(rng, dof, n)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import radio_real as rr

    sc = rr.weighted_scores(y, mean, pred.total_std, None, dof)
    assert sc["cov90"] == pytest.approx(0.9, abs=0.01) and sc["cov50"] == pytest.approx(0.5, abs=0.015) and sc["ce"] < 0.01
    # scored as a Gaussian, the t4 half overcovers at 50% (its centre is narrower than the normal's)
    g = rr.weighted_scores(y[: n // 2], mean[: n // 2], pred.total_std[: n // 2])
    assert g["cov50"] > 0.55


def test_evaluate_metrics_read_the_dof():
    from cellsynth.evaluate import metrics as M

    rng = np.random.default_rng(6)
    n = 20000
    y = cal.std_t_draws(rng, 3.0, n) * 2.0
    mean, std = np.zeros(n), np.full(n, 2.0)
    np.testing.assert_allclose(M.pit(y, mean, std, np.full(n, np.inf)), M.pit(y, mean, std), atol=1e-15)
    # the t3 rows are calibrated under their own dof, not under the Gaussian of the same std
    assert M.calibration_error(y, mean, std, dof=np.full(n, 3.0)) < 0.01 < M.calibration_error(y, mean, std)


def test_normal_to_std_t_keeps_the_stream_and_gives_the_t():
    z = np.random.default_rng(4).standard_normal(200_000)
    # inf: the normal draws themselves (generation with Gaussian models is unchanged)
    np.testing.assert_array_equal(cal.normal_to_std_t(z, np.inf), z)
    t = cal.normal_to_std_t(z, 6.0)
    # monotone and symmetric map: the same ranks, t(-z) = -t(z)
    assert np.array_equal(np.argsort(t, kind="stable"), np.argsort(z, kind="stable"))
    np.testing.assert_allclose(cal.normal_to_std_t(-z[:100], 6.0), -t[:100], atol=1e-12)
    # distribution: the unit-std t6 (PIT uniform), unit variance, heavier tails than the normal
    u = np.sort(cal.std_t_cdf(t, 6.0))
    assert np.max(np.abs(u - (np.arange(len(u)) + 0.5) / len(u))) < 0.005
    assert np.var(t) == pytest.approx(1.0, rel=0.05)
    assert np.mean(np.abs(t) > 3.0) > 2.0 * np.mean(np.abs(z) > 3.0)
    # far tails stay finite and ordered (Phi(z) rounds to 1 beyond z ~ 8.3; |z| capped at 20) and row-wise dof mixes
    far = cal.normal_to_std_t(np.array([-40.0, -9.0, 9.0, 40.0]), 3.0)
    assert np.all(np.isfinite(far)) and far[0] < far[1] < 0 < far[2] < far[3]
    mixed = cal.normal_to_std_t(z[:4], np.array([np.inf, 6.0, np.inf, 6.0]))
    np.testing.assert_array_equal(mixed[[0, 2]], z[[0, 2]])
    np.testing.assert_allclose(mixed[[1, 3]], t[[1, 3]])
