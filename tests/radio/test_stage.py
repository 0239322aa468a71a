"""Radio stage end to end on a tiny lake: Ray actors, weights on disk, RadioModels round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth.schemas import cell_shard_of


def _tiny_lake(lake, n_shards: int = 2):
    rng = np.random.default_rng(0)
    sites = {"A": (0.0, 0.0), "B": (1500.0, 0.0), "C": (0.0, 1500.0)}
    cells = pd.DataFrame([{"cell_id": c, "site_id": c, "x_m": x, "y_m": y, "lat": 0.0, "lon": 0.0, "location_estimated": False,
                           "cell_shard": cell_shard_of(c, n_shards), "frame_lat0": 0.0, "frame_lon0": 0.0}
                          for c, (x, y) in sites.items()])
    lake.write("cells", cells, mode="overwrite")
    rows = []
    n_by_cell = {"A": 400, "B": 300, "C": 20}  # C has too few measurements: pooled fallback
    for c, n in n_by_cell.items():
        sx, sy = sites[c]
        xy = rng.uniform(-600, 600, (n, 2)) + np.array([sx, sy])
        d_km = np.maximum(np.hypot(xy[:, 0] - sx, xy[:, 1] - sy), 10) / 1000
        rho = rng.uniform(0.1, 0.9, n)
        for i in range(n):
            rows.append({"report_id": f"{c}{i}", "ts": pd.Timestamp("2026-01-05T08:00:00Z"), "window": "h06_12",
                         "cell_id": c, "role": "serving", "rank": 0,
                         "rsrp_dbm": -75 - 35 * np.log10(d_km[i]) + 3 * rng.standard_normal(),
                         "rsrq_db": -8 - 4 * rho[i] + rng.standard_normal(), "x_m": xy[i, 0], "y_m": xy[i, 1],
                         "load_rho": rho[i], "cell_shard": cell_shard_of(c, n_shards)})
    lake.write("mdt_measurements", pd.DataFrame(rows), mode="overwrite")
    return sites


@pytest.mark.slow
def test_stage_trains_commits_and_reloads(tmp_path, ray_session):
    from cellsynth_testkit import local_runtime, test_config
    from cellsynth.radio import RadioModels, stage

    cfg = test_config(tmp_path, radio={"n_steps": 300})
    rt = local_runtime(tmp_path, cfg)
    sites = _tiny_lake(rt.lake)
    res = stage.run(cfg, rt, run_id="r1")
    table = rt.lake.read_pandas("radio_models")
    assert sorted(table.loc[~table.pooled & (table.target == "rsrp"), "cell_id"]) == ["A", "B"]
    assert table.loc[table.cell_id == "C", "pooled"].all()
    assert (table["source_version"] == rt.lake.version("mdt_measurements")).all()
    assert res.rows_written["radio_models"] == len(table) == 6
    # a rerun with the same run_id commits nothing new
    again = stage.run(cfg, rt, run_id="r1")
    assert again.skipped and rt.lake.version("radio_models") == res.table_versions["radio_models"]

    models = RadioModels.load(rt.lake)
    assert models.cells("rsrp") == ["A", "B"]
    xy = np.array([[500.0, 0.0], [1500.0, 400.0], [0.0, 1900.0]])
    pred = models.predict("rsrp", np.array(["A", "B", "C"]), xy)
    truth = -75 - 35 * np.log10(np.array([0.5, 0.4, 0.4]))
    assert np.all(np.abs(pred.mean - truth) < 3.0)
    assert pred.pooled.tolist() == [False, False, True]
    rsrq = models.predict("rsrq", np.array(["A", "A"]), xy[:2] * 0 + 300.0, load_rho=np.array([0.1, 0.9]))
    assert rsrq.mean[0] > rsrq.mean[1]  # RSRQ falls with load
    assert (tmp_path / "lake" / "models" / "radio" / "r1" / "rsrp").is_dir()


def test_job_smoke(tmp_path, ray_session, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("radio_job", Path(__file__).resolve().parents[2] / "jobs" / "radio.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    # no input tables: the job reports one error line and exits 1
    assert job.main(["--set", f"run.lake_root={tmp_path / 'lake'}", "--quiet"]) == 1


def test_pooled_model_trains_in_the_cells_batch_like_alone(tmp_path):
    """The pooled fallback is one more cell of the shard's batch (its own fit and calibration)."""
    import torch

    from cellsynth.config import RadioConfig
    from cellsynth.lake import Lake
    from cellsynth.radio import stage

    torch.set_num_threads(1)
    lake = Lake(tmp_path / "lake")
    sites = {c: (x, y, float("nan")) for c, (x, y) in _tiny_lake(lake).items()}
    df = lake.read_pandas("mdt_measurements").reset_index(drop=True)
    rcfg = RadioConfig()
    rows = stage._train_shards(df, sites, rcfg, weights_root=tmp_path / "w", test_fraction=0.35, seed=0, run_id="r",
                               source_version=0, device="cpu", targets=("rsrp",))
    by_cell = {r["cell_id"]: r for r in rows}
    assert sorted(by_cell) == ["A", "B", "C"]
    assert by_cell["C"]["pooled"] and not by_cell["A"]["pooled"]
    # pooled validation MAE: 3 dB noise, E|N(0, 3)| = 2.4 dB
    assert by_cell["C"]["val_mae"] < 3.5
    # and the weights it wrote predict the pooled cell's site-relative field
    from cellsynth.radio.model import FittedCells

    pooled = FittedCells.load(tmp_path / "w" / by_cell["C"]["path"])
    near, far = pooled.predict(np.zeros(2, dtype=int), np.array([[100.0, 0.0], [500.0, 0.0]])).mean
    assert near - far == pytest.approx(35.0 * np.log10(5.0), abs=3.0)


def test_posterior_raster_written_with_the_weights(tmp_path):
    """radio.posterior_raster: each shard file gets its cells' rasters, which predict like the exact GP."""
    import torch

    from cellsynth.config import RadioConfig
    from cellsynth.lake import Lake
    from cellsynth.radio import raster, stage
    from cellsynth.radio.model import FittedCells

    torch.set_num_threads(1)
    lake = Lake(tmp_path / "lake")
    sites = {c: (x, y, float("nan")) for c, (x, y) in _tiny_lake(lake).items()}
    df = lake.read_pandas("mdt_measurements").reset_index(drop=True)
    rows = stage._train_shards(df, sites, RadioConfig(posterior_raster=True), weights_root=tmp_path / "w", test_fraction=0.35,
                               seed=0, run_id="r", source_version=0, device="cpu", targets=("rsrp",))
    own = [r for r in rows if not r["pooled"]]
    assert own
    for r in own:
        fitted = FittedCells.load(tmp_path / "w" / r["path"])
        i = fitted.cell_ids.index(r["cell_id"])
        assert (tmp_path / "w" / (r["path"] + raster.SUFFIX + ".safetensors")).is_file()
        assert i in fitted.rasters
        site = np.array(sites[r["cell_id"]][:2])
        xy = site + np.random.default_rng(1).uniform(-500, 500, (300, 2))
        got = fitted.predict(np.full(len(xy), i), xy)
        fitted.rasters = {}
        exact = fitted.predict(np.full(len(xy), i), xy)
        assert np.abs(got.mean - exact.mean).max() < 0.05 * 2
        assert np.abs(got.epistemic_std - exact.epistemic_std).max() < 0.05 * 3  # calibration factors up to ~3


def test_shard_training_releases_each_cells_factor_after_its_validation(tmp_path, monkeypatch):
    """The per-cell validation prediction caches a Cholesky factor (~n^2 floats); a shard's training drops it
    cell by cell, so an actor's memory does not grow with the cells of its shard (issue 15: ~6.7 GB per radio
    actor at 375 cells a shard). The forests (~150 KB a cell) are kept: they are saved with the weights."""
    import torch

    from cellsynth.config import RadioConfig
    from cellsynth.lake import Lake
    from cellsynth.radio import stage

    torch.set_num_threads(1)
    lake = Lake(tmp_path / "lake")
    sites = {c: (x, y, float("nan")) for c, (x, y) in _tiny_lake(lake, n_shards=1).items()}
    df = lake.read_pandas("mdt_measurements").reset_index(drop=True)
    cached, row = [], stage._row

    def spy(cell_id, target, fitted, i, *args, **kwargs):
        out = row(cell_id, target, fitted, i, *args, **kwargs)
        if not args[2]:  # own model (not the pooled fallback)
            with_forest = [j for j, w in enumerate(fitted.arrays.get("tree_w", [])) if w > 0]
            cached.append((cell_id, sorted(fitted._solved), sorted(fitted._forests), with_forest))
        return out

    monkeypatch.setattr(stage, "_row", spy)
    stage._train_shards(df, sites, RadioConfig(posterior_raster=False), weights_root=tmp_path / "w", test_fraction=0.35,
                        seed=0, run_id="r", source_version=0, device="cpu", targets=("rsrp",))
    assert [c[0] for c in cached] == ["A", "B"]  # both own cells share the one shard
    # after its row only the cell itself is cached (it predicted), never an earlier cell's factorisation
    assert cached[0][1] == [0] and cached[1][1] == [1]
    # the forests (saved with the weights) stay: every cell whose mean uses one, no other
    assert cached[0][2] == cached[1][2] == cached[1][3]


def _one_shard(cells: list[tuple[str, int, tuple[float, float]]], seed: int = 3) -> tuple[pd.DataFrame, dict]:
    """Serving rows of (cell, rows, site) cells in shard 0 around their sites (log-distance plus a ripple), and
    the sites as `_train_shards` takes them."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, n, (sx, sy) in cells:
        xy = rng.uniform(-600, 600, (n, 2)) + np.array([sx, sy])
        d_km = np.maximum(np.hypot(xy[:, 0] - sx, xy[:, 1] - sy), 10) / 1000
        rsrp = -75 - 35 * np.log10(d_km) + 4 * np.sin(xy[:, 0] / 120) + 2 * rng.standard_normal(n)
        rows += [{"report_id": f"{c}{i}", "cell_id": c, "role": "serving", "rsrp_dbm": rsrp[i], "rsrq_db": -10.0,
                  "x_m": xy[i, 0], "y_m": xy[i, 1], "load_rho": 0.5, "cell_shard": 0} for i in range(n)]
    return pd.DataFrame(rows), {c: (sx, sy, float("nan")) for c, _, (sx, sy) in cells}


def test_an_incremental_retrain_fits_a_cell_as_a_full_retrain_does_with_the_shards_calibration(tmp_path):
    """A retrained cell takes the seed its shard's full batch takes (a kept cell comes first) and the shard's
    calibration from its last fit: its own fit and its calibration equal a full retrain's of the same rows."""
    import torch

    from cellsynth.config import RadioConfig
    from cellsynth.radio import stage
    from cellsynth.radio.model import FittedCells, shard_calibration

    torch.set_num_threads(1)
    df, sites = _one_shard([("A", 250, (0.0, 0.0)), ("B", 1000, (1200.0, 0.0))])  # B: more rows than the hyper fit's 500
    kw = {"test_fraction": 0.35, "seed": 0, "source_version": 0, "device": "cpu", "targets": ("rsrp",)}
    stage._train_shards(df, sites, RadioConfig(), weights_root=tmp_path / "full", run_id="full", **kw)
    full = FittedCells.load(tmp_path / "full" / "models" / "radio" / "full" / "rsrp" / "shard=0")
    calib = shard_calibration(full)
    assert calib is not None
    # incremental: the shard's rows whole, only B fitted
    stage._train_shards(df, sites, RadioConfig(), weights_root=tmp_path / "inc", run_id="inc",
                        calibrations={"rsrp/0": calib}, retrain={"B"}, **kw)
    only_b = df[df.cell_id == "B"].reset_index(drop=True)
    stage._train_shards(only_b, sites, RadioConfig(), weights_root=tmp_path / "own", run_id="own", **kw)
    inc = FittedCells.load(tmp_path / "inc" / "models" / "radio" / "inc" / "rsrp" / "shard=0")
    own = FittedCells.load(tmp_path / "own" / "models" / "radio" / "own" / "rsrp" / "shard=0")
    b = full.index_of(np.array(["B"]))[0]
    assert inc.cell_ids == ["B"] and own.cell_ids == ["B"]
    assert inc.arrays["tree_seed"][0] == full.arrays["tree_seed"][b]
    np.testing.assert_allclose(inc.arrays["theta"][0], full.arrays["theta"][b], rtol=1e-9)
    np.testing.assert_array_equal(inc.arrays["knn_k"][0], full.arrays["knn_k"][b])
    for k in ("scale", "ep_scale", "blend_w", "dof"):
        np.testing.assert_array_equal(inc.arrays[k][0], full.arrays[k][b])
    # B retrained as the first cell of its own batch: another seed (another forest and hyperparameter subsample),
    # and the lone cell's calibration
    assert own.arrays["tree_seed"][0] != full.arrays["tree_seed"][b]
    assert not np.array_equal(own.arrays["scale"][0], full.arrays["scale"][b])


def test_an_incremental_retrain_of_a_cell_with_few_rows_fits_the_pooled_fallback_a_full_run_fits(tmp_path):
    """The pooled fallback pools the whole shard's rows and takes its batch seed in an incremental run too
    (before, it pooled only the retrained cells' rows: a lone few-row cell got a model of its own 13 rows)."""
    import torch

    from cellsynth.config import RadioConfig
    from cellsynth.radio import stage
    from cellsynth.radio.model import FittedCells, shard_calibration

    torch.set_num_threads(1)
    df, sites = _one_shard([("A", 250, (0.0, 0.0)), ("B", 400, (1200.0, 0.0)), ("C", 20, (0.0, 1500.0)),
                            ("D", 15, (900.0, 900.0))])  # C and D under min_measurements
    kw = {"test_fraction": 0.35, "seed": 0, "source_version": 0, "device": "cpu", "targets": ("rsrp",)}
    full_rows = stage._train_shards(df, sites, RadioConfig(), weights_root=tmp_path / "full", run_id="full", **kw)
    calib = shard_calibration(FittedCells.load(tmp_path / "full" / "models" / "radio" / "full" / "rsrp" / "shard=0"))
    inc_rows = stage._train_shards(df, sites, RadioConfig(), weights_root=tmp_path / "inc", run_id="inc",
                                   calibrations={"rsrp/0": calib}, retrain={"C"}, **kw)
    assert [(r["cell_id"], r["pooled"]) for r in inc_rows] == [("C", True)]
    full_c = next(r for r in full_rows if r["cell_id"] == "C")
    assert full_c["pooled"] and inc_rows[0]["val_mae"] == pytest.approx(full_c["val_mae"], rel=1e-9)
    full = FittedCells.load(tmp_path / "full" / "models" / "radio" / "full" / "rsrp" / "pooled=0")
    inc = FittedCells.load(tmp_path / "inc" / "models" / "radio" / "inc" / "rsrp" / "pooled=0")
    assert len(inc.arrays["train_y"][0]) == len(full.arrays["train_y"][0]) > 400  # every cell's training rows
    for k in ("theta", "beta0", "scale", "ep_scale", "knn_k"):
        np.testing.assert_allclose(inc.arrays[k], full.arrays[k], rtol=1e-9)


def test_rsrq_without_any_load_is_modelled_from_position(tmp_path):
    """Drive tests without traffic counters (no load on any row, as UCC's) still get RSRQ models: from
    position alone, the load ignored when predicting; with a load in the table the old form holds."""
    import torch

    from cellsynth.config import RadioConfig
    from cellsynth.lake import Lake
    from cellsynth.radio import stage
    from cellsynth.radio.model import FittedCells
    from cellsynth.radio.transforms import rsrq_uses_load, training_rows

    torch.set_num_threads(1)
    lake = Lake(tmp_path / "lake")
    sites = {c: (x, y, float("nan")) for c, (x, y) in _tiny_lake(lake).items()}
    assert stage.has_load(lake, lake.version("mdt_measurements"))
    df = lake.read_pandas("mdt_measurements").reset_index(drop=True)
    df["load_rho"] = np.nan
    lake.write("mdt_measurements", df, mode="overwrite")
    assert not stage.has_load(lake, lake.version("mdt_measurements"))
    assert not rsrq_uses_load(df["load_rho"]) and rsrq_uses_load(pd.Series([np.nan, 0.3]))
    assert training_rows(df, "rsrq").empty  # the load form has nothing to learn from here
    assert len(training_rows(df, "rsrq", rsrq_load=False)) == len(df)
    rows = stage._train_shards(df, sites, RadioConfig(), weights_root=tmp_path / "w", test_fraction=0.35, seed=0,
                               run_id="r", source_version=0, device="cpu", targets=("rsrq",), rsrq_load=False)
    by_cell = {r["cell_id"]: r for r in rows}
    assert sorted(by_cell) == ["A", "B", "C"] and by_cell["C"]["pooled"]
    # RSRQ = -8 - 4 rho + N(0, 1) with rho ~ U(0.1, 0.9) unseen: sd about 1.4 dB, E|error| about 1.1 dB
    assert 0.7 < by_cell["A"]["val_mae"] < 1.6
    fitted = FittedCells.load(tmp_path / "w" / by_cell["A"]["path"])
    assert not fitted.settings.uses_load
    i = fitted.cell_ids.index("A")
    xy = np.array([[100.0, 50.0], [-300.0, 200.0]])
    p0 = fitted.predict(np.full(2, i), xy)
    p1 = fitted.predict(np.full(2, i), xy, np.array([0.1, 0.9]))
    np.testing.assert_allclose(p0.mean, p1.mean)
    np.testing.assert_allclose(p0.mean, -10.0, atol=1.0)  # -8 - 4 E[rho]
    pooled = FittedCells.load(tmp_path / "w" / by_cell["C"]["path"])
    assert not pooled.settings.uses_load and np.isfinite(pooled.predict(np.zeros(1, dtype=int), xy[:1]).mean).all()
