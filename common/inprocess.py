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
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from common.config import RunConfig
from common.data.partition import partition_users
from common.device import client_evaluate, protect
from common.evaluation import EvalSets
from common.models import ClientData, ItemModel, ItemParams, build_model
from common.privacy import PrivacyLedger
from common.privacy.device import DevicePolicy, protection_for
from common.privacy.discrete_gaussian import RandomWords
from common.privacy.distributed import modular_sum, pooled_noise
from common.privacy.dp_fedavg import local_noise_for
from common.rounds import RoundEngine, sum_updates
from common.streams import Stream, key


class Adversary(Protocol):
    """Malicious clients joining a run (common/poisoning.py): ``count`` of them, with the client
    ids after the honest ones, sampled like everyone else. They run their own code, so what they
    send is checked only as the server can check it: each update on the plaintext path
    (``secure_aggregation`` False), only the sum under SecAgg+."""

    count: int
    secure_aggregation: bool

    def updates(self, engine: RoundEngine, sampled: list[int], cohort: int, server_round: int) -> list[list[np.ndarray]]:
        """What its clients sampled this round (``sampled``: their indices, 0 to ``count`` − 1)
        send, knowing the global model (``engine``'s public parameters) and the size of the
        cohort; one update each, or fewer (a client that sends nothing)."""


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
                  resume: InProcessResult | None = None, secure_aggregation: bool = False,
                  adversary: Adversary | None = None,
                  on_release: Callable[[int, list[np.ndarray]], None] | None = None,
                  pooled_noise: bool = False) -> InProcessResult:
    """Train ``cfg``'s model federated, in this process, on ``sets`` (one client per user, or silos).

    ``texts``: the item texts for a model that reads them (default: those of ``cfg.data``).
    ``resume``: continue a previous result (its parameters, optimizer moments and ledger) from its
    last round up to ``cfg.fed.rounds``; the model may extend the parameters (the hybrid adds LoRA
    arrays when this run trains LoRA and the previous one did not).

    ``secure_aggregation``: do what a SecAgg+ round does to the numbers (devices clip with the
    rounding margin, values are clipped to the quantization range, the server checks only the
    sum) without the protocol; the default sums in plaintext. ``adversary``: malicious clients
    added to the population (the poisoning lab, the canary audit); its ``secure_aggregation``
    must match. ``on_release``: called after every round with its number and the released arrays.

    Under distributed DP the devices' field elements are summed modulo the field (what SecAgg+
    reveals) and decoded by the engine. ``pooled_noise`` (benchmarks): the devices leave out their
    noise shares and the cohort's noise is drawn as one sum (:func:`~common.privacy.distributed.pooled_noise`,
    the same distribution within τ); False (default): each device draws its own share, as on a device.
    """
    if adversary is not None and adversary.secure_aggregation != secure_aggregation:
        raise ValueError("the adversary's view of secure aggregation must match the run's")
    model = build_model(cfg.model, n_items=sets.n_items, seed=cfg.seed, texts=_texts(cfg, texts))
    parts = partition_users(len(sets.train), cfg.fed.partition, num_silos=cfg.fed.num_silos, seed=cfg.seed)
    clients = [ClientData.from_sets(i, users, sets) for i, users in enumerate(parts)]
    engine, first = _engine(cfg, model, resume)
    # The operator owns the simulated devices; no SecAgg+ protocol here (at most its arithmetic).
    secure = secure_aggregation
    policy = DevicePolicy.for_run(cfg, secure_aggregation=secure)
    population = len(clients) + (adversary.count if adversary is not None else 0)
    result = InProcessResult(params=engine.params, ledger=engine.ledger, optimizer=engine.optimizer, model=model)
    t0 = time.perf_counter()
    for rnd in tqdm(range(first, cfg.fed.rounds + 1), desc="in-process rounds", disable=not progress):
        if engine.over_budget(rnd):
            break
        t_round = time.perf_counter()
        cohort = engine.cohort(range(population), rnd)  # first: it sizes a distributed-DP round's mechanism
        protection = protection_for(policy, engine.instruction(rnd, secure_aggregation=secure))
        shapes = [a.shape for a in model.arrays(engine.params)]
        updates, failures = [], 0
        sampled = [cid - len(clients) for cid in cohort if cid >= len(clients)]
        for cid in cohort[:len(cohort) - len(sampled)]:
            try:
                step = model.train(engine.params, engine.context, clients[cid], epochs=cfg.fed.local_epochs,
                                   lr=cfg.fed.client_lr, seed=cfg.seed, server_round=rnd)
            except ValueError:
                failures += 1
                continue
            updates.append(protect(model, step.update, shapes, protection,
                                   noise=local_noise_for(policy.noise_seed, rnd, cid), pooled_noise=pooled_noise))
        t_clients = time.perf_counter() - t_round
        if engine.distributed:
            total, n, refused_forged, refused = _distributed_total(engine, updates, adversary, sampled, rnd,
                                                                   pooled_noise, policy.noise_seed)
        else:
            total, n, refused_forged, refused = _round_total(engine, updates, adversary, sampled, rnd, secure)
        failures += refused_forged
        engine.release(total, n, rnd, population=population)
        if on_release:
            on_release(rnd, model.arrays(engine.params))
        row: dict[str, Any] = {"round": rnd, "participants": n, "failures": failures,
                               "client_seconds": t_clients, "server_seconds": time.perf_counter() - t_round - t_clients}
        if engine.ledger is not None:
            row["epsilon"] = engine.epsilon()
        if refused:
            row["refused"] = refused
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


def _round_total(engine: RoundEngine, updates: list[list[np.ndarray]], adversary: Adversary | None, sampled: list[int],
                 rnd: int, secure: bool) -> tuple[list[np.ndarray] | None, int, int, str | None]:
    """(the round's total, how many updates are in it, forged updates refused, why the sum was
    refused): what the server makes of the honest updates and, with an adversary, the forged
    ones -- each checked on the plaintext path, only their sum under SecAgg+."""
    forged = adversary.updates(engine, sampled, len(updates) + len(sampled), rnd) if adversary and sampled else []
    if secure:
        bound = engine.value_bound(secure_aggregation=True)  # Flower's quantizer clips honest values to it
        updates = [[np.clip(a, -bound, bound) for a in u] for u in updates]
        if not updates and not forged:
            return None, 0, 0, None
        total, problem = engine.secure_total(sum_updates(updates + forged), len(updates) + len(forged))
        return total, (0 if total is None else len(updates) + len(forged)), 0, problem
    accepted = [u for u in forged if engine.check(u, secure_aggregation=False) is None]
    everything = updates + accepted
    return engine.total(everything), len(everything), len(forged) - len(accepted), None


def _distributed_total(engine: RoundEngine, updates: list[list[np.ndarray]], adversary: Adversary | None,
                       sampled: list[int], rnd: int, pooled: bool, seed: int | None
                       ) -> tuple[list[np.ndarray] | None, int, int, str | None]:
    """Distributed DP: what SecAgg+ would reveal (the field elements summed modulo the field, forged
    ones included: nothing else can be checked), decoded by the engine."""
    forged = adversary.updates(engine, sampled, len(updates) + len(sampled), rnd) if adversary and sampled else []
    vectors = [u[0] for u in updates + forged]
    if not vectors:
        return None, 0, 0, None
    params = engine.mechanism.params
    if pooled:
        words = None if seed is None else RandomWords(key(Stream.POOLED_NOISE, seed, rnd))
        vectors.append(pooled_noise(params, len(vectors), words))
    total, problem = engine.distributed_total(modular_sum(vectors, params), len(updates) + len(forged))
    return total, (0 if total is None else len(updates) + len(forged)), 0, problem


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
