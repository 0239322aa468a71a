"""User-level DP radio model by noisy sufficient statistics (the dp mode's RSRP and RSRQ).

Per cell c the standardised target is  y = phi_c(x) . w_c + z_s(x) + noise  with phi the physical
features of `dp.features` without the RBF bumps (intercept, log-distance, sector pattern, [load])
and z_s a residual field shared by the cells of site s (the scenario's and 3GPP's shadowing is
mostly site-shared), piecewise constant on `grid_m` squares and smoothed after the noise.

Two Gaussian releases, each a sum over users of a per-user vector clipped to an L2 norm:
  A. per cell: the upper triangle of sum phi phi^T, sum phi y, sum y^2 and the row count
     (features and targets clipped to public bounds first);
  B. per (site, square): the sum of residuals y - phi . w_A (w_A from release A, clipped) and the
     row count.
Adding or removing one user changes each sum vector by at most its clip norm C in L2, so release X
with N(0, (z_X C_X)^2) per entry is a Gaussian mechanism of sensitivity C_X. Two Gaussian mechanisms
with multipliers z_A, z_B compose exactly to one with 1/z^2 = 1/z_A^2 + 1/z_B^2 (mu-GDP composition,
Dong, Roth & Su 2019, Cor. 3.3), and a Gaussian mechanism of multiplier z is (eps, delta)-DP for
    delta = Phi(-eps z + 1/(2z)) - e^eps Phi(-eps z - 1/(2z))
(the analytic Gaussian mechanism, Balle & Wang 2018, Thm. 8); `noise_multiplier` solves it for z.
A test checks the pair against opacus's PRV accountant. Every coordinate of the public key set
(every cell; every site x every square of the public grid) gets noise, so which keys hold data is
not revealed. Everything after the releases (ridge solve, smoothing, shrinkage, the epistemic
std) is post-processing.

Knobs and where they come from (none is fitted to the private rows): the clip bounds and the
ridge/shrinkage constants are functions of the public bounds and the noise scale (below); the
grid, smoothing and budget split were chosen a priori on a public simulated scenario (run.seed=7,
not the deployment's data; see the constants below). The unit of privacy is a user: rows come from at most
`privacy.max_reports_per_ue` reports per ue_id (bounded upstream), and the clip bounds whole users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtr


# Public bounds of the standardised features and targets (clipping makes them hold for any data).
LOGD_RANGE = (-2.0, 1.0)  # log10(d / 1 km): 10 m .. 10 km
ANT_RANGE = (-2.5, 0.0)  # sector pattern / 10 dB (front-to-back 25 dB)
Y_BOUND = 5.0  # |standardised target| (RSRP -140..-40 dBm, RSRQ -26..+4 dB)
RESID_BOUND = 2.5  # |residual| of release B (25 dB of RSRP)
# Per-user clip norms, a priori: a user of m reports measuring ~5 cells has ~5 m rows, each row
# with ||phi phi^T|| ~ 4 and |y| ~ 1; C_A = 4 sqrt(5 m) keeps such a user unclipped (their rows go
# to a few cells), C_B = sqrt(5 m) covers 5 m residual/count pairs of ~1 each.
ROWS_PER_REPORT = 5.0
# Chosen a priori on a PUBLIC simulated scenario (the default scenario at run.seed=7, not the data a
# deployment trains on; 3000 users, 20 reports each, 20% of reports held out there), by the mean
# RSRP MAE over per-target epsilon 0.5, 2 and 5 (the RSRP share of epsilon 1, 4, 10), from
# grid_m {100, 200, 400} x SHARE_A {0.3, 0.5, 0.7} x SHRINK_SIGMAS {1, 3} x reports per user {8, 20}
# (`privacy.max_reports_per_ue`, 20 won), then 800 m and Gram/count weights {1, 0.3, 0.1} (1 won) at
# the best of those: 400 m at epsilon >= 2 (MAE 5.38 at 5, 5.84 at 2), 800 m below (6.60 against
# 7.34 at 0.5); 100-200 m lose at every epsilon tried and 50 m at 5 (the residual sums of a small
# square are all noise); without DP a 50 m grid would reach 4.1 and the 400 m one 5.0. No private
# row is seen.
SHARE_A = 0.5  # budget of release A (physical mean) in 1/z^2; B gets the rest
GRID_BY_EPSILON = ((2.0, 400.0), (0.0, 800.0))  # (per-target epsilon at least, grid_m)
SMOOTH_SQUARES = 1.0  # Gaussian smoothing of the noisy sums and counts, in squares (post-processing)
# Ridge of release A and shrinkage of release B, in units of the noise std. 3 sigma sqrt(p) keeps the
# noisy Gram matrix positive definite w.h.p. (its noise spectral norm is ~2 sigma sqrt(p); AdaSSP,
# Wang 2018); 1 sigma of the smoothed count pulls squares with little data to zero residual.
RIDGE_SIGMAS = 3.0
SHRINK_SIGMAS = 1.0
MIN_ALEATORIC = 0.1  # standardised (1 dB of RSRP)
BEAMWIDTH_DEG, FRONT_TO_BACK_DB = 65.0, 25.0  # 3GPP TR 36.814 sector pattern


def _antenna_db(dx: np.ndarray, dy: np.ndarray, azimuth_deg: np.ndarray) -> np.ndarray:
    bearing = np.degrees(np.arctan2(dx, dy))  # clockwise from north, like azimuths
    theta = (bearing - azimuth_deg + 180.0) % 360.0 - 180.0
    return -np.minimum(12.0 * (theta / BEAMWIDTH_DEG) ** 2, FRONT_TO_BACK_DB)


def prior_weights(n_features: int, target: str) -> np.ndarray:
    """Physical prior in standardised units (public, a priori): RSRP falls 35 dB a decade and follows
    the sector pattern; RSRQ falls 5 dB a decade and 10 dB from empty to full load."""
    w = np.zeros(n_features)
    if target == "rsrp":
        w[1], w[2] = -3.5, 1.0
    else:
        w[1], w[2], w[3] = -0.5, 0.2, -1.0
    return w


def delta_of(epsilon: float, z: float) -> float:
    """delta of a Gaussian mechanism of noise multiplier z at epsilon (Balle & Wang 2018, Thm. 8)."""
    a = 1.0 / (2.0 * z)
    # e^eps Phi(-eps z - a) computed in logs: Phi of a large negative argument underflows first.
    from scipy.special import log_ndtr

    return float(ndtr(-epsilon * z + a) - math.exp(epsilon + log_ndtr(-epsilon * z - a)))


def noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest z with delta_of(epsilon, z) <= delta (bisection on log z; delta_of falls with z)."""
    lo, hi = 1e-3, 1e4
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if delta_of(epsilon, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def grid_for(epsilon: float) -> float:
    """Residual grid of a target's release at its epsilon (GRID_BY_EPSILON)."""
    return next(g for e, g in GRID_BY_EPSILON if epsilon >= e)


def physical_features(site_xy: np.ndarray, azimuth_deg: np.ndarray, xy_m: np.ndarray,
                      load_rho: np.ndarray | None) -> np.ndarray:
    """(n, p): intercept, log10(d / 1 km), sector pattern / 10 dB, [load], clipped to public bounds."""
    d = xy_m - site_xy
    dist = np.maximum(np.hypot(d[:, 0], d[:, 1]), 10.0)
    cols = [np.ones(len(d)), np.clip(np.log10(dist / 1000.0), *LOGD_RANGE),
            np.clip(_antenna_db(d[:, 0], d[:, 1], azimuth_deg) / 10.0, *ANT_RANGE)]
    if load_rho is not None:
        cols.append(np.clip(np.nan_to_num(np.asarray(load_rho, float), nan=0.5), 0.0, 1.0))
    return np.column_stack(cols)


def clipped_user_sum(users: np.ndarray, keys: np.ndarray, values: np.ndarray, n_keys: int,
                     clip: float) -> tuple[np.ndarray, np.ndarray]:
    """sum over users of each user's vector (values summed per key) scaled to L2 norm <= clip.

    users, keys: (n,) ints; values: (n, k) per row. Returns ((n_keys, k) sums, (n_users,) scale factors).
    """
    n_users = int(users.max()) + 1 if len(users) else 0
    pair = users.astype(np.int64) * n_keys + keys
    uniq, inv = np.unique(pair, return_inverse=True)
    per_pair = np.zeros((len(uniq), values.shape[1]))
    np.add.at(per_pair, inv, values)
    pair_user = uniq // n_keys
    norm2 = np.bincount(pair_user, weights=(per_pair**2).sum(axis=1), minlength=n_users)
    factor = np.minimum(1.0, clip / np.maximum(np.sqrt(norm2), 1e-12))
    out = np.zeros((n_keys, values.shape[1]))
    np.add.at(out, uniq % n_keys, per_pair * factor[pair_user, None])
    return out, factor


def gaussian_release(sums: np.ndarray, *, clip: float, z: float, gen: np.random.Generator) -> np.ndarray:
    """sums + N(0, (z clip)^2) on every entry: the Gaussian mechanism for a sum of per-user vectors
    of L2 norm <= clip (add/remove-one-user sensitivity clip)."""
    return sums + gen.normal(0.0, z * clip, sums.shape)


def split_multiplier(z: float, share_a: float) -> tuple[float, float]:
    """(z_A, z_B) with 1/z_A^2 + 1/z_B^2 = 1/z: release A gets share_a of the budget in 1/z^2."""
    return z / math.sqrt(share_a), z / math.sqrt(1.0 - share_a)


@dataclass
class DPStatsTarget:
    """One target's released statistics, post-processed into a model for every cell."""

    weights: np.ndarray  # (C, p) physical mean per cell (standardised)
    weight_cov: np.ndarray  # (C, p, p) epistemic covariance of the weights
    aleatoric: np.ndarray  # (C,) standardised noise std
    field: np.ndarray  # (S, nx, ny) smoothed residual field per site
    field_std: np.ndarray  # (S, nx, ny) its epistemic std
    grid: tuple[float, float, float]  # x0, y0, grid_m
    epsilon: float
    delta: float
    noise_multiplier: float  # of the composed release (1/z^2 = 1/z_A^2 + 1/z_B^2)
    clip_norms: tuple[float, float]
    noise_std: tuple[float, float]  # per entry of releases A and B: z_X * C_X
    n_users: int

    def to_json(self) -> dict:
        return {"weights": self.weights.tolist(), "weight_cov": self.weight_cov.tolist(),
                "aleatoric": self.aleatoric.tolist(), "field": np.round(self.field, 5).tolist(),
                "field_std": np.round(self.field_std, 5).tolist(), "grid": list(self.grid), "epsilon": self.epsilon,
                "delta": self.delta, "noise_multiplier": self.noise_multiplier, "clip_norms": list(self.clip_norms),
                "noise_std": list(self.noise_std),
                "n_users": self.n_users}

    @classmethod
    def from_json(cls, d: dict) -> DPStatsTarget:
        arr = {k: np.asarray(d[k], dtype=float) for k in ("weights", "weight_cov", "aleatoric", "field", "field_std")}
        return cls(**arr, grid=tuple(d["grid"]), epsilon=d["epsilon"], delta=d["delta"],
                   noise_multiplier=d["noise_multiplier"], clip_norms=tuple(d["clip_norms"]),
                   noise_std=tuple(d["noise_std"]), n_users=d["n_users"])


def _upper(p: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(p)


def fit_target(rows: pd.DataFrame, cell_index: dict[str, int], cell_site: np.ndarray, site_xy_of_cell: np.ndarray,
               azimuth_deg: np.ndarray, *, target: str, centre: float, scale: float, epsilon: float, delta: float,
               max_reports_per_ue: int, bbox: tuple[float, float, float, float], seed: int,
               grid_m: float | None = None, share_a: float = SHARE_A, smooth_squares: float = SMOOTH_SQUARES) -> DPStatsTarget:
    """Releases A and B for one target (see the module docstring). rows: ue_id, cell_id, x_m, y_m,
    the target column and load_rho for RSRQ, already bounded per user."""
    from scipy.ndimage import gaussian_filter

    gen = np.random.default_rng(seed)
    grid_m = grid_m or grid_for(epsilon)
    col = "rsrp_dbm" if target == "rsrp" else "rsrq_db"
    rows = rows[rows["cell_id"].astype(str).isin(cell_index)]
    ci = rows["cell_id"].astype(str).map(cell_index).to_numpy(np.int64)
    xy = rows[["x_m", "y_m"]].to_numpy(float)
    phi = physical_features(site_xy_of_cell[ci], azimuth_deg[ci], xy,
                            rows["load_rho"].to_numpy(float) if target == "rsrq" else None)
    y = np.clip((rows[col].to_numpy(float) - centre) / scale, -Y_BOUND, Y_BOUND)
    _, ui = np.unique(rows["ue_id"].astype(str).to_numpy(), return_inverse=True)
    n_users = int(ui.max()) + 1 if len(ui) else 0
    n_cells, p = len(cell_index), phi.shape[1]
    iu = _upper(p)

    z = noise_multiplier(epsilon, delta)
    z_a, z_b = split_multiplier(z, share_a)
    rows_per_user = ROWS_PER_REPORT * max_reports_per_ue
    phi_max2 = 1.0 + max(map(abs, LOGD_RANGE)) ** 2 + max(map(abs, ANT_RANGE)) ** 2 + (1.0 if p == 4 else 0.0)
    clip_a = 0.5 * phi_max2 * math.sqrt(rows_per_user)  # ||phi phi^T|| of a typical row is ~half the bound
    clip_b = math.sqrt(rows_per_user)

    # ---- release A: per cell [upper(phi phi^T), phi y, y^2, 1]
    vals_a = np.column_stack([(phi[:, :, None] * phi[:, None, :])[:, iu[0], iu[1]], phi * y[:, None], y**2,
                              np.ones(len(y))])
    sums_a, _ = clipped_user_sum(ui, ci, vals_a, n_cells, clip_a)
    sigma_a = z_a * clip_a
    noisy_a = gaussian_release(sums_a, clip=clip_a, z=z_a, gen=gen)
    # ---- post-processing A: ridge towards the physical prior, per cell
    w0 = prior_weights(p, target)[:p]
    ridge = RIDGE_SIGMAS * sigma_a * math.sqrt(p)
    n_tri = len(iu[0])
    weights = np.zeros((n_cells, p))
    weight_cov = np.zeros((n_cells, p, p))
    rss_n = np.zeros((n_cells, 2))
    sampling_cov = np.zeros((n_cells, p, p))
    for c in range(n_cells):
        g = np.zeros((p, p))
        g[iu] = noisy_a[c, :n_tri]
        g = g + np.triu(g, 1).T
        b = noisy_a[c, n_tri:n_tri + p]
        yy, n = noisy_a[c, n_tri + p], max(noisy_a[c, n_tri + p + 1], 0.0)
        # Project to PSD before the ridge (noise can make it indefinite): eigenvalues floored at 0.
        ev, vec = np.linalg.eigh(g)
        g = (vec * np.maximum(ev, 0.0)) @ vec.T
        a = g + ridge * np.eye(p)
        w = np.linalg.solve(a, b + ridge * w0)
        rss = yy - 2.0 * w @ b + w @ g @ w
        rss_n[c] = rss, n
        weights[c] = w
        a_inv = np.linalg.inv(a)
        # Sampling noise (s2 A^-1 G A^-1) + release noise on b and on G through w (sigma^2 (1 + |w|^2) A^-2).
        sampling_cov[c] = a_inv @ g @ a_inv
        weight_cov[c] = sigma_a**2 * (1.0 + w @ w) * a_inv @ a_inv
    # One residual variance for all cells, pooled: a cell's own noisy RSS is too noisy at small epsilon
    # (floored, since the noisy sums can make it negative; post-processing).
    pooled = max(rss_n[:, 0].sum() / max(rss_n[:, 1].sum(), 1.0), MIN_ALEATORIC**2)
    weight_cov += pooled * sampling_cov
    aleatoric = np.full(n_cells, pooled)  # variance until the field's share is taken off below

    # ---- release B: per (site, square) [sum residual, count]
    x0, x1, y0, y1 = bbox
    nx, ny = max(1, int(math.ceil((x1 - x0) / grid_m))), max(1, int(math.ceil((y1 - y0) / grid_m)))
    n_sites = int(cell_site.max()) + 1
    ix = np.clip(((xy[:, 0] - x0) // grid_m).astype(np.int64), 0, nx - 1)
    iy = np.clip(((xy[:, 1] - y0) // grid_m).astype(np.int64), 0, ny - 1)
    key_b = (cell_site[ci] * nx + ix) * ny + iy
    resid = np.clip(y - np.einsum("np,np->n", phi, weights[ci]), -RESID_BOUND, RESID_BOUND)
    sums_b, _ = clipped_user_sum(ui, key_b, np.column_stack([resid, np.ones(len(y))]), n_sites * nx * ny, clip_b)
    sigma_b = z_b * clip_b
    noisy_b = gaussian_release(sums_b, clip=clip_b, z=z_b, gen=gen)
    s_grid = noisy_b[:, 0].reshape(n_sites, nx, ny)
    n_grid = noisy_b[:, 1].reshape(n_sites, nx, ny)
    # ---- post-processing B: smooth, then shrink towards zero where the count is not above the noise
    sm = (0.0, smooth_squares, smooth_squares)
    s_s, n_s = gaussian_filter(s_grid, sm, mode="constant"), gaussian_filter(n_grid, sm, mode="constant")
    kern2 = _gauss_kernel_sq_sum(smooth_squares)  # noise variance of a smoothed square, per sigma^2
    noise_s = sigma_b * math.sqrt(kern2)  # of a smoothed sum and of a smoothed count alike
    denom = np.maximum(n_s, 0.0) + SHRINK_SIGMAS * noise_s
    field = s_s / denom
    mean_s2 = float(np.average(aleatoric, weights=None))
    field_std = np.sqrt((noise_s**2 * (1.0 + field**2) + mean_s2 * np.maximum(n_s, 0.0)) / denom**2)
    # The field explains part of release A's residual variance, the rest is the aleatoric noise; only
    # the part of field^2 above its own noise variance counts (at small epsilon the field is noise).
    signal2 = np.maximum(field**2 - field_std**2, 0.0)
    explained = np.array([float(np.average(signal2[cell_site[c]], weights=np.maximum(n_s[cell_site[c]], 0.0) + 1e-9))
                          for c in range(n_cells)])
    aleatoric = np.sqrt(np.maximum(aleatoric - explained, MIN_ALEATORIC**2))
    return DPStatsTarget(weights=weights, weight_cov=weight_cov, aleatoric=aleatoric, field=field, field_std=field_std,
                         grid=(x0, y0, grid_m), epsilon=epsilon, delta=delta, noise_multiplier=z,
                         clip_norms=(clip_a, clip_b), noise_std=(sigma_a, sigma_b), n_users=n_users)


def _gauss_kernel_sq_sum(sigma_squares: float) -> float:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros((41, 41))
    impulse[20, 20] = 1.0
    k = gaussian_filter(impulse, sigma_squares, mode="constant")
    return float((k**2).sum())


def predict_target(t: DPStatsTarget, ci: np.ndarray, cell_site: np.ndarray, site_xy_of_cell: np.ndarray,
                   azimuth_deg: np.ndarray, xy_m: np.ndarray, load_rho: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised (mean, epistemic std, aleatoric std) of rows at cells ci."""
    phi = physical_features(site_xy_of_cell[ci], azimuth_deg[ci], xy_m, load_rho)
    x0, y0, g = t.grid
    _, nx, ny = t.field.shape
    ix = np.clip(((xy_m[:, 0] - x0) // g).astype(np.int64), 0, nx - 1)
    iy = np.clip(((xy_m[:, 1] - y0) // g).astype(np.int64), 0, ny - 1)
    s = cell_site[ci]
    mean = np.einsum("np,np->n", phi, t.weights[ci]) + t.field[s, ix, iy]
    var_w = np.einsum("np,npq,nq->n", phi, t.weight_cov[ci], phi)
    ep = np.sqrt(np.maximum(var_w, 0.0) + t.field_std[s, ix, iy] ** 2)
    return mean, ep, t.aleatoric[ci]
