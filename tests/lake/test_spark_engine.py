import pandas as pd
import pytest

from cellsynth.errors import LakeError
from cellsynth.lake.spark_engine import SparkDeltaLake, delta_jars_available


def _metrics():
    return pd.DataFrame({"run_id": ["r"], "stage": ["evaluate"], "metric": ["mae"], "value": [2.5]})


def test_delta_spark_engine_without_jars_says_what_to_do(spark, tmp_path):
    if delta_jars_available(spark):
        pytest.skip("Delta jars present: the error path does not apply")
    lake = SparkDeltaLake(str(tmp_path), spark=lambda: spark)
    with pytest.raises(LakeError, match=r"lake\.engine: delta-spark needs the Delta Lake jars"):
        lake.write("metrics", _metrics())


def test_delta_spark_round_trip_matches_delta_rs(spark, tmp_path):
    if not delta_jars_available(spark):
        pytest.skip("Delta Lake jars are not on this Spark's classpath (they come from Maven)")
    lake = SparkDeltaLake(str(tmp_path), spark=lambda: spark)
    lake.write("metrics", _metrics(), app_id="a")
    assert lake.write("metrics", _metrics(), app_id="a") == 0
    from cellsynth.lake import Lake

    assert Lake(tmp_path).read_pandas("metrics")["value"].tolist() == [2.5]
