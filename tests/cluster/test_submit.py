"""`cellsynth submit` for real: Spark standalone master + worker and a Ray head on 127.0.0.1,
the simulate (Ray job) and ingest (spark-submit) stages submitted to them, tables checked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellsynth.cluster.submit import SPARK_STAGES, job_config, plan, target_stages
from cellsynth.config import config_from_dict, load_config
from cellsynth.errors import ConfigError
from cellsynth.lake import Lake, RunRegistry

ROOT = Path(__file__).resolve().parents[2]
TINY_SCENARIO = {"n_sites": 4, "n_reports": 3000, "n_days": 1, "reports_per_ue": 10, "n_hotspots": 2, "n_roads": 1,
                 "area_km": 2.0}


def _cfg(tmp_path: Path, **runtime) -> dict:
    return {
        "run": {"lake_root": str(tmp_path / "lake"), "data_dir": str(tmp_path / "data")},
        "runtime": {"spark": {"master": runtime.get("master", "spark://127.0.0.1:7077"), "driver_memory": "1g",
                              "conf": {"spark.executor.memory": "1g", "spark.cores.max": "2"}},
                    "ray": {"address": "auto", "job_address": runtime.get("job", "http://127.0.0.1:8265"),
                            "num_cpus": None, "n_actors": 1, "cpus_per_actor": 0.5}},
        "scenario": TINY_SCENARIO,
    }


def test_plan_sends_ingest_to_spark_and_the_rest_to_ray(tmp_path):
    cfg = config_from_dict(_cfg(tmp_path))
    jobs = plan(cfg, "run", staging=tmp_path, wheel=tmp_path / "cellsynth-0.1.0-py3-none-any.whl", run_id="nightly-7")
    assert [j.engine for j in jobs] == ["ray", "spark", "ray"]
    for job in jobs:  # one submission, one run: each job runs under the same id
        argv = list(job.argv)
        assert argv[argv.index("--run-id") + 1] == "nightly-7"
    assert "--run-id" not in plan(cfg, "run", staging=tmp_path, wheel=tmp_path / "w.whl")[0].argv
    assert jobs[1].stages == SPARK_STAGES
    spark = list(jobs[1].argv)
    assert Path(spark[0]).name == "spark-submit"
    assert spark[spark.index("--master") + 1] == "spark://127.0.0.1:7077"
    assert spark[spark.index("--py-files") + 1].endswith(".whl")
    assert spark[spark.index("--stage") + 1] == "ingest"
    ray_job = list(jobs[2].argv)
    assert ray_job[1:3] == ["job", "submit"] and ray_job[ray_job.index("--address") + 1] == "http://127.0.0.1:8265"
    env = json.loads(ray_job[ray_job.index("--runtime-env-json") + 1])
    assert env["py_modules"] == [str(tmp_path / "pkg" / "cellsynth")]
    stages = [ray_job[i + 1] for i, tok in enumerate(ray_job) if tok == "--stage"]
    assert stages == [s for s in target_stages(cfg, "run") if s not in ("simulate", "ingest")]
    assert all("--quiet" in j.argv for j in jobs)


def test_submit_run_plans_the_chain_a_local_run_goes_through(tmp_path):
    # a traffic-only config: `run` drops the stages that learn from MDT reports; `submit run` planned them
    # all, and its density job failed on the cluster for want of reports
    import pandas as pd

    base = {**_cfg(tmp_path), "scenario": {"enabled": False}}
    traffic_only = config_from_dict({**base, "sources": {"traffic": {"path": str(tmp_path / "t.csv")}}})
    assert target_stages(traffic_only, "run") == ["ingest", "traffic", "report"]
    assert target_stages(config_from_dict(base), "run") == ["ingest"]
    assert target_stages(config_from_dict(_cfg(tmp_path)), "run")[:3] == ["simulate", "ingest", "density"]
    # reports already in the lake (an earlier ingest) count as MDT input, as in a local run
    from deltalake import write_deltalake

    write_deltalake(str(tmp_path / "lake" / "mdt_reports"), pd.DataFrame({"report_id": ["r1"]}))
    assert Lake(str(tmp_path / "lake")).exists("mdt_reports")
    assert "density" in target_stages(traffic_only, "run") and "radio" in target_stages(traffic_only, "run")


def test_job_config_makes_paths_absolute_and_joins_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "conf" / "cluster.yaml")
    data = job_config(cfg)
    assert data["run"]["lake_root"] == str(tmp_path / "lake")
    assert data["runtime"]["ray"]["address"] == "auto" and data["runtime"]["ray"]["num_cpus"] is None
    assert config_from_dict(data).run.data_dir == str(tmp_path / "data")


def test_unknown_target_and_missing_job_address_are_config_errors(tmp_path, monkeypatch):
    cfg = config_from_dict(_cfg(tmp_path))
    with pytest.raises(ConfigError, match=r"submit: unknown target 'bogus'"):
        target_stages(cfg, "bogus")
    no_job = config_from_dict({**_cfg(tmp_path), "runtime": {"ray": {"job_address": None}}})
    with pytest.raises(ConfigError, match=r"runtime\.ray\.job_address"):
        plan(no_job, "density", staging=tmp_path, wheel=tmp_path / "w.whl")
    # submit says so before it builds the wheel (which took its time, then failed on the address)
    import cellsynth.cluster.submit as sub

    def no_build(out_dir):
        raise AssertionError("the wheel was built before the config was checked")

    monkeypatch.setattr(sub, "build_wheel", no_build)
    with pytest.raises(ConfigError, match=r"runtime\.ray\.job_address"):
        sub.submit(no_job, "density")


def _submit_to_a_fresh_cluster(tmp_path: Path) -> str | None:
    """Start a local cluster, submit simulate then ingest. None when both succeed; otherwise why,
    prefixed "head died" when the Ray head itself went down (the machine's fault, not the job's)."""
    from ._services import local_cluster

    with local_cluster(tmp_path) as cluster:
        conf = tmp_path / "cluster.yaml"
        conf.write_text(json.dumps(_cfg(tmp_path, master=cluster.spark_master, job=cluster.ray_job_address)))
        for target in ("simulate", "ingest"):
            proc = subprocess.run([sys.executable, "-m", "cellsynth.cli", "submit", target, "--config", str(conf),
                                   "--run-id", f"submit-{target}"],
                                  env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
            if proc.returncode != 0:
                with contextlib.suppress(subprocess.TimeoutExpired):  # a dying head takes a moment to exit
                    cluster.ray_head.wait(timeout=10)
                why = f"{target}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{cluster.diagnostics()}"
                return ("head died; " if cluster.ray_head_died() else "") + why
    return None


@pytest.mark.slow
def test_submit_simulate_and_ingest_to_a_local_spark_and_ray_cluster(tmp_path):
    failure = _submit_to_a_fresh_cluster(tmp_path)
    if failure and failure.startswith("head died"):
        # A Ray head that dies under a loaded machine says nothing about submit; one fresh
        # cluster, with fresh tables, gets a second go. The first failure is kept for the report.
        print(f"first local cluster failed: {failure}", file=sys.stderr)
        for leftover in ("lake", "data"):
            shutil.rmtree(tmp_path / leftover, ignore_errors=True)
        failure = _submit_to_a_fresh_cluster(tmp_path)
    assert failure is None, failure
    assert (tmp_path / "data" / "sim" / "mdt.csv").is_file()
    lake = Lake(tmp_path / "lake")
    n_cells = len(lake.read_pandas("cells"))
    assert n_cells == TINY_SCENARIO["n_sites"] * 3
    reports = lake.read_pandas("mdt_reports", columns=["report_id", "window", "cell_shard"])
    rejects = lake.read("rejects").num_rows
    assert len(reports) > 0 and reports["report_id"].is_unique
    runs = RunRegistry(lake).latest()
    done = runs.set_index("stage")["status"]
    assert done["simulate"] == "succeeded" and done["ingest"] == "succeeded"
    assert runs.set_index("stage").loc[["simulate", "ingest"], "run_id"].tolist() == ["submit-simulate", "submit-ingest"]
    counts = json.loads(runs.set_index("stage").loc["ingest", "row_counts"])
    assert counts["rows_rejected"] == rejects
    assert not any(p.name.startswith("cellsynth-submit-") for p in Path("/tmp").iterdir() if p.stat().st_mtime > 0 and
                   os.path.exists(p / "job" / "config.yaml") and str(tmp_path) in (p / "job" / "config.yaml").read_text())
