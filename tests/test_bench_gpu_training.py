"""bench/gpu_training.py: without CUDA it measures and writes nothing; its README table is the JSON's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_training.py"
RESULT = BENCH.parent / "results" / "gpu_training.json"


@pytest.fixture(scope="module")
def gt():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_gpu_training", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the bench would measure")
def test_without_cuda_nothing_is_written(gt, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gt.main(["--out", str(out)]) is None
    assert not out.exists()
    assert "no CUDA device" in capsys.readouterr().out


def test_table_is_the_jsons(gt):
    res = json.loads(RESULT.read_text())
    r, t = res["radio"], res["traffic"]
    # the ratios are the sides' figures divided, and the two devices fitted the same model
    assert r["ratio"] == pytest.approx(r["cpu_one_thread"]["s_per_cell"] / r["cuda"]["s_per_cell"], rel=1e-9)
    assert t["ratio_train"] == pytest.approx(t["cuda"]["train_steps_per_s"] / t["cpu_one_thread"]["train_steps_per_s"], rel=1e-9)
    assert abs(r["mae_diff_db"]) < 1e-3
    text = gt.table(res)
    assert f"| radio fit, s per cell (64-cell shards), one process | {r['cpu_one_thread']['s_per_cell']:.3f} | {r['cuda']['s_per_cell']:.3f} | {r['ratio']:.1f}x |" in text
    assert f"{t['ratio_sample']:.0f}x |" in text
    bat = res["radio_batching"]
    assert bat["ratio_batching_cuda"] == pytest.approx(bat["per_cell_cuda"]["s_per_cell"] / r["cuda"]["s_per_cell"], rel=1e-9)
    assert abs(bat["per_cell_cuda"]["mae_db"] - bat["per_cell_cpu"]["mae_db"]) < 1e-3
    node = res["radio_node"]
    best = max(node["gpu_shared"], key=lambda g: g["cells_per_s"])
    assert node["ratio_best_gpu_vs_cpu_node"] == pytest.approx(best["cells_per_s"] / node["cpu_all_cores"]["cells_per_s"], rel=1e-9)
    assert f"| {node['cpu_all_cores']['cells_per_s']:.1f} | {best['cells_per_s']:.1f} |" in text
    readme = (BENCH.parents[1] / "README.md").read_text()
    assert text.split("\n\n")[0] in readme  # the README carries the table as the script prints it
