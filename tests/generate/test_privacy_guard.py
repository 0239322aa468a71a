"""The privacy guard refuses to publish synthetic rows that copy training rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth_testkit import test_config as make_test_config
from cellsynth.errors import StageError
from cellsynth.generate.stage import _privacy_guard
from cellsynth.lake import Lake
from cellsynth.splits import random_test_mask


def _reports(n: int, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({
        "report_id": [f"r{i}" for i in range(n)], "ts": pd.to_datetime(["2026-01-05T01:00:00Z"] * n, utc=True),
        "window": ["all"] * n, "x_m": rng.uniform(0, 2000, n), "y_m": rng.uniform(0, 2000, n),
        "serving_cell_id": ["c0"] * n, "rsrp_dbm": rng.normal(-95, 8, n).round(), "cell_shard": [0] * n,
        "ingest_run_id": ["i"] * n,
    })


def _synthetic(frame: pd.DataFrame) -> pd.DataFrame:
    n = len(frame)
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)], "window": ["all"] * n, "x_m": frame["x_m"].to_numpy(),
        "y_m": frame["y_m"].to_numpy(), "lat": [44.0] * n, "lon": [11.0] * n, "serving_cell_id": ["c0"] * n,
        "rsrp_dbm": frame["rsrp_dbm"].to_numpy(), "rsrp_dbm_epistemic_std": [1.0] * n,
        "rsrp_dbm_aleatoric_std": [4.0] * n, "reliable": [True] * n, "scenario": ["observed"] * n,
        "cell_shard": [0] * n, "run_id": ["g"] * n,
    })


def test_copies_of_training_rows_are_refused_and_fresh_draws_pass(tmp_path):
    rng = np.random.default_rng(0)
    cfg = make_test_config(tmp_path)
    lake = Lake(tmp_path / "lake")
    reports = _reports(6000, rng)
    lake.write("mdt_reports", reports)
    train = reports[~random_test_mask(reports["report_id"].to_numpy(), test_fraction=0.35, seed=cfg.run.seed)]
    copies = lake.stage_files("synthetic_mdt", _synthetic(train.head(500)))
    with pytest.raises(StageError, match=r"privacy guard: .*nothing was published.*privacy\.publish_despite_guard"):
        _privacy_guard(cfg, lake, copies)
    fresh = lake.stage_files("synthetic_mdt", _synthetic(_reports(3000, np.random.default_rng(1))))
    _privacy_guard(cfg, lake, fresh)  # independent draws sit as far from training rows as held-out rows do
    assert not lake.exists("synthetic_mdt")  # the guard only reads staged files; nothing was committed


def test_guard_tolerates_small_sample_noise_but_refuses_near_copies(tmp_path):
    from cellsynth.evaluate.privacy import dcr_check

    def draw(n: int, rng: np.random.Generator) -> pd.DataFrame:
        return pd.DataFrame({"x": rng.uniform(0, 2000, n), "y": rng.uniform(0, 2000, n), "r": rng.normal(-95, 8, n)})

    # Independent draws with only 120 held-out rows: the bare median ratio lands at 0.86 by chance
    # (seed 12), below the 0.9 threshold; its 95% upper bound does not, so nothing is refused.
    rng = np.random.default_rng(12)
    train, fresh, holdout = draw(400, rng), draw(2000, rng), draw(120, rng)
    noisy = dcr_check(train, fresh, holdout, columns=["x", "y", "r"])
    assert noisy.ratio < 0.9 < noisy.ratio_upper
    # Jittered copies of training rows (30 m, 1 dB): the bound itself sits far below 0.9.
    rng = np.random.default_rng(0)
    train, holdout = draw(2000, rng), draw(1000, rng)
    near = train.sample(1000, random_state=0) + rng.normal(0, [30.0, 30.0, 1.0], (1000, 3))
    close = dcr_check(train, near, holdout, columns=["x", "y", "r"])
    assert close.ratio_upper < 0.75 and close.exact_copy_fraction == 0.0

    # Through the guard: jittered copies are refused although no row is an exact copy.
    cfg = make_test_config(tmp_path)
    lake = Lake(tmp_path / "lake")
    reports = _reports(2000, np.random.default_rng(0))
    lake.write("mdt_reports", reports)
    held_in = reports[~random_test_mask(reports["report_id"].to_numpy(), test_fraction=0.35, seed=cfg.run.seed)].head(500)
    jitter = np.random.default_rng(2).normal(0, 20.0, (len(held_in), 2))
    moved = held_in.assign(x_m=held_in["x_m"] + jitter[:, 0], y_m=held_in["y_m"] + jitter[:, 1])
    with pytest.raises(StageError, match=r"upper bound"):
        _privacy_guard(cfg, lake, lake.stage_files("synthetic_mdt", _synthetic(moved)))
