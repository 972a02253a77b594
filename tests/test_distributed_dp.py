"""Distributed DP's device and server sides (issue #14): rotation, conditional rounding, encode and
decode through a modular sum, the wrap bound of the field, and refusal of rounds below n_min."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from common.privacy import distributed
from common.privacy.discrete_gaussian import RandomWords
from common.privacy.distributed import (
    DistributedDpParams,
    TooFewSurvivors,
    TooManySurvivors,
    conditional_round,
    decode,
    encode,
    hadamard,
    modular_sum,
    padded_dim,
    rotate,
    rotation_signs,
    unrotate,
)
from common.secure_sum import check_server_sum, noisy_sum_wrap_bound


def params(**change) -> DistributedDpParams:
    base = {"clip": 1.0, "gamma": 1e-3, "local_variance": 40_000, "dim": 3000, "modulus_bits": 24,
            "min_survivors": 3, "max_survivors": 8}
    return DistributedDpParams(**{**base, **change})


def unit_vectors(k: int, dim: int, norm: float = 0.9, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [v * (norm / math.sqrt(v @ v)) for v in rng.standard_normal((k, dim))]


# ---------------------------------------------------------------- rotation
def test_the_hadamard_matrix_squares_to_d_times_identity():
    d = 16
    h = np.stack([hadamard(e) for e in np.eye(d)])
    assert set(np.unique(h)) == {-1.0, 1.0} and np.allclose(h, h.T) and np.allclose(h @ h, d * np.eye(d))


def test_the_rotation_is_orthogonal_and_inverted_by_the_server():
    x = np.random.default_rng(1).standard_normal(3000)
    signs = rotation_signs(padded_dim(3000), run_seed=7, server_round=2)
    y = rotate(x, signs)
    assert y.size == 4096 and math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)
    assert np.allclose(unrotate(y, signs, 3000), x)


def test_one_coordinate_cannot_carry_the_norm_after_rotation():
    spike = np.zeros(3000)
    spike[17] = 1.0
    y = rotate(spike, rotation_signs(4096, run_seed=0, server_round=1))
    assert np.allclose(np.abs(y), 1 / 64)  # 1/√D everywhere


def test_rotation_signs_are_public_and_fixed_by_run_seed_and_round():
    a = rotation_signs(4096, run_seed=7, server_round=2)
    assert np.array_equal(a, rotation_signs(4096, run_seed=7, server_round=2))
    assert not np.array_equal(a, rotation_signs(4096, run_seed=7, server_round=3))
    assert not np.array_equal(a, rotation_signs(4096, run_seed=8, server_round=2))
    assert set(np.unique(a)) == {-1, 1} and abs(int(a.sum())) < 4 * 64
    # The format, for a device written in another language: SHAKE-256 of the domain, the run seed
    # (16 bytes, signed big-endian) and the round (8 bytes, big-endian); bit 1 (MSB first) is −1.
    key = b"fedrec/ddp/rotation-signs/v1" + (0).to_bytes(16, "big", signed=True) + (1).to_bytes(8, "big")
    byte = hashlib.shake_256(key).digest(2)
    bits = [(byte[i // 8] >> (7 - i % 8)) & 1 for i in range(16)]
    assert rotation_signs(16, run_seed=0, server_round=1).tolist() == [1 - 2 * b for b in bits]
    assert rotation_signs(16, run_seed=0, server_round=1).tolist() == [1, 1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                      1, -1, 1, 1, 1, -1]
    assert np.array_equal(rotation_signs(64, run_seed=0, server_round=1)[:16],
                          rotation_signs(16, run_seed=0, server_round=1))


# ---------------------------------------------------------------- conditional rounding
def test_conditional_rounding_keeps_the_norm_bound_and_is_unbiased():
    p = params()
    scaled = rotate(unit_vectors(1, 3000, norm=1.0)[0], rotation_signs(4096, run_seed=0, server_round=0)) / p.gamma
    src = RandomWords(seed=2)
    draws = []
    for _ in range(200):
        rounded, bound_sq, n = conditional_round(scaled, p.norm_bound, src)
        assert rounded.dtype == np.int64 and int(rounded @ rounded) <= bound_sq == math.floor(p.norm_bound**2)
        assert np.all(np.abs(rounded - scaled) < 1) and n >= 1
        draws.append(rounded)
    mean = np.mean(draws, axis=0)
    assert np.abs(mean - scaled).max() < 5 * 0.5 / math.sqrt(200)  # unbiased coordinate-wise


def test_conditional_rounding_refuses_an_input_it_cannot_bound(monkeypatch):
    monkeypatch.setattr(distributed, "MAX_ROUNDING_DRAWS", 5)
    scaled = np.full(4096, 0.5)  # norm 32 > the bound for a clip of 0 in grid units
    with pytest.raises(RuntimeError, match="clipped"):
        conditional_round(scaled, distributed.ddgauss.rounded_l2_bound(0.0, 4096, 0.6) - 20, RandomWords(seed=0))


# ---------------------------------------------------------------- encode / sum / decode
def test_the_server_recovers_the_noisy_sum_and_adds_nothing():
    p = params()
    updates = unit_vectors(5, 3000)
    encoded = [encode(u, p, run_seed=3, server_round=9, src=RandomWords(seed=i)) for i, u in enumerate(updates)]
    for e in encoded:
        assert e.values.dtype == np.uint64 and e.values.size == 4096 and int(e.values.max()) < p.modulus
        assert e.norm_bound_squared == math.floor(p.norm_bound**2)
    total = modular_sum([e.values for e in encoded], p)
    noisy = decode(total, 5, p, run_seed=3, server_round=9)
    error = noisy - np.sum(updates, axis=0)
    # the error is the survivors' noise (5 shares of γ·σ each, rotated back) plus rounding (≤ γ/2 per share)
    expected_std = math.sqrt(5 * p.local_std**2 + 5 * p.gamma**2 / 6)
    assert error.std() == pytest.approx(expected_std, rel=0.05) and abs(error.mean()) < 5 * expected_std / 50


def test_a_round_with_fewer_or_more_survivors_than_planned_is_refused():
    p = params()
    total = modular_sum([encode(u, p, run_seed=1, server_round=1).values for u in unit_vectors(2, 3000)], p)
    with pytest.raises(TooFewSurvivors, match="abandon"):
        decode(total, 2, p, run_seed=1, server_round=1)
    with pytest.raises(TooManySurvivors, match="abandon"):
        decode(total, 9, p, run_seed=1, server_round=1)


def test_the_device_clips_again_and_draws_fresh_noise_from_the_csprng():
    p = params(local_variance=1)
    big = unit_vectors(1, 3000, norm=5.0)[0]
    sums = decode(modular_sum([encode(big, p, run_seed=0, server_round=0).values for _ in range(3)], p), 3, p,
                  run_seed=0, server_round=0)
    assert np.linalg.norm(sums / 3) == pytest.approx(1.0, rel=0.01)  # clipped to C, not 5
    a, b = (encode(big, p, run_seed=0, server_round=0).values for _ in range(2))
    assert not np.array_equal(a, b)


def test_a_wrong_round_or_seed_at_the_server_gives_garbage():
    p = params()
    updates = unit_vectors(3, 3000)
    total = modular_sum([encode(u, p, run_seed=1, server_round=4).values for u in updates], p)
    wrong = decode(total, 3, p, run_seed=1, server_round=5)
    assert np.corrcoef(wrong, np.sum(updates, axis=0))[0, 1] < 0.2


# ---------------------------------------------------------------- the field
def test_the_wrap_bound_holds_in_simulation_and_a_too_small_field_wraps():
    """With a field the bound calls safe the decoded sum is right; with a field the bound gives up
    on (P(wrap) ≤ 1) the same shares come out wrong."""
    p = params(modulus_bits=18, local_variance=400)
    bound = noisy_sum_wrap_bound(modulus_bits=18, clients=4, norm=p.clip / p.gamma, dim=4096, local_variance=400)
    assert bound < 1e-6
    updates = unit_vectors(4, 3000, norm=1.0)
    enc = [encode(u, p, run_seed=2, server_round=1, src=RandomWords(seed=i)) for i, u in enumerate(updates)]
    good = decode(modular_sum([e.values for e in enc], p), 4, p, run_seed=2, server_round=1)
    assert np.abs(good - np.sum(updates, axis=0)).max() < 1e-3 * 200
    small = params(modulus_bits=7, local_variance=400)  # (a real server refuses it: check_server_sum)
    assert noisy_sum_wrap_bound(modulus_bits=7, clients=4, norm=small.clip / small.gamma, dim=4096,
                                local_variance=400) == 1.0
    wrapped = decode(modular_sum([e.values & np.uint64(small.modulus - 1) for e in enc], small), 4, small,
                     run_seed=2, server_round=1)
    assert np.abs(wrapped - np.sum(updates, axis=0)).max() > 0.1


def test_the_wrap_bound_is_a_union_of_sub_gaussian_tails():
    v = (10 * 100.0) ** 2 / 1024 + 10 * 900.0
    slack = 2**13 - 10
    assert noisy_sum_wrap_bound(modulus_bits=14, clients=10, norm=100.0, dim=1024, local_variance=900.0) == \
        pytest.approx(2 * 1024 * math.exp(-slack**2 / (2 * v)))
    assert noisy_sum_wrap_bound(modulus_bits=4, clients=10, norm=1.0, dim=8, local_variance=1.0) == 1.0
    with pytest.raises(ValueError, match="int64"):
        check_server_sum(10**6, 2**50)


@pytest.mark.parametrize("change, match", [
    ({"gamma": 1e-12}, "too fine"), ({"local_variance": 0}, "local_variance"), ({"modulus_bits": 63}, "<= 62"),
    ({"clip": float("nan")}, "clip"), ({"beta": 1.0}, "beta"), ({"min_survivors": True}, "min_survivors"),
    ({"max_survivors": 2}, "max_survivors"),
])
def test_bad_parameters_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        params(**change)
