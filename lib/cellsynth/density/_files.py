"""Position files of the KDE models, beside the lake tables (<lake_root>/models/kde/<run_id>/...)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from cellsynth.lake import Lake


def _resolve(root: Any, rel_path: str) -> tuple[fs.FileSystem, str]:
    """`root`: a Lake (its filesystem carries the endpoint and credentials) or a local path."""
    if isinstance(root, Lake):
        filesystem, base = root.filesystem()
        return filesystem, f"{base}/{rel_path}"
    root = str(root)
    if "://" in root:
        filesystem, base = fs.FileSystem.from_uri(root.rstrip("/"))
        return filesystem, f"{base}/{rel_path}"
    return fs.LocalFileSystem(), os.path.join(os.path.abspath(root), rel_path)


def positions_rel_path(run_id: str, window: str, shard: int | str) -> str:
    return f"models/kde/{run_id}/window={window}/shard={shard}.parquet"


def write_positions(root: Any, rel_path: str, frame: pd.DataFrame) -> None:
    """Write (window, cell_id, x_m, y_m) rows; rewriting the same path on a retry is harmless."""
    filesystem, path = _resolve(root, rel_path)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    table = pa.Table.from_pandas(frame[["window", "cell_id", "x_m", "y_m"]], preserve_index=False)
    tmp = path + ".tmp"
    pq.write_table(table, tmp, filesystem=filesystem)
    filesystem.move(tmp, path)


def read_positions(root: Any, rel_path: str) -> pd.DataFrame:
    filesystem, path = _resolve(root, rel_path)
    return pq.read_table(path, filesystem=filesystem).to_pandas()


# Per process: the position files read so far, grouped by (window, cell_id), keyed by where the
# file is and its size and modification time (a rewrite, i.e. a new model version, gives another
# key, so it is never served from here). A Ray worker runs many generate tile tasks, each with
# its own unpickled DensityModels; without this every task reread and regrouped every file it
# touched. Least recently used entries go past GROUPED_CACHE_BYTES.
GROUPED_CACHE_BYTES = 512 * 2**20
_grouped: OrderedDict[tuple[Any, ...], tuple[np.ndarray, dict[tuple[str, str], np.ndarray], int]] = OrderedDict()
_grouped_lock = threading.Lock()


def read_positions_grouped(root: Any, rel_path: str) -> tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]:
    """A position file's (n, 2) x_m, y_m array and each (window, cell_id)'s row indices into it
    (in file order), from the per-process cache when the file is unchanged. Treat both as
    read-only: they are shared by every caller in the process."""
    filesystem, path = _resolve(root, rel_path)
    if isinstance(filesystem, fs.LocalFileSystem):  # write_positions' rename gives a rewrite a new inode
        st = os.stat(path)
        key: tuple[Any, ...] | None = ("local", path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    else:
        info = filesystem.get_file_info(path)
        key = None if info.mtime_ns is None else (filesystem.type_name, path, info.size, info.mtime_ns)
    if key is not None:
        with _grouped_lock:
            hit = _grouped.get(key)
            if hit is not None:
                _grouped.move_to_end(key)
                return hit[0], hit[1]
    frame = read_positions(root, rel_path)
    groups = frame.groupby(["window", "cell_id"], sort=False).indices
    xy = frame[["x_m", "y_m"]].to_numpy(dtype=float)
    if key is not None:
        size = xy.nbytes + sum(v.nbytes for v in groups.values())
        with _grouped_lock:
            _grouped[key] = (xy, groups, size)
            total = sum(v[2] for v in _grouped.values())
            while total > GROUPED_CACHE_BYTES and len(_grouped) > 1:
                total -= _grouped.popitem(last=False)[1][2]
    return xy, groups
