"""Run registry: the `runs` Delta table. Every stage records itself (running, then succeeded,
failed or skipped) with its config hash, the versions it read and wrote, and row counts.

The registry is also the lake's commit point across tables: the output versions of a stage's
last successful run are its "last good versions". A job killed between two table commits is
rolled back to them by `recover()` before the next run touches anything.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from cellsynth.lake.table import Lake

RUNS = "runs"


def _now() -> pd.Timestamp:
    return pd.Timestamp(datetime.now(UTC))


@dataclass
class RunRecord:
    run_id: str
    stage: str
    config_hash: str
    input_versions: dict[str, Any] = field(default_factory=dict)
    started_at: pd.Timestamp = field(default_factory=_now)


class RunRegistry:
    def __init__(self, lake: Lake):
        self.lake = lake

    # --------------------------------------------------------------------------- writes
    def _append(self, rec: RunRecord, status: str, *, outputs: dict[str, Any] | None = None,
                counts: dict[str, Any] | None = None, error: str | None = None, note: str | None = None) -> None:
        ended = None if status == "running" else _now()
        row = pd.DataFrame([{
            "run_id": rec.run_id, "stage": rec.stage, "status": status, "config_hash": rec.config_hash,
            "input_versions": json.dumps(rec.input_versions, sort_keys=True),
            "output_versions": json.dumps(outputs or {}, sort_keys=True),
            "row_counts": json.dumps(counts or {}, sort_keys=True),
            "started_at": rec.started_at, "ended_at": ended, "error": error, "note": note,
        }])
        self.lake.write(RUNS, row, mode="append")

    def start(self, run_id: str, stage: str, config_hash: str, input_versions: dict[str, Any]) -> RunRecord:
        rec = RunRecord(run_id, stage, config_hash, dict(input_versions))
        self._append(rec, "running")
        return rec

    def succeed(self, rec: RunRecord, outputs: dict[str, Any], counts: dict[str, Any], note: str | None = None) -> None:
        self._append(rec, "succeeded", outputs=outputs, counts=counts, note=note)

    def skip(self, rec: RunRecord, reason: str, outputs: dict[str, Any] | None = None) -> None:
        self._append(rec, "skipped", outputs=outputs, note=reason)

    def fail(self, rec: RunRecord, err: BaseException) -> None:
        first = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        tb = "".join(traceback.format_exception_only(type(err), err)).strip()
        self._append(rec, "failed", error=first, note=tb[:2000])

    # ---------------------------------------------------------------------------- reads
    def frame(self) -> pd.DataFrame:
        if not self.lake.exists(RUNS):
            return pd.DataFrame(columns=["run_id", "stage", "status", "config_hash", "input_versions",
                                         "output_versions", "row_counts", "started_at", "ended_at", "error", "note"])
        return self.lake.read_pandas(RUNS).sort_values("started_at", kind="stable")

    def latest(self, limit: int = 50) -> pd.DataFrame:
        """The final state of each (run_id, stage), newest first."""
        df = self.frame()
        if df.empty:
            return df
        df = df.assign(_end=df["ended_at"].fillna(df["started_at"])).sort_values(["started_at", "_end"], kind="stable")
        last = df.groupby(["run_id", "stage"], sort=False).tail(1)
        return last.drop(columns="_end").sort_values("started_at", ascending=False).head(limit)

    def last_success(self, stage: str, frame: pd.DataFrame | None = None) -> dict[str, Any] | None:
        """The stage's newest succeeded record (`frame`: the registry as `frame()` read it, to spare a read)."""
        df = self.frame() if frame is None else frame
        df = df[(df["stage"] == stage) & (df["status"] == "succeeded")]
        if df.empty:
            return None
        row = df.iloc[-1].to_dict()
        for key in ("input_versions", "output_versions", "row_counts"):
            row[key] = json.loads(row[key] or "{}")
        return row

    def unchanged_since_success(
        self, stage: str, config_hash: str, input_versions: dict[str, Any], outputs: tuple[str, ...]
    ) -> str | None:
        """Why the stage can be skipped (inputs, config and outputs as last time), or None."""
        last = self.last_success(stage)
        if last is None:
            return None
        if last["config_hash"] != config_hash:
            return None
        before, now = last["input_versions"], json.loads(json.dumps(input_versions, sort_keys=True))
        if before.keys() != now.keys():
            return None
        # a table input may have moved by compactions only (same rows); anything else must be equal
        compacted = sorted(k for k in now if now[k] != before[k])
        if any(self.lake.rows_changed(key, before[key], now[key]) for key in compacted):
            return None
        for table in outputs:
            if table in last["output_versions"] and self.lake.version(table) is None:
                return None
        why = f"inputs and config unchanged since run {last['run_id']}"
        # (a compaction, or a what-if's scenario rows: neither moves the measured network's rows a stage reads)
        return f"{why} ({', '.join(compacted)}: compacted or what-if rows only since)" if compacted else why

    def last_good_versions(self, frame: pd.DataFrame | None = None) -> dict[str, int]:
        """For every table, the highest version a succeeded stage recorded as its output (`frame`: the
        registry as `frame()` read it, to spare a second read)."""
        df = self.frame() if frame is None else frame
        good: dict[str, int] = {}
        for raw in df.loc[df["status"].isin(["succeeded", "skipped"]), "output_versions"]:
            for table, version in json.loads(raw or "{}").items():
                if isinstance(version, int):
                    good[table] = max(version, good.get(table, -1))
        return good

    def recover(self) -> dict[str, tuple[int, int]]:
        """Roll every table that moved past its last good version back to it.

        A commit beyond the last good version without a matching succeeded run can only come
        from a run killed between its table commits; restoring keeps the tables consistent.
        Call it only while no other run is writing (see the lake lock): a concurrent run's
        commits would look like a killed run's. Returns {table: (from_version, restored_version)}.
        """
        restored = {}
        for table, good in self.last_good_versions().items():
            if table == RUNS:
                continue
            current = self.lake.version(table)
            if current is not None and current > good:
                new_version = self.lake.restore(table, good)
                restored[table] = (current, good)
                # The restore is itself a new version holding the good content: record it as
                # good so the next recover() leaves it alone.
                rec = RunRecord(f"recover-{_now():%Y%m%dT%H%M%S%f}", "recover", "-", {table: current})
                self._append(rec, "succeeded", outputs={table: new_version}, note=f"restored to version {good}")
        return restored
