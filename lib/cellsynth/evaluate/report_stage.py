"""`cellsynth report`: the HTML report (plus PNGs) under the lake's report folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellsynth.config import PipelineConfig
from cellsynth.errors import StageError
from cellsynth.evaluate.report import ReportData, build_report
from cellsynth.stages import StageResult

NAME = "report"
INPUTS = ("metrics", "synthetic_mdt", "mdt_reports", "rejects", "spatial_maps", "cells")
OUTPUTS: tuple[str, ...] = ()
CONFIG_SECTIONS = ("report", "run")


def report_dir(cfg: PipelineConfig, lake: Any) -> Path:
    if cfg.lake.report_dir:
        return Path(cfg.lake.report_dir)
    if lake.is_remote:
        raise StageError("report: the lake is remote; set lake.report_dir to a local folder for the report")
    return Path(lake.root) / "report"


def run(cfg: PipelineConfig, rt: Any, *, run_id: str) -> StageResult:
    lake = rt.lake
    if not lake.exists("metrics"):
        raise StageError("report: lake table 'metrics' is missing; run evaluate first")

    def read(table: str, columns: list[str] | None = None):
        return lake.read_pandas(table, columns=columns) if lake.exists(table) else None

    data = ReportData(
        metrics=read("metrics"),
        synthetic=read("synthetic_mdt", ["window", "x_m", "y_m", "serving_cell_id"]),
        reports=read("mdt_reports", ["window", "x_m", "y_m", "serving_cell_id"]),
        spatial_maps=read("spatial_maps"),
        rejects=read("rejects", ["source", "reason_code"]),
        cells=read("cells", ["cell_id", "x_m", "y_m"]),
        title=f"cellsynth report — {cfg.run.name}, run {run_id}",
    )
    path = build_report(data, report_dir(cfg, lake), max_points=cfg.report.max_points, n_example_cells=cfg.report.n_example_cells)
    return StageResult(stage=NAME, run_id=run_id, artifacts={"report": str(path)})
