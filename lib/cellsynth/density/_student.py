"""DEEPMEND teacher-student maps for cells without measurements, from site positions alone.

Teacher (Traag et al.'s smoothed Voronoi, DEEPMEND's teacher): a UE at square l is served by
cell k with probability P(k | l) proportional to d_k(l)^-beta * g_k(l), where g_k is a sector
antenna gain (3GPP-style horizontal pattern, 65 deg beamwidth, 20 dB front-to-back); with a
uniform prior over squares the map is P(l | i) proportional to P(i | l). beta is searched per
measured cell to minimise the 2-D KS distance to that cell's measured (KDE) map.

Student: a small convolutional encoder-decoder mapping the rasterised site neighbourhood of
a cell (P x P squares centred on its site) to the teacher's soft label (knowledge
distillation); it then predicts maps for cells that have no measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree
from torch import nn

from cellsynth.density._grid import square_centre_m, square_of
from cellsynth.density.transforms import ks_2d_maps

N_CHANNELS = 4


class PatchGrid:
    """P x P grid squares centred on each cell's site, with the competing cells nearby."""

    def __init__(self, cells: pd.DataFrame, *, resolution_m: float, patch_px: int, neighbour_radius_m: float) -> None:
        self.cells = cells.sort_values("cell_id").reset_index(drop=True)
        self.cell_ids = self.cells["cell_id"].tolist()
        self.xy = self.cells[["x_m", "y_m"]].to_numpy(dtype=float)
        self.azimuth_deg = (
            self.cells["azimuth_deg"].to_numpy(dtype=float) if "azimuth_deg" in self.cells else np.full(len(self.cells), np.nan)
        )
        self.resolution_m = resolution_m
        self.patch_px = patch_px
        self.tree = cKDTree(self.xy)
        self.reach_m = neighbour_radius_m + patch_px * resolution_m / math.sqrt(2)
        self.sites = np.unique(np.round(self.xy, 3), axis=0)

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

    def teacher(self, i: int, beta: float) -> np.ndarray:
        """Teacher map of cell i on its patch (P x P, sums to 1)."""
        px, py = self.centres(i)
        near = np.asarray(self.tree.query_ball_point(self.xy[i], self.reach_m), dtype=np.int64)
        dist = np.hypot(px[None] - self.xy[near, 0][:, None, None], py[None] - self.xy[near, 1][:, None, None])
        logw = -beta * np.log(np.maximum(dist, self.resolution_m / 2)) + self._log_gain(near, px, py)
        logw -= logw.max(axis=0, keepdims=True)
        own = logw[int(np.flatnonzero(near == i)[0])]
        p_serve = np.exp(own) / np.exp(logw).sum(axis=0)  # P(i | l)
        return p_serve / p_serve.sum()

    def features(self, i: int, log_prior: np.ndarray) -> np.ndarray:
        """(C, P, P) inputs: other sites, own site, own boresight cosine, log prior map."""
        gx0, gy0 = self.origin(i)
        p = self.patch_px
        out = np.zeros((N_CHANNELS, p, p), dtype=np.float32)
        sq = square_of(self.sites, self.resolution_m) - np.array([gx0, gy0])
        own_sq = square_of(self.xy[i], self.resolution_m) - np.array([gx0, gy0])
        inside = (sq >= 0).all(axis=1) & (sq < p).all(axis=1) & ~(sq == own_sq).all(axis=1)
        np.add.at(out[0], (sq[inside, 0], sq[inside, 1]), 1.0)
        out[0] = np.log1p(out[0])
        out[1, own_sq[0], own_sq[1]] = 1.0
        if not np.isnan(self.azimuth_deg[i]):
            px, py = self.centres(i)
            bearing = np.arctan2(px - self.xy[i, 0], py - self.xy[i, 1])
            out[2] = np.cos(bearing - np.radians(self.azimuth_deg[i]))
        out[3] = (log_prior - log_prior.mean()) / (log_prior.std() + 1e-6)
        return out

    def to_patch(self, i: int, sparse: pd.DataFrame) -> np.ndarray:
        """A sparse (gx, gy, prob) map cut to cell i's patch and renormalised."""
        gx0, gy0 = self.origin(i)
        ix = sparse["gx"].to_numpy() - gx0
        iy = sparse["gy"].to_numpy() - gy0
        keep = (ix >= 0) & (ix < self.patch_px) & (iy >= 0) & (iy < self.patch_px)
        arr = np.zeros((self.patch_px, self.patch_px))
        np.add.at(arr, (ix[keep], iy[keep]), sparse["prob"].to_numpy()[keep])
        total = arr.sum()
        return arr / total if total > 0 else arr

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        d1 = self.down1(e)
        d2 = self.down2(d1)
        u1 = self.fuse1(torch.cat([self.up2(d2), d1], dim=1))
        out = self.head(torch.cat([self.up1(u1), e], dim=1)).squeeze(1)
        # Residual on the (standardised) log prior: the net learns a correction to the teacher.
        return out + x[:, 3]


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    # The 8 rotations/flips of the square grid; the layout and its map transform together.
    outs: list[torch.Tensor] = []
    for flip in (False, True):
        base = torch.flip(x, dims=[-1]) if flip else x
        outs.extend(torch.rot90(base, k, dims=[-2, -1]) for k in range(4))
    return outs


def train_student(
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    n_epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
    learning_rate: float = 3e-3,
) -> _Student:
    """Fit the encoder-decoder on (N, C, P, P) inputs -> (N, P, P) target maps (cross-entropy)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(inputs, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    x, y = x.to(device), y.to(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = _Student().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    # One random rotation/flip of the whole batch per step: 8x the layouts at 1x the cost.
    picks = torch.randint(0, 8, (n_epochs,), generator=gen).tolist()
    for pick in picks:
        opt.zero_grad()
        x_aug, y_aug = _dihedral(x)[pick], _dihedral(y)[pick]
        logp = torch.log_softmax(net(x_aug).flatten(1), dim=1)
        loss = -(y_aug.flatten(1) * logp).sum(dim=1).mean()
        loss.backward()
        opt.step()
    return net.eval()


def predict_student(net: _Student, inputs: np.ndarray, *, device: torch.device | str = "cpu") -> np.ndarray:
    with torch.no_grad():
        x = torch.as_tensor(inputs, dtype=torch.float32, device=device)
        p = torch.softmax(net(x).flatten(1), dim=1).reshape(x.shape[0], x.shape[2], x.shape[3])
    return p.cpu().numpy().astype(float)


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
    device: torch.device | str = "cpu",
) -> dict[str, object]:
    """Fit the teacher on measured cells, distil into the student, predict every cell.

    `measured` maps cell_id -> sparse measured (KDE) map; cells in `holdout_cells` are left out
    of the student's training so it can be scored on them.

    Returns:
        {"teacher": {cell: map}, "beta": {cell: beta}, "teacher_ks": {cell: ks to measured},
         "prior": {cell: map at the median beta}, "student": {cell: map}}
    """
    grid = PatchGrid(cells, resolution_m=resolution_m, patch_px=patch_px, neighbour_radius_m=neighbour_radius_m)
    index = {c: i for i, c in enumerate(grid.cell_ids)}
    betas, teacher_ks, teacher_maps = {}, {}, {}
    for cell_id, sparse in measured.items():
        if cell_id not in index or not len(sparse):
            continue
        i = index[cell_id]
        betas[cell_id], teacher_ks[cell_id] = fit_teacher_beta(grid, i, sparse, beta_grid)
        teacher_maps[cell_id] = grid.teacher(i, betas[cell_id])
    train_ids = [c for c in teacher_maps if c not in holdout_cells]
    beta_prior = float(np.median([betas[c] for c in train_ids])) if train_ids else float(np.median(beta_grid))
    priors = {c: grid.teacher(index[c], beta_prior) for c in grid.cell_ids}
    feats = {c: grid.features(index[c], np.log(priors[c] + 1e-12)) for c in grid.cell_ids}
    out: dict[str, object] = {
        "teacher": {c: grid.to_sparse(index[c], m, min_mass=min_mass) for c, m in teacher_maps.items()},
        "beta": betas,
        "teacher_ks": teacher_ks,
        "prior": {c: grid.to_sparse(index[c], m, min_mass=min_mass) for c, m in priors.items()},
        "beta_prior": beta_prior,
    }
    if not train_ids:
        out["student"] = {}
        return out
    net = train_student(
        np.stack([feats[c] for c in train_ids]), np.stack([teacher_maps[c] for c in train_ids]),
        n_epochs=n_epochs, seed=seed, device=device,
    )
    preds = predict_student(net, np.stack([feats[c] for c in grid.cell_ids]), device=device)
    out["student"] = {c: grid.to_sparse(index[c], preds[k], min_mass=min_mass) for k, c in enumerate(grid.cell_ids)}
    return out
