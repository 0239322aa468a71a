"""Measurement planning (issue 17): where to measure next so that the user-weighted epistemic
uncertainty of the radio models drops the most, within a driving or point budget."""

from cellsynth.plan.transforms import (
    CoveragePlanner,
    PlanField,
    RoadGraph,
    VariancePlanner,
    build_field,
    clip_segments,
    grid_points,
    plan_points,
    plan_route,
    random_route,
    road_graph,
)

__all__ = ["CoveragePlanner", "PlanField", "RoadGraph", "VariancePlanner", "build_field", "clip_segments", "grid_points",
           "plan_points", "plan_route", "random_route", "road_graph"]
