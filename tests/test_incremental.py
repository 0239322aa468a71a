"""`run --incremental`: only the (window, cell_shard) partitions whose clean data changed are
retrained and regenerated; every other output row keeps its values and run_id."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth.lake import Lake
from cellsynth.lake.changes import changed_cells, changed_model_partitions
from cellsynth.schemas import cell_shard_of

N_SHARDS = 4
WINDOWS = ("h00_12", "h12_24")
# 4 sites x 2 sectors on a 2 km square; the cell ids hash into all 4 shards.
SITES = {"s0": (0.0, 0.0), "s1": (2000.0, 0.0), "s2": (0.0, 2000.0), "s3": (2000.0, 2000.0)}


def _cells() -> pd.DataFrame:
    rows = []
    for site, (x, y) in SITES.items():
        for k, az in enumerate((45.0, 225.0)):
            cid = f"{site}-{k}"
            rows.append({"cell_id": cid, "site_id": site, "x_m": x, "y_m": y, "lat": 53.0 + y / 111e3, "lon": -6.0 + x / 67e3,
                         "azimuth_deg": az, "height_m": 25.0, "tx_power_dbm": 43.0, "freq_mhz": 1800.0,
                         "location_estimated": False, "cell_shard": cell_shard_of(cid, N_SHARDS),
                         "frame_lat0": 53.0, "frame_lon0": -6.0})
    return pd.DataFrame(rows)


def _mdt(cells: pd.DataFrame, cell_ids: list[str], n_per: int, day: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reports served by `cell_ids` (n_per per window) on `day`, with serving + nearest-neighbour rows."""
    rng = np.random.default_rng(seed)
    by_id = cells.set_index("cell_id")
    reports, meas = [], []
    for cid in cell_ids:
        c = by_id.loc[cid]
        for w, window in enumerate(WINDOWS):
            ang = np.deg2rad(90.0 - c.azimuth_deg) + rng.normal(0, 0.5, n_per)
            dist_m = rng.uniform(50, 900, n_per)
            xs, ys = c.x_m + dist_m * np.cos(ang), c.y_m + dist_m * np.sin(ang)
            for i in range(n_per):
                rid = f"{day}-{cid}-{window}-{i}"
                ts = pd.Timestamp(f"{day}T{1 + 12 * w:02d}:00:00Z")
                d_all = np.hypot(cells["x_m"] - xs[i], cells["y_m"] - ys[i]).to_numpy() + 1.0
                rsrp = -40.0 - 30.0 * np.log10(d_all) + rng.normal(0, 2.0, len(cells))
                rho = float(rng.uniform(0.1, 0.9))
                reports.append({"report_id": rid, "ue_id": f"ue{i}", "ts": ts, "window": window, "x_m": xs[i], "y_m": ys[i],
                                "serving_cell_id": cid, "rsrp_dbm": float(np.clip(rsrp[cells.index[cells.cell_id == cid][0]], -140, -44)),
                                "rsrq_db": float(-8.0 - 6.0 * rho), "load_rho": rho, "cell_shard": int(c.cell_shard),
                                "ingest_run_id": day})
                order = [j for j in np.argsort(-rsrp) if cells.cell_id.iloc[j] != cid][:2]
                for rank, j in enumerate([cells.index[cells.cell_id == cid][0], *order]):
                    meas.append({"report_id": rid, "ts": ts, "window": window, "cell_id": cells.cell_id.iloc[j],
                                 "role": "serving" if rank == 0 else "neighbour", "rank": rank,
                                 "rsrp_dbm": float(np.clip(rsrp[j], -140, -44)), "rsrq_db": float(-8.0 - 6.0 * rho) if rank == 0 else None,
                                 "x_m": xs[i], "y_m": ys[i], "load_rho": rho, "cell_shard": int(cells.cell_shard.iloc[j])})
    return pd.DataFrame(reports), pd.DataFrame(meas)


# ------------------------------------------------------------------------------ change detection
def test_changed_cells_names_appended_cells_and_flags_rewrites(tmp_path):
    lake = Lake(tmp_path / "lake")
    cells = _cells()
    rep, _ = _mdt(cells, list(cells.cell_id), 3, "2026-01-05", seed=0)
    v0 = lake.write("mdt_reports", rep)
    target = "s2-1"
    shard = int(cells.set_index("cell_id").loc[target, "cell_shard"])
    new, _ = _mdt(cells, [target], 2, "2026-01-06", seed=1)
    v1 = lake.write("mdt_reports", new[new["window"] == "h12_24"])
    assert changed_cells(lake, "mdt_reports", v0, cell_col="serving_cell_id") == {("h12_24", shard): {target}}
    # A rewrite of one partition (files removed): every cell in it may have changed.
    lake.write("mdt_reports", rep[(rep.window == "h00_12") & (rep.cell_shard == 0)].iloc[:1], mode="overwrite",
               predicate="window = 'h00_12' AND cell_shard = 0")
    assert changed_cells(lake, "mdt_reports", v1, cell_col="serving_cell_id") == {("h00_12", 0): None}
    assert changed_cells(lake, "mdt_reports", None, cell_col="serving_cell_id", until_version=v0) == {
        (w, s): None for w in WINDOWS for s in sorted(set(cells.cell_shard))}


def test_changed_model_partitions_spreads_window_free_rows_over_windows(tmp_path):
    lake = Lake(tmp_path / "lake")
    base = pd.DataFrame({"cell_id": ["a", "b"], "target": ["rsrp", "rsrp"], "window": [None, None], "n_train": [5, 5],
                         "elbo": [1.0, 1.0], "val_mae": [1.0, 1.0], "pooled": [False, False], "path": ["p/0", "p/1"],
                         "source_version": [0, 0], "cell_shard": [0, 1], "run_id": ["r1", "r1"]})
    v0 = lake.write("radio_models", base)
    lake.write("radio_models", base.iloc[1:].assign(run_id="r2"), mode="overwrite", predicate="cell_id = 'b'")
    assert changed_model_partitions(lake, "radio_models", v0, windows=list(WINDOWS)) == {("h00_12", 1), ("h12_24", 1)}


# ----------------------------------------------------------------------------- whole stages
@pytest.mark.slow
def test_incremental_run_retrains_only_the_changed_partition(tmp_path, ray_session):
    from cellsynth_testkit import local_runtime, test_config
    from cellsynth.pipeline import run_pipeline

    cfg = test_config(
        tmp_path, ingest={"n_cell_shards": N_SHARDS, "windows": {"kind": "hour_of_day", "hours_per_window": 12}},
        density={"student": False, "bandwidth_grid_m": (50.0, 100.0, 200.0)},
        radio={"n_steps": 60, "min_measurements": 20},
        generate={"n_neighbours": 2, "neighbour_candidates": 4},
    )
    rt = local_runtime(tmp_path, cfg)
    cells = _cells()
    rep, meas = _mdt(cells, list(cells.cell_id), 40, "2026-01-05", seed=0)
    rt.lake.write("cells", cells)
    rt.lake.write("mdt_reports", rep)
    rt.lake.write("mdt_measurements", meas)
    stages = ["density", "radio", "generate"]
    try:
        full_id, _ = run_pipeline(rt, stages=stages)
        kde0, radio0 = rt.lake.read_pandas("kde_models"), rt.lake.read_pandas("radio_models")
        syn0 = rt.lake.read_pandas("synthetic_mdt")
        files0 = set(rt.lake.file_uris("synthetic_mdt"))

        # An operator's daily append: one new day for one cell, in one window, serving rows only.
        target = "s1-0"
        shard = int(cells.set_index("cell_id").loc[target, "cell_shard"])
        new_rep, new_meas = _mdt(cells, [target], 40, "2026-01-06", seed=7)
        new_rep, new_meas = new_rep[new_rep.window == "h00_12"], new_meas[(new_meas.window == "h00_12") & (new_meas.role == "serving")]
        rt.lake.write("mdt_reports", new_rep)
        rt.lake.write("mdt_measurements", new_meas)

        inc_id, results = run_pipeline(rt, stages=stages, incremental=True)
        by = {r.stage: r for r in results}
        assert not any(r.skipped for r in results)
        kde1, radio1 = rt.lake.read_pandas("kde_models"), rt.lake.read_pandas("radio_models")

        # kde_models: exactly one row per (window, cell); only (h00_12, target) and h00_12's area refit.
        assert not kde1.duplicated(["window", "cell_id"]).any()
        assert set(zip(kde1.window, kde1.cell_id)) == set(zip(kde0.window, kde0.cell_id))
        refit = set(zip(kde1.loc[kde1.run_id == inc_id, "window"], kde1.loc[kde1.run_id == inc_id, "cell_id"]))
        assert refit == {("h00_12", target), ("h00_12", "__area__")}
        key = ["window", "cell_id"]
        kept0 = kde0.set_index(key).drop(index=list(refit)).sort_index()
        kept1 = kde1.set_index(key).drop(index=list(refit)).sort_index()
        pd.testing.assert_frame_equal(kept0, kept1)
        assert set(kept1["run_id"]) == {full_id}
        new_row = kde1.set_index(key).loc[("h00_12", target)]
        old_row = kde0.set_index(key).loc[("h00_12", target)]
        assert new_row["n_reports"] > old_row["n_reports"]  # the new day is in the refit

        # radio_models: one row per (cell, target); only the target cell retrained.
        assert not radio1.duplicated(["cell_id", "target"]).any()
        assert set(radio1.loc[radio1.run_id == inc_id, "cell_id"]) == {target}
        rk = ["cell_id", "target"]
        pd.testing.assert_frame_equal(radio0[radio0.cell_id != target].set_index(rk).sort_index(),
                                      radio1[radio1.cell_id != target].set_index(rk).sort_index())
        # The retrained cell takes its shard's calibration from the shard's last fit (s3-1 shares its shard
        # and keeps its model); its own fit is new (radio/stage.py KEEP_SHARD_CALIBRATION).
        from cellsynth.radio.model import FittedCells, shard_calibration

        mate = "s3-1"
        assert int(cells.set_index("cell_id").loc[mate, "cell_shard"]) == shard
        for tgt in ("rsrp", "rsrq"):
            row = radio1.set_index(rk).loc[(target, tgt)]
            assert not row["pooled"]
            mine = FittedCells.load(rt.lake.local_dir(row["path"].rsplit("/", 1)[0]) / row["path"].rsplit("/", 1)[1])
            mate_path = radio1.set_index(rk).loc[(mate, tgt), "path"]
            theirs = FittedCells.load(rt.lake.local_dir(mate_path.rsplit("/", 1)[0]) / mate_path.rsplit("/", 1)[1])
            got, want = shard_calibration(mine), shard_calibration(theirs)
            assert got is not None and want is not None
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
            old_theta = FittedCells.load(rt.lake.local_dir(radio0.set_index(rk).loc[(target, tgt), "path"].rsplit("/", 1)[0])
                                         / radio0.set_index(rk).loc[(target, tgt), "path"].rsplit("/", 1)[1])
            i_old, i_new = old_theta.index_of(np.array([target]))[0], mine.index_of(np.array([target]))[0]
            assert mine.n_train[i_new] > old_theta.n_train[i_old]  # refitted on the new day's rows too

        # synthetic_mdt: only the target's shard rewritten (every window: its radio model spans
        # them), every other shard's rows untouched. h00_12's area density was refit (the new day
        # is 12.5% of its reports), so its positions are drawn again: the shard regenerated whole.
        # h12_24's area was kept, so its positions are reused (`generate/reuse.py`): only the rows
        # the target serves are regenerated, at the same positions; the shard's other rows stay.
        syn1 = rt.lake.read_pandas("synthetic_mdt")
        other0 = syn0[syn0.cell_shard != shard].sort_values("sample_id").reset_index(drop=True)
        other1 = syn1[syn1.cell_shard != shard].sort_values("sample_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(other0, other1)
        mine1 = syn1[syn1.cell_shard == shard]
        assert set(mine1.loc[mine1.window == "h00_12", "run_id"]) == {inc_id}
        kept = mine1[mine1.window == "h12_24"]
        fresh = kept.serving_cell_id == target
        assert fresh.sum() > 10 and set(kept.loc[fresh, "run_id"]) == {inc_id}
        assert set(kept.loc[~fresh, "run_id"]) == {full_id} and (~fresh).sum() > 10
        old = syn0[(syn0.cell_shard == shard) & (syn0.window == "h12_24")].set_index("sample_id")
        pd.testing.assert_frame_equal(kept[~fresh].set_index("sample_id").sort_index(), old.loc[kept.sample_id[~fresh]].sort_index())
        again = old.loc[kept.sample_id[fresh]]  # same ids and positions, new radio values
        assert (again.serving_cell_id == target).all()
        np.testing.assert_array_equal(kept[fresh].set_index("sample_id").loc[again.index, ["x_m", "y_m"]].to_numpy(),
                                      again[["x_m", "y_m"]].to_numpy())
        assert not np.allclose(kept[fresh].set_index("sample_id").loc[again.index, "rsrp_dbm"].to_numpy(), again.rsrp_dbm.to_numpy())
        # Byte-identical: the untouched partitions are the very same Parquet files, not rewrites.
        files1 = set(rt.lake.file_uris("synthetic_mdt"))
        in_shard = f"cell_shard={shard}/"
        assert {f for f in files0 if in_shard not in f} == {f for f in files1 if in_shard not in f}
        assert not {f for f in files1 if in_shard in f} & files0
        assert set(syn1.loc[syn1.cell_shard != shard, "run_id"]) == {full_id}

        # The registry says what was retrained and what was skipped.
        reg = rt.registry.latest(20)
        notes = dict(zip(reg.loc[reg.run_id == inc_id, "stage"], reg.loc[reg.run_id == inc_id, "note"]))
        assert "retrained 1 of 8 (window, cell_shard) partitions" in notes["density"]
        assert f"h00_12/{shard}" in notes["density"] and "skipped 7 unchanged" in notes["density"]
        assert "1 changed cells" in notes["radio"]
        assert "2 (target, shard) calibrations taken from the shard's last fit" in notes["radio"]
        assert f"reused the positions of 1 windows: regenerated {int(fresh.sum())} rows" in notes["generate"]
        assert by["radio"].metrics["cells_trained"] == 1.0

        # Nothing new: every stage skips.
        _, again = run_pipeline(rt, stages=stages, incremental=True)
        assert all(r.skipped for r in again)
    finally:
        rt.close()


# ------------------------------------------------------------------------------ radio retrain rule
def _changes(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["report_id", "cell_id", "role", "change"])


def test_retrain_rule_counts_by_hand():
    from cellsynth.incremental import retrain_rule

    changes = _changes(
        [(f"r{i}", "a", "neighbour", 1) for i in range(3)]      # 3 of 20 = 15%: retrain
        + [(f"r{i}", "b", "neighbour", 1) for i in range(3)]    # 3 of 100 = 3%: keep
        + [("r0", "c", "serving", 1)]                           # serving row of a big cell: retrain
        + [("r1", "d", "neighbour", 1)]                         # no model yet: retrain
        + [("r5", "e", "neighbour", -1), ("r6", "e", "neighbour", -1)]  # 2 removed of 10: retrain
    )
    n_train = {"a": 20, "b": 100, "c": 1000, "e": 10}
    # test_fraction ~0: every changed row is held-in, so the counts above are the held-in counts.
    retrain, kept = retrain_rule(changes, n_train, min_changed_share=0.1, test_fraction=1e-12, seed=0)
    assert set(retrain) == {"a", "c", "d", "e"}
    assert retrain["c"] == "serving rows changed" and retrain["d"] == "no model yet"
    assert kept == {"b": "3 held-in rows changed, 3.0% of 100 < 0.1"}
    # Threshold 0: any change retrains every touched cell.
    retrain0, kept0 = retrain_rule(changes, n_train, min_changed_share=0.0, test_fraction=1e-12, seed=0)
    assert set(retrain0) == {"a", "b", "c", "d", "e"} and kept0 == {}
    # Held-out rows never train: a neighbour-only change made only of them is kept at any threshold > 0.
    retrain1, kept1 = retrain_rule(changes, n_train, min_changed_share=0.1, test_fraction=1 - 1e-12, seed=0)
    assert set(retrain1) == {"c", "d"} and set(kept1) == {"a", "b", "e"}


def _meas_rows(serving: str, neighbours: list[str], n: int, prefix: str, cells: pd.DataFrame) -> pd.DataFrame:
    """n reports of `serving` in window h00_12, each with one row per neighbour in `neighbours`."""
    shard = dict(zip(cells.cell_id, cells.cell_shard))
    rows = []
    for i in range(n):
        for rank, cid in enumerate([serving, *neighbours]):
            rows.append({"report_id": f"{prefix}-{i}", "ts": pd.Timestamp("2026-01-05T01:00:00Z"), "window": "h00_12",
                         "cell_id": cid, "role": "serving" if rank == 0 else "neighbour", "rank": rank,
                         "rsrp_dbm": -90.0, "rsrq_db": -10.0 if rank == 0 else None, "x_m": 10.0 * i, "y_m": 0.0,
                         "load_rho": 0.5, "cell_shard": int(shard[cid])})
    return pd.DataFrame(rows)


def _radio_rows(cells: pd.DataFrame, n_train: dict[str, int], version: int, run_id: str) -> pd.DataFrame:
    return pd.DataFrame([{"cell_id": c, "target": t, "window": None, "n_train": n_train[c], "elbo": 0.0, "val_mae": 1.0,
                          "pooled": False, "path": f"models/radio/{run_id}/{t}", "source_version": version,
                          "cell_shard": int(s), "run_id": run_id}
                         for c, s in zip(cells.cell_id, cells.cell_shard) for t in ("rsrp", "rsrq")])


def test_radio_plan_retrains_material_cells_only_and_adds_up_kept_changes(tmp_path):
    """Planner on a small lake (no training): which cells an append retrains, which it keeps and
    why, and that kept changes count again in the next run (against each model's own version)."""
    from cellsynth_testkit import local_runtime, test_config
    from cellsynth.incremental import plan_incremental
    from cellsynth.pipeline import load_stage
    from cellsynth.stages import spec_of

    cfg = test_config(tmp_path, ingest={"n_cell_shards": N_SHARDS, "windows": {"kind": "hour_of_day", "hours_per_window": 12}},
                      split={"test_fraction": 1e-12})  # ~0: every row is held-in, counts are by hand
    rt = local_runtime(tmp_path, cfg)
    lake, mod = rt.lake, load_stage("radio")
    cells = _cells()
    shard = dict(zip(cells.cell_id, cells.cell_shard))
    lake.write("cells", cells)
    v0 = lake.write("mdt_measurements", _meas_rows("s0-0", ["s1-0"], 5, "day0", cells))
    n_train = {c: 1000 for c in cells.cell_id} | {"s0-0": 10}
    lake.write("radio_models", _radio_rows(cells, n_train, v0, "r0"))
    config_hash = spec_of(mod).config_hash(cfg)

    def succeed(run_id: str) -> dict:
        inputs = {t: lake.version(t) for t in mod.INPUTS}
        rec = rt.registry.start(run_id, "radio", config_hash, inputs)
        rt.registry.succeed(rec, {"radio_models": lake.version("radio_models")}, {})
        return inputs

    succeed("r0")
    # Append: 4 reports served by s1-0 heard by s0-0 (4 of 10 rows: retrain) and s3-1 (4 of 1000: keep).
    v1 = lake.write("mdt_measurements", _meas_rows("s1-0", ["s0-0", "s3-1"], 4, "day1", cells))
    inputs = {t: lake.version(t) for t in mod.INPUTS}
    plan = plan_incremental(spec_of(mod), rt, config_hash, inputs)
    windows = ["h00_12", "h12_24"]
    assert plan.cells == {"s1-0", "s0-0"}
    assert plan.partitions == {(w, shard[c]) for c in ("s1-0", "s0-0") for w in windows}
    assert plan.skipped_cells == {"s3-1": "4 held-in rows changed, 0.4% of 1000 < 0.1"}
    assert "s3-1 (4 held-in rows changed, 0.4% of 1000 < 0.1)" in plan.note()
    assert "retrained 2 of 8 cells" in plan.note()

    # Threshold 0: every touched cell.
    cfg0 = cfg.model_copy(update={"run": cfg.run.model_copy(update={"incremental_min_changed_share": 0.0})})
    rt0 = local_runtime(tmp_path, cfg0)
    plan0 = plan_incremental(spec_of(mod), rt0, config_hash, inputs)
    assert plan0.cells == {"s1-0", "s0-0", "s3-1"} and plan0.skipped_cells == {}

    # The run retrains the two (their models now read v1); s3-1 keeps its v0 model.
    models = lake.read_pandas("radio_models")
    redone = models["cell_id"].isin(["s1-0", "s0-0"])
    lake.write("radio_models", models[redone].assign(source_version=v1, run_id="r1"), mode="overwrite",
               predicate="cell_id IN ('s1-0', 's0-0')")
    succeed("r1")
    # Next day: 100 more rows heard by s3-1: 104 of 1000 since its model's version, so now it retrains.
    lake.write("mdt_measurements", _meas_rows("s2-0", ["s3-1"], 100, "day2", cells).query("cell_id == 's3-1'"))
    plan2 = plan_incremental(spec_of(mod), rt, config_hash, {t: lake.version(t) for t in mod.INPUTS})
    assert plan2.cells == {"s3-1"} and plan2.skipped_cells == {}
    assert plan2.partitions == {(w, shard["s3-1"]) for w in windows}


def test_radio_plan_under_threshold_skips_the_stage_with_the_reason(tmp_path):
    from cellsynth_testkit import local_runtime, test_config
    from cellsynth.pipeline import load_stage, run_stage
    from cellsynth.stages import spec_of

    cfg = test_config(tmp_path, ingest={"n_cell_shards": N_SHARDS, "windows": {"kind": "hour_of_day", "hours_per_window": 12}},
                      split={"test_fraction": 1e-12})
    rt = local_runtime(tmp_path, cfg)
    lake, mod = rt.lake, load_stage("radio")
    cells = _cells()
    lake.write("cells", cells)
    v0 = lake.write("mdt_measurements", _meas_rows("s0-0", ["s1-0"], 5, "day0", cells))
    lake.write("radio_models", _radio_rows(cells, dict.fromkeys(cells.cell_id, 1000), v0, "r0"))
    rec = rt.registry.start("r0", "radio", spec_of(mod).config_hash(cfg), {t: lake.version(t) for t in mod.INPUTS})
    rt.registry.succeed(rec, {"radio_models": lake.version("radio_models")}, {})
    # Neighbour rows only, 3 of 1000 for s2-1: nothing to retrain, no actor started.
    lake.write("mdt_measurements", _meas_rows("s0-0", ["s2-1"], 3, "day1", cells).query("role == 'neighbour'"))
    result = run_stage("radio", rt, run_id="r1", incremental=True)
    assert result.skipped and rt._ray is None
    assert "s2-1 (3 held-in rows changed, 0.3% of 1000 < 0.1)" in result.note
    reg = rt.registry.latest(5)
    assert reg.loc[reg.run_id == "r1", "status"].item() == "skipped"
    assert "run.incremental_min_changed_share=0.1" in reg.loc[reg.run_id == "r1", "note"].item()


def test_changed_rows_skip_a_compaction_and_cancel_out_a_rewrite(tmp_path):
    from cellsynth.lake.changes import changed_rows

    lake = Lake(tmp_path / "lake")
    cells = _cells()
    lake.write("mdt_measurements", _meas_rows("s0-0", ["s1-0"], 3, "a", cells))
    v1 = lake.write("mdt_measurements", _meas_rows("s0-0", ["s1-0"], 2, "b", cells))
    lake.optimize("mdt_measurements")  # rewrites files, keeps every row
    # a compaction: the commit log says no row moved, so no partition changed and no file is read
    assert changed_rows(lake, "mdt_measurements", v1, columns=["report_id", "cell_id", "role"]) == {}
    # a rewrite that keeps every row but is no compaction (an overwrite) cancels out row by row
    lake.write("mdt_measurements", lake.read_pandas("mdt_measurements"), mode="overwrite")
    after = changed_rows(lake, "mdt_measurements", v1, columns=["report_id", "cell_id", "role"])
    assert after and all(rows is not None and rows.empty for rows in after.values())
    # An append is read from its own files only: exactly the 2 x 2 new rows.
    v3 = lake.write("mdt_measurements", _meas_rows("s0-0", ["s1-0"], 2, "c", cells))
    new = changed_rows(lake, "mdt_measurements", v3 - 1, columns=["report_id", "cell_id", "role"], until_version=v3)
    got = pd.concat(new.values()).sort_values(["report_id", "cell_id"]).reset_index(drop=True)
    assert got.to_dict("list") == {"report_id": ["c-0", "c-0", "c-1", "c-1"], "cell_id": ["s0-0", "s1-0"] * 2,
                                   "role": ["serving", "neighbour"] * 2, "change": [1, 1, 1, 1]}


def test_density_plan_refits_the_area_density_only_of_materially_changed_windows(tmp_path):
    from cellsynth_testkit import local_runtime, test_config
    from cellsynth.incremental import IncrementalPlan, area_windows
    from cellsynth.stages import AreaRefit

    cfg = test_config(tmp_path, ingest={"n_cell_shards": N_SHARDS, "windows": {"kind": "hour_of_day", "hours_per_window": 12}},
                      split={"test_fraction": 1e-12})  # ~0: every report is held-in, counts are by hand
    rt = local_runtime(tmp_path, cfg)
    lake = rt.lake
    cells = _cells()
    rep, _ = _mdt(cells, list(cells.cell_id), 3, "2026-01-05", seed=0)
    v0 = lake.write("mdt_reports", rep)
    # Area rows as density writes them: h00_12 fit on 100 reports, h12_24 on 1000.
    area = pd.DataFrame({"window": list(WINDOWS), "cell_id": "__area__", "bandwidth_m": 100.0, "n_reports": [100, 1000],
                         "x_min_m": 0.0, "x_max_m": 1.0, "y_min_m": 0.0, "y_max_m": 1.0, "centroid_x_m": 0.5,
                         "centroid_y_m": 0.5, "bandwidth_source": "nll", "path": "p", "source_version": v0,
                         "cell_shard": -1, "run_id": "r0"})
    lake.write("kde_models", area)
    # One new day of 20 reports per window for s1-0: 20% of h00_12's area, 2% of h12_24's.
    new, _ = _mdt(cells, ["s1-0"], 20, "2026-01-06", seed=1)
    lake.write("mdt_reports", new)
    rule = AreaRefit(table="mdt_reports", models="kde_models")
    refit, kept = area_windows(rt, rule, set(WINDOWS))
    assert refit == {"h00_12"}
    assert kept == {"h12_24": "20 held-in reports changed, 2.0% of 1000 < 0.1"}
    plan = IncrementalPlan({("h00_12", 0)}, {"s1-0"}, "", 8, "r0")
    plan.kept_areas = kept
    assert "kept the area density of h12_24 (20 held-in reports changed, 2.0% of 1000 < 0.1)" in plan.note()
    # Threshold 0: any change refits.
    cfg0 = cfg.model_copy(update={"run": cfg.run.model_copy(update={"incremental_min_changed_share": 0.0})})
    assert area_windows(local_runtime(tmp_path, cfg0), rule, set(WINDOWS)) == (set(WINDOWS), {})


def test_small_incremental_jobs_get_fewer_actors(tmp_path):
    from cellsynth_testkit import test_config
    from cellsynth.incremental import IncrementalPlan, fewer_actors

    cfg = test_config(tmp_path, runtime={"ray": {"num_cpus": 4, "n_actors": 3}})
    cells = lambda n: IncrementalPlan({("w", 0)}, {f"c{i}" for i in range(n)}, "")  # noqa: E731
    assert fewer_actors(cfg, cells(9)).runtime.ray.n_actors == 1       # ceil(9 / 32)
    assert fewer_actors(cfg, cells(40)).runtime.ray.n_actors == 2      # ceil(40 / 32)
    assert fewer_actors(cfg, cells(500)) is cfg                        # capped at n_actors: unchanged
    assert fewer_actors(cfg, IncrementalPlan({("w", 0)}, None, "")) is cfg  # every cell of the partitions
    # radio splits each group of cells into an RSRP and an RSRQ job: two actors for 9 cells
    assert fewer_actors(cfg, cells(9), jobs_per_group=2).runtime.ray.n_actors == 2


def test_radio_jobs_split_targets_only_for_small_jobs():
    from cellsynth.radio.stage import TARGETS, _jobs

    shards = [0, 3, 5, 9]
    # full runs: one shard with both targets per job, handed to whichever actor is free (no
    # straggler holding a fixed share; each finished job is a checkpoint a rerun keeps)
    assert _jobs(shards, 1) == [([0], TARGETS), ([3], TARGETS), ([5], TARGETS), ([9], TARGETS)]
    assert _jobs(shards, 2) == _jobs(shards, 1)
    assert _jobs(shards, 2, n_cells=500) == _jobs(shards, 2)
    # a small (incremental) job on two or more actors: one target per actor
    assert _jobs(shards, 2, n_cells=9) == [(shards, ("rsrp",)), (shards, ("rsrq",))]
    assert _jobs(shards, 1, n_cells=9) == _jobs(shards, 1)
    # every (shard, target) exactly once, whatever the actor count
    for n in (1, 2, 3, 4, 7, 16):
        for n_cells in (None, 9, 500):
            pairs = sorted((s, t) for group, targets in _jobs(shards, n, n_cells=n_cells) for s in group for t in targets)
            assert pairs == sorted((s, t) for s in shards for t in TARGETS)


def test_generate_deals_shards_into_at_most_one_task_per_cpu():
    from cellsynth.generate.stage import _shard_groups

    # 9 changed shards on 2 CPUs: two tasks (each loads the radio models once), every shard once.
    groups = _shard_groups([3, 6, 7, 9, 17, 21, 24, 26, 27], 2)
    assert groups == [[3, 7, 17, 24, 27], [6, 9, 21, 26]]
    assert _shard_groups([5], 8) == [[5]]
    assert _shard_groups([1, 2, 3], 0) == [[1, 2, 3]]


# ------------------------------------------------------------------------------ split-safe reruns
@pytest.mark.slow
def test_after_a_seed_change_no_evaluated_row_was_in_a_models_training_set(tmp_path, ray_session):
    """`run --set run.seed=7` redraws the train/test split (split.seed unset): every model that
    evaluate scores must have been trained on the new held-in rows, or evaluate scores models on
    rows they were trained on. (Before the stage contract, density and radio were skipped.)"""
    from cellsynth_testkit import local_runtime, test_config
    from cellsynth.pipeline import run_pipeline
    from cellsynth.splits import random_test_mask

    sections = dict(
        ingest={"n_cell_shards": N_SHARDS, "windows": {"kind": "hour_of_day", "hours_per_window": 12}},
        density={"student": False, "bandwidth_grid_m": (50.0, 100.0, 200.0)},
        radio={"n_steps": 40, "min_measurements": 20},
        generate={"n_neighbours": 2, "neighbour_candidates": 4, "use_ray": False},
        privacy={"publish_despite_guard": True},
        evaluate={"baselines": ("knn",), "downsampling": (0.9,), "refit_n_steps": 20, "fingerprint_trees": 10,
                  "max_test_rows": 500, "max_fingerprint_train_rows": 1000, "max_privacy_rows": 500},
    )
    stages = ["density", "radio", "generate", "evaluate"]
    rt = local_runtime(tmp_path, test_config(tmp_path, run={"seed": 42}, **sections))
    cells = _cells()
    rep, meas = _mdt(cells, list(cells.cell_id), 30, "2026-01-05", seed=0)
    rt.lake.write("cells", cells)
    rt.lake.write("mdt_reports", rep)
    rt.lake.write("mdt_measurements", meas)
    run42, _ = run_pipeline(rt, stages=stages)
    rt.close()
    rt = local_runtime(tmp_path, test_config(tmp_path, run={"seed": 7}, **sections))
    try:
        run7, results = run_pipeline(rt, stages=stages)
        fraction = rt.cfg.split.test_fraction
        ids = rep["report_id"].to_numpy()
        evaluated = random_test_mask(ids, test_fraction=fraction, seed=7)
        metrics = rt.lake.read_pandas("metrics")
        n_test = metrics.query("stage == 'evaluate' and metric == 'n_reports' and split == 'test'")["value"]
        assert n_test.tolist() == [float(evaluated.sum())]
        seed_of = {run42: 42, run7: 7}
        for table in ("kde_models", "radio_models", "synthetic_mdt"):
            for run_id in sorted(set(rt.lake.read_pandas(table, columns=["run_id"])["run_id"])):
                trained_on = ~random_test_mask(ids, test_fraction=fraction, seed=seed_of[run_id])
                leaked = int((evaluated & trained_on).sum())
                assert leaked == 0, f"{table} of run {run_id}: {leaked} evaluated reports were in its training rows"
        assert not any(r.skipped for r in results)
    finally:
        rt.close()


# ------------------------------------------------------------------------------ reproducible
@pytest.mark.slow
def test_an_incremental_run_is_reproducible(tmp_path, ray_session):
    """Same lake, same append, same seed: two incremental runs (one with two Ray actors, one with
    one) write the same rows. An incremental run trains on a subset of partitions and a subset of
    actors, so any seed drawn from the actor, the order of partitions or the order rows come out
    of the lake shows here, where a full run would hide it."""
    from cellsynth_testkit import local_runtime, tables_that_differ, test_config
    from cellsynth.pipeline import run_pipeline

    stages = ["density", "radio", "generate", "evaluate"]
    cells = _cells()
    rep, meas = _mdt(cells, list(cells.cell_id), 30, "2026-01-05", seed=0)
    target = "s1-0"
    new_rep, new_meas = _mdt(cells, [target, "s3-1"], 30, "2026-01-06", seed=7)
    new_rep, new_meas = new_rep[new_rep.window == "h00_12"], new_meas[new_meas.window == "h00_12"]

    def run(root, n_actors: int):
        cfg = test_config(
            root, runtime={"ray": {"num_cpus": 2, "n_actors": n_actors, "cpus_per_actor": 0.5}},
            ingest={"n_cell_shards": N_SHARDS, "windows": {"kind": "hour_of_day", "hours_per_window": 12}},
            density={"student": False, "bandwidth_grid_m": (50.0, 100.0, 200.0)},
            radio={"n_steps": 40, "min_measurements": 20},
            generate={"n_neighbours": 2, "neighbour_candidates": 4},
            privacy={"publish_despite_guard": True},
            evaluate={"baselines": ("knn",), "downsampling": (0.9,), "refit_n_steps": 20, "fingerprint_trees": 10,
                      "max_test_rows": 300, "max_fingerprint_train_rows": 600, "max_privacy_rows": 300},
        )
        rt = local_runtime(root, cfg)
        try:
            rt.lake.write("cells", cells)
            rt.lake.write("mdt_reports", rep)
            rt.lake.write("mdt_measurements", meas)
            run_pipeline(rt, stages=stages)
            rt.lake.write("mdt_reports", new_rep)
            rt.lake.write("mdt_measurements", new_meas)
            inc_id, results = run_pipeline(rt, stages=stages, incremental=True)
        finally:
            rt.close()
        assert not any(r.skipped for r in results[:3])  # density, radio, generate retrained something
        return rt.lake, inc_id

    a, inc_a = run(tmp_path / "a", 2)
    b, _ = run(tmp_path / "b", 1)
    radio = a.read_pandas("radio_models")
    assert target in set(radio.loc[radio.run_id == inc_a, "cell_id"])  # the append was retrained
    names = ["kde_models", "radio_models", "synthetic_mdt", "metrics"]
    differ = tables_that_differ(a, b, names)
    assert not differ, f"tables differ between two incremental runs of the same seed and input: {differ}"
