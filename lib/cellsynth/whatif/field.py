"""Radio fields of cells that were never measured as they are now: the a-priori physical mean
plus what the measured residuals nearby say, with an epistemic std that is large where
nothing was measured.

For a cell c of the changed network at x:
    mean_c(x) = prior_c(x) + b + m_c(x)
where prior_c is `cellsynth.propagation.prior_rsrp_dbm` with c's new parameters, b the median
residual (measured - prior) over every measured cell, and m_c a kernel-weighted average of the
residuals e = y - prior - b of c's *sources*, shrunk towards 0:
    m_c(x) = sum_j w_j e_j / (sum_j w_j + n0),  w_j = s_j exp(-|x - x_j|^2 / 2h^2)
Sources: c's own measurements when c existed at the same site (re-pointed or re-powered: the
clutter around the UE stays), weight s = 1; measurements of the other cells of c's site
(the site-shared shadowing), weight s = rho. New cells on new sites have no sources: b only.
    var_c(x) = k^2 * tau^2 * n0 / (sum_j w_j + n0)
Everything is estimated on the measurements (`fit`): b; tau^2 the residual variance less the
nugget (measurement noise, from repeated measurements of a cell at one report position...
estimated from same-report pairs of sibling cells); rho the correlation of sibling cells'
residuals in the same report; n0 = nugget / tau^2; h by random 5-fold CV of own-source
prediction; k, the std scale, so that 90% intervals cover 90% of the CV errors (with the nugget
removed, since the std is for the noise-free field).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cellsynth.errors import NotFittedError
from cellsynth.propagation import prior_rsrp_dbm

Z90 = 1.6448536269514722  # two-sided 90% normal interval half-width in std units


def cell_prior_dbm(cells: pd.DataFrame, cell_ids: np.ndarray, xy_m: np.ndarray, *, free_space: bool = False) -> np.ndarray:
    """A-priori RSRP (dBm) of row i's cell `cell_ids[i]` at `xy_m[i]` (per-row, grouped by cell)."""
    table = cells.set_index("cell_id")
    out = np.empty(len(cell_ids))
    codes, inv = np.unique(np.asarray(cell_ids).astype(str), return_inverse=True)
    for k, cell in enumerate(codes):
        rows = np.flatnonzero(inv == k)
        r = table.loc[cell]

        def get(name: str) -> float:
            return float(r[name]) if name in r.index and pd.notna(r[name]) else np.nan

        out[rows] = prior_rsrp_dbm(
            xy_m[rows], np.array([[r["x_m"], r["y_m"]]]), azimuth_deg=[get("azimuth_deg")], height_m=[get("height_m")],
            tx_power_dbm=[get("tx_power_dbm")], freq_mhz=[get("freq_mhz")], downtilt_deg=[get("downtilt_deg")],
            free_space=free_space,
        )[:, 0]
    return out


@dataclass
class FieldPrediction:
    mean_dbm: np.ndarray
    epistemic_std_db: np.ndarray


class ResidualKriger:
    """Fit on measurements of the existing network; predict any cell of a changed network.

    Args:
        bandwidth_grid_m: kernel bandwidths h tried by 5-fold CV.
        max_per_cell: measurements kept per cell (uniform subsample; bounds memory and time).
    """

    def __init__(self, *, bandwidth_grid_m: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0),
                 max_per_cell: int = 3000, random_state: int = 0) -> None:
        self.bandwidth_grid_m = bandwidth_grid_m
        self.max_per_cell = max_per_cell
        self.random_state = random_state

    # ------------------------------------------------------------------ fit
    def fit(self, measurements: pd.DataFrame, cells: pd.DataFrame) -> ResidualKriger:
        """measurements: report_id, cell_id, role (serving | neighbour), x_m, y_m, rsrp_dbm;
        cells: the measured network's `cells` table (cell_id, site_id, x_m, y_m, antenna parameters)."""
        rng = np.random.default_rng(self.random_state)
        m = measurements[measurements["cell_id"].isin(set(cells["cell_id"]))]
        keep = np.concatenate([rng.permutation(idx)[: self.max_per_cell] for idx in m.groupby("cell_id").indices.values()]) if len(m) else np.empty(0, int)
        m = m.iloc[np.sort(keep)].reset_index(drop=True)
        xy = m[["x_m", "y_m"]].to_numpy(float)
        resid = m["rsrp_dbm"].to_numpy(float) - cell_prior_dbm(cells, m["cell_id"].to_numpy(), xy)
        self.cells_ = cells.copy()
        self.site_of_ = dict(zip(cells["cell_id"].astype(str), cells["site_id"].astype(str)))
        self.site_xy_ = {c: (float(x), float(y)) for c, x, y in zip(cells["cell_id"], cells["x_m"], cells["y_m"])}
        # Bias from the serving measurements against the best a-priori cell: a cell is measured
        # mostly where it is strong, so its own residuals overstate it; the serving RSRP is
        # reported wherever a UE is, which is the quantity the what-if predicts.
        serving = measurements[measurements["role"] == "serving"] if "role" in measurements else m.iloc[:0]
        serving = serving.iloc[rng.permutation(len(serving))[:20_000]]
        if len(serving):
            self.bias_db_ = float(np.median(serving["rsrp_dbm"].to_numpy(float) - self._best_prior(serving[["x_m", "y_m"]].to_numpy(float))))
        else:
            self.bias_db_ = float(np.median(resid)) if len(resid) else 0.0
        e = resid - self.bias_db_
        self.by_cell_ = {c: (xy[idx], e[idx]) for c, idx in m.groupby("cell_id").indices.items()}
        rid = m["report_id"].to_numpy() if "report_id" in m else np.arange(len(m))
        self._rid_ = {c: rid[idx] for c, idx in m.groupby("cell_id").indices.items()}
        total_var = float(np.var(resid)) if len(resid) else 1.0
        self.nugget_var_, self.rho_ = self._nugget_and_rho(m, e)
        self.tau2_ = max(total_var - self.nugget_var_, 0.25)
        self.n0_ = max(self.nugget_var_ / self.tau2_, 0.05)
        self.bandwidth_m_, _ = self._cv_bandwidth(rng)
        # Std scale: 90% intervals of the serving RSRP cover 90% of the 5-fold CV errors
        # (nugget removed: the std is for the noise-free field).
        self.std_scale_, self.new_site_std_scale_ = 1.0, 1.0
        self.std_scale_ = self._scale(self._serving_cv_z(serving, rng))
        # Cells without sources (new sites): the same calibration with the serving site's own
        # measurements left out, i.e. each test report's site predicted as if it were new.
        self.new_site_std_scale_ = self._scale(self._serving_cv_z(serving, rng, leave_site_out=True))
        self.n_measurements_ = len(m)
        return self

    def _best_prior(self, xy: np.ndarray) -> np.ndarray:
        ids = self.cells_["cell_id"].to_numpy()
        best = np.full(len(xy), -np.inf)
        for c in ids:
            best = np.maximum(best, cell_prior_dbm(self.cells_, np.full(len(xy), c), xy))
        return best

    def _serving_cv_z(self, serving: pd.DataFrame, rng: np.random.Generator, *, leave_site_out: bool = False) -> np.ndarray:
        if not len(serving) or "report_id" not in serving:
            return np.empty(0)
        test = serving.iloc[: min(len(serving), 4000)]
        fold_test = rng.integers(0, 5, len(test))
        zs = []
        full = self.by_cell_
        try:
            for k in range(5):
                t = test[fold_test == k]
                if not len(t):
                    continue
                held = np.asarray(t["report_id"])
                # Refit-free CV: drop the held reports' rows from every cell's sources.
                base = {}
                for c, (xy, e) in full.items():
                    mask = np.isin(self._rid_[c], held)
                    base[c] = (xy[~mask], e[~mask])
                groups = t.groupby(t["cell_id"].map(self.site_of_)) if leave_site_out else [(None, t)]
                for site, g in groups:
                    self.by_cell_ = base if site is None else {
                        c: v for c, v in base.items() if self.site_of_.get(c) != site}
                    mean, std = self.serving_field(self.cells_, g[["x_m", "y_m"]].to_numpy(float))
                    err = g["rsrp_dbm"].to_numpy(float) - mean
                    zs.append(np.column_stack([err, np.maximum(std, 1e-6)]))
        finally:
            self.by_cell_ = full
        return np.concatenate(zs) if zs else np.empty((0, 2))

    def _scale(self, err_std: np.ndarray) -> float:
        # The scale s whose noisy-observation 90% interval, 1.645 sqrt(s^2 std^2 + nugget), covers
        # 90% of the CV errors; s * std is then the 90%-calibrated std of the noise-free field.
        if not len(err_std):
            return 1.0
        err, std = np.abs(err_std[:, 0]), err_std[:, 1]

        def coverage(scale: float) -> float:
            return float(np.mean(err <= Z90 * np.sqrt(scale**2 * std**2 + self.nugget_var_)))

        lo, hi = 0.01, 20.0
        if coverage(lo) >= 0.9:
            return lo
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if coverage(mid) >= 0.9 else (mid, hi)
        return hi

    def serving_field(self, cells: pd.DataFrame, xy_m: np.ndarray, *, radius_m: float = 4000.0) -> tuple[np.ndarray, np.ndarray]:
        """Serving (best-cell) RSRP mean and epistemic std of a network at positions."""
        best = np.full(len(xy_m), -np.inf)
        std = np.zeros(len(xy_m))
        centre = xy_m.mean(axis=0)
        for c, x, y in zip(cells["cell_id"], cells["x_m"], cells["y_m"]):
            if np.hypot(x - centre[0], y - centre[1]) > radius_m + np.ptp(xy_m, axis=0).max():
                continue
            p = self.predict(c, cells, xy_m)
            better = p.mean_dbm > best
            best[better], std[better] = p.mean_dbm[better], p.epistemic_std_db[better]
        return best, std

    def _nugget_and_rho(self, m: pd.DataFrame, e: np.ndarray) -> tuple[float, float]:
        # Same-report pairs of sibling cells: their shadowing is site-shared, the rest independent.
        if "report_id" not in m or not len(m):
            return 4.0, 0.5  # a priori: 2 dB measurement noise, half the shadowing site-shared
        frame = pd.DataFrame({"report_id": m["report_id"].to_numpy(), "site": m["cell_id"].map(self.site_of_).to_numpy(),
                              "cell": m["cell_id"].to_numpy(), "e": e})
        first = frame.drop_duplicates(["report_id", "site"], keep="first")
        second = frame[~frame.index.isin(first.index)].drop_duplicates(["report_id", "site"], keep="first")
        pairs = first.merge(second, on=["report_id", "site"], suffixes=("_a", "_b"))
        pairs = pairs[pairs["cell_a"] != pairs["cell_b"]]
        # Nugget: half the variance of a cell's residual difference at (almost) the same spot.
        nug = self._local_nugget()
        if len(pairs) < 30:
            return nug, 0.5
        rho = float(np.corrcoef(pairs["e_a"], pairs["e_b"])[0, 1])
        return nug, float(np.clip(rho, 0.0, 1.0))

    def _local_nugget(self) -> float:
        diffs = []
        for xy, e in self.by_cell_.values():
            if len(xy) < 10:
                continue
            d, j = cKDTree(xy).query(xy, k=2)
            close = d[:, 1] < 10.0  # within 10 m: the field has barely changed
            diffs.append((e[close] - e[j[close, 1]]) ** 2 / 2.0)
        cat = np.concatenate(diffs) if diffs else np.empty(0)
        return float(np.mean(cat)) if len(cat) >= 30 else 4.0

    def _smooth(self, src_xy: np.ndarray, src_e: np.ndarray, src_w: np.ndarray, xy: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
        if not len(src_xy) or not len(xy):
            return np.zeros(len(xy)), np.zeros(len(xy))
        pairs = cKDTree(xy).sparse_distance_matrix(cKDTree(src_xy), 4.0 * h, output_type="coo_matrix")
        w = src_w[pairs.col] * np.exp(-pairs.data**2 / (2.0 * h * h))
        den = np.bincount(pairs.row, weights=w, minlength=len(xy))
        num = np.bincount(pairs.row, weights=w * src_e[pairs.col], minlength=len(xy))
        # Exact zero distances are dropped by sparse_distance_matrix: add them back.
        d0, j0 = cKDTree(src_xy).query(xy, k=1)
        same = d0 == 0.0
        if same.any():
            extra = pd.DataFrame({"row": np.flatnonzero(same)})
            exact = cKDTree(src_xy).query_ball_point(xy[same], 1e-9)
            for r, idx in zip(extra["row"], exact):
                den[r] += src_w[idx].sum()
                num[r] += (src_w[idx] * src_e[idx]).sum()
        return num / (den + self.n0_), den

    def _std(self, den: np.ndarray) -> np.ndarray:
        return np.sqrt(self.tau2_ * self.n0_ / (den + self.n0_))

    def _cv_bandwidth(self, rng: np.random.Generator) -> tuple[float, np.ndarray]:
        best, best_z = (np.inf, float(self.bandwidth_grid_m[0])), np.empty(0)
        folds = {c: rng.integers(0, 5, len(e)) for c, (_, e) in self.by_cell_.items()}
        for h in self.bandwidth_grid_m:
            errs, zs = [], []
            for c, (xy, e) in self.by_cell_.items():
                for k in range(5):
                    test = folds[c] == k
                    if not test.any() or test.all():
                        continue
                    mu, den = self._smooth(xy[~test], e[~test], np.ones((~test).sum()), xy[test], h)
                    err = e[test] - mu
                    errs.append(err)
                    # z of the noise-free field: remove the nugget from the squared error.
                    zs.append(np.sign(err) * np.sqrt(np.maximum(err**2 - self.nugget_var_, 0.0)) / self._std(den))
            mse = float(np.mean(np.concatenate(errs) ** 2)) if errs else np.inf
            if mse < best[0]:
                best, best_z = (mse, float(h)), np.concatenate(zs) if zs else np.empty(0)
        return best[1], best_z

    def _leave_cell_out_z(self) -> np.ndarray:
        # A cell predicted from its siblings only: a new sector on an existing site.
        zs = []
        for c, (xy, e) in self.by_cell_.items():
            sib = [s for s in self.by_cell_ if s != c and self.site_of_.get(s) == self.site_of_.get(c)]
            sxy, se, sw = self._stack([(s, self.rho_) for s in sib])
            if not len(sxy):
                continue
            mu, den = self._smooth(sxy, se, sw, xy, self.bandwidth_m_)
            err = e - mu
            zs.append(np.sign(err) * np.sqrt(np.maximum(err**2 - self.nugget_var_, 0.0)) / self._std(den))
        return np.concatenate(zs) if zs else np.empty(0)

    def _stack(self, sources: list[tuple[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [(self.by_cell_[c][0], self.by_cell_[c][1], np.full(len(self.by_cell_[c][1]), w))
                 for c, w in sources if c in self.by_cell_ and w > 0]
        if not parts:
            return np.empty((0, 2)), np.empty(0), np.empty(0)
        return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]

    # -------------------------------------------------------------- predict
    def sources(self, cell_id: str, new_cells: pd.DataFrame) -> list[tuple[str, float]]:
        """Measured cells whose residuals inform `cell_id` of the changed network, with weights."""
        row = new_cells.set_index("cell_id").loc[cell_id]
        here = (float(row["x_m"]), float(row["y_m"]))
        out = []
        if cell_id in self.by_cell_ and np.allclose(self.site_xy_.get(cell_id, (np.inf, np.inf)), here, atol=1.0):
            out.append((cell_id, 1.0))
        for other, (ox, oy) in self.site_xy_.items():
            if other != cell_id and np.allclose((ox, oy), here, atol=1.0):
                out.append((other, self.rho_))
        return out

    def predict(self, cell_id: str, new_cells: pd.DataFrame, xy_m: np.ndarray, *, free_space: bool = False,
                use_residuals: bool = True) -> FieldPrediction:
        """RSRP field of `cell_id` as it is in `new_cells` (the changed network) at `xy_m`."""
        if not hasattr(self, "bias_db_"):
            raise NotFittedError("ResidualKriger is not fitted; call fit() first")
        xy = np.asarray(xy_m, dtype=float).reshape(-1, 2)
        prior = cell_prior_dbm(new_cells, np.full(len(xy), cell_id), xy, free_space=free_space)
        if not use_residuals:
            return FieldPrediction(prior, np.full(len(xy), np.nan))
        sxy, se, sw = self._stack(self.sources(cell_id, new_cells))
        mu, den = self._smooth(sxy, se, sw, xy, self.bandwidth_m_)
        # Far from any source a measured cell is as unknown as a new one (both are prior + bias):
        # the scale moves from the leave-site-out one to the with-sources one as data accrues.
        near = den / (den + self.n0_)
        scale = self.new_site_std_scale_ * (1.0 - near) + self.std_scale_ * near
        return FieldPrediction(prior + self.bias_db_ + mu, scale * self._std(den))
