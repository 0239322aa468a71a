"""Neighbours named by PCI (and carrier), as 3GPP MDT and drive-test loggers report them, resolved
at ingest to the nearest cell of the cells table with that PCI (sources.mdt.neighbour_id: pci)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.config import config_from_dict
from cellsynth.errors import ConfigError
from cellsynth.geo import LocalFrame
from cellsynth.ingest import stage

FRAME = LocalFrame(44.5, 11.34)
# cell: (x_m, y_m, pci, earfcn, azimuth_deg); PCI 7 is reused 8 km apart (A, B) and on another carrier
# (C); PCI 21's F faces north, away from r6 300 m south of it, and G, 600 m south of r6, faces it
CELLS = {
    "A": (0.0, 0.0, "7", "1300", ""), "B": (8000.0, 0.0, "7", "1300", ""), "C": (0.0, 500.0, "7", "6300", ""),
    "D": (500.0, 0.0, "12", "", ""), "S": (100.0, 100.0, "3", "1300", ""), "E": (0.0, 40000.0, "99", "1300", ""),
    "F": (0.0, 2000.0, "21", "1300", "0"), "G": (0.0, 1100.0, "21", "1300", "0"),
}
# report: (x_m, y_m, timestamp, [(pci, earfcn, rsrp), ...]); every report is served by S
REPORTS = {
    # A (nearest PCI 7 on 1300), D (its carrier unknown: any), C (PCI 7 on 6300)
    "r1": (200.0, 0.0, "2026-01-05T08:00:00Z", [("7", "1300", "-90"), ("12", "1300", "-95"), ("7", "6300", "-99")]),
    # B; PCI 7 without a carrier is B again (nearest): a duplicate; PCI 3 on 1300 is the serving cell
    "r2": (7800.0, 0.0, "2026-01-05T08:01:00Z", [("7", "1300", "-91"), ("7", "", "-92"), ("3", "1300", "-93")]),
    # E is 39.7 km away (> 30 km), no cell has PCI 500: unresolved; "x7" is no PCI
    "r3": (0.0, 300.0, "2026-01-05T08:02:00Z", [("99", "1300", "-100"), ("x7", "1300", "-101"), ("500", "1300", "-102")]),
    # "7.0" is PCI 7 but "abc" no carrier; 1200 is beyond NR's 1007
    "r4": (0.0, 300.0, "2026-01-05T08:03:00Z", [("7.0", "abc", "-103"), ("1200", "", "-104"), ("", "", "")]),
    # a rejected report (bad timestamp) keeps its carrier columns in its raw row
    "r5": (0.0, 300.0, "not a time", [("7", "1300", "-105"), ("", "", ""), ("", "", "")]),
    # PCI 21: G is heard better (in its beam; F's back lobe is 30 dB down), though F is nearer
    "r6": (0.0, 1700.0, "2026-01-05T08:04:00Z", [("21", "1300", "-106"), ("", "", ""), ("", "", "")]),
}


def _write(tmp_path) -> tuple[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    lat, lon = FRAME.to_latlon(np.array([c[0] for c in CELLS.values()]), np.array([c[1] for c in CELLS.values()]))
    cells = pd.DataFrame({"cell_id": list(CELLS), "site_id": list(CELLS), "latitude": lat, "longitude": lon,
                          "pci": [c[2] for c in CELLS.values()], "earfcn": [c[3] for c in CELLS.values()],
                          "azimuth_deg": [c[4] for c in CELLS.values()]})
    rows = []
    for rid, (x, y, ts, nbs) in REPORTS.items():
        la, lo = FRAME.to_latlon(np.array([x]), np.array([y]))
        row = {"report_id": rid, "ue_id": f"u{rid}", "timestamp": ts, "latitude": la[0], "longitude": lo[0],
               "serving_cell_id": "S", "serving_rsrp_dbm": "-80", "serving_rsrq_db": "-10"}
        for k, (pci, earfcn, rsrp) in enumerate(nbs, start=1):
            row.update({f"neighbour_{k}_pci": pci, f"neighbour_{k}_earfcn": earfcn, f"neighbour_{k}_rsrp_dbm": rsrp})
        rows.append(row)
    cells_path, mdt_path = tmp_path / "cells.csv", tmp_path / "mdt.csv"
    cells.to_csv(cells_path, index=False)
    pd.DataFrame(rows).to_csv(mdt_path, index=False)
    return str(cells_path), str(mdt_path)


def _config(tmp_path, cells_path, mdt_path, **mdt):
    return make_config(tmp_path, scenario={"enabled": False}, ingest={"period_start": "2026-01-05", "period_end": "2026-01-12"},
                       sources={"cells": {"path": cells_path},
                                "mdt": {"path": mdt_path, "neighbour_id": "pci", "neighbour_cell_pattern": "neighbour_{k}_pci",
                                        "neighbour_earfcn_pattern": "neighbour_{k}_earfcn", **mdt}})


@pytest.mark.slow
def test_pci_neighbours_resolve_to_the_nearest_cell_with_that_pci_and_carrier(tmp_path, spark):
    cfg = _config(tmp_path, *_write(tmp_path))
    rt = local_runtime(tmp_path, cfg, spark=spark)
    result = stage.run(cfg, rt, run_id="pci")
    meas = rt.lake.read_pandas("mdt_measurements")
    nb = meas[meas["role"] == "neighbour"].sort_values(["report_id", "rank"])
    assert list(zip(nb["report_id"], nb["rank"], nb["cell_id"], strict=True)) == [
        ("r1", 1, "A"), ("r1", 2, "D"), ("r1", 3, "C"), ("r2", 1, "B"), ("r6", 1, "G")]
    assert nb.set_index(["report_id", "rank"])["rsrp_dbm"].tolist() == [-90.0, -95.0, -99.0, -91.0, -106.0]
    # the PCI and carrier columns stay out of the cells table
    assert "pci" not in rt.lake.read_pandas("cells").columns
    rejects = rt.lake.read_pandas("rejects")
    nb_rej = rejects[rejects["source"] == "neighbour"]
    assert Counter(nb_rej["reason_code"]) == Counter(
        {"duplicate": 1, "neighbour_is_serving": 1, "unresolved_pci": 2, "bad_number": 3})
    logged = {(r["report_id"], r["rank"]): r for r in map(json.loads, nb_rej["raw_row"])}
    # a rejected entry says what was logged and, where one was found, the cell it resolved to
    assert logged[("r2", 2)] == {"report_id": "r2", "rank": 2, "pci": "7", "cell_id": "B", "rsrp_dbm": "-92"}
    assert logged[("r3", 1)] == {"report_id": "r3", "rank": 1, "pci": "99", "earfcn": "1300", "rsrp_dbm": "-100"}
    # rows in = clean + rejected for the neighbour entries too (the stage raises otherwise): 12 entries
    assert result.rows_in["neighbour"] == 12 and len(nb) + len(nb_rej) == 12
    report_rej = json.loads(rejects.loc[rejects["source"] == "mdt", "raw_row"].iloc[0])
    assert report_rej["neighbour_1_earfcn"] == "1300" and report_rej["neighbour_1_pci"] == "7"
    # by distance alone, r6's PCI 21 is the nearer F
    cfg = _config(tmp_path / "near", *_write(tmp_path / "near"))
    cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"pci_rule": "nearest"})})
    rt = local_runtime(tmp_path / "near", cfg, spark=spark)
    stage.run(cfg, rt, run_id="near")
    meas = rt.lake.read_pandas("mdt_measurements").set_index(["report_id", "rank"])["cell_id"]
    assert meas[("r6", 1)] == "F" and meas[("r1", 1)] == "A" and meas[("r2", 1)] == "B"


@pytest.mark.slow
def test_pci_resolution_matches_cell_ids_when_pcis_are_unique(tmp_path, spark):
    # the same reports named by cell id and by a unique PCI per cell give the same measurements
    rng = np.random.default_rng(3)
    n_cells, n_reports = 40, 300
    cx, cy = rng.uniform(0, 6000, n_cells), rng.uniform(0, 6000, n_cells)
    lat, lon = FRAME.to_latlon(cx, cy)
    ids = [f"C{i}" for i in range(n_cells)]
    cells = pd.DataFrame({"cell_id": ids, "latitude": lat, "longitude": lon, "pci": rng.permutation(504)[:n_cells]})
    cells.to_csv(tmp_path / "cells.csv", index=False)
    pci_of = dict(zip(ids, cells["pci"].astype(str), strict=True))
    ux, uy = rng.uniform(0, 6000, n_reports), rng.uniform(0, 6000, n_reports)
    ula, ulo = FRAME.to_latlon(ux, uy)
    order = np.argsort(np.hypot(ux[:, None] - cx[None], uy[:, None] - cy[None]), axis=1)
    base = pd.DataFrame({"report_id": [f"r{i}" for i in range(n_reports)], "ue_id": [f"u{i}" for i in range(n_reports)],
                         "timestamp": [f"2026-01-05T08:{i // 60:02d}:{i % 60:02d}Z" for i in range(n_reports)],
                         "latitude": ula, "longitude": ulo, "serving_cell_id": [ids[o[0]] for o in order],
                         "serving_rsrp_dbm": rng.integers(-110, -70, n_reports)})
    by_id, by_pci = base.copy(), base.copy()
    for k in (1, 2, 3):
        by_id[f"neighbour_{k}_cell_id"] = [ids[o[k]] for o in order]
        by_pci[f"neighbour_{k}_pci"] = [pci_of[ids[o[k]]] for o in order]
        by_id[f"neighbour_{k}_rsrp_dbm"] = by_pci[f"neighbour_{k}_rsrp_dbm"] = rng.integers(-120, -80, n_reports)
    by_id.to_csv(tmp_path / "by_id.csv", index=False)
    by_pci.to_csv(tmp_path / "by_pci.csv", index=False)
    tables = {}
    for name, mdt in (("id", {"path": str(tmp_path / "by_id.csv")}),
                      ("pci", {"path": str(tmp_path / "by_pci.csv"), "neighbour_id": "pci",
                               "neighbour_cell_pattern": "neighbour_{k}_pci"})):
        cfg = make_config(tmp_path / name, scenario={"enabled": False},
                          sources={"cells": {"path": str(tmp_path / "cells.csv")}, "mdt": mdt})
        rt = local_runtime(tmp_path / name, cfg, spark=spark)
        stage.run(cfg, rt, run_id=name)
        tables[name] = rt.lake.read_pandas("mdt_measurements").sort_values(["report_id", "rank"]).reset_index(drop=True)
    cols = ["report_id", "rank", "cell_id", "rsrp_dbm", "role"]
    assert len(tables["id"]) == n_reports * 4
    pd.testing.assert_frame_equal(tables["id"][cols], tables["pci"][cols])


def test_pci_configuration_errors_name_the_key(tmp_path, spark):
    with pytest.raises(Exception, match=r"neighbour_earfcn_pattern: only read with neighbour_id: pci"):
        config_from_dict({"sources": {"mdt": {"neighbour_earfcn_pattern": "n_{k}_earfcn"}}})
    cells_path, mdt_path = _write(tmp_path)
    # no cells table to resolve against
    cfg = make_config(tmp_path / "a", scenario={"enabled": False},
                      sources={"mdt": {"path": mdt_path, "neighbour_id": "pci", "neighbour_cell_pattern": "neighbour_{k}_pci"}})
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.neighbour_id: 'pci' needs a cells table"):
        stage.run(cfg, local_runtime(tmp_path / "a", cfg, spark=spark), run_id="a")
    # a carrier pattern naming columns the file lacks
    cfg = _config(tmp_path / "b", cells_path, mdt_path, neighbour_earfcn_pattern="nb_{k}_arfcn")
    with pytest.raises(ConfigError, match=r"^sources\.mdt\.neighbour_earfcn_pattern: column\(s\) 'nb_1_arfcn'"):
        stage.run(cfg, local_runtime(tmp_path / "b", cfg, spark=spark), run_id="b")


@pytest.mark.slow
def test_a_serving_cell_named_by_pci_resolves_before_anything_reads_it(tmp_path, spark):
    from cellsynth.schemas import cell_shard_of

    cells_path, _ = _write(tmp_path)
    # report: (x_m, y_m, serving PCI, serving carrier, neighbour PCI)
    reports = {"s1": (200.0, 0.0, "7", "1300", "12"), "s2": (7800.0, 0.0, "7", "", "3"),
               "s3": (0.0, 1700.0, "21", "1300", ""), "s4": (0.0, 300.0, "99", "1300", ""), "s5": (0.0, 300.0, "x", "", "")}
    rows = []
    for i, (rid, (x, y, pci, earfcn, nb)) in enumerate(reports.items()):
        la, lo = FRAME.to_latlon(np.array([x]), np.array([y]))
        rows.append({"report_id": rid, "ue_id": rid, "timestamp": f"2026-01-05T09:0{i}:00Z", "latitude": la[0],
                     "longitude": lo[0], "PCI": pci, "EARFCN": earfcn, "serving_rsrp_dbm": "-80",
                     "neighbour_1_pci": nb, "neighbour_1_rsrp_dbm": "-95" if nb else ""})
    pd.DataFrame(rows).to_csv(tmp_path / "serving.csv", index=False)
    cfg = make_config(tmp_path, scenario={"enabled": False}, sources={
        "cells": {"path": cells_path},
        "mdt": {"path": str(tmp_path / "serving.csv"), "serving_id": "pci", "neighbour_id": "pci",
                "neighbour_cell_pattern": "neighbour_{k}_pci", "columns": {"serving_cell_id": "PCI", "serving_earfcn": "EARFCN"}}})
    rt = local_runtime(tmp_path, cfg, spark=spark)
    stage.run(cfg, rt, run_id="srv")
    got = rt.lake.read_pandas("mdt_reports").set_index("report_id")
    # A near s1; B near s2 (no carrier: any); G is heard at s3 (F, nearer, faces away)
    assert got["serving_cell_id"].to_dict() == {"s1": "A", "s2": "B", "s3": "G"}
    assert all(got["cell_shard"] == got["serving_cell_id"].map(lambda c: cell_shard_of(c, cfg.ingest.n_cell_shards)))
    meas = rt.lake.read_pandas("mdt_measurements").set_index(["report_id", "rank"])["cell_id"]
    assert meas[("s1", 1)] == "D" and meas[("s1", 0)] == "A"
    rej = rt.lake.read_pandas("rejects")
    by_id = {json.loads(r)["report_id"]: (c, json.loads(r)) for r, c in zip(rej["raw_row"], rej["reason_code"], strict=True)
             if r.startswith("{")}
    assert by_id["s4"][0] == "unresolved_pci" and by_id["s4"][1]["PCI"] == "99"  # the raw row keeps the logged PCI
    assert by_id["s5"][0] == "bad_number" and by_id["s5"][1]["PCI"] == "x"
    # s2's neighbour PCI 3 is S, not the serving B: kept
    assert meas[("s2", 1)] == "S"
