"""`cellsynth report`: the HTML report (plus PNGs) under the lake's report folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cellsynth.config import PipelineConfig
from cellsynth.errors import StageError
from cellsynth.evaluate.report import ReportData, build_report
from cellsynth.stages import StageResult, StageSpec

NAME = "report"
# measurement_plan: its map is a section of the report (drawn by `cellsynth plan` into the report folder)
INPUTS = ("metrics", "synthetic_mdt", "mdt_reports", "rejects", "spatial_maps", "kde_models", "cells", "network_fields",
          "measurement_plan")
OUTPUTS: tuple[str, ...] = ()
STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    reads=("report", "run.name", "evaluate.truth_dir", "scenario.enabled", "scenario.output_dir", "run.data_dir"),
    enabled_by="report.enabled",
)
TRAFFIC_PLOTS = (
    ("Synthetic traffic: weekly curves of held-out cells", "traffic_weekly_curves.png",
     "Real vs synthetic hourly traffic for cells the model never saw."),
    ("Synthetic traffic: sample fan", "traffic_sample_fan.png", "Spread of the generated weeks for one cell."),
)


def report_dir(cfg: PipelineConfig, lake: Any) -> Path:
    if cfg.lake.report_dir:
        return Path(cfg.lake.report_dir)
    if lake.is_remote:
        raise StageError("report: the lake is remote; set lake.report_dir to a local folder for the report")
    return Path(lake.root) / "report"


def plan_images(out_dir: Path) -> list[tuple[str, str, str]]:
    """The measurement plans the plan stage drew into the report folder (one per window)."""
    return [(f"Measurement plan: {png.stem.removeprefix('plan_')}", f"plan/{png.name}",
             "Where to measure next (table measurement_plan): the route or points that most reduce the "
             "user-weighted epistemic variance of serving and strongest-neighbour RSRP, over the serving "
             "RSRP epistemic std map.")
            for png in sorted((out_dir / "plan").glob("plan_*.png"))]


def _most_common(counts: Any) -> Any:
    """The most common value of an Arrow `value_counts` result (ties: the smallest; None if none)."""
    rows = [c for c in counts.to_pylist() if c["values"] is not None]
    return min(rows, key=lambda c: (-c["counts"], c["values"]))["values"] if rows else None


def maps_for_report(lake: Any, n_cells: int, truth_file: Path | None = None) -> dict[str, Any]:
    """ReportData's spatial_maps and map_methods: only the rows the map figure draws (the KDE maps
    of its window and example cells, their Voronoi and student maps), read with filters. The
    whole table is a row per square, cell, window and method (4.9M rows, ~0.9 GB on the driver at
    10^3 cells: the report stage's peak; issue 15). With `truth_file` (the simulator's maps) also
    truth_maps, those cells' rows only (the whole file, ~1,000 rows a cell and window with string
    keys, was read for a figure of four cells; the report stage added ~1 GB to the driver at
    3,000 cells before these reads were cut). The figure's window and cells are those with the most
    reports (`kde_models`; `report.best_measured_map_cells`), else those with the most KDE squares."""
    from cellsynth.evaluate.report import best_measured_map_cells, cells_with_most_squares

    if not lake.exists("spatial_maps"):
        return {"spatial_maps": None}
    methods = set(lake.read("spatial_maps", columns=["method"]).column("method").unique().to_pylist())
    if not {"kde", "voronoi"} <= methods:  # no map figure: no rows needed
        return {"spatial_maps": lake.read_pandas("spatial_maps", filters=[("method", "in", [])]), "map_methods": methods,
                "truth_maps": None}

    def kde_rows(window: Any, cells: list[str]) -> pd.DataFrame:
        return lake.read_pandas("spatial_maps", filters=[("method", "=", "kde"), ("window", "=", window), ("cell_id", "in", cells)])

    window, cells = (best_measured_map_cells(lake.read_pandas("kde_models", columns=["window", "cell_id", "n_reports"]),
                                             n_cells) if lake.exists("kde_models") else (None, []))
    kde = kde_rows(window, cells) if cells else None
    if kde is None or kde.empty:  # no report counts (or no map of those cells): the cells with the most KDE squares
        # counted in Arrow: the KDE rows' labels as Python strings took ~250 MB at 3,000 cells
        counts = lake.read("spatial_maps", columns=["window"], filters=[("method", "=", "kde")]).column("window").value_counts()
        window = _most_common(counts)
        squares = lake.read("spatial_maps", columns=["cell_id"], filters=[("method", "=", "kde"), ("window", "=", window)]) \
            .column("cell_id").value_counts()
        cells = cells_with_most_squares(pd.Series(squares.field("counts").to_numpy(zero_copy_only=False),
                                                  index=squares.field("values").to_pylist()), n_cells).tolist()
        kde = kde_rows(window, cells)
    parts = [kde, lake.read_pandas("spatial_maps", filters=[("method", "in", ["voronoi", "student"]), ("cell_id", "in", cells)])]
    truth = pd.read_parquet(truth_file, filters=[("cell_id", "in", cells)]) if truth_file is not None else None
    return {"spatial_maps": pd.concat(parts, ignore_index=True), "map_methods": methods, "truth_maps": truth,
            "map_window": window, "map_cells": cells}


def samples_for_report(lake: Any) -> dict[str, Any]:
    """ReportData's synthetic and reports: only the rows of the window the samples figure draws
    (synthetic_mdt's most common window, ties by label), and n_reports, the clean reports' count.
    Both tables were read whole before: ~5M rows at 3,000 cells, two string columns each."""
    cols = ["window", "x_m", "y_m", "serving_cell_id"]
    out: dict[str, Any] = {"synthetic": None, "reports": None, "n_reports": None}
    if lake.exists("mdt_reports"):
        out["n_reports"] = lake.read("mdt_reports", columns=["window"]).num_rows
    if not lake.exists("synthetic_mdt"):
        return out
    window = _most_common(lake.read("synthetic_mdt", columns=["window"]).column("window").value_counts())
    flt = [("window", "=", window)] if window is not None else None
    out["synthetic"] = lake.read_pandas("synthetic_mdt", columns=cols, filters=flt)
    if lake.exists("mdt_reports"):
        out["reports"] = lake.read_pandas("mdt_reports", columns=cols, filters=flt)
    return out


def run(cfg: PipelineConfig, rt: Any, *, run_id: str) -> StageResult:
    lake = rt.lake
    if not lake.exists("metrics"):
        raise StageError("report: lake table 'metrics' is missing; run evaluate first")

    def read(table: str, columns: list[str] | None = None):
        return lake.read_pandas(table, columns=columns) if lake.exists(table) else None

    out_dir = report_dir(cfg, lake)
    truth_dir = Path(cfg.evaluate.truth_dir or Path(cfg.scenario.output_dir or Path(cfg.run.data_dir) / "sim") / "truth")
    truth_file = truth_dir / "spatial_maps.parquet"
    truth_file = truth_file if cfg.scenario.enabled and truth_file.is_file() else None
    # The traffic stage draws its own plots into the report folder; link the ones present.
    extra = [(title, f"traffic/{name}", caption) for title, name, caption in TRAFFIC_PLOTS if (out_dir / "traffic" / name).is_file()]
    extra += plan_images(out_dir)
    from cellsynth.whatif.report import whatif_section

    extra += whatif_section(lake, out_dir)  # before/after maps of each what-if scenario (issue 18)
    data = ReportData(
        metrics=read("metrics"),
        **samples_for_report(lake),
        **maps_for_report(lake, cfg.report.n_example_cells, truth_file),
        rejects=read("rejects", ["source", "reason_code"]),
        cells=read("cells", ["cell_id", "x_m", "y_m"]),
        extra_images=extra,
        title=f"cellsynth report — {cfg.run.name}, run {run_id}",
    )
    path = build_report(data, out_dir, max_points=cfg.report.max_points, n_example_cells=cfg.report.n_example_cells)
    return StageResult(stage=NAME, run_id=run_id, artifacts={"report": str(path)})
