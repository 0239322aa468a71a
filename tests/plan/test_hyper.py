"""Hyperparameter-aware planning: the covariance ensemble over the GP hyperparameters' grid posterior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.plan.hyper import ensemble_cov, hyper_members, with_theta
from cellsynth.plan.transforms import PlanField, VariancePlanner, grid_points, plan_points
from cellsynth.radio import CellData, FitSettings, fit_cells


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(7)
    xy = rng.uniform(-500, 500, (90, 2))
    d_km = np.maximum(np.hypot(*xy.T), 10.0) / 1000
    y = -70.0 - 35.0 * np.log10(d_km) + 4.0 * np.sin(xy[:, 0] / 60.0) + 2.0 * rng.standard_normal(90)
    torch.set_num_threads(1)
    return fit_cells([CellData("c0", xy, y, origin_xy_m=np.zeros(2))], target="rsrp", settings=FitSettings(), seed=0)


def test_members_are_a_normalised_posterior_that_keeps_the_map(fitted):
    members = hyper_members(fitted, 0)
    weights = np.array([w for w, _ in members])
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(weights > 0) and len(members) <= 4
    assert any(np.array_equal(th, fitted.arrays["theta"][0]) for _, th in members)


def test_a_member_at_the_map_is_the_model_itself(fitted):
    xy = np.array([[0.0, 50.0], [200.0, -100.0], [900.0, 900.0]])
    same = with_theta(fitted, 0, fitted.arrays["theta"][0]).epistemic_cov(0, xy)
    np.testing.assert_allclose(same, fitted.epistemic_cov(0, xy), rtol=1e-10, atol=1e-10)
    other = np.array(fitted.arrays["theta"][0], dtype=float)
    other[0] = np.log(8.0)  # an 8 m length: neighbours 50 m apart hardly correlated
    short = with_theta(fitted, 0, other).epistemic_cov(0, np.array([[0.0, 0.0], [50.0, 0.0]]))
    assert abs(short[0, 1]) / np.sqrt(short[0, 0] * short[1, 1]) < 0.5
    for w, cov in ensemble_cov(fitted, 0, xy):
        assert cov.shape == (3, 3) and 0 < w <= 1


def test_an_ensemble_scores_the_weighted_average_of_its_members():
    xy = grid_points((0.0, 0.0, 600.0, 600.0), 100.0)
    n = len(xy)

    def dist(p):
        return np.hypot(p[:, None, 0] - p[None, :, 0], p[:, None, 1] - p[None, :, 1])

    def cov_a(p):
        return 9.0 * np.exp(-dist(p) / 300.0)

    def cov_b(p):
        return 16.0 * np.exp(-dist(p) / 60.0)

    weight = np.linspace(1.0, 2.0, n)
    pf = PlanField(cell_ids=["c0"], target_xy_m=xy, target_weight=weight / weight.sum(),
                   target_cell=np.column_stack([np.zeros(n, int), np.full(n, -1)]),
                   target_var=np.column_stack([np.full(n, 9.0), np.zeros(n)]), cand_xy_m=xy,
                   cand_cell=np.zeros((n, 1), int), cand_var=np.full((n, 1), 9.0), cand_noise_var=np.full((n, 1), 4.0))
    both = VariancePlanner(pf, covariance=lambda c, p: [(0.25, cov_a(p)), (0.75, cov_b(p))], objective="std")
    a = VariancePlanner(pf, covariance=lambda c, p: cov_a(p), objective="std")
    b = VariancePlanner(pf, covariance=lambda c, p: cov_b(p), objective="std")
    assert both.objective() == pytest.approx(0.25 * a.objective() + 0.75 * b.objective(), rel=1e-12)
    np.testing.assert_allclose(both.gains(), 0.25 * a.gains() + 0.75 * b.gains(), rtol=1e-12)
    group = np.arange(n) % 5
    np.testing.assert_allclose(both.group_gains(group, 5), 0.25 * a.group_gains(group, 5) + 0.75 * b.group_gains(group, 5),
                               rtol=1e-10)
    plan = plan_points(both, 2)
    assert plan["cells"].tolist() == [["c0"], ["c0"]]  # a cell once per report, not once per member
    a.measure(int(plan["candidate"][0]))
    b.measure(int(plan["candidate"][0]))
    a.measure(int(plan["candidate"][1]))
    b.measure(int(plan["candidate"][1]))
    assert both.objective() == pytest.approx(0.25 * a.objective() + 0.75 * b.objective(), rel=1e-12)


def test_radio_models_cell_model_and_the_stage_covariance(fitted):
    import pandas as pd

    from cellsynth.plan.hyper import models_ensemble_covariance
    from cellsynth.radio.collection import RadioModels

    rows = pd.DataFrame({"target": ["rsrp", "rsrp"], "cell_id": ["c0", "pooled"], "path": ["f", "f"], "pooled": [False, True]})
    radio = RadioModels(rows, {"f": fitted}, {"c1": (400.0, -300.0)}, 3.0, 64)
    model, i, offset = radio.cell_model("rsrp", "c0")
    assert model is fitted and i == 0 and np.array_equal(offset, [0.0, 0.0])
    model, i, offset = radio.cell_model("rsrp", "c1")  # no model of its own: the pooled one, at its site
    assert i == 0 and np.array_equal(offset, [400.0, -300.0])
    assert radio.cell_model("rsrp", "unknown") is None
    xy = np.array([[400.0, -250.0], [500.0, -300.0]])
    members = models_ensemble_covariance(radio)("c1", xy)
    expected = ensemble_cov(fitted, 0, xy - [400.0, -300.0])
    assert [w for w, _ in members] == pytest.approx([w for w, _ in expected])
    for (_, a), (_, b) in zip(members, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    assert models_ensemble_covariance(radio)("unknown", xy) is None
    np.testing.assert_allclose(radio.epistemic_cov("rsrp", "c1", xy), fitted.epistemic_cov(0, xy - [400.0, -300.0]), rtol=1e-12)
    np.testing.assert_allclose(radio.epistemic_cov("rsrp", "c0", xy), fitted.epistemic_cov(0, xy), rtol=1e-12)
    assert radio.epistemic_cov("rsrp", "unknown", xy) is None
