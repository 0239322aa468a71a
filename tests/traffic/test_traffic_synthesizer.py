"""TrafficSynthesizer: the traffic stage's model in memory (fit, sample, save, load)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth import TrafficSynthesizer
from cellsynth.errors import NotFittedError, SchemaError

TINY = {"traffic": {"n_steps": 30, "hidden_channels": 16, "n_blocks": 1, "diffusion_steps": 10, "sampling_steps": 5,
                    "n_samples_per_cell": 3}}
LEVELS = {"A": 40.0, "B": 4.0, "C": 20.0, "D": 8.0}


def _counters(weeks: int = 2) -> pd.DataFrame:
    hours = pd.date_range("2026-01-05", periods=weeks * 168, freq="h", tz="UTC")
    rng = np.random.default_rng(0)
    rows = [pd.DataFrame({"cell_id": c, "ts": hours,
                          "traffic_mb": level * (1.5 + np.sin(2 * np.pi * hours.hour / 24)) * rng.uniform(0.9, 1.1, len(hours))})
            for c, level in LEVELS.items()]
    return pd.concat(rows, ignore_index=True)


def test_counters_alone_fit_sample_and_round_trip(tmp_path):
    s = TrafficSynthesizer(TINY).fit(_counters())
    out = s.sample(rng=1)
    assert len(out) == 4 * 3 * 168 and set(out["cell_id"]) == set(LEVELS)
    assert out["ts"].min() == pd.Timestamp("2026-01-12", tz="UTC")  # the newest fitted week's start
    assert out["traffic_mb"].ge(0).all() and out["load_rho"].between(0, 1).all()
    assert s.context_.shape == (4, 0)  # nothing locates the cells: no context
    s.save(tmp_path / "m")
    again = TrafficSynthesizer.load(tmp_path / "m")
    pd.testing.assert_frame_equal(again.sample(rng=1), out)
    meta = tmp_path / "m" / "traffic_synthesizer.json"
    meta.write_text(meta.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(SchemaError, match="TrafficSynthesizer .*format_version 99, expected 1"):
        TrafficSynthesizer.load(tmp_path / "m")
    assert len(s.sample(2, cell_ids=["B"], rng=1)) == 2 * 168
    with pytest.raises(SchemaError, match="not among the fitted cells: Z"):
        s.sample(cell_ids=["Z"])


def test_site_layout_conditions_the_model_and_new_cells_are_generated():
    cells = pd.DataFrame({"cell_id": ["A", "B", "C", "D", "E"], "x_m": [0.0, 3000.0, 500.0, 2500.0, 200.0],
                          "y_m": [0.0, 0.0, 400.0, 300.0, -300.0]})
    s = TrafficSynthesizer(TINY).fit(_counters(), cells)
    assert s.context_.shape[0] == 5 and s.context_.shape[1] > 0 and s.model_.context_dim_ == s.context_.shape[1]
    out = s.sample(rng=0)
    assert set(out["cell_id"]) == {"A", "B", "C", "D", "E"}  # E has no counters
    # the level regressor follows the layout: dense-core cells (A, C) are the busy ones here
    level = out.groupby("cell_id")["traffic_mb"].mean()
    assert level["A"] > level["B"] and level["C"] > level["D"]


def test_bad_inputs_name_the_problem():
    with pytest.raises(SchemaError, match="traffic_df: column 'traffic_mb' missing"):
        TrafficSynthesizer(TINY).fit(_counters().drop(columns="traffic_mb"))
    one = _counters()
    with pytest.raises(SchemaError, match="from at least 2 cells"):
        TrafficSynthesizer(TINY).fit(one[one["cell_id"] == "A"])
    with pytest.raises(NotFittedError):
        TrafficSynthesizer(TINY).sample()


def test_a_negative_or_fractional_n_samples_is_one_line_naming_it():
    # sample(-1) raised numpy's "negative dimensions are not allowed"; 2.5 was cut to 2 weeks
    from cellsynth.errors import ConfigError

    s = TrafficSynthesizer(TINY).fit(_counters(), None)
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match=r"^sample: n_samples: expected a whole number >= 0, got "):
            s.sample(bad, rng=1)
    assert len(s.sample(0, rng=1)) == 0 and len(s.sample(np.int64(1), cell_ids=["A"], rng=1)) == 168
