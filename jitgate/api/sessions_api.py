"""The access API's sessions routes: recorded sessions listed, shown and exported, by policy.

`SessionViews` answers `GET /jitgate/v1/sessions...` for `AccessAPI` (which routes, authenticates
and parses the call): the list (filters as `jitgate sessions` has them), one session's timeline,
and its recordings as they are stored (masked, without credentials): the HAR, the mitmproxy flow
file, the asciicast of one exec or attach. It reads the recordings folder the gateway writes
(`index.db` through a connection of its own, the session folders' files), never writes anything.

Who sees what is `jitgate.policy.sessions.SessionsPolicy.visible_as`: the session's owner, the
reviewers of the access rule of its grant, the policy's auditors. A session anyone else asks for
is answered exactly like one that does not exist, and never appears in their lists. A session is
named only by an id the index knows (`SESSION_ID`); files are only those the index names for it,
under the session's own folder, so no id or exec id reaches another path.

Plain Python (no mitmproxy); it runs on a worker thread (reads may wait on the gateway's writes).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jitgate.access.errors import NotFound
from jitgate.access.rules import AccessRule
from jitgate.api.access_api import ApiCall, Download, Refused, _bad
from jitgate.policy.sessions import SessionsPolicy
from jitgate.recording import har
from jitgate.recording.flowfile import complete_length
from jitgate.recording.index import Filters, Index, SessionRow, Visible
from jitgate.recording.recorder import FLOWS, HAR, INDEX
from jitgate.recording.sessions import SESSION_ID, parse_when
from jitgate.timefmt import rfc3339

logger = logging.getLogger("jitgate.api.sessions")

DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
DEFAULT_CALLS = 1000
MAX_CALLS = 10000
MAX_DOWNLOAD = 128 * 1024 * 1024  # a recording read whole into the gateway's memory to be served
DECISIONS = ("allow", "deny", "none")
_NUMBER = re.compile(r"[0-9]{1,10}")
_CAST = re.compile(r"exec-([0-9a-f][0-9a-f-]{0,63})\.cast")
_EXEC_ID = re.compile(r"[0-9a-f][0-9a-f-]{0,63}")

LIST_QUERY = frozenset({"user", "cluster", "namespace", "grant", "decision", "since", "until", "limit"})
SHOW_QUERY = frozenset({"limit", "offset"})


class SessionViews:
    def __init__(
        self,
        root: Path,
        rules_provider: Callable[[], Sequence[AccessRule]],
        policy_provider: Callable[[], SessionsPolicy],
        mask_text: Callable[[str], str] = lambda text: text,
    ) -> None:
        self.root = root
        self.rules_provider = rules_provider
        self.policy_provider = policy_provider
        self.mask_text = mask_text  # free text of the index (denial reasons, paths) through the detectors
        self._index: Index | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None

    # -- reading the index -------------------------------------------------------------------------

    def _read(self, fn):
        """`fn(index)` under the lock; an index that cannot be read fails closed (503)."""
        with self._lock:
            try:
                if self._index is None:
                    if not (self.root / INDEX).is_file():
                        return fn(None)
                    self._index = Index(self.root / INDEX)
                return fn(self._index)
            except sqlite3.Error as e:
                logger.error("access API: the recordings index %s cannot be read: %s", self.root / INDEX, e)
                if self._index is not None:
                    self._index.close()
                    self._index = None
                raise Refused(503, "the recordings index cannot be read now, so no session is shown (fail closed); "
                                   "the gateway log has the details") from e

    def _visible(self, call: ApiCall, row: SessionRow | None) -> str | None:
        if row is None:
            return None
        return self.policy_provider().visible_as(call.who, row.user, row.rule if row.grant else "", self.rules_provider())

    def _session(self, call: ApiCall) -> tuple[SessionRow, str]:
        """The session `call.ident` names and why the caller sees it; else 404, whatever the reason."""
        missing = NotFound(f"there is no session {call.ident!r} that you can see (you see your own sessions, "
                           "those of grants under access rules you review, and every session if the policy names you an auditor)")
        if not SESSION_ID.fullmatch(call.ident or ""):
            raise missing
        row = self._read(lambda index: index.session(call.ident) if index is not None else None)
        why = self._visible(call, row)
        if why is None:
            raise missing
        return row, why

    # -- routes ------------------------------------------------------------------------------------

    def list_sessions(self, call: ApiCall) -> tuple[int, dict]:
        q = call.query
        decision = q.get("decision", "")
        if decision and decision not in DECISIONS:
            _bad(f"query parameter 'decision' must be one of {', '.join(DECISIONS)}, not {decision!r}")
        filters = Filters(user=q.get("user", ""), cluster=q.get("cluster", ""), namespace=q.get("namespace", ""),
                          grant=q.get("grant", ""), decision=decision, since=_moment(q, "since", call.now),
                          until=_moment(q, "until", call.now))
        limit = _number(q, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        policy, rules = self.policy_provider(), self.rules_provider()
        visible = Visible(everything=True) if policy.is_auditor(call.who) else \
            Visible(user=call.who.username, rules=policy.reviewed_rules(call.who, rules))
        rows = self._read(lambda index: index.sessions(filters, visible, limit) if index is not None else [])
        items = []
        for row in rows:  # checked again, row by row: the index query narrows, this decides
            why = self._visible(call, row)
            if why is not None:
                items.append(session_view(row, why))
        return 200, {"items": items}

    def get_session(self, call: ApiCall) -> tuple[int, dict]:
        limit = _number(call.query, "limit", DEFAULT_CALLS, 1, MAX_CALLS)
        offset = _number(call.query, "offset", 0, 0, 2**31)
        row, why = self._session(call)
        calls = self._read(lambda index: index.calls(row.id, limit, offset))
        view = session_view(row, why)
        view["offset"] = offset
        view["timeline"] = [self.call_view(c) for c in calls]
        view["casts"] = [{"exec": _CAST.fullmatch(c["cast_file"]).group(1), "time": rfc3339(c["time"], milliseconds=True),
                          "audit_id": c["audit_id"]}
                         for c in calls if _CAST.fullmatch(c["cast_file"] or "")]
        return 200, view

    def get_session_har(self, call: ApiCall) -> tuple[int, Download]:
        row, why = self._session(call)
        data = har.repaired(self._file(row, HAR, "HAR"))
        return 200, Download(data, "application/json", f"{row.id}.har", row.id, row.user, why, "har")

    def get_session_flows(self, call: ApiCall) -> tuple[int, Download]:
        row, why = self._session(call)
        data = self._file(row, FLOWS, "flow file")
        data = data[:complete_length(lambda n, offset: data[offset:offset + n], len(data))]  # a flow being written: left out
        return 200, Download(data, "application/octet-stream", f"{row.id}.mitm", row.id, row.user, why, "flows")

    def get_session_cast(self, call: ApiCall) -> tuple[int, Download]:
        row, why = self._session(call)
        exec_id = call.sub or ""
        missing = NotFound(f"session {row.id} has no exec or attach recording {exec_id!r}")
        if not _EXEC_ID.fullmatch(exec_id):
            raise missing
        name = f"exec-{exec_id}.cast"
        if name not in self._read(lambda index: index.casts(row.id)):  # only files the index names for this session
            raise missing
        return 200, Download(self._file(row, name, "exec recording"), "application/x-asciicast", name, row.id, row.user,
                             why, "cast")

    # -- files ---------------------------------------------------------------------------------------

    def _file(self, row: SessionRow, name: str, what: str) -> bytes:
        """A file of the session's folder, read whole; never a path outside it, never through a link."""
        folder = self.root / row.id
        path = folder / name
        try:
            if folder.resolve(strict=True).parent != self.root.resolve(strict=True):
                raise FileNotFoundError(name)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"session {row.id} has no {what} (recordings are deleted by retention, "
                           "and a session's HAR stops at its size limit)") from None
        except OSError as e:
            logger.error("access API: %s of session %s cannot be read: %s", name, row.id, e)
            raise Refused(503, f"the {what} of session {row.id} cannot be read now; the gateway log has the details") from e
        try:
            size = os.fstat(fd).st_size
            if size > MAX_DOWNLOAD:
                raise Refused(422, f"the {what} of session {row.id} is {size} bytes, more than the {MAX_DOWNLOAD // 2**20} MiB "
                                   "the access API serves; the gateway's operator can copy it with `jitgate sessions export --dir`")
            chunks, left = [], size
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    # -- views -----------------------------------------------------------------------------------------

    def call_view(self, c: dict) -> dict[str, Any]:
        cast = _CAST.fullmatch(c["cast_file"] or "")
        return {
            "time": rfc3339(c["time"], milliseconds=True), "audit_id": c["audit_id"], "user": c["user"], "cluster": c["cluster"],
            "verb": c["verb"], "api_group": c["api_group"], "resource": c["resource"], "subresource": c["subresource"],
            "namespace": c["namespace"], "name": c["name"], "path": self.mask_text(c["path"]), "code": c["code"],
            "decision": c["decision"], "reason": self.mask_text(c["reason"]), "rule": c["rule"], "grant": c["grant_id"],
            "duration_ms": c["duration_ms"], "exec": cast.group(1) if cast else None,
        }


def session_view(row: SessionRow, visible_as: str) -> dict[str, Any]:
    return {"id": row.id, "kind": row.kind, "user": row.user, "grant": row.grant, "rule": row.rule, "cluster": row.cluster,
            "created": rfc3339(row.created), "first": rfc3339(row.first), "last": rfc3339(row.last), "calls": row.calls,
            "denied": row.denied, "execs": row.execs, "visible_as": visible_as}


def _moment(query, key: str, now: float) -> float | None:
    text = query.get(key)
    if text is None:
        return None
    try:
        return parse_when(text, now)
    except ValueError as e:
        _bad(f"query parameter {key!r}: {e}")


def _number(query, key: str, default: int, low: int, high: int) -> int:
    text = query.get(key)
    if text is None:
        return default
    if not _NUMBER.fullmatch(text) or not low <= int(text) <= high:
        _bad(f"query parameter {key!r} must be a number from {low} to {high}")
    return int(text)
