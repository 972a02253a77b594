"""``simulate.py --ray-address``: the same federation on an existing Ray cluster. A head and a
worker are started on this machine as two Ray nodes (loopback addresses only, one CPU each, so
the two clients of a round run one per node); the run's model equals the in-process runner's for
the same seeded configuration, which equals a one-node Ray run (tests/test_distributed_rounds.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.inprocess import run_inprocess

NODE_IP = "127.0.0.2"  # loopback; Ray rewrites the literal 127.0.0.1 to the machine's public address


def free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster():
    import tempfile

    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it (108-byte paths)
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address", NODE_IP, "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--temp-dir", temp, *common], check=True, env=env, capture_output=True,
                       timeout=120)
        subprocess.run([ray, "start", "--address", f"{NODE_IP}:{port}", *common], check=True, env=env,
                       capture_output=True, timeout=120)
        yield f"{NODE_IP}:{port}"
    finally:
        import ray as ray_module

        ray_module.shutdown()
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_run_across_two_ray_nodes_equals_the_one_node_run(two_node_cluster, block_csv, tmp_path):
    import ray

    from common.data import load_interactions
    from common.data.splits import split_interactions
    from common.evaluation import EvalSets
    from common.serialization import load_arrays
    from server import simulation
    from server.run_dir import RunDir

    cluster = simulation.connect_ray(two_node_cluster)
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and cluster["CPU"] == 2  # two nodes, one client slot each
    assert {n["NodeManagerAddress"] for n in alive} == {NODE_IP}
    cfg = RunConfig.from_flat({"data.source": str(block_csv), "fed.rounds": 2, "fed.sample-rate": 0.7,
                               "fed.eval-every": 10, "model.dim": 8, "fed.server-lr": 0.05, "dp.noise-seed": 7,
                               "fed.sampling-seed": 0, "secagg.enabled": False})
    run_dir = RunDir.create(tmp_path / "runs", cfg)
    result = simulation.run(cfg, run_dir, progress=False, num_cpus=1.0, ray_address=two_node_cluster)
    assert result["ray_cluster"]["CPU"] == 2
    fits = [r for r in run_dir.rounds() if r["kind"] == "fit"]
    assert len(fits) == 2 and all(r["participants"] > 0 for r in fits)
    flower = load_arrays(run_dir.path / "model.safetensors")
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    local = run_inprocess(cfg, sets)
    np.testing.assert_array_equal(flower["item_embeddings"], local.params.embeddings)
    np.testing.assert_array_equal(flower["item_bias"], local.params.bias)


def test_a_ray_address_nobody_answers_is_one_line_and_no_run(tmp_path, capsys):
    from server import simulation

    port = free_port()  # nothing listens there
    code = simulation.main(["--ray-address", f"{NODE_IP}:{port}", "--rounds", "1", "--runs-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--ray-address {NODE_IP}:{port}: no Ray cluster answers there" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
    assert simulation.main(["--ray-address", "nohost", "--rounds", "1", "--runs-dir", str(tmp_path)]) == 2
    assert "expected HOST:PORT of a Ray head" in capsys.readouterr().err
