"""Small stand-ins for DensityModels and RadioModels with closed-form predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Three sites on a line, one cell each, plus a far cell that never neighbours anything nearby.
CELLS = pd.DataFrame({
    "cell_id": ["A", "B", "C", "FAR"],
    "x_m": [0.0, 1000.0, 2000.0, 50_000.0],
    "y_m": [0.0, 0.0, 0.0, 0.0],
    "frame_lat0": 44.4949, "frame_lon0": 11.3426,
})
TX_DBM = {"A": 0.0, "B": -2.0, "C": -4.0, "FAR": 0.0}


@dataclass
class Prediction:
    mean: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray


def rsrp_mean_dbm(cell_id: str, x_m: float, y_m: float) -> float:
    """Closed-form field: tx - 30 log10(d / 1 m), d floored at 10 m."""
    row = CELLS.set_index("cell_id").loc[cell_id]
    d = max(float(np.hypot(x_m - row.x_m, y_m - row.y_m)), 10.0)
    return TX_DBM[cell_id] - 30.0 * np.log10(d)


class FakeRadio:
    epistemic_threshold_db = 3.0

    def __init__(self, rsrq: bool = True):
        self.rsrq = rsrq

    def cells(self, target: str) -> list[str]:
        return sorted(TX_DBM) if (target == "rsrp" or self.rsrq) else []

    def predict(self, target, cell_ids, xy_m, *, load_rho=None):
        xy = np.asarray(xy_m, dtype=float).reshape(-1, 2)
        ids = np.asarray(cell_ids, dtype=object)
        if target == "rsrp":
            mean = np.array([rsrp_mean_dbm(c, x, y) for c, (x, y) in zip(ids, xy)])
        else:
            mean = -8.0 - 6.0 * np.asarray(load_rho, dtype=float)
        dist = np.array([np.hypot(x - CELLS.set_index("cell_id").loc[c, "x_m"], y) for c, (x, y) in zip(ids, xy)])
        return Prediction(mean, 0.5 + dist / 1000.0, np.full(len(ids), 2.0))


def fake_radio_factory() -> FakeRadio:
    return FakeRadio()


class FakeDensity:
    """Uniform positions along the cells' line; association = nearest of A, B, C."""

    def __init__(self, n_by_window: dict[str, int]):
        self._n = n_by_window

    @property
    def windows(self) -> list[str]:
        return sorted(self._n)

    def n_reports(self, window: str) -> int:
        return self._n[window]

    def sample_positions(self, window, n_samples, *, rng=None):
        gen = np.random.default_rng(rng)
        return np.column_stack([gen.uniform(0, 2000, n_samples), gen.uniform(-300, 300, n_samples)])

    def associate(self, window, xy_m):
        xy = np.asarray(xy_m)
        near = CELLS.iloc[:3]
        d = np.hypot(xy[:, [0]] - near["x_m"].to_numpy()[None], xy[:, [1]] - near["y_m"].to_numpy()[None])
        return near["cell_id"].to_numpy()[d.argmin(axis=1)]
