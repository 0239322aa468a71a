"""Local metric frame: WGS84 lat/lon <-> metres east/north of an origin (pyproj, azimuthal
equidistant), so distances and KDE bandwidths are in metres everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from pyproj import Transformer


@dataclass(frozen=True)
class LocalFrame:
    lat0: float
    lon0: float

    @classmethod
    def around(cls, lat: np.ndarray, lon: np.ndarray) -> LocalFrame:
        """Frame centred on the median of the given points, rounded to ~10 m so reruns agree."""
        return cls(round(float(np.nanmedian(lat)), 4), round(float(np.nanmedian(lon)), 4))

    @cached_property
    def _fwd(self) -> Transformer:
        proj = f"+proj=aeqd +lat_0={self.lat0} +lon_0={self.lon0} +datum=WGS84 +units=m"
        return Transformer.from_crs("EPSG:4326", proj, always_xy=True)

    @cached_property
    def _inv(self) -> Transformer:
        proj = f"+proj=aeqd +lat_0={self.lat0} +lon_0={self.lon0} +datum=WGS84 +units=m"
        return Transformer.from_crs(proj, "EPSG:4326", always_xy=True)

    def to_xy(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Metres east (x_m) and north (y_m) of the origin."""
        x_m, y_m = self._fwd.transform(np.asarray(lon, dtype=float), np.asarray(lat, dtype=float))
        return np.asarray(x_m), np.asarray(y_m)

    def to_latlon(self, x_m: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = self._inv.transform(np.asarray(x_m, dtype=float), np.asarray(y_m, dtype=float))
        return np.asarray(lat), np.asarray(lon)
