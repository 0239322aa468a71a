"""CPU seconds of one scale-like radio shard fit, this tree's code against a base commit's, side by side.

Issue 15: at 10^3 cells / 10^6 reports the radio stage is the largest stage (bench/results/scale.json).
One shard of `--cells` simulated cells per target, sized like that run's: RSRP cells with
`--rsrp-rows` rows (serving + neighbour rows; the fit caps the exact GP at FitSettings.max_rows =
1,500), RSRQ cells with `--rsrq-rows` rows (serving rows, load and IPW weights), each cell with
its site and azimuth as the cells table gives them, fitted with the stage's settings
(`stage.settings_for` of the default RadioConfig). The base's `lib` is taken from git
(`git archive`) and both run in child processes (one torch thread, as the stage's actors), reps
interleaved (base, ours, ours, base, ...) so the load falls on both alike; each child reports the
process CPU seconds of `fit_cells` and a SHA-256 of every fitted array and of predictions at
shifted rows, so `identical` says whether the two codes fit the same model bit for bit.
Writes bench/results/radio_shard.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import hashlib, json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from cellsynth.config import RadioConfig
from cellsynth.radio.model import CellData, fit_cells
from cellsynth.radio.stage import settings_for
from cellsynth.radio.transforms import ipw_weights
target, n_cells, lo, hi, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(seed)
rcfg = RadioConfig()
cells = []
for c in range(n_cells):
    site, az = rng.uniform(-5000, 5000, 2), float(rng.uniform(0, 360))
    bump = site + rng.uniform(-400, 400, 2)
    n = int(rng.integers(lo, hi + 1))
    xy = site + rng.uniform(-900, 900, (n, 2))
    d_km = np.maximum(np.linalg.norm(xy - site, axis=1), 10) / 1000
    y = -70 - 35 * np.log10(d_km) - 6 * np.exp(-np.sum((xy - bump) ** 2, 1) / (2 * 250.0**2)) + 4 * rng.standard_normal(n)
    rho = weight = None
    if target == "rsrq":
        rho = rng.uniform(0, 1, n)
        y = np.round((-10 - 3 * rho + 0.05 * (y + 90) + 1.5 * rng.standard_normal(n)) * 2) / 2
        weight = ipw_weights(rho, n_bins=rcfg.load_bins) if rcfg.ipw else None
    else:
        y = np.round(y)  # 1 dB report steps
    cells.append(CellData(f"S{c:05d}_1", xy, y, rho, weight, site, az))
settings = settings_for(rcfg, target)
profile = len(sys.argv) > 6 and sys.argv[6] == "profile"
if profile:
    import cProfile, pstats
    prof = cProfile.Profile()
    prof.enable()
t0, w0 = time.process_time(), time.perf_counter()
fitted = fit_cells(cells, target=target, settings=settings, seed=seed)
cpu, wall = time.process_time() - t0, time.perf_counter() - w0
shares = None
if profile:
    prof.disable()
    st = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[2] for v in st.values())
    def cum(file, name, caller_file=None):
        out = 0.0
        for k, v in st.items():
            if k[0].endswith(file) and k[2] == name:
                out += sum(c[3] for ck, c in v[4].items() if ck[0].endswith(caller_file)) if caller_file else v[3]
        return out
    def tot(names):  # C functions: "<built-in method torch._C._linalg.NAME>"
        return sum(v[2] for k, v in st.items() if k[2].split(".")[-1].rstrip(">") in names)
    parts = {
        "fold_refits": cum("foldcv.py", "fold_errors"),
        "fold_refits_hyper_grid": cum("gp.py", "fit_theta_grid", "foldcv.py"),
        "hyper_grid_all_rows": cum("gp.py", "fit_theta_grid", "model.py"),
        "calibration_solve_and_inverse": cum("gp.py", "solve", "model.py") + tot({"cholesky_inverse"}),
        "interval_factors_per_shard": cum("calibration.py", "interval_scales_tail"),
        "lapack_cholesky": tot({"linalg_cholesky", "linalg_cholesky_ex"}),
        "triangular_solves": tot({"linalg_solve_triangular", "cholesky_inverse"}),
    }
    shares = {"profiled_wall_s": total, **{k: v / total for k, v in parts.items()}}  # cProfile times wall-clock
h = hashlib.sha256()
for k in sorted(fitted.arrays):
    h.update(k.encode()); h.update(np.ascontiguousarray(np.asarray(fitted.arrays[k], dtype=float)).tobytes())
h.update(np.asarray(fitted.elbo, dtype=float).tobytes())
q = np.concatenate([c.xy_m[:40] + rng.normal(0, 300, (40, 2)) for c in cells])
pred = fitted.predict(np.repeat(np.arange(n_cells), 40), q, None if target == "rsrp" else rng.uniform(0, 1, len(q)))
for v in (pred.mean, pred.epistemic_std, pred.aleatoric_std, pred.dof_or_inf()):
    h.update(np.ascontiguousarray(v, dtype=float).tobytes())
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "sha256": h.hexdigest(), "rows": int(sum(len(c.y) for c in cells)),
                  "shares": shares}))
'''


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _run(lib: Path, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(lib), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _profile(args) -> dict:
    """Where one shard's fit spends its time (this tree's code; cProfile, wall-clock, its overhead included): shares
    of the fold refits (all of fold_errors; of it, their hyperparameter grids), the hyperparameter
    grid on the cell's rows, the calibration's solve + inverse, the per-shard interval factors, and
    across all of them the LAPACK Cholesky and the triangular solves / inverse."""
    out = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    prof = {"code": _git("rev-parse", "HEAD"), "ours_lib_dirty": bool(_git("status", "--porcelain", "--", "lib")),
            "load_avg_1m_start": os.getloadavg()[0], "cells": args.cells}
    for target, rows in (("rsrp", args.rsrp_rows), ("rsrq", args.rsrq_rows)):
        r = _run(ROOT / "lib", [target, str(args.cells), str(rows[0]), str(rows[1]), str(args.seed), "profile"])
        prof[target] = {"cpu_s_profiled": r["cpu_s"], **r["shares"]}
        print(target, json.dumps(prof[target]), flush=True)
    prof["load_avg_1m_end"] = os.getloadavg()[0]
    out["profile"] = prof
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="75c0567", help="git commit whose lib is the reference (main before session 17)")
    ap.add_argument("--cells", type=int, default=24)
    ap.add_argument("--rsrp-rows", type=int, nargs=2, default=(1000, 2500))
    ap.add_argument("--rsrq-rows", type=int, nargs=2, default=(500, 1100))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "radio_shard.json"))
    ap.add_argument("--profile", action="store_true",
                    help="only profile one fit per target of this tree's code (cProfile shares of the CPU) into `profile` of --out")
    args = ap.parse_args(argv)
    if args.profile:
        return _profile(args)
    base = _git("rev-parse", args.base)
    ours = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "lib"))
    load0 = os.getloadavg()
    t_start = time.time()
    runs: dict[str, dict[str, list[dict]]] = {"base": {}, "ours": {}}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git archive {base} lib | tar -x -C {tmp}", shell=True, cwd=ROOT, check=True)
        libs = {"base": Path(tmp) / "lib", "ours": ROOT / "lib"}
        for target, rows in (("rsrp", args.rsrp_rows), ("rsrq", args.rsrq_rows)):
            for rep in range(args.reps):
                order = ("base", "ours") if rep % 2 == 0 else ("ours", "base")
                for side in order:
                    r = _run(libs[side], [target, str(args.cells), str(rows[0]), str(rows[1]), str(args.seed)])
                    r["load_1m"] = os.getloadavg()[0]
                    runs[side].setdefault(target, []).append(r)
                    print(side, target, rep, json.dumps(r), flush=True)
    per_target = {}
    for target in ("rsrp", "rsrq"):
        b = [r["cpu_s"] for r in runs["base"][target]]
        o = [r["cpu_s"] for r in runs["ours"][target]]
        per_target[target] = {
            "base_cpu_s_per_cell": sum(b) / len(b) / args.cells, "ours_cpu_s_per_cell": sum(o) / len(o) / args.cells,
            "ratio_ours_over_base": sum(o) / sum(b),
            "identical": len({r["sha256"] for r in runs["base"][target] + runs["ours"][target]}) == 1,
            "rows": runs["ours"][target][0]["rows"],
        }
    b_all = sum(r["cpu_s"] for t in runs["base"].values() for r in t)
    o_all = sum(r["cpu_s"] for t in runs["ours"].values() for r in t)
    out = {
        "what": "CPU seconds of one scale-like radio shard fit (fit_cells, both targets), this tree vs a base commit, "
                "child processes interleaved in one run",
        "base_code": base, "ours_code": ours, "ours_lib_dirty": dirty,
        "ratio_ours_over_base": o_all / b_all,
        "base_cpu_s_per_cell_both_targets": sum(v["base_cpu_s_per_cell"] for v in per_target.values()),
        "ours_cpu_s_per_cell_both_targets": sum(v["ours_cpu_s_per_cell"] for v in per_target.values()),
        "identical": all(v["identical"] for v in per_target.values()),
        "targets": per_target, "runs": runs,
        "sizes": {"cells": args.cells, "rsrp_rows": list(args.rsrp_rows), "rsrq_rows": list(args.rsrq_rows), "reps": args.reps,
                  "seed": args.seed},
        "machine": {"cores": os.cpu_count(), "torch_threads": 1, "load_avg_1m_start": load0[0],
                    "load_avg_1m_end": os.getloadavg()[0], "wall_s": time.time() - t_start},
    }
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if "profile" in old:  # written by --profile (its own code hash and load), kept
        out["profile"] = old["profile"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("ratio_ours_over_base", "base_cpu_s_per_cell_both_targets",
                                          "ours_cpu_s_per_cell_both_targets", "identical")}))
    return out


if __name__ == "__main__":
    main()
