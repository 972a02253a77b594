"""The ledger event of one distributed-DP round: a sum of discrete Gaussians ([KLS21]).

A :class:`DistributedDpEvent` records the mechanism's parameters as the devices ran it (clip,
grid step γ, each device's integer noise variance, the number of noise shares accounted, the
padded dimension, β of conditional rounding); the privacy bound is derived from them by
:mod:`common.privacy.ddgauss` every time ε is computed, so a ledger never stores a number that
a later fix of the analysis could not recompute. It composes with Gaussian
:class:`~common.privacy.ledger.MechanismEvent` releases in one :class:`PrivacyLedger` (RDP only)
and is written with ``"kind": "ddgauss"``; events without a kind are Gaussian, so every ledger
written before this event existed loads unchanged (no state-version bump).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.privacy import ddgauss
from common.privacy._validate import require_int, require_positive, require_real, require_sample_rate
from common.privacy.analysis import DdgRelease
from common.privacy.guarantee import Relation, Sampling

#: ``kind`` of this event in a ledger's state.
KIND = "ddgauss"


@dataclass(frozen=True)
class DistributedDpEvent:
    """One distributed discrete Gaussian release, as accounted.

    Parameters
    ----------
    clip:
        C, the L2 bound of one device's update before it is scaled (update units, > 0).
    gamma:
        γ, the grid step: the device sends round(rotated update / γ) (> 0).
    local_variance:
        σ² of each device's discrete Gaussian, in grid units (integer ≥ 1).
    survivors:
        Number of noise shares the release is accounted with: the fewest survivors a released
        round can have (the configured minimum), or fewer, never more than really summed.
    max_survivors:
        The most shares a released round can sum (≥ ``survivors``). [KLS21]'s τ grows with the
        number of shares, so τ is taken here: the bound then holds for every count in between.
    dim:
        Padded dimension (a power of two) the rotation, rounding and noise run in.
    beta:
        β of conditional rounding (0 ≤ β < 1; 0 = plain randomized rounding).
    sample_rate, sampling, steps, parameters, round, note:
        As in :class:`~common.privacy.ledger.MechanismEvent`.
    sampler_distance:
        η, the total-variation distance of one noise draw from N_Z(0, σ²) as the devices sample it
        (:func:`~common.privacy.discrete_gaussian_table.table_distance`; 0 for the exact sampler,
        which every event written before the table sampler used). Each release adds
        ``max_survivors · dim · η`` to δ.
    """

    clip: float
    gamma: float
    local_variance: int
    survivors: int
    max_survivors: int
    dim: int
    beta: float
    sample_rate: float
    sampling: Sampling
    parameters: tuple[str, ...]
    round: int
    steps: int = 1
    note: str = ""
    sampler_distance: float = 0.0

    def __post_init__(self) -> None:
        require_positive("clip", self.clip)
        require_positive("gamma", self.gamma)
        require_int("local_variance", self.local_variance, minimum=1)
        require_int("survivors", self.survivors, minimum=1)
        require_int("max_survivors", self.max_survivors, minimum=self.survivors)
        require_int("dim", self.dim, minimum=1)
        if self.dim & (self.dim - 1):
            raise ValueError(f"dim must be the padded dimension, a power of two; got {self.dim}.")
        require_real("beta", self.beta)
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must satisfy 0 <= beta < 1, got {self.beta!r}.")
        require_sample_rate("sample_rate", self.sample_rate)
        require_int("steps", self.steps, minimum=1)
        require_int("round", self.round, minimum=0)
        if not isinstance(self.sampling, Sampling):
            raise ValueError(f"sampling must be a Sampling, got {self.sampling!r}.")
        if (not isinstance(self.parameters, tuple) or not self.parameters
                or not all(isinstance(p, str) and p for p in self.parameters)):
            raise ValueError(f"parameters must be a non-empty tuple of non-empty str, got {self.parameters!r}.")
        require_real("sampler_distance", self.sampler_distance)
        if not 0.0 <= self.sampler_distance < 1e-30:
            raise ValueError(f"sampler_distance must be in [0, 1e-30), got {self.sampler_distance!r}.")
        if not isinstance(self.note, str):
            raise ValueError(f"note must be a str, got {type(self.note).__name__}.")

    @property
    def l2_sensitivity(self) -> float:
        """Δ₂ in grid units: the clip after scaling, inflated by conditional rounding."""
        return ddgauss.rounded_l2_bound(self.clip / self.gamma, self.dim, self.beta)

    @property
    def noise_multiplier(self) -> float:
        """The central noise multiplier the summed noise amounts to, for a report:
        γ·√(survivors·σ²) / C (the accounting uses the exact bound, not this number)."""
        return self.gamma * math.sqrt(self.survivors * self.local_variance) / self.clip

    def release(self, relation: Relation, *, amplification: bool = True) -> DdgRelease:
        """What the analysis composes; q is the sampling rate only when amplification is claimed."""
        q = self.sample_rate if (self.sampling is Sampling.POISSON and amplification) else 1.0
        l2 = self.l2_sensitivity
        return DdgRelease(l2=l2, l1=ddgauss.rounded_l1_bound(l2, self.dim),
                          tau=ddgauss.tau(self.local_variance, self.max_survivors), dim=self.dim,
                          clients=self.survivors, local_variance=float(self.local_variance),
                          sample_rate=float(q), steps=int(self.steps), relation=relation.value,
                          sampler_slack=self.max_survivors * self.dim * self.sampler_distance)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form with ``"kind": "ddgauss"`` (the inverse of :meth:`from_dict`)."""
        return {
            "kind": KIND, "clip": float(self.clip), "gamma": float(self.gamma),
            "local_variance": int(self.local_variance), "survivors": int(self.survivors),
            "max_survivors": int(self.max_survivors), "dim": int(self.dim),
            "beta": float(self.beta), "sample_rate": float(self.sample_rate), "sampling": self.sampling.value,
            "parameters": list(self.parameters), "round": int(self.round), "steps": int(self.steps),
            "note": self.note, "sampler_distance": float(self.sampler_distance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistributedDpEvent:
        """Rebuild an event written by :meth:`to_dict` (validated again)."""
        if data.get("kind") != KIND:
            raise ValueError(f"event {dict(data)!r} is not a {KIND!r} event.")
        try:
            return cls(clip=data["clip"], gamma=data["gamma"], local_variance=data["local_variance"],
                       survivors=data["survivors"], max_survivors=data["max_survivors"], dim=data["dim"],
                       beta=data["beta"],
                       sample_rate=data["sample_rate"], sampling=Sampling(data["sampling"]),
                       parameters=tuple(data["parameters"]), round=data["round"], steps=data.get("steps", 1),
                       note=data.get("note", ""), sampler_distance=data.get("sampler_distance", 0.0))
        except KeyError as missing:
            raise ValueError(f"event {dict(data)!r} lacks the key {missing}.") from None
        except ValueError as bad:
            raise ValueError(f"event {dict(data)!r}: {bad}") from None
