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

d. The default job: RunConfig() as it is (DP and SecAgg+ on), 150 rounds, timed as
   ``python simulate.py`` runs it, with the load average before and after; its wall time is the
   600 s target (``default_simulation_seconds``).

Runs a-c use RunConfig() with differential privacy off and SecAgg+ off (the plain federated path)
unless ``--dp default`` / ``--secagg on|default``; each simulation in its own Python process, one
after the other. When a-c are the project default themselves, d is their default run.

    python benchmarks/federated.py                    # everything (~25 min on 2 cores; --time-budget)
    python benchmarks/federated.py --quick            # smoke run: few rounds, small populations
    python benchmarks/federated.py --skip-scale --json runs/federated.json
    python benchmarks/federated.py --skip-quality --skip-scale --json runs/default-job.json   # d only (~10 min)

``--json`` writes ``{"figures": {name: value}, "targets": [{name, value, op, target, met}]}``.
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

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import table, target, write_json  # noqa: E402
from benchmarks.simulation_runs import NEVER, run_sim  # noqa: E402
from common.central import train_central  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import split_interactions  # noqa: E402
from server import simulation  # noqa: E402

log = logging.getLogger("benchmarks.federated")

TARGET_FED_OVER_CENTRAL_NDCG10 = 0.95
TARGET_ROUND_SECONDS_100 = 3.0
TARGET_DEFAULT_SIMULATION_SECONDS = 600.0
TARGET_PEAK_RSS_10K_OVER_2K = 1.5
CLIENTS_PER_ROUND = 100


def baseline_config(secagg: str = "off", dp: str = "off") -> tuple[RunConfig, dict[str, Any]]:
    """RunConfig() with differential privacy off (``dp.enabled``) or left at the project default,
    and SecAgg+ (``secagg.enabled``) off, on, or left at the project default. Returns the config
    and the keys changed."""
    cfg = RunConfig()
    flat = cfg.to_flat()
    changes: dict[str, Any] = {}
    if "dp.enabled" in flat:
        if dp != "default":
            changes["dp.enabled"] = False
    elif any(k.startswith("dp.") for k in flat):
        raise SystemExit("RunConfig has a dp section without dp.enabled; update benchmarks/federated.py")
    if "secagg.enabled" in flat and secagg != "default":
        changes["secagg.enabled"] = secagg == "on"
    return cfg.replace(**changes), changes


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
    out.append(table(["model", "NDCG@10", "Recall@10", "time"], quality))
    out.append("")
    out.append("Speed and memory per simulation")
    head = ["figure", *[label for _, label in sims]]
    rows = []
    for label, suffix, digits in SPEED_ROWS:
        values = [fig.get(f"{tag}_{suffix}") for tag, _ in sims]
        if all(v is None for v in values):
            continue
        rows.append([label, *[fmt(v, digits) for v in values]])
    out.append(table(head, rows))
    return "\n".join(out)


def targets(fig: dict[str, float]) -> list[dict[str, Any]]:
    goals = []
    if "fed_over_central_ndcg10" in fig:  # not with --skip-quality
        goals += [
            target("fed_over_central_ndcg10", fig.get("fed_over_central_ndcg10"), ">=", TARGET_FED_OVER_CENTRAL_NDCG10),
            target("round_seconds_100_clients", fig.get("round_seconds_100_clients"), "<=", TARGET_ROUND_SECONDS_100),
            target("round_seconds_default_run", fig.get("default_median_round_seconds"), "<=", TARGET_ROUND_SECONDS_100),
        ]
    if "default_simulation_seconds" in fig:  # a run of the project default (DP and SecAgg+ on)
        goals.append(target("default_simulation_seconds", fig["default_simulation_seconds"], "<=",
                            TARGET_DEFAULT_SIMULATION_SECONDS))
    if "peak_rss_10k_over_2k" in fig:
        goals.append(target("peak_rss_10k_over_2k", fig.get("peak_rss_10k_over_2k"), "<=", TARGET_PEAK_RSS_10K_OVER_2K))
    return goals


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="write figures and targets here")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few rounds, small populations")
    parser.add_argument("--skip-scale", action="store_true", help="skip the synthetic 10k/2k memory runs")
    parser.add_argument("--skip-quality", action="store_true",
                        help="skip central MF, the federated quality run and the ~100-client run (with --skip-scale: "
                             "only the default job is timed)")
    parser.add_argument("--skip-default-job", action="store_true",
                        help="do not time the project's default job (RunConfig() as it is: DP and SecAgg+ on) when "
                             "the other runs are not it")
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
                             "or the project default")
    parser.add_argument("--dp", choices=["off", "default"], default="off",
                        help="differential privacy in runs a-c: off (default) or the project default; the default "
                             "job (d) always runs with the project's defaults")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    simulation.quiet_logs(False)
    logging.getLogger("benchmarks.federated").setLevel(logging.INFO)
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
    cfg, changed = baseline_config(args.secagg, args.dp)
    log.info("baseline: RunConfig() with %s", ", ".join(f"{k}={v}" for k, v in changed.items()) or "no change")
    flat = cfg.to_flat()
    privacy = (f"dp {'on' if flat.get('dp.enabled') else 'off'}, "
               f"SecAgg+ {'on' if flat.get('secagg.enabled') else 'off' if 'secagg.enabled' in flat else 'n/a'}")
    fig: dict[str, float] = {"dp_enabled": float(bool(flat.get("dp.enabled", False))),
                             "secagg_enabled": float(bool(flat.get("secagg.enabled", False)))}
    sims: list[tuple[str, str]] = []

    if not args.skip_quality:
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
        # The default job is RunConfig() as it is: only then is its wall time "the default's" (issue 17:
        # a run with DP and SecAgg+ off was once reported under this name).
        fig["simulation_seconds"] = default.figures["wall_seconds"]
        if not changed:
            fig["default_simulation_seconds"] = default.figures["wall_seconds"]

        # b. ~100 clients per round: synthetic:1000 at q = 0.1
        hundred_rounds = 3 if args.quick else 6
        hundred_cfg = cfg.replace(**{"data.source": "synthetic:1000", "fed.sample-rate": CLIENTS_PER_ROUND / 1000,
                                     "fed.rounds": hundred_rounds, "fed.eval-every": NEVER})
        hundred = run_sim("hundred", hundred_cfg, root, num_cpus=args.num_cpus, progress=progress, time_limit=600)
        fig.update({f"hundred_{k}": v for k, v in hundred.figures.items()})
        sims.append(("hundred", "~100/round (synthetic:1000, q=0.1)"))
        fig["round_seconds_100_clients"] = hundred.figures["median_round_seconds"]

    # The project's default job, timed as users run it (issue 17: a run with DP and SecAgg+ off was
    # once reported as "the default"): RunConfig() as it is, when the runs above are not it.
    if changed and not args.skip_default_job:
        load_before = os.getloadavg()[0]
        job_cfg = RunConfig().replace(**{"fed.rounds": 4, "fed.eval-every": 2}) if args.quick else RunConfig()
        job = run_sim("defaultjob", job_cfg, root, num_cpus=args.num_cpus, progress=progress, time_limit=1800)
        fig.update({f"defaultjob_{k}": v for k, v in job.figures.items()})
        sims.append(("defaultjob", "default job (RunConfig(): DP + SecAgg+)"))
        fig["default_simulation_seconds"] = job.figures["wall_seconds"]
        fig["default_job_ndcg10"] = job.final_eval.get("ndcg@10", math.nan)
        fig["default_job_load_before"], fig["default_job_load_after"] = load_before, os.getloadavg()[0]
        log.info("default job: %.1f s, test NDCG@10 %.4f, load average %.2f before, %.2f after",
                 fig["default_simulation_seconds"], fig["default_job_ndcg10"], load_before,
                 fig["default_job_load_after"])

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
        write_json(args.json, {k: float(v) for k, v in fig.items()}, goals)
        log.info("wrote %s", args.json)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
