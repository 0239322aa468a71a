"""Ingest (Spark): raw MDT, traffic counters and cell sites -> clean Delta tables + rejects."""

from cellsynth.ingest.sources import ResolvedSource, column_mapping, read_raw, resolve_source
from cellsynth.ingest.transforms import Rules

__all__ = ["ResolvedSource", "Rules", "column_mapping", "read_raw", "resolve_source"]
