"""The what-if stage writes scenario-tagged rows and leaves the measured network's rows as they were."""

import numpy as np
import pandas as pd
import pytest

from tests.density._density_synth import cells_table, layout, reports
from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_test_config
from cellsynth.errors import ConfigError
from cellsynth.schemas import cell_shard_of
from cellsynth.whatif import cell_prior_dbm, parse_changes
from cellsynth.whatif import stage as whatif_stage


def _lake(tmp_path):
    cfg = make_test_config(tmp_path, density={"student": False}, ingest={"n_cell_shards": 4})
    rt = local_runtime(tmp_path, cfg)
    cells = layout(4).assign(height_m=25.0, tx_power_dbm=46.0, freq_mhz=1800.0)
    reps = reports(cells, 1500)
    rng = np.random.default_rng(3)
    xy = reps[["x_m", "y_m"]].to_numpy()
    # Residual field: +3 dB bias, a smooth 6 dB shadowing pattern (per-cell phase) and 2 dB noise.
    phase = {c: rng.uniform(0, 2 * np.pi) for c in cells.cell_id}
    ph = reps["serving_cell_id"].map(phase).to_numpy()
    shadow = 6.0 * np.sin(xy[:, 0] / 120.0 + ph) * np.cos(xy[:, 1] / 140.0 - ph)
    meas = reps[["report_id", "ts", "window", "x_m", "y_m", "cell_shard"]].assign(
        cell_id=reps["serving_cell_id"], role="serving", rank=0,
        rsrp_dbm=cell_prior_dbm(cells, reps["serving_cell_id"].to_numpy(), xy) + 3.0 + shadow + rng.normal(0, 2, len(reps)))
    hours = pd.date_range("2026-01-05", periods=6, freq="h", tz="UTC")
    traffic = pd.DataFrame([{"cell_id": c, "ts": t, "window": "h00_06", "traffic_mb": 100.0 + k, "prb_util_pct": 20.0,
                             "load_rho": 0.2, "cell_shard": cell_shard_of(c, 4)} for k, c in enumerate(cells.cell_id) for t in hours])
    rt.lake.write("cells", cells_table(cells))
    rt.lake.write("mdt_reports", reps)
    rt.lake.write("mdt_measurements", meas)
    rt.lake.write("traffic", traffic)
    baseline_mdt = pd.DataFrame({"sample_id": ["b0"], "window": ["h00_06"], "x_m": [0.0], "y_m": [0.0], "lat": [44.0],
                                 "lon": [11.0], "serving_cell_id": ["s0c0"], "rsrp_dbm": [-80.0], "rsrp_dbm_epistemic_std": [1.0],
                                 "rsrp_dbm_aleatoric_std": [2.0], "reliable": [True], "scenario": ["observed"],
                                 "cell_shard": [0], "run_id": ["base"]})
    rt.lake.write("synthetic_mdt", baseline_mdt)  # an existing writer: no network_scenario column
    return cfg, rt, cells


def test_whatif_rows_are_tagged_and_baseline_rows_untouched(tmp_path):
    cfg, rt, cells = _lake(tmp_path)
    before = rt.lake.read_pandas("synthetic_mdt", network_scenario=None)
    assert before["network_scenario"].tolist() == ["baseline"]  # the schema default filled it in
    site = cells.loc[cells.cell_id == "s1c0", ["x_m", "y_m"]].to_numpy()[0]
    changes = parse_changes({"name": "infill", "changes": [
        {"kind": "add_cell", "cell_id": "N1", "x_m": float(site[0]) + 600.0, "y_m": float(site[1]), "azimuth_deg": 90.0},
        {"kind": "remove_cell", "cell_id": "s0c1"}]})
    result = whatif_stage.run(cfg, rt, run_id="w1", changes=changes)
    assert result.rows_written["network_fields"] > 0 and result.rows_written["synthetic_mdt"] > 0

    # Baseline readers see exactly what they saw before.
    pd.testing.assert_frame_equal(rt.lake.read_pandas("synthetic_mdt"), before)
    every = rt.lake.read_pandas("synthetic_mdt", network_scenario=None)
    tagged = every[every.network_scenario == "infill"]
    assert len(tagged) == result.rows_written["synthetic_mdt"] and len(every) == len(tagged) + 1
    assert "s0c1" not in set(tagged.serving_cell_id)  # the removed cell serves nobody
    assert (tagged.rsrp_dbm_epistemic_std > 0).all()
    # RSRP of the measured field, no load set: not labelled with generate.load_scenario ("observed")
    assert set(tagged.scenario) == {"measured"} and tagged.load_rho.isna().all()
    # reported as generate's rows are: 1 dB steps inside ingest's RSRP range, `clipped` where a draw left it
    np.testing.assert_array_equal(tagged.rsrp_dbm, np.round(tagged.rsrp_dbm))
    assert tagged.rsrp_dbm.between(-140.0, -44.0).all()
    assert (tagged.clipped == tagged.rsrp_dbm.isin([-140.0, -44.0]) & tagged.clipped).all()

    fields = rt.lake.read_pandas("network_fields", network_scenario=None)
    after = fields[fields.network_scenario == "infill"]
    base = fields[fields.network_scenario == "baseline"]
    assert len(after) == len(base)  # before/after on the same squares
    assert "N1" in set(after.best_cell_id) and "N1" not in set(base.best_cell_id)
    # Where the new cell serves nothing was measured: its std is the no-data level, above the
    # measured cells' std where they have reports.
    new_std = after.loc[after.best_cell_id == "N1", "rsrp_dbm_epistemic_std"]
    measured_std = base.loc[base.user_weight > 0, "rsrp_dbm_epistemic_std"]
    assert new_std.min() == pytest.approx(new_std.max()) and new_std.min() > measured_std.median()

    traffic = rt.lake.read_pandas("synthetic_traffic", network_scenario="infill")
    assert "N1" in set(traffic.cell_id) and (traffic.traffic_mb >= 0).all()
    shares = rt.lake.read_pandas("metrics", filters=[("stage", "=", "whatif")])
    after_share = shares[shares.metric == "user_share_after"].set_index("cell_id")["value"]
    assert after_share.sum() == pytest.approx(1.0) and after_share.get("s0c1", 0.0) == 0.0

    # A rerun with the same run id writes nothing; the baseline field rows are not duplicated.
    v = rt.lake.version("network_fields")
    assert whatif_stage.run(cfg, rt, run_id="w1", changes=changes).skipped
    assert rt.lake.version("network_fields") == v


def test_bad_change_is_one_line_naming_the_entry(tmp_path):
    cfg, rt, _ = _lake(tmp_path)
    bad = parse_changes({"name": "oops", "changes": [{"kind": "set_cell", "cell_id": "nope", "azimuth_deg": 10.0}]})
    with pytest.raises(ConfigError, match=r"^changes\[0\] \(set_cell nope\): unknown cell_id 'nope'$"):
        whatif_stage.run(cfg, rt, run_id="w2", changes=bad)
    assert not rt.lake.exists("network_fields")


def test_report_section_draws_before_after_maps(tmp_path):
    from cellsynth.whatif.report import whatif_section

    cfg, rt, cells = _lake(tmp_path)
    assert whatif_section(rt.lake, tmp_path / "report") == []
    changes = parse_changes({"name": "tilt", "changes": [{"kind": "set_cell", "cell_id": "s2c1", "azimuth_deg": 200.0}]})
    whatif_stage.run(cfg, rt, run_id="w3", changes=changes)
    got = whatif_section(rt.lake, tmp_path / "report")
    assert [(t, p) for t, p, _ in got] == [("What-if 'tilt': before / after", "whatif/tilt.png")]
    assert (tmp_path / "report" / "whatif" / "tilt.png").stat().st_size > 10_000


def test_a_recorded_whatif_survives_the_next_run_and_reruns_only_the_report(tmp_path):
    # Unrecorded, the next pipeline run's recover() took the what-if's commits for a killed run's and
    # restored every table it had appended to: the scenario rows vanished and generate reran.
    from cellsynth.pipeline import recover, run_whatif

    cfg, rt, cells = _lake(tmp_path)
    lake = rt.lake
    site = cells.loc[cells.cell_id == "s1c0", ["x_m", "y_m"]].to_numpy()[0]
    changes = parse_changes({"name": "infill", "changes": [
        {"kind": "add_cell", "cell_id": "N1", "x_m": float(site[0]) + 600.0, "y_m": float(site[1]), "azimuth_deg": 90.0}]})
    before = {t: lake.version(t) for t in ("synthetic_mdt", "metrics")}
    result = run_whatif(rt, changes, run_id="w9")
    runs = rt.registry.frame()
    rec = runs[(runs.stage == "whatif") & (runs.run_id == "w9")]
    assert sorted(rec["status"]) == ["running", "succeeded"]
    assert recover(rt) == {}
    n_tagged = len(lake.read_pandas("synthetic_mdt", network_scenario="infill"))
    assert n_tagged == result.rows_written["synthetic_mdt"] > 0
    # stages that read the measured network's rows see no change; the report (metrics) does
    assert not lake.rows_changed("synthetic_mdt", before["synthetic_mdt"], lake.version("synthetic_mdt"))
    assert lake.rows_changed("metrics", before["metrics"], lake.version("metrics"))
    assert lake.commit_note("synthetic_mdt") == {"network_scenario": "infill"}
    # the same run id again: recorded as skipped, nothing written
    v = lake.version("synthetic_mdt")
    assert run_whatif(rt, changes, run_id="w9").skipped and lake.version("synthetic_mdt") == v


def test_an_edited_change_set_under_a_used_name_is_one_error(tmp_path):
    from cellsynth.pipeline import run_whatif

    cfg, rt, cells = _lake(tmp_path)
    site = cells.loc[cells.cell_id == "s1c0", ["x_m", "y_m"]].to_numpy()[0]
    entry = {"kind": "add_cell", "cell_id": "N1", "x_m": float(site[0]) + 600.0, "y_m": float(site[1]), "azimuth_deg": 90.0}
    run_whatif(rt, parse_changes({"name": "infill", "changes": [entry]}), run_id="w1")
    edited = parse_changes({"name": "infill", "changes": [{**entry, "azimuth_deg": 180.0}]})
    n = len(rt.lake.read_pandas("synthetic_mdt", network_scenario="infill"))
    for run_id in ("w1", "w2"):
        with pytest.raises(ConfigError, match="name 'infill' already tags the rows of another change set"):
            run_whatif(rt, edited, run_id=run_id)
    assert len(rt.lake.read_pandas("synthetic_mdt", network_scenario="infill")) == n
    renamed = parse_changes({"name": "infill_b", "changes": [{**entry, "azimuth_deg": 180.0}]})
    assert not run_whatif(rt, renamed, run_id="w1").skipped
    # the same change set on the same inputs under another run id: no second copy of its rows
    again = run_whatif(rt, parse_changes({"name": "infill", "changes": [entry]}), run_id="w3")
    assert again.skipped and "run w1" in again.note
    assert len(rt.lake.read_pandas("synthetic_mdt", network_scenario="infill")) == n


def test_a_rerun_on_new_data_replaces_the_scenario_rows(tmp_path):
    """After new measurements the same change set reruns (a fresh run id) and its rows replace the earlier run's:
    one copy per scenario (it was two, and the report drew both), its commits still row-neutral for the stages
    reading the measured network; the report draws the newest measured field."""
    from cellsynth.pipeline import run_whatif
    from cellsynth.whatif.report import scenario_fields, whatif_section

    cfg, rt, cells = _lake(tmp_path)
    lake = rt.lake
    site = cells.loc[cells.cell_id == "s1c0", ["x_m", "y_m"]].to_numpy()[0]
    changes = parse_changes({"name": "infill", "changes": [
        {"kind": "add_cell", "cell_id": "N1", "x_m": float(site[0]) + 600.0, "y_m": float(site[1]), "azimuth_deg": 90.0}]})
    first = run_whatif(rt, changes)  # the CLI's default: a fresh run id
    assert run_whatif(rt, changes).skipped  # same inputs: its rows are the first run's
    old_fields = lake.read_pandas("network_fields", network_scenario=None)

    meas = lake.read_pandas("mdt_measurements")
    lake.write("mdt_measurements", meas.assign(rsrp_dbm=meas["rsrp_dbm"] + 6.0, report_id=meas["report_id"] + "-new"))
    before = {t: lake.version(t) for t in ("synthetic_mdt", "synthetic_traffic", "spatial_maps", "network_fields")}
    second = run_whatif(rt, changes)
    assert not second.skipped and second.run_id != first.run_id
    for table in ("synthetic_mdt", "synthetic_traffic"):
        rows = lake.read_pandas(table, network_scenario="infill")
        assert set(rows["run_id"]) == {second.run_id}
        assert len(rows) > 0
        assert not lake.rows_changed(table, before[table], lake.version(table))  # the measured network's rows: as they were
    assert not lake.read_pandas("synthetic_traffic", network_scenario="infill").duplicated(["cell_id", "ts"]).any()
    assert lake.read_pandas("synthetic_mdt")["sample_id"].tolist() == ["b0"]
    fields = lake.read_pandas("network_fields", network_scenario=None)
    after = fields[fields.network_scenario == "infill"]
    assert set(after["run_id"]) == {second.run_id} and len(after) == (old_fields.network_scenario == "infill").sum()
    base = fields[fields.network_scenario == "baseline"]
    assert set(base["run_id"]) == {first.run_id, second.run_id}  # the new data's field beside the old
    shares = lake.read_pandas("metrics", filters=[("stage", "=", "whatif")])
    assert set(shares["run_id"]) == {second.run_id}
    # the report draws the newest measured field: 6 dB stronger residuals move it up
    drawn, scenarios = scenario_fields(lake)
    assert list(scenarios) == ["infill"] and scenarios["infill"][0] == second.run_id
    assert len(scenarios["infill"][1]) == len(after)
    old_base = old_fields[old_fields.network_scenario == "baseline"]
    assert set(drawn["run_id"]) == {second.run_id} and len(drawn) == len(old_base)
    assert drawn["rsrp_dbm"].mean() > old_base["rsrp_dbm"].mean() + 2.0
    assert len(whatif_section(lake, tmp_path / "report")) == 1


def test_scenario_rows_go_into_a_table_written_before_what_ifs_existed(tmp_path):
    """A lake from before what-ifs: synthetic_traffic without the network_scenario column. The scenario's first
    write appends (the column joins the schema; the old rows read as baseline), its rerun replaces its rows."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from cellsynth.lake import Lake
    from cellsynth.whatif.stage import _write_scenario

    lake = Lake(tmp_path / "lake")
    old = pd.DataFrame({"cell_id": ["a"], "ts": pd.to_datetime(["2026-01-05"], utc=True), "window": ["h00_06"],
                        "traffic_mb": [1.0], "prb_util_pct": [10.0], "load_rho": [0.1], "sample_id": [0],
                        "cell_shard": [0], "run_id": ["old"]})
    write_deltalake(lake.uri("synthetic_traffic"), pa.Table.from_pandas(old, preserve_index=False),
                    partition_by=["window", "cell_shard"])
    rows = old.assign(cell_id="N1", traffic_mb=5.0, run_id="w1", network_scenario="infill")
    _write_scenario(lake, "synthetic_traffic", rows, "infill", "app-1")
    _write_scenario(lake, "synthetic_traffic", rows.assign(run_id="w2"), "infill", "app-2")
    assert lake.read_pandas("synthetic_traffic")["run_id"].tolist() == ["old"]  # it read no row after the first
    assert lake.read_pandas("synthetic_traffic", network_scenario="infill")["run_id"].tolist() == ["w2"]
    from cellsynth.lake.partitions import PartitionReader

    reader = PartitionReader(lake, "synthetic_traffic")
    assert [reader.read(["run_id"], f)["run_id"].tolist() for f in reader.filters] == [["old"]]
    lake.optimize("synthetic_traffic")  # the table stays whole for delta-rs (it failed on the old rows' missing column)
    assert len(lake.read_pandas("synthetic_traffic", network_scenario=None)) == 2


def test_a_whatif_whose_rows_a_regeneration_replaced_runs_again(tmp_path):
    """`generate --force` or a generate.* change rewrites synthetic_mdt whole, the what-if's rows with it, without
    moving the what-if's inputs: rerunning the what-if (what the README says to do) was skipped as "this change set
    on the same inputs is run ...'s rows", and the scenario stayed without synthetic MDT."""
    from cellsynth.pipeline import run_whatif

    cfg, rt, cells = _lake(tmp_path)
    lake = rt.lake
    site = cells.loc[cells.cell_id == "s1c0", ["x_m", "y_m"]].to_numpy()[0]
    changes = parse_changes({"name": "infill", "changes": [
        {"kind": "add_cell", "cell_id": "N1", "x_m": float(site[0]) + 600.0, "y_m": float(site[1]), "azimuth_deg": 90.0}]})
    first = run_whatif(rt, changes, run_id="w1")
    n = first.rows_written["synthetic_mdt"]
    assert n > 0
    # another scenario's rows and a compaction move no measured rows: still skipped, without reading rows
    other = parse_changes({"name": "other", "changes": [{"kind": "remove_cell", "cell_id": "s0c1"}]})
    run_whatif(rt, other, run_id="w2")
    assert run_whatif(rt, changes, run_id="w3").skipped
    # generate's regeneration, recorded as generate records it: the table overwritten with the measured rows only
    baseline = lake.read_pandas("synthetic_mdt")
    record = rt.registry.start("g1", "generate", "h", {})
    rt.registry.succeed(record, {"synthetic_mdt": lake.write("synthetic_mdt", baseline, mode="overwrite")}, {})
    assert len(lake.read_pandas("synthetic_mdt", network_scenario="infill")) == 0
    again = run_whatif(rt, changes, run_id="w4")
    assert not again.skipped
    rows = lake.read_pandas("synthetic_mdt", network_scenario="infill")
    assert len(rows) == again.rows_written["synthetic_mdt"] == n and set(rows["run_id"]) == {"w4"}
    assert run_whatif(rt, changes, run_id="w5").skipped  # and now its rows are there again
    pd.testing.assert_frame_equal(lake.read_pandas("synthetic_mdt"), baseline)
