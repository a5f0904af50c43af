"""Streaming: watches, log follows and exec sessions flow through as the cluster sends them.

Without this, mitmproxy buffers a whole response body and `kubectl get -w` shows nothing until the
watch ends. Which calls are long-running comes from the request attributes alone
(`RequestInfo.long_running`: watch, followed logs, exec/attach/port-forward, proxy, any upgrade);
they are marked so audit records their start and their end and grants ends them with their grant.

Upgrades: the gateway inspects WebSocket sessions only (mitmproxy reads their frames, and ends
them). Any other upgrade (SPDY/3.1, which kubectl falls back to; a protocol switch through
`pods/proxy`; a WebSocket handshake mitmproxy would not recognise) would become a raw TCP relay
past every check, so it is refused before it is forwarded, with a Status that says so. A 101
answer that did not become a WebSocket ends the connection.

kubectl retries a refused WebSocket exec over SPDY at once and prints only the second answer, so
that retry is refused with the first refusal's reason (no grant, the cluster's own refusal...).

    mitmdump -s addons/streaming.py
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict

from mitmproxy import ctx, http

from jitgate.chain.flow import call_of, close_client_connection, refuse
from jitgate.kube.request_info import upgrade_refusal
from jitgate.kube.status import status_body

log = logging.getLogger("jitgate.streaming")

# mitmproxy's default idle timeout (600 s) would cut quiet watches; kube's own watches last up to
# ~30 minutes (min-request-timeout 1800 s), so idle connections may live a little longer than that.
LONG_RUNNING_IDLE_TIMEOUT = 2 * 3600

UPGRADE_REFUSED = "jitgate: only WebSocket upgrades are inspected; {what} was refused; kubectl uses WebSocket by default"
NOT_A_WEBSOCKET = "jitgate: the cluster switched protocols without a WebSocket the gateway can inspect; the connection was ended"


class RefusedHandshakes:
    """Recent refusals of WebSocket handshakes, for the SPDY retry that follows each one."""

    TTL = 10.0  # kubectl retries within milliseconds
    LIMIT = 256

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, tuple[float, int, str]] = OrderedDict()

    def remember(self, key: tuple, code: int, message: str, audit_id: str = "") -> None:
        self.entries[key] = (time.monotonic() + self.TTL, code, message, audit_id)
        self.entries.move_to_end(key)
        while len(self.entries) > self.LIMIT:
            self.entries.popitem(last=False)

    def take(self, key: tuple) -> tuple[int, str, str] | None:
        """(code, message, audit ID) of the refused handshake this retry repeats, if recent."""
        entry = self.entries.pop(key, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1], entry[2], entry[3]


def handshake_key(flow: http.HTTPFlow) -> tuple | None:
    call = call_of(flow)
    if call.identity is None or call.cluster is None:
        return None
    return call.identity.username, call.cluster.name, flow.request.path


def status_message(response: http.Response) -> str:
    """The message of a metav1.Status body, or a plain description of the answer."""
    try:
        body = json.loads(response.content or b"")
        if isinstance(body, dict) and body.get("kind") == "Status" and isinstance(body.get("message"), str):
            return body["message"]
    except ValueError:
        pass
    return f"the cluster refused the WebSocket handshake ({response.status_code})"


class Streaming:
    def __init__(self) -> None:
        self.refused = RefusedHandshakes()

    def load(self, loader) -> None:
        loader.add_option(
            "watch_idle_timeout", int, LONG_RUNNING_IDLE_TIMEOUT,
            "Seconds a quiet connection (an idle watch) may stay open; raises mitmproxy's tcp_timeout to this.",
        )

    def configure(self, updated: set[str]) -> None:
        if "watch_idle_timeout" in updated or "tcp_timeout" in updated:
            if ctx.options.tcp_timeout < ctx.options.watch_idle_timeout:
                ctx.options.tcp_timeout = ctx.options.watch_idle_timeout

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A step chose to stream this request's body: it goes upstream right after this hook,
        # before `request` runs, so an upgrade is checked here then.
        if flow.request.stream and not flow.response:
            self.request(flow)
            if flow.response:
                flow.request.stream = False  # mitmproxy cannot stream a request it also answers

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        request = flow.request
        what = upgrade_refusal(request.method, request.http_version, request.headers.fields)
        if what is None:
            return
        key = handshake_key(flow)
        earlier = self.refused.take(key) if key else None
        call = call_of(flow)
        if earlier is not None:
            code, message, first = earlier
            # kubectl's automatic SPDY retry of that refused command: audited (it is a call), and
            # marked as the same refusal, so a reader (and `jitgate audit`) counts one refused exec.
            call.annotations["jitgate.dev/retry-of"] = first
        else:
            code, message = 400, UPGRADE_REFUSED.format(what=what)
        call.annotations["jitgate.dev/upgrade-refused"] = what
        refuse(flow, code, message)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        info = call.info
        if info is None or not info.long_running or call.denied or flow.response is None:
            return
        if info.upgrade and flow.response.status_code != 101:
            return  # a refused handshake: a plain answer, read whole (see `response`)
        call.long_running = True
        if not flow.response.stream:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response.status_code == 101:
            if flow.websocket is None:
                self.end_upgrade(flow)
            return
        call = call_of(flow)
        info = call.info
        if (info is not None and info.upgrade == "websocket" and not response.stream
                and "jitgate.dev/upgrade-refused" not in call.annotations):
            key = handshake_key(flow)
            if key is not None:
                self.refused.remember(key, response.status_code, call.reason if call.denied else status_message(response),
                                      call.audit_id)

    def end_upgrade(self, flow: http.HTTPFlow) -> None:
        """mitmproxy relays a 101 it does not read as a WebSocket as raw TCP: never let it start."""
        call = call_of(flow)
        call.deny(NOT_A_WEBSOCKET)
        call.annotations["jitgate.dev/terminated"] = "protocol switch without a WebSocket"
        flow.response = http.Response.make(502, status_body(502, NOT_A_WEBSOCKET), {"Content-Type": "application/json"})
        if flow.killable:
            flow.kill()
        log.warning("ended a connection whose 101 answer was no WebSocket (%s %s)", flow.request.method,
                    call.info.resource_path if call.info else "non-resource path")
        close_client_connection(flow, "protocol switch without a WebSocket")


addons = [Streaming()]
