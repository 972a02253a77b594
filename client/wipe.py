"""The device store's errors and how it is wiped (``fedrec-client forget``) so that no byte of
the user's data stays in the SQLite files."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path


class StoreError(ValueError):
    """A device store that cannot be used as asked (wrong file, wrong version, bad input)."""


class StoreNotFoundError(StoreError):
    """No device store at the path (and the caller did not ask to create one)."""


class StoreBusyError(StoreError):
    """Another program has the store open, so it cannot be wiped now (``forget``)."""


def wipe(db: sqlite3.Connection, path: Path, tables: Sequence[str], *, wait: float, close: Callable[[], None]) -> list[Path]:
    """Delete every row of ``tables`` (children first) with ``secure_delete``, write the zeroed
    pages back into the main file, then ``close`` the store and unlink its files; see
    :meth:`client.store.DeviceStore.forget` for the steps and why each is checked."""
    db.execute(f"PRAGMA busy_timeout = {max(0, int(wait * 1000))}")
    if int(db.execute("PRAGMA secure_delete = ON").fetchone()[0]) != 1:
        raise StoreError(f"{path}: this SQLite cannot zero deleted content (secure_delete): not deleted")
    db.execute("PRAGMA locking_mode = EXCLUSIVE")
    try:
        db.execute("BEGIN EXCLUSIVE")
    except sqlite3.OperationalError as exc:
        db.execute("PRAGMA locking_mode = NORMAL")
        raise StoreBusyError(f"{path}: another program is using the device store ({exc}), so it cannot be "
                             "wiped now: nothing was deleted. Close it (a running fedrec-client, or the "
                             "SuperNode of fedrec-client join) and run forget again") from None
    try:
        for table in tables:
            db.execute(f"DELETE FROM {table}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    wal = path.with_name(path.name + "-wal")
    if busy or (wal.exists() and wal.stat().st_size):
        raise StoreBusyError(f"{path}: the rows are deleted, but the write-ahead log could not be written "
                             "back (checkpoint busy), so the file may still hold them: close every program "
                             "using the store and run forget again")
    files = [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    removed = [p for p in files if p.exists()]
    close()  # the last connection: SQLite itself may remove the (empty) -wal and -shm
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
