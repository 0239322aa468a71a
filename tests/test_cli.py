from cellsynth.cli import main


def test_bad_config_exits_2_with_key(capsys, tmp_path):
    code = main(["tables", "--set", "density.nope=1", "--set", f"run.lake_root={tmp_path}"])
    assert code == 2
    assert "density.nope: unknown key" in capsys.readouterr().err


def test_tables_on_empty_lake(capsys, tmp_path):
    assert main(["tables", "--set", f"run.lake_root={tmp_path}"]) == 0
    assert "lake tables" in capsys.readouterr().out


def test_runs_lists_registry(capsys, tmp_path):
    from cellsynth.lake import Lake, RunRegistry

    reg = RunRegistry(Lake(tmp_path))
    reg.succeed(reg.start("run-xyz", "ingest", "h", {}), {}, {})
    assert main(["runs", "--set", f"run.lake_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "run-xyz" in out and "succeeded" in out
