"""Exact discrete Gaussian noise from the OS CSPRNG, vectorised.

Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020
(arXiv 2004.00010), [CKS20]: N_Z(0, σ²) puts mass ∝ exp(−x²/(2σ²)) on every integer x. Their
sampler uses only integer arithmetic and fair coins, so nothing is rounded anywhere (the
floating-point attacks on continuous Gaussian noise, Mironov 2012, have nothing to work on):

* Algorithm 1: Bernoulli(exp(−γ)) for rational γ ∈ [0, 1] from Bernoulli(γ/k) coins (von
  Neumann), extended to γ > 1 as ⌊γ⌋ Bernoulli(exp(−1)) coins and one Bernoulli(exp(−frac γ)).
* Algorithm 2: the discrete Laplace of integer scale t by rejection.
* Algorithm 3: the discrete Gaussian by rejection from the discrete Laplace of scale
  t = ⌊σ⌋ + 1, accepting Y with probability exp(−(|Y| − σ²/t)²/(2σ²)).

Here σ² is an integer (the device rounds the planned variance up, never down). Each rejection
loop draws candidates for all missing samples at once (the accepted candidates of an i.i.d.
rejection sampler are i.i.d. draws of its target), and ⌊γ⌋ Bernoulli(exp(−1)) coins that must all
succeed are read as one geometric run. Every coin is exact: a Bernoulli(a/b) is a uniform integer
below b (by rejection from 32- or 64-bit words) compared with a, and when b does not fit in 63
bits the comparison is made on the binary expansion of a/b, 64 bits at a time. The one cap, ⌊γ⌋ ≤
2^62, changes an acceptance probability below exp(−2^62) and is never reached in practice.
Randomness comes from ``os.urandom``; a seeded source exists for tests and says it is not secure.
"""

from __future__ import annotations

import os

import numpy as np

_U64 = np.uint64
_MAX_U64 = _U64(0xFFFFFFFFFFFFFFFF)
_READ_AHEAD = 1 << 16  # words per os.urandom call (512 KiB)
#: Candidates drawn per missing sample in the two rejection loops: the discrete Laplace accepts
#: with probability ≥ 1 − e^{-1} ≈ 0.63; the discrete Gaussian step, measured, ≥ ~0.7.
_OVERSAMPLE_LAPLACE = 1.65
_OVERSAMPLE_GAUSS = 1.45


class RandomWords:
    """Uniform 64-bit words: ``os.urandom`` (``seed=None``, secure) or a seeded NumPy generator
    (reproducible, NOT for production: the noise is then known to whoever knows the seed)."""

    def __init__(self, seed: int | None = None) -> None:
        self.secure = seed is None
        self._rng = None if seed is None else np.random.default_rng(seed)
        self._pool = np.empty(0, dtype=np.uint64)  # os.urandom read ahead in large blocks

    def words(self, n: int) -> np.ndarray:
        """``n`` independent uniform ``uint64`` words."""
        if self._rng is not None:
            return self._rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
        if n > self._pool.size:
            fresh = np.frombuffer(os.urandom(8 * max(n, _READ_AHEAD)), dtype=np.uint64)
            self._pool = np.concatenate([self._pool, fresh])
        out, self._pool = self._pool[:n], self._pool[n:]
        return out

    def below(self, bound: np.ndarray) -> np.ndarray:
        """One exact uniform integer in ``[0, bound)`` per entry (``1 ≤ bound < 2^63``), by
        rejection from 32-bit words when every bound fits in 31 bits, else from 64-bit words."""
        bound = np.asarray(bound, dtype=np.uint64)
        narrow = bound.size and int(bound.max()) < 2**31
        kind, top = (np.uint32, np.uint32(0xFFFFFFFF)) if narrow else (np.uint64, _MAX_U64)
        bound = bound.astype(kind)
        limit = (top // bound) * bound  # a multiple of bound: [0, limit) folds evenly
        out = np.empty(bound.shape, dtype=kind)
        todo = np.arange(bound.size)
        while todo.size:
            w = self.words((todo.size + 1) // 2).view(np.uint32)[: todo.size] if narrow else self.words(todo.size)
            ok = w < limit[todo]
            out[todo[ok]] = w[ok] % bound[todo[ok]]
            todo = todo[~ok]
        return out.astype(np.uint64)

    def bernoulli(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        """Exact Bernoulli(num/den) per entry, 0 ≤ num ≤ den < 2^63 (int arrays)."""
        return self.below(den) < np.asarray(num, dtype=np.uint64)


def _bernoulli_big(num: np.ndarray, den: np.ndarray, src: RandomWords) -> np.ndarray:
    """Exact Bernoulli(num/den) for Python-int (object) arrays with 0 ≤ num < den of any size:
    compare a uniform word with the next 64 bits of num/den's binary expansion until they differ."""
    out = np.zeros(num.shape, dtype=bool)
    todo = np.arange(num.size)
    rem = num.copy()
    while todo.size:
        shifted = rem[todo] * (1 << 64)
        digits = (shifted // den[todo]).astype(np.uint64)
        rem[todo] = shifted % den[todo]
        w = src.words(todo.size)
        out[todo[w < digits]] = True
        todo = todo[w == digits]  # equal with probability 2^-64: look at the next 64 bits
    return out


def _bernoulli_exp_fraction(num: np.ndarray, den: np.ndarray, src: RandomWords) -> np.ndarray:
    """[CKS20] Algorithm 1: Bernoulli(exp(−num/den)) for 0 ≤ num/den ≤ 1, one per entry.

    ``num``, ``den`` are int64 arrays (or object arrays of Python ints for large values).
    Bernoulli(γ/K) is drawn as Bernoulli(γ) AND Bernoulli(1/K), which has the same probability.
    """
    big = num.dtype == object
    k = np.ones(num.shape, dtype=np.int64)
    open_ = np.arange(num.size)
    while open_.size:
        coin = (_bernoulli_big(num[open_], den[open_], src) if big
                else src.bernoulli(num[open_], den[open_]))
        coin &= src.below(k[open_].astype(np.uint64)) == 0  # Bernoulli(1/K)
        k[open_[coin]] += 1
        open_ = open_[coin]
    return k % 2 == 1


def _geometric_exp_minus_one(n: int, src: RandomWords) -> np.ndarray:
    """``n`` draws of G = the number of Bernoulli(exp(−1)) successes before the first failure,
    so P(G ≥ w) = exp(−w). Drawn as the run lengths of one long sequence of such coins (runs
    between failures of i.i.d. coins are i.i.d.), which takes a fixed number of array passes."""
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        length = int((n - out.size) * 1.7) + 64  # a run ends with probability 1 − e^{-1} ≈ 0.63
        one = np.ones(length, dtype=np.int64)
        failures = np.flatnonzero(~_bernoulli_exp_fraction(one, one, src))
        runs = np.diff(np.concatenate([[-1], failures])) - 1  # successes before each failure
        out = np.concatenate([out, runs])
    return out[:n]


def _bernoulli_exp(whole: np.ndarray, num: np.ndarray, den: np.ndarray, src: RandomWords) -> np.ndarray:
    """Bernoulli(exp(−(whole + num/den))) with integer ``whole`` ≥ 0 and 0 ≤ num/den < 1:
    ``whole`` Bernoulli(exp(−1)) coins (a run of at least ``whole`` successes) and one
    Bernoulli(exp(−num/den)), all of which must come up 1."""
    return _bernoulli_exp_fraction(num, den, src) & (_geometric_exp_minus_one(whole.size, src) >= whole)


def discrete_laplace(scale: int, size: int, src: RandomWords) -> np.ndarray:
    """[CKS20] Algorithm 2: ``size`` draws of the discrete Laplace, P(x) ∝ exp(−|x|/scale).

    Rejection sampling; each pass draws candidates for all missing samples at once (accepted
    candidates of an i.i.d. rejection sampler are i.i.d. draws of its target)."""
    if scale < 1 or scale >= 2**62:
        raise ValueError(f"scale must be an integer in [1, 2^62), got {scale}")
    t = np.int64(scale)
    found: list[np.ndarray] = []
    missing = size
    while missing > 0:
        m = int(missing * _OVERSAMPLE_LAPLACE) + 16
        u = src.below(np.full(m, scale, dtype=np.uint64)).astype(np.int64)
        keep = _bernoulli_exp_fraction(u, np.full(m, t), src)  # Bernoulli(exp(−U/t))
        x = u + t * _geometric_exp_minus_one(m, src)
        negative = np.unpackbits(src.words((m + 63) // 64).view(np.uint8))[:m].astype(bool)
        keep &= ~(negative & (x == 0))  # −0 is rejected so that 0 is not counted twice
        accepted = np.where(negative, -x, x)[keep][:missing]
        found.append(accepted)
        missing -= accepted.size
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def sample_discrete_gaussian(variance: int, size: int, src: RandomWords | None = None) -> np.ndarray:
    """[CKS20] Algorithm 3: ``size`` independent draws of N_Z(0, σ²) with σ² = ``variance``.

    Parameters
    ----------
    variance:
        σ², a positive integer (grid units; round a planned variance *up* to get one).
    size:
        Number of draws (≥ 0).
    src:
        Source of fair coins; ``None`` is the OS CSPRNG.

    Returns
    -------
    numpy.ndarray
        int64 draws. Their variance is slightly below σ² ([CKS20]: Var < σ²); the privacy
        analysis uses σ², never the variance.
    """
    if isinstance(variance, bool) or not isinstance(variance, (int, np.integer)) or variance < 1:
        raise ValueError(f"variance must be a positive integer, got {variance!r}")
    variance = int(variance)
    src = RandomWords() if src is None else src
    t = int(np.sqrt(variance))  # ⌊σ⌋, corrected for float error below
    while t * t > variance:
        t -= 1
    while (t + 1) * (t + 1) <= variance:
        t += 1
    t += 1
    den = 2 * variance * t * t  # γ = (|Y|·t − σ²)² / (2σ²t²)
    found: list[np.ndarray] = []
    missing = size
    while missing > 0:
        m = int(missing * _OVERSAMPLE_GAUSS) + 16
        y = discrete_laplace(t, m, src)
        offset = np.abs(y).astype(object) * t - variance
        square = offset * offset
        # ⌊γ⌋ coins of exp(−1); beyond 2^62 the acceptance probability is below exp(−2^62) anyway.
        whole = np.minimum(square // den, 2**62).astype(np.int64)
        frac = square % den
        den_arr = np.full(m, den, dtype=object)
        if den < 2**62:
            frac, den_arr = frac.astype(np.int64), den_arr.astype(np.int64)
        accepted = y[_bernoulli_exp(whole, frac, den_arr, src)][:missing]
        found.append(accepted)
        missing -= accepted.size
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)
