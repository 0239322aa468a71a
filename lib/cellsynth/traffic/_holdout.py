"""Held-out-cell evaluation shared by the stage and the benchmarks: the diffusion model, its
unconditional ablation and two baselines, all generating for cells they never saw."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cellsynth.traffic import evaluation as ev
from cellsynth.traffic.model import TrafficDiffusion

MODELS = ("diffusion", "diffusion_unconditional", "hour_of_week_mean", "nearest_context")


def holdout_scores(
    *,
    model: TrafficDiffusion,
    train_series: np.ndarray,
    train_context: np.ndarray,
    train_groups: np.ndarray,
    test_series: list[np.ndarray],
    test_context: np.ndarray,
    n_samples: int,
    rng: np.random.Generator,
    make_unconditional: Callable[[], TrafficDiffusion] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Scores per model on the held-out cells and the samples they were scored on.

    `model` is already fitted on the training rows; `make_unconditional()` returns an unfitted
    model fitted here on the same rows without context (skipped when None). With no context
    column only the diffusion model and the hour-of-week mean are scored.
    """
    n_test = len(test_series)
    samples = {"diffusion": model.sample(test_context, n_samples, rng=rng)}
    # Without context columns the model is already unconditional, and "nearest" context would be an
    # arbitrary training cell: neither comparison says anything then.
    has_context = np.shape(test_context)[-1] > 0
    if make_unconditional is not None and has_context:
        uncond = make_unconditional().fit(train_series, None, groups=train_groups, rng=rng)
        samples["diffusion_unconditional"] = uncond.sample(np.zeros((n_test, 0)), n_samples, rng=rng)
    samples["hour_of_week_mean"] = ev.hour_of_week_mean_baseline(train_series, n_test, n_samples)
    if has_context:
        samples["nearest_context"] = ev.nearest_context_baseline(
            train_context, train_series, test_context, n_samples, train_groups=train_groups
        )
    scores = {name: ev.score(list(test_series), s) for name, s in samples.items()}
    return scores, samples
