"""The device's own data: one SQLite file that never leaves the device.

Schema (version :data:`SCHEMA_VERSION`)::

    schema_version(version)                       one row; a store of another version is refused
    ratings(item PRIMARY KEY, rating, timestamp)  the user's ratings, item ids as the catalogue spells them
    catalog(item PRIMARY KEY, idx, title)         the item id list the global model indexes:
                                                  row ``idx`` of the item embeddings is ``item``
    feedback(id, item -> catalog.item, kind, timestamp)   clicks (items accepted in a chat: implicit
                                                  positives) and dismissals of recommendations
    state(key PRIMARY KEY, value BLOB)            client-id (JSON), user-vector and global-model
                                                  (safetensors bytes, never pickle), privacy-ledger (JSON),
                                                  item-texts (JSON: the catalogue's public texts, for
                                                  the hybrid model; valid for the item list it names),
                                                  chat-session (JSON: fedrec-client chat's conversation)

The catalogue is the server's published items file (``item_id,title``, one row per row of the
model, in order; :func:`common.data.items_file.read_items_file`). It arrives with ``fedrec-client import --items`` or
with a global model, and it is how a device turns its item ids into the model's indices.

Opened in WAL mode with foreign keys on and ``secure_delete`` (deleted rows are zeroed).
The file is created readable by its owner only. What the store gives back is checked: a state
blob that does not parse, or a model or vector with NaN/Inf, is a :class:`StoreError` naming
it, never a traceback and never a silent NaN recommendation.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.ratings_file import read_ratings_file
from client.state_blobs import (  # noqa: F401 - GlobalModel, non_finite, user_vector_fingerprint: re-exported
    GlobalModel,
    decode_global_model,
    decode_user_vector,
    encode_global_model,
    encode_user_vector,
    non_finite,
    user_vector_fingerprint,
)
from client.wipe import StoreBusyError, StoreError, StoreNotFoundError, wipe  # noqa: F401 - re-exported

if TYPE_CHECKING:  # importing them pulls in torch: only client_data() needs them, lazily
    from common.models import ClientData
    from common.privacy.device import DevicePolicy

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_DB = "~/.fedrec/device.sqlite"
FEEDBACK_KINDS = ("click", "dismiss")

# Keys of the state table.
CLIENT_ID = "client-id"  # pseudonymous id sent to the server for sampling; new after forget()
USER_VECTOR = "user-vector"
GLOBAL_MODEL = "global-model"
PRIVACY_LEDGER = "privacy-ledger"
PRIVACY_POLICY = "privacy-policy"  # the owner's floor: clip, local noise (fedrec-client privacy set)
CHAT_SESSION = "chat-session"  # fedrec-client chat's conversation (request vector, exclusions), kept across restarts
ITEM_TEXTS = "item-texts"  # the catalogue's public item texts (JSON {"items": [...], "texts": [...]})

_SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE ratings (item TEXT NOT NULL, rating REAL NOT NULL, timestamp REAL, PRIMARY KEY (item));
CREATE TABLE catalog (item TEXT NOT NULL PRIMARY KEY, idx INTEGER NOT NULL, title TEXT NOT NULL);
CREATE TABLE feedback (
    id INTEGER PRIMARY KEY,
    item TEXT NOT NULL REFERENCES catalog(item) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(f"'{k}'" for k in FEEDBACK_KINDS)})),
    timestamp REAL NOT NULL);
CREATE TABLE state (key TEXT NOT NULL PRIMARY KEY, value BLOB NOT NULL);
"""
_TABLES = ("feedback", "ratings", "catalog", "state")  # children first (foreign keys)


@dataclass(frozen=True)
class Rating:
    item: str
    rating: float
    timestamp: float | None


@dataclass(frozen=True)
class ImportReport:
    """What :meth:`DeviceStore.import_ratings` did with each row of a file."""

    path: str
    user: str | None  # the file's user id, when it had a user column
    rows: int  # data rows read
    inserted: int  # items new on the device
    updated: int  # items whose rating or timestamp changed
    unchanged: int  # items already stored with the same rating and timestamp
    stale: int  # rows older than the rating already stored (the stored one is kept)
    duplicates: int  # rows of an item that appears again in the file (its latest row counts)

    def summary(self) -> str:
        return (f"{self.path}: {self.rows} rows: {self.inserted} inserted, {self.updated} updated, "
                f"{self.unchanged} unchanged, {self.stale} older than stored (kept), "
                f"{self.duplicates} duplicate rows (latest kept)")


@dataclass(frozen=True)
class MappedRatings:
    """The device's ratings in a catalogue's index space, sorted by index."""

    items: np.ndarray  # int64 indices
    ratings: np.ndarray  # float32
    unknown: tuple[str, ...]  # rated item ids the catalogue does not have (not used, reported)


class DeviceStore:
    """One user's data on one device (see the module docstring for the schema).

    Parameters
    ----------
    path:
        The SQLite file (``~`` is expanded).
    create:
        Create the file (and its folder) when missing; otherwise raise :class:`StoreNotFoundError`.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path).expanduser().absolute()
        if not self.path.is_file():
            if not create:
                raise StoreNotFoundError(f"{self.path}: no device store here; import your ratings first "
                                         "(fedrec-client import ratings.csv)")
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # private before any data
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path}: not a fedrec device store ({exc})") from None
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot use write-ahead logging here (journal mode {mode})")
        for pragma in ("foreign_keys=ON", "secure_delete=ON", "synchronous=NORMAL"):
            self._db.execute(f"PRAGMA {pragma}")
        with self._tx() as db:  # IMMEDIATE: two processes creating the store at once cannot both create it
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                self._put(CLIENT_ID, json.dumps(secrets.randbelow(2**31)).encode())
                return
        if "schema_version" not in tables:
            raise StoreError(f"{self.path}: an SQLite file, but not a fedrec device store (no schema_version table)")
        version = self.schema_version()
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: device store of schema version {version}; this fedrec-client reads "
                             f"version {SCHEMA_VERSION} (upgrade fedrec-client, or forget and import again)")

    # ---------------------------------------------------------------- plumbing
    def __enter__(self) -> "DeviceStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _get(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def _put(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                         "excluded.value", (key, sqlite3.Binary(value)))

    def schema_version(self) -> int:
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise StoreError(f"{self.path}: its schema_version table is damaged ({row!r}): not a usable device "
                             "store (fedrec-client forget deletes it)") from None

    def client_id(self) -> int:
        blob = self._get(CLIENT_ID)
        with self._corrupt(CLIENT_ID):
            value = json.loads(blob or b"0")
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"expected a whole number, found {value!r}")
            return value

    @contextmanager
    def _corrupt(self, key: str) -> Iterator[None]:
        """Turn a state value that does not parse into a StoreError naming it (no traceback)."""
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:  # json, safetensors, UnicodeDecodeError, KeyError...: all mean "damaged"
            raise StoreError(f"{self.path}: the stored {key} is damaged ({type(exc).__name__}: {exc}); "
                             "fedrec-client forget deletes the store, then import your ratings again") from None

    def counts(self) -> dict[str, int]:
        return {table: int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for table in ("ratings", "feedback", "catalog")}

    # ---------------------------------------------------------------- ratings
    def import_ratings(self, csv_path: str | Path, encoding: str | None = None) -> ImportReport:
        """Add or update ratings from a CSV file (``.tsv``: tab-separated) of this one user.

        Header ``item,rating[,timestamp]`` or ``user,item,rating[,timestamp]`` (every row one
        user). An item twice in the file counts once: its latest row (ties: the last). A row
        older than the rating already stored is not applied. Raises :class:`~common.data.errors.DataError` naming
        the file and line of the first bad row; nothing is stored then. ``encoding``: UTF-8
        unless named (another is logged as a warning).
        """
        records, user = read_ratings_file(csv_path, encoding)
        latest: dict[str, tuple[float, float | None]] = {}
        for _, item, rating, stamp in records:
            old = latest.get(item)
            if old is None or stamp is None or old[1] is None or stamp >= old[1]:
                latest[item] = (rating, stamp)
        counts = dict.fromkeys(("inserted", "updated", "unchanged", "stale"), 0)
        with self._tx() as db:
            stored = {item: (r, t) for item, r, t in db.execute("SELECT item, rating, timestamp FROM ratings")}
            upserts = []
            for item, (rating, stamp) in latest.items():
                before = stored.get(item)
                if before is not None and stamp is not None and before[1] is not None and stamp < before[1]:
                    counts["stale"] += 1
                    continue
                counts["inserted" if before is None else "unchanged" if before == (rating, stamp) else "updated"] += 1
                upserts.append((item, rating, stamp))
            db.executemany("INSERT INTO ratings (item, rating, timestamp) VALUES (?, ?, ?) ON CONFLICT(item) DO "
                           "UPDATE SET rating = excluded.rating, timestamp = excluded.timestamp", upserts)
        return ImportReport(path=str(csv_path), user=user, rows=len(records),
                            duplicates=len(records) - len(latest), **counts)

    def ratings(self) -> list[Rating]:
        return [Rating(item, float(r), None if t is None else float(t))
                for item, r, t in self._db.execute("SELECT item, rating, timestamp FROM ratings ORDER BY item")]

    def map_ratings(self, item_index: Mapping[str, int]) -> MappedRatings:
        """The ratings as indices of ``item_index``; ids it lacks are listed in ``unknown``.

        Items the user accepted (feedback ``click``: ``fedrec-client chat``'s "yes 2") and did not
        rate are implicit positives, rated as the user's highest rating (1.0 without any): they
        change the user vector here and the next federated update, like a rating would."""
        known, unknown = [], []
        ratings = self.ratings()
        for r in ratings:
            if r.item in item_index:
                known.append((item_index[r.item], r.rating))
            else:
                unknown.append(r.item)
        rated = {r.item for r in ratings}
        accepted = max((r.rating for r in ratings), default=1.0)
        for item in dict.fromkeys(item for item, kind, _ in self.feedback() if kind == "click"):
            if item not in rated and item in item_index:
                known.append((item_index[item], accepted))
        known.sort()
        return MappedRatings(items=np.array([i for i, _ in known], dtype=np.int64),
                             ratings=np.array([r for _, r in known], dtype=np.float32), unknown=tuple(unknown))

    def client_data(self, item_index: Mapping[str, int]) -> "ClientData":
        """This device as a federated client: one user, its ratings in ``item_index``'s space.

        Rated items the index lacks are left out and logged as a warning with their count.
        There are no held-out items on a device: ``valid`` and ``test`` are empty."""
        from common.models import ClientData, UserData

        mapped = self.map_ratings(item_index)
        if mapped.unknown:
            log.warning("%s: %d of %d rated items are not in the item catalogue and are not used: %s",
                        self.path, len(mapped.unknown), len(mapped.unknown) + len(mapped.items),
                        ", ".join(mapped.unknown[:5]) + (", ..." if len(mapped.unknown) > 5 else ""))
        empty = np.zeros(0, dtype=np.int64)
        return ClientData(client_id=self.client_id(), users=(0,), train=(UserData(mapped.items, mapped.ratings),),
                          valid=(empty,), test=(empty,))

    # ---------------------------------------------------------------- feedback
    def add_feedback(self, item: str, kind: str, timestamp: float | None = None) -> None:
        if kind not in FEEDBACK_KINDS:
            raise StoreError(f"feedback kind must be one of {', '.join(FEEDBACK_KINDS)}, got {kind!r}")
        try:
            with self._tx() as db:
                db.execute("INSERT INTO feedback (item, kind, timestamp) VALUES (?, ?, ?)",
                           (item, kind, time.time() if timestamp is None else float(timestamp)))
        except sqlite3.IntegrityError:
            raise StoreError(f"no item {item!r} in the item catalogue: feedback is about catalogue items") from None

    def feedback(self) -> list[tuple[str, str, float]]:
        return list(self._db.execute("SELECT item, kind, timestamp FROM feedback ORDER BY id"))

    # ---------------------------------------------------------------- catalogue and global model
    def catalog(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(item ids, titles) in the global model's row order."""
        rows = self._db.execute("SELECT item, title FROM catalog ORDER BY idx").fetchall()
        return tuple(r[0] for r in rows), tuple(r[1] for r in rows)

    def set_catalog(self, item_ids: Sequence[str], titles: Sequence[str] | None = None) -> bool:
        """Replace the item catalogue. A stored global model indexing another id list is dropped
        (its rows would mean other items); returns whether that happened."""
        with self._tx():
            return self._write_catalog(item_ids, titles)

    def _write_catalog(self, item_ids: Sequence[str], titles: Sequence[str] | None) -> bool:
        ids = [str(i) for i in item_ids]
        if len(set(ids)) != len(ids):
            twice = sorted(i for i, n in Counter(ids).items() if n > 1)
            raise StoreError(f"item ids must be unique, found {', '.join(map(repr, twice[:5]))} more than once")
        if titles is not None and len(titles) != len(ids):
            raise StoreError(f"{len(ids)} item ids but {len(titles)} titles")
        current = {item: title for item, title in self._db.execute("SELECT item, title FROM catalog")}
        old_ids = self.catalog()[0]
        new_titles = [current.get(i, i) for i in ids] if titles is None else [str(t) for t in titles]
        self._db.executemany("DELETE FROM catalog WHERE item = ?", [(i,) for i in set(current) - set(ids)])
        self._db.executemany("INSERT INTO catalog (item, idx, title) VALUES (?, ?, ?) ON CONFLICT(item) DO UPDATE "
                             "SET idx = excluded.idx, title = excluded.title",
                             [(item, k, title) for k, (item, title) in enumerate(zip(ids, new_titles))])
        if tuple(ids) != old_ids and self._get(GLOBAL_MODEL) is not None:
            self._db.execute("DELETE FROM state WHERE key = ?", (GLOBAL_MODEL,))
            return True
        return False

    def set_item_texts(self, item_ids: Sequence[str], texts: Sequence[str]) -> None:
        """Keep the public text of every catalogue item (the items file's ``text`` column), for
        ``item_ids`` in model-row order: what the hybrid model's text tower reads on the device."""
        ids, texts = [str(i) for i in item_ids], [str(t) for t in texts]
        if len(ids) != len(texts):
            raise StoreError(f"{len(ids)} item ids but {len(texts)} item texts")
        with self._tx():
            self._put(ITEM_TEXTS, json.dumps({"items": ids, "texts": texts}).encode())

    def item_texts(self) -> tuple[str, ...] | None:
        """The catalogue's item texts in model-row order; None when none are kept or they were
        kept for another item list (a newer catalogue without texts)."""
        blob = self._get(ITEM_TEXTS)
        if blob is None:
            return None
        with self._corrupt(ITEM_TEXTS):
            value = json.loads(blob)
            if not (isinstance(value, dict) and isinstance(value.get("items"), list)
                    and isinstance(value.get("texts"), list) and len(value["items"]) == len(value["texts"])
                    and all(isinstance(t, str) for t in value["texts"])):
                raise ValueError("expected {\"items\": [...], \"texts\": [...]} of equal length")
        if tuple(value["items"]) != self.catalog()[0]:
            return None
        return tuple(value["texts"])

    def set_global_model(self, item_ids: Sequence[str], embeddings: np.ndarray, bias: np.ndarray, round: int, *,
                         titles: Sequence[str] | None = None, loss: str | None = None,
                         user_reg: float | None = None, run: int | None = None) -> None:
        """Keep a global model: its arrays, the item ids of its rows (the catalogue; titles kept
        by id unless given), the run's ``model.loss``/``model.user-reg`` for reconstruction and
        the run that sent it. A model with NaN/Inf (also after the cast to float32) is refused."""
        try:
            blob = encode_global_model(len(item_ids), embeddings, bias, round, loss=loss, user_reg=user_reg, run=run)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        with self._tx():
            self._write_catalog(item_ids, titles)
            self._put(GLOBAL_MODEL, blob)

    def get_global_model(self) -> GlobalModel | None:
        """The stored global model; a damaged one (does not parse, NaN/Inf, shapes that disagree)
        is a StoreError: the next model from the federation replaces it (client/data.py)."""
        blob = self._get(GLOBAL_MODEL)
        if blob is None:
            return None
        with self._corrupt(GLOBAL_MODEL):
            emb, bias, model_round, loss, user_reg, run = decode_global_model(blob)
        ids, titles = self.catalog()
        if emb.shape[0] != len(ids):
            raise StoreError(f"{self.path}: the stored global model has {emb.shape[0]} items, the catalogue "
                             f"{len(ids)}: import the server's items file again")
        return GlobalModel(ids, titles, emb, bias, model_round, loss, user_reg, run)

    # ---------------------------------------------------------------- user vector
    def set_user_vector(self, vector: np.ndarray, *, fingerprint: str = "") -> None:
        """Keep the user's vector (bytes as given) and what it was fitted to (``fingerprint``)."""
        try:
            blob = encode_user_vector(vector, fingerprint)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        with self._tx():
            self._put(USER_VECTOR, blob)

    def get_user_vector(self, fingerprint: str | None = None) -> np.ndarray | None:
        """The stored vector; None when there is none, it was fitted to another ``fingerprint``,
        or it is damaged (it is only a cache: the caller fits a new one)."""
        blob = self._get(USER_VECTOR)
        if blob is None:
            return None
        try:
            vector, stored = decode_user_vector(blob)
        except Exception:  # noqa: BLE001 - damaged cache: fitted again
            log.warning("%s: the stored user vector is damaged and is fitted again", self.path)
            return None
        if fingerprint is not None and stored != fingerprint:
            return None
        if vector.ndim != 1 or vector.dtype.kind != "f" or non_finite(vector, "user vector"):
            log.warning("%s: the stored user vector is not a finite 1-D vector and is fitted again", self.path)
            return None
        return vector

    # ---------------------------------------------------------------- privacy ledger
    def ledger_state(self) -> dict[str, Any] | None:
        """The device's :class:`~common.privacy.ledger.PrivacyLedger` ``state_dict``, if any."""
        blob = self._get(PRIVACY_LEDGER)
        if blob is None:
            return None
        with self._corrupt(PRIVACY_LEDGER):
            state = json.loads(blob.decode("utf-8"))
            if not isinstance(state, dict):
                raise ValueError(f"expected a JSON object, found {type(state).__name__}")
            return state

    def set_ledger_state(self, state: Mapping[str, Any]) -> None:
        with self._tx():
            self._put(PRIVACY_LEDGER, json.dumps(dict(state), sort_keys=True, allow_nan=False).encode("utf-8"))

    # ---------------------------------------------------------------- privacy policy
    def privacy_policy(self) -> "DevicePolicy":
        """The owner's privacy floor (:class:`common.privacy.device.DevicePolicy`); the default
        (clip 1.0, no local noise) when none was set."""
        from common.privacy.device import DEFAULT_POLICY, DevicePolicy

        blob = self._get(PRIVACY_POLICY)
        if blob is None:
            return DEFAULT_POLICY
        try:
            saved = json.loads(blob.decode("utf-8"))
            return DevicePolicy(clip=float(saved["clip"]), local_noise=float(saved["local_noise"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.path}: the stored privacy policy is damaged ({exc}); set it again "
                             "(fedrec-client privacy set ...)") from None

    def set_privacy_policy(self, policy: "DevicePolicy") -> None:
        with self._tx():
            self._put(PRIVACY_POLICY, json.dumps(policy.to_dict(), sort_keys=True).encode("utf-8"))

    # ---------------------------------------------------------------- chat session
    def chat_session(self) -> dict | None:
        """The saved ``fedrec-client chat`` session (JSON object), None when there is none."""
        blob = self._get(CHAT_SESSION)
        if blob is None:
            return None
        with self._corrupt(CHAT_SESSION):
            value = json.loads(blob)
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, found {type(value).__name__}")
        return value

    def set_chat_session(self, state: Mapping[str, Any] | None) -> None:
        """Keep the chat session (None: delete it)."""
        with self._tx() as db:
            if state is None:
                db.execute("DELETE FROM state WHERE key = ?", (CHAT_SESSION,))
            else:
                self._put(CHAT_SESSION, json.dumps(state, sort_keys=True).encode("utf-8"))

    # ---------------------------------------------------------------- forget
    def forget(self, *, wait: float = 2.0) -> list[Path]:
        """Delete everything so that no byte of it stays in the files, then the files. The store
        is closed afterwards. Returns the files removed.

        1. Take the store for this connection alone (``locking_mode=EXCLUSIVE``, ``BEGIN
           EXCLUSIVE``, waiting up to ``wait`` seconds). While another program reads it (a running
           ``fedrec-client``, the SuperNode of ``fedrec-client join``) a checkpoint cannot complete
           and the main file would keep the old pages: :class:`StoreBusyError`, nothing deleted.
        2. Delete every row with ``secure_delete`` on: SQLite overwrites deleted content with zeros.
        3. ``wal_checkpoint(TRUNCATE)``, checked: the zeroed pages replace the old ones in the main
           file and the ``-wal`` (which holds every version written since the last checkpoint) is
           emptied. Only then are the file and its ``-wal``/``-shm``/``-journal`` unlinked.
        """
        return wipe(self._db, self.path, _TABLES, wait=wait, close=self.close)
