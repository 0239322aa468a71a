"""Transforms: cell-weeks from hourly counters, context features, PRB line, synthetic rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth.config import WindowConfig
from cellsynth.errors import SchemaError
from cellsynth.schemas import spec
from cellsynth.traffic import transforms as tf


def _hourly(cell_id: str, start: str, values: np.ndarray) -> pd.DataFrame:
    ts = pd.date_range(start, periods=len(values), freq="h", tz="UTC")
    return pd.DataFrame({"cell_id": cell_id, "ts": ts, "traffic_mb": values})


def test_weekly_matrix_aligns_to_monday_fills_gaps_and_drops_thin_weeks():
    # 2026-01-05 is a Monday. Cell a: two full weeks; one hour missing in week 1 is interpolated.
    a = _hourly("a", "2026-01-05", np.arange(336.0) + 1.0).drop(index=[10])
    # Cell b starts Wednesday: its first week has 120 of 168 hours (< 90 %) and is dropped.
    b = _hourly("b", "2026-01-07", np.ones(120 + 168))
    cells, weeks, values = tf.weekly_matrix(pd.concat([a, b]))
    assert list(cells) == ["a", "a", "b"]
    assert [pd.Timestamp(w) for w in weeks] == [pd.Timestamp(d, tz="UTC") for d in ("2026-01-05", "2026-01-12", "2026-01-12")]
    np.testing.assert_allclose(values[0], np.arange(168.0) + 1.0)  # hour 10 -> linear fill = 11
    np.testing.assert_allclose(values[1], np.arange(168.0, 336.0) + 1.0)


def test_weekly_matrix_names_missing_column():
    with pytest.raises(SchemaError, match="traffic: column 'traffic_mb' missing"):
        tf.weekly_matrix(pd.DataFrame({"cell_id": ["a"], "ts": [pd.Timestamp("2026-01-05", tz="UTC")]}))


def test_site_layout_features_by_hand():
    cells = pd.DataFrame({
        "cell_id": ["A1", "A2", "B1", "C1"], "site_id": ["A", "A", "B", "C"],
        "x_m": [0.0, 0.0, 300.0, 0.0], "y_m": [0.0, 0.0, 0.0, 1500.0], "azimuth_deg": [90.0, 270.0, 0.0, 180.0],
    })
    f = tf.site_layout_features(cells)
    assert f.loc["A1", "n_sites_within_500_m"] == 1  # B only (own site excluded)
    assert f.loc["A1", "n_sites_within_2000_m"] == 2
    assert f.loc["A1", "nearest_site_m"] == pytest.approx(300.0)
    assert f.loc["C1", "nearest_site_m"] == pytest.approx(1500.0)  # A, not B at hypot(300, 1500)
    # Centre = median of sites (0, 0), (300, 0), (0, 1500) = (0, 0): B1 is 300 m east of it.
    assert f.loc["B1", "centre_distance_m"] == pytest.approx(300.0)
    # C1 points south (180 deg), straight at the centre; B1 points north, perpendicular to it.
    assert f.loc["C1", "faces_centre_cos"] == pytest.approx(1.0)
    assert f.loc["B1", "faces_centre_cos"] == pytest.approx(0.0, abs=1e-12)


def test_user_density_and_external_context():
    cells = pd.DataFrame({"cell_id": ["a", "b"], "x_m": [0.0, 500.0], "y_m": [0.0, 0.0]})
    kde = pd.DataFrame({"window": ["h00_06", "h06_12", "h06_12", "all"], "cell_id": ["a", "a", "b", "__area__"],
                        "n_reports": [1, 3, 9, 100]})
    ext = pd.DataFrame({"cell_id": ["b"], "population": [1200.0]})
    ctx = tf.cell_context(cells, kde_models=kde, windows=["h00_06", "h06_12"], external=ext)
    assert ctx.loc["a", "log_reports"] == pytest.approx(np.log1p(4))
    assert ctx.loc["a", "report_share_h06_12"] == pytest.approx(0.75)
    assert ctx.loc["b", "report_share_h00_06"] == pytest.approx(0.0)
    assert ctx.loc["b", "ext_population"] == 1200.0 and np.isnan(ctx.loc["a", "ext_population"])
    with pytest.raises(SchemaError, match="external context: column 'kind' is not numeric"):
        tf.cell_context(cells, external=pd.DataFrame({"cell_id": ["a"], "kind": ["mall"]}))


def test_cells_nothing_locates_get_only_the_external_columns():
    # a traffic-only lake (no cells table): the counters' cells, with no column or the external ones
    bare = tf.external_only_context(["b", "a"])
    assert list(bare.index) == ["b", "a"] and bare.shape == (2, 0)
    ctx = tf.external_only_context(["a", "b"], pd.DataFrame({"cell_id": ["b", "z"], "population": [1200.0, 5.0]}))
    assert list(ctx.columns) == ["ext_population"] and list(ctx.index) == ["a", "b"]
    assert ctx.loc["b", "ext_population"] == 1200.0 and np.isnan(ctx.loc["a", "ext_population"])
    with pytest.raises(SchemaError, match="column 'kind' is not numeric"):
        tf.external_only_context(["a"], pd.DataFrame({"cell_id": ["a"], "kind": ["mall"]}))


def test_prb_line_and_synthetic_rows_keep_load_in_range():
    traffic = pd.DataFrame({"cell_id": ["a"] * 3 + ["b"] * 3, "traffic_mb": [0.0, 100.0, 200.0, 0.0, 10.0, 20.0],
                            "prb_util_pct": [5.0, 25.0, 45.0, 0.0, 50.0, 100.0]})
    lines, pooled = tf.prb_maps(traffic, {"a"})
    assert lines == {"a": (pytest.approx(0.2), pytest.approx(5.0))}
    assert pooled == (pytest.approx(0.2), pytest.approx(5.0))
    samples = np.stack([np.full((2, 168), 100.0), np.full((2, 168), 1000.0)])  # a: prb 25; new: 205 -> clipped
    frame = tf.synthetic_frame(np.array(["a", "new"], dtype=object), samples, week_start=pd.Timestamp("2026-01-05", tz="UTC"),
                               windows=WindowConfig(), prb_lines=lines, pooled_line=pooled, n_cell_shards=4, run_id="r")
    assert len(frame) == 2 * 2 * 168
    # least squares on this CPU's BLAS gives 0.25 to the last bit or so (OPENBLAS_CORETYPE=Haswell: 0.25000000000000006)
    assert np.allclose(frame.loc[frame.cell_id == "a", "load_rho"], 0.25, rtol=0, atol=1e-12)
    assert np.allclose(frame.loc[frame.cell_id == "new", "load_rho"], 1.0, rtol=0, atol=1e-12)
    assert frame["load_rho"].between(0.0, 1.0).all()
    first = frame.iloc[:8]
    assert list(first["window"]) == ["h00_06"] * 6 + ["h06_12"] * 2
    assert sorted(frame["sample_id"].unique()) == [0, 1]
    spec("synthetic_traffic").conform(__import__("pyarrow").Table.from_pandas(frame, preserve_index=False))


def test_prb_without_counters_uses_capacity_proxy():
    traffic = pd.DataFrame({"cell_id": ["a"] * 101, "traffic_mb": np.arange(101.0), "prb_util_pct": np.nan})
    lines, pooled = tf.prb_maps(traffic, {"a"})
    assert lines == {} and pooled == (pytest.approx(100.0 / 99.0), 0.0)


def test_fifteen_minute_counters_become_hourly_volumes_and_mean_utilisation():
    # LTE PM counters come in 15-minute periods: the weekly matrix averaged an hour's four periods, so
    # every synthetic "hourly" volume was a quarter of an hour's traffic
    t0 = pd.Timestamp("2026-01-05T08:00:00Z")
    quarters = [t0 + pd.Timedelta(minutes=15 * i) for i in range(8) if i != 5]  # 09:15 missing
    fine = pd.DataFrame({"cell_id": "A", "ts": quarters, "traffic_mb": [1.0, 2.0, 3.0, 4.0, 10.0, 30.0, 40.0],
                         "prb_util_pct": [10.0, 20.0, 30.0, 40.0, 50.0, 70.0, 80.0]})
    hourly = pd.DataFrame({"cell_id": "B", "ts": [t0, t0 + pd.Timedelta(hours=1)], "traffic_mb": [5.0, 6.0],
                           "prb_util_pct": [15.0, 25.0]})
    got = tf.hourly_counters(pd.concat([fine, hourly], ignore_index=True)).sort_values(["cell_id", "ts"])
    a = got[got["cell_id"] == "A"]
    assert a["ts"].tolist() == [t0, t0 + pd.Timedelta(hours=1)]
    # 08:00: 1+2+3+4; 09:00 has three periods: their mean x 4 (the missing quarter is not read as silence)
    assert a["traffic_mb"].tolist() == pytest.approx([10.0, (10.0 + 30.0 + 40.0) / 3 * 4])
    assert a["prb_util_pct"].tolist() == pytest.approx([25.0, (50.0 + 70.0 + 80.0) / 3])
    pd.testing.assert_frame_equal(got[got["cell_id"] == "B"].reset_index(drop=True), hourly)
    # hourly input passes through untouched
    assert tf.hourly_counters(hourly) is hourly
