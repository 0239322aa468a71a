"""User density: a time-varying mixture of business core, residential suburbs, hotspots, roads and
a uniform background, restricted to the area. The same closed form is sampled for reports and
evaluated on a grid for the ground truth, so the truth is exact rather than estimated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

COMPONENTS = ("business", "residential", "hotspot", "road", "background")
ROAD_SIGMA_M = 30.0


@dataclass
class Blobs:
    """Equal-weight mixture of isotropic Gaussians."""

    centre_m: np.ndarray  # (m, 2)
    sigma_m: np.ndarray  # (m,)

    def pdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(np.shape(x))
        for (cx, cy), s in zip(self.centre_m, self.sigma_m):
            out += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
        return out / len(self.sigma_m)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = rng.integers(0, len(self.sigma_m), n)
        return self.centre_m[k] + rng.standard_normal((n, 2)) * self.sigma_m[k, None]


@dataclass
class Roads:
    """Equal-weight mixture of segments blurred by a Gaussian across and along them."""

    start_m: np.ndarray  # (m, 2)
    end_m: np.ndarray  # (m, 2)
    sigma_m: float = ROAD_SIGMA_M

    def pdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(np.shape(x))
        s = self.sigma_m
        for a, b in zip(self.start_m, self.end_m):
            length = float(np.hypot(*(b - a)))
            ux, uy = (b - a) / length
            along = (x - a[0]) * ux + (y - a[1]) * uy
            across = -(x - a[0]) * uy + (y - a[1]) * ux
            # Closed form of (1/L) * integral_0^L N(p; a + t u, s^2 I) dt.
            out += (np.exp(-across**2 / (2 * s * s)) / (np.sqrt(2 * np.pi) * s)
                    * (ndtr(along / s) - ndtr((along - length) / s)) / length)
        return out / len(self.start_m)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = rng.integers(0, len(self.start_m), n)
        t = rng.random(n)[:, None]
        return self.start_m[k] + t * (self.end_m[k] - self.start_m[k]) + rng.standard_normal((n, 2)) * self.sigma_m


@dataclass
class UserDensity:
    """Mixture over COMPONENTS; weights depend on hour of day and weekday/weekend."""

    bounds_m: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max
    parts: dict  # component -> Blobs | Roads (background is uniform)
    has_hotspots: bool = True
    has_roads: bool = True

    @property
    def area_m2(self) -> float:
        x0, x1, y0, y1 = self.bounds_m
        return (x1 - x0) * (y1 - y0)

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x0, x1, y0, y1 = self.bounds_m
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)

    def component_pdf(self, name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Unrestricted component density (1/m^2); zero outside the area."""
        if name == "background":
            dens = np.full(np.shape(x), 1.0 / self.area_m2)
        else:
            dens = self.parts[name].pdf(x, y)
        return np.where(self.inside(x, y), dens, 0.0)

    def sample(self, rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
        """n positions from sum_k weights[k] g_k restricted to the area (redraw the component too)."""
        p = np.asarray(weights, dtype=float) / np.sum(weights)
        out, have = np.empty((n, 2)), 0
        while have < n:
            m = int((n - have) * 1.3) + 16
            comp = rng.choice(len(COMPONENTS), size=m, p=p)
            pts = np.empty((m, 2))
            for k, name in enumerate(COMPONENTS):
                sel = comp == k
                if not sel.any():
                    continue
                if name == "background":
                    x0, x1, y0, y1 = self.bounds_m
                    pts[sel] = np.column_stack([rng.uniform(x0, x1, sel.sum()), rng.uniform(y0, y1, sel.sum())])
                else:
                    pts[sel] = self.parts[name].sample(rng, int(sel.sum()))
            pts = pts[self.inside(pts[:, 0], pts[:, 1])][: n - have]
            out[have: have + len(pts)] = pts
            have += len(pts)
        return out


def make_density(rng: np.random.Generator, *, bounds_m: tuple[float, float, float, float],
                 core_centre_m: np.ndarray, core_radius_m: float, n_hotspots: int, n_roads: int) -> UserDensity:
    x0, x1, y0, y1 = bounds_m
    span = min(x1 - x0, y1 - y0)
    cx, cy = core_centre_m
    business = Blobs(np.array([[cx, cy]]) + rng.normal(0, core_radius_m * 0.2, (2, 2)),
                     np.array([0.6, 0.35]) * core_radius_m)
    n_res = 5
    ang = rng.uniform(0, 2 * np.pi) + np.arange(n_res) * 2 * np.pi / n_res + rng.normal(0, 0.3, n_res)
    rad = rng.uniform(0.22, 0.38, n_res) * span
    residential = Blobs(np.column_stack([cx + rad * np.sin(ang), cy + rad * np.cos(ang)]),
                        rng.uniform(0.08, 0.13, n_res) * span)
    parts: dict = {"business": business, "residential": residential}
    n_hot = max(n_hotspots, 1)
    hot_c = np.column_stack([rng.uniform(x0, x1, n_hot), rng.uniform(y0, y1, n_hot)])
    hot_c[: n_hot // 2] = np.array([cx, cy]) + rng.normal(0, core_radius_m, (n_hot // 2, 2))
    parts["hotspot"] = Blobs(hot_c, rng.uniform(60.0, 150.0, n_hot))
    n_rd = max(n_roads, 1)
    # Roads cross the area through the core: random direction, slight offset.
    theta = rng.uniform(0, np.pi, n_rd)
    off = rng.normal(0, core_radius_m * 0.5, n_rd)
    half = span * 0.5
    d = np.column_stack([np.sin(theta), np.cos(theta)])
    nrm = np.column_stack([-d[:, 1], d[:, 0]])
    mid = np.array([cx, cy]) + nrm * off[:, None]
    parts["road"] = Roads(mid - d * half, mid + d * half)
    return UserDensity(bounds_m, parts, has_hotspots=n_hotspots > 0, has_roads=n_roads > 0)


def hourly_intensity(hour: np.ndarray, is_weekend: np.ndarray) -> np.ndarray:
    """Relative report rate per hour: night trough, lunch and evening peaks, quieter weekends."""
    h = np.asarray(hour, dtype=float)
    diurnal = (0.15 + 0.55 * np.exp(-((h - 12.5) ** 2) / 8.0) + 0.75 * np.exp(-((h - 20.0) ** 2) / 6.0)
               + 0.35 * np.exp(-((h - 8.5) ** 2) / 2.0))
    return diurnal * np.where(is_weekend, 0.8, 1.0)


def component_weights(hour: np.ndarray, is_weekend: np.ndarray, *, has_hotspots: bool = True,
                      has_roads: bool = True) -> np.ndarray:
    """(n, 5) unnormalised mixture weights: business by day on weekdays, residential at night and
    at weekends, roads at commute peaks, hotspots afternoon and evening."""
    h = np.asarray(hour, dtype=float)
    we = np.asarray(is_weekend, dtype=bool)
    office = (h >= 8) & (h < 18)
    business = np.where(we, 0.15, np.where(office, 1.0, 0.12))
    residential = np.where(we, np.where((h >= 10) & (h < 19), 0.6, 1.0), np.where(office, 0.3, 1.0))
    commute = ((h >= 7) & (h < 9)) | ((h >= 17) & (h < 19))
    road = np.where(commute & ~we, 0.5, 0.1) * has_roads
    hotspot = np.where((h >= 11) & (h < 23), 0.35, 0.05) * has_hotspots
    background = np.full(h.shape, 0.15)
    return np.column_stack([business, residential, hotspot, road, background])
