"""Measurement planning, pure functions: where to measure next so that the user-weighted epistemic
uncertainty of the serving and strongest-neighbour RSRP drops the most (GUMBLE section 6.2:
epistemic uncertainty "enables the strategic planning of new measurements", active learning).

Each cell's field is Gaussian around the radio model's prediction with covariance Sigma_k: the
radio model's own calibrated GP posterior covariance (`RadioModels.epistemic_cov`: Matern
residual, long-range term and the mean's coefficients, times the calibration factor), or, for a
model that exposes none, the model's epistemic std s_k(x) times an a-priori correlation
rho(d) = exp(-d^2 / (2 l^2)). One report at c measures every cell heard there with noise variance
a_k(c)^2 (the model's calibrated aleatoric variance) and conditions cell k's field exactly as the
GP does:
    Sigma_k <- Sigma_k - Sigma_k[:, c] Sigma_k[c, :] / (Sigma_k[c, c] + a_k(c)^2).

What is minimised is what is scored: the mean absolute error of the two strongest cells' RSRP
over the window's users. For a Gaussian belief the expected absolute error at a target is
sqrt(2/pi) x its epistemic std (the noise-free field is scored), so the objective is
    sum_t w_t sum_k p_tk std_tk
over targets t drawn from the users' density f_j^O (weight w_t), and the cells k that may be the
serving or strongest-neighbour cell there, each weighted by p_tk, its probability to be one of
the two strongest under the model (the model names the true pair at a user far from always).
A variance objective (`objective="var"`, the expected SQUARED error) would chase the few very
uncertain places; the std objective values the same variance drop more where the std is small,
i.e. where the users already are and the model is half-informed.

A report also lowers the uncertainty around it (and, through the mean's coefficients, a little
everywhere the cell serves), so a second pick next to the first gains little: greedy picks
spread (Das & Kempe 2008: greedy is near-optimal for variance reduction in most cases). A drive
grows along roads edge by edge, each edge scored by the JOINT reduction of all its reports (they
are 25 m apart on a field correlated over ~50 m), and from several starts (`best_route`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

PredictFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
# (cell id, positions (n, 2)) -> the cell's epistemic covariance there (n, n) dB^2, or an ensemble
# [(weight, covariance), ...] over plausible hyperparameters (weights summing to 1), or None
CovarianceFn = Callable[[str, np.ndarray], "np.ndarray | list[tuple[float, np.ndarray]] | None"]
ROLES = ("serving", "strongest_neighbour")
OBJECTIVES = ("std", "var")
REACH_LENGTHS = 4.0


def grid_points(box_m: tuple[float, float, float, float], spacing_m: float) -> np.ndarray:
    """(n, 2) square-centred points every `spacing_m` inside box (x_min, y_min, x_max, y_max)."""
    x0, y0, x1, y1 = box_m
    xs = np.arange(x0 + spacing_m / 2, x1, spacing_m)
    ys = np.arange(y0 + spacing_m / 2, y1, spacing_m)
    if len(xs) == 0 or len(ys) == 0:
        xs, ys = np.array([(x0 + x1) / 2]), np.array([(y0 + y1) / 2])
    gx, gy = np.meshgrid(xs, ys)
    return np.column_stack([gx.ravel(), gy.ravel()])


def correlation(d_m: np.ndarray, length_m: float) -> np.ndarray:
    """A-priori squared-exponential correlation of a cell's field between positions d_m apart."""
    return np.exp(-0.5 * (np.asarray(d_m) / length_m) ** 2)


@dataclass
class PlanField:
    """What the planner knows at every target (where users are) and candidate (where one can measure).

    Cells are integer codes into `cell_ids`; -1 pads rows with fewer cells.
    """

    cell_ids: list[str]
    target_xy_m: np.ndarray  # (T, 2)
    target_weight: np.ndarray  # (T,) user density mass, sums to 1
    target_cell: np.ndarray  # (T, R) cells that may be the serving or strongest-neighbour cell there
    target_var: np.ndarray  # (T, R) their epistemic variance, dB^2
    cand_xy_m: np.ndarray  # (C, 2)
    cand_cell: np.ndarray  # (C, K) cells a report there measures
    cand_var: np.ndarray  # (C, K) their epistemic variance, dB^2
    cand_noise_var: np.ndarray  # (C, K) variance of one measurement there (aleatoric), dB^2
    # (T, R) probability that each target cell IS one of the two strongest there (the roles that
    # are scored); None: the R = 2 predicted strongest, each certain
    target_role_p: np.ndarray | None = None


def top2_probability(mean: np.ndarray, std: np.ndarray, *, n_draws: int, rng: np.random.Generator,
                     chunk: int = 4096) -> np.ndarray:
    """(T, K) probability that each of K cells is among the two strongest at a target, when cell
    k's true RSRP there is N(mean[t, k], std[t, k]^2) independently (the model's epistemic belief;
    the noise-free field is what is scored). Monte Carlo with `n_draws` draws; -inf means: never."""
    mean, std = np.asarray(mean, float), np.asarray(std, float)
    out = np.zeros(mean.shape)
    if mean.shape[1] <= 2:
        return np.where(np.isfinite(mean), 1.0, 0.0)
    for a in range(0, len(mean), chunk):
        m, sd = mean[a:a + chunk], std[a:a + chunk]
        z = m[:, None, :] + sd[:, None, :] * rng.standard_normal((len(m), n_draws, m.shape[1]))
        z = np.where(np.isfinite(m)[:, None, :], z, -np.inf)
        top = np.argpartition(-z, 1, axis=2)[:, :, :2]  # (t, draw, 2) the two strongest per draw
        hits = np.zeros_like(z, dtype=bool)
        np.put_along_axis(hits, top, True, axis=2)
        hits &= np.isfinite(z)
        out[a:a + chunk] = hits.mean(axis=1)
    return out


def matched_draws(positions_xy_m: np.ndarray, bandwidth_m: float, data_xy_m: np.ndarray, n: int, *,
                  rng: np.random.Generator, iterations: int = 40) -> tuple[np.ndarray, float]:
    """n users drawn from a KDE on `positions_xy_m` (f_j^O's positions) with the bandwidth h <=
    `bandwidth_m` at which the draws lie, on the mean, as far from the nearest measurement
    (`data_xy_m`, every position the models were fitted on) as a new user does. Returns (draws, h).

    What the planner's objective needs from its users is their epistemic variance, which is set by
    how far they are from the data. A new user of the window is distributed like the window's
    own report positions, so its distance to the nearest measurement is, leave-one-out, a
    position's distance to the nearest OTHER measurement (training data only). The density's
    bandwidth is chosen for the density (held-out likelihood) and, at ~250 positions, spreads the
    draws over 200 m into the gaps where nobody reports and the model is least sure: the planner
    then overrates routes through those gaps. The draws keep f_j^O's positions and only shrink
    the kernel until the two mean distances agree (bisection with common random numbers, so the
    draws are those of `GaussianKDE2D.sample` with the same generator, scaled); never wider than
    f_j^O's own bandwidth.
    """
    positions_xy_m = np.asarray(positions_xy_m, float)
    tree = cKDTree(np.asarray(data_xy_m, float))
    d, _ = tree.query(positions_xy_m, k=2)
    d = np.asarray(d).reshape(len(positions_xy_m), 2)
    # leave one out: the position's own measurement is at distance 0 (a position that is not
    # among the data keeps its nearest distance)
    target = float(np.where(d[:, 0] <= 1e-9, d[:, 1], d[:, 0]).mean())
    idx = rng.integers(0, len(positions_xy_m), size=n)
    z = rng.normal(scale=1.0, size=(n, 2))
    base = positions_xy_m[idx]

    def mean_dist(h: float) -> float:
        return float(tree.query(base + h * z)[0].mean())

    lo, hi = 0.0, float(bandwidth_m)
    if mean_dist(hi) > target:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mean_dist(mid) < target else (lo, mid)
    h = hi
    return base + h * z, h


def build_field(
    predict: PredictFn, cell_ids: list[str], site_xy_m: np.ndarray, target_xy_m: np.ndarray, target_density: np.ndarray,
    cand_xy_m: np.ndarray, *, n_nearest_cells: int, n_heard: int, detection_dbm: float, reports_per_candidate: int = 1,
    role_draws: int = 64, n_roles: int = 4, seed: int = 0,
) -> PlanField:
    """Predict each position's nearest cells and keep what the planner needs.

    Args:
        predict: (cell_ids, xy_m) -> (mean dBm, epistemic std dB, aleatoric std dB), row-wise.
        site_xy_m: (n_cells, 2) site of each cell of `cell_ids`: each position is predicted for
            the `n_nearest_cells` cells whose sites are nearest (a far cell is neither serving nor heard).
        target_density: user density f_j^O at the targets (any positive scale; normalised here).
        n_heard: cells one report measures (serving + neighbours), those predicted above `detection_dbm`.
        reports_per_candidate: reports taken at a candidate (a stationary point averages them).
        role_draws: the scored cells at a user are the TRUE two strongest, which the model
            predicts right only so often: each target keeps the `n_roles` cells most likely to be
            among the two strongest, weighted by that probability (`top2_probability`, this many
            draws, `seed`). 0: the two predicted strongest, each certain.
    """
    tree = cKDTree(site_xy_m)
    k = min(n_nearest_cells, len(cell_ids))
    codes = np.asarray(cell_ids, dtype=object)

    def predicted(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        _, near = tree.query(xy, k=k)
        near = np.asarray(near).reshape(len(xy), k)
        mean, ep, al = predict(codes[near.ravel()], np.repeat(xy, k, axis=0))
        shape = near.shape
        mean = np.where(np.isfinite(mean), mean, -np.inf).reshape(shape)
        order = np.argsort(-mean, axis=1, kind="stable")
        pick = lambda a: np.take_along_axis(np.asarray(a).reshape(shape), order, axis=1)  # noqa: E731
        return pick(near), pick(mean), pick(np.nan_to_num(ep, nan=0.0)), pick(np.nan_to_num(al, nan=1.0))

    t_cell, t_mean, t_ep, _ = predicted(target_xy_m)
    role_p = None
    if role_draws > 0 and k > 2:
        p_top2 = top2_probability(t_mean, t_ep, n_draws=role_draws, rng=np.random.default_rng(seed))
        keep = np.argsort(-p_top2, axis=1, kind="stable")[:, : min(n_roles, k)]
        role_p = np.take_along_axis(p_top2, keep, axis=1)
        t_cell = np.where(role_p > 0, np.take_along_axis(t_cell, keep, axis=1), -1)
        t_ep = np.take_along_axis(t_ep, keep, axis=1)
    else:
        t_cell, t_ep = np.where(np.isfinite(t_mean[:, :2]), t_cell[:, :2], -1), t_ep[:, :2]
    weight = np.clip(np.asarray(target_density, dtype=float), 0.0, None)
    weight = weight / weight.sum() if weight.sum() > 0 else np.full(len(weight), 1.0 / len(weight))
    c_cell, c_mean, c_ep, c_al = predicted(cand_xy_m)
    h = min(n_heard, k)
    heard = (c_mean[:, :h] >= detection_dbm) & np.isfinite(c_mean[:, :h])
    heard[:, 0] |= np.isfinite(c_mean[:, 0])  # the serving cell is always measured
    return PlanField(
        cell_ids=list(cell_ids), target_xy_m=np.asarray(target_xy_m, float), target_weight=weight,
        target_cell=t_cell, target_var=t_ep**2, target_role_p=role_p, cand_xy_m=np.asarray(cand_xy_m, float),
        cand_cell=np.where(heard, c_cell[:, :h], -1), cand_var=c_ep[:, :h] ** 2,
        cand_noise_var=np.maximum(c_al[:, :h], 1e-3) ** 2 / max(reports_per_candidate, 1),
    )


@dataclass
class _CellState:
    t_rows: np.ndarray  # target rows (into the target list) of this cell's (target, role) pairs
    w: np.ndarray  # their weights
    c_rows: np.ndarray  # candidate rows where the cell is heard
    c_noise: np.ndarray  # measurement variance there
    cov: np.ndarray  # (nT + nC, nT + nC) current covariance: targets first, then candidates
    c_local: dict[int, int] = field(default_factory=dict)  # candidate row -> local column


class VariancePlanner:
    """Greedy measurement selection on a `PlanField` (see the module docstring).

    `covariance(cell_id, xy)` gives a cell's posterior covariance (the radio model's own); cells
    for which it is None (or when it is not given) use the field's epistemic std and the a-priori
    correlation of length `length_m` (then a report farther than REACH_LENGTHS lengths from every
    target of the cell is left out: correlation < exp(-8)). A cell with neither stays fixed.

    `objective`: "std" (the user-weighted epistemic std, dB: the expected absolute error up to
    sqrt(2/pi)) or "var" (the weighted variance, dB^2: the expected squared error).
    `gains()` gives each candidate's expected reduction of the objective for one more report
    there, `group_gains` that of a group of reports together (a road edge); `measure(c)`
    conditions on a report at candidate c and returns the reduction it achieved. `objective()`
    is the current value.
    """

    def __init__(self, pf: PlanField, *, covariance: CovarianceFn | None = None, length_m: float | None = None,
                 objective: str = "std"):
        if objective not in OBJECTIVES:
            raise ValueError(f"VariancePlanner: objective must be one of {OBJECTIVES}, got {objective!r}")
        self.pf = pf
        self.length_m = length_m
        self.kind = objective
        self._cells: dict[tuple[int, int], _CellState] = {}  # (cell code, ensemble member) -> state
        n_c = len(pf.cand_xy_m)
        fixed = 0.0
        # a (target, cell) pair counts with the user weight times the chance the cell is scored there
        pair_w = pf.target_weight[:, None] * (1.0 if pf.target_role_p is None else pf.target_role_p)
        pair_w = np.broadcast_to(pair_w, pf.target_cell.shape)
        for code in np.unique(pf.target_cell[pf.target_cell >= 0]):
            t_r, t_role = np.nonzero(pf.target_cell == code)
            c_r, c_col = np.nonzero(pf.cand_cell == code)
            xy = np.concatenate([pf.target_xy_m[t_r], pf.cand_xy_m[c_r]])
            cov = covariance(pf.cell_ids[int(code)], xy) if covariance is not None and len(c_r) else None
            if cov is None and length_m is not None and len(c_r):
                near, _ = cKDTree(pf.target_xy_m[t_r]).query(pf.cand_xy_m[c_r], distance_upper_bound=REACH_LENGTHS * length_m)
                keep = np.isfinite(near)
                c_r, c_col = c_r[keep], c_col[keep]
                xy = np.concatenate([pf.target_xy_m[t_r], pf.cand_xy_m[c_r]])
                s = np.sqrt(np.concatenate([pf.target_var[t_r, t_role], pf.cand_var[c_r, c_col]]))
                d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
                cov = s[:, None] * s[None, :] * correlation(d, length_m)
            if cov is None or len(c_r) == 0:
                # no candidate measures the cell (or no covariance for it): no plan can reduce it
                fixed += float(pair_w[t_r, t_role] @ self._value(pf.target_var[t_r, t_role]))
                continue
            # one covariance, or an ensemble [(weight, covariance), ...] over plausible hyperparameters:
            # the objective is then the weights' average of each member's (`hyper_ensemble`)
            members = [(1.0, cov)] if isinstance(cov, np.ndarray) else list(cov)
            for k, (m_w, m_cov) in enumerate(members):
                st = _CellState(t_r, float(m_w) * pair_w[t_r, t_role], c_r, pf.cand_noise_var[c_r, c_col],
                                np.array(m_cov, dtype=float))
                st.c_local = {int(c): len(t_r) + j for j, c in enumerate(c_r)}
                self._cells[(int(code), k)] = st
        self._n_cand = n_c
        self._fixed = fixed

    def _value(self, var: np.ndarray) -> np.ndarray:
        """What one target's epistemic variance costs: its std (expected absolute error) or itself."""
        return np.sqrt(np.maximum(var, 0.0)) if self.kind == "std" else var

    def objective(self) -> float:
        """Current user-weighted epistemic std (dB; "var": variance, dB^2), serving + strongest neighbour."""
        total = self._fixed
        for st in self._cells.values():
            n_t = len(st.t_rows)
            total += float(st.w @ self._value(np.diag(st.cov)[:n_t]))
        return total

    def gains(self) -> np.ndarray:
        """(C,) expected reduction of the objective by one report at each candidate.

        Target t's variance v_t drops by r_tc = cov[t, c]^2 / (cov[c, c] + noise_c); the gain is
        sum_t w_t r_tc ("var") or sum_t w_t (sqrt(v_t) - sqrt(v_t - r_tc)) ("std").
        """
        out = np.zeros(self._n_cand)
        for st in self._cells.values():
            n_t = len(st.t_rows)
            cross = st.cov[:n_t, n_t:]
            den = np.diag(st.cov)[n_t:] + st.c_noise
            drop = cross**2 / den
            if self.kind == "std":
                v = np.maximum(np.diag(st.cov)[:n_t], 0.0)[:, None]
                gain = st.w @ (np.sqrt(v) - np.sqrt(np.maximum(v - drop, 0.0)))
            else:
                gain = st.w @ drop
            np.add.at(out, st.c_rows, gain)
        return out

    def group_gains(self, group: np.ndarray, n_groups: int) -> np.ndarray:
        """(n_groups,) expected reduction of the objective by one report at EVERY candidate of a
        group at once (candidate c in group[c]; -1: none), e.g. the reports along one road edge.

        Conditioning on the group jointly: target t's variance drops by
        r_t = K_tJ (K_JJ + N_J)^-1 K_Jt over the group's candidates J that hear the cell. Summing
        single-report gains instead would count reports 25 m apart on a field correlated over ~50 m
        as if each were alone, and overrate long runs of redundant reports.
        """
        out = np.zeros(n_groups)
        group = np.asarray(group)
        for st in self._cells.values():
            n_t = len(st.t_rows)
            g_of = group[st.c_rows]
            ok = g_of >= 0
            if not ok.any():
                continue
            cols = np.flatnonzero(ok)
            order = np.argsort(g_of[cols], kind="stable")
            cols, gs = cols[order], g_of[cols][order]
            starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
            sizes = np.diff(np.r_[starts, len(gs)])
            m = int(sizes.max())
            # padded batch: (G, m) local columns, padding gets a unit diagonal and no cross term
            slot = np.arange(len(gs)) - np.repeat(starts, sizes)
            idx = np.full((len(starts), m), -1)
            idx[np.repeat(np.arange(len(starts)), sizes), slot] = n_t + cols
            valid = idx >= 0
            safe = np.where(valid, idx, n_t)
            a = st.cov[safe[:, :, None], safe[:, None, :]]
            noise = np.where(valid, st.c_noise[np.maximum(safe - n_t, 0)], 0.0)
            a = np.where(valid[:, :, None] & valid[:, None, :], a, 0.0)
            a = a + np.einsum("gi,ij->gij", np.where(valid, noise, 1.0), np.eye(m))
            b = np.where(valid[:, None, :], st.cov[:n_t][:, safe].transpose(1, 0, 2), 0.0)  # (G, n_t, m)
            x = np.linalg.solve(a, b.transpose(0, 2, 1))  # (G, m, n_t)
            drop = np.einsum("gtm,gmt->gt", b, x)  # (G, n_t)
            v = np.maximum(np.diag(st.cov)[:n_t], 0.0)[None, :]
            if self.kind == "std":
                gain = (np.sqrt(v) - np.sqrt(np.maximum(v - drop, 0.0))) @ st.w
            else:
                gain = drop @ st.w
            out[gs[starts]] += gain
        return out

    def measure(self, cand: int) -> tuple[float, list[str]]:
        """Condition on one report at candidate `cand`: (achieved reduction of the objective, cells measured)."""
        reduction, cells = 0.0, []
        for (code, _), st in self._cells.items():
            j = st.c_local.get(int(cand))
            if j is None:
                continue
            n_t = len(st.t_rows)
            col = st.cov[:, j].copy()
            den = col[j] + st.c_noise[j - n_t]
            u = col / np.sqrt(den)
            v = np.diag(st.cov)[:n_t]
            reduction += float(st.w @ (self._value(v) - self._value(v - u[:n_t] ** 2)))
            st.cov -= np.outer(u, u)
            if self.pf.cell_ids[code] not in cells:
                cells.append(self.pf.cell_ids[code])
        return reduction, cells


class CoveragePlanner:
    """Same interface as `VariancePlanner` for the baselines: a report covers the targets within
    `radius_m`, each worth its weight once (uniform weights: uniform coverage of the area; user
    density: the densest user areas)."""

    def __init__(self, target_xy_m: np.ndarray, target_weight: np.ndarray, cand_xy_m: np.ndarray, *, radius_m: float):
        tree = cKDTree(target_xy_m)
        lists = tree.query_ball_point(cand_xy_m, r=radius_m)
        rows = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
        cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if len(lists) else np.empty(0, np.int64)
        self._m = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(cand_xy_m), len(target_xy_m)))
        self._w = np.asarray(target_weight, dtype=float).copy()

    def gains(self) -> np.ndarray:
        return self._m @ self._w

    def measure(self, cand: int) -> tuple[float, list[str]]:
        covered = self._m[int(cand)].indices
        gained = float(self._w[covered].sum())
        self._w[covered] = 0.0
        return gained, []


def plan_points(planner: VariancePlanner | CoveragePlanner, n_points: int, *, distinct: bool = False) -> pd.DataFrame:
    """Greedy: n_points times, the candidate with the largest expected reduction (`distinct`: each
    candidate at most once, e.g. a UE triggered once; else a point may be picked again).

    Returns rank, candidate, expected_reduction (achieved on the model), cells.
    """
    rows, taken = [], []
    for rank in range(min(n_points, planner.gains().size) if distinct else n_points):
        gains = planner.gains()
        gains[taken] = -np.inf
        cand = int(np.argmax(gains))
        if distinct:
            taken.append(cand)
        reduction, cells = planner.measure(cand)
        rows.append({"rank": rank + 1, "candidate": cand, "expected_reduction": reduction, "cells": cells})
    return pd.DataFrame(rows, columns=["rank", "candidate", "expected_reduction", "cells"])


# ------------------------------------------------------------------------------- roads
@dataclass
class RoadGraph:
    """Road segments noded at their intersections, with measurement points along each edge."""

    node_xy_m: np.ndarray  # (N, 2)
    edge_nodes: np.ndarray  # (E, 2)
    edge_length_m: np.ndarray  # (E,)
    edge_segment: np.ndarray  # (E,) object: the input segment id each edge comes from
    point_xy_m: np.ndarray  # (P, 2) measurement points (one report each)
    point_edge: np.ndarray  # (P,)

    def adjacency(self) -> csr_matrix:
        n = len(self.node_xy_m)
        a, b = self.edge_nodes[:, 0], self.edge_nodes[:, 1]
        w = np.maximum(self.edge_length_m, 1e-6)
        return csr_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(n, n))


def clip_segments(segments: pd.DataFrame, box_m: tuple[float, float, float, float]) -> pd.DataFrame:
    """Segments (segment_id, x0_m, y0_m, x1_m, y1_m) clipped to box (x_min, y_min, x_max, y_max); those outside dropped."""
    x_min, y_min, x_max, y_max = box_m
    keep = []
    for r in segments.itertuples(index=False):
        a, b = np.array([r.x0_m, r.y0_m], float), np.array([r.x1_m, r.y1_m], float)
        d, t0, t1, ok = b - a, 0.0, 1.0, True
        for p, q in ((-d[0], a[0] - x_min), (d[0], x_max - a[0]), (-d[1], a[1] - y_min), (d[1], y_max - a[1])):
            if p == 0:
                ok = ok and q >= 0
                continue
            t = q / p
            t0, t1 = (max(t0, t), t1) if p < 0 else (t0, min(t1, t))
        if ok and t1 - t0 > 1e-9 and np.hypot(*(d * (t1 - t0))) > 1.0:
            p0, p1 = a + t0 * d, a + t1 * d
            keep.append((str(r.segment_id), p0[0], p0[1], p1[0], p1[1]))
    return pd.DataFrame(keep, columns=["segment_id", "x0_m", "y0_m", "x1_m", "y1_m"])


def road_graph(segments: pd.DataFrame, *, sample_spacing_m: float, snap_m: float = 1.0,
               max_edge_m: float | None = 200.0) -> RoadGraph:
    """Node straight segments at their mutual intersections and end points (within `snap_m`) and
    place one measurement point every `sample_spacing_m` along every edge (at least one per edge).

    Edges longer than `max_edge_m` are cut into equal pieces, so a route can stop part-way along
    a long road and the budget is spent to within `max_edge_m`.
    """
    a = segments[["x0_m", "y0_m"]].to_numpy(float)
    b = segments[["x1_m", "y1_m"]].to_numpy(float)
    d = b - a
    cuts: list[list[float]] = [[0.0, 1.0] for _ in range(len(a))]
    for i in range(len(a)):
        # intersections of segment i with every later segment j: a_i + t d_i = a_j + u d_j
        den = d[i, 0] * d[i + 1:, 1] - d[i, 1] * d[i + 1:, 0]
        diff = a[i + 1:] - a[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (diff[:, 0] * d[i + 1:, 1] - diff[:, 1] * d[i + 1:, 0]) / den
            u = (diff[:, 0] * d[i, 1] - diff[:, 1] * d[i, 0]) / den
        tol_i = snap_m / max(np.hypot(*d[i]), 1e-9)
        tol_j = snap_m / np.maximum(np.hypot(d[i + 1:, 0], d[i + 1:, 1]), 1e-9)
        hit = (np.abs(den) > 1e-12) & (t >= -tol_i) & (t <= 1 + tol_i) & (u >= -tol_j) & (u <= 1 + tol_j)
        for k in np.nonzero(hit)[0]:
            cuts[i].append(float(np.clip(t[k], 0, 1)))
            cuts[i + 1 + k].append(float(np.clip(u[k], 0, 1)))
    node_index: dict[tuple[int, int], int] = {}
    nodes: list[np.ndarray] = []

    def node(p: np.ndarray) -> int:
        key = (int(round(p[0] / snap_m)), int(round(p[1] / snap_m)))
        if key not in node_index:
            node_index[key] = len(nodes)
            nodes.append(p)
        return node_index[key]

    edges, lengths, seg_ids, pts, pt_edge = [], [], [], [], []
    ids = segments["segment_id"].astype(str).to_numpy()
    for i in range(len(a)):
        ts = np.unique(np.round(np.array(cuts[i]), 9))
        if max_edge_m:
            seg_len = float(np.hypot(*d[i]))
            pieces = [np.linspace(t0, t1, max(1, int(np.ceil((t1 - t0) * seg_len / max_edge_m))) + 1)
                      for t0, t1 in zip(ts[:-1], ts[1:])]
            ts = np.unique(np.concatenate(pieces)) if pieces else ts
        for t0, t1 in zip(ts[:-1], ts[1:]):
            p0, p1 = a[i] + t0 * d[i], a[i] + t1 * d[i]
            n0, n1 = node(p0), node(p1)
            length = float(np.hypot(*(p1 - p0)))
            if n0 == n1 or length <= 0:
                continue
            e = len(edges)
            edges.append((n0, n1))
            lengths.append(length)
            seg_ids.append(ids[i])
            n_pts = max(1, int(round(length / sample_spacing_m)))
            frac = (np.arange(n_pts) + 0.5) / n_pts
            pts.append(p0[None] + frac[:, None] * (p1 - p0)[None])
            pt_edge.append(np.full(n_pts, e))
    if not edges:
        return RoadGraph(np.zeros((0, 2)), np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0, object),
                         np.zeros((0, 2)), np.zeros(0, np.int64))
    return RoadGraph(np.array(nodes), np.array(edges, dtype=np.int64), np.array(lengths), np.array(seg_ids, dtype=object),
                     np.concatenate(pts), np.concatenate(pt_edge))


def _drive(planner, graph: RoadGraph, path_edges: list[int], points_of: list[np.ndarray]) -> list[dict]:
    out = []
    for e in path_edges:
        reduction, cells = 0.0, set()
        for p in points_of[e]:
            r, c = planner.measure(int(p))
            reduction += r
            cells.update(c)
        out.append({"edge": e, "expected_reduction": reduction, "cells": sorted(cells)})
    return out


def _path(pred: np.ndarray, edge_of: dict[tuple[int, int], int], start: int, end: int) -> list[int]:
    edges, node = [], end
    while node != start and node >= 0:
        prev = int(pred[node])
        if prev < 0:
            return []
        edges.append(edge_of[(prev, node)])
        node = prev
    return edges[::-1]


def plan_route(planner, graph: RoadGraph, budget_m: float, *, start_node: int | None = None) -> pd.DataFrame:
    """Greedy route growth along roads within `budget_m` driven metres (every metre driven measures).

    From the route's current end, each edge is scored by (expected reduction of the points on the
    shortest path to it and on it) / (metres to drive there and along it); the best affordable
    one is driven, the planner conditions on every report along the way, and the scores are
    recomputed. The start is the best edge's nearer end (the drive to the area is not counted).

    Returns one row per driven edge in order: rank, edge, expected_reduction, cells, cumulative_m.
    """
    n_edges = len(graph.edge_nodes)
    points_of = [np.empty(0, np.int64)] * n_edges
    order = np.argsort(graph.point_edge, kind="stable")
    bounds = np.searchsorted(graph.point_edge[order], np.arange(n_edges + 1))
    points_of = [order[bounds[e]:bounds[e + 1]] for e in range(n_edges)]
    edge_of: dict[tuple[int, int], int] = {}
    for e, (u, v) in enumerate(graph.edge_nodes):
        # parallel edges: keep the shorter, as Dijkstra does
        for key in ((int(u), int(v)), (int(v), int(u))):
            if key not in edge_of or graph.edge_length_m[e] < graph.edge_length_m[edge_of[key]]:
                edge_of[key] = e
    adj = graph.adjacency()
    used, rows, current = 0.0, [], start_node
    while True:
        gains = (planner.group_gains(graph.point_edge, n_edges) if hasattr(planner, "group_gains")
                 else np.bincount(graph.point_edge, weights=planner.gains(), minlength=n_edges))
        remaining = budget_m - used
        if current is None:
            ratio = np.where(graph.edge_length_m <= remaining, gains / graph.edge_length_m, -np.inf)
            e = int(np.argmax(ratio))
            if not np.isfinite(ratio[e]):
                break
            path, end, cost = [e], int(graph.edge_nodes[e, 1]), float(graph.edge_length_m[e])
        else:
            dist, pred = dijkstra(adj, indices=current, return_predecessors=True)
            # reduction collected on the way to each node, in order of distance
            path_gain = np.full(len(dist), 0.0)
            for node in np.argsort(dist):
                p = pred[node]
                if p >= 0 and np.isfinite(dist[node]):
                    path_gain[node] = path_gain[p] + gains[edge_of[(int(p), int(node))]]
            u, v = graph.edge_nodes[:, 0], graph.edge_nodes[:, 1]
            via_u = dist[u] <= dist[v]
            entry = np.where(via_u, u, v)
            cost = dist[entry] + graph.edge_length_m
            value = path_gain[entry] + gains
            ratio = np.where(np.isfinite(cost) & (cost <= remaining), value / np.maximum(cost, 1e-9), -np.inf)
            e = int(np.argmax(ratio))
            if not np.isfinite(ratio[e]) or value[e] <= 0:
                break
            path = _path(pred, edge_of, current, int(entry[e])) + [e]
            end = int(np.where(via_u[e], v[e], u[e]))
            cost = float(cost[e])
        for row in _drive(planner, graph, path, points_of):
            used += float(graph.edge_length_m[row["edge"]])
            rows.append({**row, "cumulative_m": used})
        current = end
        if budget_m - used <= 0:
            break
    frame = pd.DataFrame(rows, columns=["edge", "expected_reduction", "cells", "cumulative_m"])
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


def best_route(make_planner: Callable[[], VariancePlanner], graph: RoadGraph, budget_m: float, *, n_starts: int,
               separation_m: float, candidates: list[list[int]] | None = None,
               make_judge: Callable[[], VariancePlanner] | None = None) -> tuple[pd.DataFrame, VariancePlanner]:
    """`plan_route` grown from `n_starts` start edges and the route the planner expects the most
    from (its own objective, nothing held out). A greedy route is only as good as where it starts:
    it spends its budget around there. The starts are the edges with the best expected reduction
    per metre, each more than `separation_m` from the previous starts (else two starts grow the
    same route). `candidates`: other routes (edge lists within the budget, e.g. `coverage_routes`)
    scored the same way, by the planner's expected reduction after all their reports; the greedy
    growth is myopic (one edge at a time), so a route built another way can be worth more under
    the planner's own objective. `make_judge`: if given, the routes are compared by the expected
    reduction of a planner built on other users (e.g. independent draws of the same density) after
    all their reports, not by the planner they were grown with: a greedy route is fitted to the
    users it was grown on, so judging it on those users favours it by its own overfit.
    Returns (route, the planner conditioned on it)."""
    options = route_options(make_planner, graph, budget_m, n_starts=n_starts, separation_m=separation_m,
                            candidates=candidates)
    return select_route(options, graph, make_judge)


def route_options(make_planner: Callable[[], VariancePlanner], graph: RoadGraph, budget_m: float, *, n_starts: int,
                  separation_m: float, candidates: list[list[int]] | None = None
                  ) -> list[tuple[float, pd.DataFrame, VariancePlanner]]:
    """The routes `best_route` chooses from: (the growth planner's expected reduction, route, that
    planner conditioned on it), greedy starts first, then the candidates in their order."""
    points = _points_of(graph)
    first = make_planner()
    n_edges = len(graph.edge_nodes)
    gains = (first.group_gains(graph.point_edge, n_edges) if hasattr(first, "group_gains")
             else np.bincount(graph.point_edge, weights=first.gains(), minlength=n_edges))
    ratio = np.where(graph.edge_length_m <= budget_m, gains / np.maximum(graph.edge_length_m, 1e-9), -np.inf)
    mid = graph.node_xy_m[graph.edge_nodes].mean(axis=1)
    starts: list[int] = []
    for e in np.argsort(-ratio, kind="stable"):
        if len(starts) == n_starts or not np.isfinite(ratio[e]):
            break
        if all(np.hypot(*(mid[e] - mid[s])) > separation_m for s in starts):
            starts.append(int(e))
    options: list[tuple[float, pd.DataFrame, VariancePlanner]] = []
    for i, e in enumerate(starts):
        planner = first if i == 0 else make_planner()
        # from one end of the start edge: the first step is that edge unless a neighbour pays more per metre
        route = plan_route(planner, graph, budget_m, start_node=int(graph.edge_nodes[e, 0]))
        route.attrs["source"] = f"greedy start {i}"
        options.append((float(route["expected_reduction"].sum()) if len(route) else -np.inf, route, planner))
    for k, edges in enumerate(candidates or []):
        if not edges or float(graph.edge_length_m[edges].sum()) > budget_m + 1e-6:
            continue
        planner = make_planner()
        rows, used = [], 0.0
        for row in _drive(planner, graph, list(edges), points):
            used += float(graph.edge_length_m[row["edge"]])
            rows.append({**row, "cumulative_m": used})
        route = pd.DataFrame(rows, columns=["edge", "expected_reduction", "cells", "cumulative_m"])
        route.insert(0, "rank", np.arange(1, len(route) + 1))
        route.attrs["source"] = f"candidate {k}"
        options.append((float(route["expected_reduction"].sum()), route, planner))
    if not options:
        route = plan_route(first, graph, budget_m)
        options.append((float(route["expected_reduction"].sum()) if len(route) else -np.inf, route, first))
    return options


def select_route(options: list[tuple[float, pd.DataFrame, VariancePlanner]], graph: RoadGraph,
                 make_judge: Callable[[], VariancePlanner] | None = None) -> tuple[pd.DataFrame, VariancePlanner]:
    """The first of `route_options` with the largest value: the growth planner's own expectation,
    or (`make_judge`) a fresh judge planner's expected reduction after all the route's reports."""
    points = _points_of(graph)
    best: tuple[float, pd.DataFrame, VariancePlanner] | None = None
    for own, route, planner in options:
        value = own
        if make_judge is not None and len(route):
            judge = make_judge()
            value = float(sum(r["expected_reduction"] for r in _drive(judge, graph, route["edge"].tolist(), points)))
        route.attrs["selection_value"] = value
        if best is None or value > best[0]:
            best = (value, route, planner)
    return best[1], best[2]


def _points_of(graph: RoadGraph) -> list[np.ndarray]:
    """Measurement points of each edge."""
    n_edges = len(graph.edge_nodes)
    order = np.argsort(graph.point_edge, kind="stable")
    bounds = np.searchsorted(graph.point_edge[order], np.arange(n_edges + 1))
    return [order[bounds[e]:bounds[e + 1]] for e in range(n_edges)]


# A priori: the radii over which a coverage route counts a user as "measured" (a report's reach,
# from a few correlation lengths of the field, ~50 m, to a street block and a half).
COVERAGE_RADII_M = (50.0, 100.0, 150.0, 300.0)


def coverage_routes(graph: RoadGraph, budget_m: float, target_xy_m: np.ndarray, target_weight: np.ndarray, *,
                    radii_m: tuple[float, ...] = COVERAGE_RADII_M) -> list[list[int]]:
    """Candidate routes for `best_route`: greedy coverage of the users (weights: their density)
    within each radius, grown along the roads as `plan_route` grows the planner's own."""
    out = []
    for r in radii_m:
        cover = CoveragePlanner(target_xy_m, target_weight, graph.point_xy_m, radius_m=r)
        out.append(plan_route(cover, graph, budget_m)["edge"].tolist())
    return out


def random_route(graph: RoadGraph, budget_m: float, *, rng: np.random.Generator) -> list[int]:
    """Baseline: a random walk on the roads from a random node (no U-turn unless at a dead end)."""
    n = len(graph.node_xy_m)
    incident: list[list[int]] = [[] for _ in range(n)]
    for e, (u, v) in enumerate(graph.edge_nodes):
        incident[int(u)].append(e)
        incident[int(v)].append(e)
    node, last, used, out = int(rng.integers(n)), -1, 0.0, []
    while True:
        options = [e for e in incident[node] if e != last] or incident[node]
        options = [e for e in options if used + graph.edge_length_m[e] <= budget_m]
        if not options:
            break
        e = int(options[int(rng.integers(len(options)))])
        out.append(e)
        used += float(graph.edge_length_m[e])
        u, v = graph.edge_nodes[e]
        node, last = int(v if u == node else u), e
    return out
