"""Ingest job: `spark-submit jobs/ingest.py --config conf/local.yaml [--set key=value ...]`."""

from __future__ import annotations

import argparse

from cellsynth.cluster import runtime
from cellsynth.config import load_config
from cellsynth.pipeline import new_run_id, run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate, clean and partition raw inputs into the lake (Spark).")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with runtime(cfg) as rt:
        restored = rt.registry.recover()
        for table, (old, new) in restored.items():
            rt.log(f"restored {table} from version {old} to {new}")
        result = run_stage("ingest", rt, run_id=args.run_id or new_run_id(), force=args.force)
    print(f"ingest {result.run_id}: {'skipped (' + result.note + ')' if result.skipped else 'done'}; "
          f"in {result.rows_in}, written {result.rows_written}, rejected {result.rows_rejected}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
