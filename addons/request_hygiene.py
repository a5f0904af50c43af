"""Request hygiene: only clean, bounded requests go on, and refusals happen before bodies are read.

At `requestheaders` every request head is checked for framing and header syntax as the cluster's
HTTP server will read it (jitgate.kube.http_framing): duplicate or conflicting Content-Length /
Transfer-Encoding, a coding other than chunked, CR/LF/NUL in values, obs-fold continuation lines,
duplicate Host, connection-specific headers in HTTP/2. What is not clean is refused with 400; a
method the Kubernetes API does not serve (or spelt differently: Go's methods are case-sensitive)
with 405. Request trailers are refused (they would reach the cluster after the checks). No request
body is ever streamed past the chain.

Early answers. mitmproxy 12 reads and buffers a request's whole body before it sends a response
that an addon set at `requestheaders` (and a response together with `flow.request.stream` raises;
a stream without a response opens the upstream connection and sends the headers before any check
ran). So this addon teaches mitmproxy's HTTP stream one thing: a response set by `requestheaders`
is sent at once, after the usual `request`/`responseheaders`/`response` hooks, and the rest of
the body is dropped unread. A declared Content-Length above `max_request_body` is answered 413 the
same way once every step has seen the headers (so an unauthenticated caller gets 401 first); a body
growing past it (chunked, HTTP/2 without content-length) is cut off with 413. An unauthenticated
400 MB upload costs no memory.

    mitmdump -s addons/request_hygiene.py
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.utils import human

from jitgate.chain.flow import refuse
from jitgate.kube.http_framing import check_request_head, method_problem

log = logging.getLogger("jitgate.hygiene")

# kube-apiserver's MaxRequestBodyBytes (3 MiB) for most requests.
DEFAULT_MAX_REQUEST_BODY = "3m"


def too_large(limit: int) -> str:
    size = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"
    return f"jitgate: the request body is larger than {size}, the most this gateway accepts"


# --- early answers in mitmproxy's HTTP stream ----------------------------------------------------------
#
# Installed once per process on mitmproxy's HttpStream; the limit lives on the class so every
# (re)loaded copy of this addon sets the one the patched stream reads.

_Stream = http_layers.HttpStream


def _answer_now(self):
    """Send the response a step set, as mitmproxy would after the body, but now, and drop the body."""
    flow = self.flow
    self.request_body_buf.clear()
    if flow.request.data.content is None:
        flow.request.data.content = b""  # what the gateway kept of a body it never read
    flow.request.timestamp_end = time.time()  # (HAR and flow files expect one)
    yield http_layers.HttpRequestHook(flow)  # the chain sees every call at `request` (cluster, audit)
    if (yield from self.check_killed(True)):
        return
    if flow.response is None:
        # A step withdrew the answer: the call was not checked with its body, so it must not go on.
        flow.kill()
        yield from self.check_killed(True)
        return
    flow.response.timestamp_start = time.time()
    yield http_layers.HttpResponseHeadersHook(flow)
    if (yield from self.check_killed(True)):
        return
    self.client_state = self.state_done  # so send_response finishes the flow (drops the stream, ends the response)
    yield from self.send_response()
    # Body data still to come, or queued while the hooks ran, is dropped without a look.
    self.client_state = self.state_errored


def _install() -> bool:
    if getattr(_Stream, "jitgate_early_answers", False):
        return True
    needed = ("state_wait_for_request_headers", "state_consume_request_body", "send_response", "check_killed",
              "state_done", "state_errored")
    if not all(hasattr(_Stream, n) for n in needed) or not hasattr(http_layers, "HttpRequestHook"):
        log.error("this mitmproxy has no HttpStream as jitgate knows it: refusals will read request bodies first")
        return False
    wait_for_headers = _Stream.state_wait_for_request_headers
    consume_body = _Stream.state_consume_request_body

    def state_wait_for_request_headers(self, event):
        yield from wait_for_headers(self, event)
        if event.end_stream or self.client_state != self.state_consume_request_body:
            return  # no body to come, or mitmproxy has taken another path (error, CONNECT, stream)
        if self.flow.response is None:
            # Every step has seen the headers (an unauthenticated caller is answered 401 first).
            limit = _Stream.jitgate_max_request_body
            declared = self.flow.request.headers.get("content-length", "")
            if limit and declared.isdigit() and int(declared) > limit:
                refuse(self.flow, 413, too_large(limit))
        if self.flow.response is not None:
            yield from _answer_now(self)

    def state_consume_request_body(self, event):
        if isinstance(event, http_layers.RequestData) and self.flow.response is None:
            limit = _Stream.jitgate_max_request_body
            if limit and len(self.request_body_buf) + len(event.data) > limit:
                refuse(self.flow, 413, too_large(limit))
                yield from _answer_now(self)
                return
        yield from consume_body(self, event)

    _Stream.state_wait_for_request_headers = state_wait_for_request_headers
    _Stream.state_consume_request_body = state_consume_request_body
    _Stream.jitgate_max_request_body = 0
    _Stream.jitgate_early_answers = True
    return True


EARLY_ANSWERS = _install()


class RequestHygiene:
    def __init__(self) -> None:
        self.limit = human.parse_size(DEFAULT_MAX_REQUEST_BODY)

    def load(self, loader) -> None:
        loader.add_option(
            "max_request_body", str, DEFAULT_MAX_REQUEST_BODY,
            "Largest request body accepted (e.g. 3m, as kube-apiserver; k/m/g suffixes). A larger declared "
            "Content-Length is refused with 413 before the body is read; a chunked or HTTP/2 body is cut off "
            "with 413 when it grows past it.",
        )

    def configure(self, updated: set[str]) -> None:
        if "max_request_body" in updated:
            try:
                limit = human.parse_size(ctx.options.max_request_body)
            except ValueError:
                limit = None
            if not limit or limit < 0:
                raise exceptions.OptionsError(f"max_request_body must be a size such as 3m, not {ctx.options.max_request_body!r}")
            self.limit = limit
            _Stream.jitgate_max_request_body = limit
            if not EARLY_ANSWERS and not ctx.options.body_size_limit:
                # Without early answers, at least bound what mitmproxy buffers (its own 413 page).
                ctx.options.body_size_limit = ctx.options.max_request_body
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # A streamed request goes upstream before the `request` hook, past every check.
            raise exceptions.OptionsError("stream_large_bodies cannot be used with jitgate: request bodies are "
                                          "checked whole; max_request_body bounds them")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if request.stream:
            request.stream = False  # never past the chain, whoever asked for it
        if flow.response:
            return
        code, reason, _ = check_request_head(request.headers.fields, request.http_version)
        if not code:
            code, reason = method_problem(request.data.method) or (0, "")
        if code:
            refuse(flow, code, f"jitgate: {reason}", "RequestHeaderFieldsTooLarge" if code == 431 else None)
        # A declared length above max_request_body is refused by the stream once every step has seen
        # the headers, so an unauthenticated caller learns nothing but 401.

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        if flow.request.trailers:
            # Trailers would be sent after the body, and so after every check of the headers.
            refuse(flow, 400, "jitgate: request trailers are not accepted")
        elif len(flow.request.raw_content or b"") > self.limit:
            refuse(flow, 413, too_large(self.limit))  # when the stream could not cut it off earlier


addons = [RequestHygiene()]
