"""Tiny synthetic layouts and reports for the density tests (no simulator needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellsynth.schemas import cell_shard_of


def layout(n_sites: int = 4, *, spacing_m: float = 1200.0, seed: int = 0) -> pd.DataFrame:
    """Sites on a jittered grid, 3 sectors each (azimuths 0/120/240 deg)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_sites)))
    rows = []
    for s in range(n_sites):
        x, y = (s % side) * spacing_m + rng.normal(0, 100), (s // side) * spacing_m + rng.normal(0, 100)
        for k, az in enumerate((0.0, 120.0, 240.0)):
            rows.append({"cell_id": f"s{s}c{k}", "site_id": f"s{s}", "x_m": x, "y_m": y, "azimuth_deg": az})
    return pd.DataFrame(rows)


def reports(cells: pd.DataFrame, n_reports: int, *, windows=("h00_06", "h06_12"), seed: int = 1, n_shards: int = 4) -> pd.DataFrame:
    """UEs around hotspots; serving cell = the strongest by distance + sector gain + noise."""
    rng = np.random.default_rng(seed)
    lo, hi = cells[["x_m", "y_m"]].min().to_numpy() - 500, cells[["x_m", "y_m"]].max().to_numpy() + 500
    hot = rng.uniform(lo, hi, size=(6, 2))
    pick = rng.integers(0, len(hot), n_reports)
    xy = hot[pick] + rng.normal(0, 350, size=(n_reports, 2))
    d = xy[:, None, :] - cells[["x_m", "y_m"]].to_numpy()[None]
    dist = np.hypot(d[..., 0], d[..., 1])
    bearing = np.degrees(np.arctan2(d[..., 0], d[..., 1]))
    off = np.abs((bearing - cells["azimuth_deg"].to_numpy()[None] + 180) % 360 - 180)
    power = -35 * np.log10(np.maximum(dist, 10)) - np.minimum(12 * (off / 65) ** 2, 20) + rng.normal(0, 4, dist.shape)
    serving = cells["cell_id"].to_numpy()[np.argmax(power, axis=1)]
    return pd.DataFrame({
        "report_id": [f"r{i}" for i in range(n_reports)],
        "ts": pd.Timestamp("2026-01-05T03:00:00Z"),
        "window": rng.choice(list(windows), n_reports),
        "x_m": xy[:, 0], "y_m": xy[:, 1], "serving_cell_id": serving,
        "rsrp_dbm": -90.0, "cell_shard": [cell_shard_of(c, n_shards) for c in serving], "ingest_run_id": "test",
    })


def cells_table(cells: pd.DataFrame, n_shards: int = 4) -> pd.DataFrame:
    return cells.assign(
        lat=44.0, lon=11.0, location_estimated=False, frame_lat0=44.0, frame_lon0=11.0,
        cell_shard=[cell_shard_of(c, n_shards) for c in cells["cell_id"]],
    )
