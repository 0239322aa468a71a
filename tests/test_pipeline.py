import sys
import types

import pandas as pd
import pytest

from cellsynth import pipeline, stages
from cellsynth.errors import ConfigError
from cellsynth.stages import StageResult


def _fake_stage(name, calls, *, inputs=(), outputs=("metrics",), fail=False):
    """A stage that records its call and (when it has outputs) writes one metrics row."""
    mod = types.ModuleType(f"tests_fake_{name}")
    mod.NAME, mod.INPUTS, mod.OUTPUTS, mod.CONFIG_SECTIONS = name, inputs, outputs, ("radio",)

    def run(cfg, rt, *, run_id):
        calls.append(name)
        if fail:
            raise RuntimeError("boom")
        if not outputs:
            return StageResult(stage=name, run_id=run_id)
        df = pd.DataFrame({"run_id": [run_id], "stage": [name], "metric": ["m"], "value": [float(len(calls))]})
        version = rt.lake.write("metrics", df, mode="overwrite", predicate=f"stage = '{name}'")
        return StageResult(stage=name, run_id=run_id, rows_written={"metrics": 1}, table_versions={"metrics": version})

    mod.run = run
    sys.modules[mod.__name__] = mod
    return mod.__name__


@pytest.fixture
def fake_chain(monkeypatch):
    calls: list[str] = []
    modules = {"first": _fake_stage("first", calls), "second": _fake_stage("second", calls, inputs=("metrics",), outputs=())}
    monkeypatch.setattr(stages, "STAGE_MODULES", modules)
    monkeypatch.setattr(pipeline, "STAGE_MODULES", modules)
    return calls


def test_second_run_skips_unchanged_stages(rt, fake_chain):
    run1, res1 = pipeline.run_pipeline(rt)
    assert [r.skipped for r in res1] == [False, False]
    run2, res2 = pipeline.run_pipeline(rt)
    assert [r.skipped for r in res2] == [True, True]
    assert fake_chain == ["first", "second"]
    assert run1 in res2[0].note
    statuses = rt.registry.latest().set_index(["run_id", "stage"])["status"]
    assert statuses[(run2, "first")] == "skipped" and statuses[(run1, "first")] == "succeeded"


def test_config_change_reruns_and_downstream_follows(rt, fake_chain, tmp_path):
    from cellsynth.cluster.testing import local_runtime, test_config

    pipeline.run_pipeline(rt)
    rt2 = local_runtime(tmp_path, test_config(tmp_path, radio={"n_steps": 11}))
    _, res = pipeline.run_pipeline(rt2)
    assert [r.skipped for r in res] == [False, False]


def test_failure_is_recorded_and_raised(rt, monkeypatch):
    calls: list[str] = []
    modules = {"bad": _fake_stage("bad", calls, fail=True)}
    monkeypatch.setattr(pipeline, "STAGE_MODULES", modules)
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_pipeline(rt)
    assert rt.registry.latest().iloc[0]["status"] == "failed"


def test_missing_stage_module_is_left_out(monkeypatch):
    monkeypatch.setattr(pipeline, "STAGE_MODULES", {"ghost": "cellsynth.ghost.stage"})
    assert pipeline.load_stage("ghost") is None
    assert pipeline.available_stages() == []
    with pytest.raises(ConfigError, match="stage: unknown stage 'nope'"):
        pipeline.load_stage("nope")


def test_recover_drops_tables_a_killed_first_run_created(rt, monkeypatch):
    calls: list[str] = []
    modules = {"maker": _fake_stage("maker", calls, outputs=("mdt_reports",))}
    monkeypatch.setattr(pipeline, "STAGE_MODULES", modules)
    # A first run that committed a table and died before the registry heard of its success.
    rt.registry.start("run-dead", "maker", "h", {})
    rt.lake.write("mdt_reports", pd.DataFrame({
        "report_id": ["a"], "ts": pd.to_datetime(["2026-01-05"], utc=True), "window": ["all"], "x_m": [0.0],
        "y_m": [0.0], "serving_cell_id": ["c"], "rsrp_dbm": [-90.0], "cell_shard": [0], "ingest_run_id": ["run-dead"],
    }))
    assert pipeline.recover(rt) == {"mdt_reports": "dropped: created by a run that never succeeded"}
    assert not rt.lake.exists("mdt_reports")
    assert pipeline.recover(rt) == {}
