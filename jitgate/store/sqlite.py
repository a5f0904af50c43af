"""Durable access requests, reviews, grants and their history.

`SQLiteStore` is what the gateway, the HTTP API and the CLI use: a file in the gateway's state
directory that several processes (the gateway, a CLI) use at once. Every state change is one
transaction that reads the current state, lets `jitgate.access` decide, and writes the outcome, so
two reviewers approving at the same moment in two processes produce exactly one grant.

A PostgreSQL backend (for several gateway replicas) implements the same public methods with the
same transactions (`SELECT ... FOR UPDATE` where SQLite takes its write lock up front);
tests/test_store.py is the contract it must pass. There is no abstract base class: with one
implementation it would only repeat these signatures.

The store fails closed: any database problem (locked for too long, corrupt, disk full, gone) is a
`StoreError`, never an empty answer that could read as "no grants" or "nothing changed".
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from jitgate.access.errors import AccessError, InvalidRequest, NotFound, StoreError
from jitgate.access.model import (
    AccessRequest,
    Decision,
    Event,
    EventKind,
    Grant,
    GrantState,
    Operation,
    Permit,
    Principal,
    RequestState,
    Review,
    Transition,
)
from jitgate.access.rules import AccessRule, rule_named
from jitgate.access.scope import Scope
from jitgate.access.workflow import (
    auto_approve,
    cancel_request,
    expire_grant,
    expire_request,
    open_operation_request,
    open_request,
    review_request,
    revoke_grant,
)
from jitgate.files import make_private_dirs

T = TypeVar("T")


@dataclass(frozen=True)
class SweepResult:
    expired_requests: tuple[AccessRequest, ...] = ()
    expired_grants: tuple[Grant, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.expired_requests or self.expired_grants)


# ---------------------------------------------------------------------------------------------
# SQLite

SCHEMA_VERSION = 2

# Version 2: operation-bound requests (a guardrail's require-approval) and their one-use permits.
_OPERATIONS = """
ALTER TABLE requests ADD COLUMN operation TEXT;              -- JSON, Operation.to_dict(); NULL: a grant request
ALTER TABLE requests ADD COLUMN operation_digest TEXT;
CREATE INDEX requests_by_operation ON requests (requester, operation_digest) WHERE operation_digest IS NOT NULL;

CREATE TABLE permits (
    request_id TEXT PRIMARY KEY REFERENCES requests (id),   -- one permit per approved request
    username TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL                                             -- set once, in the transaction that lets the call through
);
CREATE INDEX permits_unused ON permits (username, digest) WHERE used_at IS NULL;
"""

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);

CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    requester TEXT NOT NULL,
    requester_groups TEXT NOT NULL,          -- JSON list, as they were at request time
    rule TEXT NOT NULL,
    cluster TEXT NOT NULL,
    scope TEXT NOT NULL,                     -- JSON, Scope.to_dict()
    duration INTEGER NOT NULL,               -- seconds
    reason TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    auto_approve_at REAL,
    decided_at REAL,
    decided_by TEXT,
    decision_reason TEXT
);
CREATE INDEX requests_by_requester ON requests (requester, created_at);
CREATE INDEX requests_by_state ON requests (state, expires_at);
CREATE INDEX requests_auto_due ON requests (auto_approve_at) WHERE state = 'pending' AND auto_approve_at IS NOT NULL;

CREATE TABLE reviews (
    request_id TEXT NOT NULL REFERENCES requests (id),
    reviewer TEXT NOT NULL,
    reviewer_groups TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (request_id, reviewer)       -- one review per person: never a double count
);

CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE REFERENCES requests (id),   -- one grant per request
    username TEXT NOT NULL,
    cluster TEXT NOT NULL,
    rule TEXT NOT NULL,
    scope TEXT NOT NULL,
    upstream_role TEXT,
    starts_at REAL NOT NULL,
    ends_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'expired', 'revoked')),
    revoked_by TEXT,
    revoked_at REAL,
    revoke_reason TEXT
);
CREATE INDEX grants_lookup ON grants (username, cluster, state, ends_at);
CREATE INDEX grants_by_state ON grants (state, ends_at);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    request_id TEXT,
    grant_id TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL                     -- JSON object
);
CREATE INDEX events_by_request ON events (request_id, id);
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
"""

# The hot-path query; `grants_lookup` answers it without a scan (tests check the plan).
ACTIVE_GRANTS_SQL = "SELECT * FROM grants WHERE username = ? AND cluster = ? AND state = 'active' AND ends_at > ? AND starts_at <= ?"

_REQUEST_COLUMNS = (
    "id, requester, requester_groups, rule, cluster, scope, duration, reason, state, created_at, expires_at, "
    "auto_approve_at, decided_at, decided_by, decision_reason, operation, operation_digest"
)
_GRANT_COLUMNS = (
    "id, request_id, username, cluster, rule, scope, upstream_role, starts_at, ends_at, state, revoked_by, revoked_at, revoke_reason"
)


class SQLiteStore:
    """Requests, reviews, grants and events in one SQLite file (WAL), shared safely by threads
    and processes.

    Every public method is atomic; times are injected (`now`, seconds since the epoch);
    policy-dependent operations take the current `rules`, because the policy may have changed
    since a request was made. Errors are `AccessError`s: the workflow's own (400/403/404/409) or
    `StoreError` (503).

    Each thread gets its own connection; every change runs in `BEGIN IMMEDIATE`, which takes
    the database's write lock before reading, so decisions are made on the latest state.
    A writer waits up to `busy_timeout` seconds for another, then fails with `StoreError`.
    Directories it creates are 0700 and a file it creates is 0600.
    """

    def __init__(self, path: str | Path, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._own_writes = 0  # commits through this object; data_version only counts others'
        self._closed = False
        with _errors(self.path):
            _create_private_file(self.path)
        self._migrate()

    # -- connections and transactions

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is not None:
            return db
        if self._closed:
            raise StoreError(f"{self.path} is closed")
        with _errors(self.path):
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            try:
                db.row_factory = sqlite3.Row
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot use write-ahead logging (journal mode {mode})")
                # FULL: a committed grant, approval or revocation survives a power cut too.
                db.execute("PRAGMA synchronous = FULL")
                db.execute("PRAGMA foreign_keys = ON")
            except BaseException:
                db.close()
                raise
        with self._lock:
            self._connections.append(db)
        self._local.db = db
        return db

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A transaction that commits when the block ends and rolls back on any exception;
        workflow refusals (`AccessError`) pass through unchanged, database errors become
        `StoreError`."""
        db = self._connection()
        with _errors(self.path):
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            before = db.total_changes
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            if db.total_changes != before:
                with self._lock:
                    self._own_writes += 1

    def _migrate(self) -> None:
        with self._transaction(write=True) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                for statement in _statements(_SCHEMA + _OPERATIONS):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return
            if "schema_version" not in tables:
                raise StoreError(f"{self.path} is an SQLite database but not a jitgate store")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else None
            if version == 1:  # a store from before operation-bound requests: add them in place
                for statement in _statements(_OPERATIONS):
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has store schema version {version}; this jitgate supports version {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close every thread's connection; later calls raise `StoreError`."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for db in connections:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # -- reading rows

    def _load_requests(self, db: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[AccessRequest]:
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        reviews: dict[str, list[Review]] = {i: [] for i in ids}
        grants: dict[str, Grant] = {}
        permits: dict[str, Permit] = {}
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            for r in db.execute(f"SELECT * FROM reviews WHERE request_id IN ({marks}) ORDER BY at, rowid", chunk):
                reviews[r["request_id"]].append(_review(r))
            for g in db.execute(f"SELECT {_GRANT_COLUMNS} FROM grants WHERE request_id IN ({marks})", chunk):
                grants[g["request_id"]] = _grant(g)
            if any(r["operation"] for r in rows):
                for p in db.execute(f"SELECT * FROM permits WHERE request_id IN ({marks})", chunk):
                    permits[p["request_id"]] = _permit(p)
        return [_request(r, tuple(reviews[r["id"]]), grants.get(r["id"]), permits.get(r["id"])) for r in rows]

    def _request_in(self, db: sqlite3.Connection, request_id: str) -> AccessRequest:
        row = db.execute(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            raise NotFound(f"there is no access request {request_id!r}")
        return self._load_requests(db, [row])[0]

    def _grant_in(self, db: sqlite3.Connection, grant_id: str) -> Grant:
        row = db.execute(f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id = ?", (grant_id,)).fetchone()
        if row is None:
            raise NotFound(f"there is no grant {grant_id!r}")
        return _grant(row)

    # -- writing a transition

    def _apply(self, db: sqlite3.Connection, t: Transition, new_request: bool = False) -> None:
        r = t.request
        if r is not None and new_request:
            db.execute(
                f"INSERT INTO requests ({_REQUEST_COLUMNS}) VALUES ({','.join('?' * 17)})",
                (
                    r.id, r.requester, json.dumps(list(r.requester_groups)), r.rule, r.cluster, _scope_json(r.scope), r.duration,
                    r.reason, str(r.state), r.created_at, r.expires_at, r.auto_approve_at, r.decided_at, r.decided_by, r.decision_reason,
                    json.dumps(r.operation.to_dict(), sort_keys=True) if r.operation else None,
                    r.operation.digest if r.operation else None,
                ),
            )  # fmt: skip
        elif r is not None:
            # Only a pending request changes; the state guard is a second line behind the lock.
            cur = db.execute(
                "UPDATE requests SET state = ?, auto_approve_at = ?, decided_at = ?, decided_by = ?, decision_reason = ? "
                "WHERE id = ? AND state = 'pending'",
                (str(r.state), r.auto_approve_at, r.decided_at, r.decided_by, r.decision_reason, r.id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"request {r.id} changed underneath a transaction")
        if t.new_review is not None:
            v = t.new_review
            db.execute(
                "INSERT INTO reviews (request_id, reviewer, reviewer_groups, decision, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
                (r.id, v.reviewer, json.dumps(list(v.groups)), str(v.decision), v.reason, v.at),
            )
        if t.new_grant is not None:
            g = t.new_grant
            db.execute(
                f"INSERT INTO grants ({_GRANT_COLUMNS}) VALUES ({','.join('?' * 13)})",
                (
                    g.id, g.request_id, g.username, g.cluster, g.rule, _scope_json(g.scope), g.upstream_role, g.starts_at, g.ends_at,
                    str(g.state), g.revoked_by, g.revoked_at, g.revoke_reason,
                ),
            )  # fmt: skip
        if t.new_permit is not None:
            p = t.new_permit
            db.execute("INSERT INTO permits (request_id, username, digest, created_at, expires_at, used_at) VALUES (?, ?, ?, ?, ?, NULL)",
                       (p.request_id, p.username, p.digest, p.created_at, p.expires_at))
        if t.grant is not None:
            g = t.grant
            cur = db.execute(
                "UPDATE grants SET state = ?, revoked_by = ?, revoked_at = ?, revoke_reason = ? WHERE id = ? AND state = 'active'",
                (str(g.state), g.revoked_by, g.revoked_at, g.revoke_reason, g.id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"grant {g.id} changed underneath a transaction")
        for e in t.events:
            db.execute(
                "INSERT INTO events (at, kind, actor, request_id, grant_id, reason, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.at, str(e.kind), e.actor, e.request_id, e.grant_id, e.reason, json.dumps(dict(e.detail), sort_keys=True)),
            )

    # -- the workflow

    def create_request(
        self,
        rules: Sequence[AccessRule],
        requester: Principal,
        scope: Scope,
        *,
        now: float,
        duration: int | None = None,
        reason: str | None = None,
        rule_name: str | None = None,
    ) -> AccessRequest:
        """File a request under the first rule that lets the requester ask for `scope` (or
        `rule_name`). Mode immediate returns it approved, with its grant."""
        t = open_request(rules, requester, scope, now=now, duration=duration, reason=reason, rule_name=rule_name)
        with self._transaction(write=True) as db:
            for _ in range(3):
                if db.execute("SELECT 1 FROM requests WHERE id = ?", (t.request.id,)).fetchone() is None:
                    break
                t = open_request(rules, requester, scope, now=now, duration=duration, reason=reason, rule_name=rule_name)  # id clash
            self._apply(db, t, new_request=True)
        return t.request

    def operation_request(
        self, rules: Sequence[AccessRule], requester: Principal, scope: Scope, operation: Operation, *, now: float,
        rule_name: str | None = None,
    ) -> tuple[str, AccessRequest]:
        """For one call a guardrail holds back, in one transaction: ("allowed", request) when an
        approved, unused permit of this caller for this digest existed (it is used up now: two
        identical concurrent calls cannot both pass), else ("pending", request) when the same call
        already waits for review (a retry joins it), else ("filed", the new request)."""
        with self._transaction(write=True) as db:
            permit = db.execute(
                "SELECT request_id FROM permits WHERE username = ? AND digest = ? AND used_at IS NULL AND expires_at > ? "
                "ORDER BY created_at LIMIT 1", (requester.username, operation.digest, now)).fetchone()
            if permit is not None:
                cur = db.execute("UPDATE permits SET used_at = ? WHERE request_id = ? AND used_at IS NULL",
                                 (now, permit["request_id"]))
                if cur.rowcount != 1:
                    raise StoreError(f"permit of request {permit['request_id']} changed underneath a transaction")
                db.execute(
                    "INSERT INTO events (at, kind, actor, request_id, grant_id, reason, detail) VALUES (?, ?, ?, ?, NULL, ?, ?)",
                    (now, str(EventKind.PERMIT_USED), requester.username, permit["request_id"],
                     "the approved operation was let through once", json.dumps({"digest": operation.digest})))
                return "allowed", self._request_in(db, permit["request_id"])
            row = db.execute(
                f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE requester = ? AND operation_digest = ? AND state = 'pending' "
                "AND expires_at > ? ORDER BY created_at DESC LIMIT 1", (requester.username, operation.digest, now)).fetchone()
            if row is not None:
                return "pending", self._load_requests(db, [row])[0]
            t = open_operation_request(rules, requester, scope, operation, now=now, rule_name=rule_name)
            self._apply(db, t, new_request=True)
        return "filed", t.request

    def get_request(self, request_id: str) -> AccessRequest:
        """The request with its reviews and grant; `NotFound` if there is none."""
        with self._transaction(write=False) as db:
            return self._request_in(db, request_id)

    def list_requests(
        self,
        *,
        requester: str | None = None,
        states: Iterable[RequestState | str] | None = None,
        cluster: str | None = None,
        limit: int = 200,
    ) -> list[AccessRequest]:
        """Newest first."""
        where: list[str] = []
        args: list[Any] = []
        if requester is not None:
            where.append("requester = ?")
            args.append(requester)
        if states is not None:
            try:
                states = [str(RequestState(s)) for s in states]
            except ValueError:
                raise InvalidRequest(f"unknown request state; known: {', '.join(RequestState)}") from None
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if cluster is not None:
            where.append("cluster = ?")
            args.append(cluster)
        sql = f"SELECT {_REQUEST_COLUMNS} FROM requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        with self._transaction(write=False) as db:
            return self._load_requests(db, db.execute(sql, (*args, int(limit))).fetchall())

    def reviewable_requests(self, rules: Sequence[AccessRule], reviewer: Principal, *, now: float, limit: int = 200) -> list[AccessRequest]:
        """Pending, unexpired requests `reviewer` may review and has not reviewed yet."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE state = 'pending' AND expires_at > ? ORDER BY created_at DESC, rowid DESC",
                (now,),
            ).fetchall()
            candidates = []
            for row in rows:
                rule = rule_named(rules, row["rule"])
                if rule is not None and rule.is_reviewer(reviewer.groups) and row["requester"] != reviewer.username:
                    candidates.append(row)
            requests = self._load_requests(db, candidates)
        return [r for r in requests if r.review_by(reviewer.username) is None][:limit]

    def review(
        self, rules: Sequence[AccessRule], request_id: str, reviewer: Principal, decision: Decision | str, reason: str | None, *, now: float
    ) -> AccessRequest:
        """Record an approval or a denial; returns the request after it (approved: with grant)."""
        with self._transaction(write=True) as db:
            t = review_request(rules, self._request_in(db, request_id), reviewer, decision, reason, now=now)
            self._apply(db, t)
        return t.request

    def cancel(self, request_id: str, actor: Principal, reason: str | None = None, *, now: float) -> AccessRequest:
        """The requester withdraws a pending request."""
        with self._transaction(write=True) as db:
            t = cancel_request(self._request_in(db, request_id), actor, reason, now=now)
            self._apply(db, t)
        return t.request

    def revoke_grant(self, rules: Sequence[AccessRule], grant_id: str, actor: Principal, reason: str | None, *, now: float) -> Grant:
        """End an active grant now (its holder, or a reviewer of its rule)."""
        with self._transaction(write=True) as db:
            t = revoke_grant(rules, self._grant_in(db, grant_id), actor, reason, now=now)
            self._apply(db, t)
        return t.grant

    def get_grant(self, grant_id: str) -> Grant:
        """`NotFound` if there is none."""
        with self._transaction(write=False) as db:
            return self._grant_in(db, grant_id)

    def list_grants(
        self, *, username: str | None = None, cluster: str | None = None, active_at: float | None = None, limit: int = 200
    ) -> list[Grant]:
        """Newest first; `active_at` keeps those active at that time."""
        where: list[str] = []
        args: list[Any] = []
        if username is not None:
            where.append("username = ?")
            args.append(username)
        if cluster is not None:
            where.append("cluster = ?")
            args.append(cluster)
        if active_at is not None:
            where.append("state = 'active' AND ends_at > ? AND starts_at <= ?")
            args += [active_at, active_at]
        sql = f"SELECT {_GRANT_COLUMNS} FROM grants"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY starts_at DESC, rowid DESC LIMIT ?"
        with self._transaction(write=False) as db:
            return [_grant(r) for r in db.execute(sql, (*args, int(limit)))]

    def active_grants_for(self, username: str, cluster: str, now: float) -> tuple[Grant, ...]:
        """The grants that may allow this person's calls on this cluster now: an index lookup."""
        db = self._connection()
        with _errors(self.path):
            return tuple(_grant(r) for r in db.execute(ACTIVE_GRANTS_SQL, (username, cluster, now, now)))

    def sweep(self, *, now: float) -> SweepResult:
        """Expire pending requests past their TTL and active grants past their end."""
        due_requests = "FROM requests WHERE state = 'pending' AND expires_at <= ?"
        due_grants = "FROM grants WHERE state = 'active' AND ends_at <= ?"
        # Look before taking the write lock: most sweeps find nothing.
        with self._transaction(write=False) as db:
            if not db.execute(f"SELECT EXISTS (SELECT 1 {due_requests}) OR EXISTS (SELECT 1 {due_grants})", (now, now)).fetchone()[0]:
                return SweepResult()
        with self._transaction(write=True) as db:
            requests = self._load_requests(db, db.execute(f"SELECT {_REQUEST_COLUMNS} {due_requests}", (now,)).fetchall())
            grants = [_grant(r) for r in db.execute(f"SELECT {_GRANT_COLUMNS} {due_grants}", (now,))]
            expired_requests = []
            for request in requests:
                t = expire_request(request, now=now)
                self._apply(db, t)
                expired_requests.append(t.request)
            expired_grants = []
            for grant in grants:
                t = expire_grant(grant, now=now)
                self._apply(db, t)
                expired_grants.append(t.grant)
        return SweepResult(tuple(expired_requests), tuple(expired_grants))

    def approve_due_auto(self, rules: Sequence[AccessRule], *, now: float) -> list[AccessRequest]:
        """Approve the mode-auto requests whose delay has passed; returns the ones changed."""
        due = "FROM requests WHERE state = 'pending' AND auto_approve_at IS NOT NULL AND auto_approve_at <= ? AND expires_at > ?"
        with self._transaction(write=False) as db:
            if db.execute(f"SELECT 1 {due} LIMIT 1", (now, now)).fetchone() is None:
                return []
        changed = []
        with self._transaction(write=True) as db:
            for request in self._load_requests(db, db.execute(f"SELECT {_REQUEST_COLUMNS} {due}", (now, now)).fetchall()):
                t = auto_approve(rules, request, now=now)
                self._apply(db, t)
                changed.append(t.request)
        return changed

    def events_for(self, request_id: str) -> list[Event]:
        """The history of one request (and its grant), oldest first."""
        with self._transaction(write=False) as db:
            return [_event(r) for r in db.execute("SELECT * FROM events WHERE request_id = ? ORDER BY id", (request_id,))]

    def events_since(self, after_id: int = 0, limit: int = 1000) -> list[Event]:
        """Events with an id above `after_id`, oldest first: a cursor for notifiers and for
        ending sessions of grants revoked by another process."""
        with self._transaction(write=False) as db:
            return [_event(r) for r in db.execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (int(after_id), int(limit)))]

    def last_event_id(self) -> int:
        """The id of the newest event (0 for none): where a new reader's cursor starts."""
        with self._transaction(write=False) as db:
            return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

    def change_counter(self) -> Hashable:
        """A cheap value that differs after any committed change, by this process or another:
        re-read cached grants when it changed."""
        db = self._connection()
        with _errors(self.path):
            version = db.execute("PRAGMA data_version").fetchone()[0]
        return (version, self._own_writes)

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def _errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(f"{path}: {_describe(e)}") from e
    except OSError as e:
        raise StoreError(f"{path}: {e.strerror or e}") from e


def _describe(e: sqlite3.Error) -> str:
    text = str(e)
    if isinstance(e, sqlite3.OperationalError) and "locked" in text:
        return f"{text} (another process held it past the busy timeout)"
    return text


def _create_private_file(path: Path) -> None:
    """Create the database file 0600 (and missing folders 0700) before SQLite opens it; SQLite
    gives its -wal and -shm files the database file's mode."""
    make_private_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


def _statements(script: str) -> Iterator[str]:
    """The schema's statements one by one (`executescript` would commit our transaction);
    a trigger body's `;` stays inside its statement."""
    buffer = ""
    for line in script.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line:
            continue
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        raise ValueError("incomplete statement in the schema")


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _decoder(fn: Callable[..., T]) -> Callable[..., T]:
    """A row that does not decode (hand-edited or damaged file) is an error: never guess what
    it meant, a guess could be a wider grant."""

    @functools.wraps(fn)
    def decode(row: sqlite3.Row, *args: Any) -> T:
        try:
            return fn(row, *args)
        except (ValueError, KeyError, TypeError, IndexError, AccessError) as e:
            detail = e.message if isinstance(e, AccessError) else str(e)
            raise StoreError(f"unreadable record in the store: {detail}") from e

    return decode


def _scope_json(scope: Scope) -> str:
    return json.dumps(scope.to_dict(), sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def _scope(text: str) -> Scope:
    # Scopes are immutable, and a gateway re-reads the same grants often: parse each text once.
    return Scope.from_dict(json.loads(text))


@_decoder
def _request(row: sqlite3.Row, reviews: tuple[Review, ...], grant: Grant | None, permit: Permit | None = None) -> AccessRequest:
    return AccessRequest(
        id=row["id"],
        requester=row["requester"],
        requester_groups=tuple(json.loads(row["requester_groups"])),
        rule=row["rule"],
        scope=_scope(row["scope"]),
        duration=row["duration"],
        reason=row["reason"],
        state=RequestState(row["state"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        auto_approve_at=row["auto_approve_at"],
        decided_at=row["decided_at"],
        decided_by=row["decided_by"],
        decision_reason=row["decision_reason"],
        reviews=reviews,
        grant=grant,
        operation=Operation.from_dict(json.loads(row["operation"])) if row["operation"] else None,
        permit=permit,
    )


@_decoder
def _permit(row: sqlite3.Row) -> Permit:
    return Permit(row["request_id"], row["username"], row["digest"], row["created_at"], row["expires_at"], row["used_at"])


@_decoder
def _review(row: sqlite3.Row) -> Review:
    return Review(row["reviewer"], tuple(json.loads(row["reviewer_groups"])), Decision(row["decision"]), row["reason"], row["at"])


@_decoder
def _grant(row: sqlite3.Row) -> Grant:
    return Grant(
        id=row["id"],
        request_id=row["request_id"],
        username=row["username"],
        rule=row["rule"],
        scope=_scope(row["scope"]),
        upstream_role=row["upstream_role"],
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
        state=GrantState(row["state"]),
        revoked_by=row["revoked_by"],
        revoked_at=row["revoked_at"],
        revoke_reason=row["revoke_reason"],
    )


@_decoder
def _event(row: sqlite3.Row) -> Event:
    return Event(
        at=row["at"],
        kind=EventKind(row["kind"]),
        actor=row["actor"],
        request_id=row["request_id"],
        grant_id=row["grant_id"],
        reason=row["reason"],
        detail=json.loads(row["detail"]),
        id=row["id"],
    )
