"""MDT reports, chunk by chunk: positions from the user density, timestamps from the hourly
intensity, serving and neighbour measurements from the radio environment, then dirt."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellsynth.scenario._radio import noise_per_re_dbm, quantise_rsrp, quantise_rsrq, rsrq_db
from cellsynth.scenario._world import World, stream_rng

# What ingest should reject each dirt kind as (swapped lat/lon is repairable; unrepaired it lands
# outside the area). Duplicates are exact copies of a clean row placed right after it.
DIRT_REJECT_REASON = {
    "missing_value": "missing_value",
    "missing_position": "missing_position",
    "rsrp_out_of_range": "rsrp_out_of_range",
    "bad_timestamp": "bad_timestamp",
    "duplicate": "duplicate",
    "unknown_cell": "unknown_cell",
    "outside_area": "outside_area",
    "swapped_latlon": "outside_area",
}
BAD_TIMESTAMPS = ("not-a-timestamp", "2026-02-30T25:61:00Z", "05/13/2026 8h13", "TS_ERROR")
OUTSIDE_SHIFT_DEG = 0.5  # ~55 km north: outside any sensible area margin
TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def mdt_columns(n_neighbours: int) -> list[str]:
    cols = ["report_id", "ue_id", "timestamp", "latitude", "longitude", "serving_cell_id",
            "serving_rsrp_dbm", "serving_rsrq_db"]
    for k in range(1, n_neighbours + 1):
        cols += [f"neighbour_{k}_cell_id", f"neighbour_{k}_rsrp_dbm"]
    return cols


@dataclass
class Chunk:
    mdt: pd.DataFrame  # exported rows (dirt included), in file order
    truth: pd.DataFrame  # one row per exported row


def chunk_plan(world: World) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Reports per hour (multinomial on the intensity) and consecutive hour ranges per chunk."""
    rng = stream_rng(world.seed, 4)
    per_hour = rng.multinomial(world.cfg.n_reports, world.intensity / world.intensity.sum())
    chunks, start, acc = [], 0, 0
    for h, count in enumerate(per_hour):
        if acc and acc + count > world.cfg.chunk_reports:
            chunks.append((start, h))
            start, acc = h, 0
        acc += count
    chunks.append((start, len(per_hour)))
    return per_hour, chunks


def _measure(world: World, rng: np.random.Generator, x: np.ndarray, y: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(candidate cells, true RSRP, measured RSRP, serving column) of UEs at (x, y)."""
    cfg = world.cfg
    cand = world.candidates(x, y)
    rsrp_true = world.link_rsrp_dbm(x, y, cand)
    measured = rsrp_true + rng.normal(0.0, cfg.measurement_noise_db, rsrp_true.shape)
    serving = np.argmax(measured + rng.normal(0.0, cfg.hysteresis_noise_db, rsrp_true.shape), axis=1)
    return cand, rsrp_true, measured, serving


def _neighbours(world: World, measured: np.ndarray, serving: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detectable non-serving cells, strongest first: (detected mask, columns ranked)."""
    detect = measured >= world.cfg.detection_threshold_dbm
    detect[np.arange(len(serving)), serving] = False
    return detect, np.argsort(np.where(detect, -measured, np.inf), axis=1, kind="stable")


def reports_at(world: World, xy_m: np.ndarray, *, rng: np.random.Generator) -> pd.DataFrame:
    """Reports of UEs (or a drive-test scanner) at given positions, with the scenario's true field,
    measurement noise, hysteresis and detection threshold: what driving a planned route yields.

    Returns one row per position: x_m, y_m, serving_cell_id, serving_rsrp_dbm, serving_rsrp_true_dbm,
    then neighbour_k_cell_id / neighbour_k_rsrp_dbm for k = 1..scenario.n_neighbours (None/NaN when
    fewer are detected). RSRQ is left out: it needs an hour's load.
    """
    xy = np.asarray(xy_m, dtype=float).reshape(-1, 2)
    n = len(xy)
    cand, rsrp_true, measured, serving = _measure(world, rng, xy[:, 0], xy[:, 1])
    detect, ranked = _neighbours(world, measured, serving)
    rows = np.arange(n)
    cell_ids = world.cells["cell_id"].to_numpy()
    out = {"x_m": xy[:, 0], "y_m": xy[:, 1], "serving_cell_id": cell_ids[cand[rows, serving]],
           "serving_rsrp_dbm": quantise_rsrp(measured[rows, serving]),
           "serving_rsrp_true_dbm": rsrp_true[rows, serving]}
    for k in range(world.cfg.n_neighbours):
        col = ranked[:, min(k, cand.shape[1] - 1)]
        ok = detect[rows, col] if k < cand.shape[1] else np.zeros(n, dtype=bool)
        out[f"neighbour_{k + 1}_cell_id"] = np.where(ok, cell_ids[cand[rows, col]], None)
        out[f"neighbour_{k + 1}_rsrp_dbm"] = np.where(ok, quantise_rsrp(measured[rows, col]), np.nan)
    return pd.DataFrame(out)


def _clean_chunk(world: World, rng: np.random.Generator, hours: np.ndarray, first_id: int) -> pd.DataFrame:
    cfg = world.cfg
    n = len(hours)
    # Positions: per hour, from that hour's mixture.
    xy = np.empty((n, 2))
    for h in np.unique(hours):
        sel = np.nonzero(hours == h)[0]
        xy[sel] = world.density.sample(rng, world.weights[h], len(sel))
    secs = rng.integers(0, 3600, n)
    ts = world.hours.tz_localize(None).to_numpy()[hours] + secs.astype("timedelta64[s]")
    order = np.argsort(ts, kind="stable")
    hours, ts, xy = hours[order], ts[order], xy[order]
    x, y = xy[:, 0], xy[:, 1]
    cand, rsrp_true, measured, serving = _measure(world, rng, x, y)
    strongest = np.argmax(rsrp_true, axis=1)
    rows = np.arange(n)
    load = world.load_rho[cand, hours[:, None]]
    rsrq = rsrq_db(measured, load, serving=serving, noise_re_dbm=noise_per_re_dbm(cfg.noise_figure_db))
    rsrq = quantise_rsrq(rsrq + rng.normal(0.0, cfg.rsrq_noise_db, n))
    detect, ranked = _neighbours(world, measured, serving)
    cell_ids = world.cells["cell_id"].to_numpy()
    lat, lon = world.frame.to_latlon(x, y)
    out = {
        "report_id": np.char.add("R", np.char.zfill((first_id + rows).astype(str), 9)).astype(object),
        "ue_id": np.char.add("U", np.char.zfill(rng.integers(0, max(cfg.n_reports // cfg.reports_per_ue, 1), n)
                                               .astype(str), 7)).astype(object),
        "timestamp": pd.DatetimeIndex(ts).strftime(TS_FORMAT).to_numpy(dtype=object),
        "latitude": np.round(lat, 7),
        "longitude": np.round(lon, 7),
        "serving_cell_id": cell_ids[cand[rows, serving]],
        "serving_rsrp_dbm": quantise_rsrp(measured[rows, serving]),
        "serving_rsrq_db": rsrq,
    }
    for k in range(cfg.n_neighbours):
        if k < cand.shape[1]:
            col = ranked[:, k]
            ok = detect[rows, col]
            out[f"neighbour_{k + 1}_cell_id"] = np.where(ok, cell_ids[cand[rows, col]], None)
            out[f"neighbour_{k + 1}_rsrp_dbm"] = np.where(ok, quantise_rsrp(measured[rows, col]), np.nan)
        else:
            out[f"neighbour_{k + 1}_cell_id"] = np.full(n, None, dtype=object)
            out[f"neighbour_{k + 1}_rsrp_dbm"] = np.full(n, np.nan)
    frame = pd.DataFrame(out)
    frame["_ts"] = pd.DatetimeIndex(ts).tz_localize("UTC")
    frame["_x_m"], frame["_y_m"] = x, y
    frame["_hour"] = hours
    frame["_serving"] = out["serving_cell_id"]
    frame["_true_serving"] = cell_ids[cand[rows, strongest]]
    frame["_rsrp_true_dbm"] = rsrp_true[rows, serving]
    frame["_load_rho"] = load[rows, serving]
    return frame


def _inject_dirt(world: World, rng: np.random.Generator, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Dirty a fraction of rows, exactly one kind each; duplicates are copies of clean rows."""
    cfg = world.cfg
    n = len(frame)
    kinds = np.full(n, "", dtype=object)
    n_dirty = int(round(cfg.dirt_fraction * n))
    if n_dirty == 0 or not cfg.dirt_kinds:
        return frame, kinds
    picked = rng.choice(np.array(cfg.dirt_kinds, dtype=object), size=n_dirty)
    rows = rng.choice(n, size=n_dirty, replace=False)
    kinds[rows] = picked
    for kind in cfg.dirt_kinds:
        sel = rows[picked == kind]
        if not len(sel) or kind == "duplicate":
            continue
        if kind == "missing_value":
            frame.loc[sel, "serving_rsrp_dbm"] = np.nan
        elif kind == "missing_position":
            frame.loc[sel, ["latitude", "longitude"]] = np.nan
        elif kind == "rsrp_out_of_range":
            frame.loc[sel, "serving_rsrp_dbm"] = -200.0
        elif kind == "bad_timestamp":
            frame.loc[sel, "timestamp"] = rng.choice(np.array(BAD_TIMESTAMPS, dtype=object), size=len(sel))
        elif kind == "unknown_cell":
            n_sites = len(world.site_cells)
            frame.loc[sel, "serving_cell_id"] = [f"S{n_sites + 1000 + i:05d}_9" for i in rng.integers(0, 9000, len(sel))]
        elif kind == "outside_area":
            frame.loc[sel, "latitude"] = np.round(frame.loc[sel, "latitude"].to_numpy() + OUTSIDE_SHIFT_DEG, 7)
        elif kind == "swapped_latlon":
            lat = frame.loc[sel, "latitude"].to_numpy()
            frame.loc[sel, "latitude"] = frame.loc[sel, "longitude"].to_numpy()
            frame.loc[sel, "longitude"] = lat
    # A duplicate row is the copy: its source (the row chosen) stays clean; the copy follows it.
    dup_src = rows[picked == "duplicate"]
    kinds[dup_src] = ""
    if len(dup_src):
        # A source must be clean: re-pick sources that another kind already dirtied.
        clean = np.setdiff1d(np.arange(n), rows[picked != "duplicate"])
        dup_src = np.sort(rng.choice(clean, size=len(dup_src), replace=False))
        pos = np.concatenate([np.arange(n), dup_src + 0.5])
        order = np.argsort(pos, kind="stable")
        frame = pd.concat([frame, frame.iloc[dup_src]], ignore_index=True).iloc[order].reset_index(drop=True)
        kinds = np.concatenate([kinds, np.full(len(dup_src), "duplicate", dtype=object)])[order]
    return frame, kinds


def iter_chunks(world: World) -> Iterator[Chunk]:
    """Exported MDT rows and their truth, one chunk of consecutive hours at a time."""
    per_hour, plan = chunk_plan(world)
    cols = mdt_columns(world.cfg.n_neighbours)
    first_id, first_row = 0, 0
    for i, (h0, h1) in enumerate(plan):
        rng = stream_rng(world.seed, 5, i)
        hours = np.repeat(np.arange(h0, h1), per_hour[h0:h1])
        frame = _clean_chunk(world, rng, hours, first_id)
        first_id += len(frame)
        frame, kinds = _inject_dirt(world, rng, frame)
        truth = pd.DataFrame({
            "row_number": np.arange(first_row, first_row + len(frame), dtype=np.int64),
            "report_id": frame["report_id"].to_numpy(),
            "ts": frame["_ts"],
            "window": world.hour_window[frame["_hour"].to_numpy()],
            "x_m": frame["_x_m"].to_numpy(), "y_m": frame["_y_m"].to_numpy(),
            "serving_cell_id": frame["_serving"].to_numpy(),
            "true_serving_cell_id": frame["_true_serving"].to_numpy(),
            "rsrp_true_dbm": frame["_rsrp_true_dbm"].to_numpy(),
            "load_rho": frame["_load_rho"].to_numpy(),
            "is_dirty": kinds != "",
            "dirt_kind": np.where(kinds != "", kinds, None),
        })
        first_row += len(frame)
        yield Chunk(frame[cols], truth)
