"""Pure pieces of synthetic MDT generation (GUMBLE Algorithm 1 plus the radio regression).

No sessions, paths or tables here: the stage reads the lake and hands plain frames and model
objects in. Anything model-like is duck-typed on the public contracts (`DensityModels`,
`RadioModels`), so tests pass small fakes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.spatial import cKDTree

from cellsynth.errors import ConfigError, NotFittedError, SchemaError, StageError
from cellsynth.schemas import (
    NEIGHBOUR_DETECTION_DBM, RSRP_RANGE_DBM, RSRP_STEP_DB, RSRQ_EXTENDED_RANGE_DB, RSRQ_STEP_DB, SYNTHETIC_MDT, cell_shard_of,
)
from cellsynth.splits import stable_argsort

LoadScenario = Literal["observed", "fixed", "quantile", "synthetic_traffic"]
NEIGHBOUR_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("cell_id", pa.string()),
    ("rsrp_dbm", pa.float64()),
    ("rsrp_dbm_epistemic_std", pa.float64()),
    ("rsrp_dbm_aleatoric_std", pa.float64()),
)


class _Prediction(Protocol):
    mean: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray


class RadioLike(Protocol):
    def cells(self, target: str) -> list[str]: ...

    def predict(self, target: str, cell_ids: np.ndarray, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None) -> _Prediction: ...


# ----------------------------------------------------------------------------- seeds, sizes
def derived_seed(seed: int, *parts: object) -> int:
    """A stable 32-bit seed from the run seed and labels (window, shard): same inputs, same rows."""
    key = ":".join([str(seed), *map(str, parts)]).encode()
    return zlib.crc32(key)


def sample_size(n_real: int, multiple: float) -> int:
    """Synthetic rows for a window: `multiple` x the held-in real reports (at least 1 when any)."""
    if n_real <= 0:
        return 0
    return max(1, int(round(n_real * multiple)))


def check_windows(requested: Sequence[str] | None, available: Sequence[str], *, key: str = "generate.windows") -> list[str]:
    """The windows to generate; every requested one must have trained models.

    Raises:
        ConfigError: a requested window has no density model (naming `key`, where it was asked for).
    """
    if requested is None:
        return sorted(available)
    have = set(available)
    problems = [
        f"{key}: unknown window {w!r} (have: {', '.join(sorted(have)) or 'none'})"
        for w in requested if w not in have
    ]
    if problems:
        raise ConfigError(problems)
    return list(dict.fromkeys(requested))


def listed_neighbours(n_neighbours: int, neighbour_detection: bool, any_neighbour_row: bool) -> int:
    """The neighbours a synthetic report lists: none when detection maps are learned from rows of which
    none is a neighbour's (serving-only logs: the maps report no neighbour anywhere, so the columns
    would only ever be null); otherwise `generate.n_neighbours`."""
    return 0 if neighbour_detection and not any_neighbour_row else n_neighbours


def check_n_neighbours(n_neighbours: int, n_cells_with_model: int) -> None:
    """N neighbours need N + 1 cells with an RSRP model (serving cell excluded).

    Raises:
        StageError: no cell has an RSRP model of its own (radio pooled every cell: too few reports each).
        ConfigError: fewer cells with a model than `generate.n_neighbours` asks for.
    """
    if n_cells_with_model == 0:
        raise StageError("generate: no cell has an RSRP model of its own (the radio stage pooled every cell: too few "
                         "training reports each); nothing to generate from")
    if n_neighbours > max(n_cells_with_model - 1, 0):
        raise ConfigError(
            f"generate.n_neighbours: {n_neighbours} neighbours requested but only "
            f"{max(n_cells_with_model - 1, 0)} other cells have an RSRP model "
            f"({n_cells_with_model} in all); expected at most {max(n_cells_with_model - 1, 0)}"
        )


# ------------------------------------------------------------------------------ load scenarios
def effective_load_scenario(scenario: LoadScenario, observed: pd.DataFrame | None) -> LoadScenario:
    """The load scenario generation runs: "observed" and "quantile" read the reports' loads, and where
    no report has one (no traffic counters were joined: drive tests alone, the README's own-data
    example) there is nothing to observe, so "fixed" at `generate.load_rho` (callers say so in the
    stage note and the rows' `scenario` column) instead of a ConfigError after every model was
    trained. The radio stage then fitted RSRQ without load terms (`radio.transforms.rsrq_uses_load`),
    so the value moves no synthetic RSRQ."""
    if scenario in ("observed", "quantile") and (
            observed is None or "load_rho" not in observed or observed["load_rho"].notna().sum() == 0):
        return "fixed"
    return scenario


def cell_loads(
    scenario: LoadScenario,
    *,
    observed: pd.DataFrame | None = None,
    synthetic_traffic: pd.DataFrame | None = None,
    fixed_rho: float = 0.5,
    quantile: float = 0.9,
) -> pd.DataFrame:
    """Load rho per (window, cell_id) for a load scenario, plus a per-window fallback row.

    Args:
        scenario: "observed" (mean observed load of the cell in the window), "fixed" (`fixed_rho`
            everywhere), "quantile" (the cell's `quantile` load in the window), "synthetic_traffic"
            (mean load_rho of the synthetic traffic table per cell and window).
        observed: frame with window, serving_cell_id (or cell_id), load_rho (real reports).
        synthetic_traffic: frame with window, cell_id, load_rho.

    Returns:
        Frame window, cell_id, load_rho; rows with cell_id None give the window-wide value used
        for cells without their own. Empty for "fixed" (use `fixed_rho` directly).

    Raises:
        ConfigError: the scenario needs load data that is absent.
    """
    if scenario == "fixed":
        return pd.DataFrame({"window": pd.Series(dtype=object), "cell_id": pd.Series(dtype=object), "load_rho": pd.Series(dtype=float)})
    if scenario == "synthetic_traffic":
        src = synthetic_traffic
        if src is None or src.empty or src["load_rho"].notna().sum() == 0:
            raise ConfigError(
                "generate.load_scenario: 'synthetic_traffic' needs the synthetic_traffic table, which is "
                "missing or empty (run the traffic stage, or choose observed|fixed|quantile)"
            )
    else:
        src = observed
        if src is None or src.empty or "load_rho" not in src or src["load_rho"].notna().sum() == 0:
            raise ConfigError(
                f"generate.load_scenario: {scenario!r} needs load_rho in mdt_reports, which has none "
                "(no traffic counters were joined); choose 'fixed' or 'synthetic_traffic'"
            )
        if "cell_id" not in src:
            src = src.rename(columns={"serving_cell_id": "cell_id"})
    src = src.loc[src["load_rho"].notna(), ["window", "cell_id", "load_rho"]]
    if scenario == "quantile":
        per_cell = src.groupby(["window", "cell_id"], sort=True)["load_rho"].quantile(quantile)
        per_window = src.groupby("window", sort=True)["load_rho"].quantile(quantile)
    else:
        per_cell = src.groupby(["window", "cell_id"], sort=True)["load_rho"].mean()
        per_window = src.groupby("window", sort=True)["load_rho"].mean()
    out = per_cell.reset_index()
    fallback = per_window.reset_index().assign(cell_id=None)
    return pd.concat([out, fallback[["window", "cell_id", "load_rho"]]], ignore_index=True)


def loads_for(window: str, cell_ids: np.ndarray, table: pd.DataFrame, *, default_rho: float) -> np.ndarray:
    """Load rho for each row's cell in `window` from a `cell_loads` table (window value, else default)."""
    sel = table[table["window"] == window]
    per_cell = {c: r for c, r in zip(sel["cell_id"], sel["load_rho"]) if c is not None and not pd.isna(c)}
    window_rows = sel[sel["cell_id"].isna()]
    fallback = float(window_rows["load_rho"].iloc[0]) if len(window_rows) else default_rho
    return np.array([per_cell.get(c, fallback) for c in np.asarray(cell_ids)], dtype=float)


# ----------------------------------------------------------------------------- neighbours
class CellIndex:
    """KD-tree over cell positions: the candidate neighbours of a position."""

    def __init__(self, cell_ids: Sequence[str], xy_m: np.ndarray):
        self.cell_ids = np.asarray(cell_ids, dtype=object)
        self.xy_m = np.asarray(xy_m, dtype=float).reshape(-1, 2)
        self._tree = cKDTree(self.xy_m) if len(self.cell_ids) else None

    def candidates(self, xy_m: np.ndarray, *, radius_m: float, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to `k` nearest cells within `radius_m` of each position.

        Returns:
            (row index, cell id) pairs as two flat arrays, in row order then distance order.
        """
        rows, idx = self.candidate_index(xy_m, radius_m=radius_m, k=k)
        return rows, self.cell_ids[idx]

    def candidate_index(self, xy_m: np.ndarray, *, radius_m: float, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`candidates` with each cell as its index into `cell_ids` (int64)."""
        xy = np.asarray(xy_m, dtype=float).reshape(-1, 2)
        if self._tree is None or len(xy) == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        k = min(k, len(self.cell_ids))
        dist, idx = self._tree.query(xy, k=k, distance_upper_bound=radius_m)
        dist, idx = dist.reshape(len(xy), k), idx.reshape(len(xy), k)
        keep = np.isfinite(dist)
        rows = np.broadcast_to(np.arange(len(xy))[:, None], keep.shape)[keep]
        return rows.astype(np.int64), idx[keep].astype(np.int64)


def strongest_neighbours(
    n_rows: int,
    rows: np.ndarray,
    cell_ids: np.ndarray,
    mean_dbm: np.ndarray,
    epistemic_std: np.ndarray,
    aleatoric_std: np.ndarray,
    *,
    serving_cell_ids: np.ndarray,
    n_neighbours: int,
    detection_dbm: float = NEIGHBOUR_DETECTION_DBM,
) -> pd.DataFrame:
    """Per row, the `n_neighbours` candidates with the strongest RSRP (predicted or drawn).

    The serving cell and candidates below `detection_dbm` are dropped; ties go to the
    smaller cell id so the choice is deterministic. Rows with fewer detected cells get nulls.

    Returns:
        Frame of `n_rows` rows with neighbour_{k}_cell_id, neighbour_{k}_rsrp_dbm,
        neighbour_{k}_rsrp_dbm_epistemic_std, neighbour_{k}_rsrp_dbm_aleatoric_std (k = 1..N).
    """
    cand = pd.DataFrame({
        "row": np.asarray(rows, dtype=np.int64), "cell_id": np.asarray(cell_ids, dtype=object),
        "rsrp_dbm": np.asarray(mean_dbm, dtype=float), "rsrp_dbm_epistemic_std": np.asarray(epistemic_std, dtype=float),
        "rsrp_dbm_aleatoric_std": np.asarray(aleatoric_std, dtype=float),
    })
    serving = np.asarray(serving_cell_ids, dtype=object)
    if len(cand):
        cand = cand[(cand["cell_id"].to_numpy() != serving[cand["row"].to_numpy()]) & (cand["rsrp_dbm"] >= detection_dbm)]
        cand = cand.sort_values(["row", "rsrp_dbm", "cell_id"], ascending=[True, False, True], kind="mergesort")
        cand["rank"] = cand.groupby("row").cumcount() + 1
        cand = cand[cand["rank"] <= n_neighbours]
    out: dict[str, Any] = {}
    for k in range(1, n_neighbours + 1):
        sel = cand[cand["rank"] == k] if len(cand) else cand
        for name, _ in NEIGHBOUR_FIELDS:
            col = np.full(n_rows, None if name == "cell_id" else np.nan, dtype=object if name == "cell_id" else float)
            if len(sel):
                col[sel["row"].to_numpy()] = sel[name].to_numpy()
            out[f"neighbour_{k}_{name}"] = col
    return pd.DataFrame(out, index=pd.RangeIndex(n_rows))


# ------------------------------------------------------------------------------ detection
class DetectionMaps:
    """P(cell reported as a neighbour | position): smoothed per-cell detection rates on a grid.

    The radio models are trained on the values a UE reported, i.e. only where a cell was
    detected, so their means say nothing about *whether* a cell shows up in a report (far from a
    cell they sit near the detection floor, not below it). Which cells a report lists is itself
    a strong spatial signal (GUMBLE 6.4 fingerprints it), so generation thins the candidate
    neighbours with these maps. Each square's rate is the Gaussian-smoothed count of held-in
    reports listing the cell as a neighbour over the smoothed count of reports not served by it.

    Stored per cell only over the box of squares where it was heard, widened by the smoothing
    kernel's reach (scipy's gaussian_filter: int(4 s + 0.5) squares): outside it the smoothed
    count of neighbour listings is exactly 0, so the rate is 0 there too. The values inside equal
    those of a dense n_cells x n_squares map (each output square sees the same inputs, in the
    same order; the filter runs on the box widened by the reach once more), whose memory grew
    with cells x area, i.e. with the square of the network's size (issue 15).
    """

    def __init__(self, *, resolution_m: float = 100.0, smoothing_squares: float = 1.0, margin_m: float = 500.0):
        self.resolution_m = resolution_m
        self.smoothing_squares = smoothing_squares
        self.margin_m = margin_m

    def fit(self, measurements: pd.DataFrame) -> DetectionMaps:
        """measurements: held-in mdt_measurements rows (cell_id, role, x_m, y_m; ids may be categories)."""
        from scipy.ndimage import gaussian_filter

        missing = [c for c in ("cell_id", "role", "x_m", "y_m") if c not in measurements]
        if missing:
            raise SchemaError(f"mdt_measurements: column '{missing[0]}' missing (have: {', '.join(measurements.columns[:8])})")
        is_serving = (measurements["role"] == "serving").to_numpy()
        serving, neighbours = measurements[is_serving], measurements[~is_serving]
        self.cell_ids_ = np.array(sorted(set(neighbours["cell_id"].to_numpy(dtype=object))), dtype=object)
        n_cells = len(self.cell_ids_)
        xy = serving[["x_m", "y_m"]].to_numpy(dtype=float)
        # per cell: its box (x0, y0, nx, ny) in squares and its offset into one flat float32 array
        self.box_ = np.zeros((n_cells, 4), dtype=np.int64)
        self.offset_ = np.zeros(n_cells + 1, dtype=np.int64)
        self.values_ = np.zeros(0, dtype=np.float32)
        if len(xy) == 0 or n_cells == 0:
            self.origin_m_, self.shape_ = np.zeros(2), (0, 0)
            return self
        self.origin_m_ = xy.min(axis=0) - self.margin_m
        self.shape_ = tuple(int(v) + 1 for v in np.floor((xy.max(axis=0) + self.margin_m - self.origin_m_) / self.resolution_m))
        s = self.smoothing_squares
        reach = int(4.0 * float(s) + 0.5)  # gaussian_filter's default truncate = 4.0
        den_all = gaussian_filter(self._counts(xy), s)
        sx, sy, s_in = self._squares(xy)
        s_layer = pd.Index(self.cell_ids_).get_indexer(serving["cell_id"].to_numpy(dtype=object))
        hx, hy, h_in = self._squares(neighbours[["x_m", "y_m"]].to_numpy(dtype=float))
        h_layer = pd.Index(self.cell_ids_).get_indexer(neighbours["cell_id"].to_numpy(dtype=object))
        s_rows = rows_by_layer(np.where(s_in, s_layer, -1), n_cells)
        h_rows = rows_by_layer(np.where(h_in, h_layer, -1), n_cells)
        parts = []
        for i in range(n_cells):
            rows = h_rows[i]
            if not len(rows):
                self.offset_[i + 1] = self.offset_[i]
                continue
            box = _widen(hx[rows].min(), hx[rows].max(), hy[rows].min(), hy[rows].max(), reach, self.shape_)
            ext = _widen(box[0], box[1], box[2], box[3], reach, self.shape_)
            ex0, ex1, ey0, ey1 = ext
            heard = np.zeros((ex1 - ex0 + 1, ey1 - ey0 + 1))
            np.add.at(heard, (hx[rows] - ex0, hy[rows] - ey0), 1.0)
            served = np.zeros_like(heard)
            srows = s_rows[i]
            if len(srows):
                gx, gy = sx[srows], sy[srows]
                ok = (gx >= ex0) & (gx <= ex1) & (gy >= ey0) & (gy <= ey1)
                np.add.at(served, (gx[ok] - ex0, gy[ok] - ey0), 1.0)
            inner = (slice(box[0] - ex0, box[1] - ex0 + 1), slice(box[2] - ey0, box[3] - ey0 + 1))
            num = gaussian_filter(heard, s)[inner]
            den = den_all[box[0]:box[1] + 1, box[2]:box[3] + 1] - gaussian_filter(served, s)[inner]
            prob = np.where(den > 1e-3, num / np.maximum(den, 1e-9), 0.0).clip(0.0, 1.0).astype(np.float32)
            self.box_[i] = (box[0], box[2], prob.shape[0], prob.shape[1])
            self.offset_[i + 1] = self.offset_[i] + prob.size
            parts.append(prob.ravel())
        self.values_ = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return self

    def _squares(self, xy_m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = np.floor((np.asarray(xy_m, dtype=float).reshape(-1, 2) - self.origin_m_) / self.resolution_m).astype(np.int64)
        inside = (g[:, 0] >= 0) & (g[:, 0] < self.shape_[0]) & (g[:, 1] >= 0) & (g[:, 1] < self.shape_[1])
        return np.clip(g[:, 0], 0, max(self.shape_[0] - 1, 0)), np.clip(g[:, 1], 0, max(self.shape_[1] - 1, 0)), inside

    def _counts(self, xy_m: np.ndarray) -> np.ndarray:
        out = np.zeros(self.shape_)
        gx, gy, inside = self._squares(xy_m)
        np.add.at(out, (gx[inside], gy[inside]), 1.0)
        return out

    def prob(self, cell_ids: np.ndarray, xy_m: np.ndarray) -> np.ndarray:
        """Detection probability of cell_ids[i] at xy_m[i] (0 outside the area or for unheard cells)."""
        if not hasattr(self, "values_"):
            raise NotFittedError("DetectionMaps is not fitted; call fit() first")
        layer = pd.Index(self.cell_ids_).get_indexer(np.asarray(cell_ids, dtype=object)).astype(np.int64)  # -1: unheard
        gx, gy, inside = self._squares(xy_m)
        ok = inside & (layer >= 0)
        box = self.box_[np.maximum(layer, 0)] if len(self.box_) else np.zeros((len(layer), 4), dtype=np.int64)
        lx, ly = gx - box[:, 0], gy - box[:, 1]
        ok &= (lx >= 0) & (lx < box[:, 2]) & (ly >= 0) & (ly < box[:, 3])
        out = np.zeros(len(layer))
        out[ok] = self.values_[self.offset_[layer[ok]] + lx[ok] * box[ok, 3] + ly[ok]]
        return out


def rows_by_layer(layer: np.ndarray, n_layers: int) -> list[np.ndarray]:
    """Row indices of each layer 0..n_layers-1 (rows with layer -1 dropped), in row order (one
    sort, not a pass per layer)."""
    order = np.argsort(layer, kind="stable")
    cuts = np.searchsorted(layer[order], np.arange(n_layers + 1))
    return [order[cuts[i]:cuts[i + 1]] for i in range(n_layers)]


def _widen(x0: int, x1: int, y0: int, y1: int, by: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive square box (x0, x1, y0, y1) widened by `by` squares, clipped to the grid."""
    return (max(int(x0) - by, 0), min(int(x1) + by, shape[0] - 1), max(int(y0) - by, 0), min(int(y1) + by, shape[1] - 1))


# ------------------------------------------------------------------------------ one shard
def reported_values(mean: np.ndarray, total_std: np.ndarray, z: np.ndarray | None, lo_hi: tuple[float, float],
                    step: float) -> tuple[np.ndarray, np.ndarray]:
    """Values as a UE reports them (on the reporting step, inside the range `lo_hi`) and a mask of
    those that fell outside the range and were clipped to it; z None: the means, clipped."""
    mean = np.asarray(mean, dtype=float)
    if z is None:  # values="mean"
        raw = mean
        out = np.clip(mean, *lo_hi)
    else:
        # GUMBLE eq. 17: y ~ N(mu, sigma), or the radio model's Student-t of std sigma (z from `_t_draws`);
        # a UE reports on a grid (TS 36.133: 1 dB RSRP, 0.5 dB RSRQ).
        raw = mean + total_std * z
        out = quantise(raw, step, lo_hi)
    # Half a reporting step of slack: a value that rounds onto the bound is a report, not a clip.
    clipped = (raw < lo_hi[0] - step / 2) | (raw > lo_hi[1] + step / 2)
    return out, clipped


def _t_draws(z: np.ndarray | None, dof: np.ndarray) -> np.ndarray | None:
    """Standard normal draws made before the prediction, turned into draws of the predictive the
    radio model states: unit-std Student-t with its dof per row (`calibration.normal_to_std_t`;
    unchanged where dof is inf). None (values="mean") stays None."""
    if z is None or not np.isfinite(dof).any():
        return z
    from cellsynth.radio.calibration import normal_to_std_t  # the radio package (torch) only when a model has a t

    return normal_to_std_t(z, dof)


def quantise(values: np.ndarray, step: float, lo_hi: tuple[float, float]) -> np.ndarray:
    """Round to the UE reporting step and clip to the reporting range."""
    return np.clip(np.round(np.asarray(values, dtype=float) / step) * step, *lo_hi)


def unique_str(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)`, the same
    arrays, by hashing the ids first (pandas.factorize) and sorting only the distinct ones:
    np.unique sorted every id as a string (0.7 s for a window's ~1.2M RSRP requests at 10^3 cells,
    paid several times per generation). Ids that are not all strings take np.unique itself."""
    obj = np.asarray(values, dtype=object).reshape(-1)
    if len(obj):
        codes, distinct = pd.factorize(obj, use_na_sentinel=False)
        if all(isinstance(d, str) for d in distinct):
            uniq, remap = np.unique(np.asarray(distinct, dtype=object).astype(str), return_inverse=True)
            return uniq, remap.reshape(-1)[codes]
    return np.unique(obj.astype(str), return_inverse=True)


def shards_of_ids(cell_ids: Any, n_shards: int) -> np.ndarray:
    """The cell shard of each id (`schemas.cell_shard_of`, crc32), hashed once per distinct id."""
    uniq, inv = unique_str(cell_ids)
    return np.array([cell_shard_of(str(c), n_shards) for c in uniq], dtype=np.int64)[inv.reshape(-1)]


# Cells whose posterior is solved at a time when predictions are pooled: each exact-GP cell holds
# its Cholesky factor and distance matrices (~70 MB at 1,500 rows), so a memory bound.
PREDICT_CELLS_AT_ONCE = 8


def predict_pooled(radio: RadioLike, target: str, cell_ids: np.ndarray, xy_m: np.ndarray, *,
                   load_rho: np.ndarray | None = None, with_dof: bool = False) -> tuple[np.ndarray, ...]:
    """(mean, epistemic std, aleatoric std[, dof]) of every row, predicted a few model cells at a
    time so each cell's posterior is solved once for all its rows and released after
    (`radio.release()` when the models have it): memory stays bounded however many cells the rows
    touch. `with_dof`: also the Student-t degrees of freedom of the predictive per row (inf:
    Gaussian, also for predictions that carry none)."""
    uniq, inv = unique_str(cell_ids)
    ids = uniq[inv]  # == np.asarray(cell_ids, dtype=object).astype(str)
    n = len(ids)
    mean, epi, ale = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    dof = np.full(n, np.inf)
    if n == 0:
        return (mean, epi, ale, dof) if with_dof else (mean, epi, ale)
    order = stable_argsort(inv)
    cuts = np.searchsorted(inv[order], np.arange(0, len(uniq), PREDICT_CELLS_AT_ONCE))
    release = getattr(radio, "release", None)
    for lo, hi in zip(cuts, [*cuts[1:], n]):
        rows = order[lo:hi]
        pred = radio.predict(target, ids[rows], xy_m[rows], load_rho=None if load_rho is None else load_rho[rows])
        mean[rows] = np.asarray(pred.mean, dtype=float)
        epi[rows] = np.asarray(pred.epistemic_std, dtype=float)
        ale[rows] = np.asarray(pred.aleatoric_std, dtype=float)
        if getattr(pred, "dof", None) is not None:
            dof[rows] = np.broadcast_to(np.asarray(pred.dof, dtype=float), (len(rows),))
        if release is not None:
            release()
    return (mean, epi, ale, dof) if with_dof else (mean, epi, ale)


def synthesize(
    positions: pd.DataFrame,
    radio: RadioLike,
    cell_index: CellIndex,
    *,
    load_rho: np.ndarray | None,
    n_neighbours: int,
    neighbour_radius_m: float,
    neighbour_candidates: int,
    epistemic_threshold_db: float,
    values: Literal["sample", "mean"] = "sample",
    detection: DetectionMaps | None = None,
    rsrp_range_dbm: tuple[float, float] = RSRP_RANGE_DBM,
    rsrq_range_db: tuple[float, float] = RSRQ_EXTENDED_RANGE_DB,
    rng: int | np.random.Generator,
) -> pd.DataFrame:
    """Radio values for sampled, associated positions (the regression half of generation).

    With values="sample" every value is drawn (eq. 17) and quantised to the UE reporting grid;
    a candidate neighbour is reported with its `detection` probability (all candidates when
    None), its drawn value is floored at the detection threshold and capped at the serving
    cell's drawn value (the serving cell is the strongest reported one), and the N strongest
    drawn values are kept. values="mean" writes predictive means and keeps candidates whose
    mean clears the threshold (and whose detection probability is at least 0.5).

    Args:
        positions: sample_id, window, x_m, y_m, serving_cell_id (one window, any cells).
        radio: `RadioModels`-like (`cells(target)`, `predict(target, cell_ids, xy_m, load_rho=)`).
        load_rho: per-row load for RSRQ (None: no RSRQ is generated).
        rsrp_range_dbm, rsrq_range_db: the reporting ranges values keep to (the run passes
            ingest's, the ranges real values were accepted in).

    Returns:
        positions plus rsrp_dbm, rsrq_db, their *_epistemic_std/*_aleatoric_std, load_rho,
        reliable, clipped (a serving value was clipped to its range) and the
        neighbour_{k}_* columns.
    """
    return synthesize_many(
        [(positions, load_rho, rng)], radio, cell_index, n_neighbours=n_neighbours, neighbour_radius_m=neighbour_radius_m,
        neighbour_candidates=neighbour_candidates, epistemic_threshold_db=epistemic_threshold_db, values=values,
        detection=detection, rsrp_range_dbm=rsrp_range_dbm, rsrq_range_db=rsrq_range_db,
    )[0]


def synthesize_many(
    jobs: Sequence[tuple[pd.DataFrame, np.ndarray | None, int | np.random.Generator]],
    radio: RadioLike,
    cell_index: CellIndex,
    *,
    n_neighbours: int,
    neighbour_radius_m: float,
    neighbour_candidates: int,
    epistemic_threshold_db: float,
    values: Literal["sample", "mean"] = "sample",
    detection: DetectionMaps | None = None,
    requests_only: bool = False,
    plans: list[dict[str, Any]] | None = None,
    rsrp_range_dbm: tuple[float, float] = RSRP_RANGE_DBM,
    rsrq_range_db: tuple[float, float] = RSRQ_EXTENDED_RANGE_DB,
) -> list[Any]:
    """`synthesize` for several (positions, load_rho, rng) jobs (a task's windows x shards) with
    the radio predictions pooled: every job first makes its random draws from its own rng (in
    the order a lone `synthesize` makes them, so a job's rows do not depend on its company),
    then one pooled prediction per target solves each model cell once for all jobs.
    `requests_only`: stop once the radio has been asked (the draws and the predict calls are
    those of a full run) and build no rows: the Ray path's recording pass (`generate.stage`)
    needs only the calls; it returns each job's draws (`compact_plan`), which `plans` takes
    back so the replay pass makes no draw, neighbour search or detection lookup again (the same
    draws: they come from the job's own rng before any prediction)."""
    sample = values == "sample"
    if plans is None:
        plans = draw_plans(jobs, radio, cell_index, n_neighbours=n_neighbours, neighbour_radius_m=neighbour_radius_m,
                           neighbour_candidates=neighbour_candidates, sample=sample, detection=detection)
    else:
        plans = [expand_plan(p, positions, cell_index) for p, (positions, _, _) in zip(plans, jobs)]

    # Pooled predictions: RSRP of serving and neighbour rows together, RSRQ of serving rows.
    p_ids = np.concatenate([np.concatenate([p["serving"], p["nb_cells"]]) for p in plans]) if plans else np.empty(0, object)
    p_xy = np.concatenate([np.vstack([p["xy"], p["xy"][p["nb_rows"]]]) for p in plans]) if plans else np.empty((0, 2))
    rsrp = predict_pooled(radio, "rsrp", p_ids, p_xy.reshape(-1, 2), with_dof=True)
    q_plans = [p for p in plans if p["rsrq"]]
    rsrq = None
    if q_plans:
        rsrq = predict_pooled(radio, "rsrq", np.concatenate([p["serving"] for p in q_plans]),
                              np.vstack([p["xy"] for p in q_plans]),
                              load_rho=np.concatenate([np.asarray(p["load_rho"], dtype=float) for p in q_plans]), with_dof=True)
    if requests_only:
        return [compact_plan(p) for p in plans]

    outs, at, at_q = [], 0, 0
    for (positions, load_rho, _), plan in zip(jobs, plans):
        n, n_nb = plan["n"], len(plan["nb_rows"])
        mean, epi, ale, dof = (v[at:at + n] for v in rsrp)
        nb_mean, nb_epi, nb_ale, nb_dof = (v[at + n:at + n + n_nb] for v in rsrp)
        at += n + n_nb
        out = positions.reset_index(drop=True).copy()
        serving_dbm, clipped = reported_values(mean, np.hypot(epi, ale), _t_draws(plan["z"], dof), rsrp_range_dbm,
                                               RSRP_STEP_DB)
        out["rsrp_dbm"] = serving_dbm
        out["rsrp_dbm_epistemic_std"] = epi
        out["rsrp_dbm_aleatoric_std"] = ale
        out["reliable"] = epi < epistemic_threshold_db
        out["load_rho"] = np.asarray(load_rho, dtype=float) if load_rho is not None else np.nan
        for col in ("rsrq_db", "rsrq_db_epistemic_std", "rsrq_db_aleatoric_std"):
            out[col] = np.nan
        if plan["rsrq"]:
            q_mean, q_epi, q_ale, q_dof = (v[at_q:at_q + n] for v in rsrq)
            at_q += n
            out["rsrq_db"], rsrq_clipped = reported_values(q_mean, np.hypot(q_epi, q_ale), _t_draws(plan["z_q"], q_dof),
                                                           rsrq_range_db, RSRQ_STEP_DB)
            clipped = clipped | rsrq_clipped
            out["rsrq_db_epistemic_std"] = q_epi
            out["rsrq_db_aleatoric_std"] = q_ale
        # Issue 20 item 8: values stay inside the ingest ranges; a row whose serving RSRP or RSRQ
        # draw left them says so (neighbours are clipped the same way but not flagged).
        out["clipped"] = clipped
        if n_neighbours > 0:
            rows, cells = plan["nb_rows"], plan["nb_cells"]
            if n_nb and sample:
                drawn = nb_mean + np.hypot(nb_epi, nb_ale) * _t_draws(plan["z_nb"], nb_dof)
                if detection is not None:  # reported, so at or above the detection floor
                    drawn = np.maximum(drawn, NEIGHBOUR_DETECTION_DBM)
                nb_dbm = np.minimum(quantise(drawn, RSRP_STEP_DB, rsrp_range_dbm), serving_dbm[rows])
            else:
                nb_dbm = nb_mean
            nb = strongest_neighbours(n, rows, cells, nb_dbm, nb_epi, nb_ale, serving_cell_ids=plan["serving"],
                                      n_neighbours=n_neighbours)
            out = pd.concat([out, nb], axis=1)
        outs.append(out)
    return outs


def draw_plans(jobs: Sequence[tuple[pd.DataFrame, np.ndarray | None, int | np.random.Generator]], radio: RadioLike,
               cell_index: CellIndex, *, n_neighbours: int, neighbour_radius_m: float, neighbour_candidates: int,
               sample: bool, detection: DetectionMaps | None) -> list[dict[str, Any]]:
    """Each job's random draws and reported neighbour candidates (`synthesize_many`'s first pass,
    in the order a lone `synthesize` makes them)."""
    modelled = np.array(sorted(radio.cells("rsrp")), dtype=object) if n_neighbours > 0 else None
    # whether each indexed cell has an RSRP model, once (hash lookup: np.isin on object arrays sorts them)
    has_model = (pd.Index(modelled).get_indexer(cell_index.cell_ids) >= 0) if n_neighbours > 0 else None
    rsrq_model_cells = set(radio.cells("rsrq"))
    plans = []
    for positions, load_rho, rng in jobs:
        gen = np.random.default_rng(rng)
        n = len(positions)
        xy = positions[["x_m", "y_m"]].to_numpy(dtype=float)
        serving = positions["serving_cell_id"].to_numpy(dtype=object)
        plan: dict[str, Any] = {"n": n, "xy": xy, "serving": serving, "load_rho": load_rho}
        plan["z"] = gen.standard_normal(n) if sample else None
        plan["rsrq"] = bool(rsrq_model_cells) and load_rho is not None and n > 0
        plan["z_q"] = gen.standard_normal(n) if (plan["rsrq"] and sample) else None
        rows, codes = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        if n_neighbours > 0:
            rows, codes = cell_index.candidate_index(xy, radius_m=neighbour_radius_m, k=neighbour_candidates)
            keep = has_model[codes] & (cell_index.cell_ids[codes] != serving[rows])
            rows, codes = rows[keep], codes[keep]
            if detection is not None and len(rows):
                p_detect = detection.prob(cell_index.cell_ids[codes], xy[rows])
                heard = gen.random(len(rows)) < p_detect if sample else p_detect >= 0.5
                rows, codes = rows[heard], codes[heard]
        plan["nb_rows"], plan["nb_codes"], plan["nb_cells"] = rows, codes, cell_index.cell_ids[codes]
        plan["z_nb"] = gen.standard_normal(len(rows)) if (sample and len(rows)) else None
        plans.append(plan)
    return plans


def compact_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan without what its positions give again (xy, serving ids) and with neighbour cells as
    indices: what the Ray replay pass is sent (numbers only, no Python strings to pickle)."""
    return {k: v for k, v in plan.items() if k not in ("xy", "serving", "nb_cells")}


def expand_plan(plan: dict[str, Any], positions: pd.DataFrame, cell_index: CellIndex) -> dict[str, Any]:
    """`compact_plan` undone on the same positions and cell index."""
    if plan["n"] != len(positions):
        raise ValueError("expand_plan: the plan was drawn for other positions")
    return {**plan, "xy": positions[["x_m", "y_m"]].to_numpy(dtype=float),
            "serving": positions["serving_cell_id"].to_numpy(dtype=object), "nb_cells": cell_index.cell_ids[plan["nb_codes"]]}


def to_table(frame: pd.DataFrame, *, n_neighbours: int, scenario: str, run_id: str, n_cell_shards: int) -> pa.Table:
    """A `synthetic_mdt` Arrow table with typed neighbour columns (nulls stay typed across shards)."""
    frame = frame.reset_index(drop=True).copy()
    frame["scenario"] = scenario
    frame["run_id"] = run_id
    frame["cell_shard"] = shards_of_ids(frame["serving_cell_id"].to_numpy(dtype=object), n_cell_shards).astype(np.int32)
    if "ts" not in frame:
        frame["ts"] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us, UTC]")
    for name, value in SYNTHETIC_MDT.defaults:  # columns with a schema default (network_scenario)
        if name not in frame:
            frame[name] = value
    fields = [f for f in SYNTHETIC_MDT.schema]
    for k in range(1, n_neighbours + 1):
        fields += [pa.field(f"neighbour_{k}_{name}", typ, nullable=True) for name, typ in NEIGHBOUR_FIELDS]
    missing = [f.name for f in fields if f.name not in frame.columns]
    if missing:
        raise SchemaError(f"synthetic_mdt: column '{missing[0]}' missing (have: {', '.join(frame.columns[:8])}, ...)")
    arrays = []
    for f in fields:
        values = frame[f.name]
        if pa.types.is_string(f.type):
            values = values.astype(object).where(values.notna(), None)
        arrays.append(pa.array(values, type=f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def associate_positions(density: Any, window: str, n_samples: int, *, rng: int | np.random.Generator) -> pd.DataFrame:
    """Algorithm 1 for one window in one piece: n positions from f_j^O, each with its eq. 15
    serving cell (the stage works by tiles, `plan_tiles` / `tile_positions`)."""
    gen = np.random.default_rng(rng)
    xy = np.asarray(density.sample_positions(window, n_samples, rng=gen), dtype=float).reshape(-1, 2)
    serving = np.asarray(density.associate(window, xy), dtype=object)
    return pd.DataFrame({
        "sample_id": [f"syn-{window}-{i:09d}" for i in range(len(xy))],
        "window": window, "x_m": xy[:, 0], "y_m": xy[:, 1], "serving_cell_id": serving,
    })


def plan_tiles(density: Any, window: str, n_samples: int, *, rng: int | np.random.Generator,
               rows_per_tile: int) -> list[dict[str, Any]]:
    """Algorithm 1's draws of a window split into spatial tiles (`DensityModels.plan_tiles`); a
    density without tiles (a test fake) is one tile of the whole window."""
    if hasattr(density, "plan_tiles"):
        return density.plan_tiles(window, n_samples, rng=rng, rows_per_tile=rows_per_tile)
    return [{"tile": 0, "n_samples": int(n_samples)}]


def tile_positions(density: Any, window: str, tile: Mapping[str, Any], *, rng: int | np.random.Generator) -> pd.DataFrame:
    """One tile's positions with their serving cells; sample ids are unique per (window, tile)."""
    gen = np.random.default_rng(rng)
    n = int(tile["n_samples"])
    if hasattr(density, "sample_tile"):
        xy = np.asarray(density.sample_tile(window, dict(tile), rng=gen), dtype=float).reshape(-1, 2)
    else:
        xy = np.asarray(density.sample_positions(window, n, rng=gen), dtype=float).reshape(-1, 2)
    serving = np.asarray(density.associate(window, xy), dtype=object) if len(xy) else np.empty(0, dtype=object)
    t = int(tile["tile"])
    return pd.DataFrame({
        "sample_id": np.char.add(f"syn-{window}-{t:04d}-", np.char.zfill(np.arange(len(xy)).astype(str), 8)).astype(object),
        "window": window, "x_m": xy[:, 0], "y_m": xy[:, 1], "serving_cell_id": serving,
    })


def empty_positions() -> pd.DataFrame:
    return pd.DataFrame({"sample_id": pd.Series(dtype=object), "window": pd.Series(dtype=object),
                         "x_m": pd.Series(dtype=float), "y_m": pd.Series(dtype=float),
                         "serving_cell_id": pd.Series(dtype=object)})


def shard_groups(positions: pd.DataFrame, n_cell_shards: int) -> Mapping[int, pd.DataFrame]:
    """Positions grouped by the cell shard of their serving cell (one Ray task per group).

    Each group's sample ids get the shard after the window ("syn-W-0003-..."): an incremental
    run redraws a window and keeps the rows of only the shards it regenerates, so the kept
    shards' rows come from an older draw whose per-tile numbering repeats the new one's; with the
    shard in the id, ids stay unique across partitions whichever draw each came from."""
    ids = positions["serving_cell_id"].to_numpy(dtype=object)
    shards = shards_of_ids(ids, n_cell_shards)
    groups = {}
    for s in np.unique(shards):
        group = positions[shards == s].reset_index(drop=True)
        if "sample_id" in group:
            group["sample_id"] = _with_shard(group["sample_id"], group["window"], int(s))
        groups[int(s)] = group
    return groups


def _with_shard(sample_ids: pd.Series, windows: pd.Series, shard: int) -> pd.Series:
    """"syn-W-rest" -> "syn-W-SSSS-rest" (vectorised per window)."""
    out = sample_ids.astype(object).copy()
    for w in pd.unique(windows):
        rows = (windows == w).to_numpy()
        head = f"syn-{w}"
        out[rows] = f"{head}-{shard:04d}" + sample_ids[rows].astype(str).str.slice(len(head))
    return out
