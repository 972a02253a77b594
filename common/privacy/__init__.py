"""Privacy accounting for fedrec: a ledger of noisy releases and the ε they cost.

Pure and Flower-free. :class:`PrivacyLedger` records :class:`MechanismEvent` releases for one
:class:`Unit` of privacy under one :class:`Relation` (each event says whether its
:class:`Sampling` amplifies) and composes them with Google's ``dp_accounting`` (:class:`Accountant`
RDP or PLD); :func:`plan_noise_multiplier` finds the σ a budget allows. Distributed DP's rounds
are :class:`DistributedDpEvent` (RDP only); :mod:`common.privacy.distributed_plan` plans them.
"""

from common.privacy.analysis import PLD_VALUE_DISCRETIZATION_INTERVAL, RDP_ORDERS
from common.privacy.ddp_event import DistributedDpEvent
from common.privacy.ledger import (
    STATE_VERSION,
    Accountant,
    MechanismEvent,
    PrivacyLedger,
    Relation,
    Sampling,
    Unit,
)
from common.privacy.plan import (
    SIGMA_RANGE,
    epsilon_for,
    format_plan,
    plan_local_noise_multiplier,
    plan_noise_multiplier,
    sample_rate_from,
)

__all__ = [
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "RDP_ORDERS",
    "SIGMA_RANGE",
    "STATE_VERSION",
    "Accountant",
    "DistributedDpEvent",
    "MechanismEvent",
    "PrivacyLedger",
    "Relation",
    "Sampling",
    "Unit",
    "epsilon_for",
    "format_plan",
    "plan_local_noise_multiplier",
    "plan_noise_multiplier",
    "sample_rate_from",
]
