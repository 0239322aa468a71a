"""Radio stage: per-cell Bayesian RSRP/RSRQ field models on Ray (`python jobs/radio.py`)."""

from __future__ import annotations

import argparse
import sys
import uuid

from cellsynth.cluster import runtime
from cellsynth.config import load_config
from cellsynth.errors import CellsynthError
from cellsynth.radio import stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.key=value")
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        with runtime(cfg, quiet=args.quiet) as rt:
            result = stage.run(cfg, rt, run_id=args.run_id or uuid.uuid4().hex[:12])
    except CellsynthError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"radio {result.run_id}: written={result.rows_written} versions={result.table_versions} metrics={result.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
