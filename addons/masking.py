"""Masking: no secret value leaves the gateway unless the call's grant reveals it.

Runs right before audit, so nothing is recorded, audited or logged before it masked the response.
Only resource calls the cluster answers are masked (discovery and the gateway's own API are not).

- request: `Accept` asks for JSON instead of protobuf (`as=Table` kept), `Accept-Encoding: identity`.
- responseheaders: streamed responses (watches, followed logs; the streaming step marked them) get
  an incremental masker as `flow.response.stream`; exec/attach sessions a frame masker.
- response: buffered JSON bodies (objects, lists, Tables) and logs are masked whole; a body masking
  applies to but cannot read is replaced by a 502 Status.
- websocket_message: stdout/stderr frames of exec/attach are masked line by line; a partial line
  is held back at most `masking.partial_line_timeout` seconds, then released masked.

`X-Jitgate-Masked: N` tells the client how many values were masked (buffered responses; `stream` on
watches, followed logs and exec/attach, whose count is known only at their end); the audit event
carries `jitgate.dev/masked` (streams: counted to their end) or `jitgate.dev/revealed`.

    mitmdump -s addons/masking.py --set policy=policies/demo.yaml
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
import zlib

from mitmproxy import ctx, http

from jitgate.chain.flow import call_of, current_policy, declare_policy_option
from jitgate.kube.status import status, status_body
from jitgate.masking.negotiation import body_kind, json_accept
from jitgate.masking.objects import Masker, MaskingError
from jitgate.masking.streams import ExecMasker, LineMasker, WatchMasker
from jitgate.policy.masking import MaskingPolicy

log = logging.getLogger("jitgate.masking")

MASKED_HEADER = "X-Jitgate-Masked"
UNREADABLE = "jitgate: the cluster's response could not be read for masking ({why}), so it is withheld"


def _revealed(call) -> bool:
    return call.grant is not None and call.grant.scope.reveal


_MASKED_FIELD = MASKED_HEADER.encode()
_MASKED_FIELD_LOWER = _MASKED_FIELD.lower()


def _native(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # as mitmproxy's Headers read a value


def _ask_for_json(headers: http.Headers) -> None:
    """`Accept` turned JSON (protobuf alternatives), `Accept-Encoding: identity`: in one pass over
    the fields (each mitmproxy Headers lookup or assignment rescans all of them)."""
    fields = []
    for name, value in headers.fields:
        lowered = name.lower()
        if lowered == b"accept-encoding":
            continue
        if lowered == b"accept" and value:
            accept = _native(value)
            rewritten = json_accept(accept)
            if rewritten != accept:
                value = rewritten.encode("utf-8", "surrogateescape")
        fields.append((name, value))
    fields.append((b"Accept-Encoding", b"identity"))
    headers.fields = tuple(fields)


def _response_headers(headers: http.Headers) -> tuple[str, str, bool]:
    """(Content-Type, Content-Encoding unless identity, whether X-Jitgate-Masked is there): one pass."""
    content_type = encoding = ""
    marked = False
    for name, value in headers.fields:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = content_type or _native(value)
        elif lowered == b"content-encoding":
            encoding = _native(value).strip()
        elif lowered == _MASKED_FIELD_LOWER:
            marked = True
    return content_type, "" if encoding.lower() in ("", "identity") else encoding, marked


def _mark_streamed(headers: http.Headers) -> None:
    """A stream's count is known only at its end, after its headers went out: the header says the
    stream is masked (`stream`), and the audit event's `jitgate.dev/masked` has the count."""
    headers.fields = tuple(f for f in headers.fields if f[0].lower() != _MASKED_FIELD_LOWER) + ((_MASKED_FIELD, b"stream"),)


class _Decoder:
    """Content-Encoding undone chunk by chunk (gzip, deflate; br when brotli is installed)."""

    def __init__(self, encoding: str) -> None:
        if encoding == "br":
            import brotli  # mitmproxy depends on it
            self.obj = brotli.Decompressor()
            self.step = self.obj.process
        else:
            self.obj = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS)
            self.step = self.obj.decompress

    def __call__(self, chunk: bytes) -> bytes:
        return self.step(chunk) if chunk else b""


class Masking:
    def __init__(self) -> None:
        self.policy = MaskingPolicy()
        self.masker = Masker(self.policy.detectors())
        self.sessions: weakref.WeakKeyDictionary[http.HTTPFlow, ExecMasker] = weakref.WeakKeyDictionary()
        self.timers: dict[tuple[str, int], asyncio.TimerHandle] = {}

    def load(self, loader) -> None:
        declare_policy_option(loader)

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated and ctx.options.policy:
            self.policy = current_policy().masking
            self.masker = Masker(self.policy.detectors())

    def applies(self, flow: http.HTTPFlow):
        """The call when masking applies to its response, else None."""
        call = call_of(flow)
        info = call.info
        if info is None or not info.is_resource_request or call.denied or info.subresource == "portforward":
            return None
        return call

    # -- request --------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or (call := self.applies(flow)) is None or _revealed(call):
            return
        _ask_for_json(flow.request.headers)

    # -- responses ------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or (call := self.applies(flow)) is None:
            return
        if _revealed(call):
            call.annotations["jitgate.dev/revealed"] = "true"
            return
        response = flow.response
        info = call.info
        if response.status_code == 101:
            if info.subresource in ("exec", "attach"):
                self.sessions[flow] = ExecMasker(self.masker.detectors, response.headers.get("Sec-WebSocket-Protocol", ""))
                _mark_streamed(response.headers)
            return
        if not response.stream:
            return  # buffered: masked whole at `response`
        kind = body_kind(response.headers.get("Content-Type", ""))
        if info.subresource == "log" and kind in ("text", "empty"):
            masker = LineMasker(self.masker.detectors)
        elif kind == "json":
            masker = WatchMasker(self.masker, info.resource == "secrets")
        else:
            self.refuse_stream(flow, call, f"{kind} content type {response.headers.get('Content-Type', '')!r}")
            return
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        decode = None
        if encoding and encoding != "identity":
            try:
                decode = _Decoder(encoding)
            except (ImportError, ValueError):
                self.refuse_stream(flow, call, f"content encoding {encoding!r}")
                return
            del response.headers["Content-Encoding"]
        response.headers.pop("Content-Length", None)
        _mark_streamed(response.headers)
        annotations = call.annotations

        def stream(chunk: bytes) -> bytes:
            try:
                data = decode(chunk) if decode else chunk
                out = masker.feed(data) if data or not chunk else b""
                if not chunk and data:
                    out += masker.feed(b"")
            except Exception as e:  # noqa: BLE001 - whatever broke, nothing unmasked passes
                log.warning("masking stopped a stream it could not read (auditID %s): %s", call.audit_id, type(e).__name__)
                masker.feed = lambda _chunk: b""
                return b""
            if masker.masked:
                annotations["jitgate.dev/masked"] = str(masker.masked)
            return out

        response.stream = stream

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        call = call_of(flow)
        info = call.info
        if info is None or not info.is_resource_request:
            return
        revealed = _revealed(call)
        if not revealed:
            self.mask_request_record(flow, call)  # denied calls too: their body is in the recording
        if response.stream or flow.websocket is not None or response.status_code == 101:
            return
        if revealed or call.denied or info.subresource == "portforward":  # what `applies` says, inlined
            return
        if not response.raw_content:
            return
        content_type, encoding, marked = _response_headers(response.headers)
        kind = body_kind(content_type)
        if encoding:
            try:
                response.decode(strict=True)
            except ValueError:
                self.refuse(flow, call, f"content encoding {encoding!r}")
                return
        body = response.raw_content
        if kind == "json":
            try:
                result = self.masker.mask_json(body, info.resource == "secrets")
            except MaskingError as e:
                self.refuse(flow, call, str(e))
                return
            masked, new = result.masked, result.body
        elif kind == "text" and info.subresource == "log":
            lines = LineMasker(self.masker.detectors, max_line=max(len(body), 1))
            new = lines.feed(body) + lines.feed(b"")
            masked = lines.masked
        else:
            self.refuse(flow, call, f"{kind} content type {content_type!r}")
            return
        if masked:
            response.content = new
            call.annotations["jitgate.dev/masked"] = str(masked)
        count = (_MASKED_FIELD, str(masked).encode())
        if marked:  # the cluster's own header of that name must not pass as ours
            response.headers.fields = tuple(f for f in response.headers.fields if f[0].lower() != _MASKED_FIELD_LOWER) + (count,)
        else:
            response.headers.fields += (count,)

    def mask_request_record(self, flow: http.HTTPFlow, call) -> None:
        """The request went out as the client sent it (`kubectl apply` of a Secret works); what
        stays on the flow, for recordings, is masked."""
        request = flow.request
        if not request.raw_content or request.stream or body_kind(request.headers.get("Content-Type", "")) != "json":
            return
        try:
            result = self.masker.mask_json(request.get_content(strict=False) or b"", call.info.resource == "secrets")
        except (MaskingError, ValueError):
            request.content = b""
            return
        if result.masked:
            request.content = result.body

    def refuse(self, flow: http.HTTPFlow, call, why: str) -> None:
        message = UNREADABLE.format(why=why)
        call.deny(message)
        call.annotations["jitgate.dev/masking"] = "withheld"
        flow.response = http.Response.make(502, status_body(502, message), {"Content-Type": "application/json"})

    def refuse_stream(self, flow: http.HTTPFlow, call, why: str) -> None:
        """Headers not sent yet: the stream becomes a 502 Status; the cluster's bytes are dropped."""
        message = UNREADABLE.format(why=why)
        call.deny(message)
        call.annotations["jitgate.dev/masking"] = "withheld"
        body = json.dumps(status(502, message)).encode()
        response = flow.response
        response.status_code = 502
        response.headers.clear()
        response.headers["Content-Type"] = "application/json"
        response.headers["Content-Length"] = str(len(body))
        sent = [False]

        def stream(chunk: bytes) -> bytes:
            if sent[0]:
                return b""
            sent[0] = True
            return body

        response.stream = stream

    # -- exec / attach --------------------------------------------------------------------------

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        session = self.sessions.get(flow)
        if session is None:
            return
        message = flow.websocket.messages[-1]
        if message.from_client or message.injected:
            return  # input, or our own release of a held line (already masked)
        channel, payload = session.frame(message.content)
        if payload is None:
            # A status or close frame: output still held back goes first, then this frame.
            held = [(c, out) for c, out in session.finish()]
            if held:
                content = message.content
                message.drop()
                for c, out in held:
                    ctx.master.commands.call("inject.websocket", flow, True, session.encode(c, out), message.is_text)
                ctx.master.commands.call("inject.websocket", flow, True, content, message.is_text)
            return
        if payload:
            message.content = session.encode(channel, payload)
        else:
            message.content = session.encode(channel, b"")
            message.drop()
        if session.masked:
            call_of(flow).annotations["jitgate.dev/masked"] = str(session.masked)
        if session.channels[channel].holding:
            self.schedule_flush(flow, session, channel, message.is_text)

    def schedule_flush(self, flow: http.HTTPFlow, session: ExecMasker, channel: int, is_text: bool) -> None:
        key = (flow.id, channel)
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.timers[key] = loop.call_later(self.policy.partial_line_timeout, self.flush, flow, session, channel, is_text)

    def flush(self, flow: http.HTTPFlow, session: ExecMasker, channel: int, is_text: bool) -> None:
        self.timers.pop((flow.id, channel), None)
        out = session.flush(channel)
        if out and flow.websocket is not None and flow.websocket.timestamp_end is None:
            ctx.master.commands.call("inject.websocket", flow, True, session.encode(channel, out), is_text)
            if session.masked:
                call_of(flow).annotations["jitgate.dev/masked"] = str(session.masked)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        session = self.sessions.pop(flow, None)
        if session is None:
            return
        for channel in session.channels:
            timer = self.timers.pop((flow.id, channel), None)
            if timer is not None:
                timer.cancel()
        session.finish()  # the session is over: a held partial line is dropped, never sent unmasked
        if session.masked:
            call_of(flow).annotations["jitgate.dev/masked"] = str(session.masked)


addons = [Masking()]
