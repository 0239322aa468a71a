"""deploy/: the image recipe, Kubernetes manifests and the Airflow DAG are well-formed and wired to
the jobs and config that exist in this repository."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from cellsynth.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _uses_lake_secret(container: dict) -> bool:
    return any(src.get("secretRef", {}).get("name") == "cellsynth-lake" for src in container.get("envFrom", []))


def test_spark_application_runs_ingest_job_with_secret_env():
    (app,) = _docs("spark-application.yaml")
    assert (app["apiVersion"], app["kind"]) == ("sparkoperator.k8s.io/v1beta2", "SparkApplication")
    spec = app["spec"]
    assert spec["type"] == "Python" and spec["mode"] == "cluster"
    main = spec["mainApplicationFile"]
    assert main.startswith("local:///opt/cellsynth/")
    assert (ROOT / main.removeprefix("local:///opt/cellsynth/")).is_file()
    args = spec["arguments"]
    assert args[args.index("--stage") + 1] == "ingest" and "--quiet" in args
    assert spec["sparkConf"]["spark.ui.enabled"] == "false"
    for role in ("driver", "executor"):
        assert _uses_lake_secret(spec[role]), role
        assert "memory" in spec[role] and "cores" in spec[role]
    # Secrets only through env: no literal keys in the manifest.
    assert "AWS_SECRET_ACCESS_KEY" not in (K8S / "spark-application.yaml").read_text()


def test_ray_cluster_head_and_workers_share_image_and_secret():
    (cluster,) = _docs("ray-cluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    head = _containers(spec["headGroupSpec"]["template"])[0]
    workers = [_containers(g["template"])[0] for g in spec["workerGroupSpecs"]]
    assert len(workers) >= 1
    images = {head["image"], *(w["image"] for w in workers)}
    assert len(images) == 1
    assert all(_uses_lake_secret(c) for c in [head, *workers])
    assert 8265 in {p["containerPort"] for p in head["ports"]}
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] == 0


def test_ray_job_entrypoint_runs_the_pipeline_job():
    (job,) = _docs("ray-job.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    entry = spec["entrypoint"].split()
    assert entry[0] == "python" and entry[1] == "/opt/cellsynth/jobs/pipeline.py"
    assert (ROOT / "jobs" / "pipeline.py").is_file()
    stages = [entry[i + 1] for i, tok in enumerate(entry) if tok == "--stage"]
    assert stages[:3] == ["density", "radio", "traffic"] and "generate" in stages
    head = _containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])[0]
    assert _uses_lake_secret(head)


def test_secret_example_and_configmap_config_is_valid(tmp_path, monkeypatch):
    docs = {d["kind"]: d for d in _docs("secret.example.yaml")}
    assert set(docs) == {"Secret", "ConfigMap"}
    assert set(docs["Secret"]["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    conf = tmp_path / "cluster.yaml"
    conf.write_text(docs["ConfigMap"]["data"]["cluster.yaml"])
    cfg = load_config(conf)
    assert cfg.run.lake_root.startswith("s3://")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    opts = cfg.storage_options()
    assert opts["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value" and opts["AWS_REGION"] == "eu-west-1"
    assert "s3cr3t-value" not in cfg.model_dump_json()


def test_dockerfile_pins_torch_cpu_first_and_fetches_s3a_and_delta_jars():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    assert "openjdk-17-jre" in text
    torch_at = text.index("pip install torch==")
    pkg_at = text.index('pip install -c /opt/constraints.txt')
    assert torch_at < pkg_at
    # hadoop-aws must match the Hadoop client that the pinned pyspark bundles.
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    (client,) = [p.name for p in jars.glob("hadoop-client-api-*.jar")]
    hadoop_version = re.search(r"hadoop-client-api-(.+)\.jar", client).group(1)
    assert f"ARG HADOOP_VERSION={hadoop_version}" in text
    assert "hadoop-aws-${HADOOP_VERSION}.jar" in text
    assert "delta-spark_2.13-${DELTA_VERSION}.jar" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    delta = re.search(r"ARG DELTA_VERSION=(\S+)", text).group(1)
    torch = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    assert f'"delta-spark=={delta}"' in pyproject and f'"torch=={torch}"' in pyproject
    assert "USER 1000" in text


def test_cluster_config_binds_services_to_localhost():
    cfg = load_config(ROOT / "conf" / "cluster.yaml")
    assert cfg.runtime.spark.master.startswith("spark://127.0.0.1:")
    assert cfg.runtime.ray.address == "auto"
    assert cfg.runtime.ray.job_address == "http://127.0.0.1:8265"
    assert cfg.runtime.spark.bind_host == "127.0.0.1" and cfg.runtime.ray.dashboard_host == "127.0.0.1"
    s3 = load_config(ROOT / "conf" / "examples" / "s3.yaml")
    assert s3.run.lake_root.startswith("s3://") and s3.lake.storage_options_env
    assert not any("SECRET" in k for k in s3.lake.storage_options)


def _load_dag_module():
    spec = importlib.util.spec_from_file_location("cellsynth_dag", DEPLOY / "airflow" / "cellsynth_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dag_imports_with_airflow_and_chains_stages():
    pytest.importorskip("airflow", reason="Airflow not installed")
    dag = _load_dag_module().dag
    assert dag.dag_id == "cellsynth_daily"
    order = ["ingest", "train", "generate", "evaluate", "report", "optimize", "vacuum"]
    assert [t.task_id for t in dag.topological_sort()] == order
    for task_id in order:
        cmd = dag.get_task(task_id).bash_command
        assert cmd.startswith(f"cellsynth {task_id} --config ")
        assert ("--quiet" in cmd and "--run-id {{ run_id | replace(':', '') | replace('+', '') }}" in cmd
                and "--skip-unfed" in cmd) == (task_id not in ("optimize", "vacuum"))


def test_dag_commands_are_cli_commands_without_airflow():
    # Without Airflow, check the source: the stage list it runs names existing CLI commands.
    import ast

    from typer.main import get_command

    from cellsynth.cli import app

    tree = ast.parse((DEPLOY / "airflow" / "cellsynth_dag.py").read_text())
    stages = next(
        ast.literal_eval(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "STAGES"
    )
    assert list(stages) == ["ingest", "train", "generate", "evaluate", "report"]
    upkeep = next(
        ast.literal_eval(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "UPKEEP"
    )
    assert list(upkeep) == ["optimize", "vacuum"]
    commands = get_command(app).commands
    assert set(stages) | set(upkeep) <= set(commands)
    # the options the stage tasks pass exist on every stage command
    for stage in stages:
        assert {"--quiet", "--run-id", "--config", "--skip-unfed"} <= {o for p in commands[stage].params for o in p.opts}
    source = (DEPLOY / "airflow" / "cellsynth_dag.py").read_text()
    # --skip-unfed: a traffic-only lake's generate and evaluate tasks succeed as skipped instead of failing
    assert "--quiet" in source and "--run-id {RUN_ID}" in source and "--quiet --skip-unfed" in source
