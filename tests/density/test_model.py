import numpy as np
import pytest

from cellsynth.density import GaussianKDE2D, select_bandwidth
from cellsynth.errors import ConfigError, NotFittedError, SchemaError


def test_bandwidth_selection_recovers_scott_optimum_on_gaussian_data():
    # For N(0, sigma^2 I) in 2-D the likelihood-optimal bandwidth is close to Scott's
    # sigma * n^(-1/6) = 200 * 4000^(-1/6) = 50.2 m; the grid's nearest value is 50.
    rng = np.random.default_rng(3)
    xy = rng.normal(scale=200.0, size=(4000, 2))
    kde = GaussianKDE2D(bandwidth_grid_m=(12.5, 25.0, 50.0, 100.0, 200.0)).fit(xy)
    assert kde.bandwidth_m_ == 50.0
    assert kde.bandwidth_source_ == "nll"
    nll = kde.nll_by_bandwidth_
    assert nll[50.0] < nll[25.0] and nll[50.0] < nll[100.0]


def test_bandwidth_recovers_known_cluster_width():
    # 30 well-separated clusters of 200 points, sigma 30 m: each cluster is a 2-D Gaussian, so the
    # optimum is near Scott's 30 * 200^(-1/6) = 12.4 m; on a x4 grid the nearest value is 12.
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 20_000, size=(30, 2))
    xy = centres[rng.integers(0, 30, 6000)] + rng.normal(scale=30.0, size=(6000, 2))
    h, nll = select_bandwidth(xy, (3.0, 12.0, 48.0, 192.0), validation_fraction=0.2, rng=1)
    assert h == 12.0
    assert nll[12.0] < nll[3.0] and nll[12.0] < nll[48.0]


def test_few_reports_fall_back_to_scott_with_floor():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    kde = GaussianKDE2D(min_reports=20, bandwidth_floor_m=20.0).fit(xy)
    assert kde.bandwidth_source_ == "fallback"
    assert kde.bandwidth_m_ == 20.0  # Scott: sqrt(33.3) * 3^(-1/6) = 4.8 m < floor
    one = GaussianKDE2D(min_reports=20, bandwidth_floor_m=35.0).fit([[5.0, 5.0]])
    assert one.bandwidth_m_ == 35.0


def test_score_samples_matches_closed_form_single_kernel():
    kde = GaussianKDE2D(bandwidth_m=10.0).fit([[0.0, 0.0]])
    # log N((3,4); 0, 10^2 I) = -log(2 pi 100) - 25 / 200
    assert kde.score_samples([[3.0, 4.0]])[0] == pytest.approx(-np.log(2 * np.pi * 100) - 0.125)


def test_sample_draws_from_fitted_density():
    kde = GaussianKDE2D(bandwidth_m=10.0).fit([[1000.0, -500.0]])
    draws = kde.sample(20_000, rng=5)
    assert draws.shape == (20_000, 2)
    assert draws.mean(axis=0) == pytest.approx([1000.0, -500.0], abs=0.5)
    assert draws.std(axis=0) == pytest.approx([10.0, 10.0], rel=0.03)
    np.testing.assert_array_equal(kde.sample(5, rng=9), kde.sample(5, rng=9))


def test_fit_twice_equals_fit_once_on_second_input():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 2)) * 100, rng.normal(size=(300, 2)) * 50
    twice = GaussianKDE2D().fit(a).fit(b)
    once = GaussianKDE2D().fit(b)
    assert twice.bandwidth_m_ == once.bandwidth_m_
    np.testing.assert_allclose(twice.score_samples(a[:10]), once.score_samples(a[:10]))


def test_not_fitted_and_bad_input_errors():
    with pytest.raises(NotFittedError, match="GaussianKDE2D is not fitted"):
        GaussianKDE2D().score_samples([[0.0, 0.0]])
    with pytest.raises(SchemaError, match=r"xy_m: expected an \(n, 2\) array"):
        GaussianKDE2D().fit(np.zeros((5, 3)))
    with pytest.raises(SchemaError, match="xy_m: 1 rows hold NaN"):
        GaussianKDE2D().fit([[0.0, np.nan], [1.0, 1.0]])
    with pytest.raises(ConfigError, match=r"GaussianKDE2D.bandwidth_grid_m: expected a non-empty"):
        GaussianKDE2D(bandwidth_grid_m=()).fit([[0.0, 0.0]])


def test_save_load_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(2)
    kde = GaussianKDE2D().fit(rng.normal(size=(200, 2)) * 80)
    kde.save(tmp_path / "m")
    back = GaussianKDE2D.load(tmp_path / "m")
    pts = rng.normal(size=(20, 2)) * 80
    np.testing.assert_allclose(back.score_samples(pts), kde.score_samples(pts))
    assert back.bandwidth_m_ == kde.bandwidth_m_


def test_association_rule_is_validated_with_its_dotted_key():
    from cellsynth.config import load_config
    from cellsynth.errors import ConfigError

    assert load_config(None).density.association == "map"
    assert load_config(None, ["density.association=ml"]).density.association == "ml"
    with pytest.raises(ConfigError, match=r"density\.association"):
        load_config(None, ["density.association=bayes"])
    with pytest.raises(ConfigError, match=r"density\.association_bandwidth_scales"):
        load_config(None, ["density.association_bandwidth_scales=[0.5, -1]"])


def test_position_files_are_cached_per_process_until_rewritten(tmp_path):
    # Session 16: a Ray worker keeps the grouped position files across generate tile tasks; an
    # unchanged file is served from memory, a rewritten one (a new model version, even of the
    # same size) is read again.
    import pandas as pd

    from cellsynth.density import _files

    def frame(offset):
        return pd.DataFrame({"window": "w", "cell_id": ["a", "b", "a"], "x_m": [1.0, 2.0, 3.0], "y_m": [4.0, 5.0, offset]})

    rel = _files.positions_rel_path("run", "w", 0)
    _files.write_positions(tmp_path, rel, frame(6.0))
    xy, groups = _files.read_positions_grouped(tmp_path, rel)
    np.testing.assert_array_equal(xy, [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]])
    np.testing.assert_array_equal(groups[("w", "a")], [0, 2])
    again, _ = _files.read_positions_grouped(tmp_path, rel)
    assert again is xy  # served from the cache
    _files.write_positions(tmp_path, rel, frame(7.0))  # same rows, same file size
    fresh, groups = _files.read_positions_grouped(tmp_path, rel)
    assert fresh is not xy
    np.testing.assert_array_equal(fresh, [[1.0, 4.0], [2.0, 5.0], [3.0, 7.0]])
    np.testing.assert_array_equal(groups[("w", "b")], [1])
