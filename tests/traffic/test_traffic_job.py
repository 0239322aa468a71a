"""Smoke test of jobs/traffic.py with tiny settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _job():
    spec = importlib.util.spec_from_file_location("traffic_job", ROOT / "jobs" / "traffic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_reports_missing_inputs_and_bad_keys(tmp_path, capsys):
    job = _job()
    lake = f"run.lake_root={tmp_path / 'lake'}"
    assert job.main(["--quiet", "--set", lake, "--set", "traffic.n_steps=2"]) == 1
    assert "traffic: input table(s) traffic, cells missing" in capsys.readouterr().err
    assert job.main(["--quiet", "--set", lake, "--set", "traffic.n_step=2"]) == 2
    assert "traffic.n_step: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_job_runs_the_stage(tmp_path, capsys, ray_session):
    from test_traffic_stage import _lake_inputs

    from cellsynth_testkit import local_runtime
    from cellsynth_testkit import test_config as make_test_config

    sets = [f"run.lake_root={tmp_path / 'lake'}", "ingest.n_cell_shards=4", "traffic.n_steps=20",
            "traffic.hidden_channels=16", "traffic.n_blocks=1", "traffic.diffusion_steps=10",
            "traffic.sampling_steps=5", "traffic.evaluate_unconditional=false", "runtime.ray.num_cpus=2"]
    cfg = make_test_config(tmp_path, ingest={"n_cell_shards": 4})
    _lake_inputs(local_runtime(tmp_path, cfg), cfg)
    argv = ["--quiet", "--run-id", "j1"] + [a for s in sets for a in ("--set", s)]
    assert _job().main(argv) == 0
    assert "traffic j1: written={'synthetic_traffic':" in capsys.readouterr().out
