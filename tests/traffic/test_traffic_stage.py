"""Traffic stage end to end on the simulator's traffic (small sizes): one Ray trainer, the
synthetic_traffic table, held-out-cell scores that beat the per-hour-of-week mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth_testkit import local_runtime
from cellsynth_testkit import test_config as make_test_config
from cellsynth.config import ScenarioConfig
from cellsynth.errors import StageError
from cellsynth.geo import LocalFrame
from cellsynth.schemas import cell_shard_of
from cellsynth.traffic import TrafficDiffusion
from cellsynth.traffic import stage as traffic_stage
from cellsynth.windows import window_of

N_SHARDS = 4


def _lake_inputs(rt, cfg) -> pd.DataFrame:
    """cells, traffic and a stand-in kde_models (report counts per window and cell) from the simulator."""
    from cellsynth.scenario.simulate import simulate

    sc = simulate(ScenarioConfig(n_sites=14, n_reports=4000, area_km=5.0), windows=cfg.ingest.windows,
                  map_resolution_m=100.0, seed=11)
    frame = LocalFrame.around(sc.cells["latitude"], sc.cells["longitude"])
    cells = sc.cells.merge(sc.cells_xy_m, on="cell_id")
    shard = [cell_shard_of(c, N_SHARDS) for c in cells["cell_id"]]
    rt.lake.write("cells", cells.rename(columns={"latitude": "lat", "longitude": "lon"}).assign(
        location_estimated=False, cell_shard=shard, frame_lat0=frame.lat0, frame_lon0=frame.lon0,
    )[["cell_id", "site_id", "x_m", "y_m", "lat", "lon", "azimuth_deg", "height_m", "tx_power_dbm", "freq_mhz",
       "location_estimated", "cell_shard", "frame_lat0", "frame_lon0"]])
    traffic = sc.traffic.assign(ts=pd.to_datetime(sc.traffic["timestamp"], utc=True))
    rt.lake.write("traffic", traffic.assign(
        window=window_of(traffic["ts"], cfg.ingest.windows), load_rho=traffic["prb_util_pct"] / 100.0,
        cell_shard=[cell_shard_of(c, N_SHARDS) for c in traffic["cell_id"]],
    ).drop(columns=["timestamp"]))
    mdt = sc.mdt.assign(ts=pd.to_datetime(sc.mdt["timestamp"], utc=True, errors="coerce")).dropna(subset=["ts"])
    mdt = mdt[mdt["serving_cell_id"].isin(cells["cell_id"])]
    counts = mdt.assign(window=window_of(mdt["ts"], cfg.ingest.windows)).groupby(["window", "serving_cell_id"]).size()
    kde = counts.rename("n_reports").reset_index().rename(columns={"serving_cell_id": "cell_id"})
    rt.lake.write("kde_models", kde.assign(
        bandwidth_m=100.0, x_min_m=0.0, x_max_m=0.0, y_min_m=0.0, y_max_m=0.0, centroid_x_m=0.0, centroid_y_m=0.0,
        bandwidth_source="nll", path="", source_version=0, cell_shard=[cell_shard_of(c, N_SHARDS) for c in kde["cell_id"]],
        run_id="stand-in",
    ))
    return traffic


@pytest.mark.slow
@pytest.mark.e2e
def test_stage_on_simulator_beats_hour_of_week_mean(tmp_path, ray_session):
    cfg = make_test_config(
        tmp_path, ingest={"n_cell_shards": N_SHARDS},
        traffic={"n_steps": 400, "hidden_channels": 32, "n_blocks": 3, "diffusion_steps": 50, "sampling_steps": 25,
                 "n_samples_per_cell": 4, "holdout_fraction": 0.25, "evaluate_unconditional": False},
    )
    rt = local_runtime(tmp_path, cfg)
    traffic = _lake_inputs(rt, cfg)
    n_cells = traffic["cell_id"].nunique()

    result = traffic_stage.run(cfg, rt, run_id="t1")

    synth = rt.lake.read_pandas("synthetic_traffic")
    assert len(synth) == n_cells * 4 * 168 == result.rows_written["synthetic_traffic"]
    assert synth["load_rho"].between(0.0, 1.0).all()
    np.testing.assert_allclose(synth["load_rho"], synth["prb_util_pct"] / 100.0)
    assert synth.groupby("cell_id")["sample_id"].nunique().eq(4).all()
    # Samples of one cell differ from each other: the spread is visible.
    spread = synth.groupby(["cell_id", "ts"])["traffic_mb"].std()
    assert (spread > 0).mean() > 0.9

    metrics = rt.lake.read_pandas("metrics")
    held = metrics[(metrics.stage == "traffic") & (metrics.split == "holdout_cells")].set_index(["metric", "model"])["value"]
    for metric in ("jsd", "crps_mb", "profile_mae_mb", "profile_rmse_mb", "acf24_error", "peak_hour_error_h"):
        for model in ("diffusion", "hour_of_week_mean", "nearest_context"):
            assert np.isfinite(held[(metric, model)]), (metric, model)
    assert held[("jsd", "diffusion")] < held[("jsd", "hour_of_week_mean")]
    assert held[("crps_mb", "diffusion")] < held[("crps_mb", "hour_of_week_mean")]

    # Weights were saved without pickle and load back.
    model = TrafficDiffusion.load(result.artifacts["traffic_model"])
    assert model.context_dim_ > 0
    assert all(p.endswith(".png") for k, p in result.artifacts.items() if k != "traffic_model")

    # A rerun with the same run_id writes nothing.
    before = {t: rt.lake.version(t) for t in ("synthetic_traffic", "metrics")}
    again = traffic_stage.run(cfg, rt, run_id="t1")
    assert again.skipped and {t: rt.lake.version(t) for t in before} == before


def test_stage_names_missing_inputs(tmp_path):
    cfg = make_test_config(tmp_path)
    rt = local_runtime(tmp_path, cfg)
    with pytest.raises(StageError, match="traffic: input table\\(s\\) traffic, cells missing"):
        traffic_stage.run(cfg, rt, run_id="x")


def test_stage_skips_when_the_inputs_have_no_traffic_counters(tmp_path):
    cfg = make_test_config(tmp_path)
    rt = local_runtime(tmp_path, cfg)
    rt.lake.write("cells", pd.DataFrame({
        "cell_id": ["a"], "x_m": [0.0], "y_m": [0.0], "lat": [44.0], "lon": [11.0], "location_estimated": [True],
        "cell_shard": [0], "frame_lat0": [44.0], "frame_lon0": [11.0],
    }))
    result = traffic_stage.run(cfg, rt, run_id="x")
    assert result.skipped and "no traffic counters" in result.note
    assert not rt.lake.exists("synthetic_traffic")


class _FakeRay:
    def __init__(self, gpus: float):
        self.gpus = gpus

    def cluster_resources(self) -> dict:
        return {"CPU": 2.0, "GPU": self.gpus} if self.gpus else {"CPU": 2.0}


def test_the_trainer_asks_ray_for_a_gpu_when_the_device_is_cuda_and_the_cluster_has_one():
    # Ray hides GPUs from tasks that request none, so runtime.device auto must turn into a request.
    assert traffic_stage.gpu_request(_FakeRay(1.0), 0.0, want_gpu=True) == pytest.approx(1.0)
    assert traffic_stage.gpu_request(_FakeRay(1.0), 0.25, want_gpu=True) == pytest.approx(0.25)
    assert traffic_stage.gpu_request(_FakeRay(0.0), 0.0, want_gpu=True) == pytest.approx(0.0)  # would wait forever
    assert traffic_stage.gpu_request(_FakeRay(1.0), 0.5, want_gpu=False) == pytest.approx(0.0)
