"""Long-running and upgraded calls (issue 7, class 5: sessions that outlive grants).

Every long-running call is known from the request attributes alone (`RequestInfo.long_running`,
`follow` read as the apiserver reads it), streamed, tracked until it really ends, ended within
seconds of a revocation, and audited when it ends. The gateway inspects WebSocket sessions only:
any other upgrade (SPDY/3.1, which kubectl falls back to; a protocol switch through a proxy
subresource; a WebSocket handshake mitmproxy would not read as one) is refused before it is
forwarded, and a 101 that is no WebSocket ends the connection.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from mitmproxy import http as mhttp
from mitmproxy.test import taddons, tflow

from jitgate.access.model import Person
from jitgate.chain.flow import call_of, refuse
from jitgate.identity.oidc import Identity
from jitgate.kube.request_info import parse_request
from jitgate.policy.clusters import Cluster, TokenFileCredential
from jitgate.policy.loader import load_policy
from jitgate.store.sqlite import SQLiteStore
from testkit.gateway import GatewayProcess
from testkit.rawclient import h2_exchange, open_tls, read_h1_response, read_until_quiet, status_of
from testkit.standin.process import KUBECTL, StandinProcess, kubectl_env, run_kubectl
from tests.conftest import ALICE, E2E_RULES, INSPECTOR_TOKEN, REVIEWER, Stack, aws_env, grant_everything

REPO = Path(__file__).resolve().parents[1]
TOKEN = "upgrades-cluster-token-held-by-the-gateway"
REFUSAL = "jitgate: only WebSocket upgrades are inspected; {} was refused; kubectl uses WebSocket by default"
ODD_HOST = "api.odd.jitgate.test"
EXEC = "/api/v1/namespaces/dev/pods/toolbox/exec?command=echo&command=hi&container=shell&stdout=true&stderr=true"


# --- a cluster that misbehaves where the stand-in is polite -------------------------------------------


class OddCluster:
    """A TLS "cluster" in a thread: follows a log for any `follow` value (as kube does, where the
    stand-in follows only `follow=true`), and answers an exec WebSocket handshake with a 101 that
    is no WebSocket, then relays nothing but records what reaches it after the switch."""

    def __init__(self, ca, name: str = "odd-cluster") -> None:
        cert, key = ca.issue(name, hosts=[ODD_HOST, "127.0.0.1"])
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.context.set_alpn_protocols(["http/1.1"])
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.requests: list[tuple[str, str, dict]] = []
        self.after_switch = b""
        self.stopped = False
        threading.Thread(target=self.serve, daemon=True).start()

    def stop(self) -> None:
        self.stopped = True
        self.server.close()

    def serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.connection, args=(conn,), daemon=True).start()

    def connection(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
            buf = b""
            while not self.stopped:
                while b"\r\n\r\n" not in buf:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
                self.requests.append((method, target, headers))
                if "/log" in target:
                    return self.follow(tls)
                if "/exec" in target and "upgrade" in headers:
                    return self.switch(tls, buf)
                body = b'{"kind":"Status","apiVersion":"v1","status":"Success"}'
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def follow(self, tls: ssl.SSLSocket) -> None:
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        n = 0
        while not self.stopped:
            line = f"line {n}\n".encode()
            tls.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            n += 1
            time.sleep(0.2)

    def switch(self, tls: ssl.SSLSocket, already: bytes) -> None:
        tls.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\nraw bytes from the cluster")
        self.after_switch += already
        tls.settimeout(5)
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                return
            self.after_switch += chunk


# --- the environment -----------------------------------------------------------------------------------


@dataclass
class Upgrades:
    gateway: GatewayProcess
    clusters: dict[str, StandinProcess]  # "token": token_file credential, "cert": client_cert credential
    odd: OddCluster
    policy: Path
    store: Path
    token: str

    def authority(self, name: str) -> str:
        if name == "odd":
            return f"{ODD_HOST}:443"
        return f"{'localhost' if name == 'token' else '127.0.0.1'}:{self.clusters[name].port}"

    def host(self, name: str) -> str:
        return self.authority(name).rsplit(":", 1)[0]

    def connect(self, mode: str, name: str, alpn=("http/1.1",)) -> ssl.SSLSocket:
        if mode == "reverse":
            return open_tls(("127.0.0.1", self.gateway.reverse[name][1]), "127.0.0.1", [self.gateway.ca_path], alpn)
        return open_tls(("127.0.0.1", self.gateway.proxy_port), self.host(name), [self.gateway.ca_path], alpn,
                        tunnel_to=self.authority(name))

    def seen(self, name: str) -> list[dict]:
        return [r for r in self.clusters[name].requests_seen() if not r["path"].startswith("/_standin")]


@pytest.fixture(scope="module")
def env(ca, idp, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("upgrades")
    client_cert, client_key = ca.issue("jitgate-upgrades-client", client=True)
    with contextlib.ExitStack() as cleanup:
        token_api = cleanup.enter_context(StandinProcess(work / "token-cluster").start(ca, tokens=[INSPECTOR_TOKEN, TOKEN]))
        cert_api = cleanup.enter_context(StandinProcess(work / "cert-cluster").start(ca, tokens=[INSPECTOR_TOKEN], client_ca=ca.cert_path))
        odd = OddCluster(ca)
        cleanup.callback(odd.stop)
        yield from _env(ca, idp, work, client_cert, client_key, token_api, cert_api, odd)


def _env(ca, idp, work, client_cert, client_key, token_api, cert_api, odd):
    (work / "cluster-token").write_text(TOKEN + "\n")
    policy = work / "policy.yaml"
    policy.write_text(E2E_RULES.replace("pods/attach]", "pods/attach, pods/portforward, pods/proxy, services/proxy, nodes/proxy]")
                      + SHORT_RULE + f"""\
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
  - name: odd
    endpoint: https://{ODD_HOST}
    connect: 127.0.0.1:{odd.port}
    ca_file: {ca.cert_path}
    credential:
      token_file: cluster-token
{idp.policy_section()}""")
    store = work / "jitgate.db"
    for cluster in ("token", "cert", "odd"):
        grant_everything(store, policy, cluster)
    gateway = GatewayProcess(work / "gw", policy,
                             reverse_endpoints={"token": f"https://localhost:{token_api.port}",
                                                "cert": f"https://127.0.0.1:{cert_api.port}",
                                                "odd": f"https://{ODD_HOST}"},
                             options={"grant_store": str(store)}, env=aws_env(dict(os.environ), work)).start()
    token = idp.token("alice", email=ALICE[0], email_verified=True, groups=["developers", "sre"])
    try:
        yield Upgrades(gateway, {"token": token_api, "cert": cert_api}, odd, policy, store, token)
    finally:
        gateway.stop()


SHORT_RULE = """\
  - name: short-follow
    requesters: [oidc:short]
    clusters: [odd]
    namespaces: [dev]
    resources: [pods/log]
    verbs: [get]
    duration: {default: 4s, max: 4s}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
"""


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def handshake(path: str, authority: str, token: str, fields: list[tuple[str, str]], method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", f"Authorization: Bearer {token}"]
    lines += [f"{k}: {v}" for k, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def good_ws() -> list[tuple[str, str]]:
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", ws_key()), ("Sec-WebSocket-Protocol", "v5.channel.k8s.io")]


def without(fields, name):
    return [(k, v) for k, v in fields if k.lower() != name.lower()]


# name -> (path, header fields, method, what the refusal names)
MALFORMED = {
    "duplicated-version": (EXEC, lambda: good_ws() + [("Sec-WebSocket-Version", "13")], "GET",
                           "a malformed WebSocket handshake (Sec-WebSocket-Version must be 13, once)"),
    "version-8": (EXEC, lambda: without(good_ws(), "Sec-WebSocket-Version") + [("Sec-WebSocket-Version", "8")], "GET",
                  "a malformed WebSocket handshake (Sec-WebSocket-Version must be 13, once)"),
    "missing-key": (EXEC, lambda: without(good_ws(), "Sec-WebSocket-Key"), "GET",
                    "a malformed WebSocket handshake (Sec-WebSocket-Key must be one base64 nonce of 16 bytes)"),
    "short-key": (EXEC, lambda: without(good_ws(), "Sec-WebSocket-Key") + [("Sec-WebSocket-Key", "c2hvcnQ=")], "GET",
                  "a malformed WebSocket handshake (Sec-WebSocket-Key must be one base64 nonce of 16 bytes)"),
    "two-keys": (EXEC, lambda: good_ws() + [("Sec-WebSocket-Key", ws_key())], "GET",
                 "a malformed WebSocket handshake (Sec-WebSocket-Key must be one base64 nonce of 16 bytes)"),
    "upgrade-twice": (EXEC, lambda: good_ws() + [("Upgrade", "websocket")], "GET",
                      "a malformed WebSocket handshake (Upgrade must be exactly 'websocket', once)"),
    "websocket-and-h2c": (EXEC, lambda: without(good_ws(), "Upgrade") + [("Upgrade", "websocket, h2c")], "GET",
                          "an upgrade to another protocol"),
    "connection-keep-alive": (EXEC, lambda: without(good_ws(), "Connection") + [("Connection", "keep-alive")], "GET",
                              "a malformed WebSocket handshake (Connection must name 'upgrade')"),
    "odd-connection": (EXEC, lambda: without(good_ws(), "Connection") + [("Connection", "x-upgraded")], "GET",
                       "a malformed WebSocket handshake (Connection must name 'upgrade')"),
    "post": (EXEC, good_ws, "POST", "a malformed WebSocket handshake (it must be an HTTP/1.1 GET)"),
    "spdy-exec": (EXEC, lambda: [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade"), ("X-Stream-Protocol-Version", "v4.channel.k8s.io")],
                  "POST", "a SPDY upgrade"),
    "spdy-attach": ("/api/v1/namespaces/dev/pods/toolbox/attach?stdout=true", lambda: [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade")],
                    "POST", "a SPDY upgrade"),
    "spdy-portforward": ("/api/v1/namespaces/dev/pods/toolbox/portforward?ports=80", lambda: [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade")],
                         "POST", "a SPDY upgrade"),
    "pods-proxy-h2c": ("/api/v1/namespaces/dev/pods/toolbox/proxy/", lambda: [("Upgrade", "H2C"), ("Connection", "Upgrade, HTTP2-Settings"), ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")],
                       "GET", "an upgrade to another protocol"),
    "pods-proxy-tcp": ("/api/v1/namespaces/dev/pods/toolbox:8080/proxy/shell", lambda: [("Upgrade", "tcp"), ("Connection", "upgrade")],
                       "GET", "an upgrade to another protocol"),
    "pods-proxy-connection-only": ("/api/v1/namespaces/dev/pods/toolbox/proxy/", lambda: [("Connection", "Upgrade")],
                                   "GET", "a connection upgrade without an Upgrade header"),
    "services-proxy-spdy": ("/api/v1/namespaces/dev/services/web/proxy/", lambda: [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade")],
                            "GET", "a SPDY upgrade"),
    "nodes-proxy-malformed-ws": ("/api/v1/nodes/node-1/proxy/exec/dev/toolbox/shell?cmd=sh", lambda: without(good_ws(), "Sec-WebSocket-Key"),
                                 "GET", "a malformed WebSocket handshake (Sec-WebSocket-Key must be one base64 nonce of 16 bytes)"),
    "proxy-verb-spdy": ("/api/v1/proxy/namespaces/dev/pods/toolbox/", lambda: [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade")],
                        "GET", "a SPDY upgrade"),
    "non-resource": ("/version", lambda: [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade")], "GET", "a SPDY upgrade"),
}


def audited_refusal(env: Upgrades, what: str, timeout: float = 3.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = [e for e in env.gateway.audit_events()
                  if e.get("annotations", {}).get("jitgate.dev/upgrade-refused") == what]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


# --- upgrades the gateway cannot inspect are refused before they are forwarded --------------------------


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("name", ["token", "cert"])
@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_uninspectable_upgrade_is_refused_before_forwarding(env: Upgrades, mode: str, name: str, case: str) -> None:
    path, fields, method, what = MALFORMED[case]
    env.clusters[name].clear_seen()
    sock = env.connect(mode, name)
    try:
        sock.sendall(handshake(path, env.authority(name), env.token, fields(), method))
        answer = read_h1_response(sock, timeout=3)
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 400, answer[:400]
    status = json.loads(body)
    assert status["kind"] == "Status" and status["message"] == REFUSAL.format(what), status
    time.sleep(0.1)
    assert env.seen(name) == [], "the upgrade request reached the cluster"
    events = audited_refusal(env, what)
    assert events and events[-1]["annotations"]["jitgate.dev/decision"] == "deny"
    assert events[-1]["responseStatus"]["code"] == 400


@pytest.mark.parametrize("name", ["token", "cert"])
@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_well_formed_websocket_handshake_is_forwarded(env: Upgrades, mode: str, name: str) -> None:
    """The control: a strict handshake passes, becomes a WebSocket session and ends audited."""
    env.clusters[name].clear_seen()
    sock = env.connect(mode, name)
    try:
        sock.sendall(handshake(EXEC, env.authority(name), env.token, good_ws()))
        answer = read_until_quiet(sock, timeout=2)
    finally:
        sock.close()
    assert status_of(answer) == 101, answer[:300]
    assert b"\x01hi\n" in answer, "the exec's stdout frame came through"
    (record,) = [r for r in env.seen(name) if r["path"].endswith("/exec")]
    assert record["headers"]["Upgrade"] == "websocket"


@pytest.mark.parametrize("name", ["token", "cert"])
@pytest.mark.parametrize("mode", ["reverse", "regular"])
@pytest.mark.parametrize("headers", [
    [("upgrade", "SPDY/3.1"), ("connection", "Upgrade")],
    [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")],
], ids=["spdy", "websocket"])
def test_upgrade_headers_over_http2_never_reach_the_cluster(env: Upgrades, mode: str, name: str, headers) -> None:
    """HTTP/2 has no Upgrade; an HTTP/2 request carrying its headers must not turn into an HTTP/1.1
    upgrade towards the cluster."""
    env.clusters[name].clear_seen()
    sock = env.connect(mode, name, alpn=("h2",))
    try:
        assert sock.selected_alpn_protocol() == "h2"
        status, body = h2_exchange(sock, [(":method", "POST" if "SPDY" in headers[0][1] else "GET"), (":scheme", "https"),
                                          (":authority", env.authority(name)), (":path", EXEC),
                                          ("authorization", f"Bearer {env.token}")] + headers)
    finally:
        sock.close()
    assert status in (None, 400), (status, body[:300])
    time.sleep(0.1)
    assert env.seen(name) == []


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_a_101_that_is_no_websocket_ends_the_connection(env: Upgrades, mode: str) -> None:
    """Defence in depth: a well-formed handshake the cluster answers with another protocol would
    become a raw TCP relay; the gateway ends the connection and nothing of either side crosses."""
    env.odd.after_switch = b""
    sock = env.connect(mode, "odd")
    try:
        sock.sendall(handshake(EXEC, env.authority("odd"), env.token, good_ws()))
        time.sleep(0.3)
        try:
            sock.sendall(b"raw bytes from the client")
        except OSError:
            pass
        answer = read_until_quiet(sock, timeout=2)
    finally:
        sock.close()
    assert b"101" not in answer.split(b"\r\n", 1)[0] and b"raw bytes from the cluster" not in answer, answer[:300]
    time.sleep(0.2)
    assert b"raw bytes from the client" not in env.odd.after_switch
    ended = [e for e in env.gateway.audit_events()
             if e.get("annotations", {}).get("jitgate.dev/terminated") == "protocol switch without a WebSocket"]
    assert ended and ended[-1]["annotations"]["jitgate.dev/decision"] == "deny"
    assert ended[-1]["responseStatus"]["code"] == 502


# --- logs: follow as the apiserver reads it --------------------------------------------------------------


def open_follow(env: Upgrades, mode: str, value: str, token: str | None = None) -> tuple[ssl.SSLSocket, bytes]:
    sock = env.connect(mode, "odd")
    sock.sendall(f"GET /api/v1/namespaces/dev/pods/toolbox/log?follow={value} HTTP/1.1\r\nHost: {env.authority('odd')}\r\n"
                 f"Authorization: Bearer {token or env.token}\r\n\r\n".encode())
    sock.settimeout(3)
    received = b""
    deadline = time.monotonic() + 3
    try:
        while b"line 1\n" not in received and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (socket.timeout, OSError):
        pass
    return sock, received


@pytest.mark.parametrize("mode", ["reverse", "regular"])
@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "t", "T", "yes", ""])
def test_followed_logs_stream_whatever_the_spelling(env: Upgrades, mode: str, value: str) -> None:
    sock, received = open_follow(env, mode, value)
    sock.close()
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert b"line 0\n" in received and b"line 1\n" in received, "the first lines arrive while the log goes on"


def test_followed_log_ends_within_seconds_of_a_revocation(env: Upgrades, idp) -> None:
    user = ("follower@example.com", ("oidc:developers",))
    grant_id = grant_everything(env.store, env.policy, "odd", user=user)
    token = idp.token("follower", email=user[0], email_verified=True, groups=["developers"])
    sock, received = open_follow(env, "reverse", "True", token)
    try:
        assert b"line 1\n" in received, received[:200]
        with SQLiteStore(env.store) as store:
            store.revoke_grant(load_policy(env.policy).access_rules, grant_id, Person(*REVIEWER), "incident over",
                               now=time.time())
        revoked_at = time.monotonic()
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                assert time.monotonic() - revoked_at < 10, "the follow outlived its grant"
        except (ssl.SSLError, OSError):
            pass
        assert time.monotonic() - revoked_at < 10
    finally:
        sock.close()
    deadline = time.monotonic() + 5
    ended: list[dict] = []
    while not ended and time.monotonic() < deadline:
        events = [e for e in env.gateway.audit_events() if e["user"]["username"] == user[0]
                  and e.get("objectRef", {}).get("subresource") == "log"]
        ended = [e for e in events if e["stage"] == "ResponseComplete" and
                 e["annotations"].get("jitgate.dev/terminated", "").startswith("grant revoked")]
        time.sleep(0.1)
    assert ended, events
    assert any(e["stage"] == "ResponseStarted" and e["auditID"] == ended[0]["auditID"] for e in events)


def test_followed_log_ends_within_seconds_of_its_grant_expiring(env: Upgrades, idp) -> None:
    from jitgate.access.scope import Scope

    user = ("shorty@example.com", ("oidc:short",))
    rules = load_policy(env.policy).access_rules
    with SQLiteStore(env.store) as store:
        now = time.time()
        request = store.create_request(rules, Person(*user), Scope("odd", ("dev",), False, ("pods/log",), ("get",)),
                                       now=now, reason="a short look")
        grant = store.review(rules, request.id, Person(*REVIEWER), "approve", "ok", now=now).grant
    token = idp.token("shorty", email=user[0], email_verified=True, groups=["short"])
    sock, received = open_follow(env, "regular", "t", token)
    try:
        assert b"line 1\n" in received, received[:200]
        sock.settimeout(15)
        try:
            while sock.recv(65536):
                pass
        except (ssl.SSLError, OSError):
            pass
        ended_at = time.time()
    finally:
        sock.close()
    assert grant.ends_at - 0.5 <= ended_at < grant.ends_at + 4, "the follow ends within seconds of the grant's end"
    deadline = time.monotonic() + 5
    ended: list[dict] = []
    while not ended and time.monotonic() < deadline:
        ended = [e for e in env.gateway.audit_events() if e["user"]["username"] == user[0] and e["stage"] == "ResponseComplete"
                 and e["annotations"].get("jitgate.dev/terminated") == "grant expired"]
        time.sleep(0.1)
    assert ended


# --- real kubectl ----------------------------------------------------------------------------------------


def kubeconfig(stack, path: Path, token: str, mode: str, cluster: str = "dev") -> Path:
    """A kubeconfig for the gateway of `stack` (the session's Stack, or this module's env)."""
    args = [str(REPO / ".venv/bin/jitgate"), "kubeconfig", "--policy", str(stack.policy), "--cluster", cluster,
            "--user", "someone", "--token", token, "--gateway-ca", str(stack.gateway.ca_path), "-o", str(path)]
    args += ["--server", stack.gateway.reverse_url(cluster)] if mode == "reverse" else ["--proxy", stack.gateway.proxy_url]
    subprocess.run(args, check=True, capture_output=True)
    return path


@pytest.mark.parametrize("cluster", ["dev", "lab", "cert"], ids=["eks", "token_file", "client_cert"])
@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_kubectl_exec_over_spdy_is_refused_and_says_why(stack: Stack, env: Upgrades, tmp_path: Path, mode: str,
                                                        cluster: str) -> None:
    token = stack.idp.token("alice", email=ALICE[0], email_verified=True, groups=["developers", "sre"])
    config = kubeconfig(env if cluster == "cert" else stack, tmp_path / "kc", token, mode, cluster)
    api = {"dev": stack.dev, "lab": stack.lab, "cert": env.clusters["cert"]}[cluster]
    namespace, pod = "dev", "toolbox"
    api.clear_seen()
    env = {**kubectl_env(config), "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
    refused = subprocess.run([KUBECTL, "exec", "-n", namespace, pod, "--", "echo", "hi"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert REFUSAL.format("a SPDY upgrade") in refused.stderr, refused.stderr
    assert not [r for r in api.requests_seen() if r["path"].endswith("/exec")], "the SPDY request reached the cluster"
    # The same command over WebSocket (kubectl's default) works.
    plain = run_kubectl(config, "exec", "-n", namespace, pod, "--", "echo", "hi")
    assert plain.returncode == 0 and plain.stdout.strip() == "hi", plain.stderr


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_kubectl_port_forward_over_spdy_is_refused(stack: Stack, tmp_path: Path, mode: str) -> None:
    token = stack.idp.token("alice", email=ALICE[0], email_verified=True, groups=["developers", "sre"])
    config = kubeconfig(stack, tmp_path / "kc", token, mode)
    stack.dev.clear_seen()
    env = {**kubectl_env(config), "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}
    proc = subprocess.Popen([KUBECTL, "port-forward", "-n", "dev", "pod/toolbox", "0:80"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode != 0
    assert REFUSAL.format("a SPDY upgrade") in err, err
    assert not [r for r in stack.dev.requests_seen() if r["path"].endswith("/portforward")]


def grant_reads(grant_store: Path, policy: Path, cluster: str, user: tuple) -> str:
    """A grant to read pods only (no pods/exec) for `user`, approved by another person."""
    from jitgate.access.scope import Scope

    rules = load_policy(policy).access_rules
    with SQLiteStore(grant_store) as store:
        now = time.time()
        request = store.create_request(rules, Person(*user), Scope(cluster, ("dev",), False, ("pods",), ("get", "list")),
                                       now=now, reason="reads only")
        return store.review(rules, request.id, Person(*REVIEWER), "approve", "ok", now=now).grant.id


@pytest.fixture(scope="module")
def reader(stack: Stack) -> str:
    user = ("reader@example.com", ("oidc:developers",))
    grant_reads(stack.grant_store, stack.policy, "dev", user)
    return stack.idp.token("reader", email=user[0], email_verified=True, groups=["developers"])


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_kubectl_exec_without_a_grant_prints_the_grant_refusal(stack: Stack, reader: str, tmp_path: Path, mode: str) -> None:
    """kubectl retries a refused WebSocket exec over SPDY and prints only that answer: it must say
    what refused the WebSocket, not that SPDY is not inspected."""
    token = reader
    config = kubeconfig(stack, tmp_path / "kc", token, mode)
    marker = f"refused-{mode}-{time.monotonic_ns()}"
    result = run_kubectl(config, "exec", "-n", "dev", "toolbox", "--", "echo", marker)
    assert result.returncode != 0
    assert "jitgate: no active grant" in result.stderr, result.stderr
    assert "only WebSocket upgrades" not in result.stderr
    # Two calls (the WebSocket handshake, kubectl's SPDY retry), both audited; the retry names the
    # first, and `jitgate audit` shows the refused command once.
    events = [e for e in stack.gateway.audit_events() if marker in e.get("requestURI", "")]
    assert len({e["auditID"] for e in events}) == 2, events
    first, retry = sorted({e["auditID"]: e for e in events}.values(), key=lambda e: e["requestReceivedTimestamp"])
    assert "jitgate.dev/retry-of" not in first["annotations"] and retry["annotations"]["jitgate.dev/retry-of"] == first["auditID"]
    shown = subprocess.run([str(REPO / ".venv/bin/jitgate"), "audit", "--log", str(stack.gateway.audit_path), "-o", "json",
                            "--stage", "all"], capture_output=True, text=True, check=True).stdout
    assert sum(marker in line for line in shown.splitlines()) == len([e for e in events if e["auditID"] == first["auditID"]])


# --- the steps in a mitmproxy test harness ---------------------------------------------------------------


def load_addon(name: str):
    spec = importlib.util.spec_from_file_location(f"jitgate_addons_under_test.{name}", REPO / f"addons/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


streaming_module = load_addon("streaming")
grants_module = load_addon("grants")
audit_module = load_addon("audit")

IDENTITY = Identity("alice@example.com", ("oidc:developers",), "https://idp.example", "alice", 4e9, {})
CLUSTER = Cluster("dev", "https://api.dev.example", "api.dev.example", 443, Path("ca.pem"), TokenFileCredential(Path("t")))
WS_FIELDS = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
             ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Protocol", "v5.channel.k8s.io")]
SPDY_FIELDS = [("Upgrade", "SPDY/3.1"), ("Connection", "Upgrade"), ("X-Stream-Protocol-Version", "v4.channel.k8s.io")]


def checked_flow(method: str, path: str, fields=(), response: int | None = None):
    """A flow as the steps before streaming leave it: identity, cluster and attributes set."""
    flow = tflow.tflow(resp=False)
    flow.request.method, flow.request.path = method, path
    flow.request.headers.clear()
    for k, v in fields:
        flow.request.headers.add(k, v)
    call = call_of(flow)
    call.identity, call.cluster = IDENTITY, CLUSTER
    call.info = parse_request(method, path, flow.request.headers)
    if response is not None:
        flow.response = mhttp.Response.make(response, b"")
    return flow


@pytest.mark.parametrize("fields,what", [
    (SPDY_FIELDS, "a SPDY upgrade"),
    (WS_FIELDS + [("Sec-WebSocket-Version", "13")], "a malformed WebSocket handshake (Sec-WebSocket-Version must be 13, once)"),
    ([("Connection", "upgrade")], "a connection upgrade without an Upgrade header"),
])
def test_streaming_refuses_an_uninspectable_upgrade(fields, what) -> None:
    streaming = streaming_module.Streaming()
    with taddons.context(streaming):
        flow = checked_flow("POST" if fields is SPDY_FIELDS else "GET", EXEC, fields)
        streaming.request(flow)
        assert flow.response.status_code == 400
        assert json.loads(flow.response.content)["message"] == REFUSAL.format(what)
        call = call_of(flow)
        assert call.denied and call.annotations["jitgate.dev/upgrade-refused"] == what


@pytest.mark.parametrize("method,path,fields", [
    ("GET", EXEC, WS_FIELDS), ("GET", "/api/v1/namespaces/dev/pods", ()), ("POST", "/api/v1/namespaces/dev/configmaps", ()),
])
def test_streaming_lets_plain_calls_and_websockets_through(method, path, fields) -> None:
    streaming = streaming_module.Streaming()
    with taddons.context(streaming):
        flow = checked_flow(method, path, fields)
        streaming.request(flow)
        assert flow.response is None and not call_of(flow).denied


def test_the_spdy_retry_of_a_refused_websocket_gets_the_same_answer() -> None:
    streaming = streaming_module.Streaming()
    with taddons.context(streaming):
        ws = checked_flow("GET", EXEC, WS_FIELDS)
        streaming.request(ws)
        refuse(ws, 403, "jitgate: no active grant lets you exec")  # a later step refuses it
        streaming.response(ws)
        spdy = checked_flow("POST", EXEC, SPDY_FIELDS)
        streaming.request(spdy)
        assert spdy.response.status_code == 403
        assert json.loads(spdy.response.content)["message"] == "jitgate: no active grant lets you exec"
        again = checked_flow("POST", EXEC, SPDY_FIELDS)  # once only
        streaming.request(again)
        assert again.response.status_code == 400

        # the cluster's own refusal is repeated too
        ws = checked_flow("GET", EXEC, WS_FIELDS)
        ws.response = mhttp.Response.make(403, json.dumps({"kind": "Status", "message": "pods is forbidden"}))
        streaming.response(ws)
        spdy = checked_flow("POST", EXEC, SPDY_FIELDS)
        streaming.request(spdy)
        assert (spdy.response.status_code, json.loads(spdy.response.content)["message"]) == (403, "pods is forbidden")

        # another user's SPDY call is not answered with it
        ws = checked_flow("GET", EXEC, WS_FIELDS)
        refuse(ws, 403, "jitgate: no active grant lets you exec")
        streaming.response(ws)
        other = checked_flow("POST", EXEC, SPDY_FIELDS)
        call_of(other).identity = Identity("bob@example.com", (), "https://idp.example", "bob", 4e9, {})
        streaming.request(other)
        assert other.response.status_code == 400


@pytest.mark.parametrize("method,path,fields,status,long_running", [
    ("GET", "/api/v1/namespaces/dev/pods?watch=True", (), 200, True),
    ("GET", "/api/v1/namespaces/dev/pods/p/log?follow=t", (), 200, True),
    ("GET", "/api/v1/namespaces/dev/pods/p/log", (), 200, False),
    ("GET", "/api/v1/namespaces/dev/pods/p/proxy/", (), 200, True),
    ("GET", EXEC, WS_FIELDS, 101, True),
    ("GET", EXEC, WS_FIELDS, 403, False),  # a refused handshake: read whole, no session
    ("GET", "/api/v1/namespaces/dev/pods", (), 200, False),
])
def test_streaming_marks_long_running_calls_from_the_attributes(method, path, fields, status, long_running) -> None:
    streaming = streaming_module.Streaming()
    with taddons.context(streaming):
        flow = checked_flow(method, path, fields, response=status)
        streaming.responseheaders(flow)
        assert call_of(flow).long_running is long_running
        assert bool(flow.response.stream) is long_running


def test_streaming_does_not_mark_a_refused_call() -> None:
    streaming = streaming_module.Streaming()
    with taddons.context(streaming):
        flow = checked_flow("GET", "/api/v1/namespaces/dev/pods?watch=1")
        refuse(flow, 403, "no")
        streaming.responseheaders(flow)
        assert not call_of(flow).long_running


def test_a_101_without_a_websocket_is_ended() -> None:
    streaming = streaming_module.Streaming()
    with taddons.context(streaming):
        flow = checked_flow("GET", EXEC, WS_FIELDS, response=101)
        assert flow.websocket is None  # mitmproxy did not read it as one: it would relay raw TCP next
        streaming.response(flow)
        assert not flow.killable and flow.error is not None
        assert flow.response.status_code == 502
        call = call_of(flow)
        assert call.denied and call.annotations["jitgate.dev/terminated"] == "protocol switch without a WebSocket"

        ws = tflow.twebsocketflow()
        call_of(ws).info = parse_request("GET", EXEC, ws.request.headers)
        streaming.response(ws)
        assert ws.killable and not call_of(ws).denied


def test_grants_ends_a_session_whose_grant_ended_before_it_started() -> None:
    from jitgate.access.service import AccessService

    grants = grants_module.Grants(AccessService())
    with taddons.context(grants):
        grant = types.SimpleNamespace(id="grant-1", ends_at=time.time() + 3600, request_id="req-1")
        flow = checked_flow("GET", "/api/v1/namespaces/dev/pods?watch=1", response=200)
        call = call_of(flow)
        call.grant, call.long_running = grant, True
        grants.grants_ended(time.time(), [("grant-1", "grant revoked by rita: incident over")])
        grants.responseheaders(flow)
        assert not flow.killable
        assert call.annotations["jitgate.dev/terminated"] == "grant revoked by rita: incident over"
        assert "grant-1" not in grants.live

        expired = types.SimpleNamespace(id="grant-2", ends_at=time.time() - 1, request_id="req-2")
        late = checked_flow("GET", "/api/v1/namespaces/dev/pods?watch=1", response=200)
        call_of(late).grant, call_of(late).long_running = expired, True
        grants.responseheaders(late)
        assert not late.killable and call_of(late).annotations["jitgate.dev/terminated"] == "grant expired"

        live = types.SimpleNamespace(id="grant-3", ends_at=time.time() + 3600, request_id="req-3")
        watch = checked_flow("GET", "/api/v1/namespaces/dev/pods?watch=1", response=200)
        call_of(watch).grant, call_of(watch).long_running = live, True
        grants.responseheaders(watch)
        assert watch.killable and watch in grants.live["grant-3"]
        grants.response(watch)
        assert "grant-3" not in grants.live


def test_audit_completes_a_websocket_session_when_it_ends(tmp_path: Path) -> None:
    audit = audit_module.Audit()
    log_path = tmp_path / "audit.log"
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(log_path))
        ws = tflow.twebsocketflow()
        call_of(ws).info = parse_request("GET", EXEC, ws.request.headers)  # upgrade: long-running either way
        audit.response(ws)
        assert not log_path.exists() or log_path.read_text() == "", "nothing is complete at the 101"
        audit.websocket_end(ws)
        (event,) = [json.loads(l) for l in log_path.read_text().splitlines()]
        assert event["stage"] == "ResponseComplete" and event["responseStatus"]["code"] == 101

        tcp = tflow.ttcpflow()
        tcp.metadata["jitgate"] = {"decision": "deny", "reason": "jitgate relays no raw TCP (towards cluster dev)"}
        audit.tcp_start(tcp)
        event = json.loads(log_path.read_text().splitlines()[-1])
        assert event["annotations"]["jitgate.dev/decision"] == "deny"
        assert event["annotations"]["jitgate.dev/reason"] == "jitgate relays no raw TCP (towards cluster dev)"
        assert event["responseStatus"]["code"] == 403


def test_an_upgrade_whose_body_a_step_streams_is_refused_before_it_goes_out() -> None:
    streaming = streaming_module.Streaming()
    with taddons.context(streaming):
        flow = checked_flow("POST", EXEC, SPDY_FIELDS)
        flow.request.stream = True  # set by an earlier step: mitmproxy would forward after requestheaders
        streaming.requestheaders(flow)
        assert flow.response.status_code == 400 and not flow.request.stream
        plain = checked_flow("POST", "/api/v1/namespaces/dev/configmaps")
        plain.request.stream = True
        streaming.requestheaders(plain)
        assert plain.response is None and plain.request.stream
