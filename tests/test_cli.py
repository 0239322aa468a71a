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


def test_whatif_bad_change_file_exits_2_naming_the_entry(capsys, tmp_path):
    changes = tmp_path / "changes.yaml"
    changes.write_text("name: retilt\nchanges:\n  - {kind: set_cell, cell_id: S00001_1, downtilt_deg: 120}\n")
    code = main(["whatif", "--changes", str(changes), "--set", f"run.lake_root={tmp_path / 'lake'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "changes[0] (set_cell S00001_1): downtilt_deg:" in err and "got 120" in err
