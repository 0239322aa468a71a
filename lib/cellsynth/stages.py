"""The stage contract shared by the pipeline, the CLI and the jobs.

Each stage lives in `cellsynth.<package>.stage` and exposes
    STAGE: StageSpec               what the pipeline needs to know about it (below)
    run(cfg: PipelineConfig, rt: Runtime, *, run_id: str, **capabilities) -> StageResult

The pipeline knows stages only through their `StageSpec`: it names none of them. The skip hash
is the hash of the config keys the spec `reads`; the incremental plan follows `incremental`.
A module without `STAGE` is read the old way (NAME, INPUTS, OUTPUTS, CONFIG_SECTIONS,
`external_fingerprint`) and gets no incremental capabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellsynth.config import PipelineConfig

# Pipeline order. A stage whose module does not exist yet is left out of the chain.
STAGE_MODULES: dict[str, str] = {
    "simulate": "cellsynth.scenario.stage",
    "ingest": "cellsynth.ingest.stage",
    "density": "cellsynth.density.stage",
    "radio": "cellsynth.radio.stage",
    "traffic": "cellsynth.traffic.stage",
    "generate": "cellsynth.generate.stage",
    "evaluate": "cellsynth.evaluate.stage",
    "plan": "cellsynth.plan.stage",  # on demand (`cellsynth plan`); in the chain when plan.enabled
    "report": "cellsynth.evaluate.report_stage",
}
# `cellsynth train` runs these.
TRAIN_STAGES: tuple[str, ...] = ("density", "radio", "traffic")


@dataclass(frozen=True)
class MaterialChange:
    """Per-cell retraining of a model table, decided by how much of one input changed.

    A cell is retrained when it has no model yet, its serving rows of `table` changed, or its
    changed held-in rows since the `table` version its model was trained on (the model row's
    `source_version`) reach `run.incremental_min_changed_share` of the rows it was trained on
    (`n_train`). `table` rows carry report_id, cell_id and role; `models` rows carry cell_id,
    n_train and source_version. Changes of `table` then mark no partitions by themselves.
    """

    table: str
    models: str


@dataclass(frozen=True)
class AreaRefit:
    """A per-window model fit on every held-in row of `table` (row `cell_id` == AREA_CELL_ID in
    `models`, with n_reports and source_version): refit only when the window's changed held-in
    rows reach `run.incremental_min_changed_share` of the rows it was fit on. The stage's `run`
    takes `area_windows` (the windows to refit)."""

    table: str
    models: str


def _no_unread(cfg: PipelineConfig) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Incremental:
    """How a stage takes part in `run --incremental`: its `run` takes `partitions`, a set of
    (window, cell_shard), and rewrites only those.

    partitioned_inputs: input table -> the column naming the cell a row belongs to; a changed
        row marks its (window, cell_shard) partition and its cell.
    model_inputs: input model tables whose rows carry (window, cell_shard, run_id); a row-level
        diff finds the partitions (a window-free row marks its shard in every window).
    covered_inputs: inputs whose changes reach the stage through another input and are left
        out of the plan (generate: a material mdt_measurements change gives a new radio model).
    unread_inputs: inputs this config does not read (generate reads synthetic_traffic only for
        that load scenario); left out of the plan. Any other input that changed and is not
        partitioned means a full run.
    material: per-cell retraining rule for one input (see `MaterialChange`).
    area: a per-window model refit on material change (see `AreaRefit`).
    takes_cells: `run` also takes `cells`, the changed cells within the partitions.
    jobs_per_group: independent jobs the stage splits each group of cells into (radio: RSRP
        and RSRQ), so a small incremental run may use that many actors.
    """

    partitioned_inputs: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    model_inputs: tuple[str, ...] = ()
    covered_inputs: tuple[str, ...] = ()
    unread_inputs: Callable[[PipelineConfig], tuple[str, ...]] = _no_unread
    material: MaterialChange | None = None
    area: AreaRefit | None = None
    takes_cells: bool = False
    jobs_per_group: int = 1


@dataclass(frozen=True)
class StageSpec:
    """What the pipeline knows about a stage.

    name: registry name ("ingest", "density", ...).
    inputs / outputs: lake tables it reads (their versions go into the registry) and writes.
    reads: every config section or dotted key the stage reads, directly or through a shared
        helper (`cellsynth.splits.SPLIT_KEYS` for the train/test split, "ingest.windows",
        "ingest.n_cell_shards", ...). Their hash decides skip-on-unchanged: a stage reruns when
        one of them changed. Keys that only say where or how fast it runs (runtime.*) stay out.
    enabled_by: a dotted bool key; False leaves the stage out of the default chain.
    external_fingerprint: cfg -> str for inputs outside the lake (raw files, a simulator folder).
    incremental: its incremental-run capabilities; None: it always runs whole.
    """

    name: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    enabled_by: str | None = None
    external_fingerprint: Callable[[PipelineConfig], str] | None = None
    incremental: Incremental | None = None

    def config_hash(self, cfg: PipelineConfig) -> str:
        """Hash of the config keys this stage reads (the registry's skip key)."""
        return cfg.section_hash(*self.reads)

    def enabled(self, cfg: PipelineConfig) -> bool:
        if self.enabled_by is None:
            return True
        node: Any = cfg
        for part in self.enabled_by.split("."):
            node = getattr(node, part)
        return bool(node)


def spec_of(mod: ModuleType) -> StageSpec:
    """The stage module's `STAGE`, or one built from the older module attributes."""
    spec = getattr(mod, "STAGE", None)
    if isinstance(spec, StageSpec):
        return spec
    return StageSpec(
        name=getattr(mod, "NAME", mod.__name__), inputs=tuple(getattr(mod, "INPUTS", ())),
        outputs=tuple(getattr(mod, "OUTPUTS", ())), reads=tuple(getattr(mod, "CONFIG_SECTIONS", ())),
        external_fingerprint=getattr(mod, "external_fingerprint", None),
    )


@dataclass
class StageResult:
    stage: str
    run_id: str
    rows_in: dict[str, int] = field(default_factory=dict)
    rows_written: dict[str, int] = field(default_factory=dict)
    rows_rejected: int = 0
    table_versions: dict[str, int] = field(default_factory=dict)
    skipped: bool = False
    note: str = ""
    # Headline figures the CLI prints (e.g. {"kde_vs_voronoi_ks_gain": 0.61}).
    metrics: dict[str, float] = field(default_factory=dict)
    # Files outside the lake the stage produced (report, raw simulator output).
    artifacts: dict[str, str] = field(default_factory=dict)
