"""`cellsynth submit`: the embedded jobs, sent to a cluster. Spark stages go through
`spark-submit` to `runtime.spark.master`, the others through `ray job submit` to
`runtime.ray.job_address`; both get the package as a wheel built once from this checkout
(Spark: `--py-files`; Ray: the wheel's unpacked `cellsynth` folder as a `py_modules` entry, since
Ray installs a `.whl` with its dependencies). The job itself is `jobs/pipeline.py --stage ...`,
the same one the embedded run uses: only the config differs.

The resolved config travels as a YAML file (no secrets: `lake.storage_options_env` holds
variable names, and the cluster's nodes read the values from their own environment).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from cellsynth.config import PipelineConfig
from cellsynth.errors import ConfigError, StageError
from cellsynth.stages import STAGE_MODULES, TRAIN_STAGES

# Stages that run on Spark; every other stage runs as a Ray job.
SPARK_STAGES: tuple[str, ...] = ("ingest",)
REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Job:
    engine: str  # "spark" | "ray"
    stages: tuple[str, ...]
    argv: tuple[str, ...]


def target_stages(cfg: PipelineConfig, target: str) -> list[str]:
    """The stages `target` names: "run" (the chain a local `run` of this config and lake goes through:
    `pipeline.default_chain`), "train", or one stage."""
    if target == "run":
        from cellsynth.pipeline import default_chain

        return default_chain(cfg, lake_has_mdt=_lake_has(cfg, "mdt_reports"), lake_has_traffic=_lake_has(cfg, "traffic"))[0]
    if target == "train":
        return list(TRAIN_STAGES)
    if target not in STAGE_MODULES:
        raise ConfigError(f"submit: unknown target {target!r} (expected run, train or one of: {', '.join(STAGE_MODULES)})")
    return [target]


def _lake_has(cfg: PipelineConfig, table: str) -> bool:
    """Whether the lake holds `table`, looked up from this client (a lake that does not exist yet holds
    nothing); True when the lookup fails (e.g. no credentials here), so that no stage is left out on
    a failed look."""
    from cellsynth.cluster.runtime import make_lake

    try:
        return make_lake(cfg).exists(table)
    except Exception:  # noqa: BLE001 - any failure to look means "unknown"
        return True


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StageError(f"submit: '{name}' not found beside {sys.executable} or on PATH")
    return found


@functools.lru_cache(maxsize=1)
def build_wheel(out_dir: str) -> Path:
    """`pip wheel --no-deps` of this checkout into out_dir (once per process)."""
    # Build from a copy: an in-tree build would leave build/ and egg-info folders in the checkout.
    src = Path(out_dir) / "src"
    shutil.copytree(REPO_ROOT / "lib", src / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out_dir, str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(out_dir).glob("cellsynth-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise StageError(f"submit: building the cellsynth wheel failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return wheels[-1]


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return str(Path(path).resolve())


def job_config(cfg: PipelineConfig) -> dict:
    """The config as the cluster's jobs see it: local paths absolute, Ray joining its cluster."""
    data = cfg.model_dump(mode="json")
    data["run"]["lake_root"] = _absolute(cfg.run.lake_root)
    data["run"]["data_dir"] = _absolute(cfg.run.data_dir)
    if data["scenario"].get("output_dir"):
        data["scenario"]["output_dir"] = _absolute(data["scenario"]["output_dir"])
    ray = data["runtime"]["ray"]
    ray["address"] = ray["address"] or "auto"
    ray["num_cpus"] = None  # the cluster's resources, not the embedded default
    ray["object_store_memory_mb"] = None
    return data


def plan(cfg: PipelineConfig, target: str, *, staging: Path, wheel: Path, force: bool = False,
         run_id: str | None = None) -> list[Job]:
    """The spark-submit / ray job submit command lines for `target`, in order (pure). With `run_id` every job
    runs under it, so one submission is one run in the registry (and counts once for `lake.keep_runs`)."""
    stages = target_stages(cfg, target)
    groups: list[tuple[str, list[str]]] = []
    for name in stages:
        engine = "spark" if name in SPARK_STAGES else "ray"
        if groups and groups[-1][0] == engine:
            groups[-1][1].append(name)
        else:
            groups.append((engine, [name]))
    extra = ["--quiet"] + (["--force"] if force else []) + (["--run-id", run_id] if run_id else [])
    jobs = []
    for engine, names in groups:
        stage_args = [arg for n in names for arg in ("--stage", n)]
        if engine == "spark":
            argv = [
                _tool("spark-submit"), "--master", cfg.runtime.spark.master, "--deploy-mode", "client",
                "--name", f"{cfg.runtime.spark.app_name}-{'-'.join(names)}", "--py-files", str(wheel),
                "--driver-memory", cfg.runtime.spark.driver_memory,
                "--conf", f"spark.driver.host={cfg.runtime.spark.bind_host}",
                "--conf", f"spark.driver.bindAddress={cfg.runtime.spark.bind_host}",
                "--conf", f"spark.ui.enabled={str(cfg.runtime.spark.ui_enabled).lower()}",
                str(staging / "pipeline.py"), "--config", str(staging / "config.yaml"), *stage_args, *extra,
            ]
        else:
            if not cfg.runtime.ray.job_address:
                raise ConfigError("runtime.ray.job_address: submit needs the Ray job API address, e.g. http://127.0.0.1:8265")
            runtime_env = {"py_modules": [str(staging / "pkg" / "cellsynth")], "env_vars": {"RAY_DEDUP_LOGS": "1"}}
            argv = [
                _tool("ray"), "job", "submit", "--address", cfg.runtime.ray.job_address,
                "--working-dir", str(staging / "job"), "--runtime-env-json", json.dumps(runtime_env), "--",
                "python", "pipeline.py", "--config", "config.yaml", *stage_args, *extra,
            ]
        jobs.append(Job(engine, tuple(names), tuple(argv)))
    return jobs


def _stage_dir(cfg: PipelineConfig, staging: Path) -> Path:
    wheel = build_wheel(str(staging / "dist"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(staging / "pkg")
    (staging / "job").mkdir(exist_ok=True)
    text = yaml.safe_dump(job_config(cfg), sort_keys=False)
    for where in (staging, staging / "job"):
        (where / "config.yaml").write_text(text)
        shutil.copy(REPO_ROOT / "jobs" / "pipeline.py", where / "pipeline.py")
    return wheel


# A Ray head answers on its dashboard port a little before its job agent registers; a submission in
# that gap fails with this message and nothing runs, so it is safe to send again.
_RAY_AGENT_NOT_READY = "No available agent to submit job"
RAY_AGENT_RETRIES = 6


def _run_job(job: Job, *, env: dict, cwd: Path) -> int:
    """Run one submit command; a Ray submission refused for a not-yet-ready agent is retried."""
    if job.engine != "ray":
        return subprocess.run(list(job.argv), env=env, cwd=cwd).returncode
    for attempt in range(RAY_AGENT_RETRIES + 1):
        proc = subprocess.run(list(job.argv), env=env, cwd=cwd, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr)
        if proc.returncode == 0 or _RAY_AGENT_NOT_READY not in proc.stderr or attempt == RAY_AGENT_RETRIES:
            return proc.returncode
        print(f"submit: Ray job agent not ready, retrying in {5 * (attempt + 1)} s", file=sys.stderr, flush=True)
        time.sleep(5 * (attempt + 1))
    return proc.returncode


def submit(cfg: PipelineConfig, target: str = "run", *, force: bool = False, quiet: bool = False,
           run_id: str | None = None) -> int:
    """Submit `target` ("run", "train" or a stage) to the configured Spark master and Ray cluster.

    Runs the jobs in order, all under `run_id` (default: a new one), and stops at the first that fails.
    Returns that job's exit code (0 ok).

    Raises:
        ConfigError: unknown target, or a Ray stage without `runtime.ray.job_address`.
        StageError: spark-submit / ray not installed, or the wheel could not be built.
    """
    from cellsynth.pipeline import check_run_id, new_run_id  # the pipeline imports this package

    stages = target_stages(cfg, target)  # validate before building anything (the wheel takes a while)
    if any(name not in SPARK_STAGES for name in stages) and not cfg.runtime.ray.job_address:
        raise ConfigError("runtime.ray.job_address: submit needs the Ray job API address, e.g. http://127.0.0.1:8265")
    run_id = check_run_id(run_id) if run_id else new_run_id()
    staging = Path(tempfile.mkdtemp(prefix="cellsynth-submit-"))
    try:
        wheel = _stage_dir(cfg, staging)
        env = {**os.environ}
        # Client-mode driver and local executors must run this interpreter (the image sets both).
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        if not quiet:
            print(f"submit: run {run_id}", file=sys.stderr, flush=True)
        for job in plan(cfg, target, staging=staging, wheel=wheel, force=force, run_id=run_id):
            if not quiet:
                print(f"submit: {job.engine} job for {', '.join(job.stages)}", file=sys.stderr, flush=True)
            code = _run_job(job, env=env, cwd=staging)
            if code != 0:
                print(f"submit: {job.engine} job for {', '.join(job.stages)} failed with exit code {code}",
                      file=sys.stderr, flush=True)
                return code
        return 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
