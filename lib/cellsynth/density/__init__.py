"""Per-cell KDEs, association (GUMBLE eqs. 12-15) and spatial diffusion maps (DEEPMEND)."""

from cellsynth.density._voronoi import nearest_site_associate
from cellsynth.density.model import DensityModels, GaussianKDE2D, select_bandwidth
from cellsynth.density.transforms import CellSupportIndex, associate_dense, kde_map, ks_2d_maps

__all__ = [
    "CellSupportIndex",
    "DensityModels",
    "GaussianKDE2D",
    "associate_dense",
    "kde_map",
    "ks_2d_maps",
    "nearest_site_associate",
    "select_bandwidth",
]
