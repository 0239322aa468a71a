"""Simulate an operator's raw MDT, traffic and cell files plus ground truth (stage `simulate`)."""

from __future__ import annotations

import argparse

from cellsynth.cluster import runtime
from cellsynth.config import load_config
from cellsynth.pipeline import new_run_id
from cellsynth.scenario import stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with runtime(cfg, quiet=args.quiet) as rt:
        result = stage.run(cfg, rt, run_id=new_run_id())
    status = "skipped (" + result.note + ")" if result.skipped else "ok"
    print(f"simulate: {status}; " + ", ".join(f"{k}={v:,}" for k, v in result.rows_written.items()))
    print(f"raw_dir: {result.artifacts['raw_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
