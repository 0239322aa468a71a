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
    std_c(x)^2 = b^2 + (a^2 - b^2) n0 / (sum_j w_j + n0)
(a where nothing was measured, falling to the floor b with data; monotone by construction).
Everything is estimated on the measurements (`fit`): b; tau^2 the residual variance less the
nugget (measurement noise: the intercept at distance 0 of a cell's residual semivariogram);
rho the correlation of sibling cells' residuals in the same report; n0 = nugget / tau^2; h by
random 5-fold CV of own-source prediction; the std pair (a, b) by CV on the serving RSRP of
held-out reports so that the 50% and 90% intervals (noise-free std plus the measurement noise,
the semivariogram's intercept at 0 m) are
nominal in three CV regimes at once: random report folds (data of the cell's own),
leave-cell-out (site mates only) and leave-site-out (no data: a new site).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cellsynth.errors import NotFittedError
from cellsynth.propagation import prior_rsrp_dbm

Z90 = 1.6448536269514722  # two-sided 90% normal interval half-width in std units
Z50 = 0.6744897501960817  # two-sided 50%


def _site_priors_dbm(table: pd.DataFrame, xy_m: np.ndarray, free_space: bool) -> np.ndarray:
    """(N, K) a-priori RSRP of the K cells of `table` (rows of the cells table) at `xy_m`."""

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy(dtype=float) if name in table else np.full(len(table), np.nan)

    return prior_rsrp_dbm(np.asarray(xy_m, dtype=float), table[["x_m", "y_m"]].to_numpy(dtype=float),
                          azimuth_deg=col("azimuth_deg"), height_m=col("height_m"), tx_power_dbm=col("tx_power_dbm"),
                          freq_mhz=col("freq_mhz"), downtilt_deg=col("downtilt_deg"), free_space=free_space)


def cell_priors_dbm(cells: pd.DataFrame, cell_ids: list[str], xy_m: np.ndarray, *, free_space: bool = False) -> np.ndarray:
    """(N, K) a-priori RSRP (dBm) of each of `cell_ids` at every one of `xy_m` (one `prior_rsrp_dbm` call)."""
    return _site_priors_dbm(cells.set_index("cell_id").loc[list(cell_ids)], xy_m, free_space)


def cell_prior_dbm(cells: pd.DataFrame, cell_ids: np.ndarray, xy_m: np.ndarray, *, free_space: bool = False) -> np.ndarray:
    """A-priori RSRP (dBm) of row i's cell `cell_ids[i]` at `xy_m[i]` (per-row, grouped by cell)."""
    table = cells.set_index("cell_id")
    out = np.empty(len(cell_ids))
    codes, inv = np.unique(np.asarray(cell_ids).astype(str), return_inverse=True)
    for k, cell in enumerate(codes):
        rows = np.flatnonzero(inv == k)
        out[rows] = _site_priors_dbm(table.loc[[cell]], xy_m[rows], free_space)[:, 0]
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
        self.site_ids_ = np.array(list(self.site_xy_), dtype=object)  # the same sites as arrays (`sources`)
        self.site_xy_m_ = np.array(list(self.site_xy_.values()), dtype=float).reshape(-1, 2)
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
        # The noise of one measurement (the calibration's noisy-observation intervals add it to
        # the std of the noise-free field; the field's own micro-scale variation is epistemic).
        self.noise_var_ = self._noise_var()
        self.bandwidth_m_, _ = self._cv_bandwidth(rng)
        # The std model (see `_std`): no-data std a and data floor b, chosen together by CV on the
        # serving RSRP so that the central 50% and 90% intervals are nominal in three regimes
        # the what-if meets: data of the cell's own (random report folds: unchanged and
        # re-pointed cells, and cells that inherit a removed cell's users), a cell predicted from
        # its site mates only (leave-cell-out: a new sector on a measured site), and a cell with
        # no measurements at all (leave-site-out: a new or moved site).
        self.std_nodata_db_, self.std_floor_db_ = float(np.sqrt(self.tau2_)), 0.0
        self.cv_ = {name: self._serving_cv(serving, np.random.default_rng([self.random_state, k]), leave=leave)
                    for k, (name, leave) in enumerate((("random_folds", None), ("leave_cell_out", "cell"), ("leave_site_out", "site")))}
        self.std_nodata_db_, self.std_floor_db_ = self._calibrate_std(list(self.cv_.values()))
        self.n_measurements_ = len(m)
        return self

    def _best_prior(self, xy: np.ndarray) -> np.ndarray:
        ids = self.cells_["cell_id"].to_numpy()
        best = np.full(len(xy), -np.inf)
        for c in ids:
            best = np.maximum(best, cell_prior_dbm(self.cells_, np.full(len(xy), c), xy))
        return best

    def _serving_cv(self, serving: pd.DataFrame, rng: np.random.Generator, *, leave: str | None = None) -> np.ndarray:
        """(error of the noisy serving RSRP, den of the predicted best cell) of CV-held reports.

        leave=None: the held reports' rows are dropped from every cell's sources (5 folds);
        "cell" / "site": also every measurement of the held report's serving cell / site."""
        if not len(serving) or "report_id" not in serving:
            return np.empty((0, 2))
        test = serving.iloc[rng.permutation(len(serving))[: min(len(serving), 4000)]]
        fold_test = rng.integers(0, 5, len(test))
        out = []
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
                xy_t = t[["x_m", "y_m"]].to_numpy(float)
                self.by_cell_ = base
                ids = self.cells_["cell_id"].astype(str).tolist()
                # every cell's prior at the held reports in one call (it does not depend on the fold's
                # sources); `_mean_den` per cell rebuilt the cells index for each
                prior_all = cell_priors_dbm(self.cells_, ids, xy_t)
                parts = [self._residual(c, self.cells_, xy_t) for c in ids]
                mean_all = prior_all + self.bias_db_ + np.stack([p[0] for p in parts], axis=1)
                den_all = np.stack([p[1] for p in parts], axis=1)
                if leave is not None:
                    # Only the held unit's site changes its sources (sources are site mates):
                    # re-predict that site's cells on the unit's reports, the rest stand.
                    key = (t["cell_id"].astype(str) if leave == "cell" else t["cell_id"].map(self.site_of_)).to_numpy()
                    for group in np.unique(key.astype(str)):
                        rows = np.flatnonzero(key.astype(str) == group)
                        site = self.site_of_.get(group, group) if leave == "cell" else group
                        self.by_cell_ = {c: v for c, v in base.items() if (c if leave == "cell" else self.site_of_.get(c)) != group}
                        for j, c in enumerate(ids):
                            if self.site_of_.get(c) == site:
                                mu, den_all[rows, j] = self._residual(c, self.cells_, xy_t[rows])
                                mean_all[rows, j] = prior_all[rows, j] + self.bias_db_ + mu
                best = np.argmax(mean_all, axis=1)
                r = np.arange(len(t))
                out.append(np.column_stack([t["rsrp_dbm"].to_numpy(float) - mean_all[r, best], den_all[r, best]]))
        finally:
            self.by_cell_ = full
        return np.concatenate(out) if out else np.empty((0, 2))

    def _coverage(self, err_den: np.ndarray, a: float, b: float, z: float) -> float:
        # Noisy-observation interval: the field's std and the nugget add (independent noise).
        std = self._std(err_den[:, 1], a, b)
        return float(np.mean(np.abs(err_den[:, 0]) <= z * np.sqrt(std**2 + self.noise_var_)))

    def _calibrate_std(self, cv_sets: list[np.ndarray]) -> tuple[float, float]:
        """(a, b) minimising the sum over CV sets of |cov50 - 0.5| + |cov90 - 0.9| (grid search,
        0.25 dB steps; ties to the smaller a, then the smaller b)."""
        sets = [s for s in cv_sets if len(s) >= 50]
        if not sets:
            return float(np.sqrt(self.tau2_)), 0.0
        grid = np.arange(0.25, 20.0 + 1e-9, 0.25)
        best, best_ab = np.inf, (float(np.sqrt(self.tau2_)), 0.0)
        for a in grid:
            for b in grid[grid <= a]:
                loss = sum(abs(self._coverage(s, a, b, Z50) - 0.5) + abs(self._coverage(s, a, b, Z90) - 0.9) for s in sets)
                if loss < best - 1e-12:
                    best, best_ab = loss, (float(a), float(b))
        return best_ab

    def cv_coverage(self) -> dict[str, dict[str, float]]:
        """Coverage of the calibrated 50% / 90% intervals on each CV set (noisy serving RSRP)."""
        return {name: {"n": int(len(s)), "cov50": self._coverage(s, self.std_nodata_db_, self.std_floor_db_, Z50),
                       "cov90": self._coverage(s, self.std_nodata_db_, self.std_floor_db_, Z90)}
                for name, s in self.cv_.items()}

    def _serving_mean_den(self, cells: pd.DataFrame, xy_m: np.ndarray, *, radius_m: float = 4000.0) -> tuple[np.ndarray, np.ndarray]:
        best = np.full(len(xy_m), -np.inf)
        den = np.zeros(len(xy_m))
        centre = xy_m.mean(axis=0)
        for c, x, y in zip(cells["cell_id"], cells["x_m"], cells["y_m"]):
            if np.hypot(x - centre[0], y - centre[1]) > radius_m + np.ptp(xy_m, axis=0).max():
                continue
            mean, d = self._mean_den(c, cells, xy_m)
            better = mean > best
            best[better], den[better] = mean[better], d[better]
        return best, den

    def serving_field(self, cells: pd.DataFrame, xy_m: np.ndarray, *, radius_m: float = 4000.0) -> tuple[np.ndarray, np.ndarray]:
        """Serving (best-cell) RSRP mean and epistemic std of a network at positions."""
        best, den = self._serving_mean_den(cells, xy_m, radius_m=radius_m)
        return best, self._std(den)

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
        # Kriging nugget: what the kernel cannot resolve, measurement noise plus the field's
        # variation inside 10 m (half the squared residual difference of a cell's pairs that close).
        diffs = []
        for xy, e in self.by_cell_.values():
            if len(xy) < 10:
                continue
            d, j = cKDTree(xy).query(xy, k=2)
            close = d[:, 1] < 10.0
            diffs.append((e[close] - e[j[close, 1]]) ** 2 / 2.0)
        cat = np.concatenate(diffs) if diffs else np.empty(0)
        return float(np.mean(cat)) if len(cat) >= 30 else 4.0

    def _noise_var(self) -> float:
        # Measurement noise alone = intercept at distance 0 of a cell's residual semivariogram,
        # from pairs closer than 8 m: a line fitted to 1 m bins of gamma(d) = (e_i - e_j)^2 / 2
        # (the field itself varies inside 10 m, so the plain mean of such pairs overstates it).
        edges = np.arange(0.0, 9.0, 1.0)
        sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
        for xy, e in self.by_cell_.values():
            if len(xy) < 10:
                continue
            pairs = cKDTree(xy).query_pairs(edges[-1], output_type="ndarray")
            if not len(pairs):
                continue
            d = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
            k = np.minimum((d // 1.0).astype(int), len(edges) - 2)
            sums += np.bincount(k, weights=(e[pairs[:, 0]] - e[pairs[:, 1]]) ** 2 / 2.0, minlength=len(sums))
            counts += np.bincount(k, minlength=len(counts))
        ok = counts >= 10
        if counts.sum() < 30 or ok.sum() < 2:
            return 4.0  # a priori: 2 dB measurement noise
        mid = 0.5 * (edges[:-1] + edges[1:])
        slope, intercept = np.polyfit(mid[ok], sums[ok] / counts[ok], 1, w=np.sqrt(counts[ok]))
        first = sums[ok][0] / counts[ok][0]
        return float(np.clip(intercept, 0.25, first))

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

    def _kriging_std(self, den: np.ndarray) -> np.ndarray:
        # Shrinkage-kriging std of the kernel mean (used as a z-scale for the bandwidth CV).
        return np.sqrt(self.tau2_ * self.n0_ / (den + self.n0_))

    def _std(self, den: np.ndarray, a: float | None = None, b: float | None = None) -> np.ndarray:
        """Epistemic std of the noise-free field: std^2 = b^2 + (a^2 - b^2) n0 / (den + n0).

        a where nothing was measured (den = 0), falling monotonically to the floor b where the
        kernel weight of measurements is large: b is what the residuals cannot say (short-range
        shadowing between reports, the prior's pattern errors after a change)."""
        a = self.std_nodata_db_ if a is None else a
        b = self.std_floor_db_ if b is None else b
        return np.sqrt(b * b + (a * a - b * b) * self.n0_ / (np.asarray(den, dtype=float) + self.n0_))

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
                    zs.append(np.sign(err) * np.sqrt(np.maximum(err**2 - self.nugget_var_, 0.0)) / self._kriging_std(den))
            mse = float(np.mean(np.concatenate(errs) ** 2)) if errs else np.inf
            if mse < best[0]:
                best, best_z = (mse, float(h)), np.concatenate(zs) if zs else np.empty(0)
        return best[1], best_z

    def _stack(self, sources: list[tuple[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [(self.by_cell_[c][0], self.by_cell_[c][1], np.full(len(self.by_cell_[c][1]), w))
                 for c, w in sources if c in self.by_cell_ and w > 0]
        if not parts:
            return np.empty((0, 2)), np.empty(0), np.empty(0)
        return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]

    # -------------------------------------------------------------- predict
    def sources(self, cell_id: str, new_cells: pd.DataFrame) -> list[tuple[str, float]]:
        """Measured cells whose residuals inform `cell_id` of the changed network, with weights."""
        if new_cells is self.cells_:  # the measured network (the CV): its sites are site_xy_
            here = np.array(self.site_xy_[cell_id])
        else:
            row = new_cells.set_index("cell_id").loc[cell_id]
            here = np.array([float(row["x_m"]), float(row["y_m"])])
        # np.allclose(site, here, atol=1.0) for every measured cell at once: a loop of allclose calls was
        # 72% of a what-if's time on the UCC lake (188 cells; the CV calls this per cell, fold and site)
        same_place = np.all(np.abs(self.site_xy_m_ - here) <= 1.0 + 1e-5 * np.abs(here), axis=1)
        itself = self.site_ids_ == cell_id
        out = [(cell_id, 1.0)] if cell_id in self.by_cell_ and (same_place & itself).any() else []
        return out + [(other, self.rho_) for other in self.site_ids_[same_place & ~itself]]

    def predict(self, cell_id: str, new_cells: pd.DataFrame, xy_m: np.ndarray, *, free_space: bool = False,
                use_residuals: bool = True) -> FieldPrediction:
        """RSRP field of `cell_id` as it is in `new_cells` (the changed network) at `xy_m`."""
        if not hasattr(self, "bias_db_"):
            raise NotFittedError("ResidualKriger is not fitted; call fit() first")
        xy = np.asarray(xy_m, dtype=float).reshape(-1, 2)
        prior = cell_prior_dbm(new_cells, np.full(len(xy), cell_id), xy, free_space=free_space)
        if not use_residuals:
            return FieldPrediction(prior, np.full(len(xy), np.nan))
        mu, den = self._residual(cell_id, new_cells, xy)
        return FieldPrediction(prior + self.bias_db_ + mu, self._std(den))

    def _residual(self, cell_id: str, new_cells: pd.DataFrame, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sxy, se, sw = self._stack(self.sources(cell_id, new_cells))
        return self._smooth(sxy, se, sw, xy, self.bandwidth_m_)

    def _mean_den(self, cell_id: str, new_cells: pd.DataFrame, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prior = cell_prior_dbm(new_cells, np.full(len(xy), cell_id), xy)
        mu, den = self._residual(cell_id, new_cells, xy)
        return prior + self.bias_db_ + mu, den
