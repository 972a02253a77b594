"""Run directories that a crash cannot make lie (issue #11, item 10): one atomic checkpoint with
the ledger inside, a torn metrics line tolerated, damaged files named in a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.models.mf.model import model_file
from common.models.mf.params import init_items
from common.privacy.dp_fedavg import ledger_for, release_event
from server.run_dir import RunDir, RunDirError

ROOT = Path(__file__).resolve().parents[1]


def _round_state(rnd: int):
    """The model, optimizer state and ledger a run has after round ``rnd`` (each distinct)."""
    params = init_items(6, 2, seed=rnd)
    ledger = ledger_for("central", 1e-4)
    for r in range(1, rnd + 1):
        ledger.record(release_event("central", noise_multiplier=1.0, sample_rate=0.1,
                                    parameters=("item_embeddings", "item_bias"), server_round=r))
    return model_file(params)[0], {"step": np.array([rnd], dtype=np.int64)}, {"ledger": ledger.state_dict()}


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_crash_while_checkpointing_never_mixes_two_rounds(tmp_path, monkeypatch, fail_at):
    """Crash at the first or the second file operation of round 2's checkpoint: what resume loads is
    round 1's model with round 1's ledger, or round 2's with round 2's -- never round 2's model with
    round 1's ledger (the two-file checkpoint allowed that: a release the ledger never recorded)."""
    run = RunDir.create(tmp_path, RunConfig())
    run.save_checkpoint(1, *_round_state(1))
    calls = {"n": 0}
    real_replace = os.replace

    def crashing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    try:
        run.save_checkpoint(2, *_round_state(2))
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    rnd, named, opt, extra = run.load_checkpoint()
    expected, _, _ = _round_state(rnd)
    np.testing.assert_array_equal(named["item_embeddings"], expected["item_embeddings"])
    assert int(opt["step"][0]) == rnd
    assert [e["round"] for e in extra["ledger"]["events"]] == list(range(1, rnd + 1))


def test_the_checkpoint_is_one_file_with_the_ledger_inside(tmp_path):
    run = RunDir.create(tmp_path, RunConfig())
    run.save_checkpoint(3, *_round_state(3))
    assert not (run.path / "checkpoint.json").exists()
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint.safetensors", "config.json"]
    assert run.checkpoint_round() == 3


def test_a_damaged_checkpoint_stops_with_an_error_naming_the_file(tmp_path):
    run = RunDir.create(tmp_path, RunConfig())
    run.save_checkpoint(1, *_round_state(1))
    data = (run.path / "checkpoint.safetensors").read_bytes()
    (run.path / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="checkpoint.safetensors: damaged checkpoint"):
        run.load_checkpoint()


def test_simulate_resume_of_a_damaged_run_is_one_error_line(tmp_path):
    run = RunDir.create(tmp_path, RunConfig())
    run.save_checkpoint(1, *_round_state(1))
    (run.path / "checkpoint.safetensors").write_bytes(b"\x00" * 40)
    done = subprocess.run([sys.executable, "simulate.py", "--resume", str(run.path), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "damaged checkpoint" in done.stderr and "Traceback" not in done.stderr


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_is_named(tmp_path):
    run = RunDir.create(tmp_path, RunConfig())
    for r in (1, 2):
        run.log_round({"kind": "fit", "round": r})
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "fit", "rou')  # the crash cut round 3's row
    assert [r["round"] for r in run.rounds()] == [1, 2]
    run.truncate_metrics(2)  # what a resume does: the torn line is gone, later rows append cleanly
    run.log_round({"kind": "fit", "round": 3})
    assert [r["round"] for r in run.rounds()] == [1, 2, 3]
    text = (run.path / "metrics.jsonl").read_text().splitlines()
    (run.path / "metrics.jsonl").write_text("\n".join([text[0], "{oops", *text[1:]]) + "\n")
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2"):
        run.rounds()


def test_a_damaged_config_is_named(tmp_path):
    run = RunDir.create(tmp_path, RunConfig())
    (run.path / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match="config.json: damaged"):
        run.config()
    (run.path / "config.json").write_text(json.dumps({"fed.rounds": "many"}))
    with pytest.raises(RunDirError, match="fed.rounds"):
        run.config()


def test_reported_silo_epsilons_never_go_down(tmp_path):
    run = RunDir.create(tmp_path, RunConfig())
    run.save_client_epsilons({0: 2.0, 1: 3.0})
    run.save_client_epsilons({0: 1.5, 1: 3.5})  # e.g. a resumed client that lost its history
    assert json.loads((run.path / "client_epsilons.json").read_text()) == {"0": 2.0, "1": 3.5}
