"""Spark's window labels (ingest) and pandas's (`cellsynth.windows.window_of`: simulator, traffic, generation) are
the same for every window kind: a report labelled differently in ingest than its counters or its synthetic rows
would train and generate in different windows. Only hour_of_day had run end to end."""

import numpy as np
import pandas as pd
import pytest

from cellsynth.config import WindowConfig
from cellsynth.windows import window_labels, window_of


@pytest.mark.parametrize("kind,hours", [("all", 6), ("hour_of_day", 6), ("hour_of_day", 5), ("hour_of_day", 1),
                                        ("part_of_day", 6), ("weekday_part_of_day", 6)])
def test_spark_and_pandas_windows_agree(spark, kind, hours):
    from pyspark.sql import functions as F

    from cellsynth.ingest._windows_spark import window_col

    cfg = WindowConfig(kind=kind, hours_per_window=hours)
    rng = np.random.default_rng(5)
    # two weeks around a DST change in Europe (a UTC clock has none) and every hour of every weekday
    ts = pd.to_datetime("2026-03-22", utc=True) + pd.to_timedelta(rng.integers(0, 14 * 24 * 3600, 2000), unit="s")
    frame = spark.createDataFrame(pd.DataFrame({"i": np.arange(len(ts)), "ts": ts}))
    got = frame.select("i", window_col(F.col("ts"), cfg).alias("w")).toPandas().sort_values("i")["w"].to_numpy()
    want = window_of(ts, cfg)
    assert (got == want).all()
    assert set(want) == set(window_labels(cfg))  # every label occurs, and no other
