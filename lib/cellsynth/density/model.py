"""Gaussian KDEs in the local metric frame (GUMBLE section 5.1) and the trained density set.

`GaussianKDE2D` is one f_j^{C_i} (or the area density f_j^O): its training positions plus a
bandwidth chosen by held-out negative log-likelihood (GUMBLE eq. 14). The kernel sums are
scikit-learn's `KernelDensity` (KD-tree); we only choose the bandwidth and keep records.

Bandwidth convention: `bandwidth_m` is the standard deviation of the isotropic Gaussian
kernel in metres (scikit-learn's convention; GUMBLE eq. 13 folds the factor 2 into h).
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.neighbors import KernelDensity

from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.schemas import AREA_CELL_ID

FORMAT_VERSION = 1
# kde_models' support box columns, in GaussianKDE2D.support_box_m order
_BOX_COLUMNS = ("x_min_m", "y_min_m", "x_max_m", "y_max_m")


def as_rng(rng: int | np.random.Generator | None) -> np.random.Generator:
    """A Generator from a seed, a Generator, or None (fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def check_xy(xy_m: Any, *, name: str = "xy_m", min_rows: int = 0) -> np.ndarray:
    """Validate an (n, 2) array of finite metres; raise SchemaError naming the argument."""
    arr = np.asarray(xy_m, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise SchemaError(f"{name}: expected an (n, 2) array of x_m, y_m, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise SchemaError(f"{name}: expected at least {min_rows} rows, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise SchemaError(f"{name}: {int((~np.isfinite(arr)).any(axis=1).sum())} rows hold NaN or inf")
    return arr


def scott_bandwidth_m(xy_m: np.ndarray, *, floor_m: float) -> float:
    """Scott's rule for a 2-D Gaussian kernel, h = sigma * n^(-1/6), never below `floor_m`."""
    n = len(xy_m)
    if n < 2:
        return float(floor_m)
    sigma_m = math.sqrt(float(np.mean(np.var(xy_m, axis=0, ddof=1))))
    return float(max(sigma_m * n ** (-1.0 / 6.0), floor_m))


def select_bandwidth(
    xy_m: np.ndarray,
    bandwidth_grid_m: Sequence[float],
    *,
    validation_fraction: float,
    rng: int | np.random.Generator | None = 0,
) -> tuple[float, dict[float, float]]:
    """GUMBLE eq. 14: the grid bandwidth minimising the held-out negative log-likelihood.

    One random split of `xy_m` into fit / validation rows; each candidate is fitted on the fit
    rows and scored on the validation rows. Ties go to the larger bandwidth (smoother).

    Returns:
        (bandwidth_m, {bandwidth_m: validation NLL}); an NLL is inf when a validation point
        underflows to zero density.
    """
    gen = as_rng(rng)
    n = len(xy_m)
    n_val = min(max(1, int(round(validation_fraction * n))), n - 1)
    order = gen.permutation(n)
    val, fit = xy_m[order[:n_val]], xy_m[order[n_val:]]
    nll_by_bandwidth: dict[float, float] = {}
    for bandwidth_m in sorted(float(h) for h in bandwidth_grid_m):
        # rtol 1e-4: each validation density within 0.01% (the NLL moves by ~1e-6 of itself,
        # far below the gaps between grid bandwidths) and the tree prunes: 10-25x less CPU on
        # the 200k-report area densities of a 10^3-cell run (issue 15; privacy's MIA KDE does the same).
        kde = KernelDensity(kernel="gaussian", bandwidth=bandwidth_m, algorithm="kd_tree", rtol=1e-4).fit(fit)
        loglik = float(kde.score(val))
        nll_by_bandwidth[bandwidth_m] = -loglik if np.isfinite(loglik) else math.inf
    best = min(nll_by_bandwidth.values())
    chosen = max(h for h, v in nll_by_bandwidth.items() if v == best)
    return chosen, nll_by_bandwidth


class GaussianKDE2D:
    """Isotropic 2-D Gaussian KDE over positions in metres, bandwidth by held-out NLL.

    Args:
        bandwidth_m: fixed bandwidth; None selects one from `bandwidth_grid_m` (eq. 14).
        bandwidth_grid_m: candidate bandwidths (kernel std, metres).
        validation_fraction: share of the positions held out to score each candidate.
        min_reports: below this many positions use Scott's rule instead of the grid.
        bandwidth_floor_m: lower bound for the Scott fallback.
        random_state: seed of the validation split.
    """

    _constraints: ClassVar[dict[str, str]] = {
        "bandwidth_m": "None or a positive number",
        "bandwidth_grid_m": "a non-empty sequence of positive numbers",
        "validation_fraction": "a number in (0, 1)",
        "min_reports": "an integer >= 2",
        "bandwidth_floor_m": "a positive number",
    }

    def __init__(
        self,
        *,
        bandwidth_m: float | None = None,
        bandwidth_grid_m: Sequence[float] = (25.0, 50.0, 100.0, 200.0, 400.0),
        validation_fraction: float = 0.2,
        min_reports: int = 20,
        bandwidth_floor_m: float = 20.0,
        random_state: int | None = 0,
    ) -> None:
        self.bandwidth_m = bandwidth_m
        self.bandwidth_grid_m = bandwidth_grid_m
        self.validation_fraction = validation_fraction
        self.min_reports = min_reports
        self.bandwidth_floor_m = bandwidth_floor_m
        self.random_state = random_state

    # -------------------------------------------------------------------- validation
    def _check_params(self) -> None:
        bad = []
        if self.bandwidth_m is not None and not (_is_num(self.bandwidth_m) and self.bandwidth_m > 0):
            bad.append("bandwidth_m")
        grid = self.bandwidth_grid_m
        if not (isinstance(grid, Sequence) and len(grid) > 0 and all(_is_num(h) and h > 0 for h in grid)):
            bad.append("bandwidth_grid_m")
        if not (_is_num(self.validation_fraction) and 0 < self.validation_fraction < 1):
            bad.append("validation_fraction")
        if not (isinstance(self.min_reports, int | np.integer) and self.min_reports >= 2):
            bad.append("min_reports")
        if not (_is_num(self.bandwidth_floor_m) and self.bandwidth_floor_m > 0):
            bad.append("bandwidth_floor_m")
        if bad:
            raise ConfigError(
                [f"GaussianKDE2D.{k}: expected {self._constraints[k]}, got {getattr(self, k)!r}" for k in bad]
            )

    def _check_fitted(self) -> None:
        if "bandwidth_m_" not in self.__dict__:
            raise NotFittedError("GaussianKDE2D is not fitted; call fit() first")

    # ----------------------------------------------------------------------- verbs
    def fit(self, xy_m: Any) -> GaussianKDE2D:
        """Fit on an (n, 2) array of positions in metres (n >= 1)."""
        self._check_params()
        xy = check_xy(xy_m, min_rows=1)
        if self.bandwidth_m is not None:
            bandwidth_m, source, nll = float(self.bandwidth_m), "fixed", {}
        elif len(xy) < self.min_reports:
            bandwidth_m, source, nll = scott_bandwidth_m(xy, floor_m=self.bandwidth_floor_m), "fallback", {}
        else:
            bandwidth_m, nll = select_bandwidth(
                xy, self.bandwidth_grid_m, validation_fraction=self.validation_fraction, rng=self.random_state
            )
            source = "nll"
        self.positions_ = xy.copy()
        self.bandwidth_m_ = bandwidth_m
        self.bandwidth_source_ = source
        self.nll_by_bandwidth_ = nll
        self.n_reports_ = len(xy)
        self.__dict__.pop("_sk_kde", None)  # a refit drops the tree of the former positions
        return self

    @property
    def kde_(self) -> KernelDensity:
        """The scikit-learn KDE (k-d tree) behind `score_samples`, built on first use from the
        positions and bandwidth: sampling and the association's own scoring never need it, and
        building it for every KDE made (issue 15) -- e.g. the association-scale CV's ~55k
        fold KDEs at 10^3 cells -- cost more than their scoring."""
        self._check_fitted()
        tree = self.__dict__.get("_sk_kde")
        if tree is None:
            tree = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth_m_, algorithm="kd_tree").fit(self.positions_)
            self.__dict__["_sk_kde"] = tree
        return tree

    def score_samples(self, xy_m: Any) -> np.ndarray:
        """Natural-log density (per square metre) at each position."""
        self._check_fitted()
        xy = check_xy(xy_m)
        if len(xy) == 0:
            return np.empty(0)
        return self.kde_.score_samples(xy)

    def sample(self, n_samples: int, *, rng: int | np.random.Generator | None = None) -> np.ndarray:
        """Draw (n_samples, 2) positions from the fitted density."""
        self._check_fitted()
        gen = as_rng(rng)
        idx = gen.integers(0, self.n_reports_, size=n_samples)
        return self.positions_[idx] + gen.normal(scale=self.bandwidth_m_, size=(n_samples, 2))

    @property
    def support_box_m(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the training positions."""
        self._check_fitted()
        lo, hi = self.positions_.min(axis=0), self.positions_.max(axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Write positions.npy (no pickle) and params.json with a format version."""
        self._check_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "positions.npy", self.positions_, allow_pickle=False)
        params = {
            "format_version": FORMAT_VERSION,
            "bandwidth_m_": self.bandwidth_m_,
            "bandwidth_source_": self.bandwidth_source_,
            "params": {
                "bandwidth_m": self.bandwidth_m,
                "bandwidth_grid_m": list(self.bandwidth_grid_m),
                "validation_fraction": self.validation_fraction,
                "min_reports": self.min_reports,
                "bandwidth_floor_m": self.bandwidth_floor_m,
                "random_state": self.random_state,
            },
        }
        (out / "params.json").write_text(json.dumps(params, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> GaussianKDE2D:
        data = json.loads((Path(directory) / "params.json").read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise SchemaError(
                f"params.json: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        positions = np.load(Path(directory) / "positions.npy", allow_pickle=False)
        return cls.from_positions(positions, data["bandwidth_m_"], source=data["bandwidth_source_"], **data["params"])

    @classmethod
    def from_positions(
        cls, positions_m: np.ndarray, fitted_bandwidth_m: float, *, source: str = "fixed", **params: Any
    ) -> GaussianKDE2D:
        """Rebuild a fitted model from stored positions and bandwidth (no selection rerun)."""
        model = cls(**params)
        xy = check_xy(positions_m, name="positions_m", min_rows=1)
        model.positions_ = xy
        model.bandwidth_m_ = float(fitted_bandwidth_m)
        model.bandwidth_source_ = source
        model.nll_by_bandwidth_ = {}
        model.n_reports_ = len(xy)
        return model


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


class DensityModels:
    """The trained per-(window, cell) KDEs f_j^{C_i} and the area densities f_j^O.

    Build with `DensityModels.load(lake)` (reads `kde_models` and the position files it
    references; KDEs are rebuilt lazily) or `DensityModels.from_kdes(...)` in tests.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        loader: Any,
        *,
        prune_k_bandwidths: float = 6.0,
        association: str = "map",
        association_bandwidth_scales: Sequence[float] = (1.0,),
    ) -> None:
        self._rows = rows.reset_index(drop=True)
        self._loader = loader  # callable (window, cell_id) -> GaussianKDE2D
        self._cache: dict[tuple[str, str], GaussianKDE2D] = {}
        self._index: dict[tuple[str, str], Any] = {}
        self.prune_k_bandwidths = prune_k_bandwidths
        if association not in ("map", "ml"):
            raise ConfigError(f"density.association: expected 'map' or 'ml', got {association!r}")
        self.association = association
        self.association_bandwidth_scales = tuple(float(v) for v in association_bandwidth_scales)
        self.association_scale_: dict[str, float] = {}  # window -> chosen scale (MAP)
        self.association_cv_: dict[str, dict[float, float]] = {}  # window -> {scale: CV accuracy}

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_kdes(
        cls,
        kdes: Mapping[str, Mapping[str, GaussianKDE2D]],
        *,
        area: Mapping[str, GaussianKDE2D] | None = None,
        prune_k_bandwidths: float = 6.0,
        association: str = "map",
        association_bandwidth_scales: Sequence[float] = (1.0,),
    ) -> DensityModels:
        """From fitted models: {window: {cell_id: kde}} plus optional {window: area kde}."""
        table: dict[tuple[str, str], GaussianKDE2D] = {}
        for window, by_cell in kdes.items():
            for cell_id, kde in by_cell.items():
                table[(window, cell_id)] = kde
        for window, kde in (area or {}).items():
            table[(window, AREA_CELL_ID)] = kde
        rows = pd.DataFrame(
            [
                {"window": w, "cell_id": c, "bandwidth_m": k.bandwidth_m_, "n_reports": k.n_reports_,
                 **dict(zip(_BOX_COLUMNS, k.support_box_m))}
                for (w, c), k in table.items()
            ],
            columns=["window", "cell_id", "bandwidth_m", "n_reports", *_BOX_COLUMNS],
        )
        return cls(rows, lambda w, c: table[(w, c)], prune_k_bandwidths=prune_k_bandwidths, association=association,
                   association_bandwidth_scales=association_bandwidth_scales)

    @classmethod
    def load(cls, lake: Any, *, version: int | None = None, prune_k_bandwidths: float = 6.0,
             association: str = "map", association_bandwidth_scales: Sequence[float] = (1.0,)) -> DensityModels:
        """Read `kde_models` (at `version`, default latest) and the position files it references."""
        from cellsynth.density._files import read_positions_grouped
        from cellsynth.splits import stable_order

        rows = stable_order(lake.read_pandas("kde_models", version=version), ("window", "cell_id"))
        if rows.empty:
            raise SchemaError("kde_models: table is empty; run the density stage first")
        # a Lake reads through its own filesystem (object-store credentials); other objects by root path
        from cellsynth.lake import Lake

        source = lake if isinstance(lake, Lake) else _lake_root(lake)
        # per file: its (x, y) array and each (window, cell)'s row indices, grouped once (a boolean
        # mask per KDE cost ~0.6 ms each, 0.45 s for the 700 KDEs a generate run loads)
        files: dict[str, tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]] = {}
        by_key = {(r.window, r.cell_id): r for r in rows.itertuples(index=False)}

        def _loader(window: str, cell_id: str) -> GaussianKDE2D:
            row = by_key[(window, cell_id)]
            if row.path not in files:  # the process-wide cache serves a file unchanged since it was read
                files[row.path] = read_positions_grouped(source, row.path)
            xy, groups = files[row.path]
            pts = xy[groups.get((window, cell_id), np.empty(0, dtype=np.int64))]
            return GaussianKDE2D.from_positions(pts, row.bandwidth_m, source=row.bandwidth_source)

        return cls(rows, _loader, prune_k_bandwidths=prune_k_bandwidths, association=association,
                   association_bandwidth_scales=association_bandwidth_scales)

    # ----------------------------------------------------------------- lookups
    @property
    def windows(self) -> list[str]:
        return sorted(self._rows["window"].unique().tolist())

    def cells(self, window: str) -> list[str]:
        """Cell ids with a KDE in `window` (sorted; the area density excluded)."""
        self._check_window(window)
        sel = self._rows[(self._rows["window"] == window) & (self._rows["cell_id"] != AREA_CELL_ID)]
        return sorted(sel["cell_id"].tolist())

    def kde(self, window: str, cell_id: str) -> GaussianKDE2D:
        """The fitted KDE of one (window, cell); `cell_id=AREA_CELL_ID` for f_j^O."""
        key = (window, cell_id)
        if key not in self._cache:
            try:
                self._cache[key] = self._loader(window, cell_id)
            except KeyError:
                raise SchemaError(f"kde_models: no model for window={window!r}, cell_id={cell_id!r}") from None
        return self._cache[key]

    def n_reports(self, window: str) -> int:
        """Training reports in the window (the area density's count, else the cells' sum)."""
        self._check_window(window)
        sel = self._rows[self._rows["window"] == window]
        area = sel[sel["cell_id"] == AREA_CELL_ID]
        if len(area):
            return int(area["n_reports"].iloc[0])
        return int(sel["n_reports"].sum())

    def n_reports_by_cell(self, window: str) -> dict[str, int]:
        self._check_window(window)
        sel = self._rows[(self._rows["window"] == window) & (self._rows["cell_id"] != AREA_CELL_ID)]
        return {str(c): int(n) for c, n in zip(sel["cell_id"], sel["n_reports"])}

    # ------------------------------------------------------------------ verbs
    def sample_positions(self, window: str, n_samples: int, *, rng: int | np.random.Generator | None = None) -> np.ndarray:
        """(n_samples, 2) positions from f_j^O (Algorithm 1, line 4).

        Without an area model the mixture of cell KDEs weighted by their report counts is used.
        """
        gen = as_rng(rng)
        self._check_window(window)
        sel = self._rows[self._rows["window"] == window]
        if (sel["cell_id"] == AREA_CELL_ID).any():
            return self.kde(window, AREA_CELL_ID).sample(n_samples, rng=gen)
        counts = self.n_reports_by_cell(window)
        cells = sorted(counts)
        weights = np.array([counts[c] for c in cells], dtype=float)
        picks = gen.choice(len(cells), size=n_samples, p=weights / weights.sum())
        out = np.empty((n_samples, 2))
        for i in np.unique(picks):
            mask = picks == i
            out[mask] = self.kde(window, cells[i]).sample(int(mask.sum()), rng=gen)
        return out

    def log_prior(self, window: str, cells: list[str] | None = None, *, rule: str | None = None) -> np.ndarray:
        """The association prior of `cells` (default: all of the window's, sorted): log(n_i / n)
        under `map`, zeros under `ml` (`rule` defaults to `association`). n_i counts the cell's
        training reports in the window, so a small cell's sharply peaked KDE is weighed by how
        rarely that cell serves."""
        from cellsynth.density.transforms import association_log_prior

        counts = self.n_reports_by_cell(window)
        cells = self.cells(window) if cells is None else cells
        prior = association_log_prior([counts[c] for c in counts], mode=rule or self.association)
        by_cell = dict(zip(counts, prior))
        return np.array([by_cell[c] for c in cells])

    def association_scale(self, window: str, *, rule: str | None = None) -> float:
        """The bandwidth scale the association uses in `window`: 1 under `ml` (eq. 15 as
        printed); under `map` the grid value of best 3-fold CV accuracy on the window's training
        positions (`select_association_scale`), computed once per window."""
        from cellsynth.density.transforms import select_association_scale

        if (rule or self.association) == "ml":
            return 1.0
        if window not in self.association_scale_:
            cells = self.cells(window)
            scale, cv = select_association_scale(
                [self.kde(window, c) for c in cells], self.association_bandwidth_scales,
                k_bandwidths=self.prune_k_bandwidths, rng=zlib.crc32(f"association:{window}".encode()),
            )
            self.association_scale_[window], self.association_cv_[window] = scale, cv
        return self.association_scale_[window]

    def _association_kdes(self, window: str, cells: list[str], rule: str | None) -> list[GaussianKDE2D]:
        from cellsynth.density.transforms import scaled_kdes

        return scaled_kdes([self.kde(window, c) for c in cells], self.association_scale(window, rule=rule))

    def _association_index(self, window: str, rule: str) -> Any:
        """The pruned index of `window`: boxes and bandwidths from the kde_models rows, each
        cell's KDE built only when a position needs it (a generate tile loads its surroundings)."""
        from cellsynth.density.transforms import CellSupportIndex

        if (window, rule) not in self._index:
            cells = self.cells(window)
            scale = self.association_scale(window, rule=rule)
            rows = self._rows[(self._rows["window"] == window) & (self._rows["cell_id"] != AREA_CELL_ID)]
            rows = rows.set_index("cell_id").loc[cells]
            if all(c in rows for c in _BOX_COLUMNS) and rows[list(_BOX_COLUMNS)].notna().all().all():
                boxes = rows[list(_BOX_COLUMNS)].to_numpy(dtype=float)
            else:  # rows without boxes (older tables): from the positions
                boxes = np.array([self.kde(window, c).support_box_m for c in cells])

            def kde_of(i: int, cells: list[str] = cells) -> GaussianKDE2D:
                k = self.kde(window, cells[i])
                return k if scale == 1.0 else GaussianKDE2D.from_positions(k.positions_, k.bandwidth_m_ * scale,
                                                                           source=k.bandwidth_source_)

            self._index[(window, rule)] = CellSupportIndex(
                cells, kde_of, k_bandwidths=self.prune_k_bandwidths, log_prior=self.log_prior(window, cells, rule=rule),
                boxes_m=boxes, bandwidths_m=rows["bandwidth_m"].to_numpy(dtype=float) * scale,
            )
        return self._index[(window, rule)]

    def associate(self, window: str, xy_m: Any, *, rule: str | None = None) -> np.ndarray:
        """Each position's serving cell: argmax_i log f_j^{C_i}(x) + log prior_i, scoring only
        nearby cells. Rule `ml` is GUMBLE eq. 15 (no prior); `map` adds log(n_i / n), the Bayes
        rule, with the bandwidths scaled by `association_scale`. `rule` defaults to the models'
        `association`. Only the KDEs of cells near the positions are loaded."""
        xy = check_xy(xy_m)
        return self._association_index(window, rule or self.association).associate(xy)

    def may_change(self, window: str, xy_m: Any, serving: Any, changed_cells: Any, *, rule: str | None = None) -> np.ndarray:
        """Which positions, associated to `serving` before the KDEs of `changed_cells` changed,
        might associate elsewhere now (`CellSupportIndex.may_change`). Incremental generation uses
        `reassociate` since session 25; this stays as the flagging rule its tests check."""
        index = self._association_index(window, rule or self.association)
        return index.may_change(check_xy(xy_m), np.asarray(serving, dtype=object), np.asarray(changed_cells, dtype=object))

    def reassociate(self, window: str, xy_m: Any, serving: Any, changed_cells: Any, *, rule: str | None = None) -> np.ndarray:
        """`associate`'s answers for positions associated to `serving` before the KDEs of `changed_cells` changed,
        comparing each unchanged old cell with the changed candidates only (`CellSupportIndex.reassociate`)."""
        index = self._association_index(window, rule or self.association)
        return index.reassociate(check_xy(xy_m), np.asarray(serving, dtype=object), np.asarray(changed_cells, dtype=object))

    # ------------------------------------------------------- Algorithm 1 by spatial tiles
    def plan_tiles(self, window: str, n_samples: int, *, rng: int | np.random.Generator | None,
                   rows_per_tile: int = 50_000) -> list[dict[str, Any]]:
        """Split Algorithm 1's n_samples draws from f_j^O into spatial tiles, so each tile can be
        sampled and associated on its own with only the KDEs of the cells around it.

        f_j^O is an equal-weight mixture of kernels on its centres (the area model's positions;
        without one, the cells' KDEs weighted by their report counts), so grouping the centres
        into tiles (k-d median splits) and drawing each tile's count from a multinomial over the
        tiles' shares is exactly a draw from f_j^O. Returns [{"tile", "n_samples", "centres" |
        "cells", "weights"}], tiles numbered from 0.
        """
        gen = as_rng(rng)
        self._check_window(window)
        n_tiles = max(1, int(math.ceil(n_samples / max(1, rows_per_tile))))
        sel = self._rows[self._rows["window"] == window]
        if (sel["cell_id"] == AREA_CELL_ID).any():
            xy = self.kde(window, AREA_CELL_ID).positions_
            groups = _kd_split(xy, min(n_tiles, len(xy)))
            shares = np.array([len(g) for g in groups], dtype=float)
            counts = gen.multinomial(n_samples, shares / shares.sum())
            return [{"tile": t, "n_samples": int(k), "centres": g.astype(np.int64)}
                    for t, (g, k) in enumerate(zip(groups, counts))]
        counts_by_cell = self.n_reports_by_cell(window)
        cells = sorted(counts_by_cell)
        rows = sel.set_index("cell_id").loc[cells]
        if all(c in rows for c in _BOX_COLUMNS) and rows[list(_BOX_COLUMNS)].notna().all().all():
            centre = (rows[["x_min_m", "y_min_m"]].to_numpy(float) + rows[["x_max_m", "y_max_m"]].to_numpy(float)) / 2
            groups = _kd_split(centre, min(n_tiles, len(cells)))
        else:
            groups = [np.arange(len(cells))]
        weights = np.array([counts_by_cell[c] for c in cells], dtype=float)
        counts = gen.multinomial(n_samples, np.array([weights[g].sum() for g in groups]) / weights.sum())
        return [{"tile": t, "n_samples": int(k), "cells": [cells[i] for i in g], "weights": weights[g]}
                for t, (g, k) in enumerate(zip(groups, counts))]

    def sample_tile(self, window: str, tile: dict[str, Any], *, rng: int | np.random.Generator | None) -> np.ndarray:
        """(n, 2) draws of one `plan_tiles` tile: kernel centres of the tile, then kernel noise."""
        gen = as_rng(rng)
        n = int(tile["n_samples"])
        if "centres" in tile:
            kde = self.kde(window, AREA_CELL_ID)
            centres = kde.positions_[np.asarray(tile["centres"], dtype=np.int64)]
            return centres[gen.integers(0, len(centres), size=n)] + gen.normal(scale=kde.bandwidth_m_, size=(n, 2))
        weights = np.asarray(tile["weights"], dtype=float)
        picks = gen.choice(len(weights), size=n, p=weights / weights.sum())
        out = np.empty((n, 2))
        for i in np.unique(picks):
            mask = picks == i
            out[mask] = self.kde(window, tile["cells"][i]).sample(int(mask.sum()), rng=gen)
        return out

    def without_cache(self) -> DensityModels:
        """A copy that shares the table and loader but none of the loaded KDEs or indexes (what a
        Ray task should receive: it loads the KDEs it needs itself). Chosen scales are kept."""
        out = copy.copy(self)
        out._cache, out._index = {}, {}
        out.association_scale_ = dict(self.association_scale_)
        out.association_cv_ = dict(self.association_cv_)
        return out

    def associate_dense(self, window: str, xy_m: Any, *, rule: str | None = None) -> np.ndarray:
        """Reference: the same rule scoring every position against every cell of the window."""
        from cellsynth.density.transforms import associate_dense

        cells = self.cells(window)
        return associate_dense(cells, self._association_kdes(window, cells, rule), check_xy(xy_m),
                               log_prior=self.log_prior(window, cells, rule=rule))

    def _check_window(self, window: str) -> None:
        if window not in set(self._rows["window"]):
            raise SchemaError(f"kde_models: window {window!r} not trained (have: {', '.join(self.windows)})")


def _kd_split(xy: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Row indices of `xy` in n_groups spatially compact groups of near-equal size (median
    splits along the wider side; stable, so the same input always gives the same groups)."""
    def split(idx: np.ndarray, k: int) -> list[np.ndarray]:
        if k <= 1 or len(idx) <= 1:
            return [idx]
        pts = xy[idx]
        axis = int(np.argmax(pts.max(axis=0) - pts.min(axis=0)))
        order = idx[np.argsort(pts[:, axis], kind="stable")]
        k1 = k // 2
        cut = int(round(len(idx) * k1 / k))
        return split(order[:cut], k1) + split(order[cut:], k - k1)

    return split(np.arange(len(xy)), max(1, n_groups))


def _lake_root(lake: Any) -> str:
    for attr in ("root", "root_uri", "_root"):
        value = getattr(lake, attr, None)
        if value is not None:
            return str(value)
    raise SchemaError("lake: object exposes no root (expected attribute 'root')")


def kde_seed(seed: int, *parts: str) -> int:
    """Seed of one model's randomness (validation split, subsample) from the run's seed and its
    (window, cell) key, so a model does not change when other cells are added or removed."""
    import zlib

    return zlib.crc32(":".join([str(seed), *parts]).encode())


def kde_from_config(dcfg: Any, *, seed: int, window: str, cell_id: str) -> GaussianKDE2D:
    """The unfitted KDE the density stage (and `MDTSynthesizer`) fits for (window, cell_id):
    `dcfg` is a `DensityConfig` (bandwidth grid, validation share, Scott fallback)."""
    return GaussianKDE2D(
        bandwidth_grid_m=dcfg.bandwidth_grid_m, validation_fraction=dcfg.validation_fraction,
        min_reports=max(2, dcfg.min_reports), bandwidth_floor_m=dcfg.bandwidth_floor_m,
        random_state=kde_seed(seed, window, cell_id),
    )
