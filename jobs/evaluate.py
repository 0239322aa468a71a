"""Score models and synthetic data on held-out reports into the metrics table (stage `evaluate`)."""

from __future__ import annotations

import argparse

from cellsynth.cluster import runtime
from cellsynth.config import load_config
from cellsynth.evaluate import stage
from cellsynth.pipeline import new_run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with runtime(cfg, quiet=args.quiet) as rt:
        result = stage.run(cfg, rt, run_id=new_run_id())
    print(f"{stage.NAME}: " + ", ".join(f"{k}={v:,}" for k, v in result.rows_written.items()) + (f" ({result.note})" if result.note else ""))
    for name, value in result.metrics.items():
        print(f"  {name} = {value:.4g}")
    for name, where in result.artifacts.items():
        print(f"{name}: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
