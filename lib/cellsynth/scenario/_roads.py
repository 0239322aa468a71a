"""The scenario's road network: the arterial roads users travel along (the `road` component of
the user density) plus a regular street lattice, as straight segments in the local frame."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellsynth.scenario._world import World


def _clip(a: np.ndarray, b: np.ndarray, box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Liang-Barsky clip of segment a-b to box (x_min, x_max, y_min, y_max); None when outside."""
    x0, x1, y0, y1 = box
    d = b - a
    t0, t1 = 0.0, 1.0
    for p, q in ((-d[0], a[0] - x0), (d[0], x1 - a[0]), (-d[1], a[1] - y0), (d[1], y1 - a[1])):
        if p == 0:
            if q < 0:
                return None
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    if t0 >= t1:
        return None
    return a + t0 * d, a + t1 * d


def road_segments(world: World, *, street_spacing_m: float = 400.0) -> pd.DataFrame:
    """Roads of the scenario area: segment_id, kind (arterial | street), x0_m, y0_m, x1_m, y1_m.

    Arterials are the user density's roads clipped to the area; streets run north-south and
    east-west every `street_spacing_m`. Segments cross without shared end points: a consumer
    nodes them at their intersections.
    """
    box = world.density.bounds_m
    x0, x1, y0, y1 = box
    rows = []
    roads = world.density.parts.get("road")
    if world.density.has_roads and roads is not None:
        for i, (a, b) in enumerate(zip(roads.start_m, roads.end_m)):
            clipped = _clip(np.asarray(a, float), np.asarray(b, float), box)
            if clipped is not None:
                rows.append((f"A{i}", "arterial", *clipped[0], *clipped[1]))
    for i, x in enumerate(np.arange(x0 + street_spacing_m / 2, x1, street_spacing_m)):
        rows.append((f"SX{i}", "street", x, y0, x, y1))
    for i, y in enumerate(np.arange(y0 + street_spacing_m / 2, y1, street_spacing_m)):
        rows.append((f"SY{i}", "street", x0, y, x1, y))
    return pd.DataFrame(rows, columns=["segment_id", "kind", "x0_m", "y0_m", "x1_m", "y1_m"])
