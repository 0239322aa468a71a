from cellsynth.cli import main


def test_bad_config_exits_2_with_key(capsys, tmp_path):
    code = main(["tables", "--set", "density.nope=1", "--set", f"run.lake_root={tmp_path}"])
    assert code == 2
    assert "density.nope: unknown key" in capsys.readouterr().err


def test_an_error_is_one_line_with_its_text_as_written(capsys, tmp_path):
    # stderr is no terminal here (as in a scheduler's log): rich wrapped a long error at 80 columns and
    # read "[...]" in it as markup
    bad = "x" * 120 + "[bold]"
    code = main(["tables", "--set", f"radio.n_steps={bad}", "--set", f"run.lake_root={tmp_path}"])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ConfigError: radio.n_steps:") and bad in lines[0]


def test_tables_and_runs_on_an_empty_lake_say_where_they_looked(capsys, tmp_path):
    # a mistyped run.lake_root printed an empty table: nothing said which folder had been read
    assert main(["tables", "--set", f"run.lake_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "no tables in the lake at" in out and tmp_path.name in out and "run.lake_root" in out
    assert main(["runs", "--set", f"run.lake_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "no run recorded in the lake at" in out and tmp_path.name in out


def test_runs_lists_registry(capsys, tmp_path):
    from cellsynth.lake import Lake, RunRegistry

    reg = RunRegistry(Lake(tmp_path))
    reg.succeed(reg.start("run-xyz", "ingest", "h", {}), {}, {})
    assert main(["runs", "--set", f"run.lake_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "run-xyz" in out and "succeeded" in out


def test_plan_budget_zero_exits_2_with_key(capsys, tmp_path):
    code = main(["plan", "--budget-km", "0", "--set", f"run.lake_root={tmp_path}"])
    assert code == 2
    assert "plan.budget_km: Input should be greater than 0" in capsys.readouterr().err


def test_plan_without_models_exits_1_and_writes_nothing(capsys, tmp_path):
    from cellsynth.lake import Lake

    code = main(["plan", "--points", "3", "--set", f"run.lake_root={tmp_path}", "--set", "scenario.enabled=false"])
    assert code == 1
    assert "plan: lake table(s) cells, kde_models, radio_models missing" in capsys.readouterr().err
    assert not Lake(tmp_path).exists("measurement_plan")


def test_plan_prints_where_the_table_and_map_are(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plan"))
    from _plan_fakes import fake_plan_lake

    from cellsynth.lake import Lake

    lake = Lake(tmp_path / "lake")
    fake_plan_lake(lake, monkeypatch)
    code = main(["plan", "--points", "4", "--window", "h06_12", "--quiet", "--set", f"run.lake_root={tmp_path / 'lake'}",
                 "--set", "scenario.enabled=false"])
    out = capsys.readouterr().out
    assert code == 0
    assert "measurement_plan: " in out and "(window = 'h06_12')" in out
    assert f"plan_map: {tmp_path / 'lake' / 'report' / 'plan' / 'plan_h06_12.png'}" in out.replace("\n", "")
    assert len(lake.read_pandas("measurement_plan")) == 4


def test_plan_ues_and_points_together_exit_2(capsys, tmp_path):
    code = main(["plan", "--ues", "5", "--points", "3", "--set", f"run.lake_root={tmp_path}"])
    assert code == 2
    assert "plan: give one of --budget-km, --points and --ues" in capsys.readouterr().err


def test_plan_ues_writes_ue_rows(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plan"))
    from _plan_fakes import fake_plan_lake

    from cellsynth.lake import Lake

    lake = Lake(tmp_path / "lake")
    fake_plan_lake(lake, monkeypatch)
    code = main(["plan", "--ues", "3", "--window", "h06_12", "--quiet", "--set", f"run.lake_root={tmp_path / 'lake'}",
                 "--set", "scenario.enabled=false"])
    assert code == 0
    rows = lake.read_pandas("measurement_plan")
    assert rows["mode"].tolist() == ["ues"] * 3
    assert "plan_map: " in capsys.readouterr().out


def test_whatif_bad_change_file_exits_2_naming_the_entry(capsys, tmp_path):
    changes = tmp_path / "changes.yaml"
    changes.write_text("name: retilt\nchanges:\n  - {kind: set_cell, cell_id: S00001_1, downtilt_deg: 120}\n")
    code = main(["whatif", "--changes", str(changes), "--set", f"run.lake_root={tmp_path / 'lake'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "changes[0] (set_cell S00001_1): downtilt_deg:" in err and "got 120" in err


def test_run_id_option_names_the_run_and_a_bad_one_exits_2(capsys, tmp_path):
    """Stage commands take --run-id (a scheduler's tasks and retries as one run); it names folders, so path-safe."""
    args = ["--quiet", "--set", f"run.lake_root={tmp_path}", "--set", "scenario.enabled=false"]
    assert main(["report", "--run-id", "../x", *args]) == 2
    err = capsys.readouterr().err
    assert "run id '../x'" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "--run-id", "nightly-2026-12-06", *args]) == 1  # no metrics table yet: the stage fails
    assert main(["runs", "--set", f"run.lake_root={tmp_path}"]) == 0
    assert "nightly-2026-12-06" in capsys.readouterr().out


def test_a_stage_error_raised_in_a_ray_task_is_printed_as_itself(capsys):
    # Ray wraps it as RayTaskError(StageError), whose text is the task's traceback with terminal colours
    import pytest
    import typer

    from cellsynth.cli import _fail
    from cellsynth.errors import ConfigError, StageError

    class RayTaskErrorLike(StageError):
        def __init__(self, cause):
            super().__init__("\x1b[36mray::_train()\x1b[39m (pid=1)\n  File ...\n" + str(cause))
            self.cause = cause

    with pytest.raises(typer.Exit) as ex:
        _fail(RayTaskErrorLike(StageError("traffic: need complete weeks")))
    assert ex.value.exit_code == 1
    assert capsys.readouterr().err.strip() == "StageError: traffic: need complete weeks"
    with pytest.raises(typer.Exit) as ex:
        _fail(RayTaskErrorLike(ConfigError("radio.x: bad")))
    assert ex.value.exit_code == 2


def test_the_run_summary_shows_each_stages_note_without_its_json_record(capsys, tmp_path):
    # only skipped stages showed a note: the traffic stage's "no cells table: ..." or generate's load scenario
    # were in `cellsynth runs` alone; ingest's registry record (JSON) stays out of the table
    from cellsynth.cli import _summary, shown_note
    from cellsynth.config import config_from_dict
    from cellsynth.stages import StageResult

    assert shown_note('full run: stage has no partition-level run; {"frame": [51.9, -8.4]}') == \
        "full run: stage has no partition-level run"
    assert shown_note('{"frame": [51.9, -8.4]}') == "" and shown_note(None) == ""
    traffic = StageResult(stage="traffic", run_id="r", note="no cells table: 5 cells of the traffic table, context none [x]")
    ingest = StageResult(stage="ingest", run_id="r", note='{"mode": "full rewrite"}')
    _summary(config_from_dict({"run": {"lake_root": str(tmp_path)}}), "r", [ingest, traffic], quiet=False)
    printed = capsys.readouterr().out
    assert "no cells table" in printed and "[x]" in printed and "full rewrite" not in printed
    # --quiet (a scheduler's log): one status line, and why each skipped stage was skipped
    skipped = StageResult(stage="generate", run_id="r", skipped=True, note="no MDT reports [y]; skipped")
    _summary(config_from_dict({"run": {"lake_root": str(tmp_path)}}), "r", [traffic, skipped], quiet=True)
    assert capsys.readouterr().out.splitlines() == ["run r: traffic=ok, generate=skipped",
                                                    "generate skipped: no MDT reports [y]; skipped"]


def test_the_run_summary_writes_counts_in_full():
    # ingest's reject counts and generate's row count read 2.27e+04 and 3.19e+03 in the summary table
    from cellsynth.cli import shown_figure

    assert shown_figure(22733.0) == "22,733" and shown_figure(3189) == "3,189" and shown_figure(-1500.0) == "-1,500"
    assert shown_figure(999.0) == "999" and shown_figure(0.7561) == "0.756" and shown_figure(3.1) == "3.1"
    assert shown_figure(12345.6) == "1.23e+04" and shown_figure(float("nan")) == "nan"


def test_a_lake_root_that_is_a_file_exits_2_naming_the_key(capsys, tmp_path):
    # a file at run.lake_root: vacuum, optimize and every stage died in a FileExistsError traceback
    # (the lake lock's mkdir), tables and runs read it as an empty lake
    afile = tmp_path / "lake"
    afile.write_text("not a lake")
    for root in (afile, afile / "sub"):
        for cmd in (["tables"], ["runs"], ["vacuum", "--dry-run"], ["optimize"], ["simulate", "--quiet"]):
            assert main([*cmd, "--set", f"run.lake_root={root}"]) == 2, cmd
            lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("ConfigError: run.lake_root:") and "a file" in lines[0], (cmd, lines)
    assert afile.read_text() == "not a lake"


def test_runs_limit_below_one_exits_2_instead_of_misreporting(capsys, tmp_path):
    # --limit 0 said "no run recorded in the lake" of a lake with runs; --limit -2 (pandas' head(-2))
    # listed every record but the two oldest
    from cellsynth.lake import Lake, RunRegistry

    reg = RunRegistry(Lake(tmp_path))
    for k in range(3):
        reg.succeed(reg.start(f"run-{k}", "ingest", "h", {}), {}, {})
    for bad in ("0", "-2"):
        assert main(["runs", "--limit", bad, "--set", f"run.lake_root={tmp_path}"]) == 2, bad
        captured = capsys.readouterr()
        assert "--limit" in captured.err and "no run recorded" not in captured.out
    assert main(["runs", "--limit", "1", "--set", f"run.lake_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "run-2" in out and "run-1" not in out


def test_a_data_or_report_folder_that_is_a_file_exits_2_naming_the_key(capsys, tmp_path):
    # simulate with run.data_dir, report with lake.report_dir at a file died in a FileExistsError traceback
    afile = tmp_path / "afile"
    afile.write_text("x")
    lake = f"run.lake_root={tmp_path / 'lake'}"
    for key, cmd in (("run.data_dir", "simulate"), ("scenario.output_dir", "simulate"), ("lake.report_dir", "report")):
        assert main([cmd, "--quiet", "--set", lake, "--set", f"{key}={afile}"]) == 2, key
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"ConfigError: {key}: {afile} is a file"), (key, lines)
    assert afile.read_text() == "x"


def test_plan_window_is_taken_as_written(capsys, tmp_path):
    # --window went through --set's YAML: 0612 arrived as the octal 394, 06_12 as 612, null as "the busiest"
    for window in ("0612", "06_12", "null"):
        assert main(["plan", "--points", "3", "--window", window, "--set", f"run.lake_root={tmp_path}",
                     "--set", "scenario.enabled=false"]) == 1
        err = capsys.readouterr().err
        assert "plan: lake table(s) cells, kde_models, radio_models missing" in err, (window, err)
