"""How much of a dp row of bench/results/privacy.json is the draw of the noise (issue 16; a diagnostic
that chooses nothing).

The bench seeds each dp run's noise from run.seed (42). This reruns one epsilon at other noise
seeds (`privacy.noise_seed`) on the bench's lake, with the bench's settings, and writes each run's
row and their mean and std next to the bench's own, so a target met or missed by less than that
spread is read as such.

    python bench/privacy_spread.py --lake DIR [--epsilon 10] [--noise-seeds 1,2,3]

DIR is the lake `bench/privacy.py` wrote (its `lake_by_epsilon`). Writes
bench/results/privacy_spread_eps<epsilon>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
KEYS = ("rsrp_mae_db", "fingerprint_ratio", "position_ks", "mia_auc", "mia_auc_upper")


def main(argv: list[str] | None = None) -> int:
    from privacy import OVERRIDES, _clean, _read

    from cellsynth.cluster import runtime
    from cellsynth.config import load_config
    from cellsynth.pipeline import run_stage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--epsilon", default="10")
    ap.add_argument("--noise-seeds", default="1,2,3")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default=None, help="recorded in the JSON (e.g. which code the stages ran)")
    args = ap.parse_args(argv)
    out_path = Path(args.out or ROOT / "bench" / "results" / f"privacy_spread_eps{args.epsilon}.json")
    bench = json.loads((ROOT / "bench" / "results" / "privacy.json").read_text())
    result: dict = {"epsilon": args.epsilon, "lake": args.lake, "overrides": OVERRIDES, "note": args.note,
                    "bench_row": {k: bench["by_epsilon"].get(args.epsilon, {}).get(k) for k in KEYS},
                    "bench_inf_rsrp_mae_db": bench["by_epsilon"].get("inf", {}).get("rsrp_mae_db"),
                    "by_noise_seed": {}, "seconds": {}}
    # bench/privacy.py records the folder it made; its lake is that folder's lake/ (or the folder, with --lake).
    lake_root = Path(args.lake) / "lake" if (Path(args.lake) / "lake").is_dir() else Path(args.lake)
    for seed in [int(s) for s in args.noise_seeds.split(",") if s]:
        sets = [f"run.lake_root={lake_root}", *OVERRIDES, "privacy.mode=dp", f"privacy.epsilon={float(args.epsilon)}",
                f"privacy.noise_seed={seed}"]
        cfg = load_config(ROOT / "conf" / "local.yaml", sets)
        t0 = time.time()
        with runtime(cfg, quiet=True) as rt:
            for stage in ("density", "radio", "generate", "evaluate"):
                run_stage(stage, rt, run_id=f"spread-{args.epsilon}-{seed}-{int(t0)}", force=True)
            result["by_noise_seed"][str(seed)] = {k: _read(rt.lake, cfg, {})[k] for k in KEYS}
        result["seconds"][str(seed)] = round(time.time() - t0, 1)
        print(seed, result["by_noise_seed"][str(seed)], flush=True)
        rows = [result["bench_row"], *result["by_noise_seed"].values()]
        result["all_seeds_including_bench"] = {
            k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows], ddof=1)),
                "min": float(np.min([r[k] for r in rows])), "max": float(np.max([r[k] for r in rows]))}
            for k in KEYS} if len(rows) > 1 and args.note is None else {}  # other code: not the bench's draws
        out_path.write_text(json.dumps(_clean(result), indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
