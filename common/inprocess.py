"""The same federated algorithm as the Flower apps, run sequentially in one process.

It calls exactly the functions the ClientApp and the strategy call (client_train, clip_update,
poisson_sample, sum_updates, server_update, the privacy ledger), so for the same config and a
seeded noise source it produces the same model as a Flower simulation
(``tests/test_inprocess.py`` checks this bit for bit). Benchmarks use it for parameter sweeps
that would take hours through Ray; headline numbers come from the Flower simulation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from common import keys
from common.config import RunConfig
from common.data.partition import partition_users
from common.evaluation import EvalSets
from common.federated import (
    ClientData, client_evaluate, client_train, make_server_optimizer, poisson_sample, server_update, sum_updates,
)
from common.mf import ItemParams, init_items
from common.privacy import Accountant, MechanismEvent, Neighbouring, PrivacyLedger
from common.privacy.dp_fedavg import GaussianNoise, clip_item_update


@dataclass
class InProcessResult:
    params: ItemParams
    ledger: PrivacyLedger | None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


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


def run_inprocess(cfg: RunConfig, sets: EvalSets, *, eval_every: int | None = None, progress: bool = False,
                  on_round: Callable[[dict[str, Any]], None] | None = None, final_eval: bool = True) -> InProcessResult:
    parts = partition_users(len(sets.train), cfg.fed.partition, num_silos=cfg.fed.num_silos, seed=cfg.seed)
    clients = [ClientData.from_sets(i, users, sets) for i, users in enumerate(parts)]
    params = init_items(sets.n_items, cfg.model.dim, seed=cfg.seed, scale=cfg.model.init_scale)
    optimizer = make_server_optimizer(cfg.fed, cfg.model)
    dp = cfg.dp if cfg.dp.enabled else None
    ledger = PrivacyLedger(delta=cfg.dp.delta, neighbouring=Neighbouring.USER) if dp else None
    noise = GaussianNoise(None if cfg.dp.noise_seed < 0 else cfg.dp.noise_seed)
    result = InProcessResult(params=params, ledger=ledger)
    t0 = time.perf_counter()
    for rnd in tqdm(range(1, cfg.fed.rounds + 1), desc="in-process rounds", disable=not progress):
        event = MechanismEvent(noise_multiplier=cfg.dp.noise_multiplier, sample_rate=cfg.fed.sample_rate, steps=1,
                               neighbouring=Neighbouring.USER, parameters=keys.ITEM_PARAM_NAMES, round=rnd)
        if ledger is not None and cfg.dp.target_epsilon > 0 and ledger.would_exceed(
                event, target_epsilon=cfg.dp.target_epsilon, accountant=Accountant(cfg.dp.accountant)):
            break
        chosen = poisson_sample(list(range(len(clients))), cfg.fed.sample_rate, seed=cfg.seed, server_round=rnd)
        updates, failures = [], 0
        for cid in chosen:
            try:
                update, _, _ = client_train(params, clients[cid], model=cfg.model, epochs=cfg.fed.local_epochs,
                                            lr=cfg.fed.client_lr, seed=cfg.seed, server_round=rnd)
            except ValueError:
                failures += 1
                continue
            arrays = update.to_arrays()
            if dp is not None:
                arrays = clip_item_update(arrays, dp.clip, dp.bias_share)
            updates.append(arrays)
        params = server_update(params, sum_updates(updates), len(updates), optimizer=optimizer, dp=dp,
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
