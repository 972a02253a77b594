"""Distributed DP against central DP on ML-100K (issue #14): the same budget (ε = 8 against the
released model at δ = 1e-4, 150 rounds, q = 0.1, secret Poisson cohorts), test NDCG@10 with full
ranking, the SecAgg+ field at 12, 16 and 20 bits; and the round time of both through Flower's
SecAgg+ at ~100 clients per round.

Utility runs in the in-process runner (the same round engine and device steps as the Flower apps)
with seeded noise and cohorts; the distributed rows draw each round's device noise as one sum
(``pooled_noise``: the same distribution within [KLS21]'s τ, common/privacy/distributed.py).
Central DP runs with SecAgg+'s arithmetic (devices clip with the rounding margin), as the default
run does. Round time runs the real Flower simulation (Ray, SecAgg+, every device drawing its own
discrete Gaussian share from the OS CSPRNG in distributed mode).

    python benchmarks/distributed_dp.py [--json out.json] [--part utility|round-time|all]
                                        [--seeds N] [--rounds R] [--jobs J]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# `python benchmarks/X.py` puts benchmarks/ on sys.path, not the checkout, and opacus installs a
# top-level package `benchmarks` of its own: the checkout goes first, so `benchmarks.*` is ours.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import table, target, targets_table, write_json  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import split_interactions  # noqa: E402
from common.evaluation import EvalSets  # noqa: E402
from common.privacy import plan_noise_multiplier  # noqa: E402

EPSILON, DELTA = 8.0, 1e-4
BITS = (12, 16, 20)


def cells(base: RunConfig, seeds: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, flat config) of every utility run."""
    sigma = plan_noise_multiplier(target_epsilon=EPSILON, delta=DELTA, rounds=base.fed.rounds,
                                  sample_rate=base.fed.sample_rate)
    out = []
    for seed in range(seeds):
        seeded = {"dp.noise-seed": seed, "fed.sampling-seed": seed, "dp.delta": DELTA, "dp.target-epsilon": EPSILON}
        out.append(("central", base.replace(**seeded, **{"dp.noise-multiplier": sigma}).to_flat()))
        for bits in BITS:
            out.append((f"distributed {bits} bits",
                        base.replace(**seeded, **{"dp.mode": "distributed", "dp.bits": bits}).to_flat()))
    return out


def utility(job: tuple[str, dict[str, Any], EvalSets]) -> dict[str, Any]:
    import torch

    from common.inprocess import run_inprocess

    torch.set_num_threads(1)
    label, flat, sets = job
    cfg = RunConfig.from_flat(flat)
    row: dict[str, Any] = {"label": label, "seed": cfg.dp.noise_seed, "bits": cfg.dp.bits if "distributed" in label
                           else cfg.secagg.quantization_bits}
    t0 = time.perf_counter()
    try:
        result = run_inprocess(cfg, sets, secure_aggregation=True, pooled_noise=True)
    except ValueError as exc:  # a field too small for the plan: refused before round 1
        return {**row, "refused": str(exc).split(";")[0], "seconds": time.perf_counter() - t0}
    test = result.evals[-1]
    row.update(ndcg=test["ndcg@10"], recall=test["recall@10"], rounds=len(result.rounds),
               epsilon=result.ledger.epsilon(), epsilon_server=result.ledger.epsilon(amplification=False),
               seconds=time.perf_counter() - t0)
    if "distributed" in label:
        from common.ddp_round import DistributedRounds

        dim = sum(a.size for a in result.model.arrays(result.params))
        row["z"] = DistributedRounds(cfg, dim).ensure_plan(len(sets.train)).noise_multiplier  # the run's plan
    else:
        row["z"] = cfg.dp.noise_multiplier
    return row


def round_time(base: RunConfig, rounds: int) -> dict[str, float]:
    """Median seconds of rounds 2..R through the Flower simulation with SecAgg+: central vs distributed."""
    from server import simulation
    from server.run_dir import RunDir

    out = {}
    for label, flat in (("central", {}), ("distributed", {"dp.mode": "distributed", "dp.bits": 20})):
        cfg = base.replace(**{"fed.rounds": rounds, "fed.eval-every": 10_000, "dp.target-epsilon": EPSILON, **flat})
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = RunDir.create(Path(tmp), cfg)
            simulation.run(cfg, run_dir, progress=True)
            rows = [r for r in run_dir.rounds() if r["kind"] == "fit"]
        seconds = [r["seconds"] for r in rows[1:]]
        out[f"{label} median round seconds"] = statistics.median(seconds)
        out[f"{label} clients per round"] = statistics.mean(r["participants"] for r in rows[1:])
        print(f"{label}: rounds 2-{rounds}: median {statistics.median(seconds):.2f} s, "
              f"{out[f'{label} clients per round']:.0f} clients per round")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--part", choices=("utility", "round-time", "all"), default="all")
    p.add_argument("--seeds", type=int, default=2, help="seeds of noise and cohorts per row (default 2)")
    p.add_argument("--rounds", type=int, help="rounds per utility run (default: the run's 150)")
    p.add_argument("--timing-rounds", type=int, default=8, help="rounds per round-time run (default 8)")
    p.add_argument("--jobs", type=int, default=2, help="utility runs at once, one process each (default 2)")
    args = p.parse_args(argv)
    base = RunConfig()
    if args.rounds:
        base = base.replace(**{"fed.rounds": args.rounds})
    figures: dict[str, Any] = {}
    goals = []
    if args.part in ("utility", "all"):
        sets = EvalSets.from_split(split_interactions(load_interactions(), "random", seed=0))
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(utility, [(label, flat, sets) for label, flat in cells(base, args.seeds)]))
        print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s ({args.jobs} at once on this machine); "
              f"{base.fed.rounds} rounds, q = {base.fed.sample_rate}, ε = {EPSILON} at δ = {DELTA}")
        print(table(["DP", "bits", "seed", "NDCG@10", "Recall@10", "rounds", "ε released", "ε server", "z", "note"],
                    [[r["label"], r["bits"], r["seed"], r.get("ndcg", "-"), r.get("recall", "-"), r.get("rounds", "-"),
                      r.get("epsilon", "-"), r.get("epsilon_server", "-"), r.get("z") or "-", r.get("refused", "")]
                     for r in rows]))
        central = statistics.mean(r["ndcg"] for r in rows if r["label"] == "central")
        figures["central ndcg@10"] = central
        best = None
        for bits in BITS:
            mine = [r for r in rows if r["label"] == f"distributed {bits} bits"]
            if any("refused" in r for r in mine):
                figures[f"distributed {bits} bits"] = None
                continue
            ndcg = statistics.mean(r["ndcg"] for r in mine)
            figures[f"distributed {bits} bits ndcg@10"] = ndcg
            figures[f"distributed {bits} bits ratio"] = ndcg / central
            figures[f"distributed {bits} bits epsilon server"] = statistics.mean(r["epsilon_server"] for r in mine)
            best = max(best or 0.0, ndcg / central)
        goals.append(target("distributed ≤ 20 bits NDCG@10 ÷ central (ε = 8)", best, ">=", 0.95))
    if args.part in ("round-time", "all"):
        times = round_time(base, args.timing_rounds)
        figures.update(times)
        ratio = times["distributed median round seconds"] / times["central median round seconds"]
        figures["round time ratio"] = ratio
        goals.append(target("round time distributed ÷ central, SecAgg+ (~100 clients)", ratio, "<=", 1.25))
    print(targets_table(goals))
    if args.json:
        write_json(args.json, figures, goals)
        print(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
