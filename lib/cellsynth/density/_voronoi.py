"""Baselines from site positions alone: Voronoi tessellation of the sites and nearest-site
association. A site's Voronoi polygon is split between its sectors by azimuth (each point
goes to the sector whose boresight is angularly closest); a site without azimuths shares its
polygon equally between its cells (maps) or gives it to its first cell (association)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cellsynth.density._grid import square_centre_m, square_of


class SiteLayout:
    """Cells grouped into sites (identical x_m, y_m) with a KD-tree over the sites."""

    def __init__(self, cells: pd.DataFrame) -> None:
        frame = cells.sort_values("cell_id").reset_index(drop=True)
        self.cell_ids = frame["cell_id"].to_numpy(dtype=object)
        xy = frame[["x_m", "y_m"]].to_numpy(dtype=float)
        self.site_xy, self.site_of_cell = np.unique(np.round(xy, 3), axis=0, return_inverse=True)
        self.site_of_cell = self.site_of_cell.ravel()
        az = frame["azimuth_deg"].to_numpy(dtype=float) if "azimuth_deg" in frame else np.full(len(frame), np.nan)
        self.azimuth_deg = az
        self.tree = cKDTree(self.site_xy)
        self.cells_of_site = [np.flatnonzero(self.site_of_cell == s) for s in range(len(self.site_xy))]

    def owner_weights(self, xy_m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(point_index, cell_index, weight) rows: which cell(s) own each point, weights sum to 1."""
        _, site = self.tree.query(xy_m)
        rows_p, rows_c, rows_w = [], [], []
        # each site's points in increasing order (a stable sort), found once: a mask per site was
        # O(sites x points), ~10^10 at 10^4 cells for the Voronoi maps' sub-points
        order = np.argsort(site, kind="stable")
        sites, starts = np.unique(site[order], return_index=True)
        for s, pts in zip(sites, np.split(order, starts[1:])):
            members = self.cells_of_site[s]
            az = self.azimuth_deg[members]
            if len(members) == 1 or np.isnan(az).any():
                for c in members:
                    rows_p.append(pts)
                    rows_c.append(np.full(len(pts), c))
                    rows_w.append(np.full(len(pts), 1.0 / len(members)))
                continue
            d = xy_m[pts] - self.site_xy[s]
            bearing = np.degrees(np.arctan2(d[:, 0], d[:, 1]))  # clockwise from north
            gap = np.abs((bearing[:, None] - az[None, :] + 180.0) % 360.0 - 180.0)
            rows_p.append(pts)
            rows_c.append(members[np.argmin(gap, axis=1)])
            rows_w.append(np.ones(len(pts)))
        return np.concatenate(rows_p), np.concatenate(rows_c), np.concatenate(rows_w)


def nearest_site_associate(cells: pd.DataFrame, xy_m: np.ndarray) -> np.ndarray:
    """Serving cell by the nearest site (and the closest sector boresight)."""
    layout = SiteLayout(cells)
    pidx, cidx, weight = layout.owner_weights(xy_m)
    out = np.empty(len(xy_m), dtype=object)
    # Shared sites: the first (sorted) cell wins, so keep the first row seen per point.
    order = np.lexsort((cidx, pidx))
    first = order[np.r_[True, pidx[order][1:] != pidx[order][:-1]]]
    out[pidx[first]] = layout.cell_ids[cidx[first]]
    return out


def voronoi_maps(
    cells: pd.DataFrame,
    *,
    box_m: tuple[float, float, float, float],
    resolution_m: float,
    oversample: int = 4,
) -> pd.DataFrame:
    """Uniform diffusion over each cell's (sectorised) Voronoi polygon clipped to `box_m`.

    Each square is split into oversample^2 sub-points; a cell's mass in a square is the
    share of sub-points it owns. Returns (cell_id, gx, gy, prob), each cell summing to 1.
    """
    layout = SiteLayout(cells)
    gx = np.arange(square_of(box_m[0], resolution_m), square_of(box_m[2], resolution_m) + 1)
    gy = np.arange(square_of(box_m[1], resolution_m), square_of(box_m[3], resolution_m) + 1)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    sx = (square_centre_m(gx, resolution_m)[:, None] + sub[None, :] * resolution_m).ravel()
    sy = (square_centre_m(gy, resolution_m)[:, None] + sub[None, :] * resolution_m).ravel()
    px, py = np.meshgrid(sx, sy, indexing="ij")
    pts = np.column_stack([px.ravel(), py.ravel()])
    sq_x = np.repeat(np.arange(len(gx)), oversample)[:, None].repeat(len(sy), axis=1).ravel()
    sq_y = np.tile(np.repeat(np.arange(len(gy)), oversample), len(sx))
    pidx, cidx, weight = layout.owner_weights(pts)
    frame = pd.DataFrame({"c": cidx, "gx": gx[sq_x[pidx]], "gy": gy[sq_y[pidx]], "w": weight})
    agg = frame.groupby(["c", "gx", "gy"], as_index=False)["w"].sum()
    agg["prob"] = agg["w"] / agg.groupby("c")["w"].transform("sum")
    agg["cell_id"] = layout.cell_ids[agg["c"].to_numpy()]
    return agg[["cell_id", "gx", "gy", "prob"]].reset_index(drop=True)
