"""The report's what-if section: before/after maps per scenario, drawn from `network_fields`
and the what-if share metrics into <report>/whatif/, linked by the report stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def scenario_fields(lake: Any) -> tuple[pd.DataFrame, dict[str, tuple[str, pd.DataFrame]]]:
    """The measured field (one row per square: that of the newest run that computed it) and per scenario
    (its newest run id, its rows from that run). A rerun on new data replaces a scenario's rows; lakes
    written before kept every run's."""
    fields = lake.read_pandas("network_fields", network_scenario=None)
    rank = _run_rank(lake)
    fields = fields.assign(_rank=fields["run_id"].astype(str).map(rank).fillna(-1.0))
    fields = fields.sort_values(["_rank", "run_id"], kind="stable").drop(columns="_rank")
    base = fields[fields["network_scenario"] == "baseline"].drop_duplicates(["x_m", "y_m"], keep="last")
    scenarios = {}
    for name, rows in fields[fields["network_scenario"] != "baseline"].groupby("network_scenario", sort=True):
        run = str(rows["run_id"].iloc[-1])
        scenarios[str(name)] = (run, rows[rows["run_id"].astype(str) == run])
    return base, scenarios


def whatif_section(lake: Any, out_dir: Path) -> list[tuple[str, str, str]]:
    """(title, relative png, caption) per what-if scenario; [] when no what-if ran."""
    if not lake.exists("network_fields"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, scenarios = scenario_fields(lake)
    shares = lake.read_pandas("metrics", filters=[("stage", "=", "whatif")]) if lake.exists("metrics") else pd.DataFrame()
    folder = Path(out_dir) / "whatif"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (run, after) in scenarios.items():
        key = ["x_m", "y_m"]
        before = after[key].round(3).merge(base.assign(**{k: base[k].round(3) for k in key}), on=key, how="left")
        cells = pd.Categorical(pd.concat([before["best_cell_id"], after["best_cell_id"]]).fillna("?").astype(str))
        codes = dict(zip(cells.categories, range(len(cells.categories))))
        fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
        rsrp_lim = np.nanpercentile(pd.concat([before["rsrp_dbm"], after["rsrp_dbm"]]), [2, 98])
        std_lim = (0.0, float(np.nanmax(pd.concat([before["rsrp_dbm_epistemic_std"], after["rsrp_dbm_epistemic_std"]]))))
        for row, (label, frame) in enumerate((("before", before), ("after", after))):
            xy = frame[key].to_numpy(float)
            ids = frame["best_cell_id"].fillna("?").astype(str).map(codes).to_numpy()
            axes[row, 0].scatter(xy[:, 0], xy[:, 1], c=plt.get_cmap("tab20")(ids % 20), s=14, marker="s")
            axes[row, 0].set_title(f"{label}: best server")
            sc = axes[row, 1].scatter(xy[:, 0], xy[:, 1], c=frame["rsrp_dbm"], s=14, marker="s", cmap="viridis",
                                      vmin=rsrp_lim[0], vmax=rsrp_lim[1])
            fig.colorbar(sc, ax=axes[row, 1], label="serving RSRP [dBm]")
            axes[row, 1].set_title(f"{label}: serving RSRP")
            sc = axes[row, 2].scatter(xy[:, 0], xy[:, 1], c=frame["rsrp_dbm_epistemic_std"], s=14, marker="s",
                                      cmap="magma", vmin=std_lim[0], vmax=std_lim[1])
            fig.colorbar(sc, ax=axes[row, 2], label="epistemic std [dB]")
            axes[row, 2].set_title(f"{label}: epistemic std")
        share = shares[(shares.get("model") == name) & (shares["run_id"] == run)
                       & shares["metric"].isin(["user_share_before", "user_share_after"])] if len(shares) else pd.DataFrame()
        ax = axes[0, 3]
        if len(share):
            tab = share.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="last").fillna(0.0)
            tab = tab.reindex(columns=["user_share_before", "user_share_after"], fill_value=0.0)
            tab = tab[(tab.max(axis=1) > 0.005)].sort_values("user_share_after", ascending=False).head(15)
            pos = np.arange(len(tab))
            ax.barh(pos - 0.2, tab["user_share_before"], height=0.4, label="before")
            ax.barh(pos + 0.2, tab["user_share_after"], height=0.4, label="after")
            ax.set_yticks(pos, tab.index, fontsize=7)
            ax.legend()
        ax.set_title("load per cell: share of the area's users")
        changed = after[after["is_changed_cell"]]
        axes[1, 3].hist([before["rsrp_dbm_epistemic_std"].dropna(), changed["rsrp_dbm_epistemic_std"]], bins=20,
                        label=["before (all squares)", "after, served by changed cells"])
        axes[1, 3].set_title("epistemic std [dB]")
        axes[1, 3].legend(fontsize=8)
        for ax in axes[:, :3].ravel():
            ax.set_aspect("equal")
        fig.suptitle(f"what-if '{name}'")
        fig.tight_layout()
        png = f"whatif/{name}.png"
        fig.savefig(Path(out_dir) / png, dpi=80)
        plt.close(fig)
        out.append((f"What-if '{name}': before / after", png,
                    "Best server, serving RSRP and its epistemic std on the squares around the change, before and "
                    "after; right: per-cell share of the users there and the std where changed cells serve."))
    return out


def _run_rank(lake: Any) -> dict[str, float]:
    """{run_id: start time in seconds} of the recorded runs (what-ifs through `pipeline.run_whatif`); others rank first."""
    from cellsynth.lake.registry import RunRegistry

    runs = RunRegistry(lake).frame()
    if runs.empty:
        return {}
    start = pd.to_datetime(runs["started_at"], utc=True)
    return {str(r): t.timestamp() for r, t in zip(runs["run_id"], start)}
