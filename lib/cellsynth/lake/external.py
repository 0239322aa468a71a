"""Delta tables that live outside the cellsynth lake (an operator's MDT table), read by URI and
version. delta-rs resolves the snapshot, so Spark can read its Parquet files without the
delta-spark jars: `spark.read.option("basePath", snap.uri).parquet(*snap.files)`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from cellsynth.errors import LakeError


@dataclass(frozen=True)
class DeltaSnapshot:
    uri: str
    version: int
    files: tuple[str, ...]  # absolute URIs of the snapshot's data files
    partition_columns: tuple[str, ...]
    schema: pa.Schema


def _open(uri: str, version: int | None, storage_options: dict[str, str] | None) -> DeltaTable:
    try:
        return DeltaTable(uri, version=version, storage_options=storage_options or None)
    except TableNotFoundError as err:
        raise LakeError(f"delta source: no Delta table at {uri}") from err
    except DeltaError as err:
        raise LakeError(f"delta source {uri}: cannot open version {version}: {err}") from err


def delta_snapshot(uri: str, *, version: int | None = None, storage_options: dict[str, str] | None = None) -> DeltaSnapshot:
    """The data files of `uri` at `version` (latest when None).

    Raises:
        LakeError: no table at `uri`, the version does not exist, or the table uses deletion
            vectors (its Parquet files alone would resurrect deleted rows).
    """
    dt = _open(uri, version, storage_options)
    features = set(getattr(dt.protocol(), "reader_features", None) or ())
    if "deletionVectors" in features:
        raise LakeError(f"delta source {uri}: deletion vectors are not supported; read it with delta-spark")
    schema = pa.schema(dt.schema().to_arrow())
    return DeltaSnapshot(uri.rstrip("/"), dt.version(), tuple(dt.file_uris()),
                         tuple(dt.metadata().partition_columns), schema)


def _local_filesystem(dt: DeltaTable, uri: str) -> pafs.FileSystem | None:
    """pyarrow's local filesystem rooted at a local table whose files the log names by relative path (delta-rs'
    handler, the default, can abort the interpreter at exit: `Lake.table_filesystem`); None otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or (parsed.scheme == "" and "://" in uri):
        return None
    paths = pa.table(dt.get_add_actions(flatten=True)).column("path").to_pylist()
    if any(p.startswith("/") or "://" in p for p in paths):  # absolute paths (e.g. a shallow clone's)
        return None
    return pafs.SubTreeFileSystem(str(Path(unquote(parsed.path) if parsed.scheme else uri).resolve()), pafs.LocalFileSystem())


def read_delta(uri: str, *, version: int | None = None, columns: list[str] | None = None,
               storage_options: dict[str, str] | None = None) -> pa.Table:
    """Read an external Delta table (or some columns of it) at a version."""
    dt = _open(uri, version, storage_options)
    return dt.to_pyarrow_dataset(filesystem=_local_filesystem(dt, uri)).to_table(columns=columns)
