"""Distributed DP in a run (``dp.mode = distributed``): the plan, each round's mechanism, what a
device is told and how it checks it, and the server's decoding. The mechanism itself (rotation,
rounding, discrete Gaussian noise, the field) is :mod:`common.privacy.distributed`; its accounting
:mod:`common.privacy.ddp_event` and :mod:`common.privacy.distributed_plan`.

**The plan** is made once, before round 1, for the population N the run starts with: the grid step
γ and a total integer noise variance T (grid units) such that the run's rounds, each charged as a
[KLS21] release of T, meet ``dp.target-epsilon`` with amplification at rate q (secret cohorts), and
the field 2^``dp.bits`` holds the noisy sum of the largest cohort a round may have (n_max, the
1 − 1e-9 quantile of Binomial(N, q); a larger cohort is abandoned).

**Each round** the server knows its cohort's size n (participation metadata: outside ε, see
docs/DISTRIBUTED_DP.md). It asks every device for a share σ² = ⌈T / m⌉ with m = ⌈n·(1 − tolerance)⌉
(``dp.dropout-tolerance``): the m or more devices a released round sums carry at least T together
(abandoned below m: :class:`~common.privacy.distributed.TooFewSurvivors`). Whether a given user's
device is in the cohort changes the number of shares, not the total noise (to within the rounding
of T/m up), which is why the amplified (add/remove, Poisson) bound applies to the released model.
Each released round is charged as what ran: m shares of σ².

Against the server (it knows the cohort) the same events count without amplification: the second
ε of every report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.privacy import ddgauss
from common.privacy.ddp_event import DistributedDpEvent
from common.privacy.discrete_gaussian_table import table_distance
from common.privacy.distributed import (
    DistributedDpParams,
    TooFewSurvivors,
    TooManySurvivors,
    decode,
    encode,
)
from common.privacy.distributed_plan import DistributedPlan, cohort_bound, plan_distributed
from common.privacy.guarantee import Sampling

#: Version of the instruction's JSON; a device refuses any other.
INSTRUCTION_VERSION = 1


@dataclass(frozen=True)
class RoundMechanism:
    """One round's distributed-DP mechanism, as the server asks for it and a device applies it."""

    params: DistributedDpParams
    run_seed: int  # public: with the round, the seed of the rotation signs
    server_round: int
    sample_rate: float = 1.0  # the server's accounting only (q of secret Poisson sampling); never sent

    @property
    def noise_multiplier(self) -> float:
        """γ·√(m·σ²)/C: the central noise multiplier the round's fewest survivors carry together."""
        p = self.params
        return p.gamma * math.sqrt(p.min_survivors * p.local_variance) / p.clip

    def to_json(self) -> str:
        return json.dumps({"v": INSTRUCTION_VERSION, "round": self.server_round, "seed": self.run_seed,
                           **asdict(self.params)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: Any) -> "RoundMechanism":
        """Parse what a device received (ValueError naming what is wrong)."""
        if not isinstance(text, str):
            raise ValueError(f"expected a JSON string, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("v") != INSTRUCTION_VERSION:
            raise ValueError(f"expected version {INSTRUCTION_VERSION} of the distributed-DP instruction")
        names = ("clip", "gamma", "local_variance", "dim", "modulus_bits", "min_survivors", "max_survivors", "beta")
        missing = [n for n in (*names, "round", "seed") if n not in data]
        if missing or set(data) - {*names, "round", "seed", "v"}:
            raise ValueError(f"distributed-DP instruction: missing {missing} or unknown keys "
                             f"{sorted(set(data) - {*names, 'round', 'seed', 'v'})}")
        for name in ("round", "seed"):
            if isinstance(data[name], bool) or not isinstance(data[name], int):
                raise ValueError(f"distributed-DP instruction: {name} must be an int")
        params = DistributedDpParams(**{n: data[n] for n in names})  # validates every field
        return cls(params=params, run_seed=data["seed"], server_round=data["round"])

    def encode(self, flat: np.ndarray, src=None, *, add_noise: bool = True) -> np.ndarray:
        """The device side: the flat clipped update as integers modulo 2^bits (uint64, length D)."""
        return encode(flat, self.params, run_seed=self.run_seed, server_round=self.server_round, src=src,
                      add_noise=add_noise).values

    def decode(self, modular_sum: np.ndarray, survivors: int) -> np.ndarray:
        """The server side: the noisy sum of the survivors' updates (flat float64); raises
        TooFewSurvivors / TooManySurvivors outside [m, n_max]."""
        return decode(modular_sum, survivors, self.params, run_seed=self.run_seed, server_round=self.server_round)

    def event(self, parameters: tuple[str, ...]) -> DistributedDpEvent:
        """The ledger event of this round released: m shares of σ², amplified at rate q."""
        p = self.params
        return DistributedDpEvent(clip=p.clip, gamma=p.gamma, local_variance=p.local_variance,
                                  survivors=p.min_survivors, max_survivors=p.max_survivors, dim=p.padded_dim,
                                  beta=p.beta, sample_rate=self.sample_rate, sampling=Sampling.POISSON,
                                  parameters=parameters, round=self.server_round,
                                  sampler_distance=table_distance(p.local_variance))


class DistributedRounds:
    """The run's distributed-DP state on the server: the plan (made once, checkpointed) and each
    round's :class:`RoundMechanism`."""

    def __init__(self, cfg: Any, dim: int, state: Mapping[str, Any] | None = None) -> None:
        self.cfg, self.dim = cfg, int(dim)
        self.plan: DistributedPlan | None = DistributedPlan(**state) if state else None

    @property
    def total_variance(self) -> int:
        """T: the noise variance (grid units) every released round carries, at least."""
        assert self.plan is not None
        return self.plan.min_survivors * self.plan.local_variance

    def ensure_plan(self, population: int) -> DistributedPlan:
        """The run's plan, made on first use for ``population`` clients (ValueError when the budget
        or the field cannot be met: the message says what to change)."""
        if self.plan is None:
            dp, fed = self.cfg.dp, self.cfg.fed
            q = fed.sample_rate
            reference = max(1, math.floor(q * population * (1.0 - dp.dropout_tolerance)))
            n_max = max(cohort_bound(population, q), reference)
            self.plan = plan_distributed(target_epsilon=dp.target_epsilon, delta=dp.delta, rounds=fed.rounds,
                                         sample_rate=q, modulus_bits=dp.bits, min_survivors=reference,
                                         max_cohort=n_max, clip=dp.clip, dim=self.dim)
        return self.plan

    def mechanism(self, cohort: int, server_round: int) -> RoundMechanism:
        """This round's mechanism for a cohort of ``cohort`` devices (TooManySurvivors above n_max)."""
        plan = self.plan
        assert plan is not None, "ensure_plan first"
        if cohort > plan.max_cohort:
            raise TooManySurvivors(f"a cohort of {cohort} exceeds the {plan.max_cohort} the field was sized for")
        shares = max(1, math.ceil(cohort * (1.0 - self.cfg.dp.dropout_tolerance)))
        variance = max(1, math.ceil(self.total_variance / shares))
        params = DistributedDpParams(clip=plan.clip, gamma=plan.gamma, local_variance=variance, dim=plan.dim,
                                     modulus_bits=plan.modulus_bits, min_survivors=shares,
                                     max_survivors=plan.max_cohort, beta=plan.beta)
        return RoundMechanism(params=params, run_seed=int(self.cfg.seed), server_round=int(server_round),
                              sample_rate=float(plan.sample_rate))

    def reference_event(self, server_round: int, parameters: tuple[str, ...]) -> DistributedDpEvent:
        """What a round costs at most, before its cohort is known (the budget check): the plan's
        reference share count (a round with more shares of ⌈T/m⌉ is not costlier: τ is negligible
        at the planned variances)."""
        assert self.plan is not None
        return self.plan.event(server_round=server_round, parameters=parameters)

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.plan is None else asdict(self.plan)


# ---- through Flower's SecAgg+ (which quantizes floats itself): one quantization level per field element
def field_offset(modulus: int) -> float:
    """(M−1)/2: a device sends field element k as the float k − (M−1)/2."""
    return (modulus - 1) / 2.0


def secagg_ranges(modulus: int) -> tuple[float, int]:
    """(clipping_range, quantization_range) of Flower's SecAgg+ for a field of M elements: ±(M−1)/2
    over M−1 levels, so its quantizer maps k − (M−1)/2 to exactly k (no rounding: k is an integer)
    and sums modulo M (``modulus_range``)."""
    return field_offset(modulus), modulus - 1


def expected_field_weight(survivors: int, modulus: int) -> int:
    """The unmasked weight factor when ``survivors`` devices of weight 1 summed: each adds M−1
    (Flower's quantized weight), modulo M."""
    return (survivors * (modulus - 1)) % modulus


def modular_sum_from_secagg(aggregate: np.ndarray, weight: int, survivors: int, modulus: int) -> np.ndarray:
    """The sum of the devices' field elements modulo M from what Flower's SecAgg+ workflow returns:
    it dequantizes the unmasked sum r as (r − n·(M−1)/2)·(M−1)/w; here r = that·w/(M−1) + n·(M−1)/2,
    exact after rounding (|r| < 2^53; the float error is far below 1/2)."""
    if weight <= 0:
        raise ValueError(f"weight factor {weight} is not positive")
    r = np.asarray(aggregate, dtype=np.float64) * (weight / (modulus - 1)) + survivors * field_offset(modulus)
    return np.mod(np.rint(r).astype(np.int64), modulus).astype(np.uint64)


def check_floor(mechanism: RoundMechanism, *, floor: float, dim: int) -> str | None:
    """Why a device must refuse this round's mechanism, or None: the noise its fewest survivors
    carry together is below the device's floor (z = γ√(m·σ²)/C), the dimension is not its update's,
    or the rounding bound would let a rounded update be worth more than twice the clip."""
    p = mechanism.params
    if p.dim != dim:
        return f"the mechanism is for {p.dim} values, this update has {dim}"
    z = mechanism.noise_multiplier
    if z < floor:
        return f"the round's noise amounts to z={z:.4g} over the fewest survivors, below this device's floor {floor:g}"
    if ddgauss.rounded_l2_bound(p.clip / p.gamma, p.padded_dim, p.beta) * p.gamma > 2 * p.clip:
        return "the grid is too coarse for the clip (rounding would double the sensitivity)"
    return None


__all__ = ["DistributedRounds", "RoundMechanism", "TooFewSurvivors", "TooManySurvivors", "check_floor",
           "expected_field_weight", "field_offset", "modular_sum_from_secagg", "secagg_ranges"]
