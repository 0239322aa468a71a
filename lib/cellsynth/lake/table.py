"""`Lake`: the one place that opens, reads, writes and time-travels Delta tables (delta-rs).

Writes are atomic per table (one Delta commit). Data files can be staged anywhere (a Ray actor,
a Spark job) and committed later by the driver in one transaction, so a killed writer leaves the
table at its last good version: uncommitted files are invisible to every Delta reader and are
removed by VACUUM. Commits may carry an app-transaction id (Delta `txn` action); a commit whose
id the table already holds is skipped, which makes reruns idempotent.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Schema, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, Transaction

from cellsynth.errors import CommitConflictError, LakeError
from cellsynth.schemas import TableSpec, spec

FilterType = Sequence[tuple[str, str, Any]]
WriteMode = Literal["append", "overwrite"]
# Key of a commit's cellsynth note in the Delta commit metadata (`commit_files(note=)`, `commit_note`).
NOTE_KEY = "cellsynth"
# Key of the app id in the commit metadata of a commit that carries one (`Lake._already`).
APP_ID_KEY = "cellsynth_app_id"
_OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl")
# Commits that leave a table's rows as they were: a compaction (`cellsynth optimize`, or an operator's own
# OPTIMIZE / Z-order) rewrites files with dataChange false; a vacuum deletes files no version reads. A stage
# whose inputs moved only by these is not rerun (`Lake.rows_changed`).
ROW_NEUTRAL_OPERATIONS = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END"})
# Key of the commit note that says a commit only appended rows of this what-if network scenario (`cellsynth
# whatif`): `Lake.read` leaves them out unless asked, so a stage reading the measured network's rows is not
# rerun for them either.
SCENARIO_NOTE = "network_scenario"


@dataclass(frozen=True)
class TableInfo:
    name: str
    version: int
    n_rows: int
    n_files: int


def _is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in _OBJECT_SCHEMES


def _to_arrow(data: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"expected a pyarrow Table or pandas DataFrame, got {type(data).__name__}")


def _partition_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _stats(table: pa.Table) -> str:
    """Delta add-action statistics: row count, min/max and null counts of flat numeric/str columns."""
    mins, maxs, nulls = {}, {}, {}
    for name, col in zip(table.column_names, table.columns):
        nulls[name] = col.null_count
        typ = col.type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_string(typ)):
            continue
        if col.null_count == len(col):
            continue
        mm = pc.min_max(col)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if isinstance(lo, float) and (lo != lo or hi != hi):  # NaN poisons stats-based skipping
            continue
        mins[name], maxs[name] = lo, hi
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls},
        default=str,
    )


def _commit_meta(commit: dict[str, Any], key: str) -> Any:
    """A cellsynth key of one `history()` entry: delta-rs writes it into the commit info itself, delta-spark
    into its `userMetadata` (a JSON object; `SparkDeltaLake.write`)."""
    if key in commit:
        return commit[key]
    raw = commit.get("userMetadata")
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return meta.get(key) if isinstance(meta, dict) else None


def _note_of(commit: dict[str, Any]) -> dict[str, Any]:
    """The cellsynth note (`commit_files(note=)`) of one `history()` entry; {} when it has none."""
    raw = _commit_meta(commit, NOTE_KEY)
    try:
        note = json.loads(raw) if isinstance(raw, str) else (raw or {})
    except ValueError:
        return {}
    return note if isinstance(note, dict) else {}


def commit_metadata(app_id: str | None, note: dict[str, Any] | None) -> dict[str, str]:
    """The cellsynth keys a commit carries: its note (`commit_note`) and its app id (`Lake._already`)."""
    return {**({NOTE_KEY: json.dumps(note)} if note else {}), **({APP_ID_KEY: app_id} if app_id else {})}


def merges_schema(tspec: TableSpec, mode: str, predicate: str | None) -> bool:
    """Whether a write adds the columns the table lacks: tables with optional column families (neighbour
    columns) or defaulted columns, on an append or a predicate overwrite (a full overwrite sets the schema)."""
    return bool(tspec.extra_prefixes or tspec.defaults) and (mode == "append" or bool(predicate))


def scenario_filter(name: str) -> pc.Expression:
    """The rows of one network scenario; 'baseline' also takes rows without a tag (written before the
    column existed: the measured network's)."""
    field = pc.field(SCENARIO_NOTE)
    return (field == name) | field.is_null() if name == "baseline" else field == name


def scan_scenario(source: Any, columns: list[str] | None, expr: pc.Expression | None, scenario: str | None) -> pa.Table:
    """`source.to_table` (a pyarrow dataset) of one network scenario's rows (None: every row). The baseline
    filter runs after the scan: delta-rs gives a file written before the column existed the guarantee
    `network_scenario >= null and <= null`, which makes pyarrow skip that file under any filter on the
    column, i.e. every measured row of a table that gained the column later. Another scenario's filter is
    pushed down (such files hold none of its rows)."""
    if scenario is None or SCENARIO_NOTE not in source.schema.names:
        return source.to_table(columns=columns, filter=expr)
    if scenario != "baseline":
        tag = scenario_filter(scenario)
        return source.to_table(columns=columns, filter=tag if expr is None else expr & tag)
    cols = None if columns is None else list(dict.fromkeys([*columns, SCENARIO_NOTE]))
    rows = source.to_table(columns=cols, filter=expr).filter(scenario_filter("baseline"))
    return rows if columns is None or SCENARIO_NOTE in columns else rows.drop_columns([SCENARIO_NOTE])


def scenario_predicate(name: str) -> str:
    """The SQL predicate of a what-if's own rows (`network_scenario` names are [A-Za-z0-9_.-]+)."""
    return f"{SCENARIO_NOTE} = '{name}'"


def _moving_versions(dt: DeltaTable, since_version: int, until_version: int) -> list[int]:
    """`Lake.moving_versions` on an opened table."""
    if until_version <= since_version:
        return []
    hist = {h.get("version"): h for h in dt.history(max(dt.version() - since_version, 1))}

    def moves(v: int) -> bool:
        h = hist.get(v)
        if h is None:
            return True
        if h.get("operation") in ROW_NEUTRAL_OPERATIONS:
            return False
        scenario = _note_of(h).get(SCENARIO_NOTE)
        if scenario in (None, "baseline") or h.get("operation") != "WRITE":
            return True
        # a what-if's rows only: appended, or replacing the same scenario's earlier rows and nothing else
        params = h.get("operationParameters") or {}
        if params.get("mode") == "Append":
            return False
        return not (params.get("mode") == "Overwrite" and params.get("predicate") == scenario_predicate(scenario))

    return [v for v in range(since_version + 1, until_version + 1) if moves(v)]


class Lake:
    """Delta tables under one root (a local folder or an object-store URI).

    Args:
        root: lake root, e.g. "./lake" or "s3://bucket/cellsynth".
        storage_options: delta-rs object-store options (credentials, endpoint); never logged.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        storage_options: dict[str, str] | None = None,
        target_file_size_mb: int = 64,
        commit_retries: int = 5,
    ):
        root = str(root)
        self.root = root.rstrip("/") if _is_remote(root) else str(Path(root).resolve())
        self.storage_options = dict(storage_options or {})
        self.target_file_size_mb = target_file_size_mb
        self.commit_retries = commit_retries

    def __repr__(self) -> str:  # storage options hold secrets: keep them out of reprs and logs
        return f"Lake({self.root!r})"

    # --------------------------------------------------------------------------- locating
    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    @property
    def is_remote(self) -> bool:
        return _is_remote(self.root)

    def path(self, *parts: str) -> str:
        """A location under the lake root for non-table files (model weights, the report)."""
        return "/".join([self.root, *parts])

    def open_table(self, table: str, version: int | None = None) -> DeltaTable:
        """The delta-rs handle of `table` (at `version`, default latest) for what the lake's own
        verbs do not cover (add actions of a version, history). Raises LakeError when absent."""
        try:
            return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options or None)
        except TableNotFoundError as err:
            raise LakeError(f"lake table '{table}' not found at {self.uri(table)}") from err
        except DeltaError as err:
            raise LakeError(f"lake table '{table}': cannot open version {version}: {err}") from err

    def dataset(self, table: str, version: int | None = None, *, dt: DeltaTable | None = None) -> ds.Dataset:
        """`table` at `version` (or the snapshot `dt` already opened) as a pyarrow dataset: the files and partition
        values of the Delta log, read through `table_filesystem`."""
        dt = self.open_table(table, version) if dt is None else dt
        return dt.to_pyarrow_dataset(filesystem=self.table_filesystem(table))

    def table_filesystem(self, table: str) -> pafs.FileSystem | None:
        """pyarrow's own filesystem rooted at `table`'s folder (local and S3 lakes), or None (other object stores:
        delta-rs' handler). Why not always delta-rs' handler, `to_pyarrow_dataset()`'s default: a script that read
        the ingest's traffic table through it aborted at interpreter exit ("terminate called without an active
        exception", rc 134) in 4-5 runs of 10 on a default lake (deltalake 1.6.6, pyarrow 26), none through this."""
        if self.is_remote and urlparse(self.root).scheme not in ("s3", "s3a"):
            return None
        fs, base = self.filesystem()
        return pafs.SubTreeFileSystem(f"{base}/{table}", fs)

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(table), storage_options=self.storage_options or None)

    def version(self, table: str) -> int | None:
        return self.open_table(table).version() if self.exists(table) else None

    def versions(self, tables: Iterable[str]) -> dict[str, int | None]:
        return {t: self.version(t) for t in tables}

    def tables(self) -> list[TableInfo]:
        """Every Delta table directly under the root, with its version, rows and files."""
        names: list[str] = []
        if self.is_remote:
            fs, base = self.filesystem()  # from_uri would ignore the endpoint and credentials
            infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
            names = [Path(i.path).name for i in infos if i.type == pafs.FileType.Directory]
        elif Path(self.root).is_dir():
            names = sorted(p.name for p in Path(self.root).iterdir() if p.is_dir())
        out = []
        for name in names:
            if not self.exists(name):
                continue
            dt = self.open_table(name)
            actions = pa.table(dt.get_add_actions(flatten=True))  # arro3 -> pyarrow
            n_rows = pc.sum(actions.column("num_records")).as_py() if actions.num_rows else 0
            out.append(TableInfo(name, dt.version(), int(n_rows or 0), actions.num_rows))
        return out

    # ---------------------------------------------------------------------------- reading
    def read(
        self,
        table: str,
        *,
        version: int | None = None,
        columns: list[str] | None = None,
        filters: FilterType | None = None,
        network_scenario: str | None = "baseline",
    ) -> pa.Table:
        """Read through the Delta log (never by listing folders); filters are DNF tuples.

        Tables with a `network_scenario` column give the measured network's rows ('baseline')
        unless another what-if scenario is named; None reads every scenario.
        """
        dataset = self.dataset(table, version)
        expr = None
        for col, op, value in filters or ():
            field = pc.field(col)
            term = {
                "=": lambda: field == value, "==": lambda: field == value, "!=": lambda: field != value,
                "<": lambda: field < value, "<=": lambda: field <= value,
                ">": lambda: field > value, ">=": lambda: field >= value,
                "in": lambda: field.isin(list(value)), "not in": lambda: ~field.isin(list(value)),
            }.get(op)
            if term is None:
                raise LakeError(f"read('{table}'): unsupported filter operator {op!r}")
            expr = term() if expr is None else expr & term()
        return scan_scenario(dataset, columns, expr, network_scenario)

    def read_pandas(self, table: str, **kwargs: Any) -> pd.DataFrame:
        return self.read(table, **kwargs).to_pandas()

    def file_uris(self, table: str, *, version: int | None = None) -> list[str]:
        return list(self.open_table(table, version).file_uris())

    def history(self, table: str, limit: int | None = None) -> list[dict[str, Any]]:
        return self.open_table(table).history(limit)

    def moving_versions(self, table: str, since_version: int, until_version: int) -> list[int]:
        """The versions in (`since_version`, `until_version`] whose commit may have changed the measured
        network's rows of `table`: all but ROW_NEUTRAL_OPERATIONS and a what-if's writes of its own rows
        (SCENARIO_NOTE: appended, or replacing its earlier rows by `scenario_predicate`); a
        version whose record is gone (log cleanup) counts. Reads the commit log only."""
        return _moving_versions(self.open_table(table), since_version, until_version)

    def rows_changed(self, table: str, since_version: Any, until_version: Any) -> bool:
        """Whether a commit after `since_version` up to `until_version` may have changed the measured
        network's rows of `table` (`moving_versions`), or the version went back, or the table is gone.
        Versions that are not both ints (None: no table then; a registry fingerprint) changed unless equal."""
        if until_version == since_version:
            return False
        if not (isinstance(since_version, int) and isinstance(until_version, int)) or until_version < since_version:
            return True
        if not self.exists(table):
            return True
        dt = self.open_table(table)
        return dt.version() < until_version or bool(_moving_versions(dt, since_version, until_version))

    def committed_app_ids(self, table: str, app_id: str) -> bool:
        return self._already(table, app_id) is not None

    def commit_note(self, table: str) -> dict[str, Any]:
        """The `note` the commit of `table`'s latest version recorded (`commit_files(note=)`); {}
        when that commit recorded none or the table does not exist."""
        if not self.exists(table):
            return {}
        hist = self.history(table, 1)
        return _note_of(hist[0]) if hist else {}

    # ---------------------------------------------------------------------------- writing
    def _commit_props(self, app_id: str | None, note: dict[str, Any] | None = None) -> CommitProperties:
        txns = [Transaction(app_id=app_id, version=1)] if app_id else None
        return CommitProperties(custom_metadata=commit_metadata(app_id, note) or None,
                                max_commit_retries=self.commit_retries, app_transactions=txns)

    def _already(self, table: str, app_id: str | None) -> int | None:
        """The table's version when a commit carrying `app_id` is in effect, else None. Delta keeps an app
        id's transaction through a RESTORE to a version before it (`recover()` of a killed run), so the id
        alone would skip the rerun's write of rows the restore took away: the commit log says whether a
        later restore went back past the commit that carried it."""
        if not app_id or not self.exists(table):
            return None
        dt = self.open_table(table)
        if dt.transaction_version(app_id) is None:
            return None
        back_to = None  # the lowest version a later RESTORE went back to
        for h in dt.history():  # newest first, back to the commit that carried the id
            if h.get("operation") == "RESTORE":
                try:
                    target = int((h.get("operationParameters") or {}).get("version"))
                except (TypeError, ValueError):
                    continue
                back_to = target if back_to is None else min(back_to, target)
            elif _commit_meta(h, APP_ID_KEY) == app_id:
                return dt.version() if back_to is None or back_to >= h.get("version", -1) else None
        return dt.version()  # committed before ids were recorded in the log: trust the transaction

    def write(
        self,
        table: str,
        data: pa.Table | pd.DataFrame,
        *,
        mode: WriteMode = "append",
        predicate: str | None = None,
        app_id: str | None = None,
        table_spec: TableSpec | None = None,
        note: dict[str, Any] | None = None,
    ) -> int:
        """Commit `data` to `table` in one Delta transaction and return the new version.

        `mode="overwrite"` with a `predicate` (SQL, e.g. "window = 'h00_06'") replaces only the
        matching rows. A commit carrying an `app_id` the table already holds writes nothing. `note`
        goes into the commit's metadata (`commit_note`; `SCENARIO_NOTE` marks rows of a what-if only).

        Raises:
            SchemaError: the data does not fit the table's declared schema.
            CommitConflictError: a concurrent writer won and retries did not resolve it.
        """
        done = self._already(table, app_id)
        if done is not None:
            return done
        tspec = table_spec or spec(table)
        arrow = tspec.conform(_to_arrow(data))
        if tspec.partition_by:
            arrow = arrow.sort_by([(c, "ascending") for c in tspec.partition_by if c in arrow.column_names])
        merge = merges_schema(tspec, mode, predicate)
        if merge:
            arrow = self._nullable_new_columns(table, arrow)
        try:
            write_deltalake(
                self.uri(table), arrow, mode=mode, predicate=predicate,
                partition_by=list(tspec.partition_by) or None,
                storage_options=self.storage_options or None,
                target_file_size=self.target_file_size_mb * 2**20,
                commit_properties=self._commit_props(app_id, note),
                schema_mode="merge" if merge else None,
            )
        except CommitFailedError as err:
            raise CommitConflictError(f"lake table '{table}': concurrent commit conflict: {err}") from err
        except (DeltaError, OSError) as err:
            raise LakeError(f"lake table '{table}': write failed: {err}") from err
        return self.open_table(table).version()

    def _nullable_new_columns(self, table: str, arrow: pa.Table) -> pa.Table:
        """`arrow` with the columns `table` does not have yet made nullable: a schema merge adds them for
        rows already in the table that lack them (a non-nullable one missing from old files left the table
        unreadable to delta-rs' delete and predicate overwrite)."""
        if not self.exists(table):
            return arrow
        have = {f.name for f in self.open_table(table).schema().fields}
        fields = [f.with_nullable(True) if f.name not in have and not f.nullable else f for f in arrow.schema]
        return arrow.cast(pa.schema(fields, metadata=arrow.schema.metadata)) if fields != list(arrow.schema) else arrow

    def delete(self, table: str, predicate: str) -> int:
        dt = self.open_table(table)
        dt.delete(predicate, commit_properties=self._commit_props(None))
        return dt.version()

    def restore(self, table: str, version: int) -> int:
        dt = self.open_table(table)
        dt.restore(version, commit_properties=self._commit_props(None, {"restore_to": version}))
        return self.open_table(table).version()

    def drop(self, table: str) -> None:
        """Delete a table and its files (used only for tables a killed first run created)."""
        fs, base = self.filesystem()
        fs.delete_dir(f"{base}/{table}")

    # ------------------------------------------------- non-table files (model weights)
    def put_dir(self, local_dir: str | Path, rel: str) -> str:
        """Copy a local folder to `<root>/<rel>` (a no-op when it already is that folder).

        Model weights are written by torch/safetensors to local paths; on an object-store lake
        they are written to a temporary folder first and copied up here. Returns `rel`.
        """
        local_dir = Path(local_dir).resolve()
        fs, base = self.filesystem()
        target = f"{base}/{rel.strip('/')}"
        if not self.is_remote and Path(target).resolve() == local_dir:
            return rel
        try:
            fs.create_dir(target, recursive=True)
            pafs.copy_files(str(local_dir), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except OSError as err:
            raise LakeError(f"lake: cannot write {rel} under {self.root}: {err}") from err
        return rel

    def write_json(self, rel: str, value: Any) -> None:
        """Write a small JSON record (bookkeeping beside the tables) to `<root>/<rel>`.

        Written to a temporary name and moved into place on local lakes; an object-store PUT is
        atomic by itself. Readers therefore see the old record or the new one, never half.
        """
        fs, base = self.filesystem()
        target = f"{base}/{rel.strip('/')}"
        data = json.dumps(value, sort_keys=True).encode()
        try:
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            tmp = target if self.is_remote else f"{target}.{uuid.uuid4().hex[:6]}.tmp"
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            if tmp != target:
                fs.move(tmp, target)
        except OSError as err:
            raise LakeError(f"lake: cannot write {rel} under {self.root}: {err}") from err

    def read_json(self, rel: str) -> Any | None:
        """The JSON record at `<root>/<rel>`, or None when it is absent or unreadable."""
        fs, base = self.filesystem()
        try:
            with fs.open_input_stream(f"{base}/{rel.strip('/')}") as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None

    def local_dir(self, rel: str, *, cache_dir: str | Path | None = None) -> Path:
        """A local folder holding `<root>/<rel>`: the folder itself on a local lake, else a
        download into `cache_dir` (default: a folder under the system temp dir), reused while the
        remote folder lists the same files with the same sizes and modification times."""
        if not self.is_remote:
            return Path(self.root) / rel
        import hashlib
        import tempfile

        fs, base = self.filesystem()
        src = f"{base}/{rel.strip('/')}"
        try:
            infos = fs.get_file_info(pafs.FileSelector(src, recursive=True))
        except OSError as err:
            raise LakeError(f"lake: cannot read {rel} under {self.root}: {err}") from err
        listing = sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
        key = hashlib.sha256(repr((self.root, rel, listing)).encode()).hexdigest()[:16]
        dest = Path(cache_dir or Path(tempfile.gettempdir()) / "cellsynth-lake-cache") / key
        if (dest / ".complete").exists():
            return dest
        tmp = dest.with_name(dest.name + f".{uuid.uuid4().hex[:6]}")
        try:
            tmp.mkdir(parents=True)
            pafs.copy_files(src, str(tmp), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except OSError as err:
            raise LakeError(f"lake: cannot read {rel} under {self.root}: {err}") from err
        (tmp / ".complete").touch()
        try:
            tmp.rename(dest)  # atomic: a concurrent reader sees the whole folder or none
        except OSError:  # another process won the race; theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---------------------------------------------------------- staged files + one commit
    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, base path) of the lake root, carrying the object store's endpoint
        and credentials; `f"{base}/{rel}"` on it is the file `rel` under the root."""
        if not self.is_remote:
            return pafs.LocalFileSystem(), self.root
        opts = {k.upper(): v for k, v in self.storage_options.items()}
        parsed = urlparse(self.root)
        if parsed.scheme in ("s3", "s3a"):
            endpoint = opts.get("AWS_ENDPOINT_URL") or opts.get("AWS_ENDPOINT")
            scheme = "http" if endpoint and endpoint.startswith("http://") else "https"
            fs = pafs.S3FileSystem(
                access_key=opts.get("AWS_ACCESS_KEY_ID"), secret_key=opts.get("AWS_SECRET_ACCESS_KEY"),
                session_token=opts.get("AWS_SESSION_TOKEN"), region=opts.get("AWS_REGION", "us-east-1"),
                endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None, scheme=scheme,
            )
            return fs, f"{parsed.netloc}{parsed.path}"
        fs, base = pafs.FileSystem.from_uri(self.root)
        return fs, base

    def stage_files(self, table: str, data: pa.Table | pd.DataFrame, *, table_spec: TableSpec | None = None) -> list[dict[str, Any]]:
        """Write Parquet data files into the table folder without committing them.

        Safe in Ray actors and tasks: it touches only new, uniquely named files. Rows are sorted
        by partition columns and `cell_id` (when present) so one shard's cells sit together.
        Returns JSON-serialisable add actions for `commit_files`.
        """
        tspec = table_spec or spec(table)
        arrow = tspec.conform(_to_arrow(data))
        sort_cols = [c for c in (*tspec.partition_by, "cell_id", "serving_cell_id") if c in arrow.column_names]
        if sort_cols and arrow.num_rows:
            arrow = arrow.sort_by([(c, "ascending") for c in sort_cols])
        fs, base = self.filesystem()
        tag = uuid.uuid4().hex
        groups: list[tuple[dict[str, str | None], pa.Table]] = []
        if tspec.partition_by and arrow.num_rows:
            keys = arrow.select(list(tspec.partition_by)).to_pandas()
            for values, idx in keys.groupby(list(tspec.partition_by), dropna=False, sort=True).indices.items():
                values = values if isinstance(values, tuple) else (values,)
                pvals = {c: _partition_str(None if pd.isna(v) else v) for c, v in zip(tspec.partition_by, values)}
                groups.append((pvals, arrow.take(idx).drop_columns(list(tspec.partition_by))))
        elif arrow.num_rows:
            groups.append(({}, arrow))
        actions = []
        max_rows = max(1, (self.target_file_size_mb * 2**20) // 64)  # rough row budget per file
        for pvals, part in groups:
            prefix = "/".join(f"{c}={'__HIVE_DEFAULT_PARTITION__' if v is None else v}" for c, v in pvals.items())
            for i, start in enumerate(range(0, part.num_rows, max_rows)):
                chunk = part.slice(start, max_rows)
                rel = f"{prefix + '/' if prefix else ''}part-{tag}-{i:05d}.parquet"
                fs.create_dir(f"{base}/{table}/{prefix}" if prefix else f"{base}/{table}", recursive=True)
                full = f"{base}/{table}/{rel}"
                pq.write_table(chunk, full, filesystem=fs, compression="zstd")
                size = fs.get_file_info(full).size
                actions.append({
                    "path": rel, "size": int(size), "partition_values": pvals,
                    "modification_time": int(time.time() * 1000), "stats": _stats(chunk),
                })
        return actions

    def read_staged(self, table: str, actions: list[dict[str, Any]], *, columns: list[str]) -> pa.Table:
        """Read back staged, uncommitted data files (checks that must pass before a commit)."""
        fs, base = self.filesystem()
        parts = [pq.read_table(f"{base}/{table}/{a['path']}", columns=columns, filesystem=fs) for a in actions]
        return pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.float64()) for c in columns})

    def commit_files(
        self,
        table: str,
        actions: list[dict[str, Any]],
        *,
        mode: WriteMode = "append",
        partition_filters: FilterType | None = None,
        app_id: str | None = None,
        table_spec: TableSpec | None = None,
        note: dict[str, Any] | None = None,
    ) -> int:
        """Commit staged data files as one Delta version (creating the table if needed).

        `mode="overwrite"` with `partition_filters` replaces only those partitions. `note` goes
        into the commit's metadata (`history()[i]["cellsynth"]`, JSON).
        """
        done = self._already(table, app_id)
        if done is not None:
            return done
        tspec = table_spec or spec(table)
        schema = tspec.schema
        extra = self._extra_fields(actions, tspec)
        if extra:
            schema = pa.schema(list(schema) + extra)
        adds = [
            AddAction(a["path"], a["size"], a["partition_values"], a["modification_time"], True, a["stats"])
            for a in actions
        ]
        props = self._commit_props(app_id, note)
        pby = list(tspec.partition_by) or None
        try:
            if not self.exists(table):
                if mode == "overwrite" and partition_filters:
                    mode = "append"
                from deltalake.transaction import create_table_with_add_actions

                create_table_with_add_actions(
                    self.uri(table), Schema.from_arrow(schema), adds, mode="error" if mode == "append" else "overwrite",
                    partition_by=pby, storage_options=self.storage_options or None, commit_properties=props,
                )
            else:
                dt = self.open_table(table)
                dt.create_write_transaction(
                    adds, mode, schema, partition_by=pby,
                    partition_filters=[(c, o, _partition_str(v) if o not in ("in", "not in") else [_partition_str(x) for x in v]) for c, o, v in partition_filters] if partition_filters else None,
                    commit_properties=props,
                )
        except CommitFailedError as err:
            raise CommitConflictError(f"lake table '{table}': concurrent commit conflict: {err}") from err
        except (DeltaError, OSError) as err:
            raise LakeError(f"lake table '{table}': commit failed: {err}") from err
        return self.open_table(table).version()

    def _extra_fields(self, actions: list[dict[str, Any]], tspec: TableSpec) -> list[pa.Field]:
        if not tspec.extra_prefixes or not actions:
            return []
        fs, base = self.filesystem()
        file_schema = pq.read_schema(f"{base}/{tspec.name}/{actions[0]['path']}", filesystem=fs)
        return [f for f in file_schema if f.name.startswith(tspec.extra_prefixes) and tspec.schema.get_field_index(f.name) < 0]

    def commit_spark_dir(
        self,
        table: str,
        staging_rel: str,
        *,
        mode: WriteMode = "append",
        partition_filters: FilterType | None = None,
        app_id: str | None = None,
    ) -> int:
        """Commit the Parquet files a Spark job wrote under `<table>/<staging_rel>/` (hive layout).

        Spark writes the files (partitionBy drops the partition columns from them, as Delta
        expects); this turns them into add actions with row counts from the Parquet footers.
        """
        tspec = spec(table)
        fs, base = self.filesystem()
        root = f"{base}/{table}/{staging_rel}".rstrip("/")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        actions = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            rel_in_stage = info.path[len(root) + 1:]
            pvals: dict[str, str | None] = {}
            for part in rel_in_stage.split("/")[:-1]:
                key, _, value = part.partition("=")
                pvals[key] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
            meta = pq.read_metadata(info.path, filesystem=fs)
            actions.append({
                "path": f"{staging_rel.strip('/')}/{rel_in_stage}", "size": int(info.size),
                "partition_values": {c: pvals.get(c) for c in tspec.partition_by},
                "modification_time": int(info.mtime.timestamp() * 1000) if info.mtime else int(time.time() * 1000),
                "stats": json.dumps({"numRecords": meta.num_rows}),
            })
        return self.commit_files(table, actions, mode=mode, partition_filters=partition_filters, app_id=app_id)

    # -------------------------------------------------------------------------- upkeep
    def optimize(self, table: str) -> dict[str, Any]:
        return self.open_table(table).optimize.compact(target_size=self.target_file_size_mb * 2**20)
