"""UCC 5G drive tests (serving cell only, no site table, no traffic) through every stage with the
example config, on a few driving traces. Skips when shared/data is absent."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
TRACES = "*/Netflix/Driving/*/*.csv"


def test_ucc_example_config_runs_end_to_end(tmp_path, spark, ray_session):
    from conftest import shared_data

    from cellsynth import pipeline
    from cellsynth_testkit import local_runtime
    from cellsynth.config import load_config

    archive = shared_data("ucc-5g", "5G-production-dataset.zip")
    example = Path(__file__).resolve().parents[2] / "conf" / "examples" / "ucc-5g.yaml"
    cfg = load_config(example, [
        f"run.lake_root={tmp_path / 'lake'}", f"run.data_dir={tmp_path / 'data'}", f"sources.mdt.path={archive}",
        f"sources.mdt.archive_glob={TRACES}", "runtime.spark.master=local[2]", "runtime.ray.num_cpus=2",
        "radio.n_steps=300", "density.student_epochs=20", "evaluate.refit_n_steps=50", "evaluate.baselines=[knn]",
        "evaluate.downsampling=[0.9]",
    ])
    rt = local_runtime(tmp_path, cfg, spark=spark)
    try:
        _, results = pipeline.run_pipeline(rt)
        by_stage = {r.stage: r for r in results}
        assert {"ingest", "density", "radio", "generate", "evaluate", "report"} <= set(by_stage)
        syn = rt.lake.read_pandas("synthetic_mdt")
        assert len(syn) > 100
        ev = rt.lake.read_pandas("metrics")
        ev = ev[ev["stage"] == "evaluate"]
        mae = ev[(ev["metric"] == "rsrp_mae_dbm") & (ev["model"] == "bnn")]["value"].iloc[0]
        knn = ev[(ev["metric"] == "rsrp_mae_dbm") & (ev["model"] == "knn")]["value"].iloc[0]
        ratio = ev[(ev["metric"] == "fingerprint_rmse_ratio")]["value"].iloc[0]
        assert math.isfinite(mae) and mae < 15.0
        # no traffic counters, so no load: RSRQ from position alone, scored and synthesized (session 34;
        # before, no RSRQ model and an empty rsrq_db). Real RSRQ there: -12 +- 3 dB.
        rsrq = ev[(ev["metric"] == "rsrq_mae_db") & (ev["model"] == "bnn")]["value"]
        assert len(rsrq) == 1 and 0.5 < rsrq.iloc[0] < 3.0
        assert syn["rsrq_db"].notna().mean() > 0.9 and abs(syn["rsrq_db"].mean() + 12.0) < 2.0
        print(f"\nUCC e2e: reports={by_stage['ingest'].rows_written.get('mdt_reports')} synthetic={len(syn)} "
              f"rsrp_mae_bnn={mae:.2f} knn={knn:.2f} fingerprint_ratio={ratio}")
    finally:
        rt.close()
