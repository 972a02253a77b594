"""SecAgg+'s arithmetic sized so that what it reveals is what DP accounts for (issue #11, items 2
and 3): no wrapping of the masked sum, a weight factor that must be n·2^bits, and quantization
that cannot push one update's norm above C."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.privacy.dp_fedavg import clip_update, global_norm
from common.secure_sum import (
    MAX_ROUNDING_MARGIN,
    clip_before_rounding,
    expected_weight_factor,
    max_bits_for,
    modulus_for,
    rounding_margin,
)

ML100K_DIM = 1682 * 65  # item embeddings (64) + biases


def test_the_modulus_holds_the_largest_possible_sum():
    assert modulus_for(943, 22) == 2**32  # ML-100K at the default 22 bits: Flower's default was just enough
    assert modulus_for(1024, 22) == 2**33  # ... and 1,024 clients were one too many
    assert modulus_for(1100, 22) == 2**33 and modulus_for(300, 24) == 2**33
    for n, bits in ((1, 8), (943, 22), (1100, 22), (100_000, 16), (10**6, 8)):
        m = modulus_for(n, bits)
        assert n * 2**bits < m <= 2 * n * 2**bits + 2 ** (bits + 1) and m & (m - 1) == 0
        assert n * m < 2**63  # the server's int64 sum of n masked vectors
    assert expected_weight_factor(1100, 22) == 1100 * 2**22


def test_a_configuration_that_could_overflow_is_refused():
    with pytest.raises(ValueError, match="at most"):
        modulus_for(10**6, 40)
    bits = max_bits_for(10**6)
    modulus_for(10**6, bits)
    with pytest.raises(ValueError):
        modulus_for(10**6, bits + 1)


def _flower_round_trip(arrays, clip, bits, rng):
    """What SecAgg+ does to one update: Flower's own stochastic quantization and dequantization."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    np.random.seed(int(rng.integers(2**31)))  # Flower rounds with numpy's global generator
    return dequantize(quantize(arrays, clip, 2**bits), clip, 2**bits)


def test_rounding_could_push_a_clipped_update_above_c_and_the_margin_prevents_it():
    """The old path clipped to C and let SecAgg+ round: at 8 bits a clipped ML-100K update came
    out of the protocol with norm ≈ 1.44·C; clipping to C·(1 − margin) keeps it ≤ C."""
    rng = np.random.default_rng(0)
    clip, dim = 1.0, ML100K_DIM
    update = [rng.standard_normal(dim).astype(np.float32)]
    at_c = clip_update(update, clip)[0]
    assert global_norm(_flower_round_trip(at_c, clip, 8, rng)) > 1.3 * clip  # the defect
    for bits in (18, 22, 26):
        inner = clip_before_rounding(clip, dim=dim, bits=bits)
        assert inner < clip
        for _ in range(3):
            assert global_norm(_flower_round_trip(clip_update(update, inner)[0], clip, bits, rng)) <= clip
    # the bound is a worst case: every coordinate moved by a full step still stays within C
    inner = clip_before_rounding(clip, dim=dim, bits=18)
    step = 2 * clip / 2**18
    worst = clip_update(update, inner)[0][0].astype(np.float64) + step * np.sign(update[0])
    assert np.linalg.norm(worst) <= clip + 1e-12


def test_bit_widths_too_coarse_for_the_model_are_refused():
    assert rounding_margin(ML100K_DIM, 22, 1.0, 1.0) < 2e-4
    assert rounding_margin(ML100K_DIM, 8, 1.0, 1.0) == pytest.approx(math.sqrt(ML100K_DIM) * 2 / 256)
    with pytest.raises(ValueError, match="at least 17 bits"):
        clip_before_rounding(1.0, dim=ML100K_DIM, bits=8)
    assert clip_before_rounding(1.0, dim=ML100K_DIM, bits=17) >= 1 - MAX_ROUNDING_MARGIN


def _strategy(tmp_path, **flat):
    from common.config import RunConfig
    from common.models.mf.model import MFModel
    from common.rounds import RoundEngine
    from server.run_dir import RunDir
    from server.secagg import SecAggPlusWorkflowWithEarlyDropouts
    from server.strategy import FedRecStrategy

    cfg = RunConfig.from_flat({"fed.rounds": 3, "model.dim": 4, "dp.noise-seed": 1, "fed.server-opt": "sgd",
                               "fed.server-lr": 1.0, "dp.target-epsilon": 0, **flat})
    engine = RoundEngine(cfg, MFModel(cfg.model, 20))
    workflow = SecAggPlusWorkflowWithEarlyDropouts(num_shares=3, reconstruction_threshold=2)
    strategy = FedRecStrategy(cfg, RunDir.create(tmp_path, cfg), engine, grid=None, secagg_workflow=workflow)
    strategy.client_ids = {str(i): i for i in range(10)}
    return strategy, engine.params


class _Proxy:
    def __init__(self, cid: str) -> None:
        self.cid, self.node_id = cid, int(cid) + 100


def _results(mean: list[np.ndarray], n: int):
    from flwr.common import FitRes, Status, ndarrays_to_parameters
    from flwr.common.typing import Code

    return [(_Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), 1, {})) for i in range(n)]


def test_an_aggregate_whose_weight_factor_is_not_n_times_two_to_the_bits_is_refused(tmp_path):
    """A client that claims another weight, or a sum that wrapped, shows in the unmasked weight
    factor: the aggregate is refused, the round releases noise only and is charged."""
    strategy, params = _strategy(tmp_path)
    mean = [np.full((20, 4), 0.01), np.full(20, 0.01)]
    strategy.current_round, strategy._row = 1, {"round": 1, "sampled": 5}
    strategy.secagg_workflow.last_weight_factor = expected_weight_factor(5, 22) + 2**22  # one extra weight
    parameters, _ = strategy.aggregate_fit(1, _results(mean, 5), [])
    assert parameters is None and "weight factor" in strategy._row["refused"]
    strategy.evaluate(1, None)  # the workflow's per-round bookkeeping
    assert strategy._row.get("abandoned") and len(strategy.engine.ledger.events) == 1  # charged
    noise = strategy.engine.params.bias - params.bias  # noise only: σC/(qN) per coordinate, no 0.01 drift
    assert abs(float(np.mean(noise))) < 3 * 1.03 / (0.1 * 10) / np.sqrt(20)

    strategy.current_round, strategy._row, strategy._released = 2, {"round": 2, "sampled": 5}, False
    strategy.secagg_workflow.last_weight_factor = expected_weight_factor(5, 22)
    parameters, _ = strategy.aggregate_fit(2, _results(mean, 5), [])
    assert parameters is not None and "refused" not in strategy._row


def test_the_modulus_is_sized_for_the_population_each_round(tmp_path):
    strategy, _ = _strategy(tmp_path)
    strategy.client_ids = {str(i): i for i in range(1100)}
    strategy._size_secagg(1100)
    assert strategy.secagg_workflow.modulus_range == 2**33


def test_a_mean_beyond_the_value_range_is_refused_and_the_sum_clamp_bounds_what_is_released(tmp_path):
    """Poisoning under SecAgg+ (docs/SECURITY.md): the server sees only the survivors' mean. One
    whose coordinate lies beyond ±ρ·C cannot come from honest clients (refused: noise-only
    release); an acceptable one is clamped to ±fed.sum-clamp per coordinate of the sum."""
    strategy, params = _strategy(tmp_path, **{"secagg.value-range": 0.1, "fed.sum-clamp": 0.2, "dp.enabled": False})
    assert strategy.engine.value_bound(secure_aggregation=True) == pytest.approx(0.1)
    mean = [np.full((20, 4), 0.01), np.full(20, 0.01)]
    mean[1][3] = 0.15
    strategy.current_round, strategy._row = 1, {"round": 1, "sampled": 5}
    strategy.secagg_workflow.last_weight_factor = expected_weight_factor(5, 22)
    parameters, _ = strategy.aggregate_fit(1, _results(mean, 5), [])
    assert parameters is None and strategy._row["failures"] == 5
    strategy.evaluate(1, None)
    assert strategy._row.get("abandoned")
    np.testing.assert_allclose(strategy.engine.params.bias, params.bias, atol=1e-6)  # nothing released

    mean[1][3] = 0.09  # the sum 0.45 is clamped to 0.2: the released mean moves by 0.2 / 5
    strategy.current_round, strategy._row, strategy._released = 2, {"round": 2, "sampled": 5}, False
    parameters, _ = strategy.aggregate_fit(2, _results(mean, 5), [])
    assert parameters is not None
    moved = strategy.engine.params.bias - params.bias
    assert moved[3] == pytest.approx(0.04, abs=1e-4) and moved[0] == pytest.approx(0.01, abs=1e-4)
