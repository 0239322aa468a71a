"""Reading a (window, cell_shard)-partitioned table one partition at a time, so a driver that
needs a sample or a count of a table holds one partition, not the table (issue 15: a flat driver)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from cellsynth.lake.table import scan_scenario

PARTITION_COLS = ["window", "cell_shard"]

Filter = list[tuple[str, str, Any]]


class PartitionReader:
    """One table version, opened once and read one partition (or one window) at a time.

    A read through the Delta log with a partition filter (`Lake.read`) builds the pyarrow
    dataset of every data file of the table and prunes it: at 10^3 cells, 0.3 s per partition of
    mdt_measurements (1,524 files), so reading its 512 partitions one by one took the generate
    stage's driver ~170 s of ~20 s of reading (issue 15, incremental regeneration). Here the
    dataset is built once, its files are grouped by partition, and a partition's read scans only
    its own files (~3 ms). The rows, their order and the version are those of `Lake.read` with
    the same filter, including its default `network_scenario = 'baseline'`.
    """

    def __init__(self, lake: Any, table: str, *, version: int | None = None) -> None:
        self.lake, self.table = lake, table
        dt = lake.open_table(table, version)
        self.version = dt.version()
        self._dataset = lake.dataset(table, dt=dt)
        # per partition its files, in the dataset's order (the order a filtered read returns rows in)
        self._groups: dict[tuple[str, int], list[Any]] | None = None
        self._keyed: list[tuple[tuple[str, int], Any]] = []
        if list(dt.metadata().partition_columns) == PARTITION_COLS:
            groups: dict[tuple[str, int], list[Any]] = {}
            for frag in self._dataset.get_fragments():
                keys = ds.get_partition_keys(frag.partition_expression)
                w, s = keys.get("window"), keys.get("cell_shard")
                if w is None or s is None:  # a null partition value: read the table whole
                    groups, self._keyed = {}, []
                    break
                groups.setdefault((str(w), int(s)), []).append(frag)
                self._keyed.append(((str(w), int(s)), frag))
            self._groups = groups or None

    @property
    def filters(self) -> list[Filter | None]:
        """One read filter per (window, cell_shard) partition, in sorted order; [None] (one whole
        read) when the table is not partitioned so or a partition value is null."""
        if self._groups is None:
            return [None]
        return [[("window", "=", w), ("cell_shard", "=", s)] for w, s in sorted(self._groups)]

    @property
    def window_filters(self) -> list[Filter | None]:
        """One read filter per window, in sorted order; [None] when not partitioned so."""
        if self._groups is None:
            return [None]
        return [[("window", "=", w)] for w in sorted({w for w, _ in self._groups})]

    def read(self, columns: list[str] | None, flt: Filter | None) -> pd.DataFrame:
        """The rows of one partition or window (`flt` from `filters` / `window_filters`; columns
        None: all); other filters go through `Lake.read`."""
        frags = self._fragments(flt)
        if frags is None:
            return self.lake.read_pandas(self.table, columns=columns, version=self.version, filters=flt or None)
        return self._read_fragments(columns, frags)

    def read_shards(self, columns: list[str] | None, shards: list[int]) -> pd.DataFrame:
        """The rows of every partition whose cell_shard is in `shards`, all windows: the rows of
        `Lake.read` with the filter ("cell_shard", "in", shards) (in the dataset's file order)."""
        if self._groups is None:
            return self.lake.read_pandas(self.table, columns=columns, version=self.version,
                                         filters=[("cell_shard", "in", [int(s) for s in shards])])
        want = {int(s) for s in shards}
        return self._read_fragments(columns, [f for (_, s), f in self._keyed if s in want])

    def _read_fragments(self, columns: list[str] | None, frags: list[Any]) -> pd.DataFrame:
        if not frags:  # no file: the empty frame of the columns
            empty = self._dataset.schema.empty_table()
            return (empty if columns is None else empty.select(columns)).to_pandas()
        sub = ds.FileSystemDataset(frags, self._dataset.schema, self._dataset.format, self._dataset.filesystem)
        return scan_scenario(sub, columns, None, "baseline").to_pandas()

    def _fragments(self, flt: Filter | None) -> list[Any] | None:
        if self._groups is None or not flt:
            return None
        if len(flt) == 2 and [(c, op) for c, op, _ in flt] == [("window", "="), ("cell_shard", "=")]:
            return list(self._groups.get((str(flt[0][2]), int(flt[1][2])), []))
        if len(flt) == 1 and (flt[0][0], flt[0][1]) == ("window", "="):
            return [f for (w, _), f in self._keyed if w == str(flt[0][2])]
        return None


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


def read_partitions(lake: Any, table: str, columns: list[str], *, version: int | None = None) -> Iterator[pd.DataFrame]:
    """`table`'s rows at `version`, one partition per frame."""
    reader = PartitionReader(lake, table, version=version)
    for flt in reader.filters:
        yield reader.read(columns, flt)
