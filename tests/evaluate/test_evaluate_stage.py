from __future__ import annotations

import json

import numpy as np
import pytest
from _evaluate_fakes import NOISE_DB, MeanModel, NearestDensity, TrueRadio, synthetic_from, world

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.evaluate import stage
from cellsynth.lake.partitions import partition_filters


def _cfg(tmp_path):
    return make_config(tmp_path, evaluate={"baselines": ["knn"], "n_downsampling_cells": 1, "field_grid_px": 10},
                       generate={"n_neighbours": 2})


def _inputs(synthetic="fresh"):
    reports, meas, cells = world()
    syn = synthetic_from(reports, meas) if synthetic == "fresh" else reports.rename(columns={"report_id": "sample_id"})
    return stage.Inputs(reports=reports, measurements=meas, cells=cells, radio=TrueRadio(), density=NearestDensity(),
                        synthetic=syn, radio_model_factory=lambda **kw: MeanModel(**kw))


def _one(frame, metric, **where):
    sel = frame[frame["metric"] == metric]
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (metric, where, len(sel))
    return sel.iloc[0]


def test_evaluate_scores_a_closed_form_world(tmp_path):
    frame, headline = stage.evaluate(_cfg(tmp_path), _inputs(), run_id="r1")
    # The true field with Gaussian noise: MAE = sigma sqrt(2/pi), RMSE = sigma, calibrated.
    assert _one(frame, "rsrp_mae_dbm", model="bnn")["value"] == pytest.approx(NOISE_DB * np.sqrt(2 / np.pi), rel=0.06)
    assert _one(frame, "rsrp_rmse_dbm", model="bnn")["value"] == pytest.approx(NOISE_DB, rel=0.06)
    assert _one(frame, "rsrp_calibration_error", model="bnn")["value"] < 0.03
    curve = json.loads(_one(frame, "rsrp_calibration_error", model="bnn")["detail"])
    np.testing.assert_allclose(curve["observed"], curve["expected"], atol=0.04)
    assert headline["rsrp_mae_bnn"] < headline["rsrp_mae_knn"]
    # RSRQ per load decile: 10 rows for the main model.
    dec = frame[(frame["metric"] == "rsrq_mae_db_by_load_decile") & (frame["model"] == "bnn")]
    assert len(dec) == 10 and (dec["value"] < 0.6).all()
    # the baselines on the same RSRQ rows from position alone: RSRQ = -8 - 6 rho + N(0, 0.5) here, and
    # position does not tell the load, so they are left with most of its 1.4 dB spread
    q_knn, q_bnn = _one(frame, "rsrq_mae_db", model="knn")["value"], _one(frame, "rsrq_mae_db", model="bnn")["value"]
    assert q_bnn < 0.5 and 0.8 < q_knn < 1.6
    assert json.loads(_one(frame, "rsrq_mae_db", model="knn")["detail"])["n"] == \
        json.loads(_one(frame, "rsrq_mae_db", model="bnn")["detail"])["n"]
    # Association: nearest-site == KDE stand-in here, against the observed (strongest) serving cell.
    acc = _one(frame[frame["window"].isna()], "association_accuracy", model="nearest_site", split="observed")["value"]
    assert 0.6 < acc <= 1.0
    # One window: its row and the overall row agree, and both count the same held-out reports.
    per_window = _one(frame, "association_accuracy", model="nearest_site", split="observed", window="w")
    assert per_window["value"] == pytest.approx(acc, abs=1e-12)
    # Downsampling refits ran for one cell: full + 3 levels.
    assert len(frame[frame["metric"] == "rsrp_mae_dbm_downsampled"]) == 4
    # Fresh draws of the same world: privacy fine, fingerprinting close to real.
    assert headline["privacy_dcr_flag"] == 0.0
    assert headline["fingerprint_ratio"] == pytest.approx(1.0, abs=0.3)
    fid = frame[(frame["metric"] == "fidelity_wasserstein") & (frame["model"] == "synthetic")]
    x_row = fid[[json.loads(d)["column"] == "x_m" for d in fid["detail"]]]
    assert len(x_row) == 1 and x_row["value"].iloc[0] < 40.0
    # figures computed on samples state their sizes (issue 15)
    detail = json.loads(x_row["detail"].iloc[0])
    assert detail["n_real"] > 0 and detail["n_synthetic"] > 0
    assert json.loads(_one(frame, "fingerprint_rmse_m", model="rf_on_real")["detail"])["n_test"] > 0
    acc_detail = json.loads(_one(frame[frame["window"].isna()], "association_accuracy", model="nearest_site", split="observed")["detail"])
    assert acc_detail["ci95"][0] <= acc <= acc_detail["ci95"][1]


def test_the_field_figure_is_drawn_around_its_cell():
    # the report's RSRP field used the grid over every cell's rows: on the UCC traces 15 km wide, one
    # cell's 3 km of rows a few squares of it
    pts = np.array([[1000.0, -200.0], [3000.0, 600.0], [2000.0, 0.0]])
    x, y = stage.field_axes(pts, 41)
    assert len(x) == len(y) == 41
    assert x[0] == pytest.approx(1000.0 - 500.0) and x[-1] == pytest.approx(3000.0 + 500.0)  # side 2 km, 500 m margin
    assert y[-1] - y[0] == pytest.approx(x[-1] - x[0]) and (y[0] + y[-1]) / 2 == pytest.approx(200.0)
    wide = np.array([[0.0, 0.0], [8000.0, 100.0]])
    xw, _ = stage.field_axes(wide, 9)
    assert (xw[0], xw[-1]) == (pytest.approx(-2000.0), pytest.approx(10000.0))  # a quarter of the 8 km side


def test_copied_training_rows_raise_the_privacy_flag(tmp_path):
    inp = _inputs(synthetic="copy")
    inp.synthetic["neighbour_1_cell_id"] = None
    _, headline = stage.evaluate(_cfg(tmp_path), inp, run_id="r1")
    assert headline["privacy_dcr_flag"] == 1.0


def test_metrics_written_to_the_evaluate_partition(tmp_path):
    cfg = _cfg(tmp_path)
    rt = local_runtime(tmp_path, cfg)
    frame, _ = stage.evaluate(cfg, _inputs(), run_id="r1")
    rt.lake.write("metrics", frame, mode="overwrite", predicate="stage = 'evaluate'")
    back = rt.lake.read_pandas("metrics", filters=[("stage", "=", "evaluate")])
    assert len(back) == len(frame)


def test_baselines_run_at_parity_and_their_settings_are_recorded(tmp_path):
    cfg = make_config(tmp_path, evaluate={"baselines": ["knn", "rf"], "n_downsampling_cells": 1, "field_grid_px": 10},
                      generate={"n_neighbours": 2})
    frame, headline = stage.evaluate(cfg, _inputs(), run_id="r1")
    settings = frame[frame["metric"] == "baseline_settings"]
    assert sorted(settings["model"]) == ["bnn", "knn", "rf"]
    text = {r["model"]: json.loads(r["detail"])["settings"] for _, r in settings.iterrows()}
    cap = stage.our_row_cap(cfg)
    assert cap <= cfg.radio.max_train_per_cell
    assert f"up to {cap} training rows per cell" in text["knn"] and f"up to {cap} training rows" in text["bnn"] and "CV" in text["knn"]
    assert "200 trees" in text["rf"]
    assert settings["value"].isna().all()  # a description, not a figure: kept out of the metrics tables
    # Both baselines scored on the held-out rows; the true field (the stand-in for ours) beats them.
    assert headline["rsrp_mae_bnn"] < min(headline["rsrp_mae_knn"], headline["rsrp_mae_rf"])
    from cellsynth.evaluate.report import metrics_table, model_settings_table

    table = model_settings_table(frame)
    assert list(table.columns) == ["model", "settings"] and len(table) == 3
    assert not any("baseline_settings" in r for r in metrics_table(frame).index)


def test_gp_baseline_fits_hyperparameters_on_at_least_1000_rows(tmp_path):
    cfg = _cfg(tmp_path)
    s = stage.baseline_settings(cfg)
    assert s.gp_max_train >= 1000 and s.rf_n_estimators >= 200 and len(s.knn_k_grid) > 1
    assert s.seed == cfg.run.seed
    assert "radio.max_train_per_cell" in stage.STAGE.reads  # the baselines get our row cap: a change reruns evaluate


def test_radio_is_scored_on_a_stated_sample_of_cells_when_there_are_many(tmp_path):
    cfg = make_config(tmp_path, evaluate={"baselines": ["knn"], "n_downsampling_cells": 1, "field_grid_px": 10,
                                          "max_scored_cells": 2}, generate={"n_neighbours": 2})
    inp = _inputs()
    frame, _ = stage.evaluate(cfg, inp, run_id="r1")
    stated = _one(frame, "rsrp_scored_cells")
    n_cells = json.loads(stated["detail"])["of_cells"]
    assert stated["value"] == 2.0 and n_cells > 2
    # Ours and the baseline are scored on the same rows: those of the two sampled cells only.
    n_ours = json.loads(_one(frame, "rsrp_mae_dbm", model="bnn")["detail"])["n"]
    n_knn = json.loads(_one(frame, "rsrp_mae_dbm", model="knn")["detail"])["n"]
    full, _ = stage.evaluate(_cfg(tmp_path), _inputs(), run_id="r1")
    n_all = json.loads(_one(full, "rsrp_mae_dbm", model="bnn")["detail"])["n"]
    assert n_ours == n_knn and 0 < n_ours < n_all
    assert _one(full, "rsrp_scored_cells")["value"] == float(n_cells)
    picked = stage._scored_cells(np.array([f"c{i}" for i in range(10)], dtype=object), 3, seed=0)
    assert len(set(picked)) == 3 and list(picked) == sorted(picked)
    assert list(stage._scored_cells(np.array(["b", "a"], dtype=object), 3, seed=0)) == ["a", "b"]


def _lake_world(tmp_path, cfg):
    """The fake world written to a local lake like ingest and generate write it: 3 cell shards."""
    import pandas as pd

    rt = local_runtime(tmp_path, cfg)
    reports, meas, cells = world(n_reports=1500)
    syn = synthetic_from(reports, meas)
    shard = {"A": 0, "B": 1, "C": 2}
    ts = pd.Timestamp("2024-01-01", tz="UTC")
    reports = reports.assign(ue_id="u", ts=ts, cell_shard=reports["serving_cell_id"].map(shard).astype("int32"),
                             ingest_run_id="i")
    meas = meas.merge(reports[["report_id", "window", "cell_shard"]], on="report_id")
    meas = meas.assign(ts=ts, rank=np.where(meas["role"] == "serving", 0, 1).astype("int32"))
    syn = syn.assign(ts=ts, lat=0.0, lon=0.0, rsrp_dbm_epistemic_std=0.5, rsrp_dbm_aleatoric_std=2.0,
                     rsrq_db_epistemic_std=0.1, rsrq_db_aleatoric_std=0.5, reliable=True, scenario="fixed", run_id="g",
                     cell_shard=syn["serving_cell_id"].map(shard).astype("int32"))
    for table, frame in (("mdt_reports", reports), ("mdt_measurements", meas), ("synthetic_mdt", syn)):
        rt.lake.write(table, frame)
    return rt, cells


def test_streamed_inputs_give_the_figures_of_the_whole_frames(tmp_path):
    # Issue 15: run() reads the lake one (window, cell shard) partition at a time and keeps
    # bottom-k samples, the rows the sections use and whole-table counts; evaluate() on those
    # gives the same metrics as on the whole frames (samples small enough here to bite).
    import pandas as pd

    from cellsynth.splits import stable_order

    cfg = make_config(tmp_path, evaluate={"baselines": ["knn"], "n_downsampling_cells": 1, "field_grid_px": 10,
                                          "max_test_rows": 150, "max_fingerprint_train_rows": 300, "max_privacy_rows": 250,
                                          "max_scored_cells": 2, "fingerprint_trees": 10},
                      privacy={"mia_targets": 60, "mia_max_synthetic_rows": 200, "mia_bootstrap": 20},
                      generate={"n_neighbours": 2, "use_ray": False})
    rt, cells = _lake_world(tmp_path, cfg)
    assert len(partition_filters(rt.lake, "mdt_measurements")) == 3
    lake = rt.lake

    def models(**frames):
        return stage.Inputs(cells=cells, radio=TrueRadio(), density=NearestDensity(), radio_model_factory=lambda **kw: MeanModel(**kw),
                            **frames)

    whole = models(reports=stable_order(lake.read_pandas("mdt_reports", columns=stage._REPORT_COLS)),
                   measurements=stable_order(lake.read_pandas("mdt_measurements", columns=stage._MEAS_COLS)),
                   synthetic=stable_order(lake.read_pandas("synthetic_mdt", columns=stage._synthetic_cols(lake, cfg))))
    streamed = stage.stream_inputs(cfg, lake, models(reports=None, measurements=None))
    assert len(streamed.measurements) < len(whole.measurements) and len(streamed.synthetic) < len(whole.synthetic)
    assert len(streamed.reports) < len(whole.reports)
    whole.distance = streamed.distance = stage.lake_distance_stats(cfg, rt)
    got, head_got = stage.evaluate(cfg, streamed, run_id="r1")
    want, head_want = stage.evaluate(cfg, whole, run_id="r1")
    pd.testing.assert_frame_equal(got, want)
    assert head_got == head_want
    # the samples are stated: the scored held-out rows and the fidelity samples
    assert json.loads(_one(got, "rsrp_mae_dbm", model="bnn")["detail"])["n"] == 150
    mia = json.loads(_one(got, "privacy_mia_auc", model="distance")["detail"])
    assert mia["sampled_from"] == {"train_reports": 250, "held_out_reports": 250, "synthetic_kde_rows": 200}


def test_bottom_k_samples_do_not_depend_on_row_order_or_on_a_superset():
    import pandas as pd

    from cellsynth import sampling

    rng = np.random.default_rng(0)
    f = pd.DataFrame({"report_id": [f"r{i}" for i in range(3000)], "cell_id": rng.integers(0, 4, 3000).astype(str),
                      "v": rng.normal(size=3000)})
    a = sampling.bottom_k(f, ["report_id"], 100, seed=42)
    pd.testing.assert_frame_equal(a, sampling.bottom_k(f.sample(frac=1, random_state=1), ["report_id"], 100, seed=42))
    pd.testing.assert_frame_equal(sampling.bottom_k(a, ["report_id"], 40, seed=42), sampling.bottom_k(f, ["report_id"], 40, seed=42))
    acc = sampling.BottomK(["report_id"], 100, seed=42)
    for part in np.array_split(f.sample(frac=1, random_state=3).to_numpy(), 17):
        acc.add(pd.DataFrame(part, columns=f.columns).astype({"v": float}))
    pd.testing.assert_frame_equal(acc.frame(), a)
    per = sampling.bottom_k(f, ["report_id"], 30, seed=42, per="cell_id")
    assert (per["cell_id"].value_counts() == 30).all()
    assert not sampling.bottom_k(f, ["report_id"], 100, seed=43)["report_id"].equals(a["report_id"])  # the seed moves it


def test_sections_hand_the_freed_heap_back(tmp_path, monkeypatch):
    """evaluate trims the driver's heap after each section that ran (issue 15: a flat driver), not only after the
    stage: one call after the radio sections, the refits, association and synthetic scores each; none when no
    section ran that frees a working set."""
    calls = []
    monkeypatch.setattr(stage, "release_freed_memory", lambda: calls.append(1) or True)
    frame, _ = stage.evaluate(_cfg(tmp_path), _inputs(), run_id="r1")
    inp = _inputs()
    expected = sum([inp.radio is not None, inp.radio_model_factory is not None, inp.density is not None,
                    inp.synthetic is not None and len(inp.synthetic) > 0])
    assert expected >= 3 and len(calls) == expected
    assert len(frame)


def test_rsrq_of_load_free_models_is_scored_on_rows_without_load(tmp_path):
    """Models fitted without load terms (no load in the lake) are scored on every held-out report with
    RSRQ, and get no per-load-decile rows; load-conditioned models skip reports without a load."""

    class LoadFree(TrueRadio):
        def uses_load(self, target):
            return False

        def predict(self, target, cell_ids, xy_m, *, load_rho=None):
            assert target != "rsrq" or load_rho is None
            if target == "rsrq":
                n = len(cell_ids)
                return type(super().predict("rsrp", cell_ids, xy_m))(np.full(n, -11.0), np.full(n, 0.1), np.full(n, 2.0))
            return super().predict(target, cell_ids, xy_m)

    reports, meas, cells = world()
    reports["load_rho"], meas["load_rho"] = np.nan, np.nan
    inp = stage.Inputs(reports=reports, measurements=meas, cells=cells, radio=LoadFree(), density=NearestDensity(),
                       synthetic=synthetic_from(reports, meas), radio_model_factory=lambda **kw: MeanModel(**kw))
    frame, _ = stage.evaluate(_cfg(tmp_path), inp, run_id="r1")
    mae = _one(frame, "rsrq_mae_db", model="bnn")
    y = reports["rsrq_db"].to_numpy()  # -8 - 6 rho + N(0, 0.5): the load is in the data, not in the model
    assert mae["value"] == pytest.approx(np.mean(np.abs(y - -11.0)), rel=0.15)
    assert frame[frame["metric"] == "rsrq_mae_db_by_load_decile"].empty
    # the same reports with a load-conditioned model but no load: nothing to score
    inp.radio = TrueRadio()
    frame, _ = stage.evaluate(_cfg(tmp_path / "b"), inp, run_id="r2")
    assert frame[frame["metric"] == "rsrq_mae_db"].empty
