from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from _evaluate_fakes import MeanModel, NearestDensity, TrueRadio, synthetic_from, world

from cellsynth_testkit import test_config as make_config
from cellsynth.evaluate import stage
from cellsynth.evaluate.report import ReportData, build_report, metrics_table

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PNGS = ["samples_real_vs_synthetic.png", "maps_kde_vs_voronoi.png", "rsrp_field.png", "calibration.png",
        "epistemic_hist.png", "rsrq_vs_load.png", "fingerprinting.png", "rejects.png"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    reports, meas, cells = world(800)
    syn = synthetic_from(reports, meas)
    cfg = make_config(tmp, evaluate={"baselines": ["knn"], "n_downsampling_cells": 1, "field_grid_px": 12}, generate={"n_neighbours": 2})
    inp = stage.Inputs(reports=reports, measurements=meas, cells=cells, radio=TrueRadio(), density=NearestDensity(),
                       synthetic=syn, radio_model_factory=lambda **kw: MeanModel(**kw))
    metrics, _ = stage.evaluate(cfg, inp, run_id="r1")
    gx, gy = np.meshgrid(np.arange(5), np.arange(5))
    maps = pd.concat([
        pd.DataFrame({"window": "w", "cell_id": c, "method": m, "gx": gx.ravel(), "gy": gy.ravel(),
                      "x_m": gx.ravel() * 100.0, "y_m": gy.ravel() * 100.0, "prob": 1 / 25})
        for c in ("A", "B") for m in ("kde", "voronoi")
    ])
    rejects = pd.DataFrame({"source": ["mdt", "mdt", "traffic"], "reason_code": ["duplicate", "duplicate;outside_area", "missing_value"]})
    data = ReportData(metrics=metrics, synthetic=syn, reports=reports, spatial_maps=maps, rejects=rejects, cells=cells)
    return build_report(data, tmp / "out", max_points=500, n_example_cells=2).parent


def test_report_writes_every_plot_and_links_it(report_dir):
    page = (report_dir / "index.html").read_text()
    for name in PNGS:
        assert (report_dir / name).stat().st_size > 1000, name
        assert f"src='{name}'" in page
    assert "Not available" not in page
    # Rejects table counts each ';'-joined reason: duplicate twice.
    assert re.search(r"<td>mdt</td>\s*<td>duplicate</td>\s*<td>2</td>", page)


def test_metrics_table_puts_models_side_by_side():
    m = pd.DataFrame({"metric": ["rsrp_mae_dbm", "rsrp_mae_dbm"], "value": [2.0, 3.0], "cell_id": None, "window": None,
                      "split": "test", "model": ["bnn", "knn"], "detail": None})
    table = metrics_table(m)
    assert table.loc["rsrp_mae_dbm", "bnn"] == 2.0 and table.loc["rsrp_mae_dbm", "knn"] == 3.0


def test_report_without_inputs_says_what_is_missing(tmp_path):
    path = build_report(ReportData(metrics=pd.DataFrame(columns=["metric", "value", "cell_id", "window", "split", "model", "detail"])), tmp_path)
    assert path.read_text().count("Not available") == 7


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    # A copy of the page with a check that every <img> decoded (naturalWidth > 0) once loaded.
    check = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.setAttribute('data-images',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)})</script>")
    probe = report_dir / "_probe.html"
    probe.write_text((report_dir / "index.html").read_text().replace("</body>", check + "</body>"))
    try:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        probe.unlink()
    match = re.search(r'data-images="(\d+)/(\d+)"', proc.stdout)
    assert match, proc.stderr[-2000:]
    assert match.group(1) == match.group(2) == str(len(PNGS))
