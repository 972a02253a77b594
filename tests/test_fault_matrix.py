"""The SecAgg+ fault matrix (issue #12): one client crashes, or hangs past the timeout, at each
SecAgg+ stage, under central and under local DP, in a real Flower simulation. Each cell checks
the documented rule (docs/SECURITY.md, "Faults during a round"):

* setup, share keys, upload: the client is left out, the round completes with the others;
* unmask: the client's masked vector is already in the sum and its neighbours' shares unmask
  it, so the round completes with everyone;
* every round is charged once to the ledger (central: a Poisson-sampled Gaussian; local: every
  round), and the round after the faults completes with everyone.

One simulation per DP mode runs every cell: round 1 clean (it also pays Ray's start-up), rounds 2-5
a crash at setup, share keys, upload, unmask, rounds 6-9 a hang past the timeout at the same
stages, round 10 clean."""

from __future__ import annotations

import time

import pytest
from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from common.config import RunConfig
from server import simulation
from server.run_dir import RunDir
from tests.conftest import write_block_csv

pytestmark = pytest.mark.slow

# The timeout bounds a hang round (4 per mode); stages of 10 dim-4 clients take well under a second.
CLIENTS, FAULTY, TIMEOUT, HANG = 10, 3, 12.0, 16.0
STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
FAULTS = {**{2 + k: ("crash", s) for k, s in enumerate(STAGES)}, **{6 + k: ("hang", s) for k, s in enumerate(STAGES)}}
ROUNDS = 10
STAGE_NAMES = {Stage.SETUP: "setup", Stage.SHARE_KEYS: "share-keys", Stage.COLLECT_MASKED_VECTORS: "upload",
               Stage.UNMASK: "unmask"}
# the documented outcome: participants in the faulty round
EXPECTED_PARTICIPANTS = {Stage.SETUP: CLIENTS - 1, Stage.SHARE_KEYS: CLIENTS - 1,
                         Stage.COLLECT_MASKED_VECTORS: CLIENTS - 1, Stage.UNMASK: CLIENTS}


def fault(msg: Message, context: Context, call_next):
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    stage = None if rec is None else rec.get(Key.STAGE)
    rnd = int(msg.metadata.group_id) if str(msg.metadata.group_id).isdigit() else None
    kind, at = FAULTS.get(rnd, (None, None))
    if int(context.node_config["partition-id"]) == FAULTY and stage and stage == at:
        if kind == "hang":
            time.sleep(HANG)  # the reply comes after the server stopped waiting
        raise RuntimeError(f"device {kind} at {STAGE_NAMES[stage]}")
    return call_next(msg, context)


_RUNS: dict[str, RunDir] = {}


def matrix_run(mode: str, tmp_path_factory, monkeypatch_module) -> RunDir:
    if mode not in _RUNS:
        from client import app as client_app

        csv = write_block_csv(tmp_path_factory.mktemp("fm") / "r.csv", n_users=CLIENTS)
        cfg = RunConfig.from_flat({"data.source": str(csv), "fed.rounds": ROUNDS, "fed.sample-rate": 1.0,
                                   "fed.eval-every": 100, "fed.eval-clients": 0, "fed.timeout": TIMEOUT,
                                   "model.dim": 4, "dp.mode": mode, "dp.noise-multiplier": 3.0 if mode == "local"
                                   else 1.0, "dp.noise-seed": 0, "dp.target-epsilon": 0})
        original = client_app.build_client_app
        monkeypatch_module.setattr(client_app, "build_client_app", lambda c: original(c, mods=[fault]))
        run_dir = RunDir.create(tmp_path_factory.mktemp("runs"), cfg)
        simulation.run(cfg, run_dir, progress=False)
        monkeypatch_module.setattr(client_app, "build_client_app", original)
        _RUNS[mode] = run_dir
    return _RUNS[mode]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: STAGE_NAMES[s])
@pytest.mark.parametrize("kind", ["crash", "hang"])
@pytest.mark.parametrize("mode", ["central", "local"])
def test_fault_cell(mode, kind, stage, tmp_path_factory, monkeypatch_module):
    run_dir = matrix_run(mode, tmp_path_factory, monkeypatch_module)
    fits = {r["round"]: r for r in run_dir.rounds() if r["kind"] == "fit"}
    rnd = next(r for r, f in FAULTS.items() if f == (kind, stage))
    assert not fits[rnd].get("abandoned"), fits[rnd]
    assert fits[rnd]["participants"] == EXPECTED_PARTICIPANTS[stage], fits[rnd]
    # every round, faulty or not, is charged exactly once
    events = [e["round"] for e in run_dir.load_ledger()["ledger"]["events"]]
    assert events == list(range(1, ROUNDS + 1))
    assert fits[rnd]["epsilon"] > fits[rnd - 1]["epsilon"]
    # the round after the faults completes with everyone
    assert fits[ROUNDS]["participants"] == CLIENTS, fits[ROUNDS]
