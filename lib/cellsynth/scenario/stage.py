"""Stage `simulate`: write the simulator's raw operator files and ground truth to a folder.

It writes no lake tables; ingest reads the folder. A folder whose manifest already carries this
config's hash is left alone, so reruns cost nothing.
"""

from __future__ import annotations

from pathlib import Path

from cellsynth.config import PipelineConfig
from cellsynth.scenario._export import read_manifest
from cellsynth.scenario.simulate import scenario_hash, write_scenario
from cellsynth.stages import StageResult, StageSpec

NAME = "simulate"
INPUTS: tuple[str, ...] = ()
OUTPUTS: tuple[str, ...] = ()


def output_dir(cfg: PipelineConfig) -> Path:
    """Where the raw files go: scenario.output_dir, else <run.data_dir>/sim."""
    return Path(cfg.scenario.output_dir or Path(cfg.run.data_dir) / "sim")


def _hash(cfg: PipelineConfig) -> str:
    return scenario_hash(cfg.scenario, windows=cfg.ingest.windows,
                         map_resolution_m=cfg.density.map_resolution_m, seed=cfg.run.seed)


def external_fingerprint(cfg: PipelineConfig) -> str:
    """The simulation hash (covers windows, map resolution, sites CSV content) and whether the
    folder on disk still holds that simulation."""
    want = _hash(cfg)
    have = (read_manifest(output_dir(cfg)) or {}).get("config_hash")
    return want if have == want else f"{want}:missing"


STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    reads=("scenario", "run.seed", "run.data_dir", "ingest.windows", "density.map_resolution_m"),
    enabled_by="scenario.enabled", external_fingerprint=external_fingerprint,
)


def run(cfg: PipelineConfig, rt, *, run_id: str) -> StageResult:
    out = output_dir(cfg)
    want = _hash(cfg)
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("config_hash") == want:
        return StageResult(stage=NAME, run_id=run_id, skipped=True, note=f"{out} already holds this simulation",
                           rows_written={}, artifacts={"raw_dir": str(out)})
    sc = cfg.scenario
    rt.log(f"simulating {sc.n_sites} sites x {sc.sectors_per_site} sectors, {sc.n_reports:,} reports over "
           f"{sc.n_days} days into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = getattr(rt, "progress", None)
    if progress is None:
        manifest = write_scenario(sc, out, windows=cfg.ingest.windows, map_resolution_m=cfg.density.map_resolution_m,
                                  seed=cfg.run.seed)
    else:
        with progress("simulate: MDT reports", sc.n_reports) as advance:
            manifest = write_scenario(sc, out, windows=cfg.ingest.windows,
                                      map_resolution_m=cfg.density.map_resolution_m, seed=cfg.run.seed,
                                      on_rows=advance)
    rows = {key.removeprefix("rows:"): value for key, value in manifest["counts"].items() if key.startswith("rows:")}
    return StageResult(
        stage=NAME, run_id=run_id, rows_written=rows,
        metrics={"dirty_rows": float(manifest["counts"]["reports_dirty"])},
        artifacts={"raw_dir": str(out), "truth_dir": str(out / "truth")},
    )
