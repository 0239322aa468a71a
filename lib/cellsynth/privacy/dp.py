"""The epsilon-DP mode (`privacy.mode: dp`): user-level differential privacy for synthetic MDT.

The unit of privacy is a user (`ue_id`): every mechanism sees at most `privacy.max_reports_per_ue`
reports of a user (a uniform draw of their held-in reports), which bounds its sensitivity.

- Positions (`DPPositionDensity`): per window, counts on a grid of `privacy.grid_m` squares over
  the public site layout's bounding box, plus Laplace noise of scale L / eps (the whole histogram
  over all windows has L1 sensitivity L: pure eps-DP). Squares whose noisy count stays below 3
  noise scales are zeroed, the rest Gaussian-smoothed and normalised: post-processing, no extra
  cost. The synthetic table's size per window comes from a second Laplace count (10% of the
  positions' epsilon, each user capped at `COUNT_CAP_FACTOR` x L reports).
- Radio (`DPRadioModels`): per cell, RSRP = w_c . phi(x) with phi a physical mean (intercept,
  log-distance, the 3GPP sector pattern) and fixed RBF bumps around the site, trained by DP-SGD:
  users Poisson-sampled each step, the gradient of each sampled user's Gaussian NLL over all their
  rows (every cell they measured) clipped to `dp_clip_norm` in L2, Gaussian noise of std
  sigma * clip added to the sum. sigma comes from opacus's RDP accountant for the stage's
  (eps, delta). RSRQ is the same with the load as a feature. The epistemic std is the spread of
  predictions over the last quarter's iterates (post-processing of released iterates).
- Serving cell of a synthetic position: the strongest DP-predicted RSRP among the nearest sites
  (post-processing of the DP radio model; the per-cell KDEs are not DP).

Budget: eps is split over positions / RSRP / RSRQ by `privacy.epsilon_split` and delta halved
between the two Gaussian stages; the total is their basic-composition sum. Traffic synthesis has
no DP training and is excluded from the dp mode. Cell loads (PRB utilisation) are cell counters,
not a user's record, and are used as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellsynth.errors import ConfigError

COUNT_CAP_FACTOR = 10  # user cap of the per-window report count, in units of max_reports_per_ue
COUNT_EPSILON_SHARE = 0.1  # of the positions' epsilon, for the per-window counts
THRESHOLD_SCALES = 3.0  # zero noisy squares below this many Laplace scales (2.5% of empty squares pass)
BBOX_MARGIN_M = 500.0  # grid = site bounding box +- this (public: from the cells table)
RSRP_CENTRE_DBM, RSRP_SCALE_DB = -90.0, 10.0  # fixed a priori: targets standardised to O(1)
RSRQ_CENTRE_DB, RSRQ_SCALE_DB = -11.0, 3.0
RBF_GRID = 9  # RBF bumps per axis around each site (fixed layout, public)
RBF_HALF_WIDTH_M = 2000.0
RBF_LENGTH_M = 400.0
BEAMWIDTH_DEG, FRONT_TO_BACK_DB = 65.0, 25.0  # 3GPP TR 36.814 sector pattern
# Renyi orders for the RDP accountant: opacus's defaults stop at 63, too low for epsilon ~ 10.
# Integer orders above 11: fractional large orders make opacus's series crawl at large sigma.
RDP_ORDERS = ([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
              + [float(a) for a in np.unique(np.round(np.geomspace(64, 1024, 20)))])
PRIOR_WEIGHT = 1e-3  # ridge pull of the weights towards the physical prior (part of the loss)


# ------------------------------------------------------------------------------ checks
def check_dp_inputs(cfg: Any, reports: pd.DataFrame) -> pd.DataFrame:
    """Rows usable by the DP mode (with a ue_id), or a one-line ConfigError naming the key."""
    pc = cfg.privacy
    if "ue_id" not in reports or reports["ue_id"].isna().all():
        raise ConfigError("privacy.mode: dp needs a ue_id per report to bound each user's contribution; "
                          "mdt_reports has no ue_id values (map one in sources.mdt.columns or set privacy.mode=off)")
    rows = reports[reports["ue_id"].notna()]
    n_users = int(rows["ue_id"].nunique())
    if pc.delta >= 1.0 / n_users:
        raise ConfigError(f"privacy.delta: expected < 1/n_users = 1/{n_users} = {1.0 / n_users:.3g}, got {pc.delta:g}")
    return rows


def bound_per_user(frame: pd.DataFrame, max_rows: int, *, seed: int, key: str = "ue_id") -> pd.DataFrame:
    """At most `max_rows` rows per user, a uniform draw (contribution bounding)."""
    rng = np.random.default_rng(seed)
    order = frame.iloc[rng.permutation(len(frame))]
    return order[order.groupby(key, sort=False).cumcount() < max_rows].sort_index()


def stage_budget(cfg: Any) -> dict[str, tuple[float, float]]:
    """(epsilon, delta) per DP stage."""
    pc = cfg.privacy
    e_pos, e_rsrp, e_rsrq = (pc.epsilon * s for s in pc.epsilon_split)
    return {"positions": (e_pos, 0.0), "rsrp": (e_rsrp, pc.delta / 2.0), "rsrq": (e_rsrq, pc.delta / 2.0)}


def public_bbox(cells: pd.DataFrame) -> tuple[float, float, float, float]:
    x, y = cells["x_m"].to_numpy(float), cells["y_m"].to_numpy(float)
    m = BBOX_MARGIN_M
    return float(x.min() - m), float(x.max() + m), float(y.min() - m), float(y.max() + m)


# --------------------------------------------------------------------------- positions
class DPPositionDensity:
    """Per-window DP grid density of positions (see the module docstring)."""

    def __init__(self, *, grid_m: float = 200.0, smoothing_squares: float = 1.0):
        self.grid_m = grid_m
        self.smoothing_squares = smoothing_squares
        self._associate = None

    def fit(self, reports: pd.DataFrame, *, bbox: tuple[float, float, float, float], epsilon: float,
            max_reports_per_ue: int, seed: int) -> DPPositionDensity:
        from scipy.ndimage import gaussian_filter

        rng = np.random.default_rng(seed)
        x0, x1, y0, y1 = bbox
        nx = max(1, int(np.ceil((x1 - x0) / self.grid_m)))
        ny = max(1, int(np.ceil((y1 - y0) / self.grid_m)))
        self.bbox_ = (x0, x0 + nx * self.grid_m, y0, y0 + ny * self.grid_m)
        self.shape_ = (nx, ny)
        windows = sorted(reports["window"].unique().tolist())
        eps_hist = epsilon * (1.0 - COUNT_EPSILON_SHARE)
        eps_count = epsilon * COUNT_EPSILON_SHARE
        hist_rows = bound_per_user(reports, max_reports_per_ue, seed=seed)
        count_cap = COUNT_CAP_FACTOR * max_reports_per_ue
        count_rows = bound_per_user(reports, count_cap, seed=seed + 1)
        b_hist, b_count = max_reports_per_ue / eps_hist, count_cap / eps_count
        self.probs_, self.n_reports_ = {}, {}
        for w in windows:
            part = hist_rows[hist_rows["window"] == w]
            counts, _, _ = np.histogram2d(part["x_m"], part["y_m"], bins=(nx, ny),
                                          range=((self.bbox_[0], self.bbox_[1]), (self.bbox_[2], self.bbox_[3])))
            noisy = counts + rng.laplace(0.0, b_hist, counts.shape)
            # Post-processing only from here on.
            noisy[noisy < THRESHOLD_SCALES * b_hist] = 0.0
            smooth = gaussian_filter(noisy, self.smoothing_squares, mode="constant")
            total = smooth.sum()
            self.probs_[w] = smooth / total if total > 0 else np.full(counts.shape, 1.0 / counts.size)
            n_noisy = float((count_rows["window"] == w).sum()) + rng.laplace(0.0, b_count)
            self.n_reports_[w] = int(max(round(n_noisy), 0))
        self.epsilon_ = epsilon
        self.noise_scale_ = b_hist
        return self

    @property
    def windows(self) -> list[str]:
        return sorted(self.probs_)

    def n_reports(self, window: str) -> int:
        return self.n_reports_[window]

    def sample_positions(self, window: str, n_samples: int, *, rng: int | np.random.Generator | None = None) -> np.ndarray:
        gen = np.random.default_rng(rng)
        p = self.probs_[window].ravel()
        idx = gen.choice(p.size, size=n_samples, p=p)
        ix, iy = np.unravel_index(idx, self.shape_)
        x = self.bbox_[0] + (ix + gen.random(n_samples)) * self.grid_m
        y = self.bbox_[2] + (iy + gen.random(n_samples)) * self.grid_m
        return np.column_stack([x, y])

    def with_association(self, associate) -> DPPositionDensity:
        """Attach the serving-cell rule (the DP radio model's strongest cell)."""
        self._associate = associate
        return self

    def associate(self, window: str, xy_m: Any) -> np.ndarray:
        if self._associate is None:
            raise ConfigError("privacy.mode: the DP density needs the DP radio models to associate cells; run radio first")
        return self._associate(np.asarray(xy_m, dtype=float))

    def to_json(self) -> dict:
        return {"grid_m": self.grid_m, "smoothing_squares": self.smoothing_squares, "bbox": list(self.bbox_),
                "shape": list(self.shape_), "epsilon": self.epsilon_, "noise_scale": self.noise_scale_,
                "n_reports": self.n_reports_, "probs": {w: np.round(p, 8).tolist() for w, p in self.probs_.items()}}

    @classmethod
    def from_json(cls, d: dict) -> DPPositionDensity:
        out = cls(grid_m=d["grid_m"], smoothing_squares=d["smoothing_squares"])
        out.bbox_, out.shape_ = tuple(d["bbox"]), tuple(d["shape"])
        out.epsilon_, out.noise_scale_ = d["epsilon"], d["noise_scale"]
        out.n_reports_ = {w: int(v) for w, v in d["n_reports"].items()}
        out.probs_ = {w: np.asarray(p, dtype=float) for w, p in d["probs"].items()}
        for w, p in out.probs_.items():
            out.probs_[w] = p / p.sum()
        return out


# ------------------------------------------------------------------------------- radio
def _antenna_db(dx: np.ndarray, dy: np.ndarray, azimuth_deg: np.ndarray) -> np.ndarray:
    bearing = np.degrees(np.arctan2(dx, dy))  # clockwise from north, like azimuths
    theta = (bearing - azimuth_deg + 180.0) % 360.0 - 180.0
    return -np.minimum(12.0 * (theta / BEAMWIDTH_DEG) ** 2, FRONT_TO_BACK_DB)


def _rbf_offsets() -> np.ndarray:
    g = np.linspace(-RBF_HALF_WIDTH_M, RBF_HALF_WIDTH_M, RBF_GRID)
    gx, gy = np.meshgrid(g, g)
    return np.column_stack([gx.ravel(), gy.ravel()])


def features(site_xy: np.ndarray, azimuth_deg: np.ndarray, xy_m: np.ndarray, load_rho: np.ndarray | None) -> np.ndarray:
    """phi for rows whose cell sits at site_xy[i] (n, 2) with azimuth_deg[i]: intercept, log10(d/1 km),
    sector pattern / 10 dB, [load], RBF bumps on a fixed grid around the site."""
    d = xy_m - site_xy
    dist = np.maximum(np.hypot(d[:, 0], d[:, 1]), 10.0)
    cols = [np.ones(len(d)), np.log10(dist / 1000.0), _antenna_db(d[:, 0], d[:, 1], azimuth_deg) / 10.0]
    if load_rho is not None:
        cols.append(np.asarray(load_rho, dtype=float))
    off = _rbf_offsets()
    dd = ((d[:, None, :] - off[None]) ** 2).sum(axis=-1)
    rbf = np.exp(-0.5 * dd / RBF_LENGTH_M**2)
    return np.column_stack([*cols, rbf])


def prior_weights(n_features: int, target: str) -> np.ndarray:
    """Physical prior in standardised units: RSRP falls 35 dB a decade and follows the sector pattern."""
    w = np.zeros(n_features)
    if target == "rsrp":
        w[1], w[2] = -3.5, 1.0
    else:
        w[1], w[2], w[3] = -0.5, 0.2, -1.0
    return w


@dataclass
class DPTarget:
    """One target's DP-SGD result for every cell."""

    weights: np.ndarray  # (C, F) polyak average of the last quarter
    log_sigma: np.ndarray  # (C,) standardised aleatoric log std
    snapshots: np.ndarray  # (K, C, F) iterates of the last quarter (epistemic spread)
    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    sample_rate: float
    n_users: int


def dp_sgd(rows: pd.DataFrame, cell_index: dict[str, int], site_xy: np.ndarray, azimuth_deg: np.ndarray, *,
           target: str, epsilon: float, delta: float, steps: int, sample_rate: float, clip_norm: float,
           learning_rate: float, seed: int) -> DPTarget:
    """DP-SGD with per-user clipping over every cell at once (see the module docstring).

    rows: ue_id, cell_id, x_m, y_m, the target column (rsrp_dbm | rsrq_db) and load_rho for RSRQ,
    already bounded per user.
    """
    import torch
    from opacus.accountants.utils import get_noise_multiplier

    torch.set_num_threads(1)
    gen = np.random.default_rng(seed)
    col, centre, scale = ("rsrp_dbm", RSRP_CENTRE_DBM, RSRP_SCALE_DB) if target == "rsrp" else (
        "rsrq_db", RSRQ_CENTRE_DB, RSRQ_SCALE_DB)
    rows = rows[rows["cell_id"].isin(cell_index)]
    ci = rows["cell_id"].map(cell_index).to_numpy(dtype=np.int64)
    phi = features(site_xy[ci], azimuth_deg[ci], rows[["x_m", "y_m"]].to_numpy(float),
                   rows["load_rho"].to_numpy(float) if target == "rsrq" else None)
    y = (rows[col].to_numpy(float) - centre) / scale
    users, ui = np.unique(rows["ue_id"].to_numpy(dtype=object).astype(str), return_inverse=True)
    n_users, n_cells, n_feat = len(users), len(cell_index), phi.shape[1]
    sigma_noise = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                             steps=steps, accountant="rdp", epsilon_tolerance=0.01, alphas=RDP_ORDERS))
    prior = torch.tensor(prior_weights(n_feat, target), dtype=torch.float64)
    w = prior.repeat(n_cells, 1).clone()
    log_s = torch.full((n_cells,), np.log(0.6), dtype=torch.float64)
    phi_t, y_t = torch.tensor(phi), torch.tensor(y)
    ci_t, ui_t = torch.tensor(ci), torch.tensor(ui, dtype=torch.int64)
    # Rows sorted by user: a step's rows are the sampled users' slices.
    order = np.argsort(ui, kind="stable")
    starts = np.searchsorted(ui[order], np.arange(n_users + 1))
    m_w, v_w = torch.zeros_like(w), torch.zeros_like(w)
    m_s, v_s = torch.zeros_like(log_s), torch.zeros_like(log_s)
    b1, b2, eps_adam = 0.9, 0.999, 1e-8
    expected_batch = max(sample_rate * n_users, 1.0)
    keep_from = int(steps * 0.75)
    snaps, snaps_s = [], []
    for t in range(steps):
        sampled = np.flatnonzero(gen.random(n_users) < sample_rate)  # Poisson sampling of users
        g_w = torch.zeros_like(w)
        g_s = torch.zeros_like(log_s)
        if len(sampled):
            idx = np.concatenate([order[starts[u]:starts[u + 1]] for u in sampled])
            it = torch.tensor(idx)
            p, yy, c = phi_t[it], y_t[it], ci_t[it]
            sig = torch.exp(log_s[c])
            r = (yy - (w[c] * p).sum(dim=1)) / sig
            gw_row = -(r / sig)[:, None] * p  # d NLL / d w_c per row
            gs_row = 1.0 - r**2  # d NLL / d log sigma_c per row
            # Per-(user, cell) sums, then each user's L2 norm over all their cells.
            pair = ui_t[it] * n_cells + c
            uniq, inv = torch.unique(pair, return_inverse=True)
            gw_pair = torch.zeros((len(uniq), n_feat), dtype=torch.float64).index_add_(0, inv, gw_row)
            gs_pair = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, gs_row)
            pair_user = uniq // n_cells
            pair_cell = uniq % n_cells
            uu, uinv = torch.unique(pair_user, return_inverse=True)
            norm2 = torch.zeros(len(uu), dtype=torch.float64).index_add_(0, uinv, (gw_pair**2).sum(dim=1) + gs_pair**2)
            factor = torch.clamp(clip_norm / (torch.sqrt(norm2) + 1e-12), max=1.0)[uinv]
            g_w.index_add_(0, pair_cell, gw_pair * factor[:, None])
            g_s.index_add_(0, pair_cell, gs_pair * factor)
        g_w += torch.tensor(gen.normal(0.0, sigma_noise * clip_norm, g_w.shape))
        g_s += torch.tensor(gen.normal(0.0, sigma_noise * clip_norm, g_s.shape))
        g_w = g_w / expected_batch + PRIOR_WEIGHT * (w - prior)
        g_s = g_s / expected_batch
        # Adam on the privatised gradient (post-processing).
        m_w.mul_(b1).add_(g_w, alpha=1 - b1)
        v_w.mul_(b2).add_(g_w**2, alpha=1 - b2)
        m_s.mul_(b1).add_(g_s, alpha=1 - b1)
        v_s.mul_(b2).add_(g_s**2, alpha=1 - b2)
        lr = learning_rate * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        w -= lr * m_w / (torch.sqrt(v_w) + eps_adam)
        log_s -= lr * m_s / (torch.sqrt(v_s) + eps_adam)
        log_s.clamp_(np.log(0.05), np.log(3.0))
        if t >= keep_from:
            snaps.append(w.clone())
            snaps_s.append(log_s.clone())
    stack = torch.stack(snaps)
    return DPTarget(weights=stack.mean(dim=0).numpy(), log_sigma=torch.stack(snaps_s).mean(dim=0).numpy(),
                    snapshots=stack[:: max(1, len(snaps) // 16)].numpy(), epsilon=epsilon, delta=delta,
                    noise_multiplier=sigma_noise, steps=steps, sample_rate=sample_rate, n_users=n_users)


class _Prediction:
    def __init__(self, mean, epistemic_std, aleatoric_std):
        self.mean, self.epistemic_std, self.aleatoric_std = mean, epistemic_std, aleatoric_std
        self.pooled = np.zeros(len(mean), dtype=bool)

    @property
    def total_std(self) -> np.ndarray:
        return np.hypot(self.epistemic_std, self.aleatoric_std)


class DPRadioModels:
    """RSRP and RSRQ DP models of every cell of the (public) cells table; RadioModels' interface."""

    def __init__(self, cells: pd.DataFrame, targets: dict[str, DPTarget]):
        self.cell_ids = cells["cell_id"].astype(str).tolist()
        self.index = {c: i for i, c in enumerate(self.cell_ids)}
        self.site_xy = cells[["x_m", "y_m"]].to_numpy(float)
        self.azimuth_deg = self.azimuths(cells)
        self.targets = targets

    @staticmethod
    def azimuths(cells: pd.DataFrame) -> np.ndarray:
        az = cells["azimuth_deg"].to_numpy(float) if "azimuth_deg" in cells else np.full(len(cells), np.nan)
        return np.where(np.isfinite(az), az, 0.0)

    def cells(self, target: str) -> list[str]:
        return sorted(self.cell_ids) if target in self.targets else []

    def predict(self, target: str, cell_ids: np.ndarray, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
                seed: int = 0) -> _Prediction:
        tgt = self.targets[target]
        centre, scale = (RSRP_CENTRE_DBM, RSRP_SCALE_DB) if target == "rsrp" else (RSRQ_CENTRE_DB, RSRQ_SCALE_DB)
        ids = np.asarray(cell_ids).astype(str)
        ci = np.array([self.index.get(c, -1) for c in ids], dtype=np.int64)
        n = len(ids)
        mean, ep, al = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        ok = ci >= 0
        if ok.any():
            c = ci[ok]
            phi = features(self.site_xy[c], self.azimuth_deg[c], np.asarray(xy_m, float)[ok],
                           None if target == "rsrp" else np.asarray(load_rho, float)[ok])
            mean[ok] = centre + scale * np.einsum("nf,nf->n", phi, tgt.weights[c])
            draws = np.einsum("nf,knf->kn", phi, tgt.snapshots[:, c, :])
            ep[ok] = scale * draws.std(axis=0)
            al[ok] = scale * np.exp(tgt.log_sigma[c])
        return _Prediction(mean, ep, al)

    def strongest(self, xy_m: np.ndarray, *, n_candidates: int = 12) -> np.ndarray:
        """The cell of highest predicted RSRP among the nearest sites (the serving-cell rule)."""
        from scipy.spatial import cKDTree

        xy_m = np.asarray(xy_m, float)
        k = min(n_candidates, len(self.cell_ids))
        _, nn = cKDTree(self.site_xy).query(xy_m, k=k)
        nn = nn.reshape(len(xy_m), k)
        best = np.full(len(xy_m), -np.inf)
        out = np.empty(len(xy_m), dtype=object)
        ids = np.asarray(self.cell_ids, dtype=object)
        for j in range(k):
            m = self.predict("rsrp", ids[nn[:, j]], xy_m).mean
            better = m > best
            best[better], out[better] = m[better], ids[nn[better, j]]
        return out

    def to_json(self) -> dict:
        return {"targets": {name: {"weights": t.weights.tolist(), "log_sigma": t.log_sigma.tolist(),
                                   "snapshots": t.snapshots.tolist(), "epsilon": t.epsilon, "delta": t.delta,
                                   "noise_multiplier": t.noise_multiplier, "steps": t.steps,
                                   "sample_rate": t.sample_rate, "n_users": t.n_users}
                            for name, t in self.targets.items()}}

    @classmethod
    def from_json(cls, d: dict, cells: pd.DataFrame) -> DPRadioModels:
        targets = {name: DPTarget(np.asarray(t["weights"]), np.asarray(t["log_sigma"]), np.asarray(t["snapshots"]),
                                  t["epsilon"], t["delta"], t["noise_multiplier"], t["steps"], t["sample_rate"], t["n_users"])
                   for name, t in d["targets"].items()}
        return cls(cells, targets)


def dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))
