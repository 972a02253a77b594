"""The device's privacy floor is its owner's, never the server's (issue #11, items 7 and 8).

Unit tests of :func:`common.privacy.device.protection_for`, the ClientApp's use of it, and a
malicious ServerApp in a real Flower simulation that tries to get an un-noised, unclipped or
predictably noised update out of a device."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from common import keys
from common.config import RunConfig
from common.data import load_interactions
from common.data.splits import split_interactions
from common.evaluation import EvalSets
from common.models import ClientData
from common.models.mf.model import MFModel
from common.models.mf.params import init_items
from common.privacy.device import DEFAULT_POLICY, DevicePolicy, PolicyRefusal, protection_for

LOCAL = DevicePolicy(clip=1.0, local_noise=2.0)
HONEST = {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 1.0, keys.BIAS_SHARE: 0.05, keys.LOCAL_NOISE: 2.0}


def norm(arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


@pytest.mark.parametrize(("instruction", "reason"), [
    ({k: v for k, v in HONEST.items() if k != keys.LOCAL_NOISE}, "asks for none"),
    ({k: v for k, v in HONEST.items() if k != keys.CLIP_NORM}, "no clip norm"),
    ({**HONEST, "noise-seed": 7}, "noise-seed"),
    ({**HONEST, keys.LOCAL_NOISE: 0.5}, "below this device's floor"),
])
def test_a_local_dp_device_refuses_what_would_weaken_its_noise(instruction, reason):
    with pytest.raises(PolicyRefusal, match=reason):
        protection_for(LOCAL, instruction)
    assert protection_for(LOCAL, HONEST).local_noise == 2.0
    assert protection_for(LOCAL, {**HONEST, keys.LOCAL_NOISE: 5.0}).local_noise == 5.0  # more privacy is fine


def test_the_server_may_only_tighten_the_clip():
    assert protection_for(DEFAULT_POLICY, {keys.SERVER_ROUND: 1}).clip == 1.0  # omitted: the device's own
    assert protection_for(DEFAULT_POLICY, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 100.0}).clip == 1.0
    assert protection_for(DEFAULT_POLICY, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 0.25}).clip == 0.25
    assert math.isinf(protection_for(DevicePolicy(clip=math.inf), {keys.SERVER_ROUND: 1}).clip)
    with pytest.raises(PolicyRefusal, match="clip-norm"):
        protection_for(DEFAULT_POLICY, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: float("nan")})


def test_policies_combine_to_the_stricter_and_come_from_the_node_config():
    node = DevicePolicy.from_node_config({"privacy-clip": "0.5", "privacy-local-noise": 3}, LOCAL)
    assert (node.clip, node.local_noise) == (0.5, 3.0)
    assert DevicePolicy.from_node_config({}, None) == DEFAULT_POLICY
    looser = DevicePolicy.from_node_config({"privacy-clip": 10, "privacy-local-noise": 0}, LOCAL)
    assert (looser.clip, looser.local_noise) == (1.0, 2.0)  # a node config cannot loosen the store's floor
    with pytest.raises(ValueError, match="privacy-clip"):
        DevicePolicy.from_node_config({"privacy-clip": "lots"})


def _client(block_csv, policy, **flat):
    from client.app import RecClient

    cfg = RunConfig.from_flat({"data.source": str(block_csv), "model.dim": 8, **flat})
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    params = init_items(sets.n_items, 8, seed=0, scale=2.0).to_arrays()  # large: the raw update is far above C
    return RecClient(cfg, ClientData.from_sets(0, np.array([0]), sets), context, policy,
                     model=MFModel(cfg.model, sets.n_items)), params


def test_the_client_clips_to_its_own_bound_whatever_the_server_says(block_csv):
    client, params = _client(block_csv, DEFAULT_POLICY, **{"dp.enabled": False, "secagg.enabled": False})
    for instruction in ({keys.SERVER_ROUND: 1}, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 1e6}):
        arrays, _, _ = client.fit(params, instruction)
        assert norm(arrays) <= 1.0 + 1e-6
    arrays, _, _ = client.fit(params, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 0.1})
    assert norm(arrays) <= 0.1 + 1e-6


def test_the_run_config_cannot_seed_a_devices_noise(block_csv):
    """Under ``flwr run`` the run config is the server's: a seed there is refused."""
    from client.app import client_fn_for

    ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_PARTITION_ID: 0}, state=RecordDict(),
                  run_config={"data.source": str(block_csv), "dp.noise-seed": 5, "dp.mode": "local"})
    with pytest.raises(PolicyRefusal, match="seeded noise"):
        client_fn_for(None)(ctx)
    # the same seed in a central-DP run seeds the server's noise, not the device's: nothing to refuse,
    # and the device's own noise stays secure if its owner asks for local noise
    central = Context(run_id=1, node_id=1, node_config={keys.NODE_PARTITION_ID: 0}, state=RecordDict(),
                      run_config={"data.source": str(block_csv), "dp.noise-seed": 5})
    assert client_fn_for(None)(central).numpy_client.policy.noise_seed is None
    noisy = Context(run_id=1, node_id=1, node_config={keys.NODE_PARTITION_ID: 0, "privacy-local-noise": 2.0},
                    state=RecordDict(), run_config={"data.source": str(block_csv), "dp.noise-seed": 5})
    with pytest.raises(PolicyRefusal, match="seeded noise"):
        client_fn_for(None)(noisy)


@pytest.mark.slow
def test_a_malicious_serverapp_gets_four_refusals_from_a_local_dp_device(block_csv):
    """A ServerApp that omits the noise, omits the clip, sends a seed or asks for σ below the
    device's floor gets an error reply each time, never an update; the honest instruction gets an
    update whose norm is the device's noise."""
    from flwr.app import Message
    from flwr.app.message_type import MessageType
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import build_client_app

    cfg = RunConfig.from_flat({"data.source": str(block_csv), "model.dim": 4, "secagg.enabled": False,
                               "dp.mode": "local", "dp.noise-multiplier": 2.0})
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    params = ndarrays_to_parameters(init_items(sets.n_items, 4, seed=0).to_arrays())
    attempts = [{k: v for k, v in HONEST.items() if k != keys.LOCAL_NOISE},
                {k: v for k, v in HONEST.items() if k != keys.CLIP_NORM},
                {**HONEST, "noise-seed": 7},
                {**HONEST, keys.LOCAL_NOISE: 0.5},
                HONEST]
    replies: list[Message] = []
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        import time

        deadline = time.monotonic() + 60
        while not list(grid.get_node_ids()) and time.monotonic() < deadline:  # nodes register after start-up
            time.sleep(0.2)
        node = sorted(grid.get_node_ids())[0]
        for config in attempts:
            content = recorddict_compat.fitins_to_recorddict(FitIns(params, config), keep_input=True)
            replies.extend(grid.send_and_receive([Message(content, node, MessageType.TRAIN)], timeout=120))

    run_simulation(server_app=app, client_app=build_client_app(cfg, policy=LOCAL), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    assert len(replies) == 5
    for reply, reason in zip(replies[:4], ("asks for none", "no clip norm", "noise-seed", "below this device")):
        assert reply.has_error() and reason in reply.error.reason, reply.error
    honest = replies[4]
    assert not honest.has_error()
    update = recorddict_compat.recorddict_to_fitres(honest.content, keep_input=True)
    from flwr.common import parameters_to_ndarrays

    arrays = parameters_to_ndarrays(update.parameters)
    size = sum(a.size for a in arrays)
    assert norm(arrays) == pytest.approx(2.0 * np.sqrt(size), rel=0.15)  # the device's own noise σC
    assert keys.M_TRAIN_LOSS not in update.metrics
