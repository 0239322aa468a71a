"""Diagnostic (session 13, chooses nothing): `bench/privacy.py`'s rows with `dp_stats.OFFSET_ON = False`
(RSRP's release A as per-cell lines, as before session 13) on a lake an earlier `bench/privacy.py` run
left, at the same code otherwise, to separate release A's form from main's other changes between
privacy.json's runs. The bench's held-out figures choose nothing; this says what the switch did there.

    python bench/privacy_offset_off.py --lake LAKE [--epsilons 10] --out FILE
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--epsilons", default="10")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import cellsynth.privacy.dp_stats as S

    S.OFFSET_ON = False  # the radio stage runs in this process (generate.use_ray=false in privacy.py)
    sys.argv = ["bench/privacy.py", "--lake", args.lake, "--epsilons", args.epsilons, "--out", args.out]
    runpy.run_path(str(Path(__file__).resolve().parent / "privacy.py"), run_name="__main__")


if __name__ == "__main__":
    main()
