"""`RadioModels`: every cell's fitted radio models as committed in the `radio_models` lake table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cellsynth.radio.model import FittedCells, RadioPrediction, Target

POOLED_CELL_ID = "__pooled__"


def own_cells(rows, target: Target) -> list[str]:
    """The cells of `radio_models` rows with a model of their own (not the pooled fallback) for
    `target`; needs no weight file."""
    own = rows[(rows["target"] == target) & ~rows["pooled"].astype(bool)]
    return sorted(own["cell_id"].unique().tolist())


class RadioModels:
    """Every cell's radio models as committed in `radio_models` (+ the weight files it names).

    Rows are predicted by their own cell's model; cells without one (too few measurements, or
    absent from training) use the pooled model of their shard group, with positions taken
    relative to the cell's site from the `cells` table, and come back flagged `pooled`.
    """

    def __init__(self, rows, files: dict[str, FittedCells], sites: dict[str, tuple[float, float]],
                 epistemic_threshold_db: float, n_weight_samples: int):
        self.rows = rows
        self._files = files
        self._sites = sites
        self.epistemic_threshold_db = epistemic_threshold_db
        self.n_weight_samples = n_weight_samples
        self._own: dict[tuple[str, str], tuple[str, int]] = {}
        self._pooled: dict[tuple[str, str], str] = {}
        for r in rows.itertuples():
            fc = files[r.path]
            if r.pooled:
                self._pooled[(r.target, r.cell_id)] = r.path
            else:
                self._own[(r.target, r.cell_id)] = (r.path, fc._index[r.cell_id])
        self._any_pooled = {t: p for (t, _), p in sorted(self._pooled.items())}

    @classmethod
    def load(cls, lake, *, version: int | None = None) -> RadioModels:
        """Read `radio_models` at `version` (latest when None) and its weight files."""
        rows = lake.read_pandas("radio_models", version=version)
        # `path` is a file prefix under the lake root; object-store lakes are read through a local copy
        local = {p: lake.local_dir(str(Path(p).parent)) / Path(p).name for p in sorted(rows["path"].unique())}
        files = {p: FittedCells.load(local[p]) for p in local}
        sites: dict[str, tuple[float, float]] = {}
        if lake.exists("cells"):
            cells = lake.read_pandas("cells", columns=["cell_id", "x_m", "y_m"])
            sites = {c: (x, y) for c, x, y in zip(cells["cell_id"], cells["x_m"], cells["y_m"])}
        meta = json.loads(local[sorted(files)[0]].with_suffix(".json").read_text()) if files else {}
        return cls(rows, files, sites, float(meta.get("epistemic_threshold_db", 3.0)), int(meta.get("n_weight_samples", 64)))

    def release(self) -> None:
        """Drop every cell's solved posterior (Cholesky factor, distance matrices), rebuilt on the
        next prediction: a caller predicting many cells a few at a time keeps memory bounded."""
        for fitted in self._files.values():
            fitted._solved.clear()

    def cells(self, target: Target) -> list[str]:
        """Cells with a model of their own for `target`."""
        return own_cells(self.rows, target)

    def uses_load(self, target: Target) -> bool:
        """Whether `target`'s models have load terms (RSRQ fitted where the lake had cell loads)."""
        return any(self._files[p].settings.uses_load for p in self.rows.loc[self.rows["target"] == target, "path"].unique())

    def predict(self, target: Target, cell_ids: np.ndarray, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
                seed: int = 0) -> RadioPrediction:
        """Row i predicted by cell_ids[i]'s model (grouped by cell); `pooled` flags fallbacks."""
        cell_ids = np.asarray(cell_ids).astype(str)
        xy_m = np.asarray(xy_m, dtype=float)
        n = len(cell_ids)
        mean, ep, al, dof = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.inf)
        pooled = np.zeros(n, dtype=bool)
        rho = None if load_rho is None else np.asarray(load_rho, dtype=float)
        codes, uniq_inv = np.unique(cell_ids, return_inverse=True)
        for k, cell in enumerate(codes):
            rows = np.flatnonzero(uniq_inv == k)
            r = None if rho is None else rho[rows]
            if (target, cell) in self._own:
                path, i = self._own[(target, cell)]
                xy = xy_m[rows]
            else:
                pooled[rows] = True
                path = self._pooled.get((target, cell), self._any_pooled.get(target))
                if path is None or cell not in self._sites:
                    continue
                i = 0
                xy = xy_m[rows] - np.asarray(self._sites[cell])
            pred = self._files[path].predict(np.full(len(rows), i), xy, r)
            mean[rows], ep[rows], al[rows], dof[rows] = pred.mean, pred.epistemic_std, pred.aleatoric_std, pred.dof_or_inf()
        return RadioPrediction(mean, ep, al, pooled, dof)

    def cell_model(self, target: Target, cell_id: str) -> tuple[FittedCells, int, np.ndarray] | None:
        """(fitted cells, index, offset) of the model that predicts `cell_id`: its own, or its
        shard's pooled model (positions taken relative to the cell's site, the offset); None when
        neither exists. `model.predict([index], xy - offset)` is `self.predict(target, [cell_id], xy)`."""
        if (target, str(cell_id)) in self._own:
            path, i = self._own[(target, str(cell_id))]
            return self._files[path], i, np.zeros(2)
        path = self._pooled.get((target, str(cell_id)), self._any_pooled.get(target))
        if path is None or str(cell_id) not in self._sites:
            return None
        return self._files[path], 0, np.asarray(self._sites[str(cell_id)], dtype=float)

    def epistemic_cov(self, target: Target, cell_id: str, xy_m: np.ndarray) -> np.ndarray | None:
        """Calibrated posterior covariance (M, M, dB^2) of `cell_id`'s field between positions
        xy_m (see `FittedCells.epistemic_cov`); a cell without a model of its own uses its shard's
        pooled model (positions relative to its site). None when neither exists."""
        found = self.cell_model(target, cell_id)
        if found is None:
            return None
        fitted, i, offset = found
        return fitted.epistemic_cov(i, np.asarray(xy_m, dtype=float) - offset)
