"""The audit chain's head, checkpointed in SQLite, so that cutting lines off the log's end shows.

A chain alone cannot tell a log whose last lines were removed from one that simply ends there.
`AuditLog` therefore records the head it reached (seq and hash, one row per log file) in a small
table, by default in the gateway's state store (the grant store's SQLite file, beside its tables).
`jitgate audit verify` then requires that line to be in the log with that hash.

Writes are plain UPSERTs that only move forward (a lower seq never replaces a higher one), so
several gateway processes sharing a log each record what they reached and the row keeps the
newest. The connection uses WAL with synchronous=NORMAL: a commit costs about 35 µs here (FULL,
an fsync each time, about 560 µs); a power cut may lose the last checkpoint, never the log.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from jitgate.audit.chain import Head
from jitgate.files import make_private_dirs

TABLE = "audit_chain_heads"
_SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    log TEXT PRIMARY KEY,      -- the live log's absolute path
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    updated_at REAL NOT NULL   -- seconds since the epoch
)"""
_SAVE = (f"INSERT INTO {TABLE} (log, seq, hash, updated_at) VALUES (?, ?, ?, ?) "
         f"ON CONFLICT (log) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, updated_at = excluded.updated_at "
         f"WHERE excluded.seq > {TABLE}.seq")


class CheckpointError(Exception):
    """The head could not be recorded or read."""


def log_key(path: str | Path) -> str:
    return str(Path(path).resolve())


class Checkpoint:
    """One log's row in the checkpoint table. Not thread-safe: its owner serializes calls."""

    def __init__(self, store: str | Path, log: str | Path, busy_timeout: float = 1.0) -> None:
        self.store = Path(store)
        self.key = log_key(log)
        try:
            make_private_dirs(self.store.parent)
            os.close(os.open(self.store, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # A short busy timeout: the proxy's thread waits here while another process commits.
            self.db = sqlite3.connect(self.store, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise CheckpointError(f"cannot open the audit checkpoint store {self.store}: {e}") from e

    def load(self) -> tuple[Head, float] | None:
        try:
            row = self.db.execute(f"SELECT seq, hash, updated_at FROM {TABLE} WHERE log = ?", (self.key,)).fetchone()
        except sqlite3.Error as e:
            raise CheckpointError(f"cannot read the audit checkpoint in {self.store}: {e}") from e
        return (Head(row[0], row[1]), row[2]) if row else None

    def save(self, head: Head) -> None:
        try:
            self.db.execute(_SAVE, (self.key, head.seq, head.hash, time.time()))
        except sqlite3.Error as e:
            raise CheckpointError(f"cannot checkpoint the audit chain in {self.store}: {e}") from e

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass


def read_checkpoint(store: str | Path, log: str | Path) -> tuple[Head, float] | None:
    """The checkpointed head of `log` in `store`, read-only; None when the store or row is absent."""
    store = Path(store)
    if not store.exists():
        return None
    try:
        db = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as e:
        raise CheckpointError(f"cannot open {store}: {e}") from e
    try:
        found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
        if not found:
            return None
        row = db.execute(f"SELECT seq, hash, updated_at FROM {TABLE} WHERE log = ?", (log_key(log),)).fetchone()
    except sqlite3.Error as e:
        raise CheckpointError(f"cannot read {store}: {e}") from e
    finally:
        db.close()
    return (Head(row[0], row[1]), row[2]) if row else None
