"""Which partitions of a table changed between two Delta versions (partition-level version diff:
the data files of each partition at both versions; any added or removed file marks it), and,
reading only the added and removed files, which rows changed in them.

A compaction between the versions (an OPTIMIZE commit: `cellsynth optimize`, an operator's own) rewrites
files without changing a row, and a what-if's append adds rows the measured network's readers leave out, so
the diff is taken over the commits that may change those rows only: each run of consecutive such commits is
diffed on its own, and a compaction's or a what-if's files are no change. Without that, one
compaction made every compacted partition look rewritten and an incremental run retrain it in full."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cellsynth.errors import LakeError
from cellsynth.lake.table import Lake


def _files_by_partition(lake: Lake, table: str, version: int | None, cols: tuple[str, ...]) -> dict[tuple, set[str]]:
    if version is None:
        return {}
    actions = pa.table(lake.open_table(table, version).get_add_actions(flatten=True)).to_pylist()
    out: dict[tuple, set[str]] = {}
    for act in actions:
        key = tuple(None if act.get(f"partition.{c}") is None else str(act[f"partition.{c}"]) for c in cols)
        out.setdefault(key, set()).add(act["path"])
    return out


def _row_segments(lake: Lake, table: str, since: int, until: int) -> list[tuple[int, int]]:
    """(from, to) version pairs whose diffs together are the row changes between `since` and `until`: the runs
    of consecutive commits that may move rows (`Lake.moving_versions`: not a compaction, not a what-if's append)."""
    if until <= since:
        return [(since, until)]
    moving = lake.moving_versions(table, since, until)
    segments: list[tuple[int, int]] = []
    for v in moving:
        if segments and segments[-1][1] == v - 1:
            segments[-1] = (segments[-1][0], v)
        else:
            segments.append((v - 1, v))
    return segments


def _partition_diff(lake: Lake, table: str, since: int | None, until: int | None,
                    cols: tuple[str, ...]) -> dict[tuple, tuple[set[str], set[str]]]:
    """Per partition key, the (added, removed) data files between `since` (None: no table, every file is
    added) and `until`, over the commits that may change rows (module docstring); partitions without
    either are left out. Falls back to the plain diff of the two versions when an intermediate version
    cannot be opened (its log was cleaned up): a superset of the changes."""
    if since is None:
        return {k: (files, set()) for k, files in _files_by_partition(lake, table, until, cols).items()}
    segments: list[tuple[int, int | None]] = [(since, until)]
    try:
        if until is not None:
            segments = list(_row_segments(lake, table, since, until))
        snapshots = {v: _files_by_partition(lake, table, v, cols) for seg in segments for v in seg}
    except LakeError:
        segments = [(since, until)]
        snapshots = {v: _files_by_partition(lake, table, v, cols) for v in (since, until)}
    out: dict[tuple, tuple[set[str], set[str]]] = {}
    for lo, hi in segments:
        old, new = snapshots[lo], snapshots[hi]
        for key in old.keys() | new.keys():
            before, after = old.get(key, set()), new.get(key, set())
            if before != after:
                added, removed = out.setdefault(key, (set(), set()))
                added |= after - before
                removed |= before - after
    return out


def changed_partitions(lake: Lake, table: str, since_version: int | None, *, until_version: int | None = None,
                       partition_cols: tuple[str, ...] = ("window", "cell_shard")) -> set[tuple[str | None, ...]]:
    """Partition keys (as strings, in `partition_cols` order) whose files differ between
    `since_version` (None: the table did not exist, so every partition changed) and
    `until_version` (None: latest)."""
    until = lake.version(table) if until_version is None else until_version
    return set(_partition_diff(lake, table, since_version, until, partition_cols))


def changed_cells(lake: Lake, table: str, since_version: int | None, *, cell_col: str,
                  until_version: int | None = None) -> dict[tuple[str, int], set[str] | None]:
    """The changed (window, cell_shard) partitions of `table`, each with the cells whose rows changed.

    A partition whose change only added files (an append, e.g. one new day of MDT) maps to the
    set of `cell_col` values in the added files; one that lost a file (a rewrite or a delete)
    maps to None: every cell in it may have changed.
    """
    cols = ("window", "cell_shard")
    until = lake.version(table) if until_version is None else until_version
    out: dict[tuple[str, int], set[str] | None] = {}
    for key, (added, removed) in _partition_diff(lake, table, since_version, until, cols).items():
        part = (str(key[0]), int(key[1]))
        if since_version is None or removed:
            out[part] = None
            continue
        fs, base = lake.filesystem()
        files = [f"{base}/{table}/{path}" for path in sorted(added)]
        try:
            cells = ds.dataset(files, format="parquet", filesystem=fs).to_table(columns=[cell_col])[cell_col]
        except FileNotFoundError:  # an added file a later compaction replaced, since vacuumed
            out[part] = None
            continue
        out[part] = {str(c) for c in pc.unique(cells).to_pylist()}
    return out


def _read_files(lake: Lake, table: str, paths: set[str], columns: list[str]) -> pd.DataFrame:
    fs, base = lake.filesystem()
    files = [f"{base}/{table}/{path}" for path in sorted(paths)]
    return ds.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns).to_pandas()


def changed_rows(lake: Lake, table: str, since_version: int | None, *, columns: list[str],
                 until_version: int | None = None) -> dict[tuple[str, int], pd.DataFrame | None]:
    """The rows that changed in each changed (window, cell_shard) partition between two versions.

    Reads only the data files added or removed between the versions (never the whole table):
    each changed partition maps to a frame of `columns` plus `change` (+1 added, -1 removed),
    where a row found in both a removed and an added file (a compaction, or a rewrite that kept
    it) cancels out. A partition maps to None when its rows cannot be told apart: the table did
    not exist at `since_version`, or a removed file is gone (vacuumed).
    """
    cols = ("window", "cell_shard")
    until = lake.version(table) if until_version is None else until_version
    out: dict[tuple[str, int], pd.DataFrame | None] = {}
    for key, (added, removed) in _partition_diff(lake, table, since_version, until, cols).items():
        part = (str(key[0]), int(key[1]))
        if since_version is None:
            out[part] = None
            continue
        try:
            frames = [_read_files(lake, table, paths, columns).assign(change=sign)
                      for paths, sign in ((added, 1), (removed, -1)) if paths]
        except FileNotFoundError:
            out[part] = None
            continue
        rows = pd.concat(frames, ignore_index=True)
        if (rows["change"] < 0).any():
            rows = rows.groupby(columns, dropna=False, sort=False, as_index=False)["change"].sum()
            rows = rows[rows["change"] != 0].reset_index(drop=True)
        out[part] = rows
    return out


def changed_model_partitions(lake: Lake, table: str, since_version: int | None, *, windows: list[str],
                             until_version: int | None = None) -> set[tuple[str, int]]:
    """(window, cell_shard) whose model rows (kde_models, radio_models) differ between two versions.

    Rows compare on (window, cell_id, cell_shard, run_id, path); a row without a window (radio
    models fit on every window) marks its shard in every one of `windows`. The area density's
    shard (-1) is left out: it is not a partition of any output.
    """
    cols = ["window", "cell_id", "cell_shard", "run_id", "path"]

    def rows(version: int | None) -> set[tuple]:
        if version is None:
            return set()
        frame = lake.read(table, version=version, columns=cols).to_pylist()
        return {tuple(r[c] for c in cols) for r in frame}

    until = lake.version(table) if until_version is None else until_version
    diff = rows(since_version) ^ rows(until)
    out: set[tuple[str, int]] = set()
    for window, _cell, shard, _run, _path in diff:
        if shard is None or int(shard) < 0:
            continue
        for w in ([window] if window is not None else windows):
            out.add((str(w), int(shard)))
    return out
