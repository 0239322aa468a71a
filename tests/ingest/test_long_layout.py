"""MDT in the long layout (one row per measured cell, as cell-list exports write it), pivoted to one
report per group of rows (sources.mdt.neighbour_layout: long)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.config import config_from_dict
from cellsynth.errors import ConfigError, StageError
from cellsynth.geo import LocalFrame
from cellsynth.ingest import stage

FRAME = LocalFrame(51.9, -8.47)
N_CELLS, N_REPORTS = 30, 200
LONG = {"neighbour_layout": "long", "serving_rows": {"column": "Type", "in": ["Serving"]},
        "columns": {"timestamp": "Time", "ue_id": "IMSI", "latitude": "Lat", "longitude": "Lon",
                    "serving_cell_id": "Cell", "rsrp_dbm": "RSRP", "rsrq_db": "RSRQ"}}


def _reports(tmp_path):
    """Cells, and the same reports in the wide and in the long layout (long rows shuffled)."""
    rng = np.random.default_rng(11)
    cx, cy = rng.uniform(0, 5000, N_CELLS), rng.uniform(0, 5000, N_CELLS)
    lat, lon = FRAME.to_latlon(cx, cy)
    ids = [f"C{i}" for i in range(N_CELLS)]
    # unique PCIs, so the PCI-named copy of the reports resolves to the same cells
    pd.DataFrame({"cell_id": ids, "latitude": lat, "longitude": lon, "pci": 100 + np.arange(N_CELLS)}).to_csv(
        tmp_path / "cells.csv", index=False)
    ux, uy = rng.uniform(0, 5000, N_REPORTS), rng.uniform(0, 5000, N_REPORTS)
    ula, ulo = FRAME.to_latlon(ux, uy)
    order = np.argsort(np.hypot(ux[:, None] - cx[None], uy[:, None] - cy[None]), axis=1)
    wide, long = [], []
    for i in range(N_REPORTS):
        ts, ue = f"2026-01-05T08:{i // 60:02d}:{i % 60:02d}Z", f"ue{i % 7}"
        srv_rsrp, rsrq = int(rng.integers(-100, -70)), float(rng.integers(-20, -6)) / 2
        n_nb = int(rng.integers(0, 4))
        nb_rsrp = sorted(rng.choice(np.arange(-125, -101), n_nb, replace=False).tolist(), reverse=True)
        row = {"report_id": f"r{i}", "ue_id": ue, "timestamp": ts, "latitude": ula[i], "longitude": ulo[i],
               "serving_cell_id": ids[order[i, 0]], "serving_rsrp_dbm": srv_rsrp, "serving_rsrq_db": rsrq}
        for k in range(1, 4):
            row[f"neighbour_{k}_cell_id"] = ids[order[i, k]] if k <= n_nb else None
            row[f"neighbour_{k}_rsrp_dbm"] = nb_rsrp[k - 1] if k <= n_nb else None
        wide.append(row)
        base = {"Time": ts, "IMSI": ue, "Lat": ula[i], "Lon": ulo[i]}
        long.append({**base, "Type": "Serving", "Cell": ids[order[i, 0]], "RSRP": srv_rsrp, "RSRQ": rsrq})
        long += [{**base, "Type": "Neighbor", "Cell": ids[order[i, k]], "RSRP": nb_rsrp[k - 1], "RSRQ": -12.0}
                 for k in range(1, n_nb + 1)]
    pd.DataFrame(wide).to_csv(tmp_path / "wide.csv", index=False)
    long = pd.DataFrame(long).sample(frac=1.0, random_state=1)
    return long


def _ingest(tmp_path, spark, name, mdt):
    cfg = make_config(tmp_path / name, scenario={"enabled": False}, ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"},
                      sources={"cells": {"path": str(tmp_path / "cells.csv")}, "mdt": mdt})
    rt = local_runtime(tmp_path / name, cfg, spark=spark)
    return stage.run(cfg, rt, run_id=name), rt


@pytest.mark.slow
def test_long_layout_gives_the_reports_and_measurements_of_the_wide_one(tmp_path, spark):
    long = _reports(tmp_path)
    n_long = len(long)
    # three bad groups: neighbour rows without their serving row; two serving rows; a malformed line
    extra = pd.DataFrame([
        {"Time": "2026-01-05T09:00:00Z", "IMSI": "ueX", "Lat": 51.9, "Lon": -8.47, "Type": "Neighbor", "Cell": "C1", "RSRP": -110, "RSRQ": -12.0},
        {"Time": "2026-01-05T09:00:00Z", "IMSI": "ueX", "Lat": 51.9, "Lon": -8.47, "Type": "Neighbor", "Cell": "C2", "RSRP": -111, "RSRQ": -12.0},
        {"Time": "2026-01-05T09:01:00Z", "IMSI": "ueY", "Lat": 51.9, "Lon": -8.47, "Type": "Serving", "Cell": "C3", "RSRP": -80, "RSRQ": -9.0},
        {"Time": "2026-01-05T09:01:00Z", "IMSI": "ueY", "Lat": 51.9, "Lon": -8.47, "Type": "Serving", "Cell": "C4", "RSRP": -85, "RSRQ": -9.5},
    ])
    # a report written twice (all its lines: a logger's double write): the copies are duplicates, it stays
    twice = long[(long["IMSI"] == "ue0") & (long["Time"] == "2026-01-05T08:00:28Z")]
    assert len(twice) > 1
    text = pd.concat([long, extra, twice]).to_csv(index=False) + "2026-01-05T09:02:00Z,ueZ,51.9\n"
    (tmp_path / "long.csv").write_text(text)

    # the same rows as a PCI-only log: serving and neighbours by PCI and carrier
    by_pci = long.assign(Cell=long["Cell"].str[1:].astype(int) + 100, EARFCN=1300)
    by_pci.to_csv(tmp_path / "long_pci.csv", index=False)

    _, rt_w = _ingest(tmp_path, spark, "wide", {"path": str(tmp_path / "wide.csv")})
    res, rt_l = _ingest(tmp_path, spark, "long", {"path": str(tmp_path / "long.csv"), **LONG})
    _, rt_p = _ingest(tmp_path, spark, "long_pci", {
        "path": str(tmp_path / "long_pci.csv"), **LONG, "serving_id": "pci", "neighbour_id": "pci",
        "columns": {**LONG["columns"], "serving_earfcn": "EARFCN"}})
    runs = (("wide", rt_w), ("long", rt_l), ("long_pci", rt_p))

    key = ["ue_id", "ts"]
    cols = [*key, "serving_cell_id", "rsrp_dbm", "rsrq_db", "x_m", "y_m", "window", "cell_shard"]
    got = {n: rt.lake.read_pandas("mdt_reports").sort_values(key).reset_index(drop=True)[cols] for n, rt in runs}
    assert len(got["wide"]) == N_REPORTS
    pd.testing.assert_frame_equal(got["wide"], got["long"], check_exact=False, atol=1e-9)
    pd.testing.assert_frame_equal(got["wide"], got["long_pci"], check_exact=False, atol=1e-9)
    mcols = ["ue_id", "ts", "rank", "role", "cell_id", "rsrp_dbm", "rsrq_db"]
    meas = {}
    for n, rt in runs:
        m = rt.lake.read_pandas("mdt_measurements").merge(rt.lake.read_pandas("mdt_reports")[["report_id", "ue_id"]], on="report_id")
        meas[n] = m.sort_values(["ue_id", "ts", "rank"]).reset_index(drop=True)[mcols]
    assert (meas["wide"]["role"] == "neighbour").sum() > 150
    pd.testing.assert_frame_equal(meas["wide"], meas["long"])
    pd.testing.assert_frame_equal(meas["wide"], meas["long_pci"])

    # every report in is clean or rejected; the three bad groups are rejected with their reason
    assert res.rows_in["mdt"] == N_REPORTS + 3 + len(twice)
    assert res.metrics["mdt_long_rows"] == n_long + 4 + len(twice)  # the malformed line is no member of a group
    rej = rt_l.lake.read_pandas("rejects")
    rej = rej[rej["source"] == "mdt"]
    assert sorted(rej["reason_code"]) == sorted(["malformed_row", "no_serving_row", "several_serving_rows",
                                                 *["duplicate"] * len(twice)])
    copies = rej.loc[rej["reason_code"] == "duplicate", "raw_row"].map(json.loads)
    assert sorted(c["Cell"] for c in copies) == sorted(twice["Cell"]) and all(c["IMSI"] == "ue0" for c in copies)
    raw = {c: r for c, r in zip(rej["reason_code"], rej["raw_row"], strict=True)}
    no_srv, several = json.loads(raw["no_serving_row"]), json.loads(raw["several_serving_rows"])
    # nothing measured vanishes: the rejected groups keep every row's cell and RSRP, strongest first
    assert (no_srv["IMSI"], no_srv["Cell"], no_srv["__nb1_cell__"], no_srv["__nb2_cell__"]) == ("ueX", None, "C1", "C2")
    assert (several["Cell"], several["RSRP"], several["__nb1_cell__"], several["__nb1_rsrp__"]) == ("C3", "-80", "C4", "-85")
    assert raw["malformed_row"].startswith("2026-01-05T09:02:00Z,ueZ")
    # without a report id column a report's id is its group's (file, report columns): a rerun keeps it
    ids = rt_l.lake.read_pandas("mdt_reports").set_index(["ue_id", "ts"])["report_id"]
    assert ids.is_unique and ids.str.len().eq(24).all()
    _, rt_l2 = _ingest(tmp_path, spark, "long_again", {"path": str(tmp_path / "long.csv"), **LONG})
    pd.testing.assert_series_equal(rt_l2.lake.read_pandas("mdt_reports").set_index(["ue_id", "ts"])["report_id"].sort_index(),
                                   ids.sort_index())


def test_long_layout_configuration_errors_name_the_key(tmp_path, spark):
    with pytest.raises(Exception, match=r"serving_rows: neighbour_layout 'long' needs"):
        config_from_dict({"sources": {"mdt": {"neighbour_layout": "long"}}})
    with pytest.raises(Exception, match=r"neighbour_layout: serving_rows and report_columns are read only"):
        config_from_dict({"sources": {"mdt": {"report_columns": ["Time"]}}})
    long = _reports(tmp_path)
    long.to_csv(tmp_path / "long.csv", index=False)
    bad = {**LONG, "serving_rows": {"column": "CellType", "in": ["Serving"]}}
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.serving_rows: raw column\(s\) 'CellType' not in the input"):
        _ingest(tmp_path, spark, "a", {"path": str(tmp_path / "long.csv"), **bad})
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.report_columns: raw column\(s\) 'Session'"):
        _ingest(tmp_path, spark, "b", {"path": str(tmp_path / "long.csv"), **LONG, "report_columns": ["Session", "Time"]})
    # a serving rule that matches nothing: every report has no serving row, and the error says which key
    none = {**LONG, "serving_rows": {"column": "Type", "in": ["PCell"]}}
    with pytest.raises(StageError, match=r"none of the 200 mdt rows is clean \(no_serving_row 200\): sources\.mdt\.serving_rows "
                                         r"\(\{column: Type, in: \[PCell\]\}\) picks no row"):
        _ingest(tmp_path, spark, "c", {"path": str(tmp_path / "long.csv"), **none})
