"""Time windows (GUMBLE's j): the labels every stage and the simulator agree on.

Labels: "all"; hour-of-day buckets "h00_06", "h06_12", ...; part of day "night" (0-6),
"morning" (6-12), "afternoon" (12-18), "evening" (18-24); weekday/weekend x part of day
"weekday_morning", "weekend_night", ... Hours and days are those of `WindowConfig.timezone`'s wall
clock (the network's local time; timestamps themselves stay UTC everywhere).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellsynth.config import WindowConfig

PARTS_OF_DAY = ("night", "morning", "afternoon", "evening")  # 6 h each, from midnight in WindowConfig.timezone


def window_labels(cfg: WindowConfig) -> list[str]:
    """Every label the config can produce, in time order."""
    if cfg.kind == "all":
        return ["all"]
    if cfg.kind == "hour_of_day":
        step = cfg.hours_per_window
        return [f"h{start:02d}_{min(start + step, 24):02d}" for start in range(0, 24, step)]
    if cfg.kind == "part_of_day":
        return list(PARTS_OF_DAY)
    return [f"{day}_{part}" for day in ("weekday", "weekend") for part in PARTS_OF_DAY]


def window_of(ts: pd.Series | pd.DatetimeIndex | np.ndarray, cfg: WindowConfig) -> np.ndarray:
    """Label of each timestamp's window (object array of str): hours and days on the wall clock of
    `cfg.timezone` (naive timestamps are UTC)."""
    idx = pd.DatetimeIndex(pd.to_datetime(ts, utc=True))
    if cfg.timezone.upper() != "UTC":
        idx = idx.tz_convert(cfg.timezone)
    hours = idx.hour.to_numpy()
    if cfg.kind == "all":
        return np.full(len(idx), "all", dtype=object)
    if cfg.kind == "hour_of_day":
        labels = np.array(window_labels(cfg), dtype=object)
        return labels[hours // cfg.hours_per_window]
    parts = np.array(PARTS_OF_DAY, dtype=object)[hours // 6]
    if cfg.kind == "part_of_day":
        return parts
    day = np.where(idx.dayofweek.to_numpy() >= 5, "weekend", "weekday").astype(object)
    return day + "_" + parts
