"""Report figures: real vs synthetic weekly curves of held-out cells, and the sample fan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_plots(plot: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write traffic_weekly_curves.png and traffic_sample_fan.png; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    cells, real, samples = plot["cells"], plot["real"], plot["samples"]
    hours = np.arange(len(real[0]))
    paths = {}

    fig, axes = plt.subplots(len(cells), 1, figsize=(10, 2.2 * len(cells)), sharex=True, squeeze=False)
    for i, (ax, cell_id) in enumerate(zip(axes[:, 0], cells)):
        ax.plot(hours, real[i], color="black", lw=1.6, label="real (held out)")
        for name, arr in samples.items():
            ax.plot(hours, arr[i].mean(axis=0), lw=1.0, label=name)
        ax.set_ylabel("traffic_mb")
        ax.set_title(cell_id, fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("hour of week (Monday 00:00 UTC = 0)")
    fig.tight_layout()
    paths["traffic_weekly_curves"] = str(out_dir / "traffic_weekly_curves.png")
    fig.savefig(paths["traffic_weekly_curves"], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(len(cells), 1, figsize=(10, 2.2 * len(cells)), sharex=True, squeeze=False)
    for i, (ax, cell_id) in enumerate(zip(axes[:, 0], cells)):
        ens = samples["diffusion"][i]
        for q, alpha in ((0.0, 0.15), (0.1, 0.3)):
            lo, hi = np.quantile(ens, [q, 1 - q], axis=0)
            ax.fill_between(hours, lo, hi, color="tab:blue", alpha=alpha, lw=0)
        ax.plot(hours, np.median(ens, axis=0), color="tab:blue", lw=1.0, label="diffusion median")
        ax.plot(hours, real[i], color="black", lw=1.2, label="real (held out)")
        ax.set_ylabel("traffic_mb")
        ax.set_title(f"{cell_id}: {len(ens)} samples", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("hour of week (Monday 00:00 UTC = 0)")
    fig.tight_layout()
    paths["traffic_sample_fan"] = str(out_dir / "traffic_sample_fan.png")
    fig.savefig(paths["traffic_sample_fan"], dpi=90)
    plt.close(fig)
    return paths
