"""A privacy ledger: every noisy release of a run, and the ε they add up to.

The ledger keeps only a serialisable list of :class:`MechanismEvent` (Opacus keeps a history
of ``(σ, q, steps)`` for the same reason: it is what makes the accountant checkpointable);
the mathematics lives in :mod:`common.privacy.analysis`. As in Flower's privacy accounting,
the unit of privacy (:class:`Unit`), the neighbouring relation (:class:`Relation`) and the
sampling method (:class:`Sampling`) are separate, named types. It never imports Flower: the
server keeps one for user-level DP-FedAvg, a device one for its own local-DP releases, and a
silo one for its DP-SGD; each is reloaded, never restarted.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.choices import Accountant
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
from common.privacy.guarantee import Relation, Sampling, Unit

#: Version of :meth:`PrivacyLedger.state_dict`; a ledger reads this version and migrates 1.
STATE_VERSION = 2


@dataclass(frozen=True)
class MechanismEvent:
    """One noisy release: ``steps`` compositions of a (possibly sampled) Gaussian mechanism.

    Parameters
    ----------
    noise_multiplier:
        σ, the noise std divided by the L2 bound C of one unit's contribution (> 0, finite).
    sample_rate:
        Poisson sampling probability q with 0 < q ≤ 1 (1.0: everybody takes part).
    steps:
        How many times the mechanism ran (≥ 1), e.g. DP-SGD steps in a round.
    sampling:
        :attr:`Sampling.POISSON` to claim amplification at rate q, :attr:`Sampling.NONE` to
        charge every release in full (q is then kept for the report only).
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
    sampling: Sampling
    parameters: tuple[str, ...]
    round: int
    note: str = ""

    def __post_init__(self) -> None:
        require_positive("noise_multiplier", self.noise_multiplier)
        require_sample_rate("sample_rate", self.sample_rate)
        require_int("steps", self.steps, minimum=1)
        require_int("round", self.round, minimum=0)
        if not isinstance(self.sampling, Sampling):
            raise ValueError(
                f"sampling must be a Sampling, got {self.sampling!r}; "
                f"use one of {[s.name for s in Sampling]}."
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

    def release(self, relation: Relation, *, amplification: bool = True) -> Release:
        """The ``(σ, q, steps, relation)`` the analysis composes: q is the sampling rate only
        when amplification is claimed (``sampling`` POISSON and ``amplification``), else 1."""
        q = self.sample_rate if (self.sampling is Sampling.POISSON and amplification) else 1.0
        return Release(float(self.noise_multiplier), float(q), int(self.steps), relation.value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (the inverse of :meth:`from_dict`)."""
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "sampling": self.sampling.value,
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
                sampling=Sampling(data["sampling"]),
                parameters=tuple(data["parameters"]),
                round=data["round"],
                note=data.get("note", ""),
            )
        except KeyError as missing:
            raise ValueError(f"event {dict(data)!r} lacks the key {missing}.") from None
        except ValueError as bad:
            raise ValueError(f"event {dict(data)!r}: {bad}") from None


def migrate_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 ledger state (one ``neighbouring`` field that mixed unit, relation and
    sampling) as version 2. ``user`` → user, add/remove, Poisson (q < 1); ``local`` → user,
    replace-one, no amplification, with the device's σ (version 1 stored σ/2). Version-1
    ``record`` ledgers counted one rating as the unit inside a silo, a claim that did not hold
    (the inputs of a user's other ratings depend on each rating): they are refused."""
    if state.get("version") != 1:
        return dict(state)
    kind = state.get("neighbouring")
    if kind not in ("user", "local"):
        raise ValueError(
            f"privacy ledger state of version 1 with neighbouring={kind!r} cannot be migrated: "
            "record-level silo ledgers did not bound one rating's influence (docs/PRIVACY.md)."
        )
    events = []
    for item in state.get("events", []):
        item = dict(item)
        item.pop("neighbouring", None)
        if kind == "local":
            item["noise_multiplier"] = 2.0 * float(item["noise_multiplier"])
            item["sampling"] = Sampling.NONE.value
        else:
            item["sampling"] = (Sampling.NONE if float(item["sample_rate"]) == 1.0 else Sampling.POISSON).value
        events.append(item)
    relation = Relation.REPLACE_ONE if kind == "local" else Relation.ADD_OR_REMOVE_ONE
    return {"version": STATE_VERSION, "delta": state.get("delta"), "unit": Unit.USER.value,
            "relation": relation.value, "events": events}


@dataclass
class _History:
    """Incremental ε-per-round of one (accountant, δ): events consumed so far."""

    consumed: int = 0
    composition: RdpComposition | PldComposition = field(default_factory=RdpComposition)
    closed: list[tuple[int, float]] = field(default_factory=list)
    open_round: int | None = None


class PrivacyLedger:
    """Every release of a run under one unit of privacy and one neighbouring relation,
    composed into ε on demand.

    Parameters
    ----------
    delta:
        The δ that ε is reported at, 0 < δ < 1 (typically below 1 / population).
    unit:
        Whose data is protected (:class:`Unit`).
    relation:
        Which neighbouring data sets are indistinguishable (:class:`Relation`).

    Examples
    --------
    >>> ledger = PrivacyLedger(delta=1e-3, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    >>> ledger.record(MechanismEvent(noise_multiplier=1.0, sample_rate=0.1, steps=1,
    ...     sampling=Sampling.POISSON, parameters=("item_embeddings",), round=1))
    >>> round(ledger.epsilon(), 3) > 0
    True
    """

    def __init__(self, *, delta: float, unit: Unit, relation: Relation) -> None:
        require_delta("delta", delta)
        if not isinstance(unit, Unit):
            raise ValueError(f"unit must be a Unit, got {unit!r}.")
        if not isinstance(relation, Relation):
            raise ValueError(f"relation must be a Relation, got {relation!r}.")
        self._delta = float(delta)
        self._unit = unit
        self._relation = relation
        self._events: list[MechanismEvent] = []
        # Events are append-only, so a cached value stays right for its event count.
        self._epsilon_cache: dict[tuple[Accountant, float, bool], tuple[int, float]] = {}
        self._histories: dict[tuple[Accountant, float], _History] = {}

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(delta={self._delta!r}, unit={self._unit.value!r}, "
            f"relation={self._relation.value!r}, events={len(self._events)})"
        )

    @property
    def delta(self) -> float:
        """The δ that ε is reported at."""
        return self._delta

    @property
    def unit(self) -> Unit:
        """Whose data is protected."""
        return self._unit

    @property
    def relation(self) -> Relation:
        """The neighbouring relation every event is accounted under."""
        return self._relation

    @property
    def events(self) -> tuple[MechanismEvent, ...]:
        """Every recorded release, oldest first."""
        return tuple(self._events)

    @property
    def claims_amplification(self) -> bool:
        """Whether any recorded release is accounted with amplification by sampling."""
        return any(e.sampling is Sampling.POISSON and e.sample_rate < 1.0 for e in self._events)

    def record(self, event: MechanismEvent) -> None:
        """Add one release (after it happened; ask :meth:`would_exceed` before)."""
        self._check_recordable(event)
        self._events.append(event)

    def epsilon(
        self,
        accountant: Accountant = Accountant.RDP,
        *,
        delta: float | None = None,
        amplification: bool = True,
    ) -> float:
        """ε of all recorded events composed (0 when nothing was released).

        Parameters
        ----------
        accountant:
            RDP (Opacus' orders) or PLD (tighter).
        delta:
            δ to report at; the ledger's δ when ``None``.
        amplification:
            False: ε for an observer who knows which units took part in each release (e.g. the
            server, which sent the instructions, or anyone who can reproduce a seeded
            cohort): no release is amplified by sampling.
        """
        accountant, delta = self._check_query(accountant, delta)
        key = (accountant, delta, bool(amplification))
        cached = self._epsilon_cache.get(key)
        if cached is not None and cached[0] == len(self._events):
            return cached[1]
        value = _compose(self._releases(self._events, amplification), accountant, delta)
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
        # One merged release per run of equal (round, release but its steps); a round closes when
        # the next opens.
        runs = itertools.groupby(new, key=lambda e: (e.round, e.release(self._relation)._replace(steps=0)))
        for (round_, release), run in runs:
            if history.open_round is not None and round_ != history.open_round:
                history.closed.append((history.open_round, history.composition.epsilon(delta)))
            steps = sum(e.steps for e in run)
            history.composition = history.composition.then(release._replace(steps=steps))
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
        return _compose(self._releases([*self._events, event], True), accountant, delta) > target_epsilon

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: ``version``, ``delta``, ``unit``, ``relation``, ``events``."""
        return {
            "version": STATE_VERSION,
            "delta": self._delta,
            "unit": self._unit.value,
            "relation": self._relation.value,
            "events": [event.to_dict() for event in self._events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore events from :meth:`state_dict` (version 1 is migrated first, see
        :func:`migrate_state`); refuse anything that would mis-account.

        Raises
        ------
        ValueError
            When the version, δ, unit or relation differ from this ledger's, when a key is
            missing, or when the state lacks events this ledger already recorded (loading
            it would forget privacy already spent).
        """
        state = migrate_state(state)
        for key in ("version", "delta", "unit", "relation", "events"):
            if key not in state:
                raise ValueError(f"privacy ledger state lacks the key {key!r}.")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"privacy ledger state has version {state['version']!r}; this code reads "
                f"versions 1 and {STATE_VERSION} only."
            )
        if state["delta"] != self._delta:
            raise ValueError(
                f"privacy ledger state was kept at delta={state['delta']!r}, this ledger "
                f"reports at delta={self._delta!r}: refusing to mix them."
            )
        if state["unit"] != self._unit.value or state["relation"] != self._relation.value:
            raise ValueError(
                f"privacy ledger state counts unit={state['unit']!r}, relation={state['relation']!r}; "
                f"this ledger counts unit={self._unit.value!r}, relation={self._relation.value!r}: "
                "a different unit of privacy or neighbouring relation."
            )
        events = [_event_from_dict(item) for item in state["events"]]
        if events[: len(self._events)] != self._events:
            raise ValueError(
                f"privacy ledger state does not extend the {len(self._events)} events already "
                "recorded here; loading it would forget privacy already spent."
            )
        restored = PrivacyLedger(delta=self._delta, unit=self._unit, relation=self._relation)
        for event in events:
            restored.record(event)  # re-checks round order
        self._events = restored._events

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """A new ledger with the δ, unit and relation stored in ``state``, then loaded."""
        state = migrate_state(state)
        try:
            ledger = cls(delta=state["delta"], unit=Unit(state["unit"]), relation=Relation(state["relation"]))
        except KeyError as missing:
            raise ValueError(f"privacy ledger state lacks the key {missing}.") from None
        ledger.load_state_dict(state)
        return ledger

    def _releases(self, events: list[MechanismEvent], amplification: bool) -> list[Release]:
        return [event.release(self._relation, amplification=amplification) for event in events]

    def _check_recordable(self, event: MechanismEvent) -> None:
        from common.privacy.ddp_event import DistributedDpEvent

        if not isinstance(event, (MechanismEvent, DistributedDpEvent)):
            raise ValueError(f"expected a MechanismEvent or DistributedDpEvent, got {type(event).__name__}.")
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


def _event_from_dict(data: Mapping[str, Any]) -> Any:
    """A Gaussian :class:`MechanismEvent` (no ``kind``, as every ledger before distributed DP
    wrote) or a :class:`~common.privacy.ddp_event.DistributedDpEvent` (``kind`` ``"ddgauss"``)."""
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind is None:
        return MechanismEvent.from_dict(data)
    from common.privacy.ddp_event import KIND, DistributedDpEvent

    if kind == KIND:
        return DistributedDpEvent.from_dict(data)
    raise ValueError(f"event {dict(data)!r} has an unknown kind {kind!r}.")


def _compose(releases: list[Release], accountant: Accountant, delta: float) -> float:
    if accountant is Accountant.RDP:
        return rdp_epsilon(releases, delta)
    return pld_epsilon(releases, delta)
