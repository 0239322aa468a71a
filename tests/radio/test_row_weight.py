"""Per-row observation weights (CellData.row_weight: raw samples a row aggregates): the GP's
noise n^2 (w_ref / w)^gamma, row-weighted training-row objectives, and the baselines' weights."""

import numpy as np
import pytest
import torch

from cellsynth.radio import calibration as cal
from cellsynth.radio import model as rm
from cellsynth.radio import stacking as stk
from cellsynth.radio.baselines import make_baseline
from cellsynth.radio.model import CellData, FitSettings, fit_cells, noise_weight

SITE = np.array([0.0, 0.0])


def _cell(n: int, seed: int):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(100.0, 700.0, (n, 2))
    d_km = np.hypot(*xy.T) / 1000.0
    y = -70.0 - 35.0 * np.log10(d_km) + 4.0 * np.sin(xy[:, 0] / 90.0) + 2.0 * rng.standard_normal(n)
    return xy, y


def test_noise_weight_is_one_without_weights_or_with_equal_weights():
    np.testing.assert_array_equal(noise_weight(None, 4), np.ones(4))
    np.testing.assert_array_equal(noise_weight(np.full(4, 7.0), 4), np.ones(4))
    w = np.array([1.0, 4.0, 16.0])  # geometric mean 4
    np.testing.assert_allclose(noise_weight(w, 3, power=0.5), [0.5, 1.0, 2.0])
    np.testing.assert_allclose(noise_weight(w, 3, power=1.0), [0.25, 1.0, 4.0])
    np.testing.assert_array_equal(noise_weight(w, 3, power=0.0), np.ones(3))


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_equal_row_weights_give_the_unweighted_fit(monkeypatch, power):
    monkeypatch.setattr(rm, "ROW_WEIGHT_POWER", power)
    cells = [CellData(f"c{i}", *_cell(120 + 40 * i, i), origin_xy_m=SITE) for i in range(2)]
    weighted = [CellData(c.cell_id, c.xy_m, c.y, origin_xy_m=SITE, row_weight=np.full(len(c.y), 37.0)) for c in cells]
    a = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=1)
    b = fit_cells(weighted, target="rsrp", settings=FitSettings(), seed=1)
    for k in ("theta", "scale", "blend_w", "knn_k", "beta0"):
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=0, atol=1e-9)
    xy = np.random.default_rng(5).uniform(0.0, 800.0, (40, 2))
    for i in range(2):
        pa, pb = a.predict(np.full(40, i), xy), b.predict(np.full(40, i), xy)
        np.testing.assert_allclose(pa.mean, pb.mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(pa.total_std, pb.total_std, rtol=0, atol=1e-9)


def test_heavier_rows_pull_the_posterior(monkeypatch):
    """Two groups of rows at the same spots disagree by 12 dB; the group that stands for 100x
    more raw samples pulls the posterior mean towards itself (and harder at gamma 1 than 0.5)."""
    xy, y = _cell(160, 3)
    spot = np.array([[400.0, 400.0]])
    rng = np.random.default_rng(9)
    xs = spot + rng.normal(0.0, 3.0, (16, 2))
    y_heavy = -100.0 + 6.0 + rng.normal(0.0, 0.3, 8)
    y_light = -100.0 - 6.0 + rng.normal(0.0, 0.3, 8)
    xy_all = np.vstack([xy, xs])
    y_all = np.concatenate([y, y_heavy, y_light])
    w = np.concatenate([np.full(len(y), 10.0), np.full(8, 1000.0), np.full(8, 10.0)])
    preds = {}
    for power in (0.0, 0.5, 1.0):
        monkeypatch.setattr(rm, "ROW_WEIGHT_POWER", power)
        f = fit_cells([CellData("c", xy_all, y_all, origin_xy_m=SITE, row_weight=w)], target="rsrp",
                      settings=FitSettings(calibrate=False), seed=0)
        preds[power] = float(f.predict(np.zeros(1, dtype=int), spot).mean[0])
    mid = -100.0
    # gamma 0: the two groups count alike, the mean sits between them
    assert abs(preds[0.0] - mid) < 3.0
    assert preds[0.5] > preds[0.0] + 1.0
    assert preds[1.0] > preds[0.5]
    assert preds[1.0] > mid + 3.0


def test_weighted_calibration_error_equals_repeated_rows():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(300) * 1.3
    w = rng.integers(1, 6, 300)
    rep = np.repeat(z, w)
    assert cal.calibration_error_z(z, weight=w.astype(float)) == pytest.approx(cal.calibration_error_z(rep), abs=1e-12)
    assert cal.interval_error_z(z, weight=w.astype(float)) == pytest.approx(cal.interval_error_z(rep), abs=1e-12)
    # weight None and equal weights: the same objective
    assert cal.interval_error_z(z, weight=np.ones(300)) == pytest.approx(cal.interval_error_z(z), abs=1e-12)


def test_weighted_knn_means():
    rng = np.random.default_rng(1)
    dist = torch.as_tensor(rng.uniform(0, 100, (2, 7, 12)))
    dist[1, :, 8:] = float("inf")  # only 8 usable rows in the second cell
    r = torch.as_tensor(rng.normal(size=(2, 12)))
    plain = stk.knn_means(dist, r, 10)[0]
    ones = stk.knn_means(dist, r, 10, torch.ones(2, 12, dtype=torch.float64))[0]
    np.testing.assert_allclose(ones.numpy(), plain.numpy(), rtol=0, atol=1e-12)
    w = torch.as_tensor(rng.uniform(0.1, 5.0, (2, 12)))
    got = stk.knn_means(dist, r, 10, w)[0]
    d, idx = torch.topk(dist[0, 3], 3, largest=False)
    want = float((r[0, idx] * w[0, idx]).sum() / w[0, idx].sum())
    assert float(got[0, 3, 2]) == pytest.approx(want, abs=1e-12)
    # beyond the usable rows: the weighted mean of all of them
    idx8 = torch.topk(dist[1, 0], 8, largest=False)[1]
    assert float(got[1, 0, 9]) == pytest.approx(float((r[1, idx8] * w[1, idx8]).sum() / w[1, idx8].sum()), abs=1e-12)


def test_weighted_objectives_of_k_and_the_stacking_weight():
    e_gp = np.array([1.0, 1.0, 1.0, 1.0])
    e_knn = np.array([0.0, 0.0, 3.0, 3.0])
    s = np.ones(4)
    # unweighted the kNN loses (mean |e| 1.5 vs 1); weighting its good rows 10x makes it win
    assert stk.blend_weight([(np.tile(e_gp, 20), np.tile(e_knn, 20), np.tile(s, 20))]) == 0.0
    assert stk.blend_weight([(np.tile(e_gp, 20), np.tile(e_knn, 20), np.tile(s, 20), np.tile([10.0, 10.0, 1.0, 1.0], 20))]) == 1.0


def test_baselines_with_equal_weights_equal_unweighted():
    xy, y = _cell(90, 4)
    te = np.random.default_rng(2).uniform(100.0, 700.0, (20, 2))
    for name in ("knn", "rf", "gp"):
        a = make_baseline(name).fit(xy, y).predict(te)
        b = make_baseline(name).fit(xy, y, weight=np.full(len(y), 5.0)).predict(te)
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-8)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-8)


def test_gp_baseline_heavier_rows_have_less_noise():
    xy, y = _cell(120, 6)
    w = np.where(np.arange(120) % 2 == 0, 1.0, 400.0)
    gp = make_baseline("gp").fit(xy, y, weight=w)
    assert gp.hetero_
    assert np.all(np.isfinite(gp.predict(xy[:5])[1]))


def test_rf_with_heavy_tailed_weights_keeps_a_sane_std():
    """sklearn reports 0 (not NaN) as the out-of-bag prediction of rows in every bag, which heavy
    weights make common; those rows must not enter the out-of-bag variance (RSRP ~ -90 dBm)."""
    import warnings

    rng = np.random.default_rng(0)
    xy = rng.uniform(0.0, 500.0, (60, 2))
    y = -90.0 + rng.normal(0.0, 4.0, 60)
    w = np.exp(rng.normal(3.0, 1.5, 60))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rf = make_baseline("rf").fit(xy, y, weight=w)
    assert np.sqrt(rf.oob_var_) < 10.0
