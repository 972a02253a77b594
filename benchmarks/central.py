"""Central baselines on ML-100K, side by side: MostPop, our MF, ``implicit`` ALS and BPR.

Every model is scored by the same code (``common.evaluation.evaluate_ranking``, full ranking,
RecBole protocol): hyper-parameters are chosen on validation NDCG@10 (training items masked),
the chosen model is reported on test (training and validation items masked). All models train
on the training part only.

    python benchmarks/central.py                      # both splits, full grids
    python benchmarks/central.py --quick              # smoke run (minutes → seconds)
    python benchmarks/central.py --json runs/central.json --splits random

``--json`` writes ``{"figures": {name: value}, "targets": [{name, value, op, target, met}]}``.
"""

from __future__ import annotations

import os

# Before numpy is imported: implicit warns (and slows down) when OpenBLAS runs its own pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from common.central import train_central  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import Split, split_interactions  # noqa: E402
from common.evaluation import EvalSets, evaluate_ranking  # noqa: E402

log = logging.getLogger("benchmarks.central")

SPLIT_TAGS = {"random": "random", "leave-last-out": "leave_last_out"}

# Small grids, tuned on validation NDCG@10. ALS's is the one the task names; BPR's covers the
# learning rates where implicit's BPR does well on ML-100K (it degrades above ~0.01).
ALS_GRID = {"factors": [32, 64], "regularization": [0.1, 1.0], "alpha": [1.0, 5.0], "iterations": [20]}
BPR_GRID = {"factors": [32, 64], "learning_rate": [0.005, 0.01], "regularization": [0.01, 0.1],
            "iterations": [100]}
QUICK_ALS_GRID = {"factors": [32], "regularization": [0.1], "alpha": [1.0], "iterations": [2]}
QUICK_BPR_GRID = {"factors": [32], "learning_rate": [0.005], "regularization": [0.01], "iterations": [5]}

# (figure, op, target): a number, or the name of another figure
TARGET_NDCG10_RANDOM = 0.29
TARGET_SECONDS_TO_BEST = 30.0


@dataclass
class Result:
    model: str
    split: str
    valid: dict[str, float]
    test: dict[str, float]
    seconds: float  # training time of the reported model
    seconds_note: str = ""  # shown in the table beside the seconds
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)  # more figures for --json


# ---------------------------------------------------------------- models

def factor_scores(user_factors: Any, item_factors: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Score function of a factor model (implicit's GPU matrices come back through ``to_numpy``)."""
    U = user_factors.to_numpy() if hasattr(user_factors, "to_numpy") else np.asarray(user_factors)
    V = item_factors.to_numpy() if hasattr(item_factors, "to_numpy") else np.asarray(item_factors)
    return lambda users: U[users] @ V.T


def run_mostpop(split: Split, sets: EvalSets) -> Result:
    start = time.perf_counter()
    pop = sets.popularity.astype(np.float64)
    seconds = time.perf_counter() - start
    score = lambda users: np.broadcast_to(pop, (len(users), len(pop)))  # noqa: E731
    return Result("MostPop", split.kind, evaluate_ranking(score, sets, "valid"),
                  evaluate_ranking(score, sets, "test"), seconds)


def run_mf(split: Split, cfg: RunConfig, quick: bool) -> Result:
    central = cfg.central
    if quick:
        central = cfg.replace(**{"central.epochs": 4}).central
    result = train_central(split, cfg.model, central, seed=cfg.seed, progress=False)
    return Result(
        "MF (ours)", split.kind, result.valid, result.test, result.seconds_to_best,
        seconds_note=f"best; {result.seconds:.1f} total",
        params={"dim": cfg.model.dim, "loss": cfg.model.loss, "best_epoch": result.best_epoch},
        extra={"seconds_to_best": result.seconds_to_best, "seconds": result.seconds,
               "best_epoch": result.best_epoch},
    )


def run_implicit(name: str, make: Callable[..., Any], grid: dict[str, list[Any]], split: Split,
                 sets: EvalSets, *, threads: int, seed: int) -> Result:
    """Fit every grid point on train, keep the best validation NDCG@10, report it on test."""
    user_items = sp.csr_matrix(
        (np.ones(len(split.train), dtype=np.float32), (split.train.user, split.train.item)),
        shape=(split.n_users, split.n_items))
    best: tuple[float, dict[str, Any], Any, float, dict[str, float]] | None = None
    grid_start = time.perf_counter()
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        model = make(**params, num_threads=threads, random_state=seed)
        start = time.perf_counter()
        with threadpool_limits(1, "blas"):
            model.fit(user_items, show_progress=False)
        seconds = time.perf_counter() - start
        valid = evaluate_ranking(factor_scores(model.user_factors, model.item_factors), sets, "valid")
        log.info("%s %s %s: valid NDCG@10 %.4f (%.1f s)", name, split.kind, params, valid["ndcg@10"], seconds)
        if best is None or valid["ndcg@10"] > best[0]:
            best = (valid["ndcg@10"], params, model, seconds, valid)
    grid_seconds = time.perf_counter() - grid_start
    assert best is not None
    _, params, model, seconds, valid = best
    test = evaluate_ranking(factor_scores(model.user_factors, model.item_factors), sets, "test")
    return Result(name, split.kind, valid, test, seconds, seconds_note=f"fit; grid {grid_seconds:.1f}",
                  params=params, extra={"seconds": seconds, "grid_seconds": grid_seconds})


def run_split(data, kind: str, cfg: RunConfig, *, quick: bool, threads: int) -> list[Result]:
    from implicit.als import AlternatingLeastSquares
    from implicit.bpr import BayesianPersonalizedRanking

    split = split_interactions(data, kind, seed=cfg.data.seed)
    sets = EvalSets.from_split(split)
    log.info("%s split: %d train, %d valid, %d test", kind, len(split.train), len(split.valid), len(split.test))
    results = [run_mostpop(split, sets)]
    log.info("training our MF on %s", kind)
    results.append(run_mf(split, cfg, quick))
    results.append(run_implicit("implicit ALS", AlternatingLeastSquares, QUICK_ALS_GRID if quick else ALS_GRID,
                                split, sets, threads=threads, seed=cfg.seed))
    results.append(run_implicit("implicit BPR", BayesianPersonalizedRanking,
                                QUICK_BPR_GRID if quick else BPR_GRID, split, sets, threads=threads, seed=cfg.seed))
    return results


# ---------------------------------------------------------------- report

def table(results: list[Result]) -> str:
    head = ["model", "split", "valid NDCG@10", "NDCG@10", "Recall@10", "HR@10", "coverage@10", "train s",
            "chosen"]
    rows = [head]
    for r in results:
        seconds = f"{r.seconds:.1f}" + (f" ({r.seconds_note})" if r.seconds_note else "")
        chosen = " ".join(f"{k}={v}" for k, v in r.params.items())
        rows.append([r.model, r.split, f"{r.valid['ndcg@10']:.4f}", f"{r.test['ndcg@10']:.4f}",
                     f"{r.test['recall@10']:.4f}", f"{r.test['hr@10']:.4f}", f"{r.test['coverage@10']:.4f}",
                     seconds, chosen])
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _key(model: str) -> str:
    return {"MostPop": "mostpop", "MF (ours)": "mf", "implicit ALS": "als", "implicit BPR": "bpr"}[model]


def figures(results: list[Result]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        tag = SPLIT_TAGS[r.split]
        for metric in ("ndcg@10", "recall@10", "hr@10", "mrr@10", "coverage@10", "novelty@10", "ndcg@20"):
            out[f"{_key(r.model)}_{metric.replace('@', '')}_{tag}"] = r.test[metric]
        out[f"{_key(r.model)}_valid_ndcg10_{tag}"] = r.valid["ndcg@10"]
        for name, value in r.extra.items():
            out[f"{_key(r.model)}_{name}_{tag}"] = float(value)
    for tag in SPLIT_TAGS.values():
        implicit = [out[k] for k in (f"als_ndcg10_{tag}", f"bpr_ndcg10_{tag}") if k in out]
        if implicit:
            out[f"best_implicit_ndcg10_{tag}"] = max(implicit)
    return out


def targets(fig: dict[str, float]) -> list[dict[str, Any]]:
    """The MF's targets; a figure that was not computed (its split not run) is not met."""
    def check(name: str, value: float | None, op: str, target: float | None) -> dict[str, Any]:
        met = value is not None and target is not None and (value >= target if op == ">=" else value <= target)
        return {"name": name, "value": value, "op": op, "target": target, "met": bool(met)}

    mf = fig.get("mf_ndcg10_random")
    return [
        check("mf_ndcg10_random", mf, ">=", TARGET_NDCG10_RANDOM),
        check("mf_ndcg10_random_vs_best_implicit", mf, ">=", fig.get("best_implicit_ndcg10_random")),
        check("mf_seconds_to_best", fig.get("mf_seconds_to_best_random"), "<=", TARGET_SECONDS_TO_BEST),
    ]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="random,leave-last-out",
                        help="comma-separated: random, leave-last-out (default: both)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write figures and targets here")
    parser.add_argument("--quick", action="store_true", help="smoke run: few epochs, one grid point")
    parser.add_argument("--threads", type=int, default=1, help="torch and implicit threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    kinds = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [k for k in kinds if k not in SPLIT_TAGS]
    if unknown or not kinds:
        parser.error(f"--splits takes {', '.join(SPLIT_TAGS)}; got {args.splits!r}")
    torch.set_num_threads(args.threads)
    cfg = RunConfig()
    data = load_interactions(cfg.data.source)
    log.info("%s", data.summary())

    results: list[Result] = []
    for kind in kinds:
        results += run_split(data, kind, cfg, quick=args.quick, threads=args.threads)

    fig = figures(results)
    goals = targets(fig)
    print(table(results))
    print()
    for t in goals:
        shown = "n/a" if t["value"] is None else f"{t['value']:.4f}"
        goal = "n/a" if t["target"] is None else f"{t['target']:.4f}"
        print(f"target {t['name']}: {shown} {t['op']} {goal}: {'met' if t['met'] else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"figures": {k: _finite(v) for k, v in fig.items()},
                   "targets": [{k: _finite(v) for k, v in t.items()} for t in goals]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
