"""The evaluate stage's privacy rows (issue 16) and their report block."""

from __future__ import annotations

import json

import pytest
from _evaluate_fakes import world

from cellsynth_testkit import test_config as make_config
from cellsynth.evaluate import stage
from cellsynth.evaluate.report import ReportData, build_report
from cellsynth.splits import random_test_mask


def test_copied_table_is_caught_by_distance_shares_and_the_attacks(tmp_path):
    cfg = make_config(tmp_path, evaluate={"baselines": [], "n_downsampling_cells": 1, "field_grid_px": 10},
                      generate={"n_neighbours": 2}, privacy={"mia_targets": 500, "mia_bootstrap": 50})
    reports, meas, cells = world()
    held_out = random_test_mask(reports["report_id"].to_numpy(), test_fraction=cfg.split.test_fraction, seed=cfg.run.seed)
    copies = reports[~held_out].rename(columns={"report_id": "sample_id"}).assign(neighbour_1_cell_id=None)
    inp = stage.Inputs(reports=reports, measurements=meas, cells=cells, synthetic=copies)
    frame, headline = stage.evaluate(cfg, inp, run_id="r1")
    rows = frame[frame["metric"] == "privacy_share_within_10m"]
    sel = rows[rows["split"] == "to_train"].set_index("model")["value"]
    both = rows[rows["split"] == "to_train_position_and_rsrp"].set_index("model")["value"]
    assert both["synthetic"] == pytest.approx(1.0)  # copies: RSRP identical too
    # The table is the training rows themselves: every row at 0 m; held-out rows are fresh draws.
    assert sel["synthetic"] == pytest.approx(1.0) and sel["holdout_real"] < 0.5
    assert headline["privacy_dcr_flag"] == 1.0
    dist = frame[(frame["metric"] == "privacy_mia_auc") & (frame["model"] == "distance")].iloc[0]
    # Members sit at distance 0 and non-members do not: the distance attack separates them fully.
    assert dist["value"] == pytest.approx(1.0, abs=0.01)
    assert frame[(frame["metric"] == "privacy_mia_tpr_at_fpr01") & (frame["model"] == "distance")]["value"].iloc[0] > 0.95
    assert headline["privacy_mia_auc"] >= dist["value"]
    roc = json.loads(dist["detail"])
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    html = build_report(ReportData(metrics=frame), tmp_path / "report").read_text()
    assert "Membership" in html or "membership" in html
    assert (tmp_path / "report" / "privacy_mia_roc.png").is_file()
