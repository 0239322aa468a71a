from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _generate_fakes import CELLS, FakeDensity, FakeRadio, fake_radio_factory

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.errors import ConfigError
from cellsynth.generate import stage
from cellsynth.generate import transforms as T
from cellsynth.geo import LocalFrame
from cellsynth.schemas import cell_shard_of


def _run(rt, run_id="r1", **kwargs):
    args = dict(density=FakeDensity({"h00_06": 300, "h06_12": 200}), radio=FakeRadio(), radio_factory=fake_radio_factory,
                cells=CELLS, observed_loads=None, synthetic_traffic=None)
    args.update(kwargs)
    return stage.generate(rt.cfg, rt, run_id=run_id, **args)


def _cfg(tmp_path, **generate):
    base = {"use_ray": False, "load_scenario": "fixed", "load_rho": 0.25, "n_neighbours": 2, "multiple": 2.0}
    base.update(generate)
    return make_config(tmp_path, generate=base)


def test_generate_writes_partitioned_rows_with_neighbours_and_latlon(tmp_path):
    rt = local_runtime(tmp_path, _cfg(tmp_path))
    result = _run(rt)
    df = rt.lake.read_pandas("synthetic_mdt")
    assert result.rows_written["synthetic_mdt"] == len(df) == 2 * (300 + 200)
    assert df.groupby("window").size().to_dict() == {"h00_06": 600, "h06_12": 400}
    assert (df["cell_shard"] == [cell_shard_of(c, 8) for c in df["serving_cell_id"]]).all()
    assert {"neighbour_2_cell_id", "neighbour_2_rsrp_dbm_aleatoric_std"} <= set(df.columns)
    assert not (df["neighbour_1_cell_id"] == df["serving_cell_id"]).any()
    np.testing.assert_allclose(df["load_rho"], 0.25)
    np.testing.assert_allclose(df["rsrq_db_aleatoric_std"], 2.0)
    lat, lon = LocalFrame(44.4949, 11.3426).to_latlon(df["x_m"].to_numpy(), df["y_m"].to_numpy())
    np.testing.assert_allclose(df["lat"], lat)
    assert set(df["scenario"]) == {"fixed"} and set(df["run_id"]) == {"r1"}
    # reliable = epistemic below radio.epistemic_threshold_db (3 dB by default).
    assert (df["reliable"] == (df["rsrp_dbm_epistemic_std"] < 3.0)).all()


def test_values_keep_to_the_configured_ingest_ranges(tmp_path):
    # FakeRadio: RSRQ mean -9.5 dB at load 0.25, std over 2 dB, so about half the draws fall
    # below a -9.5 dB floor: they are written at it and flagged
    cfg = make_config(tmp_path, generate=_cfg(tmp_path).generate.model_dump(),
                      ingest={"rsrq_range_db": (-9.5, -3.0), "rsrp_range_dbm": (-100.0, -44.0)})
    rt = local_runtime(tmp_path, cfg)
    _run(rt)
    df = rt.lake.read_pandas("synthetic_mdt")
    assert df["rsrq_db"].between(-9.5, -3.0).all() and df["rsrp_dbm"].between(-100.0, -44.0).all()
    assert df["neighbour_1_rsrp_dbm"].dropna().between(-100.0, -44.0).all()
    floor = df["rsrq_db"] == -9.5
    assert 0.3 < floor.mean() < 0.7
    at_bound = df["rsrq_db"].isin([-9.5, -3.0]) | df["rsrp_dbm"].isin([-100.0, -44.0])
    assert at_bound[df["clipped"]].all()
    assert df["clipped"].mean() > 0.25


def test_rerun_same_seed_gives_same_rows_and_new_seed_differs(tmp_path):
    rt = local_runtime(tmp_path, _cfg(tmp_path))
    _run(rt, run_id="r1")
    first = rt.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    _run(rt, run_id="r2")
    second = rt.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, second)
    rt2 = local_runtime(tmp_path / "other", _cfg(tmp_path / "other").model_copy(update={"run": _cfg(tmp_path).run.model_copy(update={"seed": 7, "lake_root": str(tmp_path / "other" / "lake")})}))
    _run(rt2, run_id="r3")
    third = rt2.lake.read_pandas("synthetic_mdt").sort_values("sample_id").reset_index(drop=True)
    assert not np.allclose(first["x_m"], third["x_m"])


def test_same_run_id_commits_once(tmp_path):
    rt = local_runtime(tmp_path, _cfg(tmp_path))
    _run(rt, run_id="same")
    v = rt.lake.version("synthetic_mdt")
    _run(rt, run_id="same")
    assert rt.lake.version("synthetic_mdt") == v


def test_bad_requests_are_config_errors(tmp_path):
    rt = local_runtime(tmp_path, _cfg(tmp_path, windows=["h12_18"]))
    with pytest.raises(ConfigError, match=r"generate\.windows: unknown window 'h12_18'"):
        _run(rt)
    rt = local_runtime(tmp_path, _cfg(tmp_path, n_neighbours=4))
    with pytest.raises(ConfigError, match=r"generate\.n_neighbours"):
        _run(rt)
    rt = local_runtime(tmp_path, _cfg(tmp_path, load_scenario="synthetic_traffic"))
    with pytest.raises(ConfigError, match=r"generate\.load_scenario: 'synthetic_traffic'"):
        _run(rt)
    assert not rt.lake.exists("synthetic_mdt")


def test_observed_load_scenario_without_any_load_generates_at_the_fixed_load(tmp_path):
    """Drive tests without traffic counters under the default scenario ("observed"): no report has a load,
    so the rows are generated at generate.load_rho and say "fixed" (before: a ConfigError once every
    model was trained, telling the user to change the config)."""
    no_load = pd.DataFrame({"window": ["h00_06"], "serving_cell_id": ["A"], "load_rho": [np.nan]})
    rt = local_runtime(tmp_path, _cfg(tmp_path, load_scenario="observed"))
    res = _run(rt, observed_loads=no_load)
    rows = rt.lake.read_pandas("synthetic_mdt")
    assert len(rows) and (rows["scenario"] == "fixed").all() and np.allclose(rows["load_rho"], 0.25)
    assert "scenario=fixed at load_rho 0.25 (generate.load_scenario 'observed': no report has a load)" in res.note


@pytest.mark.slow
@pytest.mark.parametrize("tight_store", [False, True], ids=["one_task_per_cpu", "many_small_tasks"])
def test_ray_tasks_give_the_same_rows_as_the_driver(tmp_path, ray_session, monkeypatch, tight_store):
    if tight_store:  # a store too small for any two buckets: every shard its own group, a task per bucket
        monkeypatch.setattr(stage, "TASK_ARGS_MARGIN", 1e-9)
    rt = local_runtime(tmp_path, _cfg(tmp_path))
    _run(rt, run_id="local")
    local = rt.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    rt_ray = local_runtime(tmp_path / "ray", _cfg(tmp_path / "ray", use_ray=True))
    _run(rt_ray, run_id="ray")
    remote = rt_ray.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(local, remote)


@pytest.mark.slow
def test_detection_maps_fitted_by_a_task_before_the_stage_give_the_driver_rows(tmp_path, ray_session):
    # Issue 15: with Ray, `run` starts the detection-map task before it loads anything and hands
    # generate its reference; the rows are those of the maps fitted on the driver.
    import ray

    rng = np.random.default_rng(3)
    n = 300
    xy = rng.uniform(-200, 2200, size=(n, 2)) * [1.0, 0.2]
    serving = np.array(["A", "B", "C"])[np.clip((xy[:, 0] + 500) // 1000, 0, 2).astype(int)]
    heard = np.where(serving == "B", "A", "B")  # B is heard around A and C, A around B; C never
    meas = pd.DataFrame({
        "cell_id": np.concatenate([serving, heard]), "role": ["serving"] * n + ["neighbour"] * n,
        "x_m": np.concatenate([xy[:, 0], xy[:, 0]]), "y_m": np.concatenate([xy[:, 1], xy[:, 1]]),
    })
    maps = stage._fit_detection(100.0, 1, meas)
    rt = local_runtime(tmp_path, _cfg(tmp_path))
    _run(rt, run_id="local", detection=maps)
    local = rt.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    # the maps thin the neighbours: C is never reported
    assert "C" not in set(local["neighbour_1_cell_id"].dropna()) | set(local["neighbour_2_cell_id"].dropna())
    rt_ray = local_runtime(tmp_path / "ray", _cfg(tmp_path / "ray", use_ray=True))
    ref = ray.remote(num_cpus=1)(stage._fit_detection).remote(100.0, 1, lambda: meas)
    _run(rt_ray, run_id="ray", detection_ref=ref, measurements=lambda: pytest.fail("the rows were read again"))
    remote = rt_ray.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(local, remote)


def _real_density():
    """DensityModels for cells A, B, C of the fakes plus an area density: several tiles."""
    from cellsynth.density import DensityModels, GaussianKDE2D

    rng = np.random.default_rng(11)
    kdes = {c: GaussianKDE2D(bandwidth_m=120.0).fit(np.array([x, 0.0]) + rng.normal(0, 300, size=(n, 2)))
            for c, x, n in (("A", 0.0, 60), ("B", 1000.0, 120), ("C", 2000.0, 90))}
    area = GaussianKDE2D(bandwidth_m=80.0).fit(np.vstack([k.positions_ for k in kdes.values()]))
    windows = ("h00_06", "h06_12")
    return DensityModels.from_kdes({w: kdes for w in windows}, area={w: area for w in windows})


def test_tiles_give_every_window_its_rows_each_with_its_map_serving_cell(tmp_path):
    rt = local_runtime(tmp_path, _cfg(tmp_path, rows_per_tile=150))
    density = _real_density()
    result = _run(rt, density=density)
    df = rt.lake.read_pandas("synthetic_mdt")
    assert result.rows_written["synthetic_mdt"] == len(df) == 2 * 2 * 270  # multiple 2, 270 reports, 2 windows
    assert df["sample_id"].is_unique
    # "syn-<window>-<shard>-<tile>-<draw>": 540 rows / 150 per tile gives 4 tiles per window
    tiles = df["sample_id"].str.extract(r"^syn-(.+)-\d{4}-(\d{4})-\d{8}$")
    assert tiles.notna().all().all()
    assert len(tiles.drop_duplicates()) >= 4 * 2
    for w, part in df.groupby("window"):
        np.testing.assert_array_equal(part["serving_cell_id"].to_numpy(dtype=object),
                                      density.associate_dense(w, part[["x_m", "y_m"]].to_numpy()))
    # the same plan and seeds again: the same rows
    _run(rt, run_id="again", density=_real_density())
    again = rt.lake.read_pandas("synthetic_mdt")
    cols = ["sample_id", "x_m", "y_m", "serving_cell_id", "rsrp_dbm"]
    pd.testing.assert_frame_equal(df.sort_values("sample_id")[cols].reset_index(drop=True),
                                  again.sort_values("sample_id")[cols].reset_index(drop=True))


@pytest.mark.slow
def test_tile_and_shard_tasks_on_ray_give_the_driver_rows_with_real_density(tmp_path, ray_session):
    rt = local_runtime(tmp_path, _cfg(tmp_path, rows_per_tile=150))
    _run(rt, run_id="local", density=_real_density())
    local = rt.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    rt_ray = local_runtime(tmp_path / "ray", _cfg(tmp_path / "ray", use_ray=True, rows_per_tile=150))
    _run(rt_ray, run_id="ray", density=_real_density())
    remote = rt_ray.lake.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    assert len(local) == 2 * 2 * 270
    pd.testing.assert_frame_equal(local, remote)


def test_held_in_rows_read_by_partition_equal_the_whole_table_split(tmp_path):
    # Issue 15: the driver reads the detection maps' rows one window at a time, ids as categories;
    # the rows are the held-in rows of the whole table, as before.
    from cellsynth.splits import held_out as split_held_out

    rt = local_runtime(tmp_path, _cfg(tmp_path))
    rng = np.random.default_rng(0)
    n = 400
    windows = np.array(["h00_06", "h06_12", "h12_18"])[rng.integers(0, 3, n)]
    reports = pd.DataFrame({
        "report_id": [f"rep{i:04d}" for i in range(n)], "ue_id": "u", "ts": pd.Timestamp("2024-01-01", tz="UTC"),
        "window": windows, "x_m": rng.uniform(0, 1000, n), "y_m": rng.uniform(0, 1000, n),
        "serving_cell_id": [f"c{i}" for i in rng.integers(0, 6, n)], "rsrp_dbm": -90.0, "rsrq_db": -10.0,
        "load_rho": 0.3, "ingest_run_id": "i1",
    })
    reports["cell_shard"] = [cell_shard_of(c, 8) for c in reports["serving_cell_id"]]
    meas = pd.concat([
        reports.assign(cell_id=reports["serving_cell_id"], role="serving", rank=0),
        reports.assign(cell_id=[f"c{i}" for i in rng.integers(0, 6, n)], role="neighbour", rank=1),
    ], ignore_index=True)
    meas["cell_shard"] = [cell_shard_of(c, 8) for c in meas["cell_id"]]
    rt.lake.write("mdt_reports", reports)
    rt.lake.write("mdt_measurements", meas[["report_id", "ts", "window", "cell_id", "role", "rank", "rsrp_dbm", "rsrq_db",
                                            "x_m", "y_m", "load_rho", "cell_shard"]])
    from cellsynth.lake.partitions import partition_filters, window_filters

    assert len(partition_filters(rt.lake, "mdt_measurements")) > 3  # read partition by partition
    assert len(window_filters(rt.lake, "mdt_reports")) == 3
    got = stage._held_in_measurements(rt.lake, rt.cfg)
    whole = rt.lake.read_pandas("mdt_measurements", columns=["report_id", "cell_id", "role", "x_m", "y_m"])
    want = whole[~split_held_out(rt.cfg, whole["report_id"].to_numpy())]
    assert 0 < len(got) < len(whole)
    key = ["cell_id", "role", "x_m", "y_m"]
    a = got.astype({"cell_id": object, "role": object}).sort_values(key).reset_index(drop=True)
    b = want[key].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)

    # the observed loads, read a window at a time, give the load table of the whole table's split
    reports["load_rho"] = rng.uniform(0, 1, n)
    rt.lake.write("mdt_reports", reports, mode="overwrite")
    from cellsynth.splits import stable_order

    loads = stage._observed_loads(rt.lake, rt.cfg)
    every = stable_order(rt.lake.read_pandas("mdt_reports", columns=["report_id", "window", "serving_cell_id", "load_rho"]))
    every = every[~split_held_out(rt.cfg, every["report_id"].to_numpy())]
    assert len(loads) == len(every) < n
    for scenario in ("observed", "quantile"):
        pd.testing.assert_frame_equal(T.cell_loads(scenario, observed=loads), T.cell_loads(scenario, observed=every))


def test_prediction_tasks_fit_the_object_store_share_and_cover_every_bucket_once():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "object_store_memory": 512 * 2**20}},
             {"Alive": True, "Resources": {"CPU": 4.0, "object_store_memory": 512 * 2**20}},
             {"Alive": False, "Resources": {"CPU": 64.0, "object_store_memory": 2**20}}]
    budget = stage._task_args_budget_bytes(nodes)
    # the node with the least store per CPU sets it; a dead node does not
    assert budget == pytest.approx(stage.RAY_TASK_ARGS_FRACTION * stage.TASK_ARGS_MARGIN * 128 * 2**20)
    assert stage._task_args_budget_bytes([{"Resources": {"CPU": 2.0}}]) == float("inf")

    sizes = np.zeros(64)
    sizes[:40] = np.linspace(1, 40, 40) * 2**20  # 820 MB of requests in 40 buckets
    tasks = stage._pack_buckets(sizes, n_cpus=2, budget_bytes=100 * 2**20)
    assert sorted(b for t in tasks for b in t) == list(range(40))  # every non-empty bucket, once
    assert len(tasks) == 9  # ceil(820 / 100), more than the 2 CPUs
    loads = [sizes[t].sum() / 2**20 for t in tasks]
    assert max(loads) <= 100 and max(loads) - min(loads) <= 40  # largest-first onto the lightest
    # a roomy store still gives every CPU a task; never more tasks than non-empty buckets
    assert len(stage._pack_buckets(sizes, n_cpus=2, budget_bytes=float("inf"))) == 2
    assert len(stage._pack_buckets(sizes[:3], n_cpus=8, budget_bytes=1.0)) == 3
    assert stage._pack_buckets(np.zeros(8), n_cpus=2, budget_bytes=1.0) == []


def test_shard_groups_grow_with_the_planned_rows_up_to_the_shards():
    per_row = stage.REPLAY_ARG_BYTES_PER_ROW
    assert stage._n_groups(1000, n_cpus=2, budget_bytes=100 * 2**20, n_shards=8) == 2
    assert stage._n_groups(int(500 * 2**20 / per_row), n_cpus=2, budget_bytes=100 * 2**20, n_shards=8) == 5
    assert stage._n_groups(10**9, n_cpus=2, budget_bytes=100 * 2**20, n_shards=8) == 8
    assert stage._n_groups(10**9, n_cpus=2, budget_bytes=float("inf"), n_shards=8) == 2
    assert stage._n_groups(10, n_cpus=4, budget_bytes=1.0, n_shards=1) == 1


def test_rows_by_bucket_keep_row_order_within_each_bucket():
    bucket = np.array([3, 0, 3, 1, 0, 3])
    got = T.rows_by_layer(bucket, 5)
    assert [g.tolist() for g in got] == [[1, 4], [3], [], [0, 2, 5], []]


def test_serving_only_measurements_generate_the_serving_cell_only(tmp_path, monkeypatch):
    # UCC's serving-only logs through the default n_neighbours (4): the detection maps learned from them
    # report no neighbour anywhere, so synthetic_mdt carried 12 neighbour columns that were all null.
    from cellsynth.stages import StageResult

    rt = local_runtime(tmp_path, _cfg(tmp_path, n_neighbours=3))
    n = 40
    meas = pd.DataFrame({"report_id": [f"r{i}" for i in range(n)], "ts": pd.Timestamp("2026-01-05 08:00", tz="UTC"),
                         "window": "h06_12", "cell_id": "c1", "role": "serving", "rank": 0, "rsrp_dbm": -90.0,
                         "rsrq_db": -10.0, "x_m": np.arange(n, dtype=float), "y_m": 0.0, "load_rho": np.nan,
                         "cell_shard": 0})
    seen = []
    monkeypatch.setattr(stage, "_run", lambda cfg, rt, **kw: (seen.append(cfg.generate), StageResult(stage="generate", run_id="r",
                                                                                                       note="2 windows"))[1])
    assert stage._reports_neighbours(rt.lake)  # no table: cannot tell, the config stands
    rt.lake.write("mdt_measurements", meas)
    assert not stage._reports_neighbours(rt.lake)
    result = stage.run(rt.cfg, rt, run_id="r")
    assert seen[-1].n_neighbours == 0 and result.note.startswith("2 windows; no neighbour measurements")
    # neighbour_detection off predicts neighbours from the models, measured or not: the config stands
    off = rt.cfg.model_copy(update={"generate": rt.cfg.generate.model_copy(update={"neighbour_detection": False})})
    assert stage.run(off, rt, run_id="r").note == "2 windows" and seen[-1].n_neighbours == 3
    rt.lake.write("mdt_measurements", meas.assign(report_id="q0", role="neighbour", rank=1, cell_id="c2", rsrq_db=np.nan).head(1))
    assert stage._reports_neighbours(rt.lake)
    assert stage.run(rt.cfg, rt, run_id="r").note == "2 windows" and seen[-1].n_neighbours == 3
