"""The greedy planner against a brute-force Gaussian-process reference and hand-made fields."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from cellsynth.plan.transforms import (
    CoveragePlanner,
    PlanField,
    VariancePlanner,
    best_route,
    build_field,
    clip_segments,
    coverage_routes,
    grid_points,
    matched_draws,
    plan_points,
    plan_route,
    random_route,
    road_graph,
    top2_probability,
)

LENGTH_M = 150.0


def _field(var: np.ndarray, weight: np.ndarray, xy: np.ndarray, noise_var: float = 4.0) -> PlanField:
    """One cell serving every grid point (no neighbour role); candidates = the grid."""
    n = len(xy)
    return PlanField(
        cell_ids=["c0"], target_xy_m=xy, target_weight=weight / weight.sum(),
        target_cell=np.column_stack([np.zeros(n, int), np.full(n, -1)]), target_var=np.column_stack([var, np.zeros(n)]),
        cand_xy_m=xy, cand_cell=np.zeros((n, 1), int), cand_var=var[:, None], cand_noise_var=np.full((n, 1), noise_var),
    )


def _hand_field():
    xy = grid_points((0.0, 0.0, 1000.0, 1000.0), 100.0)  # 10 x 10, centres at 50, 150, ...
    d_hot = np.hypot(xy[:, 0] - 250, xy[:, 1] - 250)
    d_far = np.hypot(xy[:, 0] - 750, xy[:, 1] - 750)
    var = 1.0 + 24.0 * np.exp(-0.5 * (d_hot / 250) ** 2) + 24.0 * np.exp(-0.5 * (d_far / 250) ** 2)
    weight = 0.05 + np.exp(-0.5 * (d_hot / 200) ** 2)  # users near (250, 250); hardly any near (750, 750)
    return xy, var, weight


def _se_prior(xy, var):
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    return np.sqrt(var)[:, None] * np.sqrt(var)[None, :] * np.exp(-0.5 * (d / LENGTH_M) ** 2)


def _brute_force_greedy(xy, var, weight, noise_var, n_picks, prior=None):
    """Greedy on the exact GP posterior, recomputed from scratch by matrix inversion each step."""
    w = weight / weight.sum()
    prior = _se_prior(xy, var) if prior is None else prior
    picks = []

    def objective(sel):
        if not sel:
            return float(w @ np.diag(prior))
        k = prior[:, sel]
        post = prior - k @ np.linalg.solve(prior[np.ix_(sel, sel)] + noise_var * np.eye(len(sel)), k.T)
        return float(w @ np.diag(post))

    for _ in range(n_picks):
        base = objective(picks)
        gains = [base - objective(picks + [c]) for c in range(len(xy))]
        picks.append(int(np.argmax(gains)))
    return picks, objective(picks)


def test_one_report_on_one_target_halves_equal_variance_and_noise():
    xy = np.array([[0.0, 0.0]])
    planner = VariancePlanner(_field(np.array([4.0]), np.array([1.0]), xy, noise_var=4.0), length_m=LENGTH_M, objective="var")
    assert planner.gains()[0] == pytest.approx(2.0)  # w v^2 / (v + n) = 16 / 8
    reduction, cells = planner.measure(0)
    assert reduction == pytest.approx(2.0)
    assert cells == ["c0"]
    assert planner.objective() == pytest.approx(2.0)


def test_std_objective_gain_is_the_drop_of_the_weighted_std():
    # v = 4, noise 4: one report leaves 4 - 16/8 = 2, so the std drops 2 - sqrt(2)
    xy = np.array([[0.0, 0.0]])
    planner = VariancePlanner(_field(np.array([4.0]), np.array([1.0]), xy, noise_var=4.0), length_m=LENGTH_M, objective="std")
    assert planner.objective() == pytest.approx(2.0)
    assert planner.gains()[0] == pytest.approx(2.0 - np.sqrt(2.0))
    reduction, _ = planner.measure(0)
    assert reduction == pytest.approx(2.0 - np.sqrt(2.0))
    assert planner.objective() == pytest.approx(np.sqrt(2.0))
    with pytest.raises(ValueError, match="objective"):
        VariancePlanner(_field(np.array([4.0]), np.array([1.0]), xy), objective="mae")


def test_std_objective_prefers_many_users_over_one_very_uncertain_spot():
    # spot 0: variance 100, 3% of users; spot 1: variance 4, 97% of users; noise 4, far apart.
    # variance gains: 0.03 * 100^2/104 = 2.88 vs 0.97 * 16/8 = 1.94 (the uncertain spot wins);
    # std gains (what the expected absolute error, hence the MAE, follows):
    # 0.03 * (10 - sqrt(100 - 10^4/104)) = 0.241 vs 0.97 * (2 - sqrt(2)) = 0.568 (the users win)
    xy = np.array([[0.0, 0.0], [5000.0, 0.0]])
    var, w = np.array([100.0, 4.0]), np.array([0.03, 0.97])
    by_var = VariancePlanner(_field(var, w, xy), length_m=LENGTH_M, objective="var")
    by_std = VariancePlanner(_field(var, w, xy), length_m=LENGTH_M, objective="std")
    assert by_var.gains() == pytest.approx([0.03 * 1e4 / 104, 0.97 * 2.0])
    assert by_std.gains() == pytest.approx([0.03 * (10 - np.sqrt(100 - 1e4 / 104)), 0.97 * (2 - np.sqrt(2))])
    assert plan_points(by_var, 1)["candidate"].tolist() == [0]
    assert plan_points(by_std, 1)["candidate"].tolist() == [1]


def test_std_greedy_achieves_what_it_expects_on_a_given_covariance():
    xy, _, weight = _hand_field()
    pf = _field(np.full(len(xy), 12.0), weight, xy)
    planner = VariancePlanner(pf, covariance=lambda c, p: _global_cov(p), objective="std")
    before = planner.objective()
    plan = plan_points(planner, 3)
    # brute force: the posterior after the three picks, std weighted by the users
    sel = plan["candidate"].tolist()
    k = _global_cov(xy)
    post = k - k[:, sel] @ np.linalg.solve(k[np.ix_(sel, sel)] + 4.0 * np.eye(3), k[sel, :])
    w = weight / weight.sum()
    assert planner.objective() == pytest.approx(float(w @ np.sqrt(np.diag(post))), rel=1e-9)
    assert plan["expected_reduction"].sum() == pytest.approx(before - planner.objective(), rel=1e-9)


def test_greedy_matches_brute_force_gaussian_process():
    xy, var, weight = _hand_field()
    planner = VariancePlanner(_field(var, weight, xy), length_m=LENGTH_M, objective="var")
    before = planner.objective()
    plan = plan_points(planner, 4)
    picks, after = _brute_force_greedy(xy, var, weight, 4.0, 4)
    assert plan["candidate"].tolist() == picks
    assert planner.objective() == pytest.approx(after, rel=1e-9)
    assert plan["expected_reduction"].sum() == pytest.approx(before - after, rel=1e-9)


def _global_cov(xy):
    """Short-range Matern-like part plus 3 dB^2 shared by every position (like a mean coefficient)."""
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    return 9.0 * np.exp(-d / 100.0) + 3.0


def test_greedy_on_a_given_covariance_matches_brute_force_and_reaches_far_targets():
    xy, _, weight = _hand_field()
    calls = []

    def covariance(cell, pts):
        calls.append((cell, len(pts)))
        return _global_cov(pts)

    pf = _field(np.full(len(xy), 12.0), weight, xy)
    planner = VariancePlanner(pf, covariance=covariance, length_m=LENGTH_M, objective="var")
    assert calls == [("c0", 2 * len(xy))]  # targets then candidates, one call per cell
    assert planner.objective() == pytest.approx(12.0)
    plan = plan_points(planner, 3)
    picks, after = _brute_force_greedy(xy, np.full(len(xy), 12.0), weight, 4.0, 3, prior=_global_cov(xy))
    assert plan["candidate"].tolist() == picks
    assert planner.objective() == pytest.approx(after, rel=1e-9)
    # the shared term: a report far from the users still lowers their variance (an a-priori
    # squared-exponential correlation of 150 m would give nothing 700 m away)
    fresh = VariancePlanner(_field(np.full(len(xy), 12.0), weight, xy), covariance=lambda c, p: _global_cov(p), objective="var")
    far = int(np.argmin(np.hypot(xy[:, 0] - 950, xy[:, 1] - 950)))
    w = weight / weight.sum()
    k = _global_cov(xy)
    expected = float(w @ (k[:, far] ** 2)) / (k[far, far] + 4.0)
    assert fresh.gains()[far] == pytest.approx(expected, rel=1e-12)
    assert expected > 3.0**2 / (12.0 + 4.0)  # at least the shared 3 dB^2 part's w 3^2 / (12 + 4)


def test_a_cell_without_covariance_uses_the_a_priori_correlation():
    xy, var, weight = _hand_field()
    by_cov = VariancePlanner(_field(var, weight, xy), covariance=lambda c, p: None, length_m=LENGTH_M, objective="var")
    by_len = VariancePlanner(_field(var, weight, xy), length_m=LENGTH_M, objective="var")
    np.testing.assert_allclose(by_cov.gains(), by_len.gains(), rtol=1e-12)
    fixed = VariancePlanner(_field(var, weight, xy), covariance=lambda c, p: None, objective="var")  # neither: nothing to gain
    assert fixed.gains() == pytest.approx(np.zeros(len(xy)))
    assert fixed.objective() == pytest.approx(float(weight @ var / weight.sum()))


def test_first_pick_is_high_variance_where_users_are_and_the_second_is_not_adjacent():
    xy, var, weight = _hand_field()
    plan = plan_points(VariancePlanner(_field(var, weight, xy), length_m=LENGTH_M, objective="var"), 2)
    first, second = xy[plan["candidate"].to_numpy()]
    # the high-variance spot with users (250, 250), not the equally uncertain empty one (750, 750)
    assert np.hypot(*(first - [250.0, 250.0])) <= 75.0
    # one measurement also lowers the variance around it: the second pick moves away
    assert np.hypot(*(second - first)) >= 2 * 100.0
    assert plan["expected_reduction"].iloc[1] < plan["expected_reduction"].iloc[0]


def test_distinct_points_never_repeat_a_candidate():
    xy = np.array([[0.0, 0.0], [5000.0, 0.0]])
    # one very uncertain, heavily used spot and a quiet one: without `distinct` the greedy
    # measures the first spot twice (it is still worth more than the second)
    pf = _field(np.array([100.0, 1.0]), np.array([0.9, 0.1]), xy)
    again = plan_points(VariancePlanner(pf, length_m=LENGTH_M, objective="var"), 2)
    assert again["candidate"].tolist() == [0, 0]
    pf_once = _field(np.array([100.0, 1.0]), np.array([0.9, 0.1]), xy)
    once = plan_points(VariancePlanner(pf_once, length_m=LENGTH_M, objective="var"), 3,
                       distinct=True)
    assert once["candidate"].tolist() == [0, 1]  # both, each once, and no third
    assert once["expected_reduction"].iloc[1] == pytest.approx(0.1 * 1.0 / (1.0 + 4.0))


def test_coverage_planner_counts_each_target_once():
    xy = np.array([[0.0, 0.0], [50.0, 0.0], [1000.0, 0.0]])
    cov = CoveragePlanner(xy, np.array([1.0, 2.0, 4.0]), xy, radius_m=100.0)
    assert cov.gains() == pytest.approx([3.0, 3.0, 4.0])
    assert cov.measure(2)[0] == pytest.approx(4.0)
    assert cov.measure(0)[0] == pytest.approx(3.0)
    assert cov.gains() == pytest.approx([0.0, 0.0, 0.0])


def _plus() -> pd.DataFrame:
    return pd.DataFrame({"segment_id": ["ew", "ns"], "x0_m": [0.0, 500.0], "y0_m": [500.0, 0.0],
                         "x1_m": [1000.0, 500.0], "y1_m": [500.0, 1000.0]})


def test_road_graph_nodes_crossing_segments():
    g = road_graph(_plus(), sample_spacing_m=100.0, max_edge_m=None)
    assert len(g.node_xy_m) == 5  # four ends and the crossing
    assert sorted(g.edge_length_m) == pytest.approx([500.0] * 4)
    assert len(g.point_xy_m) == 20  # 5 reports per 500 m edge
    centre = int(np.argmin(np.hypot(g.node_xy_m[:, 0] - 500, g.node_xy_m[:, 1] - 500)))
    assert np.all((g.edge_nodes == centre).any(axis=1))
    assert sorted(set(g.edge_segment)) == ["ew", "ns"]


def test_long_edges_are_cut_into_equal_pieces():
    g = road_graph(_plus(), sample_spacing_m=50.0, max_edge_m=200.0)
    assert sorted(g.edge_length_m) == pytest.approx([500.0 / 3] * 12)
    assert len(g.node_xy_m) == 13
    assert len(g.point_xy_m) == 12 * 3  # round(166.7 / 50)


def test_clip_segments_drops_what_lies_outside():
    segs = pd.DataFrame({"segment_id": ["in", "out"], "x0_m": [-500.0, 5000.0], "y0_m": [500.0, 5000.0],
                         "x1_m": [500.0, 6000.0], "y1_m": [500.0, 6000.0]})
    out = clip_segments(segs, (0.0, 0.0, 1000.0, 1000.0))
    assert out["segment_id"].tolist() == ["in"]
    assert out[["x0_m", "y0_m", "x1_m", "y1_m"]].to_numpy()[0] == pytest.approx([0.0, 500.0, 500.0, 500.0])


def test_route_goes_to_the_uncertain_users_and_keeps_the_budget():
    g = road_graph(_plus(), sample_spacing_m=50.0, max_edge_m=None)
    xy = grid_points((0.0, 0.0, 1000.0, 1000.0), 100.0)
    east = np.exp(-0.5 * (np.hypot(xy[:, 0] - 900, xy[:, 1] - 500) / 150) ** 2)

    def predict(cells, pts):
        n = len(cells)
        ep = 0.5 + 4.0 * np.exp(-0.5 * (np.hypot(pts[:, 0] - 900, pts[:, 1] - 500) / 200) ** 2)
        return np.full(n, -90.0), ep, np.full(n, 2.0)

    pf = build_field(predict, ["c0"], np.array([[500.0, 500.0]]), xy, 0.01 + east, g.point_xy_m, n_nearest_cells=1,
                     n_heard=1, detection_dbm=-124.0)
    route = plan_route(VariancePlanner(pf, length_m=LENGTH_M, objective="var"), g, 700.0)
    first = route["edge"].iloc[0]
    mid = g.node_xy_m[g.edge_nodes[first]].mean(axis=0)
    assert mid == pytest.approx([750.0, 500.0])  # the east arm
    assert route["cumulative_m"].iloc[-1] <= 700.0
    assert len(route) == 1  # the next edge (500 m) no longer fits


def test_random_route_is_a_walk_within_budget():
    g = road_graph(_plus(), sample_spacing_m=100.0, max_edge_m=None)
    edges = random_route(g, 1600.0, rng=np.random.default_rng(0))
    assert len(edges) == 3
    for a, b in zip(edges[:-1], edges[1:]):
        assert set(g.edge_nodes[a]) & set(g.edge_nodes[b])


@pytest.mark.parametrize("objective", ["std", "var"])
def test_group_gain_is_the_joint_reduction_of_the_group_s_reports(objective):
    xy, _, weight = _hand_field()
    pf = _field(np.full(len(xy), 12.0), weight, xy)
    group = np.full(len(xy), -1)
    group[[0, 1, 2]] = 0  # three neighbouring reports (100 m apart): far from independent
    group[[55, 99]] = 1
    planner = VariancePlanner(pf, covariance=lambda c, p: _global_cov(p), objective=objective)
    joint = planner.group_gains(group, 3)
    assert joint[2] == 0.0  # an empty group
    for g, members in ((0, [0, 1, 2]), (1, [55, 99])):
        seq = VariancePlanner(pf, covariance=lambda c, p: _global_cov(p), objective=objective)
        total = sum(seq.measure(c)[0] for c in members)  # sequential conditioning = joint conditioning
        assert joint[g] == pytest.approx(total, rel=1e-9)
    # the sum of single-report gains overrates the correlated triple
    assert joint[0] < planner.gains()[[0, 1, 2]].sum()


def test_top2_probability_by_hand():
    rng = np.random.default_rng(0)
    sure = top2_probability(np.array([[-70.0, -80.0, -100.0, -np.inf]]), np.full((1, 4), 0.1), n_draws=200, rng=rng)
    assert sure[0] == pytest.approx([1.0, 1.0, 0.0, 0.0])
    # three equal cells: each is among the two strongest 2/3 of the time
    tie = top2_probability(np.full((1, 3), -80.0), np.full((1, 3), 5.0), n_draws=20_000, rng=rng)
    assert tie[0] == pytest.approx([2 / 3] * 3, abs=0.015)
    assert tie.sum() == pytest.approx(2.0)


def test_build_field_weighs_cells_by_their_chance_to_be_scored():
    # three cells at every position, predicted -80, -81 and -95 dBm with 3 dB epistemic std: the
    # third is among the two strongest now and then; the first two almost always
    def predict(cells, pts):
        level = {"a": -80.0, "b": -81.0, "c": -95.0}
        return np.array([level[c] for c in cells]), np.full(len(cells), 3.0), np.full(len(cells), 2.0)

    xy = np.array([[0.0, 0.0], [10.0, 0.0]])
    pf = build_field(predict, ["a", "b", "c"], np.zeros((3, 2)), xy, np.ones(2), xy, n_nearest_cells=3, n_heard=3,
                     detection_dbm=-124.0, role_draws=4000, n_roles=3)
    order = np.argsort(pf.target_cell[0])
    assert pf.target_cell[0][order].tolist() == [0, 1, 2]
    # P(c beats b) = P(N(-14, 18) > 0) = 0.0005; P(c beats a) smaller
    assert pf.target_role_p[0][order] == pytest.approx([1.0, 1.0, 0.0], abs=0.01)
    hard = build_field(predict, ["a", "b", "c"], np.zeros((3, 2)), xy, np.ones(2), xy, n_nearest_cells=3, n_heard=3,
                       detection_dbm=-124.0, role_draws=0)
    assert hard.target_role_p is None and hard.target_cell.shape == (2, 2)


def _two_arms():
    """A short west spur and a 300 m east arm 2 km away with three of the four users; the road
    graph, a planner factory over it and the users' positions."""
    segs = pd.DataFrame({"segment_id": ["w", "e"], "x0_m": [0.0, 2000.0], "y0_m": [0.0, 0.0],
                         "x1_m": [100.0, 2300.0], "y1_m": [0.0, 0.0]})
    g = road_graph(segs, sample_spacing_m=25.0, max_edge_m=None)
    xy = np.array([[50.0, 0.0], [2050.0, 0.0], [2150.0, 0.0], [2250.0, 0.0]])
    pf = _field(np.full(4, 9.0), np.array([1.0, 0.7, 0.7, 0.7]), xy)
    pf.cand_xy_m, n = g.point_xy_m, len(g.point_xy_m)
    pf.cand_cell, pf.cand_var, pf.cand_noise_var = np.zeros((n, 1), int), np.full((n, 1), 9.0), np.full((n, 1), 4.0)
    return g, (lambda: VariancePlanner(pf, length_m=LENGTH_M, objective="std")), xy


def test_best_route_keeps_the_start_the_planner_expects_most_from():
    # two far-apart arms with users: a 300 m budget can serve only one of them; the east arm's
    # users are twice as many, and its edge is not the best per metre start (short west spur)
    g, make, xy = _two_arms()
    single = plan_route(make(), g, 300.0)
    assert set(single["edge"]) == {0}  # greedy from the best edge per metre: the west spur, then stuck
    route, planner = best_route(make, g, 300.0, n_starts=2, separation_m=500.0)
    assert set(route["edge"]) == {1}
    assert route["expected_reduction"].sum() > single["expected_reduction"].sum()
    assert planner.objective() == pytest.approx(make().objective() - route["expected_reduction"].sum(), rel=1e-9)


def test_best_route_takes_a_candidate_route_it_expects_more_from():
    # the same two arms; one start only (the west spur, stuck there), and the east arm offered as
    # a candidate route: the planner's own expectation picks it; an over-budget candidate is skipped
    g, make, xy = _two_arms()
    greedy, _ = best_route(make, g, 300.0, n_starts=1, separation_m=500.0)
    assert set(greedy["edge"]) == {0} and greedy.attrs["source"] == "greedy start 0"
    route, planner = best_route(make, g, 300.0, n_starts=1, separation_m=500.0, candidates=[[1], [0, 1]])
    assert route["edge"].tolist() == [1] and route.attrs["source"] == "candidate 0"
    assert route["cumulative_m"].iloc[-1] == pytest.approx(300.0)
    assert planner.objective() == pytest.approx(make().objective() - route["expected_reduction"].sum(), rel=1e-9)
    # coverage candidates: the users' densest stretch is covered first
    routes = coverage_routes(g, 300.0, xy, np.array([1.0, 0.7, 0.7, 0.7]), radii_m=(60.0, 200.0))
    assert len(routes) == 2 and all(set(r) <= {0, 1} and r for r in routes)


def test_best_route_compares_routes_by_the_judge_when_given_one():
    # the same two arms, both routes on offer (a start and a candidate): by the users they were
    # grown on the east arm wins; a judge whose users are all on the west spur picks the spur,
    # and the route returned still carries the growth planner's own expectation
    g, make, xy = _two_arms()
    own, _ = best_route(make, g, 300.0, n_starts=1, separation_m=500.0, candidates=[[1]])
    assert own["edge"].tolist() == [1]
    west = _field(np.full(4, 9.0), np.array([1.0, 1e-6, 1e-6, 1e-6]), xy)
    west.cand_xy_m, n = g.point_xy_m, len(g.point_xy_m)
    west.cand_cell, west.cand_var, west.cand_noise_var = np.zeros((n, 1), int), np.full((n, 1), 9.0), np.full((n, 1), 4.0)
    route, planner = best_route(make, g, 300.0, n_starts=1, separation_m=500.0, candidates=[[1]],
                                make_judge=lambda: VariancePlanner(west, length_m=LENGTH_M, objective="std"))
    assert set(route["edge"]) == {0} and route.attrs["source"] == "greedy start 0"
    assert planner.objective() == pytest.approx(make().objective() - route["expected_reduction"].sum(), rel=1e-9)


def test_matched_draws_lie_as_far_from_the_data_as_a_new_user():
    # users on 40 tight clusters (10 m) in a 2 km square; f_j^O's kernel (200 m) spreads its draws
    # into the gaps, the matched kernel brings them back to a new user's distance from the data
    gen = np.random.default_rng(3)
    centres = gen.uniform(0, 2000, (40, 2))

    def users(n):
        return centres[gen.integers(0, 40, n)] + gen.normal(0, 10.0, (n, 2))

    data = users(1000)
    window = data[:250]  # the window's positions are among the data
    draws, h = matched_draws(window, 200.0, data, 4000, rng=np.random.default_rng(5))
    tree = cKDTree(data)
    new = tree.query(users(4000))[0].mean()
    wide = tree.query(window[gen.integers(0, 250, 4000)] + gen.normal(0, 200.0, (4000, 2)))[0].mean()
    got = tree.query(draws)[0].mean()
    assert 0.0 < h < 50.0
    assert draws.shape == (4000, 2)
    assert abs(got - new) < 0.25 * new  # as far as a new user (leave-one-out target), not ...
    assert wide > 5 * new  # ... as far as the 200 m kernel's draws
    # the same stream as the KDE's draws, scaled: at the full bandwidth they are the KDE's draws
    g = np.random.default_rng(5)
    kde = window[g.integers(0, 250, 4000)] + g.normal(scale=h, size=(4000, 2))
    np.testing.assert_allclose(draws, kde, atol=1e-9)


def test_matched_draws_never_widen_the_kernel():
    gen = np.random.default_rng(0)
    data = gen.uniform(0, 1000, (300, 2))
    # sparse data far apart: a new user is farther from the data than the narrow kernel reaches
    draws, h = matched_draws(data[:100], 5.0, data, 500, rng=np.random.default_rng(1))
    assert h == 5.0
    assert np.all(np.isfinite(draws))
