"""fedrec-client on a tiny catalogue whose right answers are known, and the device data path of
the ClientApp (node_config ``data-path``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.cli import main
from client.store import DeviceStore
from common import keys
from common.config import RunConfig
from common.data.items_file import write_items_file
from common.models import ItemParams
from common.models.mf.model import model_file
from common.privacy.dp_fedavg import ledger_for
from common.privacy.ledger import MechanismEvent, Sampling
from server.run_dir import RunDir

# Two taste groups: items 0-3 point along one axis, 4-7 along another.
TITLES = ["Star Wars (1977)", "Return of the Jedi (1983)", "Alien (1979)", "Blade Runner (1982)",
          "Emma (1996)", "Sense and Sensibility (1995)", "Persuasion (1995)", "Clueless (1995)"]
IDS = [str(50 + i) for i in range(8)]


def catalogue_params() -> ItemParams:
    rng = np.random.default_rng(0)
    emb = np.zeros((8, 4), dtype=np.float32)
    emb[:4, 0], emb[4:, 1] = 1.0, 1.0
    emb += 0.05 * rng.standard_normal((8, 4)).astype(np.float32)
    return ItemParams(emb, np.zeros(8, dtype=np.float32))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    run = RunDir.create(tmp_path / "runs", RunConfig())  # config.json: the run's model.loss / user-reg
    run.save_model(*model_file(catalogue_params()))
    write_items_file(run.path / "items.csv", IDS, TITLES)
    ratings = tmp_path / "ratings.csv"
    # liked: Star Wars and Return of the Jedi (rating ≥ the mean); disliked: Emma
    ratings.write_text(f"item,rating,timestamp\n{IDS[0]},5,1\n{IDS[1]},5,2\n{IDS[4]},1,3\n")
    return {"db": tmp_path / "device.sqlite", "model": run.path / "model.safetensors",
            "items": run.path / "items.csv", "ratings": ratings, "tmp": tmp_path}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def recommendations(out: str) -> list[tuple[str, str]]:
    """(title, reason) of each recommendation printed."""
    lines = out.splitlines()
    recs = []
    for k, line in enumerate(lines):
        match = re.match(r"^\s*\d+\. (.+)  \(score -?\d+\.\d+\)$", line)
        if match:
            reason = re.match(r"^\s+because you liked (.+) \(similarity -?\d\.\d\d\)$", lines[k + 1])
            assert reason, f"no reason line after {line!r}"
            recs.append((match.group(1), reason.group(1)))
    return recs


def test_import_recommend_status_forget(files, capsys):
    db = files["db"]
    code, out, _ = run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    assert code == 0 and "3 inserted" in out and "8 items" in out

    code, out, err = run_cli(capsys, "recommend", "--db", db, "--k", "3", "--model", files["model"],
                             "--items", files["items"], "--timing")
    assert code == 0, err
    recs = recommendations(out)
    assert len(recs) == 3
    rated = {TITLES[0], TITLES[1], TITLES[4]}
    assert not {title for title, _ in recs} & rated  # rated items are never recommended
    assert {title for title, _ in recs[:2]} == {"Alien (1979)", "Blade Runner (1982)"}  # the liked group first
    assert all(reason in (TITLES[0], TITLES[1]) for _, reason in recs[:2])  # explained by a liked item
    assert re.search(r"timing: [\d.]+ ms .*user vector [\d.]+ ms fitted", out)

    code, out, _ = run_cli(capsys, "--db", db, "recommend", "--model", files["model"], "--items", files["items"],
                           "--timing")
    assert code == 0 and "cached" in out  # the user vector was kept for this model and these ratings
    assert len(recommendations(out)) == 5  # 8 items less 3 rated

    code, out, _ = run_cli(capsys, "--db", db, "status")
    assert code == 0
    assert "ratings: 3" in out and "item catalogue: 8 items" in out and "global model: none" in out
    assert "user vector: stored" in out and "no local release" in out

    code, out, _ = run_cli(capsys, "--db", db, "forget", "--yes")
    assert code == 0 and not db.exists() and not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()


def test_recommend_with_the_stored_global_model_and_dismissals(files, capsys):
    db = files["db"]
    assert run_cli(capsys, "--db", db, "import", files["ratings"])[0] == 0
    params = catalogue_params()
    with DeviceStore(db) as store:
        store.set_global_model(IDS, params.embeddings, params.bias, 12, titles=TITLES, loss="softmax",
                               user_reg=40.0)
        store.add_feedback(IDS[2], "dismiss")  # not Alien, thanks
    code, out, _ = run_cli(capsys, "--db", db, "recommend", "--k", "2")
    assert code == 0 and "round 12" in out
    recs = recommendations(out)
    assert recs[0][0] == "Blade Runner (1982)" and "Alien (1979)" not in {t for t, _ in recs}

    with DeviceStore(db) as store:
        ledger = ledger_for("local", 1e-5)
        ledger.record(MechanismEvent(noise_multiplier=4.0, sample_rate=1.0, steps=1, sampling=Sampling.NONE,
                                     parameters=keys.ITEM_PARAM_NAMES, round=12))
        store.set_ledger_state(ledger.state_dict())
    code, out, _ = run_cli(capsys, "--db", db, "status")
    assert "global model: 8 items x 4, round 12, loss softmax" in out
    assert re.search(r"privacy: epsilon [\d.]+ at delta 1e-05 over 1 releases", out)


def test_unknown_items_are_reported(files, capsys):
    db = files["db"]
    extra = files["tmp"] / "more.csv"
    extra.write_text("item,rating\nnot-in-catalogue,4\n")
    run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    code, out, _ = run_cli(capsys, "--db", db, "import", extra)
    assert code == 0 and "1 rated items are not in the item catalogue" in out and "not-in-catalogue" in out
    code, out, _ = run_cli(capsys, "--db", db, "recommend", "--model", files["model"], "--items", files["items"])
    assert code == 0 and "1 rated items are not in the model's item list" in out


def test_forget_asks_first(files, capsys, monkeypatch):
    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"])
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code, out, _ = run_cli(capsys, "--db", db, "forget")
    assert code == 1 and db.exists() and "not deleted" in out
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert run_cli(capsys, "--db", db, "forget")[0] == 0 and not db.exists()
    code, out, _ = run_cli(capsys, "--db", db, "forget")
    assert code == 0 and "nothing to forget" in out


@pytest.mark.parametrize("argv, expected", [
    (["recommend"], "no device store here"),
    (["status"], "no device store here"),
    (["import"], "nothing to import"),
    (["import", "{tmp}/missing.csv"], "missing.csv: file not found"),
    (["import", "{tmp}/bad.csv"], "bad.csv:3: column 'rating': expected a number"),
    (["recommend", "--model", "{model}"], "--model and --items go together"),
])
def test_user_mistakes_end_in_one_line_and_exit_2(files, capsys, argv, expected):
    (files["tmp"] / "bad.csv").write_text("item,rating\na,5\nb,five\n")
    argv = [a.format(tmp=files["tmp"], model=files["model"]) for a in argv]
    code, out, err = run_cli(capsys, "--db", files["db"], *argv)
    assert code == 2 and out == ""
    assert err.startswith("fedrec-client: error: ") and expected in err and err.count("\n") == 1


def test_recommend_errors(files, capsys):
    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"])
    code, _, err = run_cli(capsys, "--db", db, "recommend")
    assert code == 2 and "no global model on this device yet" in err
    wrong = files["tmp"] / "wrong-items.csv"
    write_items_file(wrong, IDS[:5], TITLES[:5])
    code, _, err = run_cli(capsys, "--db", db, "recommend", "--model", files["model"], "--items", wrong)
    assert code == 2 and "lists 5 items" in err
    assert run_cli(capsys, "--db", db, "recommend", "--k", "0")[0] == 2  # argparse: a number ≥ 1


# ---------------------------------------------------------------- join

def test_join_dry_run_prints_a_supernode_command_flower_accepts(files, capsys):
    from flwr.common.config import parse_config_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    db = files["db"]
    ca, key = files["tmp"] / "ca.pem", files["tmp"] / "node.key"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    code, out, err = run_cli(capsys, "--db", db, "join", "--superlink", "fedrec.example.org:9092",
                             "--root-certificates", ca, "--auth-key", key, "--port", "9095", "--dry-run")
    assert code == 0, err
    words = shlex.split(out.strip())
    assert words[0] == "FLWR_TELEMETRY_ENABLED=0" and words[1].endswith("flower-supernode")
    command = words[1:]
    for flag, value in [("--superlink", "fedrec.example.org:9092"), ("--root-certificates", str(ca)),
                        ("--auth-supernode-private-key", str(key)), ("--host", "127.0.0.1"), ("--port", "9095"),
                        ("--node-config", f"data-path='{db}'")]:
        assert command[command.index(flag) + 1] == value
    assert "--allow-runtime-dependency-installation" not in command and "--insecure" not in command
    # Flower 1.42's own parser accepts it: TLS on, no run-time dependency installation
    args = _parse_args_run_supernode().parse_args(command[1:])
    assert parse_config_args([args.node_config]) == {keys.NODE_DATA_PATH: str(db)}
    assert args.runtime_dependency_install is False and args.insecure is False and args.port == 9095


@pytest.mark.parametrize("argv, expected", [
    (["--superlink", "nohost", "--root-certificates", "{ca}"], "expected HOST:PORT"),
    (["--superlink", "h:99999", "--root-certificates", "{ca}"], "expected HOST:PORT"),
    (["--superlink", "h:9092", "--root-certificates", "{tmp}/none.pem"], "none.pem: no such file"),
    (["--superlink", "h:9092", "--root-certificates", "{ca}", "--auth-key", "{tmp}/k"], "--auth-key"),
    (["--superlink", "h:9092", "--root-certificates", "{ca}", "--port", "0"], "--port 0"),
])
def test_join_mistakes(files, capsys, argv, expected):
    ca = files["tmp"] / "ca.pem"
    ca.write_text("x")
    run_cli(capsys, "--db", files["db"], "import", files["ratings"], "--items", files["items"])
    argv = [a.format(ca=ca, tmp=files["tmp"]) for a in argv]
    code, _, err = run_cli(capsys, "--db", files["db"], "join", *argv, "--dry-run")
    assert code == 2 and expected in err


def test_join_needs_a_catalogue(files, capsys):
    ca = files["tmp"] / "ca.pem"
    ca.write_text("x")
    run_cli(capsys, "--db", files["db"], "import", files["ratings"])
    code, _, err = run_cli(capsys, "--db", files["db"], "join", "--superlink", "h:9092", "--root-certificates", ca,
                           "--dry-run")
    assert code == 2 and "no item catalogue" in err


# ---------------------------------------------------------------- the ClientApp on a device

def test_client_app_trains_on_the_device_store_and_keeps_model_and_vector(files, capsys):
    from flwr.common import FitIns, ndarrays_to_parameters

    from client.app import DeviceRecClient, client_fn_for

    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    cfg = RunConfig.from_flat({"model.dim": 4})
    ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_DATA_PATH: str(db)}, state=RecordDict(),
                  run_config={})
    client = client_fn_for(cfg)(ctx)
    assert isinstance(client.numpy_client, DeviceRecClient)
    assert client.numpy_client.data.train[0].items.tolist() == [0, 1, 4]
    params = catalogue_params()
    res = client.fit(FitIns(ndarrays_to_parameters(params.to_arrays()),
                            {keys.SERVER_ROUND: 3, keys.LOCAL_EPOCHS: 1, keys.CLIENT_LR: 1.0}))
    assert res.num_examples == 1
    with DeviceStore(db, create=False) as store:
        model = store.get_global_model()
        assert model.round == 2 and model.titles == tuple(TITLES)  # the model of round 2 was sent for round 3
        assert model.embeddings.tobytes() == params.embeddings.tobytes()
    # the vector fitted during training is exactly the one recommend would reconstruct: reused
    code, out, _ = run_cli(capsys, "--db", db, "recommend", "--k", "2", "--timing")
    assert code == 0 and "cached" in out and "round 2" in out

    wrong = ItemParams(np.zeros((5, 4), np.float32), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="global model refused: embeddings of shape .5, 4., this device.s catalogue"):
        client.numpy_client.fit(wrong.to_arrays(), {keys.SERVER_ROUND: 4})


def test_a_device_with_item_texts_trains_the_hybrid_and_recommends_with_it(files, capsys, tmp_path, monkeypatch):
    """The hybrid on a real store: the items file's text column is kept on import, the device
    builds the text side from it (the real MiniLM), trains, and keeps the item side it scores
    with (free part + text vectors), so recommend ranks by the hybrid."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

    from client.app import client_fn_for
    from common.data.items_file import write_items_file
    from common.models import build_model

    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    texts = [f"{t} | {'Sci-Fi Action' if i < 4 else 'Romance Drama'}" for i, t in enumerate(TITLES)]
    items = tmp_path / "items_with_texts.csv"
    write_items_file(items, IDS, TITLES, texts)
    db = files["db"]
    code, out, _ = run_cli(capsys, "--db", db, "import", files["ratings"], "--items", items, "--embed")
    assert code == 0 and "with their texts" in out and "embedding 8 item texts with MiniLM" in out
    with DeviceStore(db, create=False) as store:
        assert store.item_texts() == tuple(texts)
    cfg = RunConfig.from_flat({"model.dim": 4, "model.kind": "hybrid", "model.text-negatives": 2})
    ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_DATA_PATH: str(db)}, state=RecordDict(),
                  run_config={})
    client = client_fn_for(cfg)(ctx)
    server_model = build_model(cfg.model, n_items=len(IDS), seed=0, texts=lambda: texts)
    params = server_model.init(0)
    sent = [*server_model.arrays(params), *server_model.context(params)]
    res = client.fit(FitIns(ndarrays_to_parameters(sent), {keys.SERVER_ROUND: 3, keys.LOCAL_EPOCHS: 1,
                                                           keys.CLIENT_LR: 1.0, keys.TRAINABLE_ARRAYS: 4}))
    update = parameters_to_ndarrays(res.parameters)
    assert [u.shape for u in update] == [a.shape for a in server_model.arrays(params)]  # head trained too
    assert np.abs(update[2]).sum() > 0
    effective = server_model.effective(params, server_model.context(params))
    with DeviceStore(db, create=False) as store:
        model = store.get_global_model()
        np.testing.assert_array_equal(model.embeddings, effective.embeddings)  # free + text, not the free part
    code, out, _ = run_cli(capsys, "--db", db, "recommend", "--k", "2")
    assert code == 0 and len(recommendations(out)) == 2
    # a NaN in the head (not in the item side the device keeps) is refused before training on it
    poisoned = [a.copy() for a in sent]
    poisoned[2][0, 0] = np.nan
    with pytest.raises(ValueError, match="global model refused: 1 of 1536 values of array 2 are NaN"):
        client.numpy_client.fit(poisoned, {keys.SERVER_ROUND: 4, keys.TRAINABLE_ARRAYS: 4})

    # a catalogue imported without texts (an older server's file): the hybrid cannot run, and says what to do
    other = tmp_path / "other.sqlite"
    run_cli(capsys, "--db", other, "import", files["ratings"], "--items", files["items"])
    with pytest.raises(ValueError, match="import the server's items file again"):
        client_fn_for(cfg)(Context(run_id=2, node_id=1, node_config={keys.NODE_DATA_PATH: str(other)},
                                   state=RecordDict(), run_config={}))
    # texts kept for another item list do not apply to a new catalogue
    with DeviceStore(db, create=False) as store:
        store.set_catalog(IDS[:-1], TITLES[:-1])
        assert store.item_texts() is None


def test_local_dp_on_a_device_is_recorded_in_its_store_across_runs(files, capsys):
    """Local DP: the device's own ledger lives in its SQLite store, so ε keeps adding up over runs
    (whose rounds start at 1 again) and `fedrec-client status` shows it."""
    from client.app import client_fn_for
    from common.privacy import PrivacyLedger, epsilon_for

    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    cfg = RunConfig.from_flat({"model.dim": 4, "dp.mode": "local", "dp.noise-multiplier": 6.0})
    config = {keys.LOCAL_EPOCHS: 1, keys.CLIENT_LR: 1.0, keys.CLIP_NORM: 1.0, keys.LOCAL_NOISE: 6.0}
    params = catalogue_params().to_arrays()
    for run_id, rounds in ((1, (1, 2)), (2, (1,))):  # a second run restarts at round 1
        ctx = Context(run_id=run_id, node_id=1, node_config={keys.NODE_DATA_PATH: str(db)}, state=RecordDict(),
                      run_config={})
        device = client_fn_for(cfg)(ctx).numpy_client
        for rnd in rounds:
            device.fit(params, {**config, keys.SERVER_ROUND: rnd})
    with DeviceStore(db, create=False) as store:
        ledger = PrivacyLedger.from_state_dict(store.ledger_state())
    assert [e.round for e in ledger.events] == [1, 2, 3]
    expected = epsilon_for(noise_multiplier=3.0, sample_rate=1.0, delta=cfg.dp.delta, rounds=3)
    assert ledger.epsilon() == pytest.approx(expected)
    code, out, _ = run_cli(capsys, "--db", db, "status")
    assert code == 0 and f"epsilon {expected:.3g}" in out and "3 releases" in out


def test_client_app_without_data_path_keeps_the_simulation_path(block_csv):
    from client.app import DeviceRecClient, client_fn_for

    cfg = RunConfig.from_flat({"data.source": str(block_csv), "model.dim": 4})
    ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_PARTITION_ID: 0}, state=RecordDict(), run_config={})
    client = client_fn_for(cfg)(ctx)
    assert not isinstance(client.numpy_client, DeviceRecClient)


def test_device_without_catalogue_fails_clearly(files, capsys):
    from client.app import client_fn_for

    run_cli(capsys, "--db", files["db"], "import", files["ratings"])
    ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_DATA_PATH: str(files["db"])}, state=RecordDict(),
                  run_config={})
    with pytest.raises(ValueError, match="no item catalogue"):
        client_fn_for(RunConfig())(ctx)


def test_the_device_owner_sets_the_privacy_floor_and_the_server_cannot_lower_it(files, capsys):
    """Issue #11 (7): on a real device the floor comes from its store (``fedrec-client privacy
    set``), not from the run config (the server's): an instruction without noise, or with less,
    is refused; with enough it is obeyed and recorded in the device's own ledger."""
    from client.app import client_fn_for
    from common.privacy.device import PolicyRefusal

    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    code, out, _ = run_cli(capsys, "--db", db, "privacy", "set", "--local-noise", "3", "--clip", "0.5")
    assert code == 0 and "sigma >= 3" in out and "<= 0.5" in out
    code, out, _ = run_cli(capsys, "--db", db, "status")
    assert "sigma >= 3" in out
    ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_DATA_PATH: str(db)}, state=RecordDict(),
                  run_config={"model.dim": 4})  # the server's run config: central DP, no local noise
    device = client_fn_for(None)(ctx).numpy_client
    params = catalogue_params().to_arrays()
    with pytest.raises(PolicyRefusal, match="asks for none"):
        device.fit(params, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 1.0})
    with pytest.raises(PolicyRefusal, match="below this device's floor"):
        device.fit(params, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 1.0, keys.LOCAL_NOISE: 1.0})
    arrays, _, _ = device.fit(params, {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 1.0, keys.LOCAL_NOISE: 3.0})
    assert max(float(np.max(np.abs(a))) for a in arrays) <= 0.5 * (1 + 8 * 3.0)  # its own clip 0.5, not 1.0
    with DeviceStore(db, create=False) as store:
        assert len(store.ledger_state()["events"]) == 1


# ---------------------------------------------------------------- bad input on the device (issue #12, finding 5)

ROOT = Path(__file__).resolve().parents[1]


def run_process(*argv) -> subprocess.CompletedProcess:
    """fedrec-client as a user runs it: its own process, its exit status, its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "client.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("fedrec-client: error: ")
    return proc.stderr


def nan_model_files(files) -> tuple[Path, Path]:
    from common.serialization import save_arrays

    params = catalogue_params()
    emb = params.embeddings.copy()
    emb[3, 1] = np.nan
    model = files["tmp"] / "nan" / "model.safetensors"
    model.parent.mkdir()
    save_arrays(model, {keys.ITEM_PARAM_NAMES[0]: emb, keys.ITEM_PARAM_NAMES[1]: params.bias})
    return model, files["items"]


def test_recommend_with_a_nan_model_is_an_error_not_an_empty_top_list(files, capsys):
    db = files["db"]
    assert run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])[0] == 0
    model, items = nan_model_files(files)
    err = one_line(run_process("--db", db, "recommend", "--model", model, "--items", items))
    assert "model.safetensors: a damaged model (item_embeddings: 1 of 32 values are NaN or Inf" in err
    # the same model stored on the device (written behind the store's back: it refuses it itself)
    from safetensors.numpy import load, save

    blob = save(load(model.read_bytes()), metadata={"format": "fedrec-mf-items", "round": "4"})
    with DeviceStore(db) as store:
        store._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('global-model', ?)", (blob,))
    assert "the stored global-model is damaged" in one_line(run_process("--db", db, "recommend"))
    assert "the stored global-model is damaged" in one_line(run_process("--db", db, "status"))


def test_a_nan_user_vector_or_score_is_an_error_not_an_empty_top_list(files):
    from client.recommend import rank_items
    from client.store import GlobalModel, MappedRatings

    params = catalogue_params()
    model = GlobalModel(tuple(IDS), tuple(TITLES), params.embeddings, params.bias, 1)
    rated = MappedRatings(np.array([0]), np.array([5.0], np.float32), ())
    with pytest.raises(ValueError, match="7 of 7 item scores are NaN or Inf"):
        rank_items(model, np.full(4, np.nan, np.float32), rated, 3)
    assert len(rank_items(model, np.ones(4, np.float32), rated, 3)) == 3


@pytest.mark.parametrize("config, expected", [
    ("{not json", "not a fedrec run config"),
    ('["a list"]', "expected a JSON object"),
    ('{"model.user-reg": "forty"}', "model.user-reg must be a finite number > 0"),
    ('{"model.user-reg": -1}', "model.user-reg must be a finite number > 0"),
    ('{"model.loss": 3}', "model.loss must be a loss name"),
    ('{"model.loss": "hinge"}', "model.loss must be one of"),
])
def test_a_bad_config_json_beside_the_model_is_one_line(files, capsys, config, expected):
    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"])
    (files["model"].parent / "config.json").write_text(config)
    code, out, err = run_cli(capsys, "--db", db, "recommend", "--model", files["model"], "--items", files["items"])
    assert code == 2 and expected in err and err.count("\n") == 1, err


def test_import_a_bad_file_exits_2_naming_its_line_in_a_real_process(files):
    bad = files["tmp"] / "latin.csv"
    bad.write_bytes(b"item,rating\n" + "".join(f"{k},4\n" for k in range(3000)).encode() + "caf\u00e9,5\n".encode("latin-1"))
    err = one_line(run_process("--db", files["db"], "import", bad))
    assert f"{bad}:3002: expected utf-8 text, found byte 0xe9" in err and "--encoding latin-1" in err
    assert not files["db"].exists()  # nothing stored
    proc = run_process("--db", files["db"], "import", bad, "--encoding", "latin-1")
    assert proc.returncode == 0 and "3001 inserted" in proc.stdout
    assert "reading as iso8859-1, not UTF-8, as asked" in proc.stderr
    inf = files["tmp"] / "inf.csv"
    inf.write_text("item,rating\na,5\nb,1e308\n")
    assert f"{inf}:3: column 'rating': expected a rating within" in one_line(run_process("--db", files["db"], "import", inf))
    assert "unknown text encoding" in one_line(run_process("--db", files["db"], "import", inf, "--encoding", "klingon"))


def test_forget_while_another_program_reads_exits_2_and_deletes_nothing(files, capsys):
    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    reader = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); db.execute('BEGIN'); "
              "print(db.execute('SELECT COUNT(*) FROM ratings').fetchone()[0], flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", reader, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "3"
        code, out, err = run_cli(capsys, "--db", db, "forget", "--yes")
    finally:
        proc.communicate("done\n", timeout=30)
    assert code == 2 and "another program is using the device store" in err and err.count("\n") == 1
    assert db.exists()
    code, out, _ = run_cli(capsys, "--db", db, "status")
    assert "ratings: 3" in out
    assert run_cli(capsys, "--db", db, "forget", "--yes")[0] == 0 and not db.exists()


# ---------------------------------------------------------------- a model received from the server

def test_check_received_model_refuses_nan_shape_dimension_and_absurd_rounds():
    from client.data import MAX_MODEL_ROUND, check_received_model

    good = catalogue_params().to_arrays()
    check_received_model(good, n_items=8, model_round=3, dim=4, max_round=10)
    nan = [good[0].copy(), good[1]]
    nan[0][2, 2] = np.nan
    bad = {
        "1 of 32 embeddings are NaN or Inf": dict(parameters=nan),
        "biases are NaN or Inf": dict(parameters=[good[0], np.full(8, np.inf, np.float32)]),
        "or beyond float32": dict(parameters=[good[0].astype(np.float64) * 1e300, good[1]]),
        "catalogue has 9 items": dict(n_items=9),
        "dimension 4, the run's model.dim is 8": dict(dim=8),
        "biases of shape (7,)": dict(parameters=[good[0], good[1][:7]]),
        "expected float arrays": dict(parameters=[good[0].astype(np.int64), good[1]]),
        "expected item embeddings and biases, got 1": dict(parameters=good[:1]),
        "round 11 is outside [0, 10]": dict(model_round=11),
        "round -1 is outside": dict(model_round=-1),
        f"round {2**62} is outside [0, {MAX_MODEL_ROUND}]": dict(model_round=2**62, max_round=None),
        f"round {MAX_MODEL_ROUND + 1} is outside [0, {MAX_MODEL_ROUND}]": dict(model_round=MAX_MODEL_ROUND + 1,
                                                                              max_round=10**12),
        "round 2.5 is not a whole number": dict(model_round=2.5),
    }
    for expected, change in bad.items():
        kwargs = {"parameters": good, "n_items": 8, "model_round": 3, "dim": 4, "max_round": 10, **change}
        with pytest.raises(ValueError, match=re.escape(expected)):
            check_received_model(kwargs.pop("parameters"), **kwargs)


def test_keep_on_device_refuses_a_bad_model_and_nothing_pins_one_forever(files, capsys):
    from client.data import keep_on_device
    from client.store import DeviceStore as Store

    db = files["db"]
    run_cli(capsys, "--db", db, "import", files["ratings"], "--items", files["items"])
    cfg = RunConfig.from_flat({"model.dim": 4})
    with Store(db, create=False) as store:
        data = store.client_data({i: k for k, i in enumerate(IDS)})
    good = catalogue_params().to_arrays()

    def keep(arrays, rnd, **kw):
        keep_on_device(str(db), arrays, rnd, cfg.model, data, None, False, **kw)
        with Store(db, create=False) as store:
            model = store.get_global_model()
            return None if model is None else (model.round, model.run)

    with pytest.raises(ValueError, match="NaN or Inf"):
        keep([np.full((8, 4), np.nan, np.float32), good[1]], 1)
    with pytest.raises(ValueError, match="outside"):
        keep(good, 10**12)  # the round that used to pin a model for good
    with Store(db, create=False) as store:
        assert store.get_global_model() is None  # nothing kept
        store.set_global_model(IDS, good[0], good[1], 10**12)  # as an older fedrec-client kept it
    assert keep(good, 3) == (3, None)  # a stored round beyond what a run can have does not pin
    assert keep(good, 2) == (3, None)  # within a run, an older model does not replace a newer one
    assert keep(good, 5, max_round=150) == (5, None)
    assert keep(good, 1, run_id=7) == (1, 7)  # a new run starts at round 1 again: its model replaces
    assert keep(good, 0, run_id=7) == (1, 7)
    with pytest.raises(ValueError, match="outside \\[0, 150\\]"):
        keep(good, 151, max_round=150)
    with Store(db, create=False) as store:  # a damaged stored model is replaced, not a dead end
        store._db.execute("UPDATE state SET value = x'00' WHERE key = 'global-model'")
    assert keep(good, 2, run_id=7) == (2, 7)


def test_a_device_takes_the_catalogues_embeddings_published_beside_the_items_file(files, capsys, tmp_path, monkeypatch):
    """`fedrec deploy items --embed` publishes the (public) sentence embeddings beside items.csv;
    `fedrec-client import --items` checks them against the texts and caches them, so the device
    never runs MiniLM over the catalogue; a file for other texts is refused before anything is stored."""
    from common.models.hybrid import text as text_mod
    from common.models.hybrid.text import base_embeddings, embeddings_file_for, publish_embeddings

    texts = [f"{t} | {'Sci-Fi Action' if i < 4 else 'Romance Drama'}" for i, t in enumerate(TITLES)]
    items = tmp_path / "server" / "items.csv"
    items.parent.mkdir()
    write_items_file(items, IDS, TITLES, texts)
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "server-cache"))
    published = publish_embeddings(embeddings_file_for(items), texts, 32)

    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "device-cache"))  # the device: nothing cached
    text_mod._base_embeddings.cache_clear()

    def no_minilm(*_args, **_kwargs):
        raise AssertionError("the device ran MiniLM over the catalogue")

    monkeypatch.setattr(text_mod, "encode_base", no_minilm)
    code, out, _ = run_cli(capsys, "--db", files["db"], "import", files["ratings"], "--items", items, "--embed")
    assert code == 0 and "sentence embeddings of the 8 items imported" in out
    np.testing.assert_array_equal(base_embeddings(texts, 32), published)

    # the same embeddings offered for edited texts: refused by name, and the store is left as it was
    edited = tmp_path / "edited" / "items.csv"
    edited.parent.mkdir()
    write_items_file(edited, IDS, TITLES, [t + " (edited)" for t in texts])
    embeddings_file_for(edited).write_bytes(embeddings_file_for(items).read_bytes())
    with DeviceStore(files["db"], create=False) as store:
        before = store.item_texts()
    code, _, err = run_cli(capsys, "--db", files["db"], "import", "--items", edited)
    assert code == 2 and "embeddings of other item texts" in err and str(embeddings_file_for(edited)) in err
    with DeviceStore(files["db"], create=False) as store:
        assert store.item_texts() == before


@pytest.mark.parametrize(("arrays", "metadata", "message"), [
    ({"embeddings": np.full((8, 384), 1 / np.sqrt(384), dtype=np.float32)}, {"encoder": "other-model"}, "'other-model'"),
    ({"embeddings": np.full((7, 384), 1 / np.sqrt(384), dtype=np.float32)}, {}, r"shape \(8, 384\)"),
    ({"embeddings": np.full((8, 384), 1.0, dtype=np.float32)}, {}, "unit-norm"),
    ({"embeddings": np.full((8, 384), np.nan, dtype=np.float32)}, {}, "unit-norm"),
    ({"vectors": np.zeros((8, 384), dtype=np.float32)}, {}, "one array 'embeddings'"),
])
def test_a_published_embeddings_file_is_checked_before_it_is_used(tmp_path, monkeypatch, arrays, metadata, message):
    from common.models.hybrid.text import ENCODER_NAME, import_embeddings, texts_digest
    from common.serialization import save_arrays

    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    texts = [f"{t} text" for t in TITLES]
    meta = {"encoder": ENCODER_NAME, "max_length": "32", "texts_sha256": texts_digest(texts, 32), **metadata}
    path = tmp_path / "items.embeddings.safetensors"
    save_arrays(path, arrays, metadata=meta)
    with pytest.raises(ValueError, match=message):
        import_embeddings(path, texts, 32)
    assert not (tmp_path / "cache").exists()  # nothing cached from a refused file
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a catalogue embeddings file"):
        import_embeddings(path, texts, 32)
