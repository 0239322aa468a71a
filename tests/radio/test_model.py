"""RadioModel / fit_cells on simulated fields with known truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.radio import CellData, FitSettings, RadioModel, fit_cells, ipw_weights
from cellsynth.radio import calibration as cal
from cellsynth.radio import gp
from cellsynth.radio.baselines import knn_fit_predict

SIGMA_DB = 4.0
SITE = np.array([0.0, 0.0])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _truth_rsrp(xy: np.ndarray) -> np.ndarray:
    d_km = np.maximum(np.linalg.norm(xy - SITE, axis=1), 10.0) / 1000.0
    # log-distance path loss plus a smooth 6 dB "building" bump the GP residual has to learn
    bump = 6.0 * np.exp(-np.sum((xy - np.array([700.0, 300.0])) ** 2, axis=1) / (2 * 250.0**2))
    return -70.0 - 35.0 * np.log10(d_km) - bump


def _cell(n: int, seed: int, centre=(600.0, 0.0), half_m=800.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-half_m, half_m, (n, 2)) + np.asarray(centre)
    return xy, _truth_rsrp(xy) + SIGMA_DB * rng.standard_normal(n)


@pytest.fixture(scope="module")
def fitted_rsrp():
    xy, y = _cell(800, 0)
    return RadioModel(random_state=1).fit(xy, y, site_xy_m=SITE), xy, y


def test_aleatoric_recovers_known_noise(fitted_rsrp):
    model, _, _ = fitted_rsrp
    xy_in, _ = _cell(400, 5, half_m=600.0)
    pred = model.predict(xy_in)
    assert np.mean(pred.aleatoric_std) == pytest.approx(SIGMA_DB, rel=0.15)


def test_epistemic_grows_far_outside_the_data_and_stays_bounded(fitted_rsrp):
    model, xy, _ = fitted_rsrp
    # 3 km beyond the edge of the 1.6 km square of training data, and 50 km out
    xy_out = np.column_stack([np.full(200, 600.0 + 800.0 + 3000.0), np.linspace(-800, 800, 200)])
    at_train = model.predict(xy).epistemic_std.mean()
    outside = model.predict(xy_out)
    far = model.predict(xy_out + np.array([50_000.0, 0.0])).epistemic_std
    # the field here has no structure below the 57 m report spacing, yet the fitted GP keeps a
    # small short-range share (~1.3 dB) it cannot resolve: ~1.2 dB at training positions
    assert outside.epistemic_std.mean() >= 4 * at_train
    # returns to the prior spread (at least the long-range term's), times the calibrated factor
    f_ep = model.fitted_.calibration()["epistemic_factor"][0]
    assert outside.epistemic_std.mean() >= f_ep * gp.LONG_RANGE_STD_DB
    assert outside.reliable(3.0).mean() == 0.0
    assert far.max() < 25.0  # bounded by the prior spread, not growing with distance
    assert far.max() == pytest.approx(outside.epistemic_std.mean(), rel=0.5)


def test_held_out_mae_beats_knn(fitted_rsrp):
    model, xy, y = fitted_rsrp
    xy_te, y_te = _cell(600, 7)
    ours = np.mean(np.abs(model.predict(xy_te).mean - y_te))
    knn = np.mean(np.abs(knn_fit_predict(xy, y, xy_te)[0] - y_te))
    assert ours < knn
    # and close to the irreducible error: E|N(0, 4)| = 4 * sqrt(2/pi) = 3.19 dB
    assert ours < 3.19 * 1.1


def test_batched_equals_cells_trained_alone():
    cells = []
    for i in range(3):
        xy, y = _cell(150 + 60 * i, 10 + i, centre=(300.0 * i, 0.0))
        cells.append(CellData(f"c{i}", xy, y, origin_xy_m=SITE))
    settings = FitSettings(calibrate=False)  # the std factor is pooled over a shard by design
    together = fit_cells(cells, target="rsrp", settings=settings, seed=3)
    for i, c in enumerate(cells):
        alone = fit_cells([c], target="rsrp", settings=settings, seed=3)
        a = together.predict(np.full(50, i), c.xy_m[:50])
        b = alone.predict(np.zeros(50, dtype=int), c.xy_m[:50])
        np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.epistemic_std, b.epistemic_std, rtol=0, atol=1e-6)
        assert together.elbo[i] == pytest.approx(alone.elbo[0], rel=1e-9)


def _small_batch(n: int = 60, seed: int = 0) -> gp.Batch:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 500, (1, n, 2))
    h = np.concatenate([np.ones((1, n, 1)), rng.normal(size=(1, n, 1)), np.zeros((1, n, 3))], axis=-1)
    r = rng.normal(0, 4, (1, n))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return gp.Batch(t(xy), t(r), t(h), t(rng.uniform(0.5, 2.0, (1, n))), torch.ones((1, n), dtype=torch.bool))


def test_held_out_errors_equal_refits_without_the_group():
    b = _small_batch()
    theta = torch.tensor([[np.log(60.0), np.log(5.0), np.log(2.0)]], dtype=torch.float64)
    chol, alpha = gp.solve(b, theta, nu=1.5, floor_db=0.5)
    groups = torch.as_tensor(np.arange(60) % 3)[None]
    err, var = gp.held_out(torch.cholesky_inverse(chol), alpha, groups, b.mask)
    z = (err / var.sqrt())[0].numpy()
    err, var = gp.loo(torch.cholesky_inverse(chol), alpha)
    z_loo = (err / var.sqrt())[0].numpy()
    k = gp.covariance(b, theta, nu=1.5, floor_db=0.5)[0].numpy()
    r = b.r[0].numpy()
    for g in range(3):
        out, keep = np.arange(60) % 3 == g, np.arange(60) % 3 != g
        mean = k[np.ix_(out, keep)] @ np.linalg.solve(k[np.ix_(keep, keep)], r[keep])
        cov = k[np.ix_(out, out)] - k[np.ix_(out, keep)] @ np.linalg.solve(k[np.ix_(keep, keep)], k[np.ix_(keep, out)])
        np.testing.assert_allclose(z[out], (r[out] - mean) / np.sqrt(np.diag(cov)), rtol=1e-6)
    # in a batch with a shorter (padded) cell, every cell's held-out errors stay its own
    pad = gp.Batch(*(torch.cat([t, t]) for t in (b.xy, b.r, b.h, b.w)), torch.stack([b.mask[0], torch.arange(60) < 35]))
    pad.r[1, 35:] = 0.0
    chol2, alpha2 = gp.solve(pad, theta.repeat(2, 1), nu=1.5, floor_db=0.5)
    err2, var2 = gp.held_out(torch.cholesky_inverse(chol2), alpha2, torch.cat([groups, torch.where(torch.arange(60) < 35, groups[0], -1)[None]]), pad.mask)
    np.testing.assert_allclose((err2 / var2.sqrt())[0].numpy(), z, rtol=1e-6)
    short = gp.Batch(b.xy[:, :35], b.r[:, :35], b.h[:, :35], b.w[:, :35], b.mask[:, :35])
    chol3, alpha3 = gp.solve(short, theta, nu=1.5, floor_db=0.5)
    err3, var3 = gp.held_out(torch.cholesky_inverse(chol3), alpha3, groups[:, :35], short.mask)
    np.testing.assert_allclose(err2[1, :35].numpy(), err3[0].numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(var2[1, :35].numpy(), var3[0].numpy(), rtol=1e-6)
    i = 7
    keep = np.arange(60) != i
    mean = k[i, keep] @ np.linalg.solve(k[np.ix_(keep, keep)], r[keep])
    var = k[i, i] - k[i, keep] @ np.linalg.solve(k[np.ix_(keep, keep)], k[keep, i])
    assert z_loo[i] == pytest.approx((r[i] - mean) / np.sqrt(var), rel=1e-6)


def test_fused_objective_is_pyros_trace_elbo():
    from cellsynth.radio.pyro_gp import GPResidualModel, guide_for, pyro_loss

    b = _small_batch(40, 1)
    theta = torch.tensor([[np.log(90.0), np.log(4.0), np.log(1.5)]], dtype=torch.float64)
    model = GPResidualModel(nu=1.5, floor_db=0.5)
    ours = (gp.neg_log_marginal(b, theta, nu=1.5, floor_db=0.5) + gp.neg_log_prior(theta)).sum()
    assert float(pyro_loss(model, guide_for(model, b, theta), b).detach()) == pytest.approx(float(ours), rel=1e-10)


def test_grid_fit_reaches_the_pyro_map():
    """The fast grid path and the Pyro reference (AutoDelta, Adam) optimise the same objective:
    the grid's optimum is within half a nat of the reference's and its hyperparameters close."""
    from cellsynth.radio.pyro_gp import fit_theta_pyro

    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 800, (1, 120, 2))
    field = 5.0 * np.sin(xy[..., 0] / 120.0) * np.cos(xy[..., 1] / 150.0)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    b = gp.Batch(t(xy), t(field + rng.normal(0, 2.0, (1, 120))), t(np.zeros((1, 120, 5))), t(np.ones((1, 120))),
                 torch.ones((1, 120), dtype=torch.bool))
    objective = lambda th: float(gp.neg_log_marginal(b, th, nu=1.5, floor_db=0.5) + gp.neg_log_prior(th))  # noqa: E731
    grid, _ = gp.fit_theta_grid(b, nu=1.5, floor_db=0.5)
    ref, _ = fit_theta_pyro(b, nu=1.5, floor_db=0.5, n_steps=300, learning_rate=0.05)
    assert objective(grid) <= objective(ref) + 0.5
    np.testing.assert_allclose(grid.numpy(), ref.numpy(), atol=0.25)  # log units: within ~25%


def test_calibration_error_and_block_folds():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 1.4, 4000)
    assert cal.calibration_error_z(z, 1.4) < 0.01
    folds = cal.block_groups(np.random.default_rng(1).uniform(0, 1000, (500, 2)), block_m=200.0, n_folds=3,
                             rng=np.random.default_rng(2))
    assert set(np.unique(folds)) == {0, 1, 2}


def _rsrq_cell(n: int, seed: int):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-500, 500, (n, 2)) + np.array([600.0, 0.0])
    rho = rng.beta(4.0, 4.0, n)  # mid loads common, low and high loads rare
    # RSRQ falls with load and saturates at both ends: the model's quadratic load term cannot
    # follow a tanh, so where it spends its fit (middle vs rare extremes) is what IPW changes
    y = -10.0 - 0.004 * np.linalg.norm(xy, axis=1) ** 0.5 - 4.0 * np.tanh(8 * (rho - 0.5)) + 0.5 * rng.standard_normal(n)
    return xy, rho, y


@pytest.mark.slow
def test_ipw_lowers_rsrq_error_in_extreme_load_deciles():
    xy, rho, y = _rsrq_cell(1500, 20)
    xy_te, rho_te, y_te = _rsrq_cell(6000, 21)
    lo, hi = np.quantile(rho, [0.1, 0.9])
    ext = {"low": rho_te <= lo, "high": rho_te >= hi}
    errs = {}
    for ipw in (True, False):
        m = RadioModel(target="rsrq", ipw=ipw, random_state=2).fit(xy, y, load_rho=rho, site_xy_m=SITE)
        pred = m.predict(xy_te, load_rho=rho_te).mean
        errs[ipw] = {k: np.mean(np.abs(pred[v] - y_te[v])) for k, v in ext.items()}
    assert errs[True]["low"] < errs[False]["low"]
    assert errs[True]["high"] < errs[False]["high"]


def test_ipw_weights_hand_computed():
    rho = np.array([0.0, 0.0, 0.0, 1.0])  # 2 bins: 3 rows in bin 0, 1 in bin 1 -> 1/(3/4), 1/(1/4)
    w = ipw_weights(rho, n_bins=2)
    raw = np.array([4 / 3, 4 / 3, 4 / 3, 4.0])
    np.testing.assert_allclose(w, raw / raw.mean())
    np.testing.assert_allclose(ipw_weights(np.full(5, 0.3), n_bins=4), np.ones(5))


def test_sample_spread_matches_prediction(fitted_rsrp):
    model, _, _ = fitted_rsrp
    xy = np.tile([[600.0, 100.0]], (4000, 1))
    draws = model.sample(xy, rng=np.random.default_rng(0))
    pred = model.predict(xy[:1])
    assert draws.mean() == pytest.approx(pred.mean[0], abs=0.5)
    assert draws.std() == pytest.approx(pred.total_std[0], rel=0.1)
    # 50 km out the mean (~-130 dBm) sits near the range's floor with a wide spread: every draw
    # stays in the ingest range and the clipped ones are flagged
    far = np.tile([[50_000.0, 0.0]], (4000, 1))
    values, clipped = model.sample(far, rng=np.random.default_rng(1), return_clipped=True)
    assert values.min() >= -140.0 and values.max() <= -44.0
    assert 0.01 < clipped.mean() < 0.5
    assert np.all(values[clipped] == -140.0)


def test_save_load_round_trip(fitted_rsrp, tmp_path):
    model, xy, _ = fitted_rsrp
    model.save(tmp_path)
    again = RadioModel.load(tmp_path)
    a, b = model.predict(xy[:20]), again.predict(xy[:20])
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.epistemic_std, b.epistemic_std, rtol=0, atol=1e-9)


def test_errors():
    with pytest.raises(NotFittedError, match="RadioModel is not fitted"):
        RadioModel().predict(np.zeros((1, 2)))
    with pytest.raises(ConfigError, match=r"n_steps"):
        RadioModel(n_steps=0).fit(np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(ConfigError, match=r"kernel"):
        RadioModel(kernel="rbf").fit(np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(SchemaError, match=r"xy_m: expected shape \(n, 2\)"):
        RadioModel().fit(np.zeros((5, 3)), np.zeros(5))
    with pytest.raises(SchemaError, match=r"load_rho"):
        RadioModel(target="rsrq").fit(np.zeros((5, 2)), np.zeros(5))
    fitted = RadioModel().fit(np.random.default_rng(0).uniform(0, 100, (20, 2)), np.full(20, -80.0))
    with pytest.raises(SchemaError, match=r"xy_m: 1 rows hold NaN or inf"):
        fitted.predict(np.array([[0.0, 0.0], [np.nan, 1.0]]))
    with pytest.raises(SchemaError, match=r"xy_m: expected shape \(n, 2\), got \(2,\)"):
        fitted.sample(np.zeros(2))
    with pytest.raises(SchemaError, match=r"load_rho: expected 1 finite loads"):
        fitted.predict(np.zeros((1, 2)), load_rho=np.array([np.nan]))
    assert fitted.predict(np.zeros((0, 2))).mean.shape == (0,)
    with pytest.raises(SchemaError, match=r"y: expected at least 2 rows, got 1"):
        RadioModel().fit(np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(SchemaError, match=r"row_weight: expected 5 finite positive values"):
        RadioModel().fit(np.random.default_rng(0).uniform(0, 100, (5, 2)), np.zeros(5), row_weight=[0, 1, 1, 1, 1])


def test_fit_cells_names_the_bad_cell():
    """The batched API checks every cell before any fit: a zero weight would reach the Cholesky of K as an
    infinite noise variance and fail there as 'not positive-definite', naming no cell."""
    rng = np.random.default_rng(0)
    good = CellData("good", rng.uniform(0, 300, (40, 2)), rng.normal(-80, 3, 40))
    cases = [
        (CellData("w0", good.xy_m, good.y, weight=np.r_[0.0, np.ones(39)]), r"cell w0: weight: expected 40 finite positive"),
        (CellData("rw", good.xy_m, good.y, row_weight=np.full(39, 2.0)), r"cell rw: row_weight: expected 40 finite positive"),
        (CellData("nan", good.xy_m, np.r_[np.nan, good.y[1:]]), r"cell nan: xy_m/y: expected finite values"),
        (CellData("none", good.xy_m[:0], good.y[:0]), r"cell none: y: expected at least 1 row, got 0"),
        (CellData("shape", good.xy_m[:, :1], good.y), r"cell shape: xy_m: expected shape \(n, 2\), got \(40, 1\)"),
        (CellData("good", good.xy_m[:20], good.y[:20]), r"cell good: given 2 times; expected one CellData per cell"),
    ]
    for bad, message in cases:
        with pytest.raises(SchemaError, match=message):
            fit_cells([good, bad], target="rsrp", settings=FitSettings())
    # a one-row cell is fitted (the radio stage's pooled fallback can hold a single held-in row)
    one = fit_cells([good, CellData("one", good.xy_m[:1], good.y[:1])], target="rsrp", settings=FitSettings())
    assert np.isfinite(one.predict(np.array([1]), good.xy_m[:1]).mean).all()
    # predict names what is wrong instead of scipy's "'x' must be finite" or an IndexError of an empty slice
    with pytest.raises(SchemaError, match=r"xy_m: expected finite positions of shape \(n, 2\), got shape \(2, 2\) with NaN"):
        one.predict(np.array([0, 1]), np.array([[0.0, 0.0], [np.nan, 1.0]]))
    with pytest.raises(SchemaError, match=r"cell_index: expected 1 indices in \[0, 2\) \(index_of gives -1"):
        one.predict(one.index_of(["nowhere"]), good.xy_m[:1])
    with pytest.raises(SchemaError, match=r"cell_index: expected 1 indices in \[0, 2\)"):
        one.predict(np.array([2]), good.xy_m[:1])
    rho = CellData("rho", good.xy_m, good.y, load_rho=np.r_[np.inf, np.full(39, 0.5)])
    with pytest.raises(SchemaError, match=r"cell rho: load_rho: expected 40 finite loads"):
        fit_cells([rho], target="rsrq", settings=FitSettings(uses_load=True))


@pytest.mark.parametrize("ipw", [False, True])
def test_rsrq_fixed_load_recovers_the_true_load_effect_when_load_follows_position(ipw):
    """Issue 20 item 3: load correlated with position (busy streets in the east of the cell) must
    not leak into the spatial field. The model's fixed-load prediction at rho = 0.8 minus rho = 0.2
    at the same positions recovers the simulator's load effect within 0.5 dB (true effect -4.8 dB,
    spatial field +-3 dB along the same axis), with and without IPW."""
    rng = np.random.default_rng(30)
    n = 700
    xy = rng.uniform(-500.0, 500.0, (n, 2)) + np.array([600.0, 0.0])
    rho = np.clip(0.5 + 0.35 * (xy[:, 0] - 600.0) / 500.0 + 0.12 * rng.standard_normal(n), 0.0, 1.0)
    field = 3.0 * np.sin((xy[:, 0] - 600.0) / 300.0) + 1.5 * np.cos(xy[:, 1] / 200.0)
    c1, c2 = -8.0, -3.0  # dB per unit (rho - 0.5) and per (rho - 0.5)^2

    def truth(r):
        return -11.0 + field + c1 * (r - 0.5) + c2 * (r - 0.5) ** 2

    y = truth(rho) + 0.7 * rng.standard_normal(n)
    model = RadioModel(target="rsrq", ipw=ipw, random_state=0).fit(xy, y, load_rho=rho, site_xy_m=SITE)
    hi = model.predict(xy, load_rho=np.full(n, 0.8)).mean
    lo = model.predict(xy, load_rho=np.full(n, 0.2)).mean
    true_effect = float(np.mean(truth(np.full(n, 0.8)) - truth(np.full(n, 0.2))))
    assert true_effect == pytest.approx(-4.8)
    assert float(np.mean(hi - lo)) == pytest.approx(true_effect, abs=0.5)


def test_a_cell_too_small_for_block_folds_fits_without_numpy_warnings():
    # 10 rows: every refitted block fold is too small, so there are no block-CV rows; the fit
    # records NaN for that MAE instead of numpy's "mean of empty slice" (seen in evaluate's
    # down-sampling refits).
    import warnings

    rng = np.random.default_rng(0)
    xy = rng.uniform(0.0, 300.0, (10, 2))
    y = -90.0 - 10.0 * rng.standard_normal(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = RadioModel(random_state=1).fit(xy, y, site_xy_m=np.array([0.0, 0.0]))
    loo_mae, block_mae = model.fitted_.arrays["cv_mae_db"][0]
    assert np.isfinite(loo_mae) and loo_mae > 0.0
    assert np.isnan(block_mae)
    assert np.all(np.isfinite(model.predict(xy).mean))
