"""radio/raster.py: a cell's posterior raster gives the exact GP's predictions within 0.05 dB at
random points of its footprint (mean and epistemic std; the aleatoric std is untouched), exact
values outside it, survives save / load and `take`, and a raster that fails its check is not kept."""

import numpy as np
import pytest

from cellsynth.radio import calibration as cal
from cellsynth.radio import raster
from cellsynth.radio.geometry import prior_mean
from cellsynth.radio.model import FitSettings, FittedCells


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fitted(uses_load: bool, *, n: int = 400, length_m: float = 60.0, n_cells: int = 1, seed: int = 0) -> FittedCells:
    """Cells as generation meets them: rows where the cell is heard around its site, a
    log-distance field + noise, IPW-like weights, calibrated factors as the radio stage writes them."""
    rng = np.random.default_rng(seed)
    arrays = {k: [] for k in ("origin_xy_m", "azimuth_deg", "ant_on", "beta0", "train_xy_m", "train_y", "train_rho", "train_w")}
    for c in range(n_cells):
        site = np.array([500.0 * c, 100.0])
        pts = site + rng.normal(0, 200, (n, 2))
        d = np.maximum(np.linalg.norm(pts - site, axis=1), 10.0)
        rho = rng.uniform(0.1, 0.9, n)
        y = (-12.0 - 3.0 * (rho - 0.5) if uses_load else -60.0 - 35.0 * np.log10(d / 1000.0)) + rng.normal(0, 4.0, n)
        b0, _ = prior_mean(pts, y, site, 30.0, rho if uses_load else None, None)
        for k, v in (("origin_xy_m", site), ("azimuth_deg", 30.0), ("ant_on", 1.0), ("beta0", b0), ("train_xy_m", pts),
                     ("train_y", y), ("train_rho", rho), ("train_w", rng.uniform(0.5, 1.5, n))):
            arrays[k].append(v)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    arrays.update({"theta": np.tile(np.log([length_m, 6.0, 3.0]), (n_cells, 1)), "scale": np.tile([1.3, 1.1], (n_cells, 1)),
                   "ep_scale": np.full((n_cells, 4), 1.3), "blend_w": np.full((n_cells, 4), 0.2), "blend_support": np.ones(n_cells),
                   "ep_slope": np.full(n_cells, 0.3), "knn_k": np.full(n_cells, 5.0), "cv_mae_db": np.full((n_cells, 2), np.nan),
                   "mask": np.ones((n_cells, n), dtype=bool)})
    if uses_load:
        arrays["blend_w"][:] = 0.0
    return FittedCells([f"c{i}" for i in range(n_cells)], "rsrq" if uses_load else "rsrp", FitSettings(uses_load=uses_load),
                       arrays, np.zeros(n_cells), np.full(n_cells, n))


def _points(fc: FittedCells, m: int, spread_m: float, seed: int = 3):
    rng = np.random.default_rng(seed)
    site = fc.arrays["origin_xy_m"][0]
    return site + rng.normal(0, spread_m, (m, 2)), rng.uniform(0.0, 1.0, m)


@pytest.mark.parametrize("uses_load", [False, True])
def test_raster_matches_exact_within_tolerance(uses_load):
    fc = _fitted(uses_load)
    xy, rho = _points(fc, 3000, 250.0)
    idx = np.zeros(len(xy), dtype=np.int64)
    exact = fc.predict(idx, xy, rho)
    fc.rasters = raster.build_all(fc)
    assert set(fc.rasters) == {0}
    before = dict(raster.STATS)
    got = fc.predict(idx, xy, rho)
    assert raster.STATS["raster_rows"] - before["raster_rows"] >= 0.95 * len(xy)  # the footprint holds the rows
    assert np.abs(got.mean - exact.mean).max() <= raster.TOLERANCE_DB
    # the epistemic std is the latent std times the calibration factor (1.3 e^{0.3 v} here)
    assert np.abs(got.epistemic_std - exact.epistemic_std).max() <= raster.TOLERANCE_DB * 1.3 * np.exp(0.3)
    np.testing.assert_array_equal(got.aleatoric_std, exact.aleatoric_std)
    assert not np.array_equal(got.mean, exact.mean)  # the raster was used, not the exact path


def test_rows_outside_the_raster_are_exact():
    fc = _fitted(False)
    far = fc.arrays["origin_xy_m"][0] + np.array([[3000.0, 0.0], [0.0, -2500.0], [4000.0, 4000.0]])
    idx = np.zeros(len(far), dtype=np.int64)
    exact = fc.predict(idx, far)
    fc.rasters = raster.build_all(fc)
    got = fc.predict(idx, far)
    np.testing.assert_array_equal(got.mean, exact.mean)
    np.testing.assert_array_equal(got.epistemic_std, exact.epistemic_std)


def test_save_load_and_take_keep_the_rasters(tmp_path):
    fc = _fitted(False, n=200, n_cells=2)
    fc.save(tmp_path / "shard=0")
    built = raster.save_for(fc, tmp_path / "shard=0")
    assert set(built) == {0, 1}
    loaded = FittedCells.load(tmp_path / "shard=0")
    assert set(loaded.rasters) == {0, 1}
    xy, _ = _points(fc, 500, 150.0)
    idx = np.zeros(len(xy), dtype=np.int64)
    fc.rasters = built
    np.testing.assert_allclose(loaded.predict(idx, xy).mean, fc.predict(idx, xy).mean, rtol=0, atol=1e-12)
    second = loaded.take([1])
    assert set(second.rasters) == {0}
    xy1 = xy + (fc.arrays["origin_xy_m"][1] - fc.arrays["origin_xy_m"][0])
    np.testing.assert_allclose(second.predict(idx, xy1).epistemic_std, loaded.predict(idx + 1, xy1).epistemic_std, rtol=0, atol=1e-12)
    # models written without rasters load with none
    fc.save(tmp_path / "plain")
    assert FittedCells.load(tmp_path / "plain").rasters == {}


def test_a_raster_that_fails_its_check_is_not_kept(monkeypatch):
    fc = _fitted(False, n=200)
    monkeypatch.setattr(raster, "TOLERANCE_DB", 1e-9)
    before = raster.STATS["refused_check"]
    assert raster.build_all(fc) == {}
    assert raster.STATS["refused_check"] == before + 1


def _reference_kink(r: raster.CellRaster, x, lev, i0, w16):
    """The kink correction as first written (session 7): every pair's 16 nodes as a (pairs, 16, 2)
    array and the Matern terms through `gp.matern` in torch. Kept here as the reference."""
    import math

    import torch
    from scipy.spatial import cKDTree

    from cellsynth.radio import gp

    length, signal2, nu = r.params

    def kappa(d):
        m = lambda z: gp.matern(torch.from_numpy(np.asarray(z, dtype=np.float64)), nu).numpy()  # noqa: E731
        return signal2 * m(d / length) + gp.LONG_RANGE_STD_DB**2 * m(d / gp.LONG_RANGE_LENGTH_M)

    tree = cKDTree(r.train_xy)
    radius = 2.0 * math.sqrt(2.0) * lev.step * (1.0 + 1e-9)
    complete = np.ones(len(x), dtype=bool)
    rows, js, ds = [], [], []
    todo = np.arange(len(x))
    for k in raster.NEAR_ROWS:
        k = min(k, len(r.train_xy))
        dist, idx = tree.query(x[todo], k=k, distance_upper_bound=radius)
        dist, idx = dist.reshape(len(todo), k), idx.reshape(len(todo), k)
        full = np.isfinite(dist[:, -1]) & (k < len(r.train_xy))
        rr, col = np.nonzero(np.isfinite(dist) & ~full[:, None])
        rows.append(todo[rr])
        js.append(idx[rr, col])
        ds.append(dist[rr, col])
        todo = todo[full]
        if not len(todo):
            break
    complete[todo] = False
    rr, j, d = np.concatenate(rows), np.concatenate(js), np.concatenate(ds)
    offs = np.array([(a - 1, c - 1) for a in range(4) for c in range(4)], dtype=np.int64)
    nodes = lev.lo + lev.step * (i0[rr][:, None, :] + offs[None])
    dn = np.sqrt(((nodes - r.train_xy[j][:, None, :]) ** 2).sum(-1) + 1e-9)
    interp = (kappa(dn) * w16[rr]).sum(-1)
    return np.bincount(rr, weights=r.alpha[j] * (kappa(d) - interp), minlength=len(x)), complete


@pytest.mark.parametrize("kernel", ["matern32", "matern52"])  # matern12 cells keep no raster (check)
def test_kink_correction_equals_the_reference_computation(kernel, monkeypatch):
    """The separable, chunked numpy kink correction (issue 15 item 4) gives the reference
    computation's latent mean to float rounding, at rows of a dense cell (1,500 rows, a cluster
    with more than 32 rows within the radius) and around it; the variance is untouched."""
    import dataclasses

    fc = _fitted(False, n=1500, length_m=80.0)
    fc.settings = dataclasses.replace(fc.settings, kernel=kernel)
    rng = np.random.default_rng(11)
    fc.arrays["train_xy_m"][0, :300] = fc.arrays["origin_xy_m"][0] + rng.normal(0, 8.0, (300, 2))  # a dense cluster
    built = raster.build_all(fc)
    assert 0 in built
    r = built[0]
    xy = np.vstack([rng.normal(0, 250, (20_000, 2)), rng.normal(0, 10.0, (2_000, 2))])  # relative to the site
    h = rng.normal(0, 1.0, (len(xy), r.c.shape[0]))
    mean, var, inside = r.latent(xy, h)
    monkeypatch.setattr(raster.CellRaster, "_kink", _reference_kink)
    ref_mean, ref_var, ref_inside = r.latent(xy, h)
    assert (inside == ref_inside).all() and inside.sum() > 15_000
    np.testing.assert_allclose(mean[inside], ref_mean[inside], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(var[inside], ref_var[inside])
    # the correction is not idle here: without it the mean moves by far more than the tolerance
    monkeypatch.setattr(raster.CellRaster, "_kink", lambda self, x, lev, i0, w16: (np.zeros(len(x)), np.ones(len(x), bool)))
    off, _, _ = r.latent(xy, h)
    assert np.nanmax(np.abs(off - ref_mean)[inside]) > 1e-3


def test_stencil_ids_near_pairs_and_weights_equal_the_former_computations():
    """The raster's prediction helpers of issue 15 item 4 give the former values exactly: the
    4 x 4 stencil ids from separable columns and rows == 16 `node_ids` calls (inside, across
    block edges and outside the level), the dual-tree neighbour pairs == the per-row k-d tree
    queries' (distance_upper_bound) pairs and distances, and the numpy Catmull-Rom weights == fastvar's."""
    import math

    import torch
    from scipy.spatial import cKDTree

    from cellsynth.radio import fastvar

    fc = _fitted(False, n=1500, length_m=80.0)
    rng = np.random.default_rng(5)
    fc.arrays["train_xy_m"][0, :300] = fc.arrays["origin_xy_m"][0] + rng.normal(0, 6.0, (300, 2))  # > 256 rows close
    r = raster.build_all(fc)[0]
    x = np.vstack([rng.normal(0, 300, (6_000, 2)), rng.normal(0, 5.0, (500, 2)), rng.uniform(-3000, 3000, (500, 2))])
    for lev in r.levels:
        i0 = np.floor((x - lev.lo) / lev.step).astype(np.int64)
        ref = np.stack([lev.node_ids(i0[:, 0] + k // 4 - 1, i0[:, 1] + k % 4 - 1) for k in range(16)], 1)
        got = lev.stencil_ids(i0)
        np.testing.assert_array_equal(got, ref)
        assert (ref >= 0).all(1).any() and (ref < 0).any()  # both cases met
        radius = 2.0 * math.sqrt(2.0) * lev.step * (1.0 + 1e-9)
        rows, js, ds, count = r._near(x, radius)
        dist, idx = cKDTree(r.train_xy).query(x, k=len(r.train_xy), distance_upper_bound=radius)
        fin = np.isfinite(dist)
        np.testing.assert_array_equal(count, fin.sum(1))
        assert count.max() >= raster.NEAR_ROWS[-1]  # the dense cluster reaches the exact-path limit
        got_pairs = sorted(zip(rows.tolist(), js.tolist(), ds.tolist()))
        ref_r, ref_c = np.nonzero(fin)
        ref_pairs = sorted(zip(ref_r.tolist(), idx[ref_r, ref_c].tolist(), dist[ref_r, ref_c].tolist()))
        assert got_pairs == ref_pairs and len(got_pairs) > 5_000
    t = rng.random(10_000)
    np.testing.assert_array_equal(raster._cubic_weights(t), fastvar._cubic_weights(torch.from_numpy(t)).numpy())


def test_rasters_load_lazily_with_the_saved_arrays(tmp_path):
    """`raster.load` reads a cell's arrays on first access (a generate task owns a share of the
    cells): the arrays equal the file's, a cell not asked for is not read, the mapping pickles
    as a plain dict, and a file rewritten after loading is refused instead of read."""
    import pickle

    from safetensors.numpy import load_file

    fc = _fitted(False, n=200, n_cells=3)
    fc.save(tmp_path / "shard=0")
    raster.save_for(fc, tmp_path / "shard=0")
    lazy = raster.load(tmp_path / "shard=0")
    whole = load_file(str(raster.path_of(tmp_path / "shard=0")) + ".safetensors")
    assert isinstance(lazy, raster.LazyRasters) and sorted(lazy) == [0, 1, 2] and len(lazy) == 3
    assert 1 in lazy and 7 not in lazy and lazy.get(7) is None
    r1 = lazy[1]
    assert list(lazy._cells) == [1]  # only the cell asked for was read
    np.testing.assert_array_equal(r1.alpha, whole["1.alpha"])
    for k, lev in enumerate(r1.levels):
        np.testing.assert_array_equal(lev.fields, whole[f"1.{k}.fields"])
        assert lev.fields.dtype == np.float32
    assert lazy[1] is r1
    plain = pickle.loads(pickle.dumps(lazy))
    assert type(plain) is dict and sorted(plain) == [0, 1, 2]
    np.testing.assert_array_equal(plain[2].levels[0].fields, whole["2.0.fields"])
    lazy2 = raster.load(tmp_path / "shard=0")
    _ = lazy2[0]
    raster.save_for(_fitted(False, n=200, n_cells=3, seed=9), tmp_path / "shard=0")  # rewritten in place
    with pytest.raises(RuntimeError, match="changed after"):
        lazy2[2]


def test_nearest_distance_from_the_raster_tree_equals_the_training_batch_path(monkeypatch):
    """A raster cell without kNN blending takes the distance to its nearest training row from the
    raster's k-d tree instead of building its training batch (`FittedCells.predict`): the same
    predictions bit for bit as through `fastvar.nearest` on the batch (the tree refused)."""
    fc = _fitted(True)  # RSRQ: blend weights 0, four distance bins, so the distance is needed and no kNN
    fc.arrays["ep_scale"] = np.array([[1.1, 1.3, 1.6, 2.0]])
    xy, rho = _points(fc, 2000, 300.0)
    idx = np.zeros(len(xy), dtype=np.int64)
    fc.rasters = raster.build_all(fc)
    via_tree = fc.predict(idx, xy, rho)
    assert fc.rasters[0]._tree is not None and not fc._solved  # the tree was used, no batch solved
    assert fc.rasters[0].tree(len(fc.rasters[0].train_xy) + 1) is None  # other rows: refused
    monkeypatch.setattr(raster.CellRaster, "tree", lambda self, n: None)
    via_batch = fc.predict(idx, xy, rho)
    dmin = fc.rasters[0]._tree.query(xy - fc.arrays["origin_xy_m"][0])[0]
    assert len(np.unique(cal.distance_bin(dmin, fc._dist_edges(0)))) > 1  # the distance picks different factors
    for name in ("mean", "epistemic_std", "aleatoric_std"):
        np.testing.assert_array_equal(getattr(via_tree, name), getattr(via_batch, name))


@pytest.mark.parametrize("uses_load", [False, True])
def test_fields_do_not_depend_on_the_node_chunk(uses_load, monkeypatch):
    """The triangular solve runs NODE_CHUNK nodes at a time; a node's fields are its own column's
    solve, sum and products, so the rasters are the same bit for bit at the former chunk (1,024)
    and the current one, remainder chunk included."""
    fc = _fitted(uses_load)
    now = raster.build_all(fc)
    monkeypatch.setattr(raster, "NODE_CHUNK", raster.TAIL_CHUNK)
    before = raster.build_all(fc)
    assert set(now) == set(before) == {0}
    assert any(len(lev.fields) % raster.TAIL_CHUNK for lev in now[0].levels)  # a remainder chunk is covered
    for a, b in zip(now[0].levels, before[0].levels, strict=True):
        np.testing.assert_array_equal(a.fields, b.fields)
        assert a.check_err_db == b.check_err_db


def test_node_chunks_cover_the_nodes_with_the_former_remainder():
    """256-node chunks over whole 1,024-node blocks, the remainder as the former last chunk (a bench
    level of 7,938 nodes: 28 chunks of 256, then 770 nodes, not a 2-node chunk that MKL rounds
    differently)."""
    assert (raster.NODE_CHUNK, raster.TAIL_CHUNK) == (256, 1024)
    got = raster.node_chunks(7938)
    assert len(got) == 29 and got[:2] == [(0, 256), (256, 512)] and got[-2:] == [(6912, 7168), (7168, 7938)]
    assert raster.node_chunks(2048) == [(k, k + 256) for k in range(0, 2048, 256)]
    assert raster.node_chunks(700) == [(0, 700)]
    assert raster.node_chunks(0) == []
    for n in (1, 255, 1023, 1025, 5022, 13284):
        chunks = raster.node_chunks(n)
        assert chunks[0][0] == 0 and chunks[-1][1] == n and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


def test_a_coarse_level_that_fails_its_check_is_rebuilt_finer(monkeypatch):
    """FAR_RETRY_STEPS_PER_LENGTH: a coarse level failing its check at length / FAR_STEPS_PER_LENGTH is built again
    at the finer step (kept when it passes); with no retry the cell keeps its fine level alone, as before."""
    fc = _fitted(False, n=200)
    real_check = raster.check
    calls = []

    def check(fitted, i, r, level, *, rng, n=raster.CHECK_POINTS):
        calls.append(level.step)
        if len(calls) == 2:  # the first coarse level: fail it
            return (float("inf"), float("inf"))
        return real_check(fitted, i, r, level, rng=rng, n=n)

    monkeypatch.setattr(raster, "check", check)
    length = float(np.exp(fc.arrays["theta"][0, 0]))
    before = raster.STATS["far_retried"]
    r = raster.build(fc, 0)
    assert len(r.levels) == 2 and raster.STATS["far_retried"] == before + 1
    np.testing.assert_allclose(calls[1:], [length / raster.FAR_STEPS_PER_LENGTH, length / raster.FAR_RETRY_STEPS_PER_LENGTH[0]])
    assert r.levels[1].step == calls[2]
    xy, _ = _points(fc, 400, 900.0)
    idx = np.zeros(len(xy), dtype=np.int64)
    exact = fc.predict(idx, xy)
    fc.rasters = {0: r}
    got = fc.predict(idx, xy)
    assert np.abs(got.mean - exact.mean).max() <= raster.TOLERANCE_DB
    # no retry: the coarse level is dropped, as before the ladder
    calls.clear()
    monkeypatch.setattr(raster, "FAR_RETRY_STEPS_PER_LENGTH", ())
    assert len(raster.build(fc, 0).levels) == 1 and len(calls) == 2
