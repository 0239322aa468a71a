"""Reading a (window, cell_shard)-partitioned table one partition at a time, so a driver that
needs a sample or a count of a table holds one partition, not the table (issue 15: a flat driver)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa

PARTITION_COLS = ["window", "cell_shard"]

Filter = list[tuple[str, str, Any]]


def partition_filters(lake: Any, table: str, *, version: int | None = None) -> list[Filter | None]:
    """One read filter per (window, cell_shard) partition of `table` at `version` (latest when
    None), from the Delta log's file list, in sorted order; [None] (one whole read) when the
    table is not partitioned so or a partition value is null."""
    dt = lake.open_table(table, version)
    if list(dt.metadata().partition_columns) != PARTITION_COLS:
        return [None]
    adds = pa.table(dt.get_add_actions(flatten=True))
    pairs = set(zip(adds.column("partition.window").to_pylist(), adds.column("partition.cell_shard").to_pylist()))
    if not pairs or any(w is None or c is None for w, c in pairs):
        return [None]
    return [[("window", "=", w), ("cell_shard", "=", int(c))] for w, c in sorted(pairs)]


def window_filters(lake: Any, table: str, *, version: int | None = None) -> list[Filter | None]:
    """One read filter per window of a (window, cell_shard)-partitioned table, in sorted order;
    [None] (one whole read) otherwise."""
    filters = partition_filters(lake, table, version=version)
    if filters == [None]:
        return [None]
    return [[("window", "=", w)] for w in sorted({f[0][2] for f in filters})]


def read_part(lake: Any, table: str, columns: list[str], flt: Filter | None, *, version: int | None = None) -> pd.DataFrame:
    """The rows of one partition (`flt` from `partition_filters`; None: the whole table)."""
    return lake.read_pandas(table, columns=columns, version=version, filters=flt or None)


def read_partitions(lake: Any, table: str, columns: list[str], *, version: int | None = None) -> Iterator[pd.DataFrame]:
    """`table`'s rows at `version`, one partition per frame."""
    for flt in partition_filters(lake, table, version=version):
        yield read_part(lake, table, columns, flt, version=version)
