"""A privacy ledger: every noisy release of a run, and the ε they add up to.

The ledger keeps only a serialisable list of :class:`MechanismEvent` (Opacus keeps a history
of ``(σ, q, steps)`` for the same reason: it is what makes the accountant checkpointable);
the mathematics lives in :mod:`common.privacy.analysis`. It never imports Flower: the
server keeps one for user-level DP-FedAvg, a silo client keeps one in ``context.state``
for record-level DP-SGD and must reload it every round, never start a fresh one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from common.privacy._validate import (
    require_delta,
    require_int,
    require_positive,
    require_sample_rate,
)
from common.privacy.analysis import (
    PldComposition,
    RdpComposition,
    Release,
    pld_epsilon,
    rdp_epsilon,
)

#: Version of :meth:`PrivacyLedger.state_dict`; a ledger refuses any other.
STATE_VERSION = 1


class Neighbouring(str, Enum):
    """Which pair of data sets the guarantee distinguishes (the unit of privacy).

    The noise multiplier of an event is always noise std / L2 sensitivity under this
    relation.
    """

    #: Add or remove one user's data (user-level DP-FedAvg; σ relative to the clip norm).
    USER = "user"
    #: Add or remove one rating (Opacus DP-SGD inside one silo; σ relative to the clip norm).
    RECORD = "record"
    #: Local DP on the device: any two inputs of one user. A clipped update of norm ≤ C
    #: has sensitivity 2C here, and the server sees who reported, so no sampling amplifies.
    LOCAL = "local"


class Accountant(str, Enum):
    """How releases are composed into ε."""

    #: Rényi DP over Opacus' orders: the standard, slightly loose bound.
    RDP = "rdp"
    #: Privacy-loss distributions (pessimistic discretisation): tighter, slower.
    PLD = "pld"


@dataclass(frozen=True)
class MechanismEvent:
    """One noisy release: ``steps`` compositions of a Poisson-sampled Gaussian mechanism.

    Parameters
    ----------
    noise_multiplier:
        σ, the noise std divided by the L2 sensitivity (> 0, finite).
    sample_rate:
        Poisson sampling probability q with 0 < q ≤ 1; ``1.0`` means no amplification.
    steps:
        How many times the mechanism ran (≥ 1), e.g. DP-SGD steps in a round.
    neighbouring:
        The unit of privacy; must equal the ledger's.
    parameters:
        Names of the parameter groups released, e.g. ``("item_embeddings", "item_bias")``.
        Groups released with separate noise are separate events (they compose).
    round:
        Federated round of the release (≥ 0); a ledger's rounds never go back.
    note:
        Free text for a report (what was trained, why).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    neighbouring: Neighbouring
    parameters: tuple[str, ...]
    round: int
    note: str = ""

    def __post_init__(self) -> None:
        require_positive("noise_multiplier", self.noise_multiplier)
        require_sample_rate("sample_rate", self.sample_rate)
        require_int("steps", self.steps, minimum=1)
        require_int("round", self.round, minimum=0)
        if not isinstance(self.neighbouring, Neighbouring):
            raise ValueError(
                f"neighbouring must be a Neighbouring, got {self.neighbouring!r}; "
                f"use one of {[n.name for n in Neighbouring]}."
            )
        if self.neighbouring is Neighbouring.LOCAL and self.sample_rate != 1.0:
            raise ValueError(
                "a LOCAL (on-device) release cannot claim sampling amplification: the server "
                f"sees which devices report; use sample_rate=1.0, got {self.sample_rate!r}."
            )
        if (
            not isinstance(self.parameters, tuple)
            or not self.parameters
            or not all(isinstance(p, str) and p for p in self.parameters)
        ):
            raise ValueError(
                "parameters must be a non-empty tuple of non-empty str naming the released "
                f"parameter groups, e.g. ('item_embeddings',); got {self.parameters!r}."
            )
        if not isinstance(self.note, str):
            raise ValueError(f"note must be a str, got {type(self.note).__name__}.")

    @property
    def release(self) -> Release:
        """The ``(σ, q, steps)`` triple that the analysis composes."""
        return Release(float(self.noise_multiplier), float(self.sample_rate), int(self.steps))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (the inverse of :meth:`from_dict`)."""
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "neighbouring": self.neighbouring.value,
            "parameters": list(self.parameters),
            "round": int(self.round),
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MechanismEvent:
        """Rebuild an event written by :meth:`to_dict` (validated again)."""
        try:
            return cls(
                noise_multiplier=data["noise_multiplier"],
                sample_rate=data["sample_rate"],
                steps=data["steps"],
                neighbouring=Neighbouring(data["neighbouring"]),
                parameters=tuple(data["parameters"]),
                round=data["round"],
                note=data.get("note", ""),
            )
        except KeyError as missing:
            raise ValueError(f"event {dict(data)!r} lacks the key {missing}.") from None


@dataclass
class _History:
    """Incremental ε-per-round of one (accountant, δ): events consumed so far."""

    consumed: int = 0
    composition: RdpComposition | PldComposition = field(default_factory=RdpComposition)
    closed: list[tuple[int, float]] = field(default_factory=list)
    open_round: int | None = None


class PrivacyLedger:
    """Every release of a run under one unit of privacy, composed into ε on demand.

    Parameters
    ----------
    delta:
        The δ that ε is reported at, 0 < δ < 1 (typically below 1 / population).
    neighbouring:
        The unit of privacy; events under another relation are refused.

    Examples
    --------
    >>> ledger = PrivacyLedger(delta=1e-3, neighbouring=Neighbouring.USER)
    >>> ledger.record(MechanismEvent(noise_multiplier=1.0, sample_rate=0.1, steps=1,
    ...     neighbouring=Neighbouring.USER, parameters=("item_embeddings",), round=1))
    >>> round(ledger.epsilon(), 3) > 0
    True
    """

    def __init__(self, *, delta: float, neighbouring: Neighbouring) -> None:
        require_delta("delta", delta)
        if not isinstance(neighbouring, Neighbouring):
            raise ValueError(f"neighbouring must be a Neighbouring, got {neighbouring!r}.")
        self._delta = float(delta)
        self._neighbouring = neighbouring
        self._events: list[MechanismEvent] = []
        # Events are append-only, so a cached value stays right for its event count.
        self._epsilon_cache: dict[tuple[Accountant, float], tuple[int, float]] = {}
        self._histories: dict[tuple[Accountant, float], _History] = {}

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(delta={self._delta!r}, neighbouring={self._neighbouring.value!r}, "
            f"events={len(self._events)})"
        )

    @property
    def delta(self) -> float:
        """The δ that ε is reported at."""
        return self._delta

    @property
    def neighbouring(self) -> Neighbouring:
        """The unit of privacy."""
        return self._neighbouring

    @property
    def events(self) -> tuple[MechanismEvent, ...]:
        """Every recorded release, oldest first."""
        return tuple(self._events)

    def record(self, event: MechanismEvent) -> None:
        """Add one release (after it happened; ask :meth:`would_exceed` before)."""
        self._check_recordable(event)
        self._events.append(event)

    def epsilon(
        self, accountant: Accountant = Accountant.RDP, *, delta: float | None = None
    ) -> float:
        """ε of all recorded events composed (0 when nothing was released).

        Parameters
        ----------
        accountant:
            RDP (Opacus' orders) or PLD (tighter).
        delta:
            δ to report at; the ledger's δ when ``None``.
        """
        accountant, delta = self._check_query(accountant, delta)
        key = (accountant, delta)
        cached = self._epsilon_cache.get(key)
        if cached is not None and cached[0] == len(self._events):
            return cached[1]
        value = _compose(self._events, accountant, delta)
        self._epsilon_cache[key] = (len(self._events), value)
        return value

    def epsilon_history(
        self, accountant: Accountant = Accountant.RDP, *, delta: float | None = None
    ) -> list[tuple[int, float]]:
        """ε after each round that released something, as ``[(round, ε), ...]``.

        Incremental: a call composes only the events recorded since the previous call
        with the same accountant and δ (one convolution or vector addition per round).
        """
        accountant, delta = self._check_query(accountant, delta)
        history = self._histories.get((accountant, delta))
        if history is None:
            start = RdpComposition() if accountant is Accountant.RDP else PldComposition()
            history = self._histories[(accountant, delta)] = _History(composition=start)
        new = self._events[history.consumed :]
        # One merged release per run of equal (round, σ, q); a round closes when the next opens.
        runs = itertools.groupby(new, key=lambda e: (e.round, *e.release[:2]))
        for (round_, sigma, q), run in runs:
            if history.open_round is not None and round_ != history.open_round:
                history.closed.append((history.open_round, history.composition.epsilon(delta)))
            steps = sum(e.release.steps for e in run)
            history.composition = history.composition.then(Release(sigma, q, steps))
            history.open_round = round_
        history.consumed = len(self._events)
        if history.open_round is None:
            return []
        return [*history.closed, (history.open_round, history.composition.epsilon(delta))]

    def would_exceed(
        self,
        event: MechanismEvent,
        *,
        target_epsilon: float,
        accountant: Accountant = Accountant.RDP,
    ) -> bool:
        """Whether recording ``event`` would take ε above ``target_epsilon`` (at the ledger's δ).

        Call it *before* a release and skip the release when it returns ``True``; it uses
        exactly the composition that :meth:`epsilon` will report after :meth:`record`.
        """
        require_positive("target_epsilon", target_epsilon)
        accountant, delta = self._check_query(accountant, None)
        self._check_recordable(event)
        return _compose([*self._events, event], accountant, delta) > target_epsilon

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: ``version``, ``delta``, ``neighbouring``, ``events``."""
        return {
            "version": STATE_VERSION,
            "delta": self._delta,
            "neighbouring": self._neighbouring.value,
            "events": [event.to_dict() for event in self._events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore events from :meth:`state_dict`; refuse anything that would mis-account.

        Raises
        ------
        ValueError
            When the version, δ or neighbouring differ from this ledger's, when a key is
            missing, or when the state lacks events this ledger already recorded (loading
            it would forget privacy already spent).
        """
        for key in ("version", "delta", "neighbouring", "events"):
            if key not in state:
                raise ValueError(f"privacy ledger state lacks the key {key!r}.")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"privacy ledger state has version {state['version']!r}; this code reads "
                f"version {STATE_VERSION} only."
            )
        if state["delta"] != self._delta:
            raise ValueError(
                f"privacy ledger state was kept at delta={state['delta']!r}, this ledger "
                f"reports at delta={self._delta!r}: refusing to mix them."
            )
        if state["neighbouring"] != self._neighbouring.value:
            raise ValueError(
                f"privacy ledger state counts neighbouring={state['neighbouring']!r}, this "
                f"ledger counts {self._neighbouring.value!r}: a different unit of privacy."
            )
        events = [MechanismEvent.from_dict(item) for item in state["events"]]
        if events[: len(self._events)] != self._events:
            raise ValueError(
                f"privacy ledger state does not extend the {len(self._events)} events already "
                "recorded here; loading it would forget privacy already spent."
            )
        restored = PrivacyLedger(delta=self._delta, neighbouring=self._neighbouring)
        for event in events:
            restored.record(event)  # re-checks neighbouring and round order
        self._events = restored._events

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """A new ledger with the δ and neighbouring stored in ``state``, then loaded."""
        try:
            ledger = cls(delta=state["delta"], neighbouring=Neighbouring(state["neighbouring"]))
        except KeyError as missing:
            raise ValueError(f"privacy ledger state lacks the key {missing}.") from None
        ledger.load_state_dict(state)
        return ledger

    def _check_recordable(self, event: MechanismEvent) -> None:
        if not isinstance(event, MechanismEvent):
            raise ValueError(f"expected a MechanismEvent, got {type(event).__name__}.")
        if event.neighbouring is not self._neighbouring:
            raise ValueError(
                f"event counts neighbouring={event.neighbouring.value!r} but this ledger counts "
                f"{self._neighbouring.value!r}: keep one ledger per unit of privacy."
            )
        if self._events and event.round < self._events[-1].round:
            raise ValueError(
                f"event of round {event.round} after round {self._events[-1].round}: "
                "rounds must not go back."
            )

    def _check_query(self, accountant: Accountant, delta: float | None) -> tuple[Accountant, float]:
        if not isinstance(accountant, Accountant):
            raise ValueError(f"accountant must be an Accountant, got {accountant!r}.")
        if delta is None:
            return accountant, self._delta
        require_delta("delta", delta)
        return accountant, float(delta)


def _compose(events: list[MechanismEvent], accountant: Accountant, delta: float) -> float:
    releases = [event.release for event in events]
    if accountant is Accountant.RDP:
        return rdp_epsilon(releases, delta)
    return pld_epsilon(releases, delta)
