"""Ingest stage on the hand-written bad-input corpus (tests/ingest/corpus): every reason code,
exact reject counts, reconciliation, partition layout, load join, reruns and a failed commit."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.errors import ConfigError, LakeError, StageError
from cellsynth.geo import LocalFrame
from cellsynth.ingest import stage
from cellsynth.lake import Lake, RunRegistry
from cellsynth.pipeline import run_stage
from cellsynth.schemas import REJECT_REASONS, cell_shard_of

CORPUS = Path(__file__).parent / "corpus"


def corpus_config(tmp_path: Path, **ingest):
    return make_config(
        tmp_path,
        scenario={"enabled": False},
        sources={k: {"path": str(CORPUS / f"{k}.csv")} for k in ("mdt", "traffic", "cells")},
        ingest={"period_start": "2026-01-05", "period_end": "2026-01-12", **ingest},
    )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, spark):
    tmp = tmp_path_factory.mktemp("ingest")
    cfg = corpus_config(tmp)
    rt = local_runtime(tmp, cfg, spark=spark)
    # Through the registry, so the crash test below can recover on this same lake.
    result = run_stage("ingest", rt, run_id="r1")
    return rt, result


# Worked out by hand from the corpus rows: e.g. r16 is out of range twice and names an unknown cell,
# r5 repeats r4 half a second later 0.1 m away (near duplicate), r1 and r12 repeat r1 (duplicates).
# Malformed lines (field count != header): the issue-20 truncated line (8 of 12 fields), r18 (three
# extra fields), r19 (';'-delimited: one field), a truncated traffic counter and a cell with three
# extra fields. Implausible times: r20 (1970, what epoch-ms 1610 became), r21 (2099), a 1999
# counter; r15 (2025-12-01) is plausible but before the configured period.
EXPECTED_REASONS = {
    "cells": Counter({"duplicate_cell": 1, "missing_position": 1, "bad_number": 1, "malformed_row": 1}),
    "traffic": Counter({"load_out_of_range": 1, "unknown_cell": 1, "bad_timestamp": 2, "duplicate": 1,
                        "missing_value": 1, "bad_number": 1, "malformed_row": 1}),
    "mdt": Counter({"bad_timestamp": 3, "rsrp_out_of_range": 2, "rsrq_out_of_range": 2, "missing_position": 1,
                    "outside_area": 1, "unknown_cell": 2, "duplicate": 2, "near_duplicate": 1, "missing_value": 1,
                    "bad_number": 1, "out_of_period": 1, "malformed_row": 3}),
    "neighbour": Counter({"neighbour_is_serving": 1, "rsrp_out_of_range": 1, "unknown_cell": 1}),
}


def test_reject_counts_per_reason_and_source(ingested):
    rt, _ = ingested
    rej = rt.lake.read_pandas("rejects")
    got = {s: Counter(code for codes in g["reason_code"] for code in codes.split(";")) for s, g in rej.groupby("source")}
    assert got == EXPECTED_REASONS
    covered = set().union(*EXPECTED_REASONS.values())
    # no_load_match is counted, not rejected; excluded_by_filter needs a filter (test_source_filters_...)
    assert covered == set(REJECT_REASONS) - {"no_load_match", "excluded_by_filter", "unresolved_pci",  # (test_pci.py)
                                             "no_serving_row", "several_serving_rows"}  # (test_long_layout.py)
    multi = rej.loc[rej["raw_row"].str.contains('"r16"'), "reason_code"].tolist()
    assert multi == ["rsrp_out_of_range;rsrq_out_of_range;unknown_cell"]
    assert set(rej["ingest_run_id"]) == {"r1"}


def test_malformed_lines_are_rejected_whole_with_their_text(ingested):
    rt, _ = ingested
    rej = rt.lake.read_pandas("rejects")
    bad = rej[rej["reason_code"] == "malformed_row"]
    assert sorted(zip(bad["source"], bad["raw_row"])) == [
        ("cells", "C6,S4,44.4950,11.3400,0,25,46,1800,uma,mixed,x,y,z"),
        ("mdt", "302,720,29100,9552457,45.4287946,-75.6883056,-83,1610"),
        ("mdt", "r18,u8,2026-01-05T08:20:00Z,44.4950,11.3420,C1,-80,-10,C2,-90,C3,-95,x,y,z"),
        ("mdt", "r19;u8;2026-01-05T08:30:00Z;44.4950;11.3420;C1;-80;-10;;;;"),
        ("traffic", "C1,2026-01-05T11:00:00Z,100"),
    ]
    codes = {json.loads(r)["report_id"]: c for r, c in zip(rej["raw_row"], rej["reason_code"])
             if r.startswith("{") and '"report_id"' in r and '"rank"' not in r}
    assert codes["r20"] == "bad_timestamp" and codes["r21"] == "bad_timestamp" and codes["r15"] == "out_of_period"


def test_rejected_reports_keep_their_source_line(ingested):
    # raw_row is rebuilt after the shuffle from the columns validation carries: it must still be
    # the source line, field by field (trimmed, missing markers as null), in the header's order.
    import csv

    rt, _ = ingested
    rej = rt.lake.read_pandas("rejects")
    got = [json.loads(r) for s, r in zip(rej["source"], rej["raw_row"]) if s == "mdt" and r.startswith("{")]
    with open(CORPUS / "mdt.csv", newline="") as f:
        header, *lines = list(csv.reader(f))
    markers = {"", "NA", "NaN", "null", "-"}
    want = [{h: (None if v.strip() in markers else v.strip()) for h, v in zip(header, line)}
            for line in lines if len(line) == len(header)]
    assert len(got) == 18 - 3  # every non-malformed reject
    for row in got:
        assert list(row) == header
        assert row in want


def test_clean_plus_rejected_equals_input(ingested):
    rt, result = ingested
    assert result.rows_in == {"cells": 7, "traffic": 11, "mdt": 22, "neighbour": 6}
    assert result.rows_written["mdt_reports"] == 4
    assert result.rows_written["mdt_measurements"] == 4 + 3
    assert result.rows_written["traffic"] == 3 and result.rows_written["cells"] == 3
    assert result.rows_rejected == 4 + 8 + 18 + 3
    assert rt.lake.read("mdt_reports").num_rows == 4
    assert sorted(rt.lake.read_pandas("mdt_reports")["report_id"]) == ["r1", "r2", "r3", "r4"]
    assert result.metrics["swapped_latlon"] == 1.0 and result.metrics["no_load_match"] == 2.0
    assert result.metrics["rejects.duplicate"] == 3.0  # 2 reports + 1 traffic counter, from the one-pass stats


def test_source_filters_reject_rows_as_excluded_and_dedup_the_rest_apart(tmp_path, spark):
    filters = {
        # u4's six reports (each bad in its own way before) and r4, whose near-duplicate r5 then stays
        "mdt": [{"column": "ue_id", "not_in": ["u4"]}, {"column": "report_id", "not_in": ["r4"]}],
        "traffic": [{"column": "prb_util_pct", "min": 0, "max": 100}],  # C3's 150 % (the line without one is malformed)
        "cells": [{"column": "site_id", "not_in": ["S2"]}],  # C3: its reports name an unknown cell then
    }
    cfg = make_config(tmp_path, scenario={"enabled": False},
                      sources={k: {"path": str(CORPUS / f"{k}.csv"), "filters": filters[k]} for k in filters},
                      ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    result = stage.run(cfg, rt, run_id="f")
    rej = rt.lake.read_pandas("rejects")
    assert result.rows_in == {"cells": 7, "traffic": 11, "mdt": 22, "neighbour": 4}  # r1: 2, r2, r5: 1 each
    for src in ("cells", "traffic", "mdt"):
        assert result.rows_in[src] == result.rows_written[src if src != "mdt" else "mdt_reports"] + (rej["source"] == src).sum()

    def codes(src):
        out = {}
        for raw, code in zip(rej.loc[rej["source"] == src, "raw_row"], rej.loc[rej["source"] == src, "reason_code"]):
            row = json.loads(raw) if raw.startswith("{") else {"line": raw}
            out.setdefault(code, []).append(row.get("report_id") or row.get("cell_id") or row.get("line"))
        return out

    mdt = codes("mdt")
    assert sorted(mdt["excluded_by_filter"]) == ["r10", "r11", "r4", "r6", "r7", "r8", "r9"]  # the reason alone
    assert mdt["unknown_cell"] == ["r3"] and len(mdt["malformed_row"]) == 3  # a malformed line stays malformed
    assert sorted(rt.lake.read_pandas("mdt_reports")["report_id"]) == ["r1", "r2", "r5"]  # r5 is no twin of r4
    assert codes("cells")["excluded_by_filter"] == ["C3"]
    traffic = codes("traffic")
    assert traffic["excluded_by_filter"] == ["C3"] and "load_out_of_range" not in traffic
    assert result.metrics["rejects.excluded_by_filter"] == 7 + 1 + 1
    # a filter on a column the input lacks is a config error naming it
    bad = make_config(tmp_path / "bad", scenario={"enabled": False},
                      sources={"mdt": {"path": str(CORPUS / "mdt.csv"), "filters": [{"column": "NetworkMode", "in": ["LTE"]}]}})
    with pytest.raises(ConfigError, match=r"sources\.mdt\.filters\.column: raw column 'NetworkMode' not in the input"):
        stage.run(bad, local_runtime(tmp_path / "bad", bad, spark=spark), run_id="x")


def test_positions_windows_and_shards(ingested):
    rt, _ = ingested
    rep = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    frame = LocalFrame(44.495, 11.343)  # median of the three clean cells' lat/lon
    x, y = frame.to_xy(44.4940, 11.3440)  # r4 after the lat/lon swap is repaired
    assert rep.loc["r4", "x_m"] == pytest.approx(float(x), abs=1e-6)
    assert rep.loc["r4", "y_m"] == pytest.approx(float(y), abs=1e-6)
    assert rep["window"].to_dict() == {"r1": "h06_12", "r2": "h06_12", "r3": "h12_18", "r4": "h18_24"}
    assert rep.loc["r1", "cell_shard"] == cell_shard_of("C1", 8)
    cells = rt.lake.read_pandas("cells").set_index("cell_id")
    assert (cells["frame_lat0"] == 44.495).all() and not cells["location_estimated"].any()


def test_load_join_exact_and_nearest_hour(ingested):
    rt, _ = ingested
    rep = rt.lake.read_pandas("mdt_reports").set_index("report_id")["load_rho"]
    assert rep["r1"] == pytest.approx(0.5)  # C1 08:00 counter, same hour
    assert rep["r2"] == pytest.approx(0.5)  # 09:30: 08:00 and 10:00 tie at 1 h, the earlier wins
    assert rep.isna().to_dict() == {"r1": False, "r2": False, "r3": True, "r4": True}
    meas = rt.lake.read_pandas("mdt_measurements")
    nb = meas[meas["role"] == "neighbour"].set_index(["report_id", "cell_id"])["load_rho"]
    assert nb[("r1", "C2")] == pytest.approx(0.2)  # neighbour gets its own cell's load
    assert sorted(meas.loc[meas["role"] == "neighbour", "rank"]) == [1, 1, 2]


def test_partition_layout(ingested):
    rt, _ = ingested
    rels = [u[len(rt.lake.uri("mdt_measurements")) + 1:] for u in rt.lake.file_uris("mdt_measurements")]
    parts = {tuple(p.split("/")[1:3]) for p in rels}
    assert parts == {("window=h06_12", f"cell_shard={cell_shard_of(c, 8)}") for c in ("C1", "C2", "C3")} | {
        ("window=h12_18", f"cell_shard={cell_shard_of('C3', 8)}"), ("window=h18_24", f"cell_shard={cell_shard_of('C2', 8)}")}
    assert len(rels) == len(parts)  # one file per (window, shard)
    assert all(p.startswith("spark-r1-") for p in rels)


@pytest.mark.slow
def test_rerun_same_run_id_is_skipped_and_new_run_does_not_duplicate(ingested, tmp_path, spark):
    rt, _ = ingested
    before = {t: rt.lake.version(t) for t in stage.OUTPUTS}
    again = stage.run(rt.cfg, rt, run_id="r1")
    assert again.skipped and {t: rt.lake.version(t) for t in stage.OUTPUTS} == before
    fresh = run_stage("ingest", rt, run_id="r2", force=True)  # registered: the crash test recovers to it
    assert fresh.rows_written == {"cells": 3, "traffic": 3, "mdt_reports": 4, "mdt_measurements": 7, "rejects": 33}
    assert rt.lake.read("mdt_reports").num_rows == 4 and rt.lake.read("rejects").num_rows == 33
    assert {t: rt.lake.version(t) for t in stage.OUTPUTS} == {t: v + 1 for t, v in before.items()}


@pytest.mark.slow
def test_crash_between_commits_is_rolled_back(ingested, monkeypatch):
    # Reuses the module's lake (one ingest run fewer): whatever its last good versions are.
    rt, first = ingested
    good = {t: rt.lake.version(t) for t in stage.OUTPUTS}
    assert set(first.table_versions) == set(stage.OUTPUTS)
    real = Lake.commit_spark_dir
    calls = []

    def dying_commit(self, table, *args, **kwargs):
        calls.append(table)
        if len(calls) == 3:
            raise LakeError("simulated crash between commits")
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(Lake, "commit_spark_dir", dying_commit)
    with pytest.raises(LakeError, match="simulated crash"):
        run_stage("ingest", rt, run_id="dies", force=True)
    moved = {t for t in stage.OUTPUTS if rt.lake.version(t) != good[t]}
    assert len(moved) == 2  # two tables committed before the crash
    # the failed run deleted the staged files of the tables whose commit it never tried (the one that raised keeps
    # them: its commit may have landed; vacuum decides from the log)
    from pathlib import Path

    assert {t for t in stage.OUTPUTS if any((Path(rt.lake.root) / t).glob("spark-dies-*"))} == set(calls) != set(stage.OUTPUTS)
    restored = RunRegistry(rt.lake).recover()
    assert set(restored) == moved
    for table in stage.OUTPUTS:
        assert rt.lake.read(table).num_rows == rt.lake.read(table, version=good[table]).num_rows
    monkeypatch.setattr(Lake, "commit_spark_dir", real)
    third = run_stage("ingest", rt, run_id="after", force=True)
    assert third.rows_written["mdt_reports"] == 4 and rt.lake.read("mdt_reports").num_rows == 4


def test_unmappable_columns_raise_one_line_each(tmp_path, spark):
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={
        "mdt": {"path": str(CORPUS / "mdt.csv"), "columns": {"rsrp_dbm": "RSRP", "rsrq_db": "RSRQ"}}})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    with pytest.raises(ConfigError, match=r"sources\.mdt\.columns\.rsrp_dbm: raw column 'RSRP' not in the input") as err:
        stage.run(cfg, rt, run_id="x")
    assert "sources.mdt.columns.rsrq_db: raw column 'RSRQ' not in the input" in str(err.value)


def test_a_source_with_no_clean_row_stops_ingest_saying_why(tmp_path, spark):
    # a wrong timestamp_format rejected every report; ingest committed an empty mdt_reports and the run failed
    # later at density with "no training reports", which named neither the cause nor the key
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={
        "mdt": {"path": str(CORPUS / "mdt.csv"), "timestamp_format": "epoch_ms"},
        "cells": {"path": str(CORPUS / "cells.csv")}})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    with pytest.raises(StageError, match=r"^ingest: none of the 22 mdt rows is clean \(bad_timestamp 19, .*\): "
                                         r"sources\.mdt\.timestamp_format is 'epoch_ms'; a row rejected as bad_timestamp: "
                                         r"\{.*\. Nothing was committed$"):
        stage.run(cfg, rt, run_id="x")
    assert not rt.lake.exists("mdt_reports") and not rt.lake.exists("rejects") and not rt.lake.exists("cells")
    # the serving cell mapped to the wrong column: the hint names the cell ids
    cfg = make_config(tmp_path / "b", scenario={"enabled": False}, sources={
        "mdt": {"path": str(CORPUS / "mdt.csv"), "columns": {"serving_cell_id": "ue_id"}},
        "cells": {"path": str(CORPUS / "cells.csv")}})
    with pytest.raises(StageError, match=r"^ingest: none of the 22 mdt rows is clean \(unknown_cell \d+, .*\): its cell ids "
                                         r"match no cell_id of the cells table"):
        stage.run(cfg, local_runtime(tmp_path / "b", cfg, spark=spark), run_id="y")
    # traffic counters alone, none clean
    cfg = make_config(tmp_path / "c", scenario={"enabled": False}, sources={
        "traffic": {"path": str(CORPUS / "traffic.csv"), "timestamp_format": "epoch_s"},
        "cells": {"path": str(CORPUS / "cells.csv")}})
    with pytest.raises(StageError, match=r"^ingest: none of the 11 traffic rows is clean \(bad_timestamp "):
        stage.run(cfg, local_runtime(tmp_path / "c", cfg, spark=spark), run_id="z")


@pytest.mark.slow
def test_estimated_cells_without_a_cells_table(tmp_path, spark):
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={"mdt": {"path": str(CORPUS / "mdt.csv")}},
                      ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    result = stage.run(cfg, rt, run_id="est")
    cells = rt.lake.read_pandas("cells").set_index("cell_id")
    assert cells["location_estimated"].all()
    # no area without cells: C1 serves r1 (44.4950, 11.3420), r2 (44.4960, 11.3440), r10 (45.5, 11.3420)
    assert cells.loc["C1", "lat"] == pytest.approx(44.496) and cells.loc["C1", "lon"] == pytest.approx(11.342)
    # no cells table: C7 is not unknown (r11 kept), no area (r10 kept) and r4's swapped lat/lon
    # is a valid position, so r4 is kept as is and r5 is no longer its near duplicate
    assert result.rows_written["mdt_reports"] == 7
    assert json.loads(result.note)["frame"] == [44.495, 11.342]


@pytest.mark.slow
def test_ucc_drive_tests_through_the_example_config(tmp_path, spark):
    from conftest import shared_data

    from cellsynth.config import load_config

    archive = shared_data("ucc-5g", "5G-production-dataset.zip")
    example = Path(__file__).resolve().parents[2] / "conf" / "examples" / "ucc-5g.yaml"
    cfg = load_config(example, [
        f"run.lake_root={tmp_path / 'lake'}", f"run.data_dir={tmp_path / 'data'}", f"sources.mdt.path={archive}",
        # one driving trace keeps the test short (this one drops to 3G for 14 of its 761 rows); the
        # example config ingests all of them
        "sources.mdt.archive_glob=*/Netflix/Driving/Season3-StrangerThings/B_2019.11.24_12.19.13.csv",
    ])
    rt = local_runtime(tmp_path, cfg, spark=spark)
    result = stage.run(cfg, rt, run_id="ucc")
    import csv
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        rows = list(csv.DictReader(zf.read("5G-production-dataset/Netflix/Driving/Season3-StrangerThings/B_2019.11.24_12.19.13.csv").decode().splitlines()))
    assert result.rows_in["mdt"] == len(rows)
    assert result.rows_written["mdt_reports"] + result.rows_rejected == len(rows)
    # the 3G rows (HSPA+ ..., whose RSRQ column holds -2) are excluded by the example's filter, for that alone
    lte = [r for r in rows if r["NetworkMode"] in ("LTE", "5G")]
    assert 0 < len(lte) < len(rows)
    assert result.metrics["rejects.excluded_by_filter"] == len(rows) - len(lte)
    n_bad_rsrq = sum(1 for r in lte if r["RSRQ"] not in ("", "-") and not -34.0 <= float(r["RSRQ"]) <= 2.5)
    assert result.metrics.get("rejects.rsrq_out_of_range", 0.0) == n_bad_rsrq
    cells = rt.lake.read_pandas("cells")
    assert cells["location_estimated"].all()
    assert set(cells["cell_id"]) <= {r["RAWCELLID"] for r in lte if r["RAWCELLID"] not in ("", "-")}
    assert len(cells) >= 0.8 * len({r["RAWCELLID"] for r in lte})
    assert abs(cells["lat"].median() - 51.9) < 0.2, result.metrics  # Cork


def test_a_script_reading_the_ingest_tables_exits_cleanly(ingested):
    # Through delta-rs' Python filesystem handler (to_pyarrow_dataset's default) a bare script that read
    # the ingest's Spark-written tables aborted at interpreter exit in about half the runs (rc 134,
    # "terminate called without an active exception"); the lake reads through pyarrow's own filesystem.
    import subprocess
    import sys

    rt, _ = ingested
    code = (f"from cellsynth.lake import Lake; lake = Lake({rt.lake.root!r})\n"
            "for t in ('traffic', 'mdt_reports', 'mdt_measurements', 'cells', 'rejects'):\n"
            "    assert len(lake.read_pandas(t)) > 0, t\n")
    rcs = [subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode for _ in range(6)]
    assert rcs == [0] * 6


def test_a_traffic_only_source_runs_ingest_traffic_and_report(tmp_path, spark):
    # conf/examples/lte-traffic.yaml in small: no reject at all used to crash the reason count (Spark wrote
    # no rejects file to read), and `run` went on to density, which failed for want of MDT reports. Until
    # session 35 it then stopped after ingest: counters alone gave no synthetic traffic, although the
    # traffic model needs no report (with no cells table it learns without context).
    from cellsynth.pipeline import run_pipeline

    csv_path = tmp_path / "traffic.csv"
    hours = pd.date_range("2026-01-05", periods=2 * 168, freq="h")
    rng = np.random.default_rng(0)
    lines = ["cell,DateTime,Traffic"] + [
        f"{cell},{t:%Y-%m-%d %H:%M:%S},{scale * (2 + np.sin(2 * np.pi * t.hour / 24)) + rng.uniform(0, 1):.3f}"
        for cell, scale in (("A", 10.0), ("B", 4.0), ("C", 7.0), ("D", 5.0)) for t in hours]
    csv_path.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={"traffic": {
        "path": str(csv_path), "timestamp_format": "yyyy-MM-dd HH:mm:ss",
        "columns": {"cell_id": "cell", "timestamp": "DateTime", "traffic_mb": "Traffic"}}},
        traffic={"n_steps": 20, "hidden_channels": 16, "n_blocks": 1, "diffusion_steps": 10, "sampling_steps": 5,
                 "holdout_fraction": 0.25})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    logged = []
    rt.log = logged.append
    _, results = run_pipeline(rt)
    assert [r.stage for r in results] == ["ingest", "traffic", "report"]
    assert results[0].rows_in == {"traffic": len(lines) - 1} and results[0].rows_rejected == 0
    assert rt.lake.read("traffic").num_rows == len(lines) - 1 and rt.lake.read("rejects").num_rows == 0
    assert "no cells table" in results[1].note and "none" in results[1].note
    synth = rt.lake.read_pandas("synthetic_traffic")
    assert set(synth["cell_id"]) == {"A", "B", "C", "D"}
    assert len(synth) == 4 * cfg.traffic.n_samples_per_cell * 168
    metrics = rt.lake.read_pandas("metrics")
    # no context column: neither the unconditional ablation nor a "nearest context" copy is scored
    assert set(metrics["model"].dropna()) == {"diffusion", "hour_of_week_mean"}
    assert metrics.loc[metrics["metric"] == "n_context_features", "value"].tolist() == [0.0]
    report = Path(results[2].artifacts["report"]).read_text()
    assert "traffic JSD" in report and "No row was rejected." in report
    assert any("no MDT reports" in str(m) and "density" in str(m) and "traffic" in str(m) for m in logged)
    # `cellsynth train` (a group of stages) follows the same rule; one stage by name still fails, saying why
    from cellsynth.errors import StageError
    from cellsynth.stages import TRAIN_STAGES

    _, again = run_pipeline(rt, stages=TRAIN_STAGES, force=True)
    assert [r.stage for r in again] == ["traffic"]
    with pytest.raises(StageError, match="mdt_reports"):
        run_pipeline(rt, stages=["density"])
    # ... unless asked to skip what nothing feeds (the Airflow DAG's fixed task list): skipped, saying why
    _, lone = run_pipeline(rt, stages=["generate"], skip_unfed=True)
    assert [(r.stage, r.skipped) for r in lone] == [("generate", True)]
    assert lone[0].note.startswith("no MDT reports") and lone[0].note.endswith("generate needs them; skipped")
    _, fed = run_pipeline(rt, stages=["report"], skip_unfed=True, force=True)
    assert [(r.stage, r.skipped) for r in fed] == [("report", False)]


@pytest.mark.slow
def test_a_timestamp_split_over_date_and_time_columns(tmp_path, spark):
    # loggers that export "Date" and "Time" apart had no way to map `timestamp` (one raw column each)
    mdt = pd.DataFrame({
        "report_id": ["a", "b", "c"], "Date": ["05.01.2026", "05.01.2026", "05.01.2026"],
        "Time": ["08:10:00", "09:30:15", ""], "latitude": [44.4950, 44.4960, 44.4955],
        "longitude": [11.3420, 11.3440, 11.3430], "serving_cell_id": ["C1", "C1", "C2"],
        "serving_rsrp_dbm": [-80, -85, -90]})
    traffic = pd.DataFrame({"cell_id": ["C1", "C2"], "Day": ["05.01.2026", "05.01.2026"], "Hour": ["08:00", "09:00"],
                            "prb_util_pct": [50, 20]})
    mdt.to_csv(tmp_path / "mdt.csv", index=False)
    traffic.to_csv(tmp_path / "traffic.csv", index=False)
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "mdt.csv"), "timestamp_columns": ["Date", "Time"],
                "timestamp_format": "dd.MM.yyyy HH:mm:ss", "timezone": "Europe/Rome"},
        "traffic": {"path": str(tmp_path / "traffic.csv"), "timestamp_columns": ["Day", "Hour"],
                    "timestamp_format": "dd.MM.yyyy HH:mm"},
        "cells": {"path": str(CORPUS / "cells.csv")}})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    stage.run(cfg, rt, run_id="split")
    reports = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    # Rome is UTC+1 in January
    assert reports.loc["a", "ts"] == pd.Timestamp("2026-01-05T07:10:00Z")
    assert reports.loc["b", "ts"] == pd.Timestamp("2026-01-05T08:30:15Z")
    assert sorted(rt.lake.read_pandas("traffic")["ts"]) == [pd.Timestamp("2026-01-05T08:00:00Z"),
                                                           pd.Timestamp("2026-01-05T09:00:00Z")]
    # a date without its time is no timestamp; the rejected row keeps both raw columns as they were
    rejects = rt.lake.read_pandas("rejects")
    row = rejects[rejects["source"] == "mdt"].iloc[0]
    assert row["reason_code"] == "missing_value"
    assert json.loads(row["raw_row"])["Date"] == "05.01.2026" and "__timestamp__" not in row["raw_row"]
    # a column that is not there, and both ways at once, are one-line errors naming the key
    bad = make_config(tmp_path / "b", scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "mdt.csv"), "timestamp_columns": ["Date", "Clock"]}})
    with pytest.raises(ConfigError, match=r"sources\.mdt\.timestamp_columns: raw column 'Clock' not in the input"):
        stage.run(bad, local_runtime(tmp_path / "b", bad, spark=spark), run_id="b")
    with pytest.raises(Exception, match=r"timestamp_columns: give the timestamp either as columns\.timestamp"):
        make_config(tmp_path / "c", sources={"mdt": {"timestamp_columns": ["Date", "Time"], "columns": {"timestamp": "Date"}}})


@pytest.mark.slow
def test_gzip_and_bzip2_csv_read_like_the_plain_files(tmp_path, spark):
    # a folder of .csv.gz exports matched no file ("no input files match"); the header grouping read
    # the compressed bytes (harmless for Spark, which reads each group's header itself)
    import bz2
    import gzip

    (tmp_path / "mdt").mkdir()
    (tmp_path / "mdt" / "mdt.csv.gz").write_bytes(gzip.compress((CORPUS / "mdt.csv").read_bytes()))
    (tmp_path / "traffic.csv.bz2").write_bytes(bz2.compress((CORPUS / "traffic.csv").read_bytes()))
    (tmp_path / "cells.csv.gz").write_bytes(gzip.compress((CORPUS / "cells.csv").read_bytes()))
    cfg = make_config(tmp_path, scenario={"enabled": False},
                      sources={"mdt": {"path": str(tmp_path / "mdt")}, "traffic": {"path": str(tmp_path / "traffic.csv.bz2")},
                               "cells": {"path": str(tmp_path / "cells.csv.gz")}},
                      ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    stage.run(cfg, rt, run_id="gz")
    rej = rt.lake.read_pandas("rejects")
    got = {s: Counter(code for codes in g["reason_code"] for code in codes.split(";")) for s, g in rej.groupby("source")}
    assert got == EXPECTED_REASONS  # malformed lines found inside the compressed files too
    assert len(rt.lake.read_pandas("mdt_reports")) == 4  # as test_clean_plus_rejected_equals_input


@pytest.mark.slow
def test_float_cell_ids_written_by_pandas_match_the_integer_ids_of_the_cells_table(tmp_path, spark):
    # an integer id column with a missing value is float64 in pandas (1025.0 in its Parquet and CSV):
    # every report was unknown_cell against a cells table that says 1025
    ids = {"C1": 101, "C2": 102, "C3": 103}
    cells = pd.read_csv(io.StringIO("".join((CORPUS / "cells.csv").read_text().splitlines(keepends=True)[:4])), dtype=str)
    cells.assign(cell_id=cells["cell_id"].map(ids)).to_csv(tmp_path / "cells.csv", index=False)
    mdt = pd.read_csv(io.StringIO("".join((CORPUS / "mdt.csv").read_text().splitlines(keepends=True)[:4])), dtype=str)
    for col in ("serving_cell_id", "neighbour_1_cell_id", "neighbour_2_cell_id"):
        mdt[col] = mdt[col].map(ids).astype(float)  # r2 has no second neighbour: NaN, so floats
    for col in ("latitude", "longitude", "serving_rsrp_dbm", "neighbour_1_rsrp_dbm", "neighbour_2_rsrp_dbm"):
        mdt[col] = mdt[col].astype(float)
    assert mdt["neighbour_2_cell_id"].dtype == float
    mdt.to_parquet(tmp_path / "mdt.parquet", index=False)
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "mdt.parquet"), "format": "parquet"}, "cells": {"path": str(tmp_path / "cells.csv")}})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    stage.run(cfg, rt, run_id="f")
    reports = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    assert reports["serving_cell_id"].to_dict() == {"r1": "101", "r2": "101", "r3": "103"}
    meas = rt.lake.read_pandas("mdt_measurements")
    assert sorted(meas.loc[meas["role"] == "neighbour", "cell_id"]) == ["102", "102", "103"]


@pytest.mark.slow
def test_rsrp_and_rsrq_as_3gpp_report_indices(tmp_path, spark):
    # MDT from trace decoders carries the UE's reported values (RSRP_00..RSRP_97, RSRQ_00..RSRQ_34), not dBm
    rows = [("a", "60", "17", "50"), ("b", "0", "34", ""), ("c", "98", "17", ""), ("d", "60.5", "17", "96")]
    mdt = pd.DataFrame({
        "report_id": [r[0] for r in rows], "ue_id": [f"u{r[0]}" for r in rows],
        "timestamp": [f"2026-01-05T08:0{i}:00Z" for i in range(len(rows))], "latitude": 44.4950, "longitude": 11.3420,
        "serving_cell_id": "C1", "serving_rsrp_dbm": [r[1] for r in rows], "serving_rsrq_db": [r[2] for r in rows],
        "neighbour_1_cell_id": ["C2" if r[3] else "" for r in rows], "neighbour_1_rsrp_dbm": [r[3] for r in rows]})
    mdt.to_csv(tmp_path / "mdt.csv", index=False)
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "mdt.csv"), "units": {"rsrp_dbm": "lte_index", "rsrq_db": "lte_index"}},
        "cells": {"path": str(CORPUS / "cells.csv")}})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    stage.run(cfg, rt, run_id="idx")
    reports = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    # RSRP_60 is [-81, -80) dBm, RSRQ_17 [-11.5, -11) dB: their centres
    assert reports.loc["a", "rsrp_dbm"] == pytest.approx(-80.5) and reports.loc["a", "rsrq_db"] == pytest.approx(-11.25)
    meas = rt.lake.read_pandas("mdt_measurements")
    assert meas.loc[meas["role"] == "neighbour", "rsrp_dbm"].tolist() == pytest.approx([-90.5])
    rej = rt.lake.read_pandas("rejects").query("source == 'mdt'")
    codes = dict(zip(rej["raw_row"].map(lambda r: json.loads(r).get("report_id")), rej["reason_code"], strict=True))
    # the open end bins at the range's ends: RSRP_00 ("below -140 dBm") is -140, RSRQ_34 (">= -3 dB") -3;
    # 98 is no LTE index, 60.5 no index at all
    assert reports.loc["b", ["rsrp_dbm", "rsrq_db"]].tolist() == pytest.approx([-140.0, -3.0])
    assert codes == {"c": "bad_number", "d": "bad_number"}
    # NR's L3 SS-RSRP table starts 16 dB lower: SS-RSRP_60 is [-97, -96) dBm
    cfg = make_config(tmp_path / "nr", scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "mdt.csv"), "units": {"rsrp_dbm": "nr_index", "rsrq_db": "lte_index"}},
        "cells": {"path": str(CORPUS / "cells.csv")}})
    rt = local_runtime(tmp_path / "nr", cfg, spark=spark)
    stage.run(cfg, rt, run_id="nr")
    assert rt.lake.read_pandas("mdt_reports").set_index("report_id").loc["a", "rsrp_dbm"] == pytest.approx(-96.5)
    # dBm read as indices: nothing is clean, and the error says to look at the units
    wrong = make_config(tmp_path / "w", scenario={"enabled": False}, sources={
        "mdt": {"path": str(CORPUS / "mdt.csv"), "units": {"rsrp_dbm": "lte_index"}}, "cells": {"path": str(CORPUS / "cells.csv")}},
        ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"})
    with pytest.raises(StageError, match=r"none of the 22 mdt rows is clean \(bad_number .*sources\.mdt\.units is "
                                         r"\{'rsrp_dbm': 'lte_index'\}: are the values in those units\?"):
        stage.run(wrong, local_runtime(tmp_path / "w", wrong, spark=spark), run_id="w")
    bad = make_config(tmp_path / "x", scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "mdt.csv"), "units": {"rsrp_dbm": "index"}}})
    with pytest.raises(ConfigError, match=r"sources\.mdt\.units\.rsrp_dbm: unknown unit 'index' \(supported: .*"
                                          r"rsrp_dbm: dbm\|lte_index\|nr_index"):
        stage.run(bad, local_runtime(tmp_path / "x", bad, spark=spark), run_id="x")


@pytest.mark.slow
def test_an_excel_workbook_sheet_reads_with_its_cell_types(tmp_path, spark):
    # drive-test tools and OSS exports hand over .xlsx; there was no reader for it
    mdt = pd.DataFrame({
        "report_id": ["a", "b", "c"], "ue_id": ["u1", "u1", "u2"],
        "timestamp": pd.to_datetime(["2026-01-05 08:10:00", "2026-01-05 09:30:00", "2026-01-05 10:00:00"]),
        "latitude": [44.4950, 44.4960, 44.4955], "longitude": [11.3420, 11.3440, 11.3430],
        "serving_cell_id": ["C1", "C1", "C2"], "serving_rsrp_dbm": [-80, -85, -250],
        "neighbour_1_cell_id": ["C2", None, "C3"], "neighbour_1_rsrp_dbm": [-90.0, None, -95.0]})
    with pd.ExcelWriter(tmp_path / "drive.xlsx") as xw:
        pd.DataFrame({"note": ["exported by the logger"]}).to_excel(xw, sheet_name="about", index=False)
        mdt.to_excel(xw, sheet_name="reports", index=False)
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "drive.xlsx"), "format": "excel", "options": {"sheet_name": "reports"},
                "timezone": "Europe/Rome", "columns": {"ue_id": "__file__"}},
        "cells": {"path": str(CORPUS / "cells.csv")}})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    stage.run(cfg, rt, run_id="xl")
    reports = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    assert sorted(reports.index) == ["a", "b"]  # c's RSRP is out of range
    assert reports.loc["a", "ts"] == pd.Timestamp("2026-01-05T07:10:00Z")  # the workbook's Rome wall clock
    assert set(reports["ue_id"]) == {"drive.xlsx"}  # the workbook's own name
    meas = rt.lake.read_pandas("mdt_measurements")
    assert meas.loc[meas["role"] == "neighbour", "cell_id"].tolist() == ["C2"]
    rej = rt.lake.read_pandas("rejects").query("source == 'mdt'")
    assert json.loads(rej["raw_row"].iloc[0])["serving_rsrp_dbm"] == "-250"
    # the first sheet by default; a sheet that is not there names the key
    bad = make_config(tmp_path / "b", scenario={"enabled": False}, sources={
        "mdt": {"path": str(tmp_path / "drive.xlsx"), "format": "excel", "options": {"sheet_name": "Sheet9"}}})
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.options\.sheet_name: drive\.xlsx: .*Sheet9"):
        stage.run(bad, local_runtime(tmp_path / "b", bad, spark=spark), run_id="b")


def test_ingest_before_simulate_says_to_simulate(tmp_path):
    # the scenario is enabled by default, so "or enable the scenario" told the user to do what they had done
    rt = local_runtime(tmp_path, make_config(tmp_path))
    with pytest.raises(ConfigError, match=r"^sources: no simulated MDT or traffic under .*/data/sim: run `cellsynth "
                                          r"simulate` first \(or `cellsynth run`\), or set sources\.mdt\.path"):
        stage.run(rt.cfg, rt, run_id="r0")
    off = make_config(tmp_path, scenario={"enabled": False})
    with pytest.raises(ConfigError, match=r"or enable the scenario\)$"):
        stage.run(off, local_runtime(tmp_path, off), run_id="r0")
