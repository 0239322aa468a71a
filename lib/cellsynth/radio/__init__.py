"""Bayesian radio-field models (GUMBLE sections 5.2-5.3): per-cell RSRP and load-conditioned
RSRQ with epistemic and aleatoric uncertainty: a physical mean with a GP residual, trained per
shard as one batched model.

Modules: `geometry` (physical mean basis), `gp` (batched exact GP), `pyro_gp` (the Pyro
reference of the hyperparameter fit), `calibration` (training-row CV of the intervals),
`model` (`fit_cells`, `FittedCells`), `estimator` (`RadioModel`), `collection` (`RadioModels`),
`persist`, `stage`, `transforms`, `baselines`."""

from cellsynth.radio.collection import RadioModels
from cellsynth.radio.estimator import RadioModel
from cellsynth.radio.model import CellData, FitSettings, FittedCells, RadioPrediction, fit_cells
from cellsynth.radio.transforms import ipw_weights

__all__ = ["CellData", "FitSettings", "FittedCells", "RadioModel", "RadioModels", "RadioPrediction", "fit_cells",
           "ipw_weights"]
