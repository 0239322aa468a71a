"""`RadioModel`: one cell's radio field, scikit-learn style, on the batched code with C = 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.radio.calibration import std_t_draws
from cellsynth.radio.model import CellData, FitSettings, FittedCells, RadioPrediction, Target, cell_problems, fit_cells
from cellsynth.radio.persist import FORMAT_VERSION
from cellsynth.radio.transforms import ipw_weights
from cellsynth.schemas import RSRP_RANGE_DBM, RSRQ_EXTENDED_RANGE_DB

_PARAMS = ("target", "n_steps", "learning_rate", "floor_db", "kernel", "max_rows", "ipw", "load_bins", "device",
           "random_state")


class RadioModel:
    """Bayesian radio field of one cell: y = f(position[, load]) with epistemic and aleatoric std.

    Args:
        target: "rsrp" (position only) or "rsrq" (position and load rho, IPW over load bins).
        n_steps: Adam steps of the GP hyperparameter (MAP) fit.
        learning_rate: initial Adam learning rate on the log hyperparameters.
        floor_db: aleatoric std floor.
        kernel: Matern smoothness of the residual GP ("matern12", "matern32", "matern52").
        max_rows: rows kept for the exact GP (a uniform subsample beyond).
        ipw: RSRQ only: weight the likelihood by inverse load-bin probability (eqs. 20-21).
        load_bins: bins of the load histogram for IPW.
        device: torch device for training and prediction.
        random_state: seed for subsampling and the CV folds.
    """

    _constraints: ClassVar[dict[str, tuple[float, float]]] = {
        "n_steps": (1, 10**6), "learning_rate": (1e-6, 10.0), "floor_db": (0.0, 20.0), "max_rows": (10, 20000),
        "load_bins": (1, 1000),
    }

    def __init__(self, *, target: Target = "rsrp", n_steps: int = 150, learning_rate: float = 0.05,
                 floor_db: float = 0.5, kernel: str = "matern32", max_rows: int = 1500, ipw: bool = True,
                 load_bins: int = 10, device: str = "cpu", random_state: int = 0):
        self.target = target
        self.n_steps = n_steps
        self.learning_rate = learning_rate
        self.floor_db = floor_db
        self.kernel = kernel
        self.max_rows = max_rows
        self.ipw = ipw
        self.load_bins = load_bins
        self.device = device
        self.random_state = random_state

    def _check_params(self) -> None:
        problems = []
        if self.target not in ("rsrp", "rsrq"):
            problems.append(f"target: expected 'rsrp' or 'rsrq', got {self.target!r}")
        if self.kernel not in ("matern12", "matern32", "matern52"):
            problems.append(f"kernel: expected matern12, matern32 or matern52, got {self.kernel!r}")
        for name, (lo, hi) in self._constraints.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                problems.append(f"{name}: expected a value in [{lo}, {hi}], got {value!r}")
        if problems:
            raise ConfigError(problems)

    def _settings(self) -> FitSettings:
        return FitSettings(n_steps=self.n_steps, learning_rate=self.learning_rate, floor_db=self.floor_db,
                           uses_load=self.target == "rsrq", kernel=self.kernel, max_rows=self.max_rows)

    def fit(self, xy_m: np.ndarray, y: np.ndarray, *, load_rho: np.ndarray | None = None,
            site_xy_m: np.ndarray | None = None, azimuth_deg: float | None = None,
            sample_weight: np.ndarray | None = None, row_weight: np.ndarray | None = None) -> RadioModel:
        """Fit the posterior to positions `xy_m` (n, 2) in metres and targets `y` (n,) in dB.

        `site_xy_m` (the cell's site) anchors the log-distance term; `azimuth_deg` (the sector's
        bearing, clockwise from north) adds the 3GPP antenna-pattern term. `sample_weight` scales
        each row's likelihood (IPW); `row_weight` is how many raw samples a row aggregates (a grid
        square's count): its noise variance shrinks as (w_ref / w)^gamma (`model.ROW_WEIGHT_POWER`)
        and the training-row objectives weight it so.

        Raises:
            ConfigError: a hyperparameter out of range.
            SchemaError: wrong shapes, non-finite values, or RSRQ without `load_rho`.
        """
        self._check_params()
        rho = None if load_rho is None else np.asarray(load_rho, dtype=float)
        cell = CellData("cell", np.asarray(xy_m, dtype=float), np.asarray(y, dtype=float), rho,
                        None if sample_weight is None else np.asarray(sample_weight, dtype=float),
                        None if site_xy_m is None else np.asarray(site_xy_m, dtype=float),
                        None if azimuth_deg is None else float(azimuth_deg),
                        row_weight=None if row_weight is None else np.asarray(row_weight, dtype=float))
        problems = cell_problems(cell, uses_load=self.target == "rsrq", min_rows=2)
        if self.target == "rsrq" and rho is None:
            problems.append("load_rho: expected one load per row for target 'rsrq'")
        if problems:
            raise SchemaError(problems)
        if self.target == "rsrq" and self.ipw and cell.weight is None:
            cell.weight = ipw_weights(rho, n_bins=self.load_bins)
        self.fitted_ = fit_cells([cell], target=self.target, settings=self._settings(), seed=self.random_state,
                                 device=self.device)
        self.elbo_ = float(self.fitted_.elbo[0])
        self.n_train_ = len(cell.y)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "fitted_"):
            raise NotFittedError("RadioModel is not fitted; call fit() first")

    def predict(self, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
                rng: int | np.random.Generator | None = None) -> RadioPrediction:
        """Mean, epistemic std and aleatoric std (dB) at positions `xy_m` (n, 2).

        Raises:
            NotFittedError: before `fit`.
            SchemaError: `xy_m` not (n, 2) or not finite, `load_rho` not n finite loads.
        """
        del rng  # the posterior predictive is analytic
        self._check_fitted()
        xy_m = np.asarray(xy_m, dtype=float)
        problems = []
        if xy_m.ndim != 2 or xy_m.shape[1] != 2:
            problems.append(f"xy_m: expected shape (n, 2), got {xy_m.shape}")
        elif not np.all(np.isfinite(xy_m)):
            problems.append(f"xy_m: {int((~np.isfinite(xy_m)).any(axis=1).sum())} rows hold NaN or inf")
        if load_rho is not None and (np.shape(load_rho) != (len(xy_m),) or not np.all(np.isfinite(load_rho))):
            problems.append(f"load_rho: expected {len(xy_m)} finite loads, one per row")
        if problems:
            raise SchemaError(problems)
        return self.fitted_.predict(np.zeros(len(xy_m), dtype=np.int64), xy_m, load_rho, device=self.device)

    def sample(self, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
               rng: int | np.random.Generator | None = None, return_clipped: bool = False,
               value_range: tuple[float, float] | None = None):
        """One independent draw per row from its posterior predictive (mean, std sqrt(epistemic^2 +
        aleatoric^2), Gaussian or the calibrated Student-t), clipped to `value_range` (default: ingest's
        default range of the target, RSRP [-140, -44] dBm, RSRQ [-34, 2.5] dB); with `return_clipped`,
        also the mask of rows that were clipped."""
        pred = self.predict(xy_m, load_rho=load_rho)
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(self.random_state if rng is None else rng)
        # Gaussian rows draw standard normals as before; Student-t rows (calibration.TAIL_MODE) unit-std t draws
        draw = pred.mean + pred.total_std * std_t_draws(gen, pred.dof_or_inf(), len(pred.mean))
        lo, hi = value_range or (RSRP_RANGE_DBM if self.target == "rsrp" else RSRQ_EXTENDED_RANGE_DB)
        if not lo < hi:
            raise ConfigError(f"value_range: expected (min, max) with min < max, got {value_range!r}")
        clipped = (draw < lo) | (draw > hi)
        draw = np.clip(draw, lo, hi)
        return (draw, clipped) if return_clipped else draw

    def save(self, directory: str | Path) -> None:
        """safetensors arrays + JSON hyperparameters in `directory` (never pickle)."""
        self._check_fitted()
        directory = Path(directory)
        self.fitted_.save(directory / "model")
        params = {k: getattr(self, k) for k in _PARAMS}
        (directory / "params.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "params": params}))

    @classmethod
    def load(cls, directory: str | Path) -> RadioModel:
        directory = Path(directory)
        params = json.loads((directory / "params.json").read_text())["params"]
        model = cls(**params)
        model.fitted_ = FittedCells.load(directory / "model")
        model.elbo_ = float(model.fitted_.elbo[0])
        model.n_train_ = int(model.fitted_.n_train[0])
        return model
