"""The real `jitgate` CLI, as a subprocess, against the access API over real TLS.

The server here stands where the gateway does: it verifies the caller's OIDC ID token (issued by
the real OIDC provider, checked with OIDCVerifier) and hands the call to `AccessAPI` over a real
SQLite store. The CLI finds the server, the CA and the token in a kubeconfig as kubectl would:
token, tokenFile, an exec credential plugin, and proxy mode through a real CONNECT proxy."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jitgate.access.messages import request_command
from jitgate.access.rules import AccessRule, rule_named
from jitgate.access.scope import Scope
from jitgate.api.access_api import AccessAPI, is_api_path
from jitgate.cli.kubeconfig import dump
from jitgate.identity.oidc import IssuerConfig, OIDCVerifier, TokenError
from jitgate.kube.status import status_body
from jitgate.store.sqlite import SQLiteStore
from testkit.net import TestCA, free_port
from testkit.oidc_provider import OIDCProviderProcess
from tests.test_api import parse_rules

REPO = Path(__file__).resolve().parents[1]
JITGATE = str(REPO / ".venv" / "bin" / "jitgate")
PROXIED_HOST = "api.dev.jitgate.test"  # resolvable by nobody: only the CONNECT proxy knows it


# -- the server standing in for the gateway -------------------------------------------------------


class ApiServer:
    """HTTPS in a thread: bearer token -> OIDCVerifier -> AccessAPI, as the gateway's identity and
    access_api addons do."""

    def __init__(self, api: AccessAPI, verifier: OIDCVerifier, cert: Path, key: Path) -> None:
        self.port = free_port()
        self.seen: list[tuple[str, str, bool]] = []  # method, target, whether a bearer token came
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                server.seen.append((self.command, self.path, bool(token)))
                identity = None
                if scheme.lower() == "bearer" and token:
                    try:
                        identity = verifier.verify(token)
                    except TokenError as e:
                        return self._send(401, status_body(401, f"jitgate: invalid bearer token: {e.reason}"))
                if not is_api_path(self.path):
                    return self._send(404, status_body(404, "the server could not find the requested resource"))
                code, answer = api.handle(self.command, self.path, body, identity, self.headers.get("Content-Type"))
                self._send(code, json.dumps(answer).encode())

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="api-server", daemon=True)

    def start(self) -> ApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class ConnectRelay:
    """An HTTP CONNECT proxy that knows where `PROXIED_HOST` lives; records every CONNECT."""

    def __init__(self, routes: dict[str, tuple[str, int]]) -> None:
        self.routes = routes
        self.connects: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, name="connect-relay", daemon=True)

    def start(self) -> ConnectRelay:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.connects.append(f"{method} {target}")
            upstream_address = self.routes.get(target) if method == "CONNECT" else None
            if upstream_address is None:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            with socket.create_connection(upstream_address) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pump = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                pump.start()
                _pipe(client, upstream)
                pump.join(5)

    def stop(self) -> None:
        self.listener.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# -- fixtures -------------------------------------------------------------------------------------


class World:
    def __init__(self, tmp: Path, ca: TestCA, idp: OIDCProviderProcess, server: ApiServer, relay: ConnectRelay,
                 rules: tuple[AccessRule, ...]) -> None:
        self.tmp, self.ca, self.idp, self.server, self.relay, self.rules = tmp, ca, idp, server, relay, rules
        self.tokens: dict[str, str] = {}
        self.outputs: list[str] = []  # everything the CLI printed, to check no token ever shows

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def token(self, name: str, *groups: str) -> str:
        if name not in self.tokens:
            self.tokens[name] = self.idp.token(name, email=f"{name}@example.com", email_verified=True, groups=list(groups))
        return self.tokens[name]

    def kubeconfig(self, name: str, user: dict, *, server: str | None = None, proxy: str | None = None,
                   ca_file: str | None = None, skip_verify: bool = False, **extra: str) -> Path:
        cluster: dict = {"server": server or self.url, **extra}
        if ca_file:
            cluster["certificate-authority"] = ca_file
        else:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca.cert_path.read_bytes()).decode()
        if proxy:
            cluster["proxy-url"] = proxy
        if skip_verify:
            cluster["insecure-skip-tls-verify"] = True
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        path = folder / "config"
        path.write_text(dump({
            "apiVersion": "v1", "kind": "Config", "current-context": f"{name}@gateway",
            "clusters": [{"name": "gateway", "cluster": cluster}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": f"{name}@gateway", "context": {"cluster": "gateway", "user": name}}],
        }))
        return path

    def run(self, kubeconfig: Path | None, *args: str, env: dict[str, str] | None = None, code: int = 0) -> subprocess.CompletedProcess:
        argv = [JITGATE, *args] + (["--kubeconfig", str(kubeconfig)] if kubeconfig else [])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self.env(env), cwd=self.tmp)
        self.outputs.append(done.stdout + done.stderr)
        assert done.returncode == code, f"{shlex.join(args)}: exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        return done

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        drop = ("KUBECONFIG", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "JITGATE_TOKEN")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["HOME"] = str(self.tmp)  # no ~/.kube/config of the machine's user
        env.update(extra or {})
        return env


@pytest.fixture
def world(tmp_path: Path, ca: TestCA, idp: OIDCProviderProcess) -> Iterator[World]:
    rules = parse_rules(tmp_path)
    verifier = OIDCVerifier([IssuerConfig(issuer_url=idp.issuer, audiences=("jitgate",), username_claim="email",
                                          groups_claim="groups", groups_prefix="oidc:", ca_file=str(idp.ca_file))])
    cert, key = ca.issue("cli-api-server", hosts=["127.0.0.1", PROXIED_HOST])
    with SQLiteStore(tmp_path / "state" / "grants.db") as store:
        server = ApiServer(AccessAPI(store, lambda: rules), verifier, cert, key).start()
        relay = ConnectRelay({f"{PROXIED_HOST}:443": ("127.0.0.1", server.port)}).start()
        w = World(tmp_path, ca, idp, server, relay, rules)
        try:
            yield w
            for output in w.outputs:
                for token in w.tokens.values():
                    assert token not in output, "a token was printed"
        finally:
            relay.stop()
            server.stop()


PLUGIN = """\
    import json, os, sys
    info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
    if info != {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "spec": {"interactive": False}}:
        sys.exit(f"unexpected KUBERNETES_EXEC_INFO {info}")
    if os.environ.get("PLUGIN_MODE") != "from-kubeconfig-env" or sys.argv[1] != "--token-file":
        sys.exit("env or args from the kubeconfig missing")
    token = open(sys.argv[2]).read().strip()
    print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                      "status": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}}))
"""


def exec_user(world: World, token: str, name: str) -> dict:
    (world.tmp / f"{name}.token").write_text(token)
    plugin = world.tmp / "plugin.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    return {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": [str(plugin), "--token-file", str(world.tmp / f"{name}.token")],
        "env": [{"name": "PLUGIN_MODE", "value": "from-kubeconfig-env"}],
        "interactiveMode": "Never",
    }}


# -- tests ----------------------------------------------------------------------------------------


def test_request_two_approvals_whoami_revoke(world: World) -> None:
    erin = world.kubeconfig("erin", {"token": world.token("erin", "developers")})
    # bob's token comes from a file next to his kubeconfig (relative, as kubectl resolves it).
    (world.tmp / "bob").mkdir()
    (world.tmp / "bob" / "id-token").write_text(world.token("bob", "sre") + "\n")
    bob = world.kubeconfig("bob", {"tokenFile": "id-token"})
    # carol's comes from an exec credential plugin.
    carol = world.kubeconfig("carol", exec_user(world, world.token("carol", "security"), "carol"))

    # The command the gateway's 403 tells people to paste, exactly as it is emitted.
    scope = Scope("dev", ("dev",), False, ("pods", "pods/log"), ("get", "list", "watch"))
    command = shlex.split(request_command(scope, rule_named(world.rules, "dev-read"), reason="INC-42 payments down"))
    assert command[:2] == ["jitgate", "request"]
    out = world.run(erin, *command[1:]).stdout
    rid = re.search(r"request (req-[a-z0-9]+) pending", out).group(1)
    assert "needs 2 approval(s), has 0" in out and f"jitgate show {rid}" in out
    # The requester is not told to approve her own request; a reviewer is.
    own = world.run(erin, "show", rid).stdout
    assert "jitgate approve" not in own and f"you cannot review your own request. Withdraw it: jitgate cancel {rid}" in own
    assert f"Review it:  jitgate approve {rid}" in world.run(bob, "show", rid).stdout

    table = world.run(bob, "list", "--reviewable").stdout.splitlines()
    assert table[0].split() == ["ID", "STATE", "REQUESTER", "CLUSTER", "SCOPE", "AGE", "EXPIRES", "APPROVALS"]
    assert table[1].split()[:4] == [rid, "pending", "erin@example.com", "dev"] and table[1].split()[-1] == "0/2"
    assert "dev: get,list,watch pods,pods/log" in table[1]

    assert "review recorded; still pending (needs 2 approval(s), has 1)" in world.run(bob, "approve", rid, "--reason", "ok").stdout
    # bob again, and erin on her own request: refused, the gateway's message printed as written.
    assert world.run(bob, "approve", rid, code=1).stderr == f"you already approved request {rid}\n"
    assert world.run(erin, "approve", rid, code=1).stderr == f"you cannot review your own request {rid}\n"
    assert world.run(bob, "list", "--reviewable").stderr == "No access requests waiting for your review.\n"

    out = world.run(carol, "approve", rid).stdout
    grant_id = re.search(r"grant (grant-[a-z0-9]+) ends at", out).group(1)
    assert f"request {rid} approved" in out

    me = world.run(erin, "whoami").stdout
    assert "Username: erin@example.com" in me and "Groups:   oidc:developers" in me
    assert f"{grant_id}  get, list, watch pods, pods/log in namespace dev on cluster dev, ends" in me
    assert "dev-read: clusters dev; namespaces dev, team-*" in me and "2 approval(s) from oidc:sre, oidc:security" in me

    shown = world.run(erin, "show", rid).stdout
    assert f"Request:    {rid}" in shown and "State:      approved" in shown
    # A grant id shows the request it came from (compared as data: the text says "3s ago").
    assert json.loads(world.run(erin, "show", grant_id, "-o", "json").stdout)["id"] == rid
    assert f"Request:    {rid}" in world.run(erin, "show", grant_id).stdout
    assert re.search(r"approve\s+bob@example.com: ok", shown) and re.search(r"approve\s+carol@example.com", shown)
    assert "request.approved" in shown and f"Grant:      {grant_id}, active" in shown
    detail = json.loads(world.run(bob, "show", rid, "-o", "json").stdout)
    assert detail["state"] == "approved" and [e["kind"] for e in detail["events"]][-1] == "request.approved"
    assert f"id: {rid}" in world.run(erin, "show", rid, "-o", "yaml").stdout

    grants = world.run(erin, "grants").stdout.splitlines()
    assert grants[1].split()[:3] == [grant_id, "erin@example.com", "dev"] and "active" in grants[1]
    assert [g["id"] for g in json.loads(world.run(carol, "grants", "--all", "-o", "json").stdout)["items"]] == [grant_id]

    assert f"grant {grant_id} of erin@example.com revoked" in world.run(bob, "revoke", grant_id, "--reason", "incident over").stdout
    assert "Active grants:\n  (none)" in world.run(erin, "whoami").stdout
    assert world.run(erin, "grants").stderr == "No active grants.\n"
    history = world.run(erin, "grants", "--history").stdout.splitlines()
    assert history[0].split() == ["ID", "USER", "CLUSTER", "SCOPE", "STATE", "ENDED", "BY", "REQUEST"]
    row = next(line for line in history if line.startswith(grant_id))
    assert "revoked" in row and "bob@example.com: incident over" in row and rid in row
    listed = json.loads(world.run(erin, "list", "--state", "approved", "-o", "json").stdout)["items"]
    assert [(r["id"], r["grant"]["state"]) for r in listed] == [(rid, "revoked")]
    # Every call carried the token.
    assert all(has_token for _, _, has_token in world.server.seen)


def test_wait_deny_cancel(world: World) -> None:
    erin = world.kubeconfig("erin", {"token": world.token("erin", "developers")})
    bob = world.kubeconfig("bob", {"token": world.token("bob", "sre")})
    carol = world.kubeconfig("carol", {"token": world.token("carol", "security")})

    waiting = subprocess.Popen(
        [JITGATE, "request", "--cluster", "dev", "-n", "team-a", "--resource", "pods", "--verb", "get,list",
         "--duration", "30m", "--reason", "INC-7", "--wait", "30", "--kubeconfig", str(erin)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=world.env())
    try:
        deadline = time.monotonic() + 20
        while not (pending := json.loads(world.run(bob, "list", "--reviewable", "-o", "json").stdout)["items"]):
            assert time.monotonic() < deadline and waiting.poll() is None, waiting.communicate()
            time.sleep(0.2)
        rid = pending[0]["id"]
        world.run(bob, "approve", rid)
        world.run(carol, "approve", rid, "-o", "json")
        out, err = waiting.communicate(timeout=20)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    world.outputs.append(out + err)
    assert waiting.returncode == 0, err
    assert f"request {rid} pending" in err and "waiting up to 30s for a decision" in err
    assert f"request {rid} approved" in out and "grant grant-" in out

    # Denied while waiting: exit 1 and the reason shown.
    out = world.run(erin, "request", "--cluster", "dev", "-n", "team-b", "--resource", "pods", "--verb", "get",
                    "--reason", "INC-8", "-o", "json").stdout
    rid = json.loads(out)["id"]
    assert f"request {rid} denied" in world.run(bob, "deny", rid, "--reason", "use the dashboard").stdout
    done = world.run(erin, "request", "--cluster", "dev", "-n", "team-c", "--resource", "pods", "--verb", "get",
                     "--reason", "INC-9", "--wait", "1", code=1)
    assert "still pending after 1s" in done.stderr
    rid = re.search(r"request (req-[a-z0-9]+) pending", done.stdout).group(1)
    assert f"request {rid} cancelled" in world.run(erin, "cancel", rid).stdout
    states = {r["id"]: r["state"] for r in json.loads(world.run(erin, "list", "-o", "json").stdout)["items"]}
    assert sorted(states.values()) == ["approved", "cancelled", "denied"]
    assert world.run(bob, "deny", rid, code=2).stderr.endswith("the following arguments are required: --reason\n")


def test_proxy_mode_through_connect(world: World) -> None:
    token = world.token("erin", "developers")
    proxied = world.kubeconfig("erin-proxy", {"token": token}, server=f"https://{PROXIED_HOST}",
                               proxy=f"http://127.0.0.1:{world.relay.port}")
    assert "Username: erin@example.com" in world.run(proxied, "whoami").stdout
    assert world.relay.connects == [f"CONNECT {PROXIED_HOST}:443"]

    # HTTPS_PROXY, as Go clients read it, when the kubeconfig has no proxy-url...
    direct_name = world.kubeconfig("erin-env", {"token": token}, server=f"https://{PROXIED_HOST}")
    world.run(direct_name, "grants", env={"HTTPS_PROXY": f"127.0.0.1:{world.relay.port}"})
    assert world.relay.connects[-1] == f"CONNECT {PROXIED_HOST}:443"
    # ...but never for loopback addresses.
    loopback = world.kubeconfig("erin-loop", {"token": token})
    world.run(loopback, "grants", env={"HTTPS_PROXY": "http://127.0.0.1:9"})
    assert len(world.relay.connects) == 2

    # A proxy that refuses the tunnel: no answer from the gateway, exit 2.
    refused = world.kubeconfig("erin-refused", {"token": token}, server="https://elsewhere.jitgate.test",
                               proxy=f"http://127.0.0.1:{world.relay.port}")
    err = world.run(refused, "whoami", code=2).stderr
    assert err.startswith("jitgate: cannot reach the gateway at elsewhere.jitgate.test:443 through the proxy") and "403" in err


def test_connection_settings_and_errors(world: World) -> None:
    token = world.token("erin", "developers")
    erin = world.kubeconfig("erin", {"token": token})

    # Flags and JITGATE_TOKEN without any kubeconfig (HOME has none).
    out = world.run(None, "whoami", "--server", world.url, "--ca", str(world.ca.cert_path), env={"JITGATE_TOKEN": token}).stdout
    assert "Username: erin@example.com" in out
    assert json.loads(world.run(None, "whoami", "-o", "json", "--server", world.url, "--ca", str(world.ca.cert_path),
                                "--token", token).stdout)["username"] == "erin@example.com"
    # $KUBECONFIG, with a relative certificate-authority path beside the file.
    (world.tmp / "rel").mkdir()
    (world.tmp / "rel" / "gateway-ca.pem").write_bytes(world.ca.cert_path.read_bytes())
    relative = world.kubeconfig("rel", {"token": token}, ca_file="gateway-ca.pem")
    world.run(None, "whoami", env={"KUBECONFIG": f"{world.tmp / 'missing'}{os.pathsep}{relative}"})

    # Refusals from the gateway: exit 1, its message as written.
    assert world.run(erin, "show", "req-doesnotexist", code=1).stderr.startswith("there is no access request 'req-doesnotexist'")
    err = world.run(erin, "request", "--cluster", "dev", "-n", "dev", "--resource", "pods", "--verb", "get",
                    "--duration", "9h", "--reason", "x", code=1).stderr
    assert err == "duration 9h is above the maximum 4h of access rule 'dev-read'\n"
    err = world.run(None, "whoami", "--server", world.url, "--ca", str(world.ca.cert_path), "--token", "not-a-jwt", code=1).stderr
    assert err == "jitgate: invalid bearer token: token is not a JWT\n"
    err = world.run(erin, "request", "--cluster", "dev", "-n", "dev", "--resource", "pods", "--verb", "get",
                    "--reason", "<why you need this access>", code=2).stderr
    assert "replace the placeholder reason" in err

    # No usable answer: exit 2.
    other_ca = TestCA.create(world.tmp / "other-ca")
    wrong_ca = world.kubeconfig("wrong-ca", {"token": token}, ca_file=str(other_ca.cert_path))
    err = world.run(wrong_ca, "whoami", code=2).stderr
    assert err.startswith("jitgate: cannot verify the TLS certificate of 127.0.0.1") and "gateway's CA" in err
    closed = world.kubeconfig("closed", {"token": token}, server=f"https://127.0.0.1:{free_port()}")
    assert world.run(closed, "whoami", code=2).stderr.endswith(": connection refused\n")
    # tls-server-name is the name checked in the certificate (which has PROXIED_HOST, not this one).
    world.run(world.kubeconfig("sni", {"token": token}, **{"tls-server-name": PROXIED_HOST}), "whoami")
    renamed = world.kubeconfig("sni-wrong", {"token": token}, **{"tls-server-name": "other.jitgate.test"})
    assert "cannot verify the TLS certificate" in world.run(renamed, "whoami", code=2).stderr
    insecure = world.kubeconfig("insecure", {"token": token}, skip_verify=True)
    assert "jitgate never does" in world.run(insecure, "whoami", code=2).stderr
    assert "--context, set current-context, or give --server" in world.run(None, "whoami", code=2).stderr
    assert "context 'nope' is not in the kubeconfig" in world.run(erin, "whoami", "--context", "nope", code=2).stderr
    plain = world.kubeconfig("plain", {"token": token}, server=f"http://127.0.0.1:{world.server.port}")
    assert "must be an https:// URL" in world.run(plain, "whoami", code=2).stderr
    broken = exec_user(world, token, "broken")
    broken["exec"]["env"] = []  # the plugin exits 1 without its env
    failing = world.kubeconfig("failing", broken)
    err = world.run(failing, "whoami", code=2).stderr
    assert "env or args from the kubeconfig missing" in err and f"exec credential plugin {sys.executable} failed with exit code 1" in err
    assert "jitgate: no OIDC ID token" in world.run(world.kubeconfig("nobody", {}), "whoami", code=2).stderr


def test_reveal_flag_asks_for_unmasked_values(world: World) -> None:
    erin = world.kubeconfig("erin", {"token": world.token("erin", "developers")})
    done = world.run(erin, "request", "--cluster", "dev", "-n", "dev", "--resource", "pods", "--verb", "get",
                     "--reason", "INC-9", "--reveal", code=1)
    # The flag reached the gateway: no rule here allows reveal, and the refusal names it.
    assert "no access rule covers get pods in namespace dev on cluster dev, secret values revealed" in done.stderr
    plain = world.run(erin, "request", "--cluster", "dev", "-n", "dev", "--resource", "pods", "--verb", "get", "--reason", "INC-9",
                      "-o", "json").stdout
    assert "reveal" not in json.loads(plain)["scope"]


def test_show_names_the_mcp_rule_that_held_a_call_not_a_guardrail() -> None:
    from jitgate.cli.main import _held_by

    mcp = {"guardrail": "mcp:prod-deletes-need-a-human", "digest": "ab" * 32, "path": "mcp://kube/delete_pod"}
    assert _held_by(mcp) == "MCP rule:   prod-deletes-need-a-human (MCP front); digest " + "ab" * 8
    kube = {"guardrail": "no-privileged-pods", "digest": "cd" * 32, "path": "/api/v1/namespaces/dev/pods"}
    assert _held_by(kube) == "Guardrail:  no-privileged-pods; digest " + "cd" * 8
