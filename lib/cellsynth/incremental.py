"""Incremental runs (`run_pipeline(..., incremental=True)`, `cellsynth run --incremental`): which
(window, cell_shard) partitions and cells of a stage need retraining, from the stage's declared
`Incremental` capabilities (`cellsynth.stages`) and the Delta version diffs of its inputs.

A stage gets only the partitions whose inputs changed since the versions its last successful
run read (and, for appends, the cells whose rows were added); it overwrites only their rows.

Per-cell models that learn from every report that measured the cell (`MaterialChange`, radio)
are retrained only when the change is material (`retrain_rule`): the cell's serving rows
changed, or its added/removed held-in rows since the version its model was trained on reach
`run.incremental_min_changed_share` of its training rows. Per-window models of every held-in
report (`AreaRefit`, density's area density) likewise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellsynth.cluster import Runtime
from cellsynth.splits import held_out, random_test_mask, split_seed
from cellsynth.stages import AreaRefit, MaterialChange, StageSpec

_MAX_LISTED = 12
# Incremental runs give a stage one Ray actor per this many retrained cells (at most
# runtime.ray.n_actors): the radio stage's batched SVI loop costs about the same per step for 5
# cells as for 50, and each actor is a fresh process importing torch/pyro, so splitting a few
# cells over actors multiplies CPU time that a shared node does not have to spare.
CELLS_PER_ACTOR = 32


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


def plan_material(rt: Runtime, rule: MaterialChange, last: dict, windows: list[str], n_total: int) -> IncrementalPlan:
    """The cells whose `rule.table` rows changed materially (`retrain_rule`), each against the
    version its current model was trained on, so that changes kept under the threshold add up
    over later runs instead of being forgotten."""
    from cellsynth.lake.changes import changed_rows

    lake, cfg, table = rt.lake, rt.cfg, rule.table
    current = lake.version(table)
    cells = lake.read_pandas("cells", columns=["cell_id", "cell_shard"])
    shard_of = dict(zip(cells["cell_id"].astype(str), cells["cell_shard"].astype(int)))
    models = lake.read_pandas(rule.models, columns=["cell_id", "n_train", "source_version"])
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
                                        test_fraction=cfg.split.test_fraction, seed=split_seed(cfg))
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


def area_windows(rt: Runtime, rule: AreaRefit, windows: set[str]) -> tuple[set[str], dict[str, str]]:
    """A per-window model of every held-in row (density's area density f_j^O) is refit only
    when the window's changed held-in rows of `rule.table`, since the version it was fit on,
    reach `run.incremental_min_changed_share` of the rows it was fit on. ({refit}, {kept: why})."""
    from cellsynth.lake.changes import changed_rows
    from cellsynth.schemas import AREA_CELL_ID

    lake, cfg = rt.lake, rt.cfg
    share = cfg.run.incremental_min_changed_share
    areas = lake.read_pandas(rule.models, columns=["window", "cell_id", "n_reports", "source_version"],
                             filters=[("cell_id", "=", AREA_CELL_ID)])
    fitted = {str(r.window): (int(r.n_reports), int(r.source_version)) for r in areas.itertuples()}
    current = lake.version(rule.table)
    refit = {w for w in windows if w not in fitted}
    kept: dict[str, str] = {}
    for base in sorted({v for w, (_, v) in fitted.items() if w in windows}):
        mine = {w for w, (_, v) in fitted.items() if v == base and w in windows}
        counted: dict[str, int] = dict.fromkeys(mine, 0)
        for (window, _shard), rows in changed_rows(lake, rule.table, base, columns=["report_id"],
                                                   until_version=current).items():
            if window not in mine:
                continue
            if rows is None:
                refit.add(window)
                continue
            held_in = ~held_out(cfg, rows["report_id"].to_numpy())
            counted[window] += int(rows["change"].abs().to_numpy()[held_in].sum())
        for window, n_changed in counted.items():
            n_fit = max(fitted[window][0], 1)
            if window in refit or (share == 0.0 and n_changed > 0) or (share > 0.0 and n_changed >= share * n_fit):
                refit.add(window)
            else:
                kept[window] = f"{n_changed} held-in reports changed, {n_changed / n_fit:.1%} of {n_fit} < {share:g}"
    return refit, kept


def plan_incremental(spec: StageSpec, rt: Runtime, config_hash: str, inputs: dict) -> IncrementalPlan:
    """Which (window, cell_shard) partitions (and cells) of stage `spec` need retraining.

    Compares the input tables at the versions the stage's last successful run read with their
    current versions. A changed config, a changed non-partitioned input (cells, raw files) or no
    earlier success means a full run (`partitions` None, `why` says so).
    """
    from cellsynth.lake.changes import changed_cells, changed_model_partitions
    from cellsynth.windows import window_labels

    inc = spec.incremental
    if inc is None:
        return IncrementalPlan(None, None, "stage has no partition-level run")
    lake, cfg = rt.lake, rt.cfg
    last = rt.registry.last_success(spec.name)
    if last is None:
        return IncrementalPlan(None, None, "no earlier successful run")
    if last["config_hash"] != config_hash:
        return IncrementalPlan(None, None, f"config changed since run {last['run_id']}")
    if any(lake.version(t) is None for t in spec.outputs):
        return IncrementalPlan(None, None, "an output table is missing")
    windows = window_labels(cfg.ingest.windows)
    changed: dict[tuple[str, int], set[str] | None] = {}
    material = inc.material.table if inc.material is not None else None
    unread = {*inc.unread_inputs(cfg), *inc.covered_inputs}
    n_total = len(windows) * cfg.ingest.n_cell_shards
    for table, version in inputs.items():
        before = last["input_versions"].get(table)
        if table in unread or table == material:
            continue
        if not lake.rows_changed(table, before, version):  # the same version, or only compacted since
            continue
        if before is None or version is None or table not in (*inc.partitioned_inputs, *inc.model_inputs):
            return IncrementalPlan(None, None, f"{table} changed (v{before} -> v{version}) and is not partitioned")
        if table in inc.partitioned_inputs:
            found = changed_cells(lake, table, before, cell_col=inc.partitioned_inputs[table], until_version=version)
        else:
            found = dict.fromkeys(changed_model_partitions(lake, table, before, windows=windows, until_version=version))
        for key, cells in found.items():
            old = changed.get(key, set())
            changed[key] = None if (cells is None or old is None) else old | cells
    if inc.material is not None and inputs.get(material) is not None:
        if last["input_versions"].get(material) is None or not lake.exists(inc.material.models):
            return IncrementalPlan(None, None, f"{material} has no earlier version to compare with")
        return plan_material(rt, inc.material, last, windows, n_total)
    if not changed:
        return IncrementalPlan(set(), set(), f"no partition changed since run {last['run_id']}", n_total, last["run_id"])
    cells_all: set[str] | None = set()
    for cells in changed.values():
        cells_all = None if (cells is None or cells_all is None) else cells_all | cells
    plan = IncrementalPlan(set(changed), cells_all, "", max(n_total, len(changed)), last["run_id"])
    if inc.area is not None and lake.exists(inc.area.models):
        plan.area_windows, plan.kept_areas = area_windows(rt, inc.area, {w for w, _ in changed})
    return plan


def fewer_actors(cfg, plan: IncrementalPlan, jobs_per_group: int = 1):
    """The config an incremental stage runs with: one actor per `CELLS_PER_ACTOR` retrained cells,
    times the independent jobs a stage splits each group of cells into (`Incremental.jobs_per_group`:
    radio trains RSRP and RSRQ on separate actors, which halves its wall time and adds no CPU time)."""
    ray_cfg = cfg.runtime.ray
    if plan.cells is None:
        return cfg
    n_actors = max(1, min(ray_cfg.n_actors, jobs_per_group * -(-len(plan.cells) // CELLS_PER_ACTOR)))
    if n_actors == ray_cfg.n_actors:
        return cfg
    runtime = cfg.runtime.model_copy(update={"ray": ray_cfg.model_copy(update={"n_actors": n_actors})})
    return cfg.model_copy(update={"runtime": runtime})


def run_kwargs(spec: StageSpec, plan: IncrementalPlan) -> dict:
    """The capability arguments an incremental plan passes to the stage's `run`."""
    inc = spec.incremental
    if inc is None or plan.partitions is None:
        return {}
    kwargs: dict = {"partitions": plan.partitions}
    if inc.takes_cells and plan.cells is not None:
        kwargs["cells"] = plan.cells
    if inc.area is not None and plan.area_windows is not None:
        kwargs["area_windows"] = plan.area_windows
    return kwargs
