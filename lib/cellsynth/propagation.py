"""A-priori radio physics from a cell's site parameters alone: the RSRP a cell is expected to
give at a position before anything is measured there.

Used where no measurement can inform a fit: the spatial-map student's layout prior
(density) and the what-if radio prior for new or re-pointed cells (whatif). Constants are
fixed a priori, not fitted: 3GPP TR 38.901 Table 7.4.1-1 UMa NLOS path loss (the standard
macro-cell model; NLOS because most UEs are), the Table 7.3-1 sector element pattern, and
the defaults below for parameters the cells table leaves empty.
"""

from __future__ import annotations

import numpy as np

UE_HEIGHT_M = 1.5
MIN_DISTANCE_M = 10.0  # TR 38.901 validity starts at 10 m
BEAMWIDTH_3DB_DEG = 65.0  # TR 38.901 Table 7.3-1
FRONT_TO_BACK_DB = 30.0
SIDE_LOBE_V_DB = 30.0
ELEMENT_GAIN_DBI = 8.0
# Used when the cells table leaves a parameter empty: a typical LTE macro sector.
DEFAULT_HEIGHT_M = 25.0
DEFAULT_TX_POWER_DBM = 46.0
DEFAULT_FREQ_MHZ = 1800.0
DEFAULT_DOWNTILT_DEG = 6.0
N_PRB = 100  # 20 MHz carrier: RS power = carrier power / (12 * 100) subcarriers


def _filled(values, default: float, n: int) -> np.ndarray:
    arr = np.full(n, default, dtype=float) if values is None else np.asarray(values, dtype=float).reshape(-1)
    return np.where(np.isfinite(arr), arr, default)


def antenna_gain_db(bearing_off_deg: np.ndarray, zenith_deg: np.ndarray, downtilt_deg: np.ndarray) -> np.ndarray:
    """TR 38.901 Table 7.3-1 element gain (dBi) at a horizontal offset from boresight and a zenith angle."""
    phi = (np.asarray(bearing_off_deg, dtype=float) + 180.0) % 360.0 - 180.0
    a_h = -np.minimum(12.0 * (phi / BEAMWIDTH_3DB_DEG) ** 2, FRONT_TO_BACK_DB)
    a_v = -np.minimum(12.0 * ((np.asarray(zenith_deg) - 90.0 - downtilt_deg) / BEAMWIDTH_3DB_DEG) ** 2, SIDE_LOBE_V_DB)
    return ELEMENT_GAIN_DBI - np.minimum(-(a_h + a_v), FRONT_TO_BACK_DB)


def path_loss_uma_nlos_db(d2d_m: np.ndarray, *, height_m: np.ndarray, freq_mhz: np.ndarray) -> np.ndarray:
    """TR 38.901 UMa NLOS path loss (dB): max(LOS, NLOS') as the table defines it."""
    d2d = np.maximum(np.asarray(d2d_m, dtype=float), MIN_DISTANCE_M)
    h_bs = np.asarray(height_m, dtype=float)
    fc_ghz = np.asarray(freq_mhz, dtype=float) / 1000.0
    d3d = np.sqrt(d2d**2 + (h_bs - UE_HEIGHT_M) ** 2)
    d_bp = 4.0 * (h_bs - 1.0) * (UE_HEIGHT_M - 1.0) * fc_ghz * 1e9 / 299_792_458.0
    los = np.where(d2d <= d_bp, 28.0 + 22.0 * np.log10(d3d) + 20.0 * np.log10(fc_ghz),
                   28.0 + 40.0 * np.log10(d3d) + 20.0 * np.log10(fc_ghz)
                   - 9.0 * np.log10(d_bp**2 + (h_bs - UE_HEIGHT_M) ** 2))
    nlos = 13.54 + 39.08 * np.log10(d3d) + 20.0 * np.log10(fc_ghz)
    return np.maximum(los, nlos)


def free_space_path_loss_db(d2d_m: np.ndarray, *, height_m: np.ndarray, freq_mhz: np.ndarray) -> np.ndarray:
    """Friis free-space loss (dB) over the 3-D distance: the naive planning baseline."""
    d3d = np.sqrt(np.maximum(np.asarray(d2d_m, dtype=float), 1.0) ** 2 + (np.asarray(height_m) - UE_HEIGHT_M) ** 2)
    return 20.0 * np.log10(d3d) + 20.0 * np.log10(np.asarray(freq_mhz, dtype=float)) - 27.55


def prior_rsrp_dbm(
    xy_m: np.ndarray,
    site_xy_m: np.ndarray,
    *,
    azimuth_deg=None,
    height_m=None,
    tx_power_dbm=None,
    freq_mhz=None,
    downtilt_deg=None,
    free_space: bool = False,
) -> np.ndarray:
    """A-priori RSRP (dBm) of K cells at N positions: RS power + antenna gain - path loss.

    Args:
        xy_m: (N, 2) positions in the lake's metre frame.
        site_xy_m: (K, 2) cell sites. The per-cell parameters are (K,) arrays or None; NaN or
            None takes the module default (no azimuth = omni-directional: no horizontal pattern).
        free_space: Friis loss instead of TR 38.901 UMa NLOS (the naive baseline).

    Returns:
        (N, K) RSRP in dBm.
    """
    xy = np.asarray(xy_m, dtype=float).reshape(-1, 2)
    sites = np.asarray(site_xy_m, dtype=float).reshape(-1, 2)
    k = len(sites)
    height = _filled(height_m, DEFAULT_HEIGHT_M, k)
    power = _filled(tx_power_dbm, DEFAULT_TX_POWER_DBM, k)
    freq = _filled(freq_mhz, DEFAULT_FREQ_MHZ, k)
    tilt = _filled(downtilt_deg, DEFAULT_DOWNTILT_DEG, k)
    az = np.full(k, np.nan) if azimuth_deg is None else np.asarray(azimuth_deg, dtype=float).reshape(-1)
    dx = xy[:, None, 0] - sites[None, :, 0]
    dy = xy[:, None, 1] - sites[None, :, 1]
    d2d = np.maximum(np.hypot(dx, dy), MIN_DISTANCE_M)
    bearing = np.degrees(np.arctan2(dx, dy))  # clockwise from north, like azimuths
    zenith = 90.0 + np.degrees(np.arctan2(height - UE_HEIGHT_M, d2d))
    off = np.where(np.isfinite(az), bearing - np.nan_to_num(az), 0.0)
    gain = antenna_gain_db(off, zenith, tilt)
    loss = (free_space_path_loss_db if free_space else path_loss_uma_nlos_db)(d2d, height_m=height, freq_mhz=freq)
    return power - 10.0 * np.log10(12.0 * N_PRB) + gain - loss
