"""Every closed set of choices fedrec takes, as ``str`` enums: one definition that the config,
both command lines and the code use alike (a member compares equal to its string, so
``cfg.model.kind == "hybrid"`` and ``ModelKind("hybrid")`` both work, and a config file keeps
plain strings). Light on purpose: no numpy, no torch."""

from __future__ import annotations

from enum import StrEnum


class ModelKind(StrEnum):
    """The item-side model (common/models/): its own package each."""

    MF = "mf"  # item embeddings + biases
    HYBRID = "hybrid"  # free embedding + head(MiniLM(item text)) (+ LoRA)


class Loss(StrEnum):
    """The training loss of the recommender (convex in the user vector)."""

    SOFTMAX = "softmax"
    BPR = "bpr"
    MSE = "mse"


class DPMode(StrEnum):
    """Who adds the noise."""

    CENTRAL = "central"  # the server, once, to the sum
    LOCAL = "local"  # each device, to its own update
    DISTRIBUTED = "distributed"  # each device a share of discrete noise, inside SecAgg+ (the server adds none)


class ServerOptimizer(StrEnum):
    ADAM = "adam"  # FedAdam
    SGD = "sgd"  # FedAvg with a server learning rate


class Partition(StrEnum):
    """Who a client is."""

    USER = "user"  # one user per device
    SILO = "silo"  # K silos of many users


class Aggregate(StrEnum):
    """How the server combines a round's plaintext updates."""

    SUM = "sum"  # the sum (what DP and SecAgg+ need)
    MEDIAN = "median"  # coordinate-wise median x n (plaintext, no DP: robust to a minority)
    TRIMMED_MEAN = "trimmed-mean"  # coordinate-wise trimmed mean x n (plaintext, no DP)


class Split(StrEnum):
    RANDOM = "random"  # RecBole 80/10/10 per user
    LEAVE_LAST_OUT = "leave-last-out"
    COLD_ITEM = "cold-item"


class DataFormat(StrEnum):
    AUTO = "auto"
    ML_100K = "ml-100k"
    ATOMIC = "atomic"
    GROUPLENS_100K = "grouplens-100k"
    ML_1M = "ml-1m"
    ML_LATEST = "ml-latest"
    GENERIC = "generic"


class Accountant(StrEnum):
    """How releases are composed into ε."""

    #: Rényi DP over Opacus' orders: the standard, slightly loose bound.
    RDP = "rdp"
    #: Privacy-loss distributions (pessimistic discretisation): tighter, slower.
    PLD = "pld"


class Phase(StrEnum):
    """Which held-out set an evaluation uses."""

    VALID = "valid"
    TEST = "test"


def values(choices: type[StrEnum]) -> tuple[str, ...]:
    """The allowed strings, in definition order (for ``argparse`` ``choices=`` and messages)."""
    return tuple(member.value for member in choices)
