"""A closed-form world for evaluation tests: 3 cells, RSRP = tx - 30 log10(d) + N(0, 2^2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SITES = {"A": (0.0, 0.0), "B": (1000.0, 0.0), "C": (500.0, 900.0)}
NOISE_DB = 2.0


def field_dbm(cell_id, xy):
    sx, sy = SITES[cell_id]
    d = np.maximum(np.hypot(xy[:, 0] - sx, xy[:, 1] - sy), 10.0)
    return -30.0 - 30.0 * np.log10(d)


@dataclass
class Pred:
    mean: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray


class TrueRadio:
    """Predicts the noiseless field exactly, with aleatoric std = the true noise."""

    def cells(self, target):
        return sorted(SITES)

    def predict(self, target, cell_ids, xy_m, *, load_rho=None):
        xy = np.asarray(xy_m, float).reshape(-1, 2)
        ids = np.asarray(cell_ids, dtype=object)
        if target == "rsrq":
            mean = -8.0 - 6.0 * np.asarray(load_rho, float)
        else:
            mean = np.empty(len(ids))
            for c in SITES:
                m = ids == c
                mean[m] = field_dbm(c, xy[m])
        return Pred(mean, np.full(len(ids), 0.1), np.full(len(ids), NOISE_DB))


class MeanModel:
    """A refit stand-in: predicts the training mean with the training std."""

    def __init__(self, target="rsrp", ipw=True):
        self.target = target

    def fit(self, xy_m, y, *, load_rho=None):
        self.mu_, self.sd_ = float(np.mean(y)), float(np.std(y) + 0.1)
        return self

    def predict(self, xy_m, *, load_rho=None):
        n = len(xy_m)
        return Pred(np.full(n, self.mu_), np.full(n, 0.05), np.full(n, self.sd_))


class NearestDensity:
    windows = ["w"]

    def associate(self, window, xy_m):
        xy = np.asarray(xy_m)
        ids = np.array(sorted(SITES), dtype=object)
        d = np.stack([np.hypot(xy[:, 0] - SITES[c][0], xy[:, 1] - SITES[c][1]) for c in ids], axis=1)
        return ids[d.argmin(axis=1)]


def world(n_reports=1500, seed=0):
    """(reports, measurements, cells): every report measures all 3 cells; serving = strongest."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-200, 1200, size=(n_reports, 2))
    ids = np.array(sorted(SITES), dtype=object)
    rsrp = np.stack([field_dbm(c, xy) for c in ids], axis=1) + rng.normal(0, NOISE_DB, size=(n_reports, 3))
    load = rng.uniform(0, 1, n_reports)
    report_id = np.array([f"r{i:05d}" for i in range(n_reports)], dtype=object)
    serving = ids[rsrp.argmax(axis=1)]
    reports = pd.DataFrame({
        "report_id": report_id, "window": "w", "x_m": xy[:, 0], "y_m": xy[:, 1], "serving_cell_id": serving,
        "rsrp_dbm": rsrp.max(axis=1), "rsrq_db": -8.0 - 6.0 * load + rng.normal(0, 0.5, n_reports), "load_rho": load,
    })
    meas = pd.DataFrame({
        "report_id": np.repeat(report_id, 3), "cell_id": np.tile(ids, n_reports), "rsrp_dbm": rsrp.ravel(),
        "x_m": np.repeat(xy[:, 0], 3), "y_m": np.repeat(xy[:, 1], 3),
    })
    is_serving = meas["cell_id"].to_numpy() == np.repeat(serving, 3)
    meas["role"] = np.where(is_serving, "serving", "neighbour")
    meas["rsrq_db"] = np.where(is_serving, np.repeat(reports["rsrq_db"].to_numpy(), 3), np.nan)
    meas["load_rho"] = np.repeat(load, 3)
    cells = pd.DataFrame({"cell_id": ids, "x_m": [SITES[c][0] for c in ids], "y_m": [SITES[c][1] for c in ids]})
    return reports, meas, cells


def synthetic_from(reports, meas, seed=1):
    """Fresh draws from the same world, in synthetic_mdt's shape (serving + 2 neighbours)."""
    r, m, _ = world(len(reports), seed=seed)
    wide = m.pivot(index="report_id", columns="cell_id", values="rsrp_dbm").loc[r["report_id"]]
    out = r.rename(columns={"report_id": "sample_id"}).copy()
    out["sample_id"] = "s" + out["sample_id"]
    for k in (1, 2):
        nb = [sorted((c for c in SITES if c != s), key=lambda c: -wide.iloc[i][c])[k - 1] for i, s in enumerate(r["serving_cell_id"])]
        out[f"neighbour_{k}_cell_id"] = nb
        out[f"neighbour_{k}_rsrp_dbm"] = [wide.iloc[i][c] for i, c in enumerate(nb)]
    return out
