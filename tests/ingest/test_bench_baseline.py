"""The ingest bench's pandas baseline applies the Spark job's rules: on the bad-input corpus it
finds the same hand-worked reject counts and clean rows as tests/ingest/test_stage.py."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

from cellsynth.config import IngestConfig

from .test_stage import CORPUS, EXPECTED_REASONS

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ingest.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ingest", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pandas_baseline_matches_the_corpus_counts(tmp_path):
    ic = IngestConfig(period_start="2026-01-05", period_end="2026-01-12")
    counts = _bench().pandas_ingest(CORPUS / "cells.csv", CORPUS / "traffic.csv", CORPUS / "mdt.csv", ic, tmp_path)
    assert counts["rows_in"] == {"cells": 7, "traffic": 11, "mdt": 22, "neighbour": 6}
    assert counts["clean"] == {"cells": 3, "traffic": 3, "mdt_reports": 4, "mdt_measurements": 7, "rejects": 33}
    assert counts["rejected"] == {"cells": 4, "traffic": 8, "mdt": 18, "neighbour": 3}
    assert Counter(counts["by_reason"]) == sum(EXPECTED_REASONS.values(), Counter())
    assert counts["swapped_latlon"] == 1 and counts["no_load_match"] == 2
