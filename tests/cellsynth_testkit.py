"""Runtimes for tests: a tmp lake, Spark local[2], Ray with 2 CPUs, all lazy. Test-only code: it
lives under tests/ (on sys.path through tests/conftest.py), not in the package."""

from __future__ import annotations

from pathlib import Path

from cellsynth.cluster.runtime import Runtime, make_lake
from cellsynth.config import PipelineConfig, config_from_dict


def test_config(tmp_path: Path, **sections) -> PipelineConfig:
    """Defaults with the lake and data under tmp_path; `sections` override (dicts per section)."""
    data: dict = {
        "run": {"lake_root": str(tmp_path / "lake"), "data_dir": str(tmp_path / "data")},
        "runtime": {"spark": {"master": "local[2]", "shuffle_partitions": 2}, "ray": {"num_cpus": 2}},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def local_runtime(tmp_path: Path, cfg: PipelineConfig | None = None, *, spark=None) -> Runtime:
    """A quiet Runtime on `tmp_path`; pass a shared session to avoid starting a second JVM."""
    cfg = cfg or test_config(tmp_path)
    rt = Runtime(cfg=cfg, lake=make_lake(cfg), quiet=True)
    if spark is not None:
        rt.use_spark(spark)
    return rt
