"""Radio accuracy and calibration on real drive tests: our model (`cellsynth.radio.model.fit_cells`)
against kNN, random forest and GP, per cell, on the same rows, on two splits.

One YAML per dataset under bench/datasets/ says where the data is and how to read it (the
ingest source adapters of `cellsynth.ingest.sources`, kind "radio"), which rows to keep, how
duplicates are dropped, what a cell is and which column weighs a row. `--dataset` takes a name
from bench/datasets/ or a path to such a YAML anywhere (an operator's own data).

Splits (issue 14): `random` = per cell, 35% of its rows held out at random; `blocks` = the
dataset's occupied 200 m grid blocks, 35% of them held out. A split scores the cells with at
least 10 training and 1 held-out row. Every model gets the same training rows, capped by the same
seeded subsample at our per-cell cap (`radio.max_train_per_cell`, or the model's own lower cap on
the rows it fits); the GP baseline fits on up to the same number.

Metrics are weighted by the dataset's row weight when it has one (Purdue: a row is a grid
square's mean over `sample` raw samples, so each row counts `sample` times: the pooled figures
are per raw sample). Every model's fit gets the same row weights (`BaselineSettings.fit_weighted`,
written to the JSON): ours as `CellData.row_weight` (per-row GP noise n^2 (w_ref / w)^gamma,
weighted training-row objectives), kNN as weighted neighbour means and weighted CV for k, the
forest as `sample_weight`, the GP as per-row white noise of the same form and gamma. Until
session 7 every fit was unweighted.

Baseline predictions are cached under bench/.cache/ keyed by dataset, split, seed, rows and the
baseline's settings, so rerunning after a change to our model refits only ours
(RADIO_REAL_CACHE=DIR moves it, e.g. to share it between checkouts).

Writes bench/results/radio_real_<name>.json. Usage:
    python bench/radio_real.py --dataset ucc-5g [--splits random,blocks] [--max-cells 20] [--out PATH]
    python bench/radio_real.py                 # every dataset in bench/datasets/
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # per-cell fits are small: BLAS threads only fight each other on 2 cores

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402
from scipy.stats import norm  # noqa: E402

from cellsynth.config import PipelineConfig, RadioConfig, RowFilter, SourceConfig, _format_errors  # noqa: E402
from cellsynth.errors import ConfigError  # noqa: E402
from cellsynth.geo import LocalFrame  # noqa: E402
from cellsynth.ingest.sources import FILE_COLUMN, column_mapping, read_raw_pandas, resolve_source  # noqa: E402
from cellsynth.radio.baselines import BASELINE_NAMES, BaselineSettings, make_baseline  # noqa: E402
from cellsynth.radio.transforms import subsample_index  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(__file__).parent / "datasets"
# RADIO_REAL_CACHE lets several checkouts share the (model-independent) baseline cache.
RESULTS_THIN = Path(__file__).parent / "results" / "radio_real_thin"
CACHE = Path(os.environ.get("RADIO_REAL_CACHE") or Path(__file__).parent / ".cache" / "radio_real")
SPLITS = ("random", "blocks")
TEST_FRACTION = 0.35
BLOCK_M = 200.0
MIN_TRAIN, MIN_TEST = 10, 1
CE_LEVELS = np.round(np.arange(0.05, 0.951, 0.05), 2)
CE_FORMULA = ("CE = mean over p in {0.05, 0.10, ..., 0.95} of |W(PIT <= p) - p|, PIT = F((y - mean) / std), W = weighted share "
              "of test rows; F = the model's unit-std predictive CDF: standard normal for the baselines, for ours the "
              "Student-t with the model's dof scaled to unit std (standard normal where dof = inf); coverage: |y - mean| <= "
              "F^-1(0.5 + q / 2) std")
FAR_M = 3000.0
N_FAR_DIRECTIONS = 8
N_TRAIN_PROBES = 200  # training positions per cell where the epistemic std is read


# ----------------------------------------------------------------------------- dataset spec
class DatasetSpec(BaseModel):
    """One real dataset for the radio benchmark (bench/datasets/<name>.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str = ""
    # The ingest source block (sources.<kind> in a pipeline config), read as kind "radio":
    # columns map latitude, longitude, rsrp_dbm and optionally weight onto raw names.
    source: SourceConfig
    cell_id: tuple[str, ...]  # raw columns whose values, joined by ":", name a cell
    filters: tuple[RowFilter, ...] = ()
    dedup: tuple[str, ...] = ()  # raw columns: rows repeating all of them are dropped (first kept)
    weight: str | None = None  # raw column: a row's weight in the metrics (e.g. its raw sample count)
    frame_by: str | None = None  # raw column: each group gets its own local frame and blocks
    min_rows_per_cell: int = Field(50, ge=1)
    rsrp_range_dbm: tuple[float, float] = (-140.0, -44.0)  # ingest's valid range; rows outside dropped


def load_spec(name_or_path: str) -> tuple[DatasetSpec, str]:
    """The dataset spec and a hash of its text.

    Raises:
        ConfigError: unknown dataset, unreadable YAML, or a bad key (one line naming it).
    """
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = DATASETS / f"{name_or_path}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in DATASETS.glob("*.yaml")))
        raise ConfigError(f"--dataset: no dataset {name_or_path!r} (have: {have}; or give a path to a YAML)")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    try:
        spec = DatasetSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from err
    src = spec.source.path or ""
    if (path.parent.resolve() != DATASETS.resolve() and not Path(src).is_absolute() and not _matches(src)
            and _matches(str(path.parent / src))):
        # an operator's YAML beside its data: `path: drives/*.csv` is relative to the YAML's folder
        spec = spec.model_copy(update={"source": spec.source.model_copy(update={"path": str(path.parent / src)})})
    return spec, hashlib.sha256(text.encode()).hexdigest()[:12]


def _matches(p: str) -> bool:
    """An existing file or folder, or a glob that matches one."""
    import glob

    return bool(p) and (Path(p).exists() or bool(glob.glob(p)))


def _resolve_path(p: str) -> str:
    """A relative path as given when it matches from the working directory, else from the repo root
    (a YAML outside bench/datasets/ may also name it from its own folder: `load_spec`)."""
    if Path(p).is_absolute() or _matches(p):
        return p
    return str(ROOT / p)


def load_dataset(spec: DatasetSpec) -> pd.DataFrame:
    """One row per measurement: cell_id, x_m, y_m, rsrp_dbm, weight, group, row_id.

    Read through the ingest adapters (zip members unpacked once under bench/.cache), then the
    spec's filters, the RSRP range, dedup, and the cells with at least `min_rows_per_cell` rows.
    """
    src_cfg = spec.source.model_copy(update={"path": _resolve_path(spec.source.path or "")})
    cfg = PipelineConfig.model_validate({"scenario": {"enabled": False}, "run": {"data_dir": str(CACHE / "data")},
                                         "sources": {"mdt": {}}})
    cfg = cfg.model_copy(update={"sources": cfg.sources.model_copy(update={"mdt": src_cfg})})
    res = resolve_source(cfg, "mdt")
    res = type(res)("radio", res.files, res.cfg)
    raw = read_raw_pandas(res)
    mapping, _ = column_mapping(res, list(raw.columns))
    problems = [f"cell_id: raw column {c!r} not in the input" for c in spec.cell_id if c not in raw.columns]
    # A long layout (one row per measured cell): the serving rows are the serving cell's measurements.
    filters = (*spec.filters, *([spec.source.serving_rows] if spec.source.serving_rows is not None else []))
    problems += [f"filters.column: raw column {f.column!r} not in the input" for f in filters if f.column not in raw.columns]
    problems += [f"dedup: raw column {c!r} not in the input" for c in spec.dedup if c not in raw.columns]
    if spec.frame_by and spec.frame_by not in raw.columns:
        problems.append(f"frame_by: raw column {spec.frame_by!r} not in the input")
    if spec.weight and spec.weight not in raw.columns:
        problems.append(f"weight: raw column {spec.weight!r} not in the input")
    if problems:
        raise ConfigError(problems)
    counts = {"raw_rows": len(raw)}
    keep = np.ones(len(raw), bool)
    for f in filters:
        col = raw[f.column]
        if f.in_ is not None:
            keep &= col.isin(f.in_).to_numpy()
        if f.not_in is not None:
            keep &= ~col.isin(f.not_in).to_numpy()
        if f.min is not None or f.max is not None:
            num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
            keep &= np.isfinite(num) & (num >= (f.min if f.min is not None else -np.inf)) & (num <= (f.max if f.max is not None else np.inf))
    raw = raw[keep]
    counts["after_filters"] = len(raw)
    if res.projected:  # easting / northing in the source's crs, to WGS84 as ingest does (`transforms.unproject_col`)
        from pyproj import Transformer

        east = pd.to_numeric(raw[mapping["easting"]], errors="coerce").to_numpy(dtype=float)
        north = pd.to_numeric(raw[mapping["northing"]], errors="coerce").to_numpy(dtype=float)
        lon, lat = Transformer.from_crs(res.cfg.crs, "EPSG:4326", always_xy=True).transform(east, north)
        lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
        lat[~np.isfinite(lat) | ~np.isfinite(lon)] = np.nan  # pyproj gives inf for a point outside the projection
    else:
        lat = pd.to_numeric(raw[mapping["latitude"]], errors="coerce").to_numpy(dtype=float)
        lon = pd.to_numeric(raw[mapping["longitude"]], errors="coerce").to_numpy(dtype=float)
    rsrp = pd.to_numeric(raw[mapping["rsrp_dbm"]], errors="coerce").to_numpy(dtype=float)
    weight = pd.to_numeric(raw[spec.weight], errors="coerce").to_numpy(dtype=float) if spec.weight else np.ones(len(raw))
    cell = raw[list(spec.cell_id)].astype(str).agg(":".join, axis=1).to_numpy() if len(raw) else np.array([], dtype=object)
    ok = (np.isfinite(lat) & np.isfinite(lon) & np.isfinite(rsrp) & np.isfinite(weight) & (weight > 0)
          & raw[list(spec.cell_id)].notna().all(axis=1).to_numpy())
    counts["missing_fields"] = int((~ok).sum())
    # a position off the globe (a corrupt GPS fix, or projected metres under latitude / longitude) is dropped
    # and counted, as ingest rejects it (outside_area), instead of reaching the local frame as infinity
    on_globe = (np.abs(lat) <= 90.0) & (np.abs(lon) <= 180.0)
    counts["bad_position"] = int((ok & ~on_globe).sum())
    ok &= on_globe
    in_range = (rsrp >= spec.rsrp_range_dbm[0]) & (rsrp <= spec.rsrp_range_dbm[1])
    counts["rsrp_out_of_range"] = int((ok & ~in_range).sum())
    ok &= in_range
    group = raw[spec.frame_by].astype(str).to_numpy() if spec.frame_by else np.full(len(raw), "all", dtype=object)
    df = pd.DataFrame({"cell_id": cell, "lat": lat, "lon": lon, "rsrp_dbm": rsrp, "weight": weight, "group": group})
    df = df[ok]
    if spec.dedup:
        dup = raw[list(spec.dedup)][ok].duplicated().to_numpy()
        counts["duplicates"] = int(dup.sum())
        df = df[~dup]
    n = df.groupby("cell_id")["cell_id"].transform("size")
    counts["rows_in_small_cells"] = int((n < spec.min_rows_per_cell).sum())
    if not (n >= spec.min_rows_per_cell).any():
        # nothing to score: say where the rows went rather than fail later on an empty split
        largest = int(n.max()) if len(n) else 0
        hint = ("; most positions are off the globe: projected coordinates? map easting / northing and set source.crs"
                if counts["bad_position"] > counts["raw_rows"] / 2 else "")
        raise ConfigError(f"min_rows_per_cell: no cell has >= {spec.min_rows_per_cell} rows (the largest has {largest}; "
                          + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"){hint}")
    df = df[n >= spec.min_rows_per_cell].reset_index(drop=True)
    df["x_m"], df["y_m"] = 0.0, 0.0
    for _, idx in df.groupby("group").indices.items():
        frame = LocalFrame.around(df["lat"].to_numpy()[idx], df["lon"].to_numpy()[idx])
        x, y = frame.to_xy(df["lat"].to_numpy()[idx], df["lon"].to_numpy()[idx])
        df.loc[idx, "x_m"], df.loc[idx, "y_m"] = x, y
    df["row_id"] = np.arange(len(df))
    counts["rows"] = len(df)
    counts["cells"] = int(df["cell_id"].nunique())
    df.attrs["counts"] = counts
    return df


# ----------------------------------------------------------------------------- splits
def _unit(keys: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per key (crc32 of seed:key)."""
    return np.array([zlib.crc32(f"{seed}:{k}".encode()) / 2**32 for k in keys])


def random_split(cell_id: np.ndarray, row_id: np.ndarray, *, test_fraction: float = TEST_FRACTION, seed: int = 0) -> np.ndarray:
    """Per cell: the round(test_fraction * n) rows with the smallest key hash are held out."""
    u = _unit(row_id, seed)
    frame = pd.DataFrame({"c": cell_id, "u": u})
    rank = frame.groupby("c")["u"].rank(method="first").to_numpy()
    n = frame.groupby("c")["c"].transform("size").to_numpy()
    return rank <= np.round(test_fraction * n)


def block_split(x_m: np.ndarray, y_m: np.ndarray, group: np.ndarray | None = None, *, block_m: float = BLOCK_M,
                test_fraction: float = TEST_FRACTION, seed: int = 0) -> np.ndarray:
    """Rows in held-out blocks: round(test_fraction x occupied blocks) of the `block_m` grid blocks
    that hold any row (per `group` frame), chosen at random."""
    bx = np.floor(np.asarray(x_m) / block_m).astype(np.int64)
    by = np.floor(np.asarray(y_m) / block_m).astype(np.int64)
    g = np.full(len(bx), "all", dtype=object) if group is None else np.asarray(group, dtype=object)
    keys = pd.Series([f"{a}|{b}|{c}" for a, b, c in zip(g, bx, by)])
    blocks = np.array(sorted(keys.unique()))
    order = np.random.default_rng(seed).permutation(len(blocks))
    held = set(blocks[order[: int(round(test_fraction * len(blocks)))]])
    return keys.isin(held).to_numpy()


def split_mask(df: pd.DataFrame, split: str, *, seed: int, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """The held-out rows of `split` ("random" or "blocks") over the rows of `df` (a `bench_rows` frame)."""
    if split == "random":
        return random_split(df["cell_id"].to_numpy(), df["row_id"].to_numpy(), test_fraction=test_fraction, seed=seed)
    if split == "blocks":
        return block_split(df["x_m"].to_numpy(), df["y_m"].to_numpy(), df["group"].to_numpy(), test_fraction=test_fraction,
                           seed=seed)
    raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")


def eligible_cells(df: pd.DataFrame, test: np.ndarray, max_cells: int = 0) -> list[str]:
    """The cells scored on a split: >= MIN_TRAIN training and >= MIN_TEST held-out rows, sorted (the first
    `max_cells` when given)."""
    tr_n, te_n = df[~test].groupby("cell_id").size(), df[test].groupby("cell_id").size()
    cells = sorted(set(tr_n[tr_n >= MIN_TRAIN].index) & set(te_n[te_n >= MIN_TEST].index))
    return cells[:max_cells] if max_cells else cells


# ----------------------------------------------------------------------------- metrics
def row_terms(y: np.ndarray, mean: np.ndarray, std: np.ndarray, dof: np.ndarray | None = None) -> np.ndarray:
    """Per test row, the terms every pooled score is a weighted mean of (n, 5 + len(CE_LEVELS)):
    |error|, error^2, inside the central 50% interval, inside the 90% one, std, then PIT <= p for
    each CE level. `dof`: Student-t degrees of freedom per row of a unit-std t predictive (None or
    inf: Gaussian)."""
    from cellsynth.radio.calibration import std_t_cdf, std_t_ppf

    y, mean, std = (np.asarray(a, dtype=float) for a in (y, mean, std))
    err = y - mean
    z = err / np.maximum(std, 1e-12)
    dof = np.full(len(y), np.inf) if dof is None else np.asarray(dof, dtype=float)
    pit, z50, z90 = np.empty(len(y)), np.empty(len(y)), np.empty(len(y))
    for d in np.unique(dof):
        k = dof == d
        pit[k] = norm.cdf(z[k]) if not np.isfinite(d) else std_t_cdf(z[k], float(d))
        z50[k], z90[k] = (norm.ppf(0.75), norm.ppf(0.95)) if not np.isfinite(d) else (std_t_ppf(0.75, float(d)), std_t_ppf(0.95, float(d)))
    return np.column_stack([np.abs(err), err**2, np.abs(err) <= z50 * std, np.abs(err) <= z90 * std, std,
                            pit[:, None] <= CE_LEVELS[None, :]]).astype(float)


def scores_of_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled scores from weighted sums of `row_terms` (..., 6 + len(CE_LEVELS)): the total weight
    first, then the weighted sum of each term (any leading shape: one set of rows, or many)."""
    m = sums[..., 1:] / sums[..., :1]
    return {"mae_db": m[..., 0], "rmse_db": np.sqrt(m[..., 1]), "cov50": m[..., 2], "cov90": m[..., 3],
            "sharpness_db": m[..., 4], "ce": np.mean(np.abs(m[..., 5:] - CE_LEVELS), axis=-1)}


def weighted_scores(y: np.ndarray, mean: np.ndarray, std: np.ndarray, weight: np.ndarray | None = None,
                    dof: np.ndarray | None = None) -> dict[str, float]:
    """Pooled MAE, RMSE, CE (CE_FORMULA), central 50%/90% interval coverage, mean std; weighted.
    `dof`: Student-t degrees of freedom per row of a unit-std t predictive (None or inf: Gaussian)."""
    w = np.ones(len(np.asarray(y))) if weight is None else np.asarray(weight, dtype=float)
    terms = row_terms(y, mean, std, dof)
    sums = np.concatenate([[w.sum()], w @ terms])
    out = scores_of_sums(sums)
    return {k: float(out[k]) for k in ("mae_db", "rmse_db", "ce", "cov50", "cov90", "sharpness_db")}


# Cell bootstrap of the pooled scores (report only): cells are resampled with replacement, each
# with all its test rows (a cell's rows share its model, its calibration and often its blocks, so
# rows are not independent draws); 95% percentile intervals from BOOTSTRAP_DRAWS resamples.
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_NOTE = (f"95% percentile intervals over {BOOTSTRAP_DRAWS} resamples of the cells with replacement, each "
                  "cell with all its test rows and weights (a cell's rows share its model and calibration); paired: "
                  "every model is scored on the same resamples. Rows of different cells in one 200 m block are "
                  "correlated too, so the block split's intervals are, if anything, too narrow. Report only.")


def cell_sums(rows: list[dict], preds: dict) -> np.ndarray:
    """Per cell, the weighted sums of `row_terms` over its test rows (n_cells, 6 + len(CE_LEVELS))."""
    out = []
    dofs = preds.get("dof") or [None] * len(rows)
    for r, m, sd, d in zip(rows, preds["mean"], preds["std"], dofs):
        w = np.asarray(r["w_te"], dtype=float)
        out.append(np.concatenate([[w.sum()], w @ row_terms(r["y_te"], m, sd, d)]))
    return np.array(out)


def cell_bootstrap(rows: list[dict], preds: dict[str, dict], *, best: str, seed: int) -> dict[str, Any]:
    """95% intervals of each model's pooled MAE, CE, cov50 and cov90 and of ours minus the best
    baseline's MAE and ours minus the GP's CE, by `BOOTSTRAP_NOTE`."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows)), size=BOOTSTRAP_DRAWS).astype(float)
    boot = {m: scores_of_sums(counts @ cell_sums(rows, p)) for m, p in preds.items()}

    def ci(v: np.ndarray) -> list[float]:
        return [float(x) for x in np.percentile(v, [2.5, 97.5])]

    out: dict[str, Any] = {"note": BOOTSTRAP_NOTE, "draws": BOOTSTRAP_DRAWS, "n_cells": len(rows),
                           "models": {m: {k: ci(b[k]) for k in ("mae_db", "ce", "cov50", "cov90")} for m, b in boot.items()}}
    if "ours" in boot:
        out["ours_minus_best_mae_db"] = ci(boot["ours"]["mae_db"] - boot[best]["mae_db"])
        out["ours_minus_gp_ce"] = ci(boot["ours"]["ce"] - boot["gp"]["ce"])
    return out


def far_probes(xy_m: np.ndarray, *, far_m: float = FAR_M, n: int = N_FAR_DIRECTIONS) -> np.ndarray:
    """`n` points `far_m` beyond the cell's data: on a circle around the rows' centroid whose
    radius is the farthest row's distance + far_m (so every row is at least far_m away)."""
    c = xy_m.mean(axis=0)
    r = float(np.max(np.hypot(*(xy_m - c).T))) + far_m
    a = np.arange(n) * 2 * np.pi / n
    return c + r * np.column_stack([np.cos(a), np.sin(a)])


# ----------------------------------------------------------------------------- models
def _cell_rows(df: pd.DataFrame, test: np.ndarray, cells: list[str], cap: int, seed: int):
    """Per cell: (train xy, train y, test xy, test y, test weight, train-probe xy, far-probe xy)."""
    out = []
    by_cell = df.groupby("cell_id").indices
    for c in cells:
        idx = by_cell[c]
        tr, te = idx[~test[idx]], idx[test[idx]]
        tr = tr[subsample_index(len(tr), cap, seed=zlib.crc32(f"{seed}:{c}".encode()))]
        xy_tr = df[["x_m", "y_m"]].to_numpy()[tr]
        probe = xy_tr[subsample_index(len(tr), N_TRAIN_PROBES, seed=seed)]
        out.append({"xy_tr": np.ascontiguousarray(xy_tr), "y_tr": df["rsrp_dbm"].to_numpy()[tr], "w_tr": df["weight"].to_numpy()[tr],
                    "xy_te": df[["x_m", "y_m"]].to_numpy()[te], "y_te": df["rsrp_dbm"].to_numpy()[te],
                    "w_te": df["weight"].to_numpy()[te], "probe": probe, "far": far_probes(xy_tr)})
    return out


def our_settings():
    """FitSettings of the radio stage at its config defaults, as a new user's run would use."""
    from cellsynth.radio.model import FitSettings

    try:
        from cellsynth.radio.stage import settings_for

        return settings_for(RadioConfig(), "rsrp")
    except (ImportError, TypeError):
        return FitSettings()


def read_result(path: Path) -> dict:
    """A results JSON that a bench adds to (radio_inner / radio_outer_seeds / radio_known_noise):
    the file's content, or {} before its first run."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_result(path: Path, result: dict) -> None:
    """Write a results JSON (sorted keys: reruns of one record diff cleanly); called after each
    record, so a long run keeps what it has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def record_run(result: dict, key: str, rec: dict, path: Path) -> None:
    """Store one record under result["runs"][key], print its float figures, and write the file."""
    result.setdefault("runs", {})[key] = rec
    print(key, json.dumps({k: round(v, 3) for k, v in rec.items() if isinstance(v, float)}), flush=True)
    write_result(path, result)


def bench_rows(dataset: str) -> tuple[DatasetSpec, pd.DataFrame, int]:
    """(spec, rows, per-cell row cap) of a dataset for a bench that fits our model, torch on one thread
    (loops over small tensors)."""
    import torch

    torch.set_num_threads(1)
    spec, _ = load_spec(dataset)
    return spec, load_dataset(spec), row_cap()


def row_cap() -> int:
    """Training rows per cell every model gets: the radio stage's cap, or the model's own cap
    on the rows it fits when that is lower (so all models see the same rows)."""
    return int(min(RadioConfig().max_train_per_cell, getattr(our_settings(), "max_rows", None) or np.inf))


def run_ours(rows: list[dict], cells: list[str], *, seed: int, cells_per_shard: int, n_samples: int,
             weighted: bool = True) -> dict:
    """Our model through its public API with default settings: shards of cells, no site table, so
    the model estimates each cell's site itself (`geometry.estimate_site`), as a user's run does."""
    from cellsynth.radio.model import CellData, fit_cells

    settings = our_settings()
    preds: dict[str, list] = {"mean": [], "std": [], "epi_te": [], "epi_train": [], "epi_far": [], "dof": []}
    t0 = time.perf_counter()
    for start in range(0, len(cells), cells_per_shard):
        part = rows[start:start + cells_per_shard]
        data = [CellData(c, r["xy_tr"], r["y_tr"], row_weight=r["w_tr"] if weighted else None)
                for c, r in zip(cells[start:start + cells_per_shard], part)]
        fitted = fit_cells(data, target="rsrp", settings=settings, seed=seed + start)
        for i, r in enumerate(part):
            p = fitted.predict(np.full(len(r["xy_te"]), i), r["xy_te"], n_samples=n_samples, seed=seed)
            preds["mean"].append(p.mean)
            preds["std"].append(p.total_std)
            preds["dof"].append(p.dof_or_inf())
            preds["epi_te"].append(p.epistemic_std)
            preds["epi_train"].append(fitted.predict(np.full(len(r["probe"]), i), r["probe"], n_samples=n_samples, seed=seed).epistemic_std)
            preds["epi_far"].append(fitted.predict(np.full(len(r["far"]), i), r["far"], n_samples=n_samples, seed=seed).epistemic_std)
        print(f"  ours: {min(start + cells_per_shard, len(cells))}/{len(cells)} cells, {time.perf_counter() - t0:.0f} s", flush=True)
    return {**preds, "fit_s": time.perf_counter() - t0, "settings": settings.as_dict()}


def run_baseline(name: str, rows: list[dict], settings: BaselineSettings) -> dict:
    preds: dict[str, list] = {"mean": [], "std": [], "epi_te": [], "epi_train": [], "epi_far": []}
    info: list = []
    t0 = time.perf_counter()
    for r in rows:
        b = make_baseline(name, settings).fit(r["xy_tr"], r["y_tr"], weight=r["w_tr"] if settings.fit_weighted else None)
        if name == "gp":
            m, s, e = b.predict(r["xy_te"], return_epistemic=True)
            preds["epi_te"].append(e)
            preds["epi_train"].append(b.epistemic_std(r["probe"]))
            preds["epi_far"].append(b.epistemic_std(r["far"]))
            info.append(b.hyperparameters_)
        else:
            m, s = b.predict(r["xy_te"])
            info.append({"k": b.k_} if name == "knn" else {})
        preds["mean"].append(m)
        preds["std"].append(s)
    return {**preds, "fit_s": time.perf_counter() - t0, "info": info}


def _cached(path: Path, compute) -> dict:
    """Per-cell prediction lists, stored as one npz (ragged lists flattened with offsets)."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            out = {"fit_s": meta["fit_s"], "info": meta["info"], "cached": True}
            for key in ("mean", "std", "epi_te", "epi_train", "epi_far"):
                if f"{key}_flat" in z:
                    out[key] = np.split(z[f"{key}_flat"], z[f"{key}_off"][1:-1])
                else:
                    out[key] = []
            return out
    out = compute()
    arrays = {"meta": np.array(json.dumps({"fit_s": out["fit_s"], "info": out["info"]}))}
    for key in ("mean", "std", "epi_te", "epi_train", "epi_far"):
        if out[key]:
            arrays[f"{key}_flat"] = np.concatenate(out[key])
            arrays[f"{key}_off"] = np.cumsum([0] + [len(a) for a in out[key]])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    out["cached"] = False
    return out


def _data_hash(rows: list[dict], cells: list[str]) -> str:
    h = hashlib.sha256("|".join(cells).encode())
    for r in rows:
        for key in ("xy_tr", "y_tr", "xy_te"):
            h.update(np.ascontiguousarray(r[key], dtype=float).tobytes())
    return h.hexdigest()[:12]


def score(rows: list[dict], preds: dict, *, epistemic: bool) -> dict[str, float]:
    y = np.concatenate([r["y_te"] for r in rows])
    w = np.concatenate([r["w_te"] for r in rows])
    out = weighted_scores(y, np.concatenate(preds["mean"]), np.concatenate(preds["std"]), w,
                          np.concatenate(preds["dof"]) if preds.get("dof") else None)
    cell_mae = [float(np.average(np.abs(r["y_te"] - m), weights=r["w_te"])) for r, m in zip(rows, preds["mean"])]
    out["median_cell_mae_db"] = float(np.median(cell_mae))
    if epistemic:
        out["epistemic_test_db"] = float(np.average(np.concatenate(preds["epi_te"]), weights=w))
        out["epistemic_train_db"] = float(np.mean(np.concatenate(preds["epi_train"])))
        out["epistemic_3km_db"] = float(np.mean(np.concatenate(preds["epi_far"])))
        out["epistemic_3km_max_db"] = float(np.max(np.concatenate(preds["epi_far"])))
    out["fit_s"] = float(preds["fit_s"])
    return out


def _unscorable(df: pd.DataFrame) -> str:
    """Why a split of `df` has nothing to score (`eligible_cells` found no cell)."""
    return (f"no cell has >= {MIN_TRAIN} training and >= {MIN_TEST} held-out rows on this split "
            f"({df['cell_id'].nunique()} cells, {len(df)} rows)")


def _save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def evaluate_split(df: pd.DataFrame, test: np.ndarray, *, name: str, split: str, spec_hash: str, seed: int,
                   max_cells: int, cells_per_shard: int, n_samples: int, baselines: BaselineSettings,
                   row_cap: int, baselines_only: bool = False) -> dict:
    cells = eligible_cells(df, test, max_cells)
    if not cells:
        raise ConfigError(f"{name}/{split}: {_unscorable(df)}")
    rows = _cell_rows(df, test, cells, row_cap, seed)
    result: dict[str, Any] = {"n_cells": len(cells), "n_train": int(sum(len(r["y_tr"]) for r in rows)),
                              "n_test": int(sum(len(r["y_te"]) for r in rows)),
                              "test_weight": float(sum(r["w_te"].sum() for r in rows)), "models": {}}
    print(f"{name}/{split}: {len(cells)} cells, {result['n_train']} train, {result['n_test']} test rows", flush=True)
    data_hash = _data_hash(rows, cells)
    all_preds: dict[str, dict] = {}
    for b in BASELINE_NAMES:
        key = f"{split}-seed{seed}-{b}-{baselines.hash(b)}-{data_hash}.npz"
        preds = all_preds[b] = _cached(CACHE / name / spec_hash / key, lambda b=b: run_baseline(b, rows, baselines))
        result["models"][b] = score(rows, preds, epistemic=b == "gp")
        result["models"][b]["cached"] = bool(preds["cached"])
        if b == "knn":
            ks = [i["k"] for i in preds["info"]]
            result["models"][b]["k_chosen"] = {"median": float(np.median(ks)), "min": int(min(ks)), "max": int(max(ks))}
        if b == "gp":
            ls = [i["length_m"] for i in preds["info"]]
            result["models"][b]["length_m_median"] = float(np.median(ls))
        print(f"  {b}: {json.dumps({k: round(v, 3) for k, v in result['models'][b].items() if isinstance(v, float)})}", flush=True)
    if baselines_only:
        return result
    ours = run_ours(rows, cells, seed=seed, cells_per_shard=cells_per_shard, n_samples=n_samples,
                    weighted=baselines.fit_weighted)
    result["models"]["ours"] = score(rows, ours, epistemic=True)
    # Student-t degrees of freedom of our predictive per shard (calibration.TAIL_MODE; inf: Gaussian)
    result["models"]["ours"]["dof_chosen"] = [d if np.isfinite(d) else "inf" for d in sorted({float(d[0]) for d in ours["dof"] if len(d)})]
    result["ours_settings"] = ours["settings"]
    print(f"  ours: {json.dumps({k: round(v, 3) for k, v in result['models']['ours'].items() if isinstance(v, float)})}", flush=True)
    base = {b: result["models"][b] for b in BASELINE_NAMES}
    best = min(base, key=lambda b: base[b]["mae_db"])
    result["best_baseline"] = best
    result["ours_minus_best_mae_db"] = result["models"]["ours"]["mae_db"] - base[best]["mae_db"]
    best_med = min(base, key=lambda b: base[b]["median_cell_mae_db"])
    result["best_baseline_median"] = best_med
    result["ours_minus_best_median_cell_mae_db"] = result["models"]["ours"]["median_cell_mae_db"] - base[best_med]["median_cell_mae_db"]
    result["ours_minus_gp_ce"] = result["models"]["ours"]["ce"] - base["gp"]["ce"]
    result["bootstrap"] = cell_bootstrap(rows, {**all_preds, "ours": ours}, best=best, seed=seed)
    return result


def _machine() -> dict:
    return {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "threads_per_fit": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}


def _commit() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    # dirty: uncommitted code (not this bench's own result files) under lib/ or bench/
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "lib", "bench", ":(exclude)bench/results")),
            # last commit that changed our model (the baselines live beside it but are not it)
            "radio_model_commit": git("log", "-1", "--format=%H", "--", "lib/cellsynth/radio",
                                      ":(exclude)lib/cellsynth/radio/baselines.py")}


def run_dataset(dataset: str, *, out: str | None, splits: tuple[str, ...], max_cells: int, seed: int,
                cells_per_shard: int, n_samples: int, baselines: BaselineSettings, baselines_only: bool = False,
                max_train_rows: int = 0) -> dict:
    import torch

    torch.set_num_threads(1)
    spec, spec_hash = load_spec(dataset)
    t0 = time.perf_counter()
    df = load_dataset(spec)
    # max_train_rows: every model's training rows per cell cut to that many (a thin-data reading:
    # walking sets, new cells); test rows unchanged. 0: the radio stage's own cap.
    cap = min(row_cap(), max_train_rows) if max_train_rows > 0 else row_cap()
    # GP on up to the same per-cell rows as ours unless --gp-max-train says otherwise
    from cellsynth.radio.model import ROW_WEIGHT_POWER

    # the GP baseline's per-row noise takes our model's gamma (parity of the noise form)
    settings = BaselineSettings(**{**baselines.as_dict(), "knn_k_grid": tuple(baselines.knn_k_grid), "seed": seed,
                                   "gp_weight_power": ROW_WEIGHT_POWER,
                                   "gp_max_train": baselines.gp_max_train or cap})
    result: dict[str, Any] = {
        "dataset": spec.name, "description": spec.description, "spec_hash": spec_hash, "counts": df.attrs["counts"],
        "seed": seed, "max_cells": max_cells, "row_cap_per_cell": cap, "thin": bool(max_train_rows and cap < row_cap()),
        "weighting": ((f"metrics weighted by raw column {spec.weight!r} (one row = that many raw samples); "
                       + ("every model's fit gets the same row weights (baselines.settings.fit_weighted; ours: CellData.row_weight)"
                          if settings.fit_weighted else "fits unweighted for every model"))
                      if spec.weight else "unweighted (every row one sample)"),
        "splits_definition": {"random": f"per cell, round({TEST_FRACTION} x n) rows held out at random",
                              "blocks": f"{BLOCK_M:.0f} m grid blocks, round({TEST_FRACTION} x occupied blocks) held out; "
                                        f"cells with >= {MIN_TRAIN} training and >= {MIN_TEST} test rows"},
        "ce_formula": CE_FORMULA,
        "coverage": "share (weighted) of test rows inside the central 50% / 90% interval mean +- F^-1(0.5 + q / 2) std of the model's predictive (Gaussian; ours: the Student-t of its dof, CE_FORMULA)",
        "epistemic": (f"epistemic_test_db: mean over test rows; epistemic_train_db: mean at up to {N_TRAIN_PROBES} training "
                      f"positions per cell; epistemic_3km_db: mean at {N_FAR_DIRECTIONS} points {FAR_M:.0f} m beyond the "
                      "farthest training row from the cell's centroid"),
        "baselines": {"settings": settings.as_dict(), "description": settings.describe(),
                      "rows": f"the same training rows as ours (up to {cap} per cell); GP up to {settings.gp_max_train}"},
        "ours": {"api": "cellsynth.radio.model.fit_cells per shard of cells, FitSettings from the radio stage defaults",
                 "cells_per_shard": cells_per_shard, "n_weight_samples": n_samples,
                 "origin": "none given: the model's own site estimate from the training rows (default path)"},
        "machine": _machine(), **_commit(), "splits": {},
    }
    thin = RESULTS_THIN / f"{spec.name}_cap{cap}.json"  # never over the headline file
    out_path = Path(out) if out else thin if result["thin"] else Path(__file__).parent / "results" / f"radio_real_{spec.name}.json"
    for split in splits:
        mask = split_mask(df, split, seed=seed)
        if len(splits) > 1 and not eligible_cells(df, mask, max_cells):
            # a set that cannot be scored on one split (every row in one 200 m block) still gets the others
            result["splits"][split] = {"skipped": _unscorable(df)}
            print(f"{spec.name}/{split}: skipped: {result['splits'][split]['skipped']}", flush=True)
            if any("models" in v for v in result["splits"].values()) and not baselines_only:
                _save(out_path, result)
            continue
        result["splits"][split] = evaluate_split(
            df, mask, name=spec.name, split=split, spec_hash=spec_hash, seed=seed, max_cells=max_cells,
            cells_per_shard=cells_per_shard, n_samples=n_samples, baselines=settings, row_cap=cap, baselines_only=baselines_only)
        result["wall_s"] = time.perf_counter() - t0
        if baselines_only:
            print(f"{spec.name}/{split}: baselines cached ({result['wall_s']:.0f} s)", flush=True)
            continue
        _save(out_path, result)  # after each split: a long run keeps what it has
    if all("skipped" in v for v in result["splits"].values()):
        raise ConfigError(f"{spec.name}: no split can be scored: " + "; ".join(
            f"{k}: {v['skipped']}" for k, v in result["splits"].items()))
    if not baselines_only:
        print(f"wrote {out_path} ({result['wall_s']:.0f} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="all", help="name under bench/datasets/, a path to a dataset YAML, or 'all'")
    ap.add_argument("--out", default=None, help="result path (default bench/results/radio_real_<name>.json)")
    ap.add_argument("--splits", default="random,blocks")
    ap.add_argument("--max-cells", type=int, default=0, help="score only the first N cells (development)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cells-per-shard", type=int, default=80)
    ap.add_argument("--n-samples", type=int, default=64, help="weight samples per prediction (ours)")
    ap.add_argument("--gp-max-train", type=int, default=0, help="GP rows per cell (default: the same cap as ours)")
    ap.add_argument("--baselines-only", action="store_true", help="fill the baseline cache and stop (writes no JSON)")
    ap.add_argument("--max-train-rows", type=int, default=0,
                    help="cut every model's training rows per cell to N, test rows unchanged (a thin-data reading, "
                         "written to bench/results/radio_real_thin/NAME_capN.json; 0: the radio stage's cap)")
    args = ap.parse_args(argv)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise SystemExit(f"ConfigError: --splits: unknown split(s) {', '.join(bad)} (expected: {', '.join(SPLITS)})")
    names = sorted(p.stem for p in DATASETS.glob("*.yaml")) if args.dataset == "all" else [args.dataset]
    if args.out and len(names) > 1:
        raise SystemExit("ConfigError: --out: give one --dataset with --out")
    out = []
    try:
        for name in names:
            out.append(run_dataset(name, out=args.out, splits=splits, max_cells=args.max_cells, seed=args.seed,
                                   cells_per_shard=args.cells_per_shard, n_samples=args.n_samples,
                                   baselines=BaselineSettings(gp_max_train=args.gp_max_train), baselines_only=args.baselines_only,
                                   max_train_rows=args.max_train_rows))
    except ConfigError as err:
        raise SystemExit(f"ConfigError: {err}") from err
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
