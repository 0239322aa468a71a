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
    from cellsynth.cluster.testing import local_runtime, test_config
    from cellsynth.pipeline import run_pipeline

    cfg = test_config(
        tmp_path, ingest={"n_cell_shards": N_SHARDS, "windows": {"kind": "hour_of_day", "hours_per_window": 12}},
        density={"student": False, "bandwidth_grid_m": (50.0, 100.0, 200.0)},
        radio={"n_steps": 60, "n_weight_samples": 8, "min_measurements": 20},
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

        # synthetic_mdt: the target's shard regenerated (every window: its radio model spans them),
        # every other shard's rows untouched.
        syn1 = rt.lake.read_pandas("synthetic_mdt")
        other0 = syn0[syn0.cell_shard != shard].sort_values("sample_id").reset_index(drop=True)
        other1 = syn1[syn1.cell_shard != shard].sort_values("sample_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(other0, other1)
        assert set(syn1.loc[syn1.cell_shard == shard, "run_id"]) == {inc_id}
        assert set(syn1.loc[syn1.cell_shard != shard, "run_id"]) == {full_id}

        # The registry says what was retrained and what was skipped.
        reg = rt.registry.latest(20)
        notes = dict(zip(reg.loc[reg.run_id == inc_id, "stage"], reg.loc[reg.run_id == inc_id, "note"]))
        assert "retrained 1 of 8 (window, cell_shard) partitions" in notes["density"]
        assert f"h00_12/{shard}" in notes["density"] and "skipped 7 unchanged" in notes["density"]
        assert "1 changed cells" in notes["radio"]
        assert by["radio"].metrics["cells_trained"] == 1.0

        # Nothing new: every stage skips.
        _, again = run_pipeline(rt, stages=stages, incremental=True)
        assert all(r.skipped for r in again)
    finally:
        rt.close()
