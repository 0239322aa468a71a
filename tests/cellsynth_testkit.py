"""Runtimes for tests: a tmp lake, Spark local[2], Ray with 2 CPUs, all lazy. Test-only code: it
lives under tests/ (on sys.path through tests/conftest.py), not in the package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

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


def _volatile(col: str) -> bool:
    return col.endswith(("run_id", "_at", "_seconds")) or col == "path"


def _timing(metric: object) -> bool:
    s = str(metric)
    return "seconds" in s or s.endswith("_s") or "peak_rss" in s


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """A table's content for run-to-run comparison: rows sorted, columns that say when or in which
    run a row was written dropped, wall-time metrics dropped, arrays as JSON text."""
    if "metric" in frame.columns:
        frame = frame[~frame["metric"].map(_timing)]
    frame = frame[[c for c in sorted(frame.columns) if not _volatile(c)]].copy()
    for c in frame.columns:
        if frame[c].dtype == object:
            frame[c] = frame[c].map(lambda v: v if v is None or isinstance(v, str)
                                    else json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str))
    return frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)


def tables_that_differ(a, b, names) -> dict:
    """{table: why} for the tables whose canonical content differs between lakes `a` and `b`."""
    differ = {}
    for name in names:
        x = canonical(a.read_pandas(name, network_scenario=None))
        y = canonical(b.read_pandas(name, network_scenario=None))
        if x.shape != y.shape or list(x.columns) != list(y.columns):
            differ[name] = f"shape {x.shape} vs {y.shape}"
            continue
        cols = [c for c in x.columns if not x[c].equals(y[c])]
        if cols:
            differ[name] = cols
    return differ
