"""The mitmproxy side of the shared pieces: what every jitgate addon needs from a flow.

This is the one module in the package that imports mitmproxy; Kubernetes and policy knowledge stay
in the plain modules.
"""

from __future__ import annotations

import weakref

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import events, mode_specs
from mitmproxy.proxy.layers.http import ResponseData, ResponseEndOfMessage

from jitgate.chain.call import Call
from jitgate.kube.status import status_body
from jitgate.policy.document import PolicyError
from jitgate.policy.loader import Policy, load_policy_cached

METADATA_KEY = "jitgate"

POLICY_HELP = (
    "Policy file or folder of *.yaml files (clusters, identity providers, access rules). "
    "The gateway refuses to start on a policy error, naming file, line and field."
)


# The live Call of each flow, beside it and never on it: flow.metadata is serialised by `-w`, by
# mitmweb and by flow copies, and must only hold plain values (see `publish`).
_calls: weakref.WeakKeyDictionary[http.HTTPFlow, Call] = weakref.WeakKeyDictionary()


def call_of(flow: http.HTTPFlow) -> Call:
    call = _calls.get(flow)
    if call is None:
        call = _calls[flow] = Call()
    return call


def publish(flow: http.HTTPFlow) -> None:
    """Put the call's plain record on the flow, where `-w`, mitmweb and the HAR exporter see it."""
    call = _calls.get(flow)
    if call is not None:
        flow.metadata[METADATA_KEY] = call.record()


def refuse(flow: http.HTTPFlow, code: int, message: str, reason: str | None = None) -> None:
    """Answer the client with a metav1.Status and record the denial for the steps after this one."""
    call_of(flow).deny(message)
    publish(flow)
    flow.response = http.Response.make(
        code,
        status_body(code, message, reason),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def declare_policy_option(loader) -> None:
    """Every addon that reads the policy declares the same option, so each can be loaded alone."""
    loader.add_option("policy", str, "", POLICY_HELP)


def current_policy() -> Policy:
    """The parsed policy (one parse shared by all addons); OptionsError when it is wrong."""
    if not ctx.options.policy:
        raise exceptions.OptionsError("jitgate needs a policy: --set policy=<file-or-folder>")
    try:
        return load_policy_cached(ctx.options.policy)
    except PolicyError as e:
        raise exceptions.OptionsError(f"policy error: {e}") from None


def close_client_connection(flow: http.HTTPFlow, reason: str) -> bool:
    """End a live client connection now, even mid-stream (a quiet watch, an idle exec session).

    `flow.kill()` only takes effect at the flow's next event (mitmproxy#4711), which may never come
    on a quiet stream; this cancels the connection's handler the way mitmproxy's idle timeout does.
    """
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server else None
    transport = handler.transports.get(handler.client) if handler else None
    if transport is None or transport.handler is None:
        return False
    transport.handler.cancel(reason)
    return True


class _InjectedResponseData(events.MessageInjected, ResponseData):
    """Response body bytes the gateway adds to a streamed response: mitmproxy routes injected
    events to the flow's own HTTP stream, which then handles them as data from the cluster."""

    def __init__(self, flow: http.HTTPFlow, data: bytes) -> None:
        self.flow, self.message, self.stream_id, self.data = flow, data, 0, data


class _InjectedResponseEnd(events.MessageInjected, ResponseEndOfMessage):
    def __init__(self, flow: http.HTTPFlow) -> None:
        self.flow, self.message, self.stream_id = flow, None, 0


def _injectable(flow: http.HTTPFlow, server) -> bool:
    """Whether an injected event reaches this flow's own stream. Only on a reverse-mode listener:
    inside a regular-mode CONNECT tunnel mitmproxy 12.2 hands the event to the tunnel's layers,
    which break on it (the connection crashes), so such sessions are only closed."""
    return (server is not None and flow.client_conn.id in server.connections
            and isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode))


def end_response_stream(flow: http.HTTPFlow, data: bytes) -> bool:
    """Send `data` as the last bytes of a streamed response and end that response cleanly (the
    client reads a complete body); the cluster's further bytes are dropped. False when it cannot
    (no live connection, or an HTTP/2 cluster connection, where mitmproxy cannot find the stream)."""
    server = ctx.master.addons.get("proxyserver")
    response = flow.response
    if (not _injectable(flow, server) or response is None or not response.stream or flow.websocket is not None
            or flow.server_conn.alpn == b"h2"):
        return False
    # Whatever the cluster sends from now on is dropped; only the ending goes out, as it is (the
    # steps that rewrite the stream, e.g. masking, have nothing to do with the gateway's own text).
    response.stream = lambda chunk: data if chunk is data else b""
    server.inject_event(_InjectedResponseData(flow, data))
    server.inject_event(_InjectedResponseEnd(flow))
    return True


class _InjectedServerBytes(events.MessageInjected, events.DataReceived):
    """Bytes for a WebSocket flow's layer to read as if its server had sent them. Routed to the
    flow's stream as an injected event; its connection is none of the real ones, so no TLS layer
    on the way takes the bytes for its own, and the WebSocket layer reads them as the server's."""

    def __init__(self, flow: http.HTTPFlow, data: bytes) -> None:
        self.flow, self.message, self.data = flow, None, data
        self.connection = connection.Server(address=None)


def close_websocket(flow: http.HTTPFlow, close_frame: bytes) -> bool:
    """Close a live WebSocket flow normally on both sides, as if the server had sent `close_frame`
    (mitmproxy relays it to the client and closes both connections)."""
    server = ctx.master.addons.get("proxyserver")
    if not _injectable(flow, server) or flow.websocket is None:
        return False
    server.inject_event(_InjectedServerBytes(flow, close_frame))
    return True


def send_websocket_to_client(flow: http.HTTPFlow, payload: bytes) -> bool:
    """Send one binary WebSocket message to the client of a live WebSocket flow."""
    server = ctx.master.addons.get("proxyserver")
    if not _injectable(flow, server) or flow.websocket is None:
        return False
    ctx.master.commands.call("inject.websocket", flow, True, payload, False)
    return True
