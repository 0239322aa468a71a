"""cellsynth: synthetic MDT reports and cell traffic from measured ones (see README)."""

from __future__ import annotations

from typing import Any

__all__ = ["MDTSynthesizer", "TrafficSynthesizer"]


def __getattr__(name: str) -> Any:
    # Lazy: `import cellsynth.config` (every job, every test) must not import torch and pyro.
    if name == "MDTSynthesizer":
        from cellsynth.synthesizer import MDTSynthesizer

        return MDTSynthesizer
    if name == "TrafficSynthesizer":
        from cellsynth.traffic.synthesizer import TrafficSynthesizer

        return TrafficSynthesizer
    raise AttributeError(f"module 'cellsynth' has no attribute {name!r}")
