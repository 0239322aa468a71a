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


def test_a_compaction_of_the_inputs_reruns_nothing(rt, fake_chain):
    from cellsynth.lake.upkeep import optimize

    for k in range(2):  # files for the compaction to merge
        rt.lake.write("metrics", pd.DataFrame({"run_id": ["x"], "stage": ["other"], "metric": ["m"], "value": [0.0]}))
    pipeline.run_pipeline(rt)
    before = rt.lake.version("metrics")
    assert optimize(rt.lake, tables=["metrics"])["metrics"]["to_version"] == before + 1
    _, res = pipeline.run_pipeline(rt)
    assert [r.skipped for r in res] == [True, True] and fake_chain == ["first", "second"]
    assert "metrics: compacted or what-if rows only since" in res[1].note
    rt.lake.write("metrics", pd.DataFrame({"run_id": ["x"], "stage": ["other"], "metric": ["m"], "value": [1.0]}))
    _, res = pipeline.run_pipeline(rt)
    assert [r.skipped for r in res] == [True, False] and fake_chain == ["first", "second", "second"]


def test_config_change_reruns_and_downstream_follows(rt, fake_chain, tmp_path):
    from cellsynth_testkit import local_runtime, test_config

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


# ------------------------------------------------------------------------------ stage contract
_PIPELINE_SECTIONS = ("run", "runtime", "lake", "scenario", "sources", "ingest", "density", "radio", "traffic",
                      "generate", "split", "privacy", "evaluate", "report")
# Where and how fast a stage runs, not what it computes: left out of the skip hash.
_NOT_MATERIAL = ("runtime", "lake")
_NOT_MATERIAL_KEYS = ("generate.use_ray",)  # where the tasks run (Ray or the driver): the same rows


def _covered(key: str, reads: tuple[str, ...]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in reads for i in range(1, len(parts) + 1))


def _stage_sources(module: str) -> str:
    """The stage module and the private/helper modules of its package (not other stage modules)."""
    import importlib
    from pathlib import Path

    path = Path(importlib.import_module(module).__file__)
    files = [path] + [p for p in sorted(path.parent.glob("*.py")) if p != path and not p.stem.endswith("stage")]
    return "\n".join(p.read_text() for p in files)


@pytest.mark.parametrize("name", list(stages.STAGE_MODULES))
def test_declared_reads_cover_the_config_the_stage_reads(name):
    """Every `cfg.<section>.<key>` a stage package reads is in its StageSpec.reads (the skip
    hash), and a package that draws the train/test split declares the split's keys."""
    import re

    from cellsynth.splits import SPLIT_KEYS

    spec = stages.spec_of(pipeline.load_stage(name))
    text = _stage_sources(stages.STAGE_MODULES[name])
    sections = "|".join(_PIPELINE_SECTIONS)
    missing = set()
    for section, key in re.findall(rf"\bcfg\.({sections})\b(?:\.([a-z_]+))?", text):
        if section in _NOT_MATERIAL or key in ("model_dump", "model_copy"):
            key = ""
        if section in _NOT_MATERIAL:
            continue
        dotted = f"{section}.{key}" if key else section
        if dotted not in _NOT_MATERIAL_KEYS and not _covered(dotted, spec.reads):
            missing.add(dotted)
    if re.search(r"\b(held_out|split_held_out|split_seed)\(", text):
        missing |= {k for k in SPLIT_KEYS if not _covered(k, spec.reads)}
    assert not missing, f"{name}: reads {sorted(missing)} but STAGE.reads = {spec.reads}"
    for key in spec.reads:  # every declared key exists (section_hash raises on a typo)
        from cellsynth.config import PipelineConfig

        PipelineConfig().section_hash(key)


def _spec_stub(name: str, calls: list[str]):
    """A module with the real stage's StageSpec (inputs, outputs, reads) and a run that records."""
    import dataclasses

    spec = dataclasses.replace(stages.spec_of(pipeline.load_stage(name)), external_fingerprint=None)
    mod = types.ModuleType(f"tests_spec_{name}")
    mod.STAGE = spec

    def run(cfg, rt, *, run_id):
        calls.append(name)
        return StageResult(stage=name, run_id=run_id)

    mod.run = run
    sys.modules[mod.__name__] = mod
    return mod.__name__


# Config change -> exactly the stages whose declared reads cover it (lake tables unchanged; a
# stage downstream of one that rewrites a table also reruns through that table's new version).
_SPLIT_RERUNS = {
    "split.test_fraction=0.3": {"density", "radio", "generate", "evaluate"},
    "split.seed=7": {"density", "radio", "generate", "evaluate"},
    "run.seed=7": {"simulate", "density", "radio", "traffic", "generate", "evaluate", "plan"},
    "split.block_m=300": {"evaluate"},
    "ingest.windows.hours_per_window=12": {"simulate", "ingest", "density", "traffic", "plan"},
    "ingest.n_cell_shards=4": {"ingest", "traffic", "generate"},
    "generate.neighbour_radius_m=2000": {"generate"},
    "privacy.min_dcr_ratio=0.8": {"generate", "evaluate"},  # evaluate applies the guard rule to its flag (issue 16)
    "runtime.ray.n_actors=1": set(),
}


@pytest.mark.parametrize("override", list(_SPLIT_RERUNS))
def test_a_split_or_shared_key_change_reruns_exactly_the_stages_that_read_it(tmp_path, monkeypatch, override):
    from cellsynth_testkit import local_runtime
    from cellsynth.config import apply_overrides, config_from_dict

    names = [n for n in stages.STAGE_MODULES if n != "report"]
    calls: list[str] = []
    modules = {n: _spec_stub(n, calls) for n in names}
    monkeypatch.setattr(stages, "STAGE_MODULES", modules)
    monkeypatch.setattr(pipeline, "STAGE_MODULES", modules)
    base = {"run": {"lake_root": str(tmp_path / "lake"), "data_dir": str(tmp_path / "data")},
            "runtime": {"ray": {"num_cpus": 2}}}
    rt = local_runtime(tmp_path, config_from_dict(base))
    pipeline.run_pipeline(rt, stages=names)
    assert calls == names
    calls.clear()
    _, again = pipeline.run_pipeline(rt, stages=names)
    assert all(r.skipped for r in again) and calls == []
    rt2 = local_runtime(tmp_path, config_from_dict(apply_overrides(base, [override])))
    _, results = pipeline.run_pipeline(rt2, stages=names)
    assert {r.stage for r in results if not r.skipped} == _SPLIT_RERUNS[override]


def test_a_stage_run_alone_warns_when_its_models_were_trained_under_other_settings(rt, capsys):
    # `cellsynth evaluate --set split.test_fraction=0.5` on a lake trained at 0.35 scored rows the models
    # had trained on as held out, silently (exit 0)
    radio = stages.spec_of(pipeline.load_stage("radio"))
    evaluate = stages.spec_of(pipeline.load_stage("evaluate"))
    rec = rt.registry.start("r1", "radio", radio.config_hash(rt.cfg), {})
    rt.registry.succeed(rec, {}, {})
    assert pipeline.stale_training("evaluate", evaluate, rt) == []
    changed = rt.cfg.model_copy(update={"split": rt.cfg.split.model_copy(update={"test_fraction": 0.5})})
    rt.cfg = changed
    assert pipeline.stale_training("evaluate", evaluate, rt) == ["radio"]
    assert pipeline.stale_training("radio", radio, rt) == []  # a training stage retrains; nothing to say
    with pytest.raises(Exception):  # nothing to evaluate on this empty lake; the warning comes first
        pipeline.run_stage("evaluate", rt, run_id="r2")
    assert "warning: evaluate: radio last trained under other settings" in " ".join(capsys.readouterr().err.split())
