"""Poisoning on ML-100K (RecBole 80/10/10, full ranking): malicious clients at 0.1%, 1% and 3% of
the population push one long-tail and one new item (common/poisoning.py), against the default
run (central DP ε ≈ 8, SecAgg+, 150 rounds) and each defence: no attack / attack / attack + each
defence that works under SecAgg+ (value range, sum clamp, smaller clip, more noise) and, on the
plaintext path, the per-update L2 bound and robust aggregates (median, trimmed mean; no DP).

Targets: with the best SecAgg+-compatible defence at 1% attackers, ER@10 ≤ 2× its no-attack value
(for both targets) and NDCG@10 ≥ 0.98× the undefended run without attack. Cohorts and noise are
seeded so that every cell sees the same draws (a lab, not a private run).

    python benchmarks/poisoning.py [--json out.json] [--quick] [--rounds R] [--jobs J]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# `python benchmarks/X.py` puts benchmarks/ on sys.path, not the checkout, and opacus installs a
# top-level package `benchmarks` of its own: the checkout goes first, so `benchmarks.*` is ours.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import target, targets_table, write_json  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import split_interactions  # noqa: E402
from common.evaluation import EvalSets  # noqa: E402
from common.poisoning import FRACTIONS, defences, format_lab, plan_cells, run_lab, with_targets  # noqa: E402

MAIN = 0.01


def best_secure_defence(rows: list[dict[str, Any]], secure_names: list[str]) -> tuple[str, dict[str, float]]:
    """The SecAgg+-compatible defence with the lowest worst ER@10 ratio at 1% among those whose
    NDCG@10 (attacked, both targets) stays ≥ 0.98× the undefended no-attack run; when none does,
    the one with the best NDCG@10. Returns (name, its figures)."""
    base = next(r for r in rows if r["target"] is None)
    clean = {r["defence"]: r for r in rows if r["target"] is None}
    scored = []
    for name in secure_names:
        cells = [r for r in rows if r["defence"] == name and r["fraction"] == MAIN and r["target"]]
        figures: dict[str, float] = {}
        for r in cells:
            er, er0 = r[f"er@10 {r['target']}"], clean[name][f"er@10 {r['target']}"]
            figures[f"er@10 {r['target']}"] = er
            figures[f"er@10 {r['target']} no attack"] = er0
            figures[f"er ratio {r['target']}"] = er / er0 if er0 > 0 else (0.0 if er == 0 else float("inf"))
        figures["ndcg ratio"] = min(r["ndcg@10"] for r in cells) / base["ndcg@10"]
        worst_er = max(figures["er ratio long-tail"], figures["er ratio new"])
        scored.append((figures["ndcg ratio"] >= 0.98, -worst_er if figures["ndcg ratio"] >= 0.98 else figures["ndcg ratio"],
                       name, figures))
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    return scored[0][2], scored[0][3]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="30 rounds, 1%% attackers only: checks the script runs")
    p.add_argument("--rounds", type=int, help="rounds per cell (default: the run's 150)")
    p.add_argument("--jobs", type=int, default=2, help="cells at once, one process and one thread each (default 2)")
    args = p.parse_args(argv)
    sets, targets = with_targets(EvalSets.from_split(split_interactions(load_interactions(), "random", seed=0)))
    cfg = RunConfig().replace(**{"fed.sampling-seed": 0, "dp.noise-seed": 0})
    fractions = (MAIN,) if args.quick else FRACTIONS
    if args.quick or args.rounds:
        cfg = cfg.replace(**{"fed.rounds": args.rounds or 30})
    t0 = time.perf_counter()
    rows = run_lab(cfg, sets, targets, plan_cells(cfg, fractions=fractions, main_fraction=MAIN), jobs=args.jobs)
    seconds = time.perf_counter() - t0
    print(f"\ntargets: long-tail item {targets.long_tail} ({int(sets.popularity[targets.long_tail])} training "
          f"ratings), new item {targets.new}; {cfg.fed.rounds} rounds per cell; {len(rows)} cells in {seconds:.0f} s "
          f"({args.jobs} at once on this machine)")
    print(format_lab(rows))
    names = list(defences(cfg))
    secure = [n for n in names[1:] if defences(cfg)[n][1] and "plaintext" not in n]
    best, fig = best_secure_defence(rows, secure)
    print(f"\nbest SecAgg+-compatible defence at {MAIN:.0%} attackers: {best}")
    goals = [target(f"ER@10 long-tail, {best}, ÷ no attack", fig["er ratio long-tail"], "<=", 2.0),
             target(f"ER@10 new item, {best}, ÷ no attack", fig["er ratio new"], "<=", 2.0),
             target(f"NDCG@10 under attack, {best}, ÷ no attack, no defence", fig["ndcg ratio"], ">=", 0.98)]
    print(targets_table(goals))
    if args.json:
        figures: dict[str, Any] = {"rounds": cfg.fed.rounds, "best_defence": best, "seconds": seconds,
                                   **{f"best {k}": v for k, v in fig.items()}}
        for r in rows:
            tag = "no attack" if r["target"] is None else f"{r['fraction']:g} {r['target']}"
            for key in ("ndcg@10", "er@10 long-tail", "er@10 new"):
                figures[f"{r['defence']} | {tag} | {key}"] = r[key]
        write_json(args.json, figures, goals)
        print(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
