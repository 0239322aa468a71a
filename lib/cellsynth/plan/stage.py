"""`cellsynth plan`: where to measure next (issue 17), written to `measurement_plan` plus a map.

Reads the radio models (posterior covariance of serving and strongest-neighbour RSRP), the window's
area density f_j^O (kde_models) and the cells; chooses a drive along roads within
`plan.budget_km`, `plan.n_points` stationary points or `plan.n_ues` MDT-triggered UEs among the
window's UEs (positions drawn from f_j^O; see `cellsynth.plan.transforms`). Every
check runs before anything is written: a bad budget, window, road file or missing model table
is one error line and leaves the lake and the report folder untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellsynth.config import PipelineConfig
from cellsynth.errors import ConfigError, SchemaError, StageError
from cellsynth.plan import transforms as T
from cellsynth.schemas import AREA_CELL_ID
from cellsynth.stages import StageResult, StageSpec

NAME = "plan"
INPUTS = ("cells", "kde_models", "radio_models")
OUTPUTS = ("measurement_plan",)


def external_fingerprint(cfg: PipelineConfig) -> str:
    """The road file's content (it lives outside the lake)."""
    path = cfg.plan.road_path
    if path is None or not Path(path).is_file():
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


STAGE = StageSpec(
    name=NAME, inputs=INPUTS, outputs=OUTPUTS,
    # the simulator's roads come from the scenario (its config, windows and seed); the map goes
    # to the report folder
    reads=("plan", "scenario", "ingest.windows", "run.seed", "lake.report_dir"),
    enabled_by="plan.enabled",  # on demand (`cellsynth plan`) unless configured into the chain
    external_fingerprint=external_fingerprint,
)


def _check_inputs(lake: Any) -> None:
    missing = [t for t in INPUTS if not lake.exists(t)]
    if missing:
        raise StageError(f"plan: lake table(s) {', '.join(missing)} missing; run `cellsynth train` first "
                         f"(the plan needs the radio and density models)")


def _load_density(lake: Any):
    from cellsynth.density import DensityModels

    return DensityModels.load(lake)


def _load_radio(lake: Any):
    from cellsynth.radio import RadioModels

    return RadioModels.load(lake)


def _measured_positions(density) -> np.ndarray:
    """Where the models were fitted: the report positions of every window's area density."""
    parts = []
    for w in density.windows:
        try:
            parts.append(density.kde(w, AREA_CELL_ID).positions_)
        except SchemaError:
            continue
    return np.concatenate(parts)


def _window(cfg: PipelineConfig, density) -> str:
    have = density.windows
    window = cfg.plan.window
    if window is None:  # the busiest window: where most users are measured
        return max(have, key=density.n_reports)
    if window not in have:
        raise ConfigError(f"plan.window: {window!r} is not a trained window (have: {', '.join(have)})")
    return window


def _frame(cells: pd.DataFrame):
    from cellsynth.geo import LocalFrame

    if {"frame_lat0", "frame_lon0"} <= set(cells.columns) and cells["frame_lat0"].notna().any():
        return LocalFrame(float(cells["frame_lat0"].iloc[0]), float(cells["frame_lon0"].iloc[0]))
    return None


def _roads(cfg: PipelineConfig, frame, box: tuple[float, float, float, float]) -> pd.DataFrame:
    """Road segments in the lake frame, clipped to the planning area."""
    pc = cfg.plan
    if pc.road_path is not None:
        if frame is None:
            raise ConfigError("plan.road_path: the cells table has no frame origin to project the roads with")
        from cellsynth.plan._roads import read_roads

        segments = read_roads(pc.road_path, frame)
        where = f"plan.road_path: no segment of {pc.road_path} overlaps the planning area"
    elif cfg.scenario.enabled:
        from cellsynth.scenario import build_world, road_segments

        world = build_world(cfg.scenario, windows=cfg.ingest.windows, seed=cfg.run.seed)
        segments = road_segments(world, street_spacing_m=pc.street_spacing_m)
        if frame is not None:  # the simulator's frame and the lake's may differ by their origins
            for a, b in (("x0_m", "y0_m"), ("x1_m", "y1_m")):
                lat, lon = world.frame.to_latlon(segments[a].to_numpy(), segments[b].to_numpy())
                segments[a], segments[b] = frame.to_xy(lat, lon)
        where = "plan: the simulator's roads do not overlap the planning area"
    else:
        raise ConfigError("plan.road_path: required for a km budget when the simulator is off "
                          "(scenario.enabled: false); or plan points (--points N, plan.n_points) or UEs (--ues N, plan.n_ues)")
    clipped = T.clip_segments(segments, box)
    if clipped.empty:
        x0, y0, x1, y1 = box
        raise ConfigError(f"{where} (x {x0:.0f}..{x1:.0f} m, y {y0:.0f}..{y1:.0f} m in the lake frame)")
    return clipped


def _plan_map(path: Path, xy: np.ndarray, ep: np.ndarray, w: np.ndarray, plan: pd.DataFrame, window: str, mode: str,
              spacing_m: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = np.nan_to_num(ep)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    xs, ix = np.unique(xy[:, 0], return_inverse=True)
    ys, iy = np.unique(xy[:, 1], return_inverse=True)
    raster = np.full((len(ys), len(xs)), np.nan)
    raster[iy, ix] = ep
    half = spacing_m / 2
    im = ax.imshow(raster, origin="lower", cmap="magma_r", vmin=0, vmax=float(np.quantile(ep, 0.98)) if len(ep) else 1.0,
                   extent=(xs[0] - half, xs[-1] + half, ys[0] - half, ys[-1] + half), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="serving RSRP epistemic std [dB]")
    if len(w) and w.max() > 0:
        top = w >= np.quantile(w, 0.9)
        ax.scatter(xy[top, 0], xy[top, 1], s=2, c="tab:cyan", alpha=0.5, label="densest 10% of users (f_j^O)")
    if mode == "route":
        for r in plan.itertuples():
            ax.plot([r.x_m, r.x_end_m], [r.y_m, r.y_end_m], color="tab:blue", lw=2.5)
        if len(plan):
            ax.plot(plan["x_m"].iloc[0], plan["y_m"].iloc[0], "o", color="tab:green", ms=9, label="start")
            ax.plot([], [], color="tab:blue", lw=2.5, label=f"route, {plan['cumulative_km'].iloc[-1]:.1f} km")
    else:
        ax.scatter(plan["x_m"], plan["y_m"], s=60, facecolors="none", edgecolors="tab:blue", lw=2,
                   label="points" if mode == "points" else "MDT-triggered UEs")
        for r in plan.head(30).itertuples():
            ax.annotate(str(r.rank), (r.x_m, r.y_m), fontsize=7, color="tab:blue", xytext=(3, 3), textcoords="offset points")
    ax.set_title(f"Measurement plan, window {window}")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rows(pf: T.PlanField, plan: pd.DataFrame, graph: T.RoadGraph | None, pc, window: str, frame, run_id: str) -> pd.DataFrame:
    if graph is None:
        xy = pf.cand_xy_m[plan["candidate"].to_numpy(int)]
        mode = "points" if pc.n_ues is None else "ues"
        out = pd.DataFrame({"x_m": xy[:, 0], "y_m": xy[:, 1], "x_end_m": np.nan, "y_end_m": np.nan, "length_m": 0.0,
                            "cumulative_km": 0.0, "n_reports": pc.reports_per_point if mode == "points" else 1,
                            "segment_id": None})
    else:
        e = plan["edge"].to_numpy(int)
        a = graph.node_xy_m[graph.edge_nodes[e, 0]]
        b = graph.node_xy_m[graph.edge_nodes[e, 1]]
        n_pts = np.bincount(graph.point_edge, minlength=len(graph.edge_nodes))[e]
        out = pd.DataFrame({"x_m": a[:, 0], "y_m": a[:, 1], "x_end_m": b[:, 0], "y_end_m": b[:, 1],
                            "length_m": graph.edge_length_m[e], "cumulative_km": plan["cumulative_m"].to_numpy() / 1000,
                            "n_reports": n_pts, "segment_id": graph.edge_segment[e]})
        mode = "route"
    lat = lon = np.full(len(out), np.nan)
    if frame is not None and len(out):
        lat, lon = frame.to_latlon(out["x_m"].to_numpy(), out["y_m"].to_numpy())
    out.insert(0, "mode", mode)
    out.insert(0, "rank", plan["rank"].to_numpy())
    out.insert(0, "window", window)
    out["lat"], out["lon"] = lat, lon
    out["expected_reduction_db"] = plan["expected_reduction"].to_numpy(float)
    out["cells"] = [";".join(c) for c in plan["cells"]]
    out["run_id"] = run_id
    return out


def run(cfg: PipelineConfig, rt: Any, *, run_id: str) -> StageResult:
    from cellsynth.evaluate.report_stage import report_dir

    lake, pc = rt.lake, cfg.plan
    _check_inputs(lake)
    density = _load_density(lake)
    window = _window(cfg, density)
    cells = lake.read_pandas("cells")
    frame = _frame(cells)
    # planning area: where the window's users were measured (the area density's support)
    try:
        area = density.kde(window, AREA_CELL_ID)
    except SchemaError:  # no area model: the report-weighted mixture of the cells' KDEs
        area = None
    if area is not None:
        boxes = [area.support_box_m]
        score = area.score_samples
    else:
        kdes = [density.kde(window, c) for c in density.cells(window)]
        boxes = [k.support_box_m for k in kdes]

        def score(xy):
            return np.log(sum(k.n_reports_ * np.exp(k.score_samples(xy)) for k in kdes) + 1e-300)
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    targets = T.grid_points(box, pc.grid_spacing_m)
    if len(targets) > pc.max_targets:
        raise ConfigError(f"plan.grid_spacing_m: {pc.grid_spacing_m:g} m gives {len(targets)} grid points over the area, "
                          f"more than plan.max_targets={pc.max_targets}; use a coarser spacing")
    if pc.n_ues is not None and pc.n_ues * pc.ue_pool_factor > pc.max_targets:
        raise ConfigError(f"plan.n_ues: {pc.n_ues} UEs x plan.ue_pool_factor={pc.ue_pool_factor} candidates is more than "
                          f"plan.max_targets={pc.max_targets}")
    graph = None
    if pc.budget_km is not None:
        graph = T.road_graph(_roads(cfg, frame, box), sample_spacing_m=pc.sample_spacing_m)
    radio = _load_radio(lake)
    site = cells.set_index("cell_id")[["x_m", "y_m"]].astype(float)
    cell_ids = [str(c) for c in site.index]
    rt.log(f"[bold]plan[/bold] window {window}: {len(targets)} grid points, "
           + (f"{len(graph.point_xy_m)} road points, {pc.budget_km:g} km" if graph is not None
              else f"{pc.n_points} points" if pc.n_ues is None else f"{pc.n_ues} UEs of {pc.n_ues * pc.ue_pool_factor}"))

    def predict(ids: np.ndarray, xy: np.ndarray):
        pred = radio.predict("rsrp", ids, xy, seed=cfg.run.seed)
        return pred.mean, pred.epistemic_std, pred.aleatoric_std

    density_at = np.exp(score(targets))
    if graph is not None:
        cand, per_cand = graph.point_xy_m, 1
    elif pc.n_ues is not None:  # the window's UEs one may trigger: a pool drawn from f_j^O, one report each
        cand, per_cand = density.sample_positions(window, pc.n_ues * pc.ue_pool_factor, rng=cfg.run.seed), 1
    else:
        cand, per_cand = targets, pc.reports_per_point
    # the users whose error counts: draws from f_j^O, equal weights (a grid would alias a field
    # correlated over tens of metres)
    if pc.user_draws == "matched":
        if area is None:
            raise ConfigError("plan.user_draws: 'matched' needs the density's area model of the window (none was trained)")
        users = T.matched_draws(area.positions_, area.bandwidth_m_, _measured_positions(density), pc.n_target_samples,
                                rng=np.random.default_rng([cfg.run.seed, 17]))[0]
    else:
        users = density.sample_positions(window, pc.n_target_samples, rng=np.random.default_rng([cfg.run.seed, 17]))
    pf = T.build_field(predict, cell_ids, site.to_numpy(), users, np.ones(len(users)), cand,
                       n_nearest_cells=pc.n_nearest_cells, n_heard=1 + cfg.scenario.n_neighbours,
                       detection_dbm=pc.detection_threshold_dbm, reports_per_candidate=per_cand, seed=cfg.run.seed)
    # the radio model's own calibrated posterior covariance; the a-priori correlation only for a
    # model that exposes none
    own_cov = getattr(radio, "epistemic_cov", None)
    covariance = None if own_cov is None else (lambda cell, xy: own_cov("rsrp", cell, xy))
    if pc.hyperparameters == "ensemble" and hasattr(radio, "cell_model"):
        from cellsynth.plan.hyper import models_ensemble_covariance

        covariance = models_ensemble_covariance(radio, "rsrp")

    def make_planner() -> T.VariancePlanner:
        return T.VariancePlanner(pf, covariance=covariance, length_m=pc.correlation_length_m, objective="std")

    if graph is None:
        planner = make_planner()
        before = planner.objective()
        plan = T.plan_points(planner, pc.n_points if pc.n_ues is None else pc.n_ues, distinct=pc.n_ues is not None)
    else:
        # besides the greedy routes, routes covering the users at a few radii, if the planner
        # expects more from one of them (`best_route`)
        others = T.coverage_routes(graph, pc.budget_km * 1000.0, users, np.ones(len(users)))
        make_judge = None
        if pc.route_selection == "independent":
            # the routes compared over other draws of the same users than the ones they were grown on
            users2 = density.sample_positions(window, pc.n_target_samples, rng=np.random.default_rng([cfg.run.seed, 18]))
            pf2 = T.build_field(predict, cell_ids, site.to_numpy(), users2, np.ones(len(users2)), cand,
                                n_nearest_cells=pc.n_nearest_cells, n_heard=1 + cfg.scenario.n_neighbours,
                                detection_dbm=pc.detection_threshold_dbm, reports_per_candidate=per_cand, seed=cfg.run.seed)

            def make_judge() -> T.VariancePlanner:
                return T.VariancePlanner(pf2, covariance=covariance, length_m=pc.correlation_length_m, objective="std")

        plan, planner = T.best_route(make_planner, graph, pc.budget_km * 1000.0, n_starts=pc.route_starts,
                                     separation_m=pc.start_separation_m, candidates=others, make_judge=make_judge)
        before = make_planner().objective()
    if plan.empty:
        raise ConfigError(f"plan.budget_km: {pc.budget_km:g} km is shorter than every road edge of the area; nothing to plan")
    rows = _rows(pf, plan, graph, pc, window, frame, run_id)
    version = lake.write("measurement_plan", rows, mode="overwrite",
                         predicate=f"window = '{window}'" if lake.exists("measurement_plan") else None,
                         app_id=f"{run_id}:{NAME}:{window}")
    map_path = report_dir(cfg, lake) / "plan" / f"plan_{window}.png"
    # the map: the predicted serving cell's epistemic std on the grid, under the plan
    grid = T.build_field(predict, cell_ids, site.to_numpy(), targets, density_at, targets[:1],
                         n_nearest_cells=pc.n_nearest_cells, n_heard=1, detection_dbm=pc.detection_threshold_dbm, role_draws=0)
    _plan_map(map_path, targets, np.sqrt(grid.target_var[:, 0]), grid.target_weight, rows, window,
              str(rows["mode"].iloc[0]), pc.grid_spacing_m)
    after = planner.objective()
    return StageResult(
        stage=NAME, run_id=run_id, rows_written={"measurement_plan": len(rows)},
        table_versions={"measurement_plan": version},
        metrics={"weighted_epistemic_std_before_db": before, "weighted_epistemic_std_after_db": after,
                 "expected_reduction_db": before - after},
        artifacts={"measurement_plan": f"{lake.uri('measurement_plan')} (window = '{window}')", "plan_map": str(map_path)},
    )
