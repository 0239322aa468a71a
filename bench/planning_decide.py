"""The planning bench's declared development rules, applied to the development JSON.

Session 13 (`--session 13`): bench/results/planning_dev/session13_declaration.json (variant
`plan_std_matched_map_portfolio`, dev seeds 110-121, at least 6 finished seeds); prints the
--plan-targets the headline run uses: "matched" (adopted) or "samples" (kept).

Session 11 (the default, kept so its decision can be re-derived):

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


VARIANT13 = "plan_std_matched_map_portfolio"
MARGIN13_DB = 0.005  # declared a priori (session13_declaration.json)
MIN_SEEDS13 = 6


def _paired(per_seed: list[dict], a: str, b: str, key: str) -> np.ndarray:
    return np.array([r["methods"][a]["conditioned"][key] - r["methods"][b]["conditioned"][key] for r in per_seed])


def decide13(dev: dict) -> dict:
    """Session 13's rule (declared before the run): the variant replaces the shipped planner iff
    (a) its mean paired gain over it exceeds MARGIN13_DB on MAE and on the epistemic std, (b) at
    least one of the two exceeds its standard error, (c) against random roads and uniform coverage
    its mean paired margin is > 0 on both metrics and its wins are >= the shipped planner's - 1.
    A run stopped at the declared time is decided on its finished seeds if there are >= 6."""
    per_seed = dev["per_seed"]
    out = {"variant": VARIANT13, "seeds": [r["seed"] for r in per_seed], "reading": "conditioned",
           "run_complete": bool(dev.get("complete")), "margin_db": MARGIN13_DB}
    keys = ("mae_reduction_db", "epistemic_reduction_db")
    if len(per_seed) < MIN_SEEDS13:
        out.update(adopted=False, targets="samples", reason=f"fewer than {MIN_SEEDS13} development seeds finished")
        return out
    means, ses = {}, {}
    for key in keys:
        d = _paired(per_seed, VARIANT13, "plan", key)
        sd = float(d.std(ddof=1))
        means[key], ses[key] = float(d.mean()), sd / float(np.sqrt(len(d)))
        out[f"variant_minus_plan_{key}"] = {"mean": means[key], "std": sd, "se": ses[key], "wins": int((d > 0).sum()),
                                            "ties": int((d == 0).sum()), "seeds": len(d), "per_seed": d.tolist()}
    vs = {}
    c_ok = True
    for base in ("random_roads", "uniform", "densest_users"):
        for key in keys:
            dv, dp = _paired(per_seed, VARIANT13, base, key), _paired(per_seed, "plan", base, key)
            vs[f"{base}_{key}"] = {"variant_mean": float(dv.mean()), "variant_wins": int((dv > 0).sum()),
                                   "plan_mean": float(dp.mean()), "plan_wins": int((dp > 0).sum()), "seeds": len(dv)}
            if base != "densest_users" and not (dv.mean() > 0 and (dv > 0).sum() >= (dp > 0).sum() - 1):
                c_ok = False
    out["against_baselines"] = vs
    a = all(means[k] > MARGIN13_DB for k in keys)
    b = any(means[k] > ses[k] for k in keys)
    out["rule"] = json.loads((DEV / "session13_declaration.json").read_text())["rule"]
    out["conditions"] = {"a_both_gains_above_margin": bool(a), "b_one_exceeds_its_se": bool(b),
                         "c_no_regression_vs_random_uniform": bool(c_ok)}
    out["adopted"] = bool(a and b and c_ok)
    out["targets"] = "matched" if out["adopted"] else "samples"
    out["same_route_seeds"] = int(sum(r["methods"][VARIANT13]["km"] == r["methods"]["plan"]["km"]
                                      and r["methods"][VARIANT13]["route_source"] == r["methods"]["plan"]["route_source"]
                                      for r in per_seed))
    out["matched_bandwidth_m"] = [r.get("matched_bandwidth_m") for r in per_seed]
    out["decided_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:2] == ["--session", "13"]:
        src = Path(args[2]) if len(args) > 2 else DEV / "session13_seeds110-121.json"
        result = decide13(json.loads(src.read_text()))
        (DEV / "session13_decision.json").write_text(json.dumps(result, indent=2))
        print(result["targets"])
    else:
        src = Path(args[0]) if args else DEV / "session11_seeds50-61.json"
        result = decide(json.loads(src.read_text()))
        (DEV / "session11_decision.json").write_text(json.dumps(result, indent=2))
        print(result["selection"])
