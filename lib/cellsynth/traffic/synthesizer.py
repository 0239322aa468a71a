"""`TrafficSynthesizer`: the traffic stage's model in memory, for a notebook (no lake, Spark or Ray).

    from cellsynth import TrafficSynthesizer
    s = TrafficSynthesizer(config).fit(traffic_df, cells_df)
    synthetic = s.sample(5)            # 5 weeks per cell, the synthetic_traffic shape
    s.save("my_traffic"); s = TrafficSynthesizer.load("my_traffic")

The same model, settings and seed as the traffic stage (`traffic.*`, `run.seed`): one conditional
diffusion model of per-cell weekly traffic over every cell's complete weeks, conditioned on each
cell's site layout when `cells_df` gives positions, on the numeric columns of `context_df` when
given, and on nothing otherwise. Unlike the stage it holds no cell out (the stage scores on held-out
cells; here every cell trains), and it generates for every cell of `cells_df`, history or not.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from cellsynth.errors import ConfigError, NotFittedError, SchemaError
from cellsynth.synthesizer import ConfiguredFacade, with_torch_threads
from cellsynth.traffic import transforms as tf

_TRAFFIC_COLUMNS = ("cell_id", "ts", "traffic_mb")


class TrafficSynthesizer(ConfiguredFacade):
    """Synthetic hourly cell traffic from measured counters (the SDV shape: fit, sample, save, load).

    Args:
        config: a `PipelineConfig`, a dict of sections, a YAML path, or None for the defaults. The
            traffic section, `run.seed`, `ingest.windows` and `ingest.n_cell_shards` apply as in a run.
    """

    _META = "traffic_synthesizer.json"

    @with_torch_threads
    def fit(self, traffic_df: pd.DataFrame, cells_df: pd.DataFrame | None = None,
            context_df: pd.DataFrame | None = None) -> TrafficSynthesizer:
        """Fit on every cell's complete weeks.

        Args:
            traffic_df: hourly counters: cell_id, ts (UTC unless zoned), traffic_mb; prb_util_pct
                optional (without it PRB utilisation is traffic over the 99th percentile).
            cells_df: cell_id, x_m, y_m (site_id, azimuth_deg optional): the site layout context,
                and the cells to generate for (those without counters too); counters of cells it
                does not list are not used (as in the stage).
            context_df: cell_id plus numeric columns (population, POI counts, ...), joined as
                `traffic.external_context_csv` is.

        Raises:
            SchemaError: a required column is missing, or fewer than 2 cells have a complete week.
        """
        from cellsynth.traffic.stage import make_model, stage_rng

        cfg = self._cfg()
        missing = [c for c in _TRAFFIC_COLUMNS if c not in traffic_df.columns]
        if missing:
            raise SchemaError([f"traffic_df: column '{c}' missing (have: {', '.join(map(str, traffic_df.columns[:10]))})"
                               for c in missing])
        traffic = tf.hourly_counters(traffic_df.assign(cell_id=traffic_df["cell_id"].astype(str)))
        external = None if context_df is None else context_df.assign(cell_id=context_df["cell_id"].astype(str))
        if cells_df is not None:
            context = tf.cell_context(cells_df.assign(cell_id=cells_df["cell_id"].astype(str)), external=external)
        else:
            context = tf.external_only_context(sorted(traffic["cell_id"].unique()), external)
        cell_ids, week_starts, series = tf.weekly_matrix(traffic)
        known = np.isin(cell_ids, context.index.to_numpy())
        cell_ids, week_starts, series = cell_ids[known], week_starts[known], series[known]
        if len(np.unique(cell_ids)) < 2:
            raise SchemaError(f"traffic_df: need complete weeks of hourly counters from at least 2 cells"
                              f"{' of cells_df' if cells_df is not None else ''}, got {len(np.unique(cell_ids))}")
        self.model_ = make_model(cfg.traffic).fit(series, context.loc[cell_ids].to_numpy(dtype=float), groups=cell_ids,
                                                  rng=stage_rng(cfg.run.seed))
        self.cfg_, self.context_ = cfg, context.sort_index()
        self.prb_lines_, self.pooled_line_ = tf.prb_maps(traffic, set(cell_ids))
        self.week_start_ = pd.Timestamp(max(week_starts))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("TrafficSynthesizer: call fit (or load) first")

    @with_torch_threads
    def sample(self, n_samples: int | None = None, *, cell_ids: list[str] | None = None,
               rng: int | np.random.Generator = 0) -> pd.DataFrame:
        """`n_samples` synthetic weeks (default `traffic.n_samples_per_cell`) per cell, as `synthetic_traffic`
        rows (cell_id, ts, window, traffic_mb, prb_util_pct, load_rho, sample_id, cell_shard, run_id), the
        week after the newest one fitted. `cell_ids`: a subset of the fitted cells (default all).

        Raises:
            SchemaError: a cell id that was not fitted.
            ConfigError: `n_samples` is not a whole number >= 0.
        """
        self._check_fitted()
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral)
                                      or n_samples < 0):
            raise ConfigError(f"sample: n_samples: expected a whole number >= 0, got {n_samples!r}")
        cfg = self.cfg_
        ids = list(self.context_.index) if cell_ids is None else [str(c) for c in cell_ids]
        unknown = sorted(set(ids) - set(self.context_.index))
        if unknown:
            raise SchemaError(f"cell_ids: not among the fitted cells: {', '.join(unknown[:10])}")
        n = cfg.traffic.n_samples_per_cell if n_samples is None else int(n_samples)
        synth = self.model_.sample(self.context_.loc[ids].to_numpy(dtype=float), n, rng=rng)
        return tf.synthetic_frame(np.asarray(ids, dtype=object), synth, week_start=self.week_start_,
                                  windows=cfg.ingest.windows, prb_lines=self.prb_lines_, pooled_line=self.pooled_line_,
                                  n_cell_shards=cfg.ingest.n_cell_shards, run_id="in-memory")

    def save(self, path: str | Path) -> None:
        """Write the fitted model to a folder: JSON, Parquet and safetensors (never pickle)."""
        self._check_fitted()
        out = Path(path)
        self._save_meta(out, prb_lines=self.prb_lines_, pooled_line=list(self.pooled_line_),
                        week_start=self.week_start_.isoformat())
        self.model_.save(out / "model")
        self.context_.reset_index().to_parquet(out / "context.parquet", index=False)

    @classmethod
    def load(cls, path: str | Path) -> TrafficSynthesizer:
        """Read a folder written by `save`.

        Raises:
            SchemaError: the folder was written by another format version.
        """
        from cellsynth.traffic.model import TrafficDiffusion

        src = Path(path)
        self, meta = cls._from_meta(src)
        self.model_ = TrafficDiffusion.load(src / "model")
        ctx = pd.read_parquet(src / "context.parquet")
        self.context_ = ctx.assign(cell_id=ctx["cell_id"].astype(str)).set_index("cell_id")
        self.prb_lines_ = {k: tuple(v) for k, v in meta["prb_lines"].items()}
        self.pooled_line_ = tuple(meta["pooled_line"])
        self.week_start_ = pd.Timestamp(meta["week_start"])
        return self
