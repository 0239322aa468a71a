"""Exact distance checks in metres and dB (issue 16, part 1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth_testkit import test_config as make_test_config
from cellsynth.errors import StageError
from cellsynth.generate.stage import _privacy_guard
from cellsynth.lake import Lake
from cellsynth.privacy import DistanceStats, distance_stats, guard_problems, partition_distances
from cellsynth.splits import random_test_mask


def _frame(xy, rsrp, window="w", cell="c0"):
    xy = np.asarray(xy, dtype=float)
    return pd.DataFrame({"window": window, "serving_cell_id": cell, "x_m": xy[:, 0], "y_m": xy[:, 1],
                         "rsrp_dbm": np.asarray(rsrp, dtype=float)})


def test_distances_are_metres_and_db_against_the_same_cell_and_window_only():
    train = pd.concat([_frame([[0, 0], [100, 0]], [-90, -80]), _frame([[3, 4]], [-90], cell="c1")])
    query = pd.concat([_frame([[3, 4], [100, 0]], [-90, -82]), _frame([[0, 0]], [-90], window="other")])
    d_pos, d_comb = partition_distances(train, query, metres_per_db=10.0)
    # (3, 4) is 5 m from (0, 0) of c0 (c1's row at (3, 4) does not count); same RSRP.
    assert d_pos[:2] == pytest.approx([5.0, 0.0])
    # (100, 0) at -82 dBm: 0 m from c0's (100, 0) at -80, 2 dB = 20 m; sqrt(100^2 + 8^2*10^2) is farther.
    assert d_comb[:2] == pytest.approx([5.0, 20.0])
    assert np.isnan(d_pos[2]) and np.isnan(d_comb[2])  # no training rows for that window


def test_histogram_median_and_merge_match_the_exact_values():
    rng = np.random.default_rng(0)
    train = _frame(rng.uniform(0, 5000, (4000, 2)), rng.normal(-95, 8, 4000).round())
    a = _frame(rng.uniform(0, 5000, (3000, 2)), rng.normal(-95, 8, 3000).round())
    b = _frame(rng.uniform(0, 5000, (3000, 2)), rng.normal(-95, 8, 3000).round())
    whole = distance_stats(train, a, b)
    halves = DistanceStats.merge_all([distance_stats(train, a.iloc[:1000], b.iloc[:1500]),
                                      distance_stats(train, a.iloc[1000:], b.iloc[1500:])])
    exact = np.median(partition_distances(train, a)[1])
    assert whole.synthetic_median_m == pytest.approx(exact, rel=0.025)  # one 2.3% log bin
    assert halves.synthetic_median_m == pytest.approx(whole.synthetic_median_m)
    assert halves.synthetic_within == whole.synthetic_within
    assert whole.share_within(50.0) == pytest.approx(np.mean(partition_distances(train, a)[0] <= 50.0))
    assert whole.ratio == pytest.approx(1.0, abs=0.08)
    assert guard_problems(whole, min_dcr_ratio=0.9, confidence=0.95, max_near_excess=0.01) == []


def _reports(n: int, rng: np.random.Generator, n_cells: int = 40) -> pd.DataFrame:
    cells = np.array([f"c{i:02d}" for i in range(n_cells)])
    cell = cells[rng.integers(0, n_cells, n)]
    return pd.DataFrame({
        "report_id": [f"r{i}" for i in range(n)], "ts": pd.Timestamp("2026-01-05T01:00:00Z"),
        "window": np.array(["h00_06", "h06_12"])[rng.integers(0, 2, n)], "x_m": rng.uniform(0, 10_000, n),
        "y_m": rng.uniform(0, 10_000, n), "serving_cell_id": cell, "rsrp_dbm": rng.normal(-95, 8, n).round(),
        "cell_shard": np.array([int(c[1:]) % 8 for c in cell], dtype=np.int32), "ingest_run_id": "i",
    })


def _synthetic(frame: pd.DataFrame) -> pd.DataFrame:
    n = len(frame)
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)], "window": frame["window"].to_numpy(), "x_m": frame["x_m"].to_numpy(),
        "y_m": frame["y_m"].to_numpy(), "lat": 44.0, "lon": 11.0, "serving_cell_id": frame["serving_cell_id"].to_numpy(),
        "rsrp_dbm": frame["rsrp_dbm"].to_numpy(), "rsrp_dbm_epistemic_std": 1.0, "rsrp_dbm_aleatoric_std": 4.0,
        "reliable": True, "scenario": "observed", "cell_shard": frame["cell_shard"].to_numpy(), "run_id": "g",
    })


def test_guard_finds_planted_jittered_copies_among_every_training_row(tmp_path):
    """200k training rows in 80 (window, cell) groups over 8 shards: 5% of the synthetic rows are
    training rows jittered by 25 m and 1 dB. The guard's per-shard exact trees find them; a
    20k-row subsample of the training rows (the old check) saw each copy's origin with p = 0.1."""
    from cellsynth.evaluate.privacy import dcr_check

    rng = np.random.default_rng(0)
    cfg = make_test_config(tmp_path)
    lake = Lake(tmp_path / "lake")
    reports = _reports(310_000, rng)
    lake.write("mdt_reports", reports)
    train = reports[~random_test_mask(reports["report_id"].to_numpy(), test_fraction=cfg.split.test_fraction,
                                      seed=cfg.run.seed)]
    fresh = _reports(20_000, np.random.default_rng(1))
    planted = train.iloc[np.random.default_rng(2).choice(len(train), 1000, replace=False)].copy()
    planted[["x_m", "y_m"]] += np.random.default_rng(3).normal(0, 25.0, (1000, 2))
    planted["rsrp_dbm"] += np.random.default_rng(4).normal(0, 1.0, 1000)
    _privacy_guard(cfg, lake, lake.stage_files("synthetic_mdt", _synthetic(fresh)))  # fresh draws pass
    with pytest.raises(StageError, match=r"within 50 m \(position and RSRP.*all 201\d\d\d training rows"):
        _privacy_guard(cfg, lake, lake.stage_files("synthetic_mdt", _synthetic(pd.concat([fresh, planted]))))
    # The old check (20k-row subsample, area-wide standardised units) lets the same table through.
    old = dcr_check(train.sample(20_000, random_state=0), pd.concat([fresh, planted]), reports.drop(train.index),
                    columns=["x_m", "y_m", "rsrp_dbm"])
    assert old.ratio_upper >= 0.9 and old.exact_copy_fraction == 0.0


def test_membership_inference_guard_option_refuses_a_leaky_table(tmp_path):
    # Distance checks loosened so that only privacy.guard_mia can refuse: jittered copies (5 m).
    cfg = make_test_config(tmp_path, privacy={"guard_mia": True, "max_near_excess": 0.99, "min_dcr_ratio": 0.01,
                                              "mia_targets": 500, "mia_bootstrap": 50})
    lake = Lake(tmp_path / "lake")
    reports = _reports(4000, np.random.default_rng(0), n_cells=4)
    lake.write("mdt_reports", reports)
    train = reports[~random_test_mask(reports["report_id"].to_numpy(), test_fraction=cfg.split.test_fraction,
                                      seed=cfg.run.seed)]
    leaky = train.copy()
    leaky[["x_m", "y_m"]] += np.random.default_rng(1).normal(0, 5.0, (len(leaky), 2))
    with pytest.raises(StageError, match=r"membership-inference distance attack AUC (0\.9\d+|1\.000)"):
        _privacy_guard(cfg, lake, lake.stage_files("synthetic_mdt", _synthetic(leaky)))
    fresh = _reports(2600, np.random.default_rng(5), n_cells=4)
    _privacy_guard(cfg, lake, lake.stage_files("synthetic_mdt", _synthetic(fresh)))


def test_ratio_quantile_is_inf_without_a_warning_where_the_resamples_are_unbounded():
    import warnings

    from cellsynth.privacy.distance import ratio_quantile

    finite = np.linspace(0.5, 1.5, 400)
    assert ratio_quantile(finite, 0.95) == pytest.approx(float(np.quantile(finite, 0.95)))
    # held-out median distance 0 in most resamples (drive logs repeating a fix): numpy's lerp gave NaN
    many_inf = np.r_[finite[:40], np.full(360, np.inf)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ratio_quantile(many_inf, 0.95) == float("inf")
        some_inf = np.r_[finite[:390], np.full(10, np.inf)]  # the 95% point still between finite ratios
        assert ratio_quantile(some_inf, 0.95) == pytest.approx(float(np.quantile(some_inf, 0.95)))
        assert ratio_quantile(some_inf, 0.95) < 2.0
