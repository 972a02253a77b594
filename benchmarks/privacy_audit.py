"""The canary audit's mutation check on ML-100K (issue #14): canary clients in fedrec's own rounds
(common/canary_run.py), the empirical ε beside the accounted ε, for the build as it is and for two
deliberately broken builds -- noise ÷ 10 (the ledger still records σ) and public cohorts (seeded
from the configuration while the ledger still claims amplification by secret sampling) -- under
central DP (the default run: σ = 1.03, q = 0.1, 150 rounds), local DP (σ planned for ε = 8) and
distributed DP (noise planned for ε = 8, 20-bit field).

Targets: the build as it is is not flagged in any mode; both mutants are flagged under central and
distributed DP; noise ÷ 10 is flagged under local DP (local DP claims no amplification, so public cohorts
break nothing there and must not be flagged either).

    python benchmarks/privacy_audit.py [--json out.json] [--quick] [--canaries K] [--jobs J] [--modes M,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# `python benchmarks/X.py` puts benchmarks/ on sys.path, not the checkout, and opacus installs a
# top-level package `benchmarks` of its own: the checkout goes first, so `benchmarks.*` is ours.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import table, target, targets_table, write_json  # noqa: E402
from common.canary_run import run_canary_audit  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import split_interactions  # noqa: E402
from common.evaluation import EvalSets  # noqa: E402
from common.privacy import plan_local_noise_multiplier  # noqa: E402

BUILDS = (None, "noise/10", "public-cohorts")


def one(job: tuple[dict[str, Any], EvalSets, int, str | None]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    flat, sets, canaries, mutant = job
    t0 = time.perf_counter()
    audit = run_canary_audit(RunConfig.from_flat(flat), sets, canaries=canaries, mutant=mutant, bootstrap=1000)
    return {**audit.to_dict(), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="30 rounds: checks the script runs")
    p.add_argument("--canaries", type=int, default=50, help="inserted canaries, as many held out (default 50)")
    p.add_argument("--jobs", type=int, default=2, help="audits at once, one process each (default 2)")
    p.add_argument("--modes", default="central,local,distributed",
                   help="DP modes to audit, comma-separated (default: central,local,distributed)")
    args = p.parse_args(argv)
    sets = EvalSets.from_split(split_interactions(load_interactions(), "random", seed=0))
    base = RunConfig()
    if args.quick:
        base = base.replace(**{"fed.rounds": 30, "dp.target-epsilon": 0})
    local_sigma = plan_local_noise_multiplier(target_epsilon=8.0, delta=base.dp.delta, rounds=base.fed.rounds)
    local = base.replace(**{"dp.mode": "local", "dp.noise-multiplier": local_sigma})
    # Distributed DP: noise planned for the central build's accounted ε (its plan's, RDP), 20-bit field.
    distributed = base.replace(**{"dp.mode": "distributed", "dp.bits": 20,
                                  "dp.target-epsilon": base.dp.target_epsilon or 8.0})
    modes = {"central": base, "local": local, "distributed": distributed}
    chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(modes))
    if unknown:
        p.error(f"unknown mode(s) {unknown}; known: {', '.join(modes)}")
    jobs = [(modes[m].to_flat(), sets, args.canaries, mutant) for m in chosen for mutant in BUILDS]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(one, jobs))
    print(f"\n{len(rows)} audits in {time.perf_counter() - t0:.0f} s ({args.jobs} at once on this machine); "
          f"{base.fed.rounds} rounds, {args.canaries} canaries inserted and as many held out")
    print(table(["DP", "build", "accounted ε", "empirical ε", "95% interval", "lower bound", "flagged", "observed"],
                [[r["mode"], r["mutant"] or "as built", r["accounted_epsilon"], r["empirical_epsilon"],
                  f"{r['empirical_low']:.2f}-{r['empirical_high']:.2f}", r["empirical_lower_bound"],
                  "FLAGGED" if r["flagged"] else "no", r["observation"]] for r in rows]))
    by = {(r["mode"], r["mutant"]): r for r in rows}
    # What each build must show: flagged (1) or not (0). Local DP claims no amplification, so public
    # cohorts break nothing there.
    want = {(m, None): 0 for m in modes} | {(m, "noise/10"): 1 for m in modes} | {
        ("central", "public-cohorts"): 1, ("local", "public-cohorts"): 0, ("distributed", "public-cohorts"): 1}
    names = {None: "as built", "noise/10": "noise ÷ 10", "public-cohorts": "public cohorts"}
    goals = [target(f"{m}, {names[b]}: flagged ({'1 = yes' if want[m, b] else '0 = no'})", float(by[m, b]["flagged"]),
                    ">=" if want[m, b] else "<=", want[m, b]) for m in chosen for b in BUILDS]
    print(targets_table(goals))
    if args.json:
        figures = {f"{r['mode']} {r['mutant'] or 'as built'} {k}": r[k] for r in rows
                   for k in ("accounted_epsilon", "empirical_epsilon", "empirical_lower_bound", "seconds")}
        write_json(args.json, figures, goals)
        print(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
