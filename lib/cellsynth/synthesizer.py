"""`MDTSynthesizer`: the pipeline's models in memory, for a notebook (no lake, Spark or Ray).

    from cellsynth import MDTSynthesizer
    s = MDTSynthesizer(config).fit(mdt_df, cells_df)
    synthetic = s.sample(10_000, window="h06_12")
    s.save("my_model"); s = MDTSynthesizer.load("my_model")

It fits the same models with the same code and settings as the density and radio stages (the
per-(window, cell) KDEs and area densities of `cellsynth.density`, the batched Bayesian radio
models of `cellsynth.radio.stage.train_shards`) on the held-in rows of the configured split
(`split.*`), and samples with generate's Algorithm 1 and regression (`cellsynth.generate`).
Input frames are clean ones, as ingest writes them: positions in metres in a local frame.
"""

from __future__ import annotations

import functools
import json
import numbers
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import MofNCompleteColumn, Progress

from cellsynth.config import PipelineConfig, config_from_dict, load_config
from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.schemas import AREA_CELL_ID, cell_shard_of
from cellsynth.splits import held_out

_MDT_COLUMNS = ("report_id", "cell_id", "role", "rsrp_dbm", "x_m", "y_m")
_CELL_COLUMNS = ("cell_id", "x_m", "y_m")


def _check_columns(name: str, frame: pd.DataFrame, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise SchemaError([f"{name}: column '{c}' missing (have: {', '.join(map(str, frame.columns[:10]))})"
                           for c in missing])


def with_torch_threads(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run `method` with torch on `runtime.torch_threads` threads (1 by default), as the pipeline's
    workers do, and give the caller's setting back after. The fits loop over small tensors: fitting the
    UCC example's lake (188 cells) on 2 cores took 39 s on one thread and 33 s on torch's default of
    one per core when the machine was idle, but 42 s against 159 s beside one other busy process
    (session 34, scratch runs): one thread is the choice that does not collapse on a shared machine."""

    @functools.wraps(method)
    def wrapper(self: ConfiguredFacade, *args: Any, **kwargs: Any) -> Any:
        import torch

        # fit reads the config it is given; sample the one it was fitted (or loaded) with
        cfg = self._cfg() if method.__name__ == "fit" or not hasattr(self, "cfg_") else self.cfg_
        before = torch.get_num_threads()
        torch.set_num_threads(cfg.runtime.torch_threads)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


class ConfiguredFacade:
    """An in-memory facade over pipeline models, configured as a run is (`config`: a `PipelineConfig`,
    a dict of sections, a YAML path, or None for the defaults); `cfg_` is the config it was fitted with."""

    def __init__(self, config: PipelineConfig | dict | str | Path | None = None) -> None:
        self.config = config

    _META = "synthesizer.json"  # the saved folder's description: format version and config
    _FORMAT_VERSION = 1

    def _cfg(self) -> PipelineConfig:
        if isinstance(self.config, PipelineConfig):
            return self.config
        if isinstance(self.config, dict):
            return config_from_dict(self.config)
        return load_config(self.config)

    def _save_meta(self, out: Path, **extra: Any) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / self._META).write_text(json.dumps(
            {"format_version": self._FORMAT_VERSION, "config": self.cfg_.model_dump(mode="json"), **extra}, sort_keys=True))

    @classmethod
    def _from_meta(cls, src: Path) -> tuple[Any, dict]:
        """(an instance configured as saved, the saved description); SchemaError for another format version."""
        meta = json.loads((src / cls._META).read_text())
        if meta.get("format_version") != cls._FORMAT_VERSION:
            raise SchemaError(f"{cls.__name__} {src}: format_version {meta.get('format_version')}, expected {cls._FORMAT_VERSION}")
        self = cls(config_from_dict(meta["config"]))
        self.cfg_ = self.config
        return self, meta


class MDTSynthesizer(ConfiguredFacade):
    """Synthetic MDT reports from measured ones, in memory (the SDV shape: fit, sample, save, load).

    Args:
        config: a `PipelineConfig`, a dict of sections, a YAML path, or None for the defaults.
            The density, radio, generate and split sections apply as in a pipeline run.
    """

    # ------------------------------------------------------------------------------ fitting

    @with_torch_threads
    def fit(self, mdt_df: pd.DataFrame, cells_df: pd.DataFrame, traffic_df: pd.DataFrame | None = None, *,
            progress: bool = True) -> MDTSynthesizer:
        """Fit the density and radio models on the held-in rows of the configured split.

        Args:
            mdt_df: one row per measured cell of each report (the `mdt_measurements` shape):
                report_id, cell_id, role ("serving"/"neighbour"), rsrp_dbm, x_m, y_m, and
                window (or ts, windowed by `ingest.windows`); rsrq_db and load_rho on serving
                rows train the load-conditioned RSRQ model.
            cells_df: cell_id, x_m, y_m (azimuth_deg optional).
            traffic_df: optional per-(window or ts, cell_id) load_rho, used when
                `generate.load_scenario` is "synthetic_traffic" (the traffic diffusion model
                itself is not part of the in-memory facade).
            progress: show a progress bar per window (densities) and per cell shard (radio
                models); 60 cells take about a minute on 2 cores, most of it the radio models.

        Raises:
            SchemaError: a required column is missing.
        """
        from cellsynth.generate import cell_loads
        from cellsynth.generate.transforms import effective_load_scenario

        cfg = self._cfg()
        _check_columns("mdt_df", mdt_df, _MDT_COLUMNS)
        _check_columns("cells_df", cells_df, _CELL_COLUMNS)
        meas = self._windowed(mdt_df, cfg, "mdt_df").reset_index(drop=True)
        meas["cell_id"] = meas["cell_id"].astype(str)
        cells = cells_df.copy()
        cells["cell_id"] = cells["cell_id"].astype(str)
        meas["cell_shard"] = [cell_shard_of(c, cfg.ingest.n_cell_shards) for c in meas["cell_id"]]
        for col in ("rsrq_db", "load_rho"):
            if col not in meas:
                meas[col] = np.nan
        train = meas[~held_out(cfg, meas["report_id"].to_numpy())]
        reports = train[train["role"] == "serving"]
        self.cfg_ = cfg
        self.cells_ = cells
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=True, disable=not progress) as bar:
            self.density_, self.kdes_ = self._fit_density(reports, cfg, bar)
            self.radio_, self.radio_rows_, self.radio_files_ = self._fit_radio(meas, cells, cfg, bar)
        scenario = cfg.generate.load_scenario
        observed = reports[["window", "cell_id", "load_rho"]] if scenario in ("observed", "quantile") else None
        traffic = None
        if traffic_df is not None and scenario == "synthetic_traffic":
            _check_columns("traffic_df", traffic_df, ("cell_id", "load_rho"))
            traffic = self._windowed(traffic_df, cfg, "traffic_df")[["window", "cell_id", "load_rho"]]
        scenario = effective_load_scenario(scenario, observed)  # no load in mdt_df: fixed at generate.load_rho
        self.loads_ = cell_loads(scenario, observed=observed, synthetic_traffic=traffic,
                                 fixed_rho=cfg.generate.load_rho, quantile=cfg.generate.load_quantile)
        self.detection_rows_ = train[["report_id", "cell_id", "role", "x_m", "y_m"]].reset_index(drop=True)
        self._fit_detection(cfg)
        return self

    def _fit_detection(self, cfg: PipelineConfig) -> None:
        """Neighbour detection maps of the held-in rows, and the neighbours a sample lists: none
        when no row is a neighbour's (serving-only drive tests: the maps would report none anywhere
        and the columns stay null; the generate stage's rule, `NO_NEIGHBOURS_NOTE`)."""
        from cellsynth.generate import DetectionMaps
        from cellsynth.generate.transforms import listed_neighbours

        g = cfg.generate
        self.n_neighbours_ = listed_neighbours(g.n_neighbours, g.neighbour_detection,
                                               bool((self.detection_rows_["role"] == "neighbour").any()))
        self.detection_ = (DetectionMaps(resolution_m=cfg.density.map_resolution_m,
                                         smoothing_squares=g.detection_smoothing_squares).fit(self.detection_rows_)
                           if g.neighbour_detection and self.n_neighbours_ > 0 else None)

    @staticmethod
    def _windowed(frame: pd.DataFrame, cfg: PipelineConfig, name: str) -> pd.DataFrame:
        from cellsynth.windows import window_of

        if "window" in frame:
            return frame.assign(window=frame["window"].astype(str))
        if "ts" not in frame:
            raise SchemaError(f"{name}: column 'window' missing (or 'ts' to window by ingest.windows)")
        return frame.assign(window=window_of(frame["ts"], cfg.ingest.windows))

    @staticmethod
    def _fit_density(reports: pd.DataFrame, cfg: PipelineConfig, bar: Progress | None = None):
        from cellsynth.density import DensityModels
        from cellsynth.density.model import kde_from_config, kde_seed
        from cellsynth.splits import split_seed

        dcfg, seed = cfg.density, split_seed(cfg)
        kdes: dict[str, dict[str, Any]] = {}
        area: dict[str, Any] = {}
        task = bar.add_task("densities (windows)", total=reports["window"].nunique()) if bar is not None else None
        for window, part in reports.groupby("window", sort=True):
            for cell_id, pts in part.groupby("cell_id", sort=True):
                kde = kde_from_config(dcfg, seed=seed, window=window, cell_id=cell_id)
                kdes.setdefault(window, {})[cell_id] = kde.fit(pts[["x_m", "y_m"]].to_numpy(dtype=float))
            # the area density f_j^O, subsampled as the density stage does
            sub = part if len(part) <= dcfg.area_max_reports else part.sample(
                dcfg.area_max_reports, random_state=kde_seed(seed, window, "area") % 2**31)
            kde = kde_from_config(dcfg, seed=seed, window=window, cell_id=AREA_CELL_ID)
            area[window] = kde.fit(sub[["x_m", "y_m"]].to_numpy(dtype=float))
            if bar is not None:
                bar.advance(task)
        table = {w: dict(by_cell) for w, by_cell in kdes.items()}
        models = DensityModels.from_kdes(table, area=area, prune_k_bandwidths=dcfg.prune_k_bandwidths,
                                         association=dcfg.association,
                                         association_bandwidth_scales=dcfg.association_bandwidth_scales)
        return models, {"cells": table, "area": area}

    @staticmethod
    def _fit_radio(meas: pd.DataFrame, cells: pd.DataFrame, cfg: PipelineConfig, bar: Progress | None = None):
        from cellsynth.radio.stage import train_shards
        from cellsynth.radio.transforms import rsrq_uses_load
        from cellsynth.splits import split_seed

        azimuth = cells["azimuth_deg"] if "azimuth_deg" in cells else pd.Series(np.nan, index=cells.index)
        sites = {c: (float(x), float(y), float("nan") if pd.isna(a) else float(a))
                 for c, x, y, a in zip(cells["cell_id"], cells["x_m"], cells["y_m"], azimuth)}
        rsrq_load = rsrq_uses_load(meas["load_rho"])  # the pipeline's rule, on the whole of mdt_df
        shards = meas.groupby("cell_shard", sort=True)
        task = bar.add_task("radio models (cell shards)", total=shards.ngroups) if bar is not None else None
        with tempfile.TemporaryDirectory(prefix="cellsynth-radio-") as tmp:
            rows: list[dict] = []
            for _shard, part in shards:  # one shard at a time: what one call on all of them fits (train_shards)
                rows += train_shards(part, sites, cfg.radio, test_fraction=cfg.split.test_fraction, seed=split_seed(cfg),
                                     run_id="memory", lake_root=tmp, source_version=0, rsrq_load=rsrq_load)
                if bar is not None:
                    bar.advance(task)
            if not rows:
                raise SchemaError("mdt_df: no held-in measurements to train the radio models on")
            frame = pd.DataFrame(rows)
            files = MDTSynthesizer._load_weights(Path(tmp), frame)
        return MDTSynthesizer._radio_models(frame, files, cells, cfg), frame, files

    @staticmethod
    def _load_weights(root: Path, rows: pd.DataFrame) -> dict[str, Any]:
        from cellsynth.radio import FittedCells

        return {p: FittedCells.load(root / p) for p in sorted(rows["path"].unique())}

    @staticmethod
    def _radio_models(rows: pd.DataFrame, files: dict[str, Any], cells: pd.DataFrame, cfg: PipelineConfig):
        from cellsynth.radio import RadioModels

        sites = {c: (float(x), float(y)) for c, x, y in zip(cells["cell_id"], cells["x_m"], cells["y_m"])}
        return RadioModels(rows, files, sites, cfg.radio.epistemic_threshold_db, cfg.radio.n_weight_samples)

    # ----------------------------------------------------------------------------- sampling
    def _check_fitted(self) -> None:
        if not hasattr(self, "density_"):
            raise NotFittedError("MDTSynthesizer is not fitted; call fit() first")

    @property
    def windows(self) -> list[str]:
        self._check_fitted()
        return list(self.density_.windows)

    @with_torch_threads
    def sample(self, n: int, *, window: str | None = None, rng: int | np.random.Generator | None = None) -> pd.DataFrame:
        """`n` synthetic reports (GUMBLE Algorithm 1 + regression), in `window` or spread over
        the windows in proportion to their held-in reports.

        Args:
            n: number of reports, 0 or more (0: no rows, with the columns).
            rng: seed or Generator (default `run.seed`); the same seed gives the same rows, a Generator
                gives one seed from its stream (so successive calls differ).

        Returns:
            One row per report: window, x_m, y_m, serving_cell_id, rsrp_dbm, rsrq_db with their
            *_epistemic_std / *_aleatoric_std, load_rho, reliable, neighbour_{k}_* columns (none
            when no row of mdt_df was a neighbour's and generate.neighbour_detection is on).

        Raises:
            ConfigError: `n` is not a whole number >= 0, or `window` has no fitted model.
        """
        from cellsynth.generate import CellIndex, associate_positions, derived_seed, loads_for, synthesize
        from cellsynth.generate.transforms import check_windows

        self._check_fitted()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ConfigError(f"sample: n: expected a whole number >= 0, got {n!r}")
        cfg, g = self.cfg_, self.cfg_.generate
        # the generator's streams derive from one integer seed (per window and shard, as a run's do)
        seed = (cfg.run.seed if rng is None else int(rng.integers(2**31)) if isinstance(rng, np.random.Generator)
                else int(rng))
        windows = check_windows([window] if window is not None else None, self.density_.windows, key="sample: window")
        weights = np.array([self.density_.n_reports(w) for w in windows], dtype=float)
        counts = np.floor(n * weights / weights.sum()).astype(int)
        counts[: n - counts.sum()] += 1  # the remainder to the first windows: exactly n rows
        index = CellIndex(self.cells_["cell_id"].tolist(), self.cells_[["x_m", "y_m"]].to_numpy(dtype=float))
        parts = []
        if n == 0:  # one empty draw, so that the frame has its columns (pd.concat of nothing raised)
            windows, counts = windows[:1], counts[:1]
        for w, n_w in zip(windows, counts):
            if n_w == 0 and n > 0:
                continue
            positions = associate_positions(self.density_, w, int(n_w), rng=derived_seed(seed, "positions", w))
            rho = (np.full(len(positions), g.load_rho) if g.load_scenario == "fixed"
                   else loads_for(w, positions["serving_cell_id"].to_numpy(), self.loads_, default_rho=g.load_rho))
            parts.append(synthesize(
                positions, self.radio_, index, load_rho=rho, n_neighbours=self.n_neighbours_,
                neighbour_radius_m=g.neighbour_radius_m, neighbour_candidates=g.neighbour_candidates,
                epistemic_threshold_db=cfg.radio.epistemic_threshold_db, values=g.values, detection=self.detection_,
                rsrp_range_dbm=cfg.ingest.rsrp_range_dbm, rsrq_range_db=cfg.ingest.rsrq_range_db,
                rng=derived_seed(seed, "generate", w, 0),
            ))
        return pd.concat(parts, ignore_index=True)

    # ------------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the fitted models to a folder: JSON, Parquet and safetensors (never pickle)."""
        self._check_fitted()
        out = Path(path)
        self._save_meta(out)
        self.cells_.to_parquet(out / "cells.parquet", index=False)
        kde_rows, positions = [], []
        for window, by_cell in self.kdes_["cells"].items():
            for cell_id, kde in [*by_cell.items(), (AREA_CELL_ID, self.kdes_["area"][window])]:
                kde_rows.append({"window": window, "cell_id": cell_id, "bandwidth_m": kde.bandwidth_m_,
                                 "bandwidth_source": kde.bandwidth_source_})
                positions.append(pd.DataFrame({"window": window, "cell_id": cell_id,
                                               "x_m": kde.positions_[:, 0], "y_m": kde.positions_[:, 1]}))
        pd.DataFrame(kde_rows).to_parquet(out / "kde_models.parquet", index=False)
        pd.concat(positions, ignore_index=True).to_parquet(out / "kde_positions.parquet", index=False)
        self.radio_rows_.to_parquet(out / "radio_models.parquet", index=False)
        for rel, fitted in self.radio_files_.items():
            fitted.save(out / rel)
        self.loads_.to_parquet(out / "loads.parquet", index=False)
        self.detection_rows_.to_parquet(out / "detection_rows.parquet", index=False)

    @classmethod
    def load(cls, path: str | Path) -> MDTSynthesizer:
        """Read a folder written by `save`.

        Raises:
            SchemaError: the folder was written by another format version.
        """
        from cellsynth.density import DensityModels, GaussianKDE2D

        src = Path(path)
        self, _ = cls._from_meta(src)
        cfg = self.cfg_
        self.cells_ = pd.read_parquet(src / "cells.parquet")
        positions = pd.read_parquet(src / "kde_positions.parquet")
        groups = {k: g[["x_m", "y_m"]].to_numpy(dtype=float) for k, g in positions.groupby(["window", "cell_id"], sort=False)}
        kdes: dict[str, dict[str, Any]] = {}
        area: dict[str, Any] = {}
        for r in pd.read_parquet(src / "kde_models.parquet").itertuples(index=False):
            kde = GaussianKDE2D.from_positions(groups[(r.window, r.cell_id)], r.bandwidth_m, source=r.bandwidth_source)
            if r.cell_id == AREA_CELL_ID:
                area[r.window] = kde
            else:
                kdes.setdefault(r.window, {})[r.cell_id] = kde
        self.kdes_ = {"cells": kdes, "area": area}
        self.density_ = DensityModels.from_kdes(kdes, area=area, prune_k_bandwidths=cfg.density.prune_k_bandwidths,
                                                association=cfg.density.association,
                                                association_bandwidth_scales=cfg.density.association_bandwidth_scales)
        self.radio_rows_ = pd.read_parquet(src / "radio_models.parquet")
        self.radio_files_ = cls._load_weights(src, self.radio_rows_)
        self.radio_ = cls._radio_models(self.radio_rows_, self.radio_files_, self.cells_, cfg)
        self.loads_ = pd.read_parquet(src / "loads.parquet")
        self.detection_rows_ = pd.read_parquet(src / "detection_rows.parquet")
        self._fit_detection(cfg)
        return self
