"""Per-cell KDEs, association (GUMBLE eqs. 12-15, and the MAP rule) and spatial diffusion maps (DEEPMEND)."""

from cellsynth.density._voronoi import nearest_site_associate
from cellsynth.density.model import DensityModels, GaussianKDE2D, select_bandwidth
from cellsynth.density.transforms import (
    CellSupportIndex,
    associate_dense,
    association_log_prior,
    kde_map,
    ks_2d_maps,
    select_association_scale,
)

__all__ = [
    "CellSupportIndex",
    "DensityModels",
    "GaussianKDE2D",
    "associate_dense",
    "association_log_prior",
    "kde_map",
    "ks_2d_maps",
    "nearest_site_associate",
    "select_association_scale",
    "select_bandwidth",
]
