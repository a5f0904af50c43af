"""Fail closed for real: the audit line is durable before a call is forwarded, a step that breaks
in a connection or TLS hook refuses the connection, `require_grant` does what it says, and callers
never read file paths, role ARNs or internal URLs (the gateway's log has them).

Unit tests with mitmproxy's harness (taddons/tflow), then the real gateway (mitmdump) with real
kubectl and raw HTTP/1.1, in reverse and regular mode.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import os
import re
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow, tutils

from jitgate.audit.log import AuditLogError
from jitgate.chain.flow import call_of
from jitgate.identity.oidc import Identity
from jitgate.kube.request_info import parse_request
from testkit.gateway import REPO, GatewayProcess
from testkit.net import free_port
from testkit.standin.process import run_kubectl
from tests.conftest import DEV_HOST, LAB_HOST, Stack, aws_env


def load_addon(name: str):
    spec = importlib.util.spec_from_file_location(f"jitgate_addons_under_test.{name}", REPO / f"addons/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


audit_module = load_addon("audit")
grants_module = load_addon("grants")
upstream_module = load_addon("upstream_credential")

ALICE = Identity("alice@example.com", ("oidc:developers",), "https://idp.example", "alice", 4e9, {})


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- the audit step: RequestReceived before forwarding -----------------------------------------------


def test_request_received_is_written_before_forwarding(tmp_path: Path) -> None:
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(tmp_path / "audit.log"))
        f = tflow.tflow()
        call_of(f).allow("granted")
        audit.request(f)
        assert f.response is None, "forwarded"
        events = audit_lines(tmp_path / "audit.log")
        assert [e["stage"] for e in events] == ["RequestReceived"], "on disk before the request goes upstream"
        assert "responseStatus" not in events[0] and events[0]["annotations"]["jitgate.dev/decision"] == "allow"
        f.response = tutils.tresp()
        audit.response(f)
        assert [e["stage"] for e in audit_lines(tmp_path / "audit.log")] == ["RequestReceived", "ResponseComplete"]


def test_refused_calls_get_no_request_received(tmp_path: Path) -> None:
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(tmp_path / "audit.log"))
        f = tflow.tflow(resp=True)  # an earlier step answered it
        audit.request(f)
        assert audit_lines(tmp_path / "audit.log") == []


def test_streamed_request_is_recorded_at_requestheaders(tmp_path: Path) -> None:
    """A body a step streams goes upstream right after requestheaders: the record comes first."""
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(tmp_path / "audit.log"))
        f = tflow.tflow()
        f.request.stream = True
        audit.requestheaders(f)
        audit.request(f)
        assert [e["stage"] for e in audit_lines(tmp_path / "audit.log")] == ["RequestReceived"]


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_unwritable_log_refuses_the_first_call_with_503(tmp_path: Path, monkeypatch, streamed: bool) -> None:
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(tmp_path / "audit.log"))

        def fail(event):
            raise AuditLogError("cannot write audit log: No space left on device")

        monkeypatch.setattr(audit.log, "write", fail)
        f = tflow.tflow()
        f.request.stream = streamed
        audit.requestheaders(f)
        audit.request(f)
        assert f.response is not None and f.response.status_code == 503, "the very first call is refused"
        assert not f.request.stream, "mitmproxy cannot answer a request it streams"
        status = json.loads(f.response.content)
        assert "audit log cannot be written" in status["message"] and call_of(f).audit_id in status["message"]
        audit.response(f)
        assert f.response.status_code == 503, "the 503 is not turned into a 500 at response"


def test_a_log_that_recovers_lets_calls_through_again(tmp_path: Path, monkeypatch, caplog) -> None:
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(tmp_path / "audit.log"))
        real = audit.log.write
        monkeypatch.setattr(audit.log, "write", lambda e: (_ for _ in ()).throw(AuditLogError("full")))
        refused = tflow.tflow()
        audit.request(refused)
        assert refused.response.status_code == 503
        monkeypatch.setattr(audit.log, "write", real)
        with caplog.at_level(logging.WARNING, "jitgate.audit"):
            passed = tflow.tflow()
            audit.request(passed)
        assert passed.response is None
        assert "written again" in caplog.text


def test_request_received_costs_little(tmp_path: Path) -> None:
    """The one extra line per forwarded call: event building, serialising, stat and write."""
    import timeit

    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(tmp_path / "audit.log"))
        f = tflow.tflow()
        call = call_of(f)
        call.identity = ALICE
        call.info = parse_request("GET", "/api/v1/namespaces/dev/pods")
        call.allow("granted")
        n = 2000
        seconds = timeit.timeit(lambda: audit.write(f, "RequestReceived", None), number=n)
        per_call_us = seconds / n * 1e6
        print(f"RequestReceived write: {per_call_us:.1f} us per call")
        assert per_call_us < 500  # generous: the engine spends ~1400 us per call


# --- require_grant -------------------------------------------------------------------------------------


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "token").write_text("cluster-token\n")
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent("""\
        clusters:
          - name: dev
            endpoint: https://api.dev.example
            ca_file: ca.pem
            credential: {token_file: token}
        identity_providers:
          - issuer: https://idp.example
            client_ids: [jitgate]
        access_rules:
          - name: dev-read
            requesters: [oidc:developers]
            clusters: [dev]
            namespaces: [dev]
            resources: [pods]
            verbs: [get, list]
            duration: {default: 1h, max: 1h}
            approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
            hold: {max_wait: 30s}
        """))
    return path


def checked_flow(method: str, path: str):
    """A flow as the steps before grants leave it: identity, cluster and request attributes set."""
    from mitmproxy import ctx

    from jitgate.policy.loader import load_policy_cached

    flow = tflow.tflow()
    flow.request.method, flow.request.path = method, path
    call = call_of(flow)
    call.identity = ALICE
    call.cluster = load_policy_cached(ctx.options.policy).by_name["dev"]
    call.info = parse_request(method, path)
    return flow


@pytest.mark.parametrize("require_grant", [True, False])
def test_require_grant(policy: Path, tmp_path: Path, caplog, require_grant: bool) -> None:
    """On (the default): a call no grant covers is refused, and nobody is held. Off: it is allowed,
    says why in the audit, and a loud warning says so at start. Either way upstream_credential
    forwards only what the grants step allowed."""
    import asyncio

    from jitgate.access.service import AccessService
    from jitgate.chain.service_host import AccessServiceHost

    service = AccessService()
    host, grants, upstream = AccessServiceHost(service), grants_module.Grants(service), upstream_module.UpstreamCredential()
    with taddons.context(host, grants, upstream) as tctx, caplog.at_level(logging.WARNING):
        tctx.configure(host, policy=str(policy), grant_store=str(tmp_path / "grants.db"), require_grant=require_grant)
        flow = checked_flow("DELETE", "/api/v1/namespaces/prod/pods/x")  # no rule even covers it
        asyncio.run(grants.request(flow))
        asyncio.run(upstream.request(flow))
        call = call_of(flow)
        if require_grant:
            assert flow.response is not None and flow.response.status_code == 403
            assert call.decision == "deny" and "require_grant is off" not in caplog.text
        else:
            assert flow.response is None, "forwarded"
            assert flow.request.headers["Authorization"] == "Bearer cluster-token"
            assert call.decision == "allow" and call.reason.startswith("require_grant is off")
            assert "require_grant is off" in caplog.text and "WITHOUT A GRANT" in caplog.text.upper()


def test_upstream_credential_alone_forwards_nothing_undecided(policy: Path) -> None:
    """Without the grants step, no call is allowed, so none is forwarded (the option is gone here)."""
    import asyncio

    upstream = upstream_module.UpstreamCredential()
    with taddons.context(upstream) as tctx:
        tctx.configure(upstream, policy=str(policy))
        assert "require_grant" not in tctx.options
        flow = checked_flow("GET", "/api/v1/namespaces/dev/pods")
        asyncio.run(upstream.request(flow))
        assert flow.response.status_code == 403 and "Authorization" not in flow.request.headers


def test_credential_failure_message_has_no_path(policy: Path, tmp_path: Path, caplog) -> None:
    import asyncio

    upstream = upstream_module.UpstreamCredential()
    with taddons.context(upstream) as tctx, caplog.at_level(logging.WARNING, "jitgate.upstream"):
        tctx.configure(upstream, policy=str(policy))
        (tmp_path / "token").unlink()
        flow = checked_flow("GET", "/api/v1/namespaces/dev/pods")
        call_of(flow).allow("granted")
        asyncio.run(upstream.request(flow))
        assert flow.response.status_code == 503
        message = json.loads(flow.response.content)["message"]
        assert str(tmp_path) not in message and "token" not in message.replace("gateway's", "")
        assert call_of(flow).audit_id in message
        assert str(tmp_path / "token") in caplog.text and call_of(flow).audit_id in caplog.text


# --- the real gateway: a step that breaks in a connection or TLS hook -----------------------------------


BROKEN_GATEWAY = """\
# The whole chain, each hook of JITGATE_TEST_BREAKABLE ("step.hook,...") wrapped in one that raises
# while the file JITGATE_TEST_ARMED names it (nothing is armed while mitmdump starts: it exits on
# errors logged then). One gateway serves every case: a test arms its hook, and disarms it after.
import importlib.util, os
spec = importlib.util.spec_from_file_location("jitgate_gateway_with_a_broken_step", {gateway!r})
gateway = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gateway)
steps = gateway.build_chain()
armed_path = os.environ["JITGATE_TEST_ARMED"]
def armed():
    try:
        with open(armed_path) as f:
            return f.read()
    except FileNotFoundError:
        return ""
def breakable(name, hook, original):
    def broken(*args):
        if armed() == name:
            raise RuntimeError("injected failure in " + hook)
        return original(*args) if original else None
    return broken
for name in os.environ["JITGATE_TEST_BREAKABLE"].split(","):
    step_name, hook = name.split(".")
    target = next(s for s in steps if type(s).__name__.lower() == step_name)
    setattr(target, hook, breakable(name, hook, getattr(target, hook, None)))
addons = [gateway.Gateway(steps)]
"""

# (step, hook): a step that breaks there. Without the dispatcher refusing, mitmproxy would go on
# with its defaults: its own TLS setup (which, with ssl_verify_upstream_trusted_ca set, verifies the
# stand-in just fine), its own layer guess, an unchecked connection.
CONNECTION_FAILURES = [
    ("clusterrouting", "client_connected"),
    ("clusterrouting", "next_layer"),
    ("clusterrouting", "tls_start_client"),
    ("clusterrouting", "server_connect"),
    ("clusterrouting", "server_connected"),
    ("clusterrouting", "tls_start_server"),
    ("clusterrouting", "tls_established_server"),
]

# Hooks on the connection to the cluster: a call exists by then, and must still be audited.
SERVER_SIDE = {"server_connect", "server_connected", "tls_start_server", "tls_established_server"}


class BrokenGateway:
    """The gateway whose connection hooks (CONNECTION_FAILURES) each raise while armed."""

    def __init__(self, stack: Stack, ca, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / "broken_gateway.py"
        script.write_text(BROKEN_GATEWAY.format(gateway=str(REPO / "addons/gateway.py")))
        self.armed_path = directory / "armed"
        env = {**aws_env(dict(os.environ), directory), "JITGATE_TEST_ARMED": str(self.armed_path),
               "JITGATE_TEST_BREAKABLE": ",".join(f"{step}.{hook}" for step, hook in CONNECTION_FAILURES)}
        self.process = GatewayProcess(directory / "gw", stack.policy, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                                      options={"grant_store": str(stack.grant_store),
                                               "ssl_verify_upstream_trusted_ca": str(ca.cert_path)},
                                      script=str(script), env=env).start()

    def arm(self, broken: str) -> None:
        self.armed_path.write_text(broken)

    def disarm(self) -> None:
        self.armed_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def broken(stack: Stack, ca, tmp_path_factory: pytest.TempPathFactory):
    gateway = BrokenGateway(stack, ca, tmp_path_factory.mktemp("broken"))
    yield gateway
    gateway.process.stop()


def call_through(gateway: GatewayProcess, token: str, mode: str) -> int | str:
    """One GET over HTTP/1.1: the status, or the connection error the client saw."""
    context = ssl.create_default_context(cafile=str(gateway.ca_path))
    if mode == "reverse":
        conn = http.client.HTTPSConnection("127.0.0.1", gateway.reverse["dev"][1], context=context, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", gateway.proxy_port, context=context, timeout=10)
        conn.set_tunnel(DEV_HOST, 443)
    try:
        conn.request("GET", "/api/v1/namespaces/dev/configmaps", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


@pytest.fixture(scope="module")
def alice_token(stack: Stack) -> str:
    return stack.idp.token("alice", email="alice@example.com", email_verified=True, groups=["developers", "sre"])


@pytest.mark.parametrize("mode", ["reverse", "regular"])
@pytest.mark.parametrize("step,hook", CONNECTION_FAILURES, ids=[h for _, h in CONNECTION_FAILURES])
def test_a_step_failing_in_a_connection_hook_refuses_the_connection(stack: Stack, broken: BrokenGateway, alice_token: str,
                                                                    step: str, hook: str, mode: str) -> None:
    gateway = broken.process
    try:
        # Unbroken (and after whatever failed in the cases before), the call goes through.
        assert call_through(gateway, alice_token, mode) == 200, "unbroken, the call goes through"
        before, log_before = len(gateway.audit_events()), len(gateway.log())
        broken.arm(f"{step}.{hook}")
        stack.dev.clear_seen()
        outcome = call_through(gateway, alice_token, mode)
        deadline = time.monotonic() + (5 if hook in SERVER_SIDE else 0.3)
        while len([e for e in gateway.audit_events()[before:] if e["stage"] == "ResponseComplete"]) < (hook in SERVER_SIDE) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway.proc.poll() is None, "the gateway keeps running"
        log = gateway.log()[log_before:]
        after = gateway.audit_events()[before:]
    finally:
        broken.disarm()
    seen = [r for r in stack.dev.requests_seen() if not r["path"].startswith("/_standin")]
    assert seen == [], f"{hook} failed, yet the cluster received {seen}"
    assert outcome != 200, outcome
    assert f"injected failure in {hook}" in log, "the failure is in the gateway's log"
    for event in after:  # what was audited after the failure was not let through
        assert event["stage"] != "ResponseComplete" or event["responseStatus"]["code"] >= 400, event
    if hook in SERVER_SIDE:  # there was a call (its connection to the cluster failed): it is audited
        done = [e for e in after if e["stage"] == "ResponseComplete"]
        assert len(done) == 1 and done[0]["requestURI"] == "/api/v1/namespaces/dev/configmaps", after


def test_a_step_failing_in_server_connect_still_audits_the_call(broken: BrokenGateway, alice_token: str) -> None:
    gateway = broken.process
    before = len(gateway.audit_events())
    broken.arm("clusterrouting.server_connect")
    try:
        outcome = call_through(gateway, alice_token, "reverse")
        deadline = time.monotonic() + 5
        while not [e for e in gateway.audit_events()[before:] if e["stage"] == "ResponseComplete"] and time.monotonic() < deadline:
            time.sleep(0.05)
        events = gateway.audit_events()[before:]
    finally:
        broken.disarm()
    assert outcome == 502
    done = [e for e in events if e["stage"] == "ResponseComplete"]
    assert len(done) == 1 and done[0]["responseStatus"]["code"] == 502
    assert done[0]["requestURI"] == "/api/v1/namespaces/dev/configmaps"


# --- the real gateway: require_grant=false, end to end -------------------------------------------------


def test_require_grant_off_end_to_end(stack: Stack, tmp_path: Path) -> None:
    """bob has no grant: the shared gateway (require_grant on) refuses him; one with it off serves him
    and audits the call as allowed, saying why."""
    bob = stack.idp.token("bob", email="bob@example.com", email_verified=True, groups=["developers"])

    def bob_kubeconfig(gateway: GatewayProcess, path: Path) -> Path:
        subprocess.run([str(REPO / ".venv/bin/jitgate"), "kubeconfig", "--policy", str(stack.policy), "--cluster", "dev",
                        "--user", "bob", "--token", bob, "--gateway-ca", str(gateway.ca_path),
                        "--server", gateway.reverse_url("dev"), "-o", str(path)], check=True, capture_output=True)
        return path

    refused = run_kubectl(bob_kubeconfig(stack.gateway, tmp_path / "kc-on"), "get", "configmaps", "-n", "dev")
    assert refused.returncode != 0 and "Forbidden" in refused.stderr

    gateway = GatewayProcess(tmp_path / "gw", stack.policy, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                             options={"grant_store": str(stack.grant_store), "require_grant": "false"},
                             env=aws_env(dict(os.environ), tmp_path)).start()
    try:
        config = bob_kubeconfig(gateway, tmp_path / "kc-off")
        served = run_kubectl(config, "get", "configmaps", "-n", "dev")
        # kubectl's own question gets the same answer: no grant needed, the cluster's RBAC decides.
        can = run_kubectl(config, "auth", "can-i", "list", "configmaps", "-n", "dev", "-v", "6")
        events = gateway.audit_events()
        log = gateway.log()
    finally:
        gateway.stop()
    assert served.returncode == 0, served.stderr
    assert "app-config" in served.stdout
    assert can.returncode == 0 and can.stdout.strip() == "yes", can.stdout + can.stderr
    reviews = [e for e in events if e.get("objectRef", {}).get("resource") == "selfsubjectaccessreviews"]
    assert reviews and "require_grant is off" in reviews[-1]["annotations"]["jitgate.dev/self-review"]
    listed = [e for e in events if e.get("objectRef", {}).get("resource") == "configmaps" and e["verb"] == "list"]
    assert listed and all(e["user"]["username"] == "bob@example.com" for e in listed)
    assert all(e["annotations"]["jitgate.dev/decision"] == "allow" for e in listed)
    assert all(e["annotations"]["jitgate.dev/reason"].startswith("require_grant is off") for e in listed)
    assert "require_grant is off" in log


# --- the real gateway: what a failing credential tells the caller -------------------------------------


FORBIDDEN_IN_MESSAGES = (re.compile(r"arn:"), re.compile(r"https?://"), re.compile(r"127\.0\.0\.1"),
                         re.compile(r"/tmp/|/work/|\.pem|lab-token"))


def test_failing_credentials_give_callers_no_arn_url_or_path(stack: Stack, ca, alice_token: str, tmp_path: Path) -> None:
    """STS unreachable (dev, eks) and the token file gone (lab): 503 Status bodies with the audit ID
    and nothing internal; the gateway's log has the role ARN, the STS URL and the file path."""
    folder = tmp_path / "policy"
    folder.mkdir()
    dead_sts = f"https://127.0.0.1:{free_port()}"
    text = re.sub(r"sts_endpoint: \S+", f"sts_endpoint: {dead_sts}", stack.policy.read_text())
    text = text.replace("token_file: lab-token", f"token_file: {folder / 'lab-token'}")
    (folder / "lab-token").write_text("some-token\n")
    policy = folder / "policy.yaml"
    policy.write_text(text)
    gateway = GatewayProcess(tmp_path / "gw", policy,
                             reverse_endpoints={"dev": f"https://{DEV_HOST}", "lab": f"https://{LAB_HOST}:6443"},
                             options={"grant_store": str(stack.grant_store)}, env=aws_env(dict(os.environ), tmp_path)).start()
    deadline = time.monotonic() + 20  # its ports open before the policy is read: wait until it says it serves
    while "listening at" not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    (folder / "lab-token").unlink()  # the token file goes away under the running gateway
    bodies = {}
    try:
        for cluster in ("dev", "lab"):
            context = ssl.create_default_context(cafile=str(gateway.ca_path))
            conn = http.client.HTTPSConnection("127.0.0.1", gateway.reverse[cluster][1], context=context, timeout=30)
            conn.request("GET", "/api/v1/namespaces/dev/configmaps", headers={"Authorization": f"Bearer {alice_token}"})
            resp = conn.getresponse()
            bodies[cluster] = (resp.status, resp.read().decode())
            conn.close()
        events = gateway.audit_events()
        log = gateway.log()
    finally:
        gateway.stop()
    for cluster, (code, body) in bodies.items():
        assert code == 503, (cluster, body)
        status = json.loads(body)
        assert status["kind"] == "Status" and status["reason"] == "ServiceUnavailable"
        for pattern in FORBIDDEN_IN_MESSAGES:
            assert not pattern.search(body), (cluster, pattern.pattern, body)
        audit_id = re.search(r"audit ID ([0-9a-f-]{36})", status["message"]).group(1)
        assert audit_id in log, "the caller's audit ID leads the operator to the cause"
        assert any(e["auditID"] == audit_id and e["stage"] == "ResponseComplete" for e in events)
    assert stack.role_arn in log and dead_sts in log, "the operator finds the role and the STS endpoint in the log"
    assert str(folder / "lab-token") in log, "...and the token file"
