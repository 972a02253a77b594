"""The SecAgg+ fault matrix (issue #12): one client crashes, or hangs past the timeout, at each
SecAgg+ stage, under central and under local DP, in a real Flower simulation. Each cell checks
the documented rule (docs/SECURITY.md, "Faults during a round"):

* setup, share keys, upload: the client is left out, the round completes with the others;
* unmask: the client's masked vector is already in the sum and its neighbours' shares unmask
  it, so the round completes with everyone;
* every round is charged once to the ledger (central: a Poisson-sampled Gaussian; local: every
  round), and the round after the faults completes with everyone.

One simulation per (fault, DP mode) runs all four stages: round 1 clean, rounds 2-5 a fault at
setup, share keys, upload, unmask, round 6 clean."""

from __future__ import annotations

import time

import pytest
from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import simulate
from common.config import RunConfig
from server.run_dir import RunDir
from tests.conftest import write_block_csv

pytestmark = pytest.mark.slow

CLIENTS, FAULTY, TIMEOUT, HANG = 10, 3, 15.0, 22.0
FAULT_ROUNDS = {2: Stage.SETUP, 3: Stage.SHARE_KEYS, 4: Stage.COLLECT_MASKED_VECTORS, 5: Stage.UNMASK}
STAGE_NAMES = {Stage.SETUP: "setup", Stage.SHARE_KEYS: "share-keys", Stage.COLLECT_MASKED_VECTORS: "upload",
               Stage.UNMASK: "unmask"}
# the documented outcome: participants in the faulty round
EXPECTED_PARTICIPANTS = {Stage.SETUP: CLIENTS - 1, Stage.SHARE_KEYS: CLIENTS - 1,
                         Stage.COLLECT_MASKED_VECTORS: CLIENTS - 1, Stage.UNMASK: CLIENTS}


def fault(kind: str):
    def mod(msg: Message, context: Context, call_next):
        rec = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        stage = None if rec is None else rec.get(Key.STAGE)
        rnd = int(msg.metadata.group_id) if str(msg.metadata.group_id).isdigit() else None
        if int(context.node_config["partition-id"]) == FAULTY and stage and FAULT_ROUNDS.get(rnd) == stage:
            if kind == "hang":
                time.sleep(HANG)  # the reply comes after the server stopped waiting
            raise RuntimeError(f"device {kind} at {STAGE_NAMES[stage]}")
        return call_next(msg, context)

    return mod


_RUNS: dict[tuple[str, str], RunDir] = {}


def matrix_run(kind: str, mode: str, tmp_path_factory, monkeypatch_module) -> RunDir:
    if (kind, mode) not in _RUNS:
        from client import app as client_app

        csv = write_block_csv(tmp_path_factory.mktemp("fm") / "r.csv", n_users=CLIENTS)
        cfg = RunConfig.from_flat({"data.source": str(csv), "fed.rounds": 6, "fed.sample-rate": 1.0,
                                   "fed.eval-every": 100, "fed.eval-clients": 0, "fed.timeout": TIMEOUT,
                                   "model.dim": 4, "dp.mode": mode, "dp.noise-multiplier": 3.0 if mode == "local"
                                   else 1.0, "dp.noise-seed": 0, "dp.target-epsilon": 0})
        original = client_app.build_client_app
        monkeypatch_module.setattr(client_app, "build_client_app", lambda c: original(c, mods=[fault(kind)]))
        run_dir = RunDir.create(tmp_path_factory.mktemp("runs"), cfg)
        simulate.run(cfg, run_dir, progress=False)
        monkeypatch_module.setattr(client_app, "build_client_app", original)
        _RUNS[(kind, mode)] = run_dir
    return _RUNS[(kind, mode)]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("stage", list(FAULT_ROUNDS.values()), ids=lambda s: STAGE_NAMES[s])
@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("kind", ["crash", "hang"])
def test_fault_cell(kind, mode, stage, tmp_path_factory, monkeypatch_module):
    run_dir = matrix_run(kind, mode, tmp_path_factory, monkeypatch_module)
    fits = {r["round"]: r for r in run_dir.rounds() if r["kind"] == "fit"}
    rnd = next(r for r, s in FAULT_ROUNDS.items() if s == stage)
    assert not fits[rnd].get("abandoned"), fits[rnd]
    assert fits[rnd]["participants"] == EXPECTED_PARTICIPANTS[stage], fits[rnd]
    # every round, faulty or not, is charged exactly once
    events = [e["round"] for e in run_dir.load_ledger()["ledger"]["events"]]
    assert events == [1, 2, 3, 4, 5, 6]
    assert fits[rnd]["epsilon"] > fits[rnd - 1]["epsilon"]
    # the clean rounds around the faults complete with everyone
    assert fits[1]["participants"] == fits[6]["participants"] == CLIENTS
