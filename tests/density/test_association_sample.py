"""The density stage's association score reads the held-out reports one partition at a time and
scores the same bottom-k sample evaluate draws (issue 15: a flat driver)."""

import json

import numpy as np

from cellsynth.density import stage as density_stage
from cellsynth import sampling as S
from cellsynth.lake.partitions import partition_filters, read_partitions
from cellsynth.splits import held_out
from cellsynth.stages import StageResult

from ._density_synth import layout
from .test_stage import _lake_with_inputs


class _ServingOracle:
    """Stands in for DensityModels: answers each position with the serving cell of the report
    there, and records which positions it was asked about."""

    association = "map"
    association_scale_: dict = {}
    association_cv_: dict = {}

    def __init__(self, reps, windows):
        self.windows = list(windows)
        self._by_xy = {(x, y): c for x, y, c in zip(reps.x_m, reps.y_m, reps.serving_cell_id)}
        self.asked: list[tuple[float, float]] = []

    def associate(self, window, xy, rule=None):
        self.asked += [tuple(p) for p in xy]
        return np.array([self._by_xy[tuple(p)] for p in xy], dtype=object)


def test_association_scores_stream_the_evaluate_sample(tmp_path):
    cfg, rt, reps = _lake_with_inputs(tmp_path, truth=False)
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"max_test_rows": 300})})
    lake = rt.lake
    assert len(partition_filters(lake, "mdt_reports")) == 8  # 2 windows x 4 shards: really streamed
    parts = list(read_partitions(lake, "mdt_reports", ["report_id"], version=lake.version("mdt_reports")))
    assert sum(len(p) for p in parts) == len(reps)

    windows = sorted(reps["window"].unique())[:1]  # reports of other windows are never scored
    models = _ServingOracle(reps, windows)
    result = StageResult(stage="density", run_id="r1")
    out = density_stage._association_scores(cfg, lake, lake.version("mdt_reports"), models, layout(4), "r1", result)

    pool = reps[(reps["window"] == windows[0]).to_numpy() & held_out(cfg, reps["report_id"].to_numpy())]
    want = S.bottom_k(pool, ["report_id"], 300, cfg.run.seed)
    assert len(pool) > 300 and len(want) == 300
    asked = set(models.asked)
    assert asked == set(zip(want.x_m, want.y_m))  # exactly the evaluate sample's positions
    overall = next(m for m in out if m["metric"] == "association_accuracy" and m.get("window") is None and m["model"] == "kde")
    assert overall["value"] == 1.0  # the oracle answers right
    assert json.loads(overall["detail"])["n"] == 300
    assert result.metrics["association_accuracy_kde"] == 1.0
