"""Where held MCP calls wait: a loopback HTTP server inside the front's process.

mitmproxy can only send a response an addon makes in one piece, and a held call must stream while it
waits (MCP `notifications/progress` when the client sent a `progressToken`, SSE comments otherwise, so
clients do not time out). So the front forwards a held call here instead of to its MCP server:
the flow's target becomes this server, with a one-use ticket (`X-Jitgate-Hold`, 256 random bits)
that names the call the front judged. Here it waits for the decision (jitgate.mcp.approval) and,
once approved and its permit used, makes the call to the real server (the policy's upstream, never
one the request names) and relays the answer. The answer goes back through mitmproxy, so the front
inspects, masks and audits it as any other (its SSE events one by one).

    client accepts text/event-stream -> 200 SSE at once: keep-alives, then the server's answer
                                        (SSE relayed; a JSON answer sent as one event), or the refusal
    JSON only                         -> silence while held, then the server's answer as it came

Anything without a live ticket is 404, a body other than the judged one is 400, and a caller that
goes away while held is never answered by a call made later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from jitgate.access.errors import StoreError
from jitgate.access.model import AccessRequest
from jitgate.mcp import protocol
from jitgate.mcp.approval import Approvals, HeldCall, Outcome
from jitgate.mcp.front import Exchange

log = logging.getLogger("jitgate.mcp.hold")

HOLD_HEADER = "X-Jitgate-Hold"
TICKET_TTL = 30.0  # seconds between the front's judgement and the hold server seeing the request
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "host", "content-length", HOLD_HEADER.lower(), "authorization"})
RELAYED_HEADERS = ("content-type", "mcp-session-id", "cache-control")


@dataclass
class Ticket:
    ex: Exchange
    held: HeldCall
    upstream: str  # scheme://host:port of the server, from the policy
    body_sha256: bytes
    request_id: Any
    progress_token: Any
    sse: bool
    credential: Callable[[], str | None]
    created: float = field(default_factory=time.monotonic)


def progress_event(token: Any, progress: int, request: AccessRequest, waited: float, max_wait: int) -> bytes:
    message = {"jsonrpc": "2.0", "method": "notifications/progress",
               "params": {"progressToken": token, "progress": progress, "total": max_wait,
                          "message": f"jitgate: waiting {waited:.0f}s of {max_wait}s for a reviewer to decide "
                                     f"access request {request.id} (`jitgate approve {request.id}`)"}}
    return b"data: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


def error_event(request_id: Any, code: int, message: str, data: dict) -> bytes:
    return b"data: " + protocol.error_body(request_id, code, message, data) + b"\n\n"


def sse_of_json(body: bytes) -> bytes:
    lines = body.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"


class HoldServer:
    def __init__(self, approvals: Approvals, keepalive: float = 10.0, read_timeout: float = 3600.0) -> None:
        self.approvals = approvals
        self.keepalive = keepalive
        self.read_timeout = read_timeout
        self.tickets: dict[str, Ticket] = {}
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=30, sock_read=self.read_timeout))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, ticket: Ticket) -> str:
        now = time.monotonic()
        for key in [k for k, t in self.tickets.items() if now - t.created > TICKET_TTL]:
            del self.tickets[key]
        key = secrets.token_urlsafe(32)
        self.tickets[key] = ticket
        return key

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ticket = self.tickets.pop(request.headers.get(HOLD_HEADER, ""), None)
        if ticket is None or time.monotonic() - ticket.created > TICKET_TTL:
            return web.Response(status=404, text="no such held call")
        body = await request.read()
        if hashlib.sha256(body).digest() != ticket.body_sha256:
            return web.Response(status=400, text="not the call that was judged")
        ex, held = ticket.ex, ticket.held
        response: web.StreamResponse | None = None
        if ticket.sse:
            response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-store"})
            await response.prepare(request)
            await response.write(b": jitgate: this call is held for a human's approval\n\n")
        beats = 0

        async def on_wait(access_request: AccessRequest, waited: float) -> bool:
            nonlocal beats
            if request.transport is None or request.transport.is_closing():
                return False
            if response is None:
                return True
            beats += 1
            if ticket.progress_token is not None:
                event = progress_event(ticket.progress_token, beats, access_request, waited, held.rule.approval.hold)
            else:
                event = f": jitgate: waiting for a reviewer to decide access request {access_request.id}\n\n".encode()
            try:
                await response.write(event)
            except (ConnectionError, RuntimeError):
                return False
            return True

        def on_filed(access_request: AccessRequest, kind: str) -> None:
            ex.approval = {"request": access_request.id, "state": "joined" if kind == "pending" else kind}

        try:
            outcome = await self.approvals.hold(held, on_wait, self.keepalive, on_filed)
        except StoreError as e:
            log.error("grant store unavailable, refusing held MCP call (audit ID %s): %s", ex.audit_id, e)
            outcome = Outcome(False, None, protocol.GATEWAY_UNAVAILABLE,
                              "jitgate: the grant store is unavailable, so the held call was not made "
                              f"(audit ID {ex.audit_id})")
        if outcome.allowed:
            approvers = ",".join(outcome.request.approvers) if outcome.request else ""
            ex.decision, ex.reason = "allow", (f"approved by {approvers} in access request {outcome.request_id} "
                                                "(used once)")
            ex.approval = {"request": outcome.request_id, "state": "used", "approvers": approvers}
            return await self.forward(request, response, ticket, body)
        ex.decision, ex.reason = "deny", outcome.message[:500]
        ex.approval = {"request": outcome.request_id, "state": outcome.request.state.value if outcome.request else ""}
        data = {"decision": "require-approval", "rule": held.rule.name, "server": held.server, "auditID": ex.audit_id,
                "accessRequest": outcome.request_id or None}
        if held.kind.value == "tool":
            data["tool"] = held.target
        if response is None:
            return web.Response(status=200, content_type="application/json",
                                body=protocol.error_body(ticket.request_id, outcome.code, outcome.message, data))
        try:
            await response.write(error_event(ticket.request_id, outcome.code, outcome.message, data))
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response

    async def forward(self, request: web.Request, response: web.StreamResponse | None, ticket: Ticket,
                      body: bytes) -> web.StreamResponse:
        """Make the approved call to the real server and relay its answer."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            credential = ticket.credential()
        except OSError as e:
            return await self._fail(response, ticket, f"no credential for MCP server {ticket.held.server}: {e}")
        if credential:
            headers["Authorization"] = f"Bearer {credential}"
        url = ticket.upstream + request.path_qs
        assert self._session is not None
        try:
            async with self._session.request(request.method, url, headers=headers, data=body,
                                             allow_redirects=False) as upstream:
                content_type = upstream.headers.get("content-type", "").split(";")[0].strip().lower()
                if response is None:
                    out = web.StreamResponse(status=upstream.status, headers={
                        k: v for k in RELAYED_HEADERS if (v := upstream.headers.get(k)) is not None})
                    await out.prepare(request)
                    async for chunk in upstream.content.iter_any():
                        await out.write(chunk)
                    await out.write_eof()
                    return out
                if content_type == "text/event-stream" and 200 <= upstream.status < 300:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                else:
                    answer = await upstream.read()
                    if 200 <= upstream.status < 300 and answer.strip():
                        await response.write(sse_of_json(answer))
                    elif not 200 <= upstream.status < 300:
                        await response.write(error_event(ticket.request_id, protocol.INTERNAL_ERROR,
                                                         f"jitgate: the approved call reached MCP server "
                                                         f"{ticket.held.server}, which answered HTTP {upstream.status}",
                                                         {"auditID": ticket.ex.audit_id}))
                await response.write_eof()
                return response
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            log.error("held MCP call (audit ID %s) could not be relayed: %s", ticket.ex.audit_id, e)
            return await self._fail(response, ticket, f"the approved call could not be relayed to MCP server "
                                                      f"{ticket.held.server}")

    async def _fail(self, response: web.StreamResponse | None, ticket: Ticket, why: str) -> web.StreamResponse:
        text = f"jitgate: {why} (audit ID {ticket.ex.audit_id})"
        ticket.ex.reason = text
        if response is None:
            return web.Response(status=502, content_type="application/json",
                                body=protocol.error_body(ticket.request_id, protocol.GATEWAY_UNAVAILABLE, text))
        try:
            await response.write(error_event(ticket.request_id, protocol.GATEWAY_UNAVAILABLE, text,
                                             {"auditID": ticket.ex.audit_id}))
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response
