"""jitgate's MCP front: MCP servers that speak Streamable HTTP, behind OAuth, tool rules, masking and audit.

    mitmdump -s addons/mcp_gateway.py --set mcp_policy=policies/mcp.yaml \\
        --mode reverse:http://127.0.0.1:8000@9443

One reverse-mode listener per MCP server (`mcp.servers[].upstream` names the target). This entry
loads none of the Kubernetes chain. Per request (jitgate.mcp.front has the decisions):

    requestheaders   resource metadata, path and method, Origin, bearer token (bound to the resource);
                     the caller's Authorization never goes upstream (the front's own token, or the
                     caller's identity as a token the front signs, may)
    request          rate limit, strict JSON-RPC, protocol-generation headers, rules on tools, resources
                     and prompts, audit line; a held call goes to the hold server (jitgate.mcp.hold)
    responseheaders  SSE responses stream event by event (each event's message inspected)
    response         JSON responses inspected whole; the exchange's last audit line
    error            the exchange's failure, audited

With `mcp_recordings`, each completed exchange (the request with its message masked, the answer as the
caller got it, refusals included) is also written into the caller's session recordings (flows.mitm,
session.har, index.db: what `jitgate sessions --dir` reads), credentials scrubbed; a recording that cannot
be written never changes the call (logged, and the exchange's audit `end` line says `recording: failed`).

Flows read back with `-r` are not live and pass untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import time
import weakref
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import human

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

# The Kubernetes side's flow state, connection parts and stream capture (addons/recording.py), reused.
from addons.recording import Capture, ConnectionParts, flow_state
from jitgate.access.errors import StoreError
from jitgate.access.service import AccessService
from jitgate.audit.log import AuditLog, AuditLogError
from jitgate.mcp import protocol
from jitgate.mcp.approval import Approvals, check_rules
from jitgate.mcp.config import McpConfig, McpServer
from jitgate.mcp.exchange import Exchanger
from jitgate.mcp.front import Exchange, Front
from jitgate.mcp.hold import HOLD_HEADER, HoldServer, Ticket
from jitgate.mcp.messages import Unreadable
from jitgate.mcp.ratelimit import parse_rate
from jitgate.mcp.recording import call_record, masked_request
from jitgate.mcp.resource import HttpAnswer
from jitgate.mcp.sse import EventSplitter, EventTooLarge, event_data, with_data
from jitgate.policy.document import PolicyError
from jitgate.policy.mcp import load_mcp_policy
from jitgate.recording import har
from jitgate.recording.index import call_row
from jitgate.recording.recorder import Recorder, RecordingsError
from jitgate.recording.scrub import MARKER_BYTES, scrub_state
from jitgate.recording.sessions import session_for

log = logging.getLogger("jitgate.mcp")

METADATA_KEY = "jitgate-mcp"
# Caller credentials that must never reach an MCP server, and the Origin the front has checked (a server's
# own DNS-rebinding check, e.g. the Python SDK's on 127.0.0.1, would refuse every browser origin the policy allows).
CALLER_HEADERS = ("authorization", "proxy-authorization", "cookie", "origin", HOLD_HEADER.lower())


def _answer(flow: http.HTTPFlow, answer: HttpAnswer) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    flow.response = http.Response.make(answer.status, answer.body, headers)


FAILED = "jitgate: internal error while checking this MCP message, so it is refused"


def fail_closed(hook):
    """mitmproxy logs an addon's exception and goes on with the flow: here a failure refuses instead."""
    def refuse(flow: http.HTTPFlow) -> None:
        log.exception("MCP front failed in %s", hook.__name__)
        if hook.__name__ in ("requestheaders", "request"):
            flow.request.stream = False
            flow.response = http.Response.make(500, protocol.error_body(None, protocol.INTERNAL_ERROR, FAILED),
                                               {"Content-Type": "application/json"})
        elif flow.response is not None and not flow.response.stream and hook.__name__ == "response":
            flow.response = http.Response.make(502, protocol.error_body(None, protocol.INTERNAL_ERROR, FAILED),
                                               {"Content-Type": "application/json"})
        elif flow.killable:
            flow.kill()

    if asyncio.iscoroutinefunction(hook):
        async def guarded(self, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception:  # noqa: BLE001 - any failure refuses the flow
                refuse(flow)
    else:
        def guarded(self, flow: http.HTTPFlow) -> None:
            try:
                hook(self, flow)
            except Exception:  # noqa: BLE001 - any failure refuses the flow
                refuse(flow)
    guarded.__name__ = hook.__name__
    return guarded


def _close_client(flow: http.HTTPFlow, reason: str) -> None:
    """End the client connection soon (a stream that failed its checks must not stay open)."""
    master = getattr(ctx, "master", None)
    server = master.addons.get("proxyserver") if master else None
    handler = server.connections.get(flow.client_conn.id) if server else None
    transport = handler.transports.get(handler.client) if handler else None
    if transport is not None and transport.handler is not None:
        asyncio.get_running_loop().call_soon(transport.handler.cancel, reason)
    elif flow.killable:
        flow.kill()


SCRUBBED = "Bearer [sent by jitgate, scrubbed]"


def _scrub(flow: http.HTTPFlow) -> None:
    """The front's own credential leaves the flow once sent: `-w` files, mitmweb and HAR never hold it."""
    if "authorization" in flow.request.headers:
        flow.request.headers["authorization"] = SCRUBBED
    if HOLD_HEADER in flow.request.headers:
        flow.request.headers[HOLD_HEADER] = "[scrubbed]"


class UpstreamToken:
    """The front's own bearer token for one server, from a file, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._token = ""

    def value(self) -> str:
        st = os.stat(self.path)
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            token = Path(self.path).read_text().strip()
            if not token or any(c in token for c in "\r\n\0"):
                raise OSError(f"{self.path} holds no usable token")
            self._token, self._stamp = token, (st.st_mtime_ns, st.st_size)
        return self._token


class SseStream:
    """`flow.response.stream` for `text/event-stream`: each event's message goes through the front."""

    def __init__(self, front: Front, ex: Exchange, flow: http.HTTPFlow, status: int) -> None:
        self.front, self.ex, self.flow, self.status = front, ex, flow, status
        self.splitter = EventSplitter(front.max_body)
        self.failed = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.failed:
            return []
        out: list[bytes] = []
        try:
            events = self.splitter.feed(chunk) if chunk else []
            if not chunk:
                rest = self.splitter.rest()
                if rest.strip():
                    events.append(rest)
            for event in events:
                data = event_data(event)
                if data is None or not data.strip():
                    out.append(event)  # comments, priming events with an id only
                    continue
                new = self.front.server_message(self.ex, data, self.status)
                out.append(event if new is data else with_data(event, new))
        except (EventTooLarge, Unreadable, AuditLogError) as e:
            self.failed = True
            log.error("MCP stream withheld (audit ID %s): %s", self.ex.audit_id, e)
            self.ex.reason = f"stream withheld: {e}"
            request_id = self.ex.message.id if self.ex.message and self.ex.message.kind == "request" else None
            body = protocol.error_body(request_id, protocol.INTERNAL_ERROR,
                                       f"jitgate: the server's stream could not be checked, so it ends here "
                                       f"(audit ID {self.ex.audit_id})")
            out.append(b"data: " + body + b"\n\n")
            _close_client(self.flow, "jitgate: MCP stream withheld")
        return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jitgate")
    except Exception:  # noqa: BLE001 - a plain checkout
        return "0"


class FrontRecording:
    """The front's exchanges in the session recordings: the Kubernetes side's Recorder, session ids,
    index rows, HAR entries and flow-file bytes (jitgate.mcp.recording makes the record they read)."""

    def __init__(self, recorder: Recorder, body_limit: int) -> None:
        self.recorder = recorder
        self.limit = body_limit
        self.connections = ConnectionParts()
        self.captures: weakref.WeakKeyDictionary[http.HTTPFlow, Capture] = weakref.WeakKeyDictionary()
        self.recorded: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.failures = 0

    def capture(self, flow: http.HTTPFlow) -> None:
        """A streamed (SSE) answer: what the caller gets, as it passes, kept up to the body limit."""
        capture = self.captures[flow] = Capture(self.limit, option="mcp_recording_body_max_bytes")
        inner = flow.response.stream

        def recorded_stream(chunk: bytes):
            out = inner(chunk)
            capture.add(out if isinstance(out, bytes) else b"".join(out), end=not chunk)
            return out

        flow.response.stream = recorded_stream

    def safely(self, flow: http.HTTPFlow, ex: Exchange, front: Front) -> None:
        """A recording failure never stops or changes the call: logged, and audited at the exchange's end."""
        try:
            self.record(flow, ex, front)
        except Exception:
            ex.recording = "failed"
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.exception("could not record MCP exchange %s (%d failures so far)", ex.audit_id, self.failures)

    def record(self, flow: http.HTTPFlow, ex: Exchange, front: Front) -> None:
        if flow in self.recorded:
            return
        self.recorded.add(flow)
        record = call_record(ex)
        started = flow.request.timestamp_start or time.time()
        ref = self.recorder.resolve(session_for(record, started))
        mcp_record = {**ex.record(), "session": ref.id}
        state = flow_state(flow, self.connections.state)
        notes = self.prepare(state, flow, front)
        scrub_state(state)
        state["metadata"][METADATA_KEY] = mcp_record
        what = " ".join(str(v) for v in (mcp_record["method"], mcp_record["tool"]) if v)
        state["comment"] = "\n".join([f"MCP {ex.server.name}: {what or ex.http_method}; {har.summary(record)}",
                                      *notes.values()])
        if record["decision"] == "deny":
            state["marked"] = ":no_entry:"
        flow_pieces = self.connections.flow_pieces(state, flow)
        entry = har.entry_pieces(har.entry(state, {**record, "mcp": mcp_record}, notes))
        request, response = state["request"], state.get("response")
        ended = (response or {}).get("timestamp_end") or time.time()
        row = call_row(ref.id, record, started, (response or {}).get("status_code", 0),
                       request["path"].decode("utf-8", "replace"), (ended - started) * 1000)
        self.recorder.record(ref, flow_pieces, entry, started, row)

    def prepare(self, state: dict, flow: http.HTTPFlow, front: Front) -> dict[str, str]:
        """Bodies as recorded: the request's message masked, the answer as the caller got it, both bounded."""
        notes: dict[str, str] = {}
        request = state["request"]
        request["headers"] = tuple((k, MARKER_BYTES if k.lower() == HOLD_HEADER_BYTES else v)
                                   for k, v in request.get("headers") or ())
        if request.get("content"):
            request["content"] = masked_request(request["content"], front.config.detectors)
            if len(request["content"]) > self.limit:
                request["content"] = request["content"][:self.limit]
                notes["request"] = f"request body cut at {self.limit} bytes (mcp_recording_body_max_bytes)"
        response = state.get("response")
        if response is None:
            return notes
        capture = self.captures.pop(flow, None)
        if capture is not None:
            if note := capture.keep_in(response):
                notes["response"] = note
            return notes
        why = har.undo_content_encoding(response, "response")
        if why:
            notes["response"] = why
            return notes
        body = response.get("content") or b""
        if len(body) > self.limit:
            response["content"] = body[:self.limit]
            notes["response"] = f"response body cut at {self.limit} bytes (mcp_recording_body_max_bytes)"
        return notes

    def close(self) -> None:
        self.recorder.close()


HOLD_HEADER_BYTES = HOLD_HEADER.lower().encode()


class McpFront:
    """The MCP front as one addon (one object per hook walk: mitmproxy visits every addon per event)."""

    def __init__(self) -> None:
        self.front: Front | None = None
        self.config: McpConfig | None = None
        self.audit: AuditLog | None = None
        self.tokens: dict[str, UpstreamToken] = {}
        self.exchangers: dict[str, Exchanger] = {}
        self.exchanges: weakref.WeakKeyDictionary[http.HTTPFlow, Exchange] = weakref.WeakKeyDictionary()
        # Held calls: the access service over the shared grant store, and the loopback server they wait in.
        self.service: AccessService | None = None
        self.hold_server: HoldServer | None = None
        self.recording: FrontRecording | None = None

    def load(self, loader) -> None:
        loader.add_option("mcp_policy", str, "", "The MCP front's policy file (its `mcp:` section: servers, trusted "
                          "issuers, allowed origins, tool rules, masking). Required; a mistake stops the start "
                          "with file:line.")
        loader.add_option("mcp_audit_log", str, "state/mcp-audit.log", "Audit JSON-lines file, one line per "
                          "JSON-RPC message (0600, append-only), or - for stdout. A message that cannot be "
                          "recorded is refused (503) or withheld.")
        loader.add_option("mcp_audit_fsync", bool, False, "fsync the audit log after every line.")
        loader.add_option("mcp_rate_limit", str, "", "Messages per identity, e.g. 10/s, 600/m or 5000/h "
                          "(token bucket); empty: no limit. Over it: HTTP 429 with Retry-After.")
        loader.add_option("mcp_rate_burst", int, 20, "Messages an identity may send at once before mcp_rate_limit "
                          "applies (the bucket's size).")
        loader.add_option("mcp_max_body", str, "4m", "Largest client message and largest server SSE event (k/m/g).")
        loader.add_option("mcp_clock_skew", int, 60, "Seconds tolerated on the tokens' nbf/iat.")
        loader.add_option("mcp_stream_idle_timeout", int, 3600, "Seconds a quiet SSE stream (GET, or a slow tool) "
                          "may stay open; raises mitmproxy's tcp_timeout to it.")
        loader.add_option("mcp_grant_store", str, "", "SQLite grant store where held calls become access requests "
                          "(the Kubernetes gateway's grant_store: reviewers approve with `jitgate approve`, through "
                          "either process). Needed by require-approval rules with `approval`; empty: such calls are "
                          "refused.")
        loader.add_option("mcp_access_policy", str, "", "The Kubernetes gateway's policy (file or folder, its `policy`): "
                          "its access rules name the reviewers of held calls (rules' `approval.access_rule`).")
        loader.add_option("mcp_hold_poll_interval_ms", int, 1000, "How often a held call re-reads its access request "
                          "(ms); approvals made by another process are seen within it.")
        loader.add_option("mcp_hold_keepalive", int, 10, "Seconds between the MCP progress notifications (or SSE "
                          "comments, without a progressToken) a held call sends so clients do not time out; 0: none.")
        loader.add_option("mcp_recordings", str, "", "Folder of session recordings (the Kubernetes gateway's layout: "
                          "per session flows.mitm and session.har, index.db for `jitgate sessions --dir`): every "
                          "exchange, refusals included, in the caller's session, messages masked and credentials "
                          "removed. One process per folder: not the Kubernetes gateway's `recordings`. Empty: off.")
        loader.add_option("mcp_recording_body_max_bytes", str, "1m", "Largest request or response body kept per "
                          "exchange in mcp_recordings (k/m/g), SSE streams included: a longer one is cut, with a note.")
        loader.add_option("mcp_recording_har_max_bytes", str, "256m", "Largest session.har of one session in "
                          "mcp_recordings (k/m/g); later exchanges are kept in flows.mitm and the index only.")

    def configure(self, updated: set[str]) -> None:
        if not updated & {"mcp_policy", "mcp_audit_log", "mcp_audit_fsync", "mcp_rate_limit", "mcp_rate_burst",
                          "mcp_max_body", "mcp_clock_skew", "mode", "mcp_grant_store", "mcp_access_policy",
                          "mcp_hold_poll_interval_ms", "mcp_hold_keepalive", "mcp_recordings",
                          "mcp_recording_body_max_bytes", "mcp_recording_har_max_bytes", "recordings"}:
            return
        opts = ctx.options
        if not opts.mcp_policy:
            raise exceptions.OptionsError("the MCP front needs a policy: --set mcp_policy=<file>")
        try:
            config = load_mcp_policy(opts.mcp_policy)
        except PolicyError as e:
            raise exceptions.OptionsError(f"MCP policy error: {e}") from None
        try:
            rate = parse_rate(opts.mcp_rate_limit)
            max_body = human.parse_size(opts.mcp_max_body)
        except ValueError as e:
            raise exceptions.OptionsError(f"mcp_rate_limit / mcp_max_body: {e}") from None
        if opts.mcp_rate_burst < 1:
            raise exceptions.OptionsError("mcp_rate_burst must be at least 1")
        if not max_body or max_body < 1024:
            raise exceptions.OptionsError("mcp_max_body must be at least 1k")
        if opts.mcp_clock_skew < 0:
            raise exceptions.OptionsError("mcp_clock_skew must be >= 0")
        self._check_modes(config, opts.mode)
        if opts.mcp_hold_poll_interval_ms < 10 or opts.mcp_hold_keepalive < 0:
            raise exceptions.OptionsError("mcp_hold_poll_interval_ms must be >= 10 and mcp_hold_keepalive >= 0")
        service = self._approval_service(config, opts)
        try:
            exchangers = {s.name: Exchanger(s, s.token_exchange) for s in config.servers if s.token_exchange}
        except ValueError as e:
            raise exceptions.OptionsError(f"token_exchange: {e}") from None
        body_max, har_max = self._recording_limits(opts)
        try:
            audit = AuditLog(opts.mcp_audit_log, fsync=opts.mcp_audit_fsync)
        except AuditLogError as e:
            raise exceptions.OptionsError(str(e)) from None
        try:
            recorder = self._recorder(opts, updated, har_max)
        except exceptions.OptionsError:
            audit.close()
            raise
        current = self.recording.recorder if self.recording is not None else None
        if recorder is not current:
            old, self.recording = self.recording, FrontRecording(recorder, body_max) if recorder else None
            if old is not None:
                old.close()
        elif self.recording is not None:
            self.recording.limit = body_max
        if self.audit is not None:
            self.audit.close()
        self.audit, self.config = audit, config
        self.front = Front(config, audit, rate, opts.mcp_rate_burst, opts.mcp_clock_skew, max_body,
                           holds=service is not None)
        self.tokens = {s.name: UpstreamToken(s.upstream_token_file) for s in config.servers if s.upstream_token_file}
        self.exchangers = exchangers
        if service is not None:
            old, self.service = self.service, service
            approvals = Approvals(service, opts.mcp_hold_poll_interval_ms / 1000)
            if self.hold_server is None:
                self.hold_server = HoldServer(approvals, opts.mcp_hold_keepalive, opts.mcp_stream_idle_timeout)
            else:
                self.hold_server.approvals, self.hold_server.keepalive = approvals, opts.mcp_hold_keepalive
            if old is not None and old is not service and old.store is not None:
                old.store.close()
        elif self.service is not None and self.service.store is not None:
            self.service.store.close()
            self.service = None

    @staticmethod
    def _recording_limits(opts) -> tuple[int, int]:
        limits = []
        for name, least in (("mcp_recording_body_max_bytes", 1), ("mcp_recording_har_max_bytes", har.MIN_MAX_BYTES)):
            try:
                value = human.parse_size(getattr(opts, name))
            except ValueError:
                value = None
            if value is None or value < least:
                raise exceptions.OptionsError(f"{name} must be a size such as 1m, at least "
                                              f"{human.pretty_size(least)}, not {getattr(opts, name)!r}")
            limits.append(value)
        return limits[0], limits[1]

    def _recorder(self, opts, updated: set[str], har_max: int) -> Recorder | None:
        """The recordings folder's writer (the one open now when neither folder nor HAR cap changed)."""
        if not opts.mcp_recordings:
            return None
        if self.recording is not None and not updated & {"mcp_recordings", "mcp_recording_har_max_bytes"}:
            return self.recording.recorder
        root = Path(opts.mcp_recordings)
        kube = opts.recordings if "recordings" in opts.keys() else ""  # noqa: SIM118 - the chain loaded beside it
        if kube and Path(kube).resolve() == root.resolve():
            raise exceptions.OptionsError("mcp_recordings must be a folder of its own, not the Kubernetes gateway's "
                                          "`recordings` (one process, one writer per folder)")
        try:
            return Recorder(root, har_max, _version())
        except RecordingsError as e:
            raise exceptions.OptionsError(f"mcp_recordings: {e}") from None

    @staticmethod
    def _approval_service(config: McpConfig, opts) -> AccessService | None:
        """The access service over the shared grant store, when rules hold calls; None otherwise."""
        holding = [r for r in config.rules if r.approval is not None]
        if not opts.mcp_grant_store and not opts.mcp_access_policy:
            return None  # require-approval rules refuse (-32011), as without `approval`
        if not opts.mcp_grant_store or not opts.mcp_access_policy:
            raise exceptions.OptionsError("held calls need both mcp_grant_store (the Kubernetes gateway's grant_store) "
                                          "and mcp_access_policy (its policy)")
        from jitgate.policy.loader import load_policy
        from jitgate.store.sqlite import SQLiteStore

        try:
            policy = load_policy(opts.mcp_access_policy)
        except PolicyError as e:
            raise exceptions.OptionsError(f"mcp_access_policy: {e}") from None
        problems = check_rules(holding, policy.access_rules)
        if problems:
            raise exceptions.OptionsError("MCP policy error: " + "; ".join(problems))
        service = AccessService(SQLiteStore)
        try:
            service.open_store(opts.mcp_grant_store)
        except StoreError as e:
            raise exceptions.OptionsError(f"cannot open the grant store: {e}") from None
        service.set_policy(policy.access_rules, policy.webhooks)
        return service

    @staticmethod
    def _check_modes(config: McpConfig, modes: list[str]) -> None:
        """Only reverse listeners, each to a server the policy describes: never an open proxy."""
        for spec in modes:
            mode = mode_specs.ProxyMode.parse(spec)
            if not isinstance(mode, mode_specs.ReverseMode) or mode.scheme not in ("http", "https"):
                raise exceptions.OptionsError(f"the MCP front serves --mode reverse:http(s)://<server>@<port> only, "
                                              f"not {spec!r}")
            if config.server_at(mode.scheme, *mode.address) is None:
                raise exceptions.OptionsError(f"--mode {spec}: no server in mcp.servers has upstream "
                                              f"{mode.scheme}://{mode.address[0]}:{mode.address[1]}")

    async def running(self) -> None:
        if ctx.options.tcp_timeout < ctx.options.mcp_stream_idle_timeout:
            ctx.options.update(tcp_timeout=ctx.options.mcp_stream_idle_timeout)
        if self.service is not None:
            self.service.start(asyncio.get_running_loop())
        if self.hold_server is not None and self.hold_server.port is None:
            await self.hold_server.start()

    async def done(self) -> None:
        if self.hold_server is not None:
            await self.hold_server.stop()
        if self.service is not None:
            await self.service.stop()
        if self.audit is not None:
            self.audit.close()
        if self.recording is not None:
            self.recording.close()
            self.recording = None

    # -- hooks -----------------------------------------------------------------------------

    def _server(self, flow: http.HTTPFlow) -> McpServer | None:
        mode = flow.client_conn.proxy_mode
        if not isinstance(mode, mode_specs.ReverseMode) or self.config is None:
            return None
        return self.config.server_at(mode.scheme, *mode.address)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or flow.response is not None or self.front is None:
            return
        request = flow.request
        server = self._server(flow)
        if server is None:
            _answer(flow, HttpAnswer(502, (), b"jitgate: no MCP server is configured for this listener"))
            return
        ex = Exchange(server, request.method, request.path, flow.client_conn.peername[0] if flow.client_conn.peername
                      else "", session_id=request.headers.get("mcp-session-id"))
        self.exchanges[flow] = ex
        answer = (self.front.route(ex) or self.front.check_origin(ex, request.headers.get_all("origin"))
                  or await self.front.authenticate(ex, request.headers.get_all("authorization")))
        if answer is None and request.headers.get("content-encoding", "identity").lower() != "identity":
            ex.reason = "compressed request body"
            answer = HttpAnswer(415, (), b"jitgate: compressed request bodies are not accepted")
        if answer is not None:
            ex.answered = True
            ex.decision = "allow" if answer.status == 200 else "deny"
            _answer(flow, answer)
            return
        for name in CALLER_HEADERS:
            request.headers.pop(name, None)
        request.headers["Accept-Encoding"] = "identity"  # bodies must be readable, event by event

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        ex = self.exchanges.get(flow)
        if ex is None or ex.answered or flow.response is not None or self.front is None:
            return
        header_lines = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in flow.request.headers.fields]
        body = flow.request.raw_content or b""
        answer = self.front.admit(ex, body, header_lines)
        flow.metadata[METADATA_KEY] = ex.record()
        if answer is None and ex.held is not None:
            answer = self._hold(flow, ex, body)
        elif answer is None:
            answer = self._upstream_credential(flow, ex)
        if answer is not None:
            _answer(flow, answer)
        elif body or flow.request.method == "POST":
            # The server reads exactly the message that was judged (an HTTP/2 caller's body would otherwise
            # be forwarded to an HTTP/1.1 server with neither Content-Length nor Transfer-Encoding).
            flow.request.headers.pop("transfer-encoding", None)
            flow.request.headers["content-length"] = str(len(body))

    def _credential(self, ex: Exchange) -> str | None:
        """What the server gets as `Authorization: Bearer`: the front's own token, or the caller's identity
        exchanged for a token the front signs, or nothing. Raises OSError when it cannot be had."""
        token = self.tokens.get(ex.server.name)
        if token is not None:
            return token.value()
        exchanger = self.exchangers.get(ex.server.name)
        if exchanger is not None and ex.caller is not None:
            try:
                return exchanger.token(ex.caller.username, ex.caller.groups)
            except Exception as e:  # noqa: BLE001 - a key that cannot sign: no credential, refused
                raise OSError(f"token exchange failed: {e}") from None
        return None

    def _hold(self, flow: http.HTTPFlow, ex: Exchange, body: bytes) -> HttpAnswer | None:
        """Send a held call to the hold server (it waits there, then goes to the real server once approved)."""
        if self.hold_server is None or self.hold_server.port is None:
            ex.answered, ex.decision, ex.reason = True, "deny", "hold server not running"
            self.front.finish(ex, 503, error=ex.reason)
            return HttpAnswer(503, (("Content-Type", "application/json"),), protocol.error_body(
                ex.message.id if ex.message else None, protocol.GATEWAY_UNAVAILABLE,
                f"jitgate: held calls cannot wait now (audit ID {ex.audit_id})"))
        message = ex.message
        meta = message.params.get("_meta") if message is not None and message.params is not None else None
        progress = meta.get("progressToken") if isinstance(meta, dict) else None
        server = ex.server
        scheme, host, port = server.address
        ticket = Ticket(ex, ex.held, f"{scheme}://{host}:{port}", hashlib.sha256(body).digest(), message.id,
                        progress if isinstance(progress, (str, int)) and not isinstance(progress, bool) else None,
                        "text/event-stream" in flow.request.headers.get("accept", "").lower(),
                        lambda ex=ex: self._credential(ex))
        request = flow.request
        request.headers[HOLD_HEADER] = self.hold_server.register(ticket)
        request.scheme, request.host, request.port = "http", "127.0.0.1", self.hold_server.port
        request.headers.pop("transfer-encoding", None)
        request.headers["content-length"] = str(len(body))
        return None

    def _upstream_credential(self, flow: http.HTTPFlow, ex: Exchange) -> HttpAnswer | None:
        """The server's credential (`_credential`), added only to what is forwarded (and scrubbed once sent)."""
        try:
            token = self._credential(ex)
            if token is None:
                return None
            flow.request.headers["Authorization"] = f"Bearer {token}"
        except OSError as e:
            log.error("upstream token of MCP server %s unreadable: %s", ex.server.name, e)
            ex.answered, ex.decision, ex.reason = True, "deny", "upstream credential unavailable"
            self.front.finish(ex, 503, error=ex.reason)  # the request's line said allowed: record the refusal
            return HttpAnswer(503, (("Content-Type", "application/json"),), protocol.error_body(
                None, protocol.GATEWAY_UNAVAILABLE, f"jitgate: no credential for MCP server {ex.server.name} "
                f"(audit ID {ex.audit_id})"))
        return None

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = self.exchanges.get(flow)
        if ex is None or ex.answered or flow.response is None or self.front is None:
            return
        _scrub(flow)
        response = flow.response
        self.front.server_headers(ex, response.status_code, response.headers.get("mcp-session-id"))
        if response.headers.get("content-type", "").split(";")[0].strip().lower() != "text/event-stream":
            return  # JSON (and anything else) is read whole at `response`
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            ex.reason = "compressed event stream"
            response.stream = lambda chunk: b""
            _close_client(flow, "jitgate: compressed MCP event stream")
            return
        response.stream = SseStream(self.front, ex, flow, response.status_code)
        if self.recording is not None:
            self.recording.capture(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        ex = self.exchanges.get(flow)
        if ex is None or self.front is None or flow.response is None:
            return
        response = flow.response
        if not ex.answered and not response.stream and response.raw_content:
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type == "application/json":
                self._json_response(flow, ex)
            else:
                self._other_response(flow, ex)
        flow.metadata[METADATA_KEY] = ex.record()
        if self.recording is not None:
            self.recording.safely(flow, ex, self.front)
        self.front.finish(ex, flow.response.status_code)

    def _other_response(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        """Neither JSON nor SSE (an error page, a server that mislabels its answer): masked as text, or
        withheld when it is no text, so nothing reaches the caller unmasked."""
        response = flow.response
        text = response.get_text(strict=False)
        if text is None:
            ex.reason = "response withheld: a body that is neither JSON, SSE nor text"
            flow.response = http.Response.make(502, protocol.error_body(
                None, protocol.INTERNAL_ERROR, f"jitgate: the server's answer could not be checked, so it is "
                f"withheld (audit ID {ex.audit_id})"), {"Content-Type": "application/json"})
            return
        masked, count = self.front.config.detectors.mask_text(text)
        if count:
            response.set_text(masked)

    def _json_response(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        response = flow.response
        try:
            payload = response.get_content(strict=True)
            new = self.front.server_message(ex, payload, response.status_code)
            if new is not payload:
                response.set_content(new)
        except (ValueError, Unreadable, AuditLogError) as e:
            log.error("MCP response withheld (audit ID %s): %s", ex.audit_id, e)
            ex.reason = f"response withheld: {e}"
            request_id = ex.message.id if ex.message and ex.message.kind == "request" else None
            flow.response = http.Response.make(502, protocol.error_body(
                request_id, protocol.INTERNAL_ERROR, f"jitgate: the server's answer could not be checked, so it is "
                f"withheld (audit ID {ex.audit_id})"), {"Content-Type": "application/json"})

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        ex = self.exchanges.get(flow)
        if ex is None or self.front is None:
            return
        _scrub(flow)
        if self.recording is not None:
            flow.metadata[METADATA_KEY] = ex.record()
            self.recording.safely(flow, ex, self.front)
        self.front.finish(ex, flow.response.status_code if flow.response else None,
                          error=str(flow.error.msg if flow.error else "error"))


addons = [McpFront()]
