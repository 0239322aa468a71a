"""Whole pipeline: `python jobs/pipeline.py --config conf/local.yaml` (or via spark-submit / ray job submit)."""

from __future__ import annotations

import argparse
import sys

from cellsynth.cluster import runtime
from cellsynth.config import load_config
from cellsynth.errors import CellsynthError, ConfigError, SchemaError
from cellsynth.pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.key=value")
    parser.add_argument("--stage", action="append", dest="stages", help="run only these stages (repeatable)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        with runtime(cfg, quiet=args.quiet) as rt:
            run_id, results = run_pipeline(rt, stages=args.stages, force=args.force)
    except CellsynthError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError | SchemaError) else 1
    for r in results:
        print(f"{run_id} {r.stage}: {'skipped' if r.skipped else 'ok'} written={r.rows_written} versions={r.table_versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
