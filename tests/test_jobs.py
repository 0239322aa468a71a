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
