"""Radio physics: 3GPP TR 38.901 path loss and antenna pattern, spatially correlated shadowing,
RSRQ from loaded interferers (GUMBLE eq. 4), and the UE reporting quantisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellsynth.schemas import RSRP_RANGE_DBM, RSRQ_RANGE_DB

SPEED_OF_LIGHT_M_S = 299_792_458.0
UE_HEIGHT_M = 1.5
MIN_DISTANCE_M = 10.0  # TR 38.901 Table 7.4.1-1 validity starts at 10 m
# TR 38.901 Table 7.3-1: element pattern.
BEAMWIDTH_3DB_DEG = 65.0
FRONT_TO_BACK_DB = 30.0  # A_m
SIDE_LOBE_V_DB = 30.0  # SLA_V
ELEMENT_GAIN_DBI = 8.0
# RS share of the REs in an RS-bearing OFDM symbol: those are sent whatever the load.
RS_RE_SHARE = 1.0 / 6.0
THERMAL_NOISE_DBM_HZ = -174.0
SUBCARRIER_HZ = 15_000.0
# Shadowing torus: 2048 x 2048 at 5 m (10.24 km, periodic). Each site and cell reads it at its
# own random offset, so fields of different sites/cells are shifted copies far apart, i.e.
# independent at the decorrelation distances we use (tens of metres).
SHADOW_GRID_M = 5.0
SHADOW_GRID_N = 2048


def los_probability(d2d_m: np.ndarray, environment: np.ndarray) -> np.ndarray:
    """TR 38.901 Table 7.4.2-1 LOS probability (UE at 1.5 m, so C'(h_UT) = 0 for UMa)."""
    d = np.maximum(np.asarray(d2d_m, dtype=float), 1e-9)
    near = d <= 18.0
    uma = 18.0 / d + np.exp(-d / 63.0) * (1.0 - 18.0 / d)
    umi = 18.0 / d + np.exp(-d / 36.0) * (1.0 - 18.0 / d)
    p = np.where(environment == "umi", umi, uma)
    return np.where(near, 1.0, p)


def path_loss_db(
    d2d_m: np.ndarray,
    *,
    h_bs_m: np.ndarray,
    freq_mhz: np.ndarray,
    environment: np.ndarray,
    los: np.ndarray,
    h_ut_m: float = UE_HEIGHT_M,
) -> np.ndarray:
    """TR 38.901 Table 7.4.1-1 UMa/UMi path loss in dB (NLOS = max(LOS, NLOS') as the table says).

    `environment` holds "uma"/"umi" per element, `los` booleans; all arrays broadcast together.
    """
    d2d = np.maximum(np.asarray(d2d_m, dtype=float), MIN_DISTANCE_M)
    h_bs = np.asarray(h_bs_m, dtype=float)
    fc_ghz = np.asarray(freq_mhz, dtype=float) / 1000.0
    d3d = np.sqrt(d2d**2 + (h_bs - h_ut_m) ** 2)
    is_umi = np.asarray(environment) == "umi"
    # Breakpoint distance with effective environment height h_E = 1 m.
    d_bp = 4.0 * (h_bs - 1.0) * (h_ut_m - 1.0) * fc_ghz * 1e9 / SPEED_OF_LIGHT_M_S
    log_d3d, log_fc = np.log10(d3d), np.log10(fc_ghz)
    bp_term = np.log10(d_bp**2 + (h_bs - h_ut_m) ** 2)
    uma_los = np.where(d2d <= d_bp, 28.0 + 22.0 * log_d3d + 20.0 * log_fc,
                       28.0 + 40.0 * log_d3d + 20.0 * log_fc - 9.0 * bp_term)
    umi_los = np.where(d2d <= d_bp, 32.4 + 21.0 * log_d3d + 20.0 * log_fc,
                       32.4 + 40.0 * log_d3d + 20.0 * log_fc - 9.5 * bp_term)
    uma_nlos = np.maximum(uma_los, 13.54 + 39.08 * log_d3d + 20.0 * log_fc - 0.6 * (h_ut_m - 1.5))
    umi_nlos = np.maximum(umi_los, 22.4 + 35.3 * log_d3d + 21.3 * log_fc - 0.3 * (h_ut_m - 1.5))
    los = np.asarray(los, dtype=bool)
    return np.where(is_umi, np.where(los, umi_los, umi_nlos), np.where(los, uma_los, uma_nlos))


def antenna_gain_dbi(
    azimuth_off_deg: np.ndarray, zenith_deg: np.ndarray, *, downtilt_deg: float | np.ndarray
) -> np.ndarray:
    """TR 38.901 Table 7.3-1 sector pattern: G_max + A(theta, phi) in dBi.

    Args:
        azimuth_off_deg: angle between the sector boresight and the UE, any range (wrapped).
        zenith_deg: zenith angle from the antenna to the UE (90 = horizon, >90 below it).
        downtilt_deg: electrical downtilt; the vertical beam points at zenith 90 + downtilt.
    """
    phi = (np.asarray(azimuth_off_deg, dtype=float) + 180.0) % 360.0 - 180.0
    a_h = -np.minimum(12.0 * (phi / BEAMWIDTH_3DB_DEG) ** 2, FRONT_TO_BACK_DB)
    theta = np.asarray(zenith_deg, dtype=float)
    a_v = -np.minimum(12.0 * ((theta - 90.0 - downtilt_deg) / BEAMWIDTH_3DB_DEG) ** 2, SIDE_LOBE_V_DB)
    return ELEMENT_GAIN_DBI - np.minimum(-(a_h + a_v), FRONT_TO_BACK_DB)


def gaussian_field(rng: np.random.Generator, *, decorrelation_m: float,
                   grid_m: float = SHADOW_GRID_M, n: int = SHADOW_GRID_N) -> np.ndarray:
    """Unit-variance periodic Gaussian field with correlation exp(-d / decorrelation_m)
    (Gudmundson), by circulant embedding: filter white noise with the covariance's spectrum."""
    k = np.arange(n)
    wrapped = np.minimum(k, n - k) * grid_m
    dist = np.hypot(wrapped[:, None], wrapped[None, :])
    spectrum = np.fft.rfft2(np.exp(-dist / decorrelation_m))
    amplitude = np.sqrt(np.clip(spectrum.real, 0.0, None))
    white = rng.standard_normal((n, n))
    field = np.fft.irfft2(amplitude * np.fft.rfft2(white), s=(n, n))
    return field.astype(np.float32)


def sample_field(field: np.ndarray, x_m: np.ndarray, y_m: np.ndarray, *, grid_m: float = SHADOW_GRID_M) -> np.ndarray:
    """Bilinear interpolation of a periodic field at metre positions (any shape)."""
    n = field.shape[0]
    gx, gy = np.asarray(x_m) / grid_m, np.asarray(y_m) / grid_m
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    ix0, iy0 = ix.astype(np.int64) % n, iy.astype(np.int64) % n
    ix1, iy1 = (ix0 + 1) % n, (iy0 + 1) % n
    return ((1 - fx) * (1 - fy) * field[iy0, ix0] + fx * (1 - fy) * field[iy0, ix1]
            + (1 - fx) * fy * field[iy1, ix0] + fx * fy * field[iy1, ix1])


def rsrq_db(rsrp_dbm: np.ndarray, load_rho: np.ndarray, *, serving: np.ndarray, noise_re_dbm: float,
            valid: np.ndarray | None = None) -> np.ndarray:
    """RSRQ of the serving cell from every measured cell's RSRP and load (GUMBLE eq. 4).

    RSRQ = N * RSRP / RSSI with RSSI over N PRBs of 12 subcarriers: each cell contributes its RS
    REs always and its data REs in proportion to its load, plus thermal noise, so per PRB
    RSSI / N = 12 * (sum_c RSRP_c * (1/6 + 5/6 * rho_c) + noise_per_RE).

    Args:
        rsrp_dbm: (n, k) RSRP of the k cells each row hears.
        load_rho: (n, k) load of those cells in [0, 1].
        serving: (n,) column index of the serving cell.
        noise_re_dbm: thermal noise per resource element (dBm).
        valid: (n, k) mask of cells that count (None = all).
    """
    lin = 10.0 ** (np.asarray(rsrp_dbm, dtype=float) / 10.0)
    occupied = lin * (RS_RE_SHARE + (1.0 - RS_RE_SHARE) * np.asarray(load_rho, dtype=float))
    if valid is not None:
        occupied = np.where(valid, occupied, 0.0)
    rssi_per_prb = 12.0 * (occupied.sum(axis=1) + 10.0 ** (noise_re_dbm / 10.0))
    rsrp_serving = np.take_along_axis(lin, np.asarray(serving)[:, None], axis=1)[:, 0]
    return 10.0 * np.log10(rsrp_serving / rssi_per_prb)


def noise_per_re_dbm(noise_figure_db: float) -> float:
    return THERMAL_NOISE_DBM_HZ + 10.0 * np.log10(SUBCARRIER_HZ) + noise_figure_db


def quantise_rsrp(rsrp_dbm: np.ndarray) -> np.ndarray:
    """TS 36.133 reporting: 1 dB steps, clipped to [-140, -44] dBm."""
    return np.clip(np.round(rsrp_dbm), *RSRP_RANGE_DBM)


def quantise_rsrq(rsrq: np.ndarray) -> np.ndarray:
    """TS 36.133 reporting: 0.5 dB steps, clipped to [-19.5, -3] dB."""
    return np.clip(np.round(np.asarray(rsrq) * 2.0) / 2.0, *RSRQ_RANGE_DB)


@dataclass
class RadioEnv:
    """Cells and their shadowing fields; evaluates noise-free RSRP of (position, cell) links."""

    cell_x_m: np.ndarray
    cell_y_m: np.ndarray
    cell_site: np.ndarray  # site index per cell
    azimuth_deg: np.ndarray
    height_m: np.ndarray
    tx_power_dbm: np.ndarray
    freq_mhz: np.ndarray
    environment: np.ndarray
    n_prb: int
    downtilt_deg: float
    field: np.ndarray  # shared periodic unit field
    site_offset_m: np.ndarray  # (n_sites, 2) shadowing offsets
    cell_offset_m: np.ndarray  # (n_cells, 2)
    los_offset_m: np.ndarray  # (n_sites, 2)
    sigma_db: float
    site_share: float
    use_los: bool

    def shadowing_db(self, x_m: np.ndarray, y_m: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Site-shared plus per-cell log-normal shadowing (dB) at the positions, per cell."""
        site = self.cell_site[cells]
        z_site = sample_field(self.field, x_m + self.site_offset_m[site, 0], y_m + self.site_offset_m[site, 1])
        z_cell = sample_field(self.field, x_m + self.cell_offset_m[cells, 0], y_m + self.cell_offset_m[cells, 1])
        return self.sigma_db * (np.sqrt(self.site_share) * z_site + np.sqrt(1.0 - self.site_share) * z_cell)

    def is_los(self, x_m: np.ndarray, y_m: np.ndarray, cells: np.ndarray, d2d_m: np.ndarray) -> np.ndarray:
        """Spatially consistent LOS state: a site's uniform field below the LOS probability."""
        if not self.use_los:
            return np.zeros(np.shape(d2d_m), dtype=bool)
        from scipy.special import ndtr

        site = self.cell_site[cells]
        z = sample_field(self.field, x_m + self.los_offset_m[site, 0], y_m + self.los_offset_m[site, 1])
        return ndtr(z) < los_probability(d2d_m, self.environment[cells])

    def rsrp_dbm(self, x_m: np.ndarray, y_m: np.ndarray, cells: np.ndarray, *, shadowing: bool = True) -> np.ndarray:
        """Noise-free RSRP (dBm) of cell `cells[i, j]` at position (x_m[i], y_m[i]); x/y (n, 1) or (n, k)."""
        dx, dy = x_m - self.cell_x_m[cells], y_m - self.cell_y_m[cells]
        d2d = np.maximum(np.hypot(dx, dy), MIN_DISTANCE_M)
        h_bs = self.height_m[cells]
        bearing = np.degrees(np.arctan2(dx, dy))  # clockwise from north, like azimuths
        zenith = 90.0 + np.degrees(np.arctan2(h_bs - UE_HEIGHT_M, d2d))
        gain = antenna_gain_dbi(bearing - self.azimuth_deg[cells], zenith, downtilt_deg=self.downtilt_deg)
        los = self.is_los(x_m, y_m, cells, d2d)
        loss = path_loss_db(d2d, h_bs_m=h_bs, freq_mhz=self.freq_mhz[cells], environment=self.environment[cells], los=los)
        # Reference-signal power per RE: the carrier's power spread over 12 * N_PRB subcarriers.
        rs_power = self.tx_power_dbm[cells] - 10.0 * np.log10(12.0 * self.n_prb)
        out = rs_power + gain - loss
        if shadowing:
            out = out - self.shadowing_db(x_m, y_m, cells)
        return out
