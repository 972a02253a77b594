"""Run configuration: frozen, validated dataclasses built once from a flat ``run_config``.

Flat keys are ``section.field-name`` in kebab case (Flower's ``[tool.flwr.app.config]``
convention), e.g. ``fed.sample-rate``. ``pyproject.toml`` carries the same defaults
(``tests/test_config.py`` checks that they agree).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.choices import Accountant, Aggregate, DataFormat, DPMode, Loss, ModelKind, Partition, ServerOptimizer, Split


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_choices(section: Any, prefix: str) -> None:
    """Every enum-typed field holds one of its enum's values (a section built directly, not
    through :meth:`RunConfig.from_flat`, may hold a plain string)."""
    for f in dataclasses.fields(section):
        if isinstance(f.default, StrEnum):
            allowed = tuple(m.value for m in type(f.default))
            value = getattr(section, f.name)
            _check(value in allowed, f"{prefix}.{f.name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                     f"got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    source: str = "ml-100k"  # "ml-100k" (embedded) or a path to your files
    format: DataFormat = DataFormat.AUTO
    item_file: str = ""
    split: Split = Split.RANDOM
    cold_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choices(self, "data")
        _check(0 < self.cold_fraction < 1, f"data.cold-fraction must be in (0, 1), got {self.cold_fraction}")


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    loss: Loss = Loss.SOFTMAX
    # λ of |u|² in a user's summed loss when reconstructing u (federated, eval). 10: what the
    # validation split picks under the default DP (ε = 8) on ML-100K; without DP it picks 40
    # (benchmarks/privacy_utility.py --only-tuning).
    user_reg: float = 10.0
    item_reg: float = 0.0005  # λ of |V|² per user (central) / server-side weight decay (federated)
    init_scale: float = 0.1
    # "mf": item embeddings + biases. "hybrid": item vector = free embedding + head(MiniLM(item text)),
    # the head (and LoRA adapters when `lora`) trained federated like the MF arrays
    # (common/hybrid_federated.py).
    kind: ModelKind = ModelKind.MF
    lora: bool = False  # hybrid: LoRA (r=8, q/v) on MiniLM as well as the head; False: frozen base + head
    # hybrid + LoRA: adapters on the top this-many of MiniLM's 6 layers; the frozen layers below
    # run once per process for the whole (public) catalogue and are cached (6: every layer, no cache)
    lora_layers: int = 1
    # hybrid + LoRA: "ffn-out" (the top layer's feed-forward output projection: every input below it
    # is cached, a step costs no transformer pass) or "qv" (attention query/value, the LoRA paper's)
    lora_target: str = "ffn-out"
    # hybrid + LoRA: the server's step on the LoRA arrays is the head's times this
    lora_step_scale: float = 0.01  # what validation picks at ε = 8 (benchmarks/language_model.py --only-lora-study)
    text_max_length: int = 32  # hybrid: item texts truncated to this many tokens (ML-100K: ≤ 31)
    text_lr: float = 10.0  # hybrid: SGD step of the head/LoRA (one step: sets its weight in the clipped update)
    text_negatives: int = 32  # hybrid: sampled negatives per user in the head/LoRA step
    text_positives: int = 32  # hybrid: at most this many of a user's positives (sampled) per head/LoRA step
    # hybrid: the server's step on the text side's arrays (head, LoRA) is fed.server-lr times this.
    # The head is shared by every item: under DP a full step lets it carry what the noisy free part
    # cannot; without DP it crowds the free part (validation picks 1 at ε = 8, 0.1 without DP).
    text_step_scale: float = 1.0
    # hybrid: DropoutNet-style training (Volkovs et al., NeurIPS 2017). Each round a share p of the
    # items, drawn from a public stream keyed by (seed, round) and so the same on every device, is
    # trained with its free part dropped: vector = text part alone, bias = the mean received bias,
    # and no update to its free embedding or bias. 0: off (exactly the plain hybrid step).
    residual_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_choices(self, "model")
        _check(self.dim >= 1, f"model.dim must be ≥ 1, got {self.dim}")
        _check(self.user_reg > 0, f"model.user-reg must be > 0 (reconstruction must be strictly convex), got {self.user_reg}")
        _check(self.item_reg >= 0, f"model.item-reg must be ≥ 0, got {self.item_reg}")
        _check(self.init_scale >= 0, f"model.init-scale must be ≥ 0, got {self.init_scale}")
        _check(1 <= self.lora_layers <= 6, f"model.lora-layers must be in [1, 6] (MiniLM has 6 layers), got {self.lora_layers}")
        _check(self.lora_target in ("qv", "ffn-out"), f"model.lora-target must be 'qv' or 'ffn-out', got {self.lora_target!r}")
        _check(self.lora_target == "qv" or self.lora_layers == 1,
               f"model.lora-target = ffn-out adapts the top layer only: model.lora-layers must be 1, got {self.lora_layers}")
        _check(0 < self.lora_step_scale <= 10, f"model.lora-step-scale must be in (0, 10], got {self.lora_step_scale}")
        _check(1 <= self.text_max_length <= 512, f"model.text-max-length must be in [1, 512], got {self.text_max_length}")
        _check(self.text_lr > 0, f"model.text-lr must be > 0, got {self.text_lr}")
        _check(self.text_negatives >= 1, f"model.text-negatives must be ≥ 1, got {self.text_negatives}")
        _check(self.text_positives >= 1, f"model.text-positives must be ≥ 1, got {self.text_positives}")
        _check(0 < self.text_step_scale <= 10, f"model.text-step-scale must be in (0, 10], got {self.text_step_scale}")
        _check(0 <= self.residual_dropout < 1, f"model.residual-dropout must be in [0, 1), got {self.residual_dropout}")


@dataclass(frozen=True)
class CentralConfig:
    epochs: int = 60
    lr: float = 0.01
    batch_users: int = 128
    patience: int = 5
    eval_every: int = 2

    def __post_init__(self) -> None:
        _check(self.epochs >= 1 and self.batch_users >= 1 and self.patience >= 1 and self.eval_every >= 1,
               "central.epochs, batch-users, patience and eval-every must be ≥ 1")
        _check(self.lr > 0, f"central.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class FedConfig:
    rounds: int = 150
    sample_rate: float = 0.1  # Poisson sampling: each client joins a round with probability q
    local_epochs: int = 1
    client_lr: float = 1.0
    server_opt: ServerOptimizer = ServerOptimizer.ADAM
    server_lr: float = 0.02
    eval_every: int = 20
    eval_clients: int = 200  # validation during training on this many clients (0 = all)
    # The final test on this many clients (0 = all): a uniform sample without replacement, secret
    # (OS CSPRNG) unless fed.sampling-seed ≥ 0; its metrics then carry a 95% confidence interval.
    test_clients: int = 0
    partition: Partition = Partition.USER
    num_silos: int = 10
    timeout: float = 120.0  # seconds a round waits for its clients (covers Ray start-up)
    # -1: each round's cohort is drawn from the OS CSPRNG (secret: what amplification by sampling
    # needs). ≥ 0: reproducible cohorts for tests/experiments; the privacy report then says the
    # guarantee's sampling assumption did not hold (anyone with config.json can replay them).
    sampling_seed: int = -1
    # Without DP and SecAgg+ no clip applies; the server still refuses a plaintext update whose L2
    # norm exceeds this (honest ML-100K updates: median 8, max 16 at the initial model).
    update_norm_bound: float = 100.0
    # > 0: the server clamps every coordinate of a round's summed update to ±sum-clamp before the
    # noise. Clamping is 1-Lipschitz, so DP's sensitivity is unchanged; it bounds what any coalition
    # of clients (under SecAgg+ the server sees only the sum) can add to one coordinate per round.
    sum_clamp: float = 0.0
    # Plaintext path without DP only: the median or trimmed mean replaces the sum (docs/SECURITY.md).
    aggregate: Aggregate = Aggregate.SUM
    trim_fraction: float = 0.1  # trimmed-mean: share of values dropped at each end of every coordinate

    def __post_init__(self) -> None:
        _check_choices(self, "fed")
        _check(self.rounds >= 1, f"fed.rounds must be ≥ 1, got {self.rounds}")
        _check(0 < self.sample_rate <= 1, f"fed.sample-rate must be in (0, 1], got {self.sample_rate}")
        _check(self.local_epochs >= 1, f"fed.local-epochs must be ≥ 1, got {self.local_epochs}")
        _check(self.client_lr > 0 and self.server_lr > 0, "fed.client-lr and fed.server-lr must be > 0")
        _check(self.eval_every >= 1, f"fed.eval-every must be ≥ 1, got {self.eval_every}")
        _check(self.eval_clients >= 0, f"fed.eval-clients must be ≥ 0, got {self.eval_clients}")
        _check(self.test_clients >= 0, f"fed.test-clients must be ≥ 0 (0 = all clients), got {self.test_clients}")
        _check(self.num_silos >= 1, f"fed.num-silos must be ≥ 1, got {self.num_silos}")
        _check(self.timeout > 0, f"fed.timeout must be > 0, got {self.timeout}")
        _check(self.sampling_seed >= -1, f"fed.sampling-seed must be -1 (secret cohorts) or ≥ 0, got {self.sampling_seed}")
        _check(self.update_norm_bound > 0, f"fed.update-norm-bound must be > 0, got {self.update_norm_bound}")
        _check(self.sum_clamp >= 0, f"fed.sum-clamp must be ≥ 0 (0 = off), got {self.sum_clamp}")
        _check(0 <= self.trim_fraction < 0.5, f"fed.trim-fraction must be in [0, 0.5), got {self.trim_fraction}")

    @property
    def cohort_seed(self) -> int | None:
        """The sampling seed, or None for secret cohorts from the OS CSPRNG (the default)."""
        return None if self.sampling_seed < 0 else self.sampling_seed


@dataclass(frozen=True)
class DPConfig:
    """User-level DP-FedAvg: client-side clipping, server-side Gaussian noise, Poisson sampling."""

    enabled: bool = True
    # central: the server adds N(0, (σC)²) once to the sum (trusts the server with the noise;
    #   under SecAgg+ it still never sees one update). local: each device adds N(0, (σC)²) to its
    #   own clipped update before it leaves (trusts nobody; far more noise for the same ε).
    mode: DPMode = DPMode.CENTRAL
    noise_multiplier: float = 1.03  # σ: noise std is σ·clip (central: on the sum, ε ≈ 7.95 at the defaults)
    clip: float = 1.0  # C: L2 bound of one client's whole update
    bias_share: float = 0.05  # per-group clipping: biases get this share of C² (≤ 0: one flat clip)
    delta: float = 1e-4
    target_epsilon: float = 8.0  # > 0: stop before a round whose release would exceed it (0: no cap)
    accountant: Accountant = Accountant.RDP  # which accountant enforces target-epsilon (both are reported)
    noise_seed: int = -1  # -1: secure noise from os.urandom; ≥ 0: seeded (tests/debugging only)
    # User-level DP-SGD (Opacus) inside each silo (fed.partition = silo): one user of the silo is the
    # unit (per-user gradients clipped to silo-clip), on top of the cross-silo noise.
    silo_dp_sgd: bool = False
    silo_noise_multiplier: float = 1.0
    silo_clip: float = 1.0
    silo_sample_rate: float = 0.05  # Poisson rate over the silo's users per DP-SGD step
    silo_delta: float = 1e-5
    # Distributed DP (mode = distributed; docs/DISTRIBUTED_DP.md): the SecAgg+ field is 2^bits; the
    # devices' discrete noise is planned so that the run's rounds meet target-epsilon, and each round's
    # share is sized for the cohort less this share of dropouts (a round with more failures is abandoned).
    bits: int = 20
    dropout_tolerance: float = 0.0

    def __post_init__(self) -> None:
        _check_choices(self, "dp")
        _check(12 <= self.bits <= 30, f"dp.bits must be in [12, 30], got {self.bits}")
        _check(0 <= self.dropout_tolerance < 1, f"dp.dropout-tolerance must be in [0, 1), got {self.dropout_tolerance}")
        if self.enabled and self.mode == DPMode.DISTRIBUTED:
            _check(self.target_epsilon > 0, "dp.mode=distributed plans the devices' noise for dp.target-epsilon: "
                   "it must be > 0")
            _check(not self.silo_dp_sgd, "dp.mode=distributed does not combine with dp.silo-dp-sgd")
        _check(self.noise_multiplier > 0, f"dp.noise-multiplier must be > 0, got {self.noise_multiplier}")
        _check(self.clip > 0, f"dp.clip must be > 0, got {self.clip}")
        _check(self.bias_share < 1, f"dp.bias-share must be < 1 (≤ 0 for flat clipping), got {self.bias_share}")
        _check(0 < self.delta < 1, f"dp.delta must be in (0, 1), got {self.delta}")
        _check(self.target_epsilon >= 0, f"dp.target-epsilon must be ≥ 0 (0 = no cap), got {self.target_epsilon}")
        _check(self.silo_noise_multiplier > 0 and self.silo_clip > 0, "dp.silo-noise-multiplier and dp.silo-clip must be > 0")
        _check(0 < self.silo_sample_rate <= 1, f"dp.silo-sample-rate must be in (0, 1], got {self.silo_sample_rate}")
        _check(0 < self.silo_delta < 1, f"dp.silo-delta must be in (0, 1), got {self.silo_delta}")

    @property
    def seed(self) -> int | None:
        """The noise seed, or None for secure noise (``noise_seed`` < 0, the default)."""
        return None if self.noise_seed < 0 else self.noise_seed


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ (Bell et al. 2020) through Flower's SecAggPlusWorkflow / secaggplus_mod.

    Each client's update is clipped to ``dp.clip`` (also without DP noise) so every coordinate is
    within ±clip: the protocol's quantization range is set to exactly that, so nothing is
    silently clipped by the protocol.
    """

    enabled: bool = True
    num_shares: int = 7  # neighbours each client shares its key with (SecAgg+: O(log n))
    reconstruction_threshold: int = 4  # shares needed to unmask a dropped client
    # Values are quantized to 2^bits levels over [-clip, clip]. The modulus of the masked sum is sized
    # each round for the whole population (nothing wraps); a bit width whose rounding error could move
    # one update's norm by more than 1% of the clip is refused at the start (common/secure_sum.py).
    quantization_bits: int = 22
    # The quantization range as a share ρ of the clip: honest values are clipped to ±ρ·C (Flower's
    # quantizer does it), and the server refuses a sum with a coordinate beyond n·ρ·C. Under SecAgg+ a
    # malicious client can put the whole cohort's slack into one coordinate: ρ < 1 shrinks it
    # (docs/SECURITY.md, "Poisoning"; benchmarks/poisoning.py measures it).
    value_range: float = 1.0

    def __post_init__(self) -> None:
        _check(self.num_shares >= 3, f"secagg.num-shares must be ≥ 3, got {self.num_shares}")
        # Above half the shares: a server that lies about dropouts cannot collect both kinds of shares
        # (mask seed and mask key) of one client and unmask it (Bell et al. 2020; docs/SECURITY.md).
        _check(self.num_shares / 2 < self.reconstruction_threshold <= self.num_shares,
               f"secagg.reconstruction-threshold must be above half of num-shares ({self.num_shares}) and at most "
               f"num-shares, got {self.reconstruction_threshold}")
        _check(0 < self.value_range <= 1, f"secagg.value-range must be in (0, 1], got {self.value_range}")
        _check(8 <= self.quantization_bits <= 30, f"secagg.quantization-bits must be in [8, 30], got {self.quantization_bits}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    seed: int = 0
    # `flwr run` only: the run directory (absolute, or relative to $FEDREC_RUNS / ./runs); "" = a
    # new runs/<timestamp>/. An existing one with a checkpoint is resumed (same config required).
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.fed.aggregate != Aggregate.SUM and (self.dp.enabled or self.secagg.enabled):
            raise ValueError(f"fed.aggregate = {self.fed.aggregate.value} needs dp.enabled = false and "
                              "secagg.enabled = false: DP accounts for (and SecAgg+ reveals) only the sum")
        if self.dp.enabled and self.dp.mode == DPMode.DISTRIBUTED and self.fed.partition != Partition.USER:
            raise ValueError("dp.mode = distributed needs fed.partition = user (one user per device: the "
                             "accounting's unit)")

    # ---- flat <-> nested
    def to_flat(self) -> dict[str, Any]:
        """Flat ``section.key`` -> plain value (str, not enum: what config.json and Flower keep)."""
        return {key: _plain(value) for key, value in self._typed_flat().items()}

    def _typed_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    out[f"{f.name}.{sub.name.replace('_', '-')}"] = getattr(value, sub.name)
            else:
                out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "RunConfig":
        """Build from flat keys; unknown keys and wrong types are refused with the key named.
        Keys renamed since (:data:`RENAMED`) are read under their new names."""
        flat = {RENAMED.get(k, k): v for k, v in flat.items()}
        defaults = cls()._typed_flat()
        unknown = sorted(set(flat) - set(defaults))
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
        merged = {**defaults, **flat}
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in merged.items():
            default = defaults[key]
            value = _coerce(key, value, default)
            if "." in key:
                section, name = key.split(".", 1)
                sections.setdefault(section, {})[name.replace("-", "_")] = value
            else:
                top[key.replace("-", "_")] = value
        built = {name: _SECTIONS[name](**values) for name, values in sections.items()}
        return cls(**built, **top)

    def replace(self, **flat: Any) -> "RunConfig":
        """A copy with some flat keys changed (``cfg.replace(**{"fed.rounds": 5})``)."""
        return RunConfig.from_flat({**self.to_flat(), **flat})


# Old key -> new key. The record-level silo DP-SGD counted one rating as the unit, which its
# inputs (user vectors fitted on all of a user's ratings) did not support; it is user-level now.
RENAMED = {"dp.record-level": "dp.silo-dp-sgd", "dp.record-noise-multiplier": "dp.silo-noise-multiplier",
           "dp.record-clip": "dp.silo-clip", "dp.record-sample-rate": "dp.silo-sample-rate",
           "dp.record-delta": "dp.silo-delta"}

_SECTIONS = {"data": DataConfig, "model": ModelConfig, "central": CentralConfig, "fed": FedConfig, "dp": DPConfig,
             "secagg": SecAggConfig}


def _plain(value: Any) -> Any:
    """A flat config value as the plain type a file or Flower's run config holds (enums as str)."""
    return value.value if isinstance(value, StrEnum) else value


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``, or a ValueError naming ``key``. A float must be finite:
    inf and NaN would pass every ``> 0`` check of the sections (``dp.clip=inf`` gives an inf model)."""
    kind = type(default)
    if issubclass(kind, StrEnum):
        try:
            return kind(str(value))
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise ValueError(f"config key {key!r}: expected one of {allowed}, got {value!r}") from None
    try:
        out = _convert(kind, value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"config key {key!r}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and not math.isfinite(out):
        raise ValueError(f"config key {key!r}: expected a finite number, got {value!r}")
    return out


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        return float(value)
    return str(value)
