"""One writer per lake: an exclusive lock file `<root>/_cellsynth.lock` for local roots.

Delta's optimistic concurrency keeps every single table consistent under concurrent writers, but
a run also restores tables to their last good versions (`RunRegistry.recover`), which is only
safe while no other run writes. The lock is created with O_CREAT|O_EXCL (atomic on POSIX and NFS
v3+), records owner, pid, host and expiry, and is taken over when its holder died (same host,
pid gone) or it expired. Object-store roots rely on delta-rs' conditional puts per commit; the
scheduler (max_active_runs=1) keeps runs apart there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cellsynth.errors import LakeError
from cellsynth.lake.table import Lake

LOCK_NAME = "_cellsynth.lock"


class LakeLockedError(LakeError):
    """Another live run holds the lake lock and did not release it in time."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class LakeLock:
    """Exclusive, re-entrant (per process) lock on a local lake root.

    Args:
        lake: the lake to lock; remote lakes are not locked (see module doc).
        owner: shown to a waiting run (e.g. the run id).
        timeout_s: how long `acquire` waits for a live holder before raising.
        ttl_s: a lock older than this is considered abandoned even if its pid still exists.
    """

    _held: dict[str, int] = {}  # lock path -> re-entry depth in this process

    def __init__(self, lake: Lake, *, owner: str = "", timeout_s: float = 600.0, ttl_s: float = 24 * 3600.0,
                 poll_s: float = 0.2):
        self.lake, self.owner, self.timeout_s, self.ttl_s, self.poll_s = lake, owner, timeout_s, ttl_s, poll_s
        self.path = None if lake.is_remote else Path(lake.root) / LOCK_NAME

    def holder(self) -> dict[str, Any] | None:
        """The current lock record, or None when unlocked (or unreadable mid-write)."""
        if self.path is None:
            return None
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _abandoned(self, rec: dict[str, Any] | None) -> bool:
        if rec is None:
            return False
        if rec.get("expires_at", 0) < time.time():
            return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", -1)))

    def _try_create(self) -> bool:
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise LakeError(f"lake lock {self.path}: cannot create ({err.strerror})") from err
        now = time.time()
        record = {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                  "acquired_at": now, "expires_at": now + self.ttl_s}
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        return True

    def acquire(self) -> None:
        """Take the lock, waiting up to `timeout_s` for a live holder.

        Raises:
            LakeLockedError: a live run still holds it after `timeout_s`.
        """
        if self.path is None:
            return
        key = str(self.path)
        if key in LakeLock._held:
            LakeLock._held[key] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        while not self._try_create():
            rec = self.holder()
            if self._abandoned(rec):
                # Rename first: of two waiters breaking the same stale lock, only one succeeds.
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, stale)
                    if json.loads(stale.read_text() or "{}") != rec:  # a fresh lock slipped in
                        os.rename(stale, self.path)
                    else:
                        stale.unlink()
                continue
            if time.monotonic() >= deadline:
                who = f"run {rec.get('owner') or '?'} (pid {rec.get('pid')} on {rec.get('host')})" if rec else "another run"
                raise LakeLockedError(f"lake {self.lake.root} is locked by {who}; waited {self.timeout_s:g} s")
            time.sleep(self.poll_s)
        LakeLock._held[key] = 1

    def release(self) -> None:
        if self.path is None:
            return
        key = str(self.path)
        depth = LakeLock._held.get(key, 0)
        if depth > 1:
            LakeLock._held[key] = depth - 1
            return
        LakeLock._held.pop(key, None)
        rec = self.holder()
        if rec is not None and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> LakeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
