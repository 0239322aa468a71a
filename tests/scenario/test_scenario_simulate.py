"""The simulator's output: physics visible in the data, dirt labelled exactly, truth consistent
with the sampled reports, traffic driven by the density."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth.config import ScenarioConfig, WindowConfig
from cellsynth.geo import LocalFrame
from cellsynth.scenario import simulate
from cellsynth.scenario._world import build_world
from cellsynth.schemas import RSRP_RANGE_DBM, RSRQ_RANGE_DB

SMALL = dict(n_sites=8, area_km=3.0, n_reports=20_000, truth_fine_grid_m=25.0)
WINDOWS = WindowConfig()
RES_M = 100.0


@pytest.fixture(scope="module")
def scenario():
    return simulate(ScenarioConfig(**SMALL), windows=WINDOWS, map_resolution_m=RES_M, seed=7)


@pytest.fixture(scope="module")
def clean(scenario):
    reports = scenario.truth["reports"]
    keep = ~reports["is_dirty"].to_numpy()
    return scenario.mdt[keep].reset_index(drop=True), reports[keep].reset_index(drop=True)


def _cell_geometry(scenario, frame_rows: pd.DataFrame) -> pd.DataFrame:
    cells = scenario.cells.merge(scenario.cells_xy_m, on="cell_id")
    g = frame_rows.merge(cells[["cell_id", "x_m", "y_m", "azimuth_deg", "height_m"]], on="cell_id", suffixes=("", "_cell"))
    dx, dy = g["x_m"] - g["x_m_cell"], g["y_m"] - g["y_m_cell"]
    g["d2d_m"] = np.hypot(dx, dy)
    g["off_deg"] = np.abs((np.degrees(np.arctan2(dx, dy)) - g["azimuth_deg"] + 180.0) % 360.0 - 180.0)
    return g


def test_rsrp_slope_with_distance_is_38901_nlos():
    cfg = ScenarioConfig(**{**SMALL, "n_reports": 500}, los=False, umi_fraction=0.0)
    sc = simulate(cfg, windows=WINDOWS, map_resolution_m=50.0, seed=3)
    g = _cell_geometry(sc, sc.truth["rsrp_grid"])
    sel = g[(g["off_deg"] < 30) & (g["d2d_m"] > 200) & (g["d2d_m"] < 1000)]
    assert len(sel) > 500
    slope = np.polyfit(np.log10(np.hypot(sel["d2d_m"], sel["height_m"] - 1.5)), sel["rsrp_median_dbm"], 1)[0]
    # TR 38.901 UMa NLOS: 39.08 dB per decade of 3-D distance (shadowing averages out).
    assert slope == pytest.approx(-39.08, abs=2.0)


def test_back_lobe_is_30_db_below_boresight(scenario):
    g = _cell_geometry(scenario, scenario.truth["rsrp_grid"])
    ring = g[(g["d2d_m"] > 100) & (g["d2d_m"] < 400)]
    front = ring[ring["off_deg"] < 15]["rsrp_median_dbm"].mean()
    back = ring[ring["off_deg"] > 165]["rsrp_median_dbm"].mean()
    # TR 38.901 A_m = 30 dB front-to-back; same distances, shadowing has zero mean.
    assert front - back == pytest.approx(30.0, abs=2.5)


def test_shadowing_correlation_at_decorrelation_distance():
    cfg = ScenarioConfig(**SMALL, decorrelation_m=50.0, site_shadowing_share=0.8)
    world = build_world(cfg, windows=WINDOWS, seed=11)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1500, 1500, 20_000), rng.uniform(-1500, 1500, 20_000)
    ang = rng.uniform(0, 2 * np.pi, 20_000)
    cells = np.zeros(20_000, dtype=int)
    s0 = world.radio.shadowing_db(x, y, cells)
    s50 = world.radio.shadowing_db(x + 50 * np.cos(ang), y + 50 * np.sin(ang), cells)
    assert np.std(s0) == pytest.approx(cfg.shadowing_sigma_db, rel=0.1)
    assert np.corrcoef(s0, s50)[0, 1] == pytest.approx(np.exp(-1.0), abs=0.06)
    # Sectors of one site share 80 % of the shadowing variance; other sites share none.
    mate = world.radio.shadowing_db(x, y, cells + 1)
    other = world.radio.shadowing_db(x, y, cells + cfg.sectors_per_site)
    assert np.corrcoef(s0, mate)[0, 1] == pytest.approx(0.8, abs=0.05)
    assert abs(np.corrcoef(s0, other)[0, 1]) < 0.05


def test_serving_cell_is_the_strongest_in_most_reports(clean):
    _, truth = clean
    share = (truth["serving_cell_id"] == truth["true_serving_cell_id"]).mean()
    assert 0.75 < share < 1.0  # hysteresis noise makes some UEs camp on the second best


def test_load_degrades_rsrq(clean):
    mdt, truth = clean
    rsrq, load = mdt["serving_rsrq_db"].to_numpy(), truth["load_rho"].to_numpy()
    low, high = load < np.quantile(load, 0.25), load > np.quantile(load, 0.75)
    assert rsrq[high].mean() < rsrq[low].mean() - 1.0
    assert pd.Series(rsrq).corr(pd.Series(load), method="spearman") < -0.2


def test_clean_rows_are_valid_reports(scenario, clean):
    mdt, truth = clean
    assert mdt["serving_rsrp_dbm"].between(*RSRP_RANGE_DBM).all()
    assert mdt["serving_rsrq_db"].between(*RSRQ_RANGE_DB).all()
    assert (mdt["serving_rsrp_dbm"] == np.round(mdt["serving_rsrp_dbm"])).all()
    assert (mdt["serving_rsrq_db"] * 2 == np.round(mdt["serving_rsrq_db"] * 2)).all()
    ts = pd.to_datetime(mdt["timestamp"], format="%Y-%m-%dT%H:%M:%SZ", utc=True)
    assert ts.min() >= pd.Timestamp("2026-01-05", tz="UTC") and ts.max() < pd.Timestamp("2026-01-12", tz="UTC")
    assert ts.is_monotonic_increasing
    known = set(scenario.cells["cell_id"])
    assert mdt["serving_cell_id"].isin(known).all()
    # Positions round-trip through the frame ingest derives from cells.csv.
    frame = LocalFrame.around(scenario.cells["latitude"].to_numpy(), scenario.cells["longitude"].to_numpy())
    x, y = frame.to_xy(mdt["latitude"].to_numpy(), mdt["longitude"].to_numpy())
    assert np.max(np.hypot(x - truth["x_m"], y - truth["y_m"])) < 0.05
    b = scenario.manifest["area_bounds_m"]
    assert (x >= b["x_min"] - 0.1).all() and (x <= b["x_max"] + 0.1).all()
    # Neighbours: detectable, not the serving cell, strongest first.
    n_cols = [f"neighbour_{k}_rsrp_dbm" for k in range(1, 5)]
    nb = mdt[n_cols].to_numpy()
    assert np.nanmin(nb) >= -124
    assert (np.nan_to_num(np.diff(nb, axis=1), nan=-1.0) <= 0).all()
    for k in range(1, 5):
        assert (mdt[f"neighbour_{k}_cell_id"] != mdt["serving_cell_id"]).all()
        assert (mdt[f"neighbour_{k}_cell_id"].isna() == mdt[f"neighbour_{k}_rsrp_dbm"].isna()).all()


def test_dirt_is_labelled_exactly_one_kind_per_row(scenario, clean):
    mdt, truth = scenario.mdt, scenario.truth["reports"]
    kinds = truth["dirt_kind"].value_counts().to_dict()
    assert kinds == {k: v for k, v in scenario.manifest["dirt"].items() if v}
    n_clean_rows = len(clean[0])
    # dirt_fraction of the clean draw is dirtied (in place or as an extra copy).
    assert sum(kinds.values()) == round(0.03 * (n_clean_rows + sum(v for k, v in kinds.items() if k != "duplicate")))
    assert set(kinds) == set(ScenarioConfig().dirt_kinds)
    by = {k: mdt[truth["dirt_kind"].to_numpy() == k] for k in kinds}
    assert by["missing_value"]["serving_rsrp_dbm"].isna().all()
    assert by["missing_value"][["latitude", "longitude"]].notna().all().all()
    assert by["missing_position"][["latitude", "longitude"]].isna().all().all()
    assert by["missing_position"]["serving_rsrp_dbm"].notna().all()
    assert (by["rsrp_out_of_range"]["serving_rsrp_dbm"] == -200).all()
    assert pd.to_datetime(by["bad_timestamp"]["timestamp"], format="%Y-%m-%dT%H:%M:%SZ", errors="coerce").isna().all()
    assert not by["unknown_cell"]["serving_cell_id"].isin(set(scenario.cells["cell_id"])).any()
    assert (by["outside_area"]["latitude"] > scenario.cells["latitude"].max() + 0.4).all()
    assert (by["swapped_latlon"]["latitude"] < 20).all()  # Bologna: lon 11.3 now sits in the lat column
    # A duplicate is an exact copy of the clean row just before it.
    dup_rows = np.nonzero(truth["dirt_kind"].to_numpy() == "duplicate")[0]
    pd.testing.assert_frame_equal(mdt.iloc[dup_rows].reset_index(drop=True), mdt.iloc[dup_rows - 1].reset_index(drop=True))
    assert not truth["is_dirty"].to_numpy()[dup_rows - 1].any()


def test_true_maps_are_distributions_that_match_the_reports(scenario, clean):
    maps = scenario.truth["spatial_maps"]
    sums = maps.groupby(["window", "cell_id"])["prob"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)
    assert set(maps["window"]) == {"h00_06", "h06_12", "h12_18", "h18_24"}
    _, truth = clean
    # Empirical maps of the busiest cells (all windows, 300 m blocks) vs the exact maps mixed by
    # each window's report count; a map that ignores the density (uniform over the same support)
    # must fit clearly worse, so the check can fail.
    block = 3
    for cell, n in truth["serving_cell_id"].value_counts().head(3).items():
        sel = truth[truth["serving_cell_id"] == cell]
        emp = (sel.assign(bx=np.floor(sel["x_m"] / RES_M).astype(int) // block,
                          by=np.floor(sel["y_m"] / RES_M).astype(int) // block)
               .groupby(["bx", "by"]).size() / n)
        per_window = sel["window"].value_counts() / n
        m = maps[maps["cell_id"] == cell].assign(w=lambda d: d["window"].map(per_window).fillna(0.0))
        m = m.assign(p=m["prob"] * m["w"], bx=m["gx"] // block, by=m["gy"] // block)
        exact = m.groupby(["bx", "by"])["p"].sum()
        support = m[m["prob"] > 1e-4].groupby(["bx", "by"]).size()
        uniform = support / support.sum()
        tv_exact = 0.5 * emp.sub(exact, fill_value=0.0).abs().sum()
        tv_uniform = 0.5 * emp.sub(uniform, fill_value=0.0).abs().sum()
        # Sampling noise alone gives TV ~ sqrt(blocks / n) / 2.
        assert tv_exact < 0.5 * np.sqrt(len(exact) / n) + 0.03, (cell, n, tv_exact)
        assert tv_exact < 0.6 * tv_uniform, (cell, tv_exact, tv_uniform)


def test_traffic_follows_profiles_and_load_matches_counters(scenario):
    traffic = scenario.traffic.merge(scenario.cells[["cell_id", "profile"]], on="cell_id")
    assert traffic["prb_util_pct"].between(0, 100).all()
    load = scenario.truth["load"]
    np.testing.assert_allclose(load["load_rho"].to_numpy() * 100.0, scenario.traffic["prb_util_pct"].to_numpy(), atol=1e-9)
    ts = pd.to_datetime(traffic["timestamp"], utc=True)
    weekday = ts.dt.dayofweek < 5
    day = weekday & ts.dt.hour.between(10, 15)
    evening = weekday & ts.dt.hour.between(19, 22)
    night = ts.dt.hour.between(2, 4)
    for profile, busy, quiet in (("business", day, evening), ("residential", evening, day)):
        rows = traffic["profile"] == profile
        if rows.sum() == 0:
            continue
        assert traffic.loc[rows & busy, "prb_util_pct"].mean() > traffic.loc[rows & quiet, "prb_util_pct"].mean()
    assert traffic.loc[night, "prb_util_pct"].mean() < traffic.loc[day | evening, "prb_util_pct"].mean()
    assert set(scenario.cells["profile"]) <= {"residential", "business", "mixed"}
