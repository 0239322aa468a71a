"""The static world of a scenario: cells, radio environment, user density, hourly load and the
exact ground truth (true maps, RSRP grid). Reports are drawn from it chunk by chunk."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cellsynth.config import ScenarioConfig, WindowConfig
from cellsynth.geo import LocalFrame
from cellsynth.scenario._layout import make_cells
from cellsynth.scenario._radio import SHADOW_GRID_M, SHADOW_GRID_N, RadioEnv, gaussian_field
from cellsynth.scenario._users import COMPONENTS, UserDensity, component_weights, hourly_intensity, make_density
from cellsynth.schemas import RSRP_RANGE_DBM
from cellsynth.windows import window_of

_FINE_CHUNK = 40_000  # fine-grid points per association batch (bounded memory at bench size)


def stream_rng(seed: int, *tags: int) -> np.random.Generator:
    """Independent generator per purpose (and chunk), so chunking never changes the draws."""
    return np.random.default_rng([seed, *tags])


@dataclass
class World:
    cfg: ScenarioConfig
    seed: int
    frame: LocalFrame
    cells: pd.DataFrame
    radio: RadioEnv
    density: UserDensity
    site_tree: cKDTree
    site_cells: np.ndarray  # (n_sites, sectors) cell indices
    hours: pd.DatetimeIndex  # start of every simulated hour (UTC)
    intensity: np.ndarray  # (n_hours,) relative report rate
    weights: np.ndarray  # (n_hours, n_components) mixture weights
    hour_window: np.ndarray  # (n_hours,) window label
    load_rho: np.ndarray | None = None  # (n_cells, n_hours) true load
    component_cell_mass: np.ndarray | None = None  # (n_components, n_cells): B_kc

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    def candidates(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """(n, k * sectors) cells of the k nearest sites: the cells a UE there can hear."""
        k = min(self.cfg.n_candidate_sites, len(self.site_cells))
        _, site = self.site_tree.query(np.column_stack([x_m, y_m]), k=k)
        site = np.asarray(site).reshape(len(x_m), k)
        return self.site_cells[site].reshape(len(x_m), -1)

    def link_rsrp_dbm(self, x_m: np.ndarray, y_m: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Noise-free RSRP (n, k) of each row's candidate cells, in batches to bound memory."""
        out = np.empty(cand.shape)
        for start in range(0, len(x_m), _FINE_CHUNK):
            sl = slice(start, start + _FINE_CHUNK)
            out[sl] = self.radio.rsrp_dbm(x_m[sl, None], y_m[sl, None], cand[sl])
        return out

    def mixture_norm(self) -> np.ndarray:
        """Z_t = sum_k w_k(t) m_k: the mass of the hour-t mixture inside the area."""
        mass_k = self.component_cell_mass.sum(axis=1)
        return self.weights @ mass_k


def build_world(cfg: ScenarioConfig, *, windows: WindowConfig, seed: int) -> World:
    cells, frame = make_cells(cfg, stream_rng(seed, 1))
    x, y = cells["x_m"].to_numpy(), cells["y_m"].to_numpy()
    margin = cfg.user_margin_m
    bounds = (x.min() - margin, x.max() + margin, y.min() - margin, y.max() + margin)
    n_sites = int(cells["site_idx"].max()) + 1
    rng = stream_rng(seed, 2)
    field = gaussian_field(rng, decorrelation_m=cfg.decorrelation_m)
    torus_m = SHADOW_GRID_M * SHADOW_GRID_N
    radio = RadioEnv(
        cell_x_m=x, cell_y_m=y, cell_site=cells["site_idx"].to_numpy(),
        azimuth_deg=cells["azimuth_deg"].to_numpy(float), height_m=cells["height_m"].to_numpy(float),
        tx_power_dbm=cells["tx_power_dbm"].to_numpy(float), freq_mhz=cells["freq_mhz"].to_numpy(float),
        environment=cells["environment"].to_numpy(str), n_prb=cfg.n_prb, downtilt_deg=cfg.downtilt_deg,
        field=field, site_offset_m=rng.uniform(0, torus_m, (n_sites, 2)),
        cell_offset_m=rng.uniform(0, torus_m, (len(cells), 2)), los_offset_m=rng.uniform(0, torus_m, (n_sites, 2)),
        sigma_db=cfg.shadowing_sigma_db, site_share=cfg.site_shadowing_share, use_los=cfg.los,
    )
    core = cells[cells["is_core"]]
    centre = np.array([core["x_m"].mean(), core["y_m"].mean()]) if len(core) else np.array([x.mean(), y.mean()])
    core_r = float(np.max(np.hypot(core["x_m"] - centre[0], core["y_m"] - centre[1]))) if len(core) > 1 else 1000.0
    density = make_density(stream_rng(seed, 3), bounds_m=bounds, core_centre_m=centre,
                           core_radius_m=max(core_r, 300.0), n_hotspots=cfg.n_hotspots, n_roads=cfg.n_roads)
    site_xy = cells.groupby("site_idx")[["x_m", "y_m"]].first().to_numpy()
    site_cells = np.arange(len(cells)).reshape(n_sites, cfg.sectors_per_site)
    hours = pd.date_range(pd.Timestamp(cfg.start_date, tz="UTC"), periods=cfg.n_days * 24, freq="h")
    weekend = hours.dayofweek.to_numpy() >= 5
    hod = hours.hour.to_numpy()
    return World(
        cfg=cfg, seed=seed, frame=frame, cells=cells, radio=radio, density=density,
        site_tree=cKDTree(site_xy), site_cells=site_cells, hours=hours,
        intensity=hourly_intensity(hod, weekend),
        weights=component_weights(hod, weekend, has_hotspots=density.has_hotspots, has_roads=density.has_roads),
        hour_window=window_of(hours, windows),
    )


@dataclass
class FineGrid:
    """Integration points: `sub` x `sub` per map square, inside the area only."""

    x_m: np.ndarray
    y_m: np.ndarray
    square: np.ndarray  # index into the squares below
    squares_gx: np.ndarray
    squares_gy: np.ndarray
    cell_area_m2: float
    comp_mass: np.ndarray  # (n_points, n_components): g_k * cell area


def fine_grid(world: World, map_resolution_m: float) -> FineGrid:
    res = map_resolution_m
    sub = max(1, int(np.ceil(res / world.cfg.truth_fine_grid_m)))
    step = res / sub
    x0, x1, y0, y1 = world.density.bounds_m
    gx = np.arange(np.floor(x0 / res), np.floor(x1 / res) + 1).astype(np.int64)
    gy = np.arange(np.floor(y0 / res), np.floor(y1 / res) + 1).astype(np.int64)
    offs = (np.arange(sub) + 0.5) * step
    fx = (gx[:, None] * res + offs[None, :]).ravel()
    fy = (gy[:, None] * res + offs[None, :]).ravel()
    px, py = np.meshgrid(fx, fy)
    sqx = np.floor(px / res).astype(np.int64) - gx[0]
    sqy = np.floor(py / res).astype(np.int64) - gy[0]
    square = (sqy * len(gx) + sqx).ravel()
    px, py = px.ravel(), py.ravel()
    keep = world.density.inside(px, py)
    px, py, square = px[keep], py[keep], square[keep]
    sq_gx = np.tile(gx, len(gy))
    sq_gy = np.repeat(gy, len(gx))
    area = step * step
    comp = np.column_stack([world.density.component_pdf(name, px, py) * area for name in COMPONENTS])
    return FineGrid(px, py, square, sq_gx, sq_gy, area, comp)


def association(world: World, grid: FineGrid, *, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse P(serving cell | fine point) as (point, cell, prob), by averaging the reports' own
    serving rule (argmax of RSRP + measurement + hysteresis noise) over `association_draws`."""
    cfg = world.cfg
    noise_sd = float(np.hypot(cfg.measurement_noise_db, cfg.hysteresis_noise_db))
    rng = stream_rng(world.seed, 6)
    pts, cells_out, probs = [], [], []
    n = len(grid.x_m)
    for start in range(0, n, _FINE_CHUNK):
        sl = slice(start, min(start + _FINE_CHUNK, n))
        x, y = grid.x_m[sl], grid.y_m[sl]
        cand = world.candidates(x, y)
        rsrp = world.radio.rsrp_dbm(x[:, None], y[:, None], cand)
        idx = np.arange(len(x))
        for _ in range(cfg.association_draws):
            best = np.argmax(rsrp + rng.normal(0.0, noise_sd, rsrp.shape), axis=1)
            pts.append(idx + start)
            cells_out.append(cand[idx, best])
        if progress is not None:
            progress(0)
    point = np.concatenate(pts) if pts else np.empty(0, np.int64)
    cell = np.concatenate(cells_out) if cells_out else np.empty(0, np.int64)
    key = point * world.n_cells + cell
    uniq, counts = np.unique(key, return_counts=True)
    return uniq // world.n_cells, uniq % world.n_cells, counts / cfg.association_draws


def compute_truth(world: World, *, map_resolution_m: float, progress=None) -> tuple[pd.DataFrame, FineGrid]:
    """True spatial maps per (window, cell), and B_kc / load on the world as a side effect."""
    grid = fine_grid(world, map_resolution_m)
    point, cell, prob = association(world, grid, progress=progress)
    # B_kc = integral over the area of g_k(x) P(c | x) dx.
    mass = np.zeros((len(COMPONENTS), world.n_cells))
    for k in range(len(COMPONENTS)):
        mass[k] = np.bincount(cell, weights=grid.comp_mass[point, k] * prob, minlength=world.n_cells)
    world.component_cell_mass = mass
    z = world.mixture_norm()
    # Window density f_j = sum_{t in j} lambda(t) p_t, p_t = sum_k w_k(t) g_k 1_A / Z_t.
    labels = pd.unique(world.hour_window)
    key = cell * len(grid.squares_gx) + grid.square[point]
    ukey, inv = np.unique(key, return_inverse=True)
    u_cell, u_sq = ukey // len(grid.squares_gx), ukey % len(grid.squares_gx)
    res = map_resolution_m
    frames = []
    for label in labels:
        in_j = world.hour_window == label
        w_j = (world.intensity[in_j, None] * world.weights[in_j] / z[in_j, None]).sum(axis=0)
        f_j = grid.comp_mass @ w_j
        contrib = np.bincount(inv, weights=f_j[point] * prob, minlength=len(ukey))
        total = np.bincount(u_cell, weights=contrib, minlength=world.n_cells)
        ok = (contrib > 0) & (total[u_cell] > 0)
        gx, gy = grid.squares_gx[u_sq[ok]], grid.squares_gy[u_sq[ok]]
        frames.append(pd.DataFrame({
            "window": label,
            "cell_id": world.cells["cell_id"].to_numpy()[u_cell[ok]],
            "gx": gx.astype(np.int32), "gy": gy.astype(np.int32),
            "x_m": (gx + 0.5) * res, "y_m": (gy + 0.5) * res,
            "prob": contrib[ok] / total[u_cell[ok]],
        }))
    maps = pd.concat(frames, ignore_index=True).sort_values(["window", "cell_id", "gy", "gx"], kind="stable")
    return maps.reset_index(drop=True), grid


def compute_load(world: World) -> None:
    """True hourly load per cell: offered demand from the same user density, saturating in [0, 1)."""
    cfg = world.cfg
    z = world.mixture_norm()
    # share_c(t): fraction of hour-t users that cell c serves.
    share = (world.weights / z[:, None]) @ world.component_cell_mass  # (n_hours, n_cells)
    rate = world.intensity / world.intensity.mean()
    demand = cfg.mean_load * world.n_cells * rate[:, None] * share
    rng = stream_rng(world.seed, 7)
    demand = demand * rng.lognormal(-0.5 * cfg.traffic_noise**2, cfg.traffic_noise, demand.shape)
    # PRB utilisation is reported in 0.01 % steps; the true load is that exact value.
    world.load_rho = (np.round(100.0 * (1.0 - np.exp(-demand)), 2) / 100.0).T


def cell_profiles(world: World) -> np.ndarray:
    """residential | business | mixed from the cell's business vs residential user mass."""
    mass = world.component_cell_mass
    b = mass[COMPONENTS.index("business")] / max(mass[COMPONENTS.index("business")].sum(), 1e-300)
    r = mass[COMPONENTS.index("residential")] / max(mass[COMPONENTS.index("residential")].sum(), 1e-300)
    ratio = b / np.maximum(b + r, 1e-300)
    return np.where(ratio > 0.65, "business", np.where(ratio < 0.35, "residential", "mixed")).astype(object)


def traffic_table(world: World) -> pd.DataFrame:
    cfg = world.cfg
    rng = stream_rng(world.seed, 8)
    load = world.load_rho
    volume = cfg.cell_capacity_mb_per_h * load * rng.lognormal(0.0, 0.1, load.shape)
    n_h = len(world.hours)
    return pd.DataFrame({
        "cell_id": np.repeat(world.cells["cell_id"].to_numpy(), n_h),
        "timestamp": np.tile(world.hours.strftime("%Y-%m-%dT%H:%M:%SZ").to_numpy(), world.n_cells),
        "traffic_mb": np.round(volume, 2).ravel(),
        "prb_util_pct": np.round(load * 100.0, 2).ravel(),
    })


def load_truth(world: World) -> pd.DataFrame:
    n_h = len(world.hours)
    return pd.DataFrame({
        "cell_id": np.repeat(world.cells["cell_id"].to_numpy(), n_h),
        "ts": pd.DatetimeIndex(np.tile(world.hours.tz_localize(None).to_numpy(), world.n_cells)).tz_localize("UTC"),
        "load_rho": world.load_rho.ravel(),
    })


def rsrp_grid(world: World, *, map_resolution_m: float) -> pd.DataFrame:
    """Noise-free (median) RSRP of every candidate cell at each map-square centre in the area."""
    res = map_resolution_m
    x0, x1, y0, y1 = world.density.bounds_m
    gx = np.arange(np.floor(x0 / res), np.floor(x1 / res) + 1)
    gy = np.arange(np.floor(y0 / res), np.floor(y1 / res) + 1)
    px, py = (np.meshgrid((gx + 0.5) * res, (gy + 0.5) * res))
    px, py = px.ravel(), py.ravel()
    keep = world.density.inside(px, py)
    px, py = px[keep], py[keep]
    out = []
    for start in range(0, len(px), _FINE_CHUNK):
        x, y = px[start:start + _FINE_CHUNK], py[start:start + _FINE_CHUNK]
        cand = world.candidates(x, y)
        rsrp = world.radio.rsrp_dbm(x[:, None], y[:, None], cand)
        ok = rsrp >= RSRP_RANGE_DBM[0]
        rows = np.nonzero(ok)[0]
        out.append(pd.DataFrame({"cell_idx": cand[ok], "x_m": x[rows], "y_m": y[rows], "rsrp_median_dbm": rsrp[ok]}))
    grid = pd.concat(out, ignore_index=True).sort_values(["cell_idx", "y_m", "x_m"], kind="stable")
    lat, lon = world.frame.to_latlon(grid["x_m"].to_numpy(), grid["y_m"].to_numpy())
    return pd.DataFrame({
        "cell_id": world.cells["cell_id"].to_numpy()[grid["cell_idx"].to_numpy()],
        "x_m": grid["x_m"].to_numpy(), "y_m": grid["y_m"].to_numpy(), "lat": lat, "lon": lon,
        "rsrp_median_dbm": grid["rsrp_median_dbm"].to_numpy(),
    })
