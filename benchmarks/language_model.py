"""What does the language model add to the recommender? Measured under privacy.

ML-100K, cold-item split (20% of the items held out with all their interactions; the warm
interactions split per user 80/10/10), full ranking against ALL items, the user's training and
validation items masked (RecBole's convention). Side by side in one run:

* cold items: NDCG@10 / Recall@20 on the users' cold interactions for the hybrid model and
  text-only scoring vs random and genre-popularity (MostPop by genre);
* warm items: hybrid vs MF-only at the same privacy setting, no DP and user-level ε = 8
  (σ planned with the RDP accountant for the run's rounds and q, δ = 1e-4);
* frozen MiniLM + head vs LoRA-adapted MiniLM: the hybrid is trained frozen for R rounds, then
  continued for L rounds either frozen or with LoRA (adapters added with B = 0, so the encoder
  starts equal to the base); both arms have the same rounds and the same ε;
* the seed blend r = α·z(r_cf) + (1−α)·z(r_cb) for α ∈ {0, .25, .5, .75, 1} (MF scores and
  MiniLM-profile cosines), on warm and cold items;
* seconds per round with and without the LM, and the peak RSS of a process doing one client's
  round (MF, hybrid frozen, hybrid + LoRA; measured in a fresh subprocess each).

Training runs on the **in-process runner** (common/inprocess.py: the functions the Flower
ClientApp and strategy call; tests/test_inprocess.py checks MF and hybrid bit for bit against
the Flower simulation without SecAgg+), with seeded DP noise so the tables are reproducible.
The hybrid model scores a held-out (new) item with its text vector and the mean warm bias: new
items are public catalogue knowledge, who interacted with what is not.

    python benchmarks/language_model.py [--json out.json] [--quick] [--rounds R] [--lora-rounds L]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# `python benchmarks/X.py` puts benchmarks/ on sys.path, not the checkout, and opacus installs a
# top-level package `benchmarks` of its own: the checkout goes first, so `benchmarks.*` is ours.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.harness import table, target, targets_table, write_json  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import split_interactions  # noqa: E402
from common.device import reconstruct_users
from common.evaluation import EvalSets, items_by_user  # noqa: E402
from common.inprocess import InProcessResult, run_inprocess  # noqa: E402
from common.metrics import evaluate_scores  # noqa: E402
from common.models import ItemParams, UserData
from common.models.hybrid.blend import (
    blend_scores,
    genre_popularity_scores,
    hybrid_item_params,
    new_item_bias,
    text_only_scores,
)
from common.models.hybrid.text import base_embeddings
from common.privacy import Accountant, plan_noise_multiplier  # noqa: E402

DELTA = 1e-4
EPSILON = 8.0
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RSS_LIMIT_MB = 1.5 * 1024
RANDOM_SEEDS = (0, 1, 2)
CONTINUATION = {"model.text-positives": 16, "model.text-negatives": 16}  # texts per client, last L rounds


# ---------------------------------------------------------------- data and protocol

class Bench:
    """The split, the item texts and the two evaluation target sets (warm test, cold)."""

    def __init__(self, users: int | None) -> None:
        inter = load_interactions()
        self.split = split_interactions(inter, "cold-item", seed=0, cold_fraction=0.2)
        self.sets = EvalSets.from_split(self.split)
        self.texts = [info.text for info in inter.items]
        self.genres = [info.genres for info in inter.items]
        self.exclude, self.warm_targets = self.sets.exclude_and_targets("test")  # train ∪ valid masked
        self.cold_targets = items_by_user(self.split.cold_test)
        n = len(self.sets.train)
        self.users = np.arange(n) if not users or users >= n else np.random.default_rng(0).choice(n, users, replace=False)
        self.users.sort()
        self.train_users = [UserData(self.sets.train[u], self.sets.train_ratings[u]) for u in self.users]

    def evaluate(self, scores: np.ndarray) -> dict[str, dict[str, float]]:
        """Full-ranking metrics of a score matrix (len(users), I) on warm test and cold items
        (ranked against all items) and, as a diagnostic, cold items ranked among cold items only."""
        out = {}
        warm_items = np.setdiff1d(np.arange(self.sets.n_items), self.split.cold_items)
        for name, targets in (("warm", self.warm_targets), ("cold", self.cold_targets),
                              ("cold_only", self.cold_targets)):
            exclude = [self.exclude[u] for u in self.users]
            if name == "cold_only":
                exclude = [np.union1d(e, warm_items) for e in exclude]
            tg = [targets[u] for u in self.users]
            rows = np.arange(len(self.users))
            batches = ((rows[s:s + 256], scores[s:s + 256]) for s in range(0, len(rows), 256))
            out[name] = evaluate_scores(batches, exclude, tg, n_items=self.sets.n_items,
                                        item_popularity=self.sets.popularity, ks=(10, 20))
        return out


def model_scores(params: ItemParams, bench: Bench, cfg: RunConfig) -> np.ndarray:
    """Scores of the released model: user vectors reconstructed as the devices would."""
    vectors = reconstruct_users(params, bench.train_users, cfg.model, seed=cfg.seed)
    return vectors @ params.embeddings.T + params.bias


def deployed_hybrid(result: InProcessResult, bench: Bench, base_emb: np.ndarray, bias: str = "text") -> ItemParams:
    """The hybrid as deployed: new (cold) items get free part 0, so their vector is their text
    vector, and a bias: ``"text"`` predicted from their MiniLM embedding by a ridge regression
    on the released warm biases (server-side post-processing, no privacy cost), or ``"mean"``,
    the mean warm bias."""
    params = hybrid_item_params(result.params.free, result.text_vectors, cold_items=bench.split.cold_items)
    if bias == "text":
        predicted, _ = new_item_bias(result.params.free.bias, base_emb, bench.split.cold_items)
        params.bias[np.sort(bench.split.cold_items)] = predicted
    return params


def genre_predicted_counts(bench: Bench) -> np.ndarray:
    """Training counts with each cold item's count predicted from its genres (ridge of
    log(1 + count) on the genre multi-hot, fitted on warm items): the genre baseline's analogue
    of the hybrid's text-predicted bias."""
    names = sorted({g for gs in bench.genres for g in gs})
    G = np.array([[g in gs for g in names] for gs in bench.genres], dtype=np.float64)
    pop = bench.sets.popularity.astype(np.float64)
    log_pop = np.log1p(pop)
    predicted, _ = new_item_bias(log_pop, G, bench.split.cold_items)
    out = pop.copy()
    out[np.sort(bench.split.cold_items)] = np.expm1(np.maximum(predicted, 0.0))
    return out


# ---------------------------------------------------------------- training

def configs(rounds: int, sample_rate: float, quick: bool) -> tuple[RunConfig, float]:
    base = RunConfig().replace(**{"data.split": "cold-item", "fed.rounds": rounds, "fed.sample-rate": sample_rate,
                                  "dp.delta": DELTA, "dp.noise-seed": 0, "dp.target-epsilon": 0.0})
    sigma = plan_noise_multiplier(target_epsilon=EPSILON, delta=DELTA, rounds=rounds, sample_rate=sample_rate)
    return base, sigma


def with_dp(cfg: RunConfig, sigma: float | None) -> RunConfig:
    if sigma is None:
        return cfg.replace(**{"dp.enabled": False})
    return cfg.replace(**{"dp.enabled": True, "dp.noise-multiplier": sigma})


def per_round(result: InProcessResult, n: int) -> float:
    return result.seconds / max(n, 1)


def train_all(bench: Bench, base: RunConfig, sigma: float, rounds: int, lora_rounds: int, progress: bool
              ) -> dict[str, Any]:
    """MF, hybrid frozen and hybrid + LoRA, each without DP and at ε = 8 (same rounds, q, σ)."""
    total = rounds + lora_rounds
    runs: dict[str, Any] = {}
    for tag, s in (("nodp", None), ("eps8", sigma)):
        cfg = with_dp(base, s)
        print(f"[{tag}] MF, {total} rounds", flush=True)
        runs[f"mf_{tag}"] = run_inprocess(cfg.replace(**{"fed.rounds": total}), bench.sets, progress=progress,
                                          final_eval=False)
        hcfg = cfg.replace(**{"model.kind": "hybrid"})
        print(f"[{tag}] hybrid, frozen MiniLM + head, {rounds} rounds", flush=True)
        first = run_inprocess(hcfg.replace(**{"fed.rounds": rounds}), bench.sets, texts=bench.texts,
                                     progress=progress, final_eval=False)
        runs[f"hybrid_first_{tag}"] = first
        if lora_rounds:
            # the continuation rounds use fewer texts per client in both arms (LoRA's cost on CPU)
            cont = hcfg.replace(**{"fed.rounds": total, **CONTINUATION})
            print(f"[{tag}] + {lora_rounds} frozen rounds", flush=True)
            runs[f"frozen_{tag}"] = run_inprocess(cont, bench.sets, texts=bench.texts, progress=progress,
                                                         final_eval=False, resume=first)
            print(f"[{tag}] + {lora_rounds} LoRA rounds", flush=True)
            runs[f"lora_{tag}"] = run_inprocess(cont.replace(**{"model.lora": True}), bench.sets,
                                                       texts=bench.texts, progress=progress, final_eval=False,
                                                       resume=first)
        else:
            runs[f"frozen_{tag}"] = first
    return runs


# ---------------------------------------------------------------- client memory (a fresh process each)

def peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``; ``ru_maxrss`` would report the parent's
    peak, which a forked child inherits across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(kind: str, which: str) -> int:
    """One client's round in this (fresh) process; prints JSON with its peak RSS and seconds."""
    torch.set_num_threads(1)
    from common.models import ClientData
    from common.models.hybrid.model import init_hybrid
    from common.models.hybrid.text import text_side
    from common.models.hybrid.train import hybrid_client_train
    from common.models.mf.model import client_train
    from common.models.mf.params import init_items

    inter = load_interactions()
    sets = EvalSets.from_split(split_interactions(inter, "cold-item", seed=0, cold_fraction=0.2))
    sizes = np.array([len(t) for t in sets.train])
    user = int(np.argmax(sizes)) if which == "largest" else int(np.argsort(sizes)[len(sizes) // 2])
    data = ClientData.from_sets(user, np.array([user]), sets)
    cfg = RunConfig().replace(**{"model.kind": "mf" if kind == "mf" else "hybrid", "model.lora": kind == "lora"})
    free = init_items(sets.n_items, cfg.model.dim, seed=0, scale=cfg.model.init_scale)
    t0 = time.perf_counter()
    if kind == "mf":
        client_train(free, data, model=cfg.model, epochs=1, lr=1.0, seed=0, server_round=1)
    else:
        side = text_side([i.text for i in inter.items], cfg.model, cfg.seed)
        params = init_hybrid(free, side)
        text = np.zeros_like(free.embeddings)  # sent by the server; its values do not change the cost
        hybrid_client_train(params, text, data, side, model=cfg.model, epochs=1, lr=1.0, seed=0, server_round=1)
        t0 = time.perf_counter()  # the second round is timed (the first pays one-off imports)
        hybrid_client_train(params, text, data, side, model=cfg.model, epochs=1, lr=1.0, seed=0, server_round=2)
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    print(json.dumps({"kind": kind, "user": user, "train_items": int(sizes[user]), "maxrss_mb": rss,
                      "seconds": seconds}))
    return 0


def measure_rss(kind: str, which: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--rss-child", kind, which], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"client RSS ({kind}, {which}) failed: {proc.stderr[-800:]}", file=sys.stderr)
        return {"kind": kind, "maxrss_mb": float("nan"), "seconds": float("nan"), "user": -1, "train_items": -1}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- main

def fmt_eps(result: InProcessResult) -> Any:
    return result.ledger.epsilon(Accountant.RDP) if result.ledger is not None else "∞"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="a few rounds and 150 users: checks that the script runs")
    p.add_argument("--rounds", type=int, help="rounds of MF / frozen hybrid training before the LoRA comparison "
                                              "(default 60; quick 3)")
    p.add_argument("--lora-rounds", type=int, help="rounds continued frozen vs with LoRA (default 3; quick 1; 0: skip)")
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--users", type=int, help="evaluate on this many users (default all; quick 150)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--rss-child", nargs=2, metavar=("KIND", "USER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.rss_child:
        return rss_child(*args.rss_child)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 60)
    lora_rounds = args.lora_rounds if args.lora_rounds is not None else (1 if args.quick else 3)
    users = args.users if args.users is not None else (150 if args.quick else None)
    t_start = time.perf_counter()
    bench = Bench(users)
    total = rounds + lora_rounds
    base, sigma = configs(total, args.sample_rate, args.quick)
    print(f"ML-100K cold-item split: {len(bench.split.cold_items)} cold items ({bench.split.cold_test.user.size} "
          f"interactions), {bench.sets.n_items} items, {len(bench.sets.train)} users ({len(bench.users)} evaluated); "
          f"{total} rounds at q = {args.sample_rate}; ε = {EPSILON:g} → σ = {sigma:.3f} (RDP, δ = {DELTA:g})", flush=True)
    t0 = time.perf_counter()
    base_emb = base_embeddings(bench.texts, base.model.text_max_length)
    print(f"MiniLM sentence embeddings of {len(bench.texts)} items: {time.perf_counter() - t0:.1f} s (cached on disk)")

    runs = train_all(bench, base, sigma, rounds, lora_rounds, args.progress)
    cfg = base
    settings = (("nodp", "no DP"), ("eps8", f"ε={EPSILON:g}"))
    arms = ("frozen", "lora") if lora_rounds else ("frozen",)

    # ---- scores of every model on the evaluated users
    print("evaluating", flush=True)
    t_eval = time.perf_counter()
    r_cb = text_only_scores([bench.sets.train[u] for u in bench.users], base_emb)
    evals: dict[str, dict[str, dict[str, float]]] = {}
    mf_scores: dict[str, np.ndarray] = {}
    for tag, _ in settings:
        mf_scores[tag] = model_scores(runs[f"mf_{tag}"].params, bench, cfg)
        evals[f"mf_{tag}"] = bench.evaluate(mf_scores[tag])
        for arm in arms:
            evals[f"{arm}_{tag}"] = bench.evaluate(model_scores(deployed_hybrid(runs[f"{arm}_{tag}"], bench, base_emb),
                                                                bench, cfg))
        frozen = runs[f"frozen_{tag}"]
        evals[f"frozen_meanbias_{tag}"] = bench.evaluate(
            model_scores(deployed_hybrid(frozen, bench, base_emb, bias="mean"), bench, cfg))
        evals[f"frozen_raw_{tag}"] = bench.evaluate(model_scores(frozen.params.effective(frozen.text_vectors), bench, cfg))
    evals["text_only"] = bench.evaluate(r_cb)
    rnd = [bench.evaluate(np.random.default_rng(s).random(r_cb.shape)) for s in RANDOM_SEEDS]
    evals["random"] = {part: {k: float(np.mean([r[part][k] for r in rnd])) for k in ("ndcg@10", "recall@20")}
                       for part in ("warm", "cold", "cold_only")}
    user_train = [bench.sets.train[u] for u in bench.users]
    pop = bench.sets.popularity.astype(np.float64)
    evals["genre_pop"] = bench.evaluate(genre_popularity_scores(user_train, bench.genres, pop))
    evals["genre_pop_pred"] = bench.evaluate(genre_popularity_scores(user_train, bench.genres,
                                                                     genre_predicted_counts(bench)))
    sweep = {(tag, a): bench.evaluate(blend_scores(mf_scores[tag], r_cb, a)) for tag, _ in settings for a in ALPHAS}
    eval_seconds = time.perf_counter() - t_eval

    # ---- client memory and cost
    print("client memory (fresh subprocesses)", flush=True)
    rss = {(k, w): measure_rss(k, w) for k in ("mf", "frozen", "lora") for w in ("median", "largest")}
    wall = time.perf_counter() - t_start

    def m(key: str, part: str, metric: str) -> float:
        return evals[key][part][metric]

    def cols(key: str) -> list[float]:
        return [m(key, "cold", "ndcg@10"), m(key, "cold", "recall@20"), m(key, "cold_only", "ndcg@10")]

    # ---- tables
    print(f"\nCold items ({len(bench.split.cold_items)} held out entirely): each user's cold interactions ranked "
          "against ALL items (train/valid masked); last column ranks among cold items only (diagnostic)")
    cold_rows = [["random (mean of 3 seeds)", "-", *cols("random")],
                 ["genre-popularity (cold items: count 0)", "-", *cols("genre_pop")],
                 ["genre-popularity (cold counts predicted from genres)", "-", *cols("genre_pop_pred")],
                 ["text-only (MiniLM profile cosine, r_cb)", "-", *cols("text_only")]]
    for tag, label in settings:
        cold_rows.append(["MF only (no vector for new items)", label, *cols(f"mf_{tag}")])
        cold_rows.append(["hybrid, frozen MiniLM + head", label, *cols(f"frozen_{tag}")])
        cold_rows.append(["  same, new items at the mean warm bias", label, *cols(f"frozen_meanbias_{tag}")])
        cold_rows.append(["  same, raw (trained-as-negative) free part", label, *cols(f"frozen_raw_{tag}")])
        if lora_rounds:
            cold_rows.append([f"hybrid, LoRA-adapted (last {lora_rounds} rounds)", label, *cols(f"lora_{tag}")])
    print(table(["scorer", "privacy", "NDCG@10", "Recall@20", "NDCG@10 among cold"], cold_rows))

    print(f"\nWarm items (test interactions of warm items ranked against ALL items; {total} rounds, q = {args.sample_rate})")
    warm_rows = []
    for tag, label in settings:
        for key, name in ((f"mf_{tag}", "MF only"), (f"frozen_{tag}", "hybrid, frozen MiniLM + head"),
                          (f"frozen_meanbias_{tag}", "  same, new items at the mean warm bias"),
                          (f"frozen_raw_{tag}", "  same, raw free part of new items"),
                          (f"lora_{tag}", f"hybrid, LoRA-adapted (last {lora_rounds} rounds)")):
            if key not in evals:
                continue
            run = runs[key.replace("_raw", "").replace("_meanbias", "")]
            warm_rows.append([name, label, fmt_eps(run), m(key, "warm", "ndcg@10"), m(key, "warm", "recall@20"),
                              ratio(m(key, "warm", "ndcg@10"), m(f"mf_{tag}", "warm", "ndcg@10"))])
    for key, name in (("text_only", "text-only (r_cb)"), ("genre_pop", "genre-popularity"), ("random", "random")):
        warm_rows.append([name, "-", "-", m(key, "warm", "ndcg@10"), m(key, "warm", "recall@20"), "-"])
    print(table(["model", "privacy", "ε (RDP)", "NDCG@10", "Recall@20", "× MF"], warm_rows))

    if lora_rounds:
        print(f"\nFrozen MiniLM + head vs LoRA-adapted MiniLM: {rounds} frozen rounds, then {lora_rounds} more rounds "
              f"frozen or with LoRA (r=8 on q,v; B starts at 0); {CONTINUATION['model.text-positives']} positives + "
              f"{CONTINUATION['model.text-negatives']} negatives per client in those rounds")
        rows = []
        for tag, label in settings:
            for arm in arms:
                k = f"{arm}_{tag}"
                rows.append([arm, label, fmt_eps(runs[k]), len(runs[k].params.names()),
                             int(sum(a.size for a in runs[k].params.to_arrays()[2:])), *cols(k),
                             m(k, "warm", "ndcg@10"), m(k, "warm", "recall@20")])
        print(table(["encoder", "privacy", "ε (RDP)", "released arrays", "adapter params", "cold NDCG@10",
                     "cold Recall@20", "NDCG@10 among cold", "warm NDCG@10", "warm Recall@20"], rows))

    print("\nSeed blend r = α·z(r_cf) + (1−α)·z(r_cb): r_cf = MF scores, r_cb = MiniLM profile cosines")
    print(table(["α", "MF privacy", "warm NDCG@10", "warm Recall@20", "cold NDCG@10", "cold Recall@20",
                 "NDCG@10 among cold"],
                [[a, label, sweep[(tag, a)]["warm"]["ndcg@10"], sweep[(tag, a)]["warm"]["recall@20"],
                  sweep[(tag, a)]["cold"]["ndcg@10"], sweep[(tag, a)]["cold"]["recall@20"],
                  sweep[(tag, a)]["cold_only"]["ndcg@10"]] for tag, label in settings for a in ALPHAS]))

    print("\nCost (in-process runner, one CPU thread, machine shared with others: compare within this run only)")
    first = runs["hybrid_first_nodp"]
    cost_rows = [["MF only", per_round(runs["mf_nodp"], total), "-", "-"],
                 ["hybrid, frozen MiniLM + head", per_round(first, rounds),
                  float(np.mean([r["client_seconds"] for r in first.rounds])),
                  float(np.mean([r["server_seconds"] for r in first.rounds]))]]
    if lora_rounds:
        for arm, name in (("frozen", "hybrid, frozen (continuation rounds)"), ("lora", "hybrid + LoRA (continuation rounds)")):
            rows_l = runs[f"{arm}_nodp"].rounds[-lora_rounds:]
            cost_rows.append([name, per_round(runs[f"{arm}_nodp"], lora_rounds),
                              float(np.mean([r["client_seconds"] for r in rows_l])),
                              float(np.mean([r["server_seconds"] for r in rows_l]))])
    print(table(["model", "s / round (all)", "clients s / round", "server text vectors s / round"], cost_rows))
    print(table(["client process (one round, fresh process)", "user", "train items", "round s", "peak RSS MB"],
                [[f"{k} ({w} user)", r["user"], r["train_items"], r["seconds"], r["maxrss_mb"]]
                 for (k, w), r in rss.items()]))
    print(f"\nevaluation {eval_seconds:.0f} s; wall time {wall:.0f} s")

    # ---- targets and figures
    hyb_cold = m("frozen_eps8", "cold", "ndcg@10")
    genre_best = max(m("genre_pop", "cold", "ndcg@10"), m("genre_pop_pred", "cold", "ndcg@10"))
    goals = [target("cold_hybrid_eps8_ndcg10_over_random", ratio(hyb_cold, m("random", "cold", "ndcg@10")), ">=", 3.0),
             target("cold_hybrid_eps8_ndcg10_minus_genre_pop", hyb_cold - genre_best, ">", 0.0),
             target("warm_hybrid_nodp_ndcg10_over_mf", ratio(m("frozen_nodp", "warm", "ndcg@10"),
                                                             m("mf_nodp", "warm", "ndcg@10")), ">=", 1.0),
             target("warm_hybrid_eps8_ndcg10_over_mf", ratio(m("frozen_eps8", "warm", "ndcg@10"),
                                                             m("mf_eps8", "warm", "ndcg@10")), ">=", 1.0)]
    if lora_rounds:
        goals.append(target("cold_lora_eps8_ndcg10_over_frozen", ratio(m("lora_eps8", "cold", "ndcg@10"),
                                                                       m("frozen_eps8", "cold", "ndcg@10")), ">=", 1.0))
    goals.append(target("client_rss_mb_lora_largest_user", rss[("lora", "largest")]["maxrss_mb"], "<=", RSS_LIMIT_MB))
    print("\n" + targets_table(goals))
    figures: dict[str, Any] = {"rounds": total, "frozen_rounds": rounds, "lora_rounds": lora_rounds,
                               "sample_rate": args.sample_rate, "sigma_eps8": sigma, "delta": DELTA,
                               "users_evaluated": len(bench.users), "wall_seconds": wall}
    for key, ev in evals.items():
        for part in ("warm", "cold", "cold_only"):
            for metric in ("ndcg@10", "recall@20"):
                figures[f"{part}_{key}_{metric.replace('@', '')}"] = ev[part][metric]
    for (tag, a), ev in sweep.items():
        for part in ("warm", "cold", "cold_only"):
            figures[f"blend_{tag}_alpha{a:g}_{part}_ndcg10"] = ev[part]["ndcg@10"]
    for key, run in runs.items():
        if run.ledger is not None:
            figures[f"epsilon_rdp_{key}"] = run.ledger.epsilon(Accountant.RDP)
    for row in cost_rows:
        figures[f"seconds_per_round[{row[0]}]"] = row[1]
    for (k, w), r in rss.items():
        figures[f"client_rss_mb[{k},{w}]"] = r["maxrss_mb"]
        figures[f"client_round_seconds[{k},{w}]"] = r["seconds"]
    if args.json:
        write_json(args.json, figures, goals)
    return 0


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


if __name__ == "__main__":
    sys.exit(main())
