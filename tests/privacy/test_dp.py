"""The epsilon-DP mode (issue 16, parts 3 and 5): budget, DP density, the stage hooks end to end on
a small lake, and the one-line errors for bad input (the radio mechanism: test_dp_stats.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.errors import ConfigError
from cellsynth.privacy import dp, dp_stats
from cellsynth.privacy.dp_stage import load_radio as dp_stage_load_radio
from cellsynth.privacy.dp_stage import run_density_dp, run_radio_dp, spent

SITES = {"A": (0.0, 0.0, 0.0), "B": (1500.0, 0.0, 120.0), "C": (700.0, 1300.0, 240.0)}  # x, y, azimuth


def _rsrp(cell: str, xy: np.ndarray) -> np.ndarray:
    sx, sy, az = SITES[cell]
    d = xy - np.array([sx, sy])
    dist = np.maximum(np.hypot(d[:, 0], d[:, 1]), 10.0)
    return -95.0 - 35.0 * np.log10(dist / 1000.0) + dp_stats._antenna_db(d[:, 0], d[:, 1], np.full(len(d), az))


def _world(n_users: int = 400, per_user: int = 12, seed: int = 0, with_ue: bool = True):
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    home = rng.uniform([-300, -300], [1800, 1600], (n_users, 2))
    ue = np.repeat(np.arange(n_users), per_user)
    xy = home[ue] + rng.normal(0, 80, (n, 2))
    ids = np.array(sorted(SITES), dtype=object)
    rsrp = np.stack([_rsrp(c, xy) for c in ids], axis=1) + rng.normal(0, 2.0, (n, 3))
    load = rng.uniform(0.1, 0.9, n)
    serving = ids[rsrp.argmax(axis=1)]
    ts = pd.Timestamp("2026-01-05T08:00:00Z")
    rid = np.array([f"r{i:05d}" for i in range(n)], dtype=object)
    shard = {c: i % 2 for i, c in enumerate(ids)}
    reports = pd.DataFrame({
        "report_id": rid, "ue_id": [f"u{u}" for u in ue] if with_ue else None, "ts": ts,
        "window": np.where(rng.random(n) < 0.5, "h06_12", "h12_18"), "x_m": xy[:, 0], "y_m": xy[:, 1],
        "serving_cell_id": serving, "rsrp_dbm": rsrp.max(axis=1).round(), "rsrq_db": (-8.0 - 6.0 * load).round(1),
        "load_rho": load, "cell_shard": [shard[c] for c in serving], "ingest_run_id": "i",
    })
    meas = []
    for j, c in enumerate(ids):
        meas.append(pd.DataFrame({
            "report_id": rid, "ts": ts, "window": reports["window"], "cell_id": c,
            "role": np.where(serving == c, "serving", "neighbour"), "rank": np.where(serving == c, 0, 1),
            "rsrp_dbm": rsrp[:, j].round(), "rsrq_db": np.where(serving == c, reports["rsrq_db"], np.nan),
            "x_m": xy[:, 0], "y_m": xy[:, 1], "load_rho": load, "cell_shard": shard[c],
        }))
    cells = pd.DataFrame({
        "cell_id": ids, "site_id": ids, "x_m": [SITES[c][0] for c in ids], "y_m": [SITES[c][1] for c in ids],
        "lat": 44.0, "lon": 11.0, "azimuth_deg": [SITES[c][2] for c in ids], "height_m": 30.0, "tx_power_dbm": 43.0,
        "freq_mhz": 1800.0, "location_estimated": False, "cell_shard": [shard[c] for c in ids],
        "frame_lat0": 44.0, "frame_lon0": 11.0,
    })
    return reports, pd.concat(meas, ignore_index=True), cells


def _lake(tmp_path, *, with_ue=True, **privacy):
    cfg = make_config(tmp_path, privacy={"mode": "dp", **privacy},
                      generate={"use_ray": False, "n_neighbours": 2},
                      evaluate={"baselines": [], "field_grid_px": 8})
    rt = local_runtime(tmp_path, cfg)
    reports, meas, cells = _world(with_ue=with_ue)
    rt.lake.write("mdt_reports", reports)
    rt.lake.write("mdt_measurements", meas)
    rt.lake.write("cells", cells)
    return cfg, rt


def test_bad_input_fails_with_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"privacy\.epsilon: Input should be greater than 0"):
        make_config(tmp_path, privacy={"mode": "dp", "epsilon": 0})
    with pytest.raises(ConfigError, match=r"privacy\.epsilon: Input should be greater than 0"):
        make_config(tmp_path, privacy={"epsilon": -1.0})
    cfg, rt = _lake(tmp_path, delta=0.01)  # 400 users: 1/n = 0.0025
    with pytest.raises(ConfigError, match=r"^privacy\.delta: expected < 1/n_users = 1/\d+ = 0\.00\d+, got 0\.01$"):
        run_density_dp(cfg, rt, run_id="r1")
    cfg, rt = _lake(tmp_path / "no_ue", with_ue=False)
    with pytest.raises(ConfigError, match=r"^privacy\.mode: dp needs a ue_id per report"):
        run_radio_dp(cfg, rt, run_id="r1")


def test_cell_positions_estimated_from_the_reports_are_not_taken_as_public(tmp_path):
    """The dp mode treats the cells table as public; positions ingest estimated from the private reports
    (no cells source) would be released by every synthetic row without noise: refused, at load where the
    config says so, and by the stages on a lake that holds them."""
    src = {"mdt": {"path": str(tmp_path / "mdt.csv"), "format": "csv"}}
    with pytest.raises(ConfigError, match=r"^privacy\.mode: dp treats the cells table as public, but without sources\.cells"):
        make_config(tmp_path, scenario={"enabled": False}, sources=src, privacy={"mode": "dp"})
    make_config(tmp_path, scenario={"enabled": False}, sources=src)  # off: fine
    make_config(tmp_path, scenario={"enabled": False}, privacy={"mode": "dp"},
                sources={**src, "cells": {"path": str(tmp_path / "cells.csv"), "format": "csv"}})
    cfg, rt = _lake(tmp_path)
    cells = rt.lake.read_pandas("cells")
    cells.loc[cells["cell_id"] == "B", "location_estimated"] = True
    rt.lake.write("cells", cells, mode="overwrite")
    for stage in (run_density_dp, run_radio_dp):
        with pytest.raises(ConfigError, match=r"^privacy\.mode: dp treats the cells table as public, but 1 of 3 cells"):
            stage(cfg, rt, run_id="r1")


def test_contribution_bounding_keeps_at_most_l_rows_per_user():
    frame = pd.DataFrame({"ue_id": ["a"] * 10 + ["b"] * 2, "v": np.arange(12)})
    kept = dp.bound_per_user(frame, 3, seed=0)
    assert kept.groupby("ue_id").size().to_dict() == {"a": 3, "b": 2}


def test_dp_density_noise_scale_and_large_epsilon_shape(tmp_path):
    reports, _, cells = _world()
    bbox = dp.public_bbox(cells)
    dens = dp.DPPositionDensity(grid_m=200.0).fit(reports, bbox=bbox, epsilon=4.0, max_reports_per_ue=8, seed=0)
    assert dens.noise_scale_ == pytest.approx(8 / (4.0 * (1 - dp.COUNT_EPSILON_SHARE)))
    # Per-window report counts: every user's 12 reports count (cap 2 L = 16), Laplace scale 16 / 0.4 = 40.
    for w, n in dens.n_reports_.items():
        assert n == pytest.approx((reports["window"] == w).sum(), abs=300)
    big = dp.DPPositionDensity(grid_m=200.0).fit(reports, bbox=bbox, epsilon=1e6, max_reports_per_ue=12, seed=0)
    xy = big.sample_positions("h06_12", 4000, rng=1)
    real = reports.loc[reports["window"] == "h06_12", ["x_m", "y_m"]].to_numpy()
    from scipy.stats import ks_2samp

    assert ks_2samp(xy[:, 0], real[:, 0]).statistic < 0.05 and ks_2samp(xy[:, 1], real[:, 1]).statistic < 0.05
    assert dp.DPPositionDensity.from_json(big.to_json()).n_reports_ == big.n_reports_


def test_position_pooling_is_post_processing_of_the_same_release():
    """The pooling options read the same noisy histograms (same seed, same noise draws, same counts):
    "shared" gives every window one shape, "shared_ratio" keeps each window's coarse difference."""
    from scipy.stats import ks_2samp

    reports, _, cells = _world()
    # Window h12_18 keeps only its eastern reports: a large-scale difference "shared" loses and
    # "shared_ratio" keeps.
    reports = reports[(reports["window"] != "h12_18") | (reports["x_m"] > 700.0)]
    bbox = dp.public_bbox(cells)
    fits = {p: dp.DPPositionDensity(grid_m=200.0, pooling=p).fit(reports, bbox=bbox, epsilon=2.0,
                                                                 max_reports_per_ue=8, seed=0)
            for p in ("window", "shared", "shared_ratio")}
    assert fits["window"].n_reports_ == fits["shared"].n_reports_ == fits["shared_ratio"].n_reports_
    assert np.array_equal(fits["shared"].probs_["h06_12"], fits["shared"].probs_["h12_18"])
    back = dp.DPPositionDensity.from_json(fits["shared_ratio"].to_json())
    assert back.pooling == "shared_ratio"
    big = {p: dp.DPPositionDensity(grid_m=200.0, pooling=p).fit(reports, bbox=bbox, epsilon=1e6,
                                                                max_reports_per_ue=12, seed=0)
           for p in ("window", "shared", "shared_ratio")}
    east = reports.loc[reports["window"] == "h12_18", "x_m"].to_numpy()
    ks = {p: ks_2samp(d.sample_positions("h12_18", 4000, rng=1)[:, 0], east).statistic for p, d in big.items()}
    # Own histogram: the window's shape (its sharp edge smoothed); one shared shape loses the
    # difference; the coarse ratio (600 m) recovers part of it.
    assert ks["window"] < 0.08 and ks["shared"] > 0.2 and ks["shared_ratio"] < ks["shared"] - 0.03
    with pytest.raises(ValueError, match="position pooling"):
        dp.DPPositionDensity(pooling="nope").fit(reports, bbox=bbox, epsilon=1.0, max_reports_per_ue=8, seed=0)


@pytest.mark.parametrize(("shape_on", "offset_on"), [(False, False), (True, False), (False, True)])
def test_dp_mode_end_to_end_on_a_small_lake(tmp_path, monkeypatch, shape_on, offset_on):
    from cellsynth.evaluate import stage as evaluate_stage
    from cellsynth.generate import stage as generate_stage

    monkeypatch.setattr(dp_stats, "SHAPE_ON", shape_on)  # release D (RSRP) through the stages
    monkeypatch.setattr(dp_stats, "OFFSET_ON", offset_on)  # release A as pooled line + per-cell offsets (RSRP)
    cfg, rt = _lake(tmp_path, epsilon=8.0)
    dens = run_density_dp(cfg, rt, run_id="r1")
    radio = run_radio_dp(cfg, rt, run_id="r1")
    assert "epsilon 1.6 spent on positions" in dens.note
    assert "dp: radio epsilon 6.4 at delta 1e-06: one Gaussian mechanism" in radio.note
    assert "rsrp (multiplier" in radio.note and "rsrq (multiplier" in radio.note
    assert "0.25 share (in 1/z^2) for which cells are heard where" in radio.note
    assert ("0.25 for a shape shared by every cell" in radio.note) == shape_on
    models = dp_stage_load_radio(rt.lake)
    assert models.detection is not None  # release C reaches generate
    assert (models.targets["rsrp"].shape is not None) == shape_on and models.targets["rsrq"].shape is None
    assert (models.targets["rsrp"].offset_noise_std > 0) == offset_on and models.targets["rsrq"].offset_noise_std == 0
    assert ("per-cell offsets" in radio.note) == offset_on
    # RSRP and RSRQ share the stage's composed multiplier in proportion 0.5 : 0.3 of 1/z^2.
    z = dp_stats.noise_multiplier(6.4, 1e-6)
    z_t = {t: models.targets[t].noise_multiplier for t in ("rsrp", "rsrq")}
    assert 1 / z_t["rsrp"] ** 2 + 1 / z_t["rsrq"] ** 2 == pytest.approx(1 / z**2)
    assert z_t["rsrq"] ** 2 / z_t["rsrp"] ** 2 == pytest.approx(0.5 / 0.3)
    gen = generate_stage.run(cfg, rt, run_id="r1")
    assert "dp: total epsilon 8 (positions 1.6, radio 6.4), delta 1e-06" in gen.note
    assert spent(rt.lake) == pytest.approx({"positions": 1.6, "radio": 6.4, "total": 8.0})
    syn = rt.lake.read_pandas("synthetic_mdt")
    assert len(syn) == gen.rows_written["synthetic_mdt"] > 1000
    # The serving cell is the DP model's strongest: its RSRP is never below a listed neighbour's.
    assert (syn["neighbour_1_rsrp_dbm"].isna() | (syn["neighbour_1_rsrp_dbm"] <= syn["rsrp_dbm"] + 3 * 8)).all()
    res = evaluate_stage.run(cfg, rt, run_id="r1")
    ev = rt.lake.read_pandas("metrics")
    eps = ev[ev["metric"] == "privacy_epsilon_spent"].set_index("model")["value"]
    assert eps["total"] == pytest.approx(8.0)
    # The DP radio model, not a memorised one: a 2 dB-noise world is learnt to a few dB.
    mae = ev[(ev["metric"] == "rsrp_mae_dbm") & (ev["model"] == "bnn")]["value"].iloc[0]
    assert 1.5 < mae < 6.0
    assert res.metrics["privacy_mia_auc"] < 0.6


def test_yaml_off_means_off_and_other_modes_fail_naming_the_key(tmp_path):
    from cellsynth.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("privacy: {mode: off, epsilon: 4}\n")  # YAML 1.1 reads bare off as False
    assert load_config(path).privacy.mode == "off"
    assert load_config(None, ["privacy.mode=dp"]).privacy.mode == "dp"
    with pytest.raises(ConfigError, match=r"privacy\.mode: Input should be 'off' or 'dp'"):
        load_config(None, ["privacy.mode=strict"])
    with pytest.raises(ConfigError, match=r"privacy\.epsilon_split: expected three shares summing to 1"):
        load_config(None, ["privacy.epsilon_split=[0.5,0.5,0.5]"])


def test_dp_noise_is_secret_unless_a_noise_seed_is_set(tmp_path):
    """Noise drawn from run.seed (in the config, 42 by default) could be regenerated and subtracted:
    by default each run draws fresh entropy; `privacy.noise_seed` makes a bench reproducible."""
    from cellsynth.privacy.dp_stage import DP_DIR

    def released(root, **privacy):
        cfg, rt = _lake(root, epsilon=8.0, **privacy)
        note = run_density_dp(cfg, rt, run_id="r1").note
        body = rt.lake.read_json(f"{DP_DIR}/density.json")
        body.pop("run_id", None)
        return note, body

    note_a, secret_a = released(tmp_path / "a")
    _, secret_b = released(tmp_path / "b")
    assert "noise from OS entropy" in note_a
    assert secret_a != secret_b  # same config, same rows: different noise
    note_c, seeded_c = released(tmp_path / "c", noise_seed=5)
    _, seeded_d = released(tmp_path / "d", noise_seed=5)
    assert "privacy.noise_seed=5" in note_c and "NOT a private release" in note_c
    assert seeded_c == seeded_d
