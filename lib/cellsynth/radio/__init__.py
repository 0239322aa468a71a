"""Bayesian radio-field models (GUMBLE sections 5.2-5.3): per-cell RSRP and load-conditioned
RSRQ with epistemic and aleatoric uncertainty, trained per shard as one batched Pyro model."""

from cellsynth.radio.model import (
    CellData,
    FitSettings,
    FittedCells,
    RadioModel,
    RadioModels,
    RadioPrediction,
    fit_cells,
)
from cellsynth.radio.transforms import ipw_weights

__all__ = ["CellData", "FitSettings", "FittedCells", "RadioModel", "RadioModels", "RadioPrediction", "fit_cells",
           "ipw_weights"]
