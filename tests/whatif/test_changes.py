"""Change-file validation: every bad input is one ConfigError line naming the entry."""

import numpy as np
import pandas as pd
import pytest

from cellsynth.errors import ConfigError
from cellsynth.whatif import apply_changes, load_changes, parse_changes, validate_against

CELLS = pd.DataFrame({"cell_id": ["S1_1", "S1_2", "S2_1"], "site_id": ["S1", "S1", "S2"], "x_m": [0.0, 0.0, 1000.0],
                      "y_m": [0.0, 0.0, 0.0], "azimuth_deg": [0.0, 180.0, 90.0], "height_m": [25.0, 25.0, 30.0],
                      "tx_power_dbm": [46.0, 46.0, 43.0], "freq_mhz": [1800.0] * 3})
BBOX = (-2000.0, -2000.0, 3000.0, 2000.0)


def _check(changes: list[dict]):
    validate_against(parse_changes({"name": "t", "changes": changes}), CELLS, area_bbox_m=BBOX)


def test_tilt_above_90_names_the_entry_and_the_field():
    with pytest.raises(ConfigError, match=r"^changes\[1\] \(set_cell S1_2\): downtilt_deg: .*less than or equal to 90.*got 95"):
        parse_changes({"name": "t", "changes": [{"kind": "remove_cell", "cell_id": "S2_1"},
                                                {"kind": "set_cell", "cell_id": "S1_2", "downtilt_deg": 95}]})


def test_unknown_cell_names_the_entry():
    with pytest.raises(ConfigError, match=r"^changes\[0\] \(remove_cell S9_9\): unknown cell_id 'S9_9'$"):
        _check([{"kind": "remove_cell", "cell_id": "S9_9"}])


def test_unknown_site_names_the_entry():
    with pytest.raises(ConfigError, match=r"^changes\[0\] \(move_site S7\): unknown site_id 'S7'$"):
        _check([{"kind": "move_site", "site_id": "S7", "x_m": 10.0, "y_m": 10.0}])


def test_site_outside_the_area_names_the_entry_and_the_area():
    with pytest.raises(ConfigError, match=r"^changes\[0\] \(add_cell N1\): site at \(9000, 0\) m is outside the area \[-2000, 3000\]"):
        _check([{"kind": "add_cell", "cell_id": "N1", "x_m": 9000.0, "y_m": 0.0}])


def test_set_cell_on_a_removed_cell_and_a_duplicate_new_id_are_both_reported():
    with pytest.raises(ConfigError) as err:
        _check([{"kind": "remove_cell", "cell_id": "S1_1"}, {"kind": "set_cell", "cell_id": "S1_1", "azimuth_deg": 10},
                {"kind": "add_cell", "cell_id": "S2_1", "x_m": 0.0, "y_m": 0.0}])
    assert err.value.problems == [
        "changes[1] (set_cell S1_1): cell_id 'S1_1' was removed by an earlier change",
        "changes[2] (add_cell S2_1): cell_id 'S2_1' already exists",
    ]


@pytest.mark.parametrize("entry, pattern", [
    ({"kind": "add_cell", "cell_id": "N1", "x_m": 1.0}, r"changes\[0\] \(add_cell N1\): position: expected either x_m and y_m or lat and lon"),
    ({"kind": "set_cell", "cell_id": "S1_1"}, r"changes\[0\] \(set_cell S1_1\): set_cell: expected at least one of"),
    ({"kind": "set_cell", "cell_id": "S1_1", "azimuth_deg": 360}, r"changes\[0\] \(set_cell S1_1\): azimuth_deg: .*less than 360"),
    ({"kind": "tilt_cell", "cell_id": "S1_1"}, r"changes\[0\] \(tilt_cell S1_1\): .*tag 'tilt_cell'"),
    ({"kind": "remove_cell", "cell_id": "S1_1", "power": 3}, r"changes\[0\] \(remove_cell S1_1\): power: Extra inputs"),
])
def test_field_problems_name_the_entry(entry, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_changes({"name": "t", "changes": [entry]})


@pytest.mark.parametrize("entry", [
    {"kind": "set_cell", "cell_id": "S1_1", "downtilt_deg": 95},
    {"kind": "set_cell", "cell_id": "S1_1"},
    {"kind": "add_cell", "cell_id": "N1", "x_m": 1.0},
    {"cell_id": "S1_1"},
])
def test_a_file_whose_only_entry_is_bad_gets_that_entrys_line_only(entry):
    # pydantic also counted the entries that validated (none) against min_length: a second line said
    # "changes: Tuple should have at least 1 item after validation, not 0" of a file that has one
    with pytest.raises(ConfigError) as err:
        parse_changes({"name": "t", "changes": [entry]})
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("changes[0] ("), err.value.problems
    with pytest.raises(ConfigError, match=r"^changes file: changes: Tuple should have at least 1 item"):
        parse_changes({"name": "t", "changes": []})


def test_numeric_cell_and_site_ids_read_as_the_lake_writes_them():
    # ECGIs and eNB ids are numbers in YAML (`cell_id: 1025`): "Input should be a valid string, got 1025"
    cs = parse_changes({"name": "t", "changes": [
        {"kind": "remove_cell", "cell_id": 1025}, {"kind": "set_cell", "cell_id": 1026.0, "azimuth_deg": 10},
        {"kind": "move_site", "site_id": 7, "x_m": 0.0, "y_m": 0.0},
        {"kind": "add_cell", "cell_id": 2001, "site_id": 7, "x_m": 0.0, "y_m": 0.0}]})
    assert [(getattr(c, "cell_id", None), getattr(c, "site_id", None)) for c in cs.changes] == [
        ("1025", None), ("1026", None), (None, "7"), ("2001", "7")]
    with pytest.raises(ConfigError, match=r"^changes\[0\] \(remove_cell True\): cell_id: Input should be a valid string"):
        parse_changes({"name": "t", "changes": [{"kind": "remove_cell", "cell_id": True}]})


def test_baseline_is_a_reserved_name_and_the_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"name: 'baseline' is reserved"):
        parse_changes({"name": "baseline", "changes": [{"kind": "remove_cell", "cell_id": "S1_1"}]})
    with pytest.raises(ConfigError, match=r"^changes: file not found"):
        load_changes(tmp_path / "none.yaml")


def test_apply_changes_moves_repoints_adds_and_removes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mix\nchanges:\n"
                    "  - {kind: move_site, site_id: S1, x_m: 100, y_m: -50}\n"
                    "  - {kind: set_cell, cell_id: S2_1, azimuth_deg: 120, tx_power_dbm: 40}\n"
                    "  - {kind: remove_cell, cell_id: S1_2}\n"
                    "  - {kind: add_cell, cell_id: N1, x_m: 500, y_m: 500, azimuth_deg: 45}\n")
    cs = load_changes(path)
    validate_against(cs, CELLS, area_bbox_m=BBOX)
    new, touched = apply_changes(CELLS, cs)
    assert touched == {"S1_1": "moved", "S1_2": "removed", "S2_1": "re-pointed", "N1": "added"}
    got = new.set_index("cell_id")
    assert sorted(got.index) == ["N1", "S1_1", "S2_1"]
    assert (got.loc["S1_1", "x_m"], got.loc["S1_1", "y_m"]) == (100.0, -50.0)
    assert (got.loc["S2_1", "azimuth_deg"], got.loc["S2_1", "tx_power_dbm"], got.loc["S2_1", "height_m"]) == (120.0, 40.0, 30.0)
    assert got.loc["N1", "downtilt_deg"] == 6.0 and got.loc["N1", "height_m"] == 25.0
    assert np.isnan(got.loc["S1_1", "downtilt_deg"])  # untouched parameters stay unknown


def test_the_shipped_example_change_file_is_valid():
    from pathlib import Path

    cs = load_changes(Path(__file__).resolve().parents[2] / "conf" / "whatif" / "example.yaml")
    assert cs.name == "core_infill" and [c.kind for c in cs.changes] == ["add_cell"] * 3 + ["set_cell", "remove_cell"]
    assert cs.changes[1].height_m == 25.0  # defaults fill what the entry leaves out
