"""The GP hyperparameter fit as a Pyro model: the reference the fused path is tested against.

`GPResidualModel` is one `PyroModule` whose hyperparameters theta (per cell: log length, log
signal std, log noise std) are `PyroSample` priors (the log-normal priors of `gp.py`), inside one
cell plate, with one observed site: the padded residual vector ~ MultivariateNormal(0, K(theta)).
The guide is `AutoDelta` (not AutoNormal): three hyperparameters per cell are point-estimated
(type-II MAP), the field itself is integrated exactly by the Gaussian likelihood. Trace_ELBO's
loss is then -log p(r | theta) - log p(theta), the number `gp.neg_log_marginal` +
`gp.neg_log_prior` computes without tracing (tests/radio pins the two).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroModule, PyroSample

from cellsynth.radio import gp


class GPResidualModel(PyroModule):
    """C cells' GP residuals with hyperpriors; `forward(batch)` observes `batch.r`."""

    def __init__(self, *, nu: float, floor_db: float, dtype=torch.float64, device="cpu"):
        super().__init__()
        self.nu, self.floor_db = nu, floor_db
        loc, scale = gp.prior_loc_scale(dtype, torch.device(device))
        self.register_buffer("prior_loc", loc)
        self.register_buffer("prior_scale", scale)
        self.theta = PyroSample(lambda s: dist.Normal(s.prior_loc, s.prior_scale).to_event(1))

    def forward(self, batch: gp.Batch) -> torch.Tensor:
        with pyro.plate("cells", batch.r.shape[0]):
            theta = self.theta
            k = gp.covariance(batch, theta, nu=self.nu, floor_db=self.floor_db)
            return pyro.sample("obs", dist.MultivariateNormal(torch.zeros_like(batch.r), scale_tril=torch.linalg.cholesky(k)),
                               obs=batch.r)


def guide_for(model: GPResidualModel, batch: gp.Batch, theta0: torch.Tensor) -> AutoDelta:
    guide = AutoDelta(model, init_loc_fn=init_to_value(values={"theta": theta0}))
    guide(batch)
    return guide


def pyro_loss(model: GPResidualModel, guide: AutoDelta, batch: gp.Batch) -> torch.Tensor:
    return Trace_ELBO().differentiable_loss(model, guide, batch)


def fit_theta_pyro(batch: gp.Batch, *, nu: float, floor_db: float, n_steps: int,
                   learning_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`gp.fit_theta` with Pyro's Trace_ELBO on the model/guide traces as the loss."""
    pyro.settings.set(module_local_params=True)
    model = GPResidualModel(nu=nu, floor_db=floor_db, dtype=batch.r.dtype, device=batch.r.device)
    guide = guide_for(model, batch, gp.initial_theta(batch, floor_db))
    (param,) = list(guide.parameters())  # AutoDelta's point estimate of theta (unconstrained: real support)
    return _adam_on_param(param, batch, nu=nu, floor_db=floor_db, n_steps=n_steps, learning_rate=learning_rate,
                          loss=lambda: pyro_loss(model, guide, batch))


def _adam_on_param(param: torch.Tensor, batch: gp.Batch, *, nu: float, floor_db: float, n_steps: int, learning_rate: float,
                   loss) -> tuple[torch.Tensor, torch.Tensor]:
    opt = torch.optim.Adam([param], lr=learning_rate)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / max(n_steps, 1)))
    for _ in range(n_steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    theta = param.detach().clone()
    with torch.no_grad():
        pad = (~batch.mask).sum(-1).to(theta.dtype)
        log_ml = -gp.neg_log_marginal(batch, theta, nu=nu, floor_db=floor_db) + 0.5 * pad * gp._LOG_2PI
    return theta, log_ml
