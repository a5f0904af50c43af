"""The invariant of issue 7, tested: every byte that reaches a cluster was checked, as the cluster reads it.

A recording tap (testkit.tap) sits between the gateway and the stand-in cluster and keeps every
byte the cluster receives; testkit.reconcile checks it against the gateway's audit log: each
request the cluster received names (Audit-ID) exactly one audited call with decision `allow`,
the same verb, path and identity, and nothing else reached the cluster.

Two clusters, both behind taps in front of one stand-in:
- `inv`: a token_file credential with impersonation on, reached through `connect:` (the cluster's
  hostname resolves nowhere else);
- `direct`: a client_cert credential, endpoint `https://localhost:<tap>` without `connect:`, so a
  raw TCP relay of a client's bytes (after a CONNECT, or inside the gateway's own upstream TLS)
  would really reach it.

Then: a realistic kubectl session in both modes, and a battery of odd requests sent byte for byte
over TLS (reverse mode: straight to the listener; regular mode: after CONNECT), over HTTP/1.1 and
HTTP/2, each by a caller whose only grant is for namespace `dev`, some aimed at `prod`. After
each case the reconciliation over what the taps recorded since the case began must be empty.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.gateway import GatewayProcess
from testkit.net import TestCA
from testkit.rawclient import (
    MemoryTLS,
    client_context,
    connect_tunnel,
    h1_exchange,
    h2_exchange,
    open_tls,
    read_until_quiet,
    status_of,
)
from testkit.reconcile import ClusterExpectation, load_audit, reconcile, summary
from testkit.standin.process import KUBECTL, StandinProcess, kubectl_env, run_kubectl
from testkit.tap import Connection, TapProcess, parse_connection, websocket_frames
from tests.conftest import aws_env

REPO = Path(__file__).resolve().parents[1]
JITGATE = str(REPO / ".venv/bin/jitgate")

INV_HOST = "api.inv.jitgate.test"
INV_AUTHORITY = f"{INV_HOST}:6443"
INV_TOKEN = "inv-cluster-token-held-by-the-gateway"
GRANTED, OTHER = "dev", "prod"
ALICE = ("alice@example.com", ("oidc:developers",))
REVIEWER = ("rita@example.com", ("oidc:sre",))

RULES = """\
access_rules:
  - name: invariant
    requesters: [oidc:developers]
    clusters: [inv, direct]
    namespaces: [dev, prod]
    resources: [pods, configmaps, secrets, pods/log, pods/exec, pods/attach, pods/portforward, pods/proxy]
    verbs: [get, list, watch, create, update, patch, delete]
    duration: {default: 8h, max: 8h}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
"""


@dataclass
class Invariant:
    """The stack under test: stand-in, taps, gateway; and alice's token (grant: namespace dev only)."""

    ca: TestCA
    standin: StandinProcess
    taps: dict[str, TapProcess]
    expectations: dict[str, ClusterExpectation]
    gateway: GatewayProcess
    policy: Path
    token: str

    def authority(self, cluster: str) -> str:
        return self.expectations[cluster].authority

    def host(self, cluster: str) -> str:
        return self.authority(cluster).rsplit(":", 1)[0]

    def reverse_port(self, cluster: str) -> int:
        return self.gateway.reverse[cluster][1]

    def client_authority(self, mode: str, cluster: str) -> str:
        """The Host a real client sends: the server URL's authority."""
        return f"127.0.0.1:{self.reverse_port(cluster)}" if mode == "reverse" else self.authority(cluster)

    def tls(self, mode: str, cluster: str, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLSocket:
        if mode == "reverse":
            return open_tls(("127.0.0.1", self.reverse_port(cluster)), "127.0.0.1", [self.gateway.ca_path], alpn)
        return open_tls(("127.0.0.1", self.gateway.proxy_port), self.host(cluster), [self.gateway.ca_path], alpn,
                        tunnel_to=self.authority(cluster))

    def plain(self, mode: str, cluster: str) -> socket.socket:
        """A TCP connection to where the cluster is reached: the reverse listener, or a CONNECT tunnel."""
        if mode == "reverse":
            return socket.create_connection(("127.0.0.1", self.reverse_port(cluster)), timeout=3)
        sock, status = connect_tunnel(("127.0.0.1", self.gateway.proxy_port), self.authority(cluster))
        if status != 200:
            sock.close()
            raise ConnectionRefusedError(f"CONNECT {self.authority(cluster)}: {status}")
        return sock

    def settle(self) -> None:
        """Until the taps and the audit log are quiet: what was sent has been recorded."""
        paths = [t.record_path for t in self.taps.values()] + [self.gateway.audit_path]
        sizes = None
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            now = [p.stat().st_size if p.exists() else 0 for p in paths]
            if now == sizes:
                return
            sizes = now
            time.sleep(0.12)

    def smuggled_objects(self) -> str:
        """What a smuggled request created (asked of the stand-in directly), removed again."""
        path = f"/api/v1/namespaces/{OTHER}/configmaps/smuggled"
        code, _ = self.standin.json("GET", path, token=INV_TOKEN)
        if code != 200:
            return ""
        self.standin.json("DELETE", path, token=INV_TOKEN)
        return f"; the cluster CREATED configmap {OTHER}/smuggled"

    def recordings(self) -> list[tuple[ClusterExpectation, list[Connection]]]:
        return [(self.expectations[name], tap.connections()) for name, tap in self.taps.items()]

    def violations(self, since: float, until: float | None = None) -> list[str]:
        self.settle()
        events, problems = load_audit(self.gateway.audit_path)
        return reconcile(self.recordings(), events, since=since, until=until, audit_problems=problems)

    def kubeconfig(self, path: Path, cluster: str, mode: str) -> Path:
        args = [JITGATE, "kubeconfig", "--policy", str(self.policy), "--cluster", cluster, "--user", ALICE[0],
                "--token", self.token, "--gateway-ca", str(self.gateway.ca_path), "-o", str(path)]
        if mode == "reverse":
            args += ["--server", f"https://127.0.0.1:{self.reverse_port(cluster)}"]
        else:
            args += ["--proxy", self.gateway.proxy_url]
        subprocess.run(args, check=True, capture_output=True)
        return path


def grant_namespace(store: Path, policy: Path, cluster: str, namespace: str) -> str:
    from jitgate.access.model import Person
    from jitgate.access.scope import Scope
    from jitgate.policy.loader import load_policy
    from jitgate.store.sqlite import SQLiteStore

    rules = load_policy(policy).access_rules
    scope = Scope(cluster, (namespace,), False,
                  ("pods", "configmaps", "pods/log", "pods/exec", "pods/attach", "pods/portforward", "pods/proxy"),
                  ("get", "list", "watch", "create", "update", "patch", "delete"))
    with SQLiteStore(store) as s:
        now = time.time()
        request = s.create_request(rules, Person(*ALICE), scope, now=now, reason="invariant test")
        return s.review(rules, request.id, Person(*REVIEWER), "approve", "ok", now=now).grant.id


@pytest.fixture(scope="module")
def inv(ca: TestCA, idp, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("invariant")
    gateway_cert = ca.issue("jitgate-gateway-direct", client=True)
    with StandinProcess(work / "standin").start(ca, tokens=[INV_TOKEN], client_ca=ca.cert_path,
                                                hostnames=[INV_HOST]) as standin, \
            TapProcess(work / "tap-inv").start(ca, standin.port, [INV_HOST]) as tap_inv, \
            TapProcess(work / "tap-direct").start(ca, standin.port, ["localhost"], client_ca=ca.cert_path,
                                                   upstream_cert=gateway_cert) as tap_direct:
        direct_authority = f"localhost:{tap_direct.port}"
        (work / "inv-token").write_text(INV_TOKEN + "\n")
        policy = work / "policy.yaml"
        policy.write_text(RULES + f"""\
clusters:
  - name: inv
    endpoint: https://{INV_AUTHORITY}
    connect: 127.0.0.1:{tap_inv.port}
    ca_file: {ca.cert_path}
    credential:
      token_file: inv-token
    impersonate: true
  - name: direct
    endpoint: https://{direct_authority}
    ca_file: {ca.cert_path}
    credential:
      client_cert: {{cert_file: {gateway_cert[0]}, key_file: {gateway_cert[1]}}}
{idp.policy_section()}""")
        store = work / "jitgate.db"
        for cluster in ("inv", "direct"):
            grant_namespace(store, policy, cluster, GRANTED)
        gateway = GatewayProcess(work / "gw", policy,
                                 reverse_endpoints={"inv": f"https://{INV_AUTHORITY}", "direct": f"https://{direct_authority}"},
                                 options={"grant_store": str(store)}, env=aws_env(dict(os.environ), work)).start()
        try:
            token = idp.token("alice", email=ALICE[0], email_verified=True, groups=["developers"])
            yield Invariant(
                ca, standin, {"inv": tap_inv, "direct": tap_direct},
                {"inv": ClusterExpectation("inv", INV_AUTHORITY, impersonate=True, authorization=f"Bearer {INV_TOKEN}"),
                 "direct": ClusterExpectation("direct", direct_authority, impersonate=False, authorization=None)},
                gateway, policy, token)
        finally:
            gateway.stop()


# --- (a) a realistic kubectl session ---------------------------------------------------------------------


@dataclass
class Session:
    start: float
    end: float
    results: dict[str, subprocess.CompletedProcess]
    watch_lines: list[str]


@pytest.fixture(scope="module")
def session(inv: Invariant, tmp_path_factory: pytest.TempPathFactory) -> Session:
    work = tmp_path_factory.mktemp("kubectl")
    reverse = inv.kubeconfig(work / "reverse", "inv", "reverse")
    proxied = inv.kubeconfig(work / "proxied", "inv", "regular")
    direct = inv.kubeconfig(work / "direct", "direct", "reverse")
    results: dict[str, subprocess.CompletedProcess] = {}

    def k(name: str, config: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
        results[name] = run_kubectl(config, *args, **kwargs)
        return results[name]

    inv.settle()
    start = time.time()
    k("get pods", reverse, "get", "pods", "-n", GRANTED)
    k("get pod", reverse, "get", "pod", "toolbox", "-n", GRANTED, "-o", "json")
    k("create", reverse, "create", "configmap", "inv-session", "-n", GRANTED, "--from-literal=a=1")
    watch = subprocess.Popen([KUBECTL, "get", "configmaps", "-n", GRANTED, "-w", "--output-watch-events"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=kubectl_env(reverse))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(l.decode()) for l in watch.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while not any("inv-session" in l for l in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        k("create watched", reverse, "create", "configmap", "inv-watched", "-n", GRANTED, "--from-literal=b=2")
        while not any("inv-watched" in l for l in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.terminate()
        watch.wait(5)
    k("logs", reverse, "logs", "-n", GRANTED, "toolbox", "--tail=2")
    k("exec", reverse, "exec", "-n", GRANTED, "toolbox", "--", "cat", "/etc/hostname")
    k("exec stdin", reverse, "exec", "-i", "-n", GRANTED, "toolbox", "--", "cat", input="through the tap\n")
    k("delete", reverse, "delete", "configmap", "inv-session", "inv-watched", "-n", GRANTED)
    k("denied", reverse, "get", "pods", "-n", OTHER)
    k("proxied get pods", proxied, "get", "pods", "-n", GRANTED)
    k("proxied exec", proxied, "exec", "-n", GRANTED, "toolbox", "--", "echo", "via", "proxy")
    k("direct get pods", direct, "get", "pods", "-n", GRANTED)
    inv.settle()
    return Session(start, time.time(), results, lines)


def test_kubectl_session_works_through_the_gateway(session: Session) -> None:
    r = session.results
    for name, result in r.items():
        if name != "denied":
            assert result.returncode == 0, (name, result.stderr)
    assert "toolbox" in r["get pods"].stdout and "toolbox" in r["direct get pods"].stdout
    assert r["exec"].stdout.strip() == "toolbox" and r["exec stdin"].stdout == "through the tap\n"
    assert r["proxied exec"].stdout.strip() == "via proxy"
    assert any("inv-watched" in l for l in session.watch_lines), session.watch_lines
    assert r["denied"].returncode != 0 and "Forbidden" in r["denied"].stderr


def test_the_tap_recorded_the_kubectl_session(inv: Invariant, session: Session) -> None:
    """The taps are on the path: the normal requests are there, byte for byte (so a bypassed or deaf
    tap fails here, instead of letting the reconciliation pass on nothing)."""
    seen = [r for r in inv.taps["inv"].requests(since=session.start) if r.time <= session.end]
    paths = [(r.method, r.target.partition("?")[0]) for r in seen]
    for expected in [("GET", f"/api/v1/namespaces/{GRANTED}/pods"), ("GET", f"/api/v1/namespaces/{GRANTED}/pods/toolbox"),
                     ("POST", f"/api/v1/namespaces/{GRANTED}/configmaps"),
                     ("DELETE", f"/api/v1/namespaces/{GRANTED}/configmaps/inv-session"),
                     ("GET", f"/api/v1/namespaces/{GRANTED}/pods/toolbox/log"),
                     ("GET", f"/api/v1/namespaces/{GRANTED}/pods/toolbox/exec")]:
        assert expected in paths, (expected, paths)
    watches = [r for r in seen if "watch=true" in r.target and "/configmaps" in r.target]
    assert watches and watches[0].response_status == 200
    execs = [r for r in seen if r.target.partition("?")[0].endswith("/exec")]
    assert execs and all(r.response_status == 101 for r in execs), [(r.target, r.response_status) for r in execs]
    stdin = [payload for r in execs for _, payload in websocket_frames(r.upgraded_in or b"")]
    assert any(b"through the tap" in p for p in stdin), f"stdin frames are recorded: {stdin}"
    assert all(r.header("Authorization") == f"Bearer {INV_TOKEN}" for r in seen)
    assert all(r.header("Impersonate-User") == ALICE[0] for r in seen)
    assert not any(f"/namespaces/{OTHER}/" in r.target for r in seen), "the refused call never reached the cluster"
    assert len({r.connection for r in seen}) >= 3, "kubectl in both modes, several connections"
    direct = [r for r in inv.taps["direct"].requests(since=session.start) if r.time <= session.end]
    assert ("GET", f"/api/v1/namespaces/{GRANTED}/pods") in [(r.method, r.target.partition("?")[0]) for r in direct]
    direct_conns = {c.id: c for c in inv.taps["direct"].connections()}
    assert all("jitgate-gateway-direct" in (direct_conns[r.connection].tls or {}).get("client_cert", "") for r in direct)


def test_kubectl_session_reconciles(inv: Invariant, session: Session) -> None:
    violations = inv.violations(session.start, session.end)
    assert not violations, f"{len(violations)} violations:\n" + "\n".join(violations[:40])


# --- the checker checks ------------------------------------------------------------------------------


def _connection(data: bytes, response: bytes = b"", conn_id: int = 9001) -> Connection:
    conn = Connection(conn_id, time.time(), closed=time.time(), tls={"alpn": "http/1.1"})
    conn.inbound.append(data, time.time())
    if response:
        conn.outbound.append(response, time.time())
    parse_connection(conn)
    return conn


def test_the_parser_reads_as_a_strict_server_does() -> None:
    smuggled = _connection(b"POST /api/v1/namespaces/dev/configmaps HTTP/1.1\r\nHost: h\r\n\r\n"
                           b"POST /api/v1/namespaces/prod/configmaps HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}")
    assert [r.target for r in smuggled.requests] == ["/api/v1/namespaces/dev/configmaps", "/api/v1/namespaces/prod/configmaps"]
    assert smuggled.requests[1].body == b"{}"
    folded = _connection(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n Impersonate-User: admin\r\n\r\n")
    assert folded.requests[0].header("X-A") == "b Impersonate-User: admin" and folded.requests[0].problems
    clte = _connection(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [r.target for r in clte.requests] == ["/", "/smuggled"] and clte.requests[0].problems
    garbage = _connection(b"\x16\x03\x01garbage")
    assert not garbage.requests and garbage.problems
    upgraded = _connection(b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\nGET /raw HTTP/1.1\r\n\r\n",
                           b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n\r\n\x80\x03")
    assert len(upgraded.requests) == 1 and upgraded.requests[0].response_status == 101
    assert upgraded.requests[0].upgraded_in == b"GET /raw HTTP/1.1\r\n\r\n"


def test_reconciliation_reports_what_no_audited_call_let_through() -> None:
    """A self-check that can fail: a fabricated request without an audit event is a violation, and the
    same request with its matching audit event is not."""
    cluster = ClusterExpectation("inv", INV_AUTHORITY, impersonate=True, authorization=f"Bearer {INV_TOKEN}")
    request = ("GET /api/v1/namespaces/dev/pods?limit=500 HTTP/1.1\r\nHost: {h}\r\nAuthorization: Bearer {t}\r\n"
               "Impersonate-User: alice@example.com\r\nImpersonate-Group: oidc:developers\r\nAudit-ID: {a}\r\n\r\n")
    audit_id = "5e1c1c7e-4a38-4f5e-9b0e-1c2d3e4f5a6b"
    good = _connection(request.format(h=INV_AUTHORITY, t=INV_TOKEN, a=audit_id).encode(),
                       b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    event = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": audit_id,
             "stage": "ResponseComplete", "requestURI": "/api/v1/namespaces/dev/pods?limit=500", "verb": "list",
             "user": {"username": "alice@example.com", "groups": ["oidc:developers"]},
             "objectRef": {"resource": "pods", "namespace": "dev", "apiVersion": "v1"},
             "annotations": {"jitgate.dev/decision": "allow", "jitgate.dev/cluster": "inv"}}
    started = {**event, "stage": "ResponseStarted"}
    assert reconcile([(cluster, [good])], [started, event]) == []

    assert any("matches 0 audited calls" in v for v in reconcile([(cluster, [good])], []))
    denied = {**event, "annotations": {"jitgate.dev/decision": "deny", "jitgate.dev/cluster": "inv"}}
    assert any("not allow" in v for v in reconcile([(cluster, [good])], [denied]))
    other_path = {**event, "requestURI": "/api/v1/namespaces/dev/configmaps?limit=500"}
    assert any("audited path" in v for v in reconcile([(cluster, [good])], [other_path]))
    twice = _connection(request.format(h=INV_AUTHORITY, t=INV_TOKEN, a=audit_id).encode(), conn_id=9002)
    assert any("also used by" in v for v in reconcile([(cluster, [good, twice])], [event]))
    no_id = _connection(b"GET /api/v1/namespaces/prod/secrets HTTP/1.1\r\nHost: " + INV_AUTHORITY.encode() + b"\r\n\r\n")
    assert any("no Audit-ID" in v for v in reconcile([(cluster, [good, no_id])], [event]))
    as_admin = _connection(request.format(h=INV_AUTHORITY, t=INV_TOKEN, a=audit_id)
                           .replace("alice@example.com", "system:admin").encode())
    assert any("Impersonate-User" in v for v in reconcile([(cluster, [as_admin])], [event]))
    raw = _connection(b"\x00\x01\x02not http at all")
    assert any("not a well-formed request" in v for v in reconcile([(cluster, [raw])], []))


# --- (b) the battery --------------------------------------------------------------------------------------

CASES: list = []
MODES = ("reverse", "regular")


def case(name: str, modes: tuple[str, ...] = MODES, clusters: tuple[str, ...] = ("inv",)):
    def register(fn: Callable[[Invariant, str, str], str]):
        for cluster in clusters:
            for mode in modes:
                suffix = "" if cluster == "inv" else f"-{cluster}"
                CASES.append(pytest.param(fn, mode, cluster, id=f"{name}-{mode}{suffix}"))
        return fn
    return register


def describe(status: int | None, raw: bytes) -> str:
    first = raw.split(b"\r\n", 1)[0][:100] if raw.startswith(b"HTTP/") else raw[:100]
    message = b""
    if b'"message"' in raw:
        try:
            message = json.loads(raw[raw.index(b"{"):raw.rindex(b"}") + 1]).get("message", "").encode()[:160]
        except ValueError:
            pass
    return f"client got {status}: {first!r} {message.decode(errors='replace')}".strip()


def build(inv: Invariant, mode: str, cluster: str, method: str, target: str, headers: list[bytes | str] = (),
          body: bytes = b"", length: bool = True, host: str | None = None, token: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), f"Host: {host or inv.client_authority(mode, cluster)}".encode()]
    if token:
        lines.append(f"Authorization: Bearer {inv.token}".encode())
    lines += [h.encode() if isinstance(h, str) else h for h in headers]
    if length and body:
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def smuggled(inv: Invariant, cluster: str, method: str = "POST", namespace: str = OTHER) -> bytes:
    """A complete request a cluster would read as the next one on the gateway's connection."""
    if method == "POST":
        obj = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smuggled"}}).encode()
        return (f"POST /api/v1/namespaces/{namespace}/configmaps HTTP/1.1\r\nHost: {inv.authority(cluster)}\r\n"
                f"Impersonate-User: system:admin\r\nContent-Type: application/json\r\nContent-Length: {len(obj)}\r\n\r\n"
                ).encode() + obj
    return f"GET /api/v1/namespaces/{namespace}/secrets HTTP/1.1\r\nHost: {inv.authority(cluster)}\r\n\r\n".encode()


def send_h1(inv: Invariant, mode: str, cluster: str, request: bytes, timeout: float = 1.5) -> str:
    try:
        sock = inv.tls(mode, cluster)
    except (OSError, ssl.SSLError) as e:
        return f"no TLS to the gateway: {e}"
    with sock:
        return describe(*h1_exchange(sock, request, timeout))


def send_h2(inv: Invariant, mode: str, cluster: str, method: str, path: str, headers: list = (),
            body: bytes | None = None, authority: str | None = None) -> str:
    try:
        sock = inv.tls(mode, cluster, alpn=("h2",))
    except (OSError, ssl.SSLError) as e:
        return f"no TLS to the gateway: {e}"
    with sock:
        if sock.selected_alpn_protocol() != "h2":
            return f"gateway did not negotiate h2 ({sock.selected_alpn_protocol()})"
        pseudo = [(":method", method), (":scheme", "https"), (":authority", authority or inv.client_authority(mode, cluster)),
                  (":path", path), ("authorization", f"Bearer {inv.token}")]
        status, data = h2_exchange(sock, pseudo + list(headers), body, timeout=1.5)
        return describe(status, data)


PODS = f"/api/v1/namespaces/{GRANTED}/pods"
CONFIGMAPS = f"/api/v1/namespaces/{GRANTED}/configmaps"
EXEC_QUERY = "container=shell&command=cat&stdin=true&stdout=true"


def _simple(name: str, method: str, target: str, headers: list = (), body: bytes = b"", **kw) -> None:
    case(name)(lambda inv, mode, cluster: send_h1(inv, mode, cluster, build(inv, mode, cluster, method, target, headers, body, **kw)))


# Controls: what the gateway must let through (and audit), and what it must refuse.
REACHES_THE_CLUSTER: set = set()
_simple("h1-control-other-namespace", "GET", f"/api/v1/namespaces/{OTHER}/pods")


@case("h1-control-granted-list", clusters=("inv", "direct"))
def _control_h1(inv, mode, cluster):
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "GET", PODS))


@case("h2-control-granted-list", clusters=("inv", "direct"))
def _control_h2(inv, mode, cluster):
    return send_h2(inv, mode, cluster, "GET", PODS)


REACHES_THE_CLUSTER |= {_control_h1, _control_h2}


# HTTP/2 framing and header values, translated to HTTP/1.1 upstream.
@case("h2-post-body-without-content-length", clusters=("inv", "direct"))
def _h2_post_no_length(inv, mode, cluster):
    return send_h2(inv, mode, cluster, "POST", CONFIGMAPS, [("content-type", "application/json")], smuggled(inv, cluster))


@case("h2-get-body-without-content-length", clusters=("inv", "direct"))
def _h2_get_body(inv, mode, cluster):
    return send_h2(inv, mode, cluster, "GET", PODS, [], smuggled(inv, cluster, "GET"))


@case("h2-content-length-smaller-than-body")
def _h2_short_length(inv, mode, cluster):
    return send_h2(inv, mode, cluster, "POST", CONFIGMAPS, [("content-type", "application/json"), ("content-length", "2")],
                   b"{}" + smuggled(inv, cluster))


@case("h2-transfer-encoding-chunked")
def _h2_te(inv, mode, cluster):
    return send_h2(inv, mode, cluster, "POST", CONFIGMAPS, [("content-type", "application/json"), ("transfer-encoding", "chunked")],
                   b"0\r\n\r\n" + smuggled(inv, cluster))


for _name, _header in {
    "h2-crlf-in-header-value": ("x-note", "a\r\nImpersonate-User: system:admin"),
    "h2-lf-in-header-value": ("x-note", "a\nImpersonate-Group: system:masters"),
    "h2-nul-in-header-value": ("x-note", "a\x00b"),
    "h2-crlf-in-header-name": ("x-note\r\nimpersonate-user", "system:admin"),
    "h2-impersonate-user": ("impersonate-user", "system:admin"),
    "h2-x-remote-user": ("x-remote-user", "system:admin"),
}.items():
    case(_name)(lambda inv, mode, cluster, h=_header: send_h2(inv, mode, cluster, "GET", PODS, [h]))

case("h2-authority-other-host")(lambda inv, mode, cluster: send_h2(inv, mode, cluster, "GET", PODS, authority="other.example:443"))
case("h2-absolute-path")(lambda inv, mode, cluster: send_h2(inv, mode, cluster, "GET", f"https://other.example{PODS}"))
case("h2-dot-segments")(lambda inv, mode, cluster: send_h2(inv, mode, cluster, "GET", f"/api/v1/namespaces/{GRANTED}/../{OTHER}/pods"))
case("h2-spdy-upgrade-headers-on-exec")(lambda inv, mode, cluster: send_h2(
    inv, mode, cluster, "POST", f"{PODS}/toolbox/exec?container=shell&command=id&stdout=true",
    [("connection", "Upgrade"), ("upgrade", "SPDY/3.1"), ("x-stream-protocol-version", "v4.channel.k8s.io")]))


# HTTP/1.1 framing.
@case("h1-content-length-and-chunked", clusters=("inv", "direct"))
def _cl_te(inv, mode, cluster):
    body = b"0\r\n\r\n" + smuggled(inv, cluster)
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        f"Content-Length: {len(body)}", "Transfer-Encoding: chunked", "Content-Type: application/json"], body, length=False))


@case("h1-chunked-and-content-length")
def _te_cl(inv, mode, cluster):
    body = b"0\r\n\r\n" + smuggled(inv, cluster)
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        "Transfer-Encoding: chunked", f"Content-Length: {len(body)}", "Content-Type: application/json"], body, length=False))


@case("h1-conflicting-content-lengths")
def _cl_cl(inv, mode, cluster):
    body = smuggled(inv, cluster)
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        "Content-Length: 0", f"Content-Length: {len(body)}", "Content-Type: application/json"], body, length=False))


@case("h1-duplicate-content-length")
def _cl_dup(inv, mode, cluster):
    body = b'{"metadata":{"name":"dup-cl"}}'
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        f"Content-Length: {len(body)}", f"Content-Length: {len(body)}", "Content-Type: application/json"], body, length=False))


@case("h1-duplicate-transfer-encoding")
def _te_dup(inv, mode, cluster):
    obj = b'{"metadata":{"name":"dup-te"}}'
    body = f"{len(obj):x}\r\n".encode() + obj + b"\r\n0\r\n\r\n"
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        "Transfer-Encoding: chunked", "Transfer-Encoding: chunked", "Content-Type: application/json"], body, length=False))


@case("h1-transfer-encoding-space-before-colon")
def _te_space(inv, mode, cluster):
    body = b"0\r\n\r\n" + smuggled(inv, cluster)
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        "Transfer-Encoding : chunked", f"Content-Length: {len(body)}", "Content-Type: application/json"], body, length=False))


@case("h1-transfer-encoding-not-chunked-last")
def _te_identity(inv, mode, cluster):
    body = b"0\r\n\r\n" + smuggled(inv, cluster)
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        "Transfer-Encoding: chunked, identity", f"Content-Length: {len(body)}", "Content-Type: application/json"], body,
        length=False))


@case("h1-obs-fold-transfer-encoding")
def _fold_te(inv, mode, cluster):
    body = b"0\r\n\r\n" + smuggled(inv, cluster)
    return send_h1(inv, mode, cluster, build(inv, mode, cluster, "POST", CONFIGMAPS, [
        "X-Note: hello", "\tTransfer-Encoding: chunked", f"Content-Length: {len(body)}", "Content-Type: application/json"],
        body, length=False))


# HTTP/1.1 header lines and values.
_simple("h1-obs-fold-impersonate", "GET", PODS, ["X-Note: hello", " Impersonate-User: system:admin"])
_simple("h1-bare-lf-in-header", "GET", PODS, [b"X-Note: a\nImpersonate-User: system:admin"])
_simple("h1-bare-cr-in-header", "GET", PODS, [b"X-Note: a\rImpersonate-User: system:admin"])
_simple("h1-nul-in-header-value", "GET", PODS, [b"X-Note: a\x00b"])
_simple("h1-space-before-colon-impersonate", "GET", PODS, ["Impersonate-User : system:admin"])
_simple("h1-impersonate-user", "GET", PODS, ["Impersonate-User: system:admin"])
_simple("h1-impersonate-group", "GET", PODS, ["impersonate-group: system:masters"])
_simple("h1-impersonate-uid", "GET", PODS, ["Impersonate-Uid: 0"])
_simple("h1-impersonate-extra", "GET", PODS, ["Impersonate-Extra-Scopes: cluster-admin"])
_simple("h1-x-remote-user", "GET", PODS, ["X-Remote-User: system:admin", "X-Remote-Group: system:masters"])
case("h1-x-remote-user", modes=("reverse",), clusters=("direct",))(
    lambda inv, mode, cluster: send_h1(inv, mode, cluster, build(inv, mode, cluster, "GET", PODS, [
        "X-Remote-User: system:admin", "X-Remote-Group: system:masters"])))
_simple("h1-duplicate-host", "GET", PODS, ["Host: other.example"])
_simple("h1-lowercase-method", "get", PODS)

# Targets.
_simple("h1-absolute-form-other-host", "GET", f"https://other.example{PODS}", host="other.example")
_simple("h1-path-parameter-in-namespace", "GET", f"/api/v1/namespaces/{GRANTED};x=y/pods")
_simple("h1-path-parameter-in-resource", "GET", f"{PODS};x=y")
_simple("h1-dot-segments", "GET", f"/api/v1/namespaces/{GRANTED}/../{OTHER}/pods")
_simple("h1-encoded-dot-segments", "GET", f"/api/v1/namespaces/{GRANTED}/%2e%2e/{OTHER}/pods")
_simple("h1-encoded-slash", "GET", f"{CONFIGMAPS}/app-config%2F..%2F..%2F..%2F{OTHER}%2Fconfigmaps")
_simple("h1-double-slash", "GET", f"/api/v1/namespaces/{GRANTED}//pods")

# Upgrades the gateway cannot inspect.
_simple("h1-spdy-exec", "POST", f"{PODS}/toolbox/exec?container=shell&command=id&stdout=true",
        ["Connection: Upgrade", "Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: v4.channel.k8s.io"])
_simple("h1-spdy-exec-other-namespace", "POST", f"/api/v1/namespaces/{OTHER}/pods/api/exec?command=id&stdout=true",
        ["Connection: Upgrade", "Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: v4.channel.k8s.io"])
_simple("h1-spdy-portforward", "POST", f"{PODS}/toolbox/portforward?ports=80",
        ["Connection: Upgrade", "Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: portforward.k8s.io"])
_simple("h1-pods-proxy-upgrade", "GET", f"{PODS}/toolbox/proxy/", ["Connection: Upgrade", "Upgrade: tcp"])


def websocket_handshake(inv, mode, cluster, target: str, extra: list[str]) -> str:
    key = base64.b64encode(os.urandom(16)).decode()
    request = build(inv, mode, cluster, "GET", target, ["Connection: Upgrade", "Upgrade: websocket", f"Sec-WebSocket-Key: {key}",
                                                         "Sec-WebSocket-Protocol: v5.channel.k8s.io", *extra])
    try:
        sock = inv.tls(mode, cluster)
    except (OSError, ssl.SSLError) as e:
        return f"no TLS to the gateway: {e}"
    with sock:
        status, raw = h1_exchange(sock, request, 1.5)
        if status == 101:
            # One masked binary frame on the stdin channel; then what comes back.
            payload = b"\x00hello from a raw stream\n"
            mask = os.urandom(4)
            sock.sendall(bytes([0x82, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            raw += read_until_quiet(sock, 0.5)
        return describe(status, raw)


case("h1-websocket-duplicate-version-exec")(lambda inv, mode, cluster: websocket_handshake(
    inv, mode, cluster, f"{PODS}/toolbox/exec?{EXEC_QUERY}", ["Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 13"]))
case("h1-websocket-exec-other-namespace")(lambda inv, mode, cluster: websocket_handshake(
    inv, mode, cluster, f"/api/v1/namespaces/{OTHER}/pods/api/exec?{EXEC_QUERY}", ["Sec-WebSocket-Version: 13"]))


# First bytes: what the gateway's protocol detection makes of a connection.
BOTH = ("inv", "direct")


def _request_bytes(inv: Invariant, cluster: str) -> bytes:
    return (f"GET /api/v1/namespaces/{OTHER}/secrets HTTP/1.1\r\nHost: {inv.authority(cluster)}\r\n"
            f"Authorization: Bearer {inv.token}\r\n\r\n").encode()


@case("first-bytes-not-tls-not-http", clusters=BOTH)
def _not_tls(inv, mode, cluster):
    try:
        sock = inv.plain(mode, cluster)
    except OSError as e:
        return f"no tunnel: {e}"
    with sock:
        sock.sendall(b"\x00\x01\x02\x03 raw bytes for the cluster\r\n")
        return f"client got {read_until_quiet(sock, 0.6)[:100]!r}"


@case("first-bytes-two-then-plain-http", clusters=BOTH)
def _two_plain(inv, mode, cluster):
    try:
        sock = inv.plain(mode, cluster)
    except OSError as e:
        return f"no tunnel: {e}"
    with sock:
        data = _request_bytes(inv, cluster)
        sock.sendall(data[:2])
        time.sleep(0.2)
        sock.sendall(data[2:])
        return f"client got {read_until_quiet(sock, 0.5)[:100]!r}"


@case("first-bytes-split-clienthello", clusters=BOTH)
def _split_hello(inv, mode, cluster):
    try:
        sock = inv.plain(mode, cluster)
    except OSError as e:
        return f"no tunnel: {e}"
    with sock:
        # Trust both the gateway's CA and the cluster's: whoever answers, the handshake completes.
        ctx = client_context([inv.gateway.ca_path, inv.ca.cert_path])
        tls = MemoryTLS(sock, ctx, inv.host(cluster) if mode == "regular" else "127.0.0.1")
        try:
            tls.handshake(first_write=2, pause=0.2)
        except (OSError, ssl.SSLError) as e:
            return f"handshake failed: {e}"
        issuer = tls.tls.getpeercert().get("issuer")
        tls.send(_request_bytes(inv, cluster))
        return f"TLS with {issuer}; client got {tls.recv_until_quiet(0.5)[:100]!r}"


@case("first-bytes-two-byte-tls-record", clusters=BOTH)
def _two_byte_record(inv, mode, cluster):
    try:
        sock = inv.tls(mode, cluster, alpn=())  # no ALPN: the gateway must tell HTTP from the bytes
    except (OSError, ssl.SSLError) as e:
        return f"no TLS to the gateway: {e}"
    with sock:
        data = _request_bytes(inv, cluster)
        sock.sendall(data[:2])  # one TLS record holding two bytes
        time.sleep(0.2)
        sock.sendall(data[2:])
        raw = read_until_quiet(sock, 0.5)
        return describe(status_of(raw), raw)


@case("first-bytes-h2-preface-in-clear", modes=("regular",))
def _h2c(inv, mode, cluster):
    try:
        sock = inv.plain(mode, cluster)
    except OSError as e:
        return f"no tunnel: {e}"
    with sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return f"client got {read_until_quiet(sock, 0.6)[:100]!r}"


@pytest.mark.parametrize("send, mode, cluster", CASES)
def test_battery(inv: Invariant, send, mode: str, cluster: str) -> None:
    start = time.time()  # the previous case (or the session) ended with a settle
    outcome = send(inv, mode, cluster) + inv.smuggled_objects()
    violations = inv.violations(start)
    received = [r for tap in inv.taps.values() for r in tap.requests(since=start)]
    outcome += "\nthe cluster received: " + ("; ".join(summary(r) for r in received) or "nothing")
    print(outcome)
    if send in REACHES_THE_CLUSTER:
        assert any(r.response_status == 200 and r.header("Audit-ID") for r in received), \
            f"a granted call must reach the cluster through the tap: {outcome}"
    assert not violations, f"{outcome}\nwhat reached the cluster unchecked:\n" + "\n".join(violations)
