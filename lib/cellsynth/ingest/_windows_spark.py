"""Window labels as a Spark column expression (same labels as `cellsynth.windows.window_of`)."""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

from cellsynth.config import WindowConfig
from cellsynth.windows import PARTS_OF_DAY, window_labels


def window_col(ts: Column, cfg: WindowConfig) -> Column:
    """Label of each UTC timestamp's window on `cfg.timezone`'s wall clock; null where ts is null."""
    if cfg.timezone.upper() != "UTC":  # the session is UTC: the local wall-clock time as a UTC-rendered value
        ts = F.from_utc_timestamp(ts, cfg.timezone)
    hour = F.hour(ts)
    if cfg.kind == "all":
        return F.when(ts.isNotNull(), F.lit("all"))
    if cfg.kind == "hour_of_day":
        labels = F.array(*[F.lit(x) for x in window_labels(cfg)])
        # element_at is 1-based
        return F.element_at(labels, (F.floor(hour / cfg.hours_per_window) + 1).cast("int"))
    parts = F.element_at(F.array(*[F.lit(p) for p in PARTS_OF_DAY]), (F.floor(hour / 6) + 1).cast("int"))
    if cfg.kind == "part_of_day":
        return parts
    # Spark dayofweek: 1 = Sunday ... 7 = Saturday
    day = F.when(F.dayofweek(ts).isin(1, 7), F.lit("weekend")).otherwise(F.lit("weekday"))
    return F.concat(day, F.lit("_"), parts)
