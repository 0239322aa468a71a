import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_job_rejects_bad_config_with_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(ROOT / "conf" / "local.yaml"),
         "--set", "radio.n_step=3", "--set", f"run.lake_root={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "radio.n_step: unknown key" in proc.stderr


def test_whatif_job_runs_the_stage_and_rejects_an_unknown_cell(tmp_path):
    from tests.whatif.test_stage import _lake

    cfg, rt, _ = _lake(tmp_path)
    changes = tmp_path / "changes.yaml"
    changes.write_text("name: switch_off\nchanges:\n  - {kind: remove_cell, cell_id: s9c9}\n")
    # Loaded from its file under a unique name: `import whatif` would find the tests/whatif package,
    # which pytest puts on sys.path as top-level `whatif` when the whole suite runs.
    import importlib.util

    spec = importlib.util.spec_from_file_location("cellsynth_job_whatif", ROOT / "jobs" / "whatif.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    overrides = ["--set", f"run.lake_root={cfg.run.lake_root}", "--set", "density.student=false", "--quiet"]
    assert job.main(["--changes", str(changes), *overrides]) == 2
    changes.write_text("name: switch_off\nchanges:\n  - {kind: remove_cell, cell_id: s1c1}\n")
    assert job.main(["--changes", str(changes), "--run-id", "j1", *overrides]) == 0
    fields = rt.lake.read_pandas("network_fields", network_scenario="switch_off")
    assert len(fields) > 0 and "s1c1" not in set(fields.best_cell_id)
