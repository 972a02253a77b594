"""The arithmetic of SecAgg+'s masked sum, sized so that what it reveals is what DP accounts for.

Flower's SecAgg+ (``secaggplus_mod`` / ``SecAggPlusWorkflow``) quantizes each client's update
stochastically to integers in ``[0, T]`` with ``T = 2^bits`` over ``[−r, r]`` (r: the clipping
range), prepends the weight factor ``T`` (a client of weight 1), masks everything modulo ``M``
and the server unmasks the sum modulo ``M``. Two things can go wrong, and this module sizes the
protocol so that neither does:

* **Wrapping.** With n survivors the true sum of each coordinate, and the weight factor, reach
  ``n·T``. If ``n·T ≥ M`` they wrap: the extracted weight factor is wrong and the dequantized
  aggregate comes out scaled (×171.7 at 1,030 survivors with Flower's default M = 2^32 and
  22 bits), and is then noised as if its sensitivity were C. :func:`modulus_for` gives the
  smallest power of two above ``N·T`` for the largest cohort a round can have (the whole
  population N); :func:`expected_weight_factor` is what the unmasked factor must equal.
* **Rounding adds to the sensitivity.** Stochastic rounding moves each coordinate by less than
  one quantization step ``2r/T``, so a clipped update of norm ≤ C can come out of the protocol
  with norm up to ``C + √d·2r/T`` (1.44·C typical, 3.58·C worst at 8 bits on ML-100K).
  Central DP sizes its noise for the norm *after* quantization, so the device clips to
  :func:`clip_before_rounding` = ``C − √d·2r/T`` instead of C, and :func:`rounding_margin` above
  :data:`MAX_ROUNDING_MARGIN` of C is refused as too coarse a bit width.

Under local DP the noise is added before quantization, so rounding is post-processing and
needs no margin.

Distributed DP (:mod:`common.privacy.distributed`) sums integer vectors that already carry
unbounded discrete Gaussian noise, so no deterministic modulus holds their sum:
:func:`noisy_sum_wrap_bound` bounds the probability that it wraps, and :func:`check_server_sum`
is the same int64 limit :func:`modulus_for` enforces. A wrapped sum is post-processing of the
noisy sum (it costs accuracy, never privacy), so a tail bound is the right tool there.
"""

from __future__ import annotations

import math

#: The server adds the masked vectors of up to N clients in int64 before reducing modulo M,
#: so N·M must stay below 2^63.
INT64_LIMIT = 2**63

#: Largest share of the clip C that rounding may add to one update's norm (the device clips
#: to C·(1 − margin)); a bit width that needs more is refused.
MAX_ROUNDING_MARGIN = 0.01


def modulus_for(max_clients: int, bits: int) -> int:
    """The smallest power-of-two modulus M with ``max_clients · 2^bits < M`` (nothing wraps when
    at most ``max_clients`` quantized vectors and weight factors are summed).

    Raises
    ------
    ValueError
        When the server's int64 sum of ``max_clients`` masked vectors (each < M) could
        overflow: fewer bits are needed for that many clients.
    """
    if max_clients < 1:
        raise ValueError(f"max_clients must be ≥ 1, got {max_clients}")
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be in [1, 62], got {bits}")
    modulus = 1 << (max_clients * (1 << bits)).bit_length()  # > max_clients·2^bits
    modulus = max(modulus, 1 << (bits + 1))  # Flower requires M > T
    if max_clients * modulus >= INT64_LIMIT:
        raise ValueError(
            f"SecAgg+ with {bits}-bit quantization cannot sum {max_clients} clients without overflow "
            f"(modulus 2^{modulus.bit_length() - 1} × {max_clients} clients ≥ 2^63): use at most "
            f"{max_bits_for(max_clients)} bits (secagg.quantization-bits)")
    return modulus


def check_server_sum(max_clients: int, modulus: int) -> None:
    """Refuse a modulus whose masked vectors (each < ``modulus``) could overflow the server's
    int64 sum of ``max_clients`` of them."""
    if max_clients < 1 or modulus < 2:
        raise ValueError(f"need max_clients >= 1 and modulus >= 2, got {max_clients}, {modulus}")
    if max_clients * modulus >= INT64_LIMIT:
        raise ValueError(f"a modulus of 2^{modulus.bit_length() - 1} cannot be summed over {max_clients} "
                         "clients in int64 (their product reaches 2^63): use fewer bits")


def noisy_sum_wrap_bound(*, modulus_bits: int, clients: int, norm: float, dim: int, local_variance: float) -> float:
    """Upper bound on the probability that the sum of ``clients`` distributed-DP vectors leaves
    the centred range [−M/2, M/2) of M = 2^``modulus_bits`` in any of ``dim`` coordinates.

    Coordinate j of the sum (grid units) is signal + rounding + noise:

    * signal: the j-th coordinate of the randomized Hadamard rotation of Σᵢ xᵢ, of norm at most
      ``clients·norm``; with random signs it is a Rademacher sum, sub-Gaussian with variance proxy
      (clients·norm)²/dim (Hoeffding);
    * rounding: each client moves it by less than 1, so by less than ``clients`` in all;
    * noise: a sum of ``clients`` discrete Gaussians N_Z(0, σ²), each σ²-sub-Gaussian
      (Canonne–Kamath–Steinke 2020), independent of the signal.

    So with v = (clients·norm)²/dim + clients·σ² and slack s = M/2 − clients,
    P(wrap) ≤ dim · 2·exp(−s²/(2v)) (sub-Gaussian tail, union bound over coordinates).
    """
    if modulus_bits < 2 or clients < 1 or dim < 1 or norm < 0 or local_variance < 0:
        raise ValueError("need modulus_bits >= 2, clients >= 1, dim >= 1, norm >= 0 and local_variance >= 0")
    slack = 2.0 ** (modulus_bits - 1) - clients
    if slack <= 0:
        return 1.0
    variance = (clients * norm) ** 2 / dim + clients * local_variance
    if variance == 0:
        return 0.0
    return min(1.0, 2.0 * dim * math.exp(-slack**2 / (2.0 * variance)))


def max_bits_for(max_clients: int) -> int:
    """The most quantization bits :func:`modulus_for` accepts for ``max_clients`` clients."""
    bits = 62
    while bits > 1:
        modulus = max(1 << (max_clients * (1 << bits)).bit_length(), 1 << (bits + 1))
        if max_clients * modulus < INT64_LIMIT:
            return bits
        bits -= 1
    return 1


def expected_weight_factor(survivors: int, bits: int) -> int:
    """What the unmasked weight factor must equal when ``survivors`` clients of weight 1 summed."""
    return survivors * (1 << bits)


def rounding_margin(dim: int, bits: int, value_range: float, clip: float) -> float:
    """Largest L2 norm that stochastic rounding can add to one update of ``dim`` values quantized
    over ``[−value_range, value_range]`` with ``2^bits`` levels, as a share of ``clip``."""
    if dim < 1 or clip <= 0 or value_range <= 0:
        raise ValueError(f"need dim ≥ 1, clip > 0 and value_range > 0, got {dim}, {clip}, {value_range}")
    step = 2.0 * value_range / (1 << bits)
    return math.sqrt(dim) * step / clip


def clip_before_rounding(clip: float, *, dim: int, bits: int) -> float:
    """The L2 bound a device clips to so that its update *after* SecAgg+'s rounding (range = the
    clip itself) still has norm ≤ ``clip``: ``clip·(1 − margin)``.

    Raises
    ------
    ValueError
        When the margin exceeds :data:`MAX_ROUNDING_MARGIN` (too few bits for this model size).
    """
    margin = rounding_margin(dim, bits, clip, clip)
    if margin > MAX_ROUNDING_MARGIN:
        needed = math.ceil(math.log2(2.0 * math.sqrt(dim) / MAX_ROUNDING_MARGIN))
        raise ValueError(
            f"secagg.quantization-bits={bits} is too coarse for a model of {dim} values: rounding could add "
            f"{margin:.1%} of the clip norm to one update (DP assumes at most C); use at least {needed} bits")
    return clip * (1.0 - margin)
