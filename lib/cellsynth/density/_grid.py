"""Grid squares of the spatial maps: gx = floor(x_m / res_m), centre (gx + 0.5) * res_m."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtr

MAP_COLUMNS = ["gx", "gy", "prob"]


def square_of(values_m: np.ndarray, resolution_m: float) -> np.ndarray:
    return np.floor(np.asarray(values_m, dtype=float) / resolution_m).astype(np.int64)


def square_centre_m(index: np.ndarray, resolution_m: float) -> np.ndarray:
    return (np.asarray(index, dtype=float) + 0.5) * resolution_m


def _axis_masses(coords_m: np.ndarray, bandwidth_m: float, lo: int, hi: int, resolution_m: float) -> np.ndarray:
    # Mass of each kernel (rows) in each 1-D interval [g*res, (g+1)*res) for g in lo..hi.
    edges = np.arange(lo, hi + 2, dtype=float) * resolution_m
    cdf = ndtr((edges[None, :] - coords_m[:, None]) / bandwidth_m)
    return np.diff(cdf, axis=1)


def kde_square_masses(
    positions_m: np.ndarray,
    bandwidth_m: float,
    *,
    resolution_m: float,
    reach_bandwidths: float = 5.0,
    chunk_rows: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact mass of an isotropic Gaussian KDE in every grid square near its support.

    The Gaussian kernel is separable, so a square's mass is a product of two 1-D normal-CDF
    differences and the mixture's masses are one matrix product (A^T B / n). Squares farther
    than `reach_bandwidths` bandwidths from every position are left out (mass < 3e-7 each).

    Returns:
        (gx_range, gy_range, masses) with masses[ix, iy] for squares gx_range[ix], gy_range[iy].
    """
    pad_m = reach_bandwidths * bandwidth_m
    lo = positions_m.min(axis=0) - pad_m
    hi = positions_m.max(axis=0) + pad_m
    gx0, gy0 = square_of(lo, resolution_m)
    gx1, gy1 = square_of(hi, resolution_m)
    masses = np.zeros((gx1 - gx0 + 1, gy1 - gy0 + 1))
    for start in range(0, len(positions_m), chunk_rows):
        chunk = positions_m[start:start + chunk_rows]
        ax = _axis_masses(chunk[:, 0], bandwidth_m, gx0, gx1, resolution_m)
        ay = _axis_masses(chunk[:, 1], bandwidth_m, gy0, gy1, resolution_m)
        masses += ax.T @ ay
    masses /= len(positions_m)
    return np.arange(gx0, gx1 + 1), np.arange(gy0, gy1 + 1), masses


def sparse_map(gx_range: np.ndarray, gy_range: np.ndarray, masses: np.ndarray, *, min_mass: float) -> pd.DataFrame:
    """Squares holding more than `min_mass` of the total, renormalised to sum to 1."""
    total = float(masses.sum())
    if total <= 0:
        return pd.DataFrame({"gx": np.empty(0, np.int64), "gy": np.empty(0, np.int64), "prob": np.empty(0)})
    probs = masses / total
    ix, iy = np.nonzero(probs > min_mass)
    kept = probs[ix, iy]
    return pd.DataFrame({"gx": gx_range[ix], "gy": gy_range[iy], "prob": kept / kept.sum()})


def to_dense(maps: list[pd.DataFrame]) -> tuple[int, int, list[np.ndarray]]:
    """Several sparse maps on one dense grid covering their union: (gx0, gy0, arrays[ix, iy])."""
    nonempty = [m for m in maps if len(m)]
    gx0 = min(int(m["gx"].min()) for m in nonempty)
    gy0 = min(int(m["gy"].min()) for m in nonempty)
    gx1 = max(int(m["gx"].max()) for m in nonempty)
    gy1 = max(int(m["gy"].max()) for m in nonempty)
    out = []
    for m in maps:
        arr = np.zeros((gx1 - gx0 + 1, gy1 - gy0 + 1))
        if len(m):
            np.add.at(arr, (m["gx"].to_numpy() - gx0, m["gy"].to_numpy() - gy0), m["prob"].to_numpy())
        out.append(arr)
    return gx0, gy0, out
