"""Conditional diffusion model of per-cell weekly traffic (Ray).

`python jobs/traffic.py --config conf/local.yaml [--set key=value ...]`
"""

from __future__ import annotations

import sys

from cellsynth.pipeline import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(["traffic"], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
