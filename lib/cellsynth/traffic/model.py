"""Conditional denoising diffusion over one cell-week of hourly traffic (OpenDiff / CSDI spirit).

A series of 168 hourly values is split into a level and a shape:
    level = log(weekly mean traffic)            modelled by a ridge regressor on the context
    shape = traffic / weekly mean               modelled by the diffusion model
so a cell with no history gets both the right weekly pattern and the right volume. The shape is
diffused in log space, x0 = standardise(log(shape + eps)), which keeps peaks and quiet nights on
one scale and keeps generated traffic positive.

The denoiser is a small 1-D network over the week: the 168 hours (noisy value plus fixed
hour-of-day / hour-of-week harmonics) are cut into patches of `patch_h` hours, and MLP-Mixer
blocks mix across time and channels, modulated (FiLM) by the diffusion-step embedding plus a
context embedding. Classifier-free guidance (OpenDiff eqs. 7-8): the context is replaced by a learned
null embedding with probability `cond_drop_prob` in training, and sampling mixes
    eps = (1 + mu) * eps(x, k | c) - mu * eps(x, k | null),    mu = guidance_scale.
Two samplers share the trained network. Both are DDPM ancestral
sampling on a respaced schedule. The reference sampler runs `sampling_steps` steps with the
conditional and unconditional forwards one after the other. The fast sampler (the default) runs
fewer steps with both guidance forwards folded into one batched forward; its step count is chosen
at fit by `_calibrate_fast_steps`: the fewest steps whose samples on training contexts match the
reference sampler's statistics within the reference's own seed-to-seed noise times
`FAST_TOLERANCE` (fixed a priori), else the reference sampler is kept. (Deterministic DDIM was
tried first: even at the full step count its samples were 1.5-3x too dispersed within a context
on the toy cells, so this model's fast path keeps ancestral noise.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cellsynth.errors import ConfigError, NotFittedError, SchemaError

HOURS_PER_WEEK = 168
FORMAT_VERSION = 1
_RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
SAMPLERS = ("fast", "reference")
# Fast-sampler calibration, fixed a priori: step counts tried in increasing order (those
# below the reference's), and how far the fast samples may sit from the reference samples,
# as a multiple of the distance between two reference draws with different seeds (25 % above
# the reference's own Monte-Carlo noise at the calibration size), or below a floor counted as
# negligible: 0.05 of the training log-shapes' spread (the standardised unit; a few % of traffic)
# for the mean, spread and quantiles, 0.02 for autocorrelations.
FAST_CANDIDATE_STEPS = (5, 8, 10, 12, 16, 20, 25, 32, 40)
FAST_TOLERANCE = 1.25
FAST_FLOOR = {"context_mean": 0.05, "within_context_std": 0.05, "quantiles": 0.05, "acf_1_24h": 0.02}
CALIBRATION_CONTEXTS = 64  # training contexts (drawn without replacement) ...
CALIBRATION_SAMPLES = 4  # ... times samples each, per calibration draw
# Rows per sampling chunk: the activations of a chunk (with both guidance halves) stay near the
# CPU's cache, which ran 2x faster per row than 4096-row chunks on the 2-core bench machine.
SAMPLE_CHUNK_ROWS = 256
GPU_CHUNK_ROWS = 8192  # a GPU wants large batches; 8192 rows of activations are ~0.2 GB


# ------------------------------------------------------------------------------ network
def _step_embedding(k: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=k.device, dtype=torch.float32) / half)
    args = k.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _hour_features(n_hours: int) -> torch.Tensor:
    h = torch.arange(n_hours, dtype=torch.float32)
    feats = []
    for period in (24.0, 12.0, 168.0):
        feats += [torch.sin(2 * math.pi * h / period), torch.cos(2 * math.pi * h / period)]
    return torch.stack(feats)  # (6, n_hours)


class _Block(nn.Module):
    """MLP-Mixer block: a linear map across the week's tokens (global in time), then a channel
    MLP modulated (FiLM) by the step + context embedding. Plain matmuls run fast on one core."""

    def __init__(self, channels: int, n_tokens: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_mix = nn.Linear(n_tokens, n_tokens)
        self.norm2 = nn.LayerNorm(channels)
        self.film = nn.Linear(emb_dim, 2 * channels)
        self.fc1 = nn.Linear(channels, 2 * channels)
        self.fc2 = nn.Linear(2 * channels, channels)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # token mix as W @ h per row (same numbers as the Linear on h transposed, without the two
        # transposed copies, ~15% of a sampling forward on one core)
        h = h + torch.matmul(self.token_mix.weight, self.norm1(h)) + self.token_mix.bias[:, None]
        scale, shift = self.film(emb).unsqueeze(1).chunk(2, dim=-1)
        z = self.fc1(torch.addcmul(shift, self.norm2(h), 1 + scale))
        return h + self.fc2(self.act(z) if torch.is_grad_enabled() else nn.functional.silu(z, inplace=True))


class _Denoiser(nn.Module):
    # The week is cut into patches of `patch_h` hours, so the blocks run on 168 / patch_h tokens.
    def __init__(self, *, context_dim: int, channels: int, n_blocks: int, patch_h: int = 4,
                 n_hours: int = HOURS_PER_WEEK):
        super().__init__()
        self.emb_dim = channels
        self.patch_h = patch_h
        self.n_tokens = n_hours // patch_h
        self.register_buffer("hour_feats", _hour_features(n_hours).T.contiguous())  # (168, 6)
        self.pos = nn.Parameter(torch.zeros(1, self.n_tokens, channels))
        self.inp = nn.Linear(7 * patch_h, channels)
        self.step_mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.ctx_mlp = nn.Sequential(nn.Linear(max(context_dim, 1), channels), nn.SiLU(), nn.Linear(channels, channels))
        self.null = nn.Parameter(torch.zeros(channels))
        self.blocks = nn.ModuleList(_Block(channels, self.n_tokens, channels) for _ in range(n_blocks))
        self.out_norm = nn.LayerNorm(channels)
        self.out = nn.Linear(channels, patch_h)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, k: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, 168) noisy series, k (B,) steps, ctx (B, d) context, keep (B,) 1 = conditioned."""
        b = x.shape[0]
        feats = torch.cat([x.unsqueeze(-1), self.hour_feats.unsqueeze(0).expand(b, -1, -1)], dim=-1)
        h = self.inp(feats.reshape(b, self.n_tokens, -1)) + self.pos
        keep = keep.unsqueeze(1)
        emb = self.step_mlp(_step_embedding(k, self.emb_dim)) + keep * self.ctx_mlp(ctx) + (1 - keep) * self.null
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h)).reshape(b, -1)


def _cosine_alpha_bar(n_steps: int) -> np.ndarray:
    # Nichol & Dhariwal cosine schedule; betas capped at 0.999.
    s = 0.008
    t = np.linspace(0, n_steps, n_steps + 1) / n_steps
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    abar = f / f[0]
    betas = np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    return np.cumprod(1 - betas)


def nan_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std over finite values; 0 and 1 for columns with none or no spread."""
    finite = np.isfinite(x)
    n = finite.sum(axis=0)
    vals = np.where(finite, x, 0.0)
    mean = vals.sum(axis=0) / np.maximum(n, 1)
    var = (np.where(finite, x - mean, 0.0) ** 2).sum(axis=0) / np.maximum(n, 1)
    sd = np.sqrt(var)
    return np.where(n > 0, mean, 0.0), np.where(sd > 1e-12, sd, 1.0)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else float(value)


def _sample_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Summary statistics of standardised log-shapes x (n_contexts, n_samples, 168) that a
    sampler must reproduce: per-context mean week, per-hour spread across a context's samples,
    the marginal quantiles, and the autocorrelation at lags 1-24 h."""
    rows = x.reshape(-1, x.shape[-1])
    centred = rows - rows.mean(axis=1, keepdims=True)
    var = np.maximum((centred**2).mean(axis=1), 1e-12)
    acf = np.array([(centred[:, lag:] * centred[:, :-lag]).mean(axis=1) / var for lag in range(1, 25)]).mean(axis=1)
    return {
        "context_mean": x.mean(axis=1),
        "within_context_std": x.std(axis=1).mean(axis=0),
        "quantiles": np.quantile(rows, [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]),
        "acf_1_24h": acf,
    }


def _as_generator(rng: int | np.random.Generator | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# -------------------------------------------------------------------------------- model
class TrafficDiffusion:
    """Conditional diffusion model of one cell-week of hourly traffic.

    `fit(series, context)` with series (n_cells, 168) non-negative traffic and context
    (n_cells, d) numeric features (NaN allowed: imputed by the training mean); `sample(context,
    n_samples, rng=...)` returns (n_cells, n_samples, 168) traffic in the series' unit.
    `conditional=False` ignores the context (OpenDiff's CSDI ablation).
    """

    _constraints: dict[str, tuple[float, float]] = {
        "hidden_channels": (8, 1024), "n_blocks": (1, 12), "patch_h": (1, 24), "diffusion_steps": (2, 4000),
        "n_steps": (1, 10**7), "batch_size": (1, 10**6), "learning_rate": (1e-7, 1.0),
        "cond_drop_prob": (0.0, 0.999), "guidance_scale": (0.0, 100.0), "shape_eps": (1e-6, 10.0),
    }

    def __init__(
        self,
        *,
        hidden_channels: int = 64,
        n_blocks: int = 4,
        patch_h: int = 4,
        diffusion_steps: int = 100,
        sampling_steps: int | None = None,
        n_steps: int = 3000,
        batch_size: int = 32,
        learning_rate: float = 2e-3,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 1.0,
        conditional: bool = True,
        shape_eps: float = 0.05,
        sampler: str = "fast",
        device: str | torch.device = "cpu",
    ):
        self.hidden_channels = hidden_channels
        self.n_blocks = n_blocks
        self.patch_h = patch_h
        self.diffusion_steps = diffusion_steps
        self.sampling_steps = sampling_steps
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.cond_drop_prob = cond_drop_prob
        self.guidance_scale = guidance_scale
        self.conditional = conditional
        self.shape_eps = shape_eps
        self.sampler = sampler
        self.device = device

    # ----------------------------------------------------------------------- params
    _PARAMS = ("hidden_channels", "n_blocks", "patch_h", "diffusion_steps", "sampling_steps", "n_steps", "batch_size",
               "learning_rate", "cond_drop_prob", "guidance_scale", "conditional", "shape_eps", "sampler")

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PARAMS}

    def _check_params(self) -> None:
        problems = []
        for name, (lo, hi) in self._constraints.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
                problems.append(f"TrafficDiffusion.{name}: expected a number in [{lo:g}, {hi:g}], got {value!r}")
        s = self.sampling_steps
        if isinstance(self.patch_h, int) and HOURS_PER_WEEK % self.patch_h:
            problems.append(f"TrafficDiffusion.patch_h: expected a divisor of {HOURS_PER_WEEK}, got {self.patch_h}")
        if isinstance(self.hidden_channels, int) and self.hidden_channels % 8:
            problems.append(f"TrafficDiffusion.hidden_channels: expected a multiple of 8, got {self.hidden_channels}")
        if s is not None and (not isinstance(s, int) or not 1 <= s <= self.diffusion_steps):
            problems.append(f"TrafficDiffusion.sampling_steps: expected None or an int in [1, diffusion_steps], got {s!r}")
        if self.sampler not in SAMPLERS:
            problems.append(f"TrafficDiffusion.sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if problems:
            raise ConfigError(problems)

    # ------------------------------------------------------------------------ input
    @staticmethod
    def _check_series(series: Any) -> np.ndarray:
        arr = np.asarray(series, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != HOURS_PER_WEEK or arr.shape[0] < 2:
            raise SchemaError(f"series: expected shape (n_cells >= 2, {HOURS_PER_WEEK}), got {arr.shape}")
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise SchemaError("series: expected finite non-negative traffic, got NaN, inf or negative values")
        if (arr.mean(axis=1) <= 0).any():
            raise SchemaError("series: every cell-week needs some traffic, got an all-zero row")
        return arr

    def _check_context(self, context: Any, n: int, *, fitted_dim: int | None = None) -> np.ndarray:
        if context is None:
            if fitted_dim:
                raise SchemaError(f"context: model was fitted with {fitted_dim} context columns, got None")
            return np.zeros((n, 0))
        arr = np.asarray(context, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[0] != n:
            raise SchemaError(f"context: expected shape ({n}, d), got {arr.shape}")
        if fitted_dim is not None and arr.shape[1] != fitted_dim:
            raise SchemaError(f"context: expected {fitted_dim} columns as in fit, got {arr.shape[1]}")
        return arr

    def _standardise_context(self, ctx: np.ndarray) -> np.ndarray:
        z = (ctx - self.context_mean_) / self.context_std_
        return np.where(np.isfinite(z), z, 0.0)

    # -------------------------------------------------------------------------- fit
    def fit(
        self,
        series: Any,
        context: Any = None,
        *,
        groups: Any = None,
        rng: int | np.random.Generator | None = None,
    ) -> TrafficDiffusion:
        """Learn the level regressor and the shape denoiser from (n_rows, 168) series.

        Args:
            groups: the cell of each row when a cell contributes several weeks; the level
                regressor's ridge and spread are then chosen by leaving whole cells out, so
                they measure generation for unseen cells (default: one row per cell).

        Raises:
            ConfigError: a hyperparameter outside its range.
            SchemaError: wrong shapes, NaN or negative traffic.
        """
        self._check_params()
        y = self._check_series(series)
        ctx = self._check_context(context, y.shape[0])
        gen = _as_generator(rng)
        device = torch.device(self.device)

        self.context_dim_ = ctx.shape[1]
        self.context_mean_, self.context_std_ = nan_mean_std(ctx)
        z = self._standardise_context(ctx) if self.context_dim_ else ctx

        # Level: ridge regression of log weekly mean on the context, ridge chosen by exact
        # leave-one-out error; the LOO residual spread is the level's predictive std.
        level = np.log(y.mean(axis=1))
        grp = np.arange(len(level)) if groups is None else np.asarray(groups)
        if grp.shape != (len(level),):
            raise SchemaError(f"groups: expected shape ({len(level)},), got {grp.shape}")
        self._fit_level(z if self.conditional else np.zeros((len(level), 0)), level, grp)

        shape = y / y.mean(axis=1, keepdims=True)
        x0 = np.log(shape + self.shape_eps)
        self.shape_mean_ = float(x0.mean())
        self.shape_std_ = float(x0.std()) or 1.0
        x0 = (x0 - self.shape_mean_) / self.shape_std_

        torch_gen = torch.Generator(device="cpu").manual_seed(int(gen.integers(2**62)))
        # Initialise from the caller's rng without touching torch's global state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(gen.integers(2**62)))
            net = _Denoiser(context_dim=self.context_dim_, channels=self.hidden_channels, n_blocks=self.n_blocks,
                            patch_h=self.patch_h)
        net.to(device)
        abar = torch.tensor(_cosine_alpha_bar(self.diffusion_steps), dtype=torch.float32, device=device)
        data = torch.tensor(x0, dtype=torch.float32, device=device)
        ctx_t = torch.tensor(z if self.context_dim_ else np.zeros((len(y), 1)), dtype=torch.float32, device=device)
        opt = torch.optim.AdamW(net.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        warm = max(1, self.n_steps // 20)

        def _lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 5 %
            if step < warm:
                return (step + 1) / warm
            return 0.05 + 0.475 * (1 + math.cos(math.pi * (step - warm) / max(1, self.n_steps - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
        n, bsz = len(data), min(self.batch_size, 4 * len(data))
        drop = self.cond_drop_prob if self.conditional else 1.0
        losses = np.empty(self.n_steps)
        net.train()
        for step in range(self.n_steps):
            idx = torch.randint(0, n, (bsz,), generator=torch_gen).to(device)
            k = torch.randint(0, self.diffusion_steps, (bsz,), generator=torch_gen).to(device)
            noise = torch.randn(bsz, HOURS_PER_WEEK, generator=torch_gen).to(device)
            keep = (torch.rand(bsz, generator=torch_gen) >= drop).float().to(device)
            a = abar[k].unsqueeze(1)
            x_k = a.sqrt() * data[idx] + (1 - a).sqrt() * noise
            # DDPM objective (OpenDiff eq. 1): predict the added noise.
            loss = torch.mean((net(x_k, k, ctx_t[idx], keep) - noise) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            losses[step] = float(loss.detach())
        net.eval()
        self.net_ = net
        self.loss_history_ = losses
        self.n_train_ = n
        self.fast_steps_, self.fast_calibration_ = None, {}
        if self.sampler == "fast":
            cal_ctx = ctx_t if self.conditional and self.context_dim_ else None
            self.fast_steps_, self.fast_calibration_ = self._calibrate_fast_steps(cal_ctx, n, gen)
        return self

    def _fit_level(self, z: np.ndarray, level: np.ndarray, groups: np.ndarray) -> None:
        # Ridge on the standardised context; the ridge and the predictive spread come from
        # cross-validation that leaves whole cells out (up to 10 folds of cells).
        n, d = z.shape
        self.level_mean_ = float(level.mean())
        _, fold_of_group = np.unique(groups, return_inverse=True)
        n_groups = int(fold_of_group.max()) + 1
        folds = fold_of_group % min(10, n_groups)
        candidates = _RIDGE_GRID if d else (0.0,)
        best = None
        for alpha in candidates:
            resid = np.empty(n)
            for f in np.unique(folds):
                test = folds == f
                if test.all():  # a single cell: no held-out estimate, use the spread of its rows
                    resid[:] = level - level.mean()
                    break
                mu = level[~test].mean()
                coef = self._ridge(z[~test], level[~test] - mu, alpha) if d else np.zeros(0)
                resid[test] = level[test] - mu - (z[test] @ coef if d else 0.0)
            mse = float(np.mean(resid**2))
            if best is None or mse < best[0]:
                best = (mse, alpha)
        mse, self.level_alpha_ = best
        self.level_coef_ = self._ridge(z, level - self.level_mean_, self.level_alpha_) if d else np.zeros(0)
        self.level_std_ = math.sqrt(mse)

    @staticmethod
    def _ridge(z: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
        return np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ y)

    # ----------------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise NotFittedError("TrafficDiffusion is not fitted; call fit() first")

    def predict_level(self, context: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Predictive mean and std of log(weekly mean traffic) per row of `context`."""
        self._check_fitted()
        n = 1 if context is None else np.asarray(context).shape[0]
        ctx = self._check_context(context, n, fitted_dim=self.context_dim_ if context is not None else None)
        if self.level_coef_.size:
            mean = self.level_mean_ + self._standardise_context(ctx) @ self.level_coef_
        else:
            mean = np.full(len(ctx), self.level_mean_)
        return mean, np.full(len(ctx), self.level_std_)

    def sample(
        self,
        context: Any,
        n_samples: int = 1,
        *,
        rng: int | np.random.Generator | None = None,
        guidance_scale: float | None = None,
        batch_size: int | None = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        """Draw `n_samples` weeks per context row: (n_cells, n_samples, 168) traffic.

        For an unconditional model pass `context=None` with n_cells = 1, or a context array
        (ignored) to get one row per cell. `sampler` overrides the model's ("fast" falls back
        to the reference sampler when fit found no fast step count that matches it);
        `batch_size` is the rows per chunk (default SAMPLE_CHUNK_ROWS on the CPU, GPU_CHUNK_ROWS on a GPU).
        """
        self._check_fitted()
        gen = _as_generator(rng)
        n_cells = 1 if context is None else np.asarray(context).shape[0]
        ctx = self._check_context(context, n_cells, fitted_dim=self.context_dim_ if context is not None else None)
        mu = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        which = self.sampler if sampler is None else sampler
        if which not in SAMPLERS:
            raise ConfigError(f"TrafficDiffusion.sample: sampler expected one of {', '.join(SAMPLERS)}, got {which!r}")
        fast_steps = self.fast_steps_ if which == "fast" else None
        device = next(self.net_.parameters()).device

        level_mean, level_std = self.predict_level(context if context is not None else None)
        if context is None:
            level_mean, level_std = level_mean[:1], level_std[:1]
        levels = level_mean[:, None] + level_std[:, None] * gen.standard_normal((n_cells, n_samples))

        z = self._standardise_context(ctx) if self.context_dim_ and context is not None else np.zeros((n_cells, max(self.context_dim_, 1)))
        z_rep = np.repeat(z, n_samples, axis=0)
        cond = bool(self.conditional and self.context_dim_ and context is not None)
        torch_gen = torch.Generator(device="cpu").manual_seed(int(gen.integers(2**62)))
        out = self._sample_x0(torch.tensor(z_rep, dtype=torch.float32, device=device), cond=cond, guidance=mu,
                              gen=torch_gen, fast_steps=fast_steps,
                              chunk=batch_size or (SAMPLE_CHUNK_ROWS if device.type == "cpu" else GPU_CHUNK_ROWS))
        shape = np.exp(out * self.shape_std_ + self.shape_mean_) - self.shape_eps
        shape = np.clip(shape, 0.0, None)
        shape = shape / np.clip(shape.mean(axis=1, keepdims=True), 1e-9, None)
        series = shape.reshape(n_cells, n_samples, HOURS_PER_WEEK) * np.exp(levels)[:, :, None]
        return series

    @torch.inference_mode()
    def _sample_x0(self, ctx_t: torch.Tensor, *, cond: bool, guidance: float, gen: torch.Generator,
                   fast_steps: int | None, chunk: int) -> np.ndarray:
        """Standardised log-shapes (rows, 168), one per context row, chunk by chunk."""
        out = np.empty((ctx_t.shape[0], HOURS_PER_WEEK))
        for start in range(0, ctx_t.shape[0], chunk):
            sl = slice(start, start + chunk)
            x = self._denoise(ctx_t[sl], cond=cond, guidance=guidance, gen=gen, n_steps=fast_steps,
                              fold=fast_steps is not None)
            out[sl] = x.cpu().double().numpy()
        return out

    def _schedule(self, n_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        abar_full = _cosine_alpha_bar(self.diffusion_steps)
        n_sample = n_steps or self.sampling_steps or self.diffusion_steps
        steps = np.unique(np.round(np.linspace(0, self.diffusion_steps - 1, n_sample)).astype(int))
        return steps, abar_full[steps]

    def _denoise(self, ctx_t: torch.Tensor, *, cond: bool, guidance: float, gen: torch.Generator,
                 n_steps: int | None = None, fold: bool = False) -> torch.Tensor:
        # Respaced ancestral DDPM: betas recomputed from alpha_bar on the kept steps. The
        # reference sampler runs `sampling_steps` steps with the conditional and unconditional
        # forwards one after the other; the fast one fewer steps with both halves folded into
        # one forward of twice the rows (same arithmetic, one pass over the weights).
        steps, abar = self._schedule(n_steps)
        b = ctx_t.shape[0]
        device = ctx_t.device
        x = torch.randn(b, HOURS_PER_WEEK, generator=gen).to(device)
        ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)
        guided = cond and guidance != 0.0
        if fold and guided:
            ctx2, keep2 = torch.cat([ctx_t, ctx_t]), torch.cat([ones, zeros])
        for i in range(len(steps) - 1, -1, -1):
            k = torch.full((b,), int(steps[i]), device=device, dtype=torch.long)
            if guided and fold:
                eps_c, eps_u = self.net_(torch.cat([x, x]), torch.cat([k, k]), ctx2, keep2).chunk(2)
                eps = (1 + guidance) * eps_c - guidance * eps_u  # OpenDiff eq. 8
            elif guided:
                eps_c = self.net_(x, k, ctx_t, ones)
                eps_u = self.net_(x, k, ctx_t, zeros)
                eps = (1 + guidance) * eps_c - guidance * eps_u  # OpenDiff eq. 8
            else:
                eps = self.net_(x, k, ctx_t, ones if cond else zeros)
            a_t = float(abar[i])
            a_prev = float(abar[i - 1]) if i > 0 else 1.0
            beta = 1 - a_t / a_prev
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x0 = x0.clamp(-6.0, 6.0)
            mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
            if i > 0:
                var = beta * (1 - a_prev) / (1 - a_t)
                x = mean + math.sqrt(var) * torch.randn(b, HOURS_PER_WEEK, generator=gen).to(device)
            else:
                x = mean
        return x

    # ------------------------------------------------------------ fast-sampler calibration
    def _calibrate_fast_steps(self, ctx_t: torch.Tensor | None, n_rows: int,
                              gen: np.random.Generator) -> tuple[int | None, dict[str, Any]]:
        """The fewest respaced steps whose samples match the reference sampler on training contexts.

        Two reference draws R1, R2 (different seeds) and one fast draw F per candidate on the
        same training contexts; for each statistic, F passes when the mean of d(F, R1) and
        d(F, R2) is at most FAST_TOLERANCE * d(R1, R2) or FAST_FLOOR. All statistics must pass; None (keep
        the reference sampler) when no candidate below `sampling_steps` does.
        """
        device = next(self.net_.parameters()).device
        n_ctx = min(CALIBRATION_CONTEXTS, n_rows)
        if ctx_t is None:
            rows = torch.zeros(n_ctx * CALIBRATION_SAMPLES, max(self.context_dim_, 1), device=device)
        else:
            pick = torch.as_tensor(np.sort(gen.choice(n_rows, n_ctx, replace=False)), device=ctx_t.device)
            rows = ctx_t[pick].repeat_interleave(CALIBRATION_SAMPLES, dim=0)
        cond = ctx_t is not None
        ref_steps = len(self._schedule()[0])
        seeds = gen.integers(2**62, size=2 + len(FAST_CANDIDATE_STEPS))

        def draw(seed: int, fast_steps: int | None) -> dict[str, np.ndarray]:
            g = torch.Generator(device="cpu").manual_seed(int(seed))
            x = self._sample_x0(rows, cond=cond, guidance=self.guidance_scale, gen=g, fast_steps=fast_steps,
                                chunk=SAMPLE_CHUNK_ROWS)
            return _sample_statistics(x.reshape(n_ctx, CALIBRATION_SAMPLES, HOURS_PER_WEEK))

        r1, r2 = draw(seeds[0], None), draw(seeds[1], None)
        noise = {k: _rms(r1[k] - r2[k]) for k in r1}
        report: dict[str, Any] = {"reference_noise": noise, "candidates": {}}
        for n_steps, seed in zip(FAST_CANDIDATE_STEPS, seeds[2:]):
            if n_steps >= ref_steps:
                break
            f = draw(seed, n_steps)
            dist = {k: 0.5 * (_rms(f[k] - r1[k]) + _rms(f[k] - r2[k])) for k in f}
            ok = all(dist[k] <= max(FAST_TOLERANCE * noise[k], FAST_FLOOR[k]) for k in dist)
            report["candidates"][str(n_steps)] = {"distance": dist, "passed": ok}
            if ok:
                return n_steps, report
        return None, report

    # ----------------------------------------------------------------------- persist
    def save(self, path: str | Path) -> Path:
        """Write `weights.safetensors` (network + level regressor arrays) and `params.json`."""
        self._check_fitted()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net_.state_dict().items()}
        for name in ("context_mean_", "context_std_", "level_coef_", "loss_history_"):
            tensors[name] = torch.tensor(np.asarray(getattr(self, name), dtype=np.float64))
        save_file(tensors, str(folder / "weights.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION, "class": "TrafficDiffusion", "params": self.get_params(),
            "context_dim": self.context_dim_, "level_mean": self.level_mean_, "level_std": self.level_std_,
            "level_alpha": self.level_alpha_, "shape_mean": self.shape_mean_, "shape_std": self.shape_std_,
            "n_train": self.n_train_, "fast_steps": self.fast_steps_, "fast_calibration": self.fast_calibration_,
        }
        (folder / "params.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=_jsonable))
        return folder

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> TrafficDiffusion:
        folder = Path(path)
        meta = json.loads((folder / "params.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise SchemaError(f"{folder}/params.json: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        model = cls(**meta["params"], device=device)
        tensors = load_file(str(folder / "weights.safetensors"))
        model.context_dim_ = int(meta["context_dim"])
        for name in ("context_mean_", "context_std_", "level_coef_", "loss_history_"):
            setattr(model, name, tensors.pop(name).numpy())
        for name in ("level_mean", "level_std", "level_alpha", "shape_mean", "shape_std"):
            setattr(model, name + "_", float(meta[name]))
        model.n_train_ = int(meta["n_train"])
        # Saved before the fast sampler existed: no calibrated step count, so the reference sampler.
        model.fast_steps_ = meta.get("fast_steps")
        model.fast_calibration_ = meta.get("fast_calibration", {})
        net = _Denoiser(context_dim=model.context_dim_, channels=model.hidden_channels, n_blocks=model.n_blocks,
                        patch_h=model.patch_h)
        net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items()})
        model.net_ = net.to(torch.device(device)).eval()
        return model
