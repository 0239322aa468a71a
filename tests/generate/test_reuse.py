"""Row-level reuse in incremental generation (`cellsynth.generate.reuse`): re-associating only the
positions `may_change` flags gives every position's association under the new KDEs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellsynth.density import GaussianKDE2D
from cellsynth.density.model import DensityModels
from cellsynth.generate import transforms as T
from cellsynth.generate.reuse import unshard_ids

W = "h00_24"


def _kdes(rng: np.random.Generator, moved: dict[str, np.ndarray] | None = None) -> dict[str, GaussianKDE2D]:
    """An 8 x 8 grid of cells 600 m apart, 120 positions each; `moved` replaces some cells' positions."""
    out = {}
    for i in range(64):
        cid = f"c{i:02d}"
        centre = np.array([600.0 * (i % 8), 600.0 * (i // 8)])
        pts = centre + rng.normal(scale=220.0, size=(120, 2))
        if moved and cid in moved:
            pts = moved[cid]
        out[cid] = GaussianKDE2D.from_positions(pts, 60.0 + 5.0 * (i % 3))
    return out


def test_reassociating_the_flagged_positions_gives_the_new_association_everywhere():
    rng = np.random.default_rng(3)
    before = _kdes(np.random.default_rng(0))
    # two cells get a new day: more positions, shifted towards a neighbour, another bandwidth
    moved = {c: np.vstack([before[c].positions_, before[c].positions_[:60] + [250.0, 120.0]]) for c in ("c18", "c45")}
    after = _kdes(np.random.default_rng(0), moved)
    after = {c: (GaussianKDE2D.from_positions(k.positions_, 90.0) if c in moved else k) for c, k in after.items()}
    old = DensityModels.from_kdes({W: before}, association="map")
    new = DensityModels.from_kdes({W: after}, association="map")
    xy = rng.uniform(-400.0, 4600.0, size=(8000, 2))
    serving = old.associate(W, xy)
    truth = new.associate(W, xy)
    flagged = new.may_change(W, xy, serving, np.array(sorted(moved), dtype=object))
    again = serving.copy()
    again[flagged] = new.associate(W, xy[flagged])
    np.testing.assert_array_equal(again, truth)
    moved_rows = serving != truth
    assert moved_rows.sum() > 20  # the change really moved positions between cells
    assert flagged[moved_rows].all()
    assert 0.05 < flagged.mean() < 0.6  # and not every position had to be redone (0.43 here)
    # nothing changed: nothing flagged apart from positions no candidate is sure to win
    none = old.may_change(W, xy, serving, np.array([], dtype=object))
    assert none.mean() < 0.02


def test_reassociate_gives_associates_answers_scoring_fewer_pairs():
    """`DensityModels.reassociate` (the old cell against the changed candidates, the full rule where the old cell
    changed) gives `associate`'s answer at every position, including positions served by a changed cell, ones
    no candidate covers and an unknown old cell; it scores fewer pairs than re-associating the flagged positions."""
    rng = np.random.default_rng(4)
    before = _kdes(np.random.default_rng(0))
    moved = {c: np.vstack([before[c].positions_, before[c].positions_[:60] + [250.0, 120.0]]) for c in ("c18", "c45", "c46")}
    after = _kdes(np.random.default_rng(0), moved)
    after = {c: (GaussianKDE2D.from_positions(k.positions_, 90.0) if c in moved else k) for c, k in after.items()}
    old = DensityModels.from_kdes({W: before}, association="map")
    new = DensityModels.from_kdes({W: after}, association="map")
    xy = rng.uniform(-1500.0, 5500.0, size=(8000, 2))  # some far outside every box: the bounded fallback
    serving = old.associate(W, xy)
    serving[:5] = "gone"  # an old cell the index no longer has: the full rule
    truth = new.associate(W, xy)
    changed = np.array(sorted(moved), dtype=object)
    index = new._association_index(W, new.association)
    scored = []
    orig = index._scores
    index._scores = lambda xy_, p, c: (scored.append(len(p)), orig(xy_, p, c))[1]
    got = new.reassociate(W, xy, serving, changed)
    np.testing.assert_array_equal(got, truth)
    assert (serving != truth).sum() > 20 and np.isin(serving, changed).sum() > 100
    n_new = sum(scored)
    scored.clear()
    flagged = new.may_change(W, xy, serving, changed)
    scored.clear()
    new.associate(W, xy[flagged])
    assert n_new < 0.9 * sum(scored)  # 0.86 here; ~1/3 on a 10^3-cell window (issue 15 note)


def test_unshard_ids_undo_the_shard_that_shard_groups_puts_in():
    pos = pd.DataFrame({"sample_id": [f"syn-{W}-0003-{i:08d}" for i in range(40)], "window": W,
                        "x_m": np.arange(40.0), "y_m": np.zeros(40), "serving_cell_id": [f"c{i % 7}" for i in range(40)]})
    groups = T.shard_groups(pos, 4)
    back = pd.concat([unshard_ids(g["sample_id"], W) for g in groups.values()])
    assert sorted(back) == sorted(pos["sample_id"])
    assert all(g["sample_id"].str.startswith(f"syn-{W}-{s:04d}-0003-").all() for s, g in groups.items())


def test_ray_reassociation_by_strips_equals_the_driver_s(ray_session, monkeypatch):
    """Incremental generate re-associates reused positions in Ray tasks over strips of the area
    (`stage._ray_reassociate`); every position's answer is its own, so the strips give the same
    serving cells as one pass on the driver, for every window."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from cellsynth.generate import stage
    from cellsynth.generate.reuse import WindowReuse, reassociate

    rng = np.random.default_rng(5)
    before = _kdes(np.random.default_rng(0))
    moved = {c: np.vstack([before[c].positions_, before[c].positions_[:60] + [250.0, 120.0]]) for c in ("c18", "c45")}
    after = {c: (GaussianKDE2D.from_positions(k.positions_, 90.0) if c in moved else k)
             for c, k in _kdes(np.random.default_rng(0), moved).items()}
    old = DensityModels.from_kdes({W: before, "h24_48": before}, association="map")
    new = DensityModels.from_kdes({W: after, "h24_48": after}, association="map")
    olds, reuse = {}, {}
    for w in (W, "h24_48"):
        xy = rng.uniform(-400.0, 4600.0, size=(3000, 2))
        olds[w] = pd.DataFrame({"x_m": xy[:, 0], "y_m": xy[:, 1], "serving_cell_id": old.associate(w, xy)})
        reuse[w] = WindowReuse(w, 1.0, set(moved), set(moved))
    monkeypatch.setattr(stage, "REASSOCIATE_ROWS_PER_TASK", 700)  # 5 strips a window
    quiet = SimpleNamespace(progress=lambda *a, **k: nullcontext(lambda n: None))  # a runtime without bars
    got = stage._ray_reassociate(ray_session, new, reuse, olds, retries=0, rt=quiet)
    for w, frame in olds.items():
        want = reassociate(new, w, reuse[w].kde_cells, frame[["x_m", "y_m"]].to_numpy(), frame["serving_cell_id"].to_numpy(dtype=object))
        np.testing.assert_array_equal(got[w], want)
        assert (want != frame["serving_cell_id"].to_numpy()).sum() > 5  # some positions really moved
