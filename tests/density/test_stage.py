import os

import numpy as np
import pandas as pd
import pytest

from ._density_synth import cells_table, layout, reports
from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_test_config
from cellsynth.density import DensityModels
from cellsynth.density import stage as density_stage
from cellsynth.schemas import AREA_CELL_ID
from cellsynth.splits import random_test_mask


def _lake_with_inputs(tmp_path, truth=True):
    cfg = make_test_config(
        tmp_path,
        ingest={"n_cell_shards": 4, "windows": {"kind": "hour_of_day", "hours_per_window": 6}},
        density={"student_epochs": 20, "student_patch_px": 16, "bandwidth_grid_m": [50.0, 100.0, 200.0]},
        runtime={"ray": {"num_cpus": 2, "n_actors": 2, "cpus_per_actor": 0.5, "max_restarts": 2, "max_task_retries": 2}},
    )
    rt = local_runtime(tmp_path, cfg)
    cells = layout(4)
    reps = reports(cells, 2500)
    rt.lake.write("cells", cells_table(cells))
    rt.lake.write("mdt_reports", reps)
    if truth:
        # A stand-in ground truth: each (window, cell)'s map of ALL its reports.
        from cellsynth.density._grid import square_of

        t = reps.assign(gx=square_of(reps.x_m, 100.0), gy=square_of(reps.y_m, 100.0))
        t = t.groupby(["window", "serving_cell_id", "gx", "gy"]).size().rename("n").reset_index()
        t["prob"] = t["n"] / t.groupby(["window", "serving_cell_id"])["n"].transform("sum")
        out = tmp_path / "data" / "sim" / "truth"
        out.mkdir(parents=True)
        t.rename(columns={"serving_cell_id": "cell_id"}).to_parquet(out / "spatial_maps.parquet")
    return cfg, rt, reps


@pytest.mark.slow
def test_stage_survives_killed_actor_one_row_per_window_cell(tmp_path, ray_session, monkeypatch):
    cfg, rt, reps = _lake_with_inputs(tmp_path)
    marker = tmp_path / "killed_once"

    class DiesOnce(density_stage._ShardTrainer):
        """The actor dies once after fitting its shards (position files written), before it
        returns them: Ray restarts it and retries the task. Defined here, pickled by value."""

        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return out

    monkeypatch.setattr(density_stage, "_ShardTrainer", DiesOnce)
    monkeypatch.setattr(density_stage, "_STAGE_CELLS", 5)  # site-only maps staged in uneven chunks of cells
    result = density_stage.train(cfg, rt, run_id="r1")
    assert marker.exists()  # an actor really died mid-stage

    kde = rt.lake.read_pandas("kde_models")
    cells_only = kde[kde.cell_id != AREA_CELL_ID]
    assert not cells_only.duplicated(["window", "cell_id"]).any()
    train = reps[~random_test_mask(reps.report_id.to_numpy(), test_fraction=cfg.split.test_fraction, seed=cfg.run.seed)]
    expected = train.groupby(["window", "serving_cell_id"]).size()
    got = cells_only.set_index(["window", "cell_id"])["n_reports"].sort_index()
    expected.index.names = got.index.names
    pd.testing.assert_series_equal(got, expected.sort_index(), check_names=False, check_dtype=False)
    area = kde[kde.cell_id == AREA_CELL_ID].set_index("window")["n_reports"]
    assert area.to_dict() == train.groupby("window").size().to_dict()

    maps = rt.lake.read_pandas("spatial_maps")
    kde_maps = maps[maps.method == "kde"]
    sums = kde_maps.groupby(["window", "cell_id"])["prob"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)
    assert len(sums) == len(cells_only)  # one KDE map per (window, cell), none doubled by the retry
    n_cells = rt.lake.read_pandas("cells")["cell_id"].nunique()
    assert n_cells > 2 * density_stage._STAGE_CELLS
    for method in ("voronoi", "teacher", "student"):
        mine = maps[maps.method == method]
        per_cell = mine.groupby("cell_id")["prob"].sum()
        assert len(per_cell) == n_cells  # every cell's map, from every chunk
        assert not mine.duplicated(["cell_id", "gx", "gy"]).any()
        np.testing.assert_allclose(per_cell.to_numpy(), 1.0, atol=1e-9)

    metrics = rt.lake.read_pandas("metrics")
    names = set(metrics.metric)
    assert {"map_ks", "association_accuracy", "kde_vs_voronoi_ks_gain"} <= names
    acc = metrics[(metrics.metric == "association_accuracy") & metrics.window.isna()].set_index("model")["value"]
    assert 0.3 < acc["kde"] <= 1.0 and 0.3 < acc["nearest_site"] <= 1.0
    assert "kde_vs_voronoi_ks_gain" in result.metrics
    assert {"kde", "kde_ml", "nearest_site"} <= set(acc.index)  # MAP (default) next to eq. 15 and the baseline
    scales = metrics[metrics.metric == "association_bandwidth_scale"]
    assert set(scales["window"]) == set(metrics[metrics.metric == "association_accuracy"]["window"].dropna())
    assert set(scales["value"]) <= set(cfg.density.association_bandwidth_scales)

    # The stored models reload and associate exactly as dense scoring does (MAP with the CV scale, and ML).
    models = DensityModels.load(rt.lake, association_bandwidth_scales=cfg.density.association_bandwidth_scales)
    w = models.windows[0]
    pts = models.sample_positions(w, 300, rng=0)
    np.testing.assert_array_equal(models.associate(w, pts), models.associate_dense(w, pts))
    np.testing.assert_array_equal(models.associate(w, pts, rule="ml"), models.associate_dense(w, pts, rule="ml"))

    # Rerun with the same run_id: nothing written again.
    versions = {t: rt.lake.version(t) for t in density_stage.OUTPUTS}
    again = density_stage.run(cfg, rt, run_id="r1")
    assert again.skipped
    assert {t: rt.lake.version(t) for t in density_stage.OUTPUTS} == versions


@pytest.mark.slow
def test_density_job_smoke(tmp_path, ray_session, capsys):
    import importlib.util
    from pathlib import Path

    import yaml

    cfg, rt, _ = _lake_with_inputs(tmp_path, truth=False)
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    path = Path(__file__).resolve().parents[2] / "jobs" / "density.py"
    spec = importlib.util.spec_from_file_location("density_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(conf), "--run-id", "smoke", "--quiet", "--set", "density.student=false"]) == 0
    assert "density smoke: written=" in capsys.readouterr().out
    kde = rt.lake.read_pandas("kde_models")
    assert set(kde.run_id) == {"smoke"} and len(kde) > 0
    # Without ground truth the KS-vs-truth scores are skipped, association is still scored.
    metrics = rt.lake.read_pandas("metrics")
    assert "association_accuracy" in set(metrics.metric)
    assert "kde_vs_voronoi_ks_gain" not in set(metrics.metric)
