"""Measurement planning on the simulator: does driving the plan beat the obvious routes?

Per seed: simulate a small scenario (the default one shrunk), draw MDT-like training reports at
user positions over a week, train the per-cell RSRP models (`fit_cells`, modest settings), fit
the area density f_j^O of the window (the density stage's KDE, bandwidth by held-out NLL on the
training positions), then choose a drive of `--budget-km` along the scenario's roads four ways:
  plan           the planner (`cellsynth.plan`): user-weighted epistemic variance reduction
  random_roads   a random walk on the roads
  uniform        greedy coverage of the area, every place worth the same
  densest_users  greedy coverage weighted by the user density f_j^O (no uncertainty)
Each drive is measured in the simulator (`scenario.reports_at`: true field, noise, detection),
the cells it measured are retrained on old + new reports, and the change is scored on fresh
held-out users of the window drawn from the simulator's true user density: MAE of the predicted
serving and strongest-neighbour RSRP against the exact (noise-free) truth, and their mean
epistemic std. Reductions are before - after (dB), so above 0 is better.

Writes bench/results/planning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellsynth.config import ScenarioConfig, WindowConfig
from cellsynth.density import GaussianKDE2D
from cellsynth.plan.transforms import (
    CoveragePlanner,
    VariancePlanner,
    build_field,
    clip_segments,
    grid_points,
    plan_route,
    random_route,
    road_graph,
)
from cellsynth.radio.model import CellData, FitSettings, fit_cells
from cellsynth.scenario import build_world, reports_at, road_segments

METHODS = ("plan", "random_roads", "uniform", "densest_users")


def _users(world, rng: np.random.Generator, n: int, window: str | None) -> tuple[np.ndarray, np.ndarray]:
    """n user positions over the simulated week (or one window's hours), hours by report intensity."""
    hours = np.arange(len(world.hours)) if window is None else np.flatnonzero(world.hour_window == window)
    p = world.intensity[hours] / world.intensity[hours].sum()
    picked = rng.choice(hours, size=n, p=p)
    xy = np.empty((n, 2))
    for h in np.unique(picked):
        sel = np.flatnonzero(picked == h)
        xy[sel] = world.density.sample(rng, world.weights[h], len(sel))
    return xy, world.hour_window[picked]


def _long(reports: pd.DataFrame, n_neighbours: int) -> pd.DataFrame:
    """One row per measured cell: cell_id, x_m, y_m, rsrp_dbm."""
    parts = [reports[["serving_cell_id", "x_m", "y_m", "serving_rsrp_dbm"]].set_axis(["cell_id", "x_m", "y_m", "rsrp_dbm"], axis=1)]
    for k in range(1, n_neighbours + 1):
        sub = reports[reports[f"neighbour_{k}_cell_id"].notna()]
        parts.append(sub[[f"neighbour_{k}_cell_id", "x_m", "y_m", f"neighbour_{k}_rsrp_dbm"]]
                     .set_axis(["cell_id", "x_m", "y_m", "rsrp_dbm"], axis=1))
    return pd.concat(parts, ignore_index=True)


class Models:
    """cell -> (FittedCells, index): the bench's stand-in for RadioModels.predict."""

    def __init__(self):
        self.by_cell: dict[str, tuple] = {}

    def add(self, fitted) -> None:
        for i, c in enumerate(fitted.cell_ids):
            self.by_cell[c] = (fitted, i)

    def copy(self) -> Models:
        out = Models()
        out.by_cell = dict(self.by_cell)
        return out

    def predict(self, cell_ids: np.ndarray, xy_m: np.ndarray, n_samples: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cell_ids = np.asarray(cell_ids).astype(str)
        n = len(cell_ids)
        mean, ep, al = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        for k, c in enumerate(np.unique(cell_ids)):
            if c not in self.by_cell:
                continue
            rows = np.flatnonzero(cell_ids == c)
            fitted, i = self.by_cell[c]
            pred = fitted.predict(np.full(len(rows), i), xy_m[rows], n_samples=n_samples, seed=k)
            mean[rows], ep[rows], al[rows] = pred.mean, pred.epistemic_std, pred.aleatoric_std
        return mean, ep, al


def _fit(rows: pd.DataFrame, cells: list[str], sites: pd.DataFrame, settings: FitSettings, seed: int):
    data = []
    for c in cells:
        sub = rows[rows["cell_id"] == c]
        site = sites.loc[c]
        data.append(CellData(c, sub[["x_m", "y_m"]].to_numpy(float), sub["rsrp_dbm"].to_numpy(float),
                             origin_xy_m=np.array([site.x_m, site.y_m]), azimuth_deg=float(site.azimuth_deg)))
    torch.manual_seed(seed)
    return fit_cells(data, target="rsrp", settings=settings, seed=seed)


def _score(models: Models, test: dict) -> tuple[float, float]:
    mean, ep, _ = models.predict(test["cells"], test["xy"])
    ok = np.isfinite(mean)
    return float(np.mean(np.abs(mean[ok] - test["truth"][ok]))), float(np.mean(ep[ok]))


def run_seed(seed: int, args) -> dict:
    cfg = ScenarioConfig(n_sites=args.sites, area_km=args.area_km, n_neighbours=4)
    windows = WindowConfig()
    world = build_world(cfg, windows=windows, seed=seed)
    rng = np.random.default_rng([seed, 1])
    sites = world.cells.set_index("cell_id")[["x_m", "y_m", "azimuth_deg"]]
    # training reports: crowdsourced, where users are, over the week
    xy, win = _users(world, rng, args.train_reports, None)
    train = reports_at(world, xy, rng=rng)
    rows = _long(train, cfg.n_neighbours)
    counts = rows["cell_id"].value_counts()
    cells = sorted(counts[counts >= args.min_rows].index)
    settings = FitSettings(n_centres=args.centres, n_steps=args.steps)
    before = Models()
    before.add(_fit(rows, cells, sites, settings, seed))
    # held-out users of the window: exact truth of their strongest and second-strongest cell
    t_xy, _ = _users(world, np.random.default_rng([seed, 2]), args.test_users, args.window)
    cand = world.candidates(t_xy[:, 0], t_xy[:, 1])
    true = world.link_rsrp_dbm(t_xy[:, 0], t_xy[:, 1], cand)
    order = np.argsort(-true, axis=1)[:, :2]
    ids = world.cells["cell_id"].to_numpy()
    test = {"xy": np.repeat(t_xy, 2, axis=0), "cells": ids[np.take_along_axis(cand, order, 1)].ravel(),
            "truth": np.take_along_axis(true, order, 1).ravel()}
    mae0, ep0 = _score(before, test)
    # planner inputs: f_j^O from the window's training positions, grid targets, road points
    in_win = win == args.window
    area = GaussianKDE2D(bandwidth_grid_m=(25.0, 50.0, 100.0, 200.0, 400.0), random_state=seed).fit(xy[in_win])
    x_lo, y_lo, x_hi, y_hi = area.support_box_m
    box = (x_lo, y_lo, x_hi, y_hi)
    targets = grid_points(box, args.grid_m)
    dens = np.exp(area.score_samples(targets))
    graph = road_graph(clip_segments(road_segments(world, street_spacing_m=args.street_m), box),
                       sample_spacing_m=args.sample_m)
    site_xy = sites.loc[cells, ["x_m", "y_m"]].to_numpy(float)
    field = build_field(before.predict, cells, site_xy, targets, dens, graph.point_xy_m, n_nearest_cells=12,
                        n_heard=1 + cfg.n_neighbours, detection_dbm=cfg.detection_threshold_dbm)
    budget_m = args.budget_km * 1000.0
    out = {"mae_before_db": mae0, "epistemic_before_db": ep0, "n_train_reports": len(train), "n_cells": len(cells),
           "road_km": float(graph.edge_length_m.sum() / 1000), "methods": {}}
    for m, method in enumerate(METHODS):
        t0 = time.perf_counter()
        if method == "random_roads":
            edges = random_route(graph, budget_m, rng=np.random.default_rng([seed, 3]))
        else:
            planner = {"plan": lambda: VariancePlanner(field, length_m=args.length_m),
                       "uniform": lambda: CoveragePlanner(targets, np.ones(len(targets)), graph.point_xy_m, radius_m=args.length_m),
                       "densest_users": lambda: CoveragePlanner(targets, dens, graph.point_xy_m, radius_m=args.length_m)}[method]()
            edges = plan_route(planner, graph, budget_m)["edge"].tolist()
        plan_s = time.perf_counter() - t0
        pts = np.flatnonzero(np.isin(graph.point_edge, edges))
        # every edge driven is measured once per pass
        passes = np.bincount(np.asarray(edges, dtype=np.int64), minlength=len(graph.edge_nodes))
        pts = np.repeat(pts, passes[graph.point_edge[pts]])
        drive = reports_at(world, graph.point_xy_m[pts], rng=np.random.default_rng([seed, 4, m]))
        new = _long(drive, cfg.n_neighbours)
        affected = sorted(set(new["cell_id"]) & set(cells))
        after = before.copy()
        if affected:
            after.add(_fit(pd.concat([rows, new], ignore_index=True), affected, sites, settings, seed))
        mae1, ep1 = _score(after, test)
        out["methods"][method] = {"km": float(graph.edge_length_m[edges].sum() / 1000), "n_reports": len(drive),
                                  "n_retrained_cells": len(affected), "mae_after_db": mae1, "epistemic_after_db": ep1,
                                  "mae_reduction_db": mae0 - mae1, "epistemic_reduction_db": ep0 - ep1, "plan_s": plan_s}
        print(f"seed {seed} {method}: km={out['methods'][method]['km']:.1f} mae {mae0:.2f}->{mae1:.2f} "
              f"ep {ep0:.2f}->{ep1:.2f} cells={len(affected)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget-km", type=float, default=8.0)
    ap.add_argument("--window", default="h06_12")
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--area-km", type=float, default=3.0)
    ap.add_argument("--train-reports", type=int, default=4000)
    ap.add_argument("--test-users", type=int, default=3000)
    ap.add_argument("--min-rows", type=int, default=30)
    ap.add_argument("--centres", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--grid-m", type=float, default=100.0)
    ap.add_argument("--street-m", type=float, default=400.0)
    ap.add_argument("--sample-m", type=float, default=25.0)
    # a priori, not tuned on the held-out users: the planner's default correlation length
    ap.add_argument("--length-m", type=float, default=150.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "planning.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    per_seed: list[dict] = []
    for s in range(args.seeds):
        per_seed.append(run_seed(s, args))
        # written after every seed, so a run stopped early still leaves the seeds it finished
        result = _summary(per_seed, args, time.perf_counter() - t0)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({m: {k: round(v, 3) for k, v in e.items()} for m, e in result["methods"].items()}, indent=1))
    return result


def _summary(per_seed: list[dict], args, wall_s: float) -> dict:
    methods = {}
    for method in METHODS:
        entry = {}
        for key in ("mae_reduction_db", "epistemic_reduction_db"):
            vals = np.array([r["methods"][method][key] for r in per_seed])
            entry[key] = float(vals.mean())
            entry[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            entry[key + "_per_km"] = float(vals.mean() / args.budget_km)
        entry["km_mean"] = float(np.mean([r["methods"][method]["km"] for r in per_seed]))
        methods[method] = entry
    wins = {key: {b: int(sum(r["methods"]["plan"][key] > r["methods"][b][key] for r in per_seed))
                  for b in METHODS if b != "plan"} for key in ("mae_reduction_db", "epistemic_reduction_db")}
    return {
        "budget": {"km": args.budget_km, "sample_spacing_m": args.sample_m},
        "seeds": len(per_seed), "window": args.window, "methods": methods,
        "plan_wins_per_seed": wins,
        "settings": {"scenario": {"n_sites": args.sites, "area_km": args.area_km, "train_reports": args.train_reports,
                                  "test_users": args.test_users, "street_spacing_m": args.street_m},
                     "radio": {"n_centres": args.centres, "n_steps": args.steps, "min_rows": args.min_rows,
                               "other": "FitSettings defaults"},
                     "planner": {"grid_spacing_m": args.grid_m, "correlation_length_m": args.length_m,
                                 "length_choice": "a priori (not tuned on held-out users)", "n_nearest_cells": 12}},
        "spread": "std over seeds (ddof=1)",
        "per_seed": per_seed,
        "complete": len(per_seed) == args.seeds,
        "wall_s": wall_s,
        "machine": {"cores": os.cpu_count()},
    }


if __name__ == "__main__":
    main()
