"""Issue 15 item 7: a run killed during radio training keeps its finished shards on the rerun.

A subprocess runs the radio stage through the pipeline on a tiny lake with the failpoint
CELLSYNTH_FAILPOINT=radio_after_jobs:1, which SIGKILLs the driver right after the first job's
checkpoint lands. The rerun (this process) must keep that job (same rows, weights untouched, the
killed run's id) and train only the rest, then commit radio_models at the version the registry
records, with no checkpoints left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.radio.test_stage import _tiny_lake

DRIVER = textwrap.dedent('''
    import sys
    from cellsynth.cluster import runtime
    from cellsynth.config import load_config
    from cellsynth.pipeline import run_pipeline
    with runtime(load_config(sys.argv[1]), quiet=True) as rt:
        run_pipeline(rt, stages=["radio"])
''')


@pytest.mark.slow
def test_killed_radio_run_keeps_finished_shards_on_rerun(tmp_path, ray_session):
    from cellsynth_testkit import local_runtime, test_config
    from cellsynth.lake import RunRegistry
    from cellsynth.pipeline import run_pipeline
    from cellsynth.radio.stage import CHECKPOINTS

    settings = {"radio": {"n_steps": 60}, "runtime": {"ray": {"num_cpus": 2, "n_actors": 1, "cpus_per_actor": 0.5,
                                                              "object_store_memory_mb": 128}}}
    cfg = test_config(tmp_path, **settings)
    rt = local_runtime(tmp_path, cfg)
    _tiny_lake(rt.lake, n_shards=4)
    shards = sorted(rt.lake.read_pandas("cells")["cell_shard"].unique().tolist())
    assert len(shards) >= 2  # two or more jobs: one finishes before the kill, one is left

    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump({"run": {"lake_root": str(tmp_path / "lake"), "data_dir": str(tmp_path / "data")},
                                    **settings}))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "CELLSYNTH_FAILPOINT": "radio_after_jobs:1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(conf)], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        try:  # whatever the killed driver started (Ray's processes) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, out
    assert not rt.lake.exists("radio_models")
    kept = list((tmp_path / "lake" / CHECKPOINTS).glob("*/*.json"))
    assert len(kept) == 1
    first = json.loads(kept[0].read_text())
    killed_run = first["rows"][0]["run_id"]
    kept_shard = first["rows"][0]["cell_shard"]
    weights = sorted((tmp_path / "lake" / "models" / "radio" / killed_run).rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in weights if p.is_file()}
    assert mtimes

    run_id, results = run_pipeline(rt, stages=["radio"])
    assert not results[0].skipped and run_id != killed_run
    table = rt.lake.read_pandas("radio_models")
    mine = table[table["cell_shard"] == kept_shard]
    # the finished job is kept, not retrained: its rows as checkpointed, its weight files untouched
    assert sorted(mine["run_id"].unique()) == [killed_run]
    assert sorted(zip(mine["cell_id"], mine["target"])) == sorted((r["cell_id"], r["target"]) for r in first["rows"])
    assert mine.set_index(["cell_id", "target"])["n_train"].to_dict() == {
        (r["cell_id"], r["target"]): r["n_train"] for r in first["rows"]}
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # the rest trained by the rerun; every cell and target once; consistent versions
    rest = table[table["cell_shard"] != kept_shard]
    assert len(rest) and (rest["run_id"] == run_id).all()
    assert len(table) == 6 and not table.duplicated(["cell_id", "target"]).any()
    assert (table["source_version"] == rt.lake.version("mdt_measurements")).all()
    last = RunRegistry(rt.lake).last_success("radio")
    assert last["run_id"] == run_id and last["output_versions"]["radio_models"] == rt.lake.version("radio_models")
    assert not (tmp_path / "lake" / CHECKPOINTS).exists()
