"""A per-cell forest as a third component of the mean's stack (stacking.TREE_STACK, rule T; off by default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsynth.radio import stacking as stk
from cellsynth.radio.model import CellData, FitSettings, FittedCells, fit_cells


def _cells(field: str, n_cells: int = 3, n: int = 240, seed: int = 5) -> list[CellData]:
    """Cells over a physical mean plus `field`: "steps" (6 dB street-like bands, a tree's shape) or "noise" (none:
    only iid 2 dB noise, nothing for a forest to find); the second cell carries row weights."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_cells):
        xy = rng.uniform(0.0, 900.0, (n, 2))
        d = np.maximum(np.linalg.norm(xy - np.array([200.0, 300.0]), axis=1), 10.0)
        extra = 6.0 * (np.floor(xy[:, 0] / 120.0 + c / 3) % 2) if field == "steps" else 0.0
        y = -60.0 - 30.0 * np.log10(d / 1000.0) + extra + rng.normal(0.0, 2.0, n)
        rw = rng.integers(1, 6, n).astype(float) if c == 1 else None
        out.append(CellData(f"c{c}", xy, y, row_weight=rw))
    return out


def _fit(monkeypatch, cells, on: bool, **consts) -> FittedCells:
    """Fit with TREE_STACK = on; TREE_FADE off (rule T's forest) unless given."""
    monkeypatch.setattr(stk, "TREE_STACK", on)
    monkeypatch.setattr(stk, "TREE_FADE", False)
    for k, v in consts.items():
        monkeypatch.setattr(stk, k, v)
    return fit_cells(cells, target="rsrp", settings=FitSettings(), seed=3)


def test_blend_weight_tree_picks_the_component_with_the_lower_held_out_error():
    rng = np.random.default_rng(0)
    e_gp, e_knn = rng.normal(0, 3.0, 3000), rng.normal(0, 3.0, 3000)
    s = np.ones(3000)
    # the forest's held-out error far below the others: all weight on it
    assert stk.blend_weight_tree([(e_gp, e_knn, 0.1 * e_gp, s)]) == (0.0, 1.0)
    # the forest's error worse than the GP's, the kNN's better: no forest
    w0, wt = stk.blend_weight_tree([(e_gp, 0.2 * e_gp, 3.0 * e_gp, s)])
    assert wt == 0.0 and w0 == pytest.approx(1.0)
    # w0 + wt <= 1 on every answer; too few rows: (0, 0)
    w0, wt = stk.blend_weight_tree([(e_gp, 0.5 * e_gp + e_knn * 0.1, 0.5 * e_gp - e_knn * 0.1, s)])
    assert w0 + wt <= 1.0 + 1e-9 and w0 > 0.2 and wt > 0.2
    assert stk.blend_weight_tree([(e_gp[:10], e_knn[:10], e_gp[:10], s[:10])]) == (0.0, 0.0)
    # with the forest's grid at 0 it is blend_weight
    sets = [(e_gp, 0.6 * e_gp + 0.4 * e_knn, e_knn, s, rng.uniform(1, 3, 3000))]
    old = stk.TREE_W_GRID
    try:
        stk.TREE_W_GRID = (0.0,)
        assert stk.blend_weight_tree(sets)[0] == stk.blend_weight([(st[0], st[1], st[3], st[4]) for st in sets])
    finally:
        stk.TREE_W_GRID = old


def test_forest_weight_zero_is_the_default_bit_for_bit(monkeypatch):
    """TREE_STACK on with the forest's weight grid (0,): every fitted array and every prediction equal the default's."""
    cells = _cells("steps")
    base = _fit(monkeypatch, cells, False)
    zero = _fit(monkeypatch, cells, True, TREE_W_GRID=(0.0,))
    assert set(zero.arrays) == set(base.arrays) | {"tree_w", "tree_seed"}
    for k, v in base.arrays.items():
        np.testing.assert_array_equal(zero.arrays[k], v, err_msg=k)
    assert np.all(zero.arrays["tree_w"] == 0.0)
    q = np.random.default_rng(1).uniform(-100.0, 1000.0, (300, 2))
    ci = np.arange(300) % 3
    a, b = base.predict(ci, q), zero.predict(ci, q)
    for f in ("mean", "epistemic_std", "aleatoric_std"):
        np.testing.assert_array_equal(getattr(b, f), getattr(a, f))


def test_forest_weight_from_held_out_errors(monkeypatch, tmp_path):
    """Bands a forest fits: weight on the forest, a lower error against the noise-free field; iid noise only: an
    in-sample forest would still fit the noise, held out it loses, so its weight stays small. A saved and reloaded
    model loads its forests and predicts the same, bit for bit; so does one saved without them (weights written
    before forests were saved), which refits them from its stored rows and seeds."""
    cells = _cells("steps")
    base = _fit(monkeypatch, cells, False)
    tree = _fit(monkeypatch, cells, True)
    assert tree.arrays["tree_w"][0] >= 0.5
    assert np.all(tree.arrays["tree_w"] == tree.arrays["tree_w"][0])  # one weight per shard
    q = np.random.default_rng(2).uniform(0.0, 900.0, (600, 2))
    ci = np.arange(600) % 3
    truth = (-60.0 - 30.0 * np.log10(np.maximum(np.linalg.norm(q - np.array([200.0, 300.0]), axis=1), 10.0) / 1000.0)
             + 6.0 * (np.floor(q[:, 0] / 120.0 + ci / 3) % 2))
    p_base, p_tree = base.predict(ci, q), tree.predict(ci, q)
    assert np.mean(np.abs(p_tree.mean - truth)) < 0.85 * np.mean(np.abs(p_base.mean - truth))
    # the forest changes the mean only: the epistemic std is the GP's latent std times factors fitted as before
    assert np.all(p_tree.epistemic_std > 0) and np.all(np.isfinite(p_tree.aleatoric_std))
    tree.save(tmp_path / "m")
    again = FittedCells.load(tmp_path / "m")
    assert sorted(again._stored_forests) == [0, 1, 2]
    fit = stk.CellForest.__init__
    monkeypatch.setattr(stk.CellForest, "__init__", lambda *a, **k: pytest.fail("refitted a stored forest"))
    p_again = again.predict(ci, q)
    monkeypatch.setattr(stk.CellForest, "__init__", fit)
    for f in ("mean", "epistemic_std", "aleatoric_std"):
        np.testing.assert_array_equal(getattr(p_again, f), getattr(p_tree, f))
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "m.safetensors"))
    assert {"f.cells", "f.left", "f.threshold"} <= set(t)
    save_file({k: v for k, v in t.items() if not k.startswith("f.")}, str(tmp_path / "m.safetensors"))
    old = FittedCells.load(tmp_path / "m")
    assert not old._forests
    p_old = old.predict(ci, q)
    assert sorted(old._forests) == [0, 1, 2]  # refitted on first use
    np.testing.assert_array_equal(p_old.mean, p_tree.mean)
    noise = _fit(monkeypatch, _cells("noise"), True)
    assert noise.arrays["tree_w"][0] <= 0.2


def test_fold_forests_never_see_their_fold(monkeypatch):
    """Every forest fitted inside the CV is fitted on rows of its fold's training side only: recorded per fit,
    no forest's rows contain a row the same call then predicts as held out."""
    fits = []
    real = stk.CellForest

    class Recording(real):
        def __init__(self, xy_rel, r, w, seed):
            fits.append(np.asarray(xy_rel, dtype=float).copy())
            super().__init__(xy_rel, r, w, seed)

        def predict(self, xy_rel):
            held = np.asarray(xy_rel, dtype=float)
            train = fits[-1] if self is last[0] else None
            if train is not None and len(held):
                d = np.min(np.linalg.norm(held[:, None, :] - train[None, :, :], axis=-1), axis=1)
                crossed.append(int(np.sum(d < 1e-9)))
            return super().predict(xy_rel)

    last, crossed = [None], []
    orig_init = Recording.__init__

    def init(self, *a):
        orig_init(self, *a)
        last[0] = self

    monkeypatch.setattr(Recording, "__init__", init)
    monkeypatch.setattr(stk, "CellForest", Recording)
    _fit(monkeypatch, _cells("steps", n_cells=2, n=150), True)
    # 2 cells x (3 block folds + 3 random folds) fold forests predicted held-out rows, none of them its own rows
    assert len(crossed) >= 2 * 5 and sum(crossed) == 0


# Rule T' (stacking.TREE_FADE): the forest's term faded by f(d) = exp(-(d / 15 m)^2), forests only from 100 rows.


def test_tree_fade_is_a_gaussian_of_the_nearest_row_distance():
    assert stk.TREE_FADE_M == 15.0
    d = np.array([0.0, 7.5, 15.0, 30.0, 60.0])
    np.testing.assert_allclose(stk.tree_fade(d), [1.0, np.exp(-0.25), np.exp(-1.0), np.exp(-4.0), np.exp(-16.0)], rtol=1e-12)
    np.testing.assert_allclose(stk.tree_fade(d, 30.0), [1.0, np.exp(-1 / 16), np.exp(-0.25), np.exp(-1.0), np.exp(-4.0)], rtol=1e-12)
    assert stk.tree_fade(1e9) == 0.0


def test_tree_gate_only_under_fade(monkeypatch):
    monkeypatch.setattr(stk, "TREE_FADE", False)
    assert stk.tree_gate(5)
    monkeypatch.setattr(stk, "TREE_FADE", True)
    assert stk.TREE_MIN_ROWS == 100 and not stk.tree_gate(99) and stk.tree_gate(100)


def test_fade_weight_zero_is_the_default_bit_for_bit(monkeypatch):
    """TREE_STACK and TREE_FADE on with the forest's weight grid (0,): every fitted array and prediction equal the
    default's (a cell below 100 rows in the shard too)."""
    small = _cells("steps", n_cells=1, n=80, seed=9)[0]
    cells = _cells("steps")[:2] + [CellData("small", small.xy_m, small.y)]
    base = _fit(monkeypatch, cells, False)
    zero = _fit(monkeypatch, cells, True, TREE_FADE=True, TREE_W_GRID=(0.0,))
    assert set(zero.arrays) == set(base.arrays) | {"tree_w", "tree_seed", "tree_fade_m"}
    for k, v in base.arrays.items():
        np.testing.assert_array_equal(zero.arrays[k], v, err_msg=k)
    q = np.random.default_rng(1).uniform(-100.0, 1000.0, (300, 2))
    ci = np.arange(300) % 3
    a, b = base.predict(ci, q), zero.predict(ci, q)
    for f in ("mean", "epistemic_std", "aleatoric_std"):
        np.testing.assert_array_equal(getattr(b, f), getattr(a, f))


def test_fade_gate_fits_no_forest_for_a_small_cell(monkeypatch):
    """Under T' a cell with < 100 rows adds no forest anywhere (full fit and folds), gets weight 0 and never refits
    one at prediction; under T it would."""
    built = []
    real = stk.CellForest

    class Counting(real):
        def __init__(self, *a):
            built.append(1)
            super().__init__(*a)

    monkeypatch.setattr(stk, "CellForest", Counting)
    big = _cells("steps", n_cells=2)
    small = _cells("steps", n_cells=1, n=80, seed=9)[0]
    small = CellData("small", small.xy_m, small.y)

    def n_forests(cells, fade):
        built.clear()
        m = _fit(monkeypatch, cells, True, TREE_FADE=fade)
        return len(built), m

    n_big, _ = n_forests(big, True)
    n_all, m = n_forests(big + [small], True)
    n_all_t, _ = n_forests(big + [small], False)
    assert n_big > 0 and n_all == n_big and n_all_t > n_big
    assert m.arrays["tree_w"][2] == 0.0 and m.arrays["tree_w"][0] > 0.0
    np.testing.assert_array_equal(m.arrays["tree_fade_m"], 15.0)
    m._forests.clear()
    q = np.random.default_rng(4).uniform(0.0, 900.0, (90, 2))
    m.predict(np.arange(90) % 3, q)
    assert sorted(m._forests) == [0, 1]


def test_fade_scales_the_forest_term_by_the_nearest_row_distance(monkeypatch):
    """Prediction: (faded mean - mean without the forest) = f(d) x (unfaded mean - mean without the forest), d the
    distance to the cell's nearest training row: the full term at a training row, ~nothing beyond ~60 m."""
    from scipy.spatial import cKDTree

    cells = _cells("steps", n_cells=2)
    m = _fit(monkeypatch, cells, True, TREE_FADE=True)
    assert np.all(m.arrays["tree_w"] > 0.0)
    off = FittedCells(m.cell_ids, m.target, m.settings, {**m.arrays, "tree_w": np.zeros(2)}, m.elbo, m.n_train)
    unfaded = FittedCells(m.cell_ids, m.target, m.settings, {k: v for k, v in m.arrays.items() if k != "tree_fade_m"},
                          m.elbo, m.n_train)
    rng = np.random.default_rng(6)
    q = np.vstack([cells[0].xy_m[:50] + rng.normal(0.0, 10.0, (50, 2)), rng.uniform(-300.0, 1200.0, (150, 2))])
    ci = np.zeros(len(q), dtype=np.int64)
    d = cKDTree(cells[0].xy_m).query(q, k=1)[0]
    p, p0, p1 = m.predict(ci, q).mean, off.predict(ci, q).mean, unfaded.predict(ci, q).mean
    np.testing.assert_allclose(p - p0, stk.tree_fade(d) * (p1 - p0), atol=1e-9)
    assert np.max(np.abs(p1 - p0)[d < 5.0]) > 0.3


def test_forest_node_walk_is_sklearns_prediction():
    """CellForest keeps only its trees' node arrays and walks them itself: the same values, bit for bit, as the
    mean of sklearn's own tree predictions with the same bootstrap draws, at rows on and off the training rows,
    and again after to_arrays / from_arrays (how the weights file stores it)."""
    from sklearn.tree import DecisionTreeRegressor

    rng = np.random.default_rng(3)
    xy = rng.uniform(-900.0, 900.0, (400, 2))
    r = 4.0 * np.sin(xy[:, 0] / 150.0) + rng.normal(0.0, 1.0, 400)
    w = rng.uniform(0.5, 1.5, 400)
    forest = stk.CellForest(xy, r, w, seed=11)
    q = np.concatenate([xy[:50], rng.uniform(-2000.0, 2000.0, (300, 2))])
    draw, x, trees = np.random.default_rng(11), stk.tree_features(xy), []
    for _ in range(stk.TREE_TREES):  # the bagging of CellForest.__init__, kept as sklearn estimators
        counts = np.bincount(draw.integers(0, 400, 400), minlength=400).astype(float)
        tree = DecisionTreeRegressor(min_samples_leaf=stk.TREE_MIN_LEAF, random_state=int(draw.integers(2**31 - 1)))
        trees.append(tree.fit(x, r[:, None], sample_weight=counts * w))
    ref = np.mean([t.predict(stk.tree_features(q)) for t in trees], axis=0)
    np.testing.assert_array_equal(forest.predict(q), ref)
    again = stk.CellForest.from_arrays(forest.to_arrays())
    np.testing.assert_array_equal(again.predict(q), ref)
    assert forest.predict(np.zeros((0, 2))).shape == (0,)
