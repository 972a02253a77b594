"""The device's own privacy floor: set by whoever owns the device, never by the server.

Under local DP the server is not trusted, so a guarantee that depends on the server asking for
noise is no guarantee. A device therefore protects every update it sends by its **own**
:class:`DevicePolicy` -- its clip bound C, and (for local DP) the least noise multiplier it adds
itself -- and treats the server's per-round instruction as a request that may only tighten it:

* the clip is ``min(own C, instructed C)``; an instruction without a clip gets the device's own;
* a device with a local-noise floor refuses an instruction that omits the noise or the clip, or
  asks for less noise than the floor; it then sends nothing;
* the noise seed is never the server's: an instruction carrying anything but the keys of the
  protocol (a seed, say) is refused, and a device only seeds its noise when its owner said so
  (tests), which the owner's own ledger records.

Where a policy comes from: in ``simulate.py`` the operator who starts the simulation owns the
simulated devices (:meth:`DevicePolicy.for_run`); a real device reads it from its store
(``fedrec-client privacy set``) and its SuperNode's ``--node-config`` (the stricter of the two);
with neither, :data:`DEFAULT_POLICY` (clip 1.0, no local noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common import keys

#: Node-config keys a device owner can set on a SuperNode (``--node-config "privacy-clip=0.5"``).
NODE_CLIP = "privacy-clip"
NODE_LOCAL_NOISE = "privacy-local-noise"
NODE_DISTRIBUTED_NOISE = "privacy-distributed-noise"


class PolicyRefusal(ValueError):
    """The instruction asks for less protection than the device's policy: nothing is sent."""


@dataclass(frozen=True)
class DevicePolicy:
    """What the device owner decided.

    Parameters
    ----------
    clip:
        L2 bound of any update this device sends (``math.inf``: no bound of its own, e.g. a
        simulation without DP or secure aggregation). The server may ask for a smaller one.
    local_noise:
        0: the device accepts central DP (the server adds the noise). > 0: the device only sends
        updates to which it added N(0, (σ·clip)²) itself with σ at least this.
    noise_seed:
        None: noise from the OS CSPRNG. An int seeds the device's noise (tests only); it is the
        owner's setting and is never taken from a message.
    distributed_noise:
        0: the device accepts central DP. > 0: the device only sends updates under distributed DP
        (its own discrete noise share inside SecAgg+), and only when the round's shares together
        amount to a noise multiplier z = γ√(m·σ²)/C of at least this.
    """

    clip: float = 1.0
    local_noise: float = 0.0
    noise_seed: int | None = None
    distributed_noise: float = 0.0

    def __post_init__(self) -> None:
        if not (self.clip > 0) or math.isnan(self.clip):
            raise ValueError(f"a device's clip must be > 0 (inf: no bound), got {self.clip!r}")
        if not math.isfinite(self.local_noise) or self.local_noise < 0:
            raise ValueError(f"a device's local-noise floor must be a finite σ ≥ 0, got {self.local_noise!r}")
        if self.local_noise > 0 and not math.isfinite(self.clip):
            raise ValueError("a device that adds its own noise needs a finite clip")
        if not math.isfinite(self.distributed_noise) or self.distributed_noise < 0:
            raise ValueError(f"a device's distributed-noise floor must be a finite z ≥ 0, got {self.distributed_noise!r}")

    @classmethod
    def for_run(cls, cfg: Any, *, secure_aggregation: bool | None = None) -> "DevicePolicy":
        """The policy of a simulated device whose owner is the operator running ``cfg``
        (a :class:`common.config.RunConfig`): clip C when DP or SecAgg+ is on, local noise σ
        under local DP, and the operator's noise seed. ``secure_aggregation`` overrides the
        config's (the in-process runner sums in plaintext)."""
        dp = cfg.dp
        secagg = cfg.secagg.enabled if secure_aggregation is None else secure_aggregation
        bounded = dp.enabled or secagg
        return cls(clip=dp.clip if bounded else math.inf,
                   local_noise=dp.noise_multiplier if dp.enabled and dp.mode == "local" else 0.0,
                   noise_seed=dp.seed)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], base: "DevicePolicy | None" = None) -> "DevicePolicy":
        """``base`` (default :data:`DEFAULT_POLICY`) made stricter by the node config's
        ``privacy-clip`` / ``privacy-local-noise``."""
        base = base or DEFAULT_POLICY
        try:
            clip = float(node_config.get(NODE_CLIP, base.clip))
            noise = float(node_config.get(NODE_LOCAL_NOISE, base.local_noise))
        except (TypeError, ValueError):
            raise ValueError(f"node config {NODE_CLIP}/{NODE_LOCAL_NOISE} must be numbers, got "
                             f"{node_config.get(NODE_CLIP)!r}, {node_config.get(NODE_LOCAL_NOISE)!r}") from None
        return base.stricter(cls(clip=clip, local_noise=noise))

    def stricter(self, other: "DevicePolicy") -> "DevicePolicy":
        """The policy that satisfies both: the smaller clip, the larger noise floor."""
        return DevicePolicy(clip=min(self.clip, other.clip), local_noise=max(self.local_noise, other.local_noise),
                            noise_seed=self.noise_seed if self.noise_seed is not None else other.noise_seed,
                            distributed_noise=max(self.distributed_noise, other.distributed_noise))

    def to_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "local_noise": self.local_noise, "distributed_noise": self.distributed_noise}


DEFAULT_POLICY = DevicePolicy()


@dataclass(frozen=True)
class Protection:
    """What the device applies to this round's update: clip (per group with ``bias_share``)
    and, when ``local_noise`` is set, its own Gaussian noise of std ``local_noise · clip``."""

    clip: float
    bias_share: float
    local_noise: float | None
    #: Distributed DP: the round's mechanism (the device encodes its clipped update with it).
    distributed: Any = None


def protection_for(policy: DevicePolicy, instruction: Mapping[str, Any]) -> Protection:
    """The protection this device applies to an update the server asked for with ``instruction``
    (a fit config), or :class:`PolicyRefusal` naming why it sends nothing."""
    unknown = sorted(set(instruction) - set(keys.INSTRUCTION_KEYS))
    if unknown:
        raise PolicyRefusal(f"the instruction carries key(s) this device does not follow: {', '.join(unknown)} "
                            "(a device never takes a noise seed or other privacy setting from the server)")
    asked_clip = _number(instruction, keys.CLIP_NORM)
    asked_noise = _number(instruction, keys.LOCAL_NOISE)
    bias_share = instruction.get(keys.BIAS_SHARE, 0.0)
    if isinstance(bias_share, bool) or not isinstance(bias_share, (int, float)) or not bias_share < 1:
        raise PolicyRefusal(f"instruction {keys.BIAS_SHARE}={bias_share!r}: expected a number < 1 (≤ 0: flat clip)")
    bias_share = max(float(bias_share), 0.0)
    if policy.local_noise > 0:
        if asked_noise is None:
            raise PolicyRefusal(f"this device adds its own noise (σ ≥ {policy.local_noise:g}); the instruction asks "
                                "for none: refusing to send an un-noised update")
        if asked_clip is None:
            raise PolicyRefusal("this device adds its own noise; the instruction names no clip norm: refusing")
        if asked_noise < policy.local_noise:
            raise PolicyRefusal(f"the server asked for local noise σ={asked_noise:g}, below this device's floor "
                                f"σ={policy.local_noise:g}: refusing to send")
    distributed = _distributed(policy, instruction, asked_noise)
    clip = min(policy.clip, asked_clip if asked_clip is not None else math.inf)
    if asked_noise is not None and not math.isfinite(clip):
        raise PolicyRefusal("local noise asked for without a finite clip norm")
    if distributed is not None:
        clip = min(clip, distributed.params.clip)
    return Protection(clip=clip, bias_share=bias_share, local_noise=asked_noise, distributed=distributed)


def _distributed(policy: DevicePolicy, instruction: Mapping[str, Any], asked_noise: float | None):
    """The round's distributed-DP mechanism (common/ddp_round.py), checked against the floor, or
    None; PolicyRefusal when the device must not send."""
    from common.ddp_round import RoundMechanism, check_floor

    if keys.DISTRIBUTED not in instruction:
        if policy.distributed_noise > 0:
            raise PolicyRefusal(f"this device sends only under distributed DP (z ≥ {policy.distributed_noise:g}); the "
                                "instruction asks for none: refusing to send an update the server would see un-noised")
        return None
    if asked_noise is not None:
        raise PolicyRefusal("the instruction asks for local and distributed noise at once")
    try:
        mechanism = RoundMechanism.from_json(instruction[keys.DISTRIBUTED])
    except ValueError as exc:
        raise PolicyRefusal(f"distributed-DP instruction refused: {exc}") from None
    if mechanism.server_round != instruction.get(keys.SERVER_ROUND):
        raise PolicyRefusal("the distributed-DP instruction is for another round (its rotation would repeat)")
    problem = check_floor(mechanism, floor=policy.distributed_noise, dim=mechanism.params.dim)
    if problem:
        raise PolicyRefusal(f"distributed DP: {problem}: refusing to send")
    return mechanism


def _number(instruction: Mapping[str, Any], key: str) -> float | None:
    if key not in instruction:
        return None
    value = instruction[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)) or float(value) <= 0:
        raise PolicyRefusal(f"instruction {key}={value!r}: expected a number > 0")
    return float(value)
