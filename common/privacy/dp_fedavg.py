"""User-level DP-FedAvg (McMahan et al. 2018) as pure functions.

Client: clip the whole update (all arrays together) to L2 norm ``C`` before it leaves the device.
Server: add Gaussian noise with std ``σ·C`` to the *sum* of the clipped updates it aggregated,
and divide by the *expected* cohort size ``q·N`` (the fixed-denominator estimator). The noise is
sized for the sensitivity of the sum (one user changes it by at most ``C``), so it is right
whatever the number of clients that actually reported: a dropout never leaves a round
under-noised.

Local DP (``dp.mode = local``): the *device* adds N(0, (σC)²) to its own clipped update
(:func:`add_local_noise`), so nobody, not even a server that sees single updates, learns more than
the (ε, δ) of :func:`release_event` allows. The server then only averages.

Neighbouring relation. Central DP with one user per client: add/remove one user, with the
population size N public (the denominator q·N is fixed by it, so removing a user "zeroes out"
their contribution and changes the sum by at most C). A user inside a silo, or a device under
local DP, cannot make its client stop sending: replace-one (two contributions differ by up to
2C), accounted as such by the ledger (never by halving σ by hand).

Noise comes from the operating system's CSPRNG (``os.urandom``) turned into Gaussians by the
Box-Muller transform, each coordinate the sum of four draws (Opacus' secure mode does the same,
against floating-point attacks on a single Gaussian draw); a seeded generator is available for
tests and reproducible debugging and is reported as such.
"""

from __future__ import annotations

import os

import numpy as np

from common.privacy.ledger import MechanismEvent, PrivacyLedger, Relation, Sampling, Unit

#: Local DP: a noised coordinate is clamped to ±C·(1 + LOCAL_TAIL·σ) (post-processing, so the
#: guarantee is unchanged). SecAgg+'s quantization range is set to the same bound: the protocol
#: itself never clips. A coordinate reaches the clamp with probability ≈ 1e-15.
LOCAL_TAIL = 8.0


def global_norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_update(arrays: list[np.ndarray], clip: float) -> tuple[list[np.ndarray], bool]:
    """Scale ``arrays`` so their joint L2 norm is at most ``clip``; returns (arrays, was_clipped)."""
    if clip <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip}")
    norm = global_norm(arrays)
    if norm <= clip:
        return [np.asarray(a, dtype=np.float32) for a in arrays], False
    scale = clip / norm
    # float32 rounding could push the norm a hair above C: shrink by one ulp-ish margin.
    scale *= 1.0 - 1e-6
    return [(np.asarray(a, dtype=np.float64) * scale).astype(np.float32) for a in arrays], True


def clip_grouped(arrays: list[np.ndarray], clip: float, bias_share: float) -> list[np.ndarray]:
    """Clip an item-side update ``[embeddings, biases, *more]`` to joint L2 norm ≤ ``clip``.

    ``bias_share`` ≤ 0: one flat clip over everything. Otherwise per-group clipping (as in
    McMahan et al. 2018): the biases (array 1) are clipped to ``clip·√share`` and every other array
    together to ``clip·√(1−share)``, so the joint norm is still ≤ ``clip`` and the sensitivity
    (hence the noise and ε) is unchanged, but the biases, whose gradient is large and simple, no
    longer crowd the rest out of the clipped update. Every item model's update has this layout
    (MF: embeddings, biases; the hybrid adds its adapter after them).
    """
    if bias_share <= 0:
        return clip_update(arrays, clip)[0]
    if not 0 < bias_share < 1:
        raise ValueError(f"bias_share must be in (0, 1), got {bias_share}")
    rest = clip_update([arrays[0], *arrays[2:]], clip * np.sqrt(1.0 - bias_share))[0]
    bias = clip_update([arrays[1]], clip * np.sqrt(bias_share))[0][0]
    return [rest[0], bias, *rest[1:]]


#: Secure noise: each coordinate is the sum of this many independent draws of std/2 (Opacus'
#: secure mode uses four), so no single floating-point Gaussian sample is released.
SECURE_DRAWS = 4


class GaussianNoise:
    """Gaussian noise source. ``seed=None``: secure (os.urandom + Box-Muller, the sum of
    :data:`SECURE_DRAWS` draws per coordinate); otherwise a seeded NumPy generator
    (reproducible, NOT for production)."""

    def __init__(self, seed: int | list[int] | None = None) -> None:
        self.secure = seed is None
        self.seed = seed
        self._rng = None if seed is None else np.random.default_rng(seed)

    def for_round(self, server_round: int) -> "GaussianNoise":
        """The source for one round: secure stays secure; a seeded source is re-derived from
        (seed, round) so an interrupted and resumed run draws the same noise."""
        if self.secure:
            return self
        base = self.seed if isinstance(self.seed, list) else [self.seed]
        return GaussianNoise([*base, server_round])

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        n = int(np.prod(shape))
        if not self.secure:
            return self._rng.normal(0.0, std, size=shape)
        draws = sum(_urandom_normal(n) for _ in range(SECURE_DRAWS))
        return (draws * (std / np.sqrt(SECURE_DRAWS))).reshape(shape)


def _urandom_normal(n: int) -> np.ndarray:
    """``n`` standard normal draws from os.urandom by the Box-Muller transform."""
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m)
    # 53-bit uniforms in (0, 1]: never 0, so log() is finite.
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]


def noisy_mean(update_sum: list[np.ndarray], *, noise_multiplier: float, clip: float, expected_cohort: float,
               noise: GaussianNoise) -> list[np.ndarray]:
    """``(Σ clipped updates + N(0, (σC)²)) / (q·N)``, one noise draw per coordinate, once."""
    if expected_cohort <= 0:
        raise ValueError(f"expected cohort q·N must be > 0, got {expected_cohort}")
    std = noise_multiplier * clip
    return [(np.asarray(s, dtype=np.float64) + noise.normal(np.shape(s), std)) / expected_cohort for s in update_sum]


def local_bound(noise_multiplier: float, clip: float) -> float:
    """Largest magnitude of one coordinate of a locally noised update."""
    return clip * (1.0 + LOCAL_TAIL * noise_multiplier)


def add_local_noise(arrays: list[np.ndarray], *, noise_multiplier: float, clip: float,
                    noise: GaussianNoise) -> list[np.ndarray]:
    """Local DP on the device: ``clipped + N(0, (σC)²)`` per coordinate, clamped to
    ±:func:`local_bound` (post-processing). ``arrays`` must already be clipped to L2 ≤ ``clip``."""
    if noise_multiplier <= 0 or clip <= 0:
        raise ValueError(f"local DP needs σ > 0 and clip > 0, got σ={noise_multiplier}, clip={clip}")
    bound = local_bound(noise_multiplier, clip)
    return [np.clip(np.asarray(a, dtype=np.float64) + noise.normal(np.shape(a), noise_multiplier * clip),
                    -bound, bound).astype(np.float32) for a in arrays]


def local_noise_for(seed: int | None, server_round: int, client_id: int) -> GaussianNoise:
    """A device's noise source for one round: secure (``seed`` None), or seeded per
    (seed, round, client) for tests, so a Flower run and the in-process runner draw the same."""
    from common.streams import Stream, key

    return GaussianNoise(None if seed is None else key(Stream.LOCAL_NOISE, seed, server_round, client_id))


def ledger_for(mode: str, delta: float, partition: str = "user") -> PrivacyLedger:
    """The run's ledger. The unit is always the user; the relation is add/remove for central DP
    with one user per client, replace-one where a user's client sends either way (local DP; a
    user inside a silo)."""
    replace = mode == "local" or partition == "silo"
    return PrivacyLedger(delta=delta, unit=Unit.USER,
                         relation=Relation.REPLACE_ONE if replace else Relation.ADD_OR_REMOVE_ONE)


def release_event(mode: str, *, noise_multiplier: float, sample_rate: float, parameters: tuple[str, ...],
                  server_round: int) -> MechanismEvent:
    """What one round releases about one user.

    central: a Poisson-subsampled Gaussian on the sum (σ over the clip C), amplified at rate q
    (the cohort is drawn secretly: see :mod:`common.sampling`). local: each device's own Gaussian
    release (σ over C); the server sees who reported, so no amplification is claimed
    (:attr:`Sampling.NONE`): conservatively, every round is charged to every user, as if each
    took part in all of them. The ledger's relation (replace-one for local DP) accounts for two
    updates of one device differing by up to 2C.
    """
    if mode == "local":
        return MechanismEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1,
                              sampling=Sampling.NONE, parameters=parameters, round=server_round,
                              note="local DP: device-side Gaussian, no amplification claimed")
    return MechanismEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1,
                          sampling=Sampling.POISSON, parameters=parameters, round=server_round)
