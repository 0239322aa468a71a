"""The LTE hourly traffic set (counters only: no MDT, no site table) through `run` with the example
config. Skips when shared/data is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_lte_traffic_example_trains_the_traffic_model_and_reports(tmp_path, spark, ray_session):
    from conftest import shared_data

    from cellsynth import pipeline
    from cellsynth_testkit import local_runtime
    from cellsynth.config import load_config

    csv = shared_data("lte-cell-hourly-traffic", "lte_cells_hourly_traffic_merged.csv")
    example = Path(__file__).resolve().parents[2] / "conf" / "examples" / "lte-traffic.yaml"
    cfg = load_config(example, [
        f"run.lake_root={tmp_path / 'lake'}", f"run.data_dir={tmp_path / 'data'}", f"sources.traffic.path={csv}",
        "runtime.spark.master=local[2]", "runtime.ray.num_cpus=2", "traffic.n_steps=100",
    ])
    rt = local_runtime(tmp_path, cfg, spark=spark)
    try:
        _, results = pipeline.run_pipeline(rt)
        assert [r.stage for r in results] == ["ingest", "traffic", "report"]
        counters = rt.lake.read_pandas("traffic", columns=["cell_id", "traffic_mb"])
        synth = rt.lake.read_pandas("synthetic_traffic")
        assert set(synth["cell_id"]) == set(counters["cell_id"]) and len(set(counters["cell_id"])) == 5
        # one model for every cell, no context: the synthetic level is the cells' level, not any one cell's
        real_mean, synth_mean = counters["traffic_mb"].mean(), synth["traffic_mb"].mean()
        assert 0.5 * real_mean < synth_mean < 2.0 * real_mean, (real_mean, synth_mean)
        metrics = rt.lake.read_pandas("metrics")
        assert {"diffusion", "hour_of_week_mean"} <= set(metrics["model"].dropna())
        report = Path(results[2].artifacts["report"]).read_text()
        assert "traffic JSD" in report and "no MDT reports in this lake" in report
    finally:
        rt.close()
