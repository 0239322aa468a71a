"""Shared fixtures: one session-scoped Spark (local[2]), one local Ray, tmp lakes and configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = Path(os.environ.get("CELLSYNTH_SHARED_DATA", SHARED / "data"))


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def spark():
    from cellsynth.cluster.spark import build_session
    from cellsynth.config import LakeConfig, SparkConfig

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = build_session(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="1g"), LakeConfig())
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_session():
    from cellsynth.cluster.ray_ import init_ray
    from cellsynth.config import RayConfig

    ray = init_ray(RayConfig(num_cpus=2, n_actors=2, cpus_per_actor=0.5, object_store_memory_mb=256))
    yield ray
    ray.shutdown()


@pytest.fixture
def cfg(tmp_path):
    from cellsynth_testkit import test_config

    return test_config(tmp_path)


@pytest.fixture
def lake(tmp_path):
    from cellsynth.lake import Lake

    return Lake(tmp_path / "lake")


@pytest.fixture
def rt(tmp_path, cfg):
    """A quiet Runtime on a tmp lake; Spark/Ray only when a test touches them (not shared)."""
    from cellsynth_testkit import local_runtime

    runtime = local_runtime(tmp_path, cfg)
    yield runtime
    runtime.close()


@pytest.fixture
def one_torch_thread():
    """Loops over small torch tensors run on one thread (two made them ~50x slower here)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
