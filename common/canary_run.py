"""The canary audit on fedrec's own rounds (issue #14): canary clients join a run through the
in-process runner (the same :class:`~common.rounds.RoundEngine`, clipping and device noise as
every device), and :mod:`common.canary_audit` turns what the auditor observes into an empirical ε
to set beside the accounted one.

* ``k`` canary clients are *inserted*: each answers every round it is sampled in with C times its
  random direction, protected like any device's update (clipped by the model's groups, the
  device's own noise under local DP). ``k`` more canary slots are *held out*: they are in the
  population and draw their coins, but never send anything.
* What the auditor observes: with secret cohorts, the released model (the final delta); a
  ``public-cohorts`` build (cohorts anyone can replay) also tells it the rounds each canary was
  sampled in, and it sums what those rounds added (the public server optimizer inverted). Under
  local DP the guarantee is about each update, so the auditor is the server: it sees each
  canary's own updates (a held-out direction against the same updates is the null).
* The verdict: a build is **flagged** when the lower confidence bound of the empirical ε lies
  above the ε its ledger accounts (what the build claims).

Mutants (deliberately broken builds, for the mutation check): ``noise/10`` adds a tenth of the
noise its ledger records; ``public-cohorts`` draws cohorts from a seed in the run's configuration
while its ledger still claims amplification by secret sampling.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import patch

import numpy as np

from common.canary_audit import CanaryEstimate, canary_direction, estimate_epsilon
from common.config import RunConfig
from common.ddp_round import DistributedRounds
from common.device import protect
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.privacy import Accountant
from common.privacy.device import DevicePolicy, protection_for
from common.privacy.dp_fedavg import local_noise_for
from common.rounds import RoundEngine

#: The deliberately broken builds the audit must flag.
MUTANTS = ("noise/10", "public-cohorts")


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def _split(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start:start + size].reshape(shape).astype(np.float32))
        start += size
    return out


def _round_sums(cfg: RunConfig, states: dict[int, np.ndarray], first: np.ndarray) -> dict[int, np.ndarray]:
    """What each round added, as the auditor of a public run recovers it from the released models:
    with plain FedAvg (``sgd``) the change itself; with FedAdam the change undone of the public
    optimizer (weight decay removed, momentum and bias correction inverted; the second moment,
    which varies slowly, is left as a per-coordinate scale), so one round's sum is not smeared over
    the next ten by the momentum."""
    rounds = sorted(states)
    previous = {rnd: states.get(rnd - 1, first) for rnd in rounds}
    fed, wd = cfg.fed, cfg.model.item_reg
    if fed.server_opt == "sgd":
        return {rnd: states[rnd] - previous[rnd] for rnd in rounds}
    beta1 = 0.9  # common.rounds.ServerOptimizer's default
    # −m_t/√v̂ (m: the momentum of the pseudo-gradient, i.e. of minus the mean update), so ≈ the update
    scaled = {rnd: (states[rnd] - previous[rnd] + fed.server_lr * wd * previous[rnd]) / fed.server_lr
              * (1 - beta1 ** rnd) for rnd in rounds}
    return {rnd: (scaled[rnd] - beta1 * scaled.get(rnd - 1, 0.0)) / (1 - beta1) for rnd in rounds}


def _cosine(direction: np.ndarray, change: np.ndarray) -> float:
    norm = float(np.linalg.norm(change))
    return float(direction @ change) / norm if norm else 0.0


@dataclass
class CanaryClients:
    """``inserted`` canary clients and as many held-out slots (the adversary protocol of
    :func:`common.inprocess.run_inprocess`)."""

    inserted: int
    seed: int
    secure_aggregation: bool = False
    pooled_noise: bool = False  # distributed DP: leave the noise share to the runner's pooled draw
    rounds: dict[int, list[int]] = field(default_factory=dict)  # canary index → rounds it was sampled in
    sent: dict[int, np.ndarray] = field(default_factory=dict)  # canary index → the sum of what it sent

    @property
    def count(self) -> int:
        return 2 * self.inserted

    def updates(self, engine: RoundEngine, sampled: list[int], cohort: int, server_round: int) -> list[list[np.ndarray]]:
        shapes = [np.shape(a) for a in engine.model.arrays(engine.params)]
        dim = int(sum(np.prod(s) for s in shapes))
        protection = protection_for(DevicePolicy.for_run(engine.cfg, secure_aggregation=self.secure_aggregation),
                                    engine.instruction(server_round, secure_aggregation=self.secure_aggregation))
        out = []
        for index in sampled:
            self.rounds.setdefault(index, []).append(server_round)
            if index >= self.inserted and not engine.distributed:  # held out: sampled, never sends
                continue
            # Distributed DP: a held-out slot sends the zero vector with its noise share (the zero-out
            # neighbour the accounting is for; a silent slot would be a dropout the round is not sized for).
            scale = 0.0 if index >= self.inserted else engine.cfg.dp.clip
            raw = _split(scale * canary_direction(self.seed, index, dim), shapes)
            update = protect(engine.model, raw, shapes, protection,
                             noise=local_noise_for(engine.cfg.dp.seed, server_round, 10**9 + index),
                             pooled_noise=self.pooled_noise)
            if index < self.inserted:
                self.sent[index] = self.sent.get(index, 0.0) + _flat(update)
            out.append(update)
        return out


@dataclass(frozen=True)
class CanaryAudit:
    """One audited run: the empirical ε (with its bootstrap interval) beside the accounted ε."""

    mode: str
    mutant: str | None
    rounds: int
    canaries: int
    accounted_epsilon: float
    estimate: CanaryEstimate
    observation: str

    @property
    def flagged(self) -> bool:
        return self.estimate.lower_bound > self.accounted_epsilon

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {"mode": self.mode, "mutant": self.mutant, "rounds": self.rounds, "canaries": self.canaries,
                "accounted_epsilon": self.accounted_epsilon, "empirical_epsilon": e.epsilon,
                "empirical_low": e.low, "empirical_high": e.high, "empirical_lower_bound": e.lower_bound,
                "confidence": e.confidence, "delta": e.delta, "flagged": self.flagged, "observation": self.observation}


@contextmanager
def _tenth_of_the_planned_noise(active: bool):
    """The distributed ``noise/10`` mutant: every round's devices add a hundredth of the planned
    variance (a tenth of the std) while the plan, and so the claim, stays as it was; its budget check
    is off, as the other mutant's (its ledger records what ran)."""
    if not active:
        yield
        return
    planned = DistributedRounds.total_variance

    def broken(self) -> int:
        return max(1, planned.fget(self) // 100)

    with (patch.object(DistributedRounds, "total_variance", property(broken)),
          patch.object(RoundEngine, "over_budget", lambda self, server_round: False)):
        yield


def run_canary_audit(cfg: RunConfig, sets: EvalSets, *, canaries: int = 50, mutant: str | None = None,
                     seed: int = 0, progress: bool = False, bootstrap: int = 1000) -> CanaryAudit:
    """Train ``cfg`` with ``canaries`` inserted canary clients (and as many held out), then
    estimate ε from what the auditor observes and compare it with the ε the build accounts."""
    if not cfg.dp.enabled:
        raise ValueError("the canary audit needs DP on (there is no accounted ε to compare with)")
    if mutant is not None and mutant not in MUTANTS:
        raise ValueError(f"unknown mutant {mutant!r}; known: {', '.join(MUTANTS)}")
    claimed = cfg  # what the build's ledger records
    run_cfg = cfg
    if mutant == "noise/10" and cfg.dp.mode != "distributed":
        run_cfg = cfg.replace(**{"dp.noise-multiplier": cfg.dp.noise_multiplier / 10, "dp.target-epsilon": 0.0})
    elif mutant == "public-cohorts":
        run_cfg = cfg.replace(**{"fed.sampling-seed": seed})
    distributed = cfg.dp.mode == "distributed"
    clients = CanaryClients(inserted=canaries, seed=seed, pooled_noise=distributed)
    public = mutant == "public-cohorts"
    states: dict[int, np.ndarray] = {}  # round → released arrays (all rounds when cohorts are public)

    def keep(rnd: int, arrays: list[np.ndarray]) -> None:
        if not public:
            states.clear()
        states[rnd] = _flat(arrays)

    with _tenth_of_the_planned_noise(distributed and mutant == "noise/10"):
        result = run_inprocess(run_cfg, sets, adversary=clients, on_release=keep, final_eval=False, progress=progress,
                               pooled_noise=distributed)
    first = _flat(result.model.arrays(result.model.init(run_cfg.seed)))
    rounds = len(result.rounds)
    engine = RoundEngine(claimed, result.model)
    if distributed:  # what the build claims: its plan's rounds (the population includes the canary slots)
        engine.ddp.ensure_plan(len(sets.train) + clients.count)
    for rnd in range(1, rounds + 1):
        engine.ledger.record(engine.event(rnd))
    accounted = engine.ledger.epsilon(Accountant.RDP)
    inserted, held_out = range(canaries), range(canaries, 2 * canaries)
    if cfg.dp.mode == "local":  # the guarantee is about each update: the server sees them
        observation = "each canary's own updates as the server receives them (local DP)"
        sent = sorted(clients.sent)
        dim = first.size
        ins = np.array([_cosine(canary_direction(seed, i, dim), clients.sent[i]) for i in sent])
        out = np.array([_cosine(canary_direction(seed, canaries + i, dim), clients.sent[i]) for i in sent])
    elif public:  # the auditor knows each canary's rounds: it sums their released changes only
        observation = "the released change of the rounds each canary was sampled in (cohorts replayable)"
        changes = _round_sums(cfg, states, first)
        carry = 1

        def cosines(indices: range) -> np.ndarray:
            values = []
            for i in indices:
                if clients.rounds.get(i):
                    window = sorted({r + k for r in clients.rounds[i] for k in range(carry)} & set(changes))
                    total = np.sum([changes[r] for r in window], axis=0)
                    values.append(_cosine(canary_direction(seed, i, total.size), total))
            return np.array(values)

        ins, out = cosines(inserted), cosines(held_out)
    else:
        observation = "the final released model (cohorts secret)"
        delta = states[max(states)] - first
        ins = np.array([_cosine(canary_direction(seed, i, delta.size), delta) for i in inserted])
        out = np.array([_cosine(canary_direction(seed, i, delta.size), delta) for i in held_out])
    estimate = estimate_epsilon(ins, out, delta=cfg.dp.delta, bootstrap=bootstrap, seed=seed)
    return CanaryAudit(mode=cfg.dp.mode.value, mutant=mutant, rounds=rounds, canaries=canaries,
                       accounted_epsilon=float(accounted), estimate=estimate, observation=observation)
