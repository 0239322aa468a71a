"""`lake.engine: delta-spark`: reads and writes through Spark's Delta data source, for clusters
that ship the Delta Lake jars. Staged files, commits of Spark output, history and upkeep stay
on delta-rs: both speak the same Delta protocol, so tables are interchangeable."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa

from cellsynth.errors import LakeError
from cellsynth.lake.table import FilterType, Lake, WriteMode, _to_arrow, commit_metadata, merges_schema
from cellsynth.schemas import TableSpec, spec


def delta_jars_available(spark: Any) -> bool:
    """True when the session's JVM can load Delta Lake (the jars are on the classpath)."""
    try:
        spark._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
    except Exception:  # py4j raises its own error types for a missing class
        return False
    return True


def _sql_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


class SparkDeltaLake(Lake):
    """A `Lake` whose reads and writes go through delta-spark."""

    def __init__(self, root: str, *, spark: Callable[[], Any], **kwargs: Any):
        super().__init__(root, **kwargs)
        self._spark_factory = spark

    @property
    def _spark(self) -> Any:
        session = self._spark_factory()
        if not delta_jars_available(session):
            raise LakeError("lake.engine: delta-spark needs the Delta Lake jars on Spark's classpath (io.delta:delta-spark); "
                            "use lake.engine: delta-rs or add the jars (see deploy/Dockerfile)")
        return session

    def read(self, table: str, *, version: int | None = None, columns: list[str] | None = None,
             filters: FilterType | None = None, network_scenario: str | None = "baseline") -> pa.Table:
        """`Lake.read` through Spark: the measured network's rows ('baseline') unless another scenario is named."""
        reader = self._spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        df = reader.load(self.uri(table))
        if network_scenario is not None and "network_scenario" in df.columns:
            tag = f"network_scenario = {_sql_literal(network_scenario)}"  # untagged rows are the measured network's
            df = df.where(f"({tag} OR network_scenario IS NULL)" if network_scenario == "baseline" else tag)
        for col, op, value in filters or ():
            if op in ("in", "not in"):
                cond = f"{col} {'NOT ' if op == 'not in' else ''}IN ({', '.join(_sql_literal(v) for v in value)})"
            else:
                cond = f"{col} {'=' if op == '==' else op} {_sql_literal(value)}"
            df = df.where(cond)
        if columns:
            df = df.select(*columns)
        return df.toArrow()

    def write(self, table: str, data: pa.Table | pd.DataFrame, *, mode: WriteMode = "append",
              predicate: str | None = None, app_id: str | None = None, table_spec: TableSpec | None = None,
              note: dict[str, Any] | None = None) -> int:
        """`Lake.write` through Spark. The note and app id go into the commit's `userMetadata` (Spark has no
        other per-commit metadata), where the history readers look too. Spark records a replaceWhere
        predicate in its own form, so a what-if's replacement of its rows counts as a change there (the
        stages after it rerun; on the safe side)."""
        done = self._already(table, app_id)
        if done is not None:
            return done
        tspec = table_spec or spec(table)
        arrow = tspec.conform(_to_arrow(data))
        writer = self._spark.createDataFrame(arrow.to_pandas()).write.format("delta").mode(mode)
        if tspec.partition_by:
            writer = writer.partitionBy(*tspec.partition_by)
        if predicate:
            writer = writer.option("replaceWhere", predicate)
        if merges_schema(tspec, mode, predicate):
            writer = writer.option("mergeSchema", "true")  # e.g. more neighbour columns than the table has
        if app_id:  # Delta's idempotent writes: the same (appId, version) pair commits once
            writer = writer.option("txnAppId", app_id).option("txnVersion", 1)
        meta = commit_metadata(app_id, note)
        if meta:
            writer = writer.option("userMetadata", json.dumps(meta, sort_keys=True))
        writer.save(self.uri(table))
        return self.open_table(table).version()
