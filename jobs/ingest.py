"""Validate, clean, window and partition raw inputs into the lake (Spark; works under spark-submit).

`python jobs/ingest.py --config conf/local.yaml [--set key=value ...]`
"""

from __future__ import annotations

import sys

from cellsynth.pipeline import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(["ingest"], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
