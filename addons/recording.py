"""Recording: every call kept in its session's recordings, masked and without credentials.

Runs after masking and right before audit, so it only ever sees masked bodies. Per session (one
identity under one grant; calls without a grant in the identity's session of the hour; calls
without an identity in `anonymous-<hour>`), under the `recordings` folder:

- `flows.mitm`: each completed flow appended, in mitmproxy's FlowWriter format, with its jitgate record in
  `metadata["jitgate"]` and as the flow's comment, so `mitmweb -r` shows decision, grant and rule;
- `session.har`: HAR 1.2, valid after every write, capped at `recording_har_max_bytes`;
- `exec-<auditID>.cast`: asciicast v2 of each exec/attach, written frame by frame;
- `index.db` in the recordings folder: one row per call, read by `jitgate sessions`.

Streamed bodies (watches, followed logs) are kept as the masked chunks pass, up to
`recording_body_max_bytes` per body. Before anything is stored it is scrubbed of credentials
(headers, query, bodies; see jitgate.recording.scrub), request bodies are masked, typed exec input
is reassembled into lines and masked, and for grants that reveal secrets the recording masks what
the caller saw unmasked. Retention (`recording_max_age`, `recording_max_total_bytes`) runs at
start and every `recording_retention_interval` seconds; each deletion is written to the audit log
(when the audit step is loaded) and to `deletions.jsonl`.

A recording that cannot be written does not stop the call (the audit log is the fail-closed
record): the gateway logs it and the call's audit event carries `jitgate.dev/recording: failed`.
Flows read back with `-r` are never recorded again. With `recording_viewer` (what
`jitgate sessions open` runs mitmweb with) nothing is recorded and every request, a replay from
the UI included, is answered 403 without being sent.

    mitmdump -s addons/recording.py --set recordings=state/recordings
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import weakref
from pathlib import Path

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy import version as mitmproxy_version
from mitmproxy.utils import human

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from jitgate.chain.flow import (  # noqa: E402
    METADATA_KEY,
    call_of,
    current_policy,
    declare_policy_option,
)
from jitgate.kube.audit_event import build_event, new_audit_id  # noqa: E402
from jitgate.kube.status import status_body  # noqa: E402
from jitgate.masking.negotiation import body_kind  # noqa: E402
from jitgate.masking.objects import Masker, MaskingError  # noqa: E402
from jitgate.masking.streams import LineMasker, WatchMasker  # noqa: E402
from jitgate.masking.targets import mask_command_query  # noqa: E402
from jitgate.policy.masking import MaskingPolicy  # noqa: E402
from jitgate.recording import flowfile, har  # noqa: E402
from jitgate.recording.cast import TerminalRecorder, stored_messages  # noqa: E402
from jitgate.recording.index import call_row  # noqa: E402
from jitgate.recording.recorder import Recorder, RecordingsError, cast_name  # noqa: E402
from jitgate.recording.retention import Deletion, Retention  # noqa: E402
from jitgate.recording.scrub import scrub_bytes, scrub_state  # noqa: E402
from jitgate.recording.sessions import SessionRef, session_for  # noqa: E402
from jitgate.timefmt import parse_duration  # noqa: E402

log = logging.getLogger("jitgate.recording")

VIEWER_REFUSAL = "jitgate: this mitmweb only shows recordings; nothing recorded is sent anywhere again"
SIZE_OPTIONS = {"recording_har_max_bytes": "256m", "recording_body_max_bytes": "1m", "recording_max_total_bytes": "20g"}
TERMINAL_SUBRESOURCES = ("exec", "attach")
MASKED_VALUE = "jitgate:masked"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jitgate")
    except Exception:  # noqa: BLE001 - a plain checkout
        return "0"


def _live(flow) -> bool:
    """A call happening now (or a killed one whose connection is still registered), not a flow read
    back with -r: those are never recorded again."""
    if flow.live:
        return True
    master = getattr(ctx, "master", None)
    server = master.addons.get("proxyserver") if master else None
    return server is not None and flow.client_conn.id in server.connections


def _masked(call) -> bool:
    """Whether the call's bodies went through the masking detectors (the masking step's, or the
    recording's own for a revealing grant): what masking applies to."""
    info = call.info
    return info is not None and info.is_resource_request and not call.denied and info.subresource != "portforward"


def _tokens_detected(masker: Masker) -> bool:
    """Whether the policy's detectors mask JWTs and bearer tokens (a policy may switch them off)."""
    return {"jwt", "bearer-token"} <= {d.name for d in masker.detectors.detectors}


def _revealed(call) -> bool:
    return call.grant is not None and call.grant.scope.reveal


def _header(fields, name: bytes) -> str:
    for k, v in fields or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return ""


class ConnectionParts:
    """Each connection's state and its flow-file bytes, made once: `Connection.get_state()` and its
    serialization cost more than the rest of a small call's, and the calls of a kept-alive
    connection share them (as they were at the connection's first recorded call)."""

    def __init__(self) -> None:
        self.parts: weakref.WeakKeyDictionary[connection.Connection, tuple[dict, bytes]] = weakref.WeakKeyDictionary()

    def state(self, conn: connection.Connection) -> dict:
        part = self.parts.get(conn)
        if part is None:
            state = conn.get_state()
            part = self.parts[conn] = (state, flowfile.dumps(state))
        return part[0]

    def flow_pieces(self, state: dict, flow: http.HTTPFlow) -> list[bytes]:
        """The flow state's bytes in flows.mitm (what mitmproxy's FlowWriter writes for it), in pieces."""
        parts = {}
        for key, conn in (("client_conn", flow.client_conn), ("server_conn", flow.server_conn)):
            part = self.parts.get(conn)
            if part is not None and state.get(key) is part[0]:
                parts[key] = part[1]
        return flowfile.flow_pieces(state, parts)


def flow_state(flow: http.HTTPFlow, conn_state=connection.Connection.get_state) -> dict:
    """`flow.get_state()` (mitmproxy 12.2's HTTPFlow and Flow), with the connections' states from
    `conn_state`; tests/test_recording_files.py checks it against mitmproxy's own."""
    return {
        "version": mitmproxy_version.FLOW_FORMAT_VERSION,
        "type": flow.type,
        "id": flow.id,
        "error": flow.error.get_state() if flow.error else None,
        "client_conn": conn_state(flow.client_conn),
        "server_conn": conn_state(flow.server_conn),
        "intercepted": flow.intercepted,
        "is_replay": flow.is_replay,
        "marked": flow.marked,
        "metadata": dict(flow.metadata),  # the recording replaces its own key only
        "comment": flow.comment,
        "timestamp_created": flow.timestamp_created,
        "backup": None,
        "request": flow.request.get_state(),
        "response": flow.response.get_state() if flow.response else None,
        "websocket": flow.websocket.get_state() if flow.websocket else None,
    }


class Capture:
    """The masked chunks of a streamed response as they pass, up to `limit` bytes."""

    __slots__ = ("chunks", "limit", "masker", "note", "option", "size", "truncated")

    def __init__(self, limit: int, masker=None, note: str = "", option: str = "recording_body_max_bytes") -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.option = option  # the option that set `limit`, named in the note of a cut body
        self.truncated = False
        self.masker = masker  # set for a revealed call: the recording masks what passed unmasked
        self.note = note  # set when the body is not kept at all

    def add(self, data: bytes, end: bool = False) -> None:
        if self.note or self.truncated or (not data and not end):
            return
        if self.masker is not None:
            try:
                data = self.masker.feed(data) + (self.masker.feed(b"") if end and data else b"")
            except MaskingError:
                self.note, self.chunks = "stream not recorded: it could not be masked", []
                return
        if not data:
            return
        room = self.limit - self.size
        if len(data) > room:
            data, self.truncated = data[:room], True
        self.chunks.append(data)
        self.size += len(data)

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def keep_in(self, response: dict) -> str:
        """The captured body as a recorded response state's (the headers that described the body on the
        wire dropped); the note to keep about it, else ""."""
        response["content"] = self.body()
        response["headers"] = har.drop_headers(response["headers"], (b"content-encoding", b"content-length"))
        if self.note:
            return self.note
        return f"streamed body cut at {self.limit} bytes ({self.option})" if self.truncated else ""


def _capturing(stream, capture: Capture):
    inner = stream if callable(stream) else None

    def recording_stream(chunk: bytes):
        out = inner(chunk) if inner is not None else chunk
        if not isinstance(out, bytes):
            out = b"".join(out)
        capture.add(out, end=not chunk)
        return out

    return recording_stream


class Recording:
    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.retention: Retention | None = None
        self.task: asyncio.Task | None = None
        self.viewer = False
        self.masker = Masker(MaskingPolicy().detectors())
        self.tokens_detected = _tokens_detected(self.masker)
        self.limits = {name: human.parse_size(value) for name, value in SIZE_OPTIONS.items()}
        self.max_age = 90 * 86400
        self.captures: weakref.WeakKeyDictionary[http.HTTPFlow, Capture] = weakref.WeakKeyDictionary()
        self.terminals: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[TerminalRecorder, SessionRef]] = weakref.WeakKeyDictionary()
        self.recorded: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.connections = ConnectionParts()
        self.failures = 0
        self.version = _version()

    # -- options ---------------------------------------------------------------------------------

    def load(self, loader) -> None:
        declare_policy_option(loader)
        loader.add_option(
            "recordings", str, "state/recordings",
            "Folder of session recordings (created 0700, files 0600): per session flows.mitm, session.har and "
            "exec-<auditID>.cast, and index.db for `jitgate sessions`. One gateway process per folder.",
        )
        loader.add_option(
            "recording_har_max_bytes", str, SIZE_OPTIONS["recording_har_max_bytes"],
            "Largest session.har of one session (k/m/g suffixes); past it a last entry marks the truncation "
            "and later calls are kept in flows.mitm and the index only.",
        )
        loader.add_option(
            "recording_body_max_bytes", str, SIZE_OPTIONS["recording_body_max_bytes"],
            "Largest request or response body kept per call (k/m/g), streamed ones (watches, followed logs) "
            "included: a longer body is cut, with a note. Bounds the memory a long watch costs.",
        )
        loader.add_option(
            "recording_max_age", str, "90d",
            "Sessions whose last activity is older than this (e.g. 30d, 12h) are deleted; 0 keeps them forever.",
        )
        loader.add_option(
            "recording_max_total_bytes", str, SIZE_OPTIONS["recording_max_total_bytes"],
            "Largest total size of all sessions (k/m/g); the oldest are deleted past it; 0 means no limit.",
        )
        loader.add_option(
            "recording_retention_interval", int, 3600,
            "Seconds between retention passes (one also runs at start).",
        )
        loader.add_option(
            "recording_viewer", bool, False,
            "Viewer mode (what `jitgate sessions open` runs mitmweb with): record nothing, and answer every "
            "request, replays included, with 403 so nothing recorded is sent anywhere again.",
        )

    def configure(self, updated: set[str]) -> None:
        self.read_limits(updated)
        options = ctx.options
        if "policy" in updated and options.policy:
            self.masker = Masker(current_policy().masking.detectors())
            self.tokens_detected = _tokens_detected(self.masker)
        if "recording_viewer" in updated:
            self.viewer = options.recording_viewer
        if not options.recordings and not self.viewer:
            raise exceptions.OptionsError("recordings must name a folder (e.g. state/recordings)")
        if self.viewer:
            self.close()
        elif "recordings" in updated or "recording_har_max_bytes" in updated or self.recorder is None:
            try:
                recorder = Recorder(Path(options.recordings), self.limits["recording_har_max_bytes"], self.version)
            except RecordingsError as e:
                raise exceptions.OptionsError(str(e)) from None
            self.close()
            self.recorder = recorder
        if self.recorder is not None:
            self.retention = Retention(self.recorder, self.max_age, self.limits["recording_max_total_bytes"])

    def read_limits(self, updated: set[str]) -> None:
        """Sizes, the age limit and the retention interval, validated (OptionsError names the option)."""
        options = ctx.options
        for name in SIZE_OPTIONS:
            if name in updated:
                try:
                    value = human.parse_size(getattr(options, name))
                except ValueError:
                    value = None
                if value is None or value < 0 or (value == 0 and name != "recording_max_total_bytes"):
                    raise exceptions.OptionsError(f"{name} must be a size such as 64m, not {getattr(options, name)!r}")
                if name == "recording_har_max_bytes" and value < har.MIN_MAX_BYTES:
                    raise exceptions.OptionsError(f"recording_har_max_bytes must be at least {har.MIN_MAX_BYTES // 1024}k")
                self.limits[name] = value
        if "recording_max_age" in updated:
            text = options.recording_max_age.strip()
            try:
                self.max_age = 0 if text == "0" else parse_duration(text)
            except ValueError as e:
                raise exceptions.OptionsError(f"recording_max_age: {e}") from None
        if "recording_retention_interval" in updated and not 10 <= options.recording_retention_interval <= 7 * 86400:
            raise exceptions.OptionsError("recording_retention_interval must be between 10 seconds and 7 days")

    async def running(self) -> None:
        if self.recorder is not None and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.retention_loop())

    async def retention_loop(self) -> None:
        while True:
            retention = self.retention
            if retention is not None:
                try:
                    deleted = await asyncio.to_thread(retention.run)
                except Exception:  # noqa: BLE001 - the next pass tries again
                    log.exception("recording retention failed")
                    deleted = []
                for deletion, line in deleted:  # audited here, on the event loop, as every other event
                    try:
                        self.audit_deletion(deletion, line)
                    except Exception:  # noqa: BLE001 - deletions.jsonl has it either way
                        log.exception("could not audit the deletion of recording %s", deletion.session)
            await asyncio.sleep(ctx.options.recording_retention_interval)

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        for flow in list(self.terminals):
            self.end_terminal(flow)
        self.close()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    # -- audit of deletions ----------------------------------------------------------------------

    def audit_deletion(self, deletion: Deletion, line: dict) -> None:
        """Retention deleted a session: one audit event through the audit step's own log."""
        master = getattr(ctx, "master", None)
        if master is None:
            return
        gateway = master.addons.get("gateway")
        step = gateway.step("audit") if gateway is not None and hasattr(gateway, "step") else master.addons.get("audit")
        # The audit step's own way in (its local line, hash chain and sinks) where it has one, else its log.
        write = getattr(step, "record", None)
        if not callable(write):
            write = getattr(getattr(step, "log", None), "write", None)
        if write is None:
            return  # no audit step loaded: only deletions.jsonl has it
        now = time.time()
        reason = (f"recording retention: the session's last activity is older than {line['maxAgeSeconds']} s"
                  if deletion.reason == "age" else
                  f"recording retention: the recordings are over {line['maxTotalBytes']} bytes, the oldest session goes first")
        write(build_event(
            audit_id=new_audit_id(), stage="ResponseComplete", request_uri=f"/jitgate/recordings/{deletion.session}",
            verb="delete", user={"username": "jitgate:recording-retention"}, source_ips=[],
            user_agent="jitgate recording retention", object_ref={"resource": "recordings", "name": deletion.session},
            response_code=200, request_received=now, stage_timestamp=now,
            annotations={"jitgate.dev/decision": "allow", "jitgate.dev/reason": reason,
                         "jitgate.dev/recording-deleted": deletion.session,
                         "jitgate.dev/recording-deletion-reason": deletion.reason,
                         "jitgate.dev/recording-bytes": str(deletion.bytes),
                         "jitgate.dev/recording-user": str(line.get("user", "")),
                         "jitgate.dev/recording-grant": str(line.get("grant", ""))},
        ))

    # -- viewer mode ------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if not self.viewer or flow.response is not None or (flow.is_replay != "request" and not flow.live):
            return  # (a flow being read from the file is shown as recorded)
        flow.response = http.Response.make(403, status_body(403, VIEWER_REFUSAL), {"Content-Type": "application/json"})

    # -- HTTP ---------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.recorder is None or flow.response is None or not _live(flow):
            return
        self.safely(flow, self.record)  # a refused CONNECT (a host that is no cluster) is a call too

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if self.recorder is None or response is None or not response.stream or response.status_code == 101 or not _live(flow):
            return
        capture = Capture(self.limits["recording_body_max_bytes"])
        call = call_of(flow)
        if _revealed(call) and call.info is not None:
            self.mask_revealed_stream(capture, call, response)
        self.captures[flow] = capture
        response.stream = _capturing(response.stream, capture)

    def mask_revealed_stream(self, capture: Capture, call, response: http.Response) -> None:
        kind = body_kind(response.headers.get("Content-Type", ""))
        if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
            capture.note = "stream not recorded: a compressed stream of a call whose grant reveals secrets"
        elif kind == "json":
            capture.masker = WatchMasker(self.masker, call.info.resource == "secrets")
        elif kind == "text" and call.info.subresource == "log":
            capture.masker = LineMasker(self.masker.detectors)
        else:
            capture.note = f"stream not recorded: {kind} content of a call whose grant reveals secrets"

    def response(self, flow: http.HTTPFlow) -> None:
        if self.recorder is None or flow.websocket is not None or not _live(flow):
            return  # a WebSocket session is recorded when it ends
        self.safely(flow, self.record)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.recorder is None or flow in self.recorded or not _live(flow):
            return
        if flow in self.terminals:
            self.end_terminal(flow)
        self.safely(flow, self.record)

    # -- exec / attach ----------------------------------------------------------------------------

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if self.recorder is None or not _live(flow):
            return
        call = call_of(flow)
        info = call.info
        if info is None or info.subresource not in TERMINAL_SUBRESOURCES:
            return
        self.safely(flow, self.start_terminal)

    def start_terminal(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        info = call.info
        ref = self.recorder.resolve(session_for(call.record(), call.received))
        params = info.exec
        tty = bool(params and params.tty)
        command = " ".join(params.command) if params and params.command else ""
        title = f"{call.identity.username if call.identity else 'anonymous'}: kubectl {info.subresource} -n {info.namespace} {info.name}"
        if params and params.container:
            title += f" -c {params.container}"
        if command:
            title += f" -- {command}"
        title = self.masker.detectors.mask_text(scrub_bytes(title.encode()).decode())[0]
        recorder, started = self.recorder, flow.websocket.messages[0].timestamp if flow.websocket.messages else time.time()

        def open_cast(width: int, height: int):
            return recorder.open_cast(ref, call.audit_id, width, height, started, title, {"TERM": "xterm-256color"} if tty else None)

        terminal = TerminalRecorder(open_cast, flow.response.headers.get("Sec-WebSocket-Protocol", ""), tty,
                                    self.masker.detectors, reveal=_revealed(call))
        recorder.hold(ref.id)
        self.terminals[flow] = (terminal, ref)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        entry = self.terminals.get(flow)
        if entry is None:
            return
        message = flow.websocket.messages[-1]
        if message.from_client:
            self.safely(flow, lambda f: entry[0].client_frame(message.content, message.timestamp))
        elif not message.dropped:  # a dropped output frame was never delivered (a held partial line)
            self.safely(flow, lambda f: entry[0].server_frame(message.content, message.timestamp))

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        if self.recorder is None or not _live(flow):
            return
        if flow in self.terminals:
            self.end_terminal(flow)
        if flow not in self.recorded:
            self.safely(flow, self.record)

    def end_terminal(self, flow: http.HTTPFlow) -> None:
        terminal, ref = self.terminals.pop(flow)
        ended = flow.websocket.timestamp_end if flow.websocket is not None else None
        try:
            terminal.finish(ended or time.time())
        except Exception:  # noqa: BLE001 - the flow is still recorded
            log.exception("could not finish the terminal recording of %s", call_of(flow).audit_id)
        finally:
            if self.recorder is not None:
                self.recorder.release(ref.id)

    # -- writing ----------------------------------------------------------------------------------

    def safely(self, flow: http.HTTPFlow, step) -> None:
        """A recording failure never stops or changes the call; it is logged and audited."""
        try:
            step(flow)
        except Exception:  # noqa: BLE001
            call = call_of(flow)
            call.annotations["jitgate.dev/recording"] = "failed"
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.exception("could not record call %s (%d failures so far)", call.audit_id, self.failures)

    def record(self, flow: http.HTTPFlow) -> None:
        if flow in self.recorded:
            return
        self.recorded.add(flow)
        call = call_of(flow)
        record = call.record()
        ref = self.recorder.resolve(session_for(record, call.received))
        # The call's audit event (written after this step) names its session, so does its record.
        call.annotations["jitgate.dev/session"] = ref.id
        record.setdefault("annotations", {})["jitgate.dev/session"] = ref.id
        state = flow_state(flow, self.connections.state)
        notes = self.prepare(state, flow, call, record)
        scrub_state(state, detected=self.tokens_detected and _masked(call))
        comment = har.summary(record)
        state["metadata"][METADATA_KEY] = record
        state["comment"] = "\n".join([comment, *notes.values()])
        if record.get("decision") == "deny":
            state["marked"] = ":no_entry:"
        flow_pieces = self.connections.flow_pieces(state, flow)
        entry = har.entry_pieces(har.entry(state, record, notes, comment))
        request, response = state["request"], state.get("response")
        ended = (response or {}).get("timestamp_end") or time.time()
        cast = cast_name(call.audit_id)
        if flow.websocket is None or not (self.recorder.root / ref.id / cast).exists():
            cast = ""
        method = request.get("method", b"").decode("latin-1")
        target = f"{request.get('host')}:{request.get('port')}" if method == "CONNECT" else request["path"].decode("utf-8", "replace")
        row = call_row(ref.id, record, call.received, (response or {}).get("status_code", 0), target,
                       (ended - (request.get("timestamp_start") or ended)) * 1000, cast, method.lower())
        if not self.recorder.record(ref, flow_pieces, entry, request.get("timestamp_start") or call.received, row):
            call.annotations["jitgate.dev/recording-har"] = "truncated"

    def prepare(self, state: dict, flow: http.HTTPFlow, call, record: dict) -> dict[str, str]:
        """Bodies and messages as the recording keeps them: decoded, masked, bounded. Returns notes."""
        notes: dict[str, str] = {}
        limit = self.limits["recording_body_max_bytes"]
        info = call.info
        secrets = info is not None and info.resource == "secrets"
        revealed = _revealed(call)
        request = state["request"]
        if info is not None and info.exec is not None and info.exec.command:
            record["request"]["command"] = [self.masker.detectors.mask_text(arg)[0] for arg in info.exec.command]
            request["path"] = self.mask_command_query(request["path"])
        if request.get("content"):
            body, why = self.masked_request_body(request, secrets)
            request["content"] = body
            if why:
                notes["request"] = why
            if len(request["content"]) > limit:
                request["content"] = request["content"][:limit]
                notes["request"] = f"request body cut at {limit} bytes (recording_body_max_bytes)"
        response = state.get("response")
        if response is None:
            return notes
        websocket = state.get("websocket")
        if websocket is not None:
            protocol = _header(response.get("headers"), b"sec-websocket-protocol")
            websocket["messages"] = stored_messages(
                websocket.get("messages") or (), protocol, self.masker.detectors,
                tty=bool(info and info.exec and info.exec.tty), reveal=revealed,
                portforward=info is not None and info.subresource == "portforward")
            if info is not None and info.subresource == "portforward":
                notes["response"] = "port-forward payloads are not recorded"
            return notes
        capture = self.captures.pop(flow, None)
        if capture is not None:
            if note := capture.keep_in(response):
                notes["response"] = note
            return notes
        if not response.get("content"):
            return notes
        why = har.undo_content_encoding(response, "response")
        if why:
            notes["response"] = why
            return notes
        body = response["content"]
        if revealed and info is not None and info.is_resource_request and not call.denied:
            body, why = self.masked_revealed_body(body, _header(response["headers"], b"content-type"), info)
            response["content"] = body
            if why:
                notes["response"] = why
        if len(response["content"]) > limit:
            response["content"] = response["content"][:limit]
            notes["response"] = f"response body cut at {limit} bytes (recording_body_max_bytes)"
        return notes

    def masked_request_body(self, request: dict, secrets: bool) -> tuple[bytes, str]:
        """Request bodies are masked whatever the grant (the masking step masks them on the flow
        only after a response, and never for revealed calls)."""
        body = request["content"]
        encoding = _header(request.get("headers"), b"content-encoding")
        if encoding and encoding.strip().lower() != "identity":
            decoded = har.decode_body(body, encoding)
            if decoded is None:
                return b"", f"request body not recorded: content encoding {encoding!r} could not be undone"
            request["headers"] = har.drop_headers(request["headers"], (b"content-encoding", b"content-length"))
            body = decoded
        content_type = _header(request.get("headers"), b"content-type")
        kind = body_kind(content_type)
        if kind == "json" and body.lstrip()[:1] == b"[":
            return self.masked_json_patch(body, secrets)
        if kind == "json":
            try:
                return self.masker.mask_json(body, secrets).body, ""
            except MaskingError:
                return b"", "request body not recorded: it could not be read for masking"
        if kind == "text" or content_type.partition(";")[0].strip().lower().endswith("yaml"):
            if secrets:
                return b"", f"request body not recorded: a Secret as {content_type!r} cannot be masked"
            masker = LineMasker(self.masker.detectors, max_line=max(len(body), 1))
            return masker.feed(body) + masker.feed(b""), ""
        return b"", f"request body not recorded: {content_type or 'untyped'} content cannot be masked"

    def masked_json_patch(self, body: bytes, secrets: bool) -> tuple[bytes, str]:
        """A JSON patch (`kubectl patch --type=json`): its values have no object around them to say
        what they are, so a value under data, stringData or env, or any value of a Secret's patch,
        is masked whole; the others pass the detectors."""
        try:
            ops = json.loads(body)
            for op in ops:
                if not isinstance(op, dict) or "value" not in op:
                    continue
                path = str(op.get("path", ""))
                if secrets or any(part in path for part in ("/data", "/stringData", "/env", "/binaryData")):
                    op["value"] = MASKED_VALUE
                else:
                    op["value"] = json.loads(self.masker.mask_json(json.dumps(op["value"]).encode()).body)
        except (ValueError, TypeError, MaskingError):
            return b"", "request body not recorded: it could not be read for masking"
        return json.dumps(ops, separators=(",", ":")).encode(), ""

    def masked_revealed_body(self, body: bytes, content_type: str, info) -> tuple[bytes, str]:
        """The caller saw this unmasked (a revealing grant); the recording keeps it masked."""
        kind = body_kind(content_type)
        if kind == "json":
            try:
                return self.masker.mask_json(body, info.resource == "secrets").body, ""
            except MaskingError:
                return b"", "response body not recorded: it could not be read for masking"
        if kind == "text" and info.subresource == "log":
            masker = LineMasker(self.masker.detectors, max_line=max(len(body), 1))
            return masker.feed(body) + masker.feed(b""), ""
        return b"", f"response body not recorded: {kind} content of a call whose grant reveals secrets"

    def mask_command_query(self, target: bytes) -> bytes:
        """`?command=...` values of an exec target, through the masking detectors."""
        masked, n = mask_command_query(target.decode("latin-1"), self.masker.detectors)
        return masked.encode("latin-1") if n else target

addons = [Recording()]
