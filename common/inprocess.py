"""The same federated algorithm as the Flower apps, run sequentially in one process.

It runs the rounds through the same :class:`~common.rounds.RoundEngine` the strategy uses, and
each device through the same steps the ClientApp takes (the model's training step, then
:func:`common.device.protect` under the device's privacy floor), so for the same config and
seeded noise and cohorts it produces the same model as a Flower simulation
(``tests/test_inprocess.py`` checks this bit for bit, for every model). Benchmarks use it for
parameter sweeps that would take hours through Ray; headline numbers come from the Flower
simulation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from common.config import RunConfig
from common.data.partition import partition_users
from common.device import client_evaluate, protect
from common.evaluation import EvalSets
from common.models import ClientData, ItemModel, ItemParams, build_model
from common.privacy import PrivacyLedger
from common.privacy.device import DevicePolicy, protection_for
from common.privacy.dp_fedavg import local_noise_for
from common.rounds import RoundEngine, sum_updates


@dataclass
class InProcessResult:
    params: Any  # the model's final parameters
    ledger: PrivacyLedger | None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    optimizer: Any = None  # the server optimizer (to continue a run with `resume=`)
    context: list = field(default_factory=list)  # the model's context arrays (hybrid: item text vectors)
    model: ItemModel | None = None

    @property
    def effective(self) -> ItemParams:
        """The released model as one vector and one bias per item."""
        return self.model.effective(self.params, self.context)

    @property
    def text_vectors(self):
        """The hybrid's item text vectors (its one context array), or None."""
        return self.context[0] if self.context else None


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


def run_inprocess(cfg: RunConfig, sets: EvalSets, *, texts: Sequence[str] | None = None,
                  eval_every: int | None = None, progress: bool = False,
                  on_round: Callable[[dict[str, Any]], None] | None = None, final_eval: bool = True,
                  resume: InProcessResult | None = None) -> InProcessResult:
    """Train ``cfg``'s model federated, in this process, on ``sets`` (one client per user, or silos).

    ``texts``: the item texts for a model that reads them (default: those of ``cfg.data``).
    ``resume``: continue a previous result (its parameters, optimizer moments and ledger) from its
    last round up to ``cfg.fed.rounds``; the model may extend the parameters (the hybrid adds LoRA
    arrays when this run trains LoRA and the previous one did not).
    """
    model = build_model(cfg.model, n_items=sets.n_items, seed=cfg.seed, texts=_texts(cfg, texts))
    parts = partition_users(len(sets.train), cfg.fed.partition, num_silos=cfg.fed.num_silos, seed=cfg.seed)
    clients = [ClientData.from_sets(i, users, sets) for i, users in enumerate(parts)]
    engine, first = _engine(cfg, model, resume)
    # The operator owns the simulated devices; no SecAgg+ here (the runner sums in plaintext).
    policy = DevicePolicy.for_run(cfg, secure_aggregation=False)
    result = InProcessResult(params=engine.params, ledger=engine.ledger, optimizer=engine.optimizer, model=model)
    t0 = time.perf_counter()
    for rnd in tqdm(range(first, cfg.fed.rounds + 1), desc="in-process rounds", disable=not progress):
        if engine.over_budget(rnd):
            break
        t_round = time.perf_counter()
        protection = protection_for(policy, engine.instruction(rnd, secure_aggregation=False))
        shapes = [a.shape for a in model.arrays(engine.params)]
        updates, failures = [], 0
        for cid in engine.cohort(range(len(clients)), rnd):
            try:
                step = model.train(engine.params, engine.context, clients[cid], epochs=cfg.fed.local_epochs,
                                   lr=cfg.fed.client_lr, seed=cfg.seed, server_round=rnd)
            except ValueError:
                failures += 1
                continue
            updates.append(protect(model, step.update, shapes, protection,
                                   noise=local_noise_for(policy.noise_seed, rnd, cid)))
        t_clients = time.perf_counter() - t_round
        engine.release(sum_updates(updates), len(updates), rnd, population=len(clients))
        row: dict[str, Any] = {"round": rnd, "participants": len(updates), "failures": failures,
                               "client_seconds": t_clients, "server_seconds": time.perf_counter() - t_round - t_clients}
        if engine.ledger is not None:
            row["epsilon"] = engine.epsilon()
        result.rounds.append(row)
        if eval_every and rnd % eval_every == 0 and rnd < cfg.fed.rounds:
            effective = model.effective(engine.params, engine.context)
            result.evals.append({"round": rnd, "phase": "valid", **evaluate_clients(effective, clients, cfg, "valid")})
        if on_round:
            on_round(row)
    result.params, result.context = engine.params, engine.context
    result.seconds = time.perf_counter() - t0
    if resume is not None:
        result.rounds = [*resume.rounds, *result.rounds]
    last = result.rounds[-1]["round"] if result.rounds else 0
    if final_eval:
        result.evals.append({"round": last, "phase": "test",
                             **evaluate_clients(result.effective, clients, cfg, "test")})
    return result


def _texts(cfg: RunConfig, texts: Sequence[str] | None) -> Callable[[], Sequence[str]]:
    def provide() -> Sequence[str]:
        if texts is not None:
            return tuple(texts)
        from common.data.texts import item_texts

        return item_texts(cfg.data)

    return provide


def _engine(cfg: RunConfig, model: ItemModel, resume: InProcessResult | None) -> tuple[RoundEngine, int]:
    """A fresh engine, or one continuing ``resume`` (copied: the previous result is not changed)."""
    if resume is None:
        return RoundEngine(cfg, model), 1
    if (resume.ledger is None) != (not cfg.dp.enabled):
        raise ValueError("resume: DP on/off must not change within a run")
    optimizer = copy.deepcopy(resume.optimizer)
    params = model.adopt(copy.deepcopy(resume.params), optimizer)
    engine = RoundEngine(cfg, model, params=params, optimizer=optimizer,
                         ledger_state=resume.ledger.state_dict() if resume.ledger is not None else None)
    return engine, (resume.rounds[-1]["round"] if resume.rounds else 0) + 1
