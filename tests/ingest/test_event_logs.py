"""Event exports of drive-test tools: a time of day without a date (`timestamp_date`) and columns
written only when they change (`fill_forward`), as Nemo-style logs write them."""

from __future__ import annotations

import pandas as pd
import pytest

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.errors import ConfigError
from cellsynth.ingest import stage

CELLS = "cell_id,latitude,longitude\n5885799,2.9221,101.7755\n5885800,2.9221,101.7755\n"
# A Nemo-like export: the serving cell's id on rows of its own, measurements on others; times of day
HEADER = "Time,Latitude,Longitude,Cell identification,RSRP (LTE pcell),RSRQ (LTE pcell)\n"
FLIGHT_A = [
    "9:41:07.000,,,5885799,,",
    "9:41:07.250,2.9200,101.7700,,-80.5,-9.0",
    "9:41:08.250,2.9201,101.7701,,-81.0,-9.5",
    "9:41:09.000,,,5885800,,",
    "9:41:09.250,2.9202,101.7702,,-90.0,-24.5",  # inside LTE's extended RSRQ range (TS 36.133 Rel-12)
]
FLIGHT_B = [  # starts without a cell row: nothing above to fill from (another file's last value is not taken)
    "10:00:00.250,2.9203,101.7703,,-85.0,-10.0",
    "10:00:01.000,,,5885799,,",
    "10:00:01.250,2.9204,101.7704,,-86.0,-10.5",
]
MDT = {"timestamp_date": "2022-12-06", "timestamp_format": "yyyy-MM-dd H:mm:ss.SSS", "timezone": "Asia/Kuala_Lumpur",
       "fill_forward": ["Cell identification"], "neighbour_layout": "none",
       "filters": [{"column": "RSRP (LTE pcell)", "min": -200}],
       "columns": {"timestamp": "Time", "latitude": "Latitude", "longitude": "Longitude",
                   "serving_cell_id": "Cell identification", "rsrp_dbm": "RSRP (LTE pcell)", "rsrq_db": "RSRQ (LTE pcell)"}}


def _write(tmp_path):
    (tmp_path / "flights").mkdir(parents=True)
    (tmp_path / "cells.csv").write_text(CELLS)
    for name, lines in (("a.csv", FLIGHT_A), ("b.csv", FLIGHT_B)):
        (tmp_path / "flights" / name).write_text(HEADER + "\n".join(lines) + "\n")


def _run(tmp_path, spark, name, **mdt):
    cfg = make_config(tmp_path / name, scenario={"enabled": False},
                      ingest={"period_start": "2022-12-01", "period_end": "2022-12-31"},
                      sources={"cells": {"path": str(tmp_path / "cells.csv")},
                               "mdt": {"path": str(tmp_path / "flights"), **MDT, **mdt}})
    rt = local_runtime(tmp_path / name, cfg, spark=spark)
    return stage.run(cfg, rt, run_id=name), rt


@pytest.mark.slow
def test_a_time_of_day_log_with_the_cell_id_on_rows_of_its_own(tmp_path, spark):
    _write(tmp_path)
    # tiny file splits: each file is read in several parts, and the fill still follows file order
    old = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "64")
    try:
        res, rt = _run(tmp_path, spark, "split")
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", old)
    got = rt.lake.read_pandas("mdt_reports").sort_values("ts")
    # 9:41:07.250 in Kuala Lumpur (UTC+8) is 01:41:07.250 UTC on the given date
    assert list(got["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f")) == [
        "2022-12-06T01:41:07.250000", "2022-12-06T01:41:08.250000", "2022-12-06T01:41:09.250000",
        "2022-12-06T02:00:01.250000"]
    assert list(got["serving_cell_id"]) == ["5885799", "5885799", "5885800", "5885799"]
    assert list(got["rsrp_dbm"]) == [-80.5, -81.0, -90.0, -86.0]
    # every row is counted: the cell-id rows are excluded by the filter, b's first row has no cell to fill
    assert res.rows_in["mdt"] == len(FLIGHT_A) + len(FLIGHT_B)
    rej = rt.lake.read_pandas("rejects")
    assert sorted(rej.loc[rej["source"] == "mdt", "reason_code"]) == ["excluded_by_filter"] * 3 + ["missing_value"]


def test_event_log_options_fail_with_one_line_naming_the_key(tmp_path, spark):
    _write(tmp_path)
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.fill_forward: raw column\(s\) 'Cell id' not in the input"):
        _run(tmp_path, spark, "a", fill_forward=["Cell id"])
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.columns\.timestamp: raw column 'Tme' not in the input"):
        _run(tmp_path, spark, "b", columns={**MDT["columns"], "timestamp": "Tme"})
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.timestamp_date: expected a date \(YYYY-MM-DD\), got '06\.12\.2022'"):
        make_config(tmp_path / "c", sources={"mdt": {"timestamp_date": "06.12.2022"}})


def test_the_pandas_reader_fills_forward_within_each_file(tmp_path):
    from cellsynth.config import PipelineConfig
    from cellsynth.ingest.sources import FILE_COLUMN, read_raw_pandas, resolve_source

    _write(tmp_path)
    cfg = PipelineConfig.model_validate({"scenario": {"enabled": False}, "run": {"data_dir": str(tmp_path / "d")},
                                         "sources": {"mdt": {"path": str(tmp_path / "flights"), **MDT}}})
    df = read_raw_pandas(resolve_source(cfg, "mdt"))
    cells = df.groupby(FILE_COLUMN, sort=True)["Cell identification"].apply(list).to_dict()
    assert cells == {"a.csv": ["5885799"] * 3 + ["5885800"] * 2, "b.csv": [pd.NA, "5885799", "5885799"]}


@pytest.mark.slow
def test_the_uav_flight_logs_through_the_example_config(tmp_path, spark):
    import io
    import zipfile
    from pathlib import Path

    from conftest import shared_data

    from cellsynth.config import load_config

    archive = shared_data("uav-lte-a2g-ukm", "raw_dataset.zip")
    example = Path(__file__).resolve().parents[2] / "conf" / "examples" / "uav-lte.yaml"
    members = ["Measured Data/20m.csv", "Measured Data/25m.csv"]  # two flights keep the test short
    cfg = load_config(example, [f"run.lake_root={tmp_path / 'lake'}", f"run.data_dir={tmp_path / 'data'}",
                                f"sources.mdt.path={archive}", "sources.mdt.archive_glob=Measured Data/2?m.csv"])
    rt = local_runtime(tmp_path, cfg, spark=spark)
    result = stage.run(cfg, rt, run_id="uav")
    # the same logs by pandas: the cell id filled forward within each file
    with zipfile.ZipFile(archive) as zf:
        frames = {m.split("/")[-1]: pd.read_csv(io.BytesIO(zf.read(m)), dtype=str, keep_default_na=False, on_bad_lines="skip")
                  for m in members}
    with zipfile.ZipFile(archive) as zf:  # lines after the header; empty lines are no rows (Spark skips them)
        n_lines = sum(sum(1 for line in zf.read(m).decode("latin-1").splitlines()[1:] if line.strip()) for m in members)
    assert result.rows_in["mdt"] == n_lines == result.rows_written["mdt_reports"] + result.rows_rejected
    assert result.metrics["rejects.malformed_row"] == 2 * len(members)  # the footer lines
    # the logger reports RSRQ down to -26 dB (the extended range): none of those reports is lost
    assert result.metrics.get("rejects.rsrq_out_of_range", 0.0) == 0.0
    expected = {}
    for name, f in frames.items():
        f = f[f["Time"].str.match(r"^\d+:\d\d:\d\d")]
        cell = f["Cell identification"].replace("", None).ffill()
        for t, c, r in zip(f["Time"], cell, f["RSRP (LTE pcell)"], strict=True):
            if r:
                expected[(name, t)] = c
    got = rt.lake.read_pandas("mdt_reports")
    assert len(got) > 0.8 * len(expected) and set(got["ue_id"]) == set(frames)
    # each report's serving cell is the last cell id logged above it in its own file
    local = got["ts"].dt.tz_convert("Asia/Kuala_Lumpur")
    assert (local.dt.strftime("%Y-%m-%d") == "2022-12-06").all()
    times = local.dt.strftime("%-H:%M:%S.%f").str[:-3]
    assert [expected[(u, t)] for u, t in zip(got["ue_id"], times, strict=True)] == list(got["serving_cell_id"])
