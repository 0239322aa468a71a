from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsynth.evaluate import fidelity, fingerprint, privacy


def test_wasserstein_of_a_shift_is_the_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    assert fidelity.column_wasserstein(x, x + 3.0) == pytest.approx(3.0)
    assert fidelity.column_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)


def test_categorical_jsd_hand_values():
    assert fidelity.categorical_jsd(["a", "b"], ["a", "b"]) == pytest.approx(0.0)
    assert fidelity.categorical_jsd(["a"], ["b"]) == pytest.approx(1.0)  # disjoint supports, base 2
    # p = (1/2, 1/2), q = (1, 0): JS = 1/2 KL(p||m) + 1/2 KL(q||m) with m = (3/4, 1/4).
    expected = 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)) + 0.5 * np.log2(1 / 0.75)
    assert fidelity.categorical_jsd(["a", "b"], ["a", "a"]) == pytest.approx(expected)


def test_correlation_difference_detects_broken_dependence():
    rng = np.random.default_rng(1)
    x = rng.normal(size=2000)
    real = pd.DataFrame({"a": x, "b": x})  # corr 1
    shuffled = pd.DataFrame({"a": x, "b": rng.permutation(x)})  # corr ~0
    assert fidelity.correlation_difference(real, real, ["a", "b"]) == pytest.approx(0.0)
    assert fidelity.correlation_difference(real, shuffled, ["a", "b"]) == pytest.approx(1.0, abs=0.06)


def test_dcr_flags_copies_and_not_fresh_draws():
    rng = np.random.default_rng(2)
    train = pd.DataFrame(rng.normal(size=(2000, 2)), columns=["x", "y"])
    holdout = pd.DataFrame(rng.normal(size=(500, 2)), columns=["x", "y"])
    fresh = pd.DataFrame(rng.normal(size=(500, 2)), columns=["x", "y"])
    copies = train.iloc[:500] + 1e-9
    assert privacy.dcr_check(train, copies, holdout, columns=["x", "y"]).flag
    fresh_res = privacy.dcr_check(train, fresh.iloc[:250], holdout, columns=["x", "y"])
    # Fresh draws from the same distribution sit as far from the training rows as held-out rows.
    assert fresh_res.ratio == pytest.approx(1.0, abs=0.2)
    far = privacy.dcr_check(train, fresh * 3, holdout, columns=["x", "y"])
    assert not far.flag and far.ratio > 1.0
    metrics = pd.DataFrame({"metric": ["privacy_dcr_flag", "mae"], "value": [1.0, 3.0]})
    assert privacy.refuse_to_publish(metrics)
    assert not privacy.refuse_to_publish(metrics.assign(value=[0.0, 3.0]))


def test_dcr_distance_hand_value():
    d = privacy.distance_to_closest_record(np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([[3.0, 4.0], [10.0, 1.0]]))
    np.testing.assert_allclose(d, [5.0, 1.0])


def test_rsrp_vectors_and_synthetic_long():
    meas = pd.DataFrame({"report_id": ["r1", "r1", "r2"], "cell_id": ["A", "B", "B"], "rsrp_dbm": [-80.0, -90.0, -70.0]})
    wide = fingerprint.rsrp_vectors(meas, ["A", "B", "C"])
    assert wide.loc["r1"].tolist() == [-80.0, -90.0, -140.0]
    assert wide.loc["r2"].tolist() == [-140.0, -70.0, -140.0]
    syn = pd.DataFrame({"sample_id": ["s1"], "serving_cell_id": ["A"], "rsrp_dbm": [-75.0],
                        "neighbour_1_cell_id": ["C"], "neighbour_1_rsrp_dbm": [-100.0],
                        "neighbour_2_cell_id": [None], "neighbour_2_rsrp_dbm": [np.nan]})
    long = fingerprint.synthetic_long(syn, 2)
    assert long.values.tolist() == [["s1", "A", -75.0], ["s1", "C", -100.0]]


def test_sparse_fingerprints_equal_the_dense_vectors():
    # Issue 15: the sparse matrix holds the dense vectors' values above UNDETECTED_DBM; NaN values,
    # repeated (report, cell) pairs and cells outside the list behave as in the dense frame.
    rng = np.random.default_rng(0)
    n = 3000
    meas = pd.DataFrame({"report_id": [f"r{i:04d}" for i in rng.integers(0, 700, n)],
                         "cell_id": [f"c{i}" for i in rng.integers(0, 40, n)],
                         "rsrp_dbm": np.where(rng.random(n) < 0.05, np.nan, np.round(rng.uniform(-140, -60, n)))})
    cells = [f"c{i}" for i in range(35)]
    dense = fingerprint.rsrp_vectors(meas, cells)
    reports, mat = fingerprint.rsrp_matrix(meas, cells)
    assert list(reports) == list(dense.index)
    np.testing.assert_array_equal(mat.toarray() + fingerprint.UNDETECTED_DBM, dense.to_numpy())
    xy = rng.uniform(0, 1000, size=(len(reports), 2))
    a = fingerprint.fingerprint_compare(dense.to_numpy(), xy, dense.to_numpy(), xy, dense.to_numpy()[:100], xy[:100], n_trees=5)
    b = fingerprint.fingerprint_compare(mat, xy, mat, xy, mat[:100], xy[:100], n_trees=5)
    np.testing.assert_array_equal(a.predicted_real_xy_m, b.predicted_real_xy_m)


def test_fingerprinting_on_a_closed_form_field():
    # RSRP from 3 sites with log-distance loss: position is recoverable from the vector. Training on
    # the same field (synthetic) matches training on real; training on noise does much worse.
    rng = np.random.default_rng(3)
    sites = np.array([[0.0, 0.0], [1000.0, 0.0], [500.0, 900.0]])

    def field(xy):
        d = np.maximum(np.linalg.norm(xy[:, None] - sites[None], axis=2), 10.0)
        return -30.0 - 35.0 * np.log10(d) + rng.normal(0, 1.0, size=d.shape)

    xy_real, xy_syn, xy_test = (rng.uniform(0, 1000, size=(1500, 2)) for _ in range(3))
    res = fingerprint.fingerprint_compare(field(xy_real), xy_real, field(xy_syn), xy_syn, field(xy_test), xy_test, n_trees=30)
    assert res.rmse_real_m < 80.0
    assert res.ratio == pytest.approx(1.0, abs=0.25)
    bad = fingerprint.fingerprint_compare(field(xy_real), xy_real, rng.normal(-100, 10, (1500, 3)), xy_syn,
                                          field(xy_test), xy_test, n_trees=30)
    assert bad.ratio > 2.0
    assert fingerprint.localisation_rmse_m(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])) == pytest.approx(5.0, abs=1e-12)
