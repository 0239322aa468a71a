"""Smoke tests of the thin entry points jobs/generate.py, jobs/evaluate.py, jobs/report.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from cellsynth.lake import Lake

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", JOBS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(tmp_path):
    return ["--quiet", "--set", f"run.lake_root={tmp_path / 'lake'}", "--set", f"run.data_dir={tmp_path / 'data'}"]


def test_report_job_writes_the_report(tmp_path, capsys):
    metrics = pd.DataFrame({"run_id": ["r"], "stage": ["evaluate"], "metric": ["rsrp_mae_dbm"], "value": [2.5],
                            "split": ["test"], "model": ["bnn"]})
    Lake(tmp_path / "lake").write("metrics", metrics)
    assert _job("report").main(_args(tmp_path)) == 0
    assert (tmp_path / "lake" / "report" / "index.html").is_file()
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "table"), [("generate", "kde_models"), ("evaluate", "mdt_reports")])
def test_jobs_name_the_missing_table(tmp_path, name, table, capsys):
    assert _job(name).main(_args(tmp_path)) == 1
    assert f"StageError: {name}: lake table '{table}' is missing" in capsys.readouterr().err
