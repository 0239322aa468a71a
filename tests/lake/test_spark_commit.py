import pandas as pd

from cellsynth.schemas import MDT_REPORTS


def test_spark_partitioned_parquet_committed_as_one_version(spark, lake):
    pdf = pd.DataFrame({
        "report_id": [f"r{i}" for i in range(40)],
        "ue_id": [None] * 40,
        "ts": pd.to_datetime(["2026-01-05T01:00:00Z"] * 40, utc=True),
        "window": ["h00_06", "h06_12"] * 20,
        "x_m": [float(i) for i in range(40)], "y_m": [1.0] * 40,
        "serving_cell_id": [f"c{i % 5}" for i in range(40)],
        "rsrp_dbm": [-90.0 - i for i in range(40)], "rsrq_db": [-10.0] * 40, "load_rho": [0.5] * 40,
        "cell_shard": [i % 4 for i in range(40)], "ingest_run_id": ["run"] * 40,
    })
    sdf = spark.createDataFrame(pdf, schema="report_id string, ue_id string, ts timestamp, window string, x_m double, "
                                "y_m double, serving_cell_id string, rsrp_dbm double, rsrq_db double, load_rho double, "
                                "cell_shard int, ingest_run_id string")
    (sdf.repartition("window", "cell_shard").sortWithinPartitions("serving_cell_id")
        .write.partitionBy(*MDT_REPORTS.partition_by).parquet(lake.uri("mdt_reports") + "/spark-run1"))
    version = lake.commit_spark_dir("mdt_reports", "spark-run1", app_id="run1:ingest:mdt_reports")
    assert version == 0
    assert lake.commit_spark_dir("mdt_reports", "spark-run1", app_id="run1:ingest:mdt_reports") == 0
    back = lake.read_pandas("mdt_reports").sort_values("report_id").reset_index(drop=True)
    expected = pdf.sort_values("report_id").reset_index(drop=True)
    pd.testing.assert_series_equal(back["rsrp_dbm"], expected["rsrp_dbm"])
    assert (back["window"] == expected["window"]).all()
    assert (back["cell_shard"] == expected["cell_shard"]).all()
    assert back["ts"].iloc[0] == pd.Timestamp("2026-01-05T01:00:00Z")
    assert {t.name: t.n_rows for t in lake.tables()}["mdt_reports"] == 40
