"""A Spark standalone master + worker and a Ray head on 127.0.0.1, started and stopped by tests.

Only processes started here are stopped (by their own process group), never `ray stop`, which
would take down every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyspark

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"service on port {port} did not start: {log.read_text()[-1500:]}")
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class Cluster:
    spark_master: str
    ray_job_address: str
    env: dict[str, str]


@contextlib.contextmanager
def local_cluster(log_dir: Path) -> Iterator[Cluster]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "SPARK_HOME": str(Path(pyspark.__file__).parent), "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_DAEMON_MEMORY": "256m", "RAY_USAGE_STATS_ENABLED": "0",
           # Ray's job API requires a token; this cluster's lives only in the environment.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    spark_class = str(Path(env["SPARK_HOME"]) / "bin" / "spark-class")
    master_port, worker_port = free_port(), free_port()
    ray_port, dash_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/rs")  # short: Ray's socket paths are length-limited
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = log_dir / f"{name}.log"
        proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        master, mlog = start([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                              "--port", str(master_port), "--webui-port", str(free_port())], "spark-master")
        _wait_port(master_port, master, mlog)
        url = f"spark://127.0.0.1:{master_port}"
        worker, wlog = start([spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                              "--port", str(worker_port), "--webui-port", str(free_port()), "--cores", "2",
                              "--memory", "1536m"], "spark-worker")
        _wait_port(worker_port, worker, wlog)
        head, hlog = start([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                            "--port", str(ray_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                            "--include-dashboard", "true", "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
                            "--temp-dir", ray_tmp, "--disable-usage-stats",
                            # The agents' default ports are fixed (52365 ...): with another Ray on the
                            # machine (a bench, a notebook) this head's job agent cannot bind and every
                            # submission is refused with "No available agent to submit job".
                            "--dashboard-agent-listen-port", str(free_port()),
                            "--dashboard-agent-grpc-port", str(free_port()),
                            "--runtime-env-agent-port", str(free_port()),
                            "--metrics-export-port", str(free_port())], "ray-head")
        _wait_port(dash_port, head, hlog, timeout_s=120)
        yield Cluster(url, f"http://127.0.0.1:{dash_port}", env)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
