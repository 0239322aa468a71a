"""Toy cell-weeks whose weekly shape and level are known functions of a 2-column context."""

from __future__ import annotations

import numpy as np

HOURS = np.arange(168)
HOUR_OF_DAY = HOURS % 24
IS_WEEKEND = HOURS // 24 >= 5


def residential_profile() -> np.ndarray:
    """Evening peak at 20:00, quiet nights, same every day."""
    return 0.2 + np.exp(-0.5 * ((HOUR_OF_DAY - 20) / 2.5) ** 2)


def business_profile() -> np.ndarray:
    """Midday peak at 12:00 on weekdays, flat low weekend."""
    day = 0.15 + np.exp(-0.5 * ((HOUR_OF_DAY - 12) / 3.0) ** 2)
    return np.where(IS_WEEKEND, 0.25, day)


def toy_cells(n_cells: int, rng: np.random.Generator, *, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(series (n, 168), context (n, 2)): context[:, 0] = business share in [0, 1] sets the
    shape, context[:, 1] = log10 of users sets the level (weekly mean = 10 ** c1 MB)."""
    share = rng.uniform(0, 1, n_cells)
    log_users = rng.uniform(1.5, 3.0, n_cells)
    shape = share[:, None] * business_profile() + (1 - share[:, None]) * residential_profile()
    shape = shape / shape.mean(axis=1, keepdims=True)
    series = 10 ** log_users[:, None] * shape * rng.lognormal(0.0, noise, (n_cells, 168))
    return series, np.column_stack([share, log_users])
