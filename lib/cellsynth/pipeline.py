"""Runs stages in order through the run registry: skip what has not changed, record the rest.

The pipeline knows a stage only through its `StageSpec` (`cellsynth.stages`): a stage is skipped
when the config keys it declares it reads, the versions of the lake tables it reads and its
external inputs (raw files) are the same as at its last successful run and its outputs still
exist. Before anything runs, tables that a killed run moved past their last good version are
restored (see `RunRegistry.recover`).

Incremental runs (`run_pipeline(..., incremental=True)`, `cellsynth run --incremental`): a stage
that declares `incremental` capabilities gets only the (window, cell_shard) partitions whose
inputs changed since its last successful run (see `cellsynth.incremental`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from cellsynth.cluster import Runtime
from cellsynth.errors import ConfigError
from cellsynth.incremental import fewer_actors, plan_incremental, run_kwargs
from cellsynth.memory import release_freed_memory
from cellsynth.stages import STAGE_MODULES, TRAIN_STAGES, StageResult, spec_of

SPARK_STAGES = frozenset({"ingest"})  # stages that use rt.spark (the delta-spark lake engine aside)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


# A run id names model folders (models/<kind>/<run_id>/) and Delta app ids: path-safe characters only.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str) -> str:
    """The run id as given, or a ConfigError naming it (letters, digits, '.', '_', '-'; at most 100)."""
    if not _RUN_ID.fullmatch(run_id):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (first a letter or digit), at most 100")
    return run_id


def load_stage(name: str) -> ModuleType | None:
    """The stage module, or None when that stage has not been built into this install."""
    if name not in STAGE_MODULES:
        raise ConfigError(f"stage: unknown stage {name!r} (expected one of: {', '.join(STAGE_MODULES)})")
    try:
        return importlib.import_module(STAGE_MODULES[name])
    except ModuleNotFoundError as err:
        if err.name and STAGE_MODULES[name].startswith(err.name):
            return None
        raise


def available_stages() -> list[str]:
    return [name for name in STAGE_MODULES if load_stage(name) is not None]


# Stages that learn from MDT reports, directly or through the KDEs. Traffic counters alone still train
# the traffic model (on the cells table's site layout, or on no context at all) and feed the report.
MDT_STAGES = frozenset({"density", "radio", "generate", "evaluate", "plan"})
TRAFFIC_STAGES = frozenset({"traffic", "report"})


def has_mdt_input(cfg) -> bool:
    """The config names MDT reports to ingest: the simulator's, or a `sources.mdt.path`."""
    return bool(cfg.scenario.enabled or cfg.sources.mdt.path)


def enabled_stages(cfg) -> list[str]:
    """Every available stage whose `StageSpec.enabled_by` key is on."""
    return [name for name in STAGE_MODULES if (mod := load_stage(name)) is not None and spec_of(mod).enabled(cfg)]


def default_chain(cfg, *, lake_has_mdt: bool, lake_has_traffic: bool) -> tuple[list[str], list[str]]:
    """(stages, dropped): the enabled stages a run (local or `submit`) goes through, and those it
    leaves out because nothing feeds them: without MDT reports (none configured, none in the lake)
    only ingest, plus traffic and report when there are traffic counters."""
    names = enabled_stages(cfg)
    drop = unfed_stages(cfg, lake_has_mdt=lake_has_mdt, lake_has_traffic=lake_has_traffic)
    return [n for n in names if n not in drop], [n for n in names if n in drop]


def unfed_stages(cfg, *, lake_has_mdt: bool, lake_has_traffic: bool) -> frozenset[str]:
    """The stages nothing feeds: those of MDT_STAGES without MDT reports (configured or in the lake),
    plus TRAFFIC_STAGES when there are no traffic counters either."""
    if has_mdt_input(cfg) or lake_has_mdt:
        return frozenset()
    return MDT_STAGES | (frozenset() if cfg.sources.traffic.path or lake_has_traffic else TRAFFIC_STAGES)


def stale_training(name: str, spec: Any, rt: Runtime) -> list[str]:
    """The training stages (TRAIN_STAGES) that wrote an input of stage `name` under other settings than the
    current config gives them, i.e. that `cellsynth run` would retrain first. Run alone after such a change
    (`cellsynth evaluate --set split.test_fraction=0.5`), `name` reads models made under the old settings:
    evaluate scored "held-out" rows the models had trained on, silently."""
    if name in TRAIN_STAGES or not spec.inputs:  # (simulate, ingest: no training stage module to import)
        return []
    stale, frame = [], None
    for other in TRAIN_STAGES:
        mod = load_stage(other) if other in STAGE_MODULES else None
        if mod is None:
            continue
        other_spec = spec_of(mod)
        if not set(other_spec.outputs) & set(spec.inputs) or not other_spec.enabled(rt.cfg):
            continue
        frame = rt.registry.frame() if frame is None else frame
        last = rt.registry.last_success(other, frame=frame)
        if last is not None and last["config_hash"] != other_spec.config_hash(rt.cfg):
            stale.append(other)
    return stale


def run_stage(name: str, rt: Runtime, *, run_id: str, force: bool = False, incremental: bool = False) -> StageResult:
    """Run one stage through the registry (or skip it when nothing it depends on changed).

    `incremental`: a stage that supports it retrains only the partitions whose inputs changed
    since its last successful run (see `plan_incremental`); the others run as usual.
    """
    mod = load_stage(name)
    if mod is None:
        return StageResult(stage=name, run_id=run_id, skipped=True, note="not available in this build")
    spec = spec_of(mod)
    cfg, lake, registry = rt.cfg, rt.lake, rt.registry
    config_hash = spec.config_hash(cfg)
    inputs: dict = {table: lake.version(table) for table in spec.inputs}
    if spec.external_fingerprint is not None:
        inputs["__external__"] = spec.external_fingerprint(cfg)
    outputs = spec.outputs
    reason = None if force else registry.unchanged_since_success(name, config_hash, inputs, outputs)
    record = registry.start(run_id, name, config_hash, inputs)
    if reason is not None:
        last = registry.last_success(name) or {}
        registry.skip(record, reason, outputs=last.get("output_versions"))
        return StageResult(stage=name, run_id=run_id, skipped=True, note=reason,
                           table_versions=dict(last.get("output_versions") or {}))
    if stale := stale_training(name, spec, rt):
        rt.warn(f"{name}: {', '.join(stale)} last trained under other settings than this config's (a changed "
                f"split.*, or a key of theirs): their models are not this config's; `cellsynth train` (or `run`) first")
    plan = plan_incremental(spec, rt, config_hash, inputs) if incremental and not force else None
    if plan is not None and plan.partitions is not None and not plan.partitions:
        last = registry.last_success(name) or {}
        registry.skip(record, plan.why, outputs=last.get("output_versions"))
        return StageResult(stage=name, run_id=run_id, skipped=True, note=plan.why,
                           table_versions=dict(last.get("output_versions") or {}))
    kwargs = run_kwargs(spec, plan) if plan is not None else {}
    if kwargs:
        rt.log(f"[bold]{name}[/bold] ({plan.note()})")
        cfg = fewer_actors(cfg, plan, spec.incremental.jobs_per_group)
    else:
        rt.log(f"[bold]{name}[/bold]" + (f" (full: {plan.why})" if plan is not None else ""))
    try:
        result = mod.run(cfg, rt, run_id=run_id, **kwargs)
    except BaseException as err:
        registry.fail(record, err)
        raise
    finally:
        release_freed_memory()  # the next stage starts from this one's live objects, not its peak
    versions = {t: v for t in outputs if (v := lake.version(t)) is not None}
    versions.update(result.table_versions)
    result.table_versions = versions
    counts = {"rows_in": result.rows_in, "rows_written": result.rows_written, "rows_rejected": result.rows_rejected}
    if plan is not None:
        extra = plan.note() if plan.partitions is not None else f"full run: {plan.why}"
        result.note = f"{extra}; {result.note}" if result.note else extra
    registry.succeed(record, versions, counts, note=result.note or None)
    return result


def recover(rt: Runtime) -> dict[str, str]:
    """Undo what killed runs left: restore tables past their last good version, and drop tables
    that a stage created in a run that never succeeded (their previous state is "absent").

    Returns {table: what was done}.
    """
    registry, lake = rt.registry, rt.lake
    done = {t: f"restored from version {old} to last good version {new}" for t, (old, new) in registry.recover().items()}
    frame = registry.frame()
    if frame.empty:
        return done
    good = registry.last_good_versions()
    finished = set(frame.loc[frame["status"].isin(["succeeded", "skipped"]), "stage"])
    unfinished = set(frame["stage"]) - finished
    for name in unfinished & set(STAGE_MODULES):
        mod = load_stage(name)
        for table in spec_of(mod).outputs if mod is not None else ():
            if table not in good and table != "metrics" and lake.exists(table):
                lake.drop(table)
                done[table] = "dropped: created by a run that never succeeded"
    return done


def _recover_and_log(rt: Runtime) -> None:
    for table, action in recover(rt).items():
        rt.log(f"{table}: {action}")


def dropped_note(names: list[str], dropped: list[str]) -> str:
    verb = "needs" if len(dropped) == 1 else "need"
    return (f"no MDT reports (sources.mdt.path unset, scenario off): {', '.join(dropped)} {verb} them; "
            + (f"running {', '.join(names)}" if names else "skipped"))


def run_pipeline(
    rt: Runtime, *, stages: Iterable[str] | None = None, run_id: str | None = None, force: bool = False,
    incremental: bool = False, skip_unfed: bool = False,
) -> tuple[str, list[StageResult]]:
    """Run the chain (all available stages by default) and return (run_id, results).

    `incremental`: retrain and regenerate only the (window, cell_shard) partitions whose inputs
    changed since each stage's last successful run; the registry notes what was skipped and why.
    `skip_unfed`: one stage named alone that nothing feeds (`unfed_stages`) comes back skipped with
    the reason instead of failing, as a group's stages do: a scheduler's fixed task list (the Airflow
    DAG) then runs on a traffic-only lake too.
    """
    run_id = check_run_id(run_id) if run_id else new_run_id()
    _recover_and_log(rt)
    lake = rt.lake
    stages = None if stages is None else list(stages)
    dropped: list[str] = []
    if stages is not None and len(stages) == 1 and not skip_unfed:
        names = stages  # one stage asked for by name runs, and says what it misses
    else:  # e.g. a traffic-only source: ingest it, train the traffic model, and say why the rest does not run
        flags = {"lake_has_mdt": lake.exists("mdt_reports"), "lake_has_traffic": lake.exists("traffic")}
        if stages is None:
            names, dropped = default_chain(rt.cfg, **flags)
        else:  # a group (`cellsynth train`): the same rule over its stages
            unfed = unfed_stages(rt.cfg, **flags)
            names, dropped = [n for n in stages if n not in unfed], [n for n in stages if n in unfed]
        if dropped:
            rt.log(dropped_note(names, dropped))
    # A lone stage left out is reported, or its command would print an empty run.
    results = ([StageResult(stage=n, run_id=run_id, skipped=True, note=dropped_note(names, dropped))
                for n in dropped] if not names else [])
    for i, name in enumerate(names):
        results.append(run_stage(name, rt, run_id=run_id, force=force, incremental=incremental))
        if not set(names[i + 1:]) & SPARK_STAGES and rt.cfg.lake.engine != "delta-spark":
            # Only ingest runs on Spark: an idle local JVM held 3 GB through a 10^3-cell run's
            # training stages (issue 15), so it goes once no later stage needs it.
            rt.release_spark()
    return run_id, results


# The registry's input key of a what-if's scenario name (`run_whatif`).
SCENARIO_KEY = "__scenario__"


# The tables a what-if writes rows tagged network_scenario=<name> to (its metrics rows are keyed by stage).
_SCENARIO_TABLES = ("network_fields", "spatial_maps", "synthetic_mdt", "synthetic_traffic")


def _scenario_rows_gone(lake: Any, name: str, run_id: str, outputs: str | None, counts: str | None) -> list[str]:
    """The tables to which what-if run `run_id` wrote rows of scenario `name` that are no longer there: a
    regeneration since (`generate --force`, a generate.* change) replaces a table whole, scenario rows included,
    without moving the what-if's inputs. Reads a table only when a commit since may have moved rows."""
    versions = json.loads(outputs or "{}")
    written = (json.loads(counts or "{}").get("rows_written") or {})
    gone = []
    for table in _SCENARIO_TABLES:
        if not written.get(table) or table not in versions:
            continue
        if not lake.rows_changed(table, versions[table], lake.version(table)):
            continue
        if lake.read(table, columns=["run_id"], network_scenario=name, filters=[("run_id", "=", run_id)]).num_rows == 0:
            gone.append(table)
    return gone


def run_whatif(rt: Runtime, changes: Any, *, run_id: str | None = None) -> StageResult:
    """`cellsynth whatif` through the registry like a stage: `recover()` first, then recorded with the
    versions it wrote. Unrecorded, its commits looked like a killed run's to the next pipeline run, whose
    `recover()` restored every table the what-if had appended to: its rows vanished, and the restores made
    generate, evaluate and report rerun."""
    from cellsynth.whatif import stage as whatif_stage

    run_id = check_run_id(run_id) if run_id else new_run_id()
    _recover_and_log(rt)
    lake, registry = rt.lake, rt.registry
    change_hash = hashlib.sha256(changes.model_dump_json().encode()).hexdigest()[:16]
    # One scenario name, one change set: an edited change file under a used name would otherwise be
    # skipped as "already committed" (same run id) or tag two networks alike (another run id).
    inputs = {**{t: lake.version(t) for t in whatif_stage.INPUTS}, SCENARIO_KEY: changes.name}
    frame = registry.frame()
    same_since = None  # a run of this change set on the same inputs: another copy would duplicate its rows
    if not frame.empty:
        done = frame[(frame["stage"] == whatif_stage.NAME) & (frame["status"] == "succeeded")]
        for other_run, other_hash, raw, outputs, counts in zip(done["run_id"], done["config_hash"], done["input_versions"],
                                                                done["output_versions"], done["row_counts"]):
            other = json.loads(raw or "{}")
            if other.get(SCENARIO_KEY) != changes.name:
                continue
            if other_hash != change_hash:
                raise ConfigError(f"changes: name {changes.name!r} already tags the rows of another change set "
                                  f"(run {other_run}); give this change set a new name")
            if other == inputs and not _scenario_rows_gone(lake, changes.name, other_run, outputs, counts):
                same_since = other_run
    record = registry.start(run_id, whatif_stage.NAME, change_hash, inputs)
    if same_since is not None and same_since != run_id:
        note = f"{changes.name}: this change set on the same inputs is run {same_since}'s rows"
        registry.skip(record, note)
        return StageResult(stage=whatif_stage.NAME, run_id=run_id, skipped=True, note=note)
    try:
        result = whatif_stage.run(rt.cfg, rt, run_id=run_id, changes=changes)
    except BaseException as err:
        registry.fail(record, err)
        raise
    if result.skipped:
        registry.skip(record, result.note or "already committed")
        return result
    counts = {"rows_in": result.rows_in, "rows_written": result.rows_written}
    registry.succeed(record, dict(result.table_versions), counts, note=result.note or None)
    return result


def job_main(stages: list[str] | None, argv: list[str] | None, description: str) -> int:
    """The body every `jobs/*.py` entry point shares: args -> config -> runtime -> registry run.

    Going through `run_pipeline` gives spark-submit / ray job submit runs the same recovery,
    skip-on-unchanged and registry records as the CLI. Returns the process exit code.
    """
    import argparse
    import sys

    from cellsynth.cluster import runtime
    from cellsynth.config import load_config
    from cellsynth.errors import CellsynthError, SchemaError

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: all defaults)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.key=value")
    parser.add_argument("--stage", action="append", dest="stages", help="only these stages (repeatable)")
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--force", action="store_true", help="run even when inputs did not change")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        with runtime(cfg, quiet=args.quiet) as rt:
            run_id, results = run_pipeline(rt, stages=args.stages or stages, run_id=args.run_id, force=args.force)
    except CellsynthError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError | SchemaError) else 1
    for r in results:
        if r.skipped:
            print(f"{r.stage} {run_id}: skipped ({r.note})")
            continue
        print(f"{r.stage} {run_id}: written={r.rows_written} versions={r.table_versions} metrics={r.metrics}")
        for name, where in r.artifacts.items():
            print(f"{name}: {where}")
    return 0
