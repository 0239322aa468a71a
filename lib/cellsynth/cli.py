"""`cellsynth` command line: parse options, load config, call stages. No logic of its own.

Exit codes: 0 ok, 2 bad input or config, 1 any other failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cellsynth.config import PipelineConfig, load_config
from cellsynth.errors import CellsynthError, ConfigError, SchemaError
from cellsynth.stages import TRAIN_STAGES, StageResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthetic MDT and traffic data you can trust.")
# Pipes and CI logs get a wide console: rich would otherwise squeeze tables into 80 columns.
out = Console(width=None if Console().is_terminal else 160)
# An error is one line in any log (no wrapping at the console width), and its text is not read as markup.
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: conf/local.yaml if present)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: section.key=value (repeatable)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs (for schedulers)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run stages even when nothing they depend on changed")]
SkipUnfedOpt = Annotated[bool, typer.Option("--skip-unfed", help="For a scheduler's fixed task list: when nothing feeds "
                                                                 "the stage (no MDT reports configured or in the lake), "
                                                                 "report it skipped with the reason and exit 0 instead of failing")]
RunIdOpt = Annotated[str | None, typer.Option("--run-id", help="Run id (default: time + random suffix); a scheduler passes one per "
                                                             "scheduled run so its tasks and retries are one run")]


def _config(path: Path | None, overrides: list[str] | None) -> PipelineConfig:
    if path is None and Path("conf/local.yaml").is_file():
        path = Path("conf/local.yaml")
    return load_config(path, overrides or [])


def _fail(err: BaseException) -> None:
    # a stage error raised inside a Ray task arrives as RayTaskError(StageError): say the error, not the
    # task's traceback (the cause is the exception the task raised)
    cause = getattr(err, "cause", None)
    if isinstance(cause, CellsynthError):
        err = cause
    code = 2 if isinstance(err, ConfigError | SchemaError) else 1
    err_console.print(f"[red]{type(err).__name__}[/red]: {escape(str(err))}")
    raise typer.Exit(code)


def shown_note(note: str | None) -> str:
    """A stage's note as the run summary shows it: its words, without the JSON record some stages
    append for the registry (ingest's frame and reject counts)."""
    return (note or "").split("{", 1)[0].strip().rstrip(";").strip()


def shown_figure(value: float) -> str:
    """A headline figure as the run summary shows it: a count in full (22,733 read 2.27e+04), any
    other figure to 3 significant digits."""
    v = float(value)
    return f"{int(v):,}" if v.is_integer() and abs(v) >= 1000 else f"{v:.3g}"


def _summary(cfg: PipelineConfig, run_id: str, results: list[StageResult], quiet: bool) -> None:
    if quiet:
        out.print(f"run {run_id}: " + ", ".join(f"{r.stage}={'skipped' if r.skipped else 'ok'}" for r in results))
        for r in results:
            if r.skipped and shown_note(r.note):  # a scheduler's log says why (unchanged inputs, nothing to feed it)
                out.print(f"{r.stage} skipped: {shown_note(r.note)}", markup=False)
            for name, where in r.artifacts.items():
                out.print(f"{name}: {where}")
        return
    table = Table(title=f"run {run_id}", show_lines=True)
    for col in ("stage", "status", "rows in", "rows written", "rejected", "versions", "headline"):
        table.add_column(col, overflow="fold")
    for r in results:
        status = "[yellow]skipped[/yellow]" if r.skipped else "[green]ok[/green]"
        note = shown_note(r.note)
        table.add_row(
            r.stage, status + (f"\n{escape(note)}" if note else ""),
            "\n".join(f"{k} {v:,}" for k, v in r.rows_in.items()),
            "\n".join(f"{k} {v:,}" for k, v in r.rows_written.items()),
            f"{r.rows_rejected:,}" if r.rows_rejected else "",
            "\n".join(f"{k} v{v}" for k, v in r.table_versions.items()),
            "\n".join(f"{k} = {shown_figure(v)}" for k, v in list(r.metrics.items())[:5]),
        )
    out.print(table)
    _print_tables(cfg)
    for r in results:
        for name, where in r.artifacts.items():
            out.print(f"{name}: [bold]{where}[/bold]")
    out.print(f"lake: [bold]{_lake_where(cfg)}[/bold]")


def _lake_where(cfg: PipelineConfig) -> str:
    """run.lake_root as a user finds it: absolute when local."""
    return str(Path(cfg.run.lake_root).resolve()) if "://" not in cfg.run.lake_root else cfg.run.lake_root


def _print_tables(cfg: PipelineConfig) -> None:
    from cellsynth.cluster import make_lake

    infos = make_lake(cfg).tables()
    if not infos:  # a mistyped run.lake_root read as an empty table
        out.print(f"no tables in the lake at {_lake_where(cfg)} (run.lake_root); `cellsynth run` writes them")
        return
    table = Table(title="lake tables")
    for col in ("table", "version", "rows", "files"):
        table.add_column(col, justify="right" if col != "table" else "left")
    for info in infos:
        table.add_row(info.name, str(info.version), f"{info.n_rows:,}", str(info.n_files))
    out.print(table)


def _run(stages: list[str] | None, config: Path | None, overrides: list[str] | None, quiet: bool, force: bool,
         incremental: bool = False, run_id: str | None = None, skip_unfed: bool = False) -> None:
    from cellsynth.cluster import runtime
    from cellsynth.pipeline import run_pipeline

    try:
        cfg = _config(config, overrides)
        with runtime(cfg, quiet=quiet) as rt:
            run_id, results = run_pipeline(rt, stages=stages, run_id=run_id, force=force, incremental=incremental,
                                            skip_unfed=skip_unfed)
        _summary(cfg, run_id, results, quiet)
    except CellsynthError as err:
        _fail(err)


@app.command()
def run(
    config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False, force: ForceOpt = False,
    incremental: Annotated[bool, typer.Option("--incremental", help="Retrain and regenerate only the (window, cell_shard) partitions whose clean data changed since the last successful run")] = False,
    run_id: RunIdOpt = None,
) -> None:
    """Run the whole pipeline (stages whose inputs did not change are skipped)."""
    _run(None, config, set_, quiet, force, incremental, run_id)


def _stage_command(names: list[str], doc: str):
    def command(config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False, force: ForceOpt = False,
                run_id: RunIdOpt = None, skip_unfed: SkipUnfedOpt = False) -> None:
        _run(names, config, set_, quiet, force, run_id=run_id, skip_unfed=skip_unfed)

    command.__doc__ = doc
    return command


for _name, _stages, _doc in (
    ("simulate", ["simulate"], "Simulate an operator's raw MDT, traffic and cell files plus ground truth."),
    ("ingest", ["ingest"], "Validate, clean, window and partition raw inputs into the lake (Spark)."),
    ("train", list(TRAIN_STAGES), "Train per-cell KDEs, radio models and the traffic model (Ray)."),
    ("generate", ["generate"], "Generate synthetic MDT (GUMBLE Algorithm 1)."),
    ("evaluate", ["evaluate"], "Score models and synthetic data against held-out real data."),
    ("report", ["report"], "Write the HTML report."),
):
    app.command(name=_name)(_stage_command(_stages, _doc))


@app.command()
def plan(
    config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
    budget_km: Annotated[float | None, typer.Option("--budget-km", help="Drive this many km along roads (default: plan.budget_km)")] = None,
    points: Annotated[int | None, typer.Option("--points", help="Plan this many stationary measurement points instead of a drive")] = None,
    ues: Annotated[int | None, typer.Option("--ues", help="Plan this many MDT-triggered UEs in the window instead of a drive")] = None,
    window: Annotated[str | None, typer.Option("--window", help="Time window whose users count (default: plan.window, else the busiest)")] = None,
) -> None:
    """Where to measure next: a drive (or points, or UEs to trigger) that most reduces the user-weighted epistemic uncertainty."""
    extra = list(set_ or [])
    if sum(v is not None for v in (budget_km, points, ues)) > 1:
        _fail(ConfigError("plan: give one of --budget-km, --points and --ues"))
    if budget_km is not None:
        extra += [f"plan.budget_km={budget_km}", "plan.n_points=null", "plan.n_ues=null"]
    if points is not None:
        extra += [f"plan.n_points={points}", "plan.budget_km=null", "plan.n_ues=null"]
    if ues is not None:
        extra += [f"plan.n_ues={ues}", "plan.budget_km=null", "plan.n_points=null"]
    if window is not None:  # quoted: --set reads YAML, where 0612 is the octal 394 and null is None
        extra.append(f"plan.window={json.dumps(window)}")
    # on demand: always plan against the current models (no skip-on-unchanged)
    _run(["plan"], config, extra, quiet, True)


@app.command()
def tables(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List lake tables with their versions and row counts."""
    try:
        _print_tables(_config(config, set_))
    except CellsynthError as err:
        _fail(err)


@app.command()
def runs(config: ConfigOpt = None, set_: SetOpt = None,
         limit: Annotated[int, typer.Option("--limit", min=1, help="Show this many (run, stage) records")] = 30) -> None:
    """List the run registry, newest first."""
    from cellsynth.cluster import make_lake
    from cellsynth.lake import RunRegistry

    try:
        cfg = _config(config, set_)
        df = RunRegistry(make_lake(cfg)).latest(limit)
    except CellsynthError as err:
        _fail(err)
        return
    if df.empty:
        out.print(f"no run recorded in the lake at {_lake_where(cfg)} (run.lake_root)")
        return
    table = Table(title="runs")
    for col in ("run_id", "stage", "status", "started", "seconds", "note / error"):
        table.add_column(col)
    for row in df.itertuples():
        secs = (row.ended_at - row.started_at).total_seconds() if row.ended_at is not None and row.ended_at == row.ended_at else None
        table.add_row(row.run_id, row.stage, row.status, f"{row.started_at:%Y-%m-%d %H:%M:%S}",
                      f"{secs:.1f}" if secs is not None else "", (row.error or row.note or "")[:80])
    out.print(table)


@app.command()
def vacuum(config: ConfigOpt = None, set_: SetOpt = None,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted")] = False) -> None:
    """Delete old data files and model folders (lake.retention_hours), keeping every version a kept run
    references (every recorded run, or the lake.keep_runs newest) and the models those versions name."""
    from cellsynth.cluster import make_lake
    from cellsynth.lake.lock import LakeLock
    from cellsynth.lake.upkeep import vacuum as vacuum_lake
    from cellsynth.lake.upkeep import vacuum_models

    try:
        cfg = _config(config, set_)
        lake = make_lake(cfg)
        with LakeLock(lake, owner="vacuum", timeout_s=cfg.lake.lock_timeout_s):
            keep = cfg.lake.keep_runs
            removed = vacuum_lake(lake, retention_hours=cfg.lake.retention_hours, dry_run=dry_run, keep_runs=keep)
            folders = vacuum_models(lake, retention_hours=cfg.lake.retention_hours, dry_run=dry_run, keep_runs=keep)
    except CellsynthError as err:
        _fail(err)
        return
    verb = "would delete" if dry_run else "deleted"
    for table, files in removed.items():
        out.print(f"{table}: {verb} {len(files)} files")
    for kind, names in folders.items():
        out.print(f"{kind}: {verb} {len(names)} run folders" + (f" ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})" if names else ""))


@app.command()
def optimize(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Compact small files of every lake table (recorded in the run registry)."""
    from cellsynth.cluster import make_lake
    from cellsynth.lake.lock import LakeLock
    from cellsynth.lake.upkeep import optimize as optimize_lake

    try:
        cfg = _config(config, set_)
        lake = make_lake(cfg)
        with LakeLock(lake, owner="optimize", timeout_s=cfg.lake.lock_timeout_s):
            done = optimize_lake(lake)
    except CellsynthError as err:
        _fail(err)
        return
    for table, info in done.items():
        out.print(f"{table}: v{info['from_version']} -> v{info['to_version']}, "
                  f"{info['files_removed']} files -> {info['files_added']}")


@app.command()
def submit(
    target: Annotated[str, typer.Argument(help="'run' or a stage name")] = "run",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_id: RunIdOpt = None,
) -> None:
    """Submit the pipeline or one stage to a Spark + Ray cluster (see conf/cluster.yaml); every job runs under one run id."""
    try:
        from cellsynth.cluster import submit as submit_mod
    except ImportError:
        err_console.print("submit: cluster submission is not available in this build")
        raise typer.Exit(1) from None
    try:
        code = submit_mod.submit(_config(config, set_), target, run_id=run_id)
    except CellsynthError as err:
        _fail(err)
        return
    raise typer.Exit(code)


@app.command()
def whatif(
    changes: Annotated[Path, typer.Option("--changes", help="YAML change file (add / move / re-point / remove cells)")],
    config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
    run_id: RunIdOpt = None,
) -> None:
    """Predict the network after a change; rows land in the lake tagged network_scenario=<name>."""
    from cellsynth.cluster import runtime
    from cellsynth.pipeline import run_whatif
    from cellsynth.whatif import load_changes

    try:
        cfg, change_set = _config(config, set_), load_changes(changes)
        with runtime(cfg, quiet=quiet) as rt:
            result = run_whatif(rt, change_set, run_id=run_id)
    except CellsynthError as err:
        _fail(err)
        return
    out.print(f"whatif {change_set.name}: {result.note or 'done'}; rows written {result.rows_written}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process and return its exit code (tests, embedding)."""
    try:
        code = app(args=argv, standalone_mode=False)  # click returns Exit codes in this mode
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors
        if exc.__class__.__name__ in ("UsageError", "BadParameter", "NoSuchOption"):
            # format_message names the option ("Invalid value for '--limit': ..."); str() does not
            err_console.print(exc.format_message() if hasattr(exc, "format_message") else str(exc), markup=False)
            return 2
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
