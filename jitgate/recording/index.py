"""The recordings index: one SQLite file (`index.db`, WAL) in the recordings folder.

`sessions` has one row per session folder, `calls` one row per recorded call (time, auditID, user,
cluster, verb, resource, namespace, name, status code, decision, rule and grant, the exec cast).
The gateway inserts a call when it is recorded, in its own transaction (after a SIGKILL every
completed call is there), and never waits for the disk: its connection does not checkpoint, a
thread of the index does, from a connection of its own, once a second when something was written
(a checkpoint's fsync once cost every 300th insert ~10 ms, half of what inserting costs). The CLI
and the access API's sessions routes read it beside the running gateway (each with a connection
of its own). Deleting a session (retention) deletes its rows.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from jitgate.recording.sessions import SessionRef

log = logging.getLogger("jitgate.recording")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, user TEXT NOT NULL, grant_id TEXT NOT NULL,
    rule TEXT NOT NULL, cluster TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY, session TEXT NOT NULL, time REAL NOT NULL, audit_id TEXT NOT NULL,
    user TEXT NOT NULL, cluster TEXT NOT NULL, verb TEXT NOT NULL, api_group TEXT NOT NULL,
    resource TEXT NOT NULL, subresource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    path TEXT NOT NULL, code INTEGER NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
    rule TEXT NOT NULL, grant_id TEXT NOT NULL, duration_ms REAL NOT NULL, cast_file TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_by_session ON calls (session, time);
"""

CALL_COLUMNS = ("session", "time", "audit_id", "user", "cluster", "verb", "api_group", "resource", "subresource",
                "namespace", "name", "path", "code", "decision", "reason", "rule", "grant_id", "duration_ms", "cast_file")
_SESSIONS = ("SELECT s.id, s.kind, s.user, s.grant_id, s.rule, s.cluster, s.created, min(c.time), max(c.time), "
             "count(c.id), coalesce(sum(c.decision = 'deny'), 0), coalesce(sum(c.cast_file != ''), 0) "
             "FROM sessions s LEFT JOIN calls c ON c.session = s.id")
_INSERT_CALL = f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))})"


@dataclass(frozen=True)
class SessionRow:
    id: str
    kind: str
    user: str
    grant: str
    rule: str
    cluster: str
    created: float
    first: float | None
    last: float | None
    calls: int
    denied: int
    execs: int


@dataclass(frozen=True)
class Filters:
    user: str = ""
    cluster: str = ""
    namespace: str = ""
    grant: str = ""
    decision: str = ""
    since: float | None = None  # active at or after (its last call)
    until: float | None = None  # active at or before (its first call)


@dataclass(frozen=True)
class Visible:
    """Which sessions a caller may see, as the index can tell: those of `user`, and the grant sessions
    under `rules`; `everything` for an auditor. The caller checks each row again (jitgate.policy.sessions)."""

    user: str = ""
    rules: frozenset[str] = frozenset()
    everything: bool = False


def call_row(session: str, record: dict, when: float, code: int, path: str, duration_ms: float, cast: str = "",
             method: str = "") -> tuple:
    """The index row of one call from its plain record (`Call.record()`); `method` stands for the verb
    of a call refused before its request attributes were read (a CONNECT to a host that is no cluster)."""
    request = record.get("request") or {}
    return (
        session, when, record.get("auditID", ""), (record.get("user") or {}).get("username", ""),
        record.get("cluster", ""), request.get("verb", "") or method, request.get("apiGroup", ""), request.get("resource", ""),
        request.get("subresource", ""), request.get("namespace", ""), request.get("name", ""), path, code,
        record.get("decision", "none"), (record.get("reason") or "")[:1000], record.get("rule", ""),
        record.get("grant", ""), round(duration_ms, 3), cast,
    )


class Index:
    def __init__(self, path: Path, checkpoint_every: float = 0) -> None:
        """`checkpoint_every` (seconds, the gateway's writer): checkpoints run in a thread of the index."""
        self.path = path
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # a committed call survives the process being killed
        self.db.executescript(SCHEMA)
        self.writes = 0
        self.stopping = threading.Event()
        self.checkpointer: threading.Thread | None = None
        if checkpoint_every > 0:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.checkpointer = threading.Thread(target=self._checkpoints, args=(checkpoint_every,), daemon=True,
                                                 name="recordings-index-checkpoints")
            self.checkpointer.start()

    def _checkpoints(self, every: float) -> None:
        """Until close: a PASSIVE checkpoint after each `every` seconds in which something was written.
        Never ends on an error (the writer does not checkpoint, so the WAL would only grow): logs it,
        opens its connection again and tries at the next pass."""
        db: sqlite3.Connection | None = None
        seen = self.writes
        failing = False
        while not self.stopping.wait(every):
            if self.writes == seen:
                continue
            try:
                if db is None:
                    db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                seen = self.writes
                if failing:
                    log.info("checkpoints of the recordings index %s work again", self.path)
                failing = False
            except Exception:  # noqa: BLE001 - whatever broke, the next pass tries again
                if not failing:  # once per run of failures, not every second
                    log.exception("could not checkpoint the recordings index %s", self.path)
                failing = True
                if db is not None:
                    db.close()
                    db = None
        if db is not None:
            db.close()

    def close(self) -> None:
        if self.checkpointer is not None:
            self.stopping.set()
            self.checkpointer.join()
            self.checkpointer = None
        self.db.close()  # the last connection to close checkpoints what is left

    # -- writes (the gateway) -----------------------------------------------------------------

    def add_session(self, ref: SessionRef, created: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (ref.id, ref.kind, ref.user, ref.grant, ref.rule, ref.cluster, created))
        self.writes += 1

    def add_call(self, row: tuple) -> None:
        self.db.execute(_INSERT_CALL, row)
        self.writes += 1

    def delete_session(self, session_id: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM calls WHERE session = ?", (session_id,))
            self.db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- reads (the CLI, retention) -----------------------------------------------------------

    def session_user(self, session_id: str) -> str | None:
        row = self.db.execute("SELECT user FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    def sessions(self, filters: Filters = Filters(), visible: Visible | None = None,  # noqa: B008 - frozen
                 limit: int | None = None) -> list[SessionRow]:
        """Sessions matching `filters` (and, given `visible`, only those it allows), last active first."""
        where, args = [], []
        if visible is not None and not visible.everything:
            rules = sorted(visible.rules)
            seen = ["s.user = ?"] if visible.user else []
            if rules:
                seen.append(f"(s.kind = 'grant' AND s.rule IN ({', '.join('?' * len(rules))}))")
            if not seen:
                return []
            where.append("(" + " OR ".join(seen) + ")")
            args += ([visible.user] if visible.user else []) + rules
        if filters.user:
            where.append("(s.user = ? OR s.user LIKE ? ESCAPE '\\')")
            args += [filters.user, _like_prefix(filters.user) + "@%"]
        if filters.grant:
            where.append("s.grant_id = ?")
            args.append(filters.grant)
        for column, value in (("cluster", filters.cluster), ("namespace", filters.namespace), ("decision", filters.decision)):
            if value:
                where.append(f"EXISTS (SELECT 1 FROM calls x WHERE x.session = s.id AND x.{column} = ?)")
                args.append(value)
        query = _SESSIONS
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " GROUP BY s.id"
        having = []
        if filters.since is not None:
            having.append("coalesce(max(c.time), s.created) >= ?")
            args.append(filters.since)
        if filters.until is not None:
            having.append("coalesce(min(c.time), s.created) <= ?")
            args.append(filters.until)
        if having:
            query += " HAVING " + " AND ".join(having)
        query += " ORDER BY coalesce(max(c.time), s.created) DESC, s.id"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        return [SessionRow(*row) for row in self.db.execute(query, args)]

    def session(self, session_id: str) -> SessionRow | None:
        row = self.db.execute(_SESSIONS + " WHERE s.id = ? GROUP BY s.id", (session_id,)).fetchone()
        return SessionRow(*row) if row else None

    def calls(self, session_id: str, limit: int = -1, offset: int = 0) -> list[dict]:
        """A session's calls in order (`limit` -1: all of them from `offset`)."""
        cursor = self.db.execute(f"SELECT {', '.join(CALL_COLUMNS)} FROM calls WHERE session = ? ORDER BY time, id "
                                 "LIMIT ? OFFSET ?", (session_id, limit, offset))
        return [dict(zip(CALL_COLUMNS, row)) for row in cursor]

    def casts(self, session_id: str) -> list[str]:
        """The exec/attach recordings (file names) the session's calls name, in order."""
        cursor = self.db.execute("SELECT cast_file FROM calls WHERE session = ? AND cast_file != '' ORDER BY time, id",
                                 (session_id,))
        return [row[0] for row in cursor]

    def session_ids(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT id FROM sessions")}


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
