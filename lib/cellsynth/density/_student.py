"""DEEPMEND teacher-student maps for cells without measurements, from the site layout alone.

Teacher (Traag et al.'s smoothed Voronoi, DEEPMEND's teacher): a UE at square l is served by
cell k with probability P(k | l) proportional to d_k(l)^-beta * g_k(l), where g_k is a sector
antenna gain (3GPP-style horizontal pattern, 65 deg beamwidth, 20 dB front-to-back); with a
uniform prior over squares the map is P(l | i) proportional to P(i | l). beta is searched per
measured cell to minimise the 2-D KS distance to that cell's measured (KDE) map.

Layout prior: Bayes' rule with the a-priori radio physics (`cellsynth.propagation`): a UE at
l is served by cell k with P(k | l) = softmax_k(RSRP_k(l) / T) over the cells near l (T, the
spread of the unknown shadowing, is one constant chosen by KS on the training cells), and the
map is P(l | i) proportional to P(i | l) f(l), f the area's user density (the area KDE of all
measured reports: the users a new cell would serve are already measured by the existing ones).

Student: a small convolutional encoder-decoder over the cell's patch (P x P squares centred on
its site) whose inputs are the layout (own site, other sites, boresight), the prior's log
association and log density, and which outputs a correction to the prior's log map; it is
distilled from the measured (KDE) maps of the training cells. Whether the correction is used
at all is decided by K-fold CV inside the training cells (prior alone vs prior + student).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree
from torch import nn

from cellsynth.density._grid import square_centre_m, square_of
from cellsynth.density.transforms import ks_2d_maps

N_CHANNELS = 6
_LOG_FLOOR = -30.0  # log-probabilities are clipped here (a square the cell cannot serve)
# Largest batch of cell patches one Adam step sees (issue 15). Full-batch steps cost O(cells) each:
# at 10^3 cells the five CV/final jobs took ~2,100 CPU-s (3 ms a patch a step, 300 steps). Above
# this many training cells each step takes a uniform random batch of this size instead, so a job
# costs at most MAX_BATCH_CELLS x n_epochs patch passes at any layout size. Fixed a priori: 64 is
# above the default layout's whole training set (~45 of its 60 cells), so the default scenario
# trains exactly as before and every step averages at least as many patches as the validated
# default training; and the student is used only when its K-fold CV beats the layout prior, so a
# noisier fit cannot make the served maps worse than the prior.
MAX_BATCH_CELLS = 64


class PatchGrid:
    """P x P grid squares centred on each cell's site, with the competing cells nearby.

    `area_map` (sparse gx, gy, prob) is the user density the layout prior weights by; None
    means uniform users.
    """

    def __init__(self, cells: pd.DataFrame, *, resolution_m: float, patch_px: int, neighbour_radius_m: float,
                 area_map: pd.DataFrame | None = None) -> None:
        self.cells = cells.sort_values("cell_id").reset_index(drop=True)
        self.cell_ids = self.cells["cell_id"].tolist()
        self.index = {c: i for i, c in enumerate(self.cell_ids)}
        self.xy = self.cells[["x_m", "y_m"]].to_numpy(dtype=float)

        def col(name: str) -> np.ndarray:
            return self.cells[name].to_numpy(dtype=float) if name in self.cells else np.full(len(self.cells), np.nan)

        self.azimuth_deg = col("azimuth_deg")
        self.height_m, self.tx_power_dbm, self.freq_mhz = col("height_m"), col("tx_power_dbm"), col("freq_mhz")
        self.resolution_m = resolution_m
        self.patch_px = patch_px
        self.tree = cKDTree(self.xy)
        self.reach_m = neighbour_radius_m + patch_px * resolution_m / math.sqrt(2)
        self.sites = np.unique(np.round(self.xy, 3), axis=0)
        self.area_map = area_map

    def origin(self, i: int) -> tuple[int, int]:
        gx, gy = square_of(self.xy[i], self.resolution_m)
        return int(gx) - self.patch_px // 2, int(gy) - self.patch_px // 2

    def centres(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        gx0, gy0 = self.origin(i)
        idx = np.arange(self.patch_px)
        cx = square_centre_m(gx0 + idx, self.resolution_m)
        cy = square_centre_m(gy0 + idx, self.resolution_m)
        return np.meshgrid(cx, cy, indexing="ij")

    def _log_gain(self, k: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        dx = px[None] - self.xy[k, 0][:, None, None]
        dy = py[None] - self.xy[k, 1][:, None, None]
        bearing = np.degrees(np.arctan2(dx, dy))
        off = np.abs((bearing - self.azimuth_deg[k][:, None, None] + 180.0) % 360.0 - 180.0)
        gain_db = -np.minimum(12.0 * (off / 65.0) ** 2, 20.0)
        gain_db = np.where(np.isnan(self.azimuth_deg[k])[:, None, None], 0.0, gain_db)
        return gain_db * math.log(10) / 10

    def _near(self, i: int) -> np.ndarray:
        return np.asarray(self.tree.query_ball_point(self.xy[i], self.reach_m), dtype=np.int64)

    def _teacher_terms(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(log distance, log gain, row of cell i) of cell i's patch: the same for every beta,
        so a beta search computes them once (kept for the last cell asked; issue 15: the search
        ran on the driver for minutes at 10^3 cells, mostly recomputing these)."""
        cached = getattr(self, "_terms_cache", None)
        if cached is not None and cached[0] == i:
            return cached[1]
        px, py = self.centres(i)
        near = self._near(i)
        dist = np.hypot(px[None] - self.xy[near, 0][:, None, None], py[None] - self.xy[near, 1][:, None, None])
        terms = (np.log(np.maximum(dist, self.resolution_m / 2)), self._log_gain(near, px, py), int(np.flatnonzero(near == i)[0]))
        self._terms_cache = (i, terms)
        return terms

    def teacher(self, i: int, beta: float) -> np.ndarray:
        """Teacher map of cell i on its patch (P x P, sums to 1)."""
        log_dist, log_gain, row = self._teacher_terms(i)
        logw = -beta * log_dist + log_gain
        logw -= logw.max(axis=0, keepdims=True)
        own = logw[row]
        p_serve = np.exp(own) / np.exp(logw).sum(axis=0)  # P(i | l)
        return p_serve / p_serve.sum()

    def rsrp_patch(self, i: int) -> tuple[np.ndarray, int]:
        """(K, P, P) a-priori RSRP of the cells near i on i's patch, and i's row among them."""
        from cellsynth.propagation import prior_rsrp_dbm

        px, py = self.centres(i)
        near = self._near(i)
        rsrp = prior_rsrp_dbm(
            np.column_stack([px.ravel(), py.ravel()]), self.xy[near], azimuth_deg=self.azimuth_deg[near],
            height_m=self.height_m[near], tx_power_dbm=self.tx_power_dbm[near], freq_mhz=self.freq_mhz[near],
        )
        return rsrp.T.reshape(len(near), self.patch_px, self.patch_px), int(np.flatnonzero(near == i)[0])

    def log_density(self, i: int) -> np.ndarray:
        """log user density on i's patch (uniform when no area map), floored at 1e-3 of its mean."""
        if self.area_map is None or not len(self.area_map):
            return np.zeros((self.patch_px, self.patch_px))
        dens = self.to_patch(i, self.area_map, normalise=False)
        floor = 1e-3 * max(float(dens.mean()), 1e-12)
        return np.log(np.maximum(dens, floor))

    @staticmethod
    def log_association(rsrp: np.ndarray, own: int, temperature_db: float) -> np.ndarray:
        """log P(own | l) = log softmax_k(RSRP_k(l) / T) at the own row."""
        z = rsrp / temperature_db
        z = z - z.max(axis=0, keepdims=True)
        return np.maximum(z[own] - np.log(np.exp(z).sum(axis=0)), _LOG_FLOOR)

    @staticmethod
    def combine(log_assoc: np.ndarray, log_dens: np.ndarray) -> np.ndarray:
        """Bayes: log P(l | i) up to a constant, normalised to a map that sums to 1."""
        logp = log_assoc + log_dens
        p = np.exp(logp - logp.max())
        return p / p.sum()

    def features(self, i: int, log_assoc: np.ndarray, log_dens: np.ndarray) -> np.ndarray:
        """(C, P, P) inputs: other sites, own site, own boresight cosine, log association,
        standardised log density, distance to the site (patch half-widths)."""
        gx0, gy0 = self.origin(i)
        p = self.patch_px
        out = np.zeros((N_CHANNELS, p, p), dtype=np.float32)
        sq = square_of(self.sites, self.resolution_m) - np.array([gx0, gy0])
        own_sq = square_of(self.xy[i], self.resolution_m) - np.array([gx0, gy0])
        inside = (sq >= 0).all(axis=1) & (sq < p).all(axis=1) & ~(sq == own_sq).all(axis=1)
        np.add.at(out[0], (sq[inside, 0], sq[inside, 1]), 1.0)
        out[0] = np.log1p(out[0])
        out[1, own_sq[0], own_sq[1]] = 1.0
        px, py = self.centres(i)
        if not np.isnan(self.azimuth_deg[i]):
            bearing = np.arctan2(px - self.xy[i, 0], py - self.xy[i, 1])
            out[2] = np.cos(bearing - np.radians(self.azimuth_deg[i]))
        out[3] = log_assoc / 10.0
        out[4] = (log_dens - log_dens.mean()) / (log_dens.std() + 1e-6)
        out[5] = np.hypot(px - self.xy[i, 0], py - self.xy[i, 1]) / (p * self.resolution_m / 2)
        return out

    def to_patch(self, i: int, sparse: pd.DataFrame, *, normalise: bool = True) -> np.ndarray:
        """A sparse (gx, gy, prob) map cut to cell i's patch (renormalised unless told not to)."""
        gx0, gy0 = self.origin(i)
        ix = sparse["gx"].to_numpy() - gx0
        iy = sparse["gy"].to_numpy() - gy0
        keep = (ix >= 0) & (ix < self.patch_px) & (iy >= 0) & (iy < self.patch_px)
        arr = np.zeros((self.patch_px, self.patch_px))
        np.add.at(arr, (ix[keep], iy[keep]), sparse["prob"].to_numpy()[keep])
        total = arr.sum()
        return arr / total if total > 0 and normalise else arr

    def to_sparse(self, i: int, arr: np.ndarray, *, min_mass: float) -> pd.DataFrame:
        gx0, gy0 = self.origin(i)
        ix, iy = np.nonzero(arr > min_mass)
        kept = arr[ix, iy]
        return pd.DataFrame({"gx": gx0 + ix, "gy": gy0 + iy, "prob": kept / kept.sum()})


def fit_teacher_beta(grid: PatchGrid, i: int, measured: pd.DataFrame, beta_grid: Sequence[float]) -> tuple[float, float]:
    """DEEPMEND teacher: the beta whose map is closest in 2-D KS to the measured map."""
    target = grid.to_sparse(i, grid.to_patch(i, measured), min_mass=0.0)
    best = (math.inf, float(beta_grid[0]))
    for beta in beta_grid:
        ks = ks_2d_maps(grid.to_sparse(i, grid.teacher(i, beta), min_mass=0.0), target)
        best = min(best, (ks, float(beta)))
    return best[1], best[0]


class _Student(nn.Module):
    """U-Net-style encoder-decoder: (N, C, P, P) inputs -> (N, P, P) correction to the log prior."""

    def __init__(self, channels: int = N_CHANNELS, width: int = 16) -> None:
        super().__init__()
        act = nn.ReLU()
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), act, nn.Conv2d(width, width, 3, padding=1), act)
        self.down1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act)
        self.down2 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), act)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2), act)
        self.fuse1 = nn.Sequential(nn.Conv2d(4 * width, width, 3, padding=1), act)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), act)
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), act, nn.Conv2d(width, 1, 1))
        # Zero last layer: training starts from the prior exactly and learns only a correction.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        d1 = self.down1(e)
        d2 = self.down2(d1)
        u1 = self.fuse1(torch.cat([self.up2(d2), d1], dim=1))
        return log_prior + self.head(torch.cat([self.up1(u1), e], dim=1)).squeeze(1)


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    # The 8 rotations/flips of the square grid; the layout and its map transform together.
    outs: list[torch.Tensor] = []
    for flip in (False, True):
        base = torch.flip(x, dims=[-1]) if flip else x
        outs.extend(torch.rot90(base, k, dims=[-2, -1]) for k in range(4))
    return outs


def _dihedral_one(x: torch.Tensor, pick: int) -> torch.Tensor:
    # `_dihedral(x)[pick]` without building the other seven.
    base = torch.flip(x, dims=[-1]) if pick >= 4 else x
    return torch.rot90(base, pick % 4, dims=[-2, -1])


def train_student(
    inputs: np.ndarray,
    log_priors: np.ndarray,
    targets: np.ndarray,
    *,
    n_epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    max_batch: int = MAX_BATCH_CELLS,
) -> dict[str, torch.Tensor]:
    """Fit the student on (N, C, P, P) inputs and (N, P, P) log priors -> (N, P, P) target maps.

    Loss: cross-entropy of the target map under the predicted map (knowledge distillation with
    soft labels). `n_epochs` Adam steps, each on the whole set when N <= `max_batch`, else on a
    uniform random batch of `max_batch` patches. Returns the state dict (on CPU), so a Ray worker
    can ship it back.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(inputs, dtype=torch.float32).to(device)
    base = torch.as_tensor(log_priors, dtype=torch.float32).to(device)
    y = torch.as_tensor(targets, dtype=torch.float32).to(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = _Student().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    # One random rotation/flip of the whole batch per step: 8x the layouts at 1x the cost.
    picks = torch.randint(0, 8, (n_epochs,), generator=gen).tolist()
    if len(x) > max_batch:  # mini-batches: the same transform draws, then each step's patches
        batches = [torch.randperm(len(x), generator=gen)[:max_batch].to(x.device) for _ in picks]
        for pick, idx in zip(picks, batches):
            opt.zero_grad()
            xb, bb, yb = (_dihedral_one(t[idx], pick) for t in (x, base, y))
            logp = torch.log_softmax(net(xb, bb).flatten(1), dim=1)
            loss = -(yb.flatten(1) * logp).sum(dim=1).mean()
            loss.backward()
            opt.step()
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}
    xs, bs, ys = _dihedral(x), _dihedral(base), _dihedral(y)
    for pick in picks:
        opt.zero_grad()
        logp = torch.log_softmax(net(xs[pick], bs[pick]).flatten(1), dim=1)
        loss = -(ys[pick].flatten(1) * logp).sum(dim=1).mean()
        loss.backward()
        opt.step()
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


# Cells per forward pass when predicting: the activations of one pass are ~0.4 MB a cell at 32 px
# (a pass over all 3,000 cells of a layout peaked at over 1 GB on the driver); a memory bound,
# each cell's map is its own whatever the chunk.
PREDICT_CHUNK_CELLS = 256


def predict_student(state: dict[str, torch.Tensor], inputs: np.ndarray, log_priors: np.ndarray) -> np.ndarray:
    """(N, P, P) maps (each sums to 1) from a trained student's state dict."""
    net = _Student()
    net.load_state_dict(state)
    net.eval()
    out = np.empty((len(inputs), *np.shape(inputs)[2:]), dtype=float)
    with torch.no_grad():
        for start in range(0, len(inputs), PREDICT_CHUNK_CELLS):
            x = torch.as_tensor(inputs[start:start + PREDICT_CHUNK_CELLS], dtype=torch.float32)
            base = torch.as_tensor(log_priors[start:start + PREDICT_CHUNK_CELLS], dtype=torch.float32)
            p = torch.softmax(net(x, base).flatten(1), dim=1).reshape(x.shape[0], x.shape[2], x.shape[3])
            out[start:start + len(x)] = p.numpy()
    return out


def _train_job(data: dict[str, np.ndarray], job: dict) -> dict[str, torch.Tensor]:
    """`train_student` on the rows `job["rows"]` of the shared (inputs, log_priors, targets)."""
    rows = np.asarray(job["rows"])
    kw = {k: v for k, v in job.items() if k != "rows"}
    return train_student(data["inputs"][rows], data["log_priors"][rows], data["targets"][rows], **kw)


def serial_trainer(data: dict[str, np.ndarray], jobs: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Train one student per job here (tests); the density stage passes Ray tasks. `data` holds
    every training cell's arrays once; a job names its rows (a CV fold's training cells), so the
    folds do not copy the patches (issue 15: a flat driver)."""
    return [_train_job(data, job) for job in jobs]


def _train_task(data: dict[str, np.ndarray], job: dict) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return _train_job(data, job)


def ray_trainer(ray, *, num_cpus: float = 1.0, num_gpus: float = 0.0, device: str = "cpu"):
    """A `trainer` that runs each training job as a Ray task (GPU share and device when given),
    the shared arrays put in the object store once."""
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)(_train_task)

    def run(data: dict[str, np.ndarray], jobs: list[dict]) -> list[dict[str, torch.Tensor]]:
        ref = ray.put(data)
        return ray.get([task.remote(ref, {**job, "device": device}) for job in jobs])

    return run


def serial_mapper(fn, shared, calls: list[tuple]) -> list:
    """Run `fn(shared, *args)` for each args tuple of `calls` here; the density stage passes Ray tasks."""
    return [fn(shared, *args) for args in calls]


def ray_mapper(ray, *, num_cpus: float = 1.0):
    """A `mapper` that runs each call as a Ray task, `shared` put in the object store once."""
    def run(fn, shared, calls: list[tuple]) -> list:
        task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        ref = ray.put(shared)
        return ray.get([task.remote(ref, *args) for args in calls])

    return run


def _cell_terms(grid: PatchGrid, cell_ids: list[str], measured: dict[str, pd.DataFrame], beta_grid: Sequence[float],
                temps: list[float], train_ids: set[str], min_mass: float) -> dict[str, dict]:
    """The per-cell, layout-only work of `teacher_student_maps` for a chunk of cells (one task):
    the teacher's beta, KS and sparse map (measured cells), the prior's log association at every
    temperature, the log density, and the prior's KS at every temperature (training cells)."""
    out = {}
    for c in cell_ids:
        i = grid.index[c]
        r: dict = {}
        if c in measured and len(measured[c]):
            r["beta"], r["teacher_ks"] = fit_teacher_beta(grid, i, measured[c], beta_grid)
            r["teacher"] = grid.to_sparse(i, grid.teacher(i, r["beta"]), min_mass=min_mass)
        rsrp = grid.rsrp_patch(i)
        r["log_dens"] = grid.log_density(i)
        r["la"] = {t: grid.log_association(*rsrp, t) for t in temps}
        if c in train_ids:
            r["temp_ks"] = {t: ks_2d_maps(grid.to_sparse(i, grid.combine(r["la"][t], r["log_dens"]), min_mass=0.0), measured[c])
                            for t in temps}
        out[c] = r
    return out


def _chunks(items: list[str], n: int) -> list[list[str]]:
    size = max(1, math.ceil(len(items) / max(1, n)))
    return [items[k:k + size] for k in range(0, len(items), size)]


def area_map_of(measured: dict[str, pd.DataFrame], weights: dict[str, float] | None = None) -> pd.DataFrame:
    """The area's user density as a (gx, gy, prob) map: the measured cells' maps, report-weighted."""
    frames = [m.assign(prob=m["prob"] * (1.0 if weights is None else weights.get(c, 0.0))) for c, m in measured.items() if len(m)]
    if not frames:
        return pd.DataFrame({"gx": np.empty(0, np.int64), "gy": np.empty(0, np.int64), "prob": np.empty(0)})
    agg = pd.concat(frames).groupby(["gx", "gy"], as_index=False)["prob"].sum()
    agg["prob"] /= agg["prob"].sum()
    return agg


def _fold_of(cell_ids: list[str], n_folds: int, seed: int) -> np.ndarray:
    # Own salt: the hold-out split hashes the same ids with the plain seed.
    unit = np.array([zlib.crc32(f"{seed}:student-fold:{c}".encode()) / 2**32 for c in cell_ids])
    return np.minimum((unit * n_folds).astype(int), n_folds - 1)


def teacher_student_maps(
    cells: pd.DataFrame,
    measured: dict[str, pd.DataFrame],
    *,
    resolution_m: float,
    patch_px: int,
    neighbour_radius_m: float,
    beta_grid: Sequence[float],
    holdout_cells: set[str],
    n_epochs: int,
    min_mass: float,
    seed: int,
    area_map: pd.DataFrame | None = None,
    temperature_grid_db: Sequence[float] = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0),
    n_folds: int = 4,
    trainer=serial_trainer,
    device: torch.device | str = "cpu",
    mapper=serial_mapper,
    n_chunks: int = 1,
) -> dict[str, object]:
    """Fit the teacher and the layout prior on measured cells, distil into the student, predict every cell.

    `measured` maps cell_id -> sparse measured (KDE) map; cells in `holdout_cells` are left out
    of every choice and of the student's training so they can be scored. The prior's temperature
    is the grid value with the lowest mean KS to the training cells' measured maps; the student
    is used only when its K-fold CV KS on the training cells beats the prior's.
    `trainer(data, jobs)` trains one student per job on the job's rows of `data` (Ray tasks in the stage);
    `mapper(fn, grid, calls)` runs the per-cell work in `n_chunks` chunks of cells (same results for
    any mapper and chunking).

    Returns:
        {"teacher": {cell: map}, "beta": {cell: beta}, "teacher_ks": {cell: ks to measured},
         "prior": {cell: map}, "student": {cell: map}, "temperature_db": T, "student_used": bool,
         "cv_ks": {"prior": ks, "student": ks}}
    """
    grid = PatchGrid(cells, resolution_m=resolution_m, patch_px=patch_px, neighbour_radius_m=neighbour_radius_m,
                     area_map=area_map)
    index = grid.index
    measured_ids = [c for c, sparse in measured.items() if c in index and len(sparse)]
    train_ids = [c for c in measured_ids if c not in holdout_cells]
    temps = [float(t) for t in temperature_grid_db]
    # The per-cell work (teacher beta search, a-priori RSRP patches, the prior at each
    # temperature) in chunks of cells through `mapper` (Ray tasks in the stage; issue 15: ~85 s
    # on the driver at 10^3 cells). Each chunk gets only its own cells' measured maps.
    train_set = set(train_ids)
    calls = [(chunk, {c: measured[c] for c in chunk if c in measured}, tuple(beta_grid), temps,
              {c for c in chunk if c in train_set}, min_mass) for chunk in _chunks(grid.cell_ids, n_chunks)]
    terms: dict[str, dict] = {}
    for part in mapper(_cell_terms, grid, calls):
        terms.update(part)
    out: dict[str, object] = {
        "teacher": {c: terms[c]["teacher"] for c in measured_ids},
        "beta": {c: terms[c]["beta"] for c in measured_ids}, "teacher_ks": {c: terms[c]["teacher_ks"] for c in measured_ids},
    }
    log_dens = {c: terms[c]["log_dens"] for c in grid.cell_ids}

    # Temperature: one constant for the whole layout, chosen on the training cells only.
    if train_ids:
        score = {t: float(np.mean([terms[c]["temp_ks"][t] for c in train_ids])) for t in temps}
        temp = min(score, key=score.get)
    else:
        temp = float(np.median(temps))
    priors, feats = {}, {}
    for c in grid.cell_ids:
        la = terms[c]["la"][temp]
        priors[c] = grid.combine(la, log_dens[c])
        feats[c] = grid.features(index[c], la, log_dens[c])
    del terms
    out.update(prior={c: grid.to_sparse(index[c], m, min_mass=min_mass) for c, m in priors.items()},
               temperature_db=temp, student_used=False, cv_ks={})
    if not train_ids:
        out["student"] = dict(out["prior"])
        return out

    def stack(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return (np.stack([feats[c] for c in ids]),
                np.stack([np.maximum(np.log(priors[c] + 1e-300), _LOG_FLOOR) for c in ids]).astype(np.float32))

    # Every training cell's arrays once; each job (the CV folds' fits and the final one) names its rows.
    x_train, lp_train = stack(train_ids)
    data = {"inputs": x_train, "log_priors": lp_train,
            "targets": np.stack([grid.to_patch(index[c], measured[c]) for c in train_ids])}

    def job(rows: np.ndarray, job_seed: int) -> dict:
        return {"rows": rows, "n_epochs": n_epochs, "seed": job_seed, "device": device}

    # K-fold CV inside the training cells: does the student's correction beat the prior alone?
    folds = _fold_of(train_ids, n_folds, seed) if len(train_ids) >= 2 * n_folds else np.zeros(len(train_ids), int)
    fold_ids = [k for k in range(n_folds) if (folds == k).any() and (folds != k).any()]
    jobs = [job(np.flatnonzero(folds != k), seed + 1 + k) for k in fold_ids]
    states = trainer(data, jobs + [job(np.arange(len(train_ids)), seed)])
    del data
    cv = {"prior": [], "student": []}
    for k, state in zip(fold_ids, states[:-1]):
        rows = np.flatnonzero(folds == k)
        ids = [train_ids[i] for i in rows]
        preds = predict_student(state, x_train[rows], lp_train[rows])
        for c, pred in zip(ids, preds):
            cv["student"].append(ks_2d_maps(grid.to_sparse(index[c], pred, min_mass=0.0), measured[c]))
            cv["prior"].append(ks_2d_maps(grid.to_sparse(index[c], priors[c], min_mass=0.0), measured[c]))
    cv_mean = {m: float(np.mean(v)) for m, v in cv.items() if v}
    use = bool(cv_mean) and cv_mean["student"] < cv_mean["prior"]
    out.update(student_used=use, cv_ks=cv_mean)
    if use:
        preds = predict_student(states[-1], *stack(grid.cell_ids))
        out["student"] = {c: grid.to_sparse(index[c], preds[k], min_mass=min_mass) for k, c in enumerate(grid.cell_ids)}
    else:
        out["student"] = dict(out["prior"])
    return out
