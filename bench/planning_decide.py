"""Session 11's development rule for the planning bench, applied to the development JSON.

The rule was declared before any run (bench/results/planning_dev/session11_declaration.json):
the variant (route selected on independent f_j^O draws, `plan_std_samples_map_portfolio_sel`)
replaces the product's planner if, on development seeds 50-61 under the conditioned reading,
(a) its mean paired MAE reduction minus the default planner's is > 0, (b) its mean paired
epistemic-std reduction minus the default's is >= 0, and (c) at least one of the two paired means
exceeds one standard error of its own (paired std / sqrt(n seeds)).

Writes bench/results/planning_dev/session11_decision.json and prints the selection the headline
run uses: "independent" (adopted) or "own" (kept).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DEV = Path(__file__).parent / "results" / "planning_dev"
VARIANT = "plan_std_samples_map_portfolio_sel"


def decide(dev: dict) -> dict:
    if not dev.get("complete"):
        raise SystemExit("planning_decide: the development run is not complete")
    per_seed = dev["per_seed"]
    out = {"variant": VARIANT, "seeds": [r["seed"] for r in per_seed], "reading": "conditioned"}
    means, ses = {}, {}
    for key in ("mae_reduction_db", "epistemic_reduction_db"):
        d = np.array([r["methods"][VARIANT]["conditioned"][key] - r["methods"]["plan"]["conditioned"][key] for r in per_seed])
        sd = float(d.std(ddof=1))
        means[key], ses[key] = float(d.mean()), float(sd / np.sqrt(len(d)))
        out[f"variant_minus_plan_{key}"] = {"mean": means[key], "std": sd, "se": ses[key], "wins": int((d > 0).sum()),
                                            "ties": int((d == 0).sum()), "seeds": len(d), "per_seed": d.tolist()}
    a = means["mae_reduction_db"] > 0
    b = means["epistemic_reduction_db"] >= 0
    c = any(means[k] > ses[k] for k in means)
    out["rule"] = json.loads((DEV / "session11_declaration.json").read_text())["rule"]
    out["conditions"] = {"a_mae_gain_positive": bool(a), "b_std_gain_nonnegative": bool(b), "c_one_exceeds_its_se": bool(c)}
    out["adopted"] = bool(a and b and c)
    out["selection"] = "independent" if out["adopted"] else "own"
    out["same_route_seeds"] = int(sum(r["methods"][VARIANT]["km"] == r["methods"]["plan"]["km"]
                                      and r["methods"][VARIANT]["route_source"] == r["methods"]["plan"]["route_source"]
                                      for r in per_seed))
    out["decided_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return out


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEV / "session11_seeds50-61.json"
    result = decide(json.loads(src.read_text()))
    (DEV / "session11_decision.json").write_text(json.dumps(result, indent=2))
    print(result["selection"])
