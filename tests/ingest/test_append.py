"""New files for a new day append: only the new files are read, their rows are appended (old
files untouched), ids already ingested are duplicates, the load join sees old counters; the same
file set again is skipped, and a changed old file makes a full rewrite."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.ingest import stage
from cellsynth.pipeline import run_stage

from .test_stage import CORPUS

# Day 2, hand-made: d1 is clean (C1 08:00 counter of day 2: load 0.6); r1 was ingested on day 1
# (duplicate); d2 arrives late for day 1 and takes day 1's C1 10:00 counter (0.4); d3's RSRP is
# out of range.
DAY2_MDT = """report_id,ue_id,timestamp,latitude,longitude,serving_cell_id,serving_rsrp_dbm,serving_rsrq_db,neighbour_1_cell_id,neighbour_1_rsrp_dbm,neighbour_2_cell_id,neighbour_2_rsrp_dbm
d1,u8,2026-01-06T08:10:00Z,44.4950,11.3420,C1,-81,-10,C2,-91,,
r1,u1,2026-01-06T09:00:00Z,44.4950,11.3420,C1,-80,-10,,,,
d2,u9,2026-01-05T10:40:00Z,44.4951,11.3421,C1,-82,-11,C3,-95,,
d3,u9,2026-01-06T12:00:00Z,44.4952,11.3422,C2,-30,-10,,,,
"""
# C2 on day 1 08:00 was already ingested: a duplicate.
DAY2_TRAFFIC = """cell_id,timestamp,traffic_mb,prb_util_pct
C1,2026-01-06T08:00:00Z,100,60
C2,2026-01-05T08:00:00Z,80,20
"""


@pytest.fixture(scope="module")
def lake_two_days(tmp_path_factory, spark):
    tmp = tmp_path_factory.mktemp("append")
    for kind in ("mdt", "traffic"):
        (tmp / kind).mkdir()
        shutil.copy(CORPUS / f"{kind}.csv", tmp / kind / "day1.csv")
    cfg = make_config(
        tmp, scenario={"enabled": False},
        sources={"mdt": {"path": str(tmp / "mdt")}, "traffic": {"path": str(tmp / "traffic")},
                 "cells": {"path": str(CORPUS / "cells.csv")}},
        ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"},
    )
    rt = local_runtime(tmp, cfg, spark=spark)
    first = run_stage("ingest", rt, run_id="day1")
    before = {t: (rt.lake.version(t), set(rt.lake.file_uris(t))) for t in stage.OUTPUTS}
    (tmp / "mdt" / "day2.csv").write_text(DAY2_MDT)
    (tmp / "traffic" / "day2.csv").write_text(DAY2_TRAFFIC)
    second = run_stage("ingest", rt, run_id="day2")
    return tmp, rt, first, before, second


def test_new_day_appends_only_its_rows(lake_two_days):
    _, rt, first, before, second = lake_two_days
    assert json.loads(first.note)["mode"] == "full rewrite"
    note = json.loads(second.note)
    assert note["mode"] == "append" and note["new_files"] == {"mdt": 1, "traffic": 1}
    # reconciliation of the new files alone
    assert second.rows_in == {"traffic": 2, "mdt": 4, "neighbour": 2}
    assert second.rows_written == {"traffic": 1, "mdt_reports": 2, "mdt_measurements": 4, "rejects": 3}
    assert second.metrics["rejects.duplicate"] == 2.0 and second.metrics["rejects.rsrp_out_of_range"] == 1.0
    reports = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    assert sorted(reports.index) == ["d1", "d2", "r1", "r2", "r3", "r4"]
    assert reports.loc["d1", "load_rho"] == pytest.approx(0.6)
    assert reports.loc["d2", "load_rho"] == pytest.approx(0.4)  # day 1's counter, already in the lake
    assert reports.loc["r1", "ingest_run_id"] == "day1"  # the day-1 row kept, not replaced
    assert rt.lake.read("traffic").num_rows == 3 + 1 and rt.lake.read("rejects").num_rows == 33 + 3


def test_old_files_untouched_and_cells_not_rewritten(lake_two_days):
    _, rt, _, before, _ = lake_two_days
    for table in ("mdt_reports", "mdt_measurements", "traffic", "rejects"):
        version, files = before[table]
        assert rt.lake.version(table) == version + 1
        assert files < set(rt.lake.file_uris(table))  # every old file still there, new ones added
    assert rt.lake.version("cells") == before["cells"][0]


def test_same_file_set_is_skipped_and_changed_old_file_rewrites(lake_two_days):
    tmp, rt, _, _, _ = lake_two_days
    versions = {t: rt.lake.version(t) for t in stage.OUTPUTS}
    again = run_stage("ingest", rt, run_id="again")
    assert again.skipped and {t: rt.lake.version(t) for t in stage.OUTPUTS} == versions
    day1 = tmp / "mdt" / "day1.csv"
    st = day1.stat()
    os.utime(day1, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "changed" old file
    full = run_stage("ingest", rt, run_id="full")
    note = json.loads(full.note)
    assert note["mode"] == "full rewrite" and note["why"] == "mdt: 1 ingested file(s) changed or removed"
    # both days from scratch: the day-2 r1 is a duplicate of day 1's r1 inside the one run
    assert full.rows_written["mdt_reports"] == 6 and rt.lake.read("mdt_reports").num_rows == 6
    assert full.rows_in["mdt"] == 22 + 4


# Without a cells source the cells are estimated from the reports; day 3 adds reports of C1 far from its
# estimate and the first reports of a new cell C8.
DAY3_MDT = """report_id,ue_id,timestamp,latitude,longitude,serving_cell_id,serving_rsrp_dbm,serving_rsrq_db,neighbour_1_cell_id,neighbour_1_rsrp_dbm,neighbour_2_cell_id,neighbour_2_rsrp_dbm
e1,u10,2026-01-07T08:10:00Z,44.5050,11.3520,C1,-95,-12,,,,
e2,u10,2026-01-07T08:20:00Z,44.5060,11.3530,C1,-96,-12,,,,
e3,u11,2026-01-07T09:00:00Z,44.4900,11.3300,C8,-88,-11,,,,
"""
DAY4_MDT = """report_id,ue_id,timestamp,latitude,longitude,serving_cell_id,serving_rsrp_dbm,serving_rsrq_db,neighbour_1_cell_id,neighbour_1_rsrp_dbm,neighbour_2_cell_id,neighbour_2_rsrp_dbm
f1,u12,2026-01-08T08:10:00Z,44.5150,11.3620,C1,-99,-12,,,,
"""


def test_without_a_cells_table_an_append_keeps_frame_and_estimates_and_adds_new_cells(tmp_path, spark):
    # every new file used to rewrite every table (the frame and the estimated positions move with the
    # reports), so `run --incremental` retrained everything for the many drive tests that have no site table
    (tmp_path / "mdt").mkdir()
    shutil.copy(CORPUS / "mdt.csv", tmp_path / "mdt" / "day1.csv")
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={"mdt": {"path": str(tmp_path / "mdt")}},
                      ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    first = run_stage("ingest", rt, run_id="d1")
    cells1 = rt.lake.read_pandas("cells").set_index("cell_id").sort_index()
    assert cells1["location_estimated"].all() and "C8" not in cells1.index
    (tmp_path / "mdt" / "day3.csv").write_text(DAY3_MDT)
    second = run_stage("ingest", rt, run_id="d3")
    note = json.loads(second.note)
    assert note["mode"] == "append" and note["frame"] == json.loads(first.note)["frame"]
    cells2 = rt.lake.read_pandas("cells").set_index("cell_id").sort_index()
    assert set(cells2.index) == set(cells1.index) | {"C8"}  # the new cell appended, once
    assert len(cells2) == len(cells1) + 1
    kept = cells2.loc[cells1.index, ["x_m", "y_m", "frame_lat0", "frame_lon0"]]
    assert kept.equals(cells1[["x_m", "y_m", "frame_lat0", "frame_lon0"]])  # C1 not moved by its new reports
    assert cells2.loc["C8", "location_estimated"] and cells2.loc["C8", "frame_lat0"] == cells1["frame_lat0"].iloc[0]
    reports = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    assert {"e1", "e2", "e3"} <= set(reports.index)
    # only known cells in the next file: the cells table keeps its version (downstream stays incremental)
    v_cells = rt.lake.version("cells")
    (tmp_path / "mdt" / "day4.csv").write_text(DAY4_MDT)
    third = run_stage("ingest", rt, run_id="d4")
    assert json.loads(third.note)["mode"] == "append" and rt.lake.version("cells") == v_cells
    assert third.rows_written["mdt_reports"] == 1
