"""Far-field epistemic variance from an extrapolation CV inside the training rows.

Near the data the GP's posterior is what the calibration checks (leave-one-out and 200 m block
CV). Far from the data its variance returns to the stationary prior s^2 + 6^2 plus the
extrapolated mean's coefficient variance: a prior guess, never checked against how wrong an
extrapolation really is. Here it is measured: per cell the rows are cut in two half-planes by a
line through their median point at a random bearing, the whole fit (site, prior mean,
hyperparameters; `foldcv.fold_errors`) is redone on each half and the other half is predicted:
errors e at distances d from the nearest row the prediction had, from 0 to the cell's extent
(hundreds of metres to km). Per shard (per kind of model) one far-field term

    t(d) = F^2 (1 - k_3/2(d / L)),  d = distance to the nearest training row,

is added to the latent variance: 0 on the data, F^2 once d >> L. (F, L) and a nuisance factor c
on the model's own variance maximise the Gaussian likelihood of the half-plane errors,
e ~ N(0, c (latent + noise) + t(d)) (row-weighted), over the a-priori grids below; c absorbs the
model's general over- or under-confidence, which the interval factors fix afterwards. L is at
most 1 km so that F is the error level the extrapolations themselves reach, not a guess
beyond them: at 3 km the term is F^2, the variance measured at the longest distances the rows
span (saturation is an assumption: errors are not assumed to keep growing past them). The
interval factors are then calibrated on latent variance + t(d), so the term carries the same
factor at prediction. Bounded: F is at most FAR_STD_GRID_DB's end (20 dB) and the epistemic
std keeps its 25 dB ceiling (`gp.MAX_EPISTEMIC_DB`). FAR_MODE "halfplane" turns it on; "off" is
the model before it.
"""

from __future__ import annotations

import numpy as np

# "halfplane": the term above; "off": no far-field term (latent variance as the GP gives it).
FAR_MODE = "off"
# A-priori grids: lengths from 100 m (a few shadowing lengths) to 1 km (the extent of a
# typical cell's data: beyond it the half-plane errors cannot say anything); F from 0 to 20 dB
# by 0.5 dB; the nuisance factor c on the model's variance 0.25x to 8x.
FAR_LENGTH_GRID_M = (100.0, 200.0, 400.0, 700.0, 1000.0)
FAR_STD_GRID_DB = np.round(np.arange(0.0, 20.001, 0.5), 2)
FAR_C_GRID = np.geomspace(0.25, 8.0, 31)
# Fewer half-plane errors than this (pooled over a shard) leave the term at 0.
MIN_ROWS = 100
# Rows the grid search uses (a uniform subsample beyond; cost, not accuracy).
MAX_ROWS = 20_000


def halfplane_groups(xy_m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0 / 1 per row: the side of a line through the rows' median point at a random bearing."""
    xy = np.asarray(xy_m, dtype=float)
    a = rng.uniform(0.0, np.pi)
    proj = (xy - np.median(xy, axis=0)) @ np.array([np.cos(a), np.sin(a)])
    return (proj > np.median(proj)).astype(np.int64)


def term(dist_m: np.ndarray, far_var: float, far_len_m: float) -> np.ndarray:
    """t(d) = F^2 (1 - k_3/2(d / L)) (dB^2); 0 when F = 0."""
    if far_var <= 0.0:
        return np.zeros(np.shape(dist_m))
    s = np.sqrt(3.0) * np.asarray(dist_m, dtype=float) / far_len_m
    return far_var * (1.0 - (1.0 + s) * np.exp(-s))


def fit(err: np.ndarray, latent: np.ndarray, noise: np.ndarray, dist_m: np.ndarray, weight: np.ndarray | None = None, *,
        seed: int = 0) -> tuple[float, float, dict]:
    """(F^2, L, details) maximising sum_i w_i log N(e_i; 0, c (latent_i + noise_i) + t(d_i)) over the
    grids (module docstring); (0, FAR_LENGTH_GRID_M[-1], ...) with fewer than MIN_ROWS rows."""
    e, lat, nv, d = (np.asarray(a, dtype=float) for a in (err, latent, noise, dist_m))
    w = np.ones(len(e)) if weight is None else np.asarray(weight, dtype=float)
    ok = np.isfinite(e) & np.isfinite(lat) & np.isfinite(nv) & np.isfinite(d)
    e, lat, nv, d, w = e[ok], lat[ok], nv[ok], d[ok], w[ok]
    if len(e) < MIN_ROWS:
        return 0.0, float(FAR_LENGTH_GRID_M[-1]), {"n_rows": int(len(e))}
    if len(e) > MAX_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(len(e), MAX_ROWS, replace=False))
        e, lat, nv, d, w = e[keep], lat[keep], nv[keep], d[keep], w[keep]
    w = w / w.sum()
    base = lat + nv
    e2 = e**2
    best = (np.inf, 0.0, FAR_LENGTH_GRID_M[-1], 1.0)
    for length in FAR_LENGTH_GRID_M:
        far = (FAR_STD_GRID_DB**2)[:, None] * term(d, 1.0, length)[None, :]  # (n_f, n)
        for c in FAR_C_GRID:
            var = c * base[None, :] + far
            nll = 0.5 * np.sum(w * (np.log(var) + e2 / var), axis=-1)
            j = int(np.argmin(nll))
            if nll[j] < best[0]:
                best = (float(nll[j]), float(FAR_STD_GRID_DB[j]) ** 2, float(length), float(c))
    return best[1], best[2], {"n_rows": int(len(e)), "nuisance_factor": best[3], "max_dist_m": float(d.max())}
