"""The chain dispatcher (addons/gateway.py) fails closed: a step that raises in any hook refuses the
call or the connection, never lets mitmproxy go on with defaults, and never skips the audit.

Driven with mitmproxy's own test harness (taddons/tflow) and the real audit step; a stand-in for
mitmproxy's proxyserver addon shows which connections the dispatcher closes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mitmproxy import connection, flow, options, tls
from mitmproxy.proxy import context, layer, server_hooks
from mitmproxy.test import taddons, tflow, tutils
from OpenSSL import SSL

from jitgate.chain.flow import call_of
from testkit.gateway import REPO

_spec = importlib.util.spec_from_file_location("jitgate_gateway_under_test", REPO / "addons/gateway.py")
gateway = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gateway)
audit_module = gateway._load("audit")

HTTP_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error", "websocket_end")


# --- a stand-in for mitmproxy's proxyserver: its live connections, their writers and handlers -----


class FakeWriter:
    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class FakeTask:
    def __init__(self) -> None:
        self.cancelled: str | None = None

    def cancel(self, msg: str | None = None) -> None:
        self.cancelled = msg or "cancelled"


@dataclass
class FakeIO:
    handler: FakeTask = field(default_factory=FakeTask)
    writer: FakeWriter = field(default_factory=FakeWriter)


class FakeHandler:
    def __init__(self, client: connection.Client, server: connection.Server) -> None:
        self.client = client
        self.transports = {client: FakeIO(), server: FakeIO()}

    @property
    def dropped(self) -> bool:
        return all(io.writer.closed for io in self.transports.values()) and self.transports[self.client].handler.cancelled


class Proxyserver:
    """Registered under the name "proxyserver", as mitmproxy's own is."""

    def __init__(self) -> None:
        self.connections: dict[str, FakeHandler] = {}

    def live(self, client: connection.Client, server: connection.Server) -> FakeHandler:
        handler = self.connections[client.id] = FakeHandler(client, server)
        return handler


# --- steps --------------------------------------------------------------------------------------------


class Boom:
    """A step that raises in the given hook (sync or async)."""

    def __init__(self, hook: str, asynchronous: bool = False) -> None:
        async def fail_async(*args):
            await asyncio.sleep(0)
            raise RuntimeError("injected failure")

        def fail(*args):
            raise RuntimeError("injected failure")

        setattr(self, hook, fail_async if asynchronous else fail)


class Later:
    """A step after the failing one: it must not see the event the failure was in."""

    def __init__(self, *hooks: str) -> None:
        self.seen: list[str] = []
        for hook in hooks:
            setattr(self, hook, lambda *args, hook=hook: self.seen.append(hook))


def run(gw, hook: str, *args) -> None:
    handler = getattr(gw, hook, None)
    if handler is None:
        return
    result = handler(*args)
    if asyncio.iscoroutine(result):
        asyncio.run(result)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def harness(tmp_path: Path):
    """(make, audit path, proxyserver): make(step, *more) builds a Gateway of those steps plus the audit."""
    path = tmp_path / "audit.log"
    server = Proxyserver()
    contexts = []

    def make(*steps):
        gw = gateway.Gateway([*steps, audit_module.Audit()])
        tctx = taddons.context(gw)
        contexts.append(tctx)
        tctx.__enter__()
        tctx.master.addons.add(server)
        tctx.configure(gw, audit_log=str(path))
        return gw

    yield make, path, server
    for tctx in contexts:
        tctx.__exit__(None, None, None)


def forwarded_flow(server: Proxyserver) -> flow.Flow:
    f = tflow.tflow()
    server.live(f.client_conn, f.server_conn)
    return f


# --- HTTP hooks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("hook", ["requestheaders", "request"])
def test_failure_before_forwarding_refuses_and_is_audited(harness, hook: str, asynchronous: bool) -> None:
    make, path, server = harness
    later = Later(*HTTP_HOOKS)
    gw = make(Boom(hook, asynchronous), later)
    f = forwarded_flow(server)
    run(gw, "requestheaders", f)
    run(gw, "request", f)
    assert f.response is not None and f.response.status_code == 500, "refused, not forwarded"
    status = json.loads(f.response.content)
    assert status["kind"] == "Status" and "internal error" in status["message"]
    assert call_of(f).audit_id in status["message"], "the caller can quote the audit ID"
    assert hook not in later.seen, "no step after the failing one saw the event"
    # mitmproxy answers it: responseheaders and response follow, and the audit records the refusal.
    run(gw, "responseheaders", f)
    run(gw, "response", f)
    events = lines(path)
    assert [e["stage"] for e in events] == ["ResponseComplete"], "nothing was forwarded: no RequestReceived"
    event = events[0]
    assert event["responseStatus"]["code"] == 500
    assert event["annotations"]["jitgate.dev/decision"] == "deny"
    assert event["annotations"]["jitgate.dev/failed-step"] == f"Boom in {hook}"


def test_failure_with_a_streamed_request_body_still_refuses(harness) -> None:
    """mitmproxy cannot answer a request whose body it streams: the refusal turns streaming off."""
    make, _, server = harness

    class Streams:
        def requestheaders(self, f):
            f.request.stream = True

    gw = make(Streams(), Boom("requestheaders"))
    f = forwarded_flow(server)
    run(gw, "requestheaders", f)
    assert f.response.status_code == 500 and not f.request.stream


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_failure_at_responseheaders_withholds_a_buffered_response(harness, asynchronous: bool) -> None:
    make, path, server = harness
    later = Later("responseheaders")
    gw = make(Boom("responseheaders", asynchronous), later)
    f = forwarded_flow(server)
    run(gw, "requestheaders", f)
    run(gw, "request", f)
    assert f.response is None, "a clean call is forwarded"
    f.response = tutils.tresp(content=b'{"kind":"Secret","data":{"k":"c2VjcmV0"}}')
    run(gw, "responseheaders", f)
    assert later.seen == []
    run(gw, "response", f)
    assert f.response.status_code == 500 and b"c2VjcmV0" not in f.response.content
    assert b"withheld" in f.response.content
    stages = [(e["stage"], e.get("responseStatus", {}).get("code")) for e in lines(path)]
    assert stages == [("RequestReceived", None), ("ResponseComplete", 500)]


def test_failure_at_responseheaders_kills_a_streamed_response(harness) -> None:
    make, path, server = harness

    class Streams:
        def responseheaders(self, f):
            f.response.stream = True

    gw = make(Streams(), Boom("responseheaders"))
    f = forwarded_flow(server)
    run(gw, "request", f)
    f.response = tutils.tresp()
    run(gw, "responseheaders", f)
    assert f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE and not f.live
    # mitmproxy then fires `error` on the killed (no longer live) flow: it still reaches the audit.
    run(gw, "error", f)
    assert [e["stage"] for e in lines(path)] == ["RequestReceived", "ResponseComplete"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_failure_at_response_withholds_it_and_is_audited(harness, asynchronous: bool) -> None:
    make, path, server = harness
    later = Later("response")
    gw = make(Boom("response", asynchronous), later)
    f = forwarded_flow(server)
    run(gw, "request", f)
    f.response = tutils.tresp(content=b"cluster data")
    run(gw, "responseheaders", f)
    run(gw, "response", f)
    assert f.response.status_code == 500 and b"cluster data" not in f.response.content
    assert later.seen == []
    events = lines(path)
    assert [(e["stage"], e.get("responseStatus", {}).get("code")) for e in events] == [
        ("RequestReceived", None), ("ResponseComplete", 500)]
    # Forwarded, so it stays "allow"-free of a deny: the cluster did receive it; the failure is annotated.
    assert events[1]["annotations"]["jitgate.dev/failed-step"] == "Boom in response"


@pytest.mark.parametrize("hook", ["error", "websocket_end"])
def test_failure_at_the_end_of_a_flow_does_not_skip_the_audit(harness, hook: str) -> None:
    make, path, server = harness
    gw = make(Boom(hook))
    f = tflow.twebsocketflow() if hook == "websocket_end" else tflow.tflow(err=True)
    server.live(f.client_conn, f.server_conn)
    run(gw, hook, f)
    events = lines(path)
    assert len(events) == 1 and events[0]["stage"] == "ResponseComplete"


def test_failure_in_a_websocket_message_drops_it_and_the_connection(harness) -> None:
    make, _, server = harness
    gw = make(Boom("websocket_message"))
    f = tflow.twebsocketflow()
    handler = server.live(f.client_conn, f.server_conn)
    run(gw, "websocket_message", f)
    assert f.websocket.messages[-1].dropped
    assert handler.dropped


def test_flows_read_back_are_not_dispatched(harness) -> None:
    """`mitmdump -r`: a flow from a file passes no step (its connection is no live one)."""
    make, path, _ = harness
    later = Later("request", "response")
    gw = make(later)
    f = tflow.tflow(resp=True)
    f.live = False
    run(gw, "request", f)
    run(gw, "response", f)
    assert later.seen == [] and lines(path) == []


# --- connection and TLS hooks -------------------------------------------------------------------------


def test_failure_in_server_connect_refuses_the_connection(harness) -> None:
    make, path, server = harness
    later = Later("server_connect")
    gw = make(Boom("server_connect"), later)
    f = forwarded_flow(server)
    data = server_hooks.ServerConnectionHookData(server=f.server_conn, client=f.client_conn)
    run(gw, "server_connect", data)
    assert f.server_conn.error, "mitmproxy does not connect when server.error is set"
    assert later.seen == []
    # The call then fails with a connection error, and is audited.
    run(gw, "request", f)  # (as it was, before the connection was asked for)
    f.error = flow.Error("Connection killed: " + f.server_conn.error)
    run(gw, "error", f)
    assert [e["stage"] for e in lines(path)] == ["RequestReceived", "ResponseComplete"]
    assert lines(path)[-1]["responseStatus"]["code"] == 502


def test_failure_in_server_connected_drops_the_connection(harness) -> None:
    make, _, server = harness
    gw = make(Boom("server_connected"))
    f = forwarded_flow(server)
    handler = server.connections[f.client_conn.id]
    run(gw, "server_connected", server_hooks.ServerConnectionHookData(server=f.server_conn, client=f.client_conn))
    assert handler.dropped, "no byte goes out on a connection a step failed on"


def proxy_context(f: flow.Flow) -> context.Context:
    ctx = context.Context(f.client_conn, options.Options())
    ctx.server = f.server_conn
    return ctx


def tls_data(f: flow.Flow, conn: connection.Connection) -> tls.TlsData:
    return tls.TlsData(conn, proxy_context(f))


@pytest.mark.parametrize("hook", ["tls_start_server", "tls_start_client"])
def test_failure_in_tls_start_makes_the_handshake_fail(harness, hook: str) -> None:
    make, _, server = harness
    gw = make(Boom(hook))
    f = forwarded_flow(server)
    handler = server.connections[f.client_conn.id]
    data = tls_data(f, f.server_conn if hook == "tls_start_server" else f.client_conn)
    run(gw, hook, data)
    # Set, so mitmproxy's TlsConfig (which only fills in an unset one) adds no default context...
    assert data.ssl_conn is not None
    # ...and one that cannot complete a handshake, whichever side it is used on.
    if hook == "tls_start_server":
        data.ssl_conn.set_connect_state()
    else:
        data.ssl_conn.set_accept_state()
    with pytest.raises(SSL.Error, match="no protocols available"):
        data.ssl_conn.do_handshake()
    assert handler.dropped


def test_failure_in_client_connected_refuses_the_client(harness) -> None:
    make, _, _ = harness
    gw = make(Boom("client_connected"))
    client = tflow.tclient_conn()
    run(gw, "client_connected", client)
    assert client.error, "mitmproxy closes a client connection whose error is set"


def test_failure_in_next_layer_closes_instead_of_guessing(harness) -> None:
    """Left unset, mitmproxy's next_layer would pick a layer (raw TCP, among others): the refusal
    sets a layer that only closes the connection."""
    make, _, server = harness
    gw = make(Boom("next_layer"))
    f = forwarded_flow(server)
    nl = layer.NextLayer(proxy_context(f))
    run(gw, "next_layer", nl)
    assert isinstance(nl.layer, gateway.RefusedLayer)
    from mitmproxy.proxy import commands, events

    out = list(nl.layer.handle_event(events.DataReceived(f.client_conn, b"\x16\x03")))
    assert [type(c) for c in out] == [commands.CloseConnection]
    assert out[0].connection is f.client_conn, "nothing is relayed, the client is closed"


def test_failure_in_a_raw_tcp_message_drops_it(harness) -> None:
    make, _, server = harness
    gw = make(Boom("tcp_message"))
    f = tflow.ttcpflow()
    handler = server.live(f.client_conn, f.server_conn)
    run(gw, "tcp_message", f)
    assert f.messages[-1].content == b"" and handler.dropped


def test_lifecycle_failures_still_stop_the_start(harness) -> None:
    from mitmproxy import exceptions

    class BadOption:
        def configure(self, updated):
            raise exceptions.OptionsError("bad")

    gw = gateway.Gateway([BadOption()])
    with pytest.raises(exceptions.OptionsError):
        gw.configure(set())
