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


@dataclass
class ReportData:
    metrics: pd.DataFrame
    synthetic: pd.DataFrame | None = None
    reports: pd.DataFrame | None = None  # real mdt_reports (x_m, y_m, serving_cell_id, window)
    spatial_maps: pd.DataFrame | None = None
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
    gx0, gx1, gy0, gy1 = box
    img = np.full((gy1 - gy0 + 1, gx1 - gx0 + 1), np.nan)
    img[m["gy"].to_numpy() - gy0, m["gx"].to_numpy() - gx0] = m["prob"].to_numpy()
    return img


def _maps(data: ReportData, out: Path, n_cells: int) -> str | None:
    sm = data.spatial_maps
    if sm is None or sm.empty or not {"kde", "voronoi"} <= set(sm["method"]):
        return None
    kde = sm[sm["method"] == "kde"]
    window = kde["window"].value_counts().index[0]
    kde = kde[kde["window"] == window]
    cells = kde.groupby("cell_id")["prob"].size().sort_values(ascending=False).index[:n_cells]
    rows: list[tuple[str, pd.DataFrame]] = []
    if data.truth_maps is not None and not data.truth_maps.empty:
        truth = data.truth_maps
        rows.append(("truth", truth[truth["window"] == window] if "window" in truth else truth))
    rows += [("KDE", kde), ("Voronoi", sm[sm["method"] == "voronoi"])]
    if "student" in set(sm["method"]):
        rows.append(("student", sm[sm["method"] == "student"]))
    ks = data.metrics[(data.metrics["metric"] == "map_ks") & data.metrics["cell_id"].notna()]
    fig, axes = plt.subplots(len(rows), len(cells), figsize=(3.0 * len(cells), 2.9 * len(rows)), squeeze=False)
    for j, cell_id in enumerate(cells):
        per = [frame[frame["cell_id"] == cell_id] for _, frame in rows]
        present = [m for m in per if len(m)]
        box = (min(m["gx"].min() for m in present), max(m["gx"].max() for m in present),
               min(m["gy"].min() for m in present), max(m["gy"].max() for m in present))
        for i, ((name, _), m) in enumerate(zip(rows, per)):
            ax = axes[i, j]
            if len(m):
                # A power norm keeps low-mass squares visible next to the hotspot.
                ax.imshow(_raster(m, box), origin="lower", cmap="viridis", interpolation="nearest",
                          norm=matplotlib.colors.PowerNorm(0.4))
            score = ks[(ks["cell_id"] == cell_id) & (ks["model"] == name.lower())]["value"]
            label = f"{name} {cell_id}" + (f"\nKS vs truth {score.iloc[0]:.2f}" if len(score) else "")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, out, "maps_kde_vs_voronoi.png")


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
    key = overall["metric"] + np.where(overall["split"].fillna("").isin(["", "test"]), "", " [" + overall["split"].fillna("") + "]")
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
        ("RSRQ error vs load decile", _rsrq(data, out), "With and without IPW where refits ran."),
        ("Fingerprinting (GUMBLE 6.4)", _fingerprint(data, out), "RF trained on real vs on synthetic, tested on held-out real."),
    ]
    rej_png, rej_counts = _rejects(data, out)
    table = metrics_table(data.metrics) if not data.metrics.empty else pd.DataFrame()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(data.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "img{max-width:100%;border:1px solid #eee}.missing{color:#999}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in data.notes]
    for title, png, caption in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png:
            parts.append(f"<img src='{png}' alt='{html.escape(title)}'><p>{html.escape(caption)}</p>")
        else:
            parts.append("<p class='missing'>Not available for this run (input table or metric missing).</p>")
    for title, png, caption in data.extra_images:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{png}' alt='{html.escape(title)}'><p>{html.escape(caption)}</p>")
    parts.append("<h2>Metrics (baselines side by side)</h2>")
    if not len(table):
        parts.append("<p class='missing'>No metrics.</p>")
    for title, part in metrics_sections(data.metrics):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(part.to_html(float_format=lambda v: f"{v:.4g}", na_rep=""))
    settings = model_settings_table(data.metrics) if not data.metrics.empty else pd.DataFrame()
    if len(settings):
        parts.append("<h3>Radio models and baselines: settings</h3>")
        parts.append(settings.to_html(index=False))
    parts.append("<h2>Data quality</h2>")
    if rej_png:
        parts.append(f"<img src='{rej_png}' alt='rejects by reason'>")
        parts.append(rej_counts.to_html(index=False))
    else:
        parts.append("<p class='missing'>No rejects table.</p>")
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts))
    return path
