"""Measuring at chosen positions (a planned drive) and the scenario's roads."""

from __future__ import annotations

import numpy as np
import pytest

from cellsynth.config import ScenarioConfig, WindowConfig
from cellsynth.scenario import build_world, quantise_rsrp, reports_at, road_segments


def _world(**kw):
    cfg = ScenarioConfig(n_sites=4, area_km=2.0, n_neighbours=2, **kw)
    return build_world(cfg, windows=WindowConfig(), seed=3)


def test_noise_free_reports_are_the_strongest_true_cell():
    world = _world(measurement_noise_db=0.0, hysteresis_noise_db=0.0)
    xy = np.array([[0.0, 0.0], [300.0, -200.0], [-400.0, 500.0]])
    out = reports_at(world, xy, rng=np.random.default_rng(0))
    cand = world.candidates(xy[:, 0], xy[:, 1])
    true = world.link_rsrp_dbm(xy[:, 0], xy[:, 1], cand)
    best = true.argmax(axis=1)
    ids = world.cells["cell_id"].to_numpy()
    assert out["serving_cell_id"].tolist() == ids[cand[np.arange(3), best]].tolist()
    assert out["serving_rsrp_true_dbm"].to_numpy() == pytest.approx(true.max(axis=1))
    assert out["serving_rsrp_dbm"].to_numpy() == pytest.approx(quantise_rsrp(true.max(axis=1)))
    second = np.sort(true, axis=1)[:, -2]
    detected = second >= world.cfg.detection_threshold_dbm
    assert out["neighbour_1_rsrp_dbm"].to_numpy()[detected] == pytest.approx(quantise_rsrp(second[detected]))
    assert out[["x_m", "y_m"]].to_numpy() == pytest.approx(xy)


def test_reports_carry_the_configured_noise():
    world = _world(measurement_noise_db=2.0, hysteresis_noise_db=0.0)
    xy = np.tile([[100.0, 100.0]], (4000, 1))
    out = reports_at(world, xy, rng=np.random.default_rng(1))
    err = out["serving_rsrp_dbm"] - out["serving_rsrp_true_dbm"]
    # max of noisy candidates is biased up a little; its spread is about the noise (plus 1 dB quantisation)
    assert float(err.std()) == pytest.approx(np.sqrt(2.0**2 + 1 / 12), rel=0.15)


def test_road_segments_streets_every_spacing():
    world = _world(n_roads=0)
    x0, x1, y0, y1 = world.density.bounds_m
    roads = road_segments(world, street_spacing_m=500.0)
    n_x = len(np.arange(x0 + 250.0, x1, 500.0))
    n_y = len(np.arange(y0 + 250.0, y1, 500.0))
    assert set(roads["kind"]) == {"street"}
    assert len(roads) == n_x + n_y
    ns = roads[roads["segment_id"].str.startswith("SX")]
    assert ns["y0_m"].to_numpy() == pytest.approx(np.full(n_x, y0))
    assert ns["y1_m"].to_numpy() == pytest.approx(np.full(n_x, y1))


def test_arterials_are_clipped_to_the_area():
    world = _world(n_roads=2)
    x0, x1, y0, y1 = world.density.bounds_m
    art = road_segments(world, street_spacing_m=500.0).query("kind == 'arterial'")
    assert 1 <= len(art) <= 2
    for col, lo, hi in (("x0_m", x0, x1), ("x1_m", x0, x1), ("y0_m", y0, y1), ("y1_m", y0, y1)):
        assert ((art[col] >= lo - 1e-6) & (art[col] <= hi + 1e-6)).all()
