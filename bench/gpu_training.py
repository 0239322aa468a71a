"""Bench: the training parts on a GPU against the CPU of the same machine (issue 15, item 5).

Runs only where torch sees CUDA (the lent GPU machine); elsewhere it says so and writes nothing.
Both sides run the product's code with its defaults; only `device` differs.

1. Radio: `fit_cells` per shard on the simulated cells of bench/radio.py (log-distance field, a
   smooth bump, 4 dB noise, `--rows` rows a cell). CPU: one torch thread, as one Ray actor trains
   (the stage's setting); CUDA: the same shards, and once more with `--gpu-shard` cells a shard
   (a GPU's batches can be wider). Seconds per cell, the ratio, and the MAE of both on the same
   test rows (the same model; float order differs, so answers agree to rounding, not bits).
   A CPU node runs about one actor per core: `ratio_vs_cpu_node` divides the GPU's cells/s by
   `cores` x the one-thread rate, the best a CPU node of that size could do with perfect scaling.
   `node` (part "node"): the same work as the stage spreads it, P processes at once, each fitting its
   own `--shard` cells: P = cores on the CPU (one thread each, as one actor a core) against P = 1, 4
   8 and 16 processes sharing the GPU (the stage's default GPU split); cells/s of the whole node,
   counted from the moment every process is warm (a file barrier) until the last one ends.
   `batching` (part "batching"; issue 14's `ratio_batching` on a GPU): `--per-cell-sample` of the same
   cells fitted one at a time (`fit_cells([cell])`, seed 100 + i as bench/radio.py's baseline), on each
   device, against that device's batched seconds per cell from the radio part of the same run.
2. Traffic: the diffusion model (TrafficConfig defaults) trained `--traffic-steps` steps on the
   1,000 simulated cells of bench/traffic.py, then sampled (n_samples_per_cell weeks a cell), on
   CPU (one thread) and on CUDA: train steps/s, cell-weeks/s, ratios.

Each part is written to the JSON as it finishes (a run cut short keeps what it measured).
`python bench/gpu_training.py [--parts radio,batching,node,traffic] [--out PATH]`; bench/results/gpu_training.json
by default (parts not run keep their figures there).
`python bench/gpu_training.py --table` prints the README's table from the JSON (any machine).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import radio as radio_bench  # noqa: E402
import traffic as traffic_bench  # noqa: E402

from cellsynth.config import TrafficConfig  # noqa: E402
from cellsynth.radio.model import FitSettings, fit_cells  # noqa: E402
from cellsynth.traffic.stage import make_model  # noqa: E402


# the grid fit's settings are the stage's (radio.stage.settings_for differs only in the Pyro
# reference's Adam steps and rate); radio.stage itself imports the lake (deltalake), which the
# GPU machine's image lacks
SETTINGS = FitSettings()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(work, device: str):
    """(work(), wall seconds), the device's queue drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = work()
    _sync(device)
    return out, time.perf_counter() - t0


def _fit(cells, seed: int, device: str):
    return fit_cells(cells, target="rsrp", settings=SETTINGS, seed=seed, device=device)


def radio_side(cells, tests, shard: int, device: str) -> dict:
    shards = [list(range(s, min(s + shard, len(cells)))) for s in range(0, len(cells), shard)]
    _fit(cells[:2], 0, device)  # warm-up (CUDA context, kernels)
    fitted, wall = _timed(lambda: [_fit([cells[i] for i in idx], k, device) for k, idx in enumerate(shards)], device)
    err = []
    for f, idx in zip(fitted, shards):
        for j, i in enumerate(idx):
            xt, yt = tests[i]
            err.append(np.abs(f.predict(np.full(len(xt), j), xt).mean - yt))
    return {"device": device, "cells_per_shard": shard, "s_per_cell": wall / len(cells), "wall_s": wall,
            "cells_per_s": len(cells) / wall, "mae_db": float(np.mean(np.concatenate(err)))}


def bench_radio(cells, tests, shard: int, gpu_shard: int, device: str = "cuda") -> dict:
    cpu = radio_side(cells, tests, shard, "cpu")
    gpu = radio_side(cells, tests, shard, device)
    gpu_wide = radio_side(cells, tests, gpu_shard, device)
    cores = os.cpu_count()
    return {"n_cells": len(cells), "rows_per_cell": len(cells[0].y), "cpu_one_thread": cpu, "cuda": gpu, "cuda_wide_shards": gpu_wide,
            "ratio": cpu["s_per_cell"] / gpu["s_per_cell"], "ratio_wide_shards": cpu["s_per_cell"] / gpu_wide["s_per_cell"],
            "ratio_vs_cpu_node": max(gpu["cells_per_s"], gpu_wide["cells_per_s"]) / (cores * cpu["cells_per_s"]),
            "mae_diff_db": gpu["mae_db"] - cpu["mae_db"]}


def per_cell_side(cells, tests, sample: list[int], device: str) -> dict:
    _fit(cells[:1], 0, device)  # warm-up
    fitted, wall = _timed(lambda: {i: _fit([cells[i]], 100 + i, device) for i in sample}, device)
    err = [np.abs(fitted[i].predict(np.zeros(len(tests[i][0]), dtype=int), tests[i][0]).mean - tests[i][1]) for i in sample]
    return {"device": device, "cells": len(sample), "s_per_cell": wall / len(sample), "mae_db": float(np.mean(np.concatenate(err)))}


def bench_batching(radio: dict, cells, tests, n_sample: int, device: str = "cuda") -> dict:
    sample = list(range(0, len(cells), max(1, len(cells) // n_sample)))[:n_sample]
    alone = {dev: per_cell_side(cells, tests, sample, dev) for dev in dict.fromkeys(("cpu", device))}
    out = {f"per_cell_{dev}": a for dev, a in alone.items()}
    for name, dev, batched in (("cpu", "cpu", radio["cpu_one_thread"]), ("cuda", device, radio["cuda"]),
                               ("cuda_wide_shards", device, radio["cuda_wide_shards"])):
        out[f"ratio_batching_{name}"] = alone[dev]["s_per_cell"] / batched["s_per_cell"]
    return out


def _worker(device: str, n_cells: int, rows: int, seed: int, barrier: str, n_procs: int) -> None:
    """One process of the node part: warm up, wait for all, fit, print its start and end times."""
    cells, _ = radio_bench.simulate(n_cells, rows, seed=seed)
    _fit(cells[:2], 0, device)
    _sync(device)
    Path(barrier, f"{seed}").touch()
    while len(os.listdir(barrier)) < n_procs:
        time.sleep(0.01)
    t0 = time.time()
    _fit(cells, seed, device)
    _sync(device)
    print(json.dumps({"start": t0, "end": time.time()}), flush=True)


def node_side(device: str, n_procs: int, shard: int, rows: int) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as barrier:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", device, "--shard", str(shard), "--rows", str(rows),
                                   "--worker-seed", str(1000 + k), "--barrier", barrier, "--worker-procs", str(n_procs)],
                                  stdout=subprocess.PIPE, text=True) for k in range(n_procs)]
        times = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = max(t["end"] for t in times) - min(t["start"] for t in times)
    return {"device": device, "processes": n_procs, "cells": n_procs * shard, "wall_s": wall,
            "cells_per_s": n_procs * shard / wall}


def bench_node(shard: int, rows: int, device: str = "cuda", gpu_procs: tuple[int, ...] = (1, 4, 8, 16)) -> dict:
    cores = os.cpu_count()
    cpu = node_side("cpu", cores, shard, rows)
    gpus = [node_side(device, p, shard, rows) for p in gpu_procs]
    best = max(gpus, key=lambda g: g["cells_per_s"])
    return {"cpu_all_cores": cpu, "gpu_shared": gpus, "ratio_best_gpu_vs_cpu_node": best["cells_per_s"] / cpu["cells_per_s"]}


def traffic_side(series, context, steps: int, device: str) -> dict:
    tcfg = TrafficConfig()
    model = make_model(tcfg.model_copy(update={"n_steps": steps}), device=device)
    _, fit_s = _timed(lambda: model.fit(series, context, rng=1), device)
    sample, sample_s = _timed(lambda: model.sample(context, tcfg.n_samples_per_cell, rng=2), device)
    return {"device": device, "fit_s": fit_s, "train_steps_per_s": steps / fit_s, "sample_s": sample_s,
            "cell_weeks_per_s": len(context) * tcfg.n_samples_per_cell / sample_s,
            "sample_mean": float(np.mean(sample)), "fast_steps": model.fast_steps_}


def bench_traffic(n_cells: int, steps: int, device: str = "cuda") -> dict:
    series, context = traffic_bench._cells(n_cells, np.random.default_rng(0))
    cpu = traffic_side(series, context, steps, "cpu")
    gpu = traffic_side(series, context, steps, device)
    return {"n_cells": n_cells, "train_steps": steps, "batch_size": TrafficConfig().batch_size, "cpu_one_thread": cpu,
            "cuda": gpu, "ratio_train": gpu["train_steps_per_s"] / cpu["train_steps_per_s"],
            "ratio_sample": gpu["cell_weeks_per_s"] / cpu["cell_weeks_per_s"],
            "note": "fit_s includes the fast sampler's step-count calibration on both sides"}


def table(res: dict) -> str:
    """The README's markdown table from a gpu_training.json."""
    r, t = res["radio"], res["traffic"]
    rows = [("radio fit, s per cell (64-cell shards), one process", f"{r['cpu_one_thread']['s_per_cell']:.3f}",
             f"{r['cuda']['s_per_cell']:.3f}", f"{r['ratio']:.1f}x"),
            (f"radio fit, s per cell ({r['cuda_wide_shards']['cells_per_shard']}-cell shards on the GPU), one process",
             f"{r['cpu_one_thread']['s_per_cell']:.3f}", f"{r['cuda_wide_shards']['s_per_cell']:.3f}",
             f"{r['ratio_wide_shards']:.1f}x"),
            ("radio test MAE [dB]", f"{r['cpu_one_thread']['mae_db']:.4f}", f"{r['cuda']['mae_db']:.4f}", ""),
            ("traffic training, steps/s, one process", f"{t['cpu_one_thread']['train_steps_per_s']:.1f}",
             f"{t['cuda']['train_steps_per_s']:.1f}", f"{t['ratio_train']:.1f}x"),
            ("traffic sampling, cell-weeks/s, one process", f"{t['cpu_one_thread']['cell_weeks_per_s']:,.0f}",
             f"{t['cuda']['cell_weeks_per_s']:,.0f}", f"{t['ratio_sample']:.0f}x")]
    bat = res.get("radio_batching")
    if bat:
        rows.append(("radio fit, s per cell, one cell a call (per-cell loop), one process",
                     f"{bat['per_cell_cpu']['s_per_cell']:.3f}", f"{bat['per_cell_cuda']['s_per_cell']:.3f}", ""))
        rows.append(("radio `ratio_batching`: per-cell loop over 64-cell shards (in brackets: 256-cell shards)",
                     f"{bat['ratio_batching_cpu']:.1f}x", f"{bat['ratio_batching_cuda']:.1f}x "
                     f"({bat['ratio_batching_cuda_wide_shards']:.1f}x)", ""))
    node = res.get("radio_node")
    if node:
        cpu_n = node["cpu_all_cores"]
        for g in node["gpu_shared"]:
            rows.append((f"radio fit, cells/s of the node: {cpu_n['processes']} one-thread CPU processes vs "
                         f"{g['processes']} sharing the GPU", f"{cpu_n['cells_per_s']:.1f}", f"{g['cells_per_s']:.1f}",
                         f"{g['cells_per_s'] / cpu_n['cells_per_s']:.2f}x"))
    lines = ["| what | CPU | GPU | GPU / CPU |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    m = res["machine"]
    lines.append(f"\n{m['gpu']}, {m['cores']} cores, torch {m['torch']}; radio: {r['n_cells']} cells x "
                 f"{r['rows_per_cell']} rows; traffic: {t['n_cells']} cells, {t['train_steps']} steps of batch "
                 f"{t['batch_size']}; CPU = one torch thread a process.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=256)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--shard", type=int, default=64)
    ap.add_argument("--gpu-shard", type=int, default=256)
    ap.add_argument("--per-cell-sample", type=int, default=32)
    ap.add_argument("--traffic-cells", type=int, default=1000)
    ap.add_argument("--traffic-steps", type=int, default=600)
    ap.add_argument("--parts", default="radio,batching,node,traffic")
    ap.add_argument("--gpu-device", default="cuda", help="the accelerated side's device ('cpu' only to try the script)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_training.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # a node-part child: its device
    ap.add_argument("--worker-seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-procs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print the README table from --out and stop")
    args = ap.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        _worker(args.worker, args.shard, args.rows, args.worker_seed, args.barrier, args.worker_procs)
        return None
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return None
    if args.gpu_device == "cuda" and not torch.cuda.is_available():
        print("gpu_training: torch sees no CUDA device here; nothing measured, nothing written")
        return None
    torch.set_num_threads(1)  # the CPU side as one actor runs it; the GPU side's host code too
    path = Path(args.out)
    # parts not run now keep their figures from an earlier run of this file (same machine kind)
    out = json.loads(path.read_text()) if path.exists() else {}
    out |= {"what": __doc__.split("\n\n")[0],
           "machine": {"cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    # the radio parts' simulated cells, made once
    cells_tests = functools.cache(lambda: radio_bench.simulate(args.cells, args.rows, seed=0))
    if "radio" in parts:
        out["radio"] = bench_radio(*cells_tests(), args.shard, args.gpu_shard, args.gpu_device)
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps({k: v for k, v in out["radio"].items() if not isinstance(v, dict)}), flush=True)
    if "batching" in parts:
        out["radio_batching"] = bench_batching(out["radio"], *cells_tests(), args.per_cell_sample, args.gpu_device)
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps(out["radio_batching"]), flush=True)
    if "node" in parts:
        out["radio_node"] = bench_node(args.shard, args.rows, args.gpu_device)
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps(out["radio_node"]), flush=True)
    if "traffic" in parts:
        out["traffic"] = bench_traffic(args.traffic_cells, args.traffic_steps, args.gpu_device)
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps({k: v for k, v in out["traffic"].items() if not isinstance(v, dict)}), flush=True)
    return out


if __name__ == "__main__":
    main()
