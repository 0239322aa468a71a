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


class _FakeSpark:
    """Just enough of a SparkSession for SparkDeltaLake without the Delta jars: its writer commits through
    delta-rs the way Spark's Delta source does (replaceWhere, txnAppId/txnVersion, userMetadata in the
    commit info), its reader loads through delta-rs and applies "col = 'value'" conditions."""

    def __init__(self):
        import types

        self._jvm = types.SimpleNamespace(java=types.SimpleNamespace(lang=types.SimpleNamespace(
            Class=types.SimpleNamespace(forName=lambda name: name))))
        self.saved: list[dict] = []
        self.read = _FakeReader()

    def createDataFrame(self, frame):  # noqa: N802 (Spark's name)
        import types

        return types.SimpleNamespace(write=_FakeWriter(self, frame))


class _FakeWriter:
    def __init__(self, spark, frame):
        self.spark, self.frame, self.opts, self.parts, self.how = spark, frame, {}, None, "append"

    def format(self, _):
        return self

    def mode(self, how):
        self.how = how
        return self

    def partitionBy(self, *cols):  # noqa: N802
        self.parts = list(cols)
        return self

    def option(self, key, value):
        self.opts[key] = value
        return self

    def save(self, uri):
        import pyarrow as pa
        from deltalake import CommitProperties, Transaction, write_deltalake

        self.spark.saved.append(dict(self.opts))
        txn = [Transaction(app_id=self.opts["txnAppId"], version=1)] if "txnAppId" in self.opts else None
        meta = {"userMetadata": self.opts["userMetadata"]} if "userMetadata" in self.opts else None
        write_deltalake(uri, pa.Table.from_pandas(self.frame, preserve_index=False), mode=self.how,
                        predicate=self.opts.get("replaceWhere"), partition_by=self.parts,
                        schema_mode="merge" if self.opts.get("mergeSchema") else None,
                        commit_properties=CommitProperties(custom_metadata=meta, app_transactions=txn))


class _FakeReader:
    def format(self, _):
        return self

    def option(self, *_):
        return self

    def load(self, uri):
        from deltalake import DeltaTable

        return _FakeFrame(DeltaTable(uri).to_pyarrow_table())


class _FakeFrame:
    def __init__(self, table):
        self.table = table
        self.columns = table.column_names

    def where(self, cond):  # "col = 'v'", "(col = 'v' OR col IS NULL)"
        import pyarrow.compute as pc

        keep = None
        for term in cond.strip("()").split(" OR "):
            if term.endswith(" IS NULL"):
                hit = pc.is_null(self.table[term.removesuffix(" IS NULL")])
            else:
                col, value = (x.strip() for x in term.split(" = "))
                hit = pc.fill_null(pc.equal(self.table[col], value.strip("'")), False)
            keep = hit if keep is None else pc.or_(keep, hit)
        return _FakeFrame(self.table.filter(keep))

    def select(self, *cols):
        return _FakeFrame(self.table.select(list(cols)))

    def toArrow(self):  # noqa: N802
        return self.table


def test_delta_spark_engine_keeps_notes_app_ids_and_the_baseline_filter(tmp_path):
    """Under lake.engine delta-spark a what-if's writes must carry the same commit metadata as under delta-rs
    (its rows row-neutral for the measured network, its app id honoured after a restore), and reads give the
    measured network's rows unless asked; the write took no `note` and the read no `network_scenario` before."""
    from cellsynth.lake import Lake

    spark = _FakeSpark()
    lake = SparkDeltaLake(str(tmp_path), spark=lambda: spark)

    def fields(scenario, run):
        return pd.DataFrame({"network_scenario": [scenario], "x_m": [0.0], "y_m": [0.0], "best_cell_id": ["a"],
                             "rsrp_dbm": [-80.0], "rsrp_dbm_epistemic_std": [1.0], "user_weight": [1.0],
                             "is_changed_cell": [False], "run_id": [run]})

    lake.write("network_fields", fields("baseline", "r1"), app_id="base")
    v = lake.write("network_fields", fields("infill", "w1"), app_id="w1", note={"network_scenario": "infill"})
    assert spark.saved[-1]["userMetadata"] == '{"cellsynth": "{\\"network_scenario\\": \\"infill\\"}", "cellsynth_app_id": "w1"}'
    assert lake.commit_note("network_fields") == {"network_scenario": "infill"}
    assert lake.moving_versions("network_fields", v - 1, v) == []  # the scenario's append moves no measured row
    assert lake.read_pandas("network_fields")["run_id"].tolist() == ["r1"]
    assert lake.read_pandas("network_fields", network_scenario="infill")["run_id"].tolist() == ["w1"]
    assert len(lake.read_pandas("network_fields", network_scenario=None)) == 2
    # the app id is found in userMetadata: after a restore past its commit, the rerun writes again
    assert lake.write("network_fields", fields("infill", "w1"), app_id="w1") == v
    Lake(tmp_path).restore("network_fields", v - 1)
    assert lake.write("network_fields", fields("infill", "w1"), app_id="w1", note={"network_scenario": "infill"}) == v + 2
    assert lake.read_pandas("network_fields", network_scenario="infill")["run_id"].tolist() == ["w1"]
