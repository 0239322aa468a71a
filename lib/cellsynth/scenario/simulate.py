"""Public simulator API: `simulate` (in memory) and `write_scenario` (streamed to a folder)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cellsynth.config import ScenarioConfig, WindowConfig
from cellsynth.scenario import _export
from cellsynth.scenario._reports import DIRT_REJECT_REASON, Chunk, iter_chunks
from cellsynth.scenario._world import (
    World,
    build_world,
    cell_profiles,
    compute_load,
    compute_truth,
    load_truth,
    rsrp_grid,
    traffic_table,
)
from cellsynth.windows import window_labels

CELL_COLUMNS = ["cell_id", "site_id", "latitude", "longitude", "azimuth_deg", "height_m", "tx_power_dbm",
                "freq_mhz", "environment", "profile"]


@dataclass
class Scenario:
    """A simulated operator export plus its ground truth, as DataFrames.

    `mdt` holds the exported rows (dirt included) with the raw file's columns; `truth` holds
    `rsrp_grid`, `spatial_maps`, `load` and `reports` (one row per `mdt` row, same order).
    """

    cells: pd.DataFrame
    mdt: pd.DataFrame
    traffic: pd.DataFrame
    truth: dict[str, pd.DataFrame]
    manifest: dict
    cells_xy_m: pd.DataFrame = field(repr=False, default=None)  # cell_id, x_m, y_m in the lake frame


def scenario_hash(cfg: ScenarioConfig, *, windows: WindowConfig, map_resolution_m: float, seed: int) -> str:
    """Everything the output depends on (output_dir excluded; sites_csv by content; chunk_reports
    included because dirt is drawn per chunk)."""
    data = cfg.model_dump(mode="json", exclude={"output_dir", "enabled"})
    if cfg.sites_csv and Path(cfg.sites_csv).is_file():
        data["sites_csv"] = hashlib.sha256(Path(cfg.sites_csv).read_bytes()).hexdigest()
    data.update(windows=windows.model_dump(mode="json"), map_resolution_m=map_resolution_m, seed=seed,
                format_version=_export.FORMAT_VERSION)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Static:
    world: World
    cells: pd.DataFrame
    traffic: pd.DataFrame
    truth: dict[str, pd.DataFrame]


def _static(cfg: ScenarioConfig, windows: WindowConfig, map_resolution_m: float, seed: int,
            progress: Callable[[int], None] | None) -> _Static:
    world = build_world(cfg, windows=windows, seed=seed)
    maps, _ = compute_truth(world, map_resolution_m=map_resolution_m, progress=progress)
    compute_load(world)
    cells = world.cells.assign(profile=cell_profiles(world))
    truth = {
        "rsrp_grid": rsrp_grid(world, map_resolution_m=map_resolution_m),
        "spatial_maps": maps,
        "load": load_truth(world),
    }
    return _Static(world, cells, traffic_table(world), truth)


def _manifest(static: _Static, cfg: ScenarioConfig, *, windows: WindowConfig, map_resolution_m: float,
              seed: int, dirt: Counter, n_clean: int, counts: dict[str, int]) -> dict:
    world = static.world
    x0, x1, y0, y1 = world.density.bounds_m
    return {
        "format_version": _export.FORMAT_VERSION,
        "config_hash": scenario_hash(cfg, windows=windows, map_resolution_m=map_resolution_m, seed=seed),
        "seed": seed,
        "counts": {"sites": len(world.site_cells), "cells": world.n_cells, "reports_clean": n_clean,
                   "reports_dirty": int(sum(dirt.values())), **{f"rows:{k}": v for k, v in counts.items()}},
        "frame": {"lat0": world.frame.lat0, "lon0": world.frame.lon0},
        "area_bounds_m": {"x_min": x0, "x_max": x1, "y_min": y0, "y_max": y1},
        "period": {"start": world.hours[0].strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "end": (world.hours[-1] + pd.Timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")},
        "windows": window_labels(windows), "window_config": windows.model_dump(mode="json"),
        "map_resolution_m": map_resolution_m,
        "shadowing": {"sigma_db": cfg.shadowing_sigma_db, "decorrelation_m": cfg.decorrelation_m,
                      "site_share": cfg.site_shadowing_share},
        "measurement_noise_db": cfg.measurement_noise_db,
        "n_neighbours": cfg.n_neighbours,
        "dirt": {kind: int(dirt.get(kind, 0)) for kind in cfg.dirt_kinds},
        "dirt_reject_reason": {kind: DIRT_REJECT_REASON[kind] for kind in cfg.dirt_kinds},
    }


class _Counting:
    def __init__(self, chunks: Iterator[Chunk]):
        self.chunks, self.dirt, self.n_clean = chunks, Counter(), 0

    def __iter__(self) -> Iterator[Chunk]:
        for chunk in self.chunks:
            kinds = chunk.truth["dirt_kind"].dropna()
            self.dirt.update(kinds.tolist())
            self.n_clean += int((~chunk.truth["is_dirty"]).sum())
            yield chunk


def simulate(cfg: ScenarioConfig, *, windows: WindowConfig, map_resolution_m: float, seed: int) -> Scenario:
    """Simulate the whole scenario in memory (tests, small runs). Same rows as `write_scenario`."""
    static = _static(cfg, windows, map_resolution_m, seed, None)
    counting = _Counting(iter_chunks(static.world))
    chunks = list(counting)
    mdt = pd.concat([c.mdt for c in chunks], ignore_index=True)
    reports = pd.concat([c.truth for c in chunks], ignore_index=True)
    counts = {"cells.csv": len(static.cells), "traffic.csv": len(static.traffic), "mdt.csv": len(mdt)}
    manifest = _manifest(static, cfg, windows=windows, map_resolution_m=map_resolution_m, seed=seed,
                         dirt=counting.dirt, n_clean=counting.n_clean, counts=counts)
    return Scenario(cells=static.cells[CELL_COLUMNS].copy(), mdt=mdt, traffic=static.traffic,
                    truth={**static.truth, "reports": reports}, manifest=manifest,
                    cells_xy_m=static.cells[["cell_id", "x_m", "y_m"]].copy())


def export(scenario: Scenario, out_dir: str | Path) -> dict[str, int]:
    """Write an in-memory scenario to `out_dir` (same layout as `write_scenario`)."""
    chunk = Chunk(scenario.mdt, scenario.truth["reports"])
    static_truth = {k: v for k, v in scenario.truth.items() if k != "reports"}
    return _export.write_dir(out_dir, cells=scenario.cells, traffic=scenario.traffic, truth=static_truth,
                             chunks=[chunk], manifest=lambda counts: {**scenario.manifest, "counts": {
                                 **{k: v for k, v in scenario.manifest["counts"].items() if not k.startswith("rows:")},
                                 **{f"rows:{k}": v for k, v in counts.items()}}})


def write_scenario(
    cfg: ScenarioConfig,
    out_dir: str | Path,
    *,
    windows: WindowConfig,
    map_resolution_m: float,
    seed: int,
    on_rows: Callable[[int], None] | None = None,
) -> dict:
    """Simulate and write chunk by chunk (bounded memory at bench size); returns the manifest.

    Args:
        on_rows: called with the number of MDT rows after each chunk is written (progress).
    """
    static = _static(cfg, windows, map_resolution_m, seed, None)
    counting = _Counting(iter_chunks(static.world))
    manifest: dict = {}

    def build(counts: dict[str, int]) -> dict:
        manifest.update(_manifest(static, cfg, windows=windows, map_resolution_m=map_resolution_m, seed=seed,
                                  dirt=counting.dirt, n_clean=counting.n_clean, counts=counts))
        return manifest

    _export.write_dir(out_dir, cells=static.cells[CELL_COLUMNS], traffic=static.traffic, truth=static.truth,
                      chunks=counting, manifest=build, on_chunk=on_rows)
    return manifest
