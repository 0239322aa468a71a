"""Same seed, same input, same tables: the pipeline run twice (two lakes, the second with one Ray
actor instead of two) writes the same rows into every table and the same evaluate metrics; the
on-demand stages too (a measurement plan, and a what-if change set run after the pipeline).

Row order is not compared (it is not content); values are compared exactly: same machine, same
process, same code. Columns that say when or in which run a row was written are left out, and so
are wall-time metrics. Slow: two tiny end-to-end runs (a few minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

_STAGES = ["simulate", "ingest", "density", "radio", "traffic", "generate", "evaluate", "plan"]
# The shipped example change file: its cells (S00000_1, S00001_2) exist in any simulated scenario.
_CHANGES = Path(__file__).resolve().parents[1] / "conf" / "whatif" / "example.yaml"


def _config(root: Path, n_actors: int):
    from cellsynth_testkit import test_config

    return test_config(
        root,
        runtime={"spark": {"master": "local[2]", "shuffle_partitions": 2},
                 "ray": {"num_cpus": 2, "n_actors": n_actors, "cpus_per_actor": 0.5}},
        scenario={"n_sites": 5, "n_reports": 8_000},
        ingest={"n_cell_shards": 4},
        density={"student_epochs": 10},
        radio={"n_steps": 100},
        traffic={"n_steps": 40, "diffusion_steps": 10, "sampling_steps": 5},
        evaluate={"baselines": ("knn",), "downsampling": (0.9,), "refit_n_steps": 30, "fingerprint_trees": 20,
                  # caps below the table sizes, so the seeded subsamples are exercised
                  "max_test_rows": 1000, "max_fingerprint_train_rows": 1500, "max_privacy_rows": 1000},
        plan={"enabled": True, "budget_km": 2.0, "n_target_samples": 300, "route_starts": 2},
    )


def _run(tmp_path: Path, name: str, n_actors: int, spark):
    from cellsynth import pipeline
    from cellsynth.whatif import load_changes
    from cellsynth.whatif import stage as whatif_stage
    from cellsynth_testkit import local_runtime

    root = tmp_path / name
    cfg = _config(root, n_actors)
    rt = local_runtime(root, cfg, spark=spark)
    try:
        pipeline.run_pipeline(rt, stages=_STAGES)
        whatif_stage.run(cfg, rt, run_id="whatif", changes=load_changes(_CHANGES))
    finally:
        rt.close()
    return rt.lake


def test_two_runs_write_the_same_tables(tmp_path, spark, ray_session):
    a = _run(tmp_path, "a", 2, spark)
    b = _run(tmp_path, "b", 1, spark)
    names = sorted(t.name for t in a.tables() if t.name != "runs")
    assert {"mdt_reports", "kde_models", "radio_models", "synthetic_mdt", "synthetic_traffic", "metrics",
            "measurement_plan", "network_fields"} <= set(names)
    from cellsynth_testkit import tables_that_differ

    differ = tables_that_differ(a, b, names)
    assert not differ, f"tables differ between two runs of the same seed and input: {differ}"
    ev = a.read_pandas("metrics")
    assert ((ev["metric"] == "rsrp_mae_dbm") & ev["value"].notna()).any()  # evaluate ran and scored
    assert len(a.read_pandas("measurement_plan")) > 0  # the plan chose somewhere to measure
    every = a.read_pandas("synthetic_mdt", network_scenario=None)
    assert (every["network_scenario"] == "core_infill").any()  # the what-if rows are among those compared
