import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr

from cellsynth.density import CellSupportIndex, DensityModels, GaussianKDE2D, associate_dense, kde_map, ks_2d_maps
from cellsynth.density.transforms import association_log_prior
from cellsynth.density._voronoi import nearest_site_associate, voronoi_maps

from ._density_synth import layout


def _cells_kdes(n_cells=80, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 8000, size=(n_cells, 2))
    kdes = [
        GaussianKDE2D(bandwidth_grid_m=(25.0, 50.0, 100.0, 200.0)).fit(c + rng.normal(scale=rng.uniform(80, 300), size=(rng.integers(5, 120), 2)))
        for c in centres
    ]
    return [f"c{i:03d}" for i in range(n_cells)], kdes


@pytest.mark.parametrize("rule", ["ml", "map"])
def test_pruned_association_equals_dense(rule):
    ids, kdes = _cells_kdes()
    prior = association_log_prior([k.n_reports_ for k in kdes], mode=rule)
    rng = np.random.default_rng(1)
    # Points inside the layout, on its edge and far outside (those exercise the dense fallback).
    pts = np.vstack([rng.uniform(0, 8000, size=(3000, 2)), rng.uniform(-20_000, 30_000, size=(200, 2))])
    index = CellSupportIndex(ids, kdes, k_bandwidths=6.0, log_prior=prior)
    pruned = index.associate(pts)
    dense = associate_dense(ids, kdes, pts, log_prior=prior)
    np.testing.assert_array_equal(pruned, dense)
    assert index.n_dense_fallback_ < len(pts) // 5
    # Pruning must actually prune: far fewer (point, cell) pairs than dense.
    pidx, _ = index.candidates(pts)
    assert len(pidx) < 0.25 * len(pts) * len(ids)


def test_map_prior_is_the_report_share_and_changes_the_answer_where_it_should():
    assert association_log_prior([1, 3], mode="map") == pytest.approx(np.log([0.25, 0.75]))
    assert association_log_prior([1, 3], mode="ml") == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="mode"):
        association_log_prior([1, 3], mode="bayes")
    # Big cell: 99 reports at x=0 (h=100); small cell: 1 report at x=300 (h=20). At x=250 the
    # small cell's density is higher (ML picks it), but 99 f_big > 1 f_small there (MAP: big).
    big = GaussianKDE2D(bandwidth_m=100.0).fit(np.zeros((99, 2)))
    small = GaussianKDE2D(bandwidth_m=20.0).fit([[300.0, 0.0]])
    x = np.array([[250.0, 0.0], [300.0, 0.0]])
    f_big = np.exp(-(250.0**2) / (2 * 100.0**2)) / (2 * np.pi * 100.0**2)
    f_small = np.exp(-(50.0**2) / (2 * 20.0**2)) / (2 * np.pi * 20.0**2)
    assert f_small > f_big and 99 * f_big > f_small  # the hand-computed premise
    prior = association_log_prior([99, 1], mode="map")
    for log_prior, expected in ((None, ["small", "small"]), (prior, ["big", "small"])):
        dense = associate_dense(["big", "small"], [big, small], x, log_prior=log_prior)
        pruned = CellSupportIndex(["big", "small"], [big, small], log_prior=log_prior).associate(x)
        assert list(dense) == expected and list(pruned) == expected


def test_density_models_associate_and_sample():
    ids, kdes = _cells_kdes(20)
    area = GaussianKDE2D(bandwidth_m=150.0).fit(np.vstack([k.positions_ for k in kdes]))
    models = DensityModels.from_kdes({"h00_06": dict(zip(ids, kdes))}, area={"h00_06": area})
    assert models.windows == ["h00_06"]
    assert models.cells("h00_06") == sorted(ids)
    assert models.n_reports("h00_06") == sum(k.n_reports_ for k in kdes)
    assert models.n_reports_by_cell("h00_06")[ids[3]] == kdes[3].n_reports_
    pts = models.sample_positions("h00_06", 500, rng=0)
    assert pts.shape == (500, 2)
    np.testing.assert_array_equal(models.associate("h00_06", pts), models.associate_dense("h00_06", pts))
    np.testing.assert_array_equal(models.associate("h00_06", pts, rule="ml"), models.associate_dense("h00_06", pts, rule="ml"))
    # The default rule is MAP: the same answer as the dense reference with log(n_i / n) added.
    shares = np.log(np.array([k.n_reports_ for k in kdes], dtype=float) / sum(k.n_reports_ for k in kdes))
    np.testing.assert_array_equal(models.associate("h00_06", pts), associate_dense(ids, kdes, pts, log_prior=shares))
    assert models.association == "map"


def test_kde_map_sums_to_one_and_matches_closed_form_square_mass():
    kde = GaussianKDE2D(bandwidth_m=60.0).fit([[130.0, 20.0]])
    m = kde_map(kde, resolution_m=100.0, min_mass=0.0)
    assert m["prob"].sum() == pytest.approx(1.0, abs=1e-12)
    # Square (1, 0) spans x in [100, 200), y in [0, 100): mass = product of normal CDF differences.
    expected = (ndtr((200 - 130) / 60) - ndtr((100 - 130) / 60)) * (ndtr((100 - 20) / 60) - ndtr((0 - 20) / 60))
    got = m.loc[(m.gx == 1) & (m.gy == 0), "prob"].item()
    assert got == pytest.approx(expected, rel=1e-5)  # tiny renormalisation for the 5-h cut


def test_kde_map_matches_riemann_sum_of_sklearn_density():
    rng = np.random.default_rng(4)
    kde = GaussianKDE2D(bandwidth_m=40.0).fit(rng.normal(scale=150, size=(50, 2)))
    m = kde_map(kde, resolution_m=100.0, min_mass=1e-9)
    row = m.sort_values("prob").iloc[-1]
    sub = (np.arange(40) + 0.5) / 40 * 100
    gx, gy = np.meshgrid(row.gx * 100 + sub, row.gy * 100 + sub, indexing="ij")
    riemann = np.exp(kde.score_samples(np.column_stack([gx.ravel(), gy.ravel()]))).mean() * 100 * 100
    assert row.prob == pytest.approx(riemann, rel=2e-3)


def _m(cells):
    return pd.DataFrame([{"gx": gx, "gy": gy, "prob": p} for (gx, gy), p in cells.items()])


def test_ks_2d_known_answers():
    a = _m({(0, 0): 1.0})
    assert ks_2d_maps(a, a) == pytest.approx(0.0, abs=1e-12)
    assert ks_2d_maps(a, _m({(5, 5): 1.0})) == pytest.approx(1.0, abs=1e-12)
    # Hand computed: A = half at (0,0), half at (1,1); B = all at (0,0). Origin (0,0): A has
    # 0.5 in {x<=0,y<=0}, B has 1 -> 0.5; origin (1,1), split x<1,y<1: 0.5 vs 1 -> 0.5.
    # No split gives more than 0.5, so D_A = D_B = 0.5.
    assert ks_2d_maps(_m({(0, 0): 0.5, (1, 1): 0.5}), _m({(0, 0): 1.0})) == pytest.approx(0.5)
    # Shift by one square of a 2x1 block: A = (0,0),(1,0) halves; B = (1,0),(2,0) halves.
    # Origin (0,0): A lower-left 0.5, B 0 -> 0.5; D = 0.5 both ways.
    assert ks_2d_maps(_m({(0, 0): 0.5, (1, 0): 0.5}), _m({(1, 0): 0.5, (2, 0): 0.5})) == pytest.approx(0.5)


def _ks_bruteforce(a, b):
    # Direct FF: every origin square, its four corners as split points, four quadrants each.
    def quad(m, x0, y0, left_incl, below_incl):
        x, y, p = m["gx"].to_numpy(), m["gy"].to_numpy(), m["prob"].to_numpy() / m["prob"].sum()
        left = x <= x0 if left_incl else x < x0
        below = y <= y0 if below_incl else y < y0
        return np.array([p[left & below].sum(), p[left & ~below].sum(), p[~left & below].sum(), p[~left & ~below].sum()])

    d = []
    for m in (a, b):
        d.append(max(
            np.abs(quad(a, x, y, li, bi) - quad(b, x, y, li, bi)).max()
            for x, y in zip(m.gx, m.gy) for li in (True, False) for bi in (True, False)
        ))
    return (d[0] + d[1]) / 2


def test_ks_2d_matches_bruteforce_on_random_maps():
    rng = np.random.default_rng(7)
    for _ in range(5):
        maps = []
        for _ in range(2):
            sq = np.unique(rng.integers(-6, 6, size=(25, 2)), axis=0)
            maps.append(pd.DataFrame({"gx": sq[:, 0], "gy": sq[:, 1], "prob": rng.uniform(0.1, 1, len(sq))}))
        assert ks_2d_maps(*maps) == pytest.approx(_ks_bruteforce(*maps), abs=1e-12)


def test_voronoi_maps_sum_to_one_and_split_sectors_by_azimuth():
    cells = layout(4)
    vor = voronoi_maps(cells, box_m=(-1000, -1000, 2500, 2500), resolution_m=100.0)
    sums = vor.groupby("cell_id")["prob"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    assert set(sums.index) == set(cells["cell_id"])
    # The squares of each site partition the box: every square's total owner weight is the same.
    counts = vor.assign(w=vor["prob"]).groupby(["gx", "gy"]).size()
    assert counts.min() >= 1
    # A point due north of site 0 is owned by its 0-degree sector, due south by none of it.
    s0 = cells.iloc[0]
    got = nearest_site_associate(cells, np.array([[s0.x_m, s0.y_m + 300.0], [s0.x_m + 20, s0.y_m - 300.0]]))
    assert got[0] == "s0c0"
    assert got[1] in {"s0c1", "s0c2"}


def _cv_reference(kdes, scale, n_folds, max_reports, seed):
    # Brute-force twin of select_association_scale: same folds, dense scoring, explicit loops.
    labels = np.concatenate([np.full(k.n_reports_, i) for i, k in enumerate(kdes)])
    xy = np.vstack([k.positions_ for k in kdes])
    pick = np.random.default_rng(seed).permutation(len(xy))[:max_reports]
    fold = np.full(len(xy), -1)
    fold[pick] = np.arange(len(pick)) % n_folds
    hits = 0
    for f in range(n_folds):
        held = fold == f
        ids = [i for i in range(len(kdes)) if (~held & (labels == i)).any()]
        counts = np.array([(~held & (labels == i)).sum() for i in ids], dtype=float)
        fold_kdes = [GaussianKDE2D(bandwidth_m=kdes[i].bandwidth_m_ * scale).fit(xy[~held & (labels == i)]) for i in ids]
        pred = associate_dense(np.array(ids, dtype=object), fold_kdes, xy[held], log_prior=np.log(counts / counts.sum()))
        hits += int((pred.astype(int) == labels[held]).sum())
    return hits / len(pick)


def test_association_scale_is_chosen_by_cv_on_training_positions():
    from cellsynth.density.transforms import select_association_scale

    # Two cells split by the line x = 0 (a sharp border, as a serving-cell boundary is): reports
    # uniform on each side. Wide bandwidths blur the border, so a small scale classifies better.
    rng = np.random.default_rng(3)
    left = np.column_stack([rng.uniform(-600, 0, 300), rng.uniform(0, 600, 300)])
    right = np.column_stack([rng.uniform(0, 600, 150), rng.uniform(0, 600, 150)])
    kdes = [GaussianKDE2D(bandwidth_m=200.0).fit(left), GaussianKDE2D(bandwidth_m=200.0).fit(right)]
    scale, cv = select_association_scale(kdes, (0.25, 0.5, 1.0), n_folds=3, max_reports=400, rng=7)
    for s in (0.25, 0.5, 1.0):
        assert cv[s] == pytest.approx(_cv_reference(kdes, s, 3, 400, 7), abs=1e-12)
    assert scale == max(cv, key=lambda s: (cv[s], s))
    assert cv[0.25] > cv[1.0]  # the premise: less smoothing across the border classifies better
    # One candidate: no search.
    assert select_association_scale(kdes, (1.0,)) == (1.0, {})


def test_density_models_use_the_cv_scale_under_map_only():
    ids, kdes = _cells_kdes(20)
    models = DensityModels.from_kdes({"w": dict(zip(ids, kdes))}, association_bandwidth_scales=(0.5, 1.0))
    pts = models.sample_positions("w", 400, rng=2)
    scale = models.association_scale("w")
    assert scale in (0.5, 1.0) and set(models.association_cv_["w"]) == {0.5, 1.0}
    assert models.association_scale("w", rule="ml") == 1.0
    scaled = [GaussianKDE2D(bandwidth_m=k.bandwidth_m_ * scale).fit(k.positions_) for k in kdes]
    np.testing.assert_array_equal(models.associate("w", pts), associate_dense(ids, scaled, pts, log_prior=models.log_prior("w")))
    np.testing.assert_array_equal(models.associate("w", pts), models.associate_dense("w", pts))
    np.testing.assert_array_equal(models.associate("w", pts, rule="ml"), associate_dense(ids, kdes, pts))


def test_vectorised_scores_equal_scikit_learn_log_densities():
    ids, kdes = _cells_kdes(n_cells=12, seed=3)
    prior = association_log_prior([k.n_reports_ for k in kdes], mode="map")
    index = CellSupportIndex(ids, kdes, log_prior=prior)
    pts = np.random.default_rng(4).uniform(0, 8000, size=(400, 2))
    pidx, cidx = index.candidates(pts)
    want = np.array([kdes[c].score_samples(pts[[p]])[0] + prior[c] for p, c in zip(pidx, cidx)])
    np.testing.assert_allclose(index._scores(pts, pidx, cidx), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_grid_bounds_bracket_the_exact_scores_and_leave_the_answer_as_dense(seed, monkeypatch):
    # Issue 15: a pair is dropped when its grid upper bound is below the best grid lower bound of
    # its point, and a point left with one pair is answered unscored; so the bounds must hold for
    # every position of every square (here: candidates anywhere in and around crowded cells).
    # Every cell gets its grid (a small layout would mostly keep box bounds: `_grid_pays`).
    from cellsynth.density import transforms

    monkeypatch.setattr(transforms, "GRID_WORK_RATIO", 0.0)
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1500, size=(40, 2))
    kdes = [GaussianKDE2D(bandwidth_grid_m=(15.0, 30.0, 60.0)).fit(c + rng.normal(scale=rng.uniform(40, 250), size=(rng.integers(3, 200), 2)))
            for c in centres]
    ids = [f"c{i:02d}" for i in range(len(kdes))]
    prior = association_log_prior([k.n_reports_ for k in kdes], mode="map")
    index = CellSupportIndex(ids, kdes, log_prior=prior)
    pts = np.vstack([rng.uniform(-500, 2000, size=(4000, 2)), np.vstack([k.positions_[:5] for k in kdes])])
    pidx, cidx = index.candidates(pts)
    upper, lower = index._grid_bounds(pts, pidx, cidx)
    exact = index._scores(pts, pidx, cidx)
    assert (upper >= exact - 1e-9).all() and (lower <= exact + 1e-9).all()
    assert np.isfinite(upper).all()
    got = index.associate(pts)
    np.testing.assert_array_equal(got, associate_dense(ids, kdes, pts, log_prior=prior))
    assert index.n_scored_ < 0.5 * len(pidx)  # most pairs never scored exactly


def _lazy_index():
    """80 cells' KDEs behind a CellSupportIndex that records which KDEs it loads."""
    ids, kdes = _cells_kdes(n_cells=80, seed=5)
    prior = association_log_prior([k.n_reports_ for k in kdes], mode="map")
    loaded = []

    def kde_of(i):
        loaded.append(i)
        return kdes[i]

    index = CellSupportIndex(ids, kde_of, log_prior=prior, boxes_m=np.array([k.support_box_m for k in kdes]),
                             bandwidths_m=[k.bandwidth_m_ for k in kdes])
    return ids, kdes, prior, index, loaded, kde_of


def test_lazy_index_loads_only_nearby_kdes_and_answers_like_dense():
    ids, kdes, prior, index, loaded, kde_of = _lazy_index()
    # a 1 km square in the corner of the 8 km layout: most cells are too far to win there
    pts = np.random.default_rng(6).uniform(0, 1000, size=(500, 2))
    got = index.associate(pts)
    np.testing.assert_array_equal(got, associate_dense(ids, kdes, pts, log_prior=prior))
    if index.n_dense_fallback_ == 0:
        assert 0 < len(set(loaded)) < 40
    with pytest.raises(ValueError, match="boxes_m and bandwidths_m"):
        CellSupportIndex(ids, kde_of)


def test_unresolved_positions_load_only_the_cells_that_can_win():
    # Issue 15: positions the candidates leave unresolved (far outside every cell's reach) used
    # to build and score every cell's KDE; now only cells whose bound reaches the floor.
    ids, kdes, prior, index, loaded, kde_of = _lazy_index()
    rng = np.random.default_rng(8)
    pts = np.vstack([rng.uniform(-3000, -2000, size=(300, 2)), rng.uniform(-30_000, 40_000, size=(300, 2)),
                     rng.uniform(0, 8000, size=(300, 2))])
    got = index.associate(pts)
    np.testing.assert_array_equal(got, associate_dense(ids, kdes, pts, log_prior=prior))
    assert index.n_dense_fallback_ > 300
    assert len(set(loaded)) < len(ids)


def test_tiles_partition_the_area_density_and_associate_like_dense():
    ids, kdes = _cells_kdes(n_cells=30, seed=7)
    area = GaussianKDE2D(bandwidth_m=60.0).fit(np.vstack([k.positions_ for k in kdes]))
    models = DensityModels.from_kdes({"w": dict(zip(ids, kdes))}, area={"w": area})
    tiles = models.plan_tiles("w", 20_000, rng=0, rows_per_tile=5_000)
    assert len(tiles) == 4 and sum(t["n_samples"] for t in tiles) == 20_000
    # every area centre in exactly one tile, tile shares near the centres' shares
    centres = np.sort(np.concatenate([t["centres"] for t in tiles]))
    np.testing.assert_array_equal(centres, np.arange(area.n_reports_))
    xy = np.vstack([models.sample_tile("w", t, rng=t["tile"]) for t in tiles])
    # a draw from f_j^O: mean and spread of the area KDE (centres' mean; variance + h^2)
    np.testing.assert_allclose(xy.mean(axis=0), area.positions_.mean(axis=0), atol=40.0)
    np.testing.assert_allclose(xy.var(axis=0), area.positions_.var(axis=0) + 60.0**2, rtol=0.05)
    sub = xy[:: 40]
    np.testing.assert_array_equal(models.associate("w", sub), models.associate_dense("w", sub))


def _grid_bounds_per_cell(index, xy, pidx, cidx):
    """The bounds as computed before they were vectorised (session 16): a loop over the cells."""
    upper, lower = np.empty(len(pidx)), np.empty(len(pidx))
    for c in np.unique(cidx).tolist():
        sel = np.flatnonzero(cidx == c)
        pts = xy[pidx[sel]]
        if not index._grid_pays(c, len(sel)):
            b, h = index.boxes_m[c], float(index.bandwidths_m[c])
            dx = np.maximum(np.maximum(b[0] - pts[:, 0], pts[:, 0] - b[2]), 0.0)
            dy = np.maximum(np.maximum(b[1] - pts[:, 1], pts[:, 1] - b[3]), 0.0)
            upper[sel] = -math.log(2 * math.pi * h * h) - (dx * dx + dy * dy) / (2 * h * h) + index.log_prior[c]
            lower[sel] = -np.inf
            continue
        x0, y0, s, up, low = index._grid(c)
        ix = np.floor((pts[:, 0] - x0) / s).astype(np.int64)
        iy = np.floor((pts[:, 1] - y0) / s).astype(np.int64)
        inside = (ix >= 0) & (ix < up.shape[0]) & (iy >= 0) & (iy < up.shape[1])
        ixc, iyc = np.clip(ix, 0, up.shape[0] - 1), np.clip(iy, 0, up.shape[1] - 1)
        upper[sel] = np.where(inside, up[ixc, iyc], np.inf)
        lower[sel] = np.where(inside, low[ixc, iyc], -np.inf)
    return upper, lower


@pytest.mark.parametrize("ratio", [0.0, "median", np.inf])
def test_vectorised_grid_bounds_equal_the_per_cell_loop_bit_for_bit(ratio, monkeypatch):
    # Session 16 vectorised `_grid_bounds` (one pass over all pairs) and the grids' Toeplitz
    # factors for CPU only: every bound must be the same float as the loop's, with every cell on
    # its grid (0), a mix of grid and box bounds (the median cell's work ratio: half pay), none (inf).
    from cellsynth.density import transforms

    monkeypatch.setattr(transforms, "GRID_WORK_RATIO", 0.0 if ratio == "median" else ratio)
    rng = np.random.default_rng(7)
    centres = rng.uniform(0, 1500, size=(40, 2))
    kdes = [GaussianKDE2D(bandwidth_grid_m=(15.0, 30.0, 60.0)).fit(c + rng.normal(scale=rng.uniform(40, 250), size=(rng.integers(3, 300), 2)))
            for c in centres]
    prior = association_log_prior([k.n_reports_ for k in kdes], mode="map")
    index = CellSupportIndex([f"c{i:02d}" for i in range(len(kdes))], kdes, log_prior=prior)
    pts = np.vstack([rng.uniform(-500, 2000, size=(6000, 2)), rng.uniform(-5000, 7000, size=(50, 2))])
    pidx, cidx = index.candidates(pts)
    if ratio == "median":  # each cell's exact-scoring work over its grid's, as `_grid_pays` weighs them
        work = []
        for c in np.unique(cidx).tolist():
            h = float(index.bandwidths_m[c])
            s, b = h / transforms.GRID_STEPS_PER_BANDWIDTH, index.boxes_m[c]
            span = 2 * (index.k_bandwidths * h + s)
            nx, ny = (b[2] - b[0] + span) / s + 2, (b[3] - b[1] + span) / s + 2
            work.append((cidx == c).sum() * len(index.kde(c).positions_) / (nx * ny * (nx + ny)))
        monkeypatch.setattr(transforms, "GRID_WORK_RATIO", float(np.median(work)))
    n_grid = sum(index._grid_pays(c, int((cidx == c).sum())) for c in np.unique(cidx).tolist())
    n_cells = len(np.unique(cidx))
    assert (n_grid == n_cells) if ratio == 0.0 else (n_grid == 0) if ratio == np.inf else (0 < n_grid < n_cells)
    upper, lower = index._grid_bounds(pts, pidx, cidx)
    ref_upper, ref_lower = _grid_bounds_per_cell(index, pts, pidx, cidx)
    assert np.array_equal(upper.view(np.int64), ref_upper.view(np.int64))
    assert np.array_equal(lower.view(np.int64), ref_lower.view(np.int64))


def test_grid_factors_equal_the_dense_evaluation_bit_for_bit():
    # `_gap_factor` evaluates the m distinct values of the Toeplitz factor and gathers them; the
    # grids (hence the bounds and the answer) must be the floats of the dense m x m evaluation.
    from cellsynth.density.transforms import _gap_factor

    rng = np.random.default_rng(3)
    for _ in range(200):
        m, h = int(rng.integers(1, 300)), float(rng.uniform(5.0, 400.0))
        s = h / float(rng.choice([1.0, 2.0, 3.0, 4.5]))
        for widen in (-1, 1):
            gap = np.abs(np.arange(m)[:, None] - np.arange(m)[None, :]) + widen
            dense = np.exp(-(np.maximum(gap, 0) * s) ** 2 / (2 * h * h))
            got = _gap_factor(m, widen, s, h)
            assert got.shape == (m, m) and np.array_equal(got.view(np.int64), dense.view(np.int64))
