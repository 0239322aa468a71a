"""Road files for the planner: GeoJSON lines (lon/lat) or a CSV of straight segments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellsynth.errors import ConfigError
from cellsynth.geo import LocalFrame

_KEY = "plan.road_path"
_COLUMNS = ["segment_id", "x0_m", "y0_m", "x1_m", "y1_m"]


def _geojson(path: Path, frame: LocalFrame) -> pd.DataFrame:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{_KEY}: {path} is not readable GeoJSON ({err.__class__.__name__})") from err
    features = doc.get("features", [doc]) if isinstance(doc, dict) else []
    rows = []
    for i, feat in enumerate(features):
        geom = (feat or {}).get("geometry") or {}
        kind, coords = geom.get("type"), geom.get("coordinates") or []
        lines = [coords] if kind == "LineString" else coords if kind == "MultiLineString" else []
        fid = str((feat.get("properties") or {}).get("id", feat.get("id", i)))
        for j, line in enumerate(lines):
            pts = np.asarray(line, dtype=float).reshape(-1, 2)[:, :2] if len(line) else np.zeros((0, 2))
            if len(pts) < 2:
                continue
            x, y = frame.to_xy(pts[:, 1], pts[:, 0])  # GeoJSON is lon, lat
            for k in range(len(pts) - 1):
                rows.append((f"{fid}:{j}:{k}" if len(lines) > 1 else f"{fid}:{k}", x[k], y[k], x[k + 1], y[k + 1]))
    if not rows:
        raise ConfigError(f"{_KEY}: {path} holds no LineString or MultiLineString with two or more points")
    return pd.DataFrame(rows, columns=_COLUMNS)


def _csv(path: Path, frame: LocalFrame) -> pd.DataFrame:
    try:
        raw = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{_KEY}: {path} is not a readable CSV ({err.__class__.__name__})") from err
    have = set(raw.columns)
    if {"x0_m", "y0_m", "x1_m", "y1_m"} <= have:
        out = raw[["x0_m", "y0_m", "x1_m", "y1_m"]].astype(float)
    elif {"lat0", "lon0", "lat1", "lon1"} <= have:
        x0, y0 = frame.to_xy(raw["lat0"], raw["lon0"])
        x1, y1 = frame.to_xy(raw["lat1"], raw["lon1"])
        out = pd.DataFrame({"x0_m": x0, "y0_m": y0, "x1_m": x1, "y1_m": y1})
    else:
        raise ConfigError(f"{_KEY}: {path} needs columns x0_m, y0_m, x1_m, y1_m or lat0, lon0, lat1, lon1 "
                          f"(have: {', '.join(sorted(have)[:8])})")
    out.insert(0, "segment_id", raw["segment_id"].astype(str) if "segment_id" in have else [str(i) for i in range(len(raw))])
    out = out[np.isfinite(out[["x0_m", "y0_m", "x1_m", "y1_m"]].to_numpy()).all(axis=1)]
    if out.empty:
        raise ConfigError(f"{_KEY}: {path} holds no segment with finite coordinates")
    return out.reset_index(drop=True)


def read_roads(path: str | Path, frame: LocalFrame) -> pd.DataFrame:
    """Segments (segment_id, x0_m, y0_m, x1_m, y1_m) in the lake's local frame.

    Raises:
        ConfigError: missing or unreadable file, unknown suffix, no usable segment.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{_KEY}: file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".geojson", ".json"):
        return _geojson(p, frame)
    if suffix == ".csv":
        return _csv(p, frame)
    raise ConfigError(f"{_KEY}: expected a .geojson, .json or .csv file, got {p.name}")
