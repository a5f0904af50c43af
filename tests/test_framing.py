"""Request framing and header hygiene (issue 7, class 2): every request the cluster receives is one
message, framed by the gateway, with exactly the headers the gateway checked.

The stand-in clusters speak HTTP/1.1 only (as an EKS endpoint may), so an HTTP/2 request with a body
and no content-length is the classic smuggle: forwarded with neither Content-Length nor
Transfer-Encoding, its body would be read by the cluster as a second request on the gateway's
connection, and under a client-certificate credential that second request is the gateway's own.
Every test here asserts on what the stand-in recorded (`requests_seen`), over HTTP/1.1 and HTTP/2,
in reverse mode and through CONNECT, for `eks`, `token_file` and `client_cert` clusters.

The raw HTTP/1.1 and HTTP/2 helpers at the top are shared with the other issue-7 test modules.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from jitgate.chain.flow import call_of
from jitgate.kube.http_framing import MAX_HEADER_BYTES, check_request_head, reframe
from testkit.gateway import REPO, GatewayProcess
from testkit.standin.process import StandinProcess
from tests.conftest import (
    DEV_HOST,
    E2E_RULES,
    INSPECTOR_TOKEN,
    LAB_HOST,
    Stack,
    aws_env,
    grant_everything,
)

CERTS_HOST = "api.certs.jitgate.test"


def load_addon(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jitgate_addons_under_test.{name}", REPO / f"addons/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- raw clients ----------------------------------------------------------------------------------------


@dataclass
class Target:
    """One cluster behind one gateway: where to connect in each mode, and the stand-in behind it."""

    name: str
    gateway: GatewayProcess
    host: str
    port: int
    standin: StandinProcess

    @property
    def authority(self) -> str:
        return self.host if self.port == 443 else f"{self.host}:{self.port}"

    def connect(self, mode: str, alpn: tuple[str, ...] = ("http/1.1",), timeout: float = 10.0) -> ssl.SSLSocket:
        """TLS to the gateway: to the cluster's reverse listener, or through CONNECT on the proxy port."""
        if mode == "reverse":
            sock = socket.create_connection(("127.0.0.1", self.gateway.reverse[self.name][1]), timeout=timeout)
        else:
            sock = socket.create_connection(("127.0.0.1", self.gateway.proxy_port), timeout=timeout)
            sock.sendall(f"CONNECT {self.host}:{self.port} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                assert chunk, "proxy closed during CONNECT"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=str(self.gateway.ca_path))
        context.check_hostname = False
        context.set_alpn_protocols(list(alpn))
        return context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str]
    body: bytes
    sent: int = 0  # body bytes the client had sent when the response head arrived
    outcome: str = "complete"  # complete | reset | closed | timeout

    def json(self) -> dict:
        return json.loads(self.body) if self.body else {}


def h1_call(sock: ssl.SSLSocket, head: bytes, body: bytes = b"", chunk: int = 65536, timeout: float = 10.0) -> Reply:
    """Send a raw HTTP/1.1 request head and body (in chunks, watching for an early answer); read one response."""
    sock.settimeout(timeout)
    sock.sendall(head)
    sent, data, answered_at = 0, b"", None
    while sent < len(body):
        if answered_at is None and select.select([sock], [], [], 0)[0]:
            answered_at = sent
        try:
            sock.sendall(body[sent:sent + chunk])
        except OSError:
            break
        sent += min(chunk, len(body) - sent)
    reply = read_h1_response(sock, data, timeout)
    reply.sent = sent if answered_at is None else answered_at
    return reply


def read_h1_response(sock: ssl.SSLSocket, data: bytes = b"", timeout: float = 10.0) -> Reply:
    deadline = time.monotonic() + timeout
    outcome = "complete"
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, OSError):
            chunk = b""
        if not chunk or time.monotonic() > deadline:
            return Reply(None, {}, data, outcome="closed")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            outcome = "closed"
            break
        rest += chunk
    return Reply(status, headers, rest[:length], outcome=outcome)


def h2_call(sock: ssl.SSLSocket, headers: list[tuple[str, str]], body: bytes = b"",
            trailers: list[tuple[str, str]] | None = None, timeout: float = 10.0) -> Reply:
    """One HTTP/2 request, byte-exact (no client-side validation), honouring flow control."""
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                       normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    raw = [(k.encode(), v.encode()) for k, v in headers]
    conn.send_headers(sid, raw, end_stream=not body and not trailers)
    sock.sendall(conn.data_to_send())
    reply = Reply(None, {}, b"", outcome="timeout")
    state = {"done": False, "body": b""}
    deadline = time.monotonic() + timeout

    def pump(wait: float) -> None:
        if not select.select([sock], [], [], wait)[0]:
            return
        try:
            data = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, OSError):
            data = b""
        if not data:
            reply.outcome, state["done"] = "closed", True
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                reply.status = int(dict(event.headers)[b":status"])
                reply.headers = {k.decode(): v.decode() for k, v in event.headers}
                reply.sent = sent
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                state["body"] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                reply.outcome, state["done"] = "complete", True
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                reply.outcome, state["done"] = "reset", True
            elif isinstance(event, h2.events.ConnectionTerminated):
                reply.outcome, state["done"] = "closed", True
        pending = conn.data_to_send()
        if pending:
            sock.sendall(pending)

    sent = 0
    while sent < len(body) and not state["done"] and time.monotonic() < deadline:
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if window <= 0:
            pump(0.5)
            continue
        piece = body[sent:sent + window]
        try:
            conn.send_data(sid, piece, end_stream=sent + len(piece) == len(body) and not trailers)
        except h2.exceptions.StreamClosedError:
            break
        sock.sendall(conn.data_to_send())
        sent += len(piece)
        pump(0)
    if trailers and not state["done"]:
        conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in trailers], end_stream=True)
        sock.sendall(conn.data_to_send())
    while not state["done"] and time.monotonic() < deadline:
        pump(0.2)
    reply.body = state["body"]
    return reply


def h1_request(target: Target, mode: str, method: str, path: str, token: str | None, *,
               headers: list[tuple[str, str]] = (), body: bytes = b"", raw_head_extra: bytes = b"",
               host: str | None = None, content_length: bool = True) -> Reply:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or target.authority}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body and content_length:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n").encode() + raw_head_extra + b"\r\n"
    with target.connect(mode) as sock:
        return h1_call(sock, head, body)


def h2_request(target: Target, mode: str, method: str, path: str, token: str | None, *,
               headers: list[tuple[str, str]] = (), body: bytes = b"",
               trailers: list[tuple[str, str]] | None = None, authority: str | None = None) -> Reply:
    fields = [(":method", method), (":scheme", "https"), (":authority", authority or target.authority), (":path", path)]
    if token:
        fields.append(("authorization", f"Bearer {token}"))
    fields += list(headers)
    with target.connect(mode, alpn=("h2",)) as sock:
        return h2_call(sock, fields, body, trailers)


def seen(target: Target) -> list[dict]:
    return [r for r in target.standin.requests_seen() if not r["path"].startswith("/_standin")]


def completed(gateway: GatewayProcess, predicate, timeout: float = 5.0) -> list[dict]:
    """ResponseComplete audit events matching `predicate` (waits a little for the line)."""
    deadline = time.monotonic() + timeout
    while True:
        events = [e for e in gateway.audit_events() if e.get("stage") == "ResponseComplete" and predicate(e)]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def audited_as_refused(gateway: GatewayProcess, code: int, fragment: str) -> bool:
    return bool(completed(gateway, lambda e: e.get("responseStatus", {}).get("code") == code
                          and e["annotations"].get("jitgate.dev/decision") == "deny"
                          and fragment in e["annotations"].get("jitgate.dev/reason", "")))


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice_token(stack: Stack) -> str:
    return stack.idp.token("alice", email="alice@example.com", email_verified=True, groups=["developers", "sre"])


@pytest.fixture(scope="module")
def certs(stack: Stack, ca, tmp_path_factory: pytest.TempPathFactory):
    """A cluster reached with a client certificate the gateway holds, behind its own gateway (both modes).

    This gateway runs with mitmproxy's `validate_inbound_headers` off, so the header checks proven
    on it are jitgate's own; the shared stack keeps mitmproxy's on (defence in depth)."""
    work = tmp_path_factory.mktemp("certs")
    client_cert, client_key = ca.issue("jitgate-gateway-client", client=True)
    with StandinProcess(work / "standin").start(ca, tokens=[INSPECTOR_TOKEN], client_ca=ca.cert_path,
                                                hostnames=[CERTS_HOST]) as api:
        text = stack.policy.read_text()
        policy = work / "policy.yaml"
        policy.write_text(E2E_RULES + f"""clusters:
  - name: certs
    endpoint: https://{CERTS_HOST}
    connect: 127.0.0.1:{api.port}
    ca_file: {ca.cert_path}
    credential:
      client_cert: {{cert_file: {client_cert}, key_file: {client_key}}}
{text[text.index("identity_providers:"):]}""")
        grant_everything(work / "jitgate.db", policy, "certs")
        gateway = GatewayProcess(work / "gw", policy, reverse_endpoints={"certs": f"https://{CERTS_HOST}"},
                                 # mitmproxy's own checks off: what is refused here, jitgate refused.
                                 options={"grant_store": str(work / "jitgate.db"), "validate_inbound_headers": "false"},
                                 env=aws_env(dict(os.environ), work)).start()
        try:
            yield Target("certs", gateway, CERTS_HOST, 443, api)
        finally:
            gateway.stop()


@pytest.fixture(scope="module")
def targets(stack: Stack, certs: Target) -> dict[str, Target]:
    return {
        "eks": Target("dev", stack.gateway, DEV_HOST, 443, stack.dev),
        "token_file": Target("lab", stack.gateway, LAB_HOST, 6443, stack.lab),
        "client_cert": certs,
    }


CREDENTIALS = ["eks", "token_file", "client_cert"]
MODES = ["reverse", "regular"]

SMUGGLED_PATH = "/api/v1/namespaces/kube-system/secrets"
SMUGGLED = (f"GET {SMUGGLED_PATH} HTTP/1.1\r\nHost: x\r\nImpersonate-User: system:admin\r\n"
            "Impersonate-Group: system:masters\r\n\r\n").encode()


# --- the smuggle: HTTP/2 body without content-length -> HTTP/1.1 cluster ------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("credential", CREDENTIALS)
def test_h2_body_without_content_length_is_one_message(targets, alice_token, credential, mode) -> None:
    target = targets[credential]
    target.standin.clear_seen()
    path = "/api/v1/namespaces/dev/configmaps"
    reply = h2_request(target, mode, "POST", path, alice_token, headers=[("content-type", "application/json")],
                       body=SMUGGLED)
    assert reply.status is not None, reply
    records = seen(target)
    assert not [r for r in records if r["path"] == SMUGGLED_PATH], "the body was read as a second request"
    (post,) = [r for r in records if r["path"] == path]
    assert post["method"] == "POST" and post["headers"].get("Content-Length") == str(len(SMUGGLED))
    assert "Transfer-Encoding" not in post["headers"]
    assert not any(r["impersonate_groups"] == ["system:masters"] for r in records)


@pytest.mark.parametrize("mode", MODES)
def test_h1_chunked_body_is_reframed_with_a_length(targets, alice_token, mode) -> None:
    target = targets["client_cert"]
    target.standin.clear_seen()
    body = b'{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"chunked-%s"}}' % mode.encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = h1_request(target, mode, "POST", "/api/v1/namespaces/dev/configmaps", alice_token,
                       headers=[("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
                       body=chunked, content_length=False)
    assert reply.status == 201, reply
    (post,) = [r for r in seen(target) if r["method"] == "POST"]
    assert post["headers"].get("Content-Length") == str(len(body)) and "Transfer-Encoding" not in post["headers"]


# --- header hygiene over the wire -----------------------------------------------------------------------


H1_UNCLEAN = {
    # name: (extra raw header bytes, jitgate's reason)
    "obs-fold": (b"X-Note: a\r\n Impersonate-User: system:admin\r\n", "obs-fold"),
    "obs-fold with tab": (b"X-Note: a\r\n\tImpersonate-Group: system:masters\r\n", "obs-fold"),
    "NUL in a value": (b"X-Note: a\x00b\r\n", "control character"),
    "bare CR in a value": (b"X-Note: a\rImpersonate-User: system:admin\r\n", "control character"),
    "two Content-Length": (b"Content-Length: 0\r\nContent-Length: 0\r\n", "more than one Content-Length"),
    "Content-Length and Transfer-Encoding": (b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", "both"),
    "Transfer-Encoding gzip": (b"Transfer-Encoding: gzip\r\n", "chunked"),
}


READER_REFUSES = {"two Content-Length"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("credential", ["client_cert", "eks"])
@pytest.mark.parametrize("case", list(H1_UNCLEAN))
def test_unclean_h1_headers_are_refused_before_the_cluster(targets, alice_token, credential, mode, case) -> None:
    target = targets[credential]
    target.standin.clear_seen()
    extra, fragment = H1_UNCLEAN[case]
    reply = h1_request(target, mode, "GET", "/api/v1/namespaces/dev/pods", alice_token, raw_head_extra=extra)
    assert reply.status == 400, (case, reply)
    if credential == "client_cert" and case in READER_REFUSES:
        # mitmproxy's HTTP/1 reader cannot size the body and answers with its own page before any
        # hook; the steps still see the head, and the refusal is audited with jitgate's reason.
        assert audited_as_refused(target.gateway, 400, fragment)
    elif credential == "client_cert":  # jitgate's own check: a Status kubectl prints, and an audited denial
        assert reply.json()["kind"] == "Status" and fragment in reply.json()["message"], reply.body
        assert audited_as_refused(target.gateway, 400, fragment)
    elif reply.headers.get("content-type") == "application/json":
        assert fragment in reply.json()["message"]
    # else mitmproxy's validate_inbound_headers answered first with its own 400 page
    assert seen(target) == [], "an unclean request reached the cluster"


def test_duplicate_host_never_reaches_the_cluster(targets, alice_token) -> None:
    """Inside a tunnel a second Host is refused; in reverse mode mitmproxy replaces every Host
    header with the endpoint's before any step runs, so the cluster sees one Host either way."""
    target = targets["client_cert"]
    target.standin.clear_seen()
    reply = h1_request(target, "regular", "GET", "/api/v1/namespaces/dev/pods", alice_token,
                       raw_head_extra=b"Host: other.example\r\n")
    assert reply.status == 400 and "more than one Host" in reply.json()["message"], reply
    assert seen(target) == []
    reply = h1_request(target, "reverse", "GET", "/api/v1/namespaces/dev/pods", alice_token,
                       raw_head_extra=b"Host: other.example\r\n")
    assert reply.status == 200
    (record,) = seen(target)
    assert record["headers"]["Host"] == CERTS_HOST


H2_UNCLEAN = {
    "leading space in a value": ([("x-note", " system:masters")], "leading or trailing whitespace"),
    "CRLF in a value": ([("x-note", "a\r\nimpersonate-user: system:admin")], "control character"),
    "NUL in a value": ([("x-note", "a\x00b")], "control character"),
    "transfer-encoding": ([("transfer-encoding", "chunked")], "connection-specific"),
    "upgrade": ([("connection", "upgrade"), ("upgrade", "SPDY/3.1")], "connection-specific"),
    "duplicate host": ([("host", CERTS_HOST), ("host", "other.example")], "more than one Host"),
    "two content-length": ([("content-length", "0"), ("content-length", "0")], "more than one Content-Length"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("credential", ["client_cert", "eks"])
@pytest.mark.parametrize("case", list(H2_UNCLEAN))
def test_unclean_h2_headers_are_refused_before_the_cluster(targets, alice_token, credential, mode, case) -> None:
    target = targets[credential]
    target.standin.clear_seen()
    headers, fragment = H2_UNCLEAN[case]
    reply = h2_request(target, mode, "GET", "/api/v1/namespaces/dev/pods", alice_token, headers=headers)
    if case == "duplicate host" and mode == "reverse":
        # mitmproxy replaces every Host header with the endpoint's in reverse mode, before any step.
        assert [r["headers"]["Host"] for r in seen(target)] == ([target.authority] if reply.status == 200 else [])
        return
    if credential == "client_cert":  # jitgate's own check
        assert reply.status == 400 and fragment in reply.json()["message"], (case, reply)
        assert audited_as_refused(target.gateway, 400, fragment)
    else:  # the h2 library's inbound validation may reset the stream or close the connection first
        assert reply.status == 400 or reply.outcome in ("reset", "closed"), (case, reply)
    assert seen(target) == [], "an unclean request reached the cluster"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["get", "Get", "TRACE", "PROPFIND"])
def test_methods_the_api_does_not_serve_are_refused(targets, alice_token, mode, method) -> None:
    """Go compares methods case-sensitively: `get` is no GET to kube, whatever it reads as here."""
    target = targets["client_cert"]
    target.standin.clear_seen()
    reply = h1_request(target, mode, method, "/api/v1/namespaces/dev/pods", alice_token)
    assert reply.status in (400, 405), reply
    if reply.status == 405:
        assert reply.json()["reason"] == "MethodNotAllowed" and "method" in reply.json()["message"]
    h2 = h2_request(target, mode, method, "/api/v1/namespaces/dev/pods", alice_token)
    assert h2.status == 405 or h2.outcome in ("reset", "closed"), h2
    assert seen(target) == []


@pytest.mark.parametrize("mode", MODES)
def test_h2_request_trailers_are_refused(targets, alice_token, mode) -> None:
    target = targets["client_cert"]
    target.standin.clear_seen()
    reply = h2_request(target, mode, "POST", "/api/v1/namespaces/dev/configmaps", alice_token,
                       headers=[("content-type", "application/json")], body=b"{}",
                       trailers=[("impersonate-user", "system:admin")])
    assert reply.status == 400 and "trailers" in reply.json()["message"], reply
    assert seen(target) == []


@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_clean_requests_still_pass(targets, alice_token, protocol) -> None:
    """The control: the same requests, clean, reach the cluster (so the refusals above can fail)."""
    target = targets["client_cert"]
    target.standin.clear_seen()
    call = h1_request if protocol == "h1" else h2_request
    reply = call(target, "reverse", "GET", "/api/v1/namespaces/dev/pods", alice_token,
                 headers=[("X-Note", "a b\tc")] if protocol == "h1" else [("x-note", "a b\tc")])
    assert reply.status == 200, reply
    assert [r["path"] for r in seen(target)] == ["/api/v1/namespaces/dev/pods"]


# --- unit: the plain checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields, version, code, fragment", [
    ([(b"Host", b"x"), (b"Accept", b"*/*")], "HTTP/1.1", 0, ""),
    ([(b"X", b"a\r\n b")], "HTTP/1.1", 400, "obs-fold"),
    ([(b"X", b"a\nb")], "HTTP/1.1", 400, "control character"),
    ([(b"X", b"a\x00b")], "HTTP/2.0", 400, "control character"),
    ([(b"X", b"a\x7fb")], "HTTP/1.1", 400, "control character"),
    ([(b"X", b"a\tb")], "HTTP/1.1", 0, ""),
    ([(b"X", b" a")], "HTTP/2.0", 400, "whitespace"),
    ([(b"X", b"a\t")], "HTTP/2.0", 400, "whitespace"),
    ([(b"Bad Name", b"a")], "HTTP/1.1", 400, "token"),
    ([(b"", b"a")], "HTTP/1.1", 400, "token"),
    ([(b"Content-Length", b"3"), (b"content-length", b"3")], "HTTP/1.1", 400, "more than one Content-Length"),
    ([(b"Content-Length", b"+3")], "HTTP/1.1", 400, "not a number"),
    ([(b"Content-Length", b"3, 3")], "HTTP/1.1", 400, "not a number"),
    ([(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")], "HTTP/1.1", 400, "both"),
    ([(b"Transfer-Encoding", b"gzip, chunked")], "HTTP/1.1", 400, "chunked"),
    ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], "HTTP/1.1", 400, "chunked"),
    ([(b"Transfer-Encoding", b"chunked")], "HTTP/1.0", 400, "not allowed"),
    ([(b"Transfer-Encoding", b"Chunked")], "HTTP/1.1", 0, ""),
    ([(b"transfer-encoding", b"chunked")], "HTTP/2.0", 400, "connection-specific"),
    ([(b"connection", b"upgrade"), (b"upgrade", b"websocket")], "HTTP/2.0", 400, "connection-specific"),
    ([(b"Host", b"a"), (b"host", b"b")], "HTTP/1.1", 400, "more than one Host"),
    ([(b"X", b"v" * MAX_HEADER_BYTES)], "HTTP/1.1", 431, "larger"),
])
def test_check_request_head(fields, version, code, fragment) -> None:
    got, reason, _ = check_request_head(fields, version)
    assert got == code and fragment in reason, (got, reason)


def test_method_problem() -> None:
    from jitgate.kube.http_framing import method_problem

    assert all(method_problem(m) is None for m in (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))
    assert method_problem(b"get")[0] == 405 and method_problem(b"TRACE")[0] == 405


def test_check_request_head_reports_the_declared_length() -> None:
    assert check_request_head([(b"Content-Length", b"1234")], "HTTP/1.1") == (0, "", 1234)
    assert check_request_head([(b"Transfer-Encoding", b"chunked")], "HTTP/1.1") == (0, "", -1)


def test_reframe_sets_the_gateways_own_length() -> None:
    fields = ((b"Host", b"x"), (b"Transfer-Encoding", b"chunked"), (b"X", b"y"))
    assert reframe(fields, "POST", 5) == ((b"Host", b"x"), (b"X", b"y"), (b"Content-Length", b"5"))
    assert reframe(((b"Content-Length", b"9"),), "PUT", 0) == ((b"Content-Length", b"0"),)
    assert reframe(((b"Host", b"x"),), "GET", 0) == ((b"Host", b"x"),)  # no body, no length
    assert reframe(((b"content-length", b"1"),), "DELETE", 3) == ((b"Content-Length", b"3"),)


# --- unit: the addons in mitmproxy's harness -------------------------------------------------------------


def h2_flow(headers: tuple[tuple[bytes, bytes], ...], content: bytes | None = None) -> http.HTTPFlow:
    request = tutils.treq(http_version=b"HTTP/2.0", headers=http.Headers(headers), content=content,
                          scheme=b"https", authority=b"api.x.test", host="api.x.test", port=443)
    return tflow.tflow(req=request)


def test_hygiene_refuses_unclean_heads_with_a_status() -> None:
    hygiene = load_addon("request_hygiene").RequestHygiene()
    with taddons.context(hygiene):
        flow = tflow.tflow()
        flow.request.headers.fields = ((b"Host", b"x"), (b"X-Note", b"a\r\n Impersonate-User: system:admin"))
        hygiene.requestheaders(flow)
        assert flow.response.status_code == 400
        assert json.loads(flow.response.content)["kind"] == "Status"
        assert call_of(flow).denied and "obs-fold" in call_of(flow).reason
        assert b"Impersonate" not in flow.response.content  # never echoes the caller's bytes

        clean = tflow.tflow()
        hygiene.requestheaders(clean)
        assert clean.response is None and not call_of(clean).denied

        streamed = tflow.tflow()
        streamed.request.stream = True  # e.g. an addon or stream_large_bodies: never past the chain
        hygiene.requestheaders(streamed)
        assert streamed.request.stream is False


def test_hygiene_refuses_trailers_and_oversized_bodies_at_request() -> None:
    hygiene = load_addon("request_hygiene").RequestHygiene()
    with taddons.context(hygiene) as tctx:
        tctx.configure(hygiene, max_request_body="1k")
        flow = h2_flow(((b"content-type", b"application/json"),), b"{}")
        flow.request.trailers = http.Headers([(b"impersonate-user", b"system:admin")])
        hygiene.request(flow)
        assert flow.response.status_code == 400 and "trailers" in call_of(flow).reason
        big = h2_flow((), b"x" * 1025)
        hygiene.request(big)
        assert big.response.status_code == 413 and "1024 bytes" in call_of(big).reason
        fits = h2_flow((), b"x" * 1024)
        hygiene.request(fits)
        assert fits.response is None


def test_hygiene_options() -> None:
    from mitmproxy import exceptions
    from mitmproxy.addons.proxyserver import Proxyserver

    module = load_addon("request_hygiene")
    hygiene = module.RequestHygiene()
    with taddons.context(Proxyserver(), hygiene) as tctx:
        assert hygiene.limit == 3 * 1024 * 1024  # kube-apiserver's default
        tctx.configure(hygiene, max_request_body="16m")
        assert hygiene.limit == module._Stream.jitgate_max_request_body == 16 * 1024 * 1024
        for bad in ("lots", "0", "-1"):
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(hygiene, max_request_body=bad)
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(hygiene, stream_large_bodies="1m")
        tctx.configure(hygiene, max_request_body="3m")


def test_early_answers_are_installed_on_this_mitmproxy() -> None:
    from mitmproxy.proxy.layers.http import HttpStream

    assert load_addon("request_hygiene").EARLY_ANSWERS and HttpStream.jitgate_early_answers


def test_upstream_credential_reframes_an_h2_body_without_length() -> None:
    module = load_addon("upstream_credential")
    flow = h2_flow(((b"content-type", b"application/json"),), SMUGGLED)
    module.reframe(flow.request)
    assert flow.request.headers.get_all("content-length") == [str(len(SMUGGLED))]
    chunked = tflow.tflow()
    chunked.request.method = "POST"
    chunked.request.headers["Transfer-Encoding"] = "chunked"
    chunked.request.content = b"abc"
    module.reframe(chunked.request)
    assert "Transfer-Encoding" not in chunked.request.headers and chunked.request.headers["Content-Length"] == "3"
    streamed = tflow.tflow()
    streamed.request.data.content = None  # a body streamed past the chain has no known length
    with pytest.raises(RuntimeError):
        module.reframe(streamed.request)


def test_reframing_costs_little() -> None:
    import timeit

    module = load_addon("upstream_credential")
    hygiene = load_addon("request_hygiene").RequestHygiene()
    flow = tflow.tflow()
    flow.request.headers.fields = tuple((f"X-Header-{i}".encode(), b"value") for i in range(12))
    n = 2000
    reframe_us = timeit.timeit(lambda: module.reframe(flow.request), number=n) / n * 1e6
    with taddons.context(hygiene):
        check_us = timeit.timeit(lambda: hygiene.requestheaders(flow), number=n) / n * 1e6
    print(f"reframe {reframe_us:.1f} us, header check {check_us:.1f} us per call")
    assert reframe_us < 200 and check_us < 200
