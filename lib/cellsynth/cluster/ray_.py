"""Ray start-up for the configured cluster. The only module that calls `ray.init`."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from cellsynth.config import RayConfig


def init_ray(cfg: RayConfig, *, quiet: bool = True):  # -> the ray module
    import ray

    if ray.is_initialized():
        return ray
    # Workers import cellsynth from the same interpreter; keep Ray's own chatter out of reports.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict = {
        "include_dashboard": cfg.dashboard,
        "logging_level": logging.ERROR if quiet else logging.INFO,
        "log_to_driver": not quiet,
        "configure_logging": True,
    }
    if cfg.address is None:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=None)
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb * 2**20
        if cfg.dashboard:
            kwargs["dashboard_host"] = cfg.dashboard_host
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    else:
        kwargs["address"] = cfg.address
    ray.init(**kwargs)
    return ray


def gpu_share(ray: Any, gpus_per_actor: float, *, want_gpu: bool, n_workers: int = 1) -> float:
    """GPUs each of `n_workers` actors/tasks requests. Ray hides every GPU from a worker that
    requests none (CUDA_VISIBLE_DEVICES=""), so with runtime.device auto/cuda a worker must ask
    for a share: ray.gpus_per_actor when set, else the cluster's GPUs split over the workers (at
    most one each). 0 when the cluster has too few: a request it cannot meet waits forever."""
    if not want_gpu:
        return 0.0
    total = float(ray.cluster_resources().get("GPU", 0.0))
    want = min(1.0, gpus_per_actor) if gpus_per_actor > 0 else min(1.0, total / max(1, n_workers))
    return want if want > 0 and total >= want else 0.0


def actor_options(cfg: RayConfig) -> dict:
    """Options for a training actor: fractional CPUs, restarts on failure, GPU when asked."""
    opts = {"num_cpus": cfg.cpus_per_actor, "max_restarts": cfg.max_restarts, "max_task_retries": cfg.max_task_retries}
    if cfg.gpus_per_actor:
        opts["num_gpus"] = cfg.gpus_per_actor
    return opts
