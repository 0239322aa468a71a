"""bench/radio_inner.py: the run-level dof emulation (run_pooled_dof) picks one dof for every shard."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ri():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_radio_inner", BENCH / "radio_inner.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_radio_inner"] = mod
    spec.loader.exec_module(mod)
    return mod


def _rows(rng: np.random.Generator, noise) -> tuple[list[dict], list[str]]:
    rows = []
    for c in range(4):
        site = rng.uniform(-2000, 2000, 2)
        xy = site + rng.uniform(-600, 600, (260, 2))
        y = -70 - 35 * np.log10(np.maximum(np.linalg.norm(xy - site, axis=1), 10) / 1000) + noise(len(xy))
        rows.append({"xy_tr": xy[:200], "y_tr": y[:200], "w_tr": np.ones(200), "xy_te": xy[200:], "y_te": y[200:],
                     "w_te": np.ones(60), "probe": xy[:20], "far": site + np.array([[4000.0, 0.0], [0.0, 4000.0]])})
    return rows, [f"C{c}" for c in range(4)]


def test_pooled_dof_is_the_argmin_of_the_row_weighted_objective_and_every_shard_gets_it(ri):
    import cellsynth.radio.calibration as cal

    rng = np.random.default_rng(3)
    grid, tail = cal.DOF_GRID, cal.interval_scales_tail
    # heavy-tailed noise (t with 3 degrees of freedom, 3 dB scale), two shards of two cells
    rows, cells = _rows(rng, lambda n: 3.0 * rng.standard_t(3, n))
    out = ri.run_pooled_dof(rows, cells, seed=0, cells_per_shard=2, n_samples=0)
    obj = out["dof_objective"]
    assert set(obj) == {float(d) for d in cal.DOF_CANDIDATES}
    # ties keep the lighter tail: the first minimum searched from inf down
    order = sorted(obj, reverse=True)
    assert out["dof_pooled"] == order[int(np.argmin([obj[d] for d in order]))]
    assert all(np.all(d == out["dof_pooled"]) for d in out["dof"])
    assert out["dof_pooled"] <= 10.0  # the t3 noise is seen as heavy-tailed
    # the module is left as it was
    assert cal.DOF_GRID == grid and cal.interval_scales_tail is tail


def test_average_seeds_keeps_the_chosen_dofs_per_seed(ri):
    per_seed = [{"mae_db": 1.0, "ce": 0.01, "cov50": 0.5, "cov90": 0.9, "dof_chosen": [4.0]},
                {"mae_db": 3.0, "ce": 0.03, "cov50": 0.4, "cov90": 0.8, "dof_chosen": [6.0, "inf"]}]
    out = ri.average_seeds(per_seed)
    assert out["mae_db"] == 2.0 and out["per_seed"]["dof_chosen"] == [[4.0], [6.0, "inf"]]
    assert out["per_seed"]["interval_score"] == pytest.approx([0.01, 0.03 + 0.1 + 0.1])
