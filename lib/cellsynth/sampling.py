"""Deterministic samples and whole-table summaries, so evaluation (and density's association score)
reads the lake one partition at a time and its driver holds samples, not tables (issue 15: a flat
driver).

Every sample is a bottom-k sample: the k rows with the smallest stable hash of their key columns
(pandas' SipHash, keyed by the run seed), ties broken by the key. The bottom-k of a union is the
bottom-k of the parts' bottom-ks, so `BottomK` keeps at most ~k rows while partitions stream
past, and a sample drawn from any superset of its rows is the same rows in the same order (by
hash, then key). `evaluate` therefore computes the same figures from the whole frames (tests,
small runs) and from the streamed ones (`run`): the sample is a function of the rows' content
and the seed, not of row order or of how the table was read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Measurement rows: a report's row for one cell in one role.
MEAS_KEY = ("report_id", "cell_id", "role")


def _hash_key(seed: int) -> str:
    """pandas' hash_array wants a 16-character key: the seed, zero padded, in a fixed frame."""
    return f"cs{int(seed) % 10**8:08d}sample"


def _keys(frame: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    cols = [c for c in cols if c in frame.columns]
    if not cols:
        raise ValueError(f"bottom_k: none of the key columns {list(cols)} in the frame")
    key = frame[cols[0]].astype(str)
    for c in cols[1:]:
        key = key + "\x1f" + frame[c].astype(str)
    return key.to_numpy(dtype=object)


def ranks(frame: pd.DataFrame, cols: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash, key string) of every row."""
    key = _keys(frame, cols)
    return pd.util.hash_array(key, hash_key=_hash_key(seed), categorize=False), key


def bottom_k(frame: pd.DataFrame, cols: Sequence[str], k: int, seed: int, *, per: str | None = None) -> pd.DataFrame:
    """The k rows (k per value of column `per`) with the smallest (hash, key), in that order,
    with a fresh RangeIndex. Exact duplicate keys keep their input order among themselves."""
    if len(frame) == 0 or k <= 0:
        return frame.iloc[:0].reset_index(drop=True)
    h, key = ranks(frame, cols, seed)
    pos = np.arange(len(frame))
    if per is None and len(frame) > 4 * k:  # candidates first: every row whose hash can make the cut
        cut = np.partition(h, k - 1)[k - 1]
        pos = np.flatnonzero(h <= cut)
    order = pd.DataFrame({"h": h[pos], "k": key[pos], "p": pos}).sort_values(["h", "k"], kind="stable")
    pos = order["p"].to_numpy()
    if per is None:
        pos = pos[:k]
    else:
        group = frame[per].to_numpy()[pos]
        pos = pos[pd.Series(group).groupby(group, sort=False).cumcount().to_numpy() < k]
    return frame.iloc[pos].reset_index(drop=True)


class BottomK:
    """`bottom_k` over a stream of frames with at most a few k rows held."""

    def __init__(self, cols: Sequence[str], k: int, seed: int, *, per: str | None = None):
        self.cols, self.k, self.seed, self.per = tuple(cols), int(k), seed, per
        self._parts: list[pd.DataFrame] = []

    def add(self, frame: pd.DataFrame) -> None:
        if len(frame):
            self._parts.append(bottom_k(frame, self.cols, self.k, self.seed, per=self.per))
        if len(self._parts) >= 8:
            self._parts = [self.frame()]

    def frame(self) -> pd.DataFrame:
        parts = [p for p in self._parts if len(p)]
        if not parts:
            return self._parts[0].iloc[:0] if self._parts else pd.DataFrame()
        return bottom_k(pd.concat(parts, ignore_index=True), self.cols, self.k, self.seed, per=self.per)


@dataclass
class Summary:
    """What evaluation needs from whole tables besides samples: report counts, measurement rows
    per cell (all and training), the cells with held-out measurements, the training rows'
    bounding box. Mergeable over partitions (`add`)."""

    n_train: int = 0
    n_test: int = 0
    cell_rows: dict[str, int] = field(default_factory=dict)
    cell_train_rows: dict[str, int] = field(default_factory=dict)
    test_cells: set[str] = field(default_factory=set)
    train_lo: np.ndarray = field(default_factory=lambda: np.full(2, np.inf))
    train_hi: np.ndarray = field(default_factory=lambda: np.full(2, -np.inf))

    def add_reports(self, held_out: np.ndarray) -> None:
        self.n_test += int(np.sum(held_out))
        self.n_train += int(len(held_out) - np.sum(held_out))

    def add_measurements(self, cell_id: np.ndarray, is_test: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        cell_id = np.asarray(cell_id, dtype=object)
        for target, sel in ((self.cell_rows, slice(None)), (self.cell_train_rows, ~is_test)):
            ids, counts = np.unique(cell_id[sel].astype(str), return_counts=True)
            for c, n in zip(ids.tolist(), counts.tolist()):
                target[c] = target.get(c, 0) + n
        self.test_cells.update(np.unique(cell_id[is_test].astype(str)).tolist())
        xs, ys = np.asarray(x, dtype=float)[~is_test], np.asarray(y, dtype=float)[~is_test]
        if np.isfinite(xs).any():
            self.train_lo[0] = min(self.train_lo[0], np.nanmin(xs))
            self.train_hi[0] = max(self.train_hi[0], np.nanmax(xs))
        if np.isfinite(ys).any():
            self.train_lo[1] = min(self.train_lo[1], np.nanmin(ys))
            self.train_hi[1] = max(self.train_hi[1], np.nanmax(ys))

    def cells(self) -> list[str]:
        """Every measured cell, sorted."""
        return sorted(self.cell_rows)

    @staticmethod
    def top(counts: dict[str, int], n: int, among: set[str] | None = None) -> list[str]:
        """The n cells with the most rows (ties by cell id)."""
        items = [(c, v) for c, v in counts.items() if among is None or c in among]
        return [c for c, _ in sorted(items, key=lambda cv: (-cv[1], cv[0]))[:n]]


def wilson_ci(hits: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion (95% at z = 1.96)."""
    if n <= 0:
        return [float("nan"), float("nan")]
    p = hits / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [float(c - h), float(c + h)]
