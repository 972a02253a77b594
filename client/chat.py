"""``fedrec-client ask`` and ``fedrec-client chat``: requests in words, answered on the device.

The request is embedded by the packaged MiniLM (the encoder whose sentence embeddings of the item
texts the hybrid model's head reads) and ranked against the catalogue's texts without their titles
(:func:`common.interactive.request_texts`); the device's user vector against the global model
gives the collaborative half; the two are blended by the seed formula ``r = α·z(r_cf) +
(1−α)·z(r_cb)`` (:mod:`common.interactive`). A chat keeps a session: critiques move the request,
exclude items or bound the year; items the user accepts become implicit positives in the device
store (they change the user vector here and the next federated update). Nothing of a conversation leaves the device.

Every mistake (no catalogue, no texts, an unknown title) is one line naming what to do; a
request that does not look like English is answered with a warning (the packaged MiniLM reads
English).
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
import time
import unicodedata
from collections.abc import Callable

import numpy as np

from client.recommend import load_model_files, user_vector
from client.store import DeviceStore, StoreError
from common.cli import UsageError
from common.interactive import (
    DEFAULT_ALPHA,
    Reason,
    Session,
    content_words,
    reasons,
    request_texts,
    taste_scores,
    turn_scores,
    unit,
    years_of,
)

REQUEST_MAX_TOKENS = 64
HELP = """Say what you would like ("something funny from the eighties"), or:
  more like N | more like TITLE     less like N | less like TITLE
  not N | not this                  newer | older
  yes N (you take it: it counts as liked, on this device)
  more (the next items)   new (start over)   help   quit"""


class Conversation:
    """What a request is answered from: the catalogue and its text embeddings, the user vector
    against the global model (when there are both), the encoder (loaded on first use)."""

    def __init__(self, store: DeviceStore, *, alpha: float, k: int, model_path: str | None = None,
                 items_path: str | None = None, out: Callable[[str], None] = print) -> None:
        self.store, self.alpha, self.k, self.out = store, float(alpha), int(k), out
        ids, titles = store.catalog()
        if not ids:
            raise UsageError("no item catalogue on this device: import the server's items file first "
                             "(fedrec-client import --items items.csv)")
        texts = store.item_texts()
        if texts is None:
            raise UsageError("this device keeps no item texts, so requests in words cannot be matched: import the "
                             "server's items file with its text column (fedrec-client import --items items.csv)")
        self.ids, self.titles, self.index = ids, titles, {item: i for i, item in enumerate(ids)}
        self.years = years_of(titles)
        from common.config import ModelConfig
        from common.models.hybrid.text import base_embeddings, embeddings_cached

        max_length = ModelConfig().text_max_length
        described = request_texts(texts, titles)
        if not embeddings_cached(described, max_length):
            out(f"embedding the {len(texts)} item descriptions with MiniLM (once on this device)...")
        self.text_embeddings = unit(base_embeddings(described, max_length))
        self.model = None
        if model_path is not None:
            self.model = load_model_files(model_path, items_path)
            if self.model.item_ids != ids:
                raise UsageError(f"{items_path} lists other items than this device's catalogue: import it first "
                                 f"(fedrec-client import --items {items_path})")
        else:
            try:
                self.model = store.get_global_model()
            except StoreError as exc:
                raise UsageError(str(exc)) from None
        self.refresh_user()

    # ---------------------------------------------------------------- the user's half
    def refresh_user(self) -> None:
        """The user's ratings (and accepted items) and, with a model, r_cf = V·u + b."""
        self.rated = self.store.map_ratings(self.index)
        self.vector = None
        if self.model is not None and len(self.rated.items):
            self.vector, _ = user_vector(self.store, self.model, self.rated)
        self.liked = self.rated.items[self.rated.ratings >= self.rated.ratings.mean()] if len(self.rated.items) \
            else self.rated.items

    def alpha_line(self) -> str:
        if self.model is None:
            return "α = 0: your request alone (no global model on this device yet)"
        if self.vector is None:
            return "α = 0: your request alone (no ratings on this device)"
        return (f"α = {self.alpha:.2f}: {self.alpha:.0%} your taste (from {len(self.rated.items)} items you rated "
                f"or took), {1 - self.alpha:.0%} your request")

    # ---------------------------------------------------------------- the encoder
    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit MiniLM sentence embeddings of ``texts`` (the encoder is loaded on first use, once per process)."""
        from common.models.hybrid.encoder import encode_base

        return unit(encode_base(texts, max_length=REQUEST_MAX_TOKENS))

    def language_warning(self, text: str) -> str | None:
        """A warning when ``text`` does not look like English: letters outside the Latin scripts,
        or most of its words unknown to the encoder's (English) vocabulary as whole words."""
        from common.models.hybrid.encoder import load_minilm

        letters = [c for c in text if c.isalpha()]
        foreign = sum(1 for c in letters if not unicodedata.name(c, "").startswith("LATIN"))
        words = re.findall(r"[^\W\d_]+", text.lower())
        if not words:
            return None
        if foreign > len(letters) / 4:
            return ("your request does not look like English (non-Latin letters): the packaged MiniLM reads "
                    "English, so these results may be poor; try asking in English")
        tokenizer = load_minilm()[1]
        unknown = [w for w in words if len(w) > 2 and len(tokenizer.tokenize(w)) > 1]
        long_words = [w for w in words if len(w) > 2]
        if len(long_words) >= 2 and len(unknown) / len(long_words) > 0.5:
            return (f"your request does not look like English ({len(unknown)} of {len(long_words)} words are not in "
                    "the encoder's English vocabulary): the packaged MiniLM reads English, so these results may be "
                    "poor; try asking in English")
        return None

    # ---------------------------------------------------------------- a turn
    def show(self, session: Session) -> list[int]:
        """Rank, pick the next ``k`` and print them with their reasons."""
        r_cf = None
        if self.vector is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                r_cf = taste_scores(session, self.vector, self.model.embeddings, self.model.bias)
            if not np.all(np.isfinite(r_cf)):
                raise UsageError("the global model gives NaN/Inf scores: it is damaged (the next round replaces it)")
        scores, z_cf, z_cb, alpha = turn_scores(session, self.text_embeddings, r_cf, self.alpha)
        candidates = session.candidates(len(self.ids), self.years, self.rated.items)
        items = session.next_items(scores, candidates, self.k)
        if not items:
            bounds = [f"from {session.min_year}" if session.min_year else "",
                      f"up to {session.max_year}" if session.max_year else ""]
            window = " ".join(b for b in bounds if b)
            self.out("nothing left to show" + (f" {window}" if window else "")
                     + ": say `new` to start over" + (" or `older`/`newer` to move the years" if window else ""))
            return items
        words = content_words(" ".join(session.requests))
        word_emb = self.encode(words) if words else None
        why = reasons(items, alpha=alpha, z_cf=z_cf, z_cb=z_cb, words=words, word_embeddings=word_emb,
                      text_embeddings=self.text_embeddings, liked=self.liked)
        width = len(str(len(items)))
        for rank, (item, reason) in enumerate(zip(items, why), start=1):
            self.out(f"{rank:>{width}}. {self.titles[item]}")
            self.out(f"{'':>{width}}  {self.reason_text(reason)}")
        return items

    def reason_text(self, reason: Reason) -> str:
        if reason.word is not None:
            return f'for "{reason.word}" in your request (similarity {reason.similarity:.2f})'
        if reason.liked is not None:
            return f"because you liked {self.titles[reason.liked]} (similarity {reason.similarity:.2f})"
        return "the closest to what you asked"

    # ---------------------------------------------------------------- items by number or title
    @functools.cached_property
    def title_keys(self) -> list[str]:
        """Every title as :func:`_title_key` compares it (computed on the first critique by title)."""
        return [_title_key(t) for t in self.titles]

    def resolve(self, what: str, session: Session) -> int:
        """An item by its number in the last list, "this"/"that"/"it" (the first), or its title;
        UsageError offering the closest titles."""
        what = what.strip().strip("\"'").strip()
        if what.lower() in ("this", "that", "it", "this one", "that one"):
            if not session.last:
                raise UsageError("nothing shown yet: ask for something first")
            return session.last[0]
        if what.isdigit():
            n = int(what)
            if not 1 <= n <= len(session.last):
                raise UsageError(f"no item {n} in the last list (1–{len(session.last)})" if session.last
                                 else "nothing shown yet: ask for something first")
            return session.last[n - 1]
        key, keys = _title_key(what), self.title_keys
        exact = [i for i, k in enumerate(keys) if k == key or self.titles[i].lower() == what.lower()]
        if len(exact) == 1:
            return exact[0]
        partial = exact or [i for i, k in enumerate(keys) if key and key in k]
        if len(partial) == 1:
            return partial[0]
        if partial:
            raise UsageError(f"{len(partial)} titles match {what!r}: " + "; ".join(self.titles[i] for i in partial[:5])
                             + (" ..." if len(partial) > 5 else "") + " — say which (with its year)")
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        offer = "; ".join(self.titles[keys.index(c)] for c in close)
        raise UsageError(f"no item titled {what!r}" + (f"; the closest: {offer}" if offer else ""))


def _title_key(title: str) -> str:
    """A title without its year, case, punctuation and article ("Usual Suspects, The (1995)" → "usual suspects")."""
    t = re.sub(r"\(\d{4}\)\s*$", "", title.lower())
    t = re.sub(r",\s*(the|a|an)\s*$", "", t.strip())
    t = re.sub(r"^(the|a|an)\s+", "", t)
    return " ".join(re.findall(r"\w+", t))


# ---------------------------------------------------------------- the commands

# Matched case-insensitively on the line with its spaces collapsed, so that an argument (a title)
# comes back as the user typed it.
_QUIT = re.compile(r"^(quit|exit|q|bye|:q)$", re.I)
_HELP = re.compile(r"^(help|\?|h)$", re.I)
_NEW = re.compile(r"^(new|reset|start over|restart)$", re.I)
_MORE = re.compile(r"^(more|next|more please)?$", re.I)
_NOT = re.compile(r"^(?:not|no|skip|not interested in)\s+(.+)$", re.I)
_LIKE = re.compile(r"^(more|less)\s+like\s+(.+)$", re.I)
_YEARS = re.compile(r"^(newer|more recent|recent|later|older|earlier|less recent)$", re.I)
_TAKE = re.compile(r"^(?:yes|accept|take|watch|ok|pick|i'll take|i will take)\s+(.+)$", re.I)


def handle(conv: Conversation, session: Session, line: str) -> bool:
    """One line of a chat; False to end it. Raises UsageError for a line that cannot be done
    (the chat prints it and goes on)."""
    text = line.strip()
    said = re.sub(r"\s+", " ", text).rstrip(".!")
    if _QUIT.match(said):
        return False
    if _HELP.match(said):
        conv.out(HELP)
        return True
    if _NEW.match(said):
        session.reset()
        conv.out("new conversation: what would you like?")
        return True
    if _MORE.match(said):
        if not session.shown:
            conv.out("what would you like? (help lists what you can say)")
            return True
        conv.show(session)
        return True
    m = _TAKE.match(said)
    if m:
        item = conv.resolve(m.group(1), session)
        conv.store.add_feedback(conv.ids[item], "click")
        conv.refresh_user()
        session.exclude(item)
        conv.out(f"taken: {conv.titles[item]} — it counts as liked on this device"
                 + (" (your taste vector was refitted here; it reaches the server only inside your next "
                    "federated update)" if conv.vector is not None else ""))
        return True
    m = _NOT.match(said)
    if m:
        item = conv.resolve(m.group(1), session)
        session.exclude(item)
        conv.store.add_feedback(conv.ids[item], "dismiss")
        conv.out(f"not {conv.titles[item]}: it will not be shown again")
        conv.show(session)
        return True
    m = _LIKE.match(said)
    if m:
        item = conv.resolve(m.group(2), session)
        less = m.group(1).lower() == "less"
        session.more_like(conv.text_embeddings[item], less=less, item=item)
        conv.out(f"{'less' if less else 'more'} like {conv.titles[item]}:")
        conv.show(session)
        return True
    m = _YEARS.match(said)
    if m:
        older = m.group(1).lower() in ("older", "earlier", "less recent")
        bound = session.newer(conv.years, older=older)
        if bound is None:
            raise UsageError("the last items shown have no year to move from: ask for something first")
        conv.out(f"{'up to' if older else 'from'} {bound}:")
        conv.show(session)
        return True
    warning = conv.language_warning(text)
    if warning:
        conv.out(f"note: {warning}")
    session.ask(text, conv.encode([text])[0])
    conv.out(conv.alpha_line())
    conv.show(session)
    return True


def ask(store: DeviceStore, text: str, *, alpha: float = DEFAULT_ALPHA, k: int = 5, timing: bool = False,
        model_path: str | None = None, items_path: str | None = None) -> int:
    """``fedrec-client ask``: one request, no session kept."""
    if not text.strip():
        raise UsageError("an empty request: say what you would like, e.g. fedrec-client ask \"a funny film for kids\"")
    from common.models.hybrid.encoder import load_minilm

    t0 = time.perf_counter()
    load_minilm()  # the encoder, loaded once per process: its time is printed apart
    t_loaded = time.perf_counter()
    conv = Conversation(store, alpha=alpha, k=k, model_path=model_path, items_path=items_path)
    conv.encode(["warm up"])
    t_start = time.perf_counter()
    handle(conv, Session(), text)
    t_end = time.perf_counter()
    if timing:
        print(f"timing: answered in {1000 * (t_end - t_start):.0f} ms; before that loading the encoder took "
              f"{t_loaded - t0:.2f} s and the device's data {1000 * (t_start - t_loaded):.0f} ms (once per "
              "session)")
    return 0


def chat(store: DeviceStore, *, alpha: float = DEFAULT_ALPHA, k: int = 5, new: bool = False,
         model_path: str | None = None, items_path: str | None = None,
         read: Callable[[str], str] = input) -> int:
    """``fedrec-client chat``: a conversation in the terminal, saved in the store after every
    line (a restart resumes it; ``--new`` or saying ``new`` starts over)."""
    conv = Conversation(store, alpha=alpha, k=k, model_path=model_path, items_path=items_path)
    session = Session()
    try:
        saved = None if new else store.chat_session()
    except StoreError as exc:  # a damaged conversation is not worth the store: it is started again
        print(f"note: the saved conversation is damaged ({exc}); starting a new one")
        saved = None
    if saved is not None:
        try:
            session = Session.from_state(saved, conv.ids, conv.text_embeddings.shape[1])
        except ValueError as exc:
            print(f"note: the saved conversation could not be read ({exc}); starting a new one")
        else:
            asked = "; ".join(f'"{r}"' for r in session.requests[-3:]) or "nothing yet"
            print(f"resuming your conversation (you asked {asked}; {len(session.shown)} items shown, "
                  f"{len(session.excluded)} excluded) — say `new` to start over")
    print("fedrec chat, on this device: nothing you say leaves it. " + conv.alpha_line())
    print("what would you like? (help lists what you can say; quit ends)")
    while True:
        try:
            line = read("> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            break
        try:
            going = handle(conv, session, line)
        except UsageError as exc:
            print(f"sorry: {exc}")
            going = True
        store.set_chat_session(session.to_state(conv.ids))
        sys.stdout.flush()
        if not going:
            break
    print("bye (the conversation is kept on this device; fedrec-client forget deletes it)")
    return 0
