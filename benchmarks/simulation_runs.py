"""One simulation as the benchmarks run it: in its own Python process, timed, its whole process
tree's memory sampled, stopped at a time limit keeping the figures of what it had done.

Used by ``benchmarks/federated.py`` and ``benchmarks/secagg.py``. The child process is this
file run as a script with the path of its spec (``run_sim`` writes it); it is not a command
for people.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python benchmarks/X.py` puts benchmarks/ on sys.path, not the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

from common.config import RunConfig  # noqa: E402
from server import simulation  # noqa: E402
from server.run_dir import RunDir  # noqa: E402

log = logging.getLogger("benchmarks.federated")

NEVER = 10**6  # fed.eval-every beyond the last round: no validation during training


# ---------------------------------------------------------------- memory / progress sampling

class TreeSampler:
    """Samples, every ``interval`` s in a background thread, the summed RSS of this process and
    all its descendants (Ray's GCS, raylet and workers), and when rows appear in a run's
    metrics.jsonl (which times the evaluation phases the rows themselves do not)."""

    def __init__(self, metrics: Path | None = None, interval: float = 0.5, dump: Path | None = None) -> None:
        self.metrics, self.interval, self.dump = metrics, interval, dump
        self.samples: list[tuple[float, int, int, int]] = []  # (t, total rss, driver rss, processes)
        self.row_times: list[float] = []  # time at which row i was first seen
        self.foreign: list[float] = []  # times at which another Ray cluster ran on this machine
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._me = psutil.Process(os.getpid())

    def __enter__(self) -> "TreeSampler":
        self.t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            self._sample()
            n += 1
            if self.dump is not None and n % 10 == 0:  # what a killed run leaves behind
                self.write(self.dump)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps({"samples": self.samples, "row_times": self.row_times, "foreign": self.foreign}))
        os.replace(tmp, path)

    def _sample(self) -> None:
        now = time.perf_counter() - self.t0
        total, count = 0, 0
        driver = 0
        try:
            procs = [self._me, *self._me.children(recursive=True)]
        except psutil.Error:
            procs = [self._me]
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
            total += rss
            count += 1
            if p.pid == self._me.pid:
                driver = rss
        self.samples.append((now, total, driver, count))
        if len(self.samples) % 10 == 1:  # every ~5 s: is someone else's simulation competing for the CPUs?
            mine = {p.pid for p in procs}
            for proc in psutil.process_iter(["name"]):
                if proc.info["name"] == "raylet" and proc.pid not in mine:
                    self.foreign.append(now)
                    break
        if self.metrics is not None and self.metrics.is_file():
            try:
                n = sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
            except OSError:
                return
            while len(self.row_times) < n:
                self.row_times.append(now)



def peak(samples: list, until: float | None = None, since: float = 0.0) -> tuple[int, int, int]:
    """Largest summed RSS (bytes) among ``samples``, the driver's RSS and the process count then."""
    window = [s for s in samples if s[0] >= since and (until is None or s[0] <= until)]
    if not window:
        return 0, 0, 0
    best = max(window, key=lambda s: s[1])
    return int(best[1]), int(best[2]), int(best[3])


# ---------------------------------------------------------------- runs

@dataclass
class SimRun:
    name: str
    rows: list[dict[str, Any]]
    figures: dict[str, float]
    complete: bool  # False: stopped at the time limit, figures are what it had done by then
    path: Path | None = None  # the run directory

    @property
    def final_eval(self) -> dict[str, Any]:
        evals = [r for r in self.rows if r.get("kind") == "eval" and "ndcg@10" in r]
        return evals[-1] if evals else {}


def run_sim(name: str, cfg: RunConfig, root: Path, *, num_cpus: float, progress: bool,
            stop_after: int | None = None, time_limit: float = 1800.0) -> SimRun:
    """One simulation in a fresh Python process (so no run inherits another's memory, caches or
    Ray state); killed after ``time_limit`` s, keeping the figures of what it had done."""
    run_dir = RunDir.create(root / name, cfg)
    n = cfg.fed.rounds if stop_after is None else min(stop_after, cfg.fed.rounds)
    log.info("simulation %s: %s, %d rounds, q=%.4g -> %s", name, cfg.data.source, n, cfg.fed.sample_rate, run_dir.path)
    spec = {"run_dir": str(run_dir.path), "num_cpus": num_cpus, "progress": progress, "stop_after": stop_after}
    spec_path = run_dir.path / "bench-spec.json"
    spec_path.write_text(json.dumps(spec))
    out_path, dump_path = run_dir.path / "bench-result.json", run_dir.path / "bench-samples.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec_path)],
                            start_new_session=True)
    try:
        proc.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        log.warning("simulation %s: stopped at the %.0f s limit; reporting what it had done", name, time_limit)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - t0
    rows = RunDir(run_dir.path).rounds()
    if out_path.is_file() and proc.returncode == 0:
        out = json.loads(out_path.read_text())
        run = SimRun(name, rows, out["figures"], True, run_dir.path)
    else:
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            log.error("simulation %s exited with status %s", name, proc.returncode)
        dump = json.loads(dump_path.read_text()) if dump_path.is_file() else {"samples": [], "row_times": []}
        from client.data import num_clients

        result = {"num_clients": num_clients(cfg.data, cfg.fed.partition, cfg.fed.num_silos, cfg.seed),
                  "wall_seconds": math.nan}
        figures = sim_figures(rows, result, dump["samples"], dump["row_times"], dump.get("foreign", []))
        figures["killed_after_seconds"] = wall
        run = SimRun(name, rows, figures, False, run_dir.path)
    log.info("simulation %s %s: %s", name, "done" if run.complete else "INCOMPLETE",
             ", ".join(f"{k}={v:.4g}" for k, v in run.figures.items() if v is not None))
    return run


def sim_child(spec_path: Path) -> int:
    """The body of one simulation process (this file run as a script with the spec's path)."""
    spec = json.loads(spec_path.read_text())
    run_dir = RunDir(spec["run_dir"])
    saved = json.loads((run_dir.path / "config.json").read_text())
    new_keys = sorted(set(RunConfig().to_flat()) - set(saved))
    if new_keys:  # the code changed since the benchmark started: these take today's defaults
        log.warning("config keys unknown when the benchmark started, at their defaults now: %s",
                    ", ".join(f"{k}={RunConfig().to_flat()[k]}" for k in new_keys))
    cfg = run_dir.config()
    sampler = TreeSampler(run_dir.path / "metrics.jsonl", dump=run_dir.path / "bench-samples.json")
    with sampler:
        result = simulation.run(cfg, run_dir, num_cpus=spec["num_cpus"], progress=spec["progress"],
                              stop_after=spec["stop_after"])
    sampler.write(run_dir.path / "bench-samples.json")
    result = {k: v for k, v in result.items() if k in ("num_clients", "wall_seconds")}
    figures = sim_figures(run_dir.rounds(), result, sampler.samples, sampler.row_times, sampler.foreign)
    (run_dir.path / "bench-result.json").write_text(json.dumps({"figures": figures, "result": result}))
    return 0


def sim_figures(rows: list[dict[str, Any]], result: dict[str, Any], samples: list,
                row_times: list[float], foreign: list[float] = ()) -> dict[str, float]:
    """Speed and memory figures of one simulation, from its metrics.jsonl rows and the samples."""
    fits = [r for r in rows if r.get("kind") == "fit"]
    secs = [float(r.get("seconds", 0.0)) for r in fits]
    later = [float(r["seconds"]) for r in fits if r["round"] >= 2]
    parts = [int(r.get("participants", 0)) for r in fits]
    total = sum(secs)
    fig: dict[str, float] = {
        "clients": float(result.get("num_clients") or math.nan),
        "rounds": float(len(fits)),
        "round1_seconds": secs[0] if secs else math.nan,
        "median_round_seconds": statistics.median(later) if later else math.nan,
        "max_round_seconds": max(later) if later else math.nan,
        "mean_participants": statistics.fmean(parts) if parts else math.nan,
        "median_participants_rounds2": statistics.median(parts[1:]) if len(parts) > 1 else math.nan,
        "rounds_per_s": len(fits) / total if total else math.nan,
        "client_updates_per_s": sum(parts) / total if total else math.nan,
        "client_updates_per_s_rounds2": (sum(parts[1:]) / sum(later)) if later and sum(later) else math.nan,
        "failures": float(sum(int(r.get("failures", 0)) for r in fits)),
        "wall_seconds": float(result.get("wall_seconds", math.nan)),
    }
    # Timing of the phases from when rows appeared (0.5 s resolution).
    last_fit = max((i for i, r in enumerate(rows) if r.get("kind") == "fit"), default=None)
    final = [i for i, r in enumerate(rows) if r.get("kind") == "eval" and r.get("phase") == "test"]
    if last_fit is not None and last_fit < len(row_times):
        t_last_fit = row_times[last_fit]
        fig["startup_seconds"] = row_times[0] - secs[0]
        if final and final[-1] < len(row_times):
            fig["final_eval_seconds"] = row_times[final[-1]] - t_last_fit
            fig["final_eval_users"] = float(rows[final[-1]].get("users", 0))
        valid = [i for i, r in enumerate(rows) if r.get("kind") == "eval" and r.get("phase") == "valid"]
        durs = [row_times[i] - row_times[i - 1] for i in valid if i < len(row_times)]  # after its fit row
        if durs:
            fig["valid_eval_seconds_median"] = statistics.median(durs)
        fig["peak_rss_fit_mb"] = peak(samples, until=t_last_fit)[0] / 2**20
    top = peak(samples)
    fig["peak_rss_mb"] = top[0] / 2**20
    fig["peak_rss_driver_mb"] = top[1] / 2**20
    fig["peak_processes"] = float(top[2])
    # ~seconds during which another Ray simulation shared the machine (checked every ~5 s)
    fig["overlap_seconds"] = 5.0 * len(foreign)
    return fig


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: simulation_runs.py SPEC.json (written by run_sim; run benchmarks/federated.py instead)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    simulation.quiet_logs(False)
    log.setLevel(logging.INFO)
    sys.exit(sim_child(Path(sys.argv[1])))
