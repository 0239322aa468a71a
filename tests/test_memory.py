from __future__ import annotations

import os
import sys

import pytest

from cellsynth import memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._malloc_trim() is None, reason="glibc only")
def test_freed_heap_goes_back_to_the_os():
    # 2 KB objects come from malloc's heap; keeping every 64th pins the heap's top, so freeing the
    # rest returns nothing to the OS until the heap is trimmed (the driver's stage leftovers).
    blocks = [bytes(2048) + bytes([i % 251]) for i in range(150_000)]
    keep = blocks[::64]
    del blocks
    before = _rss_mb()
    assert memory.release_freed_memory() is True
    assert before - _rss_mb() > 100.0  # ~290 MB were freed but held
    assert len(keep) == 2344


def test_release_is_harmless_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is False
