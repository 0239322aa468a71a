"""Radio physics against hand-computed TR 38.901 values and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from cellsynth.scenario import (
    antenna_gain_dbi,
    gaussian_field,
    los_probability,
    path_loss_db,
    quantise_rsrp,
    quantise_rsrq,
    rsrq_db,
    sample_field,
)


def test_uma_nlos_path_loss_matches_hand_computation():
    # 13.54 + 39.08 log10(sqrt(1000^2 + 23.5^2)) + 20 log10(1.8) = 135.890 dB (LOS branch is 108.8)
    pl = path_loss_db(np.array([1000.0]), h_bs_m=25.0, freq_mhz=1800.0, environment=np.array(["uma"]),
                      los=np.array([False]))
    assert pl[0] == pytest.approx(135.890, abs=0.01)


def test_uma_los_before_breakpoint_and_umi_nlos():
    # UMa LOS at 100 m (< d_BP = 288 m): 28 + 22 log10(102.72) + 20 log10(1.8) = 77.362
    los = path_loss_db(np.array([100.0]), h_bs_m=25.0, freq_mhz=1800.0, environment=np.array(["uma"]),
                       los=np.array([True]))
    assert los[0] == pytest.approx(77.362, abs=0.01)
    # UMi NLOS at 200 m, h_BS = 10 m: 22.4 + 35.3 log10(200.18) + 21.3 log10(1.8) = 109.077
    umi = path_loss_db(np.array([200.0]), h_bs_m=10.0, freq_mhz=1800.0, environment=np.array(["umi"]),
                       los=np.array([False]))
    assert umi[0] == pytest.approx(109.077, abs=0.01)


def test_nlos_slope_per_decade_is_the_tables_39_08_db():
    d = np.array([300.0, 3000.0])
    pl = path_loss_db(d, h_bs_m=25.0, freq_mhz=1800.0, environment=np.array(["uma", "uma"]), los=np.array([False, False]))
    # d3D differs from d2D by < 0.3 %, so one decade of d2D is ~one decade of d3D.
    assert pl[1] - pl[0] == pytest.approx(39.08, abs=0.1)


def test_los_probability_closed_form():
    p = los_probability(np.array([10.0, 100.0]), np.array(["uma", "uma"]))
    # 18/100 + exp(-100/63) * (1 - 18/100) = 0.18 + 0.2045 * 0.82 = 0.3477
    assert p[0] == pytest.approx(1.0, abs=1e-12)
    assert p[1] == pytest.approx(0.3477, abs=1e-3)


def test_antenna_pattern_boresight_half_power_and_back_lobe():
    gain = antenna_gain_dbi(np.array([0.0, 32.5, 180.0, -180.0]), np.full(4, 96.0), downtilt_deg=6.0)
    # G_max = 8 dBi; -3 dB at half the 65 deg beamwidth; front-to-back A_m = 30 dB.
    np.testing.assert_allclose(gain, [8.0, 5.0, -22.0, -22.0], atol=1e-9)


def test_vertical_pattern_attenuates_off_tilt():
    gain = antenna_gain_dbi(np.array([0.0]), np.array([90.0 + 6.0 + 32.5]), downtilt_deg=6.0)
    assert gain[0] == pytest.approx(5.0)


def test_gaussian_field_has_unit_variance_and_exponential_correlation():
    field = gaussian_field(np.random.default_rng(0), decorrelation_m=50.0, grid_m=5.0, n=512).astype(float)
    assert field.var() == pytest.approx(1.0, abs=0.1)
    lag = 10  # 10 cells x 5 m = 50 m
    rho = np.mean(field * np.roll(field, lag, axis=1)) / field.var()
    assert rho == pytest.approx(np.exp(-1.0), abs=0.05)


def test_sample_field_interpolates_bilinearly_and_wraps():
    field = np.arange(16, dtype=np.float32).reshape(4, 4)  # value = 4 * row + col
    got = sample_field(field, np.array([2.5, 0.0, 4.0]), np.array([5.0, 0.0, 0.0]), grid_m=1.0)
    # (x=2.5, y=5 -> row 1): 4 + 2.5 = 6.5; (0, 0) -> 0; x = 4 wraps to column 0 -> 0.
    np.testing.assert_allclose(got, [6.5, 0.0, 0.0])


def test_rsrq_single_cell_unloaded_and_loaded():
    rsrp = np.array([[-80.0], [-80.0]])
    load = np.array([[0.0], [1.0]])
    got = rsrq_db(rsrp, load, serving=np.array([0, 0]), noise_re_dbm=-300.0)
    # Unloaded: only RS REs (1/6 of 12) -> 1/2 = -3.01 dB; fully loaded: 1/12 = -10.79 dB.
    np.testing.assert_allclose(got, [-3.0103, -10.7918], atol=1e-3)


def test_rsrq_interferer_load_degrades_quality():
    rsrp = np.array([[-80.0, -80.0], [-80.0, -80.0]])
    load = np.array([[1.0, 0.0], [1.0, 1.0]])
    got = rsrq_db(rsrp, load, serving=np.array([0, 0]), noise_re_dbm=-300.0)
    # Equal neighbour idle: 1 / (12 * (1 + 1/6)) = -11.46 dB; loaded: 1/24 = -13.80 dB.
    np.testing.assert_allclose(got, [-11.4613, -13.8021], atol=1e-3)


def test_reporting_quantisation_and_clipping():
    np.testing.assert_array_equal(quantise_rsrp(np.array([-150.2, -97.4, -30.0])), [-140.0, -97.0, -44.0])
    np.testing.assert_array_equal(quantise_rsrq(np.array([-25.0, -10.3, -10.2, -1.0])), [-19.5, -10.5, -10.0, -3.0])
