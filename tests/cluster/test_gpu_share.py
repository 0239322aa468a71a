"""`gpu_share`: with runtime.device on CUDA every training worker asks Ray for a GPU share (Ray
hides GPUs from a worker that requests none), never more than the cluster has."""

from __future__ import annotations

import pytest

from cellsynth.cluster.ray_ import gpu_share


class _FakeRay:
    def __init__(self, gpus: float):
        self.gpus = gpus

    def cluster_resources(self) -> dict:
        return {"CPU": 2.0, "GPU": self.gpus} if self.gpus else {"CPU": 2.0}


@pytest.mark.parametrize(("gpus", "per_actor", "n_workers", "want"), [
    (1.0, 0.0, 2, 0.5),    # one GPU split over two actors
    (4.0, 0.0, 2, 1.0),    # at most one each
    (1.0, 0.25, 2, 0.25),  # the config's share wins
    (0.0, 0.0, 2, 0.0),    # no GPU: a request would wait forever
    (1.0, 2.0, 1, 1.0),    # a share above one is capped at one
])
def test_share_on_a_gpu_node(gpus, per_actor, n_workers, want):
    assert gpu_share(_FakeRay(gpus), per_actor, want_gpu=True, n_workers=n_workers) == pytest.approx(want)


def test_cpu_device_requests_no_gpu():
    assert gpu_share(_FakeRay(1.0), 0.5, want_gpu=False, n_workers=2) == 0.0
