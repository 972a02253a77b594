"""User-level DP-SGD inside a silo: one client, many users, the unit of privacy is ONE USER.

A silo (a hospital, a shop, a region) holds the ratings of many users. What leaves it each
round is the item-side update, so only the item parameters are privatised; the users'
vectors are reconstructed on the silo (:func:`common.models.reconstruction.fit_user`), used as fixed *inputs* and
never released.

One DP-SGD sample is one **user**: their reconstructed vector ``u`` and the counts of the items
they rated, with the loss ``Σ_i −log softmax(V u + b)_i`` over their items (exactly
:func:`common.models.reconstruction.item_loss` for the softmax loss). Why not one rating: the user vector is fitted
on all of that user's ratings, so removing one rating moves the inputs of the user's other
records too (≈ 0.44 per record on ML-100K): a per-rating clip does not bound one rating's
influence, while a per-user clip does bound one user's (their vector is a function of their own
data and the public model only). The scores are a ``Linear(d, I)`` whose weight is the item
table: Opacus computes each user's gradient norm with one einsum (ghost clipping) or the
per-sample gradients themselves, no ``Embedding`` lookups, and no sample's loss depends on
another (no in-batch negatives, which would void the per-sample sensitivity).

Accounting. Opacus' RDP accountant keeps a history of ``(σ, q, steps)``; a silo must restore it
before every round so that ε composes across rounds (Flower's ``examples/opacus`` restarts it,
so its ε covers one round only). The server keeps each silo's history with its checkpoint too
(a resumed run never reports a smaller ε). The same history is recomposed by our
:class:`~common.privacy.PrivacyLedger` (user, add/remove, Poisson over the silo's users) as an
independent check.

Randomness (``noise_source``). ``"seeded"``: Poisson sampling and the Gaussian noise draw from a
``torch.Generator`` seeded by ``seed``: reproducible, for tests and experiments, *not* secure.
``"urandom"`` (what a silo client runs unless its owner set a noise seed): the noise comes from
the operating system's CSPRNG (:class:`common.privacy.dp_fedavg.GaussianNoise`, four draws per
coordinate as in Opacus' secure mode), and the sampling generator is seeded from ``os.urandom``.
``"torchcsprng"``: Opacus' own ``secure_mode`` (needs ``torchcsprng``, not installed here, so it
fails loudly rather than falling back). :attr:`SiloDPResult.noise_source` says which ran.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.models.contract import ItemParams, UserData
from common.models.reconstruction import fit_user
from common.privacy._validate import (
    require_delta,
    require_int,
    require_positive,
    require_sample_rate,
)
from common.privacy.dp_fedavg import GaussianNoise
from common.privacy.ledger import MechanismEvent, PrivacyLedger, Relation, Sampling, Unit

log = logging.getLogger(__name__)

#: What a silo's DP-SGD release contains (the names its ledger events carry).
RELEASED_PARAMETERS: tuple[str, ...] = ("item_embeddings", "item_bias")

#: How Opacus clips per user: ghost clipping (norms only) or materialised per-sample grads.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("ghost", "hooks")

#: Where the randomness of DP-SGD comes from (see the module docstring).
NOISE_SOURCES: tuple[str, ...] = ("seeded", "urandom", "torchcsprng")

#: One entry of Opacus' RDP accountant history: ``(noise_multiplier, sample_rate, steps)``.
HistoryEntry = tuple[float, float, int]


class ItemScorer(nn.Module):
    """Scores of every item for a batch of user vectors: ``linear(u) = u Vᵀ + b``.

    ``linear.weight`` (I, d) is the item embedding table and ``linear.bias`` (I,) the item
    biases, so Opacus' per-sample gradient of one user is ``(∂ℓ/∂s) ⊗ u`` for the weight.
    """

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n_items)

    def forward(self, user_vectors: torch.Tensor) -> torch.Tensor:
        return self.linear(user_vectors)

    @classmethod
    def from_params(cls, params: ItemParams) -> ItemScorer:
        """A scorer holding a float32 copy of ``params`` (the arrays are not shared)."""
        scorer = cls(params.n_items, params.dim)
        with torch.no_grad():
            scorer.linear.weight.copy_(torch.from_numpy(np.asarray(params.embeddings, dtype=np.float32)))
            scorer.linear.bias.copy_(torch.from_numpy(np.asarray(params.bias, dtype=np.float32)))
        return scorer

    def to_params(self) -> ItemParams:
        """The current item parameters as numpy copies."""
        return ItemParams(self.linear.weight.detach().numpy().copy(),
                          self.linear.bias.detach().numpy().copy())


def user_loss() -> nn.Module:
    """Per-user loss: cross-entropy against the user's item *counts* (a soft target that does
    not sum to one), i.e. ``Σ_i −log softmax(s)_i`` over the items the user rated."""
    return nn.CrossEntropyLoss()


@dataclass(frozen=True)
class SiloDPResult:
    """What one silo round of user-level DP-SGD produced.

    Attributes
    ----------
    update:
        New − received item parameters (dense, the received shapes): what the silo sends.
    history:
        Opacus' accountant history after this round, earlier rounds included; keep it (e.g.
        in ``context.state``) and pass it to the next call.
    epsilon:
        ε at ``delta`` of the whole history, from Opacus' RDP accountant (one user of the silo).
    ledger_epsilon:
        The same ε recomputed by :class:`~common.privacy.PrivacyLedger` (dp_accounting, the
        same RDP orders): an independent check, equal to ``epsilon`` within ~1%.
    delta:
        The δ both are reported at.
    event:
        This round's release as a ledger event, for the caller's own ledger.
    steps:
        DP-SGD steps taken this round (``epochs × ⌈1/q⌉``, empty Poisson batches included:
        they add noise and are charged too).
    sample_rate:
        The Poisson rate actually used and charged: Opacus samples with ``1 / len(loader)``,
        i.e. ``1/⌈n / round(q·n)⌉``, which can differ slightly from the requested rate.
    mean_loss:
        Mean loss per sampled user over the round (before each step).
    users:
        Users with ratings in the silo (the data set size n of the DP-SGD).
    noise_source:
        ``"seeded"`` (reproducible, not secure), ``"urandom"`` or ``"torchcsprng"``.
    """

    update: ItemParams
    history: list[HistoryEntry]
    epsilon: float
    ledger_epsilon: float
    delta: float
    event: MechanismEvent
    steps: int
    sample_rate: float
    mean_loss: float
    users: int
    noise_source: str

    @property
    def secure_mode(self) -> bool:
        """Whether the noise came from a CSPRNG."""
        return self.noise_source != "seeded"


def user_samples(params: ItemParams, users: Sequence[UserData], *, user_reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP-SGD sample per user with ratings: the reconstructed vector (U, d) and the counts
    of the items they rated (U, I). The vectors are solved for the received item parameters
    (from the user's own ratings only) and stay fixed during the round."""
    vectors, counts = [], []
    for user in users:
        if len(user.items) == 0:
            continue
        vectors.append(fit_user(params, user, loss="softmax", reg=user_reg))
        row = np.zeros(params.n_items, dtype=np.float32)
        np.add.at(row, np.asarray(user.items, dtype=np.int64), 1.0)
        counts.append(row)
    if not vectors:
        raise ValueError("the silo has no ratings to train on")
    return torch.from_numpy(np.stack(vectors).astype(np.float32)), torch.from_numpy(np.stack(counts))


def silo_ledger(delta: float) -> PrivacyLedger:
    """The ledger of a silo's DP-SGD: one user of the silo, add/remove, Poisson over users."""
    return PrivacyLedger(delta=delta, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)


def history_event(entry: HistoryEntry, round_: int, note: str = "silo DP-SGD") -> MechanismEvent:
    """One Opacus history entry ``(σ, q, steps)`` as a ledger event."""
    sigma, q, steps = entry
    return MechanismEvent(noise_multiplier=float(sigma), sample_rate=float(q), steps=int(steps),
                          sampling=Sampling.POISSON, parameters=RELEASED_PARAMETERS, round=int(round_), note=note)


def ledger_from_history(history: Sequence[HistoryEntry], *, delta: float) -> PrivacyLedger:
    """A silo ledger holding one event per history entry (entry k as round k)."""
    ledger = silo_ledger(delta)
    for k, entry in enumerate(history):
        ledger.record(history_event(entry, k, "silo DP-SGD (Opacus history)"))
    return ledger


def checked_history(history: Sequence[Sequence[float]]) -> list[HistoryEntry]:
    """Validated ``(σ, q, steps)`` entries (a stored or received history is data, not trust)."""
    out = []
    for entry in history:
        if len(entry) != 3:
            raise ValueError(f"history entries are (noise_multiplier, sample_rate, steps), got {entry!r}")
        sigma, q, steps = entry
        require_positive("history noise_multiplier", sigma)
        require_sample_rate("history sample_rate", q)
        require_int("history steps", steps, minimum=1)
        out.append((float(sigma), float(q), int(steps)))
    return out


@dataclass(frozen=True)
class _Private:
    """What Opacus' ``make_private`` returned, under one set of names for both clipping modes."""

    module: nn.Module
    optimizer: object
    criterion: object
    loader: object
    engine: object


def dp_sgd_item_update(
    params: ItemParams,
    users: list[UserData],
    *,
    user_reg: float,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    epochs: int,
    lr: float,
    seed: int,
    history: list[HistoryEntry],
    delta: float = 1e-5,
    server_round: int = 0,
    noise_source: str = "seeded",
    grad_sample_mode: str = "ghost",
) -> SiloDPResult:
    """One silo round of user-level DP-SGD on the item parameters (Opacus, RDP accountant).

    Parameters
    ----------
    params:
        The received global item parameters (not modified).
    users:
        The silo's users' training ratings; users without ratings are skipped.
    user_reg:
        λ of the user reconstruction (``model.user_reg``).
    noise_multiplier, max_grad_norm:
        σ and the per-user clip norm C: each step adds N(0, σ²C²) to the sum of clipped
        per-user gradients, then divides by the expected batch size.
    sample_rate:
        Poisson rate q per step; the expected batch is ``round(q·n)`` users.
    epochs:
        Passes over the silo (each ``⌈1/q⌉`` steps).
    lr:
        SGD learning rate on the mean clipped, noised gradient.
    seed:
        Seeds the sampling and noise generator (``noise_source = "seeded"`` only).
    history:
        The accountant history returned by the previous round (``[]`` in the first);
        restored before training so that ε composes across rounds.
    delta:
        δ of the reported ε; should be well below 1 / (users in the silo).
    server_round:
        Round written into :attr:`SiloDPResult.event`.
    noise_source:
        ``"seeded"``, ``"urandom"`` (secure noise from the OS) or ``"torchcsprng"`` (Opacus'
        secure mode; raises ``ImportError`` without torchcsprng).
    grad_sample_mode:
        ``"ghost"`` (default): Opacus' ghost clipping computes each user's gradient norm
        without materialising the (B, I, d) per-sample gradients, then backpropagates the
        clipped loss: the same clipped sum, faster. ``"hooks"``: the per-sample gradients
        themselves (memory B·I·d floats); a test checks both agree.
    """
    _check_arguments(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
                     epochs=epochs, lr=lr, user_reg=user_reg, delta=delta, noise_source=noise_source,
                     grad_sample_mode=grad_sample_mode)
    previous = checked_history(history)
    inputs, targets = user_samples(params, users, user_reg=user_reg)
    scorer = ItemScorer.from_params(params)
    private = _prepare_private(scorer, inputs, targets, previous, noise_multiplier=noise_multiplier,
                               max_grad_norm=max_grad_norm, sample_rate=sample_rate, lr=lr, seed=seed,
                               noise_source=noise_source, grad_sample_mode=grad_sample_mode)
    steps, mean_loss = _train(private, scorer, epochs=epochs, grad_sample_mode=grad_sample_mode)
    return _account(private, scorer, params, steps=steps, mean_loss=mean_loss, users=len(targets), delta=delta,
                    noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, server_round=server_round,
                    noise_source=noise_source)


def _check_arguments(*, noise_multiplier: float, max_grad_norm: float, sample_rate: float, epochs: int, lr: float,
                     user_reg: float, delta: float, noise_source: str, grad_sample_mode: str) -> None:
    require_positive("noise_multiplier", noise_multiplier)
    require_positive("max_grad_norm", max_grad_norm)
    require_sample_rate("sample_rate", sample_rate)
    require_int("epochs", epochs, minimum=1)
    require_positive("lr", lr)
    require_positive("user_reg", user_reg)
    require_delta("delta", delta)
    if noise_source not in NOISE_SOURCES:
        raise ValueError(f"noise_source must be one of {NOISE_SOURCES}, got {noise_source!r}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")


def _prepare_private(scorer: ItemScorer, inputs: torch.Tensor, targets: torch.Tensor, previous: list[HistoryEntry], *,
                     noise_multiplier: float, max_grad_norm: float, sample_rate: float, lr: float, seed: int,
                     noise_source: str, grad_sample_mode: str) -> _Private:
    """Opacus' engine over one sample per user, its accountant restored from ``previous``."""
    from opacus import PrivacyEngine  # heavy import, only where DP-SGD runs

    secure_mode = noise_source == "torchcsprng"
    n = len(targets)
    batch_size = max(1, round(sample_rate * n))
    sampling_seed = int.from_bytes(os.urandom(8), "little") if noise_source == "urandom" else seed
    generator = None if secure_mode else torch.Generator().manual_seed(sampling_seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets),
                                         batch_size=batch_size, generator=generator)
    optimizer = torch.optim.SGD(scorer.parameters(), lr=lr)
    with warnings.catch_warnings():
        # Opacus warns that a seeded RNG is not secure; the docstring and result say so.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG turned off.*")
        engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
    engine.accountant.history = list(previous)  # compose with earlier rounds, never restart
    private = engine.make_private(
        module=scorer, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, noise_generator=generator,
        grad_sample_mode=grad_sample_mode, criterion=user_loss())
    if grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, dp_loader = private
    else:
        (module, dp_optimizer, dp_loader), criterion = private, user_loss()
    if noise_source == "urandom":
        _draw_noise_from_urandom(dp_optimizer)
    if not math.isclose(dp_loader.sample_rate, sample_rate, rel_tol=0.1):
        log.warning("Poisson rate %.4g used (1/⌈n/batch⌉ for %d users), not the requested %.4g",
                    dp_loader.sample_rate, n, sample_rate)
    return _Private(module, dp_optimizer, criterion, dp_loader, engine)


def _train(private: _Private, scorer: ItemScorer, *, epochs: int, grad_sample_mode: str) -> tuple[int, float]:
    """``epochs`` passes of Poisson batches; returns (steps taken, mean loss per sampled user)."""
    steps, loss_sum, seen = 0, 0.0, 0
    private.module.train()
    with warnings.catch_warnings():
        # The inputs (user vectors) need no gradient; Opacus' hooks only read the outputs'.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(epochs):
            for batch_inputs, batch_targets in private.loader:
                private.optimizer.zero_grad(set_to_none=True)
                if len(batch_targets):
                    loss = private.criterion(private.module(batch_inputs), batch_targets)
                    loss_sum += float(loss.detach()) * len(batch_targets)
                    seen += len(batch_targets)
                    loss.backward()
                # An empty Poisson batch still steps: noise is added and the step charged.
                elif grad_sample_mode == "hooks":  # empty per-sample grads, clipped sum 0
                    private.module(batch_inputs).sum().backward()
                else:  # ghost: no forward (it would count as a second call), a zero gradient
                    for p in scorer.parameters():
                        p.grad = torch.zeros_like(p)
                private.optimizer.step()
                steps += 1
    return steps, (loss_sum / seen if seen else float("nan"))


def _account(private: _Private, scorer: ItemScorer, params: ItemParams, *, steps: int, mean_loss: float, users: int,
             delta: float, noise_multiplier: float, max_grad_norm: float, server_round: int,
             noise_source: str) -> SiloDPResult:
    """The update, Opacus' ε and our ledger's ε for the history after this round."""
    engine = private.engine
    new_history = [(float(s), float(q), int(k)) for s, q, k in engine.accountant.history]
    epsilon = float(engine.accountant.get_epsilon(delta=delta))
    ledger_epsilon = ledger_from_history(new_history, delta=delta).epsilon()
    if not math.isclose(epsilon, ledger_epsilon, rel_tol=0.02):
        log.warning("Opacus ε %.4f and ledger ε %.4f differ by more than 2%%", epsilon, ledger_epsilon)
    new = scorer.to_params()
    update = ItemParams(new.embeddings - params.embeddings, new.bias - params.bias)
    rate = float(private.loader.sample_rate)
    event = history_event((float(noise_multiplier), rate, steps), server_round,
                          f"silo DP-SGD, {users} users, C={max_grad_norm}")
    return SiloDPResult(update=update, history=new_history, epsilon=epsilon, ledger_epsilon=ledger_epsilon,
                        delta=float(delta), event=event, steps=steps, sample_rate=rate, mean_loss=mean_loss,
                        users=users, noise_source=noise_source)


def _draw_noise_from_urandom(optimizer) -> None:
    """Make an Opacus DP optimizer add N(0, (σC)²) from the OS CSPRNG to each clipped gradient sum
    (:class:`GaussianNoise`: four draws per coordinate, as Opacus' secure mode does)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    source = GaussianNoise(None)

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            noise = source.normal(tuple(p.summed_grad.shape), std)
            p.grad = (p.summed_grad + torch.from_numpy(noise).to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise
