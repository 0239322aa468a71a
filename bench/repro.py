"""Reproducibility harness: run the pipeline twice (separate processes, separate lakes) on the same
config and seed and diff every lake table and the metrics.

    python bench/repro.py --out /tmp/repro                  # two full runs of a reduced scenario, diff
    python bench/repro.py --out /tmp/repro --isolate        # also: rerun each stage on a copy of run A's
                                                            # inputs and diff that stage's outputs alone
    python bench/repro.py --out /tmp/repro --diff-only      # diff the lakes an earlier call left

Tables are compared as sets of rows: volatile columns (run ids, wall-clock times) dropped, rows
sorted by every remaining column, floats compared exactly (same machine, same code: a seeded
pipeline must give bit-identical output). The report lists, per table, whether it matches and the
first columns that differ. `--set` overrides go to both runs (e.g. `--set runtime.ray.n_actors=1`
for run B only with `--b-set`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("simulate", "ingest", "density", "radio", "traffic", "generate", "evaluate")
# A reduced scenario: every stage of the default chain, a few minutes on 2 cores.
REDUCED = (
    "scenario.n_sites=6", "scenario.n_reports=20000",
    "density.student_epochs=20", "radio.n_steps=300",
    "traffic.n_steps=60", "traffic.diffusion_steps=20", "traffic.sampling_steps=5",
    "evaluate.refit_n_steps=50", "evaluate.fingerprint_trees=30", "evaluate.max_test_rows=3000",
    "evaluate.max_fingerprint_train_rows=6000", "evaluate.max_privacy_rows=3000",
)
# Columns that record when or under which run id a row was written, not what it holds.
VOLATILE = {"run_id", "created_at", "started_at", "ended_at", "trained_at", "written_at", "generated_at",
            "wall_s", "seconds", "elapsed_s", "duration_s", "fit_seconds", "train_seconds", "host", "pid"}


def _run(lake: Path, data: Path, sets: list[str], stages: list[str] | None = None, force: bool = False) -> None:
    code = (
        "import sys\n"
        "from cellsynth.cluster import runtime\n"
        "from cellsynth.config import load_config\n"
        "from cellsynth.pipeline import run_pipeline\n"
        "cfg = load_config(sys.argv[1], sys.argv[4:])\n"
        "stages = sys.argv[2].split(',') if sys.argv[2] else None\n"
        "with runtime(cfg, quiet=True) as rt:\n"
        "    run_pipeline(rt, stages=stages, force=sys.argv[3] == '1')\n"
    )
    overrides = [f"run.lake_root={lake}", f"run.data_dir={data}", *sets]
    cmd = [sys.executable, "-c", code, str(ROOT / "conf" / "local.yaml"), ",".join(stages or ()),
           "1" if force else "0", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT)


def _volatile(col: str) -> bool:
    return col in VOLATILE or col.endswith(("_at", "_seconds", "run_id")) or col == "path"


def _timing_metric(name: object) -> bool:
    s = str(name)
    return "seconds" in s or s.endswith(("_s", "_wall", "_minutes")) or "rows_per_min" in s or "_gb" in s


def _canon(df: pd.DataFrame) -> pd.DataFrame:
    if "metric" in df.columns and "value" in df.columns:  # metrics: wall times are not results
        df = df[~df["metric"].map(_timing_metric)]
    df = df[[c for c in sorted(df.columns) if not _volatile(c)]].copy()
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(lambda v: json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str,
                                                   sort_keys=True))
    return df.sort_values(list(df.columns), kind="mergesort").reset_index(drop=True) if len(df.columns) else df


def diff_table(lake_a, lake_b, table: str) -> dict:
    a, b = _canon(lake_a.read_pandas(table, network_scenario=None)), _canon(lake_b.read_pandas(table, network_scenario=None))
    out: dict = {"rows": [len(a), len(b)]}
    if list(a.columns) != list(b.columns):
        out["columns"] = sorted(set(a.columns) ^ set(b.columns))
        return out
    if len(a) != len(b):
        return out
    cols = []
    for c in a.columns:
        x, y = a[c], b[c]
        if x.dtype.kind == "f" and y.dtype.kind == "f":
            xv, yv = x.to_numpy(float), y.to_numpy(float)
            same = (xv == yv) | (np.isnan(xv) & np.isnan(yv))
        else:
            same = (x.astype(str).to_numpy() == y.astype(str).to_numpy())
        if not same.all():
            d = {"col": c, "n_diff": int((~same).sum())}
            if x.dtype.kind == "f":
                d["max_abs"] = float(np.nanmax(np.abs(x.to_numpy(float) - y.to_numpy(float))))
            cols.append(d)
    if cols:
        out["differ"] = cols
    return out


def diff_lakes(a: Path, b: Path, tables: list[str] | None = None) -> dict:
    from cellsynth.lake import Lake

    la, lb = Lake(a), Lake(b)
    names = tables or [t.name for t in la.tables() if t.name != "runs"]
    res = {}
    for t in names:
        if not lb.exists(t):
            res[t] = {"missing_in_b": True}
            continue
        try:
            res[t] = diff_table(la, lb, t)
        except Exception as err:  # noqa: BLE001 - a table the harness cannot read is reported, not fatal
            res[t] = {"error": repr(err)[:200]}
    return res


def _same(d: dict) -> bool:
    return "differ" not in d and "columns" not in d and d.get("rows", [0, 0])[0] == d.get("rows", [0, 0])[1] \
        and "error" not in d and "missing_in_b" not in d


def metrics_diff(a: Path, b: Path) -> list[dict]:
    from cellsynth.lake import Lake

    ma, mb = (Lake(p).read_pandas("metrics") for p in (a, b))
    keys = [c for c in ("stage", "metric", "model", "split", "window", "cell_id", "detail") if c in ma.columns]
    ma, mb = (m[m["stage"] == "evaluate"] if "stage" in m.columns else m for m in (ma, mb))
    ma, mb = (m[~m["metric"].map(_timing_metric)].drop_duplicates(keys) for m in (ma, mb))
    j = ma.merge(mb, on=keys, how="outer", suffixes=("_a", "_b"))
    j = j[~((j["value_a"] == j["value_b"]) | (j["value_a"].isna() & j["value_b"].isna()))]
    return j[[k for k in keys if k != "detail"] + ["value_a", "value_b"]].head(40).to_dict(orient="records")


def headline(a: Path, b: Path) -> dict:
    """The overall evaluate figures the README quotes (RSRP MAE of ours and the baselines, traffic
    JSD, ...) of both runs, for the record."""
    from cellsynth.evaluate.report import _overall
    from cellsynth.lake import Lake

    out = {}
    for name, root in (("a", a), ("b", b)):
        o = _overall(Lake(root).read_pandas("metrics"))
        keep = o["metric"].isin(["rsrp_mae_dbm", "rsrq_mae_db", "rsrp_calibration_error", "jsd", "crps_mb",
                                 "association_accuracy", "fingerprint_rmse_ratio", "privacy_dcr_ratio"])
        out[name] = {f"{r.metric}/{r.model}/{r.split}": r.value for r in o[keep].itertuples()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="override for both runs")
    ap.add_argument("--b-set", action="append", default=[], dest="b_sets", help="override for run B only")
    ap.add_argument("--full", action="store_true", help="the default scenario instead of the reduced one")
    ap.add_argument("--isolate", action="store_true", help="also rerun each stage alone on run A's inputs")
    ap.add_argument("--diff-only", action="store_true")
    ap.add_argument("--skip-a", action="store_true", help="reuse run A's lake")
    ap.add_argument("--json", help="also write the report here (e.g. bench/results/repro_reduced.json)")
    ap.add_argument("--commit", help="the commit the runs used, when not this checkout's HEAD (e.g. an exported tree)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    sets = ([] if args.full else list(REDUCED)) + args.sets
    a, b = out / "a", out / "b"
    if not args.diff_only:
        if not args.skip_a:
            shutil.rmtree(a, ignore_errors=True)
            _run(a / "lake", a / "data", sets)
        shutil.rmtree(b, ignore_errors=True)
        _run(b / "lake", b / "data", sets + args.b_sets)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    report: dict = {"what": "two runs of `cellsynth run` (separate processes, separate lakes) on conf/local.yaml with "
                            "these overrides; every lake table diffed as a set of rows, values exact",
                    "commit": commit, "sets": sets, "b_sets": args.b_sets}
    res = diff_lakes(a / "lake", b / "lake")
    report["tables"] = res
    report["differing"] = sorted(t for t, d in res.items() if not _same(d))
    try:
        report["metrics"] = metrics_diff(a / "lake", b / "lake")
    except Exception as err:  # noqa: BLE001
        report["metrics"] = repr(err)
    try:
        report["headline"] = headline(a / "lake", b / "lake")
    except Exception as err:  # noqa: BLE001
        report["headline"] = repr(err)
    if args.isolate:
        iso = {}
        for stage in STAGES[1:]:
            c = out / f"iso-{stage}"
            shutil.rmtree(c, ignore_errors=True)
            shutil.copytree(a, c, symlinks=True)
            _run(c / "lake", a / "data", sets + args.b_sets, stages=[stage], force=True)
            iso[stage] = {t: d for t, d in diff_lakes(a / "lake", c / "lake").items() if not _same(d)}
            shutil.rmtree(c, ignore_errors=True)
        report["isolated"] = iso
    (out / "repro.json").write_text(json.dumps(report, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({"differing": report["differing"], "isolated": report.get("isolated"), "headline": report["headline"],
                      "metrics": report["metrics"][:10] if isinstance(report["metrics"], list) else report["metrics"]},
                     indent=1, default=str))
    return 0 if not report["differing"] else 1


if __name__ == "__main__":
    sys.exit(main())
