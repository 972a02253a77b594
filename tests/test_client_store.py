"""The device store: a real SQLite file; round trips, import validation, forget."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.store import (
    SCHEMA_VERSION,
    DeviceStore,
    StoreBusyError,
    StoreError,
    StoreNotFoundError,
    user_vector_fingerprint,
)
from common.data.errors import DataError
from common.data.items_file import read_items_file, write_items_file
from common.privacy.dp_fedavg import ledger_for
from common.privacy.ledger import MechanismEvent, PrivacyLedger, Sampling


@pytest.fixture
def store(tmp_path: Path):
    with DeviceStore(tmp_path / "dev" / "device.sqlite") as s:
        yield s


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the file itself

def test_new_store_is_a_private_wal_sqlite_file_with_a_schema_version(tmp_path):
    path = tmp_path / "a" / "b" / "device.sqlite"
    with DeviceStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert 0 <= store.client_id() < 2**31
    assert path.stat().st_mode & 0o777 == 0o600
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "ratings", "feedback", "state", "catalog"} <= tables
    db.close()


def test_reopening_keeps_the_client_id(tmp_path):
    with DeviceStore(tmp_path / "d.sqlite") as store:
        cid = store.client_id()
    with DeviceStore(tmp_path / "d.sqlite", create=False) as store:
        assert store.client_id() == cid


def test_missing_store_is_not_created_unless_asked(tmp_path):
    with pytest.raises(StoreNotFoundError, match="fedrec-client import"):
        DeviceStore(tmp_path / "none.sqlite", create=False)
    assert not (tmp_path / "none.sqlite").exists()


def test_other_files_and_versions_are_refused(tmp_path):
    junk = write(tmp_path / "junk.sqlite", "this is not a database, just some text " * 20)
    with pytest.raises(StoreError, match="not a fedrec device store"):
        DeviceStore(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="no schema_version"):
        DeviceStore(other)
    newer = tmp_path / "newer.sqlite"
    DeviceStore(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        DeviceStore(newer)


# ---------------------------------------------------------------- round trips

def test_user_vector_bytes_round_trip_exactly(store):
    vector = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    store.set_user_vector(vector, fingerprint="abc")
    back = store.get_user_vector()
    assert back.dtype == vector.dtype and back.tobytes() == vector.tobytes()
    assert store.get_user_vector("abc").tobytes() == vector.tobytes()
    assert store.get_user_vector("another model") is None
    with pytest.raises(StoreError, match="1-D float"):
        store.set_user_vector(np.zeros((2, 3)))


def test_user_vector_is_stored_as_safetensors_not_pickle(store):
    store.set_user_vector(np.ones(4, dtype=np.float32))
    blob = store._db.execute("SELECT value FROM state WHERE key = 'user-vector'").fetchone()[0]
    from safetensors.numpy import load

    assert np.array_equal(load(bytes(blob))["user_vector"], np.ones(4, dtype=np.float32))
    assert not bytes(blob).startswith(b"\x80")  # a pickle stream starts with PROTO


def test_global_model_round_trip(store):
    rng = np.random.default_rng(1)
    emb, bias = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    ids = ["10", "20", "30", "40", "50"]
    store.set_global_model(ids, emb, bias, 7, titles=[f"Movie {i}" for i in ids], loss="softmax", user_reg=40.0)
    model = store.get_global_model()
    assert model.item_ids == tuple(ids) and model.titles[2] == "Movie 30"
    assert model.embeddings.tobytes() == emb.tobytes() and model.bias.tobytes() == bias.tobytes()
    assert (model.round, model.loss, model.user_reg) == (7, "softmax", 40.0)
    assert model.index()["40"] == 3
    # a new model for the same ids keeps the titles
    store.set_global_model(ids, emb * 2, bias, 8)
    model = store.get_global_model()
    assert model.round == 8 and model.titles[0] == "Movie 10" and model.loss is None
    with pytest.raises(StoreError, match="must agree"):
        store.set_global_model(ids[:4], emb, bias, 9)


def test_a_new_catalogue_with_other_ids_drops_the_model(store):
    store.set_global_model(["a", "b"], np.zeros((2, 2)), np.zeros(2), 1)
    assert store.set_catalog(["a", "b"], ["A", "B"]) is False  # same ids: titles only
    assert store.get_global_model().titles == ("A", "B")
    assert store.set_catalog(["b", "a", "c"]) is True
    assert store.get_global_model() is None
    assert store.catalog() == (("b", "a", "c"), ("B", "A", "c"))
    with pytest.raises(StoreError, match="unique"):
        store.set_catalog(["x", "y", "x"])


def test_ledger_state_round_trip(store):
    assert store.ledger_state() is None
    ledger = ledger_for("local", 1e-4)
    ledger.record(MechanismEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1, sampling=Sampling.NONE,
                                 parameters=("item_embeddings",), round=3))
    store.set_ledger_state(ledger.state_dict())
    back = PrivacyLedger.from_state_dict(store.ledger_state())
    assert back.events == ledger.events and back.epsilon() == pytest.approx(ledger.epsilon())


def test_feedback_refers_to_catalogue_items(store):
    store.set_catalog(["a", "b"])
    store.add_feedback("a", "dismiss", timestamp=5.0)
    assert store.feedback() == [("a", "dismiss", 5.0)]
    with pytest.raises(StoreError, match="not.*catalogue|no item 'zzz'"):
        store.add_feedback("zzz", "click")
    with pytest.raises(StoreError, match="kind"):
        store.add_feedback("a", "love")
    store.set_catalog(["b"])  # item a left the catalogue: its feedback goes with it
    assert store.feedback() == []


# ---------------------------------------------------------------- import

def test_import_counts_inserted_updated_unchanged_stale_and_duplicates(store, tmp_path):
    first = write(tmp_path / "r1.csv", "item,rating,timestamp\na,4,100\nb,3,100\nc,5,100\n")
    report = store.import_ratings(first)
    assert (report.rows, report.inserted, report.updated, report.duplicates) == (3, 3, 0, 0)
    second = write(tmp_path / "r2.csv",
                   "item,rating,timestamp\na,4,100\nb,1,200\nc,2,50\nd,5,300\nd,2,100\nd,4,400\n")
    report = store.import_ratings(second)
    # a same; b newer; c older than stored (kept); d three times: the latest (t=400) counts
    assert (report.rows, report.inserted, report.updated, report.unchanged, report.stale, report.duplicates) == \
        (6, 1, 1, 1, 1, 2)
    assert {r.item: (r.rating, r.timestamp) for r in store.ratings()} == \
        {"a": (4.0, 100.0), "b": (1.0, 200.0), "c": (5.0, 100.0), "d": (4.0, 400.0)}
    assert "2 duplicate rows" in report.summary()


def test_import_one_user_file_with_user_column(store, tmp_path):
    path = write(tmp_path / "mine.csv", "user,item,rating,timestamp\nme,1,5,1\nme,2,3,2\n")
    report = store.import_ratings(path)
    assert report.user == "me" and report.inserted == 2


def test_import_without_timestamps_and_tsv(store, tmp_path):
    report = store.import_ratings(write(tmp_path / "r.tsv", "item\trating\nx\t1\nx\t2\n"))
    assert (report.inserted, report.duplicates) == (1, 1)
    assert store.ratings()[0].rating == 2.0 and store.ratings()[0].timestamp is None  # ties: the last row


def test_multi_user_file_is_rejected_naming_both_users_and_lines(store, tmp_path):
    path = write(tmp_path / "all.csv", "user,item,rating,timestamp\nu1,1,5,1\nu1,2,3,2\nu2,1,4,3\n")
    with pytest.raises(DataError) as err:
        store.import_ratings(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4:") and "'u2'" in message and "'u1' on line 2" in message
    assert "one user" in message
    assert store.ratings() == []  # nothing stored


@pytest.mark.parametrize("text, line, expected", [
    ("", 1, "empty file"),
    ("item,rating\n", 2, "expected rating rows"),
    ("item,score\na,1\n", 1, "unexpected column 'score'"),
    ("rating,timestamp\n1,2\n", 1, "missing column 'item'"),
    ("item,item,rating\n", 1, "appears twice"),
    ("item,rating\na,5\nb\n", 3, "expected 2 fields"),
    ("item,rating\na,5\nb,great\n", 3, "column 'rating': expected a number, found 'great'"),
    ("item,rating\na,nan\n", 2, "finite"),
    ("item,rating,timestamp\na,5,yesterday\n", 2, "column 'timestamp'"),
    ("item,rating\n,5\n", 2, "non-empty item id"),
    ("item,rating\na,5\nitem,rating\n", 3, "header"),
    ('item,rating\n"a,5\n', 2, "well-formed CSV"),
    ("user,item,rating,timestamp\n,a,5,1\n", 2, "non-empty user id"),
])
def test_import_errors_name_file_and_line(store, tmp_path, text, line, expected):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as err:
        store.import_ratings(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and expected in str(err.value)
    assert err.value.line == line


def test_import_missing_file(store, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        store.import_ratings(tmp_path / "nope.csv")


# ---------------------------------------------------------------- items file

def test_items_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "items.csv"
    write_items_file(path, ["1", "2"], ["Toy Story (1995)", 'Say "Anything", Again (1989)'])
    assert read_items_file(path) == (["1", "2"], ["Toy Story (1995)", 'Say "Anything", Again (1989)'])
    bad = write(tmp_path / "dup.csv", "item_id,title\n1,A\n2,B\n1,C\n")
    with pytest.raises(DataError, match=r"dup.csv:4: .*'1' again \(first on line 2\)"):
        read_items_file(bad)
    with pytest.raises(DataError, match=r"hdr.csv:1: expected the header item_id,title"):
        read_items_file(write(tmp_path / "hdr.csv", "id,name\n1,A\n"))


# ---------------------------------------------------------------- client data

def test_client_data_maps_ids_to_indices_and_reports_unknown_items(store, tmp_path, caplog):
    store.import_ratings(write(tmp_path / "r.csv", "item,rating\nc,5\na,3\nzz,4\n"))
    data = store.client_data({"a": 0, "b": 1, "c": 2})
    assert data.client_id == store.client_id() and data.users == (0,)
    assert data.train[0].items.tolist() == [0, 2] and data.train[0].items.dtype == np.int64
    assert data.train[0].ratings.tolist() == [3.0, 5.0] and data.train[0].ratings.dtype == np.float32
    assert len(data.valid[0]) == 0 and len(data.test[0]) == 0
    assert "1 of 3 rated items are not in the item catalogue" in caplog.text and "zz" in caplog.text
    assert store.map_ratings({"a": 0}).unknown == ("c", "zz")


def test_fingerprint_changes_with_model_ratings_and_config():
    emb, bias = np.ones((3, 2), np.float32), np.zeros(3, np.float32)
    items, ratings = np.array([0, 2]), np.array([1.0, 2.0], np.float32)
    base = user_vector_fingerprint(emb, bias, items, ratings, "softmax", 40.0)
    assert base == user_vector_fingerprint(emb.astype(np.float64), bias, items.astype(np.int32), ratings, "softmax", 40)
    assert base != user_vector_fingerprint(emb * 2, bias, items, ratings, "softmax", 40.0)
    assert base != user_vector_fingerprint(emb, bias, items, ratings * 2, "softmax", 40.0)
    assert base != user_vector_fingerprint(emb, bias, items, ratings, "mse", 40.0)
    assert base != user_vector_fingerprint(emb, bias, items, ratings, None, None)


# ---------------------------------------------------------------- forget

def test_forget_removes_the_file_and_its_wal_and_shm(tmp_path):
    path = tmp_path / "device.sqlite"
    store = DeviceStore(path)
    store.import_ratings(write(tmp_path / "r.csv", "item,rating\na,5\n"))
    store.set_user_vector(np.ones(3, dtype=np.float32))
    reader = sqlite3.connect(path)  # another connection came and went: -wal and -shm stay while the store is open
    assert reader.execute("SELECT COUNT(*) FROM ratings").fetchall() == [(1,)]
    reader.close()
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    assert wal.exists() and shm.exists()
    removed = store.forget()
    assert path in removed and wal in removed and shm in removed
    assert not path.exists() and not wal.exists() and not shm.exists()
    with DeviceStore(path) as fresh:  # a new store: nothing left over
        assert fresh.ratings() == [] and fresh.get_user_vector() is None


# ---------------------------------------------------------------- forget with another program reading (issue #12, finding 6)

SECRET = "forgotten-item-7c1e5"  # the bytes that must not survive forget, in the main file or the -wal


def secret_store(path: Path, tmp_path: Path) -> DeviceStore:
    """A store whose ratings, catalogue, feedback and model all name SECRET: part of it already
    checkpointed into the main file, part still in the -wal only."""
    store = DeviceStore(path)
    ids = [f"{SECRET}-{k}" for k in range(300)]
    store.import_ratings(write(tmp_path / "r.csv", "item,rating\n" + "".join(f"{i},4\n" for i in ids)))
    store.set_global_model(ids, np.ones((300, 4)), np.zeros(300), 1, titles=[f"Title of {i}" for i in ids])
    assert store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # now in the main file
    store.add_feedback(ids[0], "click")  # and this only in the -wal
    assert SECRET.encode() in path.read_bytes() and SECRET.encode() in Path(f"{path}-wal").read_bytes()
    return store


READER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN")  # a read transaction, as a running fedrec-client or SuperNode holds
print(db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0], flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def another_process_reading(path: Path):
    proc = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "300"  # it has read the store
        yield proc
    finally:
        proc.communicate("done\n", timeout=30)


def test_forget_refuses_while_another_process_reads_then_leaves_no_byte_behind(tmp_path, monkeypatch):
    path = tmp_path / "device.sqlite"
    store = secret_store(path, tmp_path)
    with another_process_reading(path):
        with pytest.raises(StoreBusyError, match=r"another program is using the device store.*nothing was deleted"):
            store.forget(wait=0.2)
    assert path.exists() and len(store.ratings()) == 300  # nothing deleted, the store still usable

    seen: dict[str, bytes] = {}  # the bytes of each file at the last moment before it leaves
    real_close, real_unlink = store.close, Path.unlink

    def close_after_reading() -> None:
        for suffix in ("", "-wal"):
            seen[f"before close{suffix}"] = Path(f"{path}{suffix}").read_bytes()
        real_close()

    def unlink_after_reading(self: Path, *args, **kwargs) -> None:
        if self.exists():
            seen[f"before unlink {self.name}"] = self.read_bytes()
        real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(store, "close", close_after_reading)
    monkeypatch.setattr(Path, "unlink", unlink_after_reading)
    removed = store.forget()
    monkeypatch.undo()
    assert path in removed and not path.exists() and not Path(f"{path}-wal").exists()
    assert seen["before close"] and seen["before close-wal"] == b""  # checkpointed, the -wal truncated
    assert seen["before unlink device.sqlite"]
    for when, data in seen.items():
        assert SECRET.encode() not in data and b"Title of" not in data, f"{when}: forgotten data still in the file"


def test_forget_refuses_while_another_connection_of_this_process_reads(tmp_path):
    path = tmp_path / "device.sqlite"
    store = secret_store(path, tmp_path)
    reader = sqlite3.connect(path)
    cursor = reader.execute("SELECT item FROM ratings")
    cursor.fetchone()  # a read in progress
    with pytest.raises(StoreBusyError):
        store.forget(wait=0.1)
    cursor.close()
    reader.close()
    assert store.forget() and not path.exists()


# ---------------------------------------------------------------- what the store gives back is checked (finding 5)

def test_a_global_model_with_nan_inf_or_beyond_float32_is_refused(store):
    ids = ["a", "b"]
    for emb, bias in [(np.array([[np.nan, 1.0], [0.0, 1.0]]), np.zeros(2)),
                      (np.ones((2, 2)), np.array([0.0, np.inf])),
                      (np.array([[1e300, 1.0], [0.0, 1.0]]), np.zeros(2))]:  # finite float64, inf as float32
        with pytest.raises(StoreError, match="NaN or Inf"):
            store.set_global_model(ids, emb, bias, 1)
    assert store.get_global_model() is None
    with pytest.raises(StoreError, match="NaN or Inf"):
        store.set_user_vector(np.array([1.0, np.nan], dtype=np.float32))


def put_raw(store: DeviceStore, key: str, value: bytes) -> None:
    """Write a state value behind the store's back (a damaged file, an older version's bug)."""
    store._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))


def test_damaged_state_values_are_store_errors_naming_them(store):
    from safetensors.numpy import save

    store.set_global_model(["a", "b"], np.ones((2, 2)), np.zeros(2), 3)
    put_raw(store, "global-model", b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(StoreError, match="the stored global-model is damaged"):
        store.get_global_model()
    nan_model = save({"item_embeddings": np.full((2, 2), np.nan, np.float32), "item_bias": np.zeros(2, np.float32)},
                     metadata={"round": "3"})
    put_raw(store, "global-model", nan_model)
    with pytest.raises(StoreError, match="global-model is damaged.*NaN or Inf"):
        store.get_global_model()
    put_raw(store, "privacy-ledger", b"\xff{")
    with pytest.raises(StoreError, match="the stored privacy-ledger is damaged"):
        store.ledger_state()
    put_raw(store, "client-id", b'"seven"')
    with pytest.raises(StoreError, match="the stored client-id is damaged"):
        store.client_id()
    # the user vector is a cache: a damaged or NaN one is fitted again, not used
    put_raw(store, "user-vector", b"junk")
    assert store.get_user_vector() is None
    put_raw(store, "user-vector", save({"user_vector": np.array([np.nan, 1.0], np.float32)}))
    assert store.get_user_vector() is None


def test_import_refuses_a_rating_that_would_become_inf_and_names_a_line_that_is_not_utf8(store, tmp_path):
    with pytest.raises(DataError, match=r"big.csv:3: column 'rating': expected a rating within"):
        store.import_ratings(write(tmp_path / "big.csv", "item,rating\na,5\nb,1e308\n"))
    rows = "".join(f"item{k},4\n" for k in range(2000))  # beyond the text reader's first 8 KiB
    path = tmp_path / "latin.csv"
    path.write_bytes(b"item,rating\n" + rows.encode() + "caf\u00e9,5\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        store.import_ratings(path)
    assert err.value.line == 2002 and "byte 0xe9" in str(err.value)
    assert store.ratings() == []
    assert store.import_ratings(path, encoding="latin-1").inserted == 2001
    assert "caf\u00e9" in {r.item for r in store.ratings()}
