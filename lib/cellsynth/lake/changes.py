"""Which partitions of a table changed between two Delta versions (partition-level version diff:
the data files of each partition at both versions; any added or removed file marks it)."""

from __future__ import annotations

import pyarrow as pa

from cellsynth.lake.table import Lake


def _files_by_partition(lake: Lake, table: str, version: int | None, cols: tuple[str, ...]) -> dict[tuple, set[str]]:
    if version is None:
        return {}
    actions = pa.table(lake._open(table, version).get_add_actions(flatten=True)).to_pylist()
    out: dict[tuple, set[str]] = {}
    for act in actions:
        key = tuple(None if act.get(f"partition.{c}") is None else str(act[f"partition.{c}"]) for c in cols)
        out.setdefault(key, set()).add(act["path"])
    return out


def changed_partitions(lake: Lake, table: str, since_version: int | None, *, until_version: int | None = None,
                       partition_cols: tuple[str, ...] = ("window", "cell_shard")) -> set[tuple[str | None, ...]]:
    """Partition keys (as strings, in `partition_cols` order) whose files differ between
    `since_version` (None: the table did not exist, so every partition changed) and
    `until_version` (None: latest)."""
    until = lake.version(table) if until_version is None else until_version
    old = _files_by_partition(lake, table, since_version, partition_cols)
    new = _files_by_partition(lake, table, until, partition_cols)
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
