import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_plan_job_rejects_a_zero_budget_with_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "plan.py"), "--set", "plan.budget_km=0", "--set", f"run.lake_root={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "plan.budget_km: Input should be greater than 0, got 0" in proc.stderr
    assert not (tmp_path / "measurement_plan").exists()
