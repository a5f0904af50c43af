"""End to end: unmodified kubectl -> jitgate (real mitmdump) -> stand-in clusters, with a real OIDC
provider and real STS semantics (moto). The caller holds only an OIDC token; the cluster sees only
the gateway's credential; every call is audited."""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from testkit import forge
from testkit.standin.process import KUBECTL, kubectl_env, run_kubectl, token_sha256
from tests.conftest import (
    DEV_HOST,
    E2E_RULES,
    INSPECTOR_TOKEN,
    LAB_CLUSTER_TOKEN,
    LAB_HOST,
    Stack,
    grant_everything,
)

REPO = Path(__file__).resolve().parents[1]


# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice_token(stack: Stack) -> str:
    return stack.idp.token("alice", email="alice@example.com", email_verified=True, groups=["developers", "sre"])


def kubeconfig(stack: Stack, path: Path, token: str, cluster: str = "dev", mode: str = "reverse") -> Path:
    args = [str(REPO / ".venv/bin/jitgate"), "kubeconfig", "--policy", str(stack.policy), "--cluster", cluster,
            "--user", "alice", "--token", token, "--gateway-ca", str(stack.gateway.ca_path), "-o", str(path)]
    args += ["--server", stack.gateway.reverse_url(cluster)] if mode == "reverse" else ["--proxy", stack.gateway.proxy_url]
    subprocess.run(args, check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def kc(stack: Stack, alice_token: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kubeconfig(stack, tmp_path_factory.mktemp("kc") / "reverse", alice_token)


def gateway_request(stack: Stack, method: str, path: str, headers: dict[str, str] | None = None,
                    body: bytes | None = None, cluster: str = "dev") -> tuple[int, dict]:
    """One raw HTTPS call to the gateway's reverse listener; returns (status, parsed JSON body)."""
    context = ssl.create_default_context(cafile=str(stack.gateway.ca_path))
    port = int(stack.gateway.reverse_url(cluster).rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def audit_for(stack: Stack, predicate, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = [e for e in stack.gateway.audit_events() if predicate(e)]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def secrets_of(stack: Stack, *tokens: str) -> list[str]:
    """Everything a log, recording or audit line must never contain: each token and its signature."""
    return [t for t in tokens if t] + [t.split(".")[2] for t in tokens if t and t.count(".") == 2 and len(t.split(".")[2]) > 8]


# --- kubectl through the gateway ------------------------------------------------------------------------


def test_kubectl_reverse_mode_reads_and_audit(stack: Stack, kc: Path) -> None:
    pods = run_kubectl(kc, "get", "pods", "-A", check=True).stdout
    assert "toolbox" in pods and "nginx" in pods and "NAMESPACE" in pods
    described = run_kubectl(kc, "describe", "pod", "-n", "dev", "toolbox", check=True).stdout
    assert "Name:" in described and "toolbox" in described
    listed = audit_for(stack, lambda e: e["requestURI"].startswith("/api/v1/pods") and e["verb"] == "list")
    assert listed, "the all-namespaces list is audited"
    event = listed[-1]
    assert event["user"] == {"username": "alice@example.com", "groups": ["oidc:developers", "oidc:sre"]}
    assert event["objectRef"] == {"resource": "pods", "apiVersion": "v1"}
    assert event["responseStatus"]["code"] == 200 and event["stage"] == "ResponseComplete"
    assert event["annotations"]["jitgate.dev/cluster"] == "dev"
    got = audit_for(stack, lambda e: e["verb"] == "get" and e.get("objectRef", {}).get("name") == "toolbox")
    assert got[-1]["objectRef"]["namespace"] == "dev" and got[-1]["objectRef"]["resource"] == "pods"


def test_kubectl_create_apply_delete(stack: Stack, kc: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: e2e-settings\n  namespace: dev\ndata:\n  a: '1'\n")
    assert "created" in run_kubectl(kc, "apply", "-f", str(manifest), check=True).stdout
    manifest.write_text(manifest.read_text().replace("a: '1'", "a: '2'"))
    assert "configured" in run_kubectl(kc, "apply", "-f", str(manifest), check=True).stdout
    out = run_kubectl(kc, "get", "configmap", "-n", "dev", "e2e-settings", "-o", "jsonpath={.data.a}", check=True).stdout
    assert out == "2"
    ns = tmp_path / "ns.yaml"
    ns.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: e2e-ns\n")
    assert "created" in run_kubectl(kc, "create", "-f", str(ns), check=True).stdout
    assert "deleted" in run_kubectl(kc, "delete", "configmap", "-n", "dev", "e2e-settings", check=True).stdout
    missing = run_kubectl(kc, "get", "configmap", "-n", "dev", "e2e-settings")
    assert missing.returncode != 0 and 'configmaps "e2e-settings" not found' in missing.stderr
    verbs = {(e["verb"], e.get("objectRef", {}).get("name")) for e in stack.gateway.audit_events()
             if e.get("objectRef", {}).get("resource") in ("configmaps", "namespaces")}
    # A create names its object from the body, as kube-apiserver's audit does (the URL has no name).
    assert {("patch", "e2e-settings"), ("delete", "e2e-settings"), ("create", "e2e-settings")} <= verbs


def test_watch_streams_through_unbuffered(stack: Stack, kc: Path) -> None:
    proc = subprocess.Popen([KUBECTL, "get", "configmaps", "-n", "dev", "-w", "--output-watch-events"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kubectl_env(kc))
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), l.decode())) for l in proc.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while not any("app-config" in l for _, l in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("app-config" in l for _, l in lines), "the initial list arrives"
        created_at = time.monotonic()
        stack.dev.json("POST", "/api/v1/namespaces/dev/configmaps", {"metadata": {"name": "watched-cm"}}, token=INSPECTOR_TOKEN)
        while not any("watched-cm" in l for _, l in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = [t for t, l in lines if "watched-cm" in l]
        assert seen, f"the event never reached kubectl: {lines}"
        assert seen[0] - created_at < 1.0, "an event reaches the client well under a second after the cluster sends it"
    finally:
        proc.terminate()
        proc.wait(5)
    started = audit_for(stack, lambda e: e["verb"] == "watch" and e["stage"] == "ResponseStarted")
    assert started and started[-1]["objectRef"]["resource"] == "configmaps"
    assert audit_for(stack, lambda e: e["auditID"] == started[-1]["auditID"] and e["stage"] == "ResponseComplete")


def test_logs_follow_streams(stack: Stack, kc: Path) -> None:
    proc = subprocess.Popen([KUBECTL, "logs", "-f", "-n", "dev", "toolbox"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=kubectl_env(kc))
    try:
        first = proc.stdout.readline()
        t0 = time.monotonic()
        lines = [proc.stdout.readline() for _ in range(2)]
        assert first and all(lines), "follow keeps streaming new lines"
        assert time.monotonic() - t0 < 3.0
    finally:
        proc.terminate()
        proc.wait(5)
    assert audit_for(stack, lambda e: e.get("objectRef", {}).get("subresource") == "log" and e["stage"] == "ResponseStarted")


def test_exec_non_interactive_and_stdin(stack: Stack, kc: Path) -> None:
    out = run_kubectl(kc, "exec", "-n", "dev", "toolbox", "--", "cat", "/etc/hostname", check=True).stdout
    assert out.strip() == "toolbox"
    echoed = run_kubectl(kc, "exec", "-i", "-n", "dev", "toolbox", "--", "cat", input="hello through the gateway\n", check=True)
    assert echoed.stdout == "hello through the gateway\n"
    failed = run_kubectl(kc, "exec", "-n", "dev", "toolbox", "--", "sh", "-c", "exit 3")
    assert failed.returncode == 3
    # A secret on the command line is masked in the audit event's requestURI (the command still ran).
    typed = run_kubectl(kc, "exec", "-n", "dev", "toolbox", "--", "env", "DB_PASSWORD=cmdline-canary-5c1", "true")
    assert typed.returncode == 0, typed.stderr
    assert "cmdline-canary-5c1" not in stack.gateway.audit_path.read_text()
    assert any("DB_PASSWORD%3D%5Bmasked%3Asecret-pair%5D" in e["requestURI"] for e in audit_for(
        stack, lambda e: e.get("objectRef", {}).get("subresource") == "exec"))
    execs = audit_for(stack, lambda e: e.get("objectRef", {}).get("subresource") == "exec")
    assert execs and all(e["verb"] == "create" for e in execs), "an exec is never audited as a read"
    assert {e["stage"] for e in execs} >= {"ResponseStarted", "ResponseComplete"}
    assert any("command=cat" in e["requestURI"] and "hostname" in e["requestURI"] for e in execs), \
        "this test's own exec is audited with its command"


def test_exec_interactive_shell(stack: Stack, kc: Path) -> None:
    proc = subprocess.Popen([KUBECTL, "exec", "-i", "-n", "dev", "toolbox", "--", "sh"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kubectl_env(kc))
    out, err = proc.communicate(b"echo one-of-a-kind-line\nhostname\nexit 0\n", timeout=20)
    assert proc.returncode == 0, err
    assert out.decode().split() == ["one-of-a-kind-line", "toolbox"]
    # The gateway's log has the session's handshake, never its frames: not one line per keystroke or
    # output frame (their count and timing), nor their content.
    log = stack.gateway.log()
    assert "101 Switching Protocols" in log, "the session itself is logged"
    assert "WebSocket text message" not in log and "WebSocket binary message" not in log
    assert "one-of-a-kind-line" not in log


def test_flow_detail_that_prints_bodies_is_refused(stack: Stack, tmp_path: Path) -> None:
    from testkit.gateway import GatewayProcess

    gateway = GatewayProcess(tmp_path / "gw", stack.policy, options={"flow_detail": "3"})
    proc = subprocess.Popen(gateway.command(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "flow_detail 3 and 4 print message bodies before jitgate masks them" in output, output


@pytest.mark.parametrize("mode", ["https_proxy", "proxy_url"])
def test_regular_mode(stack: Stack, alice_token: str, tmp_path: Path, mode: str) -> None:
    if mode == "proxy_url":
        config = kubeconfig(stack, tmp_path / "kc", alice_token, mode="proxy")
        env = kubectl_env(config)
    else:
        # HTTPS_PROXY with a hostname only the gateway can reach: kubectl does not resolve it itself.
        config = kubeconfig(stack, tmp_path / "kc", alice_token, mode="proxy")
        text = config.read_text()
        assert "proxy-url" in text
        config.write_text("\n".join(l for l in text.splitlines() if "proxy-url" not in l) + "\n")
        env = {**kubectl_env(config), "HTTPS_PROXY": stack.gateway.proxy_url}
    result = subprocess.run([KUBECTL, "get", "pods", "-n", "prod"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "api" in result.stdout and "worker" in result.stdout
    assert f"https://{DEV_HOST}" in config.read_text()
    exec_out = subprocess.run([KUBECTL, "exec", "-n", "prod", "api", "--", "echo", "via", "proxy"], env=env,
                              capture_output=True, text=True, timeout=30)
    assert exec_out.stdout.strip() == "via proxy", exec_out.stderr


def test_regular_mode_is_not_an_open_proxy(stack: Stack) -> None:
    for target in ("example.com:443", "127.0.0.1:22", f"{DEV_HOST}:8443", f"127.0.0.1:{stack.dev.port}"):
        conn = http.client.HTTPConnection("127.0.0.1", stack.gateway.proxy_port, timeout=10)
        conn.request("CONNECT", target)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 403, (target, resp.status)
        assert b"not a cluster behind this gateway" in body
    assert audit_for(stack, lambda e: e["requestURI"] == "example.com:443" and e.get("responseStatus", {}).get("code") == 403)


def test_cluster_sees_only_the_gateway_credential(stack: Stack, kc: Path, alice_token: str) -> None:
    stack.dev.clear_seen()
    run_kubectl(kc, "get", "pods", "-n", "dev", check=True)
    seen = [r for r in stack.dev.requests_seen() if not r["path"].startswith("/_standin")]
    assert seen
    for record in seen:
        assert record["auth_kind"] == "eks"
        assert record["token_sha256"] != token_sha256(alice_token)
        assert record["eks"]["cluster"] == "dev" and "x-k8s-aws-id" in record["eks"]["signed_headers"]
        assert record["eks"]["access_key_id"].startswith("ASIA"), "signed with the assumed role, not base keys"
        assert record["headers"]["Host"] == DEV_HOST
        assert not any(k.lower().startswith("impersonate-") for k in record["headers"])
    # AssumeRole names alice; and once the gateway holds her role session, more calls make no STS call.
    def alice_calls():
        return [c for c in stack.sts.assume_role_calls(stack.role_arn) if c.params.get("RoleSessionName") == "alice@example.com"]
    before = alice_calls()
    assert before and all(c.params["SourceIdentity"] == "alice@example.com" for c in before)
    for _ in range(3):
        run_kubectl(kc, "get", "pods", "-n", "dev", check=True)
    assert len(alice_calls()) == len(before), "steady state: no STS call per request"


def test_token_file_cluster_with_impersonation(stack: Stack, alice_token: str, tmp_path: Path) -> None:
    config = kubeconfig(stack, tmp_path / "kc-lab", alice_token, cluster="lab")
    stack.lab.clear_seen()
    run_kubectl(config, "get", "pods", "-n", "default", check=True)
    seen = [r for r in stack.lab.requests_seen() if r["path"] == "/api/v1/namespaces/default/pods"]
    assert seen and seen[-1]["token_sha256"] == token_sha256(LAB_CLUSTER_TOKEN)
    assert seen[-1]["impersonate_user"] == "alice@example.com"
    assert seen[-1]["impersonate_groups"] == ["oidc:developers", "oidc:sre"]
    assert seen[-1]["headers"]["Host"] == f"{LAB_HOST}:6443"


# --- refusals ------------------------------------------------------------------------------------------


def forged_tokens(stack: Stack) -> dict[str, tuple[str, str]]:
    """name -> (token, expected reason fragment)"""
    kid, key = stack.idp.signing_key()
    now = int(time.time())
    good = forge.id_claims(stack.idp.issuer, "mallory", "jitgate", email="mallory@example.com", email_verified=True)
    return {
        "expired": (forge.sign({**good, "iat": now - 7200, "exp": now - 3600}, key, kid=kid), "expired"),
        "wrong audience": (forge.sign({**good, "aud": "someone-else"}, key, kid=kid), "audience"),
        "unknown issuer": (forge.sign({**good, "iss": "https://evil.example"}, key, kid=kid), "not trusted"),
        "alg none": (forge.alg_none(good, kid), "none"),
        "hmac with public key": (forge.hs256_with_public_key(good, key.public_key(), kid), "HS256"),
        "attacker key": (forge.sign(good, forge.attacker_rsa_key(), kid=kid), "signature"),
        "not yet valid": (forge.sign({**good, "nbf": now + 3600}, key, kid=kid), "not yet valid"),
        "garbage": ("definitely-not-a-jwt", "not a JWT"),
    }


def test_forged_tokens_are_refused_audited_and_never_logged(stack: Stack) -> None:
    cases = forged_tokens(stack)
    for name, (token, reason) in cases.items():
        status, body = gateway_request(stack, "GET", "/api/v1/namespaces/dev/pods", {"Authorization": f"Bearer {token}"})
        assert status == 401, (name, body)
        assert body["kind"] == "Status" and body["reason"] == "Unauthorized"
        assert reason.lower() in body["message"].lower(), (name, body["message"])
        assert token not in body["message"]
    status, body = gateway_request(stack, "GET", "/api/v1/namespaces/dev/pods")
    assert status == 401 and "no bearer token" in body["message"]
    denied = [e for e in stack.gateway.audit_events() if e.get("responseStatus", {}).get("code") == 401]
    assert len(denied) >= len(cases) + 1
    assert all(e["user"]["username"] == "system:anonymous" and e["annotations"]["jitgate.dev/decision"] == "deny" for e in denied)
    written = stack.gateway.log() + stack.gateway.audit_path.read_text()
    for token, _ in cases.values():
        for fragment in secrets_of(stack, token):
            assert fragment not in written


def test_kubectl_with_a_bad_token_prints_the_reason(stack: Stack, alice_token: str, tmp_path: Path) -> None:
    """kubectl's aggregated-discovery client cannot decode any 401 Status (against a real apiserver too),
    so a first run says only that login is needed; once discovery is cached, as for a user whose
    token just expired, kubectl prints the gateway's reason verbatim."""
    kid, key = stack.idp.signing_key()
    claims = forge.id_claims(stack.idp.issuer, "alice", "jitgate", email="alice@example.com", email_verified=True)
    expired = forge.sign({**claims, "iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, key, kid=kid)
    config = kubeconfig(stack, tmp_path / "kc", expired)
    first = run_kubectl(config, "get", "pods", "-n", "dev")
    assert first.returncode != 0 and "You must be logged in to the server" in first.stderr
    valid = kubeconfig(stack, tmp_path / "kc", alice_token)  # same cache folder: discovery gets cached
    run_kubectl(valid, "get", "pods", "-n", "dev", check=True)
    config = kubeconfig(stack, tmp_path / "kc", expired)
    result = run_kubectl(config, "get", "pods", "-n", "dev")
    assert result.returncode != 0
    assert "jitgate: invalid bearer token: token has expired" in result.stderr, result.stderr


@pytest.mark.parametrize("header", ["Impersonate-User", "impersonate-group", "IMPERSONATE-UID", "Impersonate-Extra-Scopes"])
def test_impersonation_headers_are_refused(stack: Stack, alice_token: str, header: str) -> None:
    stack.dev.clear_seen()
    status, body = gateway_request(stack, "GET", "/api/v1/namespaces/dev/pods",
                                   {"Authorization": f"Bearer {alice_token}", header: "system:admin"})
    assert status == 403 and "impersonation is not allowed" in body["message"]
    assert not [r for r in stack.dev.requests_seen() if not r["path"].startswith("/_standin")]
    assert audit_for(stack, lambda e: e.get("responseStatus", {}).get("code") == 403 and "impersonation" in e["annotations"].get("jitgate.dev/reason", ""))


def test_kubectl_as_is_refused(stack: Stack, kc: Path) -> None:
    result = run_kubectl(kc, "get", "pods", "-n", "dev", "--as", "system:admin")
    assert result.returncode != 0 and "impersonation is not allowed" in result.stderr


@pytest.mark.parametrize("path", ["/api/v1/namespaces/dev/pods/../../kube-system/pods", "/api/v1/namespaces/dev%2Fpods",
                                  "/api//v1/pods", "/api/v1/namespaces/%2e%2e/pods"])
def test_ambiguous_paths_are_refused(stack: Stack, alice_token: str, path: str) -> None:
    status, body = gateway_request(stack, "GET", path, {"Authorization": f"Bearer {alice_token}"})
    assert status == 400 and body["reason"] == "BadRequest" and "ambiguous" in body["message"]


def test_websocket_subprotocol_token_is_taken_and_removed(stack: Stack, alice_token: str) -> None:
    """Browsers send the token as a WebSocket subprotocol; it must not reach the cluster either."""
    encoded = base64.urlsafe_b64encode(alice_token.encode()).decode().rstrip("=")
    stack.dev.clear_seen()
    status, _ = gateway_request(stack, "GET", "/api/v1/namespaces/dev/pods",
                                {"Sec-WebSocket-Protocol": f"base64url.bearer.authorization.k8s.io.{encoded}, v5.channel.k8s.io"})
    assert status == 200
    (record,) = [r for r in stack.dev.requests_seen() if r["path"] == "/api/v1/namespaces/dev/pods"]
    assert record["auth_kind"] == "eks"
    assert record["headers"].get("Sec-WebSocket-Protocol") == "v5.channel.k8s.io"


def test_plaintext_to_a_reverse_listener_is_refused(stack: Stack, alice_token: str) -> None:
    port = int(stack.gateway.reverse_url("dev").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/v1/namespaces/dev/pods", headers={"Authorization": f"Bearer {alice_token}"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status in (400, 401) and body["kind"] == "Status"


def test_no_credential_in_logs_or_recordings(stack: Stack, alice_token: str, tmp_path: Path, ca, idp, sts, dev_cluster, lab_cluster) -> None:
    """A gateway run with the most verbose flow logging it allows (flow_detail 2: headers; 3 and 4 would
    print bodies before masking and are refused, see test_flow_detail_that_prints_bodies_is_refused),
    `-w` flow files and a HAR: no caller token, no EKS token."""
    from testkit.gateway import GatewayProcess
    from tests.conftest import aws_env

    flows, har = tmp_path / "flows.mitm", tmp_path / "session.har"
    gateway = GatewayProcess(tmp_path / "gw", stack.policy, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                             options={"save_stream_file": str(flows), "hardump": str(har), "flow_detail": "2",
                                      "grant_store": str(stack.grant_store)},
                             env=aws_env(dict(os.environ), tmp_path))
    gateway.start()
    try:
        config = tmp_path / "kc"
        subprocess.run([str(REPO / ".venv/bin/jitgate"), "kubeconfig", "--policy", str(stack.policy), "--cluster", "dev",
                        "--user", "alice", "--token", alice_token, "--gateway-ca", str(gateway.ca_path),
                        "--server", gateway.reverse_url("dev"), "-o", str(config)], check=True)
        run_kubectl(config, "get", "pods", "-n", "dev", check=True)
        run_kubectl(config, "exec", "-n", "dev", "toolbox", "--", "echo", "hi", check=True)
        eks_tokens = {r["token_sha256"] for r in stack.dev.requests_seen() if r["auth_kind"] == "eks"}
    finally:
        gateway.stop()
    assert flows.exists() and har.exists()
    written = gateway.log().encode() + flows.read_bytes() + har.read_bytes() + gateway.audit_path.read_bytes()
    assert b"GET" in written
    for fragment in secrets_of(stack, alice_token):
        assert fragment.encode() not in written
    assert b"k8s-aws-v1." not in written and b"Bearer" not in written
    assert eks_tokens

    # The flow file is complete and mitmweb-readable: one flow per audited call, each carrying the
    # plain per-call record (decision, identity, request attributes).
    from mitmproxy import io as mitm_io

    with flows.open("rb") as f:
        recorded = list(mitm_io.FlowReader(f).stream())
    records = [flow.metadata.get("jitgate") for flow in recorded]
    assert recorded and all(isinstance(r, dict) for r in records)
    assert {r["auditID"] for r in records} == {e["auditID"] for e in gateway.audit_events()}
    execs = [r for r in records if r.get("request", {}).get("subresource") == "exec"]
    assert len(execs) == 1 and execs[0]["decision"] == "allow"
    assert execs[0]["user"]["username"].startswith("alice") and execs[0]["cluster"] == "dev"
    assert execs[0]["request"]["command"] == ["echo", "hi"]
    assert any(r.get("request", {}).get("resource") == "pods" and r["decision"] == "allow" for r in records)


def test_audit_failure_fails_closed(stack: Stack, alice_token: str, tmp_path: Path) -> None:
    """/dev/full accepts the open and fails every write: no call may reach the cluster, not even the
    first (the RequestReceived line is written before anything is forwarded). HTTP/1.1 and kubectl
    (HTTP/2) in reverse mode, kubectl through the proxy listener (CONNECT, then TLS)."""
    from testkit.gateway import GatewayProcess
    from tests.conftest import aws_env

    gateway = GatewayProcess(tmp_path / "gw", stack.policy,
                             reverse_endpoints={"dev": f"https://{DEV_HOST}", "lab": f"https://{LAB_HOST}:6443"},
                             options={"audit_log": "/dev/full", "grant_store": str(stack.grant_store)},
                             env=aws_env(dict(os.environ), tmp_path))
    gateway.start()
    try:
        stack.dev.json("POST", "/api/v1/namespaces/dev/configmaps", {"metadata": {"name": "audit-victim"}}, token=INSPECTOR_TOKEN)
        stack.lab.json("POST", "/api/v1/namespaces/dev/configmaps", {"metadata": {"name": "audit-victim"}}, token=LAB_CLUSTER_TOKEN)
        stack.dev.clear_seen()
        stack.lab.clear_seen()
        statuses = []
        for cluster in ("dev", "dev", "dev", "lab", "lab"):  # eks and token_file credentials
            context = ssl.create_default_context(cafile=str(gateway.ca_path))
            conn = http.client.HTTPSConnection("127.0.0.1", gateway.reverse[cluster][1], context=context, timeout=10)
            conn.request("DELETE", "/api/v1/namespaces/dev/configmaps/audit-victim", headers={"Authorization": f"Bearer {alice_token}"})
            resp = conn.getresponse()
            statuses.append((resp.status, json.loads(resp.read())["message"]))
            conn.close()
        kubectl_runs = []
        for mode in ("reverse", "proxy"):
            config = tmp_path / f"kc-{mode}"
            args = [str(REPO / ".venv/bin/jitgate"), "kubeconfig", "--policy", str(stack.policy), "--cluster", "dev",
                    "--user", "alice", "--token", alice_token, "--gateway-ca", str(gateway.ca_path), "-o", str(config)]
            args += ["--server", gateway.reverse_url("dev")] if mode == "reverse" else ["--proxy", gateway.proxy_url]
            subprocess.run(args, check=True, capture_output=True)
            # --raw: the DELETE itself, without discovery first (discovery is refused the same way).
            kubectl_runs.append(run_kubectl(config, "delete", "--raw", "/api/v1/namespaces/dev/configmaps/audit-victim"))
    finally:
        gateway.stop()
    assert all(code == 503 and "audit log cannot be written" in msg for code, msg in statuses), statuses
    for result in kubectl_runs:
        assert result.returncode != 0 and "audit log cannot be written" in result.stderr, result.stderr
    for api, token in ((stack.dev, INSPECTOR_TOKEN), (stack.lab, LAB_CLUSTER_TOKEN)):
        seen = [r for r in api.requests_seen() if not r["path"].startswith("/_standin")]
        assert seen == [], "no call reached the cluster while the audit log could not be written"
        code, body = api.json("GET", "/api/v1/namespaces/dev/configmaps/audit-victim", token=token)
        assert code == 200, "the object was never deleted"


def test_policy_error_stops_the_start(stack: Stack, tmp_path: Path) -> None:
    from testkit.gateway import GatewayProcess

    bad = stack.policy.with_name("bad-policy.yaml")  # beside the original, so its relative paths hold
    bad.write_text(stack.policy.read_text().replace("username_claim: email", "username_claim: email\n    algorithms: [none]"))
    gateway = GatewayProcess(tmp_path / "gw", bad)
    proc = subprocess.Popen(gateway.command(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    # The issuer's settings are checked together, so the error points at the provider's first line.
    line = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if "- issuer:" in l)
    assert f"{bad}:{line}: identity_providers[0]: algorithms" in output, output
    assert "none" in output


def open_watch(port: int, ca_path: Path, token: str) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
    context = ssl.create_default_context(cafile=str(ca_path))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=15)
    conn.request("GET", "/api/v1/namespaces/prod/configmaps?watch=true", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert b"ADDED" in resp.readline()  # the initial state
    return conn, resp


def test_quiet_watch_outlives_the_proxy_idle_timeout(stack: Stack, alice_token: str, tmp_path: Path) -> None:
    """tcp_timeout=2 would cut a watch quiet for 3 s; watch_idle_timeout raises it. Control: without the raise it is cut."""
    from testkit.gateway import GatewayProcess
    from tests.conftest import aws_env

    # Both gateways side by side, their watches quiet over the same 3.5 s, then one change both would see.
    gateways = {name: GatewayProcess(tmp_path / name, stack.policy, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                                     options={"tcp_timeout": "2", "watch_idle_timeout": idle,
                                              "grant_store": str(stack.grant_store)},
                                     env=aws_env(dict(os.environ), tmp_path))
                for name, idle in (("raised", "6"), ("control", "2"))}
    outcomes = {}
    try:
        for gateway in gateways.values():
            gateway.launch()
        watches = {name: open_watch(g.wait_ready().reverse["dev"][1], g.ca_path, alice_token) for name, g in gateways.items()}
        time.sleep(3.5)
        stack.dev.json("POST", "/api/v1/namespaces/prod/configmaps", {"metadata": {"name": "quiet-both"}},
                       token=INSPECTOR_TOKEN)
        for name, (conn, resp) in watches.items():
            try:
                outcomes[name] = b"".join(resp.readline() for _ in range(3))
            except OSError as e:
                outcomes[name] = repr(e).encode()
            conn.close()
    finally:
        for gateway in gateways.values():
            gateway.stop()
    assert b"quiet-both" in outcomes["raised"], outcomes
    assert b"quiet-both" not in outcomes["control"], outcomes


def test_client_certificate_credential(stack: Stack, ca, alice_token: str, tmp_path: Path) -> None:
    """A cluster reached with a client certificate held by the gateway, set on the upstream TLS connection."""
    from testkit.gateway import GatewayProcess
    from testkit.standin.process import StandinProcess
    from tests.conftest import aws_env

    client_cert, client_key = ca.issue("jitgate-gateway-client", client=True)
    host = "api.certs.jitgate.test"
    with StandinProcess(tmp_path / "standin").start(ca, tokens=[INSPECTOR_TOKEN], client_ca=ca.cert_path, hostnames=[host]) as api:
        policy = tmp_path / "policy.yaml"
        text = stack.policy.read_text()
        idp_section = text[text.index("identity_providers:"):]
        policy.write_text(E2E_RULES + f"""clusters:
  - name: certs
    endpoint: https://{host}
    connect: 127.0.0.1:{api.port}
    ca_file: {ca.cert_path}
    credential:
      client_cert: {{cert_file: {client_cert}, key_file: {client_key}}}
{idp_section}""")
        grant_everything(tmp_path / "jitgate.db", policy, "certs")
        gateway = GatewayProcess(tmp_path / "gw", policy, reverse_endpoints={"certs": f"https://{host}"},
                                 options={"grant_store": str(tmp_path / "jitgate.db")},
                                 env=aws_env(dict(os.environ), tmp_path)).start()
        try:
            config = tmp_path / "kc"
            subprocess.run([str(REPO / ".venv/bin/jitgate"), "kubeconfig", "--policy", str(policy), "--cluster", "certs",
                            "--user", "alice", "--token", alice_token, "--gateway-ca", str(gateway.ca_path),
                            "--server", gateway.reverse_url("certs"), "-o", str(config)], check=True)
            assert "toolbox" in run_kubectl(config, "get", "pods", "-n", "dev", check=True).stdout
            seen = [r for r in api.requests_seen() if r["path"] == "/api/v1/namespaces/dev/pods"]
        finally:
            gateway.stop()
    assert seen and seen[-1]["auth_kind"] == "cert" and "jitgate-gateway-client" in seen[-1]["cert_subject"]
    assert seen[-1]["token_sha256"] is None


def test_plain_http_through_the_proxy_is_refused(stack: Stack, alice_token: str) -> None:
    """An absolute-form http:// request in regular mode would carry the token in clear text: refused."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway.proxy_port, timeout=10)
    conn.request("GET", f"http://{DEV_HOST}/api/v1/namespaces/dev/pods", headers={"Authorization": f"Bearer {alice_token}"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status in (400, 403) and body["kind"] == "Status", body


def test_exec_interactive_tty(stack: Stack, kc: Path) -> None:
    """`kubectl exec -it` on a real terminal, through the gateway: prompt, command, exit code."""
    from testkit.standin.process import TerminalSession

    session = TerminalSession([KUBECTL, "exec", "-it", "-n", "dev", "toolbox", "--", "sh"], kubectl_env(kc))
    try:
        session.expect(b"toolbox:/# ")
        session.type(b"echo hello $HOSTNAME")
        session.expect(b"hello toolbox\r\n")
        session.type(b"exit 5")
        assert session.proc.wait(10) == 5
    finally:
        session.close()


def test_caller_cookies_and_proxy_credentials_never_reach_the_cluster(stack: Stack, alice_token: str) -> None:
    stack.dev.clear_seen()
    code, _ = gateway_request(stack, "GET", "/api/v1/namespaces/dev/pods",
                              {"Authorization": f"Bearer {alice_token}", "Cookie": "oauth2_proxy=session-cookie-7d1",
                               "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0"})
    assert code == 200
    seen = [r for r in stack.dev.requests_seen() if r["path"].startswith("/api/v1/namespaces/dev/pods")]
    assert seen
    for record in seen:
        names = {k.lower() for k in record["headers"]}
        assert "cookie" not in names and "proxy-authorization" not in names, record["headers"]
        assert "session-cookie-7d1" not in json.dumps(record)
