"""Interactive recommendation with simulated users: does the language model help a user who says
what they want?

Protocol (ML-100K, the default random split; full ranking: every item the user has not trained
or validated on is a candidate). Each test user has one target: a held-out test item they rated
≥ 4 (one per user, seeded). The simulated user opens with a request built from the target's
public metadata **in words that are not the catalogue's** ("funny" for Comedy, "from the
eighties" for 1985: :data:`GENRE_WORDS` share no word with the item texts' genre names, and no
year is written as a number), sees 5 items per turn and, while the target is not among them,
adds one more attribute of the target per turn — another genre paraphrased, the decade, or
"more like <an item it liked (training, rating ≥ 4) that shares a genre>" — up to 5 turns. An
item shown once is not shown again (not taking it is a "not this").

Systems, each over the same users, requests and turns:

* **interactive hybrid**: the seed formula on the device, ``α·z(r_cf) + (1−α)·z(r_cb)``, with
  r_cf from the federated MF model and the user's reconstructed vector, r_cb the cosine of the
  session's request vector (MiniLM) with each item's text without its title
  (``common.interactive``, exactly what ``fedrec-client chat`` runs); α picked on validation
  users (their validation items as targets);
* **text only**: the same with α = 0 (no collaborative part: the CF share is the difference);
* **BM25** over the item texts (``rank_bm25``) with the same requests as keywords ("more like X"
  adds X's text, as the Rocchio step adds its embedding); ties broken by training popularity;
* **MF, not interactive**: the federated MF model shows its next 5 items each turn.

Models are trained federated in process (common/inprocess.py), without DP and at user-level
ε = 8 (the default DP: σ planned by the accountant for the run's rounds and q, δ = 1e-4); the ε
printed is the run's ledger's.

    python benchmarks/interactive.py [--json out.json] [--quick] [--rounds R] [--users N]

With ``--json PATH``, a few whole conversations of the interactive hybrid (requests, items
shown, the reason printed for each) go to ``PATH`` with the suffix ``.examples.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.harness import table, target, targets_table, write_json  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import load_interactions  # noqa: E402
from common.data.splits import split_interactions  # noqa: E402
from common.device import reconstruct_users  # noqa: E402
from common.evaluation import EvalSets, items_by_user, ratings_by_user  # noqa: E402
from common.inprocess import run_inprocess  # noqa: E402
from common.interactive import (  # noqa: E402
    TASTE_GAMMA,
    Session,
    content_words,
    reasons,
    request_texts,
    taste_scores,
    turn_scores,
    unit,
    years_of,
)
from common.models import ItemParams, UserData  # noqa: E402
from common.privacy import Accountant  # noqa: E402

TURNS = 5
PER_TURN = 5
ALPHAS = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Genre → ways a person would say it without the catalogue's word (tests/test_interactive.py checks
#: that no word here is a word of any genre name).
GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "Action": ("full of fights and explosions", "with car chases and shootouts", "fast-paced, lots of stunts"),
    "Adventure": ("an epic journey", "a quest to faraway places", "treasure hunting and exploring"),
    "Animation": ("a cartoon", "with cartoon characters", "hand-drawn cartoon"),
    "Children's": ("for kids", "for little ones", "family-friendly for young kids"),
    "Comedy": ("funny", "that makes me laugh", "hilarious and lighthearted"),
    "Crime": ("about gangsters", "about a heist and the cops", "mobsters and detectives"),
    "Documentary": ("about real events, non-fiction", "a true story filmed for real", "real people, not actors"),
    "Drama": ("serious and emotional", "a moving, heartfelt story", "a tearjerker"),
    "Fantasy": ("with magic and wizards", "dragons and fairy tales", "a magical world"),
    "Film-Noir": ("a dark detective story with a femme fatale", "a shadowy private eye story",
                  "hard-boiled detective in black and white"),
    "Horror": ("scary", "that gives me nightmares", "with monsters and blood"),
    "Musical": ("with singing and dancing", "full of songs", "a song-and-dance show"),
    "Mystery": ("a whodunit", "a puzzling murder to solve", "full of clues and secrets"),
    "Romance": ("a love story", "about falling in love", "romantic, for a date night"),
    "Sci-Fi": ("set in space or the future", "with aliens and spaceships", "futuristic robots and technology"),
    "Thriller": ("suspenseful", "edge-of-my-seat tension", "nail-biting suspense"),
    "War": ("about soldiers in combat", "set on a battlefield", "about an army at the front"),
    "Western": ("with cowboys", "cowboys and gunfights on the frontier", "about outlaws on horseback"),
    "unknown": ("something", "anything good", "a good one"),
}
DECADE_WORDS = {1920: "from the twenties", 1930: "from the thirties", 1940: "from the forties",
                1950: "from the fifties", 1960: "from the sixties", 1970: "from the seventies",
                1980: "from the eighties", 1990: "from the nineties"}


def tokens(text: str) -> list[str]:
    """BM25's tokens: lower-case letter/digit runs."""
    return re.findall(r"[a-z0-9]+", text.lower())


# ---------------------------------------------------------------- the simulated users

class Utterance:
    """One turn's words: a request (text) or "more like" an item (index)."""

    def __init__(self, text: str, like: int | None = None) -> None:
        self.text, self.like = text, like


def script(target: int, genres: list[tuple[str, ...]], years: np.ndarray, liked: np.ndarray,
           rng: np.random.Generator) -> list[Utterance]:
    """The simulated user's utterances for ``target``: its genres paraphrased (shuffled), its
    decade, "more like" a liked item sharing a genre; TURNS at most (fewer: later turns say nothing new)."""
    own = list(genres[target]) or ["unknown"]
    own = [own[i] for i in rng.permutation(len(own))]
    says = [Utterance(str(rng.choice(GENRE_WORDS[g]))) for g in own]
    decade = int(years[target]) // 10 * 10
    if decade in DECADE_WORDS:
        says.insert(1, Utterance(DECADE_WORDS[decade]))
    sharing = [int(i) for i in liked if set(genres[int(i)]) & set(own)]
    if sharing:
        says.insert(min(2, len(says)), Utterance("", like=int(rng.choice(sharing))))
    return says[:TURNS]


def pick_targets(sets: EvalSets, targets: list[np.ndarray], ratings: list[np.ndarray], users: np.ndarray,
                 seed: int) -> dict[int, int]:
    """One liked (rating ≥ 4) held-out item per user, seeded; users without one are left out."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in users:
        good = targets[u][ratings[u] >= 4]
        if len(good):
            out[int(u)] = int(rng.choice(good))
    return out


# ---------------------------------------------------------------- the systems

class World:
    """What every system sees: texts and their embeddings, genres, years, popularity, BM25."""

    def __init__(self) -> None:
        from rank_bm25 import BM25Okapi

        from common.models.hybrid.encoder import encode_base
        from common.models.hybrid.text import base_embeddings

        inter = load_interactions()
        self.split = split_interactions(inter, "random", seed=0)
        self.sets = EvalSets.from_split(self.split)
        self.texts = [info.text for info in inter.items]
        self.titles = [info.title + (f" ({info.year})" if info.year else "") for info in inter.items]
        self.genres = [tuple(info.genres) for info in inter.items]
        self.years = years_of(self.titles)
        self.text_emb = unit(base_embeddings(request_texts(self.texts, [i.title for i in inter.items]), 32))
        self.bm25 = BM25Okapi([tokens(t) for t in self.texts])
        self.log_pop = np.log1p(self.sets.popularity.astype(np.float64))
        self._encode, self._cache = encode_base, {}

    def embed(self, text: str) -> np.ndarray:
        if text not in self._cache:
            self._cache[text] = unit(self._encode([text], max_length=64)[0])
        return self._cache[text]


def run_session(world: World, says: list[Utterance], target: int, exclude: np.ndarray,
                taste: tuple[ItemParams, np.ndarray] | None, alpha: float, kind: str, gamma: float = TASTE_GAMMA,
                transcript: list[dict[str, Any]] | None = None, liked: np.ndarray | None = None) -> int:
    """The turn (1..TURNS) at which ``target`` is shown, 0 when it never is. ``taste``: the model's
    item parameters and this user's vector (the collaborative half). ``transcript``: each turn's
    words and items shown, with the reason ``fedrec-client chat`` would print (hybrid/text only)."""
    session = Session()
    words: list[str] = []
    n = len(world.texts)
    for turn in range(1, TURNS + 1):
        said = ""
        if turn <= len(says):
            say = says[turn - 1]
            said = say.text if say.like is None else f"more like {world.titles[say.like]}"
            if kind in ("hybrid", "text"):
                if say.like is None:
                    session.ask(say.text, world.embed(say.text))
                else:
                    session.more_like(world.text_emb[say.like], item=say.like)
            elif kind == "bm25":
                words += tokens(say.text if say.like is None else world.texts[say.like])
        if kind in ("hybrid", "text"):
            r_cf = None
            if kind == "hybrid":
                r_cf = taste_scores(session, taste[1], taste[0].embeddings, taste[0].bias, gamma=gamma)
            scores, z_cf, z_cb, used = turn_scores(session, world.text_emb, r_cf, alpha)
        elif kind == "bm25":
            scores = np.asarray(world.bm25.get_scores(words)) + 1e-6 * world.log_pop
        else:  # mf: not interactive
            scores = taste[0].embeddings @ taste[1] + taste[0].bias
        shown = session.next_items(scores, session.candidates(n, world.years, exclude), PER_TURN)
        if transcript is not None and kind in ("hybrid", "text"):
            cw = content_words(" ".join(session.requests))
            why = reasons(shown, alpha=used, z_cf=z_cf, z_cb=z_cb, words=cw,
                          word_embeddings=np.array([world.embed(w) for w in cw]) if cw else None,
                          text_embeddings=world.text_emb, liked=liked if liked is not None else [])
            transcript.append({"turn": turn, "said": said or "(nothing new)", "shown": [
                {"title": world.titles[i], "target": i == target,
                 "reason": f'"{r.word}" in the request' if r.word else
                 f"you liked {world.titles[r.liked]}" if r.liked is not None else ""} for i, r in zip(shown, why)]})
        if target in shown:
            return turn
    return 0


def examples(world: World, targets: dict[int, int], exclude: list[np.ndarray], model: tuple[ItemParams, np.ndarray],
             alpha: float, count: int = 3, seed: int = 5) -> list[dict[str, Any]]:
    """A few whole conversations of the interactive hybrid (the first ``count`` test users, in
    order, whose target is found after turn 1): what explanations look like."""
    rng = np.random.default_rng(seed)
    out = []
    for u, t in targets.items():
        liked = world.sets.train[u][world.sets.train_ratings[u] >= 4]
        says = script(t, world.genres, world.years, liked, rng)
        transcript: list[dict[str, Any]] = []
        found = run_session(world, says, t, exclude[u], (model[0], model[1][u]), alpha, "hybrid",
                            transcript=transcript, liked=liked)
        if found > 1:
            out.append({"target": world.titles[t], "found_at_turn": found, "turns": transcript})
        if len(out) == count:
            break
    return out


def evaluate(world: World, targets: dict[int, int], exclude: list[np.ndarray],
             model: tuple[ItemParams, np.ndarray] | None, alpha: float, kind: str, seed: int,
             gamma: float = TASTE_GAMMA) -> np.ndarray:
    """The turn each user's target was shown at (0: never), users in ``targets``' order."""
    rng = np.random.default_rng(seed)
    out = []
    for u, t in targets.items():
        liked = world.sets.train[u][world.sets.train_ratings[u] >= 4]
        says = script(t, world.genres, world.years, liked, rng)
        taste = None if model is None else (model[0], model[1][u])
        out.append(run_session(world, says, t, exclude[u], taste, alpha, kind, gamma))
    return np.asarray(out)


def success(turns: np.ndarray) -> dict[str, float]:
    found = turns > 0
    row = {f"success@{k}": float(np.mean(found & (turns <= k))) for k in range(1, TURNS + 1)}
    row["mean_turns"] = float(np.mean(np.where(found, turns, TURNS + 1)))  # a miss counts as TURNS + 1
    return row


# ---------------------------------------------------------------- training

def train(world: World, rounds: int, dp: bool, quick: bool, cache: Path | None = None
          ) -> tuple[ItemParams, np.ndarray, float, float]:
    """Federated MF (in process), no DP or the default DP (ε = 8): (released item parameters, the
    users' reconstructed vectors, ε, seconds). ``cache``: an .npz of an earlier identical call,
    reused when there (say so when quoting), written otherwise."""
    if cache is not None and cache.is_file():
        z = np.load(cache)
        print(f"  reusing the trained model in {cache}", flush=True)
        return ItemParams(z["embeddings"], z["bias"]), z["vectors"], float(z["epsilon"]), float(z["seconds"])
    over = {"fed.rounds": rounds, "dp.noise-seed": 0, "dp.enabled": dp,
            "model.user-reg": 10.0 if dp else 40.0}  # what validation picks at each setting (benchmarks/language_model.py)
    cfg = RunConfig().replace(**over)
    t0 = time.perf_counter()
    result = run_inprocess(cfg, world.sets, final_eval=False, progress=not quick)
    params = result.effective
    users = [UserData(world.sets.train[u], world.sets.train_ratings[u]) for u in range(len(world.sets.train))]
    vectors = reconstruct_users(params, users, cfg.model, seed=cfg.seed)
    eps = result.ledger.epsilon(Accountant.RDP) if result.ledger is not None else float("inf")
    seconds = time.perf_counter() - t0
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, embeddings=params.embeddings, bias=params.bias, vectors=vectors, epsilon=eps, seconds=seconds)
    return params, vectors, eps, seconds


def ask_latency(world: World, params: ItemParams, user: int) -> list[float]:
    """``fedrec-client ask --timing`` in fresh processes on a real store (ML-100K catalogue with its
    published embeddings, one user's training ratings, the no-DP model): the milliseconds each
    answer took after the encoder was loaded (the CLI prints the load apart)."""
    import tempfile

    inter = load_interactions()
    with tempfile.TemporaryDirectory() as tmp:
        return _ask_latency(world, params, user, inter, Path(tmp))


def _ask_latency(world: World, params: ItemParams, user: int, inter: Any, work: Path) -> list[float]:
    import subprocess

    from common.data.items_file import write_items_file
    from common.models.hybrid.text import embeddings_file_for, publish_embeddings
    from common.models.mf.model import model_file
    from common.serialization import save_arrays

    items = work / "items.csv"
    write_items_file(items, list(inter.item_ids), [i.title for i in inter.items], world.texts)
    publish_embeddings(embeddings_file_for(items), world.texts, 32)
    ratings = work / "ratings.csv"
    rows = [f"{inter.item_ids[i]},{r}" for i, r in zip(world.sets.train[user], world.sets.train_ratings[user])]
    ratings.write_text("item,rating\n" + "\n".join(rows) + "\n")
    named, meta = model_file(params)
    save_arrays(work / "model.safetensors", named, metadata=meta)
    exe = [sys.executable, "-c", "import sys; from client.cli import main; sys.exit(main())"]
    env = {**os.environ, "FEDREC_CACHE": str(work / "cache")}
    db = ["--db", str(work / "device.sqlite")]
    subprocess.run([*exe, *db, "import", str(ratings), "--items", str(items)], check=True, env=env,
                   capture_output=True)
    out = []
    for request in ("something funny from the eighties", "a scary film with monsters", "like Toy Story but for adults"):
        proc = subprocess.run([*exe, *db, "ask", request, "--timing", "--model", str(work / "model.safetensors"),
                               "--items", str(items)], check=True, env=env, capture_output=True, text=True)
        m = re.search(r"answered in (\d+) ms", proc.stdout)
        out.append(float(m.group(1)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="5 rounds and 100 users: checks that the script runs")
    p.add_argument("--rounds", type=int, help="federated rounds per model (default: the project's, 150)")
    p.add_argument("--users", type=int, help="test users (default all with a liked held-out item)")
    p.add_argument("--model-cache", type=Path, help="a folder keeping the trained models: a second run with the same "
                                                     "rounds reuses them (the run says so)")
    args = p.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else RunConfig().fed.rounds)
    n_users = args.users or (100 if args.quick else None)
    t_start = time.perf_counter()

    world = World()
    sets = world.sets
    users = np.arange(len(sets.train))
    if n_users:
        users = np.sort(np.random.default_rng(0).choice(users, min(n_users, len(users)), replace=False))
    test_ratings = ratings_by_user(world.split.test)
    valid_ratings = ratings_by_user(world.split.valid)
    test_targets = pick_targets(sets, sets.test, test_ratings, users, seed=1)
    valid_targets = pick_targets(sets, items_by_user(world.split.valid), valid_ratings, users, seed=2)
    test_exclude, _ = sets.exclude_and_targets("test")
    valid_exclude = sets.train

    figures: dict[str, Any] = {"users": len(test_targets), "validation_users": len(valid_targets), "rounds": rounds}
    rows, results, conversations = [], {}, {}
    bm25 = success(evaluate(world, test_targets, test_exclude, None, 0.0, "bm25", seed=3))
    text = success(evaluate(world, test_targets, test_exclude, None, 0.0, "text", seed=3))
    for setting, dp in (("no DP", False), ("ε = 8", True)):
        print(f"[{setting}] training MF federated ({rounds} rounds)...", flush=True)
        cache = args.model_cache / f"mf-{'dp' if dp else 'nodp'}-{rounds}r.npz" if args.model_cache else None
        params, vectors, eps, seconds = train(world, rounds, dp, args.quick, cache)
        model = (params, vectors)
        picks = {a: success(evaluate(world, valid_targets, valid_exclude, model, a, "hybrid", seed=4))["success@5"]
                 for a in ALPHAS}
        alpha = max(ALPHAS, key=lambda a: (picks[a], -abs(a - 0.5)))
        hybrid = success(evaluate(world, test_targets, test_exclude, model, alpha, "hybrid", seed=3))
        mf = success(evaluate(world, test_targets, test_exclude, model, 1.0, "mf", seed=3))
        key = "nodp" if not dp else "eps8"
        results[key] = {"hybrid": hybrid, "mf": mf}
        conversations[key] = examples(world, test_targets, test_exclude, model, alpha)
        if not dp:
            latency = ask_latency(world, params, int(next(iter(test_targets))))
        eps_text = "∞" if not np.isfinite(eps) else f"{eps:.2f}"
        for name, row in ((f"interactive hybrid (α = {alpha})", hybrid), ("text only (α = 0)", text),
                          ("BM25 over item texts", bm25), ("MF, not interactive", mf)):
            rows.append([setting, eps_text, name, *[row[f"success@{k}"] for k in range(1, TURNS + 1)], row["mean_turns"]])
        figures.update({f"{key}_alpha": alpha, f"{key}_epsilon": eps if np.isfinite(eps) else None,
                        f"{key}_train_seconds": seconds,
                        **{f"{key}_validation_success5_alpha_{a}": v for a, v in picks.items()},
                        **{f"{key}_hybrid_{k}": v for k, v in hybrid.items()},
                        **{f"{key}_mf_{k}": v for k, v in mf.items()}})
    figures.update({f"text_{k}": v for k, v in text.items()})
    figures["ask_ms_median"] = float(np.median(latency))
    figures.update({f"bm25_{k}": v for k, v in bm25.items()})
    figures["seconds"] = time.perf_counter() - t_start

    print()
    print(f"Simulated users: {len(test_targets)} test users, one liked held-out target each; {PER_TURN} items per "
          f"turn, up to {TURNS} turns; full ranking (train and validation masked).")
    print(table(["privacy", "ε", "system", *[f"success@{k}" for k in range(1, TURNS + 1)], "mean turns"], rows))
    targets = []
    for key, label in (("nodp", "no DP"), ("eps8", "ε = 8")):
        h, m = results[key]["hybrid"]["success@5"], results[key]["mf"]["success@5"]
        targets.append(target(f"interactive hybrid / MF success@5 ({label})", h / m if m else float("nan"), ">=", 1.5))
        targets.append(target(f"interactive hybrid − BM25 success@5 ({label})", h - bm25["success@5"], ">", 0.0))
    targets.append(target("ask answer ms after the encoder is loaded (median of 3)", figures["ask_ms_median"], "<=",
                          300.0))
    print(f"\nfedrec-client ask --timing, 3 requests in fresh processes: answered in {latency} ms "
          f"(encoder load printed apart); load average {os.getloadavg()[0]:.2f}")
    print()
    print(targets_table(targets))
    print(f"\n{figures['seconds']:.0f} s")
    if args.json:
        write_json(args.json, figures, targets)
        side = args.json.with_suffix(".examples.json")
        side.write_text(json.dumps(conversations, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{args.json}; example conversations in {side}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
