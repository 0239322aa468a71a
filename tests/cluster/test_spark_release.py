"""`Runtime.release_spark` gives the local JVM's memory back: the JVM child process is gone
after release (a stopped SparkSession alone leaves PySpark's gateway JVM resident, 2.2-2.9 GB
after ingest at 10^3 cells), and a later `rt.spark` starts a working new one. Run in a fresh
interpreter so the suite's shared session (one JVM per test process) is not involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from cellsynth_testkit import local_runtime, test_config
from pyspark import SparkContext

def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None

def children_rss_mb():
    kids = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return sum(rss_mb(int(k)) or 0.0 for k in kids)

tmp = Path(sys.argv[1])
rt = local_runtime(tmp, test_config(tmp, runtime={"spark": {"master": "local[2]", "shuffle_partitions": 2,
                                                            "driver_memory": "512m"}}))
df = rt.spark.range(1000)
out = {"count": df.groupBy((df.id % 7).alias("k")).count().count()}
pid = SparkContext._gateway.proc.pid
out.update(pid=pid, jvm_rss_mb=rss_mb(pid), children_rss_mb_before=children_rss_mb())
rt.release_spark()
out.update(alive_after=Path(f"/proc/{pid}").exists(), children_rss_mb_after=children_rss_mb(),
           gateway_after=SparkContext._gateway is not None)
out["count_again"] = rt.spark.range(5).count()
pid2 = SparkContext._gateway.proc.pid
rt.close()
out.update(pid2=pid2, alive2_after_close=Path(f"/proc/{pid2}").exists())
print("RESULT " + json.dumps(out))
"""


def test_release_spark_stops_the_jvm(tmp_path):
    tests_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(tests_dir)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["count"] == 7
    assert r["jvm_rss_mb"] > 100.0  # a real JVM was running, holding real memory
    assert r["children_rss_mb_before"] >= r["jvm_rss_mb"] - 1.0
    assert r["alive_after"] is False  # the JVM process is gone (reaped), not just idle
    assert r["gateway_after"] is False
    assert r["children_rss_mb_after"] < r["children_rss_mb_before"] - 100.0  # the tree's RSS dropped
    assert r["count_again"] == 5  # a later rt.spark starts a new JVM and works
    assert r["pid2"] != r["pid"]
    assert r["alive2_after_close"] is False  # close() stops it too
