"""What-if network changes (issue 18): a validated change file, radio fields for changed cells
from the a-priori physics plus the neighbouring residuals, and the scenario-tagged outputs."""

from cellsynth.whatif.changes import ChangeSet, apply_changes, load_changes, parse_changes, validate_against
from cellsynth.whatif.field import FieldPrediction, ResidualKriger, cell_prior_dbm

__all__ = ["ChangeSet", "FieldPrediction", "ResidualKriger", "apply_changes", "cell_prior_dbm", "load_changes",
           "parse_changes", "validate_against"]
