from __future__ import annotations

import json

import numpy as np
import pytest
from _evaluate_fakes import NOISE_DB, MeanModel, NearestDensity, TrueRadio, synthetic_from, world

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_config
from cellsynth.evaluate import stage


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
    assert _one(frame, "fidelity_wasserstein", model="synthetic", detail=json.dumps({"column": "x_m"}))["value"] < 40.0


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


def test_tables_read_by_window_equal_the_whole_ordered_read(tmp_path):
    # Issue 15: evaluate reads mdt_measurements and synthetic_mdt one window at a time and puts
    # the rows in stable order column by column; the frame equals the whole table's stable_order.
    import pandas as pd

    from cellsynth.splits import stable_order

    rt = local_runtime(tmp_path, _cfg(tmp_path))
    rng = np.random.default_rng(0)
    n = 300
    meas = pd.DataFrame({
        "report_id": [f"rep{i:04d}" for i in rng.permutation(n)], "window": np.array(["h00_06", "h06_12", "h12_18"])[rng.integers(0, 3, n)],
        "cell_id": [f"c{i}" for i in rng.integers(0, 6, n)], "role": np.array(["serving", "neighbour"])[rng.integers(0, 2, n)],
        "rsrp_dbm": rng.normal(-90, 5, n), "rsrq_db": rng.normal(-10, 2, n), "x_m": rng.uniform(0, 1000, n),
        "y_m": rng.uniform(0, 1000, n), "load_rho": rng.uniform(0, 1, n), "cell_shard": rng.integers(0, 8, n).astype("int32"),
        "ts": pd.Timestamp("2024-01-01", tz="UTC"), "rank": 0,
    })
    rt.lake.write("mdt_measurements", meas)
    got = stage._read_ordered(rt.lake, "mdt_measurements", stage._MEAS_COLS, ["h00_06", "h06_12", "h12_18"])
    want = stable_order(rt.lake.read_pandas("mdt_measurements", columns=stage._MEAS_COLS))
    pd.testing.assert_frame_equal(got, want)
    # a window the list does not name is read too (last, then ordered with the rest)
    got = stage._read_ordered(rt.lake, "mdt_measurements", stage._MEAS_COLS, ["h06_12"])
    pd.testing.assert_frame_equal(got, want)
