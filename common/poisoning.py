"""The poisoning lab: malicious clients that push one target item into honest users' top-10,
against fedrec's round exactly as it runs (the in-process runner, the same
:class:`~common.rounds.RoundEngine` as the Flower strategy, DP as configured), and the
defences the server has.

The attack (FedRecAttack, Rong et al. 2022; PSMU, Yin et al. 2023, in spirit): each malicious
client receives the global model like any device. Not knowing any user's vector (they never
leave the devices), it fits *synthetic* users -- a few popular items each, popularity read off
the released item biases -- with the same reconstruction the devices use, and pushes the target
item's embedding towards their mean vector and its bias up. It ignores honest clipping and
sends the most the server will take:

* **plaintext path** (the server sees each update and checks its per-group L2 norm): an update of
  exactly the bound, all of it on the target's row.
* **SecAgg+** (the server sees only the sum): the attackers of a round share the whole cohort's
  slack: every coordinate of the target's row at the largest value the server's checks on the
  sum let through (n·r for the range check, ρ under ``fed.sum-clamp``).

Measured: ER@10 (exposure: the share of honest users who have not rated the target and get it in
their top-10, ranked as the devices rank: all items they have not rated) and NDCG@10 (full
ranking, test split), against one long-tail item and one new item (no training interactions).

Works on models whose trainable arrays are item embeddings and item biases (MF).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from common.config import RunConfig
from common.device import reconstruct_users
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.metrics import top_k, user_ranking_metrics
from common.models import ItemParams, UserData
from common.models.reconstruction import fit_user
from common.rounds import RoundEngine

#: Attacker shares of the population the issue asks for.
FRACTIONS = (0.001, 0.01, 0.03)


def attackers_for(fraction: float, honest: int) -> int:
    """How many malicious clients ``fraction`` of a population of ``honest`` users adds (≥ 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"attacker fraction must be in (0, 1), got {fraction}")
    return max(1, int(round(fraction * honest)))


# ---- the targets
@dataclass(frozen=True)
class Targets:
    long_tail: int  # an item with very few training interactions
    new: int  # an item nobody has trained on (its training interactions removed)

    def items(self) -> dict[str, int]:
        return {"long-tail": self.long_tail, "new": self.new}


def with_targets(sets: EvalSets, *, seed: int = 0) -> tuple[EvalSets, Targets]:
    """The data with a new item (an item of median-ish popularity whose training interactions are
    removed: it is in the catalogue, nobody has trained on it) and the chosen long-tail item (2 or
    3 training interactions)."""
    rng = np.random.default_rng(seed)
    pop = np.asarray(sets.popularity)
    tail = np.flatnonzero((pop >= 2) & (pop <= 3))
    mid = np.flatnonzero((pop >= 10) & (pop <= 30))
    if not len(tail) or not len(mid):
        raise ValueError("the data has no long-tail item (2-3 ratings) or no item with 10-30 ratings to make new")
    targets = Targets(long_tail=int(rng.choice(tail)), new=int(rng.choice(mid)))
    train, ratings = [], []
    for items, r in zip(sets.train, sets.train_ratings):
        keep = items != targets.new
        train.append(items[keep])
        ratings.append(r[keep])
    popularity = pop.copy()
    popularity[targets.new] = 0
    return replace(sets, train=train, train_ratings=ratings, popularity=popularity), targets


# ---- the attacker
@dataclass
class TargetPush:
    """``count`` malicious clients pushing ``target`` (see the module docstring)."""

    target: int
    count: int
    secure_aggregation: bool
    synthetic_users: int = 32
    items_per_user: int = 20
    seed: int = 0
    rounds_sampled: int = field(default=0, init=False)

    def direction(self, engine: RoundEngine) -> np.ndarray:
        """Unit vector: the mean of synthetic users fitted to the released model."""
        emb, bias = _mf_arrays(engine)
        params = ItemParams(emb, bias)
        rng = np.random.default_rng(self.seed)
        popular = np.argsort(-bias, kind="stable")[:200]
        users = []
        for _ in range(self.synthetic_users):
            items = np.sort(rng.choice(popular, size=min(self.items_per_user, len(popular)), replace=False))
            users.append(fit_user(params, UserData(items.astype(np.int64), np.ones(len(items), np.float32)),
                                  loss=engine.cfg.model.loss, reg=engine.cfg.model.user_reg))
        mean = np.mean(users, axis=0).astype(np.float64)
        norm = float(np.linalg.norm(mean))
        return mean / norm if norm > 0 else np.ones_like(mean) / np.sqrt(len(mean))

    def updates(self, engine: RoundEngine, sampled: list[int], cohort: int, server_round: int) -> list[list[np.ndarray]]:
        self.rounds_sampled += 1
        attackers = len(sampled)
        emb, bias = _mf_arrays(engine)
        u = self.direction(engine)
        d_emb, d_bias = np.zeros(emb.shape, np.float32), np.zeros(bias.shape, np.float32)
        if self.secure_aggregation:
            # The coalition's total per coordinate: as much as the checks on the sum let through.
            cap = 0.9 * cohort * engine.value_bound(secure_aggregation=True)
            if engine.cfg.fed.sum_clamp > 0:
                cap = min(cap, engine.cfg.fed.sum_clamp)
            share = cap / attackers
            d_emb[self.target] = share * np.sign(u)
            d_bias[self.target] = share
        else:
            # Each update at the per-group L2 bound the server checks, all of it on the target.
            l2 = engine.l2_bound(secure_aggregation=False)
            s = engine.cfg.dp.bias_share
            e_share, b_share = (np.sqrt(1 - s), np.sqrt(s)) if 0 < s < 1 else (np.sqrt(0.95), np.sqrt(0.05))
            d_emb[self.target] = (l2 * e_share * (1 - 1e-6)) * u
            d_bias[self.target] = l2 * b_share * (1 - 1e-6)
            bound = engine.value_bound(secure_aggregation=False)
            np.clip(d_emb, -bound, bound, out=d_emb)
            np.clip(d_bias, -bound, bound, out=d_bias)
        return [[d_emb.copy(), d_bias.copy()] for _ in range(attackers)]


def _mf_arrays(engine: RoundEngine) -> tuple[np.ndarray, np.ndarray]:
    arrays = engine.model.arrays(engine.params)
    if len(arrays) != 2 or np.ndim(arrays[0]) != 2 or np.ndim(arrays[1]) != 1:
        raise ValueError("the poisoning lab crafts updates for models whose trainable arrays are item embeddings "
                         "and item biases (model.kind = mf)")
    return np.asarray(arrays[0], np.float64), np.asarray(arrays[1], np.float64)


# ---- what the attack achieved
def exposure_and_ndcg(params: ItemParams, sets: EvalSets, cfg: RunConfig, targets: Sequence[int]) -> dict[str, float]:
    """NDCG@10 on the test split (full ranking) and, per target, ER@10: the share of users who
    have not rated it with it in their top-10 of everything they have not rated."""
    users = [u for u in range(len(sets.train)) if len(sets.train[u]) > 0]
    vectors = reconstruct_users(params, [UserData(sets.train[u], sets.train_ratings[u]) for u in users], cfg.model,
                                seed=cfg.seed)
    scores = vectors @ params.embeddings.T + params.bias
    rated = [np.union1d(sets.train[u], sets.valid[u]) for u in users]
    ranked = top_k(scores, rated, 10)
    has_test = [i for i, u in enumerate(users) if len(sets.test[u])]
    ndcg = user_ranking_metrics(ranked[has_test], [sets.test[users[i]] for i in has_test], 10)["ndcg"]
    out = {"ndcg@10": float(np.nanmean(ndcg))}
    for t in targets:
        eligible = np.array([t not in r for r in rated])
        hits = np.any(ranked == t, axis=1)
        out[f"er@10/{t}"] = float(hits[eligible].mean()) if eligible.any() else float("nan")
    return out


# ---- the lab's cells
@dataclass(frozen=True)
class Cell:
    """One run of the lab: a defence (config changes, which path), with or without attackers."""

    defence: str
    overrides: dict[str, Any]
    secure_aggregation: bool
    target: str | None = None  # "long-tail" / "new"; None: no attack
    fraction: float = 0.0

    @property
    def name(self) -> str:
        attack = "no attack" if self.target is None else f"{self.fraction:.1%} attackers on the {self.target} item"
        return f"{self.defence} | {attack}"


def defences(cfg: RunConfig, *, ranges: Sequence[float] = (0.01, 0.001),
              clamps: Sequence[float] = (1.0, 0.5)) -> dict[str, tuple[dict[str, Any], bool]]:
    """name → (config changes, secure aggregation) of every defence the lab compares. The first
    is the run as configured; the SecAgg+-compatible ones keep SecAgg+ (if configured) and DP;
    the plaintext ones need each update (robust aggregates also need DP off)."""
    secure = cfg.secagg.enabled
    path = "SecAgg+" if secure else "plaintext"
    out: dict[str, tuple[dict[str, Any], bool]] = {f"as configured ({path})": ({}, secure)}
    for rho in ranges:
        out[f"value range ±{rho:g}·C"] = ({"secagg.value-range": rho}, secure)
    for rho in clamps:
        out[f"sum clamp ±{rho:g}"] = ({"fed.sum-clamp": rho}, secure)
    out[f"clip C/4 = {cfg.dp.clip / 4:g}"] = ({"dp.clip": cfg.dp.clip / 4}, secure)
    out[f"noise σ×2 = {2 * cfg.dp.noise_multiplier:g}"] = ({"dp.noise-multiplier": 2 * cfg.dp.noise_multiplier}, secure)
    out["plaintext: L2 bound per update"] = ({"secagg.enabled": False}, False)
    off = {"secagg.enabled": False, "dp.enabled": False}
    out["plaintext, no DP: sum"] = (off, False)
    out["plaintext, no DP: median"] = ({**off, "fed.aggregate": "median"}, False)
    out["plaintext, no DP: trimmed mean 10%"] = ({**off, "fed.aggregate": "trimmed-mean", "fed.trim-fraction": 0.1}, False)
    return out


def run_cell(cfg: RunConfig, sets: EvalSets, targets: Targets, cell: Cell, *, progress: bool = False) -> dict[str, Any]:
    """Train with the cell's defence (and attackers), then measure NDCG@10 and ER@10 of both targets."""
    run_cfg = cfg.replace(**cell.overrides)
    adversary = None
    if cell.target is not None:
        adversary = TargetPush(target=targets.items()[cell.target], count=attackers_for(cell.fraction, len(sets.train)),
                               secure_aggregation=cell.secure_aggregation, seed=cfg.seed)
    result = run_inprocess(run_cfg, sets, final_eval=False, progress=progress, adversary=adversary,
                           secure_aggregation=cell.secure_aggregation)
    figures = exposure_and_ndcg(result.effective, sets, run_cfg, list(targets.items().values()))
    named = {"ndcg@10": figures["ndcg@10"]}
    for name, item in targets.items().items():
        named[f"er@10 {name}"] = figures[f"er@10/{item}"]
    refused = sum(1 for r in result.rounds if "refused" in r)
    return {"cell": cell.name, "defence": cell.defence, "target": cell.target, "fraction": cell.fraction,
            "attackers": adversary.count if adversary else 0, "rounds": len(result.rounds),
            "rounds_attacked": adversary.rounds_sampled if adversary else 0, "rounds_refused": refused,
            "epsilon": result.ledger.epsilon() if result.ledger is not None else None, **named}


def plan_cells(cfg: RunConfig, *, fractions: Sequence[float] = FRACTIONS, main_fraction: float = 0.01,
               compare: Sequence[str] | None = None) -> list[Cell]:
    """Every defence without attack (its NDCG@10 baseline) and at ``main_fraction`` against both
    targets; the other fractions against the run as configured and the ``compare`` defences
    (default: the sum clamps)."""
    table = defences(cfg)
    keep = list(compare) if compare is not None else [name for name in table if name.startswith("sum clamp")]
    cells = [Cell(name, ov, sec) for name, (ov, sec) in table.items()]
    for fraction in sorted(set(fractions) | {main_fraction}):
        names = list(table) if fraction == main_fraction else [next(iter(table)), *keep]
        for name in names:
            ov, sec = table[name]
            cells += [Cell(name, ov, sec, target, fraction) for target in ("long-tail", "new")]
    return cells


def _run_one(args: tuple[dict[str, Any], EvalSets, Targets, Cell]) -> dict[str, Any]:
    flat, sets, targets, cell = args
    import torch

    torch.set_num_threads(1)
    return run_cell(RunConfig.from_flat(flat), sets, targets, cell)


def run_lab(cfg: RunConfig, sets: EvalSets, targets: Targets, cells: Sequence[Cell], *, jobs: int = 1,
            progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell (``jobs`` at a time, each in its own process), in the order given."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    work = [(cfg.to_flat(), sets, targets, cell) for cell in cells]
    if jobs <= 1:
        return [_run_one(w) for w in tqdm(work, desc="poisoning lab", disable=not progress)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(tqdm(pool.map(_run_one, work), total=len(work), desc="poisoning lab", disable=not progress))


def summarise(rows: Sequence[dict[str, Any]], *, main_fraction: float = 0.01) -> dict[str, Any]:
    """Per defence: NDCG@10 relative to no attack and no defence (the run as configured), and at
    each attacker share ER@10 of both targets relative to no attack; the best defence that keeps
    SecAgg+ and DP (lowest worst-case ER@10 at ``main_fraction`` among those keeping NDCG@10)."""
    base = next(r for r in rows if r["target"] is None)  # the first defence is the run as configured
    baselines = {r["defence"]: r for r in rows if r["target"] is None}
    out: dict[str, Any] = {"baseline_ndcg@10": base["ndcg@10"],
                           "baseline_er@10 long-tail": base["er@10 long-tail"],
                           "baseline_er@10 new": base["er@10 new"], "defences": {}}
    for r in rows:
        if r["target"] is None:
            continue
        entry = out["defences"].setdefault(r["defence"], {"no_attack_ndcg@10": baselines[r["defence"]]["ndcg@10"]})
        entry[f"{r['fraction']:g}/{r['target']}"] = {
            "er@10": r[f"er@10 {r['target']}"], "ndcg@10": r["ndcg@10"],
            "ndcg_ratio": r["ndcg@10"] / base["ndcg@10"] if base["ndcg@10"] else float("nan"),
            "rounds_attacked": r["rounds_attacked"], "rounds_refused": r["rounds_refused"]}
    return out


def format_lab(rows: Sequence[dict[str, Any]]) -> str:
    """The lab as a table: one row per cell, NDCG@10 also as a share of the run as configured
    without attack."""
    base = next((r["ndcg@10"] for r in rows if r["target"] is None), float("nan"))
    head = ["defence", "attack", "ER@10 long-tail", "ER@10 new", "NDCG@10", "× no attack", "attacked", "refused", "ε"]
    body = []
    for r in rows:
        attack = "none" if r["target"] is None else f"{r['fraction']:.1%} ({r['attackers']}) → {r['target']}"
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        body.append([r["defence"], attack, f"{r['er@10 long-tail']:.4f}", f"{r['er@10 new']:.4f}", f"{r['ndcg@10']:.4f}",
                     f"{r['ndcg@10'] / base:.3f}" if base else "-", str(r["rounds_attacked"]), str(r["rounds_refused"]), eps])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)
