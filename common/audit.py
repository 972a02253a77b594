"""Leakage audit: what an honest-but-curious server learns about WHICH items a client rated.

In matrix factorisation a client's item-side update is dense in shape but not in content: the
rows of the items the client rated move differently from the others, so the plain update
reveals them (FedMF, Chai et al. 2020). This module measures how well a server-side attacker
ranks a client's training items above the rest, under the observation models this project
offers:

``plaintext``  the raw per-client update (no DP, no SecAgg): the positive control.
``dp_only``    each update clipped (``clip_grouped``, ``dp.clip``, ``dp.bias-share``) and seen
               in plaintext. Central DP-FedAvg adds noise only to the SUM, so the per-client update
               the server sees is as revealing as before: hiding it is what SecAgg is for.
``local_dp``   each client adds ``N(0, (σ·C)²)`` per coordinate to its own clipped update before
               sending (what a local-DP mod would do with the same σ).
``secagg``     SecAgg+: the server sees only the cohort's EXACT sum of clipped updates -- with central DP
               too, since it unmasks the sum and only then adds the noise.
``released``   what everyone but the server sees under central DP: the released update, the sum plus
               ``N(0, (σ·C)²)``, divided by the cohort (``noisy_mean``).

Under SecAgg the attacker has one aggregate and gives every client the same scores. Those scores
still reflect the cohort's popular items, and a client's items tend to be popular, so their AUC
can exceed 0.5 without anything being learned about an individual. ``*_nonmember_auc`` scores
the same aggregate against users who were NOT in the cohort: the member minus non-member
difference is what the aggregate reveals about the members themselves. ``popularity_prior_*`` is
what knowing item popularity gives an attacker without observing anything (counted over all
training users, the targets included, so on a small data set it holds a little of their own data).

The attack (fixed in advance, never chosen on the ground truth): the signed item-bias update.
With the softmax (or BPR) loss a rated item's bias is pushed up (``Δb_i = lr·(1 − n·p_i) > 0``)
and every other item's is pushed down (``−lr·n·p_i``) or not at all. For the MSE loss, where
only rated items move and the sign follows the residual, the score is ``|Δb_i|``. On ML-100K,
under noise, this beat the row norm ``‖ΔV_i‖ + |Δb_i|`` and a projection of the embedding
rows onto their top singular direction (at σ·C = 0.03: AUC 0.86 against 0.77 and 0.69).

The model audited: the updates of round ``rounds``, computed at the initial model
(``init_items``) advanced by ``rounds − 1`` in-process rounds of the configured algorithm (one
user per client, Poisson sampling, clipping and noise as in ``cfg.dp``). The default ``rounds=1``
audits the very first round, at the initial model. All noise here is seeded from ``seed``: the
audit simulates releases, it does not make any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.models import ClientData, ItemParams
from common.models.mf.model import client_train
from common.models.mf.params import init_items
from common.privacy.dp_fedavg import GaussianNoise, clip_grouped, noisy_mean
from common.rounds import sum_updates
from common.streams import Stream, generator, key

AUDIT_FILE = "audit.json"
# observation model -> (who observes it, what they observe): the table's second and third columns
OBSERVATIONS = {
    "plaintext": ("server, no SecAgg+/DP", "each client's raw update"),
    "dp_only": ("server, central DP", "each client's clipped update"),
    "local_dp": ("server, local DP", "each clipped update + N(0,(σC)²)"),
    "secagg": ("server, SecAgg+ (±DP)", "the EXACT sum of clipped updates"),
    "released": ("all but the server", "that sum + N(0,(σC)²), / cohort"),
    "popularity_prior": ("anyone", "nothing (scores = item popularity)"),
}


# ---------------------------------------------------------------- metrics
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` in ascending order, tied values sharing their average rank."""
    x = np.asarray(x, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last - (counts - 1) / 2.0)[inverse]


def _mask(positives: np.ndarray, n: int) -> np.ndarray:
    positives = np.asarray(positives)
    if positives.dtype == bool:
        if positives.shape != (n,):
            raise ValueError(f"positive mask has shape {positives.shape}, expected ({n},)")
        return positives
    mask = np.zeros(n, dtype=bool)
    mask[positives.astype(np.int64)] = True
    return mask


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for the ``positives`` (indices or a boolean mask): the Mann-Whitney
    probability that a random positive scores above a random negative, ties counting one half.
    NaN when there are no positives or no negatives."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or Inf")
    y = _mask(positives, len(scores))
    n_pos = int(y.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = float(average_ranks(scores)[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def precision_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Fraction of positives among the ``k`` top-scored items; items tied at the cut-off are
    counted by expectation over a random tie-break (so ties neither help nor hurt)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    y = _mask(positives, len(scores))
    k = min(int(k), len(scores))
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    cut = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th largest score
    above, tied = scores > cut, scores == cut
    slots = k - int(above.sum())
    return (float(y[above].sum()) + slots * float(y[tied].mean())) / k


# ---------------------------------------------------------------- the attack
def attack_scores(update: list[np.ndarray], loss: str = "softmax") -> np.ndarray:
    """The attacker's score per item from an observed item-side update ``[ΔV (I, d), Δb (I,)]``:
    higher = more likely rated. Signed bias update (``|Δb|`` for the MSE loss)."""
    bias = np.asarray(update[1], dtype=np.float64)
    return np.abs(bias) if loss == "mse" else bias


# ---------------------------------------------------------------- the audit
def _warm_up(sets: EvalSets, cfg: RunConfig, rounds: int, seed: int) -> ItemParams:
    """The MF model after ``rounds`` rounds of the configured algorithm, one user per client, run
    by the in-process runner (cohorts and noise seeded from ``seed``: the audit simulates rounds,
    it releases nothing)."""
    noise_seed = int(generator(Stream.AUDIT_WARMUP_NOISE, seed).integers(2**31))
    warm = cfg.replace(**{"fed.rounds": rounds, "fed.partition": "user", "model.kind": "mf",
                          "fed.sampling-seed": seed, "dp.noise-seed": noise_seed, "dp.target-epsilon": 0})
    return run_inprocess(warm, sets, final_eval=False).params


def _score_clients(per_client: list[np.ndarray], truths: list[np.ndarray]) -> tuple[float, float]:
    """Mean AUC and mean precision@k (k = the client's number of positives) over clients."""
    aucs = [roc_auc(s, t) for s, t in zip(per_client, truths)]
    precs = [precision_at_k(s, t, len(t)) for s, t in zip(per_client, truths)]
    return float(np.nanmean(aucs)), float(np.mean(precs))


def leakage_audit(sets: EvalSets, cfg: RunConfig, *, clients: int = 50, rounds: int = 1, seed: int = 0) -> dict[str, Any]:
    """How well an honest-but-curious server infers which items ``clients`` users rated from
    their round-``rounds`` updates, under each observation model (see the module docstring).

    Returns named figures: ``<model>_auc`` and ``<model>_p@k`` (means over the clients) for
    plaintext, dp_only, local_dp, secagg, released and popularity_prior; ``secagg_nonmember_auc``
    and ``released_nonmember_auc`` (the aggregates scored against up to ``clients`` users outside
    the cohort; None when there are none); ``chance_p@k``; and the setting (clients, sigma, clip,
    bias_share, round, loss, attack).
    """
    if clients < 1:
        raise ValueError(f"clients must be ≥ 1, got {clients}")
    if rounds < 1:
        raise ValueError(f"rounds must be ≥ 1, got {rounds}")
    eligible = np.array([u for u, items in enumerate(sets.train) if 0 < len(items) < sets.n_items], dtype=np.int64)
    if clients > len(eligible):
        raise ValueError(f"{clients} clients asked for, but only {len(eligible)} users have training items")
    rng = generator(Stream.AUDIT_CLIENTS, seed)
    order = rng.permutation(eligible)
    targets, outsiders = np.sort(order[:clients]), np.sort(order[clients:2 * clients])
    sigma, clip, share, loss = cfg.dp.noise_multiplier, cfg.dp.clip, cfg.dp.bias_share, cfg.model.loss
    params = (init_items(sets.n_items, cfg.model.dim, seed=cfg.seed, scale=cfg.model.init_scale) if rounds == 1
              else _warm_up(sets, cfg, rounds - 1, seed))
    raw = []
    for u in targets:
        update, _, _ = client_train(params, ClientData.from_sets(int(u), np.array([u]), sets), model=cfg.model,
                                    epochs=cfg.fed.local_epochs, lr=cfg.fed.client_lr, seed=cfg.seed,
                                    server_round=rounds)
        raw.append(update.to_arrays())
    clipped = [clip_grouped(a, clip, share) for a in raw]
    local_noise = GaussianNoise(key(Stream.AUDIT_LOCAL_NOISE, seed))
    noised = [[x + local_noise.normal(x.shape, sigma * clip) for x in a] for a in clipped]
    total = sum_updates(clipped)
    aggregate = [t / clients for t in total]
    noisy = noisy_mean(total, noise_multiplier=sigma, clip=clip, expected_cohort=clients,
                       noise=GaussianNoise(key(Stream.AUDIT_AGGREGATE_NOISE, seed)))

    truths = [sets.train[u] for u in targets]
    outsider_truths = [sets.train[u] for u in outsiders]
    figures: dict[str, Any] = {}
    for name, observed in (("plaintext", raw), ("dp_only", clipped), ("local_dp", noised)):
        auc, prec = _score_clients([attack_scores(a, loss) for a in observed], truths)
        figures[f"{name}_auc"], figures[f"{name}_p@k"] = auc, prec
    for name, scores in (("secagg", attack_scores(aggregate, loss)), ("released", attack_scores(noisy, loss)),
                         ("popularity_prior", np.asarray(sets.popularity, dtype=np.float64))):
        auc, prec = _score_clients([scores] * len(truths), truths)
        figures[f"{name}_auc"], figures[f"{name}_p@k"] = auc, prec
        if name != "popularity_prior":
            figures[f"{name}_nonmember_auc"] = (
                _score_clients([scores] * len(outsider_truths), outsider_truths)[0] if outsider_truths else None)
    figures["chance_p@k"] = float(np.mean([len(t) / sets.n_items for t in truths]))
    figures.update({"clients": int(clients), "nonmembers": int(len(outsiders)), "sigma": float(sigma),
                    "clip": float(clip), "bias_share": float(share), "round": int(rounds), "loss": loss,
                    "attack": "|item-bias update|" if loss == "mse" else "signed item-bias update"})
    return figures


def write_audit(run_dir: Path, figures: dict[str, Any]) -> Path:
    """Write ``figures`` to ``run_dir/audit.json`` (the privacy report includes it); returns the path."""
    from common.serialization import write_json

    path = Path(run_dir) / AUDIT_FILE
    write_json(path, figures)
    return path


def format_audit(figures: dict[str, Any]) -> str:
    """A readable table: one row per observation model (AUC, precision@k, non-member AUC)."""
    def cell(key: str) -> str:
        value = figures.get(key)
        return "" if value is None else f"{value:.3f}"

    lines = [f"{'observation model':<17} {'observed by':<22} {'what':<36} {'AUC':>6} {'p@k':>6} {'non-member AUC':>15}"]
    for name, (who, sees) in OBSERVATIONS.items():
        lines.append(f"{name:<17} {who:<22} {sees:<36} {cell(name + '_auc'):>6} {cell(name + '_p@k'):>6} "
                     f"{cell(name + '_nonmember_auc'):>15}")
    lines.append(f"{figures['clients']} clients at round {figures['round']} ({figures['loss']} loss); sigma = "
                 f"{figures['sigma']:g}, clip = {figures['clip']:g}, bias share = {figures['bias_share']:g}; "
                 f"attack: {figures['attack']}.")
    lines.append(f"AUC 0.5 = chance; p@k: k = the client's number of training items (chance "
                 f"{figures['chance_p@k']:.3f}). dp_only is as revealing as plaintext: central DP noises only the sum, and "
                 "under SecAgg+ the server still sees that sum exactly (secagg); only the released model is noised.")
    lines.append("non-member AUC: the same aggregate scored against users outside the cohort; AUC minus it is "
                 "what the aggregate reveals about the members themselves (the rest is popularity).")
    return "\n".join(lines)
