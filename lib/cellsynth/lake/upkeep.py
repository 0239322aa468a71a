"""Retention for lake tables: VACUUM and OPTIMIZE that never break a version a kept run still
references (its inputs or outputs in the `runs` table), so time travel to a kept run keeps working
and `RunRegistry.recover()` can always restore a last good version.

Kept runs: every recorded run by default; with `lake.keep_runs: N`, the N newest runs in which some stage
succeeded (a pipeline, stage or what-if run id; runs that only skipped do not count) and every record since
the oldest of them (compactions, restores, a killed or running run), so a lake on a schedule stops growing
with every regeneration. Whatever N, vacuum keeps each stage's last success (its inputs are the baseline of
the registry's skip check and of `run --incremental`) and each table's last good version (what `recover()`
restores)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pyarrow import fs as pafs

from cellsynth.errors import LakeError
from cellsynth.lake.registry import RUNS, RunRecord, RunRegistry, _now
from cellsynth.lake.table import Lake

# Registry records written by upkeep itself, not by a run: compactions and recover()'s restores.
MAINTENANCE_STAGES = ("upkeep", "recover")


@dataclass(frozen=True)
class Retention:
    """What vacuum keeps: {table: versions}, and the run ids whose model folders stay (None: every run)."""

    versions: dict[str, set[int]]
    run_ids: frozenset[str] | None


def _add(refs: dict[str, set[int]], raw: str | None) -> None:
    for table, version in json.loads(raw or "{}").items():
        if isinstance(version, int):
            refs.setdefault(table, set()).add(version)


def retention(registry: RunRegistry, keep_runs: int | None = None) -> Retention:
    """The versions vacuum keeps (module docstring). keep_runs None (or 0): every run that did not fail."""
    if keep_runs is not None and keep_runs < 0:
        raise LakeError(f"keep_runs must be >= 0, got {keep_runs}")
    df = registry.frame()
    live = df[df["status"] != "failed"]
    if not keep_runs:
        kept, run_ids = live, None
    else:
        # runs that made something: a killed or in-flight run, or one that skipped every stage (nothing had
        # changed; a daily schedule makes many), does not take a producing run's place
        done = live[~live["stage"].isin(MAINTENANCE_STAGES) & (live["status"] == "succeeded")]
        started = live[live["run_id"].isin(done["run_id"])].groupby("run_id")["started_at"].min()
        newest = started.sort_values(ascending=False, kind="stable").iloc[:keep_runs]
        run_ids = frozenset(str(r) for r in newest.index)
        # and every record since the oldest kept run's start: compactions, restores, a run in flight
        since = live["started_at"] >= newest.min() if len(newest) else live["started_at"].notna()
        kept = live[live["run_id"].astype(str).isin(run_ids) | since]
    versions: dict[str, set[int]] = {}
    for col in ("input_versions", "output_versions"):
        for raw in kept[col]:
            _add(versions, raw)
    if run_ids is not None:
        succeeded = live[(live["status"] == "succeeded") & ~live["stage"].isin(MAINTENANCE_STAGES)]
        for _, last in succeeded.groupby("stage").tail(1).iterrows():
            _add(versions, last["input_versions"])
            _add(versions, last["output_versions"])
        for table, version in registry.last_good_versions(df).items():
            versions.setdefault(table, set()).add(version)
    return Retention(versions, run_ids)


def referenced_versions(registry: RunRegistry, keep_runs: int | None = None) -> dict[str, set[int]]:
    """{table: versions} vacuum keeps: named as an input or output by a kept run (`retention`)."""
    return retention(registry, keep_runs).versions


def vacuum(lake: Lake, *, tables: list[str] | None = None, retention_hours: int = 168,
           dry_run: bool = False, keep_runs: int | None = None) -> dict[str, list[str]]:
    """Delete data files no longer in a table's latest version, older than `retention_hours`, and
    in no version a kept run references (`retention`), and files no commit ever took (a killed run's staged files: Spark's
    staging folders, Ray tasks' part files) older than `retention_hours` (delta-rs' "full" vacuum). Returns
    {table: removed paths relative to the table}.
    """
    refs = referenced_versions(RunRegistry(lake), keep_runs)
    # the registry too: once compacted, its record-per-file history is in no version a run references
    names = tables if tables is not None else [t.name for t in lake.tables()]
    fs, base = lake.filesystem()
    removed: dict[str, list[str]] = {}
    for table in names:
        dt = lake.open_table(table)
        candidates = dt.vacuum(retention_hours=retention_hours, dry_run=True, enforce_retention_duration=False, full=True)
        prefix = lake.uri(table).rstrip("/") + "/"
        keep: set[str] = set()
        for version in sorted(refs.get(table, ())):
            if version > dt.version():
                continue
            keep.update(uri.removeprefix(prefix) for uri in lake.file_uris(table, version=version))
        doomed = sorted(set(candidates) - keep)
        if doomed:  # delta-rs lists every expired tombstone, also those an earlier vacuum already deleted, and
            # on object stores the folder markers pyarrow leaves when it deletes a folder's last file
            infos = fs.get_file_info([f"{base}/{table}/{rel}" for rel in doomed])
            doomed = [rel for rel, info in zip(doomed, infos) if info.type == pafs.FileType.File]
        if not dry_run:
            for rel in doomed:
                try:
                    fs.delete_file(f"{base}/{table}/{rel}")
                except FileNotFoundError:
                    continue
                except OSError as err:
                    raise LakeError(f"vacuum '{table}': cannot delete {rel}: {err}") from err
        removed[table] = doomed
    return removed


# Model files beside the tables, one folder per run: models/<kind>/<run_id>/. The folders of radio and KDE
# models are named by the `path` column of their table; traffic weights by the run that trained them.
MODEL_TABLES = {"radio": "radio_models", "kde": "kde_models"}
RUN_MODELS = ("traffic",)


def _models_in_use(lake: Lake, kept: Retention) -> dict[str, set[str]]:
    """{kind: run ids} whose model folder a kept version names: the latest version of radio_models /
    kde_models and every kept version (their `path` rows); traffic: its kept succeeded runs and its last success."""
    refs = kept.versions
    out: dict[str, set[str]] = {}
    for kind, table in MODEL_TABLES.items():
        used: set[str] = set()
        if lake.exists(table):
            latest = lake.version(table)
            for version in sorted({latest, *(v for v in refs.get(table, ()) if v <= latest)}):
                paths = lake.read_pandas(table, version=version, columns=["path"])["path"].dropna().astype(str)
                used.update(p.split("/")[2] for p in paths.unique() if p.startswith(f"models/{kind}/") and p.count("/") >= 2)
        out[kind] = used
    runs = RunRegistry(lake).frame()
    for kind in RUN_MODELS:  # a stage of that name that succeeded (a killed one stays "running")
        ok = runs.loc[(runs["stage"] == kind) & (runs["status"] == "succeeded"), "run_id"].astype(str)
        out[kind] = set(ok) if kept.run_ids is None else set(ok[ok.isin(kept.run_ids)]) | set(ok.iloc[-1:])
    return out


def vacuum_models(lake: Lake, *, retention_hours: int = 168, dry_run: bool = False,
                  keep_runs: int | None = None) -> dict[str, list[str]]:
    """Delete model folders (models/<kind>/<run_id>/) that no kept version names (`_models_in_use`) and whose
    newest file is older than `retention_hours`: the weights of killed or failed runs, which a table VACUUM
    cannot see. Returns {"models/<kind>": removed run ids}."""
    in_use = _models_in_use(lake, retention(RunRegistry(lake), keep_runs))
    fs, base = lake.filesystem()
    cutoff = _now().timestamp() - retention_hours * 3600.0
    removed: dict[str, list[str]] = {}
    for kind, used in in_use.items():
        root = f"{base}/models/{kind}"
        folders = [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                   if i.type == pafs.FileType.Directory]
        doomed = []
        for folder in sorted(folders, key=lambda i: i.base_name):
            if folder.base_name in used:
                continue
            files = fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
            stamps = [i.mtime.timestamp() for i in (*files, folder) if i.mtime is not None]  # object stores: no folder mtime
            newest = max(stamps, default=0.0)
            if newest >= cutoff:
                continue
            doomed.append(folder.base_name)
            if not dry_run:
                try:
                    fs.delete_dir(folder.path)
                except OSError as err:
                    raise LakeError(f"vacuum 'models/{kind}': cannot delete {folder.base_name}: {err}") from err
        removed[f"models/{kind}"] = doomed
    return removed


def optimize(lake: Lake, *, tables: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Compact small files. Each compaction is a new version with the same rows; it is recorded
    as a succeeded `upkeep` run so `recover()` treats it as good. The run registry is compacted too:
    it gains a file per record (about 20 a pipeline run), and every stage reads it whole; its own
    compaction is not recorded (`recover()` never restores it, and a record naming its old version
    would keep every old file from `vacuum`)."""
    registry = RunRegistry(lake)
    names = tables if tables is not None else [t.name for t in lake.tables()]
    out: dict[str, dict[str, Any]] = {}
    for table in names:
        before = lake.version(table)
        metrics = lake.optimize(table)
        after = lake.version(table)
        if after != before and table != RUNS:
            rec = RunRecord(f"upkeep-{_now():%Y%m%dT%H%M%S%f}", "upkeep", "-", {table: before})
            registry.succeed(rec, {table: after}, {}, note=f"optimize: version {before} -> {after}")
        out[table] = {"from_version": before, "to_version": after,
                      "files_added": metrics.get("numFilesAdded", 0), "files_removed": metrics.get("numFilesRemoved", 0)}
    return out


__all__ = ["MAINTENANCE_STAGES", "Retention", "optimize", "referenced_versions", "retention", "vacuum", "vacuum_models"]
