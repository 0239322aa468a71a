from __future__ import annotations

import json
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
        "epistemic_hist.png", "rsrq_vs_load.png", "fingerprinting.png", "rejects.png", "privacy_mia_roc.png"]


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


def test_metrics_table_keeps_one_row_per_column_of_a_fidelity_metric():
    # fidelity_* rows are per table column (detail.column): pivoting on the metric kept x_m's figure, in metres,
    # under "fidelity_wasserstein" and hid RSRP's, RSRQ's and the serving cell's
    m = pd.DataFrame({"metric": ["fidelity_wasserstein", "fidelity_wasserstein", "fidelity_jsd"], "value": [51.9, 2.5, 0.105],
                      "cell_id": None, "window": None, "split": "synthetic", "model": None,
                      "detail": ['{"column": "x_m", "n_real": 9}', '{"column": "rsrp_dbm"}', '{"column": "serving_cell_id"}']})
    table = metrics_table(m)
    assert table.loc["fidelity_wasserstein (x_m) [synthetic]", "-"] == 51.9
    assert table.loc["fidelity_wasserstein (rsrp_dbm) [synthetic]", "-"] == 2.5
    assert table.loc["fidelity_jsd (serving_cell_id) [synthetic]", "-"] == 0.105


def test_metric_figures_keep_counts_out_of_scientific_notation():
    from cellsynth.evaluate.report import _figure

    assert [_figure(v) for v in (15530.0, 0.01288, 2.402, 9999.4, -123456.7)] == ["15,530", "0.01288", "2.402", "9999", "-123,457"]


def test_report_without_inputs_says_what_is_missing(tmp_path):
    empty = pd.DataFrame(columns=["metric", "value", "cell_id", "window", "split", "model", "detail"])
    path = build_report(ReportData(metrics=empty), tmp_path)
    assert path.read_text().count("Not available") == 7
    assert path.read_text().count("no MDT reports in this lake") == 7  # a traffic-only lake
    # reports without a load anywhere: RSRQ scored from position alone, no error by load decile to draw
    rsrq = pd.DataFrame([{"metric": "rsrq_mae_db", "value": 1.6, "cell_id": None, "window": None, "split": "test",
                          "model": "bnn", "detail": None}])
    text = build_report(ReportData(metrics=rsrq, n_reports=100), tmp_path / "r").read_text()
    assert "no report carries a cell load" in text and "no MDT reports" not in text
    assert text.count("input table or metric missing") == 6


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


def _rows(*rows):
    cols = ["run_id", "stage", "metric", "value", "cell_id", "window", "split", "model", "detail"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols)


def test_summary_table_marks_each_figure_against_its_reference():
    from cellsynth.evaluate.report import summary_table

    knn_settings = json.dumps({"settings": {"k": 7, "max_train_rows": 5000}})
    m = _rows(
        ("r2", "evaluate", "rsrp_mae_dbm", 3.5, None, None, "test", "bnn", None),
        ("r2", "evaluate", "rsrp_mae_dbm", 4.0, None, None, "test", "knn", knn_settings),
        ("r2", "evaluate", "rsrp_mae_dbm", 3.2, None, None, "test", "rf", None),
        # The evaluate stage's settings rows: no value, the text in detail.
        ("r2", "evaluate", "baseline_settings", None, None, None, None, "rf", json.dumps({"settings": "200 trees"})),
        ("r1", "evaluate", "rsrp_mae_dbm", 9.9, None, None, "test", "bnn", None),  # an older run: ignored
        ("r2", "evaluate", "rsrp_mae_dbm", 1.0, "c1", None, "test", "bnn", None),  # a per-cell row: ignored
        ("r2", "evaluate", "association_accuracy", 0.67, None, None, "observed", "kde", None),
        ("r2", "evaluate", "association_accuracy", 0.64, None, None, "observed", "nearest_site", None),
        ("r2", "evaluate", "association_accuracy", 0.62, None, None, "observed", "kde_ml", None),
        ("r2", "evaluate", "fingerprint_rmse_ratio", 1.3, None, None, "test", "synthetic_over_real", None),
        ("r2", "evaluate", "privacy_mia_auc", 0.52, None, None, "test", "synthetic", None),
        ("r2", "evaluate", "privacy_something_new", 3.0, None, None, "test", "synthetic", None),
        ("d1", "density", "map_ks_mean", 0.2, None, None, "all", "kde", None),
        ("d1", "density", "map_ks_mean", 0.5, None, None, "all", "voronoi", None),
    )
    rejects = pd.DataFrame({"source": ["mdt"] * 3, "reason_code": ["duplicate", "duplicate;outside_area", "bad_timestamp"]})
    t = summary_table(m, rejects=rejects, n_clean_reports=97)
    got = {(r.figure, r.reference.split(" ")[0]): (r.ours, r.mark) for r in t.itertuples()}
    assert got[("RSRP MAE [dB]", "knn")] == ("3.5", "pass")
    assert got[("RSRP MAE [dB]", "rf")] == ("3.5", "warn")
    assert got[("serving-cell accuracy", "nearest_site")] == ("0.67", "pass")
    assert got[("serving-cell accuracy", "kde_ml")] == ("0.67", "pass")
    assert got[("map 2-D KS to truth", "voronoi")] == ("0.2", "pass")
    assert got[("fingerprinting RMSE, synthetic / real", "bound")] == ("1.3", "warn")
    assert got[("mia auc (synthetic)", "bound")] == ("0.52", "pass")
    # A privacy figure with no a-priori bound stays in the privacy section, off the first screen.
    assert not any(fig.startswith("something new") for fig, _ in got)
    # The baseline's recorded settings travel with it.
    knn_line = t[t["reference"].str.startswith("knn")]["reference"].iloc[0]
    assert knn_line == "knn 4 (k=7, max_train_rows=5000)"
    # once: the calibration line of the same baseline carries the figure only
    ce = [("r2", "evaluate", "rsrp_calibration_error", v, None, None, "test", model, d)
          for v, model, d in ((0.02, "bnn", None), (0.04, "knn", knn_settings))]
    refs = summary_table(_rows(*m.itertuples(index=False), *ce))["reference"].tolist()
    assert refs.count("knn 0.04") == 1 and refs.count("knn 4 (k=7, max_train_rows=5000)") == 1
    assert t[t["reference"].str.startswith("rf")]["reference"].iloc[0] == "rf 3.2 (200 trees)"
    rej = t[t["area"] == "Data"].iloc[0]
    assert rej["ours"] == "3 (3.0%)" and rej["mark"] == "pass" and rej["reference"].startswith("duplicate 2")
    # Absent figures are left out, not failed: RSRQ, traffic and DCR have no rows here.
    assert not t["area"].isin(["RSRQ", "Traffic"]).any()


def test_summary_table_of_nothing_is_empty():
    from cellsynth.evaluate.report import summary_table

    assert summary_table(_rows()).empty


def test_map_panels_share_an_extent_that_keeps_every_map_in_view():
    from cellsynth.evaluate.report import map_panel_layout

    # A point map at square (10, 10) and a uniform 21 x 21 map centred on it: the shared box covers
    # the uniform map's 98% box (all but the lowest-ranked squares of equal mass) plus 2 squares.
    point = pd.DataFrame({"gx": [10], "gy": [10], "prob": [1.0]})
    gx, gy = np.meshgrid(np.arange(0, 21), np.arange(0, 21))
    uniform = pd.DataFrame({"gx": gx.ravel(), "gy": gy.ravel(), "prob": 1 / 441})
    box, vmax = map_panel_layout([point, uniform, uniform.iloc[:0]])
    assert vmax == pytest.approx(1.0)
    assert box[0] <= 8 and box[1] >= 12 and box[2] <= 8 and box[3] >= 12  # the point and its margin
    assert box[1] - box[0] >= 20 and box[3] - box[2] >= 18  # the uniform map's 98% box, not a corner
    # Far tails (1e-9 of the mass) do not blow the extent up.
    tail = pd.concat([point.assign(prob=1 - 1e-9), pd.DataFrame({"gx": [500], "gy": [500], "prob": [1e-9]})])
    assert map_panel_layout([tail])[0] == (8, 12, 8, 12)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_first_screen_is_the_summary_table(report_dir, tmp_path):
    # Where the summary table and the first plot sit in a 1280 x 900 window, then a screenshot.
    check = ("<script>window.addEventListener('load',()=>{const t=document.querySelector('table.summary')"
             ".getBoundingClientRect();const i=document.images[0].getBoundingClientRect();"
             "document.body.setAttribute('data-layout',[t.top,t.bottom,i.top,window.innerHeight].join('|'))})</script>")
    probe = report_dir / "_probe_summary.html"
    probe.write_text((report_dir / "index.html").read_text().replace("</body>", check + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1280,900", "--virtual-time-budget=5000"]
    shot = tmp_path / "first_screen.png"
    try:
        dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
        subprocess.run([*flags, f"--screenshot={shot}", (report_dir / "index.html").as_uri()], capture_output=True, timeout=120)
    finally:
        probe.unlink()
    match = re.search(r'data-layout="([^"]+)"', dom.stdout)
    assert match, dom.stderr[-2000:]
    top, bottom, first_img, height = (float(v) for v in match.group(1).split("|"))
    assert top < 250 and bottom < height and first_img > bottom  # the table opens the page, plots follow
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (900, 1280)
    assert float(img[..., :3].std()) > 0.05  # something was drawn


def test_report_reads_only_the_map_rows_it_draws(tmp_path, monkeypatch):
    # Issue 15: the report stage reads the spatial_maps rows of its example cells with filters
    # (the whole table was its driver's peak at 10^3 cells); the map figure gets the same frames.
    from cellsynth_testkit import local_runtime
    from cellsynth.evaluate import report, report_stage

    rng = np.random.default_rng(3)
    rows = []
    for w in ("h00_06", "h06_12", "h12_18"):
        for i, c in enumerate(["c0", "c1", "c2", "c3", "c4", "c5"]):
            for m in ("kde", "voronoi", "student", "teacher"):
                if m == "student" and i % 2:
                    continue
                n = int(rng.integers(3, 30)) if m == "kde" else 9
                gx, gy = rng.integers(0, 20, n), rng.integers(0, 20, n)
                rows.append(pd.DataFrame({"window": w, "cell_id": c, "method": m, "gx": gx.astype("int32"), "gy": gy.astype("int32"),
                                          "x_m": (gx + 0.5) * 100.0, "y_m": (gy + 0.5) * 100.0, "prob": rng.dirichlet(np.ones(n)),
                                          "run_id": "r", "network_scenario": "baseline"}))
    maps = pd.concat(rows, ignore_index=True)
    rt = local_runtime(tmp_path, make_config(tmp_path))
    rt.lake.write("spatial_maps", maps)
    seen = []
    layout = report.map_panel_layout
    monkeypatch.setattr(report, "map_panel_layout", lambda per, **kw: (seen.append(per), layout(per, **kw))[1])
    metrics = pd.DataFrame({"metric": ["map_ks"], "value": [0.1], "cell_id": [None], "model": ["kde"]})
    truth = maps[maps.method == "kde"].drop(columns=["method", "run_id", "network_scenario"])
    truth.to_parquet(tmp_path / "truth.parquet")
    whole = report._maps(ReportData(metrics=metrics, spatial_maps=rt.lake.read_pandas("spatial_maps"), truth_maps=truth),
                         tmp_path, 3)
    full, seen[:] = list(seen), []
    slim_data = report_stage.maps_for_report(rt.lake, 3, tmp_path / "truth.parquet")
    assert slim_data["truth_maps"]["cell_id"].nunique() == 3  # the example cells' truth only
    slim = report._maps(ReportData(metrics=metrics, **slim_data), tmp_path, 3)
    assert whole and slim and len(full) == len(seen) == 3
    assert all(len(panels) == 4 for panels in seen)  # truth, KDE, Voronoi, student
    for a, b in zip(full, seen):
        for fa, fb in zip(a, b):
            pd.testing.assert_frame_equal(fa.reset_index(drop=True), fb.reset_index(drop=True))


def test_report_reads_the_sample_figures_window_only():
    # Issue 15: the samples figure draws one window; the stage reads that window's rows and
    # counts the clean reports instead of reading both tables whole.
    import pyarrow as pa
    import pyarrow.compute as pc

    from cellsynth.evaluate import report_stage

    rng = np.random.default_rng(1)

    def rows(n, windows):
        return pa.table({"window": rng.choice(windows, n), "x_m": rng.uniform(0, 1, n), "y_m": rng.uniform(0, 1, n),
                         "serving_cell_id": rng.choice(["a", "b"], n), "rsrp_dbm": rng.normal(-90, 5, n)})

    class Lake:
        tables = {"synthetic_mdt": rows(300, ["w1", "w2", "w2", "w3"]), "mdt_reports": rows(500, ["w1", "w2", "w3"])}

        def exists(self, name):
            return name in self.tables

        def read(self, name, columns=None, filters=None):
            t = self.tables[name]
            for col, op, val in filters or []:
                assert op == "="
                t = t.filter(pc.equal(t[col], val))
            return t.select(columns) if columns else t

        def read_pandas(self, name, **kw):
            return self.read(name, **kw).to_pandas()

    got = report_stage.samples_for_report(Lake())
    syn = Lake.tables["synthetic_mdt"].to_pandas()
    top = syn["window"].value_counts().idxmax()
    assert top == "w2" and set(got["synthetic"]["window"]) == set(got["reports"]["window"]) == {"w2"}
    cols = ["window", "x_m", "y_m", "serving_cell_id"]
    pd.testing.assert_frame_equal(got["synthetic"], syn.loc[syn.window == "w2", cols].reset_index(drop=True))
    assert got["n_reports"] == 500 and len(got["reports"]) < 500
    del Lake.tables["synthetic_mdt"]
    assert report_stage.samples_for_report(Lake()) == {"synthetic": None, "reports": None, "n_reports": 500}


def test_the_map_figure_shows_the_best_measured_cells(tmp_path):
    # On the UCC Download traces the figure showed the cells with the most KDE squares: the sparsest
    # ones (3-11 reports in the window, fallback bandwidths of 0.3-1.2 km, maps near uniform). It now
    # shows the window with the most reports and its cells with the most reports.
    from cellsynth_testkit import local_runtime
    from cellsynth.evaluate import report, report_stage

    rows, models = [], []
    for w, scale in (("morning", 1), ("evening", 3)):
        for i in range(6):
            n_reports = scale * (100 - 15 * i)        # c0 best measured ...
            n_squares = 5 + 20 * i                    # ... c5 the widest (sparsest) KDE
            for m in ("kde", "voronoi"):
                n = n_squares if m == "kde" else 4
                rows.append(pd.DataFrame({"window": w, "cell_id": f"c{i}", "method": m, "gx": np.arange(n, dtype="int32"),
                                          "gy": np.zeros(n, dtype="int32"), "x_m": np.arange(n) * 100.0 + 50.0,
                                          "y_m": 50.0, "prob": np.full(n, 1.0 / n), "run_id": "r",
                                          "network_scenario": "baseline"}))
            models.append({"window": w, "cell_id": f"c{i}", "n_reports": n_reports})
        models.append({"window": w, "cell_id": "__area__", "n_reports": 10_000})  # the area density: no map
    rt = local_runtime(tmp_path, make_config(tmp_path))
    rt.lake.write("spatial_maps", pd.concat(rows, ignore_index=True))
    assert report_stage.maps_for_report(rt.lake, 2)["map_cells"] == ["c5", "c4"]  # no kde_models: most squares
    def kde_models(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(bandwidth_m=50.0, x_min_m=0.0, x_max_m=1.0, y_min_m=0.0, y_max_m=1.0, centroid_x_m=0.5,
                            centroid_y_m=0.5, bandwidth_source="nll", path="p", source_version=0, cell_shard=0, run_id="r")

    rt.lake.write("kde_models", kde_models(pd.DataFrame(models)))
    data = report_stage.maps_for_report(rt.lake, 2)
    assert data["map_window"] == "evening" and data["map_cells"] == ["c0", "c1"]
    kde = data["spatial_maps"][data["spatial_maps"]["method"] == "kde"]
    assert set(kde["window"]) == {"evening"} and set(kde["cell_id"]) == {"c0", "c1"}
    metrics = pd.DataFrame({"metric": ["map_ks"], "value": [0.1], "cell_id": [None], "model": ["kde"]})
    assert report._maps(ReportData(metrics=metrics, **data), tmp_path, 2)
    # kde_models naming cells without maps: back to the squares rule rather than no figure
    rt.lake.write("kde_models", kde_models(pd.DataFrame([{"window": "evening", "cell_id": "gone", "n_reports": 999}])),
                  mode="overwrite")
    assert report_stage.maps_for_report(rt.lake, 2)["map_cells"] == ["c5", "c4"]
