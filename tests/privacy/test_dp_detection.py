"""Release C of the dp mode (privacy/dp_detection.py): which cells are heard where, as DP counts.
Its budget composes with releases A and B, one user moves the released sums by at most the clip,
a near-noise-free release recovers the detection rates, and noise-only counts thin nothing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cellsynth.privacy import dp, dp_detection, dp_stats
from test_dp import _world


def _rows(per_user: int = 12):
    reports, meas, cells = _world(n_users=400, per_user=per_user)
    rows = meas.merge(dp.bound_per_user(reports, 8, seed=0)[["report_id", "ue_id"]], on="report_id")
    return rows, cells


def test_release_c_shares_the_rsrp_budget_and_opacus_agrees():
    from opacus.accountants import PRVAccountant

    rows, cells = _rows()
    index = {c: i for i, c in enumerate(cells["cell_id"])}
    kw = dict(target="rsrp", centre=-90.0, scale=10.0, delta=1e-5, max_reports_per_ue=8, bbox=dp.public_bbox(cells))
    t = dp_stats.fit_target(rows, index, dp.DPRadioModels.sites(cells), cells[["x_m", "y_m"]].to_numpy(float),
                            dp.DPRadioModels.azimuths(cells), epsilon=4.0, seed=0, detection_share=0.25, **kw)
    z = dp_stats.noise_multiplier(4.0, 1e-5)
    z_c = t.detection.noise_std / dp_detection.detection_clip(8, dp_stats.ROWS_PER_REPORT)
    z_a, z_b = (s / c for s, c in zip(t.noise_std, t.clip_norms))
    assert z_c == pytest.approx(z / math.sqrt(0.25))
    assert 1 / z_a**2 + 1 / z_b**2 + 1 / z_c**2 == pytest.approx(1 / z**2)
    acc = PRVAccountant()
    acc.history = [(z_a, 1.0, 1), (z_b, 1.0, 1), (z_c, 1.0, 1)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(4.0, rel=0.03)
    # The artefact keeps it (generate reads it back through DPRadioModels.detection).
    back = dp_stats.DPStatsTarget.from_json(t.to_json())
    assert np.allclose(back.detection.heard, t.detection.heard, atol=1e-3) and back.detection.cell_ids == ["A", "B", "C"]
    assert dp.DPRadioModels(cells, {"rsrp": back}).detection is back.detection


def test_one_user_moves_the_released_counts_by_at_most_the_clip(monkeypatch):
    rows, cells = _rows()
    clip = dp_detection.detection_clip(8, dp_stats.ROWS_PER_REPORT)
    captured = []
    real = dp_stats.gaussian_release
    monkeypatch.setattr(dp_stats, "gaussian_release", lambda sums, **kw: captured.append(sums.copy()) or real(sums, **kw))
    ids = sorted(cells["cell_id"])
    fit = lambda r: dp_detection.fit_detection(r, ids, z=1.0, clip=clip, bbox=dp.public_bbox(cells),  # noqa: E731
                                               gen=np.random.default_rng(0), grid_m=200.0, smoothing_squares=0.0)
    fit(rows)
    for u in ("u0", "u7", "u123"):
        fit(rows[rows["ue_id"] != u])
    full = captured[0]
    for without in captured[1:]:
        assert 0 < np.linalg.norm(full - without) <= clip + 1e-9


def test_near_noise_free_release_recovers_who_is_heard_and_pure_noise_thins_nothing():
    rows, cells = _rows()
    ids = sorted(cells["cell_id"])
    bbox = dp.public_bbox(cells)
    clip = dp_detection.detection_clip(8, dp_stats.ROWS_PER_REPORT)
    # The world lists every cell in every report: away from the serving cell, heard with rate 1.
    det = dp_detection.fit_detection(rows, ids, z=1e-6, clip=clip, bbox=bbox, gen=np.random.default_rng(0),
                                     grid_m=200.0, smoothing_squares=1.0)
    xy = rows[["x_m", "y_m"]].to_numpy(float)[:200]
    p = det.prob(np.full(200, "B", dtype=object), xy)
    assert np.median(p) == pytest.approx(1.0, abs=0.02)
    # Drop cell C from the neighbour lists: its rate falls to ~0 where data are, A's stays ~1.
    thin = rows[~((rows["cell_id"] == "C") & (rows["role"] == "neighbour"))]
    det = dp_detection.fit_detection(thin, ids, z=1e-6, clip=clip, bbox=bbox, gen=np.random.default_rng(0),
                                     grid_m=200.0, smoothing_squares=1.0)
    served_elsewhere = thin[(thin["role"] == "serving") & (thin["cell_id"] != "C")][["x_m", "y_m"]].to_numpy(float)[:300]
    assert np.median(det.prob(np.full(300, "C", dtype=object), served_elsewhere)) < 0.05
    assert np.median(det.prob(np.full(300, "A", dtype=object), served_elsewhere)) > 0.9
    # Empty data: noise only; with a pseudo-count of one noise std every candidate stays heard (the
    # dp rule without release C). The pseudo-count and the heard threshold follow C's multiplier
    # (PRIOR_STDS_BY_Z, HEARD_THRESHOLD_BY_Z; session 10, at evaluate's fingerprint sizes): at the
    # bench's epsilon 10 (z_C 1.65) none and 1 std, at 4 (z_C 3.69) half a std and 2, at 1 (z_C 13.2)
    # one std and no threshold.
    empty = dp_detection.fit_detection(thin.iloc[:0], ids, z=1.0, clip=clip, bbox=bbox, gen=np.random.default_rng(1),
                                       grid_m=200.0, smoothing_squares=1.0)
    assert empty.prior_stds == dp_detection.prior_stds_for(1.0) == 0.0
    assert [dp_detection.prior_stds_for(z) for z in (1.65, 3.69, 13.2)] == [0.0, 0.5, 1.0]
    assert [dp_detection.heard_threshold_for(z) for z in (1.65, 3.69, 13.2)] == [1.0, 2.0, 0.0]
    noisy = dp_detection.fit_detection(thin.iloc[:0], ids, z=13.2, clip=clip, bbox=bbox, gen=np.random.default_rng(1),
                                       grid_m=200.0, smoothing_squares=1.0)
    assert dp_detection.DPDetection.from_json(noisy.to_json()).prior_stds == 1.0
    # The threshold zeroes heard counts below it: none at z_C 13.2 (threshold 0, only the floor at 0),
    # more at z_C 3.69 (2 stds) than the same counts at 1 std would.
    assert (noisy.heard > 0).any()
    level = 3.69 * clip * dp_detection._kernel_l2(1.0)
    mid = dp_detection.fit_detection(thin.iloc[:0], ids, z=3.69, clip=clip, bbox=bbox, gen=np.random.default_rng(1),
                                     grid_m=200.0, smoothing_squares=1.0)
    assert mid.heard[mid.heard > 0].min() >= 2.0 * level
    empty.prior_stds = 1.0
    assert np.median(empty.prob(np.full(300, "A", dtype=object), served_elsewhere)) > 0.5
    assert pd.isna(empty.serving(served_elsewhere)).mean() > 0.9
