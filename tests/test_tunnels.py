"""The gateway speaks only HTTP to a cluster (issue 7, class 1: raw tunnels).

mitmproxy guesses each connection's next protocol from its first bytes and falls back to relaying
raw TCP when they look like neither TLS nor HTTP (fewer than three bytes count). A tunnel relayed
raw reaches the cluster past every check; for a cluster with a `client_cert` credential, a raw relay
inside the gateway's own upstream TLS even speaks as the gateway. The clusters step decides the
layers itself: TLS after a CONNECT (else the connection is closed), HTTP inside it, whatever the
first bytes are, in regular and reverse mode. The clusters here have no `connect:` address, so a
raw relay would really reach them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from mitmproxy import connection, exceptions
from mitmproxy.addons import onboarding
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer, TCPLayer, modes
from mitmproxy.proxy.layers.http import HttpStream, HTTPMode
from mitmproxy.test import taddons, tflow

from testkit.gateway import REPO, GatewayProcess
from testkit.rawclient import MemoryTLS, client_context, connect_tunnel, open_tls, read_h1_response, read_until_quiet, status_of
from testkit.standin.process import StandinProcess, token_sha256
from tests.conftest import E2E_RULES, INSPECTOR_TOKEN, aws_env, grant_everything

TOKEN_FILE_CLUSTER_TOKEN = "tunnels-cluster-token-held-by-the-gateway"


@dataclass
class Tunnels:
    gateway: GatewayProcess
    clusters: dict[str, StandinProcess]  # "token": token_file credential, "cert": client_cert credential
    hosts: dict[str, str]
    token: str

    def authority(self, name: str) -> str:
        return f"{self.hosts[name]}:{self.clusters[name].port}"

    def seen(self, name: str) -> list[dict]:
        """What the cluster received, apart from the tests' own inspection calls."""
        return [r for r in self.clusters[name].requests_seen() if not r["path"].startswith("/_standin")]

    def clear(self) -> None:
        for api in self.clusters.values():
            api.clear_seen()

    def reverse_port(self, name: str) -> int:
        return self.gateway.reverse[name][1]

    def gateway_context(self, alpn=("http/1.1",)) -> ssl.SSLContext:
        return client_context([self.gateway.ca_path], alpn)

    def request(self, name: str, path: str = "/api/v1/namespaces/dev/secrets", token: bool = False) -> bytes:
        auth = f"Authorization: Bearer {self.token}\r\n" if token else ""
        return f"GET {path} HTTP/1.1\r\nHost: {self.authority(name)}\r\n{auth}Connection: close\r\n\r\n".encode()


@pytest.fixture(scope="module")
def tunnels(ca, idp, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("tunnels")
    client_cert, client_key = ca.issue("jitgate-tunnels-client", client=True)
    with contextlib.ExitStack() as cleanup:
        token_api = cleanup.enter_context(StandinProcess(work / "token-cluster").start(ca, tokens=[INSPECTOR_TOKEN, TOKEN_FILE_CLUSTER_TOKEN]))
        cert_api = cleanup.enter_context(StandinProcess(work / "cert-cluster").start(ca, tokens=[INSPECTOR_TOKEN], client_ca=ca.cert_path))
        yield from _tunnels(ca, idp, work, client_cert, client_key, token_api, cert_api)


def _tunnels(ca, idp, work, client_cert, client_key, token_api, cert_api):
    hosts = {"token": "localhost", "cert": "127.0.0.1"}
    (work / "cluster-token").write_text(TOKEN_FILE_CLUSTER_TOKEN + "\n")
    policy = work / "policy.yaml"
    policy.write_text(E2E_RULES + f"""\
clusters:
  - name: token
    endpoint: https://localhost:{token_api.port}
    ca_file: {ca.cert_path}
    credential:
      token_file: cluster-token
  - name: cert
    endpoint: https://127.0.0.1:{cert_api.port}
    ca_file: {ca.cert_path}
    credential:
      client_cert: {{cert_file: {client_cert}, key_file: {client_key}}}
{idp.policy_section()}""")
    store = work / "jitgate.db"
    for cluster in ("token", "cert"):
        grant_everything(store, policy, cluster)
    gateway = GatewayProcess(work / "gw", policy,
                             reverse_endpoints={"token": f"https://localhost:{token_api.port}",
                                                "cert": f"https://127.0.0.1:{cert_api.port}"},
                             options={"grant_store": str(store)}, env=aws_env(dict(os.environ), work)).start()
    token = idp.token("alice", email="alice@example.com", email_verified=True, groups=["developers", "sre"])
    try:
        yield Tunnels(gateway, {"token": token_api, "cert": cert_api}, hosts, token)
    finally:
        gateway.stop()


def tunnel(t: Tunnels, name: str) -> socket.socket:
    sock, status = connect_tunnel(("127.0.0.1", t.gateway.proxy_port), t.authority(name))
    assert status == 200
    return sock


def assert_untouched(t: Tunnels, name: str) -> None:
    time.sleep(0.2)  # let anything relayed arrive
    assert t.seen(name) == [], "bytes from the tunnel reached the cluster"


CLUSTERS = ["token", "cert"]


# --- regular mode: the tunnel after CONNECT --------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("first", [b"X", b"XY", b"\x00\x00\x00\x00", b"SSH-2.0-OpenSSH_9.6\r\n", b"\x16\x03\x09\x00\x05",
                                   b"\x16\x16", b"GET /api/v1/namespaces/dev/pods HTTP/1.1\r\nHost: x\r\n\r\n"],
                         ids=["1-byte", "2-bytes", "zeros", "ssh", "bad-tls-version", "bad-tls-2", "plain-http"])
def test_tunnel_that_does_not_start_with_tls_is_closed(tunnels: Tunnels, name: str, first: bytes) -> None:
    tunnels.clear()
    sock = tunnel(tunnels, name)
    try:
        sock.sendall(first)
        time.sleep(0.2)
        sock.sendall(tunnels.request(name))  # plain HTTP after it: must go nowhere either
        answer = read_until_quiet(sock, timeout=2)
    finally:
        sock.close()
    assert answer == b"", answer[:200]
    assert_untouched(tunnels, name)
    assert "the tunnel to a cluster must start with TLS" in tunnels.gateway.log()


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("first_write", [1, 2])
def test_split_client_hello_in_the_tunnel_is_tls_with_the_gateway(tunnels: Tunnels, name: str, first_write: int) -> None:
    """mitmproxy reads fewer than three bytes as "not TLS" and relays raw: the client would then
    finish its handshake with the cluster itself. Here the handshake is with the gateway (its CA
    verifies), and what follows is an HTTP call the gateway checks."""
    tunnels.clear()
    sock = tunnel(tunnels, name)
    try:
        tls = MemoryTLS(sock, tunnels.gateway_context(), server_hostname=tunnels.hosts[name])
        tls.handshake(first_write=first_write)  # fails if the cluster answered (another CA)
        tls.send(tunnels.request(name))
        answer = tls.recv_until_quiet(timeout=3)
    finally:
        sock.close()
    assert status_of(answer) == 401, answer[:300]
    assert b'"kind":"Status"' in answer.replace(b" ", b"")
    assert_untouched(tunnels, name)


@pytest.mark.parametrize("name", CLUSTERS)
def test_split_client_hello_then_a_granted_call_is_served_by_the_gateway(tunnels: Tunnels, name: str) -> None:
    tunnels.clear()
    sock = tunnel(tunnels, name)
    try:
        tls = MemoryTLS(sock, tunnels.gateway_context(), server_hostname=tunnels.hosts[name])
        tls.handshake(first_write=1)
        tls.send(tunnels.request(name, "/api/v1/namespaces/dev/pods", token=True))
        answer = tls.recv_until_quiet(timeout=3)
    finally:
        sock.close()
    assert status_of(answer) == 200, answer[:300]
    (record,) = tunnels.seen(name)
    assert record["path"] == "/api/v1/namespaces/dev/pods"
    if name == "cert":
        assert record["auth_kind"] == "cert"
    else:
        assert record["token_sha256"] == token_sha256(TOKEN_FILE_CLUSTER_TOKEN)


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("first", [b"G", b"GE"])
@pytest.mark.parametrize("alpn", [(), ("http/1.1",), ("x-unknown",)], ids=["no-alpn", "http1", "unknown-alpn"])
def test_tiny_first_record_inside_the_tunnel_is_still_http(tunnels: Tunnels, name: str, first: bytes, alpn) -> None:
    """Without an HTTP ALPN, a one- or two-byte first TLS record made mitmproxy relay the rest raw:
    to the `cert` cluster inside the gateway's own client-certificate TLS, i.e. as the gateway."""
    tunnels.clear()
    sock = open_tls(("127.0.0.1", tunnels.gateway.proxy_port), tunnels.hosts[name], [tunnels.gateway.ca_path],
                    alpn=alpn, tunnel_to=tunnels.authority(name))
    try:
        request = tunnels.request(name)
        sock.send(first)  # one TLS record of its own
        time.sleep(0.3)
        sock.sendall(request[len(first):])
        answer = read_h1_response(sock, timeout=3)
    finally:
        sock.close()
    assert status_of(answer) == 401, answer[:300]
    assert_untouched(tunnels, name)


def h2_get_split(sock: ssl.SSLSocket, authority: str, path: str, first: int, token: str | None = None) -> tuple[int | None, bytes]:
    """An HTTP/2 GET whose first TLS record carries only `first` bytes of the connection preface."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode()), (b":path", path.encode())]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    conn.send_headers(1, headers, end_stream=True)
    data = conn.data_to_send()
    sock.send(data[:first])
    time.sleep(0.3)
    sock.sendall(data[first:])
    status, body = None, b""
    sock.settimeout(3)
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            ended = False
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    ended = True
            sock.sendall(conn.data_to_send())
            if ended:
                break
    except (socket.timeout, ssl.SSLError, OSError):
        pass
    return status, body


@pytest.mark.parametrize("mode", ["regular", "reverse"])
@pytest.mark.parametrize("name", CLUSTERS)
def test_http2_with_a_tiny_first_record_is_http2(tunnels: Tunnels, mode: str, name: str) -> None:
    tunnels.clear()
    if mode == "regular":
        sock = open_tls(("127.0.0.1", tunnels.gateway.proxy_port), tunnels.hosts[name], [tunnels.gateway.ca_path],
                        alpn=("h2",), tunnel_to=tunnels.authority(name))
    else:
        sock = open_tls(("127.0.0.1", tunnels.reverse_port(name)), "127.0.0.1", [tunnels.gateway.ca_path], alpn=("h2",))
    try:
        assert sock.selected_alpn_protocol() == "h2"
        status, body = h2_get_split(sock, tunnels.authority(name), "/api/v1/namespaces/dev/secrets", first=2)
    finally:
        sock.close()
    assert status == 401 and json.loads(body)["kind"] == "Status", (status, body[:300])
    assert_untouched(tunnels, name)


# --- reverse mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("first_write", [1, 2])
def test_split_client_hello_on_a_reverse_listener_is_tls(tunnels: Tunnels, name: str, first_write: int) -> None:
    """mitmproxy's reverse mode reads a one- or two-byte first write as plain HTTP; it is TLS."""
    tunnels.clear()
    sock = socket.create_connection(("127.0.0.1", tunnels.reverse_port(name)), timeout=3)
    try:
        tls = MemoryTLS(sock, tunnels.gateway_context(), server_hostname="127.0.0.1")
        tls.handshake(first_write=first_write)
        tls.send(tunnels.request(name))
        answer = tls.recv_until_quiet(timeout=3)
    finally:
        sock.close()
    assert status_of(answer) == 401, answer[:300]
    assert_untouched(tunnels, name)


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("first", [b"G", b"GE"])
@pytest.mark.parametrize("alpn", [(), ("http/1.1",)], ids=["no-alpn", "http1"])
def test_tiny_first_record_on_a_reverse_listener_is_http(tunnels: Tunnels, name: str, first: bytes, alpn) -> None:
    tunnels.clear()
    sock = open_tls(("127.0.0.1", tunnels.reverse_port(name)), "127.0.0.1", [tunnels.gateway.ca_path], alpn=alpn)
    try:
        request = tunnels.request(name)
        sock.send(first)
        time.sleep(0.3)
        sock.sendall(request[len(first):])
        answer = read_h1_response(sock, timeout=3)
    finally:
        sock.close()
    assert status_of(answer) == 401, answer[:300]
    assert_untouched(tunnels, name)


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("first", [b"X", b"XY", b"\x00\x00\x00\x00", b"SSH-2.0-OpenSSH_9.6\r\n"], ids=["1", "2", "zeros", "ssh"])
def test_garbage_on_a_reverse_listener_reaches_nothing(tunnels: Tunnels, name: str, first: bytes) -> None:
    tunnels.clear()
    sock = socket.create_connection(("127.0.0.1", tunnels.reverse_port(name)), timeout=3)
    try:
        sock.sendall(first)
        time.sleep(0.2)
        sock.sendall(tunnels.request(name))
        answer = read_until_quiet(sock, timeout=2)
    finally:
        sock.close()
    # Read as (bad) plain HTTP: an error answer or a closed connection, never the cluster.
    assert answer == b"" or 400 <= (status_of(answer) or 0) < 600, answer[:300]
    assert_untouched(tunnels, name)


# --- the onboarding app ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/cert/pem"])
@pytest.mark.parametrize("with_token", [False, True])
def test_onboarding_app_does_not_answer(tunnels: Tunnels, path: str, with_token: bool) -> None:
    """mitmproxy's onboarding app answers http://mitm.it/ on a regular listener before any addon."""
    auth = f"Authorization: Bearer {tunnels.token}\r\n" if with_token else ""
    sock = socket.create_connection(("127.0.0.1", tunnels.gateway.proxy_port), timeout=3)
    try:
        sock.sendall(f"GET http://mitm.it{path} HTTP/1.1\r\nHost: mitm.it\r\n{auth}\r\n".encode())
        answer = read_h1_response(sock, timeout=3)
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) in ((403,) if with_token else (401, 403)), answer[:300]
    status = json.loads(body)
    assert status["kind"] == "Status" and status["message"].startswith("jitgate: ")
    if with_token:
        assert status["message"] == "jitgate: mitm.it:80 is not a cluster behind this gateway"
    assert b"mitmproxy" not in answer and b"BEGIN CERTIFICATE" not in answer


# --- the clusters step in a mitmproxy test harness ---------------------------------------------------


_spec = importlib.util.spec_from_file_location("jitgate_addons_under_test.clusters", REPO / "addons/clusters.py")
clusters_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clusters_module)


def context_for(mode: str, options, *stack) -> Context:
    client = connection.Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080), timestamp_start=0,
                               proxy_mode=mode_specs.ProxyMode.parse(mode))
    context = Context(client, options)
    for make in stack:
        make(context)  # each layer appends itself to context.layers
    return context


REGULAR_TOP = (modes.HttpProxy,)
TUNNEL = (modes.HttpProxy, lambda c: HttpLayer(c, HTTPMode.regular), lambda c: HttpStream(c, 1))
IN_TUNNEL_TLS = TUNNEL + (ServerTLSLayer, ClientTLSLayer)
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def layer_types(layer) -> list[str]:
    names = []
    while layer is not None:
        names.append(type(layer).__name__)
        layer = getattr(layer, "child_layer", None)
        if type(layer).__name__ == "NextLayer":
            break
    return names


@pytest.mark.parametrize(
    "data,tls",
    [(b"\x16", True), (b"\x16\x03", True), (b"\x16\x03\x01", True), (b"\x16\x03\x03\x00", True), (CLIENT_HELLO_START, True),
     (b"", False), (b"\x17", False), (b"\x16\x02", False), (b"\x16\x03\x04", False), (b"GET / HTTP/1.1", False),
     (b"\x00\x00", False), (b"SS", False)],
)
def test_may_be_tls(data: bytes, tls: bool) -> None:
    assert clusters_module.may_be_tls(data) is tls


@pytest.mark.parametrize(
    "mode,stack,data,expected",
    [
        # a client of the regular listener: HTTP to the proxy, in TLS if it starts so
        ("regular", REGULAR_TOP, b"CONNECT api:443 HTTP/1.1\r\n", ["HttpLayer"]),
        ("regular", REGULAR_TOP, b"\x16", ["ClientTLSLayer", "HttpLayer"]),
        ("regular", REGULAR_TOP, b"XY", ["HttpLayer"]),
        # after a CONNECT: TLS (even from one byte of it), or the connection is closed
        ("regular", TUNNEL, CLIENT_HELLO_START, ["ServerTLSLayer", "ClientTLSLayer"]),
        ("regular", TUNNEL, b"\x16", ["ServerTLSLayer", "ClientTLSLayer"]),
        ("regular", TUNNEL, b"\x16\x03", ["ServerTLSLayer", "ClientTLSLayer"]),
        ("regular", TUNNEL, b"XY", ["Refused"]),
        ("regular", TUNNEL, b"X", ["Refused"]),
        ("regular", TUNNEL, b"SSH-2.0-x\r\n", ["Refused"]),
        ("regular", TUNNEL, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["Refused"]),
        # inside the tunnel's TLS: HTTP, whatever the first bytes
        ("regular", IN_TUNNEL_TLS, b"G", ["HttpLayer"]),
        ("regular", IN_TUNNEL_TLS, b"\x00\x00", ["HttpLayer"]),
        ("regular", IN_TUNNEL_TLS, b"SSH-2.0-x\r\n", ["HttpLayer"]),
        # reverse mode: TLS when it starts so (even one byte), then HTTP
        ("reverse:https://api.example:443", (modes.ReverseProxy,), b"\x16", ["ServerTLSLayer", "ClientTLSLayer", "HttpLayer"]),
        ("reverse:https://api.example:443", (modes.ReverseProxy,), b"GE", ["ServerTLSLayer", "HttpLayer"]),
        ("reverse:tcp://api.example:443", (modes.ReverseProxy,), b"\x16", ["Refused"]),
        ("reverse:tls://api.example:443", (modes.ReverseProxy,), b"\x16", ["Refused"]),
        # anything else (another mode, a stack the gateway never builds) is closed
        ("socks5", (modes.Socks5Proxy,), b"\x16", ["Refused"]),
        ("transparent", (modes.TransparentProxy,), b"GET / HTTP/1.1", ["Refused"]),
    ],
)
def test_choose_layer(mode: str, stack, data: bytes, expected: list[str]) -> None:
    with taddons.context() as tctx:
        context = context_for(mode, tctx.options, *stack)
        layer = clusters_module.choose_layer(context, data)
        assert layer_types(layer)[: len(expected)] == expected
        assert not any(isinstance(l, TCPLayer) for l in context.layers)


def test_refused_layer_closes_the_client_and_relays_nothing() -> None:
    from mitmproxy.proxy import commands, events

    with taddons.context() as tctx:
        context = context_for("regular", tctx.options, *TUNNEL)
        layer = clusters_module.choose_layer(context, b"XY")
        out = list(layer.handle_event(events.Start()))
        assert [type(c).__name__ for c in out] == ["Log", "CloseConnection"]
        assert out[1].connection is context.client
        assert "XY" not in out[0].message
        later = list(layer.handle_event(events.DataReceived(context.client, b"more")))
        assert not any(isinstance(c, commands.SendData) for c in later)


@pytest.mark.parametrize("spec", ["regular", "regular@127.0.0.1:8080", "reverse:https://api.example:443@7443",
                                  "reverse:https://10.0.0.1:6443"])
def test_modes_the_gateway_serves(spec: str) -> None:
    clusters_module.check_modes([spec])


@pytest.mark.parametrize("spec", ["socks5", "transparent", "upstream:http://proxy:3128", "reverse:http://api.example:80",
                                  "reverse:tcp://api.example:443", "reverse:tls://api.example:443", "wireguard", "local"])
def test_other_modes_stop_the_start(spec: str) -> None:
    with pytest.raises(exceptions.OptionsError, match="jitgate serves --mode regular"):
        clusters_module.check_modes([spec])


def policy_file(tmp_path: Path, ca) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(f"""\
clusters:
  - name: dev
    endpoint: https://api.dev.example
    connect: 127.0.0.1:6443
    ca_file: {ca.cert_path}
    credential: {{token_file: {ca.cert_path}}}
identity_providers:
  - issuer: https://idp.example
    client_ids: [jitgate]
""")
    return path


def test_onboarding_is_switched_off_and_stays_off(tmp_path: Path, ca) -> None:
    routing = clusters_module.ClusterRouting()
    with taddons.context(onboarding.Onboarding(), routing) as tctx:
        tctx.configure(routing, policy=str(policy_file(tmp_path, ca)), onboarding=True)  # as at start: all options
        assert tctx.options.onboarding is False
        tctx.configure(routing, onboarding=True)  # and when someone sets it later
        assert tctx.options.onboarding is False


def test_a_raw_tcp_flow_is_ended_before_anything_is_relayed(tmp_path: Path, ca) -> None:
    routing = clusters_module.ClusterRouting()
    with taddons.context(routing) as tctx:
        tctx.configure(routing, policy=str(policy_file(tmp_path, ca)))
        flow = tflow.ttcpflow()
        flow.server_conn.address = ("127.0.0.1", 6443)
        flow.server_conn.timestamp_start = None  # not connected yet
        flow.server_conn.error = None
        flow.error = None
        routing.tcp_start(flow)
        assert flow.error is not None and not flow.killable
        assert flow.server_conn.error and "cluster dev" in flow.server_conn.error
        assert flow.metadata["jitgate"]["decision"] == "deny"
        routing.tcp_message(flow)
        assert flow.messages[-1].content == b""


@pytest.mark.parametrize("option,value", [("mode", ["socks5"]), ("mode", ["regular", "reverse:tcp://api.dev.example:443"]),
                                          ("ignore_hosts", ["api.dev.example"]), ("tcp_hosts", [".*"]),
                                          ("allow_hosts", ["other"])])
def test_options_that_would_relay_raw_stop_the_start(tmp_path: Path, ca, option: str, value) -> None:
    routing = clusters_module.ClusterRouting()
    with taddons.context(routing) as tctx:
        tctx.configure(routing, policy=str(policy_file(tmp_path, ca)))
        with pytest.raises(exceptions.OptionsError, match="jitgate"):
            tctx.configure(routing, **{option: value})
