"""Writing a scenario as an operator would export it (CSV + Parquet) plus ground truth, in chunks.

Files are formatted explicitly (no locale, fixed decimals) so the same seed gives the same bytes.
The folder is written beside the target and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _num(values: np.ndarray, fmt: str) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    out = np.char.mod(fmt, np.nan_to_num(a)).astype(object)
    out[np.isnan(a)] = ""
    return out


def _csv_text(frame: pd.DataFrame, formats: dict[str, str], *, header: bool) -> str:
    cols = {}
    for name in frame.columns:
        if name in formats:
            cols[name] = _num(frame[name].to_numpy(), formats[name])
        else:
            cols[name] = frame[name].fillna("").astype(str).to_numpy(dtype=object) if frame[name].dtype == object \
                else frame[name].astype(str).to_numpy(dtype=object)
    return pd.DataFrame(cols).to_csv(index=False, header=header, lineterminator="\n")


def mdt_formats(columns: Iterable[str]) -> dict[str, str]:
    fmt = {"latitude": "%.7f", "longitude": "%.7f", "serving_rsrq_db": "%.1f"}
    for name in columns:
        if name.endswith("_rsrp_dbm"):
            fmt[name] = "%.0f"
    return fmt


CELL_FORMATS = {"latitude": "%.7f", "longitude": "%.7f", "azimuth_deg": "%.1f", "height_m": "%.1f",
                "tx_power_dbm": "%.1f", "freq_mhz": "%.1f"}
TRAFFIC_FORMATS = {"traffic_mb": "%.2f", "prb_util_pct": "%.2f"}


def mdt_schema(columns: Iterable[str]) -> pa.Schema:
    fields = []
    for name in columns:
        numeric = name in ("latitude", "longitude", "serving_rsrq_db") or name.endswith("_rsrp_dbm")
        fields.append(pa.field(name, pa.float64() if numeric else pa.string()))
    return pa.schema(fields)


def _table(frame: pd.DataFrame, schema: pa.Schema | None = None) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_dir(
    out_dir: str | Path,
    *,
    cells: pd.DataFrame,
    traffic: pd.DataFrame,
    truth: dict[str, pd.DataFrame],
    chunks: Iterable,
    manifest: Callable[[dict[str, int]], dict],
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write every file; `chunks` yields objects with `.mdt` and `.truth` frames; `manifest(counts)`
    builds the manifest once all rows are known. Returns rows written per file."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "truth").mkdir(parents=True)
    counts: dict[str, int] = {}
    (tmp / "cells.csv").write_text(_csv_text(cells, CELL_FORMATS, header=True))
    counts["cells.csv"] = len(cells)
    (tmp / "traffic.csv").write_text(_csv_text(traffic, TRAFFIC_FORMATS, header=True))
    counts["traffic.csv"] = len(traffic)
    for name, frame in truth.items():
        pq.write_table(_table(frame), tmp / "truth" / f"{name}.parquet")
        counts[f"truth/{name}.parquet"] = len(frame)
    mdt_writer = truth_writer = None
    n_mdt = 0
    try:
        with open(tmp / "mdt.csv", "w", newline="") as csv_file:
            for chunk in chunks:
                cols = list(chunk.mdt.columns)
                csv_file.write(_csv_text(chunk.mdt, mdt_formats(cols), header=mdt_writer is None))
                if mdt_writer is None:
                    mdt_writer = pq.ParquetWriter(tmp / "mdt.parquet", mdt_schema(cols))
                    truth_writer = pq.ParquetWriter(tmp / "truth" / "reports.parquet", _table(chunk.truth).schema)
                mdt_writer.write_table(_table(chunk.mdt, mdt_writer.schema))
                truth_writer.write_table(_table(chunk.truth, truth_writer.schema))
                n_mdt += len(chunk.mdt)
                if on_chunk is not None:
                    on_chunk(len(chunk.mdt))
    finally:
        for writer in (mdt_writer, truth_writer):
            if writer is not None:
                writer.close()
    counts["mdt.csv"] = counts["mdt.parquet"] = counts["truth/reports.parquet"] = n_mdt
    info = manifest(counts)
    (tmp / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return counts


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
