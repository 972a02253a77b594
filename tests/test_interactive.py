"""Interactive recommendation: the session's critiques and scores (common/interactive.py), the
simulated users' words (benchmarks/interactive.py), and ``fedrec-client ask`` / ``chat`` on a
real store with the packaged MiniLM — the chat driven through a pseudo-terminal, restarted, resumed."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client.cli import main
from client.store import DeviceStore
from common.config import RunConfig
from common.data.items_file import write_items_file
from common.interactive import Session, content_words, reasons, turn_scores, unit, years_of
from common.models import ItemParams
from common.models.mf.model import model_file
from server.run_dir import RunDir

# ---------------------------------------------------------------- the session


def test_requests_accumulate_and_critiques_move_the_request():
    e = np.eye(4)
    s = Session()
    s.ask("space", e[0])
    np.testing.assert_allclose(s.query, e[0])
    s.ask("funny", e[1])
    np.testing.assert_allclose(s.query, unit(e[0] + e[1]))  # a follow-up adds to what was asked
    before = s.query.copy()
    s.more_like(e[2])
    assert s.query @ e[2] > before @ e[2] and np.isclose(np.linalg.norm(s.query), 1)
    s.more_like(e[2], less=True)
    s.more_like(e[2], less=True)
    assert s.query @ e[2] < 0
    assert s.requests == ["space", "funny"]


def test_candidates_leave_out_rated_excluded_shown_and_outside_the_years():
    years = np.array([1970, 1980, 1990, 1995, 0, 1985])
    s = Session()
    scores = np.array([6.0, 5, 4, 3, 2, 1])
    assert s.next_items(scores, s.candidates(6, years, rated=[0]), 2) == [1, 2]
    assert s.newer(years) == 1986  # after the mean year of the items last shown (1985)
    s.exclude(3)
    ok = s.candidates(6, years, rated=[0])
    assert ok.tolist() == [False, False, False, False, False, False]  # 1, 2 shown; 3 out; 4 no year; 5 before 1986
    s.min_year = None
    assert s.candidates(6, years).tolist() == [True, False, False, False, True, True]
    s.last = [1, 5]
    assert s.newer(years, older=True) == 1981 and s.max_year == 1981  # before the mean (1982.5, rounded 1982)
    assert s.candidates(6, years).tolist() == [True, False, False, False, False, False]  # unknown years out too
    s.reset()
    assert s.to_state(list("abcdef")) == Session().to_state(list("abcdef"))


def test_the_seed_formula_alpha_one_is_taste_alpha_zero_the_request():
    rng = np.random.default_rng(0)
    text = unit(rng.standard_normal((30, 8)))
    r_cf = rng.standard_normal(30)
    s = Session()
    s.ask("q", text[7])
    taste = turn_scores(s, text, r_cf, 1.0)[0]
    request = turn_scores(s, text, r_cf, 0.0)[0]
    assert np.argsort(-taste).tolist() == np.argsort(-r_cf).tolist()
    assert int(np.argmax(request)) == 7
    assert turn_scores(s, text, None, 0.9)[3] == 0.0  # no user vector: the request alone
    assert turn_scores(Session(), text, r_cf, 0.2)[3] == 1.0  # no request yet: the taste alone
    mid, z_cf, z_cb, _ = turn_scores(s, text, r_cf, 0.3)
    np.testing.assert_allclose(mid, 0.3 * z_cf + 0.7 * z_cb)


def test_a_session_survives_its_json_and_a_bad_one_is_refused():
    ids = ["a", "b", "c", "d"]
    s = Session()
    s.ask("x", np.array([0.0, 1.0]))
    s.exclude(2)
    s.next_items(np.array([1.0, 3.0, 2.0, 0.0]), s.candidates(4, np.zeros(4, dtype=int)), 2)
    s.min_year = 1990
    state = s.to_state(ids)
    back = Session.from_state(state, ids, 2)
    assert (back.requests, back.excluded, back.shown, back.last, back.min_year, back.max_year) == (
        ["x"], {2}, [1, 0], [1, 0], 1990, None)
    assert back.to_state(ids) == state
    np.testing.assert_allclose(back.query, s.query)
    assert Session.from_state(state, ["z", "b", "c"], 2).shown == [1]  # by id: a new catalogue keeps what it can
    with pytest.raises(ValueError, match="request vector"):
        Session.from_state({**state, "query": [float("nan"), 0.0]}, ids, 2)
    with pytest.raises(ValueError, match="not a chat session"):
        Session.from_state({"query": None}, ids, 2)


def test_reasons_name_the_request_word_or_the_liked_item_that_gave_the_score():
    text = np.eye(3)
    words = ["space", "love"]
    word_emb = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    z_cb, z_cf = np.array([2.0, 1.0, -1.0]), np.array([-1.0, 0.0, 2.0])
    why = reasons([0, 1, 2], alpha=0.5, z_cf=z_cf, z_cb=z_cb, words=words, word_embeddings=word_emb,
                  text_embeddings=text, liked=[2])
    assert [r.word for r in why] == ["space", "love", None] and why[2].liked == 2


def test_titles_years_and_words():
    assert years_of(["Toy Story (1995)", "Untitled", "1984 (1984)"]).tolist() == [1995, 0, 1984]
    assert content_words("Something like Toy Story, but for ADULTS!") == ["toy", "story", "adults"]


def test_the_simulated_users_do_not_use_the_catalogues_words():
    """benchmarks/interactive.py: a request never contains a word of a genre name nor a year."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.interactive import DECADE_WORDS, GENRE_WORDS, tokens
    from common.data import load_interactions

    genres = {g for info in load_interactions().items for g in info.genres}
    assert genres <= set(GENRE_WORDS)
    genre_tokens = {t for g in genres for t in tokens(g)}
    for phrases in [*GENRE_WORDS.values(), DECADE_WORDS.values()]:
        for phrase in phrases:
            assert not set(tokens(phrase)) & genre_tokens, phrase
            assert not re.search(r"\d", phrase), phrase


# ---------------------------------------------------------------- fedrec-client ask / chat

TITLES = ["Night of the Dead Zombies (1968)", "The Haunted Cellar (1980)", "Screaming Woods (1996)",
          "Laugh Riot (1985)", "Office Pranks (1997)", "Silly Summer Camp (1982)",
          "Starship Andromeda (1979)", "Robots of Mars (1995)", "Galaxy Patrol (1988)",
          "A Summer Romance (1993)", "Love in Paris (1975)", "Wedding Bells (1996)"]
KINDS = ["Horror", "Horror", "Horror", "Comedy", "Comedy", "Comedy", "Sci-Fi", "Sci-Fi", "Sci-Fi",
         "Romance", "Romance", "Romance"]
DESCRIPTIONS = {"Horror": "A terrifying tale of ghosts, monsters and blood.",
                "Comedy": "A hilarious, lighthearted romp full of jokes.",
                "Sci-Fi": "Spaceships and aliens in a distant future.",
                "Romance": "Two people fall in love."}
IDS = [str(100 + i) for i in range(len(TITLES))]


@pytest.fixture
def device(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A store with a catalogue with texts, two ratings (a comedy and a romance) and a global model
    with two taste axes (comedy+romance vs horror+sci-fi)."""
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    texts = [f"{t} Genres: {k}. {DESCRIPTIONS[k]}" for t, k in zip(TITLES, KINDS)]
    items = tmp_path / "items.csv"
    write_items_file(items, IDS, TITLES, texts)
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(f"item,rating\n{IDS[3]},5\n{IDS[9]},4\n")
    emb = np.zeros((len(IDS), 2), dtype=np.float32)
    for i, k in enumerate(KINDS):
        emb[i, 0 if k in ("Comedy", "Romance") else 1] = 1.0 + 0.01 * i
    run = RunDir.create(tmp_path / "runs", RunConfig())
    run.save_model(*model_file(ItemParams(emb, np.zeros(len(IDS), dtype=np.float32))))
    db = tmp_path / "device.sqlite"
    assert main(["--db", str(db), "import", str(ratings), "--items", str(items), "--embed"]) == 0
    return {"db": db, "items": items, "model": run.path / "model.safetensors", "tmp": tmp_path}


def listed(out: str) -> list[str]:
    return re.findall(r"^\s*\d+\. (.+)$", out, flags=re.M)


def test_ask_answers_a_request_in_words_blended_with_the_taste(device, capsys):
    db, model, items = (str(device[k]) for k in ("db", "model", "items"))
    assert main(["--db", db, "ask", "something with spaceships and aliens", "--alpha", "0", "--k", "3",
                 "--model", model, "--items", items]) == 0
    out = capsys.readouterr().out
    assert set(listed(out)) == {TITLES[6], TITLES[7], TITLES[8]}, out  # the request alone: the sci-fi films
    assert "α = 0.00: 0% your taste (from 2 items you rated or took), 100% your request" in out
    assert re.search(r'for "(spaceships|aliens)" in your request', out)
    # α = 1: the taste alone, exactly recommend's order (rated items left out of both)
    assert main(["--db", db, "ask", "something with spaceships and aliens", "--alpha", "1", "--k", "3",
                 "--model", model, "--items", items]) == 0
    taste = listed(capsys.readouterr().out)
    assert main(["--db", db, "recommend", "--k", "3", "--model", model, "--items", items]) == 0
    assert taste == [re.sub(r"  \(score .*\)$", "", t) for t in listed(capsys.readouterr().out)]
    # in between, the taste (comedy) and the request (a love story) both count: the romances and comedies lead
    assert main(["--db", db, "ask", "a love story", "--alpha", "0.5", "--k", "4", "--timing",
                 "--model", model, "--items", items]) == 0
    out = capsys.readouterr().out
    assert set(listed(out)[:3]) <= {TITLES[i] for i in (4, 5, 10, 11)}, out
    assert re.search(r"timing: answered in \d+ ms; before that loading the encoder took \d+\.\d\d s", out)


@pytest.mark.parametrize("setup, argv, expected", [
    ("empty", ["ask", "funny"], "no item catalogue on this device: import the server's items file first"),
    ("no-texts", ["ask", "funny"], "this device keeps no item texts"),
    ("full", ["ask", "  "], "an empty request"),
    ("full", ["ask", "x", "--alpha", "2"], "expected a number in [0, 1], got 2"),
])
def test_ask_mistakes_are_one_line(device, capsys, setup, argv, expected):
    db = device["db"]
    if setup == "empty":
        db = device["tmp"] / "empty.sqlite"
        DeviceStore(db).close()
    elif setup == "no-texts":
        db = device["tmp"] / "plain.sqlite"
        plain = device["tmp"] / "plain.csv"
        write_items_file(plain, IDS, TITLES)
        assert main(["--db", str(db), "import", "--items", str(plain)]) == 0
    assert main(["--db", str(db), *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err.splitlines()[-1], err  # the last line says it (argparse prints its usage above)
    assert err.count("\n") == 1 or "usage:" in err, err


def test_a_request_in_another_language_is_answered_with_a_warning(device, capsys):
    assert main(["--db", str(device["db"]), "ask", "quelque chose de drôle des années quatre-vingt"]) == 0
    out = capsys.readouterr().out
    assert "does not look like English" in out and listed(out)
    assert main(["--db", str(device["db"]), "ask", "これは日本語の映画です"]) == 0
    assert "non-Latin letters" in capsys.readouterr().out
    assert main(["--db", str(device["db"]), "ask", "something scary with monsters"]) == 0
    assert "English" not in capsys.readouterr().out


class Terminal:
    """``fedrec-client chat`` in a real pseudo-terminal: lines typed, output read until a prompt."""

    def __init__(self, *argv: str, env: dict[str, str]) -> None:
        exe = Path(sys.executable).parent / "fedrec-client"
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([str(exe), *argv], stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 60.0) -> str:
        """The output up to and including ``pattern`` (a regex); AssertionError on timeout or exit."""
        deadline = time.monotonic() + timeout
        buf = ""
        while not re.search(pattern, buf):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} within {timeout} s; got:\n{buf}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    chunk = ""
                if not chunk:
                    assert re.search(pattern, buf), f"exited before {pattern!r}; got:\n{buf}"
                buf += chunk
        self.seen += buf
        return buf.replace("\r\n", "\n")

    def say(self, line: str, until: str = r"\n> $") -> str:
        os.write(self.master, (line + "\n").encode())
        return self.read_until(until)

    def close(self) -> int:
        code = self.proc.wait(timeout=30)
        os.close(self.master)
        return code


def test_chat_in_a_real_terminal_request_critique_take_quit_and_resume(device):
    env = {**os.environ, "FEDREC_CACHE": str(device["tmp"] / "cache"), "HF_HUB_OFFLINE": "1"}
    db = str(device["db"])
    with DeviceStore(db, create=False) as store:  # the run's model arrives as the stored global model
        model = __import__("client.recommend", fromlist=["load_model_files"]).load_model_files(
            str(device["model"]), str(device["items"]))
        store.set_global_model(model.item_ids, model.embeddings, model.bias, 3)
    term = Terminal("--db", db, "chat", "--k", "2", "--alpha", "0.2", env=env)
    intro = term.read_until(r"\n> $")
    assert "nothing you say leaves it" in intro and "α = 0.20" in intro
    first = term.say("something scary with ghosts and monsters")
    shown = listed(first)
    assert len(shown) == 2 and set(shown) <= {TITLES[0], TITLES[1], TITLES[2]}, first  # horror films
    out = term.say("not 1")
    assert f"not {shown[0]}: it will not be shown again" in out
    assert shown[0] not in listed(out) and shown[1] not in listed(out)  # excluded, and shown before
    out = term.say("more like Galaxy Patrol")
    assert "more like Galaxy Patrol (1988):" in out
    out = term.say("more like galaxy patroll")  # a typo: the closest title offered, the chat goes on
    assert "sorry: no item titled 'galaxy patroll'; the closest: Galaxy Patrol (1988)" in out
    took = listed(term.say("more"))[0]
    out = term.say("yes 1")
    assert f"taken: {took} — it counts as liked on this device" in out and "refitted here" in out
    assert "bye" in term.say("quit", until=r"bye.*\n")
    assert term.close() == 0
    with DeviceStore(db, create=False) as store:
        kinds = {(IDS[TITLES.index(t)], k) for t, k in [(shown[0], "dismiss"), (took, "click")]}
        assert kinds <= {(item, kind) for item, kind, _ in store.feedback()}
        mapped = store.map_ratings({item: i for i, item in enumerate(IDS)})
        assert TITLES.index(took) in mapped.items.tolist()  # the taken item is now one of the user's positives
        before = store.chat_session()
    # a restart resumes the conversation: what was asked, shown and excluded is kept
    term = Terminal("--db", db, "chat", "--k", "2", env=env)
    intro = term.read_until(r"\n> $")
    assert 'resuming your conversation (you asked "something scary with ghosts and monsters"' in intro
    out = term.say("more")
    assert not set(listed(out)) & set(before_titles(before))
    term.say("quit", until=r"bye.*\n")
    assert term.close() == 0
    term = Terminal("--db", db, "chat", "--new", env=env)  # --new: a fresh one
    assert "resuming" not in term.read_until(r"\n> $")
    os.write(term.master, b"\x04")  # Ctrl-D ends it like quit
    term.read_until(r"bye.*\n")
    assert term.close() == 0


def before_titles(state: dict) -> list[str]:
    return [TITLES[IDS.index(i)] for i in state["shown"]]


def test_requests_are_matched_against_the_text_without_its_title_and_the_taste_can_follow_a_critique():
    from common.interactive import request_texts, taste_scores

    assert request_texts(["Toy Story (1995) Genres: Comedy.", "Odd text"], ["Toy Story", "Other"]) == [
        "(1995) Genres: Comedy.", "Odd text"]
    V, b, u = np.eye(3), np.zeros(3), np.array([1.0, 0.0, 0.0])
    s = Session()
    s.more_like(np.ones(4), item=2)
    np.testing.assert_allclose(taste_scores(s, u, V, b), [1, 0, 0])  # γ = 0 (measured best): the taste stays
    np.testing.assert_allclose(taste_scores(s, u, V, b, gamma=0.5), [1, 0, 0.5])
    assert Session.from_state(s.to_state(["a", "b", "c"]), ["a", "b", "c"], 4).toward == [(2, 1)]


def test_a_conversation_never_reaches_the_update_only_items_taken_do(device, capsys):
    """What leaves the device is the federated update. Two devices with the same ratings, one of
    which chatted (requests, critiques, dismissals), send bit-identical updates; an item taken in
    the chat is training data (an implicit positive) and changes the update — under the run's DP."""
    from flwr.app import Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

    from client.app import client_fn_for
    from client.chat import Conversation, handle
    from common import keys
    from common.models import build_model

    cfg = RunConfig.from_flat({"model.dim": 2})
    server_model = build_model(cfg.model, n_items=len(IDS), seed=0)
    sent = server_model.arrays(server_model.init(0))

    def update(db: Path) -> list[np.ndarray]:
        ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_DATA_PATH: str(db)}, state=RecordDict(), run_config={})
        res = client_fn_for(cfg)(ctx).fit(FitIns(ndarrays_to_parameters(sent), {
            keys.SERVER_ROUND: 1, keys.LOCAL_EPOCHS: 1, keys.CLIENT_LR: 1.0}))
        return parameters_to_ndarrays(res.parameters)

    quiet, talker = device["db"], device["tmp"] / "talker.sqlite"
    import shutil

    shutil.copy(quiet, talker)
    before = update(quiet)
    with DeviceStore(talker, create=False) as store:
        conv = Conversation(store, alpha=0.5, k=2, out=lambda _line: None)
        session = Session()
        for line in ("something scary with ghosts", "not 1", "more like Galaxy Patrol", "older", "new", "a love story"):
            handle(conv, session, line)
        store.set_chat_session(session.to_state(conv.ids))
        assert store.chat_session() is not None and any(k == "dismiss" for _, k, _ in store.feedback())
    for a, b in zip(before, update(talker)):
        np.testing.assert_array_equal(a, b)  # the conversation changed nothing that leaves
    with DeviceStore(talker, create=False) as store:
        handle(conv.__class__(store, alpha=0.5, k=2, out=lambda _line: None), session, "yes 1")
    after = update(talker)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # a taken item is training data


def test_a_damaged_saved_conversation_starts_a_new_one_with_a_note(device, capsys):
    from client.chat import chat

    with DeviceStore(device["db"], create=False) as store:
        store._put("chat-session", b"\xff not json")  # noqa: SLF001 - damage it as a torn write would
        lines = iter(["something scary", "quit"])
        assert chat(store, read=lambda _prompt: next(lines)) == 0
        out = capsys.readouterr().out
        assert "note: the saved conversation is damaged" in out and listed(out)
        assert store.chat_session()["requests"] == ["something scary"]  # replaced by the new one
        store._put("chat-session", b'{"query": [1, 2, 3]}')  # noqa: SLF001 - JSON, but not a session
        lines = iter(["quit"])
        assert chat(store, read=lambda _prompt: next(lines)) == 0
        assert "note: the saved conversation could not be read (a request vector of 384" in capsys.readouterr().out


def test_a_critique_names_its_title_in_any_case_spacing_and_punctuation(device):
    """The title after "more like" / "not" / "yes" is taken from the line as typed (capitals, extra
    spaces, a closing "!"), not cut out of a normalised copy at the wrong offset."""
    from client.chat import Conversation, handle

    said: list[str] = []
    with DeviceStore(device["db"], create=False) as store:
        conv = Conversation(store, alpha=0.5, k=2, out=said.append)
        session = Session()
        handle(conv, session, "something scary")
        handle(conv, session, "More  like   Galaxy Patrol!")
        assert "more like Galaxy Patrol (1988):" in said
        handle(conv, session, "NOT  love in paris.")
        assert "not Love in Paris (1975): it will not be shown again" in said
        handle(conv, session, "yes 1!")  # the number, not the "!" the old slicing kept
        assert any(line.startswith("taken: ") for line in said)
