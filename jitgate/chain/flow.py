"""The mitmproxy side of the shared pieces: what every jitgate addon needs from a flow.

This is the one module in the package that imports mitmproxy; Kubernetes and policy knowledge stay
in the plain modules.
"""

from __future__ import annotations

import itertools
import weakref

from mitmproxy import connection, ctx, exceptions, http, websocket
from mitmproxy.proxy import events, layer, tunnel
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpLayer,
    HttpStream,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
)
from mitmproxy.proxy.layers.websocket import WebSocketMessageInjected
from wsproto.frame_protocol import Opcode

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


# --- the last words of a live session ---------------------------------------------------------
#
# The gateway ends a live stream or WebSocket itself (a grant ended) and first tells the client why,
# in the stream's own protocol: events the flow's HttpStream must handle as if its cluster
# had sent them. mitmproxy's own injection (proxyserver.inject_event) enters the connection's layers
# at the top and lets each HttpLayer pick a stream from the flow's connections; that finds the
# flow only on a reverse listener with HTTP/1.1 to the cluster: inside a regular-mode CONNECT
# tunnel the outer HttpLayer hands the event to the CONNECT stream, whose passthrough turns response
# data into bytes "from the server" for the tunnel's TLS layers (the connection crashes), and with
# HTTP/2 to the cluster the lookup asserts an HTTP/1 connection (stream ids are per connection).
#
# So the gateway delivers its endings on an explicit route instead. It finds the flow's HttpStream
# in the connection's layer tree and sends one `_Delivery` event down the chain of layers from the
# connection's top layer to that stream (walked parent to child: a context's list of layers also
# holds layers that were set aside, e.g. a TLS layer's first NextLayer). Every layer on the way
# passes an injected event it does not know to its child unchanged (TLS and tunnel layers,
# NextLayer, the mode layers, a CONNECT stream in passthrough: `_Delivery` is no HTTP data event,
# so nothing converts it). Only the HttpLayers on the path are taught the route: each one's handler
# is wrapped (that one layer object, as mitmproxy itself swaps `_handle_event` per instance) to pass
# a `_Delivery` to the next stream on its path and, at the flow's own HttpLayer, to hand the stream
# the delivery's events with the stream's own id. Every other event goes to mitmproxy's handler as
# before. A path with any other kind of layer is not used (the session is then only closed).


class _Delivery(events.MessageInjected):
    """Events for one HttpStream, carried down its layer path (`path`, ending at `stream`).
    `detach`: afterwards the stream gets nothing more from its connections (its response is over,
    whatever the cluster still sends)."""

    def __init__(self, flow: http.HTTPFlow, path: tuple, stream: HttpStream, deliver: list[events.Event],
                 detach: bool) -> None:
        self.flow, self.message = flow, None
        self.path, self.stream, self.deliver, self.detach = path, stream, deliver, detach


class _DeliveryRoute:
    """One HttpLayer's event handler, with the route for `_Delivery` events added (see above)."""

    def __init__(self, http_layer: HttpLayer) -> None:
        self.layer, self.handle = http_layer, http_layer._handle_event

    def __call__(self, event: events.Event):
        if isinstance(event, _Delivery):
            return self.route(event)
        return self.handle(event)

    def route(self, event: _Delivery):
        path = event.path
        here = next((i for i, x in enumerate(path) if x is self.layer), None)
        hop = path[here + 1] if here is not None and here + 1 < len(path) else None
        if hop is None or self.layer.streams.get(hop.stream_id) is not hop:
            return  # the stream (or the tunnel it is in) has ended meanwhile: nothing to tell
        if hop is not event.stream:
            yield from self.layer.event_to_child(hop, event)  # a CONNECT stream: on into its tunnel
            return
        if event.detach and hop.server_state != hop.state_stream_response_body:
            return  # the response has ended on its own meanwhile
        for each in event.deliver:
            yield from self.layer.event_to_child(hop, each)
        if event.detach:
            # As DropStream does, early: whatever the cluster still sends for this stream is dropped
            # here while the stream finishes (its response hook, then the end to the client), and
            # the cluster's side is cancelled as a stream does when its client goes away (HTTP/2:
            # RST_STREAM; HTTP/1.1: the connection is closed, so no later request reuses it).
            self.layer.streams.pop(hop.stream_id, None)
            cluster = self.layer.connections.get(hop.context.server)
            if cluster is not None:
                cancel = RequestProtocolError(hop.stream_id, "jitgate ended the session", ErrorCode.CANCEL)
                yield from self.layer.event_to_child(cluster, cancel)


def _children(node: layer.Layer):
    if isinstance(node, HttpLayer):
        yield from node.streams.values()
        return
    if isinstance(node, layer.NextLayer):
        yield node.layer
    yield getattr(node, "child_layer", None)
    # Layers that hand their events on to a child they keep nowhere else (modes.HttpProxy).
    yield getattr(getattr(node, "_handle_event", None), "__self__", None)


def _passes_injected_events(node: layer.Layer) -> bool:
    """Whether a layer on a delivery's path hands an injected event it does not know to its child."""
    if isinstance(node, HttpStream):  # a CONNECT stream: relays what is no HTTP data to its tunnel
        return node._handle_event == node.passthrough and node.child_layer is not None
    return isinstance(node, (layer.NextLayer, tunnel.TunnelLayer, modes.HttpProxy, modes.DestinationKnown))


def _route_to(flow: http.HTTPFlow) -> tuple | None:
    """The layers an event passes from the flow's connection's top layer down to the flow's
    HttpStream, ready for a `_Delivery`; None when the flow is not live or its path has a layer a
    delivery cannot pass."""
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server else None
    top = getattr(handler, "layer", None)
    todo: list[tuple] = [(top,)] if isinstance(top, layer.Layer) else []
    seen: set[int] = set()
    while todo:
        path = todo.pop()
        node = path[-1]
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, HttpStream) and getattr(node, "flow", None) is flow:
            break
        todo.extend((*path, child) for child in _children(node) if isinstance(child, layer.Layer) and child is not node)
    else:
        return None
    for node, below in itertools.pairwise(path):
        if isinstance(node, HttpLayer):
            if node.streams.get(below.stream_id) is not below:
                return None
        elif not _passes_injected_events(node):
            return None
    for node in path:
        if isinstance(node, HttpLayer) and not isinstance(node._handle_event, _DeliveryRoute):
            node._handle_event = _DeliveryRoute(node)
    return path


def _send(flow: http.HTTPFlow, path: tuple, deliver: list[events.Event], detach: bool) -> None:
    server = ctx.master.addons.get("proxyserver")
    server.inject_event(_Delivery(flow, path, path[-1], deliver, detach))


def end_response_stream(flow: http.HTTPFlow, data: bytes) -> bool:
    """Send `data` as the last bytes of a live streamed response and end that response cleanly (the
    client reads a complete body: the last chunk, END_STREAM); from then on the cluster's bytes for
    it are dropped. In either proxy mode, over HTTP/1.1 or HTTP/2 on either side. False when it
    cannot (no live stream, a response that is not streamed, a WebSocket)."""
    response = flow.response
    if response is None or not response.stream or flow.websocket is not None:
        return False
    path = _route_to(flow)
    stream = path[-1] if path else None
    if stream is None or stream.server_state != stream.state_stream_response_body:
        return False
    # Whatever the cluster sends from now on is dropped; only the ending goes out, as it is (the
    # steps that rewrite the stream, e.g. masking, have nothing to do with the gateway's own text).
    # The stream hands every chunk it sends to this function, the ending too.
    response.stream = lambda chunk: data if chunk is data else b""
    _send(flow, path, [ResponseData(stream.stream_id, data), ResponseEndOfMessage(stream.stream_id)], detach=True)
    return True


class _ServerBytes(events.DataReceived):
    """Bytes for a WebSocket flow's layer to read as if its server had sent them. Its connection is
    none of the real ones, so the WebSocket layer reads them as the server's (not the client's)."""

    def __init__(self, data: bytes) -> None:
        self.connection, self.data = connection.Server(address=None), data


def end_websocket(flow: http.HTTPFlow, messages: list[bytes], close_frame: bytes) -> bool:
    """Send binary `messages` to the client of a live WebSocket flow, then close it normally on both
    sides as if the server had sent `close_frame` (mitmproxy relays it to the client and closes
    both connections). In either proxy mode. False when it cannot."""
    if flow.websocket is None or flow.websocket.timestamp_end is not None:
        return False
    path = _route_to(flow)
    if path is None or path[-1].child_layer is None:
        return False
    deliver: list[events.Event] = [WebSocketMessageInjected(flow, websocket.WebSocketMessage(Opcode.BINARY, False, m))
                                   for m in messages]
    deliver.append(_ServerBytes(close_frame))
    _send(flow, path, deliver, detach=False)
    return True
