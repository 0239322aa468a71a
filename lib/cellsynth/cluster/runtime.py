"""`Runtime`: what a stage runs with — config, lake, a lazy Spark session, lazy Ray, device,
progress reporting. Built once by `cluster.runtime(cfg)` in the CLI or a job."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cellsynth.config import PipelineConfig
from cellsynth.errors import ConfigError
from cellsynth.lake import Lake, RunRegistry


@dataclass
class Runtime:
    cfg: PipelineConfig
    lake: Lake
    quiet: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True))
    _spark: Any = None
    _ray: Any = None
    # Only what this runtime started is stopped by close(): tests share one session.
    _owns_spark: bool = False
    _owns_ray: bool = False

    def use_spark(self, session: Any) -> None:
        """Run on a Spark session someone else started and owns (a test suite's shared session,
        spark-submit's); close() leaves it running."""
        if self._spark is not None and self._owns_spark:
            self._spark.stop()
        self._spark, self._owns_spark = session, False

    @property
    def registry(self) -> RunRegistry:
        return RunRegistry(self.lake)

    @property
    def spark(self):  # -> pyspark.sql.SparkSession
        if self._spark is None:
            from pyspark.sql import SparkSession

            from cellsynth.cluster.spark import build_session

            active = SparkSession.getActiveSession()
            if active is not None:  # a session someone else started (tests, spark-submit)
                self._spark = active
                return active
            self.log(f"starting Spark ({self.cfg.runtime.spark.master})")
            self._spark = build_session(self.cfg.runtime.spark, self.cfg.lake)
            self._owns_spark = True
        return self._spark

    def ray(self):  # -> the ray module, initialised
        if self._ray is None:
            from cellsynth.cluster.ray_ import init_ray

            self.log("starting Ray" if self.cfg.runtime.ray.address is None else f"joining Ray at {self.cfg.runtime.ray.address}")
            import ray

            self._owns_ray = not ray.is_initialized()
            self._ray = init_ray(self.cfg.runtime.ray, quiet=True)
        return self._ray

    @property
    def device(self):  # -> torch.device
        import torch

        want = self.cfg.runtime.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]·[/dim] {msg}")

    def warn(self, msg: str) -> None:
        """A line printed even when quiet: something the user should know before trusting the output."""
        self.console.print(f"[yellow]warning[/yellow]: {msg}", markup=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A progress bar for long work; yields `advance(n=1)`. Silent when quiet."""
        if self.quiet:
            yield lambda n=1: None
            return
        bar = Progress(
            TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def release_spark(self) -> None:
        """Stop the Spark session this runtime started, if it has one, and the local JVM behind
        it (`cluster.spark.stop_session`: a stopped session alone leaves the JVM's heap resident);
        a session someone else owns is left alone. A later `spark` starts a new one."""
        if self._spark is not None and self._owns_spark:
            from cellsynth.cluster.spark import stop_session

            stop_session(self._spark)
            self._spark, self._owns_spark = None, False

    def close(self) -> None:
        self.release_spark()
        self._spark = None
        if self._ray is not None and self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray = None


def _check_local_folder(key: str, where: str | None) -> None:
    """A ConfigError naming `key` when a local folder setting is, or lies under, a file: every command
    otherwise died in a FileExistsError / NotADirectoryError traceback (for run.lake_root, from the lake
    lock's mkdir), and tables / runs read a lake root that is a file as an empty lake."""
    if where is None or "://" in where:
        return
    path = Path(where).resolve()
    for up in (path, *path.parents):
        if up.exists():
            if not up.is_dir():
                at = "is a file" if up == path else f"lies under {up}, a file"
                raise ConfigError(f"{key}: {where} {at}; expected a folder (or a path where one can be made)")
            return


def make_lake(cfg: PipelineConfig, spark: Callable[[], Any] | None = None) -> Lake:
    """The configured lake; with `lake.engine: delta-spark`, reads/writes go through `spark()`.

    Raises:
        ConfigError: a local `run.lake_root` is a file or lies under one.
    """
    _check_local_folder("run.lake_root", cfg.run.lake_root)
    kwargs = dict(storage_options=cfg.storage_options(), target_file_size_mb=cfg.lake.target_file_size_mb,
                  commit_retries=cfg.lake.commit_retries)
    if cfg.lake.engine == "delta-spark" and spark is not None:
        from cellsynth.lake.spark_engine import SparkDeltaLake

        return SparkDeltaLake(cfg.run.lake_root, spark=spark, **kwargs)
    return Lake(cfg.run.lake_root, **kwargs)


@contextlib.contextmanager
def runtime(cfg: PipelineConfig, *, quiet: bool = False) -> Iterator[Runtime]:
    """A Runtime for `cfg`; Spark and Ray start on first use and stop on exit."""
    import torch

    # the folders stages write to, checked before anything runs (the lake root: make_lake)
    for key, where in (("run.data_dir", cfg.run.data_dir), ("scenario.output_dir", cfg.scenario.output_dir),
                       ("lake.report_dir", cfg.lake.report_dir)):
        _check_local_folder(key, where)
    torch.set_num_threads(cfg.runtime.torch_threads)
    rt = Runtime(cfg=cfg, lake=make_lake(cfg), quiet=quiet)
    if cfg.lake.engine == "delta-spark":
        rt.lake = make_lake(cfg, spark=lambda: rt.spark)
    from cellsynth.lake.lock import LakeLock

    # One writer per lake: recover() and the stages must not interleave with another run.
    lock = LakeLock(rt.lake, owner=cfg.run.name, timeout_s=cfg.lake.lock_timeout_s)
    lock.acquire()
    try:
        yield rt
    finally:
        try:
            rt.close()
        finally:
            lock.release()
