"""Position files of the KDE models, beside the lake tables (<lake_root>/models/kde/<run_id>/...)."""

from __future__ import annotations

import os
from typing import Any

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
