"""Distributed DP (``dp.mode = distributed``): the device noises its own update, the server only sums.

The distributed discrete Gaussian of Kairouz, Liu and Steinke (ICML 2021, [KLS21]), as pure
functions. On the device, after clipping to L2 ≤ C:

1. **rotate**: pad the flat update to a power of two D and apply the randomized Hadamard
   transform H·diag(s)/√D, signs s from a public seed (run seed, round) that every device and
   the server derive alike (:func:`rotation_signs`): one coordinate cannot carry the norm;
2. **scale** by 1/γ onto the integer grid;
3. **round** each coordinate up or down at random (unbiased) and redraw the whole vector until
   its squared norm is at most Δ₂² of [KLS21] (:func:`conditional_round`; the bound is recorded);
4. **noise**: add N_Z(0, σ²) per coordinate from the OS CSPRNG, by a 256-bit table
   (:mod:`common.privacy.discrete_gaussian_table`, within ~1e-72 of N_Z per draw in total
   variation, which the ledger adds to δ), with σ² sized so that the fewest survivors a
   released round may have (``min_survivors``) carry the planned noise together;
5. reduce modulo M = 2^bits, the SecAgg+ field (:func:`encode`).

The server unmasks the sum modulo M, maps it to [−M/2, M/2), rescales by γ and rotates back
(:func:`decode`); it adds nothing. A round with fewer survivors than ``min_survivors`` is
abandoned (:class:`TooFewSurvivors`): its noise would be below the plan; so is a round with more
than ``max_survivors`` (:class:`TooManySurvivors`): the field and the accounting's τ are sized for
at most that many. Both counts are participation metadata, the same whether or not a given user's
data is in (the devices of the cohort send either way: the "zero-out" relation of the accounting).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from common.privacy import ddgauss
from common.privacy.discrete_gaussian import RandomWords, sample_discrete_gaussian
from common.privacy.discrete_gaussian_table import sample_discrete_gaussian_table
from common.secure_sum import check_server_sum

#: A device redraws its rounding at most this often (each draw is accepted with probability
#: ≥ 1 − β ≈ 0.39 at the default β; 200 failures in a row have probability < 1e-40).
MAX_ROUNDING_DRAWS = 200

_ROTATION_DOMAIN = b"fedrec/ddp/rotation-signs/v1"


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a·b without BLAS (a multithreaded BLAS dot stalls for milliseconds on a busy machine)."""
    return float(np.einsum("i,i->", a, b))


class TooFewSurvivors(ValueError):
    """A round's sum holds fewer noise shares than the plan requires: it must not be released."""


class TooManySurvivors(ValueError):
    """A round's sum holds more devices than the field (and the accounted τ) was sized for."""


@dataclass(frozen=True)
class DistributedDpParams:
    """Everything a device and the server must agree on for one distributed-DP run.

    Parameters
    ----------
    clip:
        C, the L2 bound of a device's flat update (update units).
    gamma:
        γ, the grid step (update units per integer).
    local_variance:
        σ² of each device's discrete Gaussian per coordinate, in grid units (integer ≥ 1).
    dim:
        Length of the flat update before padding.
    modulus_bits:
        log2 of the SecAgg+ modulus M the noisy sum is reduced by.
    min_survivors:
        Fewest devices whose noise a released round may hold (the SecAgg+ threshold or a
        configured minimum cohort); the accounting uses this many noise shares.
    max_survivors:
        Most devices a released round may sum: the field is sized for them, and the accounting's
        τ (which grows with the number of shares) is taken at this count.
    beta:
        β of conditional rounding (0 ≤ β < 1).
    """

    clip: float
    gamma: float
    local_variance: int
    dim: int
    modulus_bits: int
    min_survivors: int
    max_survivors: int
    beta: float = ddgauss.DEFAULT_BETA

    def __post_init__(self) -> None:
        for name in ("clip", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, low in (("local_variance", 1), ("dim", 1), ("modulus_bits", 2), ("min_survivors", 1),
                          ("max_survivors", max(1, int(self.min_survivors)))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.modulus_bits > 62:
            raise ValueError(f"modulus_bits must be <= 62, got {self.modulus_bits}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must satisfy 0 <= beta < 1, got {self.beta!r}")
        if self.clip / self.gamma + math.sqrt(self.padded_dim) >= 2**31:
            # keeps every rounded coordinate and the rounded norm² exact in int64
            raise ValueError(f"gamma={self.gamma!r} is too fine for clip={self.clip!r}: the scaled update "
                             "would not fit in 31 bits")

    @property
    def padded_dim(self) -> int:
        """D: the smallest power of two ≥ ``dim``."""
        return padded_dim(self.dim)

    @property
    def modulus(self) -> int:
        """M = 2^modulus_bits."""
        return 1 << self.modulus_bits

    @property
    def norm_bound(self) -> float:
        """Δ₂: the L2 norm (grid units) a rounded update may have ([KLS21] Theorem 1)."""
        return ddgauss.rounded_l2_bound(self.clip / self.gamma, self.padded_dim, self.beta)

    @property
    def local_std(self) -> float:
        """Each device's noise std per coordinate in update units: γ·σ."""
        return self.gamma * math.sqrt(self.local_variance)


@dataclass(frozen=True)
class EncodedUpdate:
    """What a device hands to SecAgg+: ``values`` (uint64, each < M, length D), with the squared
    norm bound its rounding was accepted under and how many draws that took. Only ``values``
    leaves the device: the number of draws depends on the update."""

    values: np.ndarray
    norm_bound_squared: int
    rounding_draws: int


def padded_dim(dim: int) -> int:
    """The smallest power of two ≥ ``dim`` (≥ 1)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


def rotation_signs(dim: int, *, run_seed: int, server_round: int) -> np.ndarray:
    """±1 signs (int8) of the round's rotation: SHAKE-256 of (domain, run seed, round), one bit per
    coordinate. Public randomness: every device and the server compute the same signs, on any
    platform and NumPy version (privacy does not rest on them, only the modulus' tail bound)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"dim must be a power of two, got {dim}")
    key = _ROTATION_DOMAIN + int(run_seed).to_bytes(16, "big", signed=True) + int(server_round).to_bytes(8, "big")
    bits = np.unpackbits(np.frombuffer(hashlib.shake_256(key).digest((dim + 7) // 8), dtype=np.uint8))[:dim]
    return (1 - 2 * bits.astype(np.int8)).astype(np.int8)


def hadamard(x: np.ndarray) -> np.ndarray:
    """The unnormalised Walsh–Hadamard transform H·x of a float vector of power-of-two length
    (Sylvester order; H is symmetric and H·H = D·I), in D·log2(D) additions."""
    y = np.array(x, dtype=np.float64)
    n = y.size
    if n & (n - 1):
        raise ValueError(f"length must be a power of two, got {n}")
    h = 1
    while h < n:
        y = y.reshape(-1, 2, h)
        y = np.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), axis=1)
        h *= 2
    return y.reshape(n)


def rotate(update: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """H·diag(signs)·pad(update)/√D: an orthogonal map, so it keeps the L2 norm."""
    dim = signs.size
    flat = np.asarray(update, dtype=np.float64).ravel()
    if flat.size > dim:
        raise ValueError(f"update of {flat.size} values does not fit the rotation of {dim}")
    padded = np.zeros(dim)
    padded[: flat.size] = flat
    return hadamard(padded * signs) / math.sqrt(dim)


def unrotate(rotated: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """The inverse of :func:`rotate`: diag(signs)·H·y/√D, cut back to ``dim`` values."""
    return (signs * hadamard(rotated) / math.sqrt(signs.size))[:dim]


def conditional_round(scaled: np.ndarray, norm_bound: float, src: RandomWords) -> tuple[np.ndarray, int, int]:
    """[KLS21] conditional randomized rounding: round each coordinate to floor or floor + 1 with
    the probabilities that keep it unbiased, and redraw until ‖x‖₂² ≤ ``norm_bound``².

    Returns
    -------
    (numpy.ndarray, int, int)
        The int64 vector, the integer bound ⌊norm_bound²⌋ it was checked against (exactly, in
        integers), and the number of draws.

    Raises
    ------
    RuntimeError
        After :data:`MAX_ROUNDING_DRAWS` rejected draws (the input was not clipped).
    """
    floor = np.floor(scaled)
    frac = scaled - floor
    base = floor.astype(np.int64)
    bound_sq = math.floor(norm_bound**2)
    for draws in range(1, MAX_ROUNDING_DRAWS + 1):
        uniform = (src.words(scaled.size) >> np.uint64(11)).astype(np.float64) / 2.0**53
        rounded = base + (uniform < frac)
        if int(np.dot(rounded, rounded)) <= bound_sq:  # exact in int64: ‖x‖ < 2^31 (see the params)
            return rounded, bound_sq, draws
    raise RuntimeError(f"conditional rounding failed {MAX_ROUNDING_DRAWS} times: is the update clipped to C?")


def encode(update: np.ndarray, params: DistributedDpParams, *, run_seed: int, server_round: int,
           src: RandomWords | None = None, add_noise: bool = True) -> EncodedUpdate:
    """The device side: clip, rotate, scale, round, noise, reduce modulo M.

    Parameters
    ----------
    update:
        The device's flat update (any shape; ``params.dim`` values). Clipped here to C again, so
        the rounding bound always applies.
    params:
        The run's :class:`DistributedDpParams` (the device must check that its noise is not below
        its owner's floor before calling; see docs/DISTRIBUTED_DP.md).
    run_seed, server_round:
        Public seed of the rotation.
    src:
        Source of randomness; ``None`` (production) is the OS CSPRNG.
    add_noise:
        False only in a simulation that draws the survivors' noise as one sum
        (:func:`pooled_noise`); a device always adds its share.
    """
    src = RandomWords() if src is None else src
    flat = np.asarray(update, dtype=np.float64).ravel()
    if flat.size != params.dim or not np.all(np.isfinite(flat)):
        raise ValueError(f"update must hold {params.dim} finite values, got {flat.size}")
    norm = math.sqrt(_dot(flat, flat))
    if norm > params.clip:
        flat = flat * (params.clip / norm * (1.0 - 1e-9))
    signs = rotation_signs(params.padded_dim, run_seed=run_seed, server_round=server_round)
    scaled = rotate(flat, signs) / params.gamma
    rounded, bound_sq, draws = conditional_round(scaled, params.norm_bound, src)
    noise = sample_discrete_gaussian_table(params.local_variance, params.padded_dim, src) if add_noise else 0
    noisy = rounded + noise
    values = np.mod(noisy, params.modulus).astype(np.uint64)
    return EncodedUpdate(values=values, norm_bound_squared=bound_sq, rounding_draws=draws)


def pooled_noise(params: DistributedDpParams, survivors: int, src: RandomWords | None = None) -> np.ndarray:
    """The survivors' noise drawn at once, modulo M: N_Z(0, m·σ²) per coordinate. A simulation
    shortcut (the in-process runner's ``pooled_noise``): the sum of m independent N_Z(0, σ²) is
    within [KLS21]'s τ of N_Z(0, m·σ²) (τ < 1e-1000 at the variances plans use), so the released
    model's distribution is the same to far below anything measurable, at 1/m of the sampling cost.
    Devices never use it: each adds its own share (:func:`encode`)."""
    noise = sample_discrete_gaussian(params.local_variance * int(survivors), params.padded_dim, src)
    return np.mod(noise, params.modulus).astype(np.uint64)


def modular_sum(vectors: list[np.ndarray], params: DistributedDpParams) -> np.ndarray:
    """What SecAgg+ reveals: the sum of the devices' vectors modulo M (uint64 arithmetic wraps
    modulo 2^64, a multiple of M). For tests and the in-process runner."""
    check_server_sum(max(len(vectors), 1), params.modulus)
    total = np.zeros(params.padded_dim, dtype=np.uint64)
    for vector in vectors:
        total += np.asarray(vector, dtype=np.uint64)
    return total & np.uint64(params.modulus - 1)


def decode(total: np.ndarray, survivors: int, params: DistributedDpParams, *, run_seed: int,
           server_round: int) -> np.ndarray:
    """The server side: the noisy sum of the survivors' clipped updates (float64, ``params.dim``).

    ``total`` is the unmasked sum modulo M; it is read in [−M/2, M/2), multiplied by γ and
    rotated back. The caller divides by its (fixed) denominator.

    Raises
    ------
    TooFewSurvivors
        When ``survivors`` < ``params.min_survivors``: the sum carries less noise than planned
        and the round must be abandoned, not released.
    TooManySurvivors
        When ``survivors`` > ``params.max_survivors``: the sum may have wrapped.
    """
    if survivors < params.min_survivors:
        raise TooFewSurvivors(f"{survivors} survivors hold less noise than the plan's minimum of "
                              f"{params.min_survivors}: abandon the round")
    if survivors > params.max_survivors:
        raise TooManySurvivors(f"{survivors} survivors exceed the {params.max_survivors} the field was sized "
                               "for: abandon the round")
    values = np.asarray(total, dtype=np.uint64) & np.uint64(params.modulus - 1)
    half = params.modulus // 2
    centred = values.astype(np.int64) - np.where(values >= half, params.modulus, 0).astype(np.int64)
    signs = rotation_signs(params.padded_dim, run_seed=run_seed, server_round=server_round)
    return unrotate(centred.astype(np.float64) * params.gamma, signs, params.dim)
