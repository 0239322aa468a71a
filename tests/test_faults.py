"""Faults every stage shares: a job killed mid-write or between commits, a lake that refuses
writes (permissions, file-size limit), and concurrent runs against one lake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from cellsynth.cluster import runtime
from cellsynth_testkit import test_config as make_test_config
from cellsynth.errors import LakeError
from cellsynth.lake import Lake, RunRegistry
from cellsynth.lake.lock import LOCK_NAME, LakeLock, LakeLockedError

# A two-table stage for a real pipeline run in a subprocess. With FAULT_MARKER set it commits
# its first table, signals, and sleeps before the second, so the test can SIGKILL it there.
STAGE_SRC = '''
import os, time
import pandas as pd
from cellsynth.stages import StageResult
NAME, INPUTS, OUTPUTS, CONFIG_SECTIONS = "twotables", (), ("metrics", "rejects"), ("radio",)

def run(cfg, rt, *, run_id):
    tag = os.environ.get("FAULT_TAG", "good")
    m = pd.DataFrame({"run_id": [run_id], "stage": ["twotables"], "metric": ["tag"], "value": [1.0], "detail": [tag]})
    v1 = rt.lake.write("metrics", m, mode="overwrite")
    marker = os.environ.get("FAULT_MARKER")
    if marker:
        open(marker, "w").write(str(v1))
        time.sleep(120)
    r = pd.DataFrame({"source": ["mdt"], "raw_row": [tag], "reason_code": ["x"], "reason_text": ["t"], "ingest_run_id": [run_id]})
    v2 = rt.lake.write("rejects", r, mode="overwrite")
    return StageResult(stage=NAME, run_id=run_id, rows_written={"metrics": 1, "rejects": 1},
                       table_versions={"metrics": v1, "rejects": v2})
'''

DRIVER_SRC = '''
import sys
from cellsynth import pipeline, stages
from cellsynth.cluster import runtime
from cellsynth.config import load_config
mods = {"twotables": "fault_stage"}
stages.STAGE_MODULES = pipeline.STAGE_MODULES = mods
cfg = load_config(sys.argv[1], sys.argv[2:])
with runtime(cfg, quiet=True) as rt:
    run_id, results = pipeline.run_pipeline(rt, stages=["twotables"], force=True)
print(run_id, [r.table_versions for r in results])
'''


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(tmp_path / "mods"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _setup(tmp_path: Path) -> Path:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fault_stage.py").write_text(STAGE_SRC)
    (mods / "fault_driver.py").write_text(DRIVER_SRC)
    conf = tmp_path / "conf.yaml"
    conf.write_text(json.dumps({"run": {"lake_root": str(tmp_path / "lake")}, "lake": {"lock_timeout_s": 30}}))
    return conf


def _drive(tmp_path: Path, conf: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(tmp_path / "mods" / "fault_driver.py"), str(conf)],
                            env=_env(tmp_path, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"driver exited early: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "driver never reached the fault point"
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_between_commits_rolls_back_and_next_run_completes(tmp_path):
    conf = _setup(tmp_path)
    first = _drive(tmp_path, conf)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    lake = Lake(tmp_path / "lake")
    assert (lake.version("metrics"), lake.version("rejects")) == (0, 0)

    marker = tmp_path / "committed_metrics"
    killed = _drive(tmp_path, conf, FAULT_MARKER=str(marker), FAULT_TAG="killed")
    _wait_for(marker, killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    # Half a run is in the lake: metrics moved on, rejects did not, the dead run's lock remains.
    assert (lake.version("metrics"), lake.version("rejects")) == (1, 0)
    assert json.loads((tmp_path / "lake" / LOCK_NAME).read_text())["pid"] == killed.pid

    last = _drive(tmp_path, conf, FAULT_TAG="after")
    assert last.wait(timeout=120) == 0, last.stderr.read()
    registry = RunRegistry(lake)
    recovered = registry.frame().query("stage == 'recover'")
    assert json.loads(recovered["input_versions"].iloc[0]) == {"metrics": 1}
    assert lake.read_pandas("metrics")["detail"].tolist() == ["after"]
    assert lake.read_pandas("rejects")["raw_row"].tolist() == ["after"]
    # The version a reader would have seen between the kill and the recovery is never "good".
    assert registry.last_good_versions()["metrics"] > 1
    assert not (tmp_path / "lake" / LOCK_NAME).exists()


KILL_WRITER_SRC = '''
import sys, numpy as np, pandas as pd
from cellsynth.lake import Lake
lake = Lake(sys.argv[1])
n = int(sys.argv[2])
rng = np.random.default_rng(0)
for i in range(1000):
    df = pd.DataFrame({"run_id": [f"r{i}"] * n, "stage": ["s"] * n, "metric": rng.integers(0, 10**9, n).astype(str),
                       "value": rng.normal(size=n)})
    v = lake.write("metrics", df)
    print(v, flush=True)
'''


@pytest.mark.slow
def test_sigkill_mid_write_leaves_last_committed_version(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_WRITER_SRC)
    n_rows = 300_000
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "lake"), str(n_rows)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0", proc.stderr.read()
    time.sleep(0.3)  # inside the next write's Parquet encoding
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    lake = Lake(tmp_path / "lake")
    version = lake.version("metrics")
    table = lake.read("metrics")
    # Every committed version holds whole writes only, whatever the kill interrupted.
    assert table.num_rows == (version + 1) * n_rows
    assert sorted(set(table.column("run_id").to_pylist())) == sorted(f"r{i}" for i in range(version + 1))
    # The next writer carries on from that version.
    df = pd.DataFrame({"run_id": ["next"], "stage": ["s"], "metric": ["m"], "value": [1.0]})
    assert lake.write("metrics", df) == version + 1


REFUSED_WRITER_SRC = '''
import os, resource, signal, sys
import pandas as pd
from cellsynth.errors import LakeError
from cellsynth.lake import Lake
if sys.argv[2] == "fsize":  # the disk-full stand-in: writes past 64 KiB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
n = 200_000
df = pd.DataFrame({"run_id": ["r"] * n, "stage": ["s"] * n, "metric": [str(i) for i in range(n)], "value": [0.5] * n})
try:
    Lake(sys.argv[1]).write("metrics", df)
except LakeError as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(3)
'''


def _refused_write(tmp_path: Path, lake_root: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "refused.py"
    script.write_text(REFUSED_WRITER_SRC)
    return subprocess.run([sys.executable, str(script), str(lake_root), mode], capture_output=True, text=True,
                          timeout=120)


def _seed_table(lake_root: Path) -> Lake:
    lake = Lake(lake_root)
    lake.write("metrics", pd.DataFrame({"run_id": ["r0"], "stage": ["s"], "metric": ["m"], "value": [1.0]}))
    return lake


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _make_read_only(dirs: list[Path]) -> None:
    if os.geteuid() != 0:
        for d in dirs:
            os.chmod(d, 0o555)
        return
    # root ignores file modes; the immutable attribute refuses root too.
    proc = subprocess.run(["chattr", "+i", *map(str, dirs)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot make the lake read-only as root here: {proc.stderr.strip()}")


def _make_writable(dirs: list[Path]) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", *map(str, dirs)], capture_output=True)
    for d in dirs:
        os.chmod(d, 0o755)


def test_permission_denied_is_one_clear_lake_error_and_nothing_written(tmp_path):
    lake = _seed_table(tmp_path / "lake")
    before = _files(tmp_path / "lake")
    dirs = [p for p in [tmp_path / "lake", *(tmp_path / "lake").rglob("*")] if p.is_dir()]
    _make_read_only(dirs)
    try:
        df = pd.DataFrame({"run_id": ["r1"] * 50, "stage": ["s"] * 50, "metric": ["m"] * 50, "value": [2.0] * 50})
        with pytest.raises(LakeError) as info:
            lake.write("metrics", df)
    finally:
        _make_writable(dirs)
    message = f"{type(info.value).__name__}: {info.value}"
    assert "\n" not in message
    assert message.startswith("LakeError: lake table 'metrics': write failed")
    assert "ermission denied" in message or "not permitted" in message
    assert lake.version("metrics") == 0 and lake.read("metrics").num_rows == 1
    assert _files(tmp_path / "lake") == before


def test_disk_full_write_fails_cleanly_and_table_stays_readable(tmp_path):
    lake = _seed_table(tmp_path / "lake")
    proc = _refused_write(tmp_path, tmp_path / "lake", "fsize")
    assert proc.returncode == 3, proc.stderr[-2000:]
    # delta-rs' runtime may print its own panic notice; ours is one line naming table and cause.
    (line,) = [line for line in proc.stderr.splitlines() if "Error" in line and "metrics" in line]
    assert line.startswith("LakeError: lake table 'metrics': write failed") and "File too large" in line
    assert lake.version("metrics") == 0
    assert lake.read_pandas("metrics")["run_id"].tolist() == ["r0"]


CONCURRENT_SRC = '''
import sys, time
import pandas as pd
from cellsynth.errors import CommitConflictError
from cellsynth.lake import Lake
lake = Lake(sys.argv[1], commit_retries=50)
who, n_writes = sys.argv[2], int(sys.argv[3])
while time.time() < float(sys.argv[4]):
    time.sleep(0.005)
ok = conflicts = 0
for i in range(n_writes):
    df = pd.DataFrame({"run_id": [who] * 10, "stage": ["s"] * 10, "metric": [f"{who}-{i}-{k}" for k in range(10)], "value": [float(i)] * 10})
    try:
        lake.write("metrics", df, app_id=f"{who}:{i}")
        ok += 1
    except CommitConflictError:
        conflicts += 1
print(ok, conflicts)
'''


@pytest.mark.slow
def test_two_writers_commit_concurrently_without_corruption(tmp_path):
    _seed_table(tmp_path / "lake")
    script = tmp_path / "two_writers.py"
    script.write_text(CONCURRENT_SRC)
    start_at = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "lake"), who, "12", start_at],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        outs.append(tuple(int(x) for x in out.split()))
    ok = sum(o[0] for o in outs)
    assert ok + sum(o[1] for o in outs) == 24
    lake = Lake(tmp_path / "lake")
    df = lake.read_pandas("metrics")
    assert lake.version("metrics") == ok  # one version per successful write, on top of version 0
    assert len(df) == 1 + 10 * ok and df["metric"].is_unique
    # Each committed write is whole: 10 rows per (writer, i).
    per_write = df[df.run_id != "r0"].groupby(df["metric"].str.rsplit("-", n=1).str[0]).size()
    assert (per_write == 10).all() and len(per_write) == ok


HOLDER_SRC = '''
import sys, time
from cellsynth.lake import Lake
from cellsynth.lake.lock import LakeLock
lock = LakeLock(Lake(sys.argv[1]), owner="holder-run")
lock.acquire()
print("held", flush=True)
time.sleep(120)
'''


def test_second_run_waits_for_the_lake_lock_then_takes_over_from_a_dead_holder(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER_SRC)
    holder = subprocess.Popen([sys.executable, str(script), str(tmp_path / "lake")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = make_test_config(tmp_path, lake={"lock_timeout_s": 0.5})
        with pytest.raises(LakeLockedError, match=rf"lake {tmp_path / 'lake'} is locked by run holder-run \(pid {holder.pid} "):
            with runtime(cfg, quiet=True):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The holder died without releasing: the next run takes the lock over, and releases it.
    with runtime(make_test_config(tmp_path, lake={"lock_timeout_s": 5}), quiet=True) as rt:
        assert LakeLock(rt.lake).holder()["pid"] == os.getpid()
    assert not (tmp_path / "lake" / LOCK_NAME).exists()


def test_lock_is_reentrant_in_one_process_and_skipped_for_object_stores(tmp_path):
    lake = Lake(tmp_path / "lake")
    with LakeLock(lake, timeout_s=0.1), LakeLock(lake, timeout_s=0.1):
        assert (tmp_path / "lake" / LOCK_NAME).exists()
    assert not (tmp_path / "lake" / LOCK_NAME).exists()
    remote = LakeLock(Lake("s3://bucket/lake"))
    remote.acquire()
    assert remote.path is None and remote.holder() is None
    remote.release()
