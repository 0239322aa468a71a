"""Membership-inference audit (issue 16, part 2)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth.privacy.mia import auc_score, bootstrap_auc, membership_audit, tpr_at_fpr


def test_auc_and_tpr_match_hand_computed_values():
    # Pairs member > non-member: 3 beats 1, 2 and ties 3 (half); 4 beats all three: 5.5 / 6.
    assert auc_score(np.array([3.0, 4.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(5.5 / 6)
    non = np.arange(100, dtype=float)  # the 1% FPR threshold is the 99th percentile, 98.01
    assert tpr_at_fpr(np.array([98.5, 99.5, 50.0, 10.0]), non, 0.01) == pytest.approx(0.5)
    m, n = np.arange(50, 150, dtype=float), np.arange(0, 100, dtype=float)
    # Members 100..149 beat all 100 (5000 pairs); member m in 50..99 beats m non-members, ties one:
    # sum(m + 0.5) = 3750; (5000 + 3750) / 100^2.
    assert auc_score(m, n) == pytest.approx(0.875)
    lo, hi = bootstrap_auc(m, n, n_boot=200)
    assert 0.8 < lo < 0.875 < hi < 0.95


def _draw(n: int, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({"window": "w", "serving_cell_id": rng.choice(["a", "b", "c"], n), "x_m": rng.uniform(0, 5000, n),
                         "y_m": rng.uniform(0, 5000, n), "rsrp_dbm": rng.normal(-95, 8, n).round()})


def test_fresh_draws_are_not_members_and_near_copies_are():
    rng = np.random.default_rng(0)
    train, holdout = _draw(6000, rng), _draw(4000, rng)
    fresh = membership_audit(train, holdout, _draw(6000, rng), n_targets=2000, n_boot=100)
    assert {r.attack for r in fresh} == {"distance", "domias"}
    for r in fresh:
        assert r.n_members == r.n_non_members == 2000
        assert r.auc == pytest.approx(0.5, abs=0.03) and r.auc_lower < 0.5 < r.auc_upper
        assert r.tpr_at_fpr01 < 0.03
    # A generator that emits its training rows jittered by 5 m and 0.5 dB: both attacks see it.
    leaky = train.assign(x_m=train["x_m"] + rng.normal(0, 5, len(train)), y_m=train["y_m"] + rng.normal(0, 5, len(train)),
                         rsrp_dbm=train["rsrp_dbm"] + rng.normal(0, 0.5, len(train)))
    by_attack = {r.attack: r for r in membership_audit(train, holdout, leaky, n_targets=2000, n_boot=100)}
    assert by_attack["distance"].auc > 0.9 and by_attack["distance"].tpr_at_fpr01 > 0.3
    assert by_attack["domias"].auc > 0.6
