"""Known-noise check of the radio model's aleatoric / epistemic split, per calibration.RANDOM_CV mode.

The simulated world of tests/test_synthesizer.py (six sectors, RSRP = -40 - 30 log10(d) + N(0, 2 dB),
rounded to 1 dB: about 2.02 dB of noise in all) is fitted with `MDTSynthesizer` under each mode and
600 reports are sampled (window "h12_24", rng 3, as the test does); the record holds the median
aleatoric, epistemic and total RSRP std of those reports. The test asserts the aleatoric median
is 2.0 +- 0.4 dB for the default; this script records the figure for candidate modes so a rule
can weigh it (session 14's rule J lowered it; GUMBLE eq. 19's split is a property the product states).

A mode "<RANDOM_CV>+tree" also sets stacking.TREE_STACK (session 17, rule T: a forest in the mean's stack);
"<RANDOM_CV>+tree_fade" sets TREE_STACK and TREE_FADE (rule T': that forest faded with the nearest row's distance;
the default since session 17); a plain "<RANDOM_CV>" mode has no forest. A further "+cell_theta" suffix
(session 18, rule F) sets foldcv.FOLD_THETA = "cell" (refitted folds on the cell's own hyperparameters), e.g.
"kfold_mean+tree_fade+cell_theta"; "+cell_theta_random" (rule F') sets "cell_random" (only the random folds on
them); without either the folds refit them ("refit").

Usage:
    python bench/radio_known_noise.py --modes kfold_mean,kfold_split,kfold,kfold_mean+tree
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
import radio_real as rr  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "radio_known_noise.json"
# the world's noise: N(0, 2) plus the 1 dB rounding's uniform error (1 / sqrt(12) dB)
TRUE_NOISE_DB = float(np.hypot(2.0, 1.0 / np.sqrt(12.0)))


def measure(mode: str) -> dict:
    """Fit the test's world with calibration.RANDOM_CV = mode (a "+tree" suffix: stacking.TREE_STACK on; "+tree_fade":
    TREE_STACK and TREE_FADE on; "+cell_theta": foldcv.FOLD_THETA "cell"; "+cell_theta_random": "cell_random";
    else "refit"; "+near_unit": calibration.NEAR_EMPTY "unit"; "+far_unit": calibration.FAR_EMPTY "unit"; "+bin_equal":
    calibration.BIN_SET_WEIGHTS "equal_far"; "+dof_shard": calibration.DOF_GRID = DOF_CANDIDATES, the dof per shard; "+pos_noise":
    calibration.POSITION_NOISE; "+loo_small": calibration.LOO_SMALL_SAMPLE);
    medians
    of the sampled reports' stds."""
    import torch
    from test_synthesizer import CONFIG, _world

    import cellsynth.radio.calibration as cal
    import cellsynth.radio.foldcv as fcv
    import cellsynth.radio.stacking as stk
    from cellsynth import MDTSynthesizer

    torch.set_num_threads(1)
    old, old_tree, old_fade, old_theta = cal.RANDOM_CV, stk.TREE_STACK, stk.TREE_FADE, fcv.FOLD_THETA
    base, *extra = mode.split("+")
    theta_modes = {"cell_theta": "cell", "cell_theta_random": "cell_random"}
    fcv.FOLD_THETA = next((theta_modes[e] for e in extra if e in theta_modes), "refit")
    cal.RANDOM_CV = base
    # "+near_unit": calibration.NEAR_EMPTY "unit" (rule N, the default since session 21); without it "first", as
    # every record before session 21
    old_near = cal.NEAR_EMPTY
    cal.NEAR_EMPTY = "unit" if "near_unit" in extra else "first"
    # "+far_unit": calibration.FAR_EMPTY "unit" (rule Q, session 22); without it "last", as every record before
    old_far = cal.FAR_EMPTY
    cal.FAR_EMPTY = "unit" if "far_unit" in extra else "last"
    # "+bin_equal": calibration.BIN_SET_WEIGHTS "equal_far" (rule U, session 24); without it "pooled", as every record before
    old_bins = cal.BIN_SET_WEIGHTS
    cal.BIN_SET_WEIGHTS = "equal_far" if "bin_equal" in extra else "pooled"
    # "+dof_shard": the dof per shard from calibration.DOF_CANDIDATES (rule W, session 28); without it (6,), as every
    # record before
    old_dofs = cal.DOF_GRID
    cal.DOF_GRID = tuple(cal.DOF_CANDIDATES) if "dof_shard" in extra else (6.0,)
    # "+pos_noise": calibration.POSITION_NOISE (rule X, session 28); without it off, as every record before
    old_pos = cal.POSITION_NOISE
    cal.POSITION_NOISE = "pos_noise" in extra
    # "+loo_small": calibration.LOO_SMALL_SAMPLE (rule AA, session 37); without it off, as every record before
    old_loo = cal.LOO_SMALL_SAMPLE
    cal.LOO_SMALL_SAMPLE = "loo_small" in extra
    extra = [e for e in extra if e not in ("near_unit", "far_unit", "bin_equal", "dof_shard", "pos_noise", "loo_small")]
    suffix = "+".join(e for e in extra if e not in theta_modes)
    if suffix in ("tree", "tree_fade"):
        stk.TREE_STACK, stk.TREE_FADE = True, suffix == "tree_fade"
    elif suffix:
        raise SystemExit(f"ConfigError: --modes: unknown suffix +{suffix}")
    else:  # a plain mode: no forest in the stack (as every plain record before session 17's default change)
        stk.TREE_STACK = False
    try:
        t0 = time.process_time()
        mdt, cells = _world()
        out = MDTSynthesizer(CONFIG).fit(mdt, cells).sample(600, window="h12_24", rng=3)
        cpu = time.process_time() - t0
    finally:
        cal.RANDOM_CV, stk.TREE_STACK, stk.TREE_FADE, fcv.FOLD_THETA = old, old_tree, old_fade, old_theta
        cal.NEAR_EMPTY, cal.FAR_EMPTY, cal.BIN_SET_WEIGHTS, cal.DOF_GRID = old_near, old_far, old_bins, old_dofs
        cal.POSITION_NOISE, cal.LOO_SMALL_SAMPLE = old_pos, old_loo
    al, ep = out.rsrp_dbm_aleatoric_std.to_numpy(), out.rsrp_dbm_epistemic_std.to_numpy()
    return {"aleatoric_median_db": float(np.median(al)), "epistemic_median_db": float(np.median(ep)),
            "total_median_db": float(np.median(np.hypot(al, ep))), "cpu_s": cpu}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="kfold_mean")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    out_path = Path(args.out)
    result = rr.read_result(out_path)
    result["procedure"] = __doc__.split("\n\n")[1].replace("\n", " ")
    result["true_noise_db"] = TRUE_NOISE_DB
    result.setdefault("runs", {})
    import cellsynth.radio.calibration as cal
    import cellsynth.radio.foldcv as fcv
    import cellsynth.radio.stacking as stk

    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        rec = measure(mode)
        default_mode = (cal.RANDOM_CV + (("+tree_fade" if stk.TREE_FADE else "+tree") if stk.TREE_STACK else "")
                        + {"cell": "+cell_theta", "cell_random": "+cell_theta_random"}.get(fcv.FOLD_THETA, ""))
        rec.update({"default": mode == default_mode, **{k: v for k, v in rr._commit().items() if k != "commit"}})
        rr.record_run(result, mode, rec, out_path)
    return result


if __name__ == "__main__":
    main()
