"""Site and cell layout: an urban core with dense sites and sparser suburbs, or a real layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellsynth.config import ScenarioConfig
from cellsynth.errors import ConfigError
from cellsynth.geo import LocalFrame

UMA_HEIGHT_M = 25.0
UMI_HEIGHT_M = 10.0


def _spread(rng: np.random.Generator, n: int, draw, min_gap_m: float) -> np.ndarray:
    """n points from `draw(k)` kept at least min_gap_m apart (gap shrinks if the area fills)."""
    points = np.empty((0, 2))
    gap = min_gap_m
    while len(points) < n:
        for cand in draw(4 * n):
            if len(points) and np.min(np.hypot(*(points - cand).T)) < gap:
                continue
            points = np.vstack([points, cand])
            if len(points) == n:
                break
        gap *= 0.8
    return points


def _synthetic_sites(cfg: ScenarioConfig, rng: np.random.Generator) -> np.ndarray:
    half_m = cfg.area_km * 500.0
    core_r_m = cfg.area_km * 1000.0 / 6.0
    n_core = int(round(cfg.n_sites * cfg.core_site_fraction))
    n_sub = cfg.n_sites - n_core

    def core(k: int) -> np.ndarray:
        r = core_r_m * np.sqrt(rng.random(k))
        a = rng.random(k) * 2 * np.pi
        return np.column_stack([r * np.sin(a), r * np.cos(a)])

    def suburb(k: int) -> np.ndarray:
        return rng.uniform(-half_m, half_m, size=(k, 2))

    # Inter-site distances like a real grid: ~ sqrt(area per site) / 1.5.
    core_gap = core_r_m * np.sqrt(np.pi / max(n_core, 1)) / 1.5
    sub_gap = 2 * half_m / np.sqrt(max(n_sub, 1)) / 1.5
    pts_core = _spread(rng, n_core, core, core_gap) if n_core else np.empty((0, 2))
    pts_sub = _spread(rng, n_sub, suburb, sub_gap) if n_sub else np.empty((0, 2))
    return np.vstack([pts_core, pts_sub])


def _csv_sites(cfg: ScenarioConfig) -> tuple[np.ndarray, np.ndarray]:
    path = Path(cfg.sites_csv or "")
    if not path.is_file():
        raise ConfigError(f"scenario.sites_csv: file not found: {path}")
    raw = pd.read_csv(path)
    cols = {c.lower(): c for c in raw.columns}
    lat_col = cols.get("latitude", cols.get("lat"))
    lon_col = cols.get("longitude", cols.get("lon"))
    if lat_col is None or lon_col is None:
        raise ConfigError(f"scenario.sites_csv: expected latitude/longitude columns, got {list(raw.columns)[:8]}")
    pts = raw[[lat_col, lon_col]].apply(pd.to_numeric, errors="coerce").dropna().drop_duplicates()
    lat, lon = pts[lat_col].to_numpy(float), pts[lon_col].to_numpy(float)
    # The n_sites sites nearest the layout's median point: a compact real neighbourhood.
    frame = LocalFrame.around(lat, lon)
    x, y = frame.to_xy(lat, lon)
    order = np.lexsort((lon, lat, np.hypot(x, y)))[: cfg.n_sites]
    if len(order) < cfg.n_sites:
        raise ConfigError(f"scenario.n_sites: {cfg.n_sites} requested but {path} holds {len(order)} distinct sites")
    return lat[order], lon[order]


def make_cells(cfg: ScenarioConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, LocalFrame]:
    """Cells table (cells.csv columns plus x_m, y_m, site_idx, is_core) and the lake's frame."""
    if cfg.sites_csv:
        site_lat, site_lon = _csv_sites(cfg)
        gen = LocalFrame.around(site_lat, site_lon)
        sx, sy = gen.to_xy(site_lat, site_lon)
    else:
        gen = LocalFrame(cfg.origin_lat, cfg.origin_lon)
        sx, sy = _synthetic_sites(cfg, rng).T
        site_lat, site_lon = gen.to_latlon(sx, sy)
    n_sites, n_sec = len(sx), cfg.sectors_per_site
    core_r_m = np.quantile(np.hypot(sx, sy), cfg.core_site_fraction) if n_sites > 1 else np.inf
    is_core = np.hypot(sx, sy) <= core_r_m
    is_umi = is_core & (rng.random(n_sites) < cfg.umi_fraction)
    rotation = rng.uniform(0.0, 360.0 / n_sec, n_sites)
    site_idx = np.repeat(np.arange(n_sites), n_sec)
    sector = np.tile(np.arange(n_sec), n_sites)
    site_ids = np.array([f"S{i:05d}" for i in range(n_sites)], dtype=object)
    # 7 decimals (~1 cm) is what the CSV carries; the frame is derived from the written values.
    lat = np.round(np.asarray(site_lat)[site_idx], 7)
    lon = np.round(np.asarray(site_lon)[site_idx], 7)
    cells = pd.DataFrame({
        "cell_id": [f"{site_ids[s]}_{k + 1}" for s, k in zip(site_idx, sector)],
        "site_id": site_ids[site_idx],
        "latitude": lat,
        "longitude": lon,
        "azimuth_deg": np.round((rotation[site_idx] + sector * 360.0 / n_sec) % 360.0, 1),
        "height_m": np.where(is_umi[site_idx], UMI_HEIGHT_M, UMA_HEIGHT_M),
        "tx_power_dbm": np.where(is_umi[site_idx], cfg.umi_tx_power_dbm, cfg.tx_power_dbm),
        "freq_mhz": np.full(len(site_idx), cfg.freq_mhz),
        "environment": np.where(is_umi[site_idx], "umi", "uma").astype(object),
        "site_idx": site_idx,
        "is_core": is_core[site_idx],
    })
    frame = LocalFrame.around(lat, lon)
    cells["x_m"], cells["y_m"] = frame.to_xy(lat, lon)
    return cells, frame
