from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from _generate_fakes import CELLS, FakeRadio, rsrp_mean_dbm

from cellsynth.errors import ConfigError
from cellsynth.generate import transforms as T
from cellsynth.radio import calibration as cal


def test_sample_size_multiple_and_rounding():
    assert T.sample_size(1000, 1.0) == 1000
    assert T.sample_size(1000, 10.0) == 10_000
    assert T.sample_size(3, 0.5) == 2  # round(1.5) -> 2 (banker's rounding)
    assert T.sample_size(1, 0.1) == 1
    assert T.sample_size(0, 10.0) == 0


def test_derived_seed_is_stable_and_separates_shards():
    assert T.derived_seed(42, "h00_06", 3) == T.derived_seed(42, "h00_06", 3)
    assert T.derived_seed(42, "h00_06", 3) != T.derived_seed(42, "h00_06", 4)
    assert T.derived_seed(42, "h00_06", 3) != T.derived_seed(43, "h00_06", 3)


def test_unknown_window_names_the_key():
    assert T.check_windows(None, ["h06_12", "h00_06"]) == ["h00_06", "h06_12"]
    assert T.check_windows(["h06_12"], ["h00_06", "h06_12"]) == ["h06_12"]
    with pytest.raises(ConfigError, match=r"generate\.windows: unknown window 'h99_99' \(have: h00_06\)"):
        T.check_windows(["h99_99"], ["h00_06"])


def test_too_many_neighbours_names_the_key():
    T.check_n_neighbours(3, 4)
    with pytest.raises(ConfigError, match=r"generate\.n_neighbours: 4 neighbours requested but only 3"):
        T.check_n_neighbours(4, 4)
    T.check_n_neighbours(0, 1)  # serving cell only
    # no model at all is too little data, not a config problem (a 4-report input pooled every cell)
    from cellsynth.errors import StageError

    with pytest.raises(StageError, match=r"no cell has an RSRP model of its own"):
        T.check_n_neighbours(0, 0)


def test_cell_loads_observed_quantile_and_fallback():
    obs = pd.DataFrame({
        "window": ["w", "w", "w", "w"], "serving_cell_id": ["A", "A", "B", None],
        "load_rho": [0.2, 0.4, 0.9, np.nan],
    })
    table = T.cell_loads("observed", observed=obs)
    rho = T.loads_for("w", np.array(["A", "B", "C"], dtype=object), table, default_rho=0.5)
    # A: mean(0.2, 0.4); B: 0.9; C has no load: window mean (0.2 + 0.4 + 0.9) / 3.
    np.testing.assert_allclose(rho, [0.3, 0.9, 0.5])
    q = T.cell_loads("quantile", observed=obs, quantile=1.0)
    np.testing.assert_allclose(T.loads_for("w", np.array(["A"], dtype=object), q, default_rho=0.0), [0.4])
    # Unknown window: the configured default.
    np.testing.assert_allclose(T.loads_for("x", np.array(["A"], dtype=object), table, default_rho=0.7), [0.7])


def test_cell_loads_synthetic_traffic_means_per_cell():
    traffic = pd.DataFrame({"window": ["w"] * 3, "cell_id": ["A", "A", "B"], "load_rho": [0.1, 0.3, 0.8]})
    table = T.cell_loads("synthetic_traffic", synthetic_traffic=traffic)
    np.testing.assert_allclose(T.loads_for("w", np.array(["A", "B"], dtype=object), table, default_rho=0.0), [0.2, 0.8])


def test_load_scenario_without_load_data_is_a_clear_error():
    no_load = pd.DataFrame({"window": ["w"], "serving_cell_id": ["A"], "load_rho": [np.nan]})
    with pytest.raises(ConfigError, match=r"generate\.load_scenario: 'observed' needs load_rho in mdt_reports"):
        T.cell_loads("observed", observed=no_load)
    with pytest.raises(ConfigError, match=r"generate\.load_scenario: 'synthetic_traffic' needs the synthetic_traffic table"):
        T.cell_loads("synthetic_traffic", synthetic_traffic=None)


def test_a_scenario_that_reads_loads_falls_back_to_fixed_only_where_no_report_has_one():
    no_load = pd.DataFrame({"window": ["w"], "serving_cell_id": ["A"], "load_rho": [np.nan]})
    some = pd.DataFrame({"window": ["w", "w"], "serving_cell_id": ["A", "B"], "load_rho": [np.nan, 0.4]})
    for scenario in ("observed", "quantile"):
        assert T.effective_load_scenario(scenario, no_load) == "fixed"
        assert T.effective_load_scenario(scenario, None) == "fixed"
        assert T.effective_load_scenario(scenario, some) == scenario
    assert T.effective_load_scenario("synthetic_traffic", no_load) == "synthetic_traffic"
    assert T.effective_load_scenario("fixed", some) == "fixed"


def test_cell_index_candidates_within_radius_nearest_first():
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    rows, cells = index.candidates(np.array([[100.0, 0.0], [1900.0, 0.0]]), radius_m=1500.0, k=3)
    assert rows.tolist() == [0, 0, 1, 1]
    assert cells.tolist() == ["A", "B", "C", "B"]


def test_strongest_neighbours_hand_example():
    # Row 0 (serving A): B -80, C -70, A -60 (serving, dropped), D -130 (undetectable).
    # Row 1 (serving B): only C -90.
    rows = np.array([0, 0, 0, 0, 1])
    cells = np.array(["B", "C", "A", "D", "C"], dtype=object)
    mean = np.array([-80.0, -70.0, -60.0, -130.0, -90.0])
    out = T.strongest_neighbours(
        2, rows, cells, mean, np.arange(5.0), np.full(5, 2.0), serving_cell_ids=np.array(["A", "B"], dtype=object), n_neighbours=2,
    )
    assert out["neighbour_1_cell_id"].tolist() == ["C", "C"]
    assert out["neighbour_2_cell_id"].tolist() == ["B", None]
    np.testing.assert_allclose(out["neighbour_1_rsrp_dbm"], [-70.0, -90.0])
    np.testing.assert_allclose(out["neighbour_1_rsrp_dbm_epistemic_std"], [1.0, 4.0])
    assert out["neighbour_2_rsrp_dbm"].isna().tolist() == [False, True]


def _positions() -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": ["s0", "s1", "s2"], "window": "w",
        "x_m": [100.0, 1100.0, 1900.0], "y_m": [50.0, -20.0, 10.0], "serving_cell_id": ["A", "B", "C"],
    })


def test_synthesize_mean_matches_closed_form_and_brute_force_neighbours():
    pos = _positions()
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    out = T.synthesize(
        pos, FakeRadio(), index, load_rho=np.array([0.0, 0.5, 1.0]), n_neighbours=2, neighbour_radius_m=3000.0,
        neighbour_candidates=10, epistemic_threshold_db=1.0, values="mean", rng=0,
    )
    expected = [rsrp_mean_dbm(c, x, y) for c, x, y in zip(pos.serving_cell_id, pos.x_m, pos.y_m)]
    np.testing.assert_allclose(out["rsrp_dbm"], expected)
    np.testing.assert_allclose(out["rsrq_db"], [-8.0, -11.0, -14.0])
    np.testing.assert_allclose(out["load_rho"], [0.0, 0.5, 1.0])
    # epistemic = 0.5 + d/1000: row 0 is 112 m from A (0.61 < 1.0), others too.
    assert out["reliable"].tolist() == [True, True, True]
    for i, row in pos.iterrows():
        # Brute force: every other cell within the radius, strongest first (FAR is 48+ km away).
        others = sorted((rsrp_mean_dbm(c, row.x_m, row.y_m), c) for c in ["A", "B", "C"] if c != row.serving_cell_id)[::-1]
        others = [(v, c) for v, c in others if v >= -124.0]
        assert len(others) == 2
        assert [out.loc[i, "neighbour_1_cell_id"], out.loc[i, "neighbour_2_cell_id"]] == [c for _, c in others]
        assert out.loc[i, "neighbour_1_rsrp_dbm"] == pytest.approx(others[0][0])


def test_synthesize_sampling_is_seeded_and_spread_by_total_std():
    pos = pd.concat([_positions()] * 400, ignore_index=True)
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    kwargs = dict(load_rho=None, n_neighbours=1, neighbour_radius_m=3000.0, neighbour_candidates=4,
                  epistemic_threshold_db=3.0, values="sample")
    a = T.synthesize(pos, FakeRadio(), index, rng=7, **kwargs)
    b = T.synthesize(pos, FakeRadio(), index, rng=7, **kwargs)
    pd.testing.assert_frame_equal(a, b)
    assert a["rsrq_db"].isna().all()  # no load given: no RSRQ
    mean = np.array([rsrp_mean_dbm(c, x, y) for c, x, y in zip(pos.serving_cell_id, pos.x_m, pos.y_m)])
    z = (a["rsrp_dbm"] - mean) / np.hypot(a["rsrp_dbm_epistemic_std"], a["rsrp_dbm_aleatoric_std"])
    assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15


@dataclass
class _TPrediction:
    mean: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray
    dof: np.ndarray


class _TRadio(FakeRadio):
    """FakeRadio whose predictive is a unit-std Student-t with `dof` (as RadioModels.predict states)."""

    def __init__(self, dof: float):
        super().__init__(rsrq=False)
        self.dof = dof

    def predict(self, target, cell_ids, xy_m, *, load_rho=None):
        p = super().predict(target, cell_ids, xy_m, load_rho=load_rho)
        return _TPrediction(p.mean, p.epistemic_std, p.aleatoric_std, np.full(len(p.mean), self.dof))


def test_synthesize_draws_from_the_models_student_t():
    pos = pd.concat([_positions()] * 2000, ignore_index=True)
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    kwargs = dict(load_rho=None, n_neighbours=1, neighbour_radius_m=3000.0, neighbour_candidates=4,
                  epistemic_threshold_db=3.0, values="sample", rng=11)
    gauss = T.synthesize(pos, FakeRadio(rsrq=False), index, **kwargs)
    # dof = inf is the Gaussian: the same rows as a prediction without dof (same stream, same values)
    pd.testing.assert_frame_equal(T.synthesize(pos, _TRadio(np.inf), index, **kwargs), gauss)
    heavy = T.synthesize(pos, _TRadio(4.0), index, **kwargs)
    pd.testing.assert_frame_equal(heavy, T.synthesize(pos, _TRadio(4.0), index, **kwargs))  # seeded
    mean = np.array([rsrp_mean_dbm(c, x, y) for c, x, y in zip(pos.serving_cell_id, pos.x_m, pos.y_m)])
    std = np.hypot(gauss["rsrp_dbm_epistemic_std"], gauss["rsrp_dbm_aleatoric_std"]).to_numpy()
    z_g, z_t = (gauss["rsrp_dbm"] - mean).to_numpy() / std, (heavy["rsrp_dbm"] - mean).to_numpy() / std
    # same std (the model's total std), heavier tails: |z| > 3 is 0.27% of a normal, 1.3% of the unit-std t4
    assert 0.85 < z_t.std() < 1.15
    assert np.mean(np.abs(z_t) > 3.0) > 0.008 > 0.005 > np.mean(np.abs(z_g) > 3.0)
    # the t's own 90% interval covers about 90% of the draws (1 dB reporting grid aside)
    half = cal.std_t_ppf(0.95, 4.0)
    assert abs(np.mean(np.abs(z_t) <= half) - 0.9) < 0.02


class _ShiftedRadio(FakeRadio):
    """FakeRadio with its RSRP mean moved by a fixed offset (to push draws past the range)."""

    def __init__(self, offset_db: float):
        super().__init__(rsrq=False)
        self.offset_db = offset_db

    def predict(self, target, cell_ids, xy_m, *, load_rho=None):
        p = super().predict(target, cell_ids, xy_m, load_rho=load_rho)
        return type(p)(p.mean + self.offset_db, p.epistemic_std, p.aleatoric_std)


def test_synthesize_clips_to_the_ingest_range_and_flags_clipped_rows():
    pos = _positions()  # closed-form means -61.4, -62.0 and -64.1 dBm (A 112 m, B 100 m, C 100 m away)
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    kwargs = dict(load_rho=None, n_neighbours=0, neighbour_radius_m=3000.0, neighbour_candidates=4,
                  epistemic_threshold_db=3.0, values="mean", rng=0)
    expected = [rsrp_mean_dbm(c, x, y) for c, x, y in zip(pos.serving_cell_id, pos.x_m, pos.y_m)]
    # -44 dBm is the top of the RSRP range: +20 dB puts rows 0 and 1 above it by more than half a
    # reporting step (clipped, flagged); row 2 lands at -44.1, inside the range.
    out = T.synthesize(pos, _ShiftedRadio(20.0), index, **kwargs)
    assert out["clipped"].tolist() == [True, True, False]
    np.testing.assert_allclose(out["rsrp_dbm"], [-44.0, -44.0, expected[2] + 20.0])
    low = T.synthesize(pos, _ShiftedRadio(-200.0), index, **kwargs)
    assert low["clipped"].all() and (low["rsrp_dbm"] == -140.0).all()
    mid = T.synthesize(pos, _ShiftedRadio(-40.0), index, **kwargs)
    assert not mid["clipped"].any()
    np.testing.assert_allclose(mid["rsrp_dbm"], np.array(expected) - 40.0)


def test_synthetic_rsrq_keeps_to_the_range_ingest_accepted():
    """Real RSRQ down to -34 dB passes ingest (LTE's extended range, its default), so a cell-edge
    model's -24 dB is a value to write, not one to clip to the normal range's -19.5 dB floor; a
    narrower configured range clips and flags."""
    pos = _positions()
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    load = np.full(3, 16.0 / 6.0)  # FakeRadio's RSRQ mean -8 - 6 rho = -24 dB
    kwargs = dict(load_rho=load, n_neighbours=0, neighbour_radius_m=3000.0, neighbour_candidates=4,
                  epistemic_threshold_db=3.0, rng=0)
    mean = T.synthesize(pos, FakeRadio(), index, values="mean", **kwargs)
    np.testing.assert_allclose(mean["rsrq_db"], -24.0)
    assert not mean["clipped"].any()
    normal = T.synthesize(pos, FakeRadio(), index, values="mean", rsrq_range_db=(-19.5, -3.0), **kwargs)
    np.testing.assert_allclose(normal["rsrq_db"], -19.5)
    assert normal["clipped"].all()
    many = pd.concat([_positions()] * 200, ignore_index=True)
    drawn = T.synthesize(many, FakeRadio(), index, **{**kwargs, "load_rho": np.full(len(many), 16.0 / 6.0)})
    assert drawn["rsrq_db"].mean() == pytest.approx(-24.0, abs=0.5)
    assert (drawn["rsrq_db"] < -19.5).mean() > 0.9 and not drawn["clipped"].any()
    np.testing.assert_allclose(drawn["rsrq_db"] * 2, np.round(drawn["rsrq_db"] * 2))  # the 0.5 dB grid


def test_to_table_types_empty_neighbour_columns():
    pos = _positions()
    out = pos.assign(
        rsrp_dbm=-80.0, rsrp_dbm_epistemic_std=1.0, rsrp_dbm_aleatoric_std=2.0, rsrq_db=np.nan,
        rsrq_db_epistemic_std=np.nan, rsrq_db_aleatoric_std=np.nan, load_rho=np.nan, reliable=True, lat=44.0, lon=11.0,
        neighbour_1_cell_id=None, neighbour_1_rsrp_dbm=np.nan, neighbour_1_rsrp_dbm_epistemic_std=np.nan,
        neighbour_1_rsrp_dbm_aleatoric_std=np.nan,
    )
    table = T.to_table(out, n_neighbours=1, scenario="fixed", run_id="r1", n_cell_shards=8)
    import pyarrow as pa

    assert table.schema.field("neighbour_1_cell_id").type == pa.string()
    assert table.schema.field("neighbour_1_rsrp_dbm").type == pa.float64()
    from cellsynth.schemas import cell_shard_of

    assert table.column("cell_shard").to_pylist() == [cell_shard_of(c, 8) for c in "ABC"]


def _detection_measurements():
    # Square (0, 0) of 100 m: 4 reports served by A; B heard in 3, C in 1. Square (5, 0): 2 reports
    # served by B; A heard in both. Reports served by a cell do not count towards its own rate.
    rows = []
    for i in range(4):
        rows.append((f"r{i}", "A", "serving", 10.0, 10.0))
    rows += [("r0", "B", "neighbour", 10.0, 10.0), ("r1", "B", "neighbour", 10.0, 10.0),
             ("r2", "B", "neighbour", 10.0, 10.0), ("r3", "C", "neighbour", 10.0, 10.0)]
    for i in (4, 5):
        rows += [(f"r{i}", "B", "serving", 510.0, 10.0), (f"r{i}", "A", "neighbour", 510.0, 10.0)]
    return pd.DataFrame(rows, columns=["report_id", "cell_id", "role", "x_m", "y_m"])


def test_detection_maps_hand_computed_rates():
    maps = T.DetectionMaps(resolution_m=100.0, smoothing_squares=1e-6, margin_m=0.0).fit(_detection_measurements())
    xy = np.array([[50.0, 50.0]] * 3 + [[550.0, 50.0]] * 2 + [[5000.0, 0.0]])
    p = maps.prob(np.array(["B", "C", "A", "A", "B", "B"], dtype=object), xy)
    # B heard in 3 of 4 reports at square 0; C in 1 of 4; A serves square 0 (no other reports);
    # A heard in 2 of 2 at square 5; B serves square 5; far away: outside the area.
    np.testing.assert_allclose(p, [0.75, 0.25, 0.0, 1.0, 0.0, 0.0], atol=1e-6)


def _dense_detection_reference(m, maps, s):
    """The dense n_cells x n_squares computation the maps stored before issue 15."""
    from scipy.ndimage import gaussian_filter

    def counts(xy, layer, n):
        out = np.zeros((n, *maps.shape_))
        g = np.floor((xy - maps.origin_m_) / maps.resolution_m).astype(int)
        ok = (g[:, 0] >= 0) & (g[:, 0] < maps.shape_[0]) & (g[:, 1] >= 0) & (g[:, 1] < maps.shape_[1]) & (layer >= 0)
        np.add.at(out, (layer[ok], g[ok, 0], g[ok, 1]), 1.0)
        return out

    serving, neighbours = m[m["role"] == "serving"], m[m["role"] != "serving"]
    col = {c: i for i, c in enumerate(maps.cell_ids_)}
    sxy, nxy = serving[["x_m", "y_m"]].to_numpy(), neighbours[["x_m", "y_m"]].to_numpy()
    den_all = gaussian_filter(counts(sxy, np.zeros(len(sxy), dtype=int), 1)[0], s)
    served = counts(sxy, np.array([col.get(c, -1) for c in serving["cell_id"]]), len(col))
    heard = counts(nxy, np.array([col[c] for c in neighbours["cell_id"]]), len(col))
    out = []
    for i in range(len(col)):
        den = den_all - gaussian_filter(served[i], s)
        num = gaussian_filter(heard[i], s)
        out.append(np.where(den > 1e-3, num / np.maximum(den, 1e-9), 0.0).clip(0.0, 1.0).astype(np.float32))
    return np.stack(out)


@pytest.mark.parametrize("s", [0.7, 1.0, 2.5])
def test_detection_maps_per_cell_boxes_equal_the_dense_maps(s):
    # Issue 15: each cell's rates are kept only over the squares near where it was heard; every
    # square of every cell must equal the dense computation bit for bit (0 outside the boxes).
    rng = np.random.default_rng(3)
    sites = rng.uniform(0, 3000, size=(25, 2))
    rows = []
    for r, p in enumerate(rng.uniform(-200, 3200, size=(4000, 2))):
        near = np.argsort(np.hypot(*(sites - p).T))[: rng.integers(1, 5)]
        rows += [(f"r{r}", f"c{c}", "serving" if k == 0 else "neighbour", p[0], p[1]) for k, c in enumerate(near)]
    m = pd.DataFrame(rows, columns=["report_id", "cell_id", "role", "x_m", "y_m"])
    maps = T.DetectionMaps(resolution_m=100.0, smoothing_squares=s, margin_m=300.0).fit(m)
    dense = _dense_detection_reference(m, maps, s)
    gx, gy = np.meshgrid(np.arange(maps.shape_[0]), np.arange(maps.shape_[1]), indexing="ij")
    centres = np.column_stack([gx.ravel(), gy.ravel()]) * 100.0 + maps.origin_m_ + 50.0
    for i, cell in enumerate(maps.cell_ids_):
        got = maps.prob(np.full(len(centres), cell, dtype=object), centres)
        np.testing.assert_array_equal(got, dense[i].ravel().astype(float))
    assert maps.values_.size < dense.size  # the boxes hold less than the dense maps


def test_detection_maps_before_fit_is_not_fitted():
    from cellsynth.errors import NotFittedError

    with pytest.raises(NotFittedError, match="DetectionMaps"):
        T.DetectionMaps().prob(np.array(["A"], dtype=object), np.zeros((1, 2)))


class _AlwaysHeard:
    def prob(self, cell_ids, xy_m):
        return np.where(np.asarray(cell_ids, dtype=object) == "C", 0.0, 1.0)


def test_sampled_rows_are_ue_reports_serving_strongest_on_grid_above_detection():
    pos = pd.concat([_positions()] * 300, ignore_index=True)
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    out = T.synthesize(pos, FakeRadio(), index, load_rho=np.full(len(pos), 0.3), n_neighbours=2, neighbour_radius_m=3000.0,
                       neighbour_candidates=4, epistemic_threshold_db=3.0, values="sample", detection=_AlwaysHeard(), rng=3)
    nb = out[["neighbour_1_rsrp_dbm", "neighbour_2_rsrp_dbm"]].to_numpy(dtype=float)
    assert np.all(np.nan_to_num(nb, nan=-999.0) <= out["rsrp_dbm"].to_numpy()[:, None])
    have = np.isfinite(nb)
    assert (nb[have] >= -124.0).all() and np.array_equal(nb[have], np.round(nb[have]))
    assert np.array_equal(out["rsrp_dbm"], np.round(out["rsrp_dbm"]))
    assert np.array_equal(out["rsrq_db"] * 2, np.round(out["rsrq_db"] * 2))
    # C has detection probability 0: never a neighbour, so rows served by A or B list one other cell.
    assert not (out[["neighbour_1_cell_id", "neighbour_2_cell_id"]] == "C").any().any()
    assert set(out.loc[out["serving_cell_id"] != "C", "neighbour_1_cell_id"]) <= {"A", "B"}
    assert out.loc[out["serving_cell_id"] != "C", "neighbour_2_cell_id"].isna().all()


class _CountingRadio(FakeRadio):
    """FakeRadio that records which cells each predict call saw and how often it was released."""

    def __init__(self):
        super().__init__()
        self.calls, self.releases = [], 0

    def predict(self, target, cell_ids, xy_m, *, load_rho=None):
        self.calls.append((target, sorted(set(np.asarray(cell_ids, dtype=object)))))
        return super().predict(target, cell_ids, xy_m, load_rho=load_rho)

    def release(self):
        self.releases += 1


def test_pooled_jobs_give_each_job_its_lone_rows_and_solve_each_cell_once(monkeypatch):
    index = T.CellIndex(CELLS["cell_id"], CELLS[["x_m", "y_m"]].to_numpy())
    kwargs = dict(n_neighbours=2, neighbour_radius_m=3000.0, neighbour_candidates=4, epistemic_threshold_db=3.0,
                  values="sample")
    rng = np.random.default_rng(3)
    jobs = []
    for seed in (5, 6, 7):
        pos = pd.concat([_positions()] * 30, ignore_index=True)
        pos["x_m"] = pos["x_m"] + rng.normal(0, 50, len(pos))
        jobs.append((pos, np.full(len(pos), 0.4), seed))
    monkeypatch.setattr(T, "PREDICT_CELLS_AT_ONCE", 2)
    radio = _CountingRadio()
    pooled = T.synthesize_many(jobs, radio, index, **kwargs)
    for (pos, rho, seed), got in zip(jobs, pooled):
        alone = T.synthesize(pos, FakeRadio(), index, load_rho=rho, rng=seed, **kwargs)
        pd.testing.assert_frame_equal(got, alone)
    # per target, every cell in exactly one predict call, calls of at most 2 cells, released after each
    for target in ("rsrp", "rsrq"):
        seen = [c for t, cells in radio.calls if t == target for c in cells]
        assert len(seen) == len(set(seen)) and all(len(cells) <= 2 for t, cells in radio.calls)
    assert radio.releases == len(radio.calls)
    # requests_only (the Ray path's recording pass): the same predict calls, no rows built; it
    # returns each job's draws (numbers only), and a pass given them back writes the same rows
    asked = _CountingRadio()
    plans = T.synthesize_many(jobs, asked, index, requests_only=True, **kwargs)
    assert asked.calls == radio.calls and len(asked.calls) > 2
    assert len(plans) == len(jobs) and all(isinstance(p, dict) for p in plans)
    assert not any(getattr(v, "dtype", None) == object for p in plans for v in p.values())
    assert sum(len(p["nb_rows"]) for p in plans) > 0
    replayed = T.synthesize_many(jobs, FakeRadio(), index, plans=plans, **kwargs)
    for got, want in zip(replayed, pooled):
        pd.testing.assert_frame_equal(got, want)
    with pytest.raises(ValueError, match="other positions"):
        T.synthesize_many([(jobs[0][0].iloc[:5], jobs[0][1][:5], 5)], FakeRadio(), index, plans=plans[:1], **kwargs)


def test_shard_groups_ids_stay_unique_when_shards_come_from_different_draws():
    """An incremental run keeps some shards of a window from an older draw and regenerates the
    others from a new one; both draws number their rows from 0, so the shard must be in the id."""
    from cellsynth.schemas import cell_shard_of

    cells = [f"c{i}" for i in range(12)]
    shard_of = {c: cell_shard_of(c, 4) for c in cells}
    assert len(set(shard_of.values())) >= 2

    def draw(seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        n = 200
        return pd.DataFrame({"sample_id": [f"syn-d-2026-01-05-0000-{i:08d}" for i in range(n)],
                             "window": "d-2026-01-05", "x_m": rng.normal(size=n), "y_m": rng.normal(size=n),
                             "serving_cell_id": rng.choice(cells, n)})

    old, new = T.shard_groups(draw(0), 4), T.shard_groups(draw(1), 4)
    kept = sorted(old)[0]
    mixed = pd.concat([old[kept], *(g for s, g in new.items() if s != kept)], ignore_index=True)
    assert not mixed["sample_id"].duplicated().any()
    for s, g in new.items():
        assert g["sample_id"].str.startswith(f"syn-d-2026-01-05-{s:04d}-0000-").all()
        assert [shard_of[c] for c in g["serving_cell_id"]] == [s] * len(g)


@pytest.mark.parametrize("values", [
    np.array(["s0002-1", "s0001-0", "s0002-1", "c10", "c9", "é-cell", "s0001-0"], dtype=object),
    np.array([], dtype=object),
    np.array(["a", None, "b", None, float("nan")], dtype=object),  # not all strings: np.unique itself
    np.array([1, "1", 2.0], dtype=object),
    ["x", "y", "x"],
])
def test_unique_str_equals_np_unique_of_the_string_ids(values):
    uniq, inv = T.unique_str(values)
    ref_uniq, ref_inv = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    assert uniq.dtype == ref_uniq.dtype and inv.dtype == ref_inv.dtype
    np.testing.assert_array_equal(uniq, ref_uniq)
    np.testing.assert_array_equal(inv, ref_inv)
    np.testing.assert_array_equal(uniq[inv], np.asarray(values, dtype=object).astype(str))


def test_unique_str_on_many_ids():
    rng = np.random.default_rng(0)
    cells = np.array([f"s{s:04d}-{k}" for s in range(300) for k in range(3)], dtype=object)
    ids = cells[rng.integers(0, len(cells), 50_000)]
    uniq, inv = T.unique_str(ids)
    ref_uniq, ref_inv = np.unique(ids.astype(str), return_inverse=True)
    np.testing.assert_array_equal(uniq, ref_uniq)
    np.testing.assert_array_equal(inv, ref_inv)
