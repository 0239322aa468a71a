"""The human report: matplotlib (Agg) PNGs next to one self-contained `index.html`.

Everything is drawn from frames already read from the lake (metrics with their JSON `detail`
curves, synthetic and real samples, spatial maps, rejects); a section whose data is absent says
so instead of failing.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellsynth.schemas import AREA_CELL_ID  # noqa: E402


# ----------------------------------------------------------------------------- summary
# The first screen of the report: one line per headline figure, ours against its reference, with
# a plain pass/warn mark and the rule that set it. Built from the metrics table alone, so figures
# another stage adds (privacy_* audits, baseline settings) appear when present and are skipped when
# absent. Thresholds are fixed a priori; each rule says why in its text.
@dataclass(frozen=True)
class SummaryRule:
    """One summary figure: `metric` of model `ours` vs each of `versus` (None: every other model
    of the metric) on the first of `splits` present, or vs `threshold` when no reference exists."""

    area: str
    label: str
    metric: str
    better: str  # "lower" | "higher"
    ours: str | None = None
    versus: tuple[str, ...] | None = None
    splits: tuple[str, ...] = ("test", "")
    versus_split: str | None = None  # compare ours with the same metric on another split
    threshold: float | None = None
    rule: str = ""


SUMMARY_RULES: tuple[SummaryRule, ...] = (
    SummaryRule("RSRP", "RSRP MAE [dB]", "rsrp_mae_dbm", "lower", ours="bnn", rule="pass if ours <= baseline"),
    SummaryRule("RSRP", "RSRP calibration error (eq. 26)", "rsrp_calibration_error", "lower", ours="bnn",
                rule="pass if ours <= baseline"),
    SummaryRule("RSRP", "RSRP epistemic std outside vs inside data [dB]", "rsrp_mean_epistemic_db", "higher",
                ours="bnn", splits=("outside",), versus_split="inside", rule="pass if outside > inside (eq. 30)"),
    SummaryRule("RSRQ", "RSRQ MAE [dB]", "rsrq_mae_db", "lower", ours="bnn", rule="pass if ours <= baseline"),
    SummaryRule("RSRQ", "RSRQ calibration error (eq. 26)", "rsrq_calibration_error", "lower", ours="bnn",
                threshold=0.05, rule="pass if ours <= baseline, else if <= 0.05 (no baseline)"),
    SummaryRule("Association", "serving-cell accuracy", "association_accuracy", "higher", ours="kde",
                versus=("nearest_site", "kde_ml"), splits=("observed", "test"),
                rule="pass if ours >= reference (nearest site; GUMBLE eq. 15 without prior)"),
    SummaryRule("Maps", "map 2-D KS to truth", "map_ks_mean", "lower", ours="kde", versus=("voronoi",), splits=("all",),
                rule="pass if ours <= Voronoi"),
    SummaryRule("Maps", "map 2-D KS, cells unseen by the student", "map_ks_mean", "lower", ours="student",
                versus=("voronoi",), splits=("holdout_cells",), rule="pass if student <= Voronoi"),
    SummaryRule("Synthetic", "fingerprinting RMSE, synthetic / real", "fingerprint_rmse_ratio", "lower",
                threshold=1.25, splits=("test", ""), rule="pass if <= 1.25 (GUMBLE 6.4 reports 1.07)"),
    SummaryRule("Privacy", "DCR median, synthetic / held-out real", "privacy_dcr_ratio", "higher", threshold=0.9,
                splits=("to_train", "test", ""), rule="pass if >= 0.9 (privacy.min_dcr_ratio default)"),
    SummaryRule("Traffic", "traffic JSD, unseen cells", "jsd", "lower", ours="diffusion", splits=("holdout_cells",),
                rule="pass if ours <= baseline"),
    SummaryRule("Traffic", "traffic CRPS [MB], unseen cells", "crps_mb", "lower", ours="diffusion",
                splits=("holdout_cells",), rule="pass if ours <= baseline"),
)
# privacy_* metrics without a rule above (membership-inference audits): a priori bounds by name.
PRIVACY_KEYWORD_RULES: tuple[tuple[str, str, float, str], ...] = (
    ("auc", "lower", 0.6, "pass if <= 0.6 (0.5 = attacker at chance)"),
    ("tpr", "lower", 0.05, "pass if <= 0.05 at the audited FPR (1% = chance at 1% FPR)"),
    ("advantage", "lower", 0.1, "pass if <= 0.1"),
    ("epsilon", "lower", float("inf"), "spent privacy budget (information)"),
)
REJECT_SHARE_WARN = 0.10  # more than 10% of raw rows rejected suggests a source mapping problem


def _latest_run(metrics: pd.DataFrame) -> pd.DataFrame:
    # metrics accumulates across runs (append per stage); keep each stage's newest run_id.
    if metrics.empty or not {"run_id", "stage"} <= set(metrics.columns):
        return metrics
    newest = metrics.groupby("stage")["run_id"].transform("max")
    return metrics[metrics["run_id"] == newest]


def _overall(metrics: pd.DataFrame) -> pd.DataFrame:
    if metrics.empty:
        return metrics
    m = _latest_run(metrics)
    keep = m["value"].notna()
    for col in ("cell_id", "window"):
        if col in m:
            keep &= m[col].isna()
    m = m[keep]
    return m.assign(split=m["split"].fillna("") if "split" in m else "", model=m["model"].fillna("") if "model" in m else "")


def baseline_settings(metrics: pd.DataFrame) -> dict[str, str]:
    """Model -> settings text, from any row whose JSON `detail` holds a `settings` entry (the
    evaluate stage's baselines) or a `baseline_settings` metric row; empty when none is recorded."""
    out: dict[str, str] = {}
    if metrics.empty or "detail" not in metrics:
        return out
    m = _latest_run(metrics)
    rows = m[m["detail"].notna() & m["model"].notna()]
    for model, detail, metric in zip(rows["model"], rows["detail"], rows["metric"]):
        if model in out or not isinstance(detail, str) or "settings" not in detail and metric != "baseline_settings":
            continue
        try:
            d = json.loads(detail)
        except ValueError:
            continue
        settings = d.get("settings", d) if isinstance(d, dict) else d
        if isinstance(settings, dict):
            out[str(model)] = ", ".join(f"{k}={v}" for k, v in settings.items())
        elif settings:
            out[str(model)] = str(settings)
    return out


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _mark(ours: float, ref: float, better: str) -> str:
    return "pass" if (ours <= ref if better == "lower" else ours >= ref) else "warn"


def summary_table(metrics: pd.DataFrame, *, rejects: pd.DataFrame | None = None, n_clean_reports: int | None = None) -> pd.DataFrame:
    """The report's opening table: area, figure, ours, reference (with its settings on the baseline's first
    line), mark, rule.

    One line per rule and reference model found in `metrics` (newest run per stage, overall rows);
    rules whose metric is absent are left out. `rejects` (source, reason_code) and the clean
    report count add the data-quality line.
    """
    cols = ["area", "figure", "ours", "reference", "mark", "rule"]
    lines: list[dict] = []
    m = _overall(metrics) if not metrics.empty else metrics
    settings = baseline_settings(metrics)
    fmt = _fmt
    for r in SUMMARY_RULES if not m.empty else ():
        rows = m[m["metric"] == r.metric]
        split = next((s for s in r.splits if (rows["split"] == s).any()), None)
        if split is None:
            continue
        here = rows[rows["split"] == split]
        if r.ours is not None:
            mine = here[here["model"] == r.ours]
            if mine.empty:
                continue
            ours = float(mine["value"].iloc[0])
        else:
            ours = float(here["value"].iloc[0])
        refs: list[tuple[str, float]] = []
        if r.versus_split is not None:
            other = rows[(rows["split"] == r.versus_split) & (rows["model"] == (r.ours or rows["model"]))]
            refs = [(r.versus_split, float(other["value"].iloc[0]))] if len(other) else []
        elif r.ours is not None:
            others = here[here["model"] != r.ours].drop_duplicates("model")
            wanted = r.versus if r.versus is not None else tuple(sorted(others["model"]))
            refs = [(name, float(others.loc[others["model"] == name, "value"].iloc[0]))
                    for name in wanted if (others["model"] == name).any() and not name.endswith("_refit")]
        for name, value in refs:
            # a baseline's settings once, on its first line: repeated on every figure (RSRP and RSRQ, MAE and
            # calibration) they pushed the table past the first screen
            ref_text = f"{name} {fmt(value)}" + (f" ({settings.pop(name)})" if name in settings else "")
            lines.append({"area": r.area, "figure": r.label, "ours": fmt(ours), "reference": ref_text,
                          "mark": _mark(ours, value, r.better), "rule": r.rule})
        if not refs and r.threshold is not None:
            lines.append({"area": r.area, "figure": r.label, "ours": fmt(ours), "reference": f"bound {fmt(r.threshold)}",
                          "mark": _mark(ours, r.threshold, r.better), "rule": r.rule})
        elif not refs and r.ours is not None and r.versus_split is None:
            lines.append({"area": r.area, "figure": r.label, "ours": fmt(ours), "reference": "no baseline run",
                          "mark": "info", "rule": r.rule})
    lines += _privacy_lines(m)
    if rejects is not None and n_clean_reports is not None:
        lines.append(_reject_line(rejects, n_clean_reports))
    return pd.DataFrame(lines, columns=cols)


def _privacy_lines(m: pd.DataFrame) -> list[dict]:
    if m.empty:
        return []
    known = {r.metric for r in SUMMARY_RULES} | {"privacy_dcr_median", "privacy_dcr_flag"}
    out = []
    extra = m[m["metric"].str.startswith("privacy_") & ~m["metric"].isin(known)]
    for (metric, model, split), grp in extra.groupby(["metric", "model", "split"], sort=True):
        value = float(grp["value"].iloc[0])
        rule = next((k for k in PRIVACY_KEYWORD_RULES if k[0] in metric), None)
        # The first screen keeps the audited headline figures; interval ends and the distance
        # shares without a bound stay in the privacy section below.
        if rule is None or metric.endswith(("_lower", "_upper")):
            continue
        figure = metric.removeprefix("privacy_").replace("_", " ") + (f" ({model})" if model else "") + (f" [{split}]" if split not in ("", "test") else "")
        if rule is None or not np.isfinite(rule[2]):
            out.append({"area": "Privacy", "figure": figure, "ours": f"{value:.3g}", "reference": "",
                        "mark": "info", "rule": rule[3] if rule else "no rule for this figure (information)"})
        else:
            out.append({"area": "Privacy", "figure": figure, "ours": f"{value:.3g}", "reference": f"bound {rule[2]:g}",
                        "mark": _mark(value, rule[2], rule[1]), "rule": rule[3]})
    flag = m[m["metric"] == "privacy_dcr_flag"]
    if len(flag):
        copies = "closer to training rows than held-out rows" if float(flag["value"].iloc[0]) > 0 else "not closer than held-out rows"
        out.append({"area": "Privacy", "figure": "synthetic rows vs training rows (DCR flag)", "ours": copies,
                    "reference": "", "mark": "warn" if float(flag["value"].iloc[0]) > 0 else "pass",
                    "rule": "pass if no exact copy and synthetic median DCR >= held-out median DCR"})
    return out


def _reject_line(rejects: pd.DataFrame, n_clean: int) -> dict:
    n_rej = len(rejects)
    share = n_rej / max(n_rej + n_clean, 1)
    if n_rej and "reason_code" in rejects:
        reasons = rejects["reason_code"].astype(str).str.split(";").explode().value_counts()
        why = ", ".join(f"{k} {v}" for k, v in reasons.head(4).items())
    else:
        why = "none"
    return {"area": "Data", "figure": "raw rows rejected (top reasons)", "ours": f"{n_rej} ({share:.1%})",
            "reference": why, "mark": "pass" if share <= REJECT_SHARE_WARN else "warn",
            "rule": f"pass if <= {REJECT_SHARE_WARN:.0%} of rows (clean reports + rejects)"}


def summary_html(table: pd.DataFrame) -> str:
    """The summary as an HTML table with coloured pass/warn marks."""
    if table.empty:
        return "<p class='missing'>No headline figures in the metrics table.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body, previous = [], None
    for row in table.itertuples(index=False):
        # A figure compared with several references: its area, name and value are written once.
        same = previous is not None and (row.area, row.figure, row.ours) == previous
        previous = (row.area, row.figure, row.ours)
        cells = [f"<td class='{'mark ' + row.mark if col == 'mark' else ''}'>"
                 f"{'' if same and col in ('area', 'figure', 'ours') else html.escape(str(v))}</td>"
                 for col, v in zip(table.columns, row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='summary'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


@dataclass
class ReportData:
    metrics: pd.DataFrame
    synthetic: pd.DataFrame | None = None
    reports: pd.DataFrame | None = None  # real mdt_reports (x_m, y_m, serving_cell_id, window)
    # clean reports in all (`reports` may hold one window only: report_stage.samples_for_report)
    n_reports: int | None = None
    spatial_maps: pd.DataFrame | None = None
    # The methods spatial_maps holds, when `spatial_maps` is only the rows the map figure draws
    # (report_stage.maps_for_report; issue 15); None: read from `spatial_maps`.
    map_methods: set[str] | None = None
    # The map figure's window and cells (`best_measured_map_cells`); None: the most KDE squares.
    map_window: str | None = None
    map_cells: list[str] | None = None
    rejects: pd.DataFrame | None = None
    cells: pd.DataFrame | None = None
    truth_maps: pd.DataFrame | None = None  # simulator ground truth (window, cell_id, gx, gy, prob)
    # Extra sections from other stages' PNGs already in the report folder: (title, file, caption).
    extra_images: list[tuple[str, str, str]] = field(default_factory=list)
    title: str = "cellsynth report"
    notes: list[str] = field(default_factory=list)


def _sub(frame: pd.DataFrame, n_max: int, seed: int = 0) -> pd.DataFrame:
    return frame if len(frame) <= n_max else frame.sample(n=n_max, random_state=seed)


def _colours(ids: pd.Series) -> np.ndarray:
    codes = pd.Categorical(ids.astype(str)).codes
    return plt.get_cmap("tab20")(codes % 20)


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    return name


def _detail(row: pd.Series) -> dict:
    return json.loads(row["detail"]) if isinstance(row.get("detail"), str) else {}


def _samples_map(data: ReportData, out: Path, max_points: int) -> str | None:
    if data.synthetic is None or data.reports is None or data.synthetic.empty or data.reports.empty:
        return None
    window = data.synthetic["window"].value_counts().index[0]
    real = _sub(data.reports[data.reports["window"] == window], max_points)
    syn = _sub(data.synthetic[data.synthetic["window"] == window], max_points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    for ax, frame, name in ((axes[0], real, "real"), (axes[1], syn, "synthetic")):
        ax.scatter(frame["x_m"], frame["y_m"], c=_colours(frame["serving_cell_id"]), s=2, linewidths=0)
        ax.set_title(f"{name} samples, window {window} (colour = serving cell)")
        ax.set_xlabel("x [m]")
        ax.set_aspect("equal")
    if data.cells is not None:
        for ax in axes:
            ax.scatter(data.cells["x_m"], data.cells["y_m"], marker="^", c="k", s=14)
    axes[0].set_ylabel("y [m]")
    return _save(fig, out, "samples_real_vs_synthetic.png")


def _raster(m: pd.DataFrame, box: tuple[int, int, int, int]) -> np.ndarray:
    # Squares outside the map hold no mass: 0, so every panel shares one background colour.
    gx0, gx1, gy0, gy1 = box
    img = np.zeros((gy1 - gy0 + 1, gx1 - gx0 + 1))
    inside = m["gx"].between(gx0, gx1) & m["gy"].between(gy0, gy1)
    m = m[inside]
    img[m["gy"].to_numpy() - gy0, m["gx"].to_numpy() - gx0] = m["prob"].to_numpy()
    return img


MAP_MASS_SHOWN = 0.98  # each panel's extent covers the squares holding 98% of every map's mass


def _mass_box(m: pd.DataFrame, share: float) -> tuple[int, int, int, int]:
    # Bounding box of the smallest set of squares (largest first) holding `share` of the mass.
    order = m.sort_values("prob", ascending=False)
    cum = order["prob"].cumsum().to_numpy() / max(float(order["prob"].sum()), 1e-300)
    top = order.iloc[: int(np.searchsorted(cum, share)) + 1]
    return int(top["gx"].min()), int(top["gx"].max()), int(top["gy"].min()), int(top["gy"].max())


def _resolution_m(frames: list[pd.DataFrame]) -> float | None:
    for m in frames:
        if {"x_m", "gx"} <= set(m.columns) and len(m):
            return float(np.median(m["x_m"].to_numpy() / (m["gx"].to_numpy() + 0.5)))
    return None


def map_panel_layout(per: list[pd.DataFrame], *, mass_share: float = MAP_MASS_SHOWN, pad_squares: int = 2
                     ) -> tuple[tuple[int, int, int, int], float]:
    """One cell's shared panel extent (gx0, gx1, gy0, gy1) and colour maximum.

    The extent is the union of each map's `mass_share` box plus a margin, so a diffuse map (a
    Voronoi polygon at the layout edge, a student patch) neither shrinks the others to a speck
    nor is cut off where it holds mass; the colour maximum is the largest square probability
    shown, so equal colours mean equal P(UE in square | cell) in every panel.
    """
    present = [m for m in per if len(m) and float(m["prob"].sum()) > 0]
    boxes = [_mass_box(m, mass_share) for m in present]
    box = (min(b[0] for b in boxes) - pad_squares, max(b[1] for b in boxes) + pad_squares,
           min(b[2] for b in boxes) - pad_squares, max(b[3] for b in boxes) + pad_squares)
    vmax = max(float(_raster(m, box).max()) for m in present)
    return box, vmax


def example_map_cells(kde: pd.DataFrame, n_cells: int) -> pd.Index:
    """The cells the map figure shows when no `kde_models` row counts (`best_measured_map_cells`):
    the n_cells with the most KDE squares in its window (ties by cell id)."""
    return cells_with_most_squares(kde.groupby("cell_id")["prob"].size(), n_cells)


def best_measured_map_cells(kde_models: pd.DataFrame, n_cells: int) -> tuple[str | None, list[str]]:
    """(window, cells) of the map figure: the window with the most reports and its n_cells cells with
    the most reports (ties by label). A KDE is only as good as its reports: the cells with the most
    KDE squares, the choice before, are the sparsest ones on real drive tests (3-11 reports in a
    window, wide fallback bandwidths: maps near uniform), while on the simulator both rules agree."""
    km = kde_models[["window", "cell_id", "n_reports"]].dropna(subset=["window", "cell_id"])
    km = km[km["cell_id"] != AREA_CELL_ID]  # the area density's row: every report, no cell's map
    if km.empty:
        return None, []
    per_window = km.groupby("window")["n_reports"].sum()
    window = per_window.sort_index().sort_values(ascending=False, kind="stable").index[0]
    per_cell = km[km["window"] == window].groupby("cell_id")["n_reports"].sum()
    return window, cells_with_most_squares(per_cell, n_cells).tolist()


def cells_with_most_squares(squares: pd.Series, n_cells: int) -> pd.Index:
    """The n_cells cells with the highest count ({cell_id: count}: KDE squares for `example_map_cells`,
    reports for `best_measured_map_cells`), ties by cell id."""
    return squares.sort_index().sort_values(ascending=False, kind="stable").index[:n_cells]


def _maps(data: ReportData, out: Path, n_cells: int) -> str | None:
    sm = data.spatial_maps
    methods = data.map_methods if data.map_methods is not None else (set() if sm is None else set(sm["method"]))
    if sm is None or sm.empty or not {"kde", "voronoi"} <= methods:
        return None
    kde = sm[sm["method"] == "kde"]
    window = data.map_window if data.map_window is not None else kde["window"].value_counts().index[0]
    kde = kde[kde["window"] == window]
    have = set(kde["cell_id"])
    cells = ([c for c in data.map_cells if c in have][:n_cells] if data.map_cells is not None
             else example_map_cells(kde, n_cells))
    if not len(cells):
        return None
    rows: list[tuple[str, pd.DataFrame]] = []
    if data.truth_maps is not None and not data.truth_maps.empty:
        truth = data.truth_maps
        rows.append(("truth", truth[truth["window"] == window] if "window" in truth else truth))
    rows += [("KDE", kde), ("Voronoi", sm[sm["method"] == "voronoi"])]
    if "student" in methods:
        rows.append(("student", sm[sm["method"] == "student"]))
    ks = data.metrics[(data.metrics["metric"] == "map_ks") & data.metrics["cell_id"].notna()]
    res_m = _resolution_m([frame for _, frame in rows])
    sites = data.cells.set_index("cell_id")[["x_m", "y_m"]] if data.cells is not None and len(data.cells) else None
    fig, axes = plt.subplots(len(rows), len(cells), figsize=(3.1 * len(cells) + 0.8, 2.9 * len(rows)), squeeze=False,
                             layout="constrained")
    for j, cell_id in enumerate(cells):
        per = [frame[frame["cell_id"] == cell_id] for _, frame in rows]
        box, vmax = map_panel_layout(per)
        # One colour scale per cell (column): a power norm keeps low-mass squares visible.
        norm = matplotlib.colors.PowerNorm(0.5, vmin=0.0, vmax=max(vmax, 1e-12))
        scale = (res_m or 1.0) / 1000.0  # axes in km when the square size is known
        extent = [box[0] * scale, (box[1] + 1) * scale, box[2] * scale, (box[3] + 1) * scale]
        for i, ((name, _), m) in enumerate(zip(rows, per)):
            ax = axes[i, j]
            im = ax.imshow(_raster(m, box), origin="lower", cmap="viridis", interpolation="nearest", norm=norm,
                           extent=extent, aspect="equal")
            if not len(m):
                ax.text(0.5, 0.5, "no map", transform=ax.transAxes, ha="center", va="center", color="w")
            if sites is not None and res_m and cell_id in sites.index:
                ax.plot(sites.loc[cell_id, "x_m"] / 1000.0, sites.loc[cell_id, "y_m"] / 1000.0, "r^", ms=6, mec="w")
            score = ks[(ks["cell_id"] == cell_id) & (ks["model"] == name.lower())]["value"]
            label = f"{name} {cell_id}" + (f"\nKS vs truth {score.iloc[0]:.2f}" if len(score) else "")
            ax.set_title(label, fontsize=8)
            ax.tick_params(labelsize=6)
            if i < len(rows) - 1:
                ax.set_xticklabels([])
        axes[-1, j].set_xlabel("x [km]" if res_m else "square", fontsize=7)
        bar = fig.colorbar(im, ax=axes[:, j].tolist(), location="bottom", shrink=0.85, pad=0.01, aspect=30)
        bar.set_ticks([f * vmax for f in (0.0, 0.05, 0.25, 1.0)])  # the power norm crowds linear ticks at the top
        bar.ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
        bar.ax.tick_params(labelsize=6)
        bar.set_label("P(UE in square | cell), one scale per column", fontsize=7)
    for i, (name, _) in enumerate(rows):
        axes[i, 0].set_ylabel(f"{name}\ny [km]" if res_m else name, fontsize=8)
    fig.savefig(out / "maps_kde_vs_voronoi.png", dpi=90)
    plt.close(fig)
    return "maps_kde_vs_voronoi.png"


def _field(data: ReportData, out: Path) -> str | None:
    rows = data.metrics[data.metrics["metric"] == "rsrp_field"]
    if rows.empty:
        return None
    row = rows.iloc[0]
    d = _detail(row)
    extent = [d["x_m"][0], d["x_m"][-1], d["y_m"][0], d["y_m"][-1]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, label, cmap in ((axes[0], "mean_dbm", "predicted RSRP [dBm]", "viridis"),
                                 (axes[1], "epistemic_std_db", "epistemic std [dB]", "magma")):
        im = ax.imshow(np.asarray(d[key]), origin="lower", extent=extent, cmap=cmap, aspect="equal")
        fig.colorbar(im, ax=ax, label=label)
        pts = np.asarray(d.get("train_xy_m") or np.empty((0, 2)))
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, c="w", alpha=0.4)
        ax.set_title(f"cell {row['cell_id']}: {label}")
    return _save(fig, out, "rsrp_field.png")


def _calibration(data: ReportData, out: Path) -> str | None:
    rows = data.metrics[(data.metrics["metric"] == "rsrp_calibration_error") & (data.metrics["split"] == "test")
                        & data.metrics["cell_id"].isna()]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    for _, row in rows.iterrows():
        d = _detail(row)
        ax.plot(d["expected"], d["observed"], marker="o", ms=3, label=f"{row['model']} (CE {row['value']:.3f})")
    ax.set_xlabel("expected quantile")
    ax.set_ylabel("observed frequency")
    ax.set_title("RSRP calibration (GUMBLE eq. 24)")
    ax.legend(fontsize=8)
    return _save(fig, out, "calibration.png")


def _epistemic(data: ReportData, out: Path) -> str | None:
    rows = data.metrics[(data.metrics["metric"] == "rsrp_mean_epistemic_db") & data.metrics["split"].isin(["inside", "outside"])]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, row in rows.iterrows():
        d = _detail(row)
        edges = np.asarray(d["edges"])
        counts = np.asarray(d["counts"], dtype=float)
        ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, alpha=0.5, label=f"{row['split']} (mean {row['value']:.2f} dB)")
    ax.set_xlabel("epistemic std [dB]")
    ax.set_ylabel("share of grid points")
    ax.set_title("Epistemic uncertainty inside vs outside the data (eq. 30)")
    ax.legend()
    return _save(fig, out, "epistemic_hist.png")


RSRQ_BY_LOAD_TITLE = "RSRQ error vs load decile"


def _figure(v: float) -> str:
    """4 significant digits; whole thousands written out (15,530 rows, not 1.553e+04)."""
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def _missing_reason(data: ReportData, title: str) -> str:
    """Why a figure is absent, where the lake says so; else the generic line."""
    metric = set(data.metrics["metric"]) if "metric" in data.metrics else set()
    if data.n_reports is None and data.reports is None and not metric & {"rsrp_mae_dbm", "rsrq_mae_db"}:
        return "Not available: no MDT reports in this lake (traffic counters only)."
    if title == RSRQ_BY_LOAD_TITLE and "rsrq_mae_db" in metric:
        return ("Not available: no report carries a cell load (no traffic counters), so RSRQ is modelled from "
                "position alone and has no error by load.")
    return "Not available for this run (input table or metric missing)."


def _rsrq(data: ReportData, out: Path) -> str | None:
    rows = data.metrics[data.metrics["metric"] == "rsrq_mae_db_by_load_decile"]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, part in rows.groupby("model"):
        agg = part.assign(decile=part["split"].str.removeprefix("decile_").astype(int)).groupby("decile")["value"].mean()
        ax.plot(agg.index, agg.to_numpy(), marker="o", label=model)
    ax.set_xlabel("load decile")
    ax.set_ylabel("RSRQ MAE [dB]")
    ax.set_title("RSRQ error vs load")
    ax.legend()
    return _save(fig, out, "rsrq_vs_load.png")


def _fingerprint(data: ReportData, out: Path) -> str | None:
    rows = data.metrics[data.metrics["metric"] == "fingerprint_rmse_m"]
    if rows.empty:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 5), squeeze=False)
    for ax, (_, row) in zip(axes[0], rows.iterrows()):
        d = _detail(row)
        t, p = np.asarray(d["true_xy_m"]), np.asarray(d["pred_xy_m"])
        ax.scatter(t[:, 0], t[:, 1], s=4, c="k", label="true")
        ax.scatter(p[:, 0], p[:, 1], s=4, c="tab:red", alpha=0.6, label="predicted")
        ax.set_title(f"{row['model']}: RMSE {row['value']:.1f} m")
        ax.set_aspect("equal")
        ax.legend(fontsize=8)
    return _save(fig, out, "fingerprinting.png")


def _rejects(data: ReportData, out: Path) -> tuple[str | None, pd.DataFrame]:
    if data.rejects is None or data.rejects.empty:
        return None, pd.DataFrame()
    codes = data.rejects.assign(reason=data.rejects["reason_code"].str.split(";")).explode("reason")
    counts = codes.groupby(["source", "reason"]).size().rename("rows").reset_index().sort_values("rows", ascending=False)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(counts) + 1.2))
    labels = counts["source"] + ": " + counts["reason"]
    ax.barh(labels[::-1], counts["rows"][::-1])
    ax.set_xlabel("rejected rows")
    ax.set_title("Data quality: rejects by reason")
    return _save(fig, out, "rejects.png"), counts


def metrics_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Headline metrics (overall rows: no cell, no window) with one column per model."""
    overall = metrics[metrics["cell_id"].isna() & metrics["window"].isna() & metrics["value"].notna()]
    overall = overall[~overall["metric"].isin(["rsrp_field", "rsrq_mae_db_by_load_decile"])]
    # one row per metric and column it is about (fidelity_* per table column): pivoting on the metric alone kept the
    # first column's figure (x_m's Wasserstein, in metres) under a name that read as RSRP's, and hid the others
    column = overall["detail"].map(lambda d: json.loads(d).get("column") if isinstance(d, str) and d.startswith("{") else None)
    key = (overall["metric"] + np.where(column.notna(), " (" + column.fillna("").astype(str) + ")", "")
           + np.where(overall["split"].fillna("").isin(["", "test"]), "", " [" + overall["split"].fillna("") + "]"))
    return overall.assign(row=key, model=overall["model"].fillna("-")).pivot_table(
        index="row", columns="model", values="value", aggfunc="first").sort_index()


# Metric-name prefixes per report section, so each table compares like with like.
METRIC_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Radio models vs baselines (held-out reports)", ("rsrp_", "rsrq_")),
    ("Synthetic table: fidelity, utility, privacy", ("fidelity_", "fingerprint_", "privacy_", "n_reports")),
    ("Spatial maps and association", ("map_", "kde_", "student_", "teacher_", "association_", "bandwidth_", "fallback_")),
    ("Traffic synthesis (held-out cells)", ("jsd", "crps_", "profile_", "acf", "peak_", "train_", "n_train", "n_holdout", "n_context")),
)


def model_settings_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """What each radio model and baseline was given (metric `baseline_settings`): model, settings."""
    rows = metrics[metrics["metric"] == "baseline_settings"] if "metric" in metrics else metrics.iloc[:0]
    return pd.DataFrame({"model": rows["model"].to_numpy(),
                         "settings": [_detail(r).get("settings", "") for _, r in rows.iterrows()]})


def metrics_sections(metrics: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """`metrics_table` split into the report's sections (rows matching no section go last)."""
    table = metrics_table(metrics)
    if table.empty:
        return []
    out, used = [], set()
    for title, prefixes in METRIC_SECTIONS:
        rows = [r for r in table.index if r not in used and r.startswith(prefixes)]
        if rows:
            used.update(rows)
            part = table.loc[rows]
            out.append((title, part.loc[:, part.notna().any()]))
    rest = [r for r in table.index if r not in used]
    if rest:
        part = table.loc[rest]
        out.append(("Other figures", part.loc[:, part.notna().any()]))
    return out


def build_report(data: ReportData, out_dir: str | Path, *, max_points: int = 20_000, n_example_cells: int = 4) -> Path:
    """Write the PNGs and `index.html` into `out_dir`; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str | None, str]] = [
        ("Real vs synthetic samples", _samples_map(data, out, max_points), "Positions coloured by serving cell."),
        ("Spatial maps: KDE vs Voronoi", _maps(data, out, n_example_cells), "P(UE in square | served by cell)."),
        ("Predicted RSRP field and epistemic std", _field(data, out), "White dots: training reports of the cell."),
        ("Calibration", _calibration(data, out), "Observed vs expected quantile frequency on held-out reports."),
        ("Epistemic uncertainty inside vs outside the data", _epistemic(data, out), ""),
        (RSRQ_BY_LOAD_TITLE, _rsrq(data, out), "With and without IPW where refits ran."),
        ("Fingerprinting (GUMBLE 6.4)", _fingerprint(data, out), "RF trained on real vs on synthetic, tested on held-out real."),
    ]
    rej_png, rej_counts = _rejects(data, out)
    table = metrics_table(data.metrics) if not data.metrics.empty else pd.DataFrame()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(data.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "table.summary{font-size:14px;width:100%}table.summary td,table.summary th{text-align:left}"
        "table.summary th{background:#f3f3f3}"
        "td.mark{font-weight:bold;text-align:center}td.pass{background:#d8f0d8;color:#145214}"
        "td.warn{background:#fbe3c8;color:#7a3b00}td.info{color:#555}"
        "img{max-width:100%;border:1px solid #eee}.missing{color:#999}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in data.notes]
    n_clean = data.n_reports if data.n_reports is not None else (len(data.reports) if data.reports is not None else None)
    parts += ["<h2 id='summary'>Summary</h2>",
              summary_html(summary_table(data.metrics, rejects=data.rejects, n_clean_reports=n_clean)),
              "<p class='missing'>Figures from the newest run of each stage on held-out real data; "
              "each line's rule states its threshold.</p>"]
    for title, png, caption in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png:
            parts.append(f"<img src='{png}' alt='{html.escape(title)}'><p>{html.escape(caption)}</p>")
        else:
            parts.append(f"<p class='missing'>{html.escape(_missing_reason(data, title))}</p>")
    for title, png, caption in data.extra_images:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{png}' alt='{html.escape(title)}'><p>{html.escape(caption)}</p>")
    parts += privacy_section_html(data.metrics, out)  # issue 16: its own block
    parts.append("<h2>Metrics (baselines side by side)</h2>")
    if not len(table):
        parts.append("<p class='missing'>No metrics.</p>")
    for title, part in metrics_sections(data.metrics):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(part.to_html(float_format=_figure, na_rep=""))
    settings = model_settings_table(data.metrics) if not data.metrics.empty else pd.DataFrame()
    if len(settings):
        parts.append("<h3>Radio models and baselines: settings</h3>")
        parts.append(settings.to_html(index=False))
    parts.append("<h2>Data quality</h2>")
    if rej_png:
        parts.append(f"<img src='{rej_png}' alt='rejects by reason'>")
        parts.append(rej_counts.to_html(index=False))
    elif data.rejects is not None:  # the table exists and is empty: every input row was clean
        parts.append("<p>No row was rejected.</p>")
    else:
        parts.append("<p class='missing'>No rejects table.</p>")
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts))
    return path


# ------------------------------------------------------------------------- privacy (issue 16)
def _privacy_roc(metrics: pd.DataFrame, out: Path) -> str | None:
    rows = metrics[(metrics["metric"] == "privacy_mia_auc") & (metrics["model"] != "max")]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    for _, row in rows.iterrows():
        d = _detail(row)
        ax.plot(d["fpr"], d["tpr"], label=f"{row['model']} attack (AUC {row['value']:.3f})")
    ax.set_xlabel("false positive rate (held-out rows called members)")
    ax.set_ylabel("true positive rate (training rows found)")
    ax.set_title("Membership inference on the synthetic table")
    ax.legend(fontsize=8)
    return _save(fig, out, "privacy_mia_roc.png")


def privacy_section_html(metrics: pd.DataFrame, out: Path) -> list[str]:
    """The report's privacy block: the spent epsilon, distance shares and the attacks' ROC."""
    if metrics.empty or not metrics["metric"].astype(str).str.startswith("privacy_").any():
        return []
    parts = ["<h2>Privacy</h2>"]
    eps = metrics[metrics["metric"] == "privacy_epsilon_spent"]
    if len(eps):
        parts.append("<p>Differentially private mode: epsilon spent per stage (basic composition for the total).</p>")
        parts.append(eps[["model", "value"]].rename(columns={"model": "stage", "value": "epsilon"}).to_html(index=False))

    def pick(metric: str, model: str) -> float:
        sel = metrics[(metrics["metric"] == metric) & (metrics["model"] == model)]["value"]
        return float(sel.iloc[0]) if len(sel) and pd.notna(sel.iloc[0]) else float("nan")
    shares = [m for m in sorted(metrics["metric"].unique()) if str(m).startswith("privacy_share_within_")]
    if shares:
        table = pd.DataFrame({
            "radius": [m.removeprefix("privacy_share_within_") for m in shares],
            "synthetic rows": [pick(m, "synthetic") for m in shares],
            "held-out real rows (reference)": [pick(m, "holdout_real") for m in shares],
        })
        parts.append("<p>Share of rows within a radius of a training position of the same cell and window "
                     "(exact, against every training row).</p>")
        parts.append(table.to_html(index=False, float_format=lambda v: f"{v:.2%}"))
    attacks = metrics[(metrics["metric"] == "privacy_mia_auc") & (metrics["model"] != "max")]
    if len(attacks):
        table = pd.DataFrame({
            "attack": attacks["model"].tolist(), "AUC": attacks["value"].tolist(),
            "AUC lower": [pick("privacy_mia_auc_lower", a) for a in attacks["model"]],
            "AUC upper": [pick("privacy_mia_auc_upper", a) for a in attacks["model"]],
            "TPR at 1% FPR": [pick("privacy_mia_tpr_at_fpr01", a) for a in attacks["model"]],
        })
        parts.append(table.to_html(index=False, float_format=lambda v: f"{v:.3f}"))
    png = _privacy_roc(metrics, out)
    if png:
        parts.append(f"<img src='{png}' alt='membership inference ROC'><p>Training rows (members) against held-out "
                     "rows (non-members); an AUC of 0.5 means the table tells an attacker nothing about membership.</p>")
    return parts
