"""Bench: full vs incremental regeneration after one new day of MDT for 5% of cells.

Simulates and ingests a scenario, runs density -> radio -> generate once (warm-up, untimed),
then appends one new day of reports for 5% of the cells straight into `mdt_reports` and
`mdt_measurements` (as an operator's daily ingest append would: each copied report keeps its
serving and neighbour rows, shifted one day past the data, new report ids) and times, side by
side in this process:
  baseline: `run_pipeline(stages=[density, radio, generate], force=True)` (everything retrained)
  ours:     `run_pipeline(..., incremental=True)` on the same appended lake state
(the incremental run goes first, on a lake copy, so both see the same input versions).

Scale (env): BENCH_N_SITES (60: 180 cells), BENCH_N_REPORTS (30,000), BENCH_N_SHARDS (32),
BENCH_AREA_KM (default: the default scenario's site density, 6 km * sqrt(sites / 20)).
At 10^3 cells (issue 15): BENCH_N_SITES=334 BENCH_N_REPORTS=1000000 BENCH_N_SHARDS=128 (about 8
cells per shard, as the default scenario's 60 cells on 8 shards) BENCH_WORK=<kept folder>.
Training settings default to the product's (RadioConfig.n_steps / n_weight_samples,
DensityConfig.student_epochs); BENCH_RADIO_STEPS, BENCH_RADIO_WEIGHT_SAMPLES and
BENCH_STUDENT_EPOCHS override them (quick runs, or a machine where the product settings do not fit
the time box). The JSON records the settings used next to the product defaults.

BENCH_KEEP=1 keeps the two lakes (printed at the end) instead of deleting them.

Writes bench/results/incremental.json (or BENCH_OUT): baseline_s (full), ours_s (incremental),
ratio = full / incremental, cells retrained by each stage in each run, each stage's seconds in
both runs (from the registry), the 1-minute load average around the runs, sizes and machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_SITES = int(os.environ.get("BENCH_N_SITES", 60))
N_REPORTS = int(os.environ.get("BENCH_N_REPORTS", 30_000))
N_SHARDS = int(os.environ.get("BENCH_N_SHARDS", 32))
# Site density of the default scenario (20 sites on 6 km) at every size, as bench/scale.py does.
AREA_KM = float(os.environ.get("BENCH_AREA_KM", round(6.0 * (N_SITES / 20) ** 0.5, 1)))
CHANGED_SHARE = 0.05
STAGES = ["density", "radio", "generate"]


def _lib_commit() -> str:
    """The commit of the cellsynth package this process imported, "+dirty" when its folder has changes: the code
    measured (an editable install may sit in another checkout than this script)."""
    import cellsynth

    lib = Path(cellsynth.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(lib), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", ".") else "")


def _settings() -> dict[str, int]:
    """Training settings of this run: the product defaults unless the env overrides them."""
    from cellsynth.config import DensityConfig, RadioConfig

    radio, density = RadioConfig(), DensityConfig()
    return {
        "radio_n_steps": int(os.environ.get("BENCH_RADIO_STEPS", radio.n_steps)),
        "radio_n_weight_samples": int(os.environ.get("BENCH_RADIO_WEIGHT_SAMPLES", radio.n_weight_samples)),
        "density_student_epochs": int(os.environ.get("BENCH_STUDENT_EPOCHS", density.student_epochs)),
    }


def _product_settings() -> dict[str, int]:
    from cellsynth.config import DensityConfig, RadioConfig

    radio, density = RadioConfig(), DensityConfig()
    return {"radio_n_steps": radio.n_steps, "radio_n_weight_samples": radio.n_weight_samples,
            "density_student_epochs": density.student_epochs}


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": sys.version.split()[0]}


def _config(root: Path):
    from cellsynth.config import config_from_dict

    st = _settings()
    return config_from_dict({
        "run": {"lake_root": str(root / "lake"), "data_dir": str(root / "data")},
        "runtime": {"spark": {"master": "local[2]", "shuffle_partitions": 2}, "ray": {"num_cpus": 2}},
        "scenario": {"n_sites": N_SITES, "n_reports": N_REPORTS, "area_km": AREA_KM}, "ingest": {"n_cell_shards": N_SHARDS},
        "density": {"student_epochs": st["density_student_epochs"]},
        "radio": {"n_steps": st["radio_n_steps"]},  # n_weight_samples: unused since the GP model
        "traffic": {"enabled": False}, "report": {"enabled": False},
    })


def _append_new_day(lake, rng: np.random.Generator) -> list[str]:
    """One more day of reports for 5% of the cells (their busiest real day, shifted past the data)."""
    reports = lake.read_pandas("mdt_reports")
    cells = sorted(reports["serving_cell_id"].unique())
    chosen = sorted(rng.choice(cells, size=max(1, round(CHANGED_SHARE * len(cells))), replace=False).tolist())
    mine = reports[reports["serving_cell_id"].isin(chosen)]
    day = mine["ts"].dt.floor("D")
    busiest = day.value_counts().idxmax()
    new = mine[day == busiest].copy()
    shift = reports["ts"].max().floor("D") + pd.Timedelta(days=1) - busiest
    ids = {rid: f"{rid}-d+1" for rid in new["report_id"]}
    new["report_id"] = new["report_id"].map(ids)
    new["ts"] = new["ts"] + shift
    new["ingest_run_id"] = "bench-daily-append"
    meas = lake.read_pandas("mdt_measurements", filters=[("report_id", "in", list(ids))])
    meas["report_id"] = meas["report_id"].map(ids)
    meas["ts"] = meas["ts"] + shift
    versions = {"mdt_reports": lake.write("mdt_reports", new), "mdt_measurements": lake.write("mdt_measurements", meas)}
    # Record the append as a succeeded run: recover() rolls back commits no registry run owns.
    from cellsynth.lake import RunRegistry

    registry = RunRegistry(lake)
    rec = registry.start("bench-daily-append", "daily_append", "-", {})
    registry.succeed(rec, versions, {"mdt_reports": len(new), "mdt_measurements": len(meas)})
    return chosen


def _retrained(lake, run_id: str) -> dict[str, int]:
    kde = lake.read_pandas("kde_models", columns=["cell_id", "run_id"])
    radio = lake.read_pandas("radio_models", columns=["cell_id", "run_id"])
    syn = lake.read_pandas("synthetic_mdt", columns=["run_id", "window", "cell_shard"])
    fresh = syn[syn["run_id"] == run_id]
    return {
        "density_cells": int(kde.loc[(kde.run_id == run_id) & (kde.cell_id != "__area__"), "cell_id"].nunique()),
        "radio_cells": int(radio.loc[radio.run_id == run_id, "cell_id"].nunique()),
        "generate_partitions": int(len(fresh[["window", "cell_shard"]].drop_duplicates())),
        "generate_rows": int(len(fresh)),
    }


def _stage_seconds(registry, run_id: str) -> dict[str, float]:
    """Wall time of each stage of `run_id` from the registry (started_at of its first record to
    ended_at of its last)."""
    df = registry.frame()
    df = df[df["run_id"] == run_id]
    out = {}
    for stage, rows in df.groupby("stage", sort=False):
        out[stage] = round((rows["ended_at"].max() - rows["started_at"].min()).total_seconds(), 2)
    return out


def main() -> None:
    from cellsynth.cluster import Runtime, make_lake
    from cellsynth.cluster.ray_ import init_ray
    from cellsynth.config import RayConfig
    from cellsynth.pipeline import run_pipeline

    t_start = time.perf_counter()
    # BENCH_WORK: a kept folder; the set-up lake (before the append) is saved there once, and a
    # rerun starts from it instead of simulating and training again (a 10^3-cell set-up is long).
    work = Path(os.environ.get("BENCH_WORK") or tempfile.mkdtemp(prefix="bench-incremental-"))
    pristine, setup_file = work / "pristine", work / "setup.json"
    init_ray(RayConfig(num_cpus=2, n_actors=2, cpus_per_actor=0.5, object_store_memory_mb=512))
    try:
        cfg = _config(work / "a")
        if setup_file.is_file():
            for d in ("a", "b"):
                shutil.rmtree(work / d, ignore_errors=True)
            shutil.copytree(pristine, work / "a", symlinks=True)
            setup_s = json.loads(setup_file.read_text())["setup_s"]
            print(f"set-up lake reused from {pristine}", flush=True)
        rt = Runtime(cfg=cfg, lake=make_lake(cfg), quiet=True)
        if not setup_file.is_file():
            t0 = time.perf_counter()
            run_pipeline(rt, stages=["simulate", "ingest", *STAGES])
            setup_s = time.perf_counter() - t0
            if os.environ.get("BENCH_WORK"):
                shutil.copytree(work / "a", pristine, symlinks=True)
                setup_file.write_text(json.dumps({"setup_s": setup_s}))
            print(f"set-up done in {setup_s:.0f} s", flush=True)
        rt.close()  # stops the Spark session it started (ingest) before the timed runs; Ray is shared
        chosen = _append_new_day(rt.lake, np.random.default_rng(0))
        n_cells = int(rt.lake.read_pandas("cells", columns=["cell_id"]).shape[0])
        # Same appended state for both: copy the lake, run incremental on one, full on the other.
        shutil.copytree(work / "a", work / "b", symlinks=True)
        cfg_b = cfg.model_copy(update={"run": cfg.run.model_copy(update={"lake_root": str(work / "b" / "lake")})})
        rt_b = Runtime(cfg=cfg_b, lake=make_lake(cfg_b), quiet=True)

        load_avg = {"before_incremental": os.getloadavg()[0]}
        t0 = time.perf_counter()
        inc_id, inc = run_pipeline(rt, stages=STAGES, incremental=True)
        ours_s = time.perf_counter() - t0
        load_avg["before_full"] = os.getloadavg()[0]
        t0 = time.perf_counter()
        full_id, _ = run_pipeline(rt_b, stages=STAGES, force=True)
        baseline_s = time.perf_counter() - t0
        load_avg["after_full"] = os.getloadavg()[0]

        reg = rt.registry.latest(50)
        notes = {r.stage: r.note for r in reg.itertuples() if r.run_id == inc_id}
        out = {
            "name": "incremental",
            "baseline": "full density+radio+generate run (force) after the append",
            "ours": "run --incremental: changed (window, cell_shard) partitions and appended cells only",
            "baseline_s": round(baseline_s, 2), "ours_s": round(ours_s, 2), "ratio": round(baseline_s / ours_s, 2),
            "retrained_full": _retrained(rt_b.lake, full_id), "retrained_incremental": _retrained(rt.lake, inc_id),
            "registry_notes": notes, "stage_status": {r.stage: ("skipped" if r.skipped else "ran") for r in inc},
            "stage_s": {"full": _stage_seconds(rt_b.registry, full_id), "incremental": _stage_seconds(rt.registry, inc_id)},
            "min_changed_share": cfg.run.incremental_min_changed_share,
            "sizes": {"n_sites": N_SITES, "n_reports": N_REPORTS, "n_cells": n_cells, "changed_cells": len(chosen),
                      "changed_share": CHANGED_SHARE, "n_cell_shards": cfg.ingest.n_cell_shards, "area_km": AREA_KM,
                      "windows": cfg.ingest.windows.model_dump(), "setup_s": round(setup_s, 1)},
            "settings": {"used": _settings(), "product_defaults": _product_settings()},
            "machine": machine(), "load_avg_1min": {k: round(v, 2) for k, v in load_avg.items()},
            "total_s": round(time.perf_counter() - t_start, 1),
        }
        out["commit"] = os.environ.get("BENCH_COMMIT") or _lib_commit()
        path = Path(os.environ.get("BENCH_OUT", Path(__file__).parent / "results" / "incremental.json"))
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        rt.close()
        rt_b.close()
    finally:
        import ray

        ray.shutdown()
        if os.environ.get("BENCH_KEEP") or os.environ.get("BENCH_WORK"):  # keep both lakes to profile a stage on them
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
