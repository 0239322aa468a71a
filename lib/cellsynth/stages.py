"""The stage contract shared by the pipeline, the CLI and the jobs.

Each stage lives in `cellsynth.<package>.stage` and exposes:
    NAME: str                      registry name ("ingest", "density", ...)
    INPUTS: tuple[str, ...]        lake tables it reads (their versions go into the registry)
    OUTPUTS: tuple[str, ...]       lake tables it writes
    CONFIG_SECTIONS: tuple[str, ...] config sections whose hash decides skip-on-unchanged
    run(cfg: PipelineConfig, rt: Runtime, *, run_id: str) -> StageResult
and optionally `external_fingerprint(cfg) -> str` for inputs outside the lake (raw files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
