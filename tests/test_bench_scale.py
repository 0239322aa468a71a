"""bench/scale.py's derived fields: growth exponents between the two largest sizes, and --take,
which copies a size run into its own JSON into another (nothing is run)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


@pytest.fixture(scope="module")
def sc():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _size(name: str, n_cells: int, walls: dict[str, float], complete: bool = True) -> dict:
    stages = {st: {"wall_s": w, "cpu_s": 2 * w, "driver_peak_rss_mb": 100.0, "worker_peak_rss_mb": 50.0, "done": True}
              for st, w in walls.items()}
    out = {"size": name, "n_cells": n_cells, "n_reports": 1000 * n_cells, "stages": stages, "complete": complete}
    if complete:
        out["total_wall_s"] = sum(walls.values())
        out["total_cpu_s"] = 2 * sum(walls.values())
    return out


def test_take_copies_sizes_and_recomputes_exponents(sc, tmp_path):
    main = {"name": "scale", "sizes": [_size("default", 60, {"ingest": 10.0, "radio": 6.0}),
                                       _size("1k", 1002, {"ingest": 20.0, "radio": 100.0})]}
    other = {"name": "scale", "sizes": [_size("3k", 3000, {"ingest": 40.0, "radio": 330.0})]}
    out, src = tmp_path / "scale.json", tmp_path / "scale_3k.json"
    out.write_text(json.dumps(main))
    src.write_text(json.dumps(other))
    res = sc.main(["--out", str(out), "--take", str(src), "--sizes", "3k"])
    on_disk = json.loads(out.read_text())
    assert on_disk == res
    assert [s["size"] for s in res["sizes"]] == ["default", "1k", "3k"]
    assert res["sizes"][-1]["taken_from"] == "scale_3k.json"
    ratio = math.log(3000 / 1002)
    assert res["exponents"]["between"] == ["1k", "3k"]
    assert res["exponents"]["radio"] == pytest.approx(math.log(3.3) / ratio, abs=1e-3)
    assert res["exponents"]["ingest"] == pytest.approx(math.log(2.0) / ratio, abs=1e-3)
    assert res["exponents"]["total"] == pytest.approx(math.log(370 / 120) / ratio, abs=1e-3)
    assert res["partial"] is False

    # taking it again keeps one 3k entry and says what it replaced
    res = sc.main(["--out", str(out), "--take", str(src), "--sizes", "3k"])
    assert [s["size"] for s in res["sizes"]] == ["default", "1k", "3k"]
    assert res["superseded"][-1]["size"] == "3k"
    with pytest.raises(SystemExit):
        sc.main(["--out", str(out), "--take", str(src), "--sizes", "1k"])


def test_partial_size_marks_exponents_partial(sc):
    sizes = [_size("1k", 1002, {"ingest": 20.0, "radio": 100.0}), _size("3k", 3000, {"ingest": 40.0}, complete=False)]
    exps = sc.exponents(sizes)
    assert exps["partial"] is True and "radio" not in exps and "total" not in exps
    assert exps["ingest"] == pytest.approx(math.log(2.0) / math.log(3000 / 1002), abs=1e-3)


def test_readme_scale_table_is_the_jsons(sc):
    """The README's per-stage table is `bench/scale.py --table` of bench/results/scale.json."""
    root = BENCH.parents[1]
    result = json.loads((root / "bench" / "results" / "scale.json").read_text())
    assert {s["size"] for s in result["sizes"]} >= {"1k", "3k"}
    assert result["exponents"]["between"] == ["1k", "3k"]
    assert sc.markdown(result) in (root / "README.md").read_text()
