"""DEEPMEND student: the physics layout prior, the zero-start correction, CV gating, Ray training."""

import numpy as np
import pandas as pd
import pytest
import torch

from ._density_synth import layout, reports
from cellsynth.density import _student as S
from cellsynth.density._grid import square_of


def _two_cells() -> pd.DataFrame:
    # Two omni cells 1 km apart on the x axis, identical parameters.
    return pd.DataFrame({"cell_id": ["a", "b"], "site_id": ["A", "B"], "x_m": [0.0, 1000.0], "y_m": [0.0, 0.0],
                         "azimuth_deg": [np.nan, np.nan]})


def test_log_association_is_a_softmax_over_the_cells_in_reach():
    rsrp = np.array([[[-80.0]], [[-86.0]], [[-92.0]]])  # (K=3, 1, 1)
    got = np.exp(S.PatchGrid.log_association(rsrp, 0, 6.0))[0, 0]
    # Hand computation: 1 / (1 + e^-1 + e^-2).
    assert got == pytest.approx(1.0 / (1.0 + np.exp(-1.0) + np.exp(-2.0)), rel=1e-12)


def test_prior_splits_the_midline_evenly_between_twin_cells():
    grid = S.PatchGrid(_two_cells(), resolution_m=100.0, patch_px=16, neighbour_radius_m=3000.0)
    rsrp, own = grid.rsrp_patch(0)
    la = np.exp(grid.log_association(rsrp, own, 6.0))
    px, _ = grid.centres(0)
    # Squares centred at x = 450 and 550 m mirror each other about the midline x = 500 m.
    left, right = la[px == 450.0], la[px == 550.0]
    np.testing.assert_allclose(left + right, 1.0, atol=1e-9)
    assert (left > 0.5).all() and (right < 0.5).all()


def test_untrained_student_reproduces_the_prior_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, S.N_CHANNELS, 16, 16)).astype(np.float32)
    prior = rng.dirichlet(np.ones(256), size=3).reshape(3, 16, 16)
    state = S.train_student(x, np.log(prior).astype(np.float32), prior, n_epochs=0, seed=0)
    np.testing.assert_allclose(S.predict_student(state, x, np.log(prior).astype(np.float32)), prior, rtol=1e-5, atol=1e-9)


def _measured_maps(cells: pd.DataFrame, n: int = 3000) -> dict[str, pd.DataFrame]:
    rep = reports(cells, n)
    out = {}
    for cell_id, g in rep.groupby("serving_cell_id"):
        gx, gy = square_of(g["x_m"], 100.0), square_of(g["y_m"], 100.0)
        m = pd.DataFrame({"gx": gx, "gy": gy}).value_counts().rename("prob").reset_index()
        out[cell_id] = m.assign(prob=m["prob"] / m["prob"].sum())
    return out


def test_teacher_student_maps_sum_to_one_and_gate_on_training_cells_only():
    cells = layout(4)
    measured = _measured_maps(cells)
    held = {"s0c0", "s3c2"}
    calls = []

    def trainer(data, jobs):
        calls.append([len(j["rows"]) for j in jobs])
        assert len(data["inputs"]) == len(data["targets"]) == calls[-1][-1]  # the shared arrays: every training cell once
        return S.serial_trainer(data, jobs)

    out = S.teacher_student_maps(cells, measured, resolution_m=100.0, patch_px=16, neighbour_radius_m=2000.0,
                                 beta_grid=(2.0, 4.0), holdout_cells=held, n_epochs=5, min_mass=0.0, seed=0,
                                 temperature_grid_db=(3.0, 6.0), n_folds=2, trainer=trainer)
    n_train = len([c for c in measured if c not in held])
    # Two CV folds + the final fit, all in one trainer call; the final fit sees every training cell.
    assert len(calls) == 1 and len(calls[0]) == 3 and calls[0][-1] == n_train
    assert sum(calls[0][:-1]) == n_train  # each training cell is held out by exactly one fold
    assert out["temperature_db"] in (3.0, 6.0)
    for method in ("prior", "student"):
        sums = [m["prob"].sum() for m in out[method].values()]
        np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    assert set(out["student"]) == set(cells["cell_id"])


@pytest.mark.slow
def test_ray_trainer_matches_the_serial_trainer(ray_session):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, S.N_CHANNELS, 8, 8)).astype(np.float32)
    prior = rng.dirichlet(np.ones(64), size=2).reshape(2, 8, 8)
    data = {"inputs": x, "log_priors": np.log(prior).astype(np.float32), "targets": prior}
    job = {"rows": np.array([1, 0]), "n_epochs": 3, "seed": 5}
    got = S.ray_trainer(ray_session, num_cpus=0.5)(data, [job])[0]
    # The Ray task trains on one thread; train here on one thread too, so both sum in the same
    # order (with the default two threads the weights after 3 Adam epochs differ by ~3e-5, which
    # made this test depend on whether an earlier test in the process had set one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = S.train_student(x[[1, 0]], data["log_priors"][[1, 0]], prior[[1, 0]], n_epochs=3, seed=5)
    finally:
        torch.set_num_threads(threads)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-5)  # float32 Adam; other BLAS kernels move last digits


def test_per_cell_work_gives_the_same_maps_in_any_number_of_chunks():
    cells = layout(4)
    measured = _measured_maps(cells)
    kw = dict(resolution_m=100.0, patch_px=16, neighbour_radius_m=2000.0, beta_grid=(2.0, 4.0), holdout_cells={"s0c0"},
              n_epochs=2, min_mass=1e-6, seed=0, temperature_grid_db=(3.0, 6.0), n_folds=2)
    one = S.teacher_student_maps(cells, measured, **kw)
    calls = []

    def mapper(fn, grid, chunks):
        calls.append(len(chunks))
        return S.serial_mapper(fn, grid, chunks)

    three = S.teacher_student_maps(cells, measured, mapper=mapper, n_chunks=3, **kw)
    assert calls == [3]
    assert one["beta"] == three["beta"] and one["temperature_db"] == three["temperature_db"] and one["cv_ks"] == three["cv_ks"]
    for method in ("teacher", "prior", "student"):
        assert list(one[method]) == list(three[method])
        for c in one[method]:
            pd.testing.assert_frame_equal(one[method][c], three[method][c], check_exact=True)


def test_student_steps_on_a_bounded_random_batch_above_max_batch():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, S.N_CHANNELS, 8, 8)).astype(np.float32)
    prior = rng.dirichlet(np.ones(64), size=6).reshape(6, 8, 8)
    job = {"inputs": x, "log_priors": np.log(prior).astype(np.float32), "targets": prior, "n_epochs": 3, "seed": 5}
    full = S.train_student(**job)
    assert all(np.array_equal(full[k].numpy(), S.train_student(**job, max_batch=6)[k].numpy()) for k in full)  # N <= cap: full batch
    small = S.train_student(**job, max_batch=4)
    again = S.train_student(**job, max_batch=4)
    assert all(np.array_equal(small[k].numpy(), again[k].numpy()) for k in small)  # seeded
    assert any(not np.allclose(small[k].numpy(), full[k].numpy()) for k in small)  # a different (sub-batch) fit


def test_prediction_in_chunks_equals_one_pass(monkeypatch):
    """predict_student runs PREDICT_CHUNK_CELLS cells a pass (a memory bound): each cell's map is
    its own, so the chunked maps equal one pass over all cells."""
    torch.manual_seed(0)
    net = S._Student()
    torch.nn.init.normal_(net.head[-1].weight, std=0.3)  # a non-trivial correction to the prior
    state = net.state_dict()
    rng = np.random.default_rng(3)
    n = 2 * S.PREDICT_CHUNK_CELLS + 7
    x = rng.normal(size=(n, S.N_CHANNELS, 8, 8)).astype(np.float32)
    lp = np.log(rng.dirichlet(np.ones(64), size=n).reshape(n, 8, 8)).astype(np.float32)
    chunked = S.predict_student(state, x, lp)
    monkeypatch.setattr(S, "PREDICT_CHUNK_CELLS", n)
    whole = S.predict_student(state, x, lp)
    assert chunked.shape == (n, 8, 8)
    np.testing.assert_allclose(chunked.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-9)
    assert np.abs(chunked - np.exp(lp)).max() > 1e-3  # the correction did change the maps
