"""Synthetic MDT generation: GUMBLE Algorithm 1 plus per-cell radio regression."""

from cellsynth.generate.transforms import (
    CellIndex,
    DetectionMaps,
    associate_positions,
    cell_loads,
    check_n_neighbours,
    check_windows,
    derived_seed,
    loads_for,
    plan_tiles,
    quantise,
    sample_size,
    strongest_neighbours,
    synthesize,
    synthesize_many,
    tile_positions,
    to_table,
)

__all__ = [
    "CellIndex",
    "DetectionMaps",
    "associate_positions",
    "cell_loads",
    "check_n_neighbours",
    "check_windows",
    "derived_seed",
    "loads_for",
    "plan_tiles",
    "quantise",
    "sample_size",
    "strongest_neighbours",
    "synthesize",
    "synthesize_many",
    "tile_positions",
    "to_table",
]
