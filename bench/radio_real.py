"""Radio accuracy on real drive tests (UCC 5G, Driving traces only): our batched Bayesian model
vs kNN, random forest and GP, per cell, on a random 65/35 split and a 200 m spatial-block split.

Writes bench/results/radio_real.json. Usage:
    .venv/bin/python bench/radio_real.py [--steps 2000] [--centres 32] [--max-cells 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellsynth.evaluate.metrics import calibration_error, mae, mean_epistemic, rmse, sharpness
from cellsynth.geo import LocalFrame
from cellsynth.radio.baselines import BASELINES
from cellsynth.radio.model import CellData, FitSettings, fit_cells
from cellsynth.splits import random_test_mask, spatial_block_test_mask

ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ucc-5g" / "5G-production-dataset.zip"
MIN_TRAIN, MIN_TEST = 30, 5


def load_ucc_driving(zip_path: Path = ZIP) -> pd.DataFrame:
    """Driving traces: one row per sample with x_m, y_m, cell_id, rsrp_dbm, rsrq_db, trace.

    Rows repeating (position, cell, RSRP, RSRQ) exactly are dropped: the logger writes a row per
    second but the GPS fix updates less often, and identical copies would sit on both sides of a
    random split.
    """
    frames = []
    with zipfile.ZipFile(zip_path) as zf, tempfile.TemporaryDirectory() as tmp:
        names = [n for n in zf.namelist() if "/Driving/" in n and n.endswith(".csv") and "__MACOSX" not in n]
        for name in names:
            zf.extract(name, tmp)
            df = pd.read_csv(os.path.join(tmp, name), na_values=["-", ""], low_memory=False)
            df["trace"] = name
            frames.append(df[["Latitude", "Longitude", "RAWCELLID", "RSRP", "RSRQ", "trace"]])
    raw = pd.concat(frames, ignore_index=True)
    df = raw.dropna(subset=["Latitude", "Longitude", "RAWCELLID", "RSRP"])
    df = df.drop_duplicates(["Latitude", "Longitude", "RAWCELLID", "RSRP", "RSRQ"]).reset_index(drop=True)
    frame = LocalFrame.around(df["Latitude"].to_numpy(), df["Longitude"].to_numpy())
    x_m, y_m = frame.to_xy(df["Latitude"].to_numpy(), df["Longitude"].to_numpy())
    out = pd.DataFrame({"report_id": np.arange(len(df)).astype(str), "x_m": x_m, "y_m": y_m,
                        "cell_id": df["RAWCELLID"].astype(np.int64).astype(str), "rsrp_dbm": df["RSRP"].astype(float),
                        "rsrq_db": df["RSRQ"].astype(float), "trace": df["trace"]})
    out.attrs["n_raw_rows"] = len(raw)
    return out


def evaluate_split(df: pd.DataFrame, test: np.ndarray, *, settings: FitSettings, seed: int, max_cells: int,
                   previous: dict | None = None) -> dict:
    """Fit and score every model; with `previous` (this split's entry of an earlier result file on
    the same data, split and seed) the baselines' scores are copied from it instead of refitted:
    they do not depend on our model, and the GP alone takes ~12 min on 2 cores."""
    train = df[~test]
    counts_tr = train.groupby("cell_id").size()
    counts_te = df[test].groupby("cell_id").size()
    cells = sorted(set(counts_tr[counts_tr >= MIN_TRAIN].index) & set(counts_te[counts_te >= MIN_TEST].index))
    if max_cells:
        cells = cells[:max_cells]
    data = []
    for c in cells:
        rows = train[train["cell_id"] == c]
        data.append(CellData(c, rows[["x_m", "y_m"]].to_numpy(), rows["rsrp_dbm"].to_numpy()))
    t0 = time.perf_counter()
    fitted = fit_cells(data, target="rsrp", settings=settings, seed=seed)
    fit_s = time.perf_counter() - t0
    reuse = previous is not None and previous.get("n_cells") == len(cells)
    baselines = {} if reuse else BASELINES
    per_cell: dict[str, list] = {m: [] for m in ("bnn", *baselines)}
    pooled: dict[str, dict[str, list]] = {m: {"y": [], "mean": [], "std": []} for m in per_cell}
    epistemic = []
    times = {m: 0.0 for m in BASELINES}
    for i, c in enumerate(cells):
        tr = train[train["cell_id"] == c]
        te = df[test & (df["cell_id"] == c)]
        xy_te, y_te = te[["x_m", "y_m"]].to_numpy(), te["rsrp_dbm"].to_numpy()
        pred = fitted.predict(np.full(len(te), i), xy_te, n_samples=64, seed=seed)
        outs = {"bnn": (pred.mean, pred.total_std)}
        epistemic.append(pred.epistemic_std)
        for name, fn in baselines.items():
            t0 = time.perf_counter()
            outs[name] = fn(tr[["x_m", "y_m"]].to_numpy(), tr["rsrp_dbm"].to_numpy(), xy_te)
            times[name] += time.perf_counter() - t0
        for name, (m, s) in outs.items():
            per_cell[name].append(mae(y_te, m))
            pooled[name]["y"].append(y_te)
            pooled[name]["mean"].append(m)
            pooled[name]["std"].append(s)
    result = {"n_cells": len(cells), "n_train": int(train["cell_id"].isin(cells).sum()),
              "n_test": int((test & df["cell_id"].isin(cells)).sum()), "bnn_fit_s": fit_s,
              # what the internal block CV and the leave-one-out recalibration chose (training rows only)
              "calibration": {"gap_smoother": {"mode": int(fitted.geometry.far_mode[0]),
                                               "length_m": float(fitted.geometry.far_length_m[0]),
                                               "lambda": float(fitted.geometry.far_lambda[0]),
                                               "blend_m": float(fitted.geometry.far_blend_m[0])},
                              "aleatoric_scale": float(fitted.geometry.aleatoric_scale[0]),
                              # factor on the local term from the random K-fold CV (1.0: as trained)
                              "local_weight": float(fitted.geometry.local_weight[0]),
                              "local_stretch": float(fitted.geometry.local_stretch[0])},
              "baseline_fit_s": previous["baseline_fit_s"] if reuse else times, "models": {}}
    if reuse:
        result["baselines_reused"] = True
        for name in BASELINES:
            result["models"][name] = previous["models"][name]
    for name in per_cell:
        y = np.concatenate(pooled[name]["y"])
        m = np.concatenate(pooled[name]["mean"])
        s = np.concatenate(pooled[name]["std"])
        result["models"][name] = {
            "median_cell_mae_db": float(np.median(per_cell[name])), "mae_db": mae(y, m), "rmse_db": rmse(y, m),
            "calibration_error": calibration_error(y, m, s), "sharpness_mean_db": sharpness(s)[0],
            "sharpness_std_db": sharpness(s)[1],
        }
    result["models"]["bnn"]["mean_epistemic_db"] = mean_epistemic(np.concatenate(epistemic))
    best = min(BASELINES, key=lambda n: result["models"][n]["median_cell_mae_db"])
    result["best_baseline"] = best
    result["bnn_minus_best_median_mae_db"] = result["models"]["bnn"]["median_cell_mae_db"] - result["models"][best]["median_cell_mae_db"]
    result["bnn_minus_gp_ce"] = result["models"]["bnn"]["calibration_error"] - result["models"]["gp"]["calibration_error"]
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--centres", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--max-cells", type=int, default=0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-local-cv", action="store_true", help="skip the random K-fold CV of the local-term factor")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "radio_real.json"))
    ap.add_argument("--reuse-baselines", default=None, help="earlier result file whose baseline scores to copy")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="sklearn")  # GP hyperparameters at their bounds on tiny cells
    if not ZIP.exists():
        raise SystemExit(f"UCC data not found at {ZIP}")
    df = load_ucc_driving()
    settings = FitSettings(n_centres=args.centres, n_steps=args.steps, learning_rate=args.lr,
                            local_cv=not args.no_local_cv)
    splits = {
        "spatial_block_200m": spatial_block_test_mask(df["x_m"].to_numpy(), df["y_m"].to_numpy(), block_m=200.0,
                                                      test_fraction=0.35, seed=args.seed),
        "random_65_35": random_test_mask(df["report_id"].to_numpy(), test_fraction=0.35, seed=args.seed),
    }
    out = {"dataset": "ucc-5g Driving traces", "n_raw_rows": df.attrs["n_raw_rows"], "n_rows_dedup": len(df),
           "settings": settings.as_dict(), "seed": args.seed,
           "machine": {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
           "splits": {}}
    previous = {}
    if args.reuse_baselines:
        old = json.loads(Path(args.reuse_baselines).read_text())
        if old.get("seed") == args.seed and old.get("n_rows_dedup") == len(df) and not args.max_cells:
            previous = old["splits"]
    for name, mask in splits.items():
        out["splits"][name] = evaluate_split(df, mask, settings=settings, seed=args.seed, max_cells=args.max_cells,
                                             previous=previous.get(name))
        print(name, json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in out["splits"][name]["models"].items()}))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))  # after each split: a long run keeps what it has
    return out


if __name__ == "__main__":
    main()
