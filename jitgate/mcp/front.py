"""One MCP front: every decision the addon needs, on plain values (no mitmproxy).

Per HTTP exchange (`Exchange`) the addon asks, in order:

1. `route` (requestheaders): the resource metadata is answered here; other paths than the server's
   MCP endpoint are 404; methods other than POST, GET, DELETE are 405;
2. `check_origin`: a present, unlisted `Origin` is 403;
3. `authenticate`: the bearer token, verified and bound to the server's resource, else 401;
4. `admit` (request, with the body): rate limit (429), the message read strictly, the protocol
   generation's header rules (400/-32020), the rules on `tools/call`, `resources/read` and
   `prompts/get` (JSON-RPC error; or `ex.held` set: the addon sends the call to the hold server,
   jitgate.mcp.hold, to wait for a human), then the audit line (503 when it cannot be written, so
   nothing unrecorded reaches the server);
5. `server_message` for each message the server sends (a JSON body, or each SSE event): tools/list
   filtering, masking, the audit line (AuditLogError when it cannot be written: the addon withholds);
6. `finish` when the exchange ends: an audit line for what carried no JSON-RPC message (202, DELETE,
   errors), for refusals answered before the body, and for an exchange the session recordings could
   not keep (`recording: failed`; jitgate.mcp.recording).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jitgate.access.model import Person
from jitgate.audit.log import AuditLog, AuditLogError
from jitgate.identity.oidc import IssuerUnavailable, OIDCVerifier, TokenError
from jitgate.mcp import protocol
from jitgate.mcp.approval import HeldCall
from jitgate.mcp.audit import masked_arguments, message_event, new_audit_id
from jitgate.mcp.config import WELL_KNOWN, McpConfig, McpServer
from jitgate.mcp.messages import Inspected, ServerMessages, ToolCatalog, request_key
from jitgate.mcp.protocol import Message, ProtocolError, error_body
from jitgate.mcp.ratelimit import TokenBuckets
from jitgate.mcp.resource import (
    JSON_HEADERS,
    HttpAnswer,
    InsufficientScope,
    TokenChecker,
    bearer_token,
    forbidden_origin,
    insufficient_scope,
    metadata_answer,
    origin_problem,
    unauthorized,
)
from jitgate.mcp.rules import (
    DEFAULT_ANNOTATIONS,
    KIND_OF_METHOD,
    Action,
    Caller,
    Kind,
    ToolCall,
    decide,
)
from jitgate.mcp.sessions import SessionBindings

log = logging.getLogger("jitgate.mcp")

METHODS = ("POST", "GET", "DELETE")


@dataclass
class Exchange:
    """One HTTP request through the front and what was decided about it."""

    server: McpServer
    http_method: str
    path: str
    source_ip: str = ""
    session_id: str | None = None
    audit_id: str = field(default_factory=new_audit_id)
    started: float = field(default_factory=time.monotonic)
    caller: Caller | None = None
    message: Message | None = None
    protocol: str | None = None
    decision: str = ""
    rule: str | None = None
    reason: str = ""
    answered: bool = False  # the front answered itself; nothing was forwarded
    request_audited: bool = False
    server_messages: int = 0
    methods: dict[Any, str] = field(default_factory=dict)
    held: HeldCall | None = None  # a require-approval call to hold for a human (the hold server does)
    approval: dict[str, Any] | None = None  # the held call's access request: {request, state, approvers}
    recording: str = ""  # "failed": the exchange could not be written into the session recordings

    @property
    def tool(self) -> str | None:
        m = self.message
        return m.name if m is not None and m.method == "tools/call" and isinstance(m.name, str) else None

    def caller_record(self) -> dict[str, Any] | None:
        return None if self.caller is None else {"username": self.caller.username, "groups": list(self.caller.groups)}

    def record(self) -> dict[str, Any]:
        """Plain values for flow.metadata (mitmweb, `-w` files)."""
        m = self.message
        return {"auditID": self.audit_id, "server": self.server.name, "caller": self.caller_record(),
                "method": m.method if m else None, "tool": self.tool, "decision": self.decision,
                "rule": self.rule, "reason": self.reason, "approval": dict(self.approval) if self.approval else None}


class Front:
    def __init__(self, config: McpConfig, audit: AuditLog, rate: float = 0.0, burst: int = 20,
                 clock_skew: float = 60, max_body: int = 4 * 1024 * 1024, holds: bool = False) -> None:
        self.config = config
        self.audit = audit
        self.tokens = TokenChecker(OIDCVerifier(config.issuers, clock_skew=clock_skew))
        self.catalog = ToolCatalog()
        self.messages = ServerMessages(config.rules, self.catalog, config.detectors)
        self.buckets = TokenBuckets(rate, burst)
        self.sessions = SessionBindings()
        self.max_body = max_body
        self.holds = holds  # an approval store is configured: require-approval rules with `approval` hold calls

    # -- request head ----------------------------------------------------------------------

    def route(self, ex: Exchange) -> HttpAnswer | None:
        server, path = ex.server, ex.path.split("?", 1)[0]
        if path in (WELL_KNOWN, server.metadata_path):
            if ex.http_method not in ("GET", "HEAD"):
                ex.reason = "resource metadata: method not allowed"
                return _plain(405, "jitgate: the resource metadata is read with GET", (("Allow", "GET"),))
            ex.reason = "resource metadata"
            return metadata_answer(server, self.config.issuers)
        if path != server.path:
            ex.reason = "not the MCP endpoint"
            return _plain(404, f"jitgate: this gateway serves the MCP endpoint {server.path} only")
        if ex.http_method not in METHODS:
            ex.reason = "method not allowed"
            return _plain(405, "jitgate: the MCP endpoint takes POST, GET and DELETE", (("Allow", ", ".join(METHODS)),))
        return None

    def check_origin(self, ex: Exchange, origins: Sequence[str]) -> HttpAnswer | None:
        bad = origin_problem(self.config, origins)
        if bad is None:
            return None
        ex.reason = f"origin not allowed: {bad[:200]}"
        return forbidden_origin(bad)

    async def authenticate(self, ex: Exchange, authorization: Sequence[str]) -> HttpAnswer | None:
        try:
            token = bearer_token(authorization)
            if token is None:
                ex.reason = "no bearer token"
                return unauthorized(ex.server)
            identity = await self.tokens.check(token, ex.server)
        except IssuerUnavailable as e:
            log.warning("token issuer unavailable: %s", e.reason)
            ex.reason = "token issuer unavailable"
            return HttpAnswer(503, JSON_HEADERS, error_body(None, protocol.GATEWAY_UNAVAILABLE,
                              "jitgate: the token's issuer cannot be reached to check it; retry shortly"))
        except InsufficientScope as e:
            ex.reason = f"insufficient scope: {' '.join(e.missing)}"
            return insufficient_scope(ex.server, f"jitgate: {e.reason}")
        except TokenError as e:
            ex.reason = f"invalid token: {e.reason}"
            return unauthorized(ex.server, "invalid_token", f"jitgate: {e.reason}")
        ex.caller = Caller(identity.username, identity.groups)
        return None

    # -- request body ----------------------------------------------------------------------

    def admit(self, ex: Exchange, body: bytes, header_lines: Iterable[tuple[str, str]]) -> HttpAnswer | None:
        """The request's verdict; None: forward it. Its audit line is written here either way."""
        answer = self._judge(ex, body, header_lines)
        if answer is not None:
            ex.answered = True
        try:
            self._audit_request(ex, 200 if answer is None else answer.status)
        except AuditLogError as e:
            log.error("audit log write failed, refusing the call: %s", e)
            ex.answered, ex.decision, ex.reason = True, "deny", "audit log unavailable"
            return HttpAnswer(503, JSON_HEADERS, error_body(ex.message.id if ex.message else None,
                              protocol.GATEWAY_UNAVAILABLE, "jitgate: the audit log cannot be written, so the call "
                              f"is refused (audit ID {ex.audit_id})"))
        return answer

    def _judge(self, ex: Exchange, body: bytes, header_lines: Iterable[tuple[str, str]]) -> HttpAnswer | None:
        assert ex.caller is not None
        wait = self.buckets.take(ex.caller.username)
        if wait:
            ex.decision, ex.reason = "deny", "rate limited"
            return HttpAnswer(429, JSON_HEADERS + (("Retry-After", str(max(1, math.ceil(wait)))),),
                              error_body(_peek_id(body), protocol.RATE_LIMITED,
                                         f"jitgate: too many messages from {ex.caller.username}; retry in "
                                         f"{max(1, math.ceil(wait))} s"))
        if ex.session_id is not None and not self.sessions.allows(ex.session_id, ex.server.name, ex.caller.username):
            ex.decision, ex.reason = "deny", "session not opened by this caller"
            return _rpc_error(404, _peek_id(body), protocol.INVALID_REQUEST,
                              "jitgate: this session is unknown to the gateway (it was opened by someone else, or "
                              "before the gateway restarted); start a new session with initialize")
        if ex.http_method != "POST":
            ex.decision, ex.reason = "allow", f"{ex.http_method} of the MCP endpoint"
            return None
        if len(body) > self.max_body:
            ex.decision, ex.reason = "deny", "body too large"
            return _rpc_error(413, None, protocol.INVALID_REQUEST, "jitgate: the message is larger than the gateway accepts")
        try:
            ex.message = message = protocol.parse_client_message(body)
            ex.protocol = protocol.check_headers(message, header_lines)
        except ProtocolError as e:
            ex.decision, ex.reason = "deny", e.message
            return _rpc_error(e.status, e.request_id, e.code, e.message)
        if message.kind == "request":
            ex.methods[request_key(message.id)] = message.method or ""
        kind = KIND_OF_METHOD.get(message.method or "") if message.kind == "request" else None
        if kind is None:
            ex.decision = "allow"
            return None
        name = message.name
        arguments = message.arguments if kind is not Kind.RESOURCE else None
        if not isinstance(name, str) or not name or (arguments is not None and not isinstance(arguments, dict)):
            ex.decision, ex.reason = "deny", f"malformed {message.method}"
            what = "params.uri (a string)" if kind is Kind.RESOURCE else "params.name (a string) and params.arguments (an object)"
            return _rpc_error(400, message.id, protocol.INVALID_PARAMS, f"jitgate: {message.method} needs {what}")
        annotations = self.catalog.annotations(ex.server, name) if kind is Kind.TOOL else DEFAULT_ANNOTATIONS
        call = ToolCall(ex.caller, ex.server.name, name, arguments, annotations, kind)
        decision = decide(self.config.rules, call, ex.server.trusted)
        ex.decision, ex.rule, ex.reason = decision.action.value, decision.rule, decision.message
        if decision.allowed:
            return None
        if decision.approval is not None and self.holds:
            rule = next(r for r in self.config.rules if r.name == decision.rule)
            ex.held = HeldCall.of(Person(ex.caller.username, ex.caller.groups), ex.server.name, kind, name, arguments,
                                  rule, self.config.detectors)
            ex.reason = f"held for a human's approval under rule '{rule.name}'"
            return None
        code = protocol.APPROVAL_REQUIRED if decision.action is Action.REQUIRE_APPROVAL else protocol.POLICY_DENIED
        data = {"decision": decision.action.value, "rule": decision.rule, "server": ex.server.name,
                "auditID": ex.audit_id}
        data[{Kind.TOOL: "tool", Kind.RESOURCE: "resource", Kind.PROMPT: "prompt"}[kind]] = name
        return HttpAnswer(200, JSON_HEADERS, error_body(message.id, code, decision.message, data))

    def _audit_request(self, ex: Exchange, status: int) -> None:
        m = ex.message
        message: dict[str, Any] = {"direction": "client-to-server"}
        if m is not None:
            message.update(kind=m.kind, id=m.id, method=m.method)
        extra: dict[str, Any] = {}
        if ex.tool is not None:
            extra["tool"] = ex.tool
            extra["arguments"] = masked_arguments(m.arguments, self.config.detectors)
        elif m is not None and isinstance(m.name, str):
            extra["target"] = m.name
        self.audit.write(message_event(
            audit_id=ex.audit_id, stage="request", server=ex.server.name, caller=ex.caller_record(),
            http={"method": ex.http_method, "path": ex.path, "status": status, "sourceIP": ex.source_ip},
            message=message, decision=ex.decision, rule=ex.rule, reason=ex.reason,
            duration_ms=(time.monotonic() - ex.started) * 1000 if ex.answered else None,
            session_id=ex.session_id, protocol=ex.protocol, held=ex.held.operation.summary if ex.held else None,
            **extra))
        ex.request_audited = True

    # -- the server's messages -------------------------------------------------------------

    def server_headers(self, ex: Exchange, status: int, session_id: str | None) -> None:
        """The answer's head: an initialize answer's session is bound to its caller; a DELETE ends one."""
        if ex.caller is None or not 200 <= status < 300:
            return
        if session_id and ex.message is not None and ex.message.method == "initialize" and ex.session_id is None:
            self.sessions.bind(session_id, ex.server.name, ex.caller.username)
            ex.session_id = session_id
        elif ex.http_method == "DELETE" and ex.session_id:
            self.sessions.end(ex.session_id)

    def server_message(self, ex: Exchange, payload: bytes, status: int) -> bytes:
        """One server message as the client gets it. Raises Unreadable or AuditLogError: withhold it."""
        caller = ex.caller or Caller("")
        out: Inspected = self.messages.inspect(payload, ex.server, caller, ex.methods)
        message: dict[str, Any] = {"direction": "server-to-client", "kind": out.kind, "id": out.id, "method": out.method}
        tool = ex.tool if out.kind in ("response", "error") and out.method == "tools/call" else None
        self.audit.write(message_event(
            audit_id=ex.audit_id, stage="response" if out.kind in ("response", "error") else "server-message",
            server=ex.server.name, caller=ex.caller_record(),
            http={"method": ex.http_method, "path": ex.path, "status": status, "sourceIP": ex.source_ip},
            message=message, decision=ex.decision or "allow", rule=ex.rule,
            duration_ms=(time.monotonic() - ex.started) * 1000, session_id=ex.session_id, protocol=ex.protocol,
            tool=tool, isError=out.is_error or None, masked=out.masked, hiddenTools=out.hidden,
            approval=ex.approval if out.kind in ("response", "error") else None))
        ex.server_messages += 1
        return out.payload

    def finish(self, ex: Exchange, status: int | None, error: str = "") -> None:
        """The exchange ended: record what no message line recorded (never raises: nothing is left to refuse).

        A POST whose request and answer were recorded needs nothing more; a refusal before the body
        (route, Origin, token), a 202, a DELETE, a GET stream's end and any failure get an `end` line."""
        if not error and not ex.recording and ex.request_audited and (
                ex.answered or (ex.http_method == "POST" and ex.server_messages)):
            return
        try:
            self.audit.write(message_event(
                audit_id=ex.audit_id, stage="end", server=ex.server.name, caller=ex.caller_record(),
                http={"method": ex.http_method, "path": ex.path, "status": status, "sourceIP": ex.source_ip},
                message={"direction": "server-to-client"}, decision=ex.decision or ("deny" if ex.answered else "allow"),
                rule=ex.rule, reason=error or ex.reason, duration_ms=(time.monotonic() - ex.started) * 1000,
                session_id=ex.session_id, protocol=ex.protocol, messages=ex.server_messages, approval=ex.approval,
                recording=ex.recording or None))
        except AuditLogError as e:
            log.error("audit log write failed at the end of exchange %s: %s", ex.audit_id, e)


def _plain(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpAnswer:
    return HttpAnswer(status, JSON_HEADERS + headers, json.dumps({"error": text}).encode())


def _rpc_error(status: int, request_id: Any, code: int, message: str) -> HttpAnswer:
    return HttpAnswer(status, JSON_HEADERS, error_body(request_id, code, message))


def _peek_id(body: bytes) -> Any:
    try:
        value = json.loads(body).get("id") if body else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None
