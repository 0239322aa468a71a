"""What-if network changes: apply a change file, write the changed network's rows under its tag.

`python jobs/whatif.py --config conf/local.yaml --changes changes.yaml [--run-id ID] [--set key=value ...]`
"""

from __future__ import annotations

import argparse
import sys

from cellsynth.cluster import runtime
from cellsynth.config import load_config
from cellsynth.errors import CellsynthError, ConfigError, SchemaError
from cellsynth.pipeline import run_whatif
from cellsynth.whatif import load_changes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config"), p.add_argument("--changes", required=True), p.add_argument("--run-id", default=None)
    p.add_argument("--set", action="append", default=[]), p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg, changes = load_config(args.config, args.set), load_changes(args.changes)
        with runtime(cfg, quiet=args.quiet) as rt:
            result = run_whatif(rt, changes, run_id=args.run_id)
    except CellsynthError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError | SchemaError) else 1
    print(f"whatif {changes.name}: {result.note or 'done'}; rows {result.rows_written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
