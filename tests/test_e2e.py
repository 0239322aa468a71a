"""End to end: simulate -> ingest -> density -> radio -> traffic -> generate -> evaluate -> report on a
small scenario, the way `make run` chains them (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _small_config(tmp_path: Path):
    from cellsynth_testkit import test_config

    return test_config(
        tmp_path,
        scenario={"n_sites": 8, "n_reports": 15_000},
        ingest={"n_cell_shards": 4},
        density={"student_epochs": 20},
        radio={"n_steps": 300},
        traffic={"n_steps": 60, "diffusion_steps": 20, "sampling_steps": 5},
        evaluate={"baselines": ("knn",), "downsampling": (0.9,), "refit_n_steps": 50, "fingerprint_trees": 30,
                  "max_test_rows": 3000, "max_fingerprint_train_rows": 6000, "max_privacy_rows": 3000},
    )


def test_default_pipeline_end_to_end(tmp_path, spark, ray_session):
    from cellsynth import pipeline
    from cellsynth_testkit import local_runtime

    cfg = _small_config(tmp_path)
    rt = local_runtime(tmp_path, cfg, spark=spark)
    try:
        _, results = pipeline.run_pipeline(rt)
        by_stage = {r.stage: r for r in results}
        assert {"ingest", "density", "radio", "generate", "evaluate", "report"} <= set(by_stage)
        syn = rt.lake.read_pandas("synthetic_mdt")
        assert len(syn) == by_stage["generate"].rows_written["synthetic_mdt"] > 1000
        # UE-report realism: the serving cell is the strongest listed, neighbours detected.
        nb = syn[[c for c in syn.columns if c.startswith("neighbour_") and c.endswith("_rsrp_dbm")]].to_numpy(float)
        finite = nb[~(nb != nb)]
        assert (finite >= -124.0).all()
        assert ((nb != nb) | (nb <= syn["rsrp_dbm"].to_numpy()[:, None])).all()
        metrics = rt.lake.read_pandas("metrics")
        ev = metrics[metrics["stage"] == "evaluate"]

        def one(metric, model):
            rows = ev[(ev["metric"] == metric) & (ev["model"] == model)]
            assert len(rows) >= 1, (metric, model)
            return float(rows["value"].iloc[0])

        mae = one("rsrp_mae_dbm", "bnn")
        ratio = one("fingerprint_rmse_ratio", "synthetic_over_real")
        assert math.isfinite(mae) and 0.0 < mae < 15.0
        assert math.isfinite(ratio) and 0.5 < ratio < 3.0
        assert math.isfinite(one("privacy_dcr_ratio", "synthetic_over_holdout"))
        reports = list((Path(cfg.run.lake_root) / "report").rglob("*.html")) + list((Path(cfg.run.lake_root) / "report").rglob("*.md"))
        assert reports, "no report written"
        print(f"\ne2e: rsrp_mae_bnn={mae:.2f} dB fingerprint_ratio={ratio:.2f} synthetic_rows={len(syn)}")
    finally:
        rt.close()
