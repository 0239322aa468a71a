"""How a plan's proof takes in the measurements it asked for: condition the measured cells' GPs.

A drive (or N points) adds rows to some cells. Here each such cell's GP is conditioned on its
old + new rows with everything the fit estimated kept: hyperparameters, prior mean, kNN k and
blend, calibration factors. That is the exact GP update, the update the planner's expectation
(`VariancePlanner`) describes, and the reading under which "the epistemic std the plan reduced"
is information the measurements brought: with the hyperparameters kept the posterior variance
can only fall, and only near the added rows; a cell without new rows is untouched.

A refit (the planning bench's retrain of the measured cells) re-estimates the hyperparameters and
the fit's shared calibration factor as well; the std it gives afterwards mixes the drive's information
with the model's revision of its own prior. The planning bench reports both readings. (Since session
29 the radio stage's incremental retrain keeps the shard's calibration, `radio.stage.KEEP_SHARD_CALIBRATION`,
and re-estimates the hyperparameters only.)
"""

from __future__ import annotations

import numpy as np

from cellsynth.radio.model import FittedCells

TRAIN_KEYS = ("train_xy_m", "train_y", "train_rho", "train_w", "mask")


def condition_on_rows(fitted: FittedCells, index: int, xy_m: np.ndarray, y: np.ndarray) -> FittedCells:
    """Cell `index` of `fitted` (as a one-cell FittedCells) with rows (xy_m, y) added to its
    training rows and nothing refitted.

    The new rows carry the fit's neutral row values (load 0.5, likelihood weight 1), as a drive
    test's RSRP rows do; `n_train` grows by their number.
    """
    xy_m = np.asarray(xy_m, dtype=float).reshape(-1, 2)
    y = np.asarray(y, dtype=float).reshape(-1)
    if len(xy_m) != len(y):
        raise ValueError(f"condition_on_rows: {len(xy_m)} positions for {len(y)} values")
    if not np.all(np.isfinite(xy_m)) or not np.all(np.isfinite(y)):
        raise ValueError("condition_on_rows: positions and values must be finite")
    one = fitted.take([index])
    a = {k: np.array(v) for k, v in one.arrays.items()}
    n_old = int(a["mask"][0].sum())
    if not np.all(a["mask"][0, :n_old]):
        raise ValueError("condition_on_rows: training rows are not a padded prefix")
    n = len(y)
    extra = {"train_xy_m": xy_m[None], "train_y": y[None], "train_rho": np.full((1, n), 0.5),
             "train_w": np.ones((1, n)), "mask": np.ones((1, n), bool)}
    for k, v in extra.items():
        a[k] = np.concatenate([a[k][:, :n_old], v.astype(a[k].dtype)], axis=1)
    return FittedCells(one.cell_ids, one.target, one.settings, a, one.elbo, one.n_train + n)
