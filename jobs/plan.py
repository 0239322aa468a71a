"""Where to measure next: a drive or points within a budget (measurement_plan + map).

`python jobs/plan.py --config conf/local.yaml --set plan.budget_km=20 --set plan.window=h06_12`
"""

from __future__ import annotations

import sys

from cellsynth.pipeline import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(["plan"], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
