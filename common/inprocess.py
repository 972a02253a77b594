"""The same federated algorithm as the Flower apps, run sequentially in one process.

It calls exactly the functions the ClientApp and the strategy call (client_train, clip_update,
poisson_sample, sum_updates, server_update, the privacy ledger), so for the same config and a
seeded noise source it produces the same model as a Flower simulation
(``tests/test_inprocess.py`` checks this bit for bit). Benchmarks use it for parameter sweeps
that would take hours through Ray; headline numbers come from the Flower simulation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from common import keys
from common.config import DPConfig, RunConfig
from common.data.partition import partition_users
from common.evaluation import EvalSets
from common.federated import (
    ClientData, client_evaluate, client_train, make_server_optimizer, server_update, sum_updates,
)
from common.sampling import poisson_sample
from common.mf import ItemParams, init_items
from common.privacy import Accountant, PrivacyLedger
from common.privacy.dp_fedavg import (GaussianNoise, add_local_noise, clip_item_update, ledger_for, local_noise_for,
                                      release_event)


@dataclass
class InProcessResult:
    params: ItemParams
    ledger: PrivacyLedger | None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    optimizer: Any = None  # the server optimizer (hybrid runs: to continue a run with `resume=`)
    text_vectors: Any = None  # hybrid: the item text vectors of the final adapter (I, d)


def evaluate_clients(params: ItemParams, clients: list[ClientData], cfg: RunConfig, phase: str) -> dict[str, float]:
    """Per-user average of the clients' own full-ranking metrics (what the server aggregates)."""
    totals: dict[str, float] = {}
    users = 0
    for c in clients:
        res = client_evaluate(params, c, model=cfg.model, phase=phase, seed=cfg.seed)
        users += int(res.pop("users"))
        for k, v in res.items():
            totals[k] = totals.get(k, 0.0) + v
    return {**{k: v / users for k, v in totals.items()}, "users": users} if users else {"users": 0}


def _device_side(arrays: list[np.ndarray], dp: DPConfig | None, clip, rnd: int, cid: int) -> list[np.ndarray]:
    """What a device does to its update before sending (as client/app.py does): clip with DP, and
    with local DP add its own noise (seeded per round and client, as the Flower client does)."""
    if dp is None:
        return arrays
    arrays = clip(arrays, dp.clip, dp.bias_share)
    if dp.mode == "local":
        arrays = add_local_noise(arrays, noise_multiplier=dp.noise_multiplier, clip=dp.clip,
                                 noise=local_noise_for(dp.seed, rnd, cid))
    return arrays


def run_inprocess(cfg: RunConfig, sets: EvalSets, *, eval_every: int | None = None, progress: bool = False,
                  on_round: Callable[[dict[str, Any]], None] | None = None, final_eval: bool = True,
                  texts: Sequence[str] | None = None) -> InProcessResult:
    if cfg.model.kind == "hybrid":  # `texts`: the item texts (default: those of cfg.data)
        return run_inprocess_hybrid(cfg, sets, texts=texts, eval_every=eval_every, progress=progress,
                                    on_round=on_round, final_eval=final_eval)
    parts = partition_users(len(sets.train), cfg.fed.partition, num_silos=cfg.fed.num_silos, seed=cfg.seed)
    clients = [ClientData.from_sets(i, users, sets) for i, users in enumerate(parts)]
    params = init_items(sets.n_items, cfg.model.dim, seed=cfg.seed, scale=cfg.model.init_scale)
    optimizer = make_server_optimizer(cfg.fed, cfg.model)
    dp = cfg.dp if cfg.dp.enabled else None
    local = dp is not None and dp.mode == "local"  # the devices add the noise; the server only averages
    ledger = ledger_for(cfg.dp.mode, cfg.dp.delta, cfg.fed.partition) if dp else None
    noise = GaussianNoise(cfg.dp.seed)
    result = InProcessResult(params=params, ledger=ledger)
    t0 = time.perf_counter()
    for rnd in tqdm(range(1, cfg.fed.rounds + 1), desc="in-process rounds", disable=not progress):
        event = release_event(cfg.dp.mode, noise_multiplier=cfg.dp.noise_multiplier, sample_rate=cfg.fed.sample_rate,
                              parameters=keys.ITEM_PARAM_NAMES, server_round=rnd)
        if ledger is not None and cfg.dp.target_epsilon > 0 and ledger.would_exceed(
                event, target_epsilon=cfg.dp.target_epsilon, accountant=Accountant(cfg.dp.accountant)):
            break
        chosen = poisson_sample(list(range(len(clients))), cfg.fed.sample_rate, seed=cfg.fed.cohort_seed,
                                server_round=rnd)
        updates, failures = [], 0
        for cid in chosen:
            try:
                update, _, _ = client_train(params, clients[cid], model=cfg.model, epochs=cfg.fed.local_epochs,
                                            lr=cfg.fed.client_lr, seed=cfg.seed, server_round=rnd)
            except ValueError:
                failures += 1
                continue
            updates.append(_device_side(update.to_arrays(), dp, clip_item_update, rnd, cid))
        params = server_update(params, sum_updates(updates), len(updates), optimizer=optimizer,
                               dp=None if local else dp,
                               expected_cohort=cfg.fed.sample_rate * len(clients), noise=noise.for_round(rnd))
        row: dict[str, Any] = {"round": rnd, "participants": len(updates), "failures": failures}
        if ledger is not None:
            ledger.record(event)
            row["epsilon"] = ledger.epsilon(Accountant.RDP)
        result.rounds.append(row)
        if eval_every and rnd % eval_every == 0 and rnd < cfg.fed.rounds:
            result.evals.append({"round": rnd, "phase": "valid", **evaluate_clients(params, clients, cfg, "valid")})
        if on_round:
            on_round(row)
    result.params = params
    result.seconds = time.perf_counter() - t0
    last = result.rounds[-1]["round"] if result.rounds else 0
    if final_eval:
        result.evals.append({"round": last, "phase": "test", **evaluate_clients(params, clients, cfg, "test")})
    return result


def run_inprocess_hybrid(cfg: RunConfig, sets: EvalSets, *, texts: Sequence[str] | None = None,
                         eval_every: int | None = None, progress: bool = False,
                         on_round: Callable[[dict[str, Any]], None] | None = None, final_eval: bool = True,
                         resume: InProcessResult | None = None) -> InProcessResult:
    """The hybrid federation (``model.kind = "hybrid"``) in one process: the functions the
    ClientApp and the strategy call (hybrid_client_train, clip_hybrid_update, poisson_sample,
    sum_updates, hybrid_server_update, the text side's item vectors after each release).

    ``resume``: continue a previous hybrid result (its model, optimizer moments and ledger) from
    its last round up to ``cfg.fed.rounds``; when ``cfg.model.lora`` and the previous model had
    no LoRA arrays, they are added (B = 0) with zero optimizer moments: frozen rounds, then LoRA.
    """
    from common.hybrid_federated import (add_lora, clip_hybrid_update, extend_optimizer, hybrid_client_train,
                                         hybrid_server_update, init_hybrid, item_texts, text_side)

    texts = tuple(texts) if texts is not None else item_texts(cfg.data)
    side = text_side(texts, cfg.model, cfg.seed)
    parts = partition_users(len(sets.train), cfg.fed.partition, num_silos=cfg.fed.num_silos, seed=cfg.seed)
    clients = [ClientData.from_sets(i, users, sets) for i, users in enumerate(parts)]
    dp = cfg.dp if cfg.dp.enabled else None
    if resume is None:
        params = init_hybrid(init_items(sets.n_items, cfg.model.dim, seed=cfg.seed, scale=cfg.model.init_scale), side)
        optimizer = make_server_optimizer(cfg.fed, cfg.model)
        ledger = ledger_for(cfg.dp.mode, cfg.dp.delta, cfg.fed.partition) if dp else None
        first = 1
    else:
        params, optimizer = resume.params.copy(), copy.deepcopy(resume.optimizer)
        ledger = PrivacyLedger.from_state_dict(resume.ledger.state_dict()) if resume.ledger is not None else None
        if (ledger is None) != (dp is None):
            raise ValueError("resume: DP on/off must not change within a run")
        if cfg.model.lora and not any(k.startswith("lora.") for k in params.adapter):
            extended = add_lora(params, side)
            extend_optimizer(optimizer, params, extended)
            params = extended
        first = (resume.rounds[-1]["round"] if resume.rounds else 0) + 1
    text_vectors = side.vectors(params.adapter)
    local = dp is not None and dp.mode == "local"
    noise = GaussianNoise(cfg.dp.seed)
    result = InProcessResult(params=params, ledger=ledger, optimizer=optimizer, text_vectors=text_vectors)
    t0 = time.perf_counter()
    for rnd in tqdm(range(first, cfg.fed.rounds + 1), desc="in-process hybrid rounds", disable=not progress):
        event = release_event(cfg.dp.mode, noise_multiplier=cfg.dp.noise_multiplier, sample_rate=cfg.fed.sample_rate,
                              parameters=params.names(), server_round=rnd)
        if ledger is not None and cfg.dp.target_epsilon > 0 and ledger.would_exceed(
                event, target_epsilon=cfg.dp.target_epsilon, accountant=Accountant(cfg.dp.accountant)):
            break
        t_round = time.perf_counter()
        chosen = poisson_sample(list(range(len(clients))), cfg.fed.sample_rate, seed=cfg.fed.cohort_seed,
                                server_round=rnd)
        updates, failures = [], 0
        for cid in chosen:
            try:
                arrays, _, _, _ = hybrid_client_train(params, text_vectors, clients[cid], side, model=cfg.model,
                                                      epochs=cfg.fed.local_epochs, lr=cfg.fed.client_lr,
                                                      seed=cfg.seed, server_round=rnd)
            except ValueError:
                failures += 1
                continue
            updates.append(_device_side(arrays, dp, clip_hybrid_update, rnd, cid))
        t_clients = time.perf_counter() - t_round
        params = hybrid_server_update(params, sum_updates(updates), len(updates), optimizer=optimizer,
                                      dp=None if local else dp,
                                      expected_cohort=cfg.fed.sample_rate * len(clients), noise=noise.for_round(rnd))
        t_server = time.perf_counter()
        text_vectors = side.vectors(params.adapter)
        row: dict[str, Any] = {"round": rnd, "participants": len(updates), "failures": failures,
                               "client_seconds": t_clients, "text_vector_seconds": time.perf_counter() - t_server}
        if ledger is not None:
            ledger.record(event)
            row["epsilon"] = ledger.epsilon(Accountant.RDP)
        result.rounds.append(row)
        if eval_every and rnd % eval_every == 0 and rnd < cfg.fed.rounds:
            result.evals.append({"round": rnd, "phase": "valid",
                                 **evaluate_clients(params.effective(text_vectors), clients, cfg, "valid")})
        if on_round:
            on_round(row)
    result.params, result.text_vectors = params, text_vectors
    result.seconds = time.perf_counter() - t0
    if resume is not None:
        result.rounds = [*resume.rounds, *result.rounds]
    last = result.rounds[-1]["round"] if result.rounds else 0
    if final_eval:
        result.evals.append({"round": last, "phase": "test",
                             **evaluate_clients(params.effective(text_vectors), clients, cfg, "test")})
    return result
