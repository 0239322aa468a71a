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
