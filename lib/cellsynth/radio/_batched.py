"""Batched Bayesian radio-field model: C cells trained together as one Pyro model.

Every latent has a leading cell axis, so one optimizer loop trains a whole shard while each
cell's ELBO stays its own (the joint ELBO is a sum of independent per-cell ELBOs, and Adam is
element-wise, so the gradient a cell's parameters see does not depend on the other cells).
A single cell is simply C = 1: `RadioModel` uses exactly this code, which makes the per-cell
model the reference the batched fast path is tested against.

Model for cell c at position x (GUMBLE eq. 17, y ~ N(mu, sigma)):

    mu(x)    = a_c + b_c * log10(d_c(x) / 1 km)          physical log-distance path loss
             + sigma_w,c * sum_k w_ck * phi_k(x)            Bayesian residual over RBF features
             + sigma_out * v_c * u_c(x)                      extrapolation term (see below)
             + c1_c * r + c2_c * r^2                         load term, RSRQ only (r = rho - 0.5)
    sigma(x) = floor + exp(s_c + 0.5 * s_raw + 0.3 * sum_k ws_ck phi_k(x))

Why this shape (measured on the simulator and on UCC drive tests, see bench/):
* A plain mean-field tanh MLP on normalised (x, y) has no notion of "far from the data": its
  epistemic std rose only ~2x outside the data, and on real drive tests it lost ~1.3 dB MAE
  to kNN. The log-distance term carries the large-scale trend, so the network only models a
  residual, and the RBF features (centres drawn by k-means++ on the cell's own positions)
  vanish away from the data, so the residual falls back to its prior mean there.
* Falling back to the prior *mean* alone would make the epistemic std *shrink* outside the
  data (phi -> 0 kills the weight variance). The term v_c * u_c(x) fixes that: u_c is the
  distance (km) beyond the RBF coverage radius, exactly 0 on ~all training points, so the
  data never constrain v_c and its posterior stays at its N(0, 1) prior; outside the data the
  epistemic std grows linearly with distance, sigma_out dB per km (GUMBLE fig. 7 shows
  ~22 dB in the extrapolation area).
* Priors are non-centred (all latents N(0, 1), multiplied by data-scaled constants) so every
  site has the same scale for the optimizer; a_c, b_c are centred on a per-cell least-squares
  fit (empirical Bayes) with 10 dB / 10 dB-per-decade prior std, and sigma_w,c is the
  residual std of that fit: the residual field cannot be larger than what is left to explain.
* Aleatoric floor 0.5 dB: RSRP/RSRQ are reported in 1 dB steps, so the quantisation noise
  alone has std 1/sqrt(12) ~ 0.29 dB; below 0.5 dB the likelihood would reward overfitting
  repeated positions. GUMBLE appendix: aleatoric = sigma_S^2/N + sigma_M^2, Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.nn import PyroModule, PyroSample
from pyro.poutine.util import site_is_subsample

LATENTS: tuple[str, ...] = ("a", "b", "w", "v", "c1", "c2", "s", "ws")
_VECTOR_LATENTS = ("w", "ws")
A_PRIOR_DB = 10.0
B_PRIOR_DB_PER_DECADE = 10.0
LOAD_PRIOR_DB = 5.0
MIN_DISTANCE_M = 10.0


@dataclass
class CellGeometry:
    """Per-cell constants fixed before training (numpy, leading axis = cell)."""

    origin_xy_m: np.ndarray  # (C, 2) site or estimated centre
    centres_xy_m: np.ndarray  # (C, K, 2) RBF centres; padding centres sit far away
    length_m: np.ndarray  # (C,) RBF length scale
    coverage_m: np.ndarray  # (C,) radius around the centres that counts as "inside the data"
    a_off: np.ndarray  # (C,) least-squares intercept (dB)
    b_off: np.ndarray  # (C,) least-squares slope (dB per decade of distance)
    resid_db: np.ndarray  # (C,) residual std of the least-squares fit (dB)

    def take(self, idx: np.ndarray | list[int]) -> CellGeometry:
        return CellGeometry(**{k: np.asarray(getattr(self, k))[idx] for k in self.__dataclass_fields__})

    @staticmethod
    def concat(parts: list[CellGeometry]) -> CellGeometry:
        k_max = max(p.centres_xy_m.shape[1] for p in parts)
        out = {}
        for name in CellGeometry.__dataclass_fields__:
            arrays = [getattr(p, name) for p in parts]
            if name == "centres_xy_m":
                arrays = [_pad_centres(a, k_max) for a in arrays]
            out[name] = np.concatenate(arrays, axis=0)
        return CellGeometry(**out)


def _pad_centres(centres: np.ndarray, k: int) -> np.ndarray:
    if centres.shape[1] == k:
        return centres
    pad = np.full((centres.shape[0], k - centres.shape[1], 2), 1e9)
    return np.concatenate([centres, pad], axis=1)


def cell_geometry(
    xy_m: np.ndarray, y: np.ndarray, *, n_centres: int, origin_xy_m: np.ndarray | None, rng: np.random.Generator
) -> CellGeometry:
    """Constants for one cell from its training positions (n, 2) and targets (n,)."""
    from sklearn.cluster import kmeans_plusplus

    xy_m = np.asarray(xy_m, dtype=float)
    y = np.asarray(y, dtype=float)
    if origin_xy_m is None or not np.all(np.isfinite(origin_xy_m)):
        # No site: the strongest decile of measurements marks the cell's centre.
        top = y >= np.quantile(y, 0.9)
        origin_xy_m = xy_m[top].mean(axis=0)
    origin_xy_m = np.asarray(origin_xy_m, dtype=float)
    uniq = np.unique(np.round(xy_m, 1), axis=0)
    k = int(min(n_centres, len(uniq)))
    seed = int(rng.integers(2**31 - 1))
    centres, _ = kmeans_plusplus(uniq, n_clusters=k, random_state=seed)
    if k > 1:
        dc = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        np.fill_diagonal(dc, np.inf)
        length_m = float(np.median(dc.min(axis=1)))
    else:
        length_m = 100.0
    length_m = max(length_m, 20.0)
    dmin = _min_dist(xy_m, centres)
    coverage_m = float(max(np.quantile(dmin, 0.99), length_m))
    log_d = _log_distance(xy_m, origin_xy_m)
    design = np.stack([np.ones_like(log_d), log_d], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    if not -60.0 <= coef[1] <= 0.0:  # a rising or absurdly steep trend from a poor centre estimate
        coef = np.array([y.mean(), 0.0])
    resid = float(np.std(y - design @ coef))
    return CellGeometry(
        origin_xy_m=origin_xy_m[None], centres_xy_m=_pad_centres(centres[None], n_centres),
        length_m=np.array([length_m]), coverage_m=np.array([coverage_m]),
        a_off=np.array([coef[0]]), b_off=np.array([coef[1]]), resid_db=np.array([max(resid, 1.0)]),
    )


def _min_dist(xy_m: np.ndarray, centres: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    return cKDTree(centres).query(xy_m)[0]


def _log_distance(xy_m: np.ndarray, origin_xy_m: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(np.asarray(xy_m) - origin_xy_m, axis=-1)
    return np.log10(np.maximum(d, MIN_DISTANCE_M) / 1000.0)


@dataclass
class Features:
    """Model inputs for C cells with N (padded) rows each, as tensors."""

    log_d: torch.Tensor  # (C, N)
    phi: torch.Tensor  # (C, N, K)
    u_km: torch.Tensor  # (C, N)
    r: torch.Tensor  # (C, N) load - 0.5, zeros for RSRP


def features(geo: CellGeometry, xy_m: np.ndarray, load_rho: np.ndarray | None, *, device, dtype=torch.float32) -> Features:
    """Features for rows xy_m (C, N, 2) of the cells in `geo` (C cells)."""
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
    xy = t(xy_m)
    origin = t(geo.origin_xy_m)[:, None, :]
    d = torch.linalg.norm(xy - origin, dim=-1).clamp_min(MIN_DISTANCE_M)
    log_d = torch.log10(d / 1000.0)
    centres = t(geo.centres_xy_m)  # (C, K, 2)
    d2 = ((xy[:, :, None, :] - centres[:, None, :, :]) ** 2).sum(-1)  # (C, N, K)
    length = t(geo.length_m)[:, None, None]
    phi = torch.exp(-0.5 * d2 / length**2)
    dmin = d2.min(dim=-1).values.sqrt()
    u_km = (dmin - t(geo.coverage_m)[:, None]).clamp_min(0.0) / 1000.0
    r = torch.zeros_like(log_d) if load_rho is None else t(load_rho) - 0.5
    return Features(log_d=log_d, phi=phi, u_km=u_km, r=r)


def field(p: dict[str, torch.Tensor], f: Features, k: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and aleatoric std (dB). Latents have shape (..., C, 1[, K]); result (..., C, N)."""
    # batched matmul: (C, N, K) @ (..., C, K, 1) -> (..., C, N)
    resid = torch.matmul(f.phi, p["w"].transpose(-1, -2)).squeeze(-1)
    mu = (
        k["a_off"] + A_PRIOR_DB * p["a"]
        + (k["b_off"] + B_PRIOR_DB_PER_DECADE * p["b"]) * f.log_d
        + k["sigma_w"] * resid
        + k["sigma_out"] * p["v"] * f.u_km
        + LOAD_PRIOR_DB * (p["c1"] * f.r + p["c2"] * f.r**2)
    )
    log_s = k["s_off"] + 0.5 * p["s"] + 0.3 * torch.matmul(f.phi, p["ws"].transpose(-1, -2)).squeeze(-1)
    sigma = k["floor"] + torch.exp(log_s)
    return mu, sigma


def constants(geo: CellGeometry, *, floor_db: float, sigma_out_db_per_km: float, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)[:, None]  # noqa: E731
    s_init = np.log(np.maximum(geo.resid_db * 0.7 - floor_db, 0.2))
    return {
        "a_off": t(geo.a_off), "b_off": t(geo.b_off), "sigma_w": t(geo.resid_db), "s_off": t(s_init),
        "sigma_out": torch.tensor(sigma_out_db_per_km, dtype=dtype, device=device),
        "floor": torch.tensor(floor_db, dtype=dtype, device=device),
    }


class FieldModel(PyroModule):
    """C cells' radio fields; every weight a `PyroSample` with a standard-normal prior."""

    def __init__(self, n_centres: int, consts: dict[str, torch.Tensor]):
        super().__init__()
        self.consts = consts
        self.register_buffer("zero", torch.zeros((), dtype=consts["floor"].dtype, device=consts["floor"].device))
        for name in LATENTS:
            if name in _VECTOR_LATENTS:
                prior = lambda s, n=n_centres: dist.Normal(s.zero, 1.0).expand([n]).to_event(1)  # noqa: E731
            else:
                prior = lambda s: dist.Normal(s.zero, 1.0)  # noqa: E731
            setattr(self, name, PyroSample(prior))

    def forward(self, f: Features, y: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        n_cells, n_rows = f.log_d.shape
        with pyro.plate("cells", n_cells, dim=-2):
            p = {name: getattr(self, name) for name in LATENTS}
            mu, sigma = field(p, f, self.consts)
            with pyro.plate("data", n_rows, dim=-1):
                # GUMBLE eqs. 20-21: IPW scales each sample's log-likelihood by alpha_i.
                with poutine.mask(mask=mask), poutine.scale(scale=weight if weight is not None else 1.0):
                    return pyro.sample("obs", dist.Normal(mu, sigma), obs=y)


@dataclass
class Posterior:
    """Mean-field posterior of C cells: loc and scale per latent, shapes (C, 1[, K])."""

    loc: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]

    def draw(self, n_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name in LATENTS:
            loc, scale = self.loc[name], self.scale[name]
            eps = torch.randn((n_samples, *loc.shape), generator=generator, dtype=loc.dtype, device="cpu").to(loc.device)
            out[name] = loc + scale * eps
        return out

    def take(self, idx) -> Posterior:
        return Posterior({k: v[idx] for k, v in self.loc.items()}, {k: v[idx] for k, v in self.scale.items()})


def fit_svi(
    f: Features, y: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, consts: dict[str, torch.Tensor],
    *, n_centres: int, n_steps: int, learning_rate: float, seed: int,
) -> tuple[Posterior, torch.Tensor]:
    """SVI (Trace_ELBO, AutoNormal) for C cells at once; returns the posterior and per-cell ELBO."""
    pyro.settings.set(module_local_params=True)
    torch.manual_seed(seed)  # local generator use only through torch's default; callers own seeding
    model = FieldModel(n_centres, consts)
    # init_to_feasible puts every standard-normal latent at 0 = the least-squares fit; a small
    # init scale lets the means settle before the variances open up.
    guide = AutoNormal(model, init_loc_fn=init_to_feasible, init_scale=0.05)
    guide(f, y, mask, weight)
    loss_fn = Trace_ELBO().differentiable_loss
    opt = torch.optim.Adam(guide.parameters(), lr=learning_rate)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / max(n_steps, 1)))
    for _ in range(n_steps):
        opt.zero_grad()
        loss = loss_fn(model, guide, f, y, mask, weight)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        loc = {n: getattr(guide.locs, n).detach().clone() for n in LATENTS}
        scale = {n: getattr(guide.scales, n).detach().clone() for n in LATENTS}
        elbo = per_cell_elbo(model, guide, f, y, mask, weight)
    return Posterior(loc, scale), elbo


def per_cell_elbo(model, guide, f, y, mask, weight, n_particles: int = 4) -> torch.Tensor:
    """ELBO estimate per cell (C,): model minus guide log-probabilities summed within each cell."""
    n_cells = f.log_d.shape[0]
    total = torch.zeros(n_cells, device=f.log_d.device)
    for _ in range(n_particles):
        g = poutine.trace(guide).get_trace(f, y, mask, weight)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(f, y, mask, weight)
        for tr, sign in ((m, 1.0), (g, -1.0)):
            tr.compute_log_prob()
            for site in tr.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    # every site lives in the cell plate (dim -2), so axis 0 is the cell
                    total += sign * site["log_prob"].reshape(n_cells, -1).sum(-1)
    return total / n_particles


def predict_moments(post: Posterior, f: Features, consts: dict[str, torch.Tensor], *, n_samples: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M weight samples -> per-sample mean and aleatoric std, each (M, C, N)."""
    p = post.draw(n_samples, generator)
    return field(p, f, consts)


def decompose(mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GUMBLE eq. 19: total variance = Var_i(mu_i) (epistemic) + mean_i(sigma_i^2) (aleatoric)."""
    mean = mu.mean(0)
    epistemic = mu.var(0, unbiased=False).sqrt()
    aleatoric = (sigma**2).mean(0).sqrt()
    return mean, epistemic, aleatoric
