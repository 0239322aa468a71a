"""Neighbours named by PCI: how often ingest's nearest-same-PCI rule names the cell the UE measured.

    .venv/bin/python bench/pci.py                   # simulates the default scenario first
    .venv/bin/python bench/pci.py --sim data/sim --pcis 60,30,15,9

3GPP MDT and drive-test loggers name a neighbour by its PCI (and carrier), not by a network-wide
cell id; ingest resolves it to the nearest cell of the cells table with that PCI
(`sources.mdt.neighbour_id: pci`). The simulator knows which cell each neighbour entry is, so the
same reports are ingested twice: named by cell id (the truth) and named by PCI under a PCI plan
with N distinct PCIs over the scenario's cells. Two plans: `planned` (greedy: each cell, in random
order, takes the PCI whose nearest cell already holding it is farthest, which is what planning tools
aim at) and `random` (each cell an independent draw: a worst case, no planner does it). Per run:
the share of the truth's clean neighbour entries that come out as the same cell (`correct`), as
another cell (`wrong`), or rejected (`rejected`, by reason), the median distance between cells that
share a PCI, and the ingest stage's wall time against the cell-id run's; each plan under both
`ingest.pci_rule`s ("nearest": distance alone; "strongest": TR 38.901's distance slope plus the sector
pattern, from the cells' azimuths). The simulator's own radio model is TR 38.901 with that sector
pattern and shadowing, so "strongest" is scored by the physics it assumes: a flattering setting for it.

Writes bench/results/pci.json (every figure in it comes from this script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _sim import default_sim  # bench/, the script's folder

ROOT = Path(__file__).resolve().parents[1]
N_NEIGHBOURS = 4


def plan_planned(xy: np.ndarray, n_pci: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy max-min reuse distance: unused PCIs first, then the one whose nearest holder is farthest."""
    pci = np.full(len(xy), -1)
    for i in rng.permutation(len(xy)):
        best, best_d = 0, -1.0
        for p in range(n_pci):
            holders = xy[pci == p]
            d = np.inf if len(holders) == 0 else float(np.min(np.hypot(*(holders - xy[i]).T)))
            if d > best_d:
                best, best_d = p, d
        pci[i] = best
    return pci


def plan_random(xy: np.ndarray, n_pci: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n_pci, len(xy))


def reuse_distance_m(xy: np.ndarray, pci: np.ndarray) -> float | None:
    """Median over cells of the distance to the nearest other cell with the same PCI (None: no reuse)."""
    out = []
    for i in range(len(xy)):
        same = (pci == pci[i]) & (np.arange(len(xy)) != i)
        if same.any():
            out.append(float(np.min(np.hypot(*(xy[same] - xy[i]).T))))
    return float(np.median(out)) if out else None


def ingest(work: Path, cells_csv: Path, mdt_csv: Path, *, by_pci: bool, rule: str = "strongest",
           ) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    from cellsynth.cluster import Runtime, make_lake
    from cellsynth.config import config_from_dict
    from cellsynth.pipeline import run_stage

    mdt = {"path": str(mdt_csv)}
    if by_pci:
        mdt.update({"neighbour_id": "pci", "neighbour_cell_pattern": "neighbour_{k}_pci"})
    cfg = config_from_dict({
        "run": {"lake_root": str(work / "lake"), "data_dir": str(work / "data")},
        "scenario": {"enabled": False},
        "sources": {"cells": {"path": str(cells_csv)}, "mdt": mdt},
        "ingest": {"pci_rule": rule},
    })
    rt = Runtime(cfg=cfg, lake=make_lake(cfg), quiet=True)
    try:
        t0 = time.perf_counter()
        run_stage("ingest", rt, run_id="pci-bench")
        wall_s = time.perf_counter() - t0
        meas = rt.lake.read_pandas("mdt_measurements", columns=["report_id", "rank", "cell_id", "role"])
        rejects = rt.lake.read_pandas("rejects", columns=["source", "reason_code", "raw_row"])
    finally:
        rt.close()
    return meas[meas["role"] == "neighbour"], rejects[rejects["source"] == "neighbour"], wall_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", type=Path, help="simulator output folder (default: simulate conf/local.yaml's scenario)")
    ap.add_argument("--pcis", default="60,30,15,9", help="numbers of distinct PCIs, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pci.json")
    args = ap.parse_args()
    from cellsynth.geo import LocalFrame

    tmp = Path(tempfile.mkdtemp(prefix="bench-pci-"))
    sim = default_sim(args.sim, tmp)
    cells = pd.read_csv(sim / "cells.csv", dtype=str)
    mdt = pd.read_csv(sim / "mdt.csv", dtype=str, keep_default_na=False)
    lat, lon = cells["latitude"].astype(float).to_numpy(), cells["longitude"].astype(float).to_numpy()
    xy = np.column_stack(LocalFrame.around(lat, lon).to_xy(lat, lon))

    truth, _, truth_wall = ingest(tmp / "by_id", sim / "cells.csv", sim / "mdt.csv", by_pci=False)
    truth = truth.set_index(["report_id", "rank"])["cell_id"]
    print(f"by cell id: {len(truth):,} clean neighbour entries, ingest {truth_wall:.0f} s", flush=True)
    runs = []
    for n_pci in [int(p) for p in args.pcis.split(",")]:
        for scheme, plan in (("planned", plan_planned), ("random", plan_random)):
            if n_pci >= len(cells) and scheme == "random":
                continue  # unique PCIs: both plans are the same network
            pci = plan(xy, n_pci, np.random.default_rng(args.seed)) if n_pci < len(cells) else np.arange(len(cells))
            pci_of = dict(zip(cells["cell_id"], pci.astype(str), strict=True))
            folder = tmp / f"{scheme}_{n_pci}"
            folder.mkdir()
            cells.assign(pci=pci).to_csv(folder / "cells.csv", index=False)
            named = mdt.copy()
            for k in range(1, N_NEIGHBOURS + 1):
                col = f"neighbour_{k}_cell_id"
                named[f"neighbour_{k}_pci"] = named.pop(col).map(lambda c: pci_of.get(c, c) if c else c)
            named.to_csv(folder / "mdt.csv", index=False)
            for rule in ("nearest", "strongest"):
                got, rej, wall = ingest(folder / rule, folder / "cells.csv", folder / "mdt.csv", by_pci=True, rule=rule)
                got = got.set_index(["report_id", "rank"])["cell_id"]
                both = truth.to_frame("truth").join(got.rename("got"), how="left")
                n = len(both)
                keys = {(r["report_id"], r["rank"]) for r in map(json.loads, rej["raw_row"])}
                rej_keyed = pd.Series([json.loads(r)["report_id"] + "#" + str(json.loads(r)["rank"]) for r in rej["raw_row"]])
                reasons = rej.assign(key=rej_keyed.to_numpy()).set_index("key")["reason_code"]
                missing = both[both["got"].isna()]
                missing_reasons = reasons.reindex([f"{a}#{b}" for a, b in missing.index]).value_counts().to_dict()
                run = {
                    "plan": scheme, "rule": rule, "n_pci": int(n_pci), "n_cells": len(cells),
                    "median_reuse_distance_m": (None if (d := reuse_distance_m(xy, pci)) is None else round(d, 1)),
                    "n_truth_entries": int(n),
                    "correct": round(float((both["got"] == both["truth"]).sum() / n), 4),
                    "wrong": round(float((both["got"].notna() & (both["got"] != both["truth"])).sum() / n), 4),
                    "rejected": round(float(both["got"].isna().sum() / n), 4),
                    "rejected_by_reason": {k: int(v) for k, v in sorted(missing_reasons.items())},
                    "extra_entries": int(len(got) - both["got"].notna().sum()),
                    "n_rejected_entries": len(keys),
                    "ingest_wall_s": round(wall, 1), "ingest_wall_s_by_cell_id": round(truth_wall, 1),
                }
                runs.append(run)
                print(f"{scheme:8s} {rule:9s} {n_pci:3d} PCIs: correct {run['correct']:.3f}, wrong {run['wrong']:.3f}, "
                      f"rejected {run['rejected']:.3f}, reuse {run['median_reuse_distance_m']} m, {wall:.0f} s", flush=True)
    out = {
        "what": "neighbour entries named by PCI, resolved by ingest (nearest cell with that PCI); truth: the same "
                "reports named by cell id",
        "sim": str(sim), "n_reports": len(mdt), "seed": args.seed,
        "code": subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
