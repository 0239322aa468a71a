"""Deterministic train/test splits shared by training and evaluation, so models are trained on
exactly the rows the evaluation holds out from them. Decided by hashing ids, not by row order."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from cellsynth.config import PipelineConfig

# The config keys the split depends on. A stage that calls `split_seed` / `held_out` declares
# these in its `reads` (cellsynth.stages.StageSpec), so a change to any of them reruns it.
SPLIT_KEYS: tuple[str, ...] = ("split.test_fraction", "split.seed", "run.seed")


def _unit_hash(keys: np.ndarray, seed: int) -> np.ndarray:
    salt = f"{seed}:".encode()
    return np.fromiter(
        (zlib.crc32(salt + str(k).encode()) / 2**32 for k in keys), dtype=float, count=len(keys)
    )


def random_test_mask(report_ids: np.ndarray, *, test_fraction: float, seed: int) -> np.ndarray:
    """True for held-out rows (GUMBLE's random 65/35 split when test_fraction=0.35)."""
    return _unit_hash(np.asarray(report_ids), seed) < test_fraction


def spatial_block_test_mask(
    x_m: np.ndarray, y_m: np.ndarray, *, block_m: float, test_fraction: float, seed: int
) -> np.ndarray:
    """True for rows in held-out square blocks of side `block_m` (extrapolation split)."""
    bx = np.floor(np.asarray(x_m) / block_m).astype(np.int64)
    by = np.floor(np.asarray(y_m) / block_m).astype(np.int64)
    keys = np.char.add(np.char.add(bx.astype(str), "_"), by.astype(str))
    return _unit_hash(keys, seed + 1) < test_fraction


# Columns that identify a lake row, in sort order: report, measured cell, role, synthetic sample,
# window, time. `stable_order` sorts by those a frame has.
ROW_KEYS: tuple[str, ...] = ("report_id", "sample_id", "cell_id", "serving_cell_id", "role", "rank", "window", "ts")


def stable_order(frame: pd.DataFrame, keys: tuple[str, ...] | list[str] = ROW_KEYS) -> pd.DataFrame:
    """`frame` sorted by the `keys` it has, with a fresh RangeIndex.

    Row order out of the lake is not part of a table's content: Spark writes a partition's rows in
    shuffle order, a multi-file read concatenates files in log order. Anything seeded that picks
    rows by position (`DataFrame.sample(random_state=)`, a Generator's choice / permutation, a
    validation split) or sums floats over rows must see the rows in an order fixed by their
    content, or the same seed gives different results run to run.
    """
    cols = [k for k in keys if k in frame.columns]
    if not cols:
        return frame.reset_index(drop=True)
    return frame.sort_values(cols, kind="stable").reset_index(drop=True)



def stable_argsort(codes: np.ndarray) -> np.ndarray:
    """np.argsort(codes, kind="stable") of integer codes (cell indices, group ids). A stable order
    is unique, so non-negative codes that fit in int16 are sorted as int16 (numpy's radix sort,
    ~5x faster than int64's merge sort on a tile's pairs or a window's requests): the same
    permutation; other codes sort as they are."""
    if len(codes) and int(codes.max()) <= np.iinfo(np.int16).max and int(codes.min()) >= 0:
        return np.argsort(codes.astype(np.int16), kind="stable")
    return np.argsort(codes, kind="stable")

def split_seed(cfg: PipelineConfig) -> int:
    """The seed of the train/test split: split.seed, or run.seed when that is not set."""
    return cfg.split.seed if cfg.split.seed is not None else cfg.run.seed


def held_out(cfg: PipelineConfig, report_ids: np.ndarray) -> np.ndarray:
    """True for the reports the configured split holds out from training (`SPLIT_KEYS`)."""
    return random_test_mask(report_ids, test_fraction=cfg.split.test_fraction, seed=split_seed(cfg))
