"""Downstream utility (GUMBLE section 6.4): RF fingerprinting localisation trained on real vs on
synthetic RSRP vectors, both tested on held-out real reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

UNDETECTED_DBM = -140.0  # RSRP of a cell the report did not measure (bottom of the 3GPP range)


def rsrp_vectors(measurements: pd.DataFrame, cell_ids: Sequence[str]) -> pd.DataFrame:
    """Long measurements (report_id, cell_id, rsrp_dbm) -> one row per report, one column per cell.

    Unmeasured cells get UNDETECTED_DBM; a cell measured twice keeps the strongest value.
    """
    wide = measurements.pivot_table(index="report_id", columns="cell_id", values="rsrp_dbm", aggfunc="max")
    return wide.reindex(columns=list(cell_ids)).fillna(UNDETECTED_DBM)


def rsrp_matrix(measurements: pd.DataFrame, cell_ids: Sequence[str]) -> tuple[pd.Index, sp.csr_matrix]:
    """`rsrp_vectors` as a sparse matrix of dB above UNDETECTED_DBM (an unmeasured cell is an
    implicit 0): (the reports, sorted as `rsrp_vectors` rows; the matrix). A report hears a
    handful of cells, so the dense frame of a 10^3-cell network is >99% filler (issue 15)."""
    m = measurements[measurements["rsrp_dbm"].notna()]
    reports = pd.Index(np.sort(m["report_id"].unique()))
    cells = pd.Index(list(cell_ids))
    col = cells.get_indexer(m["cell_id"].to_numpy(dtype=object))
    m = m[col >= 0].assign(_col=col[col >= 0])
    best = m.groupby(["report_id", "_col"], sort=False)["rsrp_dbm"].max()
    rows = reports.get_indexer(best.index.get_level_values(0))
    cols = best.index.get_level_values(1).to_numpy(dtype=np.int64)
    mat = sp.csr_matrix((best.to_numpy(dtype=float) - UNDETECTED_DBM, (rows, cols)), shape=(len(reports), len(cells)))
    return reports, mat


def synthetic_long(synthetic: pd.DataFrame, n_neighbours: int) -> pd.DataFrame:
    """synthetic_mdt wide rows -> long (report_id, cell_id, rsrp_dbm), serving plus neighbours."""
    parts = [synthetic[["sample_id", "serving_cell_id", "rsrp_dbm"]].set_axis(["report_id", "cell_id", "rsrp_dbm"], axis=1)]
    for k in range(1, n_neighbours + 1):
        c, v = f"neighbour_{k}_cell_id", f"neighbour_{k}_rsrp_dbm"
        if c in synthetic and v in synthetic:
            parts.append(synthetic[["sample_id", c, v]].set_axis(["report_id", "cell_id", "rsrp_dbm"], axis=1))
    out = pd.concat(parts, ignore_index=True)
    return out[out["cell_id"].notna() & out["rsrp_dbm"].notna()]


@dataclass(frozen=True)
class FingerprintResult:
    rmse_real_m: float
    rmse_synthetic_m: float
    predicted_real_xy_m: np.ndarray  # (n_test, 2)
    predicted_synthetic_xy_m: np.ndarray

    @property
    def ratio(self) -> float:
        """RMSE trained on synthetic / trained on real (GUMBLE: 77.54 / 72.56 = 1.07)."""
        return self.rmse_synthetic_m / self.rmse_real_m if self.rmse_real_m > 0 else float("inf")


def localisation_rmse_m(true_xy_m: np.ndarray, pred_xy_m: np.ndarray) -> float:
    """RMSE of the Euclidean position error, metres."""
    d2 = np.sum((np.asarray(true_xy_m, float) - np.asarray(pred_xy_m, float)) ** 2, axis=1)
    return float(np.sqrt(d2.mean()))


def fingerprint_compare(
    real_train_x: np.ndarray | sp.spmatrix, real_train_xy_m: np.ndarray,
    synthetic_x: np.ndarray | sp.spmatrix, synthetic_xy_m: np.ndarray,
    test_x: np.ndarray | sp.spmatrix, test_xy_m: np.ndarray,
    *, n_trees: int = 60, seed: int = 0,
) -> FingerprintResult:
    """Fit the same random forest on real and on synthetic fingerprints; score both on real test.

    Fingerprints are dense RSRP arrays (dBm, `rsrp_vectors`) or sparse matrices of dB above
    UNDETECTED_DBM (`rsrp_matrix`). The forest is fitted on the sparse form either way: a shift
    by a constant changes no split, and scikit-learn's sparse splitter skips the undetected
    cells, whose count grows with the network; the dense splitter sorted every cell's column at
    every node (~6 CPU-s a tree at 10^3 cells against ~0.6; issue 15)."""
    from sklearn.ensemble import RandomForestRegressor

    def as_sparse(x: np.ndarray | sp.spmatrix) -> sp.csc_matrix:
        return sp.csc_matrix(x, dtype=float) if sp.issparse(x) else sp.csc_matrix(np.asarray(x, float) - UNDETECTED_DBM)

    test = as_sparse(test_x).tocsr()
    preds = []
    for x, y in ((real_train_x, real_train_xy_m), (synthetic_x, synthetic_xy_m)):
        rf = RandomForestRegressor(n_estimators=n_trees, min_samples_leaf=2, random_state=seed, n_jobs=1)
        rf.fit(as_sparse(x), np.asarray(y, float))
        preds.append(rf.predict(test))
    return FingerprintResult(
        localisation_rmse_m(test_xy_m, preds[0]), localisation_rmse_m(test_xy_m, preds[1]), preds[0], preds[1]
    )
