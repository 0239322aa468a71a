"""What-if stage: apply a change file to the measured network and write what the changed
network would look like, tagged `network_scenario = <change file name>`.

Reads `cells`, `mdt_measurements`, `mdt_reports`, `traffic` and `spatial_maps` (baseline rows);
writes under the scenario tag, replacing that scenario's earlier rows (baseline rows are never rewritten):
  network_fields     serving cell, serving RSRP and its epistemic std on the map squares around
                     the change, before (added once as 'baseline') and after
  spatial_maps       student (DEEPMEND) maps of the new and changed cells, method 'student'
  synthetic_mdt      synthetic reports in the changed area drawn from the measured users,
                     associated and valued by the changed network's fields
  synthetic_traffic  per-cell hourly traffic of the cells whose share of users changed: the
                     measured traffic scaled by the share (new cells: the neighbours' traffic per
                     unit share), so load follows the users the change moves
  metrics            per-cell share of users before and after (stage 'whatif')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cellsynth.config import PipelineConfig
from cellsynth.errors import StageError
from cellsynth.generate import reported_values
from cellsynth.lake.table import SCENARIO_NOTE, scenario_predicate
from cellsynth.schemas import RSRP_RANGE_DBM, RSRP_STEP_DB, cell_shard_of
from cellsynth.splits import held_out, stable_order
from cellsynth.stages import StageResult
from cellsynth.whatif.changes import ChangeSet, apply_changes, validate_against
from cellsynth.whatif.field import ResidualKriger

NAME = "whatif"
# The `scenario` (load scenario) of a what-if's synthetic rows: their RSRP is the measured network's
# serving field, kriged, under whatever loads it was measured at; no load is set and no RSRQ drawn.
# They said `generate.load_scenario` (e.g. "fixed" on the UCC example, where no load was fixed).
WHATIF_LOAD_SCENARIO = "measured"
INPUTS = ("cells", "mdt_measurements", "mdt_reports")
CHANGED_RADIUS_M = 1500.0  # a priori: about one macro inter-site distance around each change
PREDICT_RADIUS_M = 4000.0  # cells farther than this from the area never serve in it
_MEAS_COLUMNS = ["report_id", "cell_id", "role", "x_m", "y_m", "rsrp_dbm"]


def area_bbox(cfg: PipelineConfig, cells: pd.DataFrame) -> tuple[float, float, float, float]:
    """The configured area (ingest.area_bbox_m) or the cells' bounding box plus ingest.area_margin_m."""
    if cfg.ingest.area_bbox_m is not None:
        return tuple(float(v) for v in cfg.ingest.area_bbox_m)  # type: ignore[return-value]
    m = cfg.ingest.area_margin_m
    return (float(cells["x_m"].min() - m), float(cells["y_m"].min() - m),
            float(cells["x_m"].max() + m), float(cells["y_m"].max() + m))


def _to_xy(cells: pd.DataFrame):
    from cellsynth.geo import LocalFrame

    if "frame_lat0" not in cells or cells["frame_lat0"].isna().all():
        return None
    frame = LocalFrame(float(cells["frame_lat0"].iloc[0]), float(cells["frame_lon0"].iloc[0]))
    return frame.to_xy


def serving_field(kriger: ResidualKriger, cells: pd.DataFrame, xy_m: np.ndarray) -> pd.DataFrame:
    """Best cell, its RSRP mean and epistemic std at each position under a network."""
    best = np.full(len(xy_m), -np.inf)
    std = np.zeros(len(xy_m))
    cell = np.full(len(xy_m), "", dtype=object)
    lo, hi = xy_m.min(axis=0) - PREDICT_RADIUS_M, xy_m.max(axis=0) + PREDICT_RADIUS_M
    for c, x, y in zip(cells["cell_id"], cells["x_m"], cells["y_m"]):
        if not (lo[0] <= x <= hi[0] and lo[1] <= y <= hi[1]):
            continue
        p = kriger.predict(c, cells, xy_m)
        better = p.mean_dbm > best
        best[better], std[better], cell[better] = p.mean_dbm[better], p.epistemic_std_db[better], c
    return pd.DataFrame({"x_m": xy_m[:, 0], "y_m": xy_m[:, 1], "best_cell_id": cell, "rsrp_dbm": best,
                         "rsrp_dbm_epistemic_std": std})


def changed_squares(cells_old: pd.DataFrame, cells_new: pd.DataFrame, touched: dict[str, str], *,
                    resolution_m: float, bbox: tuple[float, float, float, float]) -> np.ndarray:
    """Map-square centres within CHANGED_RADIUS_M of every touched cell's old or new site."""
    sites = pd.concat([cells_old[cells_old["cell_id"].isin(touched)], cells_new[cells_new["cell_id"].isin(touched)]])
    pts = []
    for x, y in sites[["x_m", "y_m"]].drop_duplicates().to_numpy(float):
        g = np.arange(-CHANGED_RADIUS_M, CHANGED_RADIUS_M + resolution_m, resolution_m)
        gx = (np.floor((x + g) / resolution_m) + 0.5) * resolution_m
        gy = (np.floor((y + g) / resolution_m) + 0.5) * resolution_m
        px, py = np.meshgrid(gx, gy)
        keep = np.hypot(px - x, py - y) <= CHANGED_RADIUS_M
        pts.append(np.column_stack([px[keep], py[keep]]))
    xy = np.unique(np.round(np.vstack(pts), 3), axis=0) if pts else np.empty((0, 2))
    x0, y0, x1, y1 = bbox
    return xy[(xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)]


def user_weights(reports: pd.DataFrame, xy_m: np.ndarray, resolution_m: float) -> np.ndarray:
    """Share of the measured reports in each square (the users the change redistributes)."""
    gx = np.floor(reports["x_m"].to_numpy() / resolution_m).astype(np.int64)
    gy = np.floor(reports["y_m"].to_numpy() / resolution_m).astype(np.int64)
    counts = pd.Series(1.0, index=pd.MultiIndex.from_arrays([gx, gy])).groupby(level=[0, 1]).sum()
    key = pd.MultiIndex.from_arrays([np.floor(xy_m[:, 0] / resolution_m).astype(np.int64),
                                     np.floor(xy_m[:, 1] / resolution_m).astype(np.int64)])
    w = counts.reindex(key).fillna(0.0).to_numpy()
    return w / max(float(len(reports)), 1.0)


def cell_shares(field: pd.DataFrame, weight: np.ndarray) -> pd.Series:
    s = pd.Series(weight).groupby(field["best_cell_id"].to_numpy()).sum()
    return s / max(float(s.sum()), 1e-12)


def synthetic_reports(field_new: pd.DataFrame, reports: pd.DataFrame, kriger: ResidualKriger, *, n_samples: int,
                      resolution_m: float, epistemic_threshold_db: float, rng: np.random.Generator,
                      rsrp_range_dbm: tuple[float, float] = RSRP_RANGE_DBM) -> pd.DataFrame:
    """Synthetic MDT in the changed area: positions resampled from the measured reports there
    (jittered within their square), served and valued by the changed network's field. Values are
    reported as generate's are (1 dB steps inside `rsrp_range_dbm`, `clipped` where a draw left it),
    so baseline and what-if rows of synthetic_mdt read alike."""
    gx = np.floor(field_new["x_m"].to_numpy() / resolution_m).astype(np.int64)
    gy = np.floor(field_new["y_m"].to_numpy() / resolution_m).astype(np.int64)
    inside = pd.MultiIndex.from_arrays([np.floor(reports["x_m"] / resolution_m).astype(np.int64),
                                        np.floor(reports["y_m"] / resolution_m).astype(np.int64)]).isin(
        pd.MultiIndex.from_arrays([gx, gy]))
    pool = reports[inside]
    if pool.empty:
        return pd.DataFrame()
    pick = pool.iloc[rng.integers(0, len(pool), n_samples)]
    key = {(a, b): k for k, (a, b) in enumerate(zip(gx, gy))}
    sq = np.array([key[(a, b)] for a, b in zip(np.floor(pick["x_m"] / resolution_m).astype(np.int64),
                                                np.floor(pick["y_m"] / resolution_m).astype(np.int64))])
    row = field_new.iloc[sq].reset_index(drop=True)
    noise_db = float(np.sqrt(kriger.nugget_var_))
    epi = row["rsrp_dbm_epistemic_std"].to_numpy()
    rsrp_dbm, clipped = reported_values(row["rsrp_dbm"].to_numpy(), np.hypot(epi, noise_db), rng.normal(0.0, 1.0, n_samples),
                                        rsrp_range_dbm, RSRP_STEP_DB)
    return pd.DataFrame({
        "window": pick["window"].to_numpy(), "x_m": pick["x_m"].to_numpy(), "y_m": pick["y_m"].to_numpy(),
        "serving_cell_id": row["best_cell_id"].to_numpy(),
        "rsrp_dbm": rsrp_dbm, "rsrp_dbm_epistemic_std": epi, "rsrp_dbm_aleatoric_std": np.full(n_samples, noise_db),
        "reliable": epi < epistemic_threshold_db, "clipped": clipped,
    })


def scaled_traffic(traffic: pd.DataFrame, before: pd.Series, after: pd.Series, *, min_change: float = 0.01) -> pd.DataFrame:
    """Hourly traffic of the cells whose user share moved: measured traffic x (after / before);
    a new cell gets the mean traffic per unit share of the measured cells that lost users to it."""
    cells = sorted(set(after.index) | set(before.index))
    rows = []
    per_share = {}
    for c in before.index:
        if before[c] > 0 and c in set(traffic["cell_id"]):
            per_share[c] = traffic[traffic["cell_id"] == c].set_index("ts")["traffic_mb"] / before[c]
    losers = [c for c in before.index if after.get(c, 0.0) < before[c] - min_change and c in per_share]
    for c in cells:
        b, a = float(before.get(c, 0.0)), float(after.get(c, 0.0))
        if abs(a - b) < min_change:
            continue
        if c in per_share:
            series = per_share[c] * a
        elif losers:
            series = pd.concat([per_share[k] for k in losers], axis=1).mean(axis=1) * a
        else:
            continue
        frame = series.rename("traffic_mb").reset_index().assign(cell_id=c)
        rows.append(frame)
    if not rows:
        return pd.DataFrame(columns=["cell_id", "ts", "traffic_mb"])
    return pd.concat(rows, ignore_index=True)


_FIELD_KEY = ["x_m", "y_m", "best_cell_id", "rsrp_dbm"]


def _field_key(frame: pd.DataFrame) -> pd.DataFrame:
    """A field row's square and values, rounded (mm, 0.001 dB) so that a recomputation on the same data matches."""
    return frame[_FIELD_KEY].assign(x_m=frame["x_m"].round(3), y_m=frame["y_m"].round(3),
                                    rsrp_dbm=frame["rsrp_dbm"].round(3), best_cell_id=frame["best_cell_id"].fillna("").astype(str))


def _write_scenario(lake: Any, table: str, rows: pd.DataFrame, name: str, app_id: str) -> int:
    """Commit a what-if's rows of `table`, replacing the rows an earlier run of the same scenario left there
    (one copy per scenario; the earlier run's stay readable at the version it recorded). The commit note marks
    it as the scenario's own rows, so stages reading the measured network do not rerun for it."""
    note = {SCENARIO_NOTE: name}
    # a table written before what-ifs existed has no such column (a predicate on it fails) and no scenario rows
    if lake.exists(table) and SCENARIO_NOTE not in {f.name for f in lake.open_table(table).schema().fields}:
        return lake.write(table, rows, mode="append", app_id=app_id, note=note)
    return lake.write(table, rows, mode="overwrite", predicate=scenario_predicate(name), app_id=app_id, note=note)


def run(cfg: PipelineConfig, rt, *, run_id: str, changes: ChangeSet) -> StageResult:
    """Apply `changes` to the measured network and write the scenario-tagged rows."""
    lake = rt.lake
    app_id = f"{NAME}:{run_id}:{changes.name}"
    result = StageResult(stage=NAME, run_id=run_id)
    missing = [t for t in INPUTS if not lake.exists(t)]
    if missing:
        raise StageError(f"whatif: input table(s) {', '.join(missing)} missing in {lake.root}; run ingest first")
    # done only when its last commit (metrics) landed; a killed run is redone, each write skipped where its app_id landed
    if lake.exists("metrics") and lake.committed_app_ids("metrics", app_id):
        return StageResult(stage=NAME, run_id=run_id, skipped=True, note=f"{changes.name}: run {run_id} already committed")
    cells = lake.read_pandas("cells")
    bbox = area_bbox(cfg, cells)
    to_xy = _to_xy(cells)
    validate_against(changes, cells, area_bbox_m=bbox, to_xy=to_xy)
    new_cells, touched = apply_changes(cells, changes, to_xy=to_xy)
    res = cfg.density.map_resolution_m
    seed = cfg.run.seed
    rng = np.random.default_rng(seed)

    # Key order before anything seeded: the kriger's subsample and the resampled positions pick rows
    # by position, and a lake read's row order is not content (`splits.stable_order`).
    meas = stable_order(lake.read_pandas("mdt_measurements", columns=_MEAS_COLUMNS))
    meas = meas[~held_out(cfg, meas["report_id"].to_numpy())]
    reports = stable_order(lake.read_pandas("mdt_reports", columns=["report_id", "window", "x_m", "y_m", "serving_cell_id"]))
    reports = reports[~held_out(cfg, reports["report_id"].to_numpy())]
    result.rows_in = {"mdt_measurements": len(meas), "mdt_reports": len(reports), "cells": len(cells)}
    kriger = ResidualKriger(random_state=seed).fit(meas, cells)
    rt.log(f"whatif {changes.name}: {len(touched)} cells touched; residual bias {kriger.bias_db_:+.1f} dB")

    xy = changed_squares(cells, new_cells, touched, resolution_m=res, bbox=bbox)
    before_full, after = serving_field(kriger, cells, xy), serving_field(kriger, new_cells, xy)
    before = before_full
    weight = user_weights(reports, xy, res)
    changed_ids = {c for c, what in touched.items() if what != "removed"}
    w_of = dict(zip(map(tuple, np.round(xy, 3)), weight))

    def field_rows(frame: pd.DataFrame, scenario: str) -> pd.DataFrame:
        return frame.assign(
            network_scenario=scenario, run_id=run_id, is_changed_cell=frame["best_cell_id"].isin(changed_ids),
            user_weight=[w_of.get((round(a, 3), round(b, 3)), 0.0) for a, b in zip(frame["x_m"], frame["y_m"])])

    # The measured network's field on these squares, unless the lake has it with these values already
    # (another what-if on the same data); after new data the squares get rows of this run (the report
    # draws each square's newest).
    if lake.exists("network_fields"):
        have = lake.read_pandas("network_fields", columns=_FIELD_KEY)
        known = pd.MultiIndex.from_frame(_field_key(have))
        before = before[~pd.MultiIndex.from_frame(_field_key(before)).isin(known)]
    if len(before):
        lake.write("network_fields", field_rows(before, "baseline"), mode="append", app_id=f"{app_id}:baseline")
    result.table_versions["network_fields"] = _write_scenario(lake, "network_fields", field_rows(after, changes.name),
                                                              changes.name, app_id)
    result.rows_written["network_fields"] = len(after) + len(before)

    # Student maps of the new and changed cells: the measured cells teach, the touched ones are held out.
    maps = _student_maps(cfg, rt, new_cells, touched, reports)
    if len(maps):
        maps = maps.assign(x_m=(maps["gx"] + 0.5) * res, y_m=(maps["gy"] + 0.5) * res, method="student",
                           window="all", run_id=run_id, network_scenario=changes.name)
        result.table_versions["spatial_maps"] = _write_scenario(lake, "spatial_maps", maps, changes.name, app_id)
        result.rows_written["spatial_maps"] = len(maps)

    n_shards = cfg.ingest.n_cell_shards
    syn = synthetic_reports(after, reports, kriger, n_samples=max(1, int(weight.sum() * len(reports))),
                            resolution_m=res, epistemic_threshold_db=cfg.radio.epistemic_threshold_db, rng=rng,
                            rsrp_range_dbm=cfg.ingest.rsrp_range_dbm)
    if len(syn):
        lat, lon = _to_latlon(cells, syn)
        syn = syn.assign(sample_id=[f"{changes.name}-{run_id}-{k}" for k in range(len(syn))], ts=pd.NaT, lat=lat, lon=lon,
                         scenario=WHATIF_LOAD_SCENARIO, cell_shard=[cell_shard_of(c, n_shards) for c in syn["serving_cell_id"]],
                         run_id=run_id, network_scenario=changes.name)
        result.table_versions["synthetic_mdt"] = _write_scenario(lake, "synthetic_mdt", syn, changes.name, app_id)
        result.rows_written["synthetic_mdt"] = len(syn)

    share_before, share_after = cell_shares(before_full, weight), cell_shares(after, weight)
    if lake.exists("traffic"):
        traffic = lake.read_pandas("traffic", columns=["cell_id", "ts", "window", "traffic_mb", "prb_util_pct", "load_rho"])
        moved = scaled_traffic(traffic, share_before, share_after)
        if len(moved):
            ref = traffic.groupby("cell_id")["traffic_mb"].max()
            cap = float(ref.max()) if len(ref) else 1.0
            windows = traffic.drop_duplicates("ts").set_index("ts")["window"]
            load = np.clip(moved["traffic_mb"].to_numpy() / max(cap, 1e-9), 0.0, 1.0)
            moved = moved.assign(window=moved["ts"].map(windows).fillna("all"), load_rho=load, prb_util_pct=100.0 * load,
                                 sample_id=0, cell_shard=[cell_shard_of(c, n_shards) for c in moved["cell_id"]],
                                 run_id=run_id, network_scenario=changes.name)
            result.table_versions["synthetic_traffic"] = _write_scenario(lake, "synthetic_traffic", moved, changes.name, app_id)
            result.rows_written["synthetic_traffic"] = len(moved)

    metrics = [{"run_id": run_id, "stage": NAME, "metric": f"user_share_{when}", "value": float(v), "cell_id": c,
                "split": "changed_area", "model": changes.name}
               for when, shares in (("before", share_before), ("after", share_after)) for c, v in shares.items()]
    metrics.append({"run_id": run_id, "stage": NAME, "metric": "best_server_changed_share", "split": "changed_area",
                    "model": changes.name, "value": float(np.average(
                        before_full["best_cell_id"].to_numpy() != after["best_cell_id"].to_numpy(), weights=np.maximum(weight, 1e-12)))})
    # replaces the scenario's earlier figures (a what-if rerun on new data); the report reads them
    mine = f"stage = '{NAME}' AND model = '{changes.name}'"
    result.table_versions["metrics"] = lake.write("metrics", pd.DataFrame(metrics), mode="overwrite", predicate=mine,
                                                  app_id=app_id)
    result.rows_written["metrics"] = len(metrics)
    result.metrics["cells_touched"] = float(len(touched))
    result.metrics["squares_changed_area"] = float(len(xy))
    result.note = f"{changes.name}: {', '.join(f'{c} {w}' for c, w in sorted(touched.items()))}"
    return result


def _to_latlon(cells: pd.DataFrame, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    from cellsynth.geo import LocalFrame

    if "frame_lat0" not in cells or cells["frame_lat0"].isna().all():
        return np.full(len(frame), np.nan), np.full(len(frame), np.nan)
    lf = LocalFrame(float(cells["frame_lat0"].iloc[0]), float(cells["frame_lon0"].iloc[0]))
    lat, lon = lf.to_latlon(frame["x_m"].to_numpy(), frame["y_m"].to_numpy())
    return np.asarray(lat), np.asarray(lon)


def _student_maps(cfg: PipelineConfig, rt, new_cells: pd.DataFrame, touched: dict[str, str], reports: pd.DataFrame) -> pd.DataFrame:
    """DEEPMEND student maps (Ray-trained) for the added/moved/re-pointed cells, with the
    measured user density as context (the users a new cell would serve are already measured)."""
    from cellsynth.density._student import area_map_of, teacher_student_maps
    from cellsynth.density.stage import _student_trainer

    wanted = [c for c, what in touched.items() if what != "removed"]
    if not wanted or not cfg.density.student or not rt.lake.exists("spatial_maps"):
        return pd.DataFrame()
    sm = stable_order(rt.lake.read_pandas("spatial_maps", filters=[("method", "=", "kde")],
                                          columns=["window", "cell_id", "gx", "gy", "prob"]),
                      ("window", "cell_id", "gx", "gy"))  # float sums below in a content order
    if sm.empty:
        return pd.DataFrame()
    n_rep = reports.groupby("serving_cell_id").size().to_dict()
    measured = {}
    for c, g in sm.groupby("cell_id"):
        agg = g.groupby(["gx", "gy"], as_index=False)["prob"].sum()
        measured[c] = agg.assign(prob=agg["prob"] / agg["prob"].sum())
    area = area_map_of(measured, {c: float(n) for c, n in n_rep.items()})
    dcfg = cfg.density
    ts = teacher_student_maps(
        new_cells, measured, resolution_m=dcfg.map_resolution_m, patch_px=dcfg.student_patch_px,
        neighbour_radius_m=dcfg.student_context_radius_m, beta_grid=dcfg.teacher_beta_grid, holdout_cells=set(touched),
        n_epochs=dcfg.student_epochs, min_mass=dcfg.map_min_mass, seed=cfg.run.seed, area_map=area,
        trainer=_student_trainer(cfg, rt),
    )
    return pd.concat([ts["student"][c].assign(cell_id=c) for c in wanted if c in ts["student"]], ignore_index=True)
