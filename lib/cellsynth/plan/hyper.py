"""Hyperparameter-aware planning: a cell's covariance as an ensemble over plausible GP hyperparameters.

The radio model fits each cell's GP hyperparameters (length l, signal s, noise n) by MAP, and the
planner's expectation (how far a report's information reaches, how much it lowers the variance)
depends on them: a drive into new places can show that the field is rougher than the sparse data
suggested, and the retrain then shortens l. Planning on the MAP alone trusts one value of l.
Here the planner averages its objective over the hyperparameters' approximate posterior instead:
the radio fit's own search grid (`gp.grid_table`: for each of 8 lengths x 6 noise-to-signal
ratios the exact MAP objective, s profiled) gives a posterior mass per grid length (the
objective's exp(-value) summed over the ratios; the grid is uniform in log l and log ratio, so
those are masses of the log-scale posterior); the lengths holding most of the mass become the
members, each at its best ratio and profiled s, the MAP's own grid length replaced by the
refined MAP itself. Each member's covariance is the cell's calibrated posterior covariance
(`FittedCells.epistemic_cov`, same rows, same calibration factor) at that member's
hyperparameters; `VariancePlanner` takes the list and scores the weighted average of the members'
objectives (expected reduction under hyperparameter uncertainty).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from cellsynth.radio import gp
from cellsynth.radio.model import FittedCells

# A priori: the members cover this posterior mass of the length grid, at most this many (each
# member costs one covariance and one planner state per cell).
ENSEMBLE_MASS = 0.9
MAX_MEMBERS = 3


def hyper_members(fitted: FittedCells, i: int, *, mass: float = ENSEMBLE_MASS,
                  max_members: int = MAX_MEMBERS) -> list[tuple[float, np.ndarray]]:
    """[(weight, theta (3,)), ...] for cell i of `fitted`: the approximate hyperparameter posterior
    (see the module docstring); weights sum to 1, the heaviest first."""
    s = fitted.settings
    b = fitted.training_batch(i)[0]  # the cell's training rows and residuals (no factorisation)
    with torch.no_grad():
        table, log_s = gp.grid_table(b, nu=gp.MATERN_NU[s.kernel], floor_db=s.floor_db)
    t, ls = table[0].numpy(), log_s[0].numpy()
    map_theta = np.asarray(fitted.arrays["theta"][i], dtype=float)
    if not np.isfinite(t).any():
        return [(1.0, map_theta)]
    lp = np.where(np.isfinite(t), -(t - np.nanmin(np.where(np.isfinite(t), t, np.nan))), -np.inf)
    per_length = np.exp(lp).sum(axis=1)
    per_length /= per_length.sum()
    log_l = np.log(np.asarray(gp.LENGTH_GRID_M))
    log_lam = np.log(np.asarray(gp.NOISE_RATIO_GRID))
    map_li = int(np.argmin(np.abs(log_l - map_theta[0])))
    out: list[tuple[float, np.ndarray]] = []
    total = 0.0
    for li in np.argsort(-per_length, kind="stable"):
        if len(out) == max_members or total >= mass or per_length[li] <= 0:
            break
        if li == map_li:
            theta = map_theta
        else:
            j = int(np.argmax(lp[li]))
            theta = np.array([log_l[li], ls[li, j], ls[li, j] + 0.5 * log_lam[j]])
        out.append((float(per_length[li]), theta))
        total += float(per_length[li])
    if not any(np.array_equal(th, map_theta) for _, th in out):
        out.append((float(per_length[map_li]), map_theta))  # the MAP is always a member
    w = np.array([m for m, _ in out])
    return [(float(wk / w.sum()), th) for wk, (_, th) in zip(w, out)]


def with_theta(fitted: FittedCells, i: int, theta: np.ndarray) -> FittedCells:
    """Cell i of `fitted` alone (index 0) with hyperparameters `theta`, everything else kept."""
    one = fitted.take([int(i)])
    arrays = dict(one.arrays)
    arrays["theta"] = np.asarray(theta, dtype=float).reshape(1, -1)
    return replace(one, arrays=arrays, _index={}, _solved={})


def member_models(fitted: FittedCells, i: int, *, mass: float = ENSEMBLE_MASS,
                  max_members: int = MAX_MEMBERS) -> list[tuple[float, FittedCells, int]]:
    """[(weight, model, index), ...]: `hyper_members` as models whose `epistemic_cov(index, xy)`
    is that member's covariance (the MAP member is `fitted` itself)."""
    map_theta = np.asarray(fitted.arrays["theta"][i], dtype=float)
    return [(w, fitted, int(i)) if np.array_equal(th, map_theta) else (w, with_theta(fitted, i, th), 0)
            for w, th in hyper_members(fitted, i, mass=mass, max_members=max_members)]


def ensemble_cov(fitted: FittedCells, i: int, xy_m: np.ndarray, *, mass: float = ENSEMBLE_MASS,
                 max_members: int = MAX_MEMBERS) -> list[tuple[float, np.ndarray]]:
    """[(weight, calibrated posterior covariance at xy_m), ...] over `hyper_members`."""
    return [(w, model.epistemic_cov(j, xy_m)) for w, model, j in member_models(fitted, i, mass=mass, max_members=max_members)]


def models_ensemble_covariance(radio, target: str = "rsrp"):
    """A `CovarianceFn` over `radio` (RadioModels): each cell's `ensemble_cov` through
    `radio.cell_model`; a model collection without it gives its plain `epistemic_cov` (or None)."""
    find = getattr(radio, "cell_model", None)
    own_cov = getattr(radio, "epistemic_cov", None)
    cache: dict[str, list[tuple[float, FittedCells, int]]] = {}

    def covariance(cell_id: str, xy_m: np.ndarray):
        if find is None:
            return None if own_cov is None else own_cov(target, cell_id, xy_m)
        found = find(target, cell_id)
        if found is None:
            return None
        fitted, i, offset = found
        key = str(cell_id)
        if key not in cache:  # one grid search and one solve per member and cell, reused by every route start
            cache[key] = member_models(fitted, i)
        xy = np.asarray(xy_m, dtype=float) - offset
        return [(w, model.epistemic_cov(j, xy)) for w, model, j in cache[key]]

    return covariance
