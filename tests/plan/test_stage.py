"""The plan stage on a tiny lake: real DensityModels (KDEs), a closed-form radio stand-in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _plan_fakes import FRAME, FakeRadioWithCov, fake_plan_lake

from cellsynth.config import load_config
from cellsynth.errors import ConfigError, StageError
from cellsynth.plan import stage as plan_stage

@pytest.fixture
def planned_lake(rt, monkeypatch):
    fake_plan_lake(rt.lake, monkeypatch)
    return rt


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run.lake_root={tmp_path / 'lake'}", "scenario.enabled=false", *overrides])


def _map(tmp_path):
    return tmp_path / "lake" / "report" / "plan" / "plan_h06_12.png"


def test_points_plan_is_written_with_its_map(planned_lake, tmp_path):
    cfg = _cfg(tmp_path, "plan.n_points=5", "plan.budget_km=null", "plan.window=h06_12")
    result = plan_stage.run(cfg, planned_lake, run_id="r1")
    rows = planned_lake.lake.read_pandas("measurement_plan").sort_values("rank")
    assert rows["rank"].tolist() == [1, 2, 3, 4, 5]
    assert set(rows["mode"]) == {"points"}
    # the uncertain half (x > 1000 m) is where the users cluster: the first pick is there
    assert rows["x_m"].iloc[0] > 1000.0
    assert np.all(np.diff(rows["expected_reduction_db"].to_numpy()) <= 1e-12)  # greedy gains shrink
    assert rows["expected_reduction_db"].sum() == pytest.approx(result.metrics["expected_reduction_db"], rel=1e-9)
    assert np.isfinite(rows[["lat", "lon"]].to_numpy()).all()
    assert abs(rows["lat"].iloc[0] - FRAME[0]) < 0.05
    assert _map(tmp_path).is_file()
    assert result.artifacts["plan_map"] == str(_map(tmp_path))


def test_the_radio_models_own_covariance_is_what_the_plan_conditions_on(rt, monkeypatch, tmp_path):
    radio = FakeRadioWithCov()
    fake_plan_lake(rt.lake, monkeypatch, radio=radio)
    cfg = _cfg(tmp_path, "plan.n_points=5", "plan.budget_km=null", "plan.window=h06_12")
    with_cov = plan_stage.run(cfg, rt, run_id="c1").metrics
    assert {c for t, c, _ in radio.calls} == {"A", "B", "C"} and {t for t, _, _ in radio.calls} == {"rsrp"}
    monkeypatch.setattr(plan_stage, "_load_radio", lambda _lake: type(radio).__mro__[1]())  # no covariance
    fallback = plan_stage.run(cfg, rt, run_id="c2").metrics
    # same epistemic variance before; the 2 km exponential reaches further than 150 m: more gained
    assert with_cov["weighted_epistemic_std_before_db"] == pytest.approx(fallback["weighted_epistemic_std_before_db"], rel=1e-9)
    assert with_cov["expected_reduction_db"] > 1.2 * fallback["expected_reduction_db"]


def test_ue_plan_triggers_distinct_ues_of_the_window(planned_lake, tmp_path):
    cfg = _cfg(tmp_path, "plan.n_ues=6", "plan.budget_km=null", "plan.window=h06_12", "plan.ue_pool_factor=10")
    result = plan_stage.run(cfg, planned_lake, run_id="u1")
    rows = planned_lake.lake.read_pandas("measurement_plan").sort_values("rank")
    assert rows["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert set(rows["mode"]) == {"ues"} and set(rows["n_reports"]) == {1}
    assert len({(round(x, 6), round(y, 6)) for x, y in zip(rows["x_m"], rows["y_m"])}) == 6  # each UE once
    # the pool is where users are (f_j^O: the cluster at (1200, 300) m holds 3/4 of them), and
    # the picks go to its uncertain east half
    assert rows["x_m"].iloc[0] > 1000.0
    assert rows["expected_reduction_db"].sum() == pytest.approx(result.metrics["expected_reduction_db"], rel=1e-9)
    assert _map(tmp_path).is_file()


def test_ue_pool_above_max_targets_is_a_config_error(planned_lake, tmp_path):
    cfg = _cfg(tmp_path, "plan.n_ues=100", "plan.budget_km=null", "plan.max_targets=500")
    with pytest.raises(ConfigError, match=r"plan\.n_ues: 100 UEs x plan\.ue_pool_factor=20 candidates is more than"):
        plan_stage.run(cfg, planned_lake, run_id="u2")
    _nothing_written(planned_lake, tmp_path)


def test_route_plan_follows_the_road_file(planned_lake, tmp_path):
    roads = tmp_path / "roads.csv"
    pd.DataFrame({"segment_id": ["main", "cross"], "x0_m": [-100.0, 1300.0], "y0_m": [300.0, -100.0],
                  "x1_m": [1600.0, 1300.0], "y1_m": [300.0, 1300.0]}).to_csv(roads, index=False)
    cfg = _cfg(tmp_path, "plan.budget_km=1.0", f"plan.road_path={roads}")
    plan_stage.run(cfg, planned_lake, run_id="r2")
    rows = planned_lake.lake.read_pandas("measurement_plan").sort_values("rank")
    assert set(rows["mode"]) == {"route"}
    assert set(rows["segment_id"]) <= {"main", "cross"}
    assert rows["cumulative_km"].iloc[-1] <= 1.0 + 1e-9
    assert rows["length_m"].sum() == pytest.approx(rows["cumulative_km"].iloc[-1] * 1000)
    assert (rows["n_reports"] >= 1).all()


def test_budget_of_zero_is_a_config_error():
    with pytest.raises(ConfigError, match=r"plan\.budget_km: Input should be greater than 0"):
        load_config(None, ["plan.budget_km=0"])
    with pytest.raises(ConfigError, match=r"plan\.n_points"):
        load_config(None, ["plan.n_points=0"])
    # points or UEs alone replace the default km budget; a km budget set beside them is an error
    assert load_config(None, ["plan.n_points=3"]).plan.budget_km is None
    with pytest.raises(ConfigError, match=r"plan\.budget_km: set exactly one"):
        load_config(None, ["plan.n_points=3", "plan.budget_km=5"])
    with pytest.raises(ConfigError, match=r"plan\.budget_km: set exactly one of plan\.budget_km, plan\.n_points and plan\.n_ues"):
        load_config(None, ["plan.n_ues=3", "plan.n_points=2"])


def _nothing_written(rt, tmp_path):
    assert not rt.lake.exists("measurement_plan")
    assert not _map(tmp_path).exists()


def test_unknown_window_writes_nothing(planned_lake, tmp_path):
    with pytest.raises(ConfigError, match=r"plan\.window: 'h99_99' is not a trained window \(have: h06_12\)"):
        plan_stage.run(_cfg(tmp_path, "plan.window=h99_99"), planned_lake, run_id="r3")
    _nothing_written(planned_lake, tmp_path)


def test_road_file_outside_the_area_writes_nothing(planned_lake, tmp_path):
    roads = tmp_path / "far.csv"
    pd.DataFrame({"x0_m": [50_000.0], "y0_m": [50_000.0], "x1_m": [51_000.0], "y1_m": [50_000.0]}).to_csv(roads, index=False)
    with pytest.raises(ConfigError, match=r"plan\.road_path: no segment of .*far\.csv overlaps the planning area"):
        plan_stage.run(_cfg(tmp_path, f"plan.road_path={roads}"), planned_lake, run_id="r4")
    _nothing_written(planned_lake, tmp_path)


def test_road_file_with_wrong_columns_is_one_line(planned_lake, tmp_path):
    roads = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1.0]}).to_csv(roads, index=False)
    with pytest.raises(ConfigError, match=r"plan\.road_path: .* needs columns x0_m, y0_m, x1_m, y1_m"):
        plan_stage.run(_cfg(tmp_path, f"plan.road_path={roads}"), planned_lake, run_id="r5")
    _nothing_written(planned_lake, tmp_path)


def test_geojson_roads_in_lon_lat(planned_lake, tmp_path):
    from cellsynth.geo import LocalFrame

    lat, lon = LocalFrame(*FRAME).to_latlon(np.array([-100.0, 1600.0]), np.array([300.0, 300.0]))
    roads = tmp_path / "roads.geojson"
    roads.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"id": "m"}, '
                     f'"geometry": {{"type": "LineString", "coordinates": [[{lon[0]}, {lat[0]}], [{lon[1]}, {lat[1]}]]}}}}]}}')
    plan_stage.run(_cfg(tmp_path, "plan.budget_km=0.5", f"plan.road_path={roads}"), planned_lake, run_id="r6")
    rows = planned_lake.lake.read_pandas("measurement_plan")
    assert set(rows["segment_id"]) == {"m:0"}
    assert rows[["y_m", "y_end_m"]].to_numpy() == pytest.approx(np.full((len(rows), 2), 300.0), abs=0.5)


def test_missing_models_is_one_stage_error(rt, tmp_path):
    with pytest.raises(StageError, match=r"plan: lake table\(s\) cells, kde_models, radio_models missing"):
        plan_stage.run(_cfg(tmp_path), rt, run_id="r7")
    _nothing_written(rt, tmp_path)


def test_targets_are_draws_from_the_window_s_user_density(planned_lake, tmp_path, monkeypatch):
    from cellsynth.density import DensityModels

    calls = []
    real = DensityModels.sample_positions

    def spy(self, window, n_samples, *, rng=None):
        calls.append((window, n_samples))
        return real(self, window, n_samples, rng=rng)

    monkeypatch.setattr(DensityModels, "sample_positions", spy)
    cfg = _cfg(tmp_path, "plan.n_points=3", "plan.budget_km=null", "plan.window=h06_12", "plan.n_target_samples=300")
    result = plan_stage.run(cfg, planned_lake, run_id="t1")
    assert calls == [("h06_12", 300)]
    # the objective is a user-weighted std in dB, positive and lowered by the plan
    before, after = result.metrics["weighted_epistemic_std_before_db"], result.metrics["weighted_epistemic_std_after_db"]
    assert 0.0 < after < before
    assert before - after == pytest.approx(result.metrics["expected_reduction_db"], rel=1e-12)


def test_route_selection_on_independent_draws_plans_within_the_budget(planned_lake, tmp_path):
    # plan.route_selection=independent: the candidate routes judged on a second set of f_j^O
    # draws; the plan is written as the default's is, within the budget
    roads = tmp_path / "roads.csv"
    pd.DataFrame({"segment_id": ["main", "cross"], "x0_m": [-100.0, 1300.0], "y0_m": [300.0, -100.0],
                  "x1_m": [1600.0, 1300.0], "y1_m": [300.0, 1300.0]}).to_csv(roads, index=False)
    cfg = _cfg(tmp_path, "plan.budget_km=1.0", f"plan.road_path={roads}", "plan.route_selection=independent")
    result = plan_stage.run(cfg, planned_lake, run_id="r2")
    rows = planned_lake.lake.read_pandas("measurement_plan").sort_values("rank")
    assert set(rows["mode"]) == {"route"} and rows["cumulative_km"].iloc[-1] <= 1.0 + 1e-9
    assert result.metrics["expected_reduction_db"] > 0


def test_matched_user_draws_come_from_the_area_density_s_positions(planned_lake, tmp_path, monkeypatch):
    # plan.user_draws=matched: the users are f_j^O's positions with a kernel no wider than its own,
    # drawn by matched_draws against every window's report positions, not DensityModels.sample_positions
    from cellsynth.density import DensityModels
    from cellsynth.plan import transforms

    calls, seen = [], []
    real = transforms.matched_draws

    def spy(positions, bandwidth_m, data_xy_m, n, *, rng):
        draws, h = real(positions, bandwidth_m, data_xy_m, n, rng=rng)
        seen.append((len(positions), len(data_xy_m), n, bandwidth_m, h))
        return draws, h

    monkeypatch.setattr(transforms, "matched_draws", spy)
    monkeypatch.setattr(DensityModels, "sample_positions", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("sample_positions used")))
    cfg = _cfg(tmp_path, "plan.n_points=3", "plan.budget_km=null", "plan.window=h06_12", "plan.n_target_samples=300",
               "plan.user_draws=matched")
    result = plan_stage.run(cfg, planned_lake, run_id="m1")
    assert len(seen) == 1 and not calls
    n_pos, n_data, n, bw, h = seen[0]
    assert n == 300 and n_data >= n_pos > 0 and 0.0 < h <= bw
    before, after = result.metrics["weighted_epistemic_std_before_db"], result.metrics["weighted_epistemic_std_after_db"]
    assert 0.0 < after < before
