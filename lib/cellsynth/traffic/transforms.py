"""Pure transforms of the traffic stage: cell-weeks from hourly counters, per-cell context
features, the traffic -> PRB utilisation map, and the synthetic_traffic rows.

Nothing here opens a table, a path or a session; the stage feeds frames in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellsynth.config import WindowConfig
from cellsynth.errors import SchemaError
from cellsynth.schemas import cell_shard_of
from cellsynth.traffic.model import HOURS_PER_WEEK
from cellsynth.windows import window_labels, window_of

WEEK = pd.Timedelta(hours=HOURS_PER_WEEK)


def _require(frame: pd.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(sorted(map(str, frame.columns))[:8])
        raise SchemaError([f"{name}: column '{c}' missing (have: {have}, ...)" for c in missing])


def week_start_of(ts: pd.Series) -> pd.Series:
    """Monday 00:00 UTC of each timestamp's week."""
    t = pd.to_datetime(ts, utc=True)
    day = t.dt.floor("D")
    return day - pd.to_timedelta(day.dt.dayofweek, unit="D")


def hourly_counters(traffic: pd.DataFrame) -> pd.DataFrame:
    """Counters finer than an hour (15-minute PM periods are the norm) as hourly rows; hourly ones unchanged.

    Per (cell, hour): traffic_mb is the hour's volume, the mean of its periods times the periods per
    hour (the cell's median spacing between counters: 15 min -> 4), so an hour missing a period is
    not read as a quieter hour; prb_util_pct (and load_rho) the mean of its periods. The other columns
    keep the hour's first row. A cell whose counters are hourly or coarser passes through as it is
    (duplicate (cell, ts) rows are rejected at ingest).
    """
    if traffic.empty:
        return traffic
    ts = pd.to_datetime(traffic["ts"], utc=True)
    df = traffic.assign(_ts=ts, _hour=ts.dt.floor("h"))
    step_min = df.sort_values(["cell_id", "_ts"]).groupby("cell_id")["_ts"].apply(
        lambda t: t.drop_duplicates().diff().median() / pd.Timedelta(minutes=1))
    per_hour = (60.0 / step_min).where(step_min < 60.0).round()  # NaN: hourly (or one counter)
    fine = set(per_hour.dropna().index[per_hour.dropna() > 1])
    if not fine:
        return traffic
    sub = df[df["cell_id"].isin(fine)]
    agg = {c: "first" for c in traffic.columns if c not in ("cell_id", "ts")}
    agg.update({c: "mean" for c in ("traffic_mb", "prb_util_pct", "load_rho") if c in traffic.columns})
    hourly = sub.groupby(["cell_id", "_hour"], as_index=False, sort=True).agg(agg)
    if "traffic_mb" in hourly:
        hourly["traffic_mb"] = hourly["traffic_mb"] * hourly["cell_id"].map(per_hour).to_numpy(dtype=float)
    hourly = hourly.rename(columns={"_hour": "ts"})
    if traffic["ts"].dtype.kind == "M":  # the input's own resolution and zone
        hourly["ts"] = hourly["ts"].astype(traffic["ts"].dtype)
    rest = traffic[~traffic["cell_id"].isin(fine)]
    return pd.concat([rest, hourly[traffic.columns]], ignore_index=True)


def weekly_matrix(
    traffic: pd.DataFrame, *, value_col: str = "traffic_mb", min_coverage: float = 0.9
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hourly counters -> one row per (cell, Monday-aligned week) of 168 values.

    Hours missing from a week are filled by linear interpolation around the week (which wraps);
    weeks with less than `min_coverage` of their hours, or no positive traffic, are dropped.

    Returns:
        (cell_ids (n,), week_starts (n,) UTC timestamps, values (n, 168)), sorted by cell then week.
    """
    _require(traffic, "traffic", ("cell_id", "ts", value_col))
    df = traffic[["cell_id", "ts", value_col]].dropna()
    ts = pd.to_datetime(df["ts"], utc=True).dt.floor("h")
    week = week_start_of(ts)
    hour = ((ts - week) / pd.Timedelta(hours=1)).astype(int).to_numpy()
    df = df.assign(_week=week.to_numpy(), _hour=hour)
    # Duplicated hours (re-exports) are averaged rather than double-counted.
    df = df.groupby(["cell_id", "_week", "_hour"], as_index=False, sort=True)[value_col].mean()
    cells, weeks, rows = [], [], []
    for (cell_id, wk), part in df.groupby(["cell_id", "_week"], sort=True):
        if len(part) < min_coverage * HOURS_PER_WEEK:
            continue
        row = np.full(HOURS_PER_WEEK, np.nan)
        row[part["_hour"].to_numpy()] = part[value_col].to_numpy(dtype=float)
        if len(part) < HOURS_PER_WEEK:
            have = np.flatnonzero(np.isfinite(row))
            row = np.interp(np.arange(HOURS_PER_WEEK), have, row[have], period=HOURS_PER_WEEK)
        row = np.clip(row, 0.0, None)
        if row.mean() <= 0:
            continue
        cells.append(cell_id)
        weeks.append(wk)
        rows.append(row)
    values = np.vstack(rows) if rows else np.empty((0, HOURS_PER_WEEK))
    return np.asarray(cells, dtype=object), np.asarray(weeks, dtype=object), values


# ------------------------------------------------------------------------------ context
def site_layout_features(cells: pd.DataFrame, *, radii_m: tuple[float, ...] = (500.0, 1000.0, 2000.0)) -> pd.DataFrame:
    """Per-cell site layout features from `cells` (cell_id, x_m, y_m, optional site_id, azimuth_deg).

    Columns: sites within each radius, distance to the nearest other site, distance to the
    layout's centre (median of the sites: the dense core), and the sector's azimuth as sin/cos
    plus the cosine between the azimuth and the bearing to the centre (facing the core or not).
    """
    _require(cells, "cells", ("cell_id", "x_m", "y_m"))
    c = cells.drop_duplicates("cell_id").reset_index(drop=True)
    xy = c[["x_m", "y_m"]].to_numpy(dtype=float)
    site = c["site_id"].fillna(c["cell_id"]) if "site_id" in c else c["cell_id"]
    sites = c.assign(_site=site.to_numpy()).groupby("_site")[["x_m", "y_m"]].mean()
    sxy = sites.to_numpy(dtype=float)
    d = np.sqrt(((xy[:, None, :] - sxy[None, :, :]) ** 2).sum(axis=2))  # (n_cells, n_sites)
    own = site.to_numpy()[:, None] == sites.index.to_numpy()[None, :]
    d_other = np.where(own, np.inf, d)
    out = pd.DataFrame(index=pd.Index(c["cell_id"].to_numpy(), name="cell_id"))
    for r in radii_m:
        out[f"n_sites_within_{int(r)}_m"] = (d_other <= r).sum(axis=1).astype(float)
    nearest = d_other.min(axis=1) if d_other.shape[1] else np.full(len(c), np.nan)
    out["nearest_site_m"] = np.where(np.isfinite(nearest), nearest, np.nan)
    centre = np.median(sxy, axis=0)
    to_centre = centre[None, :] - xy
    out["centre_distance_m"] = np.sqrt((to_centre**2).sum(axis=1))
    if "azimuth_deg" in c and c["azimuth_deg"].notna().any():
        az = np.deg2rad(c["azimuth_deg"].to_numpy(dtype=float))
        out["azimuth_sin"] = np.sin(az)
        out["azimuth_cos"] = np.cos(az)
        # Azimuth is clockwise from north: a unit vector (sin az, cos az) in (east, north).
        norm = np.maximum(out["centre_distance_m"].to_numpy(), 1e-9)
        out["faces_centre_cos"] = (np.sin(az) * to_centre[:, 0] + np.cos(az) * to_centre[:, 1]) / norm
    return out


def user_density_features(kde_models: pd.DataFrame, windows: list[str]) -> pd.DataFrame:
    """Expected users per window from the KDE stage: log1p of the cell's reports over all windows
    and the share of its reports in each window (the daily rhythm of its users)."""
    _require(kde_models, "kde_models", ("window", "cell_id", "n_reports"))
    per = kde_models.pivot_table(index="cell_id", columns="window", values="n_reports", aggfunc="sum", fill_value=0)
    per = per.reindex(columns=windows, fill_value=0).astype(float)
    total = per.sum(axis=1)
    out = pd.DataFrame(index=per.index)
    out["log_reports"] = np.log1p(total)
    share = per.div(total.where(total > 0), axis=0)
    for w in windows:
        out[f"report_share_{w}"] = share[w]
    out.index.name = "cell_id"
    return out


def cell_context(
    cells: pd.DataFrame,
    *,
    kde_models: pd.DataFrame | None = None,
    windows: list[str] | None = None,
    external: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Context vector per cell (index cell_id, numeric columns, NaN where unknown).

    Site layout always; user density when `kde_models` is given (area rows are ignored);
    every numeric column of `external` (e.g. population, POI counts) joined by cell_id.
    """
    ctx = site_layout_features(cells)
    if kde_models is not None and len(kde_models):
        kde = kde_models[kde_models["cell_id"].isin(ctx.index)]
        wins = windows or sorted(kde["window"].unique())
        ctx = ctx.join(user_density_features(kde, list(wins)), how="left")
        ctx["log_reports"] = ctx["log_reports"].fillna(0.0)
    return _join_external(ctx, external)


def external_only_context(cell_ids: list[str], external: pd.DataFrame | None = None) -> pd.DataFrame:
    """Context of cells nothing locates (no cells table): `external`'s numeric columns joined by
    cell_id, or no column at all."""
    ctx = pd.DataFrame(index=pd.Index([str(c) for c in cell_ids], name="cell_id", dtype=object))
    return _join_external(ctx, external)


def _join_external(ctx: pd.DataFrame, external: pd.DataFrame | None) -> pd.DataFrame:
    if external is None:
        return ctx
    _require(external, "external context", ("cell_id",))
    ext = external.drop_duplicates("cell_id").set_index("cell_id")
    numeric = ext.select_dtypes("number")
    bad = [c for c in ext.columns if c not in numeric.columns]
    if bad:
        raise SchemaError([f"external context: column '{c}' is not numeric (got {ext[c].dtype})" for c in bad])
    return ctx.join(numeric.add_prefix("ext_"), how="left")


# -------------------------------------------------------------------------------- load
def fit_prb_map(traffic_mb: np.ndarray, prb_util_pct: np.ndarray) -> tuple[float, float]:
    """Least-squares line prb_util_pct = intercept + slope * traffic_mb: (slope, intercept)."""
    x = np.asarray(traffic_mb, dtype=float)
    y = np.asarray(prb_util_pct, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or np.ptp(x) == 0:
        return (float(np.mean(y) / np.mean(x)) if len(x) and np.mean(x) > 0 else 0.0), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def prb_maps(traffic: pd.DataFrame, train_cells: set[str] | list[str]) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """Per-training-cell (slope, intercept) of PRB utilisation on traffic, plus the pooled line.

    When the counters carry no PRB utilisation, PRB is taken as traffic relative to the 99th
    percentile of training traffic (a capacity proxy) for every cell.
    """
    train = traffic[traffic["cell_id"].isin(set(train_cells))]
    has = train.dropna(subset=["traffic_mb", "prb_util_pct"]) if "prb_util_pct" in train else train.iloc[:0]
    if has.empty:
        cap = float(np.nanpercentile(train["traffic_mb"], 99)) if len(train) else 1.0
        line = (100.0 / cap if cap > 0 else 0.0, 0.0)
        return {}, line
    per_cell = {str(c): fit_prb_map(g["traffic_mb"], g["prb_util_pct"]) for c, g in has.groupby("cell_id")}
    return per_cell, fit_prb_map(has["traffic_mb"], has["prb_util_pct"])


def synthetic_frame(
    cell_ids: np.ndarray,
    samples: np.ndarray,
    *,
    week_start: pd.Timestamp,
    windows: WindowConfig,
    prb_lines: dict[str, tuple[float, float]],
    pooled_line: tuple[float, float],
    n_cell_shards: int,
    run_id: str,
) -> pd.DataFrame:
    """synthetic_traffic rows from (n_cells, n_samples, 168) traffic samples.

    PRB utilisation from each cell's own line (pooled for cells without one), clipped to
    [0, 100]; load_rho = prb_util_pct / 100, so it lies in [0, 1].
    """
    n_cells, n_samples, n_hours = samples.shape
    ts = pd.DatetimeIndex(pd.Timestamp(week_start).tz_convert("UTC") + pd.to_timedelta(np.arange(n_hours), unit="h"))
    labels = window_of(ts, windows)
    slopes = np.array([prb_lines.get(str(c), pooled_line)[0] for c in cell_ids])
    intercepts = np.array([prb_lines.get(str(c), pooled_line)[1] for c in cell_ids])
    traffic = np.clip(samples, 0.0, None)
    prb = np.clip(intercepts[:, None, None] + slopes[:, None, None] * traffic, 0.0, 100.0)
    shard = np.array([cell_shard_of(str(c), n_cell_shards) for c in cell_ids], dtype=np.int32)
    total = n_cells * n_samples * n_hours
    return pd.DataFrame({
        "cell_id": np.repeat(np.asarray(cell_ids, dtype=object), n_samples * n_hours),
        "ts": np.tile(ts, n_cells * n_samples),
        "window": np.tile(labels, n_cells * n_samples),
        "traffic_mb": traffic.reshape(total),
        "prb_util_pct": prb.reshape(total),
        "load_rho": prb.reshape(total) / 100.0,
        "sample_id": np.tile(np.repeat(np.arange(n_samples, dtype=np.int32), n_hours), n_cells),
        "cell_shard": np.repeat(shard, n_samples * n_hours),
        "run_id": run_id,
    })


def all_window_labels(windows: WindowConfig) -> list[str]:
    return window_labels(windows)
