"""A-priori physics against hand-computed values; residual kriging on a field with a known offset."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from cellsynth.errors import NotFittedError
from cellsynth.propagation import free_space_path_loss_db, path_loss_uma_nlos_db, prior_rsrp_dbm
from cellsynth.whatif import ResidualKriger, cell_prior_dbm
from cellsynth.whatif.field import cell_priors_dbm


def test_free_space_loss_matches_friis_by_hand():
    # 1 km, 1800 MHz, mast 25 m: d3d = sqrt(1000^2 + 23.5^2); FSPL = 20 log10(d3d) + 20 log10(f_MHz) - 27.55.
    d3d = np.sqrt(1000.0**2 + 23.5**2)
    want = 20 * np.log10(d3d) + 20 * np.log10(1800.0) - 27.55
    assert free_space_path_loss_db(1000.0, height_m=25.0, freq_mhz=1800.0) == pytest.approx(want, abs=1e-9)
    assert want == pytest.approx(97.557, abs=1e-3)


def test_uma_nlos_and_boresight_rsrp_by_hand():
    d3d = np.sqrt(500.0**2 + 23.5**2)
    nlos = 13.54 + 39.08 * np.log10(d3d) + 20 * np.log10(1.8)
    assert path_loss_uma_nlos_db(500.0, height_m=25.0, freq_mhz=1800.0) == pytest.approx(nlos, abs=1e-9)
    # On boresight (north), no downtilt, zenith just below the horizon: vertical term tiny.
    got = prior_rsrp_dbm(np.array([[0.0, 500.0]]), np.array([[0.0, 0.0]]), azimuth_deg=[0.0], height_m=[25.0],
                         tx_power_dbm=[46.0], freq_mhz=[1800.0], downtilt_deg=[0.0])[0, 0]
    zen_off = np.degrees(np.arctan2(23.5, 500.0))
    gain = 8.0 - min(12.0 * (zen_off / 65.0) ** 2, 30.0)
    assert got == pytest.approx(46.0 - 10 * np.log10(1200.0) + gain - nlos, abs=1e-9)
    # Behind the antenna: front-to-back 30 dB.
    back = prior_rsrp_dbm(np.array([[0.0, -500.0]]), np.array([[0.0, 0.0]]), azimuth_deg=[0.0], height_m=[25.0],
                          tx_power_dbm=[46.0], freq_mhz=[1800.0], downtilt_deg=[0.0])[0, 0]
    assert got - back == pytest.approx(30.0 - 12.0 * (zen_off / 65.0) ** 2, abs=1e-9)


def _network():
    return pd.DataFrame({"cell_id": ["A_1", "A_2", "B_1"], "site_id": ["A", "A", "B"], "x_m": [0.0, 0.0, 3000.0],
                         "y_m": [0.0, 0.0, 0.0], "azimuth_deg": [0.0, 180.0, 90.0], "height_m": [25.0] * 3,
                         "tx_power_dbm": [46.0] * 3, "freq_mhz": [1800.0] * 3})


def _measurements(cells, rng, offset_db):
    rows = []
    for k, c in enumerate(cells["cell_id"]):
        site = cells.loc[cells.cell_id == c, ["x_m", "y_m"]].to_numpy()[0]
        xy = site + rng.uniform(-600, 600, size=(400, 2))
        y = cell_prior_dbm(cells, np.full(len(xy), c), xy) + offset_db[c] + rng.normal(0, 1.0, len(xy))
        # Serving where this cell is the strongest (as a UE reports it), a neighbour elsewhere.
        others = [cell_prior_dbm(cells, np.full(len(xy), o), xy) + offset_db[o] for o in cells["cell_id"] if o != c]
        role = np.where(y >= np.max(others, axis=0), "serving", "neighbour")
        rows.append(pd.DataFrame({"report_id": [f"{c}-{i}" for i in range(len(xy))], "cell_id": c, "role": role,
                                  "x_m": xy[:, 0], "y_m": xy[:, 1], "rsrp_dbm": y}))
    return pd.concat(rows, ignore_index=True)


def test_kriger_transfers_a_cells_own_residual_after_a_repoint_and_falls_back_to_the_bias():
    cells = _network()
    rng = np.random.default_rng(0)
    meas = _measurements(cells, rng, {"A_1": 6.0, "A_2": 6.0, "B_1": 2.0})
    with pytest.raises(NotFittedError):
        ResidualKriger().predict("A_1", cells, np.zeros((1, 2)))
    kr = ResidualKriger(random_state=0).fit(meas, cells)
    new = cells.assign(azimuth_deg=np.where(cells.cell_id == "A_1", 90.0, cells.azimuth_deg))
    xy = np.array([[200.0, 100.0], [-150.0, 300.0]])
    got = kr.predict("A_1", new, xy)
    # New antenna pattern, old clutter: prior with the new azimuth plus A_1's +6 dB residual.
    np.testing.assert_allclose(got.mean_dbm, cell_prior_dbm(new, np.array(["A_1", "A_1"]), xy) + 6.0, atol=0.8)
    # A new cell on a new site has no residuals of its own: prior + the network bias, wide std.
    added = pd.concat([new, pd.DataFrame([{"cell_id": "N_1", "site_id": "N", "x_m": 1500.0, "y_m": 1500.0,
                                           "azimuth_deg": 0.0, "height_m": 25.0, "tx_power_dbm": 46.0, "freq_mhz": 1800.0}])])
    far = kr.predict("N_1", added, np.array([[1500.0, 1800.0]]))
    assert far.mean_dbm[0] == pytest.approx(cell_prior_dbm(added, np.array(["N_1"]), np.array([[1500.0, 1800.0]]))[0] + kr.bias_db_)
    assert far.epistemic_std_db[0] > 3 * got.epistemic_std_db.max()


def test_sources_are_the_measured_cells_within_a_metre_of_the_new_site():
    """The vectorised site match gives what one np.allclose(site, here, atol=1.0) per measured cell gave."""
    cells = _network()
    kr = ResidualKriger(random_state=0).fit(_measurements(cells, np.random.default_rng(1), {"A_1": 0.0, "A_2": 0.0, "B_1": 0.0}), cells)

    def reference(cell_id, new_cells):
        row = new_cells.set_index("cell_id").loc[cell_id]
        here = (float(row["x_m"]), float(row["y_m"]))
        out = [(cell_id, 1.0)] if cell_id in kr.by_cell_ and np.allclose(kr.site_xy_.get(cell_id, (np.inf, np.inf)), here, atol=1.0) else []
        return out + [(o, kr.rho_) for o, xy in kr.site_xy_.items() if o != cell_id and np.allclose(xy, here, atol=1.0)]

    for dx in (0.0, 0.6, 0.99999, 1.0, 1.00002, 1.5, 3000.0):  # around the tolerance 1 m + 1e-5 |here|
        new = pd.concat([cells.assign(x_m=np.where(cells.cell_id == "A_2", dx, cells.x_m)),
                         pd.DataFrame([{"cell_id": "N_1", "site_id": "N", "x_m": 3000.0 + dx, "y_m": 0.0}])], ignore_index=True)
        for c in new["cell_id"]:
            assert kr.sources(c, new) == reference(c, new), (dx, c)
    assert kr.sources("A_1", cells) == [("A_1", 1.0), ("A_2", kr.rho_)]


def test_priors_of_several_cells_in_one_call_are_the_per_cell_priors():
    cells = _network().assign(downtilt_deg=[4.0, np.nan, 8.0])
    cells.loc[2, "azimuth_deg"] = np.nan  # omni: no horizontal pattern
    xy = np.random.default_rng(2).uniform(-2000, 4000, (50, 2))
    got = cell_priors_dbm(cells, ["B_1", "A_1", "A_2"], xy)
    want = np.stack([cell_prior_dbm(cells, np.full(len(xy), c), xy) for c in ["B_1", "A_1", "A_2"]], axis=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def _bare_kriger(noise_var=4.0, n0=0.1, tau2=40.0):
    kr = ResidualKriger(random_state=0)
    kr.noise_var_, kr.n0_, kr.tau2_ = noise_var, n0, tau2
    return kr


def test_std_model_is_monotone_from_the_no_data_std_to_the_floor():
    kr = _bare_kriger()
    kr.std_nodata_db_, kr.std_floor_db_ = 8.0, 3.0
    den = np.array([0.0, 0.1, 1.0, 10.0, 1e9])
    std = kr._std(den)
    # std^2 = b^2 + (a^2 - b^2) n0 / (den + n0), by hand at den = 0.1: 9 + 55 * 0.5 = 36.5.
    np.testing.assert_allclose(std[[0, 1]], [8.0, np.sqrt(36.5)], rtol=1e-12)
    assert std[-1] == pytest.approx(3.0, abs=1e-4)
    assert np.all(np.diff(std) < 0)


def test_std_calibration_recovers_the_std_that_made_the_cv_errors():
    # CV errors of the noisy serving RSRP: the noise-free error has std 8 dB where nothing was
    # measured (den = 0) and 2 dB under dense data; the nugget (2 dB) is added on top.
    rng = np.random.default_rng(1)
    kr = _bare_kriger(noise_var=4.0, n0=0.1)
    n = 20_000
    no_data = np.column_stack([rng.normal(0, np.sqrt(8.0**2 + 4.0), n), np.zeros(n)])
    dense = np.column_stack([rng.normal(0, np.sqrt(2.0**2 + 4.0), n), np.full(n, 1e6)])
    a, b = kr._calibrate_std([no_data, dense])
    assert a == pytest.approx(8.0, abs=0.3)
    assert b == pytest.approx(2.0, abs=0.3)
    kr.std_nodata_db_, kr.std_floor_db_ = a, b
    kr.cv_ = {"no_data": no_data, "dense": dense}
    cov = kr.cv_coverage()
    for name in cov:
        assert cov[name]["cov90"] == pytest.approx(0.9, abs=0.01)
        assert cov[name]["cov50"] == pytest.approx(0.5, abs=0.015)


def test_noise_is_the_semivariogram_intercept_not_the_short_range_mean():
    # Residual field = a 6 dB shadowing field with exponential correlation (50 m) along x, so the
    # plain mean of pairs within 10 m is far above the noise, plus 1.5 dB white noise: the
    # intercept at 0 m recovers 1.5^2.
    rng = np.random.default_rng(2)
    kr = _bare_kriger()
    grid_x = np.arange(0.0, 150.0, 0.1)
    phi = np.exp(-0.1 / 50.0)
    field = np.empty(len(grid_x))
    field[0] = rng.normal(0, 6.0)
    for i in range(1, len(grid_x)):  # Ornstein-Uhlenbeck: semivariogram linear near 0
        field[i] = phi * field[i - 1] + rng.normal(0, 6.0 * np.sqrt(1 - phi**2))
    xy = rng.uniform(0, 149.9, size=(4000, 2))
    e = np.interp(xy[:, 0], grid_x, field) + rng.normal(0, 1.5, len(xy))
    kr.by_cell_ = {"A": (xy, e)}
    close = cKDTree(xy).query_pairs(10.0, output_type="ndarray")
    assert np.mean((e[close[:, 0]] - e[close[:, 1]]) ** 2 / 2) > 1.5 * 1.5**2
    assert kr._noise_var() == pytest.approx(1.5**2, rel=0.2)
