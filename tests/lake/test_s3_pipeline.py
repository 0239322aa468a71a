"""The Ray/delta-rs stages against a lake on an S3-compatible store (moto on 127.0.0.1).

Spark reaches object stores through hadoop-aws jars, which cannot be fetched here; so the
clean tables are ingested on a local lake and copied to the bucket (as an operator's lake
would already hold them), then density -> radio -> traffic -> generate -> evaluate run with
`run.lake_root: s3://...`: tables, model weights and the run registry all live in the bucket.
"""

from __future__ import annotations

import numpy as np
import pytest

from cellsynth_testkit import test_config as make_test_config

from ._s3 import make_bucket, moto_server

pytestmark = [pytest.mark.slow]

KEY_ID, SECRET = "AKIACELLSYNTHTEST", "cellsynth-secret-do-not-log"
SECTIONS = dict(
    scenario={"n_sites": 5, "n_reports": 5_000},
    ingest={"n_cell_shards": 2},
    density={"student_epochs": 10},
    radio={"n_steps": 150},
    traffic={"n_steps": 30, "diffusion_steps": 10, "sampling_steps": 5},
    evaluate={"baselines": ("knn",), "downsampling": (0.9,), "refit_n_steps": 30, "fingerprint_trees": 20,
              "max_test_rows": 1000, "max_fingerprint_train_rows": 2000, "max_privacy_rows": 1000},
    privacy={"publish_despite_guard": True},
)
INGESTED = ("cells", "mdt_reports", "mdt_measurements", "traffic", "rejects")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        make_bucket(endpoint, "lake", KEY_ID, SECRET)
        yield endpoint


def test_stages_run_on_an_object_store_lake(tmp_path, s3_endpoint, spark, ray_session, monkeypatch):
    from cellsynth import pipeline
    from cellsynth.cluster.runtime import Runtime, make_lake
    from cellsynth_testkit import local_runtime
    from cellsynth.radio.model import RadioModels

    local_cfg = make_test_config(tmp_path / "local", **SECTIONS)
    local = local_runtime(tmp_path / "local", local_cfg, spark=spark)
    for stage in ("simulate", "ingest"):
        pipeline.run_stage(stage, local, run_id="ingest-local")

    monkeypatch.setenv("CS_TEST_KEY", KEY_ID)
    monkeypatch.setenv("CS_TEST_SECRET", SECRET)
    cfg = make_test_config(
        tmp_path / "s3", **SECTIONS,
        run={"lake_root": "s3://lake/pipeline", "data_dir": str(tmp_path / "local" / "data")},
        lake={"storage_options_env": {"AWS_ACCESS_KEY_ID": "CS_TEST_KEY", "AWS_SECRET_ACCESS_KEY": "CS_TEST_SECRET"},
              "storage_options": {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"},
              "report_dir": str(tmp_path / "report")},
    )
    lake = make_lake(cfg)
    for table in INGESTED:
        lake.write(table, local.lake.read(table), mode="overwrite")
    rt = Runtime(cfg=cfg, lake=lake, quiet=True)
    rt.use_spark(spark)
    try:
        results = {s: pipeline.run_stage(s, rt, run_id="on-s3") for s in ("density", "radio", "traffic", "generate", "evaluate")}
        assert not any(r.skipped for r in results.values()), {s: r.note for s, r in results.items()}
        assert lake.is_remote and not (tmp_path / "s3" / "lake").exists()  # nothing fell back to a local root
        models = lake.read_pandas("radio_models")
        n_cells = lake.read_pandas("cells")["cell_id"].nunique()
        assert set(models["target"]) == {"rsrp", "rsrq"} and models["cell_id"].nunique() == n_cells
        # the weights the table names are in the bucket, and load back through the lake
        radio = RadioModels.load(lake)
        cells = lake.read_pandas("cells")
        one = cells["cell_id"].iloc[0]
        xy = cells.loc[cells["cell_id"] == one, ["x_m", "y_m"]].to_numpy(float) + [[100.0, 0.0]]
        pred = radio.predict("rsrp", np.array([one]), xy)
        assert -140.0 < float(np.asarray(pred.mean)[0]) < -40.0
        syn = lake.read_pandas("synthetic_mdt")
        assert len(syn) == results["generate"].rows_written["synthetic_mdt"] > 500
        metrics = lake.read_pandas("metrics")
        assert (metrics["metric"] == "rsrp_mae_dbm").any()
        runs = lake.read_pandas("runs")
        assert set(runs.loc[runs["status"] == "succeeded", "stage"]) >= set(results)
    finally:
        rt.close()
        local.close()
