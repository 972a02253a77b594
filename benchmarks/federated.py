"""Federated vs central, simulation speed and memory at scale, side by side in one run.

a. Quality: central MF (``train_central``, RunConfig() defaults, RecBole random split) against
   the default federated run (RunConfig(), Flower simulation on Ray, one client per ML-100K
   user); final test NDCG@10 / Recall@10 and their ratio fed/central.
b. Speed: from the same run's metrics.jsonl (median round seconds over rounds 2.., clients per
   round, rounds/s, client-updates/s, wall time), plus a short run with ~100 clients per
   round (``synthetic:1000``, q = 0.1).
c. Scale: ``synthetic:10000`` against ``synthetic:2000`` with the same ~100 clients per round
   (q = 100/N): per-round seconds and the peak RSS of the whole process tree (driver + Ray),
   sampled every 0.5 s, so that the cost of idle clients shows.

Every simulation runs RunConfig() with differential privacy off and, unless ``--secagg on``,
SecAgg+ off (the plain federated path); each in its own Python process, one after the other.

    python benchmarks/federated.py                    # everything (~25 min on 2 cores; --time-budget)
    python benchmarks/federated.py --quick            # smoke run: few rounds, small populations
    python benchmarks/federated.py --skip-scale --json runs/federated.json

``--json`` writes ``{"figures": {name: value}, "targets": [{name, value, op, target, met}]}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

from common.central import train_central  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import split_interactions  # noqa: E402
from server import simulation  # noqa: E402
from server.run_dir import RunDir  # noqa: E402

log = logging.getLogger("benchmarks.federated")

TARGET_FED_OVER_CENTRAL_NDCG10 = 0.95
TARGET_ROUND_SECONDS_100 = 3.0
TARGET_DEFAULT_SIMULATION_SECONDS = 600.0
TARGET_PEAK_RSS_10K_OVER_2K = 1.5
CLIENTS_PER_ROUND = 100
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


def baseline_config(secagg: str = "off") -> tuple[RunConfig, dict[str, Any]]:
    """RunConfig() with differential privacy off (``dp.enabled``), and SecAgg+ (``secagg.enabled``)
    off, on, or left at the project default: the plain federated path the targets were set for.
    Returns the config and the keys changed."""
    cfg = RunConfig()
    flat = cfg.to_flat()
    changes: dict[str, Any] = {}
    if "dp.enabled" in flat:
        changes["dp.enabled"] = False
    elif any(k.startswith("dp.") for k in flat):
        raise SystemExit("RunConfig has a dp section without dp.enabled; update benchmarks/federated.py")
    if "secagg.enabled" in flat and secagg != "default":
        changes["secagg.enabled"] = secagg == "on"
    return cfg.replace(**changes), changes


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
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--sim-child", str(spec_path)],
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


def _sim_child(spec_path: Path) -> int:
    """The body of one simulation process (``--sim-child``)."""
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


def run_central(cfg: RunConfig, quick: bool) -> dict[str, float]:
    data = load_interactions(cfg.data.source, cfg.data.format, cfg.data.item_file or None)
    split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
    central = cfg.replace(**{"central.epochs": 4}).central if quick else cfg.central
    log.info("central MF on %s (%s split)", cfg.data.source, cfg.data.split)
    res = train_central(split, cfg.model, central, seed=cfg.seed, progress=False)
    return {"ndcg10": res.test["ndcg@10"], "recall10": res.test["recall@10"], "valid_ndcg10": res.valid["ndcg@10"],
            "seconds": res.seconds, "best_epoch": float(res.best_epoch)}


# ---------------------------------------------------------------- report

def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def render(head: list[str], rows: list[list[str]]) -> str:
    rows = [head, *rows]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


SPEED_ROWS = [  # (label, figure suffix, digits)
    ("clients (population)", "clients", 0),
    ("rounds", "rounds", 0),
    ("clients/round (mean)", "mean_participants", 1),
    ("round 1 s (Ray start, ids)", "round1_seconds", 2),
    ("median round s (2..)", "median_round_seconds", 2),
    ("max round s (2..)", "max_round_seconds", 2),
    ("rounds/s", "rounds_per_s", 3),
    ("client-updates/s", "client_updates_per_s", 1),
    ("client-updates/s (2..)", "client_updates_per_s_rounds2", 1),
    ("failed updates", "failures", 0),
    ("validation eval s (median)", "valid_eval_seconds_median", 1),
    ("final test eval s", "final_eval_seconds", 1),
    ("final test eval users", "final_eval_users", 0),
    ("wall s", "wall_seconds", 1),
    ("stopped at time limit, s", "killed_after_seconds", 0),
    ("peak RSS MB, rounds", "peak_rss_fit_mb", 0),
    ("peak RSS MB, whole run", "peak_rss_mb", 0),
    ("  of which driver MB", "peak_rss_driver_mb", 0),
    ("  processes at peak", "peak_processes", 0),
    ("another simulation ran, ~s", "overlap_seconds", 0),
]


def report(fig: dict[str, float], sims: list[tuple[str, str]]) -> str:
    out = []
    quality = [
        ["central MF", fmt(fig.get("central_ndcg10")), fmt(fig.get("central_recall10")),
         fmt(fig.get("central_seconds"), 1) + " s train"],
        ["federated (default run)", fmt(fig.get("fed_ndcg10")), fmt(fig.get("fed_recall10")),
         fmt(fig.get("default_wall_seconds"), 1) + " s wall"],
        ["fed / central", fmt(fig.get("fed_over_central_ndcg10")), fmt(fig.get("fed_over_central_recall10")), ""],
    ]
    out.append("Quality (ML-100K, random split, test, full ranking)")
    out.append(render(["model", "NDCG@10", "Recall@10", "time"], quality))
    out.append("")
    out.append("Speed and memory per simulation")
    head = ["figure", *[label for _, label in sims]]
    rows = []
    for label, suffix, digits in SPEED_ROWS:
        values = [fig.get(f"{tag}_{suffix}") for tag, _ in sims]
        if all(v is None for v in values):
            continue
        rows.append([label, *[fmt(v, digits) for v in values]])
    out.append(render(head, rows))
    return "\n".join(out)


def targets(fig: dict[str, float]) -> list[dict[str, Any]]:
    def check(name: str, value: float | None, op: str, target: float) -> dict[str, Any]:
        ok = value is not None and math.isfinite(value) and (value >= target if op == ">=" else value <= target)
        return {"name": name, "value": value, "op": op, "target": target, "met": bool(ok)}

    goals = [
        check("fed_over_central_ndcg10", fig.get("fed_over_central_ndcg10"), ">=", TARGET_FED_OVER_CENTRAL_NDCG10),
        check("round_seconds_100_clients", fig.get("round_seconds_100_clients"), "<=", TARGET_ROUND_SECONDS_100),
        check("round_seconds_default_run", fig.get("default_median_round_seconds"), "<=", TARGET_ROUND_SECONDS_100),
        check("default_simulation_seconds", fig.get("default_simulation_seconds"), "<=",
              TARGET_DEFAULT_SIMULATION_SECONDS),
    ]
    if "peak_rss_10k_over_2k" in fig:
        goals.append(check("peak_rss_10k_over_2k", fig.get("peak_rss_10k_over_2k"), "<=", TARGET_PEAK_RSS_10K_OVER_2K))
    return goals


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="write figures and targets here")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few rounds, small populations")
    parser.add_argument("--skip-scale", action="store_true", help="skip the synthetic 10k/2k memory runs")
    parser.add_argument("--scale-users", default="10000,2000", metavar="N,M",
                        help="populations of the scale runs (default 10000,2000; --quick 1000,400)")
    parser.add_argument("--scale-rounds", type=int, default=3, help="rounds of each scale run (default 3)")
    parser.add_argument("--scale-final-eval", choices=["on", "off"], default="on",
                        help="'on': the last round's test evaluation over all clients is part of the scale runs; "
                             "'off': run rounds+1 and stop after the last measured round, so it never starts")
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per simulated client (Ray)")
    parser.add_argument("--runs-dir", type=Path, help="keep the run directories here (default: a temporary one)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--time-budget", type=float, default=1500.0, metavar="S",
                        help="seconds for the whole benchmark (default 1500); the last scale run is stopped "
                             "when it runs out, and reports the rounds it completed")
    parser.add_argument("--secagg", choices=["off", "on", "default"], default="off",
                        help="SecAgg+ in every simulation: off (default: the plain path the targets are for), on, "
                             "or the project default; differential privacy is always off")
    parser.add_argument("--sim-child", type=Path, help=argparse.SUPPRESS)  # one simulation, in its own process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    simulation.quiet_logs(False)
    logging.getLogger("benchmarks.federated").setLevel(logging.INFO)
    if args.sim_child:
        return _sim_child(args.sim_child)
    progress = not args.no_progress

    try:
        big, small = (int(x) for x in args.scale_users.split(","))
    except ValueError:
        parser.error(f"--scale-users takes N,M (two integers), got {args.scale_users!r}")
    if args.quick and args.scale_users == parser.get_default("scale_users"):
        big, small = 1000, 400
    scale_rounds = 2 if args.quick and args.scale_rounds == parser.get_default("scale_rounds") else args.scale_rounds

    tmp = None
    if args.runs_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedrec-bench-")
        root = Path(tmp.name)
    else:
        root = args.runs_dir
        root.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    cfg, changed = baseline_config(args.secagg)
    log.info("baseline: RunConfig() with %s", ", ".join(f"{k}={v}" for k, v in changed.items()) or "no change")
    flat = cfg.to_flat()
    privacy = (f"dp {'on' if flat.get('dp.enabled') else 'off'}, "
               f"SecAgg+ {'on' if flat.get('secagg.enabled') else 'off' if 'secagg.enabled' in flat else 'n/a'}")
    fig: dict[str, float] = {"dp_enabled": float(bool(flat.get("dp.enabled", False))),
                             "secagg_enabled": float(bool(flat.get("secagg.enabled", False)))}
    sims: list[tuple[str, str]] = []

    # a. quality: central
    central = run_central(cfg, args.quick)
    fig.update({f"central_{k}": v for k, v in central.items()})

    # a + b. the default federated run
    default_cfg = cfg.replace(**{"fed.rounds": 4, "fed.eval-every": 2}) if args.quick else cfg
    default = run_sim("default", default_cfg, root, num_cpus=args.num_cpus, progress=progress, time_limit=1200)
    fig.update({f"default_{k}": v for k, v in default.figures.items()})
    sims.append(("default", f"default ({default_cfg.data.source}, q={default_cfg.fed.sample_rate:g})"))
    final = default.final_eval
    fig["fed_ndcg10"] = final.get("ndcg@10", math.nan)
    fig["fed_recall10"] = final.get("recall@10", math.nan)
    fig["fed_test_users"] = float(final.get("users", 0))
    fig["fed_over_central_ndcg10"] = fig["fed_ndcg10"] / fig["central_ndcg10"] if fig["central_ndcg10"] else math.nan
    fig["fed_over_central_recall10"] = (fig["fed_recall10"] / fig["central_recall10"]
                                        if fig["central_recall10"] else math.nan)
    fig["default_simulation_seconds"] = default.figures["wall_seconds"]

    # b. ~100 clients per round: synthetic:1000 at q = 0.1
    hundred_rounds = 3 if args.quick else 6
    hundred_cfg = cfg.replace(**{"data.source": "synthetic:1000", "fed.sample-rate": CLIENTS_PER_ROUND / 1000,
                                 "fed.rounds": hundred_rounds, "fed.eval-every": NEVER})
    hundred = run_sim("hundred", hundred_cfg, root, num_cpus=args.num_cpus, progress=progress, time_limit=600)
    fig.update({f"hundred_{k}": v for k, v in hundred.figures.items()})
    sims.append(("hundred", "~100/round (synthetic:1000, q=0.1)"))
    fig["round_seconds_100_clients"] = hundred.figures["median_round_seconds"]

    # c. scale: same ~100 clients per round, 10k vs 2k clients in the population
    if not args.skip_scale:
        for tag, n in (("small", small), ("big", big)):
            flat = {"data.source": f"synthetic:{n}", "fed.sample-rate": CLIENTS_PER_ROUND / n,
                    "fed.eval-every": NEVER, "fed.rounds": scale_rounds,
                    # the identity query in round 1 and the final test reach every client at once
                    "fed.timeout": max(cfg.fed.timeout, 0.2 * n)}
            stop_after = None
            if args.scale_final_eval == "off":
                flat["fed.rounds"], stop_after = scale_rounds + 1, scale_rounds
            scfg = cfg.replace(**flat)
            left = args.time_budget - (time.perf_counter() - t_start)
            run = run_sim(f"scale{n}", scfg, root, num_cpus=args.num_cpus, progress=progress, stop_after=stop_after,
                          time_limit=max(120.0, left if tag == "big" else 0.6 * left))
            fig.update({f"scale{n}_{k}": v for k, v in run.figures.items()})
            fig[f"scale{n}_complete"] = float(run.complete)
            sims.append((f"scale{n}", f"synthetic:{n}, q={scfg.fed.sample_rate:g}"))
        fig["peak_rss_10k_over_2k"] = fig[f"scale{big}_peak_rss_mb"] / fig[f"scale{small}_peak_rss_mb"]
        if f"scale{big}_peak_rss_fit_mb" in fig and f"scale{small}_peak_rss_fit_mb" in fig:
            fig["peak_rss_rounds_10k_over_2k"] = fig[f"scale{big}_peak_rss_fit_mb"] / fig[f"scale{small}_peak_rss_fit_mb"]
        fig["scale_big_users"], fig["scale_small_users"] = float(big), float(small)

    fig["benchmark_seconds"] = time.perf_counter() - t_start
    goals = targets(fig)
    print()
    print(f"All simulations: RunConfig() defaults except as listed per column; {privacy}; num_cpus={args.num_cpus}")
    print()
    print(report(fig, sims))
    print()
    if "peak_rss_10k_over_2k" in fig:
        print(f"peak RSS synthetic:{big} / synthetic:{small}: whole run {fig['peak_rss_10k_over_2k']:.2f}, "
              f"rounds only {fmt(fig.get('peak_rss_rounds_10k_over_2k'), 2)}")
    for t in goals:
        shown = "n/a" if t["value"] is None or not math.isfinite(t["value"]) else f"{t['value']:.4f}"
        print(f"target {t['name']}: {shown} {t['op']} {t['target']:g}: {'met' if t['met'] else 'NOT met'}")
    print(f"benchmark wall time {fig['benchmark_seconds']:.0f} s{' (--quick: figures are not comparable)' if args.quick else ''}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"figures": {k: _finite(float(v)) for k, v in fig.items()},
                   "targets": [{k: _finite(v) for k, v in t.items()} for t in goals]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        log.info("wrote %s", args.json)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
