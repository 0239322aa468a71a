"""stable_order: the rows a seeded sample picks do not depend on the order a lake read returned."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _frame(n: int = 500) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        "report_id": [f"r{i:05d}" for i in rng.permutation(n)],
        "cell_id": rng.choice(["c1", "c2", "c3"], n),
        "rsrp_dbm": rng.normal(-90, 8, n),
    })


def test_a_seeded_sample_after_stable_order_ignores_read_order():
    from cellsynth.splits import stable_order

    frame = _frame()
    shuffled = frame.sample(frac=1.0, random_state=11)  # the same rows, another read order
    a = stable_order(frame).sample(n=50, random_state=42)
    b = stable_order(shuffled).sample(n=50, random_state=42)
    pd.testing.assert_frame_equal(a, b)
    # without it the same seed picks other rows
    assert set(frame.sample(n=50, random_state=42)["report_id"]) != set(shuffled.sample(n=50, random_state=42)["report_id"])


def test_stable_order_sorts_by_the_keys_present_and_resets_the_index():
    from cellsynth.splits import stable_order

    frame = _frame(20)
    out = stable_order(frame, ("cell_id", "report_id", "no_such_column"))
    assert list(out.index) == list(range(20))
    assert list(zip(out["cell_id"], out["report_id"])) == sorted(zip(frame["cell_id"], frame["report_id"]))
    assert stable_order(frame[["rsrp_dbm"]], ("report_id",)).index.equals(pd.RangeIndex(20))


def test_stable_argsort_is_numpys_stable_permutation():
    from cellsynth.splits import stable_argsort

    rng = np.random.default_rng(0)
    for codes in (rng.integers(0, 50, 5000), rng.integers(0, 40_000, 5000), np.array([], dtype=np.int64)):
        np.testing.assert_array_equal(stable_argsort(codes), np.argsort(codes, kind="stable"))
