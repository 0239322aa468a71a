"""The dp mode's stage bodies, called through one-line hooks from the density, radio, traffic,
generate and evaluate stages (`privacy.mode: dp`). Artefacts are JSON under `<lake>/privacy_dp/`;
the epsilon each stage spent goes to its `runs` note and to the `metrics` table."""

from __future__ import annotations

from typing import Any

import numpy as np

from cellsynth.errors import ConfigError, StageError
from cellsynth.privacy.dp import (
    DPPositionDensity,
    DPRadioModels,
    bound_per_user,
    check_dp_inputs,
    check_public_cells,
    public_bbox,
    radio_multipliers,
    stage_budget,
)
from cellsynth.privacy.dp import RSRP_CENTRE_DBM, RSRP_SCALE_DB, RSRQ_CENTRE_DB, RSRQ_SCALE_DB
from cellsynth.privacy.dp_detection import SHARE_C
from cellsynth.privacy import dp_stats
from cellsynth.privacy.dp_stats import fit_target
from cellsynth.splits import held_out as split_held_out
from cellsynth.stages import StageResult

DP_DIR = "privacy_dp"
TRAFFIC_EXCLUDED = ("privacy.mode=dp: traffic synthesis has no DP training, so it is excluded from the dp mode "
                    "(synthetic_traffic is not written; set privacy.mode=off for it)")


def _held_in(cfg: Any, frame: Any) -> Any:
    held_out = split_held_out(cfg, frame["report_id"].to_numpy())
    return frame[~held_out]


def _seed(cfg: Any, label: str) -> int:
    """The seed of one mechanism's noise: secret (OS entropy) unless `privacy.noise_seed` is set.

    Noise from a known seed is not noise: run.seed sits in the config, so seeding the mechanisms
    from it would let anyone who has the config subtract the noise. Everything after the
    mechanisms (generation from the released models) is post-processing and stays seeded by run.seed.
    """
    import secrets
    import zlib

    if cfg.privacy.noise_seed is None:
        return secrets.randbits(128)  # a 32-bit secret could be searched exhaustively
    return zlib.crc32(f"{cfg.privacy.noise_seed}:dp:{label}".encode())


def noise_source(cfg: Any) -> str:
    """How the dp noise of this run was drawn, for stage notes and the report."""
    if cfg.privacy.noise_seed is None:
        return "noise from OS entropy (secret, not reproducible)"
    return (f"noise seeded by privacy.noise_seed={cfg.privacy.noise_seed} (reproducible; NOT a private release: "
            "anyone with the seed can regenerate the noise)")


def check_generate(cfg: Any) -> None:
    if cfg.generate.load_scenario == "synthetic_traffic":
        raise ConfigError("generate.load_scenario: synthetic_traffic is not available with privacy.mode=dp "
                          "(traffic synthesis is excluded from the dp mode)")


def run_density_dp(cfg: Any, rt: Any, *, run_id: str) -> StageResult:
    """Positions: the DP grid density of the held-in reports (Laplace, pure epsilon-DP)."""
    lake, pc = rt.lake, cfg.privacy
    reports = check_dp_inputs(cfg, _held_in(cfg, lake.read_pandas(
        "mdt_reports", columns=["report_id", "ue_id", "window", "x_m", "y_m"])))
    cells = lake.read_pandas("cells", columns=["cell_id", "x_m", "y_m", "location_estimated"])
    check_public_cells(cells)
    eps, _ = stage_budget(cfg)["positions"]
    density = DPPositionDensity(grid_m=pc.grid_m, smoothing_squares=pc.smoothing_squares).fit(
        reports, bbox=public_bbox(cells), epsilon=eps, max_reports_per_ue=pc.max_reports_per_ue, seed=_seed(cfg, "positions"))
    lake.write_json(f"{DP_DIR}/density.json", {"run_id": run_id, **density.to_json()})
    note = (f"dp: epsilon {eps:.4g} spent on positions (Laplace grid counts, pure DP, <= {pc.max_reports_per_ue} "
            f"reports per ue_id); per-cell KDEs not trained; {noise_source(cfg)}")
    return StageResult(stage="density", run_id=run_id, rows_in={"mdt_reports_held_in": len(reports)},
                       metrics={"epsilon_positions": eps}, note=note)


def run_radio_dp(cfg: Any, rt: Any, *, run_id: str) -> StageResult:
    """RSRP and RSRQ of every cell from Gaussian releases of per-user-clipped sufficient statistics
    (analytic Gaussian mechanism; `privacy/dp_stats.py`)."""
    lake, pc = rt.lake, cfg.privacy
    reports = check_dp_inputs(cfg, _held_in(cfg, lake.read_pandas("mdt_reports", columns=["report_id", "ue_id"])))
    kept = bound_per_user(reports, pc.max_reports_per_ue, seed=_seed(cfg, "radio"))
    meas = lake.read_pandas("mdt_measurements", columns=["report_id", "cell_id", "role", "x_m", "y_m", "rsrp_dbm",
                                                         "rsrq_db", "load_rho"])
    meas = meas.merge(kept[["report_id", "ue_id"]], on="report_id", how="inner")
    cells = lake.read_pandas("cells")
    check_public_cells(cells)
    index = {c: i for i, c in enumerate(cells["cell_id"].astype(str))}
    site_xy, az = cells[["x_m", "y_m"]].to_numpy(float), DPRadioModels.azimuths(cells)
    cell_site, bbox = DPRadioModels.sites(cells), public_bbox(cells)
    eps_radio, delta = stage_budget(cfg)["radio"]
    # Where the reports are, from the positions' DP release (post-processing: free): release B splits
    # its squares there. Without it (radio run before density), the regular grid.
    dens = lake.read_json(f"{DP_DIR}/density.json")
    report_density = DPPositionDensity.from_json(dens).expected_reports() if dens is not None else None
    # One Gaussian mechanism for the whole stage, shared by RSRP and RSRQ in 1/z^2 (`dp.radio_multipliers`).
    zs = radio_multipliers(pc.epsilon, pc.delta, pc.epsilon_split)
    targets = {}
    for target in ("rsrp", "rsrq"):
        if target == "rsrp":
            rows = meas[np.isfinite(meas["rsrp_dbm"].to_numpy(float))]
        else:
            rows = meas[(meas["role"] == "serving") & meas["rsrq_db"].notna() & meas["load_rho"].notna()]
        if rows.empty:
            continue
        centre, scale = (RSRP_CENTRE_DBM, RSRP_SCALE_DB) if target == "rsrp" else (RSRQ_CENTRE_DB, RSRQ_SCALE_DB)
        # RSRP's budget also pays for release C (which cells are heard where; `dp_detection.py`).
        targets[target] = fit_target(rows, index, cell_site, site_xy, az, target=target, centre=centre, scale=scale,
                                     epsilon=eps_radio, delta=delta, z=zs[target],
                                     max_reports_per_ue=pc.max_reports_per_ue, bbox=bbox, seed=_seed(cfg, target),
                                     detection_share=SHARE_C if target == "rsrp" else 0.0,
                                     shape_share=dp_stats.SHAPE_SHARE if target == "rsrp" and dp_stats.SHAPE_ON else 0.0,
                                     report_density=report_density, **dp_stats.offset_kw(target))
    if "rsrp" not in targets:
        raise StageError("radio: dp mode found no RSRP measurements of held-in reports with a ue_id")
    models = DPRadioModels(cells, targets)
    # A target left out (no rows) spends nothing; the stage is charged its whole budget regardless.
    composed = {"epsilon": eps_radio, "delta": delta, "noise_multiplier": zs["radio"]}
    lake.write_json(f"{DP_DIR}/radio.json", {"run_id": run_id, "composed": composed, **models.to_json()})
    note = (f"dp: radio epsilon {eps_radio:.4g} at delta {delta:.3g}: one Gaussian mechanism of noise multiplier "
            f"{zs['radio']:.3g} (exact composition of every release, 1/z^2 summed), shared by "
            + ", ".join(f"{t} (multiplier {r.noise_multiplier:.3g}, epsilon {r.epsilon:.3g} alone)" for t, r in targets.items())
            + f"; Gaussian releases of clipped per-user sufficient statistics, <= {pc.max_reports_per_ue} reports per "
            f"ue_id, analytic Gaussian mechanism (Balle & Wang 2018); rsrp's share includes a {SHARE_C:g} share "
            f"(in 1/z^2) for which cells are heard where"
            + (f" and, of the rest, {dp_stats.SHAPE_SHARE:g} for a shape shared by every cell (log-distance x "
               f"sector pattern x margin below the strongest cell)" if dp_stats.SHAPE_ON else "")
            + ("; rsrp's release A is one pooled line plus per-cell offsets" if dp_stats.OFFSET_ON else "")
            + f"; {noise_source(cfg)}")
    return StageResult(stage="radio", run_id=run_id, rows_in={"mdt_measurements_bounded": len(meas)},
                       metrics={"epsilon_radio": eps_radio, **{f"noise_multiplier_{t}": r.noise_multiplier
                                                              for t, r in targets.items()}}, note=note)


def load_radio(lake: Any) -> DPRadioModels:
    d = lake.read_json(f"{DP_DIR}/radio.json")
    if d is None:
        raise StageError(f"dp mode: {DP_DIR}/radio.json is missing; run the radio stage with privacy.mode=dp first")
    return DPRadioModels.from_json(d, lake.read_pandas("cells"))


def load_density(lake: Any, radio: DPRadioModels, *, n_candidates: int) -> DPPositionDensity:
    d = lake.read_json(f"{DP_DIR}/density.json")
    if d is None:
        raise StageError(f"dp mode: {DP_DIR}/density.json is missing; run the density stage with privacy.mode=dp first")
    return DPPositionDensity.from_json(d).with_association(lambda xy: radio.strongest(xy, n_candidates=n_candidates))


def spent(lake: Any) -> dict[str, float]:
    """epsilon per DP stage as recorded in the artefacts (positions; radio, its releases composed
    exactly), plus the basic-composition total. Artefacts written before session 8 have one
    (epsilon, delta/2) mechanism per target instead of a composed radio entry: those are listed per
    target, as they were accounted."""
    out: dict[str, float] = {}
    dens = lake.read_json(f"{DP_DIR}/density.json")
    if dens is not None:
        out["positions"] = float(dens["epsilon"])
    radio = lake.read_json(f"{DP_DIR}/radio.json") or {}
    if "composed" in radio:
        out["radio"] = float(radio["composed"]["epsilon"])
    else:
        for name, t in radio.get("targets", {}).items():
            out[name] = float(t["epsilon"])
    if out:
        out["total"] = float(sum(out.values()))
    return out


def spent_delta(lake: Any) -> float:
    radio = lake.read_json(f"{DP_DIR}/radio.json") or {}
    if "composed" in radio:
        return float(radio["composed"]["delta"])
    return float(sum(t["delta"] for t in radio.get("targets", {}).values()))
