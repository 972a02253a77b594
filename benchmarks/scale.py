"""Scale on one machine: 10,000 against 100,000 virtual clients, and an ML-20M-shaped round.

a. ``synthetic:10000`` and ``synthetic:100000`` (users resampled from ML-100K,
   common/data/synthetic.py), ~100 clients per round (q = 100/N), RunConfig() otherwise: DP and
   SecAgg+ on. Each simulation in its own Python process (benchmarks/simulation_runs.py): peak RSS
   of the whole process tree (driver + Ray, sampled every 0.5 s), round 1 (Ray start and the
   identity query every client answers once), the median of rounds 2.., and the final test on a
   secret random sample of ``--test-clients`` clients with its 95% confidence interval (the
   evaluation that did not finish over all clients at 10,000).
b. ``synthetic:138000:27000`` (ML-20M's shape: 138k users, 27k items): rounds with ~100 clients,
   DP and SecAgg+ on; the payload bytes per client per round (model down, SecAgg+ messages up,
   as the round's metrics row counts them: server/grid.py) and, in a fresh process, the peak RSS
   (VmHWM) of one device's round at that catalogue size: its data, the model, the training step,
   the clip, and SecAgg+'s quantization and masks as Flower's client mod computes them.

    python benchmarks/scale.py --json runs/scale.json        # ~25-40 min on 2 cores
    python benchmarks/scale.py --quick                       # smoke run: small populations

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
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import table, target, targets_table, write_json  # noqa: E402
from benchmarks.simulation_runs import NEVER, SimRun, run_sim  # noqa: E402
from common.config import RunConfig  # noqa: E402
from server import simulation  # noqa: E402

log = logging.getLogger("benchmarks.federated")

CLIENTS_PER_ROUND = 100
TARGET_RSS_RATIO = 1.3
TARGET_ROUND_RATIO = 1.5
ML20M_SHAPE = "synthetic:138000:27000"


def scale_config(source: str, population: int, *, rounds: int, test_clients: int) -> RunConfig:
    """RunConfig() (DP and SecAgg+ on) on ``source``, ~100 clients per round, no validation,
    the final test on a secret sample of ``test_clients`` clients."""
    return RunConfig().replace(**{
        "data.source": source, "fed.sample-rate": min(1.0, CLIENTS_PER_ROUND / population),
        "fed.rounds": rounds, "fed.eval-every": NEVER, "fed.test-clients": test_clients,
        # the identity query of round 1 reaches every client once (in chunks, each with this timeout)
        "fed.timeout": max(RunConfig().fed.timeout, 300.0)})


def traffic(run: SimRun) -> dict[str, float]:
    """Mean payload MB per sampled client per round, from the fit rows (server/grid.py)."""
    fits = [r for r in run.rows if r.get("kind") == "fit" and r.get("sampled") and "bytes_down" in r]
    if not fits:
        return {}
    down = statistics.fmean(r["bytes_down"] / r["sampled"] for r in fits) / 1e6
    up = statistics.fmean(r["bytes_up"] / max(r["participants"], 1) for r in fits) / 1e6
    return {"mb_down_per_client": down, "mb_up_per_client": up, "mb_per_client": down + up}


def final_test(run: SimRun) -> dict[str, float]:
    row = run.final_eval
    if not row or row.get("phase") != "test":
        return {"final_test_complete": 0.0}
    out = {"final_test_complete": 1.0, "final_test_users": float(row.get("users", 0)),
           "final_test_ndcg10": float(row.get("ndcg@10", math.nan)),
           "final_test_sampled": float(bool(row.get("sampled")))}
    if "ndcg@10_ci95" in row:
        out["final_test_ndcg10_ci95"] = float(row["ndcg@10_ci95"])
    return out


# ---------------------------------------------------------------- b. one device round, in a child

def _device_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One device's round at the catalogue of ``spec['source']``: what client/app.py does for a
    simulated client, then SecAgg+'s client-side quantization and masks (Flower's own functions,
    as secaggplus_mod applies them: one self mask and one pairwise mask per neighbour)."""
    import numpy as np
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from client.data import simulated_client_data, simulated_item_count
    from common.device import protect
    from common.models import build_model
    from common.privacy.device import DevicePolicy, protection_for
    from common.privacy.dp_fedavg import local_noise_for
    from common.rounds import RoundEngine

    def rss() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return math.nan

    out: dict[str, Any] = {"rss_after_imports_mb": rss()}
    cfg = RunConfig().replace(**{"data.source": spec["source"]})
    t0 = time.perf_counter()
    data = simulated_client_data(cfg.data, spec["client"], kind=cfg.fed.partition, num_silos=cfg.fed.num_silos,
                                 seed=cfg.seed)
    n_items = simulated_item_count(cfg.data)
    out["data_seconds"] = time.perf_counter() - t0
    model = build_model(cfg.model, n_items=n_items, seed=cfg.seed)
    engine = RoundEngine(cfg, model)
    config = engine.instruction(1, secure_aggregation=True)
    params, context = model.receive(engine.outgoing(), config)
    t1 = time.perf_counter()
    step = model.train(params, context, data, epochs=cfg.fed.local_epochs, lr=cfg.fed.client_lr, seed=cfg.seed,
                       server_round=1)
    arrays = protect(model, step.update, [np.shape(p) for p in model.arrays(params)],
                     protection_for(DevicePolicy.for_run(cfg), config), noise=local_noise_for(None, 1, data.client_id))
    q = cfg.secagg.quantization_bits
    bound = engine.value_bound(secure_aggregation=True)
    quantized = quantize(arrays, bound, 2 ** q)
    shapes = [a.shape for a in quantized]
    masked = [a.astype(np.int64) for a in quantized]
    for k in range(cfg.secagg.num_shares + 1):  # the self mask, then one per neighbour
        for m, mask in zip(masked, pseudo_rand_gen(np.random.bytes(32), 2 ** 32, shapes)):
            m += mask
    out["round_seconds"] = time.perf_counter() - t1
    out["n_items"] = n_items
    out["params"] = int(sum(a.size for a in arrays))
    out["positives"] = int(sum(len(u.items) for u in data.train))
    out["masked_mb"] = sum(m.nbytes for m in masked) / 1e6
    out["device_round_rss_mb"] = rss()
    return out


def device_round(source: str, work: Path, client: int = 0) -> dict[str, Any]:
    spec_path = work / "device-spec.json"
    out_path = work / "device-out.json"
    spec_path.write_text(json.dumps({"source": source, "client": client, "out": str(out_path)}))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--device-child", str(spec_path)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"error": tail[0] if tail else f"exit {proc.returncode}"}
    return json.loads(out_path.read_text())


# ---------------------------------------------------------------- report

def fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{float(v):,.{digits}f}"


ROWS = [  # (label, figure suffix, digits)
    ("clients", "clients", 0),
    ("rounds completed", "rounds", 0),
    ("clients/round (mean)", "mean_participants", 1),
    ("round 1 s (Ray start + identity query)", "round1_seconds", 1),
    ("median round s (2..)", "median_round_seconds", 2),
    ("final test s", "final_eval_seconds", 1),
    ("final test users (sampled)", "final_test_users", 0),
    ("final test NDCG@10", "final_test_ndcg10", 4),
    ("  ± 95% CI", "final_test_ndcg10_ci95", 4),
    ("MB down / client / round", "mb_down_per_client", 3),
    ("MB up / client / round", "mb_up_per_client", 3),
    ("peak RSS MB, rounds", "peak_rss_fit_mb", 0),
    ("peak RSS MB, whole run", "peak_rss_mb", 0),
    ("  of which driver MB", "peak_rss_driver_mb", 0),
    ("wall s", "wall_seconds", 0),
    ("stopped at time limit, s", "killed_after_seconds", 0),
]


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--device-child":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(spec["out"]).write_text(json.dumps(_device_child(spec)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, metavar="PATH", help="write figures and targets here")
    p.add_argument("--quick", action="store_true", help="smoke run: 1,000 vs 5,000 clients, a small ML-20M shape")
    p.add_argument("--populations", default="10000,100000", metavar="SMALL,BIG")
    p.add_argument("--rounds", type=int, default=4, help="rounds of each population run (default 4; round 1 apart)")
    p.add_argument("--test-clients", type=int, default=1000, help="final test sample size (default 1000)")
    p.add_argument("--ml20m", default=ML20M_SHAPE, help=f"the ML-20M-shaped source (default {ML20M_SHAPE})")
    p.add_argument("--ml20m-rounds", type=int, default=2, help="measured rounds of the ML-20M shape (default 2)")
    p.add_argument("--skip-ml20m", action="store_true")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per simulated client (Ray)")
    p.add_argument("--runs-dir", type=Path, help="keep the run directories here (default: a temporary one)")
    p.add_argument("--time-limit", type=float, default=1800.0, help="seconds per simulation before it is stopped")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    simulation.quiet_logs(False)
    log.setLevel(logging.INFO)
    small, big = (1000, 5000) if args.quick else (int(x) for x in args.populations.split(","))
    ml20m = "synthetic:5000:27000" if args.quick else args.ml20m
    rounds = 3 if args.quick else args.rounds
    test_clients = 200 if args.quick else args.test_clients

    tmp = None
    if args.runs_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedrec-scale-")
        root = Path(tmp.name)
    else:
        root = args.runs_dir
        root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    fig: dict[str, float] = {"load_average_start": load}
    cols: list[tuple[str, str]] = []

    for tag, n in (("small", small), ("big", big)):
        cfg = scale_config(f"synthetic:{n}", n, rounds=rounds, test_clients=test_clients)
        run = run_sim(f"clients{n}", cfg, root, num_cpus=args.num_cpus, progress=not args.no_progress,
                      time_limit=args.time_limit)
        fig.update({f"{tag}_{k}": v for k, v in run.figures.items()})
        fig.update({f"{tag}_{k}": v for k, v in traffic(run).items()})
        fig.update({f"{tag}_{k}": v for k, v in final_test(run).items()})
        fig[f"{tag}_complete"] = float(run.complete)
        cols.append((tag, f"synthetic:{n}"))
    fig["population_small"], fig["population_big"] = float(small), float(big)
    fig["rss_big_over_small"] = fig["big_peak_rss_mb"] / fig["small_peak_rss_mb"]
    if "big_peak_rss_fit_mb" in fig and "small_peak_rss_fit_mb" in fig:
        fig["rss_rounds_big_over_small"] = fig["big_peak_rss_fit_mb"] / fig["small_peak_rss_fit_mb"]
    fig["round_big_over_small"] = fig["big_median_round_seconds"] / fig["small_median_round_seconds"]

    device: dict[str, Any] = {}
    if not args.skip_ml20m:
        cfg = scale_config(ml20m, int(ml20m.split(":")[1]), rounds=args.ml20m_rounds + 1, test_clients=test_clients)
        # rounds + 1 and a stop after `rounds`: the final evaluation never starts (it is part a's)
        run = run_sim("ml20m", cfg, root, num_cpus=args.num_cpus, progress=not args.no_progress,
                      stop_after=args.ml20m_rounds, time_limit=args.time_limit)
        fig.update({f"ml20m_{k}": v for k, v in run.figures.items()})
        fig.update({f"ml20m_{k}": v for k, v in traffic(run).items()})
        fits = [r for r in run.rows if r.get("kind") == "fit"]
        fig["ml20m_round_complete"] = float(any(r.get("participants", 0) > 0 and not r.get("abandoned")
                                                for r in fits))
        cols.append(("ml20m", ml20m))
        device = device_round(ml20m, root)
        fig.update({f"ml20m_device_{k}": float(v) for k, v in device.items() if isinstance(v, (int, float))})

    fig["benchmark_seconds"] = time.perf_counter() - t_start
    fig["load_average_end"] = os.getloadavg()[0]
    goals = [
        target(f"peak_rss_{big}_over_{small}", fig.get("rss_big_over_small"), "<=", TARGET_RSS_RATIO),
        target(f"median_round_{big}_over_{small}", fig.get("round_big_over_small"), "<=", TARGET_ROUND_RATIO),
        target(f"final_test_{big}_completes", fig.get("big_final_test_complete"), ">=", 1.0),
    ]
    if not args.skip_ml20m:
        goals.append(target("ml20m_round_completes", fig.get("ml20m_round_complete"), ">=", 1.0))

    print()
    print(f"RunConfig() defaults (DP and SecAgg+ on), ~{CLIENTS_PER_ROUND} clients per round, "
          f"num_cpus={args.num_cpus}; load average {fig['load_average_start']:.2f} at the start, "
          f"{fig['load_average_end']:.2f} at the end")
    rows = []
    for label, suffix, digits in ROWS:
        values = [fig.get(f"{tag}_{suffix}") for tag, _ in cols]
        if all(v is None for v in values):
            continue
        rows.append([label, *[fmt(v, digits) for v in values]])
    print(table(["figure", *[name for _, name in cols]], rows))
    if device:
        print()
        if "error" in device:
            print(f"device round at {ml20m}: FAILED ({device['error']})")
        else:
            print(f"one device's round at {ml20m} ({device['n_items']:,} items, {device['params']:,} parameters, "
                  f"{device['positives']} positives): peak RSS {device['device_round_rss_mb']:.0f} MB "
                  f"(imports {device['rss_after_imports_mb']:.0f} MB), {device['round_seconds']:.2f} s, "
                  f"masked vector {device['masked_mb']:.1f} MB")
    print()
    print(targets_table(goals))
    print(f"benchmark wall time {fig['benchmark_seconds']:.0f} s{' (--quick: not the targets)' if args.quick else ''}")
    if args.json:
        write_json(args.json, {k: float(v) for k, v in fig.items()}, goals)
        log.info("wrote %s", args.json)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
