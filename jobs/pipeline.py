"""Whole pipeline: `python jobs/pipeline.py --config conf/local.yaml` (or via spark-submit / ray job submit).

`--stage NAME` (repeatable) runs only those stages.
"""

from __future__ import annotations

import sys

from cellsynth.pipeline import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(None, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
