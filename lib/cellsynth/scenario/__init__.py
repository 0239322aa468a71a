"""Scenario simulator (issue 4): an operator's raw MDT, traffic and cell exports plus ground truth.

`simulate(...)` returns a `Scenario` of DataFrames; `export(scenario, out_dir)` writes it;
`write_scenario(...)` streams a large run to a folder chunk by chunk. `build_world`, `reports_at` and
`road_segments` let a benchmark measure at chosen positions (a planned drive) with the true field. The physics helpers are
public so tests and other teams can check values against TR 38.901 by hand.
"""

from cellsynth.scenario._radio import (
    antenna_gain_dbi,
    gaussian_field,
    los_probability,
    path_loss_db,
    quantise_rsrp,
    quantise_rsrq,
    rsrq_db,
    sample_field,
)
from cellsynth.scenario._reports import DIRT_REJECT_REASON, mdt_columns, reports_at
from cellsynth.scenario._roads import road_segments
from cellsynth.scenario._world import World, build_world
from cellsynth.scenario.simulate import Scenario, export, scenario_hash, simulate, write_scenario

__all__ = [
    "DIRT_REJECT_REASON",
    "Scenario",
    "World",
    "antenna_gain_dbi",
    "build_world",
    "export",
    "gaussian_field",
    "los_probability",
    "mdt_columns",
    "path_loss_db",
    "quantise_rsrp",
    "quantise_rsrq",
    "reports_at",
    "road_segments",
    "rsrq_db",
    "sample_field",
    "scenario_hash",
    "simulate",
    "write_scenario",
]
