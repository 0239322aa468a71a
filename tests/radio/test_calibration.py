"""Distance-binned interval calibration and the kNN stacking weights (training-row procedures)."""

import numpy as np
import pytest
import torch

from cellsynth.radio import calibration as cal
from cellsynth.radio import stacking as stk

EDGES = (0.0, 15.0, 40.0, 100.0, 250.0)  # the model default since session 13 (rule H), written out


def test_isotonic_pools_adjacent_violators():
    np.testing.assert_allclose(cal._isotonic(np.array([1.0, 3.0, 2.0, 4.0]), np.ones(4)), [1.0, 2.5, 2.5, 4.0])
    # weights: the heavier bin pulls the pooled value
    np.testing.assert_allclose(cal._isotonic(np.array([2.0, 1.0]), np.array([3.0, 1.0])), [1.75, 1.75])


def test_distance_bins():
    np.testing.assert_array_equal(cal.distance_bin([0.0, 14.9, 15.0, 99.0, 100.0, 3000.0], EDGES), [0, 0, 1, 2, 3, 4])


def test_epistemic_factor_grows_with_distance_and_noise_factor_is_recovered():
    """Rows near the data: the GP's latent variance is right (factor 1); rows in gaps 100-250 m
    away: stated 2.5x too small; the noise std is stated 1.3x too small everywhere. The bins
    recover 1 near, 2.5 in the gap bin; the thin far bin takes the gap bin's factor."""
    rng = np.random.default_rng(0)
    n = 6000
    near_d, gap_d = rng.uniform(0.0, 14.0, n), rng.uniform(100.0, 240.0, n)
    lv_near, lv_gap, nv = np.full(n, 1.0), np.full(n, 9.0), np.full(n, 4.0)
    e_near = rng.normal(0.0, np.sqrt(1.0 * lv_near + 1.3**2 * nv))
    e_gap = rng.normal(0.0, np.sqrt(2.5**2 * lv_gap + 1.3**2 * nv))
    f_ep, f_al = cal.interval_scales_by_distance([(e_near, lv_near, nv, near_d), (e_gap, lv_gap, nv, gap_d)], edges_m=EDGES)
    assert f_al == pytest.approx(1.3, rel=0.06)
    assert f_ep[0] == pytest.approx(1.0, rel=0.2)
    assert f_ep[3] == pytest.approx(2.5, rel=0.1)
    assert f_ep[4] == f_ep[3]  # no rows beyond 250 m: the bin below
    assert np.all(np.diff(f_ep) >= 0)  # bins 1, 2 are empty: filled from below, still monotone


def test_knn_means_hand_computed():
    # one cell, query rows at 0 and 10 m on a line of training rows at 1, 2, 4, 8 m
    train = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    query = torch.tensor([[0.0, 10.0]], dtype=torch.float64)
    dist = (query[:, :, None] - train[:, None, :]).abs()
    r = torch.tensor([[1.0, 3.0, 5.0, 7.0]], dtype=torch.float64)
    means, count = stk.knn_means(dist, r, 3)
    np.testing.assert_allclose(means[0].numpy(), [[1.0, 2.0, 3.0], [7.0, 6.0, 5.0]])
    # a row that must not be used (inf) is skipped; fewer usable rows than k: the mean of all
    dist[0, 0, 1:] = float("inf")
    means, count = stk.knn_means(dist, r, 3)
    np.testing.assert_allclose(means[0, 0].numpy(), [1.0, 1.0, 1.0])
    assert int(count[0, 0]) == 1


def test_blend_weight_of_two_independent_errors():
    """Independent Gaussian errors of std 2 (GP) and 2 (kNN): the MAE-optimal blend is 0.5; with
    std 1 (GP) and 3 (kNN) it is 1 / (1 + 9) = 0.1. Bins without rows keep 0."""
    rng = np.random.default_rng(1)
    n = 40_000
    d = rng.uniform(0.0, 10.0, n)
    w = stk.blend_weights([(rng.normal(0, 2.0, n), rng.normal(0, 2.0, n), d)], EDGES)
    assert w[0] == pytest.approx(0.5, abs=0.05)
    np.testing.assert_array_equal(w[1:], 0.0)
    w = stk.blend_weights([(rng.normal(0, 1.0, n), rng.normal(0, 3.0, n), d + 50.0)], EDGES)
    assert w[2] == pytest.approx(0.1, abs=0.05)
    assert w[0] == 0.0


def test_fold_errors_equal_a_refit_without_the_fold():
    """foldcv's held-out errors and latent variances are those of the model fitted from scratch on
    the other fold's rows (site estimated, prior mean and hyperparameters refitted)."""
    from cellsynth.radio import foldcv, gp
    from cellsynth.radio.model import CellData, FitSettings, _batch_of, fit_cells

    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    xy = rng.uniform(0.0, 1000.0, (120, 2))
    d = np.maximum(np.linalg.norm(xy - np.array([300.0, 400.0]), axis=1), 10.0)
    y = -60.0 - 30.0 * np.log10(d / 1000.0) + 3.0 * np.sin(xy[:, 0] / 150.0) + rng.normal(0.0, 2.0, 120)
    groups = (xy[:, 0] > 600.0).astype(int)
    out = foldcv.fold_errors([xy], [y], [np.ones(120)], None, [None], [None], [groups], np.array([3]),
                             nu=gp.MATERN_NU["matern32"], floor_db=0.5, rngs=[np.random.default_rng(0)],
                             batch_of=_batch_of, device="cpu")[0]
    assert np.isfinite(out).all()
    for g in (0, 1):
        tr, te = groups != g, groups == g
        f = fit_cells([CellData("c", xy[tr], y[tr])], target="rsrp", settings=FitSettings(calibrate=False), seed=0)
        p = f.predict(np.zeros(te.sum(), dtype=int), xy[te])
        np.testing.assert_allclose(out[0, te], y[te] - p.mean, atol=1e-6)
        np.testing.assert_allclose(out[1, te], p.epistemic_std**2, rtol=1e-6, atol=1e-9)
        near = np.sqrt(((xy[te][:, None] - xy[tr][None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(out[3, te], near, rtol=1e-9)
        # distance to the site the refit estimated from the other fold's rows
        np.testing.assert_allclose(out[6, te], np.hypot(*(xy[te] - f.arrays["origin_xy_m"][0]).T), rtol=1e-9)


def test_support_is_one_minus_the_variance_ratio():
    np.testing.assert_allclose(stk.support([1.0, 4.0, 9.0, 0.0], [4.0, 4.0, 4.0, 4.0]), [0.75, 0.0, 0.0, 1.0])


def test_support_aware_blend_keeps_the_knn_where_it_has_neighbours():
    """Set A (support 1): GP errors +-2, kNN exact; set B (support 0, a gap): GP exact, kNN
    errors +-4. A flat weight w costs (2 (1 - w) + 4 w) / 2 and stays at 0; the support-aware
    weight leaves set B to the GP, so w0 = 1 costs 0."""
    sign = np.tile([1.0, -1.0], 50)
    a = (2.0 * sign, np.zeros(100), np.ones(100))
    b = (np.zeros(100), 4.0 * sign, np.zeros(100))
    assert stk.blend_weight([a, b]) == 1.0
    np.testing.assert_array_equal(stk.blend_weights([(a[0], a[1], np.zeros(100)), (b[0], b[1], np.zeros(100))]), np.zeros(len(cal.DIST_EDGES_M)))  # empty bins: the one below
    assert stk.blend_weight([(a[0][:10], a[1][:10], a[2][:10])]) == 0.0  # too few rows: no kNN


def test_support_aware_interval_factors_recover_a_known_slope():
    """Dense rows (v 0.05-0.3) and gap rows (v 0.5-1), latent variance v x 36 dB^2, noise 4 dB^2:
    the true epistemic factor is 0.8 exp(1.0 v), the noise std stated 1.2x too small."""
    rng = np.random.default_rng(4)
    n = 4000
    sets = []
    for lo, hi in ((0.05, 0.3), (0.5, 1.0)):
        v = rng.uniform(lo, hi, n)
        lat, noise = 36.0 * v, np.full(n, 4.0)
        e = rng.normal(0.0, np.sqrt((0.8 * np.exp(v)) ** 2 * lat + 1.2**2 * noise))
        sets.append((e, lat, noise, v))
    a, b, f_al = cal.interval_scales_support(sets)
    assert f_al == pytest.approx(1.2, rel=0.1)
    assert b == pytest.approx(1.0, abs=0.5)
    assert a * np.exp(b * 0.75) == pytest.approx(0.8 * np.exp(0.75), rel=0.08)  # the gap rows' factor
    # one factor only (slope grid (0,)): b = 0
    assert cal.interval_scales_support(sets, slopes=(0.0,))[1] == 0.0


def test_predict_applies_the_knn_weight_times_support_and_old_weights_stay_flat():
    """mean = gp + w0 (1 - v) (knn - gp), v = posterior / stationary prior variance; weights written
    without `blend_support` / `ep_slope` (older files) predict with the flat weight and one factor."""
    from cellsynth.radio import gp
    from cellsynth.radio.model import CellData, FitSettings, FittedCells, fit_cells

    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    xy = rng.uniform(-400.0, 400.0, (100, 2))
    y = -70.0 - 35.0 * np.log10(np.maximum(np.hypot(*xy.T), 10.0) / 1000.0) + 4.0 * rng.standard_normal(100)
    fc = fit_cells([CellData("c", xy, y, origin_xy_m=np.zeros(2))], target="rsrp", settings=FitSettings(), seed=0)

    def variant(w0, support, slope):
        a = {k: np.array(v) for k, v in fc.arrays.items()}
        a["blend_w"][:] = w0
        a["scale"][:, 0] = 1.0
        a["ep_scale"][:] = 1.0
        for key, val in (("blend_support", support), ("ep_slope", slope)):
            if val is None:
                a.pop(key)
            else:
                a[key][:] = val
        return FittedCells(fc.cell_ids, fc.target, fc.settings, a, fc.elbo, fc.n_train)

    q = np.array([[10.0, 20.0], [300.0, -100.0], [900.0, 0.0], [3000.0, 3000.0]])
    idx = np.zeros(len(q), dtype=int)
    gp_only = variant(0.0, 0.0, 0.0).predict(idx, q)
    flat = variant(1.0, None, None).predict(idx, q)  # an older file: flat weight 1 -> the kNN mean
    aware = variant(1.0, 1.0, 0.0).predict(idx, q)
    prior = float(gp.stationary_prior_var(torch.as_tensor(fc.arrays["theta"]), floor_db=0.5)[0])
    v = np.minimum(gp_only.epistemic_std**2 / prior, 1.0)  # factor 1, slope 0: the raw posterior variance
    assert np.all(v > 0.0) and v[0] < 0.5 and v[-1] == 1.0  # in the data: supported; 3 km out: none
    np.testing.assert_allclose(aware.mean - gp_only.mean, (1.0 - v) * (flat.mean - gp_only.mean), atol=1e-9)
    # the epistemic factor exp(b v): slope 1 multiplies each row's std by exp(v)
    sloped = variant(0.0, 0.0, 1.0).predict(idx, q)
    np.testing.assert_allclose(sloped.epistemic_std, np.minimum(gp_only.epistemic_std * np.exp(v), gp.MAX_EPISTEMIC_DB), rtol=1e-9)
    # the planner's covariance carries the same per-row factor: its diagonal is the predicted variance
    np.testing.assert_allclose(np.diag(variant(0.0, 0.0, 1.0).epistemic_cov(0, q)), sloped.epistemic_std**2, rtol=1e-6)


def test_site_factors_widen_near_the_site_and_keep_far_rows():
    rng = np.random.default_rng(5)
    n = 6000
    site_d = rng.uniform(0.0, 1500.0, n)
    true_std = np.where(site_d < 300.0, 2.0, 1.0)  # near the site the errors are twice what the model states
    sets = [(true_std * rng.standard_normal(n), np.full(n, 0.5), np.full(n, 0.5), np.full(n, 20.0), site_d)]
    f_ep = np.ones(len(cal.DIST_EDGES_M))  # fitted epistemic factors, one per distance-to-row bin
    f = cal.site_factors(sets, f_ep, 1.0, np.inf, edges_m=(0.0, 100.0, 300.0, 1000.0))
    assert f[0] == pytest.approx(2.0, rel=0.1) and f[1] == pytest.approx(2.0, rel=0.1)
    assert f[2] == pytest.approx(1.0, rel=0.1) and f[3] == pytest.approx(1.0, rel=0.1)
    # one bin (the default SITE_EDGES_M): no factor
    np.testing.assert_array_equal(cal.site_factors(sets, f_ep, 1.0, np.inf, edges_m=(0.0,)), [1.0])
    # a bin without rows takes its nearest valid neighbour's factor
    g = cal.site_factors(sets, f_ep, 1.0, np.inf, edges_m=(0.0, 300.0, 5000.0))
    assert g[2] == g[1]


def _three_cells():
    """Three 90-row cells (heavy-tailed noise, a sinusoidal field); the same cells on every call."""
    from cellsynth.radio.model import CellData

    torch.set_num_threads(1)
    rng = np.random.default_rng(8)
    cells = []
    for c in range(3):
        xy = rng.uniform(0.0, 800.0, (90, 2))
        d = np.maximum(np.linalg.norm(xy - np.array([200.0, 300.0]), axis=1), 10.0)
        y = -60.0 - 30.0 * np.log10(d / 1000.0) + 4.0 * np.sin(xy[:, 0] / 60.0 + c) + rng.standard_t(4, 90) * 2.0
        cells.append(CellData(f"c{c}", xy, y))
    return cells


def _fit_three_cells_under(monkeypatch):
    """fit(mode): the arrays of one fit_cells call on three 90-row cells (heavy-tailed noise, a
    sinusoidal field) with calibration.RANDOM_CV set to mode; the same cells for every mode."""
    from cellsynth.radio.model import FitSettings, fit_cells

    cells = _three_cells()

    def fit(mode):
        monkeypatch.setattr(cal, "RANDOM_CV", mode)
        return fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0).arrays

    return fit


def test_random_cv_modes_wire_the_sets(monkeypatch):
    """RANDOM_CV: "kfold" replaces the leave-one-out set by refitted random folds; "kfold_mean"
    takes the kNN weight from the refitted sets (as "kfold" does) and keeps the leave-one-out set
    for the interval factors (its cross-validation MAE is the leave-one-out one)."""
    fit = _fit_three_cells_under(monkeypatch)

    loo, kfold, both = fit("loo"), fit("kfold"), fit("kfold_mean")
    np.testing.assert_array_equal(both["blend_w"], kfold["blend_w"])
    np.testing.assert_array_equal(both["cv_mae_db"], loo["cv_mae_db"])
    assert not np.array_equal(kfold["cv_mae_db"][:, 0], loo["cv_mae_db"][:, 0])


def test_fixed_aleatoric_factor_fits_only_the_epistemic_bins():
    """`interval_scales_by_distance(aleatoric=...)` ("kfold_split"): the given aleatoric factor comes back as
    given and each bin's epistemic factor restores its rows' coverage given it."""
    rng = np.random.default_rng(11)
    n = 8000
    dist = rng.choice([5.0, 60.0, 300.0], n)
    lat, noise = np.full(n, 1.0), np.full(n, 1.0)
    true_ep = np.select([dist < 15.0, dist < 100.0], [1.0, 2.0], 3.0)  # epistemic factor the errors carry per bin
    err = np.sqrt(true_ep**2 * lat + 1.5**2 * noise) * rng.standard_normal(n)  # aleatoric factor 1.5
    f_ep, f_al = cal.interval_scales_by_distance([(err, lat, noise, dist)], aleatoric=1.5, edges_m=(0.0, 15.0, 100.0))
    assert f_al == 1.5
    np.testing.assert_allclose(f_ep, [1.0, 2.0, 3.0], rtol=0.12)
    # a wrong fixed aleatoric factor is not re-fitted: the epistemic factors absorb what they can
    g_ep, g_al = cal.interval_scales_by_distance([(err, lat, noise, dist)], aleatoric=0.5, edges_m=(0.0, 15.0, 100.0))
    assert g_al == 0.5 and np.all(g_ep > f_ep)
    # too few rows: the given factor, epistemic ones
    h_ep, h_al = cal.interval_scales_by_distance([(err[:5], lat[:5], noise[:5], dist[:5])], aleatoric=1.5)
    assert h_al == 1.5 and np.all(h_ep == 1.0)


def test_kfold_split_keeps_the_mean_and_the_noise_factor_of_kfold_mean(monkeypatch):
    """RANDOM_CV "kfold_split" (rule K): the mean (kNN weight, shift), the aleatoric factor and the dof are those of
    "kfold_mean" (fitted on the same sets); only the epistemic distance bins, refitted on the refitted random folds +
    blocks with that aleatoric factor fixed, differ."""
    fit = _fit_three_cells_under(monkeypatch)

    mean, split = fit("kfold_mean"), fit("kfold_split")
    for key in ("blend_w", "blend_support", "cv_mae_db", "dof", "theta", "knn_k"):
        np.testing.assert_array_equal(split[key], mean[key])
    if cal.MEAN_SHIFT:
        np.testing.assert_array_equal(split["mean_shift"], mean["mean_shift"])
    np.testing.assert_array_equal(split["scale"][:, 1], mean["scale"][:, 1])  # the aleatoric factor
    assert not np.array_equal(split["ep_scale"], mean["ep_scale"])
    assert np.all(np.diff(split["ep_scale"], axis=1) >= 0)


def test_near_bins_are_kept_and_far_bins_clipped_at_the_seam():
    """`interval_scales_by_distance(near=...)` ("kfold_split_far", rule L): the near bins come back as given, the far
    bins are fitted on their rows (non-decreasing), and a far bin whose rows want less than the seam bin gets the seam's
    factor (the isotonic fit with the near bins held)."""
    rng = np.random.default_rng(12)
    n = 9000
    dist = rng.choice([5.0, 60.0, 300.0], n)
    lat, noise = np.full(n, 1.0), np.full(n, 1.0)
    true_ep = np.select([dist < 15.0, dist < 100.0], [1.0, 2.0], 3.0)
    err = np.sqrt(true_ep**2 * lat + 1.0**2 * noise) * rng.standard_normal(n)
    edges = (0.0, 15.0, 100.0)
    f_ep, f_al = cal.interval_scales_by_distance([(err, lat, noise, dist)], aleatoric=1.0, edges_m=edges, near=[0.7])
    assert f_al == 1.0 and f_ep[0] == 0.7
    np.testing.assert_allclose(f_ep[1:], [2.0, 3.0], rtol=0.12)
    # near bins wider than what the far rows carry: the far bins are lifted to the seam, never below it
    g_ep, _ = cal.interval_scales_by_distance([(err, lat, noise, dist)], aleatoric=1.0, edges_m=edges, near=[1.0, 2.6])
    np.testing.assert_array_equal(g_ep[:2], [1.0, 2.6])
    assert g_ep[2] == pytest.approx(3.0, rel=0.12) and g_ep[2] >= 2.6
    h_ep, _ = cal.interval_scales_by_distance([(err, lat, noise, dist)], aleatoric=1.0, edges_m=edges, near=[1.0, 4.0])
    np.testing.assert_array_equal(h_ep, [1.0, 4.0, 4.0])
    # far bins without rows take the seam's factor
    near_rows = dist < 100.0
    k_ep, _ = cal.interval_scales_by_distance([tuple(a[near_rows] for a in (err, lat, noise, dist))], aleatoric=1.0,
                                              edges_m=edges, near=[0.9])
    assert k_ep[1] == pytest.approx(2.0, rel=0.12) and k_ep[2] == k_ep[1]
    with pytest.raises(ValueError):
        cal.interval_scales_by_distance([(err, lat, noise, dist)], edges_m=edges, near=[1.0])


def test_kfold_split_far_keeps_the_near_bins_of_kfold_mean(monkeypatch):
    """RANDOM_CV "kfold_split_far" (rule L): mean, aleatoric factor and dof of "kfold_mean"; the epistemic bins up to
    the one holding the median leave-one-out distance are "kfold_mean"'s, the farther ones refitted (non-decreasing)."""
    fit = _fit_three_cells_under(monkeypatch)

    mean, far = fit("kfold_mean"), fit("kfold_split_far")
    for key in ("blend_w", "blend_support", "cv_mae_db", "dof", "theta", "knn_k"):
        np.testing.assert_array_equal(far[key], mean[key])
    np.testing.assert_array_equal(far["scale"], mean["scale"])  # aleatoric factor and the training-position factor
    # 90 rows on 800 m x 800 m: the median leave-one-out nearest-row distance of the shard is 33-41 m per cell, bin 1
    # (15-40 m) of (0, 15, 40, 100, 250): bins 0-1 kept, bins 2-4 refitted (bin 2 lands on the seam, bins 3-4 below
    # "kfold_mean"'s 1.04)
    np.testing.assert_array_equal(far["ep_scale"][:, :2], mean["ep_scale"][:, :2])
    assert np.all(far["ep_scale"][:, 2:] >= far["ep_scale"][:, 1:2])
    assert not np.array_equal(far["ep_scale"][:, 3:], mean["ep_scale"][:, 3:])
    assert np.all(np.diff(far["ep_scale"], axis=1) >= 0)


def test_kfold_split_first_keeps_the_first_bin_of_kfold_mean(monkeypatch):
    """RANDOM_CV "kfold_split_first" (rule R): mean, aleatoric factor and dof of "kfold_mean"; the first distance bin
    (a report at an existing position) is "kfold_mean"'s, the farther ones refitted on the refitted sets, non-decreasing
    and not below bin 0."""
    fit = _fit_three_cells_under(monkeypatch)

    mean, first = fit("kfold_mean"), fit("kfold_split_first")
    for key in ("blend_w", "blend_support", "cv_mae_db", "dof", "theta", "knn_k", "scale"):
        np.testing.assert_array_equal(first[key], mean[key])
    np.testing.assert_array_equal(first["ep_scale"][:, 0], mean["ep_scale"][:, 0])
    assert np.all(first["ep_scale"][:, 1:] >= first["ep_scale"][:, :1])
    assert np.all(np.diff(first["ep_scale"], axis=1) >= 0)
    assert not np.array_equal(first["ep_scale"][:, 1:], mean["ep_scale"][:, 1:])
    if cal.MEAN_SHIFT:
        np.testing.assert_array_equal(first["mean_shift"], mean["mean_shift"])


def test_kfold_split_first_max_is_never_narrower_than_kfold_mean(monkeypatch):
    """RANDOM_CV "kfold_split_first_max" (rule S): "kfold_split_first"'s bins, then per bin the larger of that factor
    and "kfold_mean"'s; bin 0, the aleatoric factor, dof and the mean are "kfold_mean"'s."""
    fit = _fit_three_cells_under(monkeypatch)

    mean, first, both = fit("kfold_mean"), fit("kfold_split_first"), fit("kfold_split_first_max")
    for key in ("blend_w", "blend_support", "cv_mae_db", "dof", "theta", "knn_k", "scale"):
        np.testing.assert_array_equal(both[key], mean[key])
    np.testing.assert_array_equal(both["ep_scale"], np.maximum(first["ep_scale"], mean["ep_scale"]))
    assert np.all(np.diff(both["ep_scale"], axis=1) >= 0)


def test_far_tail_picks_the_far_rows_dof_and_keeps_the_near_bins():
    """`far_tail` (calibration.FAR_DOF, rule M): the far bins' dof follows their rows' tail (Student-t 3 errors: a heavy
    dof; Gaussian ones: a light one), the near bins come back unchanged, and too few far rows change nothing."""
    rng = np.random.default_rng(13)
    n = 12000
    dist = rng.choice([5.0, 300.0], n)
    lat, noise = np.full(n, 1.0), np.full(n, 1.0)
    far = dist > 100.0
    std = np.where(far, np.sqrt(2.0**2 + 1.0), np.sqrt(2.0))
    f_near = np.array([1.0, 1.0, 1.0])
    edges = (0.0, 15.0, 100.0)
    heavy = np.where(far, rng.standard_t(3, n) / np.sqrt(3.0), rng.standard_normal(n)) * std
    g, d = cal.far_tail((heavy, lat, noise, dist), np.array([1.0, 1.0, 1.0]), 1.0, 1, edges_m=edges)
    assert d is not None and d <= 4.0
    np.testing.assert_array_equal(g[:2], f_near[:2])
    light = rng.standard_normal(n) * std
    g2, d2 = cal.far_tail((light, lat, noise, dist), np.array([1.0, 1.0, 1.0]), 1.0, 1, edges_m=edges)
    assert d2 >= 15.0 and g2[2] == pytest.approx(2.0, rel=0.12)
    g3, d3 = cal.far_tail(tuple(a[~far] for a in (light, lat, noise, dist)), np.array([1.0, 1.5, 2.0]), 1.0, 1, edges_m=edges)
    assert d3 is None and np.array_equal(g3, [1.0, 1.5, 2.0])


def test_far_dof_stores_a_dof_per_bin_and_predict_uses_the_rows_bin(monkeypatch):
    """calibration.FAR_DOF on: the fit stores "dof_bins" (the shard's dof up to the seam bin, the far dof beyond), the
    mean, the aleatoric factor and the training-position factor are the default's, and predict gives each row the dof
    of its distance bin; off (the default): no "dof_bins", one dof per cell."""
    from cellsynth.radio.model import FitSettings, fit_cells

    cells = _three_cells()
    base = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    monkeypatch.setattr(cal, "FAR_DOF", True)
    on = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    a, b = on.arrays, base.arrays
    assert "dof_bins" not in b and a["dof_bins"].shape == (3, len(cal.DIST_EDGES_M))
    for key in ("blend_w", "cv_mae_db", "dof", "theta", "scale"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["dof_bins"][:, 0], a["dof"])
    assert np.all(np.diff(a["ep_scale"], axis=1) >= 0)
    # a training row's own position (bin 0) and a point 3 km out (the last bin); on these cells the far dof is 6 too,
    # so the far bins' dof is set by hand to see predict pick it by the row's bin
    a["dof_bins"][:, 2:] = 4.0
    xy = np.vstack([cells[0].xy_m[:1], [[3200.0, 3300.0]]])
    pred = on.predict(np.zeros(2, dtype=np.int64), xy)
    np.testing.assert_array_equal(pred.dof, [a["dof"][0], 4.0])
    np.testing.assert_array_equal(base.predict(np.zeros(2, dtype=np.int64), xy).dof, [b["dof"][0]] * 2)


def test_default_fit_has_distance_bins_and_one_bin_weights_still_predict():
    """Rule H (session 13): the default fit stores one epistemic factor per DIST_EDGES_M bin (non-decreasing
    in distance) with its edges; weights saved with one factor and no edges predict with that factor."""
    from cellsynth.radio.model import CellData, FitSettings, FittedCells, fit_cells

    assert tuple(cal.DIST_EDGES_M) == EDGES
    torch.set_num_threads(1)
    rng = np.random.default_rng(7)
    cells = []
    for c in range(2):
        xy = np.vstack([rng.uniform(-400.0, -100.0, (120, 2)), rng.uniform(100.0, 400.0, (120, 2))])  # a 200 m gap
        y = (-70.0 - 35.0 * np.log10(np.maximum(np.hypot(*xy.T), 10.0) / 1000.0) + 4.0 * np.sin(xy[:, 0] / 60.0 + c)
             + 3.0 * rng.standard_normal(len(xy)))
        cells.append(CellData(f"c{c}", xy, y, origin_xy_m=np.zeros(2)))
    fc = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    np.testing.assert_array_equal(fc.arrays["dist_edges_m"], np.tile(EDGES, (2, 1)))
    f = fc.arrays["ep_scale"]
    assert f.shape == (2, 5) and np.all(np.diff(f, axis=1) >= 0)
    assert fc.calibration()["distance_edges_m"] == list(EDGES)
    q = np.array([[-250.0, -250.0], [0.0, 0.0], [3000.0, 0.0]])  # in the data, in the gap, 3 km out
    idx = np.zeros(len(q), dtype=int)
    p = fc.predict(idx, q)
    # older weights: one factor per cell and no edges -> that factor at every distance
    a = {k: np.array(v) for k, v in fc.arrays.items() if k != "dist_edges_m"}
    a["ep_scale"] = np.ones((2, 1))
    old = FittedCells(fc.cell_ids, fc.target, fc.settings, a, fc.elbo, fc.n_train).predict(idx, q)
    a["ep_scale"] = np.ones((2, 5))
    a["dist_edges_m"] = np.tile(EDGES, (2, 1))
    ones = FittedCells(fc.cell_ids, fc.target, fc.settings, a, fc.elbo, fc.n_train).predict(idx, q)
    np.testing.assert_allclose(old.epistemic_std, ones.epistemic_std, rtol=1e-12)
    np.testing.assert_allclose(old.mean, p.mean, rtol=0, atol=1e-9)  # the mean does not depend on the factors
    # the fitted model: each row's std is the raw one times its bin's factor (capped)
    from cellsynth.radio import gp

    bins = cal.distance_bin(np.min(np.linalg.norm(q[:, None] - cells[0].xy_m[None], axis=2), axis=1), EDGES)
    np.testing.assert_allclose(p.epistemic_std, np.minimum(ones.epistemic_std * f[0, bins], gp.MAX_EPISTEMIC_DB), rtol=1e-9)


def test_empty_near_bins_take_at_most_factor_one(monkeypatch):
    """NEAR_EMPTY (rule N): bins nearer than every bin with held-out rows (gridded data: no row nearer than the grid
    step) take min(1, the first valid bin's factor) under "unit" and that factor under "first"; a thin bin with a
    valid bin below it takes that bin's factor under both."""
    rng = np.random.default_rng(5)
    n = 6000
    dist = rng.choice([60.0, 300.0], n)  # nothing in the 0-15 m bin
    lat, noise = np.full(n, 1.0), np.full(n, 1.0)
    true_ep = np.where(dist < 100.0, 2.0, 3.0)
    err = np.sqrt(true_ep**2 * lat + noise) * rng.standard_normal(n)
    edges = (0.0, 15.0, 100.0)
    monkeypatch.setattr(cal, "NEAR_EMPTY", "first")
    # the aleatoric factor held at the world's 1 (free, it trades with the bins: lat = noise here)
    first, _ = cal.interval_scales_by_distance([(err, lat, noise, dist)], edges_m=edges, aleatoric=1.0)
    monkeypatch.setattr(cal, "NEAR_EMPTY", "unit")
    unit, _ = cal.interval_scales_by_distance([(err, lat, noise, dist)], edges_m=edges, aleatoric=1.0)
    np.testing.assert_allclose(first[1:], [2.0, 3.0], rtol=0.15)
    assert first[0] == first[1]
    assert unit[0] == 1.0
    np.testing.assert_array_equal(unit[1:], first[1:])
    # the first valid bin below 1: both keep it (the isotonic order holds either way)
    small = np.sqrt(0.5**2 * lat + noise) * rng.standard_normal(n)
    s_unit, _ = cal.interval_scales_by_distance([(small, lat, noise, dist)], edges_m=edges, aleatoric=1.0)
    assert s_unit[1] < 1.0 and s_unit[0] == s_unit[1]
    # a thin bin between valid bins takes the bin below, under "unit" too
    dist3 = rng.choice([5.0, 300.0], n)
    err3 = np.sqrt(np.where(dist3 < 15.0, 1.5, 3.0) ** 2 + 1.0) * rng.standard_normal(n)
    mid, _ = cal.interval_scales_by_distance([(err3, lat, noise, dist3)], edges_m=edges, aleatoric=1.0)
    assert mid[1] == mid[0]


def test_empty_far_bins_take_at_least_factor_one(monkeypatch):
    """FAR_EMPTY (rule Q, rejected: no effect on the inner splits): bins farther than every bin with held-out rows take
    max(1, the last valid bin's factor) under "unit" and that factor under "last"; bins below are unchanged."""
    rng = np.random.default_rng(6)
    n = 6000
    dist = rng.choice([5.0, 60.0], n)  # nothing beyond 100 m
    lat, noise = np.full(n, 1.0), np.full(n, 1.0)
    edges = (0.0, 15.0, 100.0)
    for true_ep, above_one in ((0.5, False), (2.0, True)):
        err = np.sqrt(true_ep**2 * lat + noise) * rng.standard_normal(n)
        monkeypatch.setattr(cal, "FAR_EMPTY", "last")
        last, _ = cal.interval_scales_by_distance([(err, lat, noise, dist)], edges_m=edges, aleatoric=1.0)
        monkeypatch.setattr(cal, "FAR_EMPTY", "unit")
        unit, _ = cal.interval_scales_by_distance([(err, lat, noise, dist)], edges_m=edges, aleatoric=1.0)
        np.testing.assert_array_equal(unit[:2], last[:2])
        assert last[2] == last[1]
        assert (last[1] > 1.0) == above_one
        assert unit[2] == (last[1] if above_one else 1.0)


def test_equal_set_weights_balance_the_sets_in_far_bins(monkeypatch):
    """BIN_SET_WEIGHTS "equal_far" (rule U, session 24): in a bin beyond the first, a set with many rows no longer
    outweighs a set with few; bin 0 and a bin that one set alone fills are fitted as under "pooled"."""
    rng = np.random.default_rng(11)
    edges = (0.0, 15.0, 100.0)
    aleatoric = 1.0

    def rows(n, dist, true_ep):
        lat, noise = np.full(n, 1.0), np.full(n, 1.0)
        return (np.sqrt(true_ep**2 * lat + noise) * rng.standard_normal(n), lat, noise, np.full(n, dist))

    # bin 1 (15-100 m): 4,000 rows of a set whose errors say factor 1, 400 of one whose errors say factor 3
    many = rows(4000, 60.0, 1.0)
    few = rows(400, 60.0, 3.0)
    near = rows(1000, 5.0, 1.0)  # bin 0, one set: untouched by the rule
    sets = [tuple(np.concatenate([a, b]) for a, b in zip(near, many)), few]
    monkeypatch.setattr(cal, "BIN_SET_WEIGHTS", "pooled")
    pooled, _ = cal.interval_scales_by_distance(sets, edges_m=edges, aleatoric=aleatoric)
    monkeypatch.setattr(cal, "BIN_SET_WEIGHTS", "equal_far")
    equal, _ = cal.interval_scales_by_distance(sets, edges_m=edges, aleatoric=aleatoric)
    assert equal[0] == pooled[0]
    # pooled: 9 rows in 10 say 1, so the factor sits near 1; equal: halfway in weight, clearly wider
    assert pooled[1] < 1.6 and equal[1] > pooled[1] + 0.4
    # the weights themselves: each set's total in the bin is the mean of the two totals; other rows keep theirs
    bins = [cal.distance_bin(s[3], edges) for s in sets]
    w = cal._equal_set_weights(sets, bins, None)
    w0, w1 = w[: len(sets[0][0])], w[len(sets[0][0]):]
    np.testing.assert_allclose([w0[bins[0] == 1].sum(), w1.sum()], [2200.0, 2200.0])
    np.testing.assert_array_equal(w0[bins[0] == 0], 1.0)
    # one set alone in every bin beyond the first: nothing to balance, "pooled" bit for bit
    assert cal._equal_set_weights([sets[0]], [bins[0]], None) is None


def test_kfold_all_keeps_the_mean_of_kfold_mean(monkeypatch):
    """RANDOM_CV "kfold_all" (rule O, rejected): the mean's stack weights and shift as "kfold_mean"; the interval
    factors fitted on all three held-out sets, so they differ."""
    fit = _fit_three_cells_under(monkeypatch)
    mean, every = fit("kfold_mean"), fit("kfold_all")
    for key in ("blend_w", "blend_support", "cv_mae_db", "theta", "knn_k"):
        np.testing.assert_array_equal(every[key], mean[key])
    if cal.MEAN_SHIFT:
        np.testing.assert_array_equal(every["mean_shift"], mean["mean_shift"])
    assert not np.array_equal(every["scale"], mean["scale"])


def test_position_sigma_finds_a_position_error_and_keeps_zero_without_one():
    """calibration.position_sigma (rule X, off by default): errors whose variance is 1 + sigma^2 g^2 with sigma = 16 m
    (g: the log-distance term's gradient, large near the site) get sigma from the grid near 16; errors of variance 1
    everywhere keep 0 (ties keep the model without the term)."""
    rng = np.random.default_rng(0)
    d = rng.uniform(5.0, 1500.0, 20_000)
    g2 = cal.position_grad2(d, -35.0, 25.0)
    # the gradient of b log10(D / 1 km) at D = sqrt(d^2 + H^2): b d / (D^2 ln 10), by hand at d = 50 m
    assert cal.position_grad2(np.array([50.0]), -35.0, 25.0)[0] == pytest.approx((35.0 * 50.0 / (3125.0 * np.log(10.0))) ** 2)
    ones, zeros = np.ones_like(d), np.zeros_like(d)
    f_ep = np.ones(len(cal.DIST_EDGES_M))
    noisy = rng.standard_normal(len(d)) * np.sqrt(1.0 + 16.0**2 * g2)
    assert cal.position_sigma([(noisy, zeros, ones, d, g2)], f_ep, 1.0, np.inf) in (8.0, 16.0, 32.0)
    plain = rng.standard_normal(len(d))
    assert cal.position_sigma([(plain, zeros, ones, d, g2)], f_ep, 1.0, np.inf) == 0.0


def test_position_noise_adds_to_the_aleatoric_std_near_the_site_only(monkeypatch):
    """POSITION_NOISE on: the fit stores "pos_sigma_m" and predict adds sigma^2 g(x)^2 to the aleatoric variance (mean
    and epistemic std unchanged); off (the default): no such array."""
    from cellsynth.radio.model import FitSettings, fit_cells

    cells = _three_cells()
    base = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    assert "pos_sigma_m" not in base.arrays
    monkeypatch.setattr(cal, "POSITION_NOISE", True)
    on = fit_cells(cells, target="rsrp", settings=FitSettings(), seed=0)
    assert on.arrays["pos_sigma_m"].shape == (3,)
    on.arrays["pos_sigma_m"][:] = 20.0  # by hand, to see predict use it
    origin = on.arrays["origin_xy_m"][0]
    xy = origin + np.array([[30.0, 0.0], [3000.0, 0.0]])
    p, q = on.predict(np.zeros(2, dtype=np.int64), xy), base.predict(np.zeros(2, dtype=np.int64), xy)
    np.testing.assert_allclose(p.mean, q.mean)
    np.testing.assert_allclose(p.epistemic_std, q.epistemic_std)
    h = float(on.arrays["site_h_m"][0])
    g2 = cal.position_grad2(np.array([30.0, 3000.0]), float(on.arrays["beta0"][0][1]), h)
    np.testing.assert_allclose(p.aleatoric_std, np.sqrt(q.aleatoric_std**2 + 400.0 * g2))
    assert p.aleatoric_std[0] > q.aleatoric_std[0] and p.aleatoric_std[1] == pytest.approx(q.aleatoric_std[1], abs=0.01)
