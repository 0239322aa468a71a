"""Per-cell KDEs, association and spatial diffusion maps (Ray).

`python jobs/density.py --config conf/local.yaml [--set key=value ...]`
"""

from __future__ import annotations

import sys

from cellsynth.pipeline import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(["density"], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
