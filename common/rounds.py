"""The server's side of a federated round, written once: budget check → sampling → the instruction
devices get → validation of what comes back → release (noise, fixed denominator, optimizer) →
ledger. The Flower strategy (server/strategy.py), the in-process runner (common/inprocess.py) and
the audits all run rounds through :class:`RoundEngine`; none of them repeats its arithmetic.

Pure: no Flower. The model is any :class:`~common.models.contract.ItemModel`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from common import keys
from common.config import DPConfig, FedConfig, ModelConfig, RunConfig
from common.ddp_round import DistributedRounds, RoundMechanism, TooFewSurvivors, TooManySurvivors
from common.models.contract import ItemModel
from common.privacy import Accountant, MechanismEvent
from common.privacy.dp_fedavg import GaussianNoise, ledger_for, local_bound, noisy_mean, release_event
from common.robust import clamp_total, robust_total, sum_out_of_range, sum_updates  # noqa: F401 - sum_updates re-exported
from common.sampling import poisson_sample
from common.secure_sum import clip_before_rounding
from common.silo_dp import checked_history, ledger_from_history


class ServerOptimizer:
    """Applies the aggregated client update to the global parameters.

    The aggregated update Δ (mean of ``new − received``) is a pseudo-gradient ``g = −Δ``;
    ``sgd`` steps ``x ← x − lr·g`` (lr = 1 is plain FedAvg), ``adam`` is FedAdam (Reddi et al.
    2021). ``weight_decay`` is the item-side L2 prior, applied here because it needs no user
    data. State (moments, step) is checkpointed with :meth:`state_dict`.
    """

    def __init__(self, kind: str, lr: float, *, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if kind not in ("adam", "sgd"):
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.algorithm, self.lr, self.weight_decay, self.betas, self.eps = kind, lr, weight_decay, betas, eps
        self.step_count = 0
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def step(self, params: list[np.ndarray], update: list[np.ndarray],
             lr_scales: Sequence[float] | None = None) -> list[np.ndarray]:
        """The next parameters; ``lr_scales`` (one per array, default all 1) multiplies the
        learning rate of each array (the model's :meth:`~common.models.contract.ItemModel.server_lr_scales`)."""
        self.step_count += 1
        grads = [-np.asarray(u, dtype=np.float64) for u in update]
        scales = [1.0] * len(grads) if lr_scales is None else [float(x) for x in lr_scales]
        if len(scales) != len(grads):
            raise ValueError(f"{len(scales)} learning-rate scales for {len(grads)} arrays")
        if self.algorithm == "sgd":
            return [(p - k * self.lr * g - self.lr * self.weight_decay * p).astype(np.float32)
                    for p, g, k in zip(params, grads, scales)]
        if not self.m:
            self.m = [np.zeros_like(g) for g in grads]
            self.v = [np.zeros_like(g) for g in grads]
        b1, b2 = self.betas
        out = []
        for i, (p, g, k) in enumerate(zip(params, grads, scales)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1 ** self.step_count)
            v_hat = self.v[i] / (1 - b2 ** self.step_count)
            new = p - k * self.lr * m_hat / (np.sqrt(v_hat) + self.eps) - self.lr * self.weight_decay * p
            out.append(new.astype(np.float32))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"step": np.array([self.step_count], dtype=np.int64)}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            state[f"m{i}"], state[f"v{i}"] = m, v
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.step_count = int(state["step"][0])
        n = sum(1 for k in state if k.startswith("m"))
        self.m = [np.asarray(state[f"m{i}"]) for i in range(n)]
        self.v = [np.asarray(state[f"v{i}"]) for i in range(n)]


def make_server_optimizer(fed: FedConfig, model: ModelConfig) -> ServerOptimizer:
    return ServerOptimizer(fed.server_opt, fed.server_lr, weight_decay=model.item_reg)


def server_update_arrays(arrays: list[np.ndarray], total: list[np.ndarray] | None, n: int, *,
                         optimizer: ServerOptimizer, dp: DPConfig | None, expected_cohort: float,
                         noise: GaussianNoise, lr_scales: Sequence[float] | None = None) -> list[np.ndarray] | None:
    """The next values of a model's trainable arrays (travel order) from one round's sum of
    (clipped) client updates; None when the model stays unchanged.

    ``total`` is None when nobody reported. Without DP: the mean over the ``n`` reporters (an
    empty round leaves the model unchanged). With DP: Gaussian noise once on the sum, divided by
    the expected cohort ``q·N`` (also when nobody reported: the release still happens)."""
    if dp is None:
        if total is None or n == 0:
            return None
        mean = [np.asarray(t, dtype=np.float64) / n for t in total]
    else:
        if total is None:
            total = [np.zeros(a.shape) for a in arrays]
        mean = noisy_mean(total, noise_multiplier=dp.noise_multiplier, clip=dp.clip,
                          expected_cohort=expected_cohort, noise=noise)
    return optimizer.step(arrays, mean, lr_scales)


def validate_update(arrays: list[np.ndarray], shapes: list[tuple[int, ...]], bound: float = np.inf, *,
                    l2: float = np.inf, bias_share: float = 0.0) -> str | None:
    """Why an update cannot be aggregated, or None: a wrong count or shape, NaN/Inf, a value
    outside ±``bound``, an L2 norm above ``l2``, or (``bias_share`` > 0, per-group clipping) the
    bias group (array 1) above ``l2·√share`` or the other arrays together above ``l2·√(1−share)``.
    Used by the client before masking and by the server after receiving a plaintext update."""
    if len(arrays) != len(shapes):
        return f"{len(arrays)} arrays, expected {len(shapes)}"
    for i, (a, shape) in enumerate(zip(arrays, shapes)):
        if tuple(np.shape(a)) != tuple(shape):
            return f"array {i} has shape {tuple(np.shape(a))}, expected {tuple(shape)}"
        if not np.all(np.isfinite(a)):
            return f"array {i} contains NaN or Inf"
        if np.size(a) and float(np.max(np.abs(a))) > bound * (1 + 1e-6):
            return f"array {i} has a value of magnitude {float(np.max(np.abs(a))):.4g} > {bound:.4g}"
    if np.isfinite(l2):
        groups = [("the update", arrays, l2)]
        if 0 < bias_share < 1 and len(arrays) > 1:
            groups += [("the bias group", [arrays[1]], l2 * np.sqrt(bias_share)),
                       ("the other arrays", [arrays[0], *arrays[2:]], l2 * np.sqrt(1.0 - bias_share))]
        for name, group, limit in groups:
            norm = float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in group)))
            if norm > limit * (1 + 1e-5):
                return f"{name} has L2 norm {norm:.4g} > {limit:.4g}"
    return None



class RoundEngine:
    """The server's state across rounds (model parameters and their context, optimizer, ledger,
    silo DP-SGD histories) and the steps of one round.

    Parameters
    ----------
    cfg:
        The run's configuration.
    model:
        The item model; ``params`` default to its initial parameters.
    optimizer, ledger_state, silo_histories:
        A resumed run's state (a checkpoint's); a fresh run's otherwise.
    """

    def __init__(self, cfg: RunConfig, model: ItemModel, *, params: Any = None, optimizer: ServerOptimizer | None = None,
                 ledger_state: Mapping[str, Any] | None = None,
                 silo_histories: Mapping[int, Sequence[Sequence[float]]] | None = None,
                 distributed_plan: Mapping[str, Any] | None = None) -> None:
        self.cfg, self.model = cfg, model
        self.params = model.init(cfg.seed) if params is None else params
        self.optimizer = optimizer or make_server_optimizer(cfg.fed, cfg.model)
        dp = cfg.dp
        self.ledger = ledger_for(dp.mode, dp.delta, cfg.fed.partition) if dp.enabled else None
        if self.ledger is not None and ledger_state:
            self.ledger.load_state_dict(ledger_state)  # ε spent before an interruption stays spent
        self.noise = GaussianNoise(dp.seed)
        self.context = model.context(self.params)
        self.silo_histories: dict[int, list[tuple[float, float, int]]] = {
            int(cid): [tuple(entry) for entry in history] for cid, history in (silo_histories or {}).items()}
        # Distributed DP: the run's plan (made at the first sampling, for its population) and this
        # round's mechanism (sized for its cohort); common/ddp_round.py.
        self.ddp = (DistributedRounds(cfg, sum(int(np.size(a)) for a in model.arrays(self.params)),
                                      state=distributed_plan) if self.distributed else None)
        self.mechanism: RoundMechanism | None = None

    @property
    def distributed(self) -> bool:
        """The devices add discrete noise inside SecAgg+; the server only sums and decodes."""
        return self.cfg.dp.enabled and self.cfg.dp.mode == "distributed"

    @property
    def local_dp(self) -> bool:
        """The devices add the noise; the server only averages."""
        return self.cfg.dp.enabled and self.cfg.dp.mode == "local"

    # ---- budget
    def event(self, server_round: int) -> MechanismEvent:
        """What releasing round ``server_round`` costs every user (distributed DP: at most, before
        the cohort is known)."""
        dp = self.cfg.dp
        if self.ddp is not None:
            return self.ddp.reference_event(server_round, self.model.names(self.params))
        return release_event(dp.mode, noise_multiplier=dp.noise_multiplier, sample_rate=self.cfg.fed.sample_rate,
                             parameters=self.model.names(self.params), server_round=server_round)

    def over_budget(self, server_round: int) -> bool:
        """Whether releasing this round would take ε above the run's target (checked before it)."""
        dp = self.cfg.dp
        if self.ddp is not None and self.ddp.plan is None:
            return False  # the plan, made at the first sampling, fits the run's rounds in the target
        return self.ledger is not None and dp.target_epsilon > 0 and self.ledger.would_exceed(
            self.event(server_round), target_epsilon=dp.target_epsilon, accountant=Accountant(dp.accountant))

    # ---- sampling
    def cohort(self, client_ids: Iterable[int], server_round: int) -> list[int]:
        """This round's clients: secret Poisson sampling (seeded only with fed.sampling-seed).
        Under distributed DP also this round's mechanism, sized for the cohort (the plan is made at
        the first call, for this population); a cohort larger than the field holds is dropped (the
        round then releases the server's noise only, like an empty one)."""
        ids = list(client_ids)
        chosen = poisson_sample(ids, self.cfg.fed.sample_rate, seed=self.cfg.fed.cohort_seed,
                                server_round=server_round)
        if self.ddp is not None:
            self.ddp.ensure_plan(len(ids))
            self.mechanism = None
            if chosen:
                try:
                    self.mechanism = self.ddp.mechanism(len(chosen), server_round)
                except TooManySurvivors:
                    chosen = []
        return chosen

    # ---- what devices are told
    def device_clip(self, *, secure_aggregation: bool) -> float:
        """The clip devices are told to use: with SecAgg+ and central DP, C less the rounding
        margin (an update's norm after quantization stays ≤ C, what the noise is sized for);
        under local DP rounding comes after the noise (post-processing): C itself."""
        clip = self.cfg.dp.clip
        if secure_aggregation and not self.local_dp and not self.distributed:
            dim = int(sum(np.size(a) for a in self.model.arrays(self.params)))
            return clip_before_rounding(clip, dim=dim, bits=self.cfg.secagg.quantization_bits)
        return clip

    def instruction(self, server_round: int, *, secure_aggregation: bool) -> dict[str, Any]:
        """The per-round config every sampled device gets (its privacy floor may only tighten it)."""
        cfg = self.cfg
        config: dict[str, Any] = {keys.SERVER_ROUND: server_round, keys.LOCAL_EPOCHS: cfg.fed.local_epochs,
                                  keys.CLIENT_LR: cfg.fed.client_lr}
        if self.ledger is not None or secure_aggregation:
            config[keys.CLIP_NORM] = self.device_clip(secure_aggregation=secure_aggregation)
            config[keys.BIAS_SHARE] = cfg.dp.bias_share
        if self.local_dp:
            config[keys.LOCAL_NOISE] = cfg.dp.noise_multiplier
        if self.mechanism is not None:
            config[keys.DISTRIBUTED] = self.mechanism.to_json()
        if self.model.context_names:  # the trailing context arrays get no update
            config[keys.TRAINABLE_ARRAYS] = len(self.model.arrays(self.params))
            config[keys.CONTEXT_ARRAYS] = ",".join(self.model.context_names)
        return config

    def outgoing(self) -> list[np.ndarray]:
        """What an instruction carries: the trainable arrays, then the context arrays."""
        return [*self.model.arrays(self.params), *self.context]

    # ---- what comes back
    def value_bound(self, *, secure_aggregation: bool) -> float:
        """Every coordinate of a clipped update lies within ±C (no bound without clipping); a
        locally noised one within ±C(1 + 8σ). Under SecAgg+ (central DP or none) ±ρ·C, ρ =
        ``secagg.value-range`` (the quantizer clips honest values to it). Also SecAgg+'s
        quantization range."""
        dp = self.cfg.dp
        if self.local_dp:
            return local_bound(dp.noise_multiplier, dp.clip)
        if secure_aggregation:
            return dp.clip * self.cfg.secagg.value_range
        return dp.clip if self.ledger is not None else np.inf

    def l2_bound(self, *, secure_aggregation: bool) -> float:
        """The L2 bound a plaintext update must meet (per group too): the devices' clip; without DP
        or SecAgg+ still ``fed.update-norm-bound``. Locally noised updates are bounded per value
        only; under SecAgg+ there is no single update to check (only the sum)."""
        if self.local_dp or secure_aggregation:
            return np.inf
        if self.ledger is not None:
            return self.device_clip(secure_aggregation=False)
        return self.cfg.fed.update_norm_bound

    def check(self, arrays: Sequence[np.ndarray], *, secure_aggregation: bool) -> str | None:
        """Why a reply's arrays cannot enter the sum (shape, NaN/Inf, range, L2), or None."""
        shapes = [np.shape(a) for a in self.model.arrays(self.params)]
        return validate_update(list(arrays), shapes, self.value_bound(secure_aggregation=secure_aggregation),
                               l2=self.l2_bound(secure_aggregation=secure_aggregation),
                               bias_share=max(self.cfg.dp.bias_share, 0.0))

    def total(self, updates: list[list[np.ndarray]]) -> list[np.ndarray] | None:
        """A plaintext round's total from its accepted updates (sorted by client id): their sum, or
        the configured robust aggregate (DP off only), clamped per coordinate to ``fed.sum-clamp``."""
        fed = self.cfg.fed
        total = robust_total(updates, fed.aggregate, trim_fraction=fed.trim_fraction)
        return None if total is None else clamp_total(total, fed.sum_clamp)

    def secure_total(self, total: Sequence[np.ndarray], n: int) -> tuple[list[np.ndarray] | None, str | None]:
        """A SecAgg+ round's unmasked sum of ``n`` updates, checked and clamped: (total, None), or
        (None, why) when no honest cohort could have produced it (the round then releases noise
        only). The server cannot see single updates, so this is all it can check."""
        problem = sum_out_of_range(total, n, self.value_bound(secure_aggregation=True))
        if problem:
            return None, problem
        return clamp_total(total, self.cfg.fed.sum_clamp), None

    def distributed_total(self, modular_sum: np.ndarray, n: int) -> tuple[list[np.ndarray] | None, str | None]:
        """Distributed DP: the survivors' noisy sum from what SecAgg+ revealed (the sum of their
        integer vectors modulo the field), decoded and cut back into the model's arrays; (None, why)
        when the round must be abandoned (fewer survivors than its noise was sized for, more than
        the field holds). Clamped like any sum (``fed.sum-clamp``; post-processing)."""
        if self.mechanism is None:
            return None, "no distributed-DP mechanism this round"
        try:
            flat = self.mechanism.decode(np.asarray(modular_sum), n)
        except (TooFewSurvivors, TooManySurvivors) as exc:
            return None, str(exc)
        total, at = [], 0
        for a in self.model.arrays(self.params):
            total.append(flat[at:at + np.size(a)].reshape(np.shape(a)))
            at += np.size(a)
        return clamp_total(total, self.cfg.fed.sum_clamp), None

    def note_silo_history(self, client_id: int, entry: Sequence[float]) -> None:
        """A silo's DP-SGD history entry of this round (public settings: σ, q, steps)."""
        self.silo_histories.setdefault(int(client_id), []).append(checked_history([tuple(entry)])[0])

    def silo_epsilons(self) -> dict[int, float]:
        """ε of each silo's DP-SGD (one user of the silo), composed over every round it trained."""
        delta = self.cfg.dp.silo_delta
        return {cid: ledger_from_history(h, delta=delta).epsilon() for cid, h in sorted(self.silo_histories.items())}

    # ---- the release
    def release(self, total: list[np.ndarray] | None, n: int, server_round: int, *, population: int) -> None:
        """Turn the round's sum of updates (None: nobody reported, or the round was abandoned)
        into the next parameters: with central DP noise once on the sum and the fixed
        denominator q·N; with local DP the devices added it and the server only averages. Either
        way the round is charged to the ledger."""
        dp = self.cfg.dp if (self.ledger is not None and not self.local_dp) else None
        event = self.event(server_round) if self.ledger is not None else None
        if self.distributed and total is not None:
            # The devices' noise is in the sum: the server only divides by q·N (no noise of its own).
            assert self.mechanism is not None
            dp, event = None, self.mechanism.event(self.model.names(self.params))
            n = self.cfg.fed.sample_rate * population
        elif self.distributed:
            # Abandoned or empty: the server releases its own Gaussian noise of the planned size
            # (whether a round is abandoned may depend on failures), charged as such.
            z = self.ddp.plan.noise_multiplier if self.ddp.plan is not None else self.cfg.dp.noise_multiplier
            dp = dataclasses.replace(self.cfg.dp, noise_multiplier=z)
            event = release_event("central", noise_multiplier=z, sample_rate=self.cfg.fed.sample_rate,
                                  parameters=self.model.names(self.params), server_round=server_round)
        arrays = server_update_arrays(self.model.arrays(self.params), total, n, optimizer=self.optimizer, dp=dp,
                                      expected_cohort=self.cfg.fed.sample_rate * population,
                                      noise=self.noise.for_round(server_round),
                                      lr_scales=self.model.server_lr_scales(self.params))
        if arrays is not None:
            self.params = self.model.with_arrays(self.params, arrays)
            self.context = self.model.context(self.params)
        if event is not None:
            self.ledger.record(event)

    def epsilon(self) -> float | None:
        return None if self.ledger is None else self.ledger.epsilon(Accountant.RDP)

    # ---- checkpoints
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        """(named parameter arrays, optimizer state, extra JSON state: ledger, silo histories)."""
        extra: dict[str, Any] = {}
        if self.ledger is not None:
            extra["ledger"] = self.ledger.state_dict()
        if self.silo_histories:
            extra["silo_histories"] = {str(k): v for k, v in sorted(self.silo_histories.items())}
        if self.ddp is not None and self.ddp.plan is not None:
            extra["distributed_plan"] = self.ddp.state_dict()
        return self.model.named(self.params), self.optimizer.state_dict(), extra

    @classmethod
    def restore(cls, cfg: RunConfig, model: ItemModel, named: Mapping[str, np.ndarray],
                optimizer_state: Mapping[str, np.ndarray], extra: Mapping[str, Any]) -> "RoundEngine":
        """The engine of a checkpoint written by :meth:`state` (and :class:`server.run_dir.RunDir`)."""
        optimizer = make_server_optimizer(cfg.fed, cfg.model)
        optimizer.load_state_dict(dict(optimizer_state))
        return cls(cfg, model, params=model.from_named(named), optimizer=optimizer,
                   ledger_state=extra.get("ledger"), silo_histories=extra.get("silo_histories"),
                   distributed_plan=extra.get("distributed_plan"))
