"""Bayesian radio-field models: `RadioModel` (one cell, scikit-learn style), `fit_cells` (a shard
of cells trained as one batched model) and `RadioModels` (what the lake holds, for generation)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.radio import _batched as B
from cellsynth.radio.transforms import ipw_weights

FORMAT_VERSION = 4  # 3: gap smoother + block-CV gap scale in the geometry; 4: local-term factor (random K-fold CV)
Target = Literal["rsrp", "rsrq"]
_PREDICT_CHUNK_ROWS = 8192


@dataclass
class RadioPrediction:
    """Predictive mean and its uncertainty split by GUMBLE eq. 19 (all dB, shape (n,))."""

    mean: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray
    pooled: np.ndarray | None = None  # True where a cell had no model of its own

    @property
    def total_std(self) -> np.ndarray:
        return np.sqrt(self.epistemic_std**2 + self.aleatoric_std**2)

    def reliable(self, threshold_db: float) -> np.ndarray:
        """True where the epistemic std is below `threshold_db` (GUMBLE section 6.2)."""
        return self.epistemic_std < threshold_db


@dataclass
class CellData:
    """One cell's training rows."""

    cell_id: str
    xy_m: np.ndarray  # (n, 2)
    y: np.ndarray  # (n,) RSRP dBm or RSRQ dB
    load_rho: np.ndarray | None = None
    weight: np.ndarray | None = None  # per-row likelihood scale (IPW), mean ~1
    origin_xy_m: np.ndarray | None = None  # site position when the cells table has one
    azimuth_deg: float | None = None  # sector azimuth when the cells table has one (antenna term)
    local: bool = True  # local-residual term; off for a pooled model over several cells' rows


@dataclass
class FitSettings:
    n_centres: int = 32
    n_steps: int = 2000
    learning_rate: float = 0.02
    floor_db: float = 0.5
    sigma_out_db_per_km: float = 10.0
    uses_load: bool = False
    # Block side of the internal spatial-block CV that sets the gap smoother and gap std (None = off).
    cv_block_m: float | None = 200.0
    # Scale the aleatoric std after training so the total std is calibrated on leave-one-out rows.
    calibrate_aleatoric: bool = True
    # Random K-fold CV on each cell's rows that sets a prediction-time factor on the local term.
    local_cv: bool = True
    # SVI loss: "fused" (the same Trace_ELBO estimator written out, ~5x cheaper a step) or "pyro".
    svi_loss: str = "fused"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FittedCells:
    """Posterior of C cells trained together (or one, C = 1)."""

    cell_ids: list[str]
    target: str
    settings: FitSettings
    geometry: B.CellGeometry
    posterior: B.Posterior
    elbo: np.ndarray
    n_train: np.ndarray
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    # per cell index: (geometry, posterior, constants) of that cell alone; generation predicts
    # each cell in many small groups (window x shard x role), and rebuilding these was ~15% of it
    _one: dict[int, tuple[B.CellGeometry, B.Posterior, dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.cell_ids)}

    def index_of(self, cell_ids: np.ndarray) -> np.ndarray:
        return np.array([self._index.get(str(c), -1) for c in cell_ids], dtype=np.int64)

    def consts(self, idx: np.ndarray | list[int], device) -> dict[str, torch.Tensor]:
        return B.constants(self.geometry.take(idx), floor_db=self.settings.floor_db,
                           sigma_out_db_per_km=self.settings.sigma_out_db_per_km, device=device)

    def moments(self, cell_index: int, xy_m: np.ndarray, load_rho: np.ndarray | None, *, n_samples: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, n) per-weight-sample means and aleatoric stds for rows of one cell."""
        device = self.posterior.loc["a"].device
        if cell_index not in self._one:
            idx = [cell_index]
            self._one[cell_index] = (self.geometry.take(idx), self.posterior.take(idx), self.consts(idx, device))
        geo, post, k = self._one[cell_index]
        mus, sigmas = [], []
        for start in range(0, len(xy_m), _PREDICT_CHUNK_ROWS):
            sl = slice(start, start + _PREDICT_CHUNK_ROWS)
            rho = None if (load_rho is None or not self.settings.uses_load) else load_rho[sl][None]
            f = B.features(geo, xy_m[sl][None], rho, device=device)
            mu, sigma = B.predict_moments(post, f, k, n_samples=n_samples, generator=generator)
            mus.append(mu[:, 0])
            sigmas.append(sigma[:, 0])
        return torch.cat(mus, -1), torch.cat(sigmas, -1)

    def predict(self, cell_index: np.ndarray, xy_m: np.ndarray, load_rho: np.ndarray | None = None, *,
                n_samples: int, seed: int = 0) -> RadioPrediction:
        """Predict rows whose model is `self.cell_ids[cell_index[i]]` (grouped by cell)."""
        n = len(xy_m)
        mean, ep, al = np.empty(n), np.empty(n), np.empty(n)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for ci in np.unique(cell_index):
                rows = np.flatnonzero(cell_index == ci)
                rho = None if load_rho is None else np.asarray(load_rho, dtype=float)[rows]
                mu, sigma = self.moments(int(ci), np.asarray(xy_m, dtype=float)[rows], rho, n_samples=n_samples, generator=gen)
                m, e, a = B.decompose(mu, sigma)
                mean[rows], ep[rows], al[rows] = m.cpu().numpy(), e.cpu().numpy(), a.cpu().numpy()
        return RadioPrediction(mean, ep, al)

    # ------------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in B.LATENTS:
            out[f"loc.{name}"] = self.posterior.loc[name].detach().cpu().contiguous()
            out[f"scale.{name}"] = self.posterior.scale[name].detach().cpu().contiguous()
        for name in B.CellGeometry.__dataclass_fields__:
            out[f"geo.{name}"] = torch.as_tensor(np.asarray(getattr(self.geometry, name), dtype=np.float64))
        out["elbo"] = torch.as_tensor(self.elbo, dtype=torch.float64)
        out["n_train"] = torch.as_tensor(self.n_train, dtype=torch.int64)
        return out

    def meta(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "cell_ids": self.cell_ids, "target": self.target,
                "settings": self.settings.as_dict()}

    def save(self, path: str | Path, *, extra_meta: dict[str, Any] | None = None) -> None:
        """Write `<path>.safetensors` (weights) and `<path>.json` (ids, settings)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps({**self.meta(), **(extra_meta or {})}))

    @classmethod
    def load(cls, path: str | Path, *, device="cpu") -> FittedCells:
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise SchemaError(f"radio weights {path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        t = load_file(str(path.with_suffix(".safetensors")), device=str(device))
        post = B.Posterior({n: t[f"loc.{n}"] for n in B.LATENTS}, {n: t[f"scale.{n}"] for n in B.LATENTS})
        geo = B.CellGeometry(**{n: t[f"geo.{n}"].cpu().numpy() for n in B.CellGeometry.__dataclass_fields__})
        return cls(meta["cell_ids"], meta["target"], FitSettings(**meta["settings"]), geo, post,
                   t["elbo"].cpu().numpy(), t["n_train"].cpu().numpy())


def _pad(cells: list[CellData], geo: B.CellGeometry, uses_load: bool, device) -> tuple[B.Features, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_max = max(len(c.y) for c in cells)
    n_cells = len(cells)
    xy = np.zeros((n_cells, n_max, 2))
    y = np.zeros((n_cells, n_max))
    rho = np.full((n_cells, n_max), 0.5)
    w = np.ones((n_cells, n_max))  # pyro.poutine.scale needs > 0; the mask drops padding
    mask = np.zeros((n_cells, n_max), dtype=bool)
    for i, c in enumerate(cells):
        n = len(c.y)
        xy[i, :n], y[i, :n], mask[i, :n] = c.xy_m, c.y, True
        xy[i, n:] = c.xy_m[0]  # padding rows repeat a real position; the mask removes them
        w[i, :n] = 1.0 if c.weight is None else c.weight
        if uses_load and c.load_rho is not None:
            rho[i, :n] = c.load_rho
    f = B.features(geo, xy, rho if uses_load else None, device=device, training=True)
    tt = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return f, tt(y), tt(mask, torch.bool), tt(w)


def fit_cells(cells: list[CellData], *, target: Target, settings: FitSettings, seed: int = 0,
              device: torch.device | str = "cpu") -> FittedCells:
    """Train every cell in `cells` as one batched model: one SVI loop, each cell's ELBO its own."""
    if not cells:
        raise ValueError("fit_cells: no cells given")
    rng = np.random.default_rng(seed)
    parts = []
    for c in cells:
        parts.append(B.cell_geometry(c.xy_m, c.y, n_centres=settings.n_centres, origin_xy_m=c.origin_xy_m, rng=rng,
                                     azimuth_deg=c.azimuth_deg, local=c.local))
    records = []
    if settings.cv_block_m:  # internal spatial-block CV on each cell's own rows (see B._gap_cv)
        records = [B._gap_cv(c.xy_m, c.y, n_centres=settings.n_centres, origin_xy_m=c.origin_xy_m, azimuth_deg=c.azimuth_deg,
                             block_m=settings.cv_block_m, rng=rng) if c.local else None for c in cells]
    local_records = []
    if settings.local_cv:  # internal random K-fold CV on each cell's own rows (see B._local_cv)
        local_records = [B._local_cv(c.xy_m, c.y, n_centres=settings.n_centres, origin_xy_m=c.origin_xy_m,
                                     azimuth_deg=c.azimuth_deg, rng=rng) if c.local else None for c in cells]
    geo = B.CellGeometry.concat(parts)
    device = torch.device(device)
    f, y, mask, w = _pad(cells, geo, settings.uses_load, device)
    consts = B.constants(geo, floor_db=settings.floor_db, sigma_out_db_per_km=settings.sigma_out_db_per_km, device=device)
    post, elbo = B.fit_svi(f, y, mask, w, consts, n_centres=geo.centres_xy_m.shape[1], n_steps=settings.n_steps,
                           learning_rate=settings.learning_rate, seed=seed, loss=settings.svi_loss)
    if settings.calibrate_aleatoric:
        # one factor per kind: a pooled model trained in the same batch keeps its own factor
        for kind in (True, False):
            idx = [i for i, c in enumerate(cells) if c.local == kind]
            if idx:
                geo.aleatoric_scale[idx] = B.loo_aleatoric_scale(post, f, y, mask, consts, seed=seed, cells=idx)
    if local_records:
        B.calibrate_local(geo, local_records)
    if records:
        B.calibrate_gaps(geo, records)
    return FittedCells([c.cell_id for c in cells], target, settings, geo, post, elbo.cpu().numpy(),
                       np.array([len(c.y) for c in cells], dtype=np.int64))


class RadioModel:
    """Bayesian radio field of one cell: y = f(position[, load]) with epistemic and aleatoric std.

    Args:
        target: "rsrp" (position only) or "rsrq" (position and load rho, IPW over load bins).
        n_centres: RBF centres of the residual network.
        n_steps: SVI steps (full batch, Adam with learning rate decaying 10x over the run).
        learning_rate: initial Adam learning rate.
        n_weight_samples: M weight draws per prediction (GUMBLE eq. 19).
        floor_db: aleatoric std floor.
        sigma_out_db_per_km: prior growth of the epistemic std beyond the data's coverage.
        ipw: RSRQ only: weight the likelihood by inverse load-bin probability (eqs. 20-21).
        load_bins: bins of the load histogram for IPW.
        device: torch device for training and prediction.
        random_state: seed for centre placement, SVI and prediction draws.
    """

    _constraints: ClassVar[dict[str, tuple[float, float]]] = {
        "n_centres": (1, 4096), "n_steps": (1, 10**7), "learning_rate": (1e-6, 10.0),
        "n_weight_samples": (2, 10**5), "floor_db": (0.0, 20.0), "sigma_out_db_per_km": (0.0, 1000.0),
        "load_bins": (1, 1000),
    }

    def __init__(self, *, target: Target = "rsrp", n_centres: int = 32, n_steps: int = 2000,
                 learning_rate: float = 0.02, n_weight_samples: int = 64, floor_db: float = 0.5,
                 sigma_out_db_per_km: float = 10.0, ipw: bool = True, load_bins: int = 10,
                 device: str = "cpu", random_state: int = 0):
        self.target = target
        self.n_centres = n_centres
        self.n_steps = n_steps
        self.learning_rate = learning_rate
        self.n_weight_samples = n_weight_samples
        self.floor_db = floor_db
        self.sigma_out_db_per_km = sigma_out_db_per_km
        self.ipw = ipw
        self.load_bins = load_bins
        self.device = device
        self.random_state = random_state

    def _check_params(self) -> None:
        problems = []
        if self.target not in ("rsrp", "rsrq"):
            problems.append(f"target: expected 'rsrp' or 'rsrq', got {self.target!r}")
        for name, (lo, hi) in self._constraints.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                problems.append(f"{name}: expected a value in [{lo}, {hi}], got {value!r}")
        if problems:
            raise ConfigError(problems)

    def _settings(self) -> FitSettings:
        return FitSettings(self.n_centres, self.n_steps, self.learning_rate, self.floor_db,
                           self.sigma_out_db_per_km, uses_load=self.target == "rsrq")

    def fit(self, xy_m: np.ndarray, y: np.ndarray, *, load_rho: np.ndarray | None = None,
            site_xy_m: np.ndarray | None = None, azimuth_deg: float | None = None,
            sample_weight: np.ndarray | None = None) -> RadioModel:
        """Fit the posterior to positions `xy_m` (n, 2) in metres and targets `y` (n,) in dB.

        `site_xy_m` (the cell's site) anchors the log-distance term; `azimuth_deg` (the sector's
        bearing, clockwise from north) adds the 3GPP antenna-pattern term.

        Raises:
            ConfigError: a hyperparameter out of range.
            SchemaError: wrong shapes, non-finite values, or RSRQ without `load_rho`.
        """
        self._check_params()
        xy_m = np.asarray(xy_m, dtype=float)
        y = np.asarray(y, dtype=float)
        problems = []
        if xy_m.ndim != 2 or xy_m.shape[1] != 2:
            problems.append(f"xy_m: expected shape (n, 2), got {xy_m.shape}")
        elif len(y) != len(xy_m):
            problems.append(f"y: expected {len(xy_m)} values to match xy_m, got {len(y)}")
        if len(y) < 2:
            problems.append(f"y: expected at least 2 rows, got {len(y)}")
        if not (np.all(np.isfinite(xy_m)) and np.all(np.isfinite(y))):
            problems.append("xy_m/y: expected finite values, got NaN or inf")
        if self.target == "rsrq" and (load_rho is None or len(load_rho) != len(y)):
            problems.append("load_rho: expected one load per row for target 'rsrq'")
        if problems:
            raise SchemaError(problems)
        weight = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if self.target == "rsrq" and self.ipw and weight is None:
            weight = ipw_weights(np.asarray(load_rho, dtype=float), n_bins=self.load_bins)
        cell = CellData("cell", xy_m, y, None if load_rho is None else np.asarray(load_rho, dtype=float), weight,
                        None if site_xy_m is None else np.asarray(site_xy_m, dtype=float),
                        None if azimuth_deg is None else float(azimuth_deg))
        self.fitted_ = fit_cells([cell], target=self.target, settings=self._settings(), seed=self.random_state,
                                 device=self.device)
        self.elbo_ = float(self.fitted_.elbo[0])
        self.n_train_ = len(y)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "fitted_"):
            raise NotFittedError("RadioModel is not fitted; call fit() first")

    def predict(self, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
                rng: int | np.random.Generator | None = None) -> RadioPrediction:
        """Mean, epistemic std and aleatoric std (dB) at positions `xy_m` (n, 2)."""
        self._check_fitted()
        xy_m = np.asarray(xy_m, dtype=float)
        seed = _seed_from(rng, self.random_state)
        return self.fitted_.predict(np.zeros(len(xy_m), dtype=np.int64), xy_m, load_rho,
                                    n_samples=self.n_weight_samples, seed=seed)

    def sample(self, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
               rng: int | np.random.Generator | None = None) -> np.ndarray:
        """One draw per row from the posterior predictive: each row picks one of M weight samples
        at random, then adds its noise, so every row's marginal is the full predictive (epistemic
        and aleatoric) while the cost stays M x n."""
        self._check_fitted()
        xy_m = np.asarray(xy_m, dtype=float)
        gen = torch.Generator().manual_seed(_seed_from(rng, self.random_state))
        with torch.no_grad():
            mu, sigma = self.fitted_.moments(0, xy_m, load_rho, n_samples=self.n_weight_samples, generator=gen)
            pick = torch.randint(mu.shape[0], (1, mu.shape[-1]), generator=gen).to(mu.device)
            mu, sigma = mu.gather(0, pick)[0], sigma.gather(0, pick)[0]
            draw = mu + sigma * torch.randn(mu.shape[-1], generator=gen).to(mu.device)
        return draw.cpu().numpy().astype(float)

    def save(self, directory: str | Path) -> None:
        """safetensors weights + JSON hyperparameters in `directory` (never pickle)."""
        self._check_fitted()
        directory = Path(directory)
        self.fitted_.save(directory / "model")
        params = {k: getattr(self, k) for k in ("target", "n_centres", "n_steps", "learning_rate", "n_weight_samples",
                                                "floor_db", "sigma_out_db_per_km", "ipw", "load_bins", "device",
                                                "random_state")}
        (directory / "params.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "params": params}))

    @classmethod
    def load(cls, directory: str | Path) -> RadioModel:
        directory = Path(directory)
        params = json.loads((directory / "params.json").read_text())["params"]
        model = cls(**params)
        model.fitted_ = FittedCells.load(directory / "model", device=params["device"])
        model.elbo_ = float(model.fitted_.elbo[0])
        model.n_train_ = int(model.fitted_.n_train[0])
        return model


def _seed_from(rng: int | np.random.Generator | None, default: int) -> int:
    if rng is None:
        return int(default)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(2**31 - 1))
    return int(rng)


def take_cells(fitted: FittedCells, idx: list[int]) -> FittedCells:
    """The sub-model of cells `idx` (e.g. one shard out of an actor's batch)."""
    return FittedCells([fitted.cell_ids[i] for i in idx], fitted.target, fitted.settings, fitted.geometry.take(idx),
                       fitted.posterior.take(idx), fitted.elbo[idx], fitted.n_train[idx])


POOLED_CELL_ID = "__pooled__"


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

    def cells(self, target: Target) -> list[str]:
        """Cells with a model of their own for `target`."""
        return sorted(c for (t, c) in self._own if t == target)

    def predict(self, target: Target, cell_ids: np.ndarray, xy_m: np.ndarray, *, load_rho: np.ndarray | None = None,
                seed: int = 0) -> RadioPrediction:
        """Row i predicted by cell_ids[i]'s model (grouped by cell); `pooled` flags fallbacks."""
        cell_ids = np.asarray(cell_ids).astype(str)
        xy_m = np.asarray(xy_m, dtype=float)
        n = len(cell_ids)
        mean, ep, al = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
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
            pred = self._files[path].predict(np.full(len(rows), i), xy, r, n_samples=self.n_weight_samples,
                                             seed=seed + k)
            mean[rows], ep[rows], al[rows] = pred.mean, pred.epistemic_std, pred.aleatoric_std
        return RadioPrediction(mean, ep, al, pooled)
