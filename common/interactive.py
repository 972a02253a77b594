"""Interactive recommendation: a conversation's state and its scores (NumPy only).

A session holds a request vector ``q`` in the sentence space of the item texts (MiniLM, unit
norm), the items it must not show again and a year window. Each turn ranks the candidates by the
seed formula, on the device:

    r = α·z(r_cf) + (1−α)·z(r_cb)
    r_cf = u·v_i + b_i       the device's user vector against the global model (collaborative)
    r_cb = cos(q, e_i)       the request against each item's text embedding (content), the
                             text without its title (:func:`request_texts`)

``z`` standardises each score over the items (as :func:`common.models.hybrid.blend.blend_scores` does),
so α means the same for every user. Critiques change the session:

    a new request      q ← unit(q + e(text))       (a follow-up adds to what was asked)
    more like i        q ← unit(q + β·e_i)          (Rocchio, β = 0.5; and u ← u + γ·|u|·unit(v_i),
    less like i        q ← unit(q − β·e_i)           γ = TASTE_GAMMA, measured best at 0: taste_scores)
    newer / older      only items after / before the mean year of the items last shown
    not i              i is excluded
    (shown)            an item shown once is not shown again: not taking it says "not this"

Everything here is post-processing on the device: the request, the critiques and the user
vector never leave it. The language model itself lives with the caller (the client CLI encodes
texts; :mod:`benchmarks.interactive` does the same with simulated users).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.models.hybrid.blend import unit, zscore_rows

ROCCHIO_BETA = 0.5
#: How far "more like X" moves the user vector towards X's item vector (:func:`taste_scores`), in
#: units of |u|. 0: the taste stays put. benchmarks/interactive.py measured γ ∈ {0, 0.5, 1} on its
#: validation users: 0.5 and 1 lowered success@5 without DP (0.603 → 0.584, 0.561) and moved it by
#: ≤ 0.006 at ε = 8, so the critique moves the request only.
TASTE_GAMMA = 0.0
#: The default α of ``fedrec-client ask`` / ``chat`` (``--alpha``): what benchmarks/interactive.py's
#: validation users pick, without DP and at ε = 8 (README, "Asking in words, on the device").
DEFAULT_ALPHA = 0.5
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
STOPWORDS = frozenset("""a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each else even ever every few for from
further get give had has have having he her here hers him his how i if in into is it its itself just kind like
maybe me more most movie movies film films my myself no nor not now of off on once one only or other our out over
own please really recommend recommendation same see she should show so some something such than that the their
them then there these they thing this those through to too under until up very want was watch we were what when
where which while who whom why will with would you your""".split())


def years_of(titles: Sequence[str]) -> np.ndarray:
    """The year in each title's closing ``(YYYY)``, as MovieLens writes it; 0 where there is none."""
    out = np.zeros(len(titles), dtype=np.int64)
    for i, title in enumerate(titles):
        m = _YEAR.search(title)
        if m:
            out[i] = int(m.group(1))
    return out


def request_texts(texts: Sequence[str], titles: Sequence[str]) -> list[str]:
    """What a request is matched against: each item's text without its leading title ("(1995)
    Genres: Animation, Children's, Comedy." for Toy Story). A request describes what an item is
    like, not what it is called; with the title in, MiniLM's embedding of a short catalogue text
    is mostly about the title's words. Measured (benchmarks/interactive.py, validation users, no
    DP): success@5 within 5 turns, text only 0.171 → 0.266, interactive hybrid 0.603 → 0.684."""
    out = []
    for text, title in zip(texts, titles):
        rest = text[len(title):].strip() if text.startswith(title) else ""
        out.append(rest or text)
    return out


def content_words(text: str) -> list[str]:
    """The words of a request that carry meaning (lower case, stop words and 1–2 letter words out,
    each once, in order): what a reason line can quote."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(text.lower()):
        if len(w) > 2 and w not in STOPWORDS:
            seen.setdefault(w, None)
    return list(seen)


@dataclass
class Session:
    """One conversation: the request so far, what not to show, the year window."""

    query: np.ndarray | None = None  # unit vector in the item texts' sentence space; None: no request yet
    requests: list[str] = field(default_factory=list)
    excluded: set[int] = field(default_factory=set)  # "not this"
    shown: list[int] = field(default_factory=list)  # every item shown, in order
    last: list[int] = field(default_factory=list)  # the items of the last turn (what "2" refers to)
    min_year: int | None = None
    max_year: int | None = None
    toward: list[tuple[int, int]] = field(default_factory=list)  # (item, +1 more like / −1 less like)

    def reset(self) -> None:
        """Start over: no request, nothing excluded or shown, no year window."""
        self.__dict__.update(Session().__dict__)

    # -- critiques ---------------------------------------------------------------
    def ask(self, text: str, embedding: np.ndarray) -> None:
        """A (new or follow-up) request: added to the session's request vector."""
        e = unit(embedding)
        self.query = e if self.query is None else unit(self.query + e)
        self.requests.append(text)

    def more_like(self, item_embedding: np.ndarray, *, less: bool = False, beta: float = ROCCHIO_BETA,
                  item: int | None = None) -> None:
        """Move the request towards (``less``: away from) an item's text embedding; with ``item``,
        the taste moves too (:func:`taste_scores`)."""
        e = unit(item_embedding)
        if self.query is None:
            self.query = -e if less else e
        else:
            self.query = unit(self.query + (-beta if less else beta) * e)
        if item is not None:
            self.toward.append((int(item), -1 if less else 1))

    def exclude(self, item: int) -> None:
        self.excluded.add(int(item))

    def newer(self, years: np.ndarray, *, older: bool = False) -> int | None:
        """Only items after (``older``: before) the mean year of the items last shown; returns the
        bound set, None when the last items have no year."""
        known = [int(years[i]) for i in self.last if years[i] > 0]
        if not known:
            return None
        pivot = int(round(float(np.mean(known))))
        if older:
            self.max_year = pivot - 1
            return self.max_year
        self.min_year = pivot + 1
        return self.min_year

    # -- ranking -----------------------------------------------------------------
    def candidates(self, n_items: int, years: np.ndarray, rated: Iterable[int] = ()) -> np.ndarray:
        """Items that may be shown: not rated, not excluded, not shown before, inside the year window."""
        ok = np.ones(n_items, dtype=bool)
        for block in (np.fromiter(rated, dtype=np.int64), np.fromiter(self.excluded, dtype=np.int64),
                      np.asarray(self.shown, dtype=np.int64)):
            ok[block] = False
        if self.min_year is not None:
            ok &= years >= self.min_year
        if self.max_year is not None:
            ok &= (years <= self.max_year) & (years > 0)
        return ok

    def next_items(self, scores: np.ndarray, candidates: np.ndarray, k: int) -> list[int]:
        """The ``k`` best candidates by ``scores``; they become the last items shown."""
        s = np.where(candidates, scores, -np.inf)
        k = min(k, int(candidates.sum()))
        top = np.argsort(-s, kind="stable")[:k]
        self.last = [int(i) for i in top]
        self.shown.extend(self.last)
        return self.last

    # -- persistence (a device keeps the session across restarts) -------------------
    def to_state(self, item_ids: Sequence[str]) -> dict:
        """JSON-able, by item id (indices change with the catalogue)."""
        ids = lambda items: [item_ids[i] for i in items]  # noqa: E731
        return {"query": None if self.query is None else [float(x) for x in self.query],
                "requests": list(self.requests), "excluded": ids(sorted(self.excluded)), "shown": ids(self.shown),
                "last": ids(self.last), "min_year": self.min_year, "max_year": self.max_year,
                "toward": [[item_ids[i], sign] for i, sign in self.toward]}

    @classmethod
    def from_state(cls, state: dict, item_ids: Sequence[str], dim: int) -> "Session":
        """The inverse of :meth:`to_state` for this catalogue (ids it no longer has are dropped);
        ValueError for a state that is not one."""
        index = {item: i for i, item in enumerate(item_ids)}
        try:
            query = state["query"]
            if query is not None:
                query = np.asarray(query, dtype=np.float64)
                if query.shape != (dim,) or not np.all(np.isfinite(query)):
                    raise ValueError(f"a request vector of {dim} finite values, got shape {query.shape}")
            pick = lambda key: [index[i] for i in state[key] if i in index]  # noqa: E731
            years = [state[k] for k in ("min_year", "max_year")]
            if not all(y is None or (isinstance(y, int) and not isinstance(y, bool)) for y in years):
                raise ValueError(f"years must be integers or null, got {years}")
            requests = [str(r) for r in state["requests"]]
            toward = [(index[i], 1 if int(sign) > 0 else -1) for i, sign in state.get("toward", []) if i in index]
            return cls(query, requests, set(pick("excluded")), pick("shown"), pick("last"), *years, toward)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a chat session ({type(exc).__name__}: {exc})") from None


def taste_scores(session: Session, user_vector: np.ndarray, item_vectors: np.ndarray, bias: np.ndarray, *,
                 gamma: float = TASTE_GAMMA) -> np.ndarray:
    """r_cf for this turn: ``V·u′ + b`` where the user vector ``u`` moved by ``γ·|u|`` towards
    (away from) the unit item vector of every item said "more (less) like": the critique counts in
    the collaborative half too (items that the same people liked), not only in the text's."""
    V = np.asarray(item_vectors, dtype=np.float64)
    u = np.asarray(user_vector, dtype=np.float64).copy()
    size = float(np.linalg.norm(u)) or 1.0
    for item, sign in session.toward:
        u += sign * gamma * size * unit(V[item])
    return V @ u + np.asarray(bias, dtype=np.float64)


def turn_scores(session: Session, text_embeddings: np.ndarray, r_cf: np.ndarray | None, alpha: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Scores of every item for this turn: (blend, z(r_cf), z(r_cb), α used).

    ``text_embeddings`` (I, D) are unit rows. Without a user vector (``r_cf`` None: no ratings or
    no model) α is 0; without a request yet α is 1 (the user's taste alone)."""
    n = len(text_embeddings)
    if r_cf is None:
        alpha = 0.0
    if session.query is None:
        alpha = 1.0 if r_cf is not None else 0.0
    r_cb = np.asarray(text_embeddings, dtype=np.float64) @ session.query if session.query is not None else np.zeros(n)
    cf = np.zeros(n) if r_cf is None else np.asarray(r_cf, dtype=np.float64)
    z_cf, z_cb = zscore_rows(cf[None, :])[0], zscore_rows(r_cb[None, :])[0]
    return alpha * z_cf + (1.0 - alpha) * z_cb, z_cf, z_cb, alpha


@dataclass(frozen=True)
class Reason:
    """Why an item is shown: the request word closest to it, or the liked item closest to it."""

    word: str | None
    liked: int | None
    similarity: float


def reasons(items: Sequence[int], *, alpha: float, z_cf: np.ndarray, z_cb: np.ndarray, words: Sequence[str],
            word_embeddings: np.ndarray | None, text_embeddings: np.ndarray, liked: Sequence[int]) -> list[Reason]:
    """One reason per item: the part of the blend that gave it more (``(1−α)·z(r_cb)`` against
    ``α·z(r_cf)``) picks the kind; the request word (cosine with the item's text) or the liked
    item (cosine of the two texts) closest to it fills it in."""
    out = []
    liked = np.asarray(liked, dtype=np.int64)
    for i in items:
        e = text_embeddings[i]
        by_text = (1.0 - alpha) * z_cb[i] >= alpha * z_cf[i]
        if words and word_embeddings is not None and (by_text or not len(liked)):
            sims = word_embeddings @ e
            j = int(np.argmax(sims))
            out.append(Reason(words[j], None, float(sims[j])))
        elif len(liked):
            sims = text_embeddings[liked] @ e
            j = int(np.argmax(sims))
            out.append(Reason(None, int(liked[j]), float(sims[j])))
        else:
            out.append(Reason(None, None, 0.0))
    return out
