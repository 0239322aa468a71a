"""Bench: the generate stage (GUMBLE Algorithm 1 + radio regression) at 10^3 cells.

The world is simulated cheaply, so the bench measures generation, not training: 334 sites x 3
sectors on a jittered 500 m grid; each cell's KDE holds the held-in positions of a 10^6-report
scenario (~650 per cell, Scott bandwidth), the area density f_j^O a 200k subsample (the
density stage's cap); radio models are exact-GP `FittedCells` with fixed hyperparameters
(length 80 m, signal 6 dB, noise 3 dB: the priors' centres) and the rows the radio stage trains
on at that scale: RSRP from every measurement of the cell (its serving positions and the reports
that list it as one of 4 neighbours, capped at radio.max_rows = 1,500), RSRQ from its serving
positions (~650); neighbour detection maps from simulated neighbour lists. Default generate
settings (4 neighbours, values sampled, multiple 1, the analytic GP predictive), load scenario
"fixed" (no report table to take loads from).

The radio models carry posterior rasters (radio.posterior_raster, radio/raster.py), built here
as the radio stage builds them, in 2 processes; that CPU time moves from generation into the
radio stage and is written as `radio_stage_raster_build`.

Writes bench/results/generate.json: rows_per_min of the stage at 10^3 cells (Ray, 2 CPUs, Ray
start-up and the workers' warm-up not counted: `ray_worker_warmup`) with CPU seconds over the
driver and its Ray processes; a per-phase
profile of the driver-side (use_ray=false) run; and, on a subset world of the same density with
SUBSET_SITES sites (~10^2 cells; the old path at 10^3 cells needed about an hour), the previous
driver path (whole window sampled and associated on the driver, per-cell scikit-learn scoring,
radio prediction before radio/fastvar.py), the stage without rasters (exact GP) and with them,
and the raster-vs-exact agreement: predictions at the generated rows and the synthetic rows'
statistics, same seeds.

`python bench/generate.py radio` measures the radio half's unit of work alone (before / after
radio/fastvar.py in the same run) into the `radio_prediction` part of the same file.

`python bench/generate.py` (env BENCH_GEN_ROWS: synthetic rows, default 200000; BENCH_GEN_DRIVER=0
skips the profiled driver-side run; BENCH_GEN_SITES / BENCH_GEN_SUBSET_SITES the two worlds;
BENCH_GEN_OUT another output file; BENCH_GEN_RASTER_CACHE a directory that keeps the rasters
by model files and radio code, so a rerun on unchanged radio code skips their ~1,600 CPU-s build
and reports the build figures of the run that made them, marked `from_cache`). A partial JSON
(ours only) is written before the rest runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellsynth.cluster.runtime import Runtime, make_lake
from cellsynth.config import config_from_dict
from cellsynth.density import DensityModels
from cellsynth.density._files import positions_rel_path, write_positions
from cellsynth.generate import stage as gstage
from cellsynth.generate import transforms as T
from cellsynth.schemas import AREA_CELL_ID, cell_shard_of

N_SITES = int(os.environ.get("BENCH_GEN_SITES", 334))  # x 3 sectors = 1,002 cells
N_ROWS = int(os.environ.get("BENCH_GEN_ROWS", 200_000))
PER_CELL = 650  # held-in reports per cell at 10^6 reports / 10^3 cells (65% held in)
RADIO_ROWS = 1500  # radio.max_rows: a cell's GP rows at this scale (serving + neighbour rows)
N_SHARDS = 8
WINDOW = "h00_24"
OUT = Path(os.environ.get("BENCH_GEN_OUT", Path(__file__).resolve().parent / "results" / "generate.json"))


def machine() -> dict:
    import subprocess

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    here = Path(__file__).resolve().parent
    git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True).stdout.strip()  # noqa: E731
    code = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "../lib", ".") else "")
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": sys.version.split()[0], "code": code}


# ------------------------------------------------------------------------------- the world
def world(rng: np.random.Generator, n_sites: int = N_SITES) -> tuple[pd.DataFrame, list[np.ndarray]]:
    side = int(np.ceil(np.sqrt(n_sites)))
    rows, positions = [], []
    for s in range(n_sites):
        site = np.array([s % side, s // side], float) * 500.0 + rng.normal(0, 60, 2)
        for k, az in enumerate((0.0, 120.0, 240.0)):
            a = np.radians(az)
            centre = site + 220.0 * np.array([np.sin(a), np.cos(a)])
            n = int(rng.integers(PER_CELL // 2, PER_CELL * 3 // 2))
            positions.append(centre + rng.normal(0, rng.uniform(90, 180), size=(n, 2)))
            rows.append({"cell_id": f"s{s:04d}-{k}", "x_m": site[0], "y_m": site[1], "azimuth_deg": az})
    cells = pd.DataFrame(rows).assign(frame_lat0=44.4949, frame_lon0=11.3426)
    return cells, positions


class _KdeSource:
    """What DensityModels.load reads: the kde_models rows and a root with the position files."""

    def __init__(self, root: str, rows: pd.DataFrame):
        self.root, self._rows = root, rows

    def read_pandas(self, table: str, version=None):
        return self._rows


def density_models(root: str, cells: pd.DataFrame, positions: list[np.ndarray], rng: np.random.Generator,
                   n_rows: int = N_ROWS) -> DensityModels:
    rows, frames = [], {}
    shard_of = [cell_shard_of(c, N_SHARDS) for c in cells["cell_id"]]
    for cid, xy, shard in zip(cells["cell_id"], positions, shard_of):
        h = max(float(np.sqrt(np.mean(np.var(xy, axis=0)))) * len(xy) ** (-1 / 6), 20.0)  # Scott
        rel = positions_rel_path("bench", WINDOW, shard)
        frames.setdefault(rel, []).append(pd.DataFrame({"window": WINDOW, "cell_id": cid, "x_m": xy[:, 0], "y_m": xy[:, 1]}))
        rows.append({"window": WINDOW, "cell_id": cid, "bandwidth_m": h, "n_reports": len(xy), "x_min_m": xy[:, 0].min(),
                     "y_min_m": xy[:, 1].min(), "x_max_m": xy[:, 0].max(), "y_max_m": xy[:, 1].max(),
                     "bandwidth_source": "fallback", "path": rel})
    allxy = np.vstack(positions)
    area = allxy[rng.choice(len(allxy), min(200_000, len(allxy)), replace=False)]
    rel = positions_rel_path("bench", WINDOW, "area")
    frames[rel] = [pd.DataFrame({"window": WINDOW, "cell_id": AREA_CELL_ID, "x_m": area[:, 0], "y_m": area[:, 1]})]
    rows.append({"window": WINDOW, "cell_id": AREA_CELL_ID, "bandwidth_m": 40.0, "n_reports": n_rows,
                 "x_min_m": area[:, 0].min(), "y_min_m": area[:, 1].min(), "x_max_m": area[:, 0].max(),
                 "y_max_m": area[:, 1].max(), "bandwidth_source": "nll", "path": rel})
    for rel, parts in frames.items():
        write_positions(root, rel, pd.concat(parts, ignore_index=True))
    # one association scale a priori (the CV over scales is density's, not generation's cost)
    return DensityModels.load(_KdeSource(root, pd.DataFrame(rows)), association_bandwidth_scales=(1.0,))


def heard_positions(cells: pd.DataFrame, positions: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Where each cell is measured: its own (serving) positions and those of the reports that list
    it as one of their 4 neighbours (4 of the report's 8 nearest cells, as `measurements`)."""
    from scipy.spatial import cKDTree

    xy = np.vstack(positions)
    _, near = cKDTree(cells[["x_m", "y_m"]].to_numpy(float)).query(xy, k=8)
    nb = np.take_along_axis(near, np.argsort(rng.random(near.shape), axis=1)[:, :4], axis=1).ravel()
    order = np.argsort(nb, kind="stable")
    cuts = np.searchsorted(nb[order], np.arange(len(cells) + 1))
    rows = np.repeat(np.arange(len(xy)), 4)[order]
    return [np.vstack([own, xy[rows[cuts[c]:cuts[c + 1]]]]) for c, own in enumerate(positions)]


def radio_files(root: str, cells: pd.DataFrame, positions: list[np.ndarray], rng: np.random.Generator) -> str:
    """Per shard and target one FittedCells file, written like the radio stage writes them. A
    cell's rows are where it is measured (what the radio stage trains on): RSRP from its serving
    and neighbour measurements (up to radio.max_rows = RADIO_ROWS), RSRQ from its serving ones."""
    from cellsynth.radio.geometry import N_BASIS, prior_mean
    from cellsynth.radio.model import FitSettings, FittedCells

    out = Path(root) / "radio"
    shard_of = np.array([cell_shard_of(c, N_SHARDS) for c in cells["cell_id"]])
    heard = heard_positions(cells, positions, rng)
    for target in ("rsrp", "rsrq"):
        uses_load = target == "rsrq"
        for shard in range(N_SHARDS):
            pick = np.flatnonzero(shard_of == shard)
            sel = cells.iloc[pick]
            n = len(sel)
            pool = [positions[c] if uses_load else heard[c] for c in pick]
            pts_c = [p[np.sort(rng.choice(len(p), RADIO_ROWS, replace=False))] if len(p) > RADIO_ROWS else p for p in pool]
            n_max = max(len(p) for p in pts_c)
            xy = np.zeros((n, n_max, 2))
            y = np.zeros((n, n_max))
            rho = rng.uniform(0.1, 0.9, (n, n_max))
            mask = np.zeros((n, n_max), dtype=bool)
            beta0 = np.zeros((n, N_BASIS))
            for i, (sx, sy, az) in enumerate(zip(sel["x_m"], sel["y_m"], sel["azimuth_deg"])):
                origin = np.array([sx, sy])
                pts = pts_c[i]
                m = len(pts)
                d = np.maximum(np.linalg.norm(pts - origin, axis=1), 10.0)
                yy = (-12.0 - 3.0 * (rho[i, :m] - 0.5) if uses_load else -60.0 - 35.0 * np.log10(d / 1000.0 + 1e-3))
                yy = yy + rng.normal(0, 4.0, m)
                xy[i, :m], y[i, :m], mask[i, :m] = pts, yy, True
                beta0[i], _ = prior_mean(pts, yy, origin, az, rho[i, :m] if uses_load else None, None)
            arrays = {
                "origin_xy_m": sel[["x_m", "y_m"]].to_numpy(float), "azimuth_deg": sel["azimuth_deg"].to_numpy(float),
                "ant_on": np.ones(n), "beta0": beta0, "theta": np.tile(np.log([80.0, 6.0, 3.0]), (n, 1)),
                "scale": np.ones((n, 2)), "cv_mae_db": np.full((n, 2), np.nan), "train_xy_m": xy, "train_y": y,
                "train_rho": rho, "train_w": np.ones((n, n_max)), "mask": mask,
            }
            fc = FittedCells(sel["cell_id"].tolist(), target, FitSettings(uses_load=uses_load), arrays,
                             np.zeros(n), mask.sum(1))
            fc.save(out / f"{target}-{shard}", extra_meta={"epistemic_threshold_db": 3.0, "n_weight_samples": 64})
    return str(out)


def load_radio(directory: str, rasters: bool = True):
    """RadioModels over the bench's files; rasters=False: the exact path (rasters not loaded)."""
    from cellsynth.radio.collection import RadioModels
    from cellsynth.radio.model import FittedCells

    rows, files = [], {}
    cells = pd.read_parquet(Path(directory) / "cells.parquet")
    for p in sorted(Path(directory).glob("*.json")):
        if p.name == "cells.json" or p.name.endswith(".raster.json"):
            continue
        fc = FittedCells.load(p.with_suffix(""))
        if not rasters:
            fc.rasters = {}
        files[str(p.with_suffix(""))] = fc
        rows += [{"cell_id": c, "target": fc.target, "pooled": False, "path": str(p.with_suffix(""))} for c in fc.cell_ids]
    sites = {c: (x, y) for c, x, y in zip(cells["cell_id"], cells["x_m"], cells["y_m"])}
    return RadioModels(pd.DataFrame(rows), files, sites, 3.0, 64)


def measurements(cells: pd.DataFrame, positions: list[np.ndarray], rng: np.random.Generator) -> pd.DataFrame:
    """Held-in measurement rows for the detection maps: each report lists 4 of its 8 nearest
    cells as neighbours (a cheap stand-in for who hears whom)."""
    from scipy.spatial import cKDTree

    xy = np.vstack([p[: 100] for p in positions])
    serving = np.repeat(cells["cell_id"].to_numpy(), [len(p[:100]) for p in positions])
    centre = cells[["x_m", "y_m"]].to_numpy(float)
    _, near = cKDTree(centre).query(xy, k=8)
    pick = np.argsort(rng.random(near.shape), axis=1)[:, :4]
    nb = np.take_along_axis(near, pick, axis=1)
    rid = np.arange(len(xy)).astype(str)
    serv = pd.DataFrame({"report_id": rid, "cell_id": serving, "role": "serving", "x_m": xy[:, 0], "y_m": xy[:, 1]})
    nbs = pd.DataFrame({"report_id": np.repeat(rid, 4), "cell_id": cells["cell_id"].to_numpy()[nb.ravel()],
                        "role": "neighbour", "x_m": np.repeat(xy[:, 0], 4), "y_m": np.repeat(xy[:, 1], 4)})
    return pd.concat([serv, nbs], ignore_index=True)


# ----------------------------------------------------------------- the previous driver path
def old_associate(density: DensityModels, window: str, xy: np.ndarray) -> np.ndarray:
    """main before this change: pruned candidates, each cell's pairs scored by scikit-learn."""
    index = density._association_index(window, density.association)
    n = len(xy)
    pidx, cidx = index.candidates(xy)
    scores = np.empty(len(pidx))
    order = np.argsort(cidx, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(cidx[order])) + 1):
        if len(group):
            c = cidx[group[0]]
            scores[group] = index.kde(c).score_samples(xy[pidx[group]]) + index.log_prior[c]
    best_idx = np.zeros(n, dtype=np.int64)
    sel = np.lexsort((cidx, -scores, pidx))
    first = sel[np.r_[True, pidx[sel][1:] != pidx[sel][:-1]]]
    best_idx[pidx[first]] = cidx[first]
    return index.cell_ids[best_idx]


def old_path(cfg, rt, density, radio_dir, cells, detection, n_rows: int) -> int:
    g = cfg.generate
    radio = load_radio(radio_dir, rasters=False)
    gen = np.random.default_rng(T.derived_seed(cfg.run.seed, "positions", WINDOW))
    xy = density.sample_positions(WINDOW, n_rows, rng=gen)
    serving = old_associate(density, WINDOW, xy)
    positions = pd.DataFrame({"sample_id": [f"syn-{WINDOW}-{i:09d}" for i in range(len(xy))], "window": WINDOW,
                              "x_m": xy[:, 0], "y_m": xy[:, 1], "serving_cell_id": serving})
    settings = {"seed": cfg.run.seed, "n_neighbours": g.n_neighbours, "neighbour_radius_m": g.neighbour_radius_m,
                "neighbour_candidates": g.neighbour_candidates, "epistemic_threshold_db": 3.0, "values": g.values,
                "scenario": "fixed", "run_id": "old", "n_cell_shards": N_SHARDS, "frame_lat0": 44.4949, "frame_lon0": 11.3426,
                "rsrp_range_dbm": cfg.ingest.rsrp_range_dbm, "rsrq_range_db": cfg.ingest.rsrq_range_db}
    cell_cols = cells[["cell_id", "x_m", "y_m"]]
    # the radio half as now (all shards pooled, each cell solved once), on one core
    shards = {s: ({WINDOW: grp}, {WINDOW: np.full(len(grp), g.load_rho)})
              for s, grp in T.shard_groups(positions, N_SHARDS).items()}
    acts, _ = gstage._stage_shards(rt.lake, radio, shards, cell_cols, settings, detection)
    return sum(gstage._num_records(a) for a in acts)


# ------------------------------------------------------------------------------------ main
SUBSET_SITES = int(os.environ.get("BENCH_GEN_SUBSET_SITES", 34))  # the baseline's world: ~10^2 cells


def make_world(tmp: str, tag: str, n_sites: int, n_rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    root = f"{tmp}/{tag}"
    t0 = time.perf_counter()
    cells, positions = world(rng, n_sites)
    density = density_models(root, cells, positions, rng, n_rows)
    radio_dir = radio_files(root, cells, positions, rng)
    cells.to_parquet(Path(radio_dir) / "cells.parquet")
    return {"tag": tag, "root": root, "cells": cells, "positions": positions, "density": density, "radio_dir": radio_dir,
            "meas": measurements(cells, positions, rng), "n_rows": n_rows, "build_s": time.perf_counter() - t0}


def _raster_file(path: str) -> dict:
    """One model file's rasters, as the radio stage builds them (radio.posterior_raster); its CPU time."""
    import torch

    from cellsynth.radio import raster
    from cellsynth.radio.model import FittedCells

    torch.set_num_threads(1)
    t = time.process_time()
    fc = FittedCells.load(path)
    built = raster.save_for(fc, path)
    errs = [lev.check_err_db for r in built.values() for lev in r.levels[:1]]
    return {"cpu_s": time.process_time() - t, "cells": len(fc.cell_ids), "target": fc.target, "built": len(built),
            "nodes": [r.n_nodes() for r in built.values()], "levels": [len(r.levels) for r in built.values()],
            "mean_err": [e[0] for e in errs], "std_err": [e[1] for e in errs],
            "train_rows": fc.arrays["mask"].sum(1).tolist()}


RASTER_CACHE = os.environ.get("BENCH_GEN_RASTER_CACHE")  # a directory: rasters and their build figures, by key


def raster_key(radio_dir: str) -> str:
    """What a model directory's rasters depend on: the model files' bytes and the radio package's
    source (any change to either gives another key)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(radio_dir).iterdir()):
        if p.suffix in (".json", ".safetensors") and ".raster." not in p.name:
            h.update(p.name.encode() + p.read_bytes())
    radio_src = Path(gstage.__file__).resolve().parents[1] / "radio"
    for p in sorted(radio_src.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:24]


def build_rasters(radio_dir: str) -> dict:
    """Every model file's rasters, two processes (the 2 cores): the cost that moves into the radio
    stage. With BENCH_GEN_RASTER_CACHE the rasters of the same model files and radio code are
    copied from the cache when it holds them, with the figures of the run that built them
    (`from_cache`: its code and time), and stored there after a build."""
    import shutil

    entry = Path(RASTER_CACHE) / raster_key(radio_dir) if RASTER_CACHE else None
    if entry is not None and (entry / "build.json").is_file():
        for p in entry.glob("*.raster.*"):
            shutil.copy(p, Path(radio_dir) / p.name)
        return {**json.loads((entry / "build.json").read_text()), "from_cache": str(entry)}
    out = _build_rasters(radio_dir)
    if entry is not None:
        entry.mkdir(parents=True, exist_ok=True)
        for p in Path(radio_dir).glob("*.raster.*"):
            shutil.copy(p, entry / p.name)
        (entry / "build.json").write_text(json.dumps({**out, "built_by": {"code": machine()["code"], "utc": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg()[0]}}))
    return out


def _build_rasters(radio_dir: str) -> dict:
    from multiprocessing import get_context

    files = [str(p.with_suffix("")) for p in sorted(Path(radio_dir).glob("*.json"))
             if p.name != "cells.json" and not p.name.endswith(".raster.json")]
    t = time.perf_counter()
    with get_context("spawn").Pool(2) as pool:
        parts = pool.map(_raster_file, files, chunksize=1)
    wall = time.perf_counter() - t
    out: dict = {"wall_s": round(wall, 1), "cpu_s": round(sum(p["cpu_s"] for p in parts), 1), "by_target": {}}
    for target in ("rsrp", "rsrq"):
        ps = [p for p in parts if p["target"] == target]
        cells = sum(p["cells"] for p in ps)
        nodes = np.concatenate([p["nodes"] for p in ps]) if ps else np.zeros(0)
        out["by_target"][target] = {
            "cells": cells, "built": sum(p["built"] for p in ps), "cpu_s": round(sum(p["cpu_s"] for p in ps), 1),
            "cpu_ms_per_cell": round(1e3 * sum(p["cpu_s"] for p in ps) / max(cells, 1), 1),
            "nodes_per_cell_mean": round(float(nodes.mean()), 0) if len(nodes) else None,
            "train_rows_per_cell_mean": round(float(np.mean(np.concatenate([p["train_rows"] for p in ps]))), 0),
            "with_far_level": int(sum(sum(v == 2 for v in p["levels"]) for p in ps)),
            "check_max_abs_err_db": {"mean": round(max(max(p["mean_err"], default=0) for p in ps), 4),
                                     "latent_std": round(max(max(p["std_err"], default=0) for p in ps), 4)},
        }
    return out


def main() -> None:
    import torch

    torch.set_num_threads(1)
    started = machine()  # the code as it was when the run started (Ray workers import it later)
    tmp = tempfile.mkdtemp(prefix="bench-generate-")
    full = make_world(tmp, "full", N_SITES, N_ROWS, 0)
    sub = make_world(tmp, "subset", SUBSET_SITES, max(1, round(N_ROWS * SUBSET_SITES / N_SITES)), 1)

    def runtime(name: str, use_ray: bool) -> Runtime:
        cfg = config_from_dict({
            "run": {"lake_root": f"{tmp}/lake-{name}", "data_dir": f"{tmp}/data"},
            "runtime": {"ray": {"num_cpus": 2}}, "ingest": {"n_cell_shards": N_SHARDS},
            "generate": {"use_ray": use_ray, "load_scenario": "fixed", "multiple": 1.0},
            "privacy": {"guard": False},
        })
        return Runtime(cfg=cfg, lake=make_lake(cfg), quiet=True)

    def run_stage(rt: Runtime, w: dict, rasters: bool) -> tuple[float, int]:
        factory = functools.partial(load_radio, w["radio_dir"], rasters)
        t = time.perf_counter()
        res = gstage.generate(rt.cfg, rt, run_id="bench", density=w["density"].without_cache(), radio=factory(),
                              radio_factory=factory, cells=w["cells"], observed_loads=None, synthetic_traffic=None,
                              measurements=w["meas"])
        return time.perf_counter() - t, int(res.rows_written["synthetic_mdt"])

    # the rasters: built once per model file, as the radio stage does with radio.posterior_raster
    load_start = os.getloadavg()[0]
    rasters_full = build_rasters(full["radio_dir"])
    rasters_sub = build_rasters(sub["radio_dir"])

    # ours, Ray with 2 CPUs (start-up before the clock)
    rt = runtime("ray", True)
    for attempt in range(3):  # a loaded machine can time Ray's start-up out; try again
        try:
            rt.ray()
            break
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise
            time.sleep(30)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import Sampler  # /proc sampler over the driver and its Ray processes

    sampler = Sampler(1.0)
    # Warm the Ray workers first (their imports of torch, pandas, sklearn, cellsynth: ~10 CPU-s
    # measured on cold workers) with one generation of the subset world, as in a pipeline run,
    # whose workers earlier stages started; recorded as `ray_worker_warmup`, not counted.
    sampler.mark()
    warm_s, _ = run_stage(runtime("warmup", True), sub, True)
    warmup = {"wall_s": round(warm_s, 2), "cpu_s": sampler.window()["cpu_s"]}
    sampler.mark()
    ours_s, n_ours = run_stage(rt, full, True)
    usage = sampler.window()  # before ray.shutdown: the workers' CPU seconds are still readable
    # the subset world, Ray: the exact path (no rasters) and the rasters, same rows otherwise
    sub_runs = {}
    for name, use in (("exact", False), ("raster", True)):
        rt_s = runtime(f"sub-{name}", True)
        sampler.mark()
        wall, n = run_stage(rt_s, sub, use)
        sub_runs[name] = {"rows_per_min": round(n / wall * 60), "wall_s": round(wall, 2), **_cpu(sampler.window(), n),
                          "rows": n, "lake": rt_s}
    sampler.stop()
    import ray

    ray.shutdown()

    result = {
        "name": "generate",
        "rows_per_min": round(n_ours / ours_s * 60), "ours_s": round(ours_s, 2), **_cpu(usage, n_ours),
        "goal_rows_per_min": 1_000_000,
        "ray_worker_warmup": {**warmup, "note": "one generation of the subset world before the clock, on the same Ray "
                              "session (the workers' imports); not in rows_per_min or ours_cpu_s"},
        "radio_stage_raster_build": {**rasters_full, "note": (
            "radio.posterior_raster: the rasters of every model file, built in the radio stage when it writes the "
            "file (2 processes here); this CPU moves from generation into the radio stage, once per model version")},
        "sizes": {"n_cells": len(full["cells"]), "synthetic_rows": n_ours},
        "partial": "driver-path profile and baseline still running (the JSON is rewritten when they finish)",
        "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "machine": started,
    }
    _write(result)

    # ours on the driver (use_ray=false), profiled by phase; the same rows as the Ray run
    driver = None
    if os.environ.get("BENCH_GEN_DRIVER", "1") == "1":
        import cProfile
        import pstats

        from cellsynth.radio import fastvar, raster

        rt_local = runtime("local", False)
        before = {**dict(raster.STATS), "solves": fastvar.STATS["exact_calls"]}
        prof = cProfile.Profile()
        prof.enable()
        local_s, n_local = run_stage(rt_local, full, True)
        prof.disable()
        phases = {}
        for key, (_, _, _, ct, _) in pstats.Stats(prof).stats.items():
            name = key[2]
            if key[0].endswith("generate/stage.py") and name in ("_plan_task", "_tile_task", "_shards_task"):
                phases[name] = round(phases.get(name, 0.0) + ct, 2)
            if "cellsynth" in key[0] and name in ("predict_latent", "associate", "synthesize_many", "stage_files", "_cell",
                                                  "predict_pooled", "latent", "_kink", "nearest", "strongest_neighbours",
                                                  "to_table", "prob", "candidates", "load", "_latent", "predict"):
                phases[f"{Path(key[0]).parent.name}/{Path(key[0]).stem}.{name}"] = round(ct, 2)
        stats = pstats.Stats(prof)
        top = sorted(((v[2], f"{Path(k[0]).name}:{k[2]}") for k, v in stats.stats.items()), reverse=True)[:15]
        driver = {"use_ray": False, "rows_per_min": round(n_local / local_s * 60), "wall_s": round(local_s, 2),
                  "profile_cumulative_s": phases, "profile_top_own_time_s": {n: round(t, 2) for t, n in top},
                  "predicted_rows_by_raster": raster.STATS["raster_rows"] - before["raster_rows"],
                  "predicted_rows_exact": raster.STATS["exact_rows"] - before["exact_rows"],
                  "same_rows_as_ray": _same_rows(rt.lake, rt_local.lake)}
        result["driver_path"] = driver
        _write(result)

    # the previous driver path (before this issue's generate work, exact radio before fastvar) on the subset world
    rt_old = runtime("old", False)
    detection = T.DetectionMaps(resolution_m=rt_old.cfg.density.map_resolution_m,
                                smoothing_squares=rt_old.cfg.generate.detection_smoothing_squares).fit(sub["meas"])
    from cellsynth.radio import fastvar

    fastvar.MODE = "reference"
    t = time.perf_counter()
    n_old = old_path(rt_old.cfg, rt_old, sub["density"].without_cache(), sub["radio_dir"], sub["cells"], detection, sub["n_rows"])
    old_s = time.perf_counter() - t
    fastvar.MODE = "auto"

    agreement = _agreement(sub, sub_runs["exact"]["lake"].lake, sub_runs["raster"]["lake"].lake)
    for v in sub_runs.values():
        v.pop("lake")
    result.pop("partial")
    result.update({
        "ours": "generate stage, Ray on 2 CPUs, radio models with posterior rasters (radio/raster.py, built in the radio "
                "stage): Algorithm 1 by spatial tile tasks, rows to shard tasks by object reference, radio values "
                "interpolated from each cell's raster (exact GP where a row falls outside it)",
        "subset": {
            "what": "the same code on a world of the same density with fewer sites (per-cell and per-row work alike; "
                    "the old path at 10^3 cells needed about an hour)",
            "n_cells": len(sub["cells"]), "synthetic_rows": sub_runs["exact"]["rows"],
            "baseline": "previous driver path: whole window sampled and associated on the driver (per-cell scikit-learn "
                        "scoring), then the radio half in the same process with the radio prediction before "
                        "radio/fastvar.py (gp.solve / gp.predict_latent)",
            "baseline_rows_per_min": round(n_old / old_s * 60), "baseline_s": round(old_s, 2),
            "exact": sub_runs["exact"], "raster": sub_runs["raster"],
            "raster_build": rasters_sub,
            "ratio_raster_vs_baseline": round(sub_runs["raster"]["rows_per_min"] / (n_old / old_s * 60), 2),
            "ratio_raster_vs_exact": round(sub_runs["raster"]["rows_per_min"] / sub_runs["exact"]["rows_per_min"], 2),
            "raster_vs_exact": agreement,
        },
        "sizes": {"n_cells": len(full["cells"]), "synthetic_rows": n_ours, "rows_per_tile": rt.cfg.generate.rows_per_tile,
                  "kde_positions_per_cell_mean": round(float(np.mean([len(p) for p in full["positions"]])), 1),
                  "radio_gp_rows_per_cell_max": RADIO_ROWS, "n_neighbours": rt.cfg.generate.n_neighbours,
                  "n_cell_shards": N_SHARDS},
        "world_build_s": round(full["build_s"], 1),
        "loadavg_end": os.getloadavg()[0],
    })
    _write(result)
    print(json.dumps(result, indent=2))


def _write(result: dict) -> None:
    OUT.parent.mkdir(exist_ok=True)
    keep = {k: v for k, v in (json.loads(OUT.read_text()) if OUT.is_file() else {}).items() if k == "radio_prediction"}
    OUT.write_text(json.dumps({**keep, **result}, indent=2) + "\n")


def _agreement(w: dict, lake_exact, lake_raster) -> dict:
    """Raster against exact on the subset: the radio predictions at the generated rows (serving
    RSRP and RSRQ, every neighbour RSRP) and the synthetic rows' statistics, same seeds."""
    a = lake_exact.read_pandas("synthetic_mdt").sort_values("sample_id").reset_index(drop=True)
    b = lake_raster.read_pandas("synthetic_mdt").sort_values("sample_id").reset_index(drop=True)
    out: dict = {"same_rows": bool(len(a) == len(b) and (a["sample_id"].to_numpy() == b["sample_id"].to_numpy()).all()),
                 "same_columns": list(a.columns) == list(b.columns)}
    exact, rast = load_radio(w["radio_dir"], False), load_radio(w["radio_dir"], True)
    pred = {}
    xy = a[["x_m", "y_m"]].to_numpy(float)
    asks = [("rsrp", a["serving_cell_id"].to_numpy(str), xy, None),
            ("rsrq", a["serving_cell_id"].to_numpy(str), xy, np.full(len(a), 0.5))]
    for k in range(1, 5):
        sel = a[f"neighbour_{k}_cell_id"].notna().to_numpy()
        asks.append(("rsrp", a.loc[sel, f"neighbour_{k}_cell_id"].to_numpy(str), xy[sel], None))
    diffs = {"mean": [], "epistemic_std": [], "aleatoric_std": []}
    for target, ids, pts, rho in asks:
        pe = T.predict_pooled(exact, target, ids, pts, load_rho=rho)
        pr = T.predict_pooled(rast, target, ids, pts, load_rho=rho)
        for name, i in (("mean", 0), ("epistemic_std", 1), ("aleatoric_std", 2)):
            diffs[name].append(np.abs(pe[i] - pr[i]))
    for name, v in diffs.items():
        v = np.concatenate(v)
        pred[name] = {"max_abs_db": float(v.max()), "p99_abs_db": float(np.quantile(v, 0.99)), "n": int(len(v))}
    out["predictions_at_generated_rows"] = pred
    stats = {}
    for col in ("rsrp_dbm", "rsrq_db", "rsrp_dbm_epistemic_std", "rsrq_db_epistemic_std", "neighbour_1_rsrp_dbm",
                "neighbour_4_rsrp_dbm"):
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        stats[col] = {"mean": [round(float(np.nanmean(x)), 4), round(float(np.nanmean(y)), 4)],
                      "std": [round(float(np.nanstd(x)), 4), round(float(np.nanstd(y)), 4)],
                      "share_rows_differing": round(float(np.mean(~((x == y) | (np.isnan(x) & np.isnan(y))))), 5)}
    for col in ("reliable", "clipped"):
        stats[col] = {"share": [round(float(a[col].mean()), 5), round(float(b[col].mean()), 5)]}
    stats["neighbours_per_row"] = [round(float(a[[f"neighbour_{k}_cell_id" for k in range(1, 5)]].notna().sum(1).mean()), 4),
                                   round(float(b[[f"neighbour_{k}_cell_id" for k in range(1, 5)]].notna().sum(1).mean()), 4)]
    out["row_statistics_exact_vs_raster"] = stats
    return out


def _cpu(usage: dict, n_rows: int) -> dict:
    """CPU seconds of the stage over the driver and every Ray process (a shared machine's load
    stretches the wall time, not the CPU work), and what that work gives on two idle cores."""
    cpu = max(usage["cpu_s"], 1e-9)
    return {"ours_cpu_s": usage["cpu_s"], "rows_per_cpu_min": round(n_rows / cpu * 60),
            "rows_per_min_2_idle_cores_projected": round(2 * n_rows / cpu * 60),
            "driver_peak_rss_mb": usage["driver_peak_rss_mb"], "worker_peak_rss_mb": usage["worker_peak_rss_mb"]}


def _same_rows(lake_a, lake_b) -> bool:
    a = lake_a.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    b = lake_b.read_pandas("synthetic_mdt").drop(columns="run_id").sort_values("sample_id").reset_index(drop=True)
    if len(a) != len(b) or not (a["sample_id"].to_numpy() == b["sample_id"].to_numpy()).all():
        return False
    try:
        pd.testing.assert_frame_equal(a, b[a.columns])
    except AssertionError:
        return False
    return True


# ------------------------------------------------------------- radio prediction alone
RADIO_CELLS = int(os.environ.get("BENCH_GEN_RADIO_CELLS", 16))
ROWS_PER_CELL = 1000  # RSRP predictions per model cell in the stage run: 200k rows x ~5 / 10^3 cells
MANY_ROWS = 50_000


def bench_radio() -> dict:
    """The radio half's unit of work, before and after radio/fastvar.py in the same run: RADIO_CELLS
    cells of RADIO_ROWS training rows (fixed hyperparameters as above), each solved and asked for
    ROWS_PER_CELL predictions over its neighbourhood; then one cell asked for MANY_ROWS rows over a
    1.2 km square (at the 80 m length the grid has ~18.5k nodes, so it pays from ~37k rows: a
    cell's share of a 10^3-cell window at generate.multiple ~10), against the exact variance at
    every row."""
    import torch

    from cellsynth.radio import fastvar
    from cellsynth.radio.geometry import N_BASIS, prior_mean
    from cellsynth.radio.model import FitSettings, FittedCells

    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    n = RADIO_CELLS
    xy, y, beta0 = np.zeros((n, RADIO_ROWS, 2)), np.zeros((n, RADIO_ROWS)), np.zeros((n, N_BASIS))
    for i in range(n):
        pts = rng.normal(0, 400, size=(RADIO_ROWS, 2))
        d = np.maximum(np.linalg.norm(pts, axis=1), 10.0)
        xy[i], y[i] = pts, -60.0 - 35.0 * np.log10(d / 1000.0) + rng.normal(0, 4.0, RADIO_ROWS)
        beta0[i], _ = prior_mean(pts, y[i], np.zeros(2), 0.0, None, None)
    arrays = {"origin_xy_m": np.zeros((n, 2)), "azimuth_deg": np.zeros(n), "ant_on": np.ones(n), "beta0": beta0,
              "theta": np.tile(np.log([80.0, 6.0, 3.0]), (n, 1)), "scale": np.ones((n, 2)), "cv_mae_db": np.full((n, 2), np.nan),
              "train_xy_m": xy, "train_y": y, "train_rho": np.full((n, RADIO_ROWS), 0.5), "train_w": np.ones((n, RADIO_ROWS)),
              "mask": np.ones((n, RADIO_ROWS), dtype=bool)}
    fc = FittedCells([f"c{i}" for i in range(n)], "rsrp", FitSettings(), arrays, np.zeros(n), np.full(n, RADIO_ROWS))
    rows = rng.normal(0, 500, size=(n * ROWS_PER_CELL, 2))
    idx = np.repeat(np.arange(n), ROWS_PER_CELL)
    out: dict = {"cells": n, "train_rows_per_cell": RADIO_ROWS, "predictions_per_cell": ROWS_PER_CELL, "torch_threads": 1}
    preds = {}
    for mode in ("reference", "auto"):
        fastvar.MODE = mode
        fc._solved.clear()
        t = time.perf_counter()
        for i in range(n):
            fc._cell(i, torch.device("cpu"))
        solve_s = time.perf_counter() - t
        t = time.perf_counter()
        preds[mode] = fc.predict(idx, rows)
        predict_s = time.perf_counter() - t
        out[mode] = {"solve_ms_per_cell": round(solve_s / n * 1e3, 1), "predict_ms_per_cell": round(predict_s / n * 1e3, 1),
                     "ms_per_cell": round((solve_s + predict_s) / n * 1e3, 1)}
    fastvar.MODE = "auto"
    out["ratio"] = round(out["reference"]["ms_per_cell"] / out["auto"]["ms_per_cell"], 2)
    out["max_abs_diff"] = {"mean_db": float(np.abs(preds["auto"].mean - preds["reference"].mean).max()),
                           "epistemic_std_db": float(np.abs(preds["auto"].epistemic_std - preds["reference"].epistemic_std).max())}
    # many rows for one cell: the grid's regime (a 1.2 km square of rows)
    many = rng.uniform(-600, 600, size=(MANY_ROWS, 2))
    one = np.zeros(len(many), dtype=np.int64)
    timings, got = {}, {}
    for mode in ("exact", "auto"):
        fastvar.MODE = mode
        fc._solved.clear()
        before = dict(fastvar.STATS)
        t = time.perf_counter()
        got[mode] = fc.predict(one, many)
        timings[mode] = time.perf_counter() - t
        used = {k: fastvar.STATS[k] - before[k] for k in ("grid_calls", "grid_rejected")}
    fastvar.MODE = "auto"
    err = np.abs(got["auto"].epistemic_std - got["exact"].epistemic_std)
    out["one_cell_many_rows"] = {"rows": MANY_ROWS,
        "exact_s": round(timings["exact"], 2), "grid_s": round(timings["auto"], 2), "ratio": round(timings["exact"] / timings["auto"], 2),
        "grid_chunks": used["grid_calls"], "grid_chunks_rejected": used["grid_rejected"],
        "grid_step_m": fastvar.grid_step_m(80.0), "tolerance_db": fastvar.TOLERANCE_DB,
        "epistemic_std_abs_error_db": {"max": float(err.max()), "p99": float(np.quantile(err, 0.99)), "median": float(np.median(err))},
        "mean_max_abs_diff_db": float(np.abs(got["auto"].mean - got["exact"].mean).max()),
    }
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["radio"]:
        started = machine()
        res = bench_radio()
        old = json.loads(OUT.read_text()) if OUT.is_file() else {"name": "generate"}
        old["radio_prediction"] = {**res, "machine": started, "loadavg": os.getloadavg()[0]}
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(old, indent=2) + "\n")
        print(json.dumps(old["radio_prediction"], indent=2))
    else:
        main()
