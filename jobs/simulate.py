"""Simulate operator-like raw MDT, traffic and cell files plus ground truth.

`python jobs/simulate.py --config conf/local.yaml [--set key=value ...]`
"""

from __future__ import annotations

import sys

from cellsynth.pipeline import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(["simulate"], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
