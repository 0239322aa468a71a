"""The notebook facade: `MDTSynthesizer(config).fit(mdt_df, cells_df).sample(n, window=...)`,
save/load, on a small simulated DataFrame (no lake, Spark or Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

SITES = {"a": (0.0, 0.0), "b": (1500.0, 0.0), "c": (750.0, 1300.0)}
WINDOWS = ("h00_12", "h12_24")


def _world(n_per_cell: int = 80, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """2 sectors per site; each report hears its serving cell and the 2 next-strongest cells.
    RSRP = -40 - 30 log10(d) + N(0, 2) dB; RSRQ = -8 - 6 rho on the serving cell."""
    rng = np.random.default_rng(seed)
    cells = pd.DataFrame([{"cell_id": f"{s}-{k}", "x_m": x, "y_m": y, "azimuth_deg": az}
                          for s, (x, y) in SITES.items() for k, az in enumerate((60.0, 240.0))])
    rows = []
    for cid, cx, cy, az in cells.itertuples(index=False):
        for window in WINDOWS:
            ang = np.deg2rad(90.0 - az) + rng.normal(0, 0.5, n_per_cell)
            dist = rng.uniform(50, 700, n_per_cell)
            for i in range(n_per_cell):
                x, y = cx + dist[i] * np.cos(ang[i]), cy + dist[i] * np.sin(ang[i])
                d = np.hypot(cells.x_m - x, cells.y_m - y).to_numpy() + 1.0
                rsrp = -40.0 - 30.0 * np.log10(d) + rng.normal(0, 2.0, len(cells))
                rho = float(rng.uniform(0.1, 0.9))
                serving = int(np.flatnonzero(cells.cell_id == cid)[0])
                others = [j for j in np.argsort(-rsrp) if j != serving][:2]
                for rank, j in enumerate([serving, *others]):
                    rows.append({"report_id": f"{cid}-{window}-{i}", "window": window, "cell_id": cells.cell_id[j],
                                 "role": "serving" if rank == 0 else "neighbour",
                                 "rsrp_dbm": float(np.clip(np.round(rsrp[j]), -140, -44)),
                                 "rsrq_db": -8.0 - 6.0 * rho if rank == 0 else np.nan, "x_m": x, "y_m": y,
                                 "load_rho": rho})
    return pd.DataFrame(rows), cells


CONFIG = {"radio": {"n_steps": 60, "min_measurements": 20},
          "generate": {"n_neighbours": 2, "neighbour_candidates": 4},
          "density": {"bandwidth_grid_m": (50.0, 100.0, 200.0)}}


@pytest.fixture(scope="module")
def fitted():
    import torch

    from cellsynth import MDTSynthesizer

    torch.set_num_threads(1)
    mdt, cells = _world()
    return MDTSynthesizer(CONFIG).fit(mdt, cells), mdt, cells


def test_fit_trains_the_stage_models_on_the_held_in_split(fitted):
    from cellsynth.config import config_from_dict
    from cellsynth.density.model import kde_from_config
    from cellsynth.splits import held_out

    synth, mdt, _ = fitted
    cfg = config_from_dict(CONFIG)
    serving = mdt[mdt.role == "serving"]
    train = serving[~held_out(cfg, serving.report_id.to_numpy())]
    assert synth.windows == list(WINDOWS)
    for (window, cell_id), rows in train.groupby(["window", "cell_id"]):
        kde = synth.density_.kde(window, cell_id)
        assert kde.n_reports_ == len(rows)  # held-in reports only
        # the density stage's own KDE settings and seed give the same bandwidth
        same = kde_from_config(cfg.density, seed=cfg.run.seed, window=window, cell_id=cell_id)
        assert kde.bandwidth_m_ == pytest.approx(same.fit(rows[["x_m", "y_m"]].to_numpy()).bandwidth_m_)
    assert set(synth.radio_.cells("rsrp")) == set(mdt.cell_id)


def test_sample_draws_reports_in_the_window_close_to_the_real_ones(fitted):
    synth, mdt, cells = fitted
    out = synth.sample(600, window="h12_24", rng=3)
    assert len(out) == 600 and set(out.window) == {"h12_24"}
    assert set(out.serving_cell_id) <= set(cells.cell_id)
    assert out.rsrp_dbm.between(-140, -44).all() and out.rsrq_db.between(-34, 2.5).all()  # ingest's ranges
    assert (out.rsrp_dbm_epistemic_std > 0).all()
    # the simulated noise is N(0, 2 dB) plus 1 dB rounding (0.29 dB): the aleatoric std recovers it
    assert out.rsrp_dbm_aleatoric_std.median() == pytest.approx(2.0, abs=0.4)
    real = mdt[(mdt.role == "serving") & (mdt.window == "h12_24")]
    # same field, same density: the mean serving RSRP agrees within 3 dB (real spread ~10 dB)
    assert out.rsrp_dbm.mean() == pytest.approx(real.rsrp_dbm.mean(), abs=3.0)
    both = synth.sample(301, rng=3)
    assert len(both) == 301 and set(both.window) == set(WINDOWS)


def test_save_load_round_trip_samples_the_same_rows(fitted, tmp_path):
    from cellsynth import MDTSynthesizer

    synth, _, _ = fitted
    synth.save(tmp_path / "model")
    again = MDTSynthesizer.load(tmp_path / "model")
    pd.testing.assert_frame_equal(synth.sample(200, window="h00_12", rng=5), again.sample(200, window="h00_12", rng=5))


def test_sample_of_zero_gives_no_rows_with_the_columns_and_a_bad_n_names_it(fitted):
    # sample(0) raised pandas' "No objects to concatenate", sample(-5) numpy's "negative dimensions"
    from cellsynth.errors import ConfigError

    synth, _, _ = fitted
    columns = list(synth.sample(3, rng=0).columns)
    for window in (None, "h12_24"):
        empty = synth.sample(0, window=window, rng=0)
        assert len(empty) == 0 and list(empty.columns) == columns
    for bad in (-5, 2.5, "10", True):
        with pytest.raises(ConfigError, match=r"^sample: n: expected a whole number >= 0, got "):
            synth.sample(bad, rng=0)
    assert len(synth.sample(np.int64(2), rng=0)) == 2


def test_misuse_raises_one_clear_line():
    from cellsynth import MDTSynthesizer
    from cellsynth.errors import NotFittedError, SchemaError

    with pytest.raises(NotFittedError, match=r"MDTSynthesizer is not fitted; call fit\(\) first"):
        MDTSynthesizer().sample(10)
    mdt, cells = _world(n_per_cell=3)
    with pytest.raises(SchemaError, match=r"mdt_df: column 'rsrp_dbm' missing"):
        MDTSynthesizer(CONFIG).fit(mdt.drop(columns="rsrp_dbm"), cells)


def test_drive_tests_without_load_still_get_synthetic_rsrq():
    """No load on any row (drive tests without traffic counters): RSRQ is modelled from position alone
    (before, no RSRQ model was fitted and every synthetic rsrq_db was null)."""
    import torch

    from cellsynth import MDTSynthesizer

    torch.set_num_threads(1)
    mdt, cells = _world(n_per_cell=30, seed=1)
    mdt["load_rho"] = np.nan
    # the default load scenario ("observed") has no load to read: generated at generate.load_rho, no error
    synth = MDTSynthesizer(CONFIG).fit(mdt, cells, progress=False)
    assert synth.radio_.cells("rsrq") and not synth.radio_.uses_load("rsrq")
    out = synth.sample(200, rng=0)
    # RSRQ = -8 - 6 rho, rho ~ U(0.1, 0.9) unseen: mean -11, sd 1.4 dB
    assert out.rsrq_db.notna().all() and out.rsrq_db.mean() == pytest.approx(-11.0, abs=1.0)
    assert np.allclose(out.load_rho, 0.5)
    # the unseen load is noise to this model: the total predictive std near its 1.4 dB (40 rows a cell
    # split it between epistemic and aleatoric as they can)
    assert np.median(np.hypot(out.rsrq_db_aleatoric_std, out.rsrq_db_epistemic_std)) == pytest.approx(1.4, abs=0.6)


def test_fit_and_sample_run_torch_on_the_configured_threads_and_restore_the_callers(monkeypatch):
    """The fits loop over small tensors: torch's one thread per core made them slower on 2 cores, so
    fit and sample use runtime.torch_threads, as the pipeline's workers do, and give the setting back."""
    import torch

    from cellsynth import MDTSynthesizer

    seen = []
    original = MDTSynthesizer._fit_radio

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(MDTSynthesizer, "_fit_radio", staticmethod(spy))
    mdt, cells = _world(n_per_cell=25, seed=2)
    synth = MDTSynthesizer({**CONFIG, "runtime": {"torch_threads": 1}})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        synth.fit(mdt, cells, progress=False)
        assert seen == [1] and torch.get_num_threads() == 2
        synth.sample(20, rng=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_serving_only_rows_sample_the_serving_cell_only(tmp_path):
    # without any neighbour row the detection maps report none: the neighbour columns were all null
    import torch

    from cellsynth import MDTSynthesizer

    torch.set_num_threads(1)
    mdt, cells = _world(n_per_cell=40, seed=1)
    synth = MDTSynthesizer(CONFIG).fit(mdt[mdt.role == "serving"], cells)
    out = synth.sample(200, rng=0)
    assert len(out) == 200 and not [c for c in out.columns if c.startswith("neighbour_")]
    synth.save(tmp_path / "m")
    again = MDTSynthesizer.load(tmp_path / "m").sample(200, rng=0)
    pd.testing.assert_frame_equal(out, again)


def test_sample_takes_a_generator_as_rng(fitted):
    # STYLE: randomness comes in as a seed or a Generator; a Generator raised TypeError (int(Generator))
    synth, _, _ = fitted
    a = synth.sample(40, rng=np.random.default_rng(5))
    pd.testing.assert_frame_equal(a, synth.sample(40, rng=np.random.default_rng(5)))
    assert not synth.sample(40, rng=np.random.default_rng(6))["x_m"].equals(a["x_m"])
    from cellsynth.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^sample: window: unknown window 'h99' \(have: "):
        synth.sample(5, window="h99")
