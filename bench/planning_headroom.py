"""Session 14: the planner's headroom over densest users, from the development oracles' JSON.

The rule was written in the session's notes before the run (dev seeds 150-157, conditioned
reading; bench/planning.py's docstring names the three oracles):
  an oracle has SHOWABLE headroom on a metric iff its mean paired lead over densest users is
  >= 2 sd / sqrt(12) (a planner as good as it would reach two standard errors on the 12 headline
  seeds, at this spread) and > 0.02 dB (MAE) / > 0.01 dB (epistemic std); it has showable
  headroom iff on both metrics (the done-when needs both).
  O1 (users' positions) and O2 (positions + true heard cells) both without it -> no planner working
  from the model's uncertainty can be shown to beat densest users at 12 seeds on this bench.
Decided on the finished seeds if there are >= 5 (the run was to be stopped at 15:55).

Writes bench/results/planning_dev/session14_headroom.json and prints the verdict. `--radio-change`:
the shipped planner's lead over densest users on dev seeds 110-121 under the current radio model
(session14_newradio_seeds110-121.json) against session 13's run of them -> session14_newradio_compare.json.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DEV = Path(__file__).parent / "results" / "planning_dev"
SRC = DEV / "session14_headroom_seeds150-157.json"
ORACLES = {"O1_positions": "plan_std_users_map_portfolio",
           "O2_positions_heard_cells": "plan_std_truth_map_portfolio",
           "O3_field_choice": "plan_std_truth_map_portfolio_field"}
KEYS = ("mae_reduction_db", "epistemic_reduction_db")
FLOOR_DB = {"mae_reduction_db": 0.02, "epistemic_reduction_db": 0.01}  # a priori (notes, 14:34)
HEADLINE_SEEDS = 12
MIN_SEEDS = 5


def paired(per_seed: list[dict], a: str, b: str, key: str) -> dict:
    """a - b per seed under the conditioned reading: mean, sd (ddof 1), se, wins, per seed."""
    d = np.array([r["methods"][a]["conditioned"][key] - r["methods"][b]["conditioned"][key] for r in per_seed])
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "sd": sd, "se": sd / float(np.sqrt(len(d))), "wins": int((d > 0).sum()),
            "ties": int((d == 0).sum()), "seeds": len(d), "per_seed": d.tolist()}


def headroom(dev: dict) -> dict:
    per_seed = dev["per_seed"]
    out = {"seeds": [r["seed"] for r in per_seed], "reading": "conditioned", "run_complete": bool(dev.get("complete")),
           "oracles": ORACLES, "floor_db": FLOOR_DB, "headline_seeds": HEADLINE_SEEDS}
    if len(per_seed) < MIN_SEEDS:
        out.update(decided=False, reason=f"fewer than {MIN_SEEDS} seeds finished")
        return out
    out["plan_minus_densest"] = {k: paired(per_seed, "plan", "densest_users", k) for k in KEYS}
    showable = {}
    for name, method in ORACLES.items():
        entry = {"minus_densest": {}, "minus_plan": {k: paired(per_seed, method, "plan", k) for k in KEYS}}
        ok = {}
        for k in KEYS:
            p = paired(per_seed, method, "densest_users", k)
            need = max(2.0 * p["sd"] / np.sqrt(HEADLINE_SEEDS), FLOOR_DB[k])
            p["needed_for_12_seeds"] = float(need)
            ok[k] = bool(p["mean"] >= 2.0 * p["sd"] / np.sqrt(HEADLINE_SEEDS) and p["mean"] > FLOOR_DB[k])
            entry["minus_densest"][k] = p
        entry["showable"] = ok
        entry["showable_both"] = bool(all(ok.values()))
        showable[name] = entry["showable_both"]
        out[name] = entry
    steps = (("positions: O1 - plan", ORACLES["O1_positions"], "plan"),
             ("heard cells: O2 - O1", ORACLES["O2_positions_heard_cells"], ORACLES["O1_positions"]),
             ("field choice: O3 - O2", ORACLES["O3_field_choice"], ORACLES["O2_positions_heard_cells"]))
    out["attribution"] = {label: {k: paired(per_seed, a, b, k) for k in KEYS} for label, a, b in steps}
    out["route_source"] = {m: [r["methods"][m].get("route_source", "") for r in per_seed]
                           for m in ("plan", *ORACLES.values())}
    # descriptive (added after the run, not part of the rule): realised conditioned std reduction over
    # the planner's own expectation, per seed. The f_j^O and "users" fields count a user's two cells
    # as 2 (so / 2 per scored row); the truth field is already per scored row.
    out["realised_over_expected"] = {}
    for m, per_row in (("plan", 2.0), (ORACLES["O1_positions"], 2.0), (ORACLES["O2_positions_heard_cells"], 1.0)):
        e = np.array([r["methods"][m]["expected_reduction"] / per_row for r in per_seed])
        re = np.array([r["methods"][m]["conditioned"]["epistemic_reduction_db"] for r in per_seed])
        out["realised_over_expected"][m] = {"per_seed": (re / e).tolist(), "mean": float(np.mean(re / e)),
                                            "corr_across_seeds": float(np.corrcoef(e, re)[0, 1])}
    if not showable["O1_positions"] and not showable["O2_positions_heard_cells"]:
        verdict = ("blocked: not even a planner that knows the scored users' positions and their true cells shows "
                   "headroom over densest users that 12 seeds could establish"
                   + ("; only the field oracle does (the lead is where the model's mean is wrong)"
                      if showable["O3_field_choice"] else ""))
    elif showable["O1_positions"]:
        verdict = "headroom: the users' positions carry it"
    else:
        verdict = "headroom: the heard cells carry it (not the positions alone)"
    out["verdict"] = verdict
    out["decided"] = True
    out["decided_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return out


def radio_change(new: dict, old: dict) -> dict:
    """Session 14 diagnostic (declared in the notes, report only): the shipped planner's lead over
    densest users on the same development seeds under the current radio model (`new`) and under the
    one session 13 ran (`old`), paired by seed; new - old of that lead."""
    old_by = {r["seed"]: r for r in old["per_seed"]}
    both = [r for r in new["per_seed"] if r["seed"] in old_by]
    out = {"seeds": [r["seed"] for r in both], "new_complete": bool(new.get("complete")), "reading": "conditioned"}
    for k in KEYS:
        lead_new = paired(both, "plan", "densest_users", k)
        lead_old = paired([old_by[r["seed"]] for r in both], "plan", "densest_users", k)
        d = np.array(lead_new["per_seed"]) - np.array(lead_old["per_seed"])
        sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
        out[k] = {"plan_minus_densest_new": lead_new, "plan_minus_densest_old": lead_old,
                  "new_minus_old": {"mean": float(d.mean()), "sd": sd, "se": sd / float(np.sqrt(len(d))),
                                    "per_seed": d.tolist()}}
        for m in ("plan", "densest_users"):
            out[k][f"{m}_reduction_new_mean"] = float(np.mean([r["methods"][m]["conditioned"][k] for r in both]))
            out[k][f"{m}_reduction_old_mean"] = float(np.mean([old_by[r["seed"]]["methods"][m]["conditioned"][k] for r in both]))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--radio-change"]:
        result = radio_change(json.loads((DEV / "session14_newradio_seeds110-121.json").read_text()),
                              json.loads((DEV / "session13_seeds110-121.json").read_text()))
        (DEV / "session14_newradio_compare.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k]["new_minus_old"]["mean"] for k in KEYS}))
        sys.exit(0)
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    result = headroom(json.loads(src.read_text()))
    (DEV / "session14_headroom.json").write_text(json.dumps(result, indent=2))
    print(result.get("verdict", result.get("reason")))
