"""Stand-ins for the plan stage's inputs: real DensityModels (KDEs), a closed-form radio model,
and a lake holding the tables the stage checks for."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from cellsynth.density import DensityModels, GaussianKDE2D
from cellsynth.schemas import spec

SITES = {"A": (0.0, 0.0), "B": (1500.0, 0.0), "C": (750.0, 1200.0)}
FRAME = (44.4949, 11.3426)


@dataclass
class _Pred:
    mean: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray


class FakeRadio:
    """tx - 30 log10(d); epistemic std grows towards the east edge, where users also are."""

    def predict(self, target, cell_ids, xy_m, *, load_rho=None, seed=0):
        ids = np.asarray(cell_ids).astype(str)
        site = np.array([SITES[c] for c in ids])
        d = np.maximum(np.hypot(*(np.asarray(xy_m) - site).T), 10.0)
        ep = 0.5 + 3.0 * (np.asarray(xy_m)[:, 0] > 1000)
        return _Pred(-30.0 - 30.0 * np.log10(d), ep, np.full(len(ids), 2.0))


class FakeRadioWithCov(FakeRadio):
    """FakeRadio plus a posterior covariance: its epistemic std times exp(-d / 2 km), far longer
    reaching than the planner's a-priori 150 m squared exponential."""

    def __init__(self):
        self.calls: list[tuple[str, str, int]] = []

    def epistemic_cov(self, target, cell_id, xy_m):
        self.calls.append((target, str(cell_id), len(xy_m)))
        xy = np.asarray(xy_m)
        ep = self.predict(target, np.full(len(xy), str(cell_id)), xy).epistemic_std
        d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        return ep[:, None] * ep[None, :] * np.exp(-d / 2000.0)


def _density() -> DensityModels:
    rng = np.random.default_rng(0)
    users = np.concatenate([rng.normal([1200.0, 300.0], 150.0, (300, 2)), rng.uniform([0, 0], [1500, 1200], (100, 2))])
    area = GaussianKDE2D(bandwidth_m=100.0).fit(users)
    kdes = {c: GaussianKDE2D(bandwidth_m=100.0).fit(users[np.argmin([np.hypot(*(users - s).T) for s in SITES.values()], axis=0) == i])
            for i, c in enumerate(SITES)}
    return DensityModels.from_kdes({"h06_12": kdes}, area={"h06_12": area})


def _dummy_row(table: str) -> pd.DataFrame:
    values = {pa.string(): "x", pa.float64(): 1.0, pa.int32(): 0, pa.int64(): 0, pa.bool_(): False}
    return pd.DataFrame([{f.name: values.get(f.type) for f in spec(table).schema}])


def fake_plan_lake(lake, monkeypatch, radio=None) -> None:
    """Write cells (with the frame origin) and placeholder model rows; route the stage's model
    loaders to the stand-ins."""
    from cellsynth.plan import stage as plan_stage

    cells = pd.DataFrame({"cell_id": list(SITES), "site_id": list(SITES), "x_m": [s[0] for s in SITES.values()],
                          "y_m": [s[1] for s in SITES.values()], "lat": 0.0, "lon": 0.0, "location_estimated": False,
                          "cell_shard": 0, "frame_lat0": FRAME[0], "frame_lon0": FRAME[1]})
    lake.write("cells", cells)
    lake.write("kde_models", _dummy_row("kde_models"))
    lake.write("radio_models", _dummy_row("radio_models"))
    monkeypatch.setattr(plan_stage, "_load_density", lambda _lake: _density())
    monkeypatch.setattr(plan_stage, "_load_radio", lambda _lake: radio if radio is not None else FakeRadio())
