"""Files on disk: byte-identical reruns, the stage's skip rule, the job entry point, real layouts."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellsynth.config import ScenarioConfig, WindowConfig
from cellsynth.errors import ConfigError
from cellsynth.scenario import export, mdt_columns, simulate, write_scenario
from cellsynth.scenario import stage as sim_stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import shared_data  # noqa: E402

TINY = dict(n_sites=4, area_km=2.0, n_reports=3_000, n_days=2, truth_fine_grid_m=50.0)
FILES = ["cells.csv", "mdt.csv", "mdt.parquet", "traffic.csv", "manifest.json", "truth/rsrp_grid.parquet",
         "truth/spatial_maps.parquet", "truth/load.parquet", "truth/reports.parquet"]


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


def test_same_seed_gives_byte_identical_files_and_chunking_is_streamed(tmp_path):
    cfg = ScenarioConfig(**TINY, chunk_reports=700)
    kw = dict(windows=WindowConfig(), map_resolution_m=100.0)
    write_scenario(cfg, tmp_path / "a", seed=5, **kw)
    write_scenario(cfg, tmp_path / "b", seed=5, **kw)
    write_scenario(cfg, tmp_path / "c", seed=6, **kw)
    a, b, c = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert a == b
    assert a["mdt.csv"] != c["mdt.csv"] and a["cells.csv"] != c["cells.csv"]
    # Several chunks were written, and the CSV and Parquet hold the same rows.
    assert pd.read_parquet(tmp_path / "a" / "mdt.parquet").shape[0] == 3_000 + json.loads(
        (tmp_path / "a" / "manifest.json").read_text())["dirt"]["duplicate"]
    csv = pd.read_csv(tmp_path / "a" / "mdt.csv", dtype={"timestamp": str}, keep_default_na=False, na_values=[""])
    par = pd.read_parquet(tmp_path / "a" / "mdt.parquet")
    assert list(csv.columns) == mdt_columns(4) == list(par.columns)
    np.testing.assert_allclose(csv["serving_rsrp_dbm"].to_numpy(float), par["serving_rsrp_dbm"].to_numpy(float))
    np.testing.assert_allclose(csv["latitude"].to_numpy(float), par["latitude"].to_numpy(float))
    assert (csv["report_id"] == par["report_id"]).all()
    assert pq_row_groups(tmp_path / "a" / "mdt.parquet") > 1


def pq_row_groups(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).num_row_groups


def test_in_memory_export_matches_streamed_rows(tmp_path):
    cfg = ScenarioConfig(**TINY)
    kw = dict(windows=WindowConfig(), map_resolution_m=100.0, seed=5)
    sc = simulate(cfg, **kw)
    export(sc, tmp_path / "mem")
    write_scenario(cfg, tmp_path / "stream", **kw)
    for name in ("mdt.csv", "cells.csv", "traffic.csv", "manifest.json"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes(), name


def test_stage_writes_then_skips_and_fingerprint_tracks_the_folder(tmp_path, rt):
    from cellsynth_testkit import test_config

    cfg = test_config(tmp_path, scenario=TINY)
    before = sim_stage.external_fingerprint(cfg)
    result = sim_stage.run(cfg, rt, run_id="r1")
    out = Path(result.artifacts["raw_dir"])
    assert out == tmp_path / "data" / "sim" and not result.skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert result.rows_written["mdt.csv"] == len(pd.read_csv(out / "mdt.csv")) == manifest["counts"]["rows:mdt.csv"]
    assert result.rows_written["cells.csv"] == 12
    after = sim_stage.external_fingerprint(cfg)
    assert before == f"{after}:missing"
    again = sim_stage.run(cfg, rt, run_id="r2")
    assert again.skipped and again.artifacts["raw_dir"] == str(out)
    changed = test_config(tmp_path, scenario={**TINY, "n_reports": 2_000})
    assert sim_stage.external_fingerprint(changed) != after
    assert not sim_stage.run(changed, rt, run_id="r3").skipped


def test_job_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("jobs_simulate", Path(__file__).resolve().parents[2] / "jobs" / "simulate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    sets = [f"scenario.{k}={v}" for k, v in TINY.items()] + [f"run.data_dir={tmp_path / 'data'}",
                                                             f"run.lake_root={tmp_path / 'lake'}"]
    assert job.main([arg for s in sets for arg in ("--set", s)] + ["--quiet"]) == 0
    assert "'mdt.csv':" in capsys.readouterr().out
    assert (tmp_path / "data" / "sim" / "truth" / "reports.parquet").is_file()


def test_missing_sites_csv_is_a_config_error(tmp_path):
    cfg = ScenarioConfig(**TINY, sites_csv=str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match=r"scenario\.sites_csv: file not found"):
        simulate(cfg, windows=WindowConfig(), map_resolution_m=100.0, seed=1)


def test_real_site_layout_from_shanghai_csv():
    path = shared_data("shanghai-telecom-bs", "base_stations_all.csv")
    cfg = ScenarioConfig(**{**TINY, "n_sites": 6}, sites_csv=str(path))
    sc = simulate(cfg, windows=WindowConfig(), map_resolution_m=100.0, seed=1)
    raw = pd.read_csv(path)
    sites = sc.cells.drop_duplicates("site_id")
    assert len(sites) == 6 and len(sc.cells) == 18
    # Every simulated site is one of the real base stations.
    real = set(zip(raw["latitude"].round(6), raw["longitude"].round(6)))
    assert all((round(a, 6), round(b, 6)) in real for a, b in zip(sites["latitude"], sites["longitude"]))
    assert 30.5 < sc.mdt["latitude"].median() < 31.8
