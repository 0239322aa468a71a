"""TrafficDiffusion: overfits one pattern, follows its context, guidance moves samples towards
the context, persists without pickle, and rejects bad input with one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _traffic_toy import HOUR_OF_DAY, IS_WEEKEND, business_profile, residential_profile, toy_cells
from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.traffic import TrafficDiffusion

torch.set_num_threads(1)
TINY = dict(hidden_channels=32, n_blocks=2, diffusion_steps=40, sampling_steps=20, batch_size=32)


def _noon_vs_evening(series: np.ndarray) -> np.ndarray:
    """Weekday 11-13 h traffic over 19-21 h traffic: > 1 business-like, < 1 residential-like."""
    noon = series[..., (~IS_WEEKEND) & (HOUR_OF_DAY >= 11) & (HOUR_OF_DAY <= 13)].mean(axis=-1)
    evening = series[..., (~IS_WEEKEND) & (HOUR_OF_DAY >= 19) & (HOUR_OF_DAY <= 21)].mean(axis=-1)
    return noon / evening


def test_overfits_a_single_pattern():
    pattern = 50.0 * residential_profile() / residential_profile().mean()
    rng = np.random.default_rng(0)
    series = pattern * rng.lognormal(0.0, 0.01, (16, 168))
    model = TrafficDiffusion(**TINY, n_steps=400, learning_rate=3e-3).fit(series, None, rng=1)
    loss = model.loss_history_
    assert loss[-40:].mean() < 0.3 * loss[:40].mean()
    samples = model.sample(None, 8, rng=2)
    assert samples.shape == (1, 8, 168)
    rel_err = np.abs(samples[0] - pattern) / pattern.mean()
    assert rel_err.mean() < 0.08
    # The level (weekly mean) is reproduced too, not only the shape.
    assert samples.mean() == pytest.approx(pattern.mean(), rel=0.05)


@pytest.fixture(scope="module")
def toy_model():
    series, context = toy_cells(48, np.random.default_rng(3), noise=0.05)
    return TrafficDiffusion(**TINY, n_steps=500, cond_drop_prob=0.2).fit(series, context, rng=4), series, context


def test_conditional_samples_follow_context_level_and_shape(toy_model):
    model, _, _ = toy_model
    ctx = np.array([[1.0, 1.8], [0.0, 2.8]])  # business, ~63 MB/h; residential, ~631 MB/h
    samples = model.sample(ctx, 6, rng=5)
    means = samples.mean(axis=(1, 2))
    np.testing.assert_allclose(np.log10(means), [1.8, 2.8], atol=0.15)
    ratio = _noon_vs_evening(samples).mean(axis=1)
    expected = _noon_vs_evening(np.stack([business_profile(), residential_profile()]))
    assert ratio[0] > 1.0 > ratio[1]
    np.testing.assert_allclose(np.log(ratio), np.log(expected), atol=0.7)  # within a factor 2


def test_guidance_moves_samples_towards_the_context(toy_model):
    model, _, _ = toy_model
    ctx = np.array([[1.0, 2.2], [0.0, 2.2]])
    # Same noise for both scales: only the guidance differs.
    weak = _noon_vs_evening(model.sample(ctx, 16, rng=6, guidance_scale=0.0)).mean(axis=1)
    strong = _noon_vs_evening(model.sample(ctx, 16, rng=6, guidance_scale=3.0)).mean(axis=1)
    assert strong[0] > weak[0]  # business context: more business-like
    assert strong[1] < weak[1]  # residential context: more residential-like


def test_save_load_round_trip_gives_identical_samples(toy_model, tmp_path):
    model, _, context = toy_model
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["params.json", "weights.safetensors"]
    loaded = TrafficDiffusion.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.sample(context[:3], 2, rng=9), model.sample(context[:3], 2, rng=9), rtol=1e-5)


def test_fitting_twice_equals_fitting_once():
    series, context = toy_cells(8, np.random.default_rng(1))
    other, other_ctx = toy_cells(8, np.random.default_rng(2))
    a = TrafficDiffusion(**TINY, n_steps=20).fit(series, context, rng=0).fit(other, other_ctx, rng=7)
    b = TrafficDiffusion(**TINY, n_steps=20).fit(other, other_ctx, rng=7)
    np.testing.assert_allclose(a.loss_history_, b.loss_history_, rtol=1e-5)
    np.testing.assert_allclose(a.sample(other_ctx, 1, rng=1), b.sample(other_ctx, 1, rng=1), rtol=1e-5)


def test_unfitted_and_bad_input_errors():
    with pytest.raises(NotFittedError, match="TrafficDiffusion is not fitted"):
        TrafficDiffusion().sample(None, 1)
    with pytest.raises(SchemaError, match=r"series: expected shape \(n_cells >= 2, 168\), got \(3, 24\)"):
        TrafficDiffusion(**TINY).fit(np.ones((3, 24)))
    with pytest.raises(SchemaError, match="series: expected finite non-negative"):
        TrafficDiffusion(**TINY).fit(-np.ones((3, 168)))
    with pytest.raises(ConfigError, match=r"TrafficDiffusion\.cond_drop_prob"):
        TrafficDiffusion(cond_drop_prob=1.5).fit(np.ones((3, 168)))
    with pytest.raises(ConfigError, match=r"TrafficDiffusion\.patch_h: expected a divisor of 168, got 5"):
        TrafficDiffusion(patch_h=5).fit(np.ones((3, 168)))
    model = TrafficDiffusion(**TINY, n_steps=2).fit(np.ones((3, 168)), np.ones((3, 2)), rng=0)
    with pytest.raises(SchemaError, match="context: expected 2 columns as in fit, got 3"):
        model.sample(np.ones((1, 3)), 1)


def test_context_nan_is_imputed_by_the_training_mean():
    from cellsynth.traffic.model import nan_mean_std

    x = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, 5.0]])
    mean, sd = nan_mean_std(x)
    np.testing.assert_allclose(mean, [2.0, 0.0, 5.0])
    np.testing.assert_allclose(sd, [1.0, 1.0, 1.0])  # no data / no spread -> 1


def test_level_spread_is_measured_on_unseen_cells():
    rng = np.random.default_rng(0)
    cell_level = np.array([1.0, 3.0, 2.0, 4.0])  # log weekly means, unrelated to the context below
    groups = np.repeat(np.arange(4), 10)
    context = np.repeat(rng.normal(size=(4, 1)), 10, axis=0) + rng.normal(0, 0.01, (40, 1))
    series = np.exp(cell_level[groups] + rng.normal(0, 0.01, 40))[:, None] * np.ones((40, 168))
    by_cell = TrafficDiffusion(**TINY, n_steps=1).fit(series, context, groups=groups, rng=0)
    # Leaving whole cells out, the context cannot predict a new cell's level: the spread stays
    # near the between-cell spread (std of 1, 2, 3, 4 = 1.12), not the 0.01 within-cell noise.
    assert by_cell.level_std_ > 0.8
    # An informative context is found: level = 2 * context exactly.
    informative = np.linspace(0, 2, 40)[:, None]
    exact = TrafficDiffusion(**TINY, n_steps=1).fit(np.exp(2 * informative) * np.ones((40, 168)), informative, rng=0)
    assert exact.level_std_ < 0.05
    np.testing.assert_allclose(exact.predict_level(np.array([[1.5]]))[0], [3.0], atol=0.05)


def test_fast_sampler_matches_the_reference_sampler(toy_model):
    model, _, context = toy_model
    # Calibrated at fit on training contexts: a step count below the reference's 20.
    assert model.fast_steps_ in (5, 8, 10, 12, 16)
    chosen = model.fast_calibration_["candidates"][str(model.fast_steps_)]
    assert chosen["passed"]
    ctx = context[:6]
    fast = model.sample(ctx, 64, rng=11)
    ref = model.sample(ctx, 64, rng=12, sampler="reference")
    # Per-cell mean week (shape over the weekly mean), the spread of a cell's samples per hour
    # and the day-to-day correlation: the fast sampler reproduces the reference's. Two
    # reference draws of 64 weeks differ by 6-7 % RMS in the per-cell mean week (seed noise).
    def shape(s):
        return s / s.mean(axis=-1, keepdims=True)
    rel = shape(fast).mean(axis=1) / shape(ref).mean(axis=1) - 1
    assert np.sqrt(np.mean(rel**2)) == pytest.approx(0.0, abs=0.12)
    spread_ratio = shape(fast).std(axis=1).mean() / shape(ref).std(axis=1).mean()
    assert spread_ratio == pytest.approx(1.0, abs=0.2)
    lag24 = [np.mean([np.corrcoef(w[:-24], w[24:])[0, 1] for w in shape(s).reshape(-1, 168)]) for s in (fast, ref)]
    assert lag24[0] == pytest.approx(lag24[1], abs=0.03)
    # The level (weekly mean) does not depend on the sampler.
    np.testing.assert_allclose(np.log(fast.mean(axis=(1, 2))), np.log(ref.mean(axis=(1, 2))), atol=0.05)


def test_calibration_keeps_the_reference_when_no_fast_step_count_matches(monkeypatch):
    import cellsynth.traffic.model as tm

    series, context = toy_cells(24, np.random.default_rng(5), noise=0.05)
    # One step from pure noise returns the blurred posterior mean, far from the reference.
    monkeypatch.setattr(tm, "FAST_CANDIDATE_STEPS", (1,))
    model = TrafficDiffusion(**TINY, n_steps=300).fit(series, context, rng=6)
    assert model.fast_steps_ is None
    assert model.fast_calibration_["candidates"]["1"]["passed"] is False
    np.testing.assert_allclose(model.sample(context[:2], 3, rng=1), model.sample(context[:2], 3, rng=1, sampler="reference"))
    with pytest.raises(ConfigError, match=r"TrafficDiffusion\.sampler: expected one of fast, reference, got 'ddim'"):
        TrafficDiffusion(sampler="ddim").fit(np.ones((3, 168)))


def test_a_model_saved_without_a_fast_step_count_loads_with_the_reference_sampler(toy_model, tmp_path):
    import json

    model, _, context = toy_model
    folder = model.save(tmp_path / "m")
    meta = json.loads((folder / "params.json").read_text())
    assert meta["fast_steps"] == model.fast_steps_
    for key in ("fast_steps", "fast_calibration"):
        meta.pop(key)
    meta["params"].pop("sampler")
    (folder / "params.json").write_text(json.dumps(meta))
    old = TrafficDiffusion.load(folder)
    assert old.fast_steps_ is None
    np.testing.assert_allclose(old.sample(context[:2], 2, rng=3), model.sample(context[:2], 2, rng=3, sampler="reference"),
                               rtol=1e-5)
