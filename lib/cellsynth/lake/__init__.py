"""The lake: Delta tables through delta-rs, and the run registry."""

from cellsynth.lake.registry import RunRecord, RunRegistry
from cellsynth.lake.table import Lake, TableInfo

__all__ = ["Lake", "RunRecord", "RunRegistry", "TableInfo"]
