"""Bench: the whole pipeline (simulate -> report) at operator scale, per stage, with growth exponents.

Sizes (cells = 3 x sites; site density kept at the default's, so area_km grows with sqrt(sites)):
    default   60 cells /     60,000 reports (conf/local.yaml as shipped)
    1k      1,002 cells /  1,000,000 reports
    3k      3,000 cells /  3,000,000 reports
    10k    10,002 cells / 10,000,000 reports (only when asked: --sizes ... 10k)

For each size the driver (this process) runs every enabled stage of conf/local.yaml through
`run_stage` (the registry, skip-on-unchanged and recovery as `cellsynth run`), while a sampler
thread reads /proc every `--poll-s` seconds over the whole process tree under the driver (Ray's
GCS/raylet/workers, the Spark JVM) and records per stage:
    wall_s               stage wall time
    cpu_s                user+system CPU seconds of the whole tree during the stage (a process
                         that exits between two samples loses at most one interval)
    driver_peak_rss_mb   max sampled RSS of the driver process
    worker_peak_rss_mb   max sampled RSS of any other process of the tree, and which (`worker_kind`)
    rows_in / rows_out   the stage's StageResult counts
    loadavg_start / _end the 1-minute load average (the machine is shared: figures are noisy)

Resumable: each size's lake lives under --work (default /tmp/cellsynth-scale/<size>); the JSON is
written after every stage (a size with "complete": false is resumed: stages the registry already
holds as succeeded are skipped by the pipeline and their earlier figures kept; a stopped stage's
figures up to the stop go to the size's `stopped` list) and sizes already
complete in the JSON are skipped; `--rerun STAGE...` runs stages again on a size's existing lake
(after a change to them; the earlier figures are kept under the size's `rerun`); `--redo` runs a
size afresh and keeps a summary of its former figures under `superseded`. `exponents`:
    log(t_big / t_small) / log(cells_big / cells_small)  per stage and for the total, for wall and
CPU seconds, between the two largest sizes with finished stages (and every consecutive pair under
`pairs`); with two complete sizes, `exponents.projection` projects each stage's wall time to the
next larger size (by the exponent, and linearly in cells: not a measurement). The JSON says
`partial` while any size it holds is unfinished. `--recompute` rewrites these derived fields from
the stage figures (after a change to how they are derived); `--table` prints the README table;
`--take FILE --sizes 3k` copies a size run into another JSON (`--out FILE`) into this one.

Run it outside the heavy slots with `nice -n 15` (it takes hours at the larger sizes):
    nice -n 15 python bench/scale.py --sizes 1k default 3k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "scale.json"
DEFAULT_SITES, DEFAULT_AREA_KM = 20, 6.0
SIZES: dict[str, tuple[int, int]] = {  # name -> (n_sites, n_reports)
    "default": (20, 60_000),
    "300": (100, 300_000),
    "1k": (334, 1_000_000),
    "3k": (1000, 3_000_000),
    "10k": (3334, 10_000_000),
}
PIPELINE_ORDER = ("simulate", "ingest", "density", "radio", "traffic", "generate", "evaluate", "report")
TICK = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------- /proc sampling (no psutil here)
def _stat(pid: int) -> tuple[int, float, float, str] | None:
    """(ppid, cpu seconds user+system, rss MB, command name) of `pid`, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    f = raw[raw.rindex(")") + 2 :].split()
    # fields after the name: state(0) ppid(1) ... utime(11) stime(12) ... rss(21) (pages)
    return int(f[1]), (int(f[11]) + int(f[12])) / TICK, int(f[21]) * PAGE_MB, name


def _kind(pid: int, name: str) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = ""
    if "java" in name or "java" in cmd.split(" ", 1)[0]:
        return "spark_jvm"
    if name.startswith("ray::") or "default_worker.py" in cmd:
        return "ray_worker"
    if "raylet" in name or "gcs_server" in name or "ray" in cmd:
        return "ray_system"
    return name


def _tree(root: int) -> dict[int, tuple[float, float, str]]:
    """{pid: (cpu_s, rss_mb, name)} of `root` and every descendant."""
    procs: dict[int, tuple[int, float, float, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _stat(int(entry))) is not None:
            procs[int(entry)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            _pp, cpu, rss, name = procs[pid]
            out[pid] = (cpu, rss, name)
        todo.extend(children.get(pid, []))
    return out


class Sampler:
    """Polls the process tree; `window()` returns the figures since the last `mark()`."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s, self.root = poll_s, os.getpid()
        self.last_cpu: dict[int, float] = {}  # last seen cpu of every pid ever seen (exited ones kept)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.mark()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        tree = _tree(self.root)
        with self.lock:
            for pid, (cpu, rss, name) in tree.items():
                self.last_cpu[pid] = max(cpu, self.last_cpu.get(pid, 0.0))
                if pid == self.root:
                    self.driver_peak = max(self.driver_peak, rss)
                elif rss > self.worker_peak:  # named now: spark-submit's bash execs into the JVM
                    self.worker_peak, self.worker_kind = rss, _kind(pid, name)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._sample()

    def mark(self) -> None:
        if hasattr(self, "thread"):
            # sample first: a mark before the poller's first sample (a Sampler marked as soon as
            # it is made) took cpu0 = 0, so the window counted every process's CPU since it started
            self._sample()
        with getattr(self, "lock", threading.Lock()):
            self.cpu0 = sum(getattr(self, "last_cpu", {}).values())
            self.driver_peak = self.worker_peak = 0.0
            self.worker_kind = ""
            self.t0 = time.perf_counter()

    def window(self) -> dict:
        self._sample()
        with self.lock:
            return {
                "wall_s": round(time.perf_counter() - self.t0, 2),
                "cpu_s": round(sum(self.last_cpu.values()) - self.cpu0, 2),
                "driver_peak_rss_mb": round(self.driver_peak, 1),
                "worker_peak_rss_mb": round(self.worker_peak, 1),
                "worker_kind": self.worker_kind,
            }

    def stop(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------- one size
def _config(name: str, work: Path):
    from cellsynth.config import load_config

    n_sites, n_reports = SIZES[name]
    area_km = round(DEFAULT_AREA_KM * math.sqrt(n_sites / DEFAULT_SITES), 1)
    overrides = [f"run.lake_root={work / 'lake'}", f"run.data_dir={work / 'data'}",
                 f"scenario.n_sites={n_sites}", f"scenario.area_km={area_km}", f"scenario.n_reports={n_reports}"]
    return load_config(ROOT / "conf" / "local.yaml", overrides), overrides


def _code_version() -> str:
    """The commit the stage modules were loaded from (+dirty when the tree had edits)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "lib"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run_size(name: str, work: Path, poll_s: float, prior: dict | None, save, until: str | None = None,
             rerun: tuple[str, ...] = ()) -> dict:
    """Run (or resume) one size; `save(entry)` is called after every stage; stop (the size left
    incomplete, to be resumed) once stage `until` is done. Stages in `rerun` run again (forced
    past the registry's skip-on-unchanged) on the size's existing lake; their earlier figures
    move to the entry's `rerun` list."""
    from cellsynth.cluster import runtime
    from cellsynth.pipeline import SPARK_STAGES, enabled_stages, new_run_id, run_stage

    cfg, overrides = _config(name, work)
    n_sites, n_reports = SIZES[name]
    entry = prior if prior is not None else {
        "size": name, "n_cells": n_sites * cfg.scenario.sectors_per_site, "n_reports": n_reports,
        "overrides": overrides, "stages": {}, "complete": False,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": _code_version(),
    }
    entry.setdefault("resumed", 0)
    if prior is not None:
        entry["resumed"] += 1
    for stage in rerun:
        if stage in entry["stages"]:
            entry.setdefault("rerun", []).append({"stage": stage, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                  "previous": entry["stages"].pop(stage)})
            entry["complete"] = False
    sampler = Sampler(poll_s)
    code = _code_version()
    try:
        with runtime(cfg, quiet=True) as rt:
            from cellsynth.pipeline import recover

            recover(rt)
            run_id = new_run_id()
            names = enabled_stages(cfg)
            for i, stage in enumerate(names):
                if not set(names[i:]) & SPARK_STAGES and cfg.lake.engine != "delta-spark":
                    rt.release_spark()  # as run_pipeline does: no JVM idling through training
                if entry["stages"].get(stage, {}).get("done"):
                    continue
                load0 = os.getloadavg()[0]
                sampler.mark()
                try:
                    res = run_stage(stage, rt, run_id=run_id, force=stage in rerun)
                except (KeyboardInterrupt, SystemExit):  # stopped (SIGINT/SIGTERM): say so in the JSON
                    entry["unfinished"] = {**sampler.window(), "stage": stage, "code": code,
                                           "note": "stopped before this stage finished; its figures are up to the stop"}
                    save(entry)
                    raise
                if "unfinished" in entry:  # a stopped attempt's figures stay on file
                    entry.setdefault("stopped", []).append(entry.pop("unfinished"))
                fig = sampler.window()
                fig.update(
                    rows_in=dict(res.rows_in), rows_out=dict(res.rows_written), skipped=bool(res.skipped),
                    loadavg_start=round(load0, 2), loadavg_end=round(os.getloadavg()[0], 2), done=True,
                    code=code,  # a resumed size's stages can come from different commits
                )
                if res.skipped:  # done by an earlier, interrupted attempt whose figures were lost
                    fig["note"] = res.note
                entry["stages"][stage] = fig
                print(f"[{name}] {stage}: {fig['wall_s']} s wall, {fig['cpu_s']} s cpu, driver {fig['driver_peak_rss_mb']} MB,"
                      f" worker {fig['worker_peak_rss_mb']} MB ({fig['worker_kind']})", flush=True)
                save(entry)
                if stage == until:
                    return entry
    finally:
        sampler.stop()
    entry["total_wall_s"] = round(sum(s["wall_s"] for s in entry["stages"].values()), 1)
    entry["total_cpu_s"] = round(sum(s["cpu_s"] for s in entry["stages"].values()), 1)
    entry["driver_peak_rss_mb"] = max(s["driver_peak_rss_mb"] for s in entry["stages"].values())
    entry["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    entry["complete"] = True
    save(entry)
    return entry


def _exponent(a: float | None, b: float | None, ratio: float) -> float | None:
    return round(math.log(b / a) / ratio, 3) if a and b and a > 0 and b > 0 else None


def _pair(small: dict, big: dict) -> dict:
    """Wall and CPU growth exponents of every stage both sizes finished, and of the total."""
    ratio = math.log(big["n_cells"] / small["n_cells"])
    out: dict = {"between": [small["size"], big["size"]], "wall": {}, "cpu": {}}
    if not small.get("complete") or not big.get("complete"):
        out["partial"] = True  # a stage missing from either size is left out
    for stage in PIPELINE_ORDER:
        a, b = small["stages"].get(stage, {}), big["stages"].get(stage, {})
        if not (a.get("done") and b.get("done")):
            continue
        for key, field in (("wall", "wall_s"), ("cpu", "cpu_s")):
            if (x := _exponent(a.get(field), b.get(field), ratio)) is not None:
                out[key][stage] = x
    if small.get("complete") and big.get("complete"):
        out["wall"]["total"] = _exponent(small["total_wall_s"], big["total_wall_s"], ratio)
        out["cpu"]["total"] = _exponent(small["total_cpu_s"], big["total_cpu_s"], ratio)
    return out


def _projection(small: dict, big: dict) -> dict:
    """Wall seconds per stage at the next larger size of SIZES, from the two sizes measured: by the
    exponent (t_big (n / n_big)^x) and linearly in cells (t_big + slope (n - n_big), the slope the
    seconds per added cell between them; a stage with a large fixed cost has a small exponent,
    the slope does not understate it). A projection, not a measurement."""
    names = [k for k, _ in sorted(SIZES.items(), key=lambda kv: kv[1][0])]
    nxt = next((k for k in names if SIZES[k][0] * 3 > big["n_cells"]), None)
    if nxt is None:
        return {}
    n = SIZES[nxt][0] * 3  # cells = 3 sectors a site, as the scenario's default
    d = big["n_cells"] - small["n_cells"]
    power, linear = {}, {}
    for stage in PIPELINE_ORDER:
        a, b = small["stages"].get(stage, {}).get("wall_s"), big["stages"].get(stage, {}).get("wall_s")
        if not (a and b):
            continue
        power[stage] = round(b * (n / big["n_cells"]) ** (math.log(b / a) / math.log(big["n_cells"] / small["n_cells"])), 1)
        linear[stage] = round(b + (b - a) / d * (n - big["n_cells"]), 1)
    power["total"], linear["total"] = round(sum(power.values()), 1), round(sum(linear.values()), 1)
    return {"size": nxt, "n_cells": n, "from": [small["size"], big["size"]], "by_exponent_wall_s": power,
            "linear_in_cells_wall_s": linear, "note": "projected from the two sizes, not measured"}


def exponents(sizes: list[dict]) -> dict:
    """Growth exponents log(t_big / t_small) / log(cells_big / cells_small), wall and CPU, per stage.

    The headline pair is the two largest sizes that finished at least one common stage (a size
    still running counts with the stages it finished; the pair then says `partial`); `{STAGE: x}`
    at the top level is the wall exponent of that pair (the issue's schema), `cpu` the CPU one, and
    `pairs` holds every consecutive pair of sizes the JSON has."""
    have = sorted((s for s in sizes if any(f.get("done") for f in s["stages"].values())), key=lambda s: s["n_cells"])
    if len(have) < 2:
        return {}
    pairs = [_pair(a, b) for a, b in zip(have, have[1:])]
    top = pairs[-1]
    out = {"between": top["between"], **top["wall"], "cpu": top["cpu"]}
    if top.get("partial"):
        out["partial"] = True
    if have[-1].get("complete") and have[-2].get("complete"):
        out["projection"] = _projection(have[-2], have[-1])
    if len(pairs) > 1:
        out["pairs"] = pairs
    return out


def markdown(result: dict) -> str:
    """The README's per-stage table, from the JSON: wall s (CPU s) per size, the exponent."""
    sizes = result["sizes"]
    stages = list(dict.fromkeys(st for s in sizes for st in s["stages"]))
    # pipeline order (a rerun stage is written to the JSON after the others)
    stages.sort(key=lambda st: PIPELINE_ORDER.index(st) if st in PIPELINE_ORDER else len(PIPELINE_ORDER))
    exps = result.get("exponents", {})
    head = ["stage"] + [f"{s['n_cells']:,} cells / {s['n_reports']:,} reports" + ("" if s.get("complete") else " (partial)")
                        for s in sizes] + [f"exponent {' vs '.join(exps['between'])}, wall (CPU)" if exps else "exponent"]
    proj = exps.get("projection") or {}
    if proj:
        head.append(f"{proj['n_cells']:,} cells projected: linear in cells (by exponent)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(s: dict, st: str) -> str:
        f = s["stages"].get(st)
        return "" if f is None else f"{f['wall_s']:,.0f} s ({f['cpu_s']:,.0f} CPU-s)"

    def exp(st: str) -> str:
        wall, cpu = exps.get(st), exps.get("cpu", {}).get(st)
        return "" if wall is None else f"{wall:.2f}" + ("" if cpu is None else f" ({cpu:.2f})")

    def projected(st: str) -> list[str]:
        if not proj:
            return []
        lin, pw = proj["linear_in_cells_wall_s"].get(st), proj["by_exponent_wall_s"].get(st)
        return ["" if lin is None else f"{lin:,.0f} s ({pw:,.0f} s)"]

    for st in stages:
        lines.append("| " + " | ".join([st] + [cell(s, st) for s in sizes] + [exp(st)] + projected(st)) + " |")
    lines.append("| whole run | " + " | ".join(
        f"{s['total_wall_s']:,.0f} s" if s.get("complete") else f"unfinished ({len(s['stages'])} stages done)"
        for s in sizes) + f" | {exp('total')} |" + "".join(f" {v} |" for v in projected("total")))
    pad = " |" * (1 + bool(proj))
    # simulate makes the bench's input; the pipeline an operator runs is ingest -> report
    lines.append("| pipeline (ingest to report) | " + " | ".join(
        f"{sum(f['wall_s'] for st, f in s['stages'].items() if st != 'simulate'):,.0f} s" if s.get("complete") else ""
        for s in sizes) + " |" + pad)
    lines.append("| driver peak RSS | " + " | ".join(f"{max((f['driver_peak_rss_mb'] for f in s['stages'].values()), default=0):,.0f} MB"
                                                     for s in sizes) + " |" + pad)
    lines.append("| busiest worker RSS | " + " | ".join(f"{max((f['worker_peak_rss_mb'] for f in s['stages'].values()), default=0):,.0f} MB"
                                                        for s in sizes) + " |" + pad)
    return "\n".join(lines)


def _superseded(prior: dict, *, with_stages: bool) -> dict:
    """The summary of a replaced size kept under `superseded` (its per-stage figures when asked)."""
    out = {k: prior.get(k) for k in ("size", "code", "started_at", "total_wall_s", "total_cpu_s", "driver_peak_rss_mb")}
    if with_stages:
        out["stages"] = {st: {k: f.get(k) for k in ("wall_s", "cpu_s", "driver_peak_rss_mb", "worker_peak_rss_mb", "code")}
                         for st, f in prior["stages"].items()}
    return out | {"replaced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def take_sizes(result: dict, other: dict, names: list[str], out: Path, *, source: str) -> dict:
    """`result` with the sizes `names` copied from `other` (figures as that run wrote them, the
    file named in `taken_from`); a size it already held is summarised under `superseded`."""
    found = [s for s in other.get("sizes", []) if s["size"] in names]
    if not found:
        raise SystemExit(f"--take: none of the sizes {names} in {source}")
    for entry in found:
        prior = next((s for s in result["sizes"] if s["size"] == entry["size"]), None)
        if prior is not None:
            result.setdefault("superseded", []).append(_superseded(prior, with_stages=False))
        result["sizes"] = [s for s in result["sizes"] if s["size"] != entry["size"]] + [dict(entry, taken_from=Path(source).name)]
    result["sizes"].sort(key=lambda s: s["n_cells"])
    result["exponents"] = exponents(result["sizes"])
    result["partial"] = any(not s.get("complete") for s in result["sizes"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"took {[s['size'] for s in found]} from {source} into {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", action="store_true", help="print the README table from the JSON and exit")
    ap.add_argument("--recompute", action="store_true",
                    help="rewrite the JSON's derived fields (exponents, projection, partial) from its stage figures and exit")
    ap.add_argument("--sizes", nargs="+", default=["default", "1k", "3k"], choices=list(SIZES))
    ap.add_argument("--work", default="/tmp/cellsynth-scale")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--poll-s", type=float, default=1.0)
    ap.add_argument("--redo", action="store_true", help="rerun sizes already complete in the JSON")
    ap.add_argument("--until", default=None, help="stop each size after this stage (left incomplete; resume later)")
    ap.add_argument("--rerun", nargs="+", default=[], help="run these stages again on the sizes' existing lakes (forced)")
    ap.add_argument("--take", default=None, metavar="FILE",
                    help="copy the --sizes entries of FILE (another JSON of this script, e.g. a size run with its own --out)"
                         " into --out, recompute the derived fields and exit; nothing is run")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stop still writes what finished
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"name": "scale", "sizes": []}
    if args.table:
        print(markdown(result))
        return result
    if args.take:
        return take_sizes(result, json.loads(Path(args.take).read_text()), args.sizes, out, source=args.take)
    if args.recompute:
        result["exponents"] = exponents(result["sizes"])
        result["partial"] = any(not s.get("complete") for s in result["sizes"])
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["exponents"], indent=1))
        return result
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    result["machine"] = {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": sys.version.split()[0],
                         "nice": os.nice(0),
                         "note": "shared by ~8 people working at once: wall times include their load (loadavg per stage)"}

    def save(entry: dict) -> None:
        result["sizes"] = [s for s in result["sizes"] if s["size"] != entry["size"]] + [entry]
        result["sizes"].sort(key=lambda s: s["n_cells"])
        result["exponents"] = exponents(result["sizes"])
        # the JSON says so while any size it holds is unfinished (stopped, or still running)
        result["partial"] = any(not s.get("complete") for s in result["sizes"])
        out.write_text(json.dumps(result, indent=2) + "\n")

    for name in args.sizes:
        prior = next((s for s in result["sizes"] if s["size"] == name), None)
        if prior is not None and prior.get("complete") and not args.redo and not args.rerun:
            print(f"[{name}] already in {out}: skipped", flush=True)
            continue
        if args.redo or prior is None:
            if prior is not None:  # its figures stay on file, summarised, beside the new run
                result.setdefault("superseded", []).append(_superseded(prior, with_stages=True))
            prior = None
            shutil.rmtree(Path(args.work) / name, ignore_errors=True)  # a fresh lake: nothing skipped
        run_size(name, Path(args.work) / name, args.poll_s, prior, save, until=args.until, rerun=tuple(args.rerun))
    print(json.dumps(result.get("exponents", {}), indent=1))
    return result


if __name__ == "__main__":
    main()
