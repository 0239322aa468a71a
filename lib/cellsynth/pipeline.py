"""Runs stages in order through the run registry: skip what has not changed, record the rest.

A stage is skipped when its config sections, the versions of the lake tables it reads and its
external inputs (raw files) are the same as at its last successful run and its outputs still
exist. Before anything runs, tables that a killed run moved past their last good version are
restored (see `RunRegistry.recover`).

Incremental runs (`run_pipeline(..., incremental=True)`, `cellsynth run --incremental`): a stage
whose `run` takes `partitions` gets only the (window, cell_shard) partitions whose inputs changed
since the versions its last successful run read (and, for appends, the cells whose rows were
added); it overwrites only their rows. The registry note says what was retrained and skipped.

Radio models are per cell and learn from every report that measured the cell, so one appended
report touches the models of all the cells it heard. A cell is retrained only when the change is
material (`retrain_rule`): its serving rows changed, or its added/removed held-in measurement
rows since the version its model was trained on reach `run.incremental_min_changed_share` of its
training rows. The change is read from the Delta version diff (added/removed files only).
"""

from __future__ import annotations

import importlib
import inspect
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from types import ModuleType

import numpy as np
import pandas as pd

from cellsynth.cluster import Runtime
from cellsynth.errors import ConfigError
from cellsynth.stages import STAGE_MODULES, StageResult

# Inputs partitioned by (window, cell_shard), with the column naming the cell a row belongs to.
_PARTITIONED_INPUTS = {"mdt_reports": "serving_cell_id", "mdt_measurements": "cell_id"}
# Model tables whose rows carry (window, cell_shard, run_id): a row-level diff finds the partitions.
_MODEL_INPUTS = ("kde_models", "radio_models")
# Stage -> the input whose per-cell changes pass through `retrain_rule` instead of marking partitions.
_MATERIAL_INPUTS = {"radio": "mdt_measurements"}
# Inputs whose changes an incremental plan leaves to another input: generate reads
# mdt_measurements only for the neighbour-detection maps; a cell whose measurements changed
# materially gets a new radio model, and the radio_models diff regenerates its partitions.
_COVERED_INPUTS = {"generate": {"mdt_measurements"}}
_MAX_LISTED = 12
# Incremental runs give a stage one Ray actor per this many retrained cells (at most
# runtime.ray.n_actors): the radio stage's batched SVI loop costs about the same per step for 5
# cells as for 50, and each actor is a fresh process importing torch/pyro, so splitting a few
# cells over actors multiplies CPU time that a shared node does not have to spare.
_CELLS_PER_ACTOR = 32


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


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


def _enabled(name: str, rt: Runtime) -> bool:
    cfg = rt.cfg
    return {
        "simulate": cfg.scenario.enabled,
        "traffic": cfg.traffic.enabled,
        "report": cfg.report.enabled,
        "plan": cfg.plan.enabled,
    }.get(name, True)


class IncrementalPlan:
    """What an incremental run of one stage retrains: `partitions` None means a full run (`why`).

    `skipped_cells` (radio): cells whose data changed below the retrain threshold, with why.
    """

    def __init__(self, partitions: set[tuple[str, int]] | None, cells: set[str] | None, why: str,
                 n_partitions: int = 0, since_run: str = "", skipped_cells: dict[str, str] | None = None,
                 n_cells: int = 0) -> None:
        self.partitions, self.cells, self.why = partitions, cells, why
        self.n_partitions, self.since_run = n_partitions, since_run
        self.skipped_cells, self.n_cells = dict(skipped_cells or {}), n_cells
        # density: the windows whose area density f_j^O is refit (None: every window in partitions)
        # and the ones kept because their reports changed under the threshold, with why.
        self.area_windows: set[str] | None = None
        self.kept_areas: dict[str, str] = {}

    def note(self) -> str:
        parts = sorted(self.partitions or ())
        shown = ", ".join(f"{w}/{s}" for w, s in parts[:_MAX_LISTED]) + (" ..." if len(parts) > _MAX_LISTED else "")
        cells = "every cell in them" if self.cells is None else f"{len(self.cells)} changed cells"
        text = (f"incremental since run {self.since_run}: retrained {len(parts)} of {self.n_partitions} (window, cell_shard) "
                f"partitions ({shown}; {cells}); skipped {max(0, self.n_partitions - len(parts))} unchanged")
        if self.kept_areas:
            text += "; kept the area density of " + ", ".join(f"{w} ({why})" for w, why in sorted(self.kept_areas.items()))
        return text + self.skipped_note()

    def skipped_note(self) -> str:
        if not self.skipped_cells:
            return ""
        items = sorted(self.skipped_cells.items())
        shown = ", ".join(f"{c} ({why})" for c, why in items[:_MAX_LISTED]) + (" ..." if len(items) > _MAX_LISTED else "")
        retrained = "" if self.cells is None else f"retrained {len(self.cells)} of {self.n_cells} cells; "
        return f"; {retrained}kept {len(items)} changed cells' models, change under the threshold: {shown}"


def retrain_rule(changes: pd.DataFrame, n_train: dict[str, int], *, min_changed_share: float, test_fraction: float,
                 seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Which changed cells need a new radio model: ({cell: why retrained}, {cell: why kept}).

    Args:
        changes: changed mdt_measurements rows (report_id, cell_id, role, change = +1 added /
            -1 removed) since the version each cell's model was trained on.
        n_train: the rows each cell's current model was trained on (absent: no model yet).
        min_changed_share: `run.incremental_min_changed_share`; 0 retrains on any change.

    A cell is retrained when it has no model, its serving rows changed, or its changed held-in
    rows (the held-out ones never train) reach `min_changed_share` of its training rows.
    """
    from cellsynth.splits import random_test_mask

    retrain: dict[str, str] = {}
    kept: dict[str, str] = {}
    if changes.empty:
        return retrain, kept
    held_in = ~random_test_mask(changes["report_id"].to_numpy(), test_fraction=test_fraction, seed=seed)
    frame = pd.DataFrame({
        "cell_id": changes["cell_id"].astype(str).to_numpy(),
        "n_rows": changes["change"].abs().to_numpy(),
        "n_held_in": np.where(held_in, changes["change"].abs().to_numpy(), 0),
        "serving": (changes["role"] == "serving").to_numpy(),
    })
    per_cell = frame.groupby("cell_id", sort=True).agg(n_rows=("n_rows", "sum"), n_held_in=("n_held_in", "sum"),
                                                        serving=("serving", "any"))
    for cell, row in per_cell.iterrows():
        n_changed, trained_on = int(row.n_held_in), n_train.get(cell)
        if trained_on is None:
            retrain[cell] = "no model yet"
        elif row.serving:
            retrain[cell] = "serving rows changed"
        elif min_changed_share == 0.0:
            retrain[cell] = f"{int(row.n_rows)} rows changed (threshold 0: any change)"
        elif n_changed >= min_changed_share * max(trained_on, 1):
            retrain[cell] = f"{n_changed} held-in rows changed, {n_changed / max(trained_on, 1):.1%} of {trained_on}"
        else:
            kept[cell] = (f"{n_changed} held-in rows changed, {n_changed / max(trained_on, 1):.1%} of {trained_on} "
                          f"< {min_changed_share:g}")
    return retrain, kept


def _plan_material(rt: Runtime, table: str, last: dict, windows: list[str], n_total: int) -> IncrementalPlan:
    """Radio's plan: the cells whose measurements changed materially (`retrain_rule`), each
    against the `table` version its current model was trained on, so that changes kept under the
    threshold add up over later runs instead of being forgotten."""
    from cellsynth.lake.changes import changed_rows

    lake, cfg = rt.lake, rt.cfg
    current = lake.version(table)
    cells = lake.read_pandas("cells", columns=["cell_id", "cell_shard"])
    shard_of = dict(zip(cells["cell_id"].astype(str), cells["cell_shard"].astype(int)))
    models = lake.read_pandas("radio_models", columns=["cell_id", "target", "n_train", "source_version"])
    models["cell_id"] = models["cell_id"].astype(str)
    n_train = {str(c): int(v) for c, v in models.groupby("cell_id")["n_train"].max().items()}
    trained_at = {str(c): int(v) for c, v in models.groupby("cell_id")["source_version"].min().items()}
    fallback = last["input_versions"].get(table)  # cells without a model: since the last run
    retrain: dict[str, str] = {}
    kept: dict[str, str] = {}
    for base in sorted({*trained_at.values(), *([fallback] if fallback is not None else [])}):
        if base == current:
            continue
        mine = {c for c, v in trained_at.items() if v == base} | ({c for c in shard_of if c not in trained_at}
                                                                 if base == fallback else set())
        frames = []
        for (_window, shard), rows in changed_rows(lake, table, base, columns=["report_id", "cell_id", "role"],
                                                   until_version=current).items():
            if rows is None:  # rewritten and not readable row by row: every cell of the shard
                retrain.update({c: "partition rewritten" for c, s in shard_of.items() if s == shard and c in mine})
            else:
                frames.append(rows[rows["cell_id"].astype(str).isin(mine)])
        if frames:
            again, under = retrain_rule(pd.concat(frames, ignore_index=True), n_train,
                                        min_changed_share=cfg.run.incremental_min_changed_share,
                                        test_fraction=cfg.evaluate.test_fraction, seed=cfg.run.seed)
            retrain.update(again)
            kept.update(under)
    kept = {c: why for c, why in kept.items() if c not in retrain}
    partitions = {(w, shard_of[c]) for c in retrain if c in shard_of for w in windows}
    plan = IncrementalPlan(partitions, set(retrain), "", max(n_total, len(partitions)), last["run_id"],
                           skipped_cells=kept, n_cells=len(shard_of))
    if not retrain:
        plan.why = (f"no cell's data changed materially since run {last['run_id']} "
                    f"(run.incremental_min_changed_share={cfg.run.incremental_min_changed_share:g})" + plan.skipped_note())
    return plan


def _area_windows(rt: Runtime, windows: set[str]) -> tuple[set[str], dict[str, str]]:
    """Density's area density f_j^O is a KDE of every held-in report of window j: refit it only
    when the window's changed held-in reports, since the version it was fit on, reach
    `run.incremental_min_changed_share` of the reports it was fit on. ({refit}, {kept: why})."""
    from cellsynth.lake.changes import changed_rows
    from cellsynth.schemas import AREA_CELL_ID
    from cellsynth.splits import random_test_mask

    lake, cfg = rt.lake, rt.cfg
    share = cfg.run.incremental_min_changed_share
    areas = lake.read_pandas("kde_models", columns=["window", "cell_id", "n_reports", "source_version"],
                             filters=[("cell_id", "=", AREA_CELL_ID)])
    fitted = {str(r.window): (int(r.n_reports), int(r.source_version)) for r in areas.itertuples()}
    current = lake.version("mdt_reports")
    refit = {w for w in windows if w not in fitted}
    kept: dict[str, str] = {}
    for base in sorted({v for w, (_, v) in fitted.items() if w in windows}):
        mine = {w for w, (_, v) in fitted.items() if v == base and w in windows}
        counted: dict[str, int] = dict.fromkeys(mine, 0)
        for (window, _shard), rows in changed_rows(lake, "mdt_reports", base, columns=["report_id"],
                                                   until_version=current).items():
            if window not in mine:
                continue
            if rows is None:
                refit.add(window)
                continue
            held_in = ~random_test_mask(rows["report_id"].to_numpy(), test_fraction=cfg.evaluate.test_fraction, seed=cfg.run.seed)
            counted[window] += int(rows["change"].abs().to_numpy()[held_in].sum())
        for window, n_changed in counted.items():
            n_fit = max(fitted[window][0], 1)
            if window in refit or (share == 0.0 and n_changed > 0) or (share > 0.0 and n_changed >= share * n_fit):
                refit.add(window)
            else:
                kept[window] = f"{n_changed} held-in reports changed, {n_changed / n_fit:.1%} of {n_fit} < {share:g}"
    return refit, kept


def plan_incremental(name: str, mod: ModuleType, rt: Runtime, config_hash: str, inputs: dict) -> IncrementalPlan:
    """Which (window, cell_shard) partitions (and cells) of stage `name` need retraining.

    Compares the input tables at the versions the stage's last successful run read with their
    current versions. A changed config, a changed non-partitioned input (cells, raw files) or no
    earlier success means a full run (`partitions` None, `why` says so).
    """
    from cellsynth.lake.changes import changed_cells, changed_model_partitions
    from cellsynth.windows import window_labels

    if "partitions" not in inspect.signature(mod.run).parameters:
        return IncrementalPlan(None, None, "stage has no partition-level run")
    lake, cfg = rt.lake, rt.cfg
    last = rt.registry.last_success(name)
    if last is None:
        return IncrementalPlan(None, None, "no earlier successful run")
    if last["config_hash"] != config_hash:
        return IncrementalPlan(None, None, f"config changed since run {last['run_id']}")
    if any(lake.version(t) is None for t in getattr(mod, "OUTPUTS", ())):
        return IncrementalPlan(None, None, "an output table is missing")
    windows = window_labels(cfg.ingest.windows)
    changed: dict[tuple[str, int], set[str] | None] = {}
    # generate reads synthetic_traffic only for that load scenario; traffic rewrites it whole.
    unread = {"synthetic_traffic"} if name == "generate" and cfg.generate.load_scenario != "synthetic_traffic" else set()
    material = _MATERIAL_INPUTS.get(name)
    unread |= _COVERED_INPUTS.get(name, set())
    n_total = len(windows) * cfg.ingest.n_cell_shards
    for table, version in inputs.items():
        before = last["input_versions"].get(table)
        if table in unread or table == material:
            continue
        if before == version:
            continue
        if before is None or version is None or table not in (*_PARTITIONED_INPUTS, *_MODEL_INPUTS):
            return IncrementalPlan(None, None, f"{table} changed (v{before} -> v{version}) and is not partitioned")
        if table in _PARTITIONED_INPUTS:
            found = changed_cells(lake, table, before, cell_col=_PARTITIONED_INPUTS[table], until_version=version)
        else:
            found = dict.fromkeys(changed_model_partitions(lake, table, before, windows=windows, until_version=version))
        for key, cells in found.items():
            old = changed.get(key, set())
            changed[key] = None if (cells is None or old is None) else old | cells
    if material is not None and inputs.get(material) is not None:
        if last["input_versions"].get(material) is None or not lake.exists("radio_models"):
            return IncrementalPlan(None, None, f"{material} has no earlier version to compare with")
        return _plan_material(rt, material, last, windows, n_total)
    if not changed:
        return IncrementalPlan(set(), set(), f"no partition changed since run {last['run_id']}", n_total, last["run_id"])
    cells_all: set[str] | None = set()
    for cells in changed.values():
        cells_all = None if (cells is None or cells_all is None) else cells_all | cells
    plan = IncrementalPlan(set(changed), cells_all, "", max(n_total, len(changed)), last["run_id"])
    if "area_windows" in inspect.signature(mod.run).parameters and lake.exists("kde_models"):
        plan.area_windows, plan.kept_areas = _area_windows(rt, {w for w, _ in changed})
    return plan


def _fewer_actors(cfg, plan: IncrementalPlan, jobs_per_group: int = 1):
    """The config an incremental stage runs with: one actor per `_CELLS_PER_ACTOR` retrained cells,
    times the independent jobs a stage splits each group of cells into (its JOBS_PER_GROUP: radio
    trains RSRP and RSRQ on separate actors, which halves its wall time and adds no CPU time)."""
    ray_cfg = cfg.runtime.ray
    if plan.cells is None:
        return cfg
    n_actors = max(1, min(ray_cfg.n_actors, jobs_per_group * -(-len(plan.cells) // _CELLS_PER_ACTOR)))
    if n_actors == ray_cfg.n_actors:
        return cfg
    runtime = cfg.runtime.model_copy(update={"ray": ray_cfg.model_copy(update={"n_actors": n_actors})})
    return cfg.model_copy(update={"runtime": runtime})


def run_stage(name: str, rt: Runtime, *, run_id: str, force: bool = False, incremental: bool = False) -> StageResult:
    """Run one stage through the registry (or skip it when nothing it depends on changed).

    `incremental`: a stage that supports it retrains only the partitions whose inputs changed
    since its last successful run (see `plan_incremental`); the others run as usual.
    """
    mod = load_stage(name)
    if mod is None:
        return StageResult(stage=name, run_id=run_id, skipped=True, note="not available in this build")
    cfg, lake, registry = rt.cfg, rt.lake, rt.registry
    config_hash = cfg.section_hash(*getattr(mod, "CONFIG_SECTIONS", ()))
    inputs: dict = {table: lake.version(table) for table in getattr(mod, "INPUTS", ())}
    fingerprint = getattr(mod, "external_fingerprint", None)
    if fingerprint is not None:
        inputs["__external__"] = fingerprint(cfg)
    outputs = tuple(getattr(mod, "OUTPUTS", ()))
    reason = None if force else registry.unchanged_since_success(name, config_hash, inputs, outputs)
    record = registry.start(run_id, name, config_hash, inputs)
    if reason is not None:
        last = registry.last_success(name) or {}
        registry.skip(record, reason, outputs=last.get("output_versions"))
        return StageResult(stage=name, run_id=run_id, skipped=True, note=reason,
                           table_versions=dict(last.get("output_versions") or {}))
    plan = plan_incremental(name, mod, rt, config_hash, inputs) if incremental and not force else None
    if plan is not None and plan.partitions is not None and not plan.partitions:
        last = registry.last_success(name) or {}
        registry.skip(record, plan.why, outputs=last.get("output_versions"))
        return StageResult(stage=name, run_id=run_id, skipped=True, note=plan.why,
                           table_versions=dict(last.get("output_versions") or {}))
    kwargs: dict = {}
    if plan is not None and plan.partitions is not None:
        kwargs["partitions"] = plan.partitions
        if "cells" in inspect.signature(mod.run).parameters and plan.cells is not None:
            kwargs["cells"] = plan.cells
        if plan.area_windows is not None:
            kwargs["area_windows"] = plan.area_windows
        rt.log(f"[bold]{name}[/bold] ({plan.note()})")
        cfg = _fewer_actors(cfg, plan, getattr(mod, "JOBS_PER_GROUP", 1))
    else:
        rt.log(f"[bold]{name}[/bold]" + (f" (full: {plan.why})" if plan is not None else ""))
    try:
        result = mod.run(cfg, rt, run_id=run_id, **kwargs)
    except BaseException as err:
        registry.fail(record, err)
        raise
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
        for table in getattr(mod, "OUTPUTS", ()) if mod is not None else ():
            if table not in good and table != "metrics" and lake.exists(table):
                lake.drop(table)
                done[table] = "dropped: created by a run that never succeeded"
    return done


def run_pipeline(
    rt: Runtime, *, stages: Iterable[str] | None = None, run_id: str | None = None, force: bool = False,
    incremental: bool = False,
) -> tuple[str, list[StageResult]]:
    """Run the chain (all available stages by default) and return (run_id, results).

    `incremental`: retrain and regenerate only the (window, cell_shard) partitions whose inputs
    changed since each stage's last successful run; the registry notes what was skipped and why.
    """
    run_id = run_id or new_run_id()
    for table, action in recover(rt).items():
        rt.log(f"{table}: {action}")
    names = list(stages) if stages is not None else [n for n in STAGE_MODULES if _enabled(n, rt)]
    results = [run_stage(name, rt, run_id=run_id, force=force, incremental=incremental) for name in names]
    return run_id, results


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
