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


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are chosen, so none repeats."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


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
    ray_head: subprocess.Popen
    ray_head_log: Path
    ray_tmp: Path

    def ray_head_died(self) -> bool:
        return self.ray_head.poll() is not None

    def diagnostics(self, chars: int = 1500) -> str:
        """Tails of the Ray head's own log and its session logs, for a failure message."""
        parts = [f"ray head {'exited ' + str(self.ray_head.returncode) if self.ray_head_died() else 'alive'}"]
        logs = [self.ray_head_log, *sorted(self.ray_tmp.glob("session_2*/logs/ray_process_exit.log")),
                *sorted(self.ray_tmp.glob("session_2*/logs/raylet.err")),
                *sorted(self.ray_tmp.glob("session_2*/logs/dashboard.err")),
                *sorted(self.ray_tmp.glob("session_2*/logs/dashboard_agent.err"))]
        for log in logs:
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").strip()
                if text:
                    parts.append(f"--- {log.name}\n{text[-chars:]}")
        return "\n".join(parts)


@contextlib.contextmanager
def local_cluster(log_dir: Path) -> Iterator[Cluster]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "SPARK_HOME": str(Path(pyspark.__file__).parent), "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_DAEMON_MEMORY": "256m", "RAY_USAGE_STATS_ENABLED": "0",
           # Ray's job API requires a token; this cluster's lives only in the environment.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    spark_class = str(Path(env["SPARK_HOME"]) / "bin" / "spark-class")
    # Every port is chosen here: Ray's defaults (6379, 8265, 10001 for the client server, 52365 for
    # the job agent ...) collide with any other Ray on the machine, and under --block one process
    # that cannot bind takes the whole head down.
    (master_port, worker_port, master_ui, worker_ui, ray_port, dash_port, agent_http, agent_grpc, env_agent,
     metrics, client_port) = free_ports(11)
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/rs")  # short: Ray's socket paths are length-limited
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = log_dir / f"{name}.log"
        proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        master, mlog = start([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                              "--port", str(master_port), "--webui-port", str(master_ui)], "spark-master")
        _wait_port(master_port, master, mlog)
        url = f"spark://127.0.0.1:{master_port}"
        worker, wlog = start([spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                              "--port", str(worker_port), "--webui-port", str(worker_ui), "--cores", "2",
                              "--memory", "1536m"], "spark-worker")
        _wait_port(worker_port, worker, wlog)
        head, hlog = start([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                            "--port", str(ray_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                            "--include-dashboard", "true", "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
                            "--temp-dir", ray_tmp, "--disable-usage-stats",
                            # With the agents' fixed default ports held by another Ray on the machine,
                            # every submission was refused with "No available agent to submit job".
                            "--dashboard-agent-listen-port", str(agent_http),
                            "--dashboard-agent-grpc-port", str(agent_grpc),
                            "--runtime-env-agent-port", str(env_agent),
                            "--metrics-export-port", str(metrics),
                            "--ray-client-server-port", str(client_port)], "ray-head")
        _wait_port(dash_port, head, hlog, timeout_s=120)
        yield Cluster(url, f"http://127.0.0.1:{dash_port}", env, head, hlog, Path(ray_tmp))
    finally:
        for proc in reversed(procs):
            _stop(proc)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
