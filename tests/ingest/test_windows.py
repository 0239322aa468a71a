"""Spark's window labels (ingest) and pandas's (`cellsynth.windows.window_of`: simulator, traffic, generation) are
the same for every window kind: a report labelled differently in ingest than its counters or its synthetic rows
would train and generate in different windows. Only hour_of_day had run end to end."""

import numpy as np
import pandas as pd
import pytest

from cellsynth.config import WindowConfig
from cellsynth.windows import window_labels, window_of


@pytest.mark.parametrize("kind,hours,zone", [("all", 6, "UTC"), ("hour_of_day", 6, "UTC"), ("hour_of_day", 5, "UTC"),
                                             ("hour_of_day", 1, "UTC"), ("part_of_day", 6, "UTC"),
                                             ("weekday_part_of_day", 6, "UTC"), ("hour_of_day", 1, "Europe/Dublin"),
                                             ("weekday_part_of_day", 6, "Asia/Shanghai")])
def test_spark_and_pandas_windows_agree(spark, kind, hours, zone):
    from pyspark.sql import functions as F

    from cellsynth.ingest._windows_spark import window_col

    cfg = WindowConfig(kind=kind, hours_per_window=hours, timezone=zone)
    rng = np.random.default_rng(5)
    # two weeks around a DST change in Europe (a UTC clock has none) and every hour of every weekday
    ts = pd.to_datetime("2026-03-22", utc=True) + pd.to_timedelta(rng.integers(0, 14 * 24 * 3600, 2000), unit="s")
    frame = spark.createDataFrame(pd.DataFrame({"i": np.arange(len(ts)), "ts": ts}))
    got = frame.select("i", window_col(F.col("ts"), cfg).alias("w")).toPandas().sort_values("i")["w"].to_numpy()
    want = window_of(ts, cfg)
    assert (got == want).all()
    assert set(want) == set(window_labels(cfg))  # every label occurs, and no other


def test_windows_follow_the_networks_wall_clock():
    # a Shanghai network's 08:30 on a Monday is 00:30 UTC, and its Saturday 04:00 is Friday 20:00 UTC: with the
    # windows on UTC hours the first was "night" and the second a weekday
    ts = pd.to_datetime(["2026-01-05T00:30:00Z", "2026-01-09T20:00:00Z", "2026-07-06T07:30:00Z"], utc=True)
    local = WindowConfig(kind="weekday_part_of_day", timezone="Asia/Shanghai")
    assert window_of(ts, local).tolist() == ["weekday_morning", "weekend_night", "weekday_afternoon"]
    assert window_of(ts, WindowConfig(kind="weekday_part_of_day")).tolist() == [
        "weekday_night", "weekday_evening", "weekday_morning"]
    # Dublin: UTC in winter, UTC+1 in summer (07:30 UTC in July is 08:30 local)
    dublin = WindowConfig(kind="hour_of_day", hours_per_window=1, timezone="Europe/Dublin")
    assert window_of(ts, dublin).tolist() == ["h00_01", "h20_21", "h08_09"]
