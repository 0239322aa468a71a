"""The default scenario's simulator output for a bench: a given folder, or simulated once under `tmp`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_sim(sim: Path | None, tmp: Path) -> Path:
    """`sim` when given, else conf/local.yaml's scenario simulated into tmp/data/sim."""
    if sim is not None:
        return sim
    subprocess.run([sys.executable, "-m", "cellsynth.cli", "simulate", "--config", str(ROOT / "conf" / "local.yaml"),
                    "--set", f"run.data_dir={tmp / 'data'}", "--set", f"run.lake_root={tmp / 'simlake'}"], check=True)
    return tmp / "data" / "sim"
