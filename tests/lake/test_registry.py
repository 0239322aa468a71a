import pandas as pd

from cellsynth.lake import RunRegistry


def _metrics(value):
    return pd.DataFrame({"run_id": ["r"], "stage": ["density"], "metric": ["ks"], "value": [value]})


def test_skip_only_when_config_inputs_and_outputs_unchanged(lake):
    reg = RunRegistry(lake)
    assert reg.unchanged_since_success("density", "h1", {"mdt_reports": 3}, ("metrics",)) is None
    lake.write("metrics", _metrics(1.0))
    rec = reg.start("run-a", "density", "h1", {"mdt_reports": 3})
    reg.succeed(rec, {"metrics": 0}, {"rows_written": {"metrics": 1}})
    assert "run-a" in reg.unchanged_since_success("density", "h1", {"mdt_reports": 3}, ("metrics",))
    assert reg.unchanged_since_success("density", "h2", {"mdt_reports": 3}, ("metrics",)) is None
    assert reg.unchanged_since_success("density", "h1", {"mdt_reports": 4}, ("metrics",)) is None


def test_failed_run_is_recorded_and_not_a_success(lake):
    reg = RunRegistry(lake)
    rec = reg.start("run-b", "radio", "h", {})
    reg.fail(rec, ValueError("bad thing\nsecond line"))
    latest = reg.latest()
    assert latest.iloc[0]["status"] == "failed"
    assert latest.iloc[0]["error"] == "ValueError: bad thing"
    assert reg.last_success("radio") is None


def test_recover_restores_tables_past_last_good_version(lake):
    reg = RunRegistry(lake)
    lake.write("metrics", _metrics(1.0))
    rec = reg.start("run-c", "density", "h", {})
    reg.succeed(rec, {"metrics": 0}, {})
    lake.write("metrics", _metrics(2.0))  # a killed run committed this, then died before the registry
    restored = reg.recover()
    assert restored == {"metrics": (1, 0)}
    assert lake.read_pandas("metrics")["value"].tolist() == [1.0]
    assert reg.recover() == {}


def test_a_compacted_input_is_unchanged_and_new_rows_are_a_change(lake):
    # `cellsynth optimize` moves every table's version without changing a row: the stages reading them
    # are not retrained for it (a nightly compaction would otherwise retrain the whole pipeline).
    reg = RunRegistry(lake)
    for k in range(3):
        lake.write("metrics", _metrics(float(k)))
    rec = reg.start("run-a", "evaluate", "h1", {"metrics": 2})
    reg.succeed(rec, {}, {})
    lake.optimize("metrics")
    assert lake.version("metrics") == 3 and lake.history("metrics", 1)[0]["operation"] == "OPTIMIZE"
    why = reg.unchanged_since_success("evaluate", "h1", {"metrics": 3}, ())
    assert "run-a" in why and "metrics: compacted or what-if rows only since" in why
    assert reg.unchanged_since_success("evaluate", "h2", {"metrics": 3}, ()) is None
    lake.write("metrics", _metrics(9.0))
    assert reg.unchanged_since_success("evaluate", "h1", {"metrics": 4}, ()) is None
    assert lake.rows_changed("metrics", 2, 3) is False and lake.rows_changed("metrics", 2, 4) is True
    assert lake.rows_changed("metrics", 3, 2) is True and lake.rows_changed("absent_table", 0, 1) is True


def test_a_whatif_replacing_its_own_rows_moves_no_measured_row(lake):
    """A what-if's rerun replaces its scenario's rows (overwrite by `scenario_predicate`, with the scenario note):
    no measured row moves. The same note on an overwrite of anything else, or no note, is a change."""
    from cellsynth.lake.table import SCENARIO_NOTE, scenario_predicate

    def fields(scenario: str, run: str, rsrp: float) -> pd.DataFrame:
        return pd.DataFrame({"network_scenario": [scenario] * 2, "x_m": [0.0, 50.0], "y_m": [0.0, 0.0],
                             "best_cell_id": ["a", "b"], "rsrp_dbm": [rsrp] * 2, "rsrp_dbm_epistemic_std": [1.0] * 2,
                             "user_weight": [0.5] * 2, "is_changed_cell": [False, True], "run_id": [run] * 2})

    note = {SCENARIO_NOTE: "infill"}
    lake.write("network_fields", fields("baseline", "r1", -80.0))  # 0
    lake.write("network_fields", fields("infill", "r1", -70.0), note=note)  # 1: appended scenario rows
    lake.optimize("network_fields")  # 2: baseline and scenario rows now share a file
    lake.write("network_fields", fields("infill", "r2", -60.0), mode="overwrite",
               predicate=scenario_predicate("infill"), note=note)  # 3: the rerun replaces them
    assert lake.moving_versions("network_fields", 0, 3) == []
    rows = lake.read_pandas("network_fields", network_scenario=None)
    assert sorted(zip(rows.network_scenario, rows.run_id)) == [("baseline", "r1")] * 2 + [("infill", "r2")] * 2
    lake.write("network_fields", fields("baseline", "r3", -90.0), mode="overwrite",
               predicate="network_scenario = 'baseline'", note=note)  # 4: a wrong note does not hide this
    lake.write("network_fields", fields("other", "r4", -60.0), mode="overwrite",
               predicate=scenario_predicate("other"))  # 5: no note
    assert lake.moving_versions("network_fields", 0, 5) == [4, 5]
