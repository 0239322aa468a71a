"""RadioModel / fit_cells on simulated fields with known truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.radio import CellData, FitSettings, RadioModel, fit_cells, ipw_weights
from cellsynth.radio.baselines import knn_fit_predict

SIGMA_DB = 4.0
SITE = np.array([0.0, 0.0])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _truth_rsrp(xy: np.ndarray) -> np.ndarray:
    d_km = np.maximum(np.linalg.norm(xy - SITE, axis=1), 10.0) / 1000.0
    # log-distance path loss plus a smooth 6 dB "building" bump the RBF residual has to learn
    bump = 6.0 * np.exp(-np.sum((xy - np.array([700.0, 300.0])) ** 2, axis=1) / (2 * 250.0**2))
    return -70.0 - 35.0 * np.log10(d_km) - bump


def _cell(n: int, seed: int, centre=(600.0, 0.0), half_m=800.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-half_m, half_m, (n, 2)) + np.asarray(centre)
    return xy, _truth_rsrp(xy) + SIGMA_DB * rng.standard_normal(n)


@pytest.fixture(scope="module")
def fitted_rsrp():
    xy, y = _cell(1200, 0)
    return RadioModel(n_steps=1200, random_state=1).fit(xy, y, site_xy_m=SITE), xy, y


def test_aleatoric_recovers_known_noise(fitted_rsrp):
    model, _, _ = fitted_rsrp
    xy_in, _ = _cell(400, 5, half_m=600.0)
    pred = model.predict(xy_in)
    assert abs(np.mean(pred.aleatoric_std) - SIGMA_DB) / SIGMA_DB < 0.15


def test_epistemic_grows_far_outside_the_data(fitted_rsrp):
    model, _, _ = fitted_rsrp
    xy_in, _ = _cell(400, 6, half_m=600.0)
    # 2 km beyond the edge of the 1.6 km square of training data
    xy_out = np.column_stack([np.full(200, 600.0 + 800.0 + 2000.0), np.linspace(-800, 800, 200)])
    inside = model.predict(xy_in).epistemic_std.mean()
    outside = model.predict(xy_out).epistemic_std.mean()
    assert outside >= 10 * inside
    assert model.predict(xy_out).reliable(3.0).mean() == 0.0


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
    for k, centre in enumerate([(600.0, 0.0), (-500.0, 400.0), (0.0, -900.0)]):
        xy, y = _cell(300 + 150 * k, 10 + k, centre=centre, half_m=500.0)
        cells.append(CellData(f"c{k}", xy, y, origin_xy_m=SITE))
    # the aleatoric recalibration is one factor per shard by design (see the next test); off here,
    # so this compares the batched SVI path itself
    settings = FitSettings(n_centres=16, n_steps=600, calibrate_aleatoric=False)
    batched = fit_cells(cells, target="rsrp", settings=settings, seed=3)
    for k, c in enumerate(cells):
        alone = fit_cells([c], target="rsrp", settings=settings, seed=3)
        xy_k = c.xy_m[:60]  # inside the cell's data, where the posterior is data-determined
        pb = batched.predict(np.full(len(xy_k), k), xy_k, n_samples=256, seed=0)
        pa = alone.predict(np.zeros(len(xy_k), dtype=int), xy_k, n_samples=256, seed=0)
        # SVI noise differs between the runs (different random streams); no systematic gap
        diff = np.abs(pb.mean - pa.mean)
        assert diff.mean() < 0.3 and diff.max() < 1.0
        assert abs(pb.aleatoric_std.mean() - pa.aleatoric_std.mean()) < 0.25
        assert batched.n_train[k] == len(c.y)


def test_aleatoric_recalibration_factor_from_the_error_distribution():
    """Gaussian noise: the model is already calibrated, the factor stays near 1. Laplace noise of
    the same std: a Gaussian of std 4 puts too much mass in the shoulders and too little in the
    tails; the CE-optimal Gaussian width for unit-variance Laplace errors is 0.77 (brute force
    over the width, independent of the model, in `_laplace_ce_width`); the factor must move
    below 1 towards it."""
    rng = np.random.default_rng(30)
    xy = rng.uniform(-500, 500, (1500, 2)) + np.array([600.0, 0.0])
    truth = _truth_rsrp(xy)
    settings = FitSettings(n_centres=16, n_steps=800, cv_block_m=None)
    gauss = fit_cells([CellData("g", xy, truth + SIGMA_DB * rng.standard_normal(len(xy)), origin_xy_m=SITE)],
                      target="rsrp", settings=settings, seed=1)
    laplace_noise = rng.laplace(0.0, SIGMA_DB / np.sqrt(2.0), len(xy))
    lap = fit_cells([CellData("l", xy, truth + laplace_noise, origin_xy_m=SITE)], target="rsrp", settings=settings, seed=1)
    assert abs(gauss.geometry.aleatoric_scale[0] - 1.0) < 0.1
    target = _laplace_ce_width()
    assert lap.geometry.aleatoric_scale[0] < 0.95
    assert abs(lap.geometry.aleatoric_scale[0] - target) < 0.1


def _laplace_ce_width() -> float:
    """Width w minimising GUMBLE eq. 26 for unit-variance Laplace errors scored by N(0, w^2)."""
    from scipy.stats import laplace, norm

    levels = np.linspace(0.05, 0.95, 19)
    best = (np.inf, 1.0)
    for w in np.linspace(0.5, 1.5, 201):
        observed = laplace.cdf(norm.ppf(levels) * w, scale=1 / np.sqrt(2.0))
        ce = np.sum(observed / observed.sum() * np.abs(observed - levels))
        best = min(best, (ce, w))
    return best[1]


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
    xy, rho, y = _rsrq_cell(2000, 20)
    xy_te, rho_te, y_te = _rsrq_cell(6000, 21)
    lo, hi = np.quantile(rho, [0.1, 0.9])
    ext = {"low": rho_te <= lo, "high": rho_te >= hi}
    errs = {}
    for ipw in (True, False):
        m = RadioModel(target="rsrq", ipw=ipw, n_centres=8, n_steps=1000, random_state=2).fit(xy, y, load_rho=rho, site_xy_m=SITE)
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
    assert abs(draws.mean() - pred.mean[0]) < 0.5
    assert abs(draws.std() - pred.total_std[0]) / pred.total_std[0] < 0.1


def test_save_load_round_trip(fitted_rsrp, tmp_path):
    model, xy, _ = fitted_rsrp
    model.save(tmp_path)
    again = RadioModel.load(tmp_path)
    a, b = model.predict(xy[:20], rng=5), again.predict(xy[:20], rng=5)
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.epistemic_std, b.epistemic_std, rtol=0, atol=1e-4)


def test_errors():
    with pytest.raises(NotFittedError, match="RadioModel is not fitted"):
        RadioModel().predict(np.zeros((1, 2)))
    with pytest.raises(ConfigError, match=r"n_steps"):
        RadioModel(n_steps=0).fit(np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(SchemaError, match=r"xy_m: expected shape \(n, 2\)"):
        RadioModel().fit(np.zeros((5, 3)), np.zeros(5))
    with pytest.raises(SchemaError, match=r"load_rho"):
        RadioModel(target="rsrq").fit(np.zeros((5, 2)), np.zeros(5))


def test_fused_loss_is_pyros_trace_elbo_on_the_same_draw():
    """fused_neg_elbo must be Trace_ELBO's single-particle loss, masks and IPW weights included."""
    import pyro
    from pyro import poutine
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_feasible

    import cellsynth.radio._batched as B
    from cellsynth.radio.model import _pad

    rng = np.random.default_rng(3)
    cells = []
    for k, n in enumerate((150, 90)):  # unequal rows: the second cell's tail is padding, masked
        xy, y = _cell(n, 30 + k, half_m=500.0)
        rho = rng.uniform(0.1, 0.9, n)
        cells.append(CellData(f"c{k}", xy, y, rho, ipw_weights(rho, n_bins=5), SITE))
    geo = B.CellGeometry.concat([B.cell_geometry(c.xy_m, c.y, n_centres=8, origin_xy_m=SITE, rng=rng) for c in cells])
    f, y, mask, w = _pad(cells, geo, True, "cpu")
    consts = B.constants(geo, floor_db=0.5, sigma_out_db_per_km=10.0, device="cpu")
    pyro.settings.set(module_local_params=True)
    model = B.FieldModel(8, consts)
    guide = AutoNormal(model, init_loc_fn=init_to_feasible, init_scale=0.05)
    guide(f, y, mask, w)
    torch.manual_seed(0)
    with torch.no_grad():  # move the guide off its initial point so every term matters
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = poutine.trace(guide).get_trace(f, y, mask, w)
    m = poutine.trace(poutine.replay(model, trace=g)).get_trace(f, y, mask, w)
    pyro_loss = -(m.log_prob_sum() - g.log_prob_sum())
    z = {n: g.nodes[n]["value"] for n in B.LATENTS}
    loc = {n: getattr(guide.locs, n) for n in B.LATENTS}
    scale = {n: getattr(guide.scales, n) for n in B.LATENTS}
    fused = B.fused_neg_elbo(z, loc, scale, f, y, mask, w, consts)
    assert fused.item() == pytest.approx(pyro_loss.item(), rel=1e-5)
    # and so is its gradient with respect to the guide parameters (z carries the draw's graph)
    params = list(guide.parameters())
    grads_fused = torch.autograd.grad(fused, params, retain_graph=True)
    grads_pyro = torch.autograd.grad(pyro_loss, params)
    for a, b in zip(grads_fused, grads_pyro):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_fused_and_pyro_loss_fit_the_same_field():
    cells = [CellData(f"c{k}", *_cell(400, 40 + k, centre=c, half_m=500.0), origin_xy_m=SITE)
             for k, c in enumerate([(600.0, 0.0), (-500.0, 400.0)])]
    xy_te, y_te = _cell(400, 50, centre=(600.0, 0.0), half_m=500.0)
    maes, scales = {}, {}
    for loss in ("fused", "pyro"):
        fitted = fit_cells(cells, target="rsrp", settings=FitSettings(n_centres=16, n_steps=600, svi_loss=loss), seed=0)
        pred = fitted.predict(np.zeros(len(xy_te), dtype=int), xy_te, n_samples=32, seed=0)
        maes[loss] = float(np.mean(np.abs(pred.mean - y_te)))
        scales[loss] = float(fitted.posterior.scale["b"].mean())
    assert abs(maes["fused"] - maes["pyro"]) < 0.05
    assert scales["fused"] == pytest.approx(scales["pyro"], rel=0.25)
    with pytest.raises(ValueError, match="loss must be"):
        fit_cells(cells, target="rsrp", settings=FitSettings(n_centres=16, n_steps=2, svi_loss="nope"), seed=0)
