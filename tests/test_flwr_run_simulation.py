"""Flower's own path gives simulate.py's run directory (issue 17): ``flwr run .`` against a
local simulation federation and ``python simulate.py`` run the same small seeded configuration
(seeded cohorts and DP noise, no SecAgg+: its stochastic quantization is not seeded) and write
the same files, the same final model and checkpoint bit for bit, the same metrics and ledger.

The SuperLink is the one ``flwr run`` starts for a ``:local:`` connection (``flower-superlink
--insecure --simulation --isolation subprocess``, here without run-time ``uv sync``), started
here on free ports so that the test owns it and ends it, with everything it started.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_block_csv

ROOT = Path(__file__).resolve().parents[1]
# Wall-clock fields of metrics.jsonl (a round's, its release's): different in every run.
TIMING = {"seconds", "release_seconds"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(data: Path) -> dict:
    return {"data.source": str(data), "fed.rounds": 2, "fed.sample-rate": 0.7, "fed.eval-every": 10,
            "model.dim": 8, "fed.server-lr": 0.05, "fed.sampling-seed": 0, "dp.noise-seed": 7,
            "secagg.enabled": False}


def _simulate(overrides: dict, runs: Path, env: dict) -> Path:
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}")]
    proc = subprocess.run([sys.executable, "simulate.py", *sets, "--runs-dir", str(runs), "--no-progress",
                           "--num-cpus", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = runs.iterdir()
    return run


def _stop_tree(proc: subprocess.Popen) -> None:
    """The SuperLink this test started and what it started (flwr-simulation, Ray), by pid."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()


def _flwr_run(overrides: dict, run_dir: Path, clients: int, tmp: Path, env: dict) -> None:
    from server.deploy.commands import executable
    from server.deploy.flwr_cli import run_log, start_run, wait_for_run

    home = tmp / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    command = [executable("flower-superlink"), "--insecure", "--simulation",
               "--isolation", "subprocess", "--disable-runtime-dependency-installation",  # no `uv sync` offline
               "--host", "127.0.0.1", "--port", str(port), "--control-api-address", f"127.0.0.1:{_free_port()}",
               "--health-server-address", f"127.0.0.1:{_free_port()}"]
    superlink = subprocess.Popen(command, cwd=tmp, env={**env, "FLWR_HOME": str(home)},
                                 stdout=(tmp / "superlink.log").open("w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the SuperLink is up when its port answers
            assert superlink.poll() is None and time.monotonic() < deadline, (tmp / "superlink.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        run_id = start_run(ROOT, home, connection="sim", workdir=tmp,
                           run_config={**overrides, "run-dir": str(run_dir)},
                           federation_config={"num-supernodes": clients, "client-resources-num-cpus": 1})
        status = wait_for_run(run_id, home, connection="sim", timeout=240, poll=2)
        assert status.ok, f"{status}\n{run_log(run_id, home, 'sim', lines=80)}"
    finally:
        _stop_tree(superlink)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_flwr_run_on_a_simulation_federation_writes_the_run_directory_simulate_py_writes(tmp_path):
    from client.data import num_clients
    from common.config import RunConfig
    from common.serialization import load_arrays

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
           # the SuperLink starts `flwr-simulation` by name: this environment's, even when it is off PATH
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    data = write_block_csv(tmp_path / "ratings.csv")
    overrides = _overrides(data)
    cfg = RunConfig.from_flat(overrides)
    clients = num_clients(cfg.data, cfg.fed.partition, cfg.fed.num_silos, cfg.seed)

    sim = _simulate(overrides, tmp_path / "runs", env)
    flwr = tmp_path / "flwr-run"
    _flwr_run(overrides, flwr, clients, tmp_path, env)

    files = sorted(p.name for p in sim.iterdir())
    assert sorted(p.name for p in flwr.iterdir()) == files
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "checkpoint.safetensors", "ledger.json",
                 "items.csv", "privacy_report.json", "summary.md"):
        assert name in files

    # The run config reached the ServerApp: the same resolved config but for where it lives.
    sim_cfg, flwr_cfg = (json.loads((d / "config.json").read_text()) for d in (sim, flwr))
    assert flwr_cfg.pop("run-dir") == str(flwr) and sim_cfg.pop("run-dir") == ""
    assert flwr_cfg == sim_cfg and sim_cfg["data.source"] == str(data) and sim_cfg["fed.rounds"] == 2

    # The same cohorts, updates and seeded noise: the models are equal bit for bit.
    for name in ("model.safetensors", "checkpoint.safetensors"):
        a, b = load_arrays(sim / name), load_arrays(flwr / name)
        assert sorted(a) == sorted(b), name
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")

    fits = [r for r in _rows(sim / "metrics.jsonl") if r.get("kind") == "fit"]
    assert len(fits) == 2 and all(r["participants"] > 0 for r in fits)
    assert _rows(flwr / "metrics.jsonl") == _rows(sim / "metrics.jsonl")
    assert json.loads((flwr / "ledger.json").read_text()) == json.loads((sim / "ledger.json").read_text())
    assert (flwr / "items.csv").read_bytes() == (sim / "items.csv").read_bytes()
    # The privacy report says the same but for which run it is ("run": its id, path and time).
    sim_report, flwr_report = (json.loads((d / "privacy_report.json").read_text()) for d in (sim, flwr))
    assert flwr_report.pop("run")["path"] == str(flwr) and sim_report.pop("run")["path"] == str(sim)
    assert flwr_report == sim_report
