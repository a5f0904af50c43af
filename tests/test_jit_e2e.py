"""Just-in-time access end to end: real kubectl, the real `jitgate` CLI in other processes, the real
OIDC provider, the stand-in cluster and a gateway with its own policy and grant store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from testkit.gateway import GatewayProcess
from testkit.standin.process import KUBECTL, kubectl_env, read_until, run_kubectl
from tests.conftest import DEV_HOST, aws_env

REPO = Path(__file__).resolve().parents[1]
JITGATE = str(REPO / ".venv/bin/jitgate")

RULES = """\
access_rules:
  - name: dev-read
    requesters: [oidc:developers]
    clusters: [dev]
    namespaces: [dev]
    resources: [pods, pods/log, configmaps]
    verbs: [get, list, watch]
    duration: {default: 10m, max: 1h}
    approval: {mode: reviewers, reviewers: [oidc:sre, oidc:sre-leads], required: 2}
  - name: dev-exec
    requesters: [oidc:developers]
    clusters: [dev]
    namespaces: [dev]
    resources: [pods, pods/exec]
    verbs: [get, list, watch, create]
    duration: {default: 10m, max: 1h}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
  - name: prod-read-auto
    requesters: [oidc:developers]
    clusters: [dev]
    namespaces: [prod]
    resources: [configmaps]
    verbs: [get, list]
    duration: {default: 5m, max: 10m}
    approval: {mode: auto, reviewers: [oidc:sre], auto_approve_after: 6s}
  - name: short-lived
    requesters: [oidc:developers]
    clusters: [dev]
    namespaces: [default]
    resources: [pods]
    verbs: [get, list]
    duration: {default: 6s, max: 6s}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
  - name: kube-system-readonly
    requesters: [oidc:developers]
    clusters: [dev]
    namespaces: [kube-system]
    resources: [pods]
    verbs: [get, list]
    duration: {default: 10m, max: 1h}
    upstream_role: readonly
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
  - name: agent-hold
    requesters: [oidc:agents]
    clusters: [dev]
    namespaces: [dev]
    resources: [pods]
    verbs: [get, list]
    duration: {default: 10m, max: 1h}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
    hold: {max_wait: 30s}
"""

USERS = {
    "alice": ("alice@example.com", ["developers"]),
    "bob": ("bob@example.com", ["sre"]),
    "carol": ("carol@example.com", ["sre"]),
    "dave": ("dave@example.com", ["sre", "sre-leads"]),
    "agent": ("mcp-agent@example.com", ["agents"]),
}


class JIT:
    """A gateway with the rules above, and a kubeconfig per user."""

    def __init__(self, stack, work: Path) -> None:
        self.stack, self.work = stack, work
        text = stack.policy.read_text()
        self.policy = stack.policy.with_name("jit-policy.yaml")
        self.policy.write_text(RULES + text[text.index("\nclusters:") + 1:])
        self.store = work / "grants.db"
        self.gateway = self.start_gateway()
        self.configs = {name: self.kubeconfig(name) for name in USERS}

    def start_gateway(self) -> GatewayProcess:
        return GatewayProcess(self.work / "gw", self.policy, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                              options={"grant_store": str(self.store), "hold_poll_interval_ms": "100"},
                              env=aws_env(dict(os.environ), self.work)).start()

    def kubeconfig(self, name: str) -> Path:
        email, groups = USERS[name]
        token = self.stack.idp.token(name, email=email, email_verified=True, groups=groups)
        path = self.work / f"kubeconfig-{name}"
        subprocess.run([JITGATE, "kubeconfig", "--policy", str(self.policy), "--cluster", "dev", "--user", email,
                        "--token", token, "--gateway-ca", str(self.gateway.ca_path),
                        "--server", self.gateway.reverse_url("dev"), "-o", str(path)], check=True, capture_output=True)
        return path

    def kubectl(self, user: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run_kubectl(self.configs[user], *args, **kwargs)

    def cli(self, user: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**kubectl_env(self.configs[user])}
        result = subprocess.run([JITGATE, *args], env=env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"jitgate {' '.join(args)} as {user} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def request(self, user: str, *args: str) -> str:
        out = self.cli(user, "request", "--cluster", "dev", *args).stdout
        match = re.search(r"\breq-[A-Za-z0-9_-]+", out)
        assert match, out
        return match.group(0)

    def show(self, user: str, request_id: str) -> dict:
        return json.loads(self.cli(user, "show", request_id, "-o", "json").stdout)


@pytest.fixture(scope="module")
def jit(stack, tmp_path_factory: pytest.TempPathFactory):
    env = JIT(stack, tmp_path_factory.mktemp("jit"))
    yield env
    env.gateway.stop()


def test_no_grant_no_access_and_the_message_says_how(jit: JIT) -> None:
    result = jit.kubectl("alice", "get", "pods", "-n", "dev")
    assert result.returncode != 0
    assert "Error from server (Forbidden)" in result.stderr
    assert "jitgate request --cluster dev --namespace dev --resource pods" in result.stderr, result.stderr
    misses = [e for e in jit.gateway.audit_events() if e.get("responseStatus", {}).get("code") == 403
              and e["user"]["username"] == "alice@example.com" and e.get("objectRef", {}).get("resource") == "pods"]
    assert misses and misses[-1]["annotations"]["jitgate.dev/decision"] == "deny"


def test_two_distinct_approvers_then_exactly_the_granted_scope(jit: JIT) -> None:
    request_id = jit.request("alice", "--namespace", "dev", "--resource", "pods", "--resource", "pods/log",
                             "--verb", "get", "--verb", "list", "--duration", "10m", "--reason", "debugging web")
    # The requester cannot approve; a non-reviewer cannot; dave (in two reviewer groups) counts once.
    own = jit.cli("alice", "approve", request_id, "--reason", "me", check=False)
    assert own.returncode != 0 and "cannot review your own request" in own.stderr
    jit.cli("dave", "approve", request_id, "--reason", "looks fine")
    twice = jit.cli("dave", "approve", request_id, "--reason", "again", check=False)
    assert twice.returncode != 0 and "already" in (twice.stdout + twice.stderr).lower()
    assert jit.show("alice", request_id)["state"] == "pending"
    early = jit.kubectl("alice", "get", "pods", "-n", "dev")
    assert early.returncode != 0, "one approval of two grants nothing"
    # The refusal names the pending request that covers the call, not a new one to file.
    assert f"your access request {request_id} covers it and waits for 1 more approval from oidc:sre, oidc:sre-leads" \
        in early.stderr and "jitgate request" not in early.stderr, early.stderr
    reviewable = jit.cli("bob", "list", "--reviewable").stdout
    assert request_id in reviewable
    jit.cli("bob", "approve", request_id, "--reason", "second pair of eyes")
    # The access API's own calls are audited with what they acted on and how it came out.
    approvals = [e for e in jit.gateway.audit_events() if e["annotations"].get("jitgate.dev/api-action") == "approve"
                 and e["annotations"].get("jitgate.dev/api-access-request") == request_id and e["stage"] == "ResponseComplete"]
    assert [a["annotations"]["jitgate.dev/api-reason"] for a in approvals][-1] == "second pair of eyes"
    assert approvals[-1]["annotations"]["jitgate.dev/api-outcome"] == "request approved, grant active"
    assert approvals[-1]["annotations"]["jitgate.dev/scope"] == "get, list pods, pods/log in namespace dev on cluster dev"
    shown = jit.show("alice", request_id)
    assert shown["state"] == "approved" and shown["grant"]["state"] == "active"

    assert "toolbox" in jit.kubectl("alice", "get", "pods", "-n", "dev", check=True).stdout
    assert jit.kubectl("alice", "logs", "-n", "dev", "toolbox").returncode == 0
    for wider in (["get", "pods", "-n", "prod"], ["get", "pods", "-A"], ["delete", "pod", "-n", "dev", "toolbox"],
                  ["get", "secrets", "-n", "dev"], ["exec", "-n", "dev", "toolbox", "--", "echo", "hi"],
                  ["get", "configmaps", "-n", "dev"]):
        result = jit.kubectl("alice", *wider)
        # kubectl prints an exec refusal as "unable to upgrade connection: <message>".
        assert result.returncode != 0 and "jitgate: no active grant" in result.stderr, (wider, result.stderr)
    granted = [e for e in jit.gateway.audit_events() if e["annotations"].get("jitgate.dev/grant") == shown["grant"]["id"]
               and e["stage"] == "ResponseComplete"]
    assert granted and all(e["responseStatus"]["code"] == 200 for e in granted)
    assert all(e["annotations"]["jitgate.dev/approvers"] == "dave@example.com,bob@example.com" for e in granted)
    assert all(e["annotations"]["jitgate.dev/access-request"] == request_id for e in granted)


def test_grant_expires_on_time(jit: JIT) -> None:
    request_id = jit.request("alice", "--namespace", "default", "--resource", "pods", "--verb", "get", "--verb", "list",
                             "--duration", "6s", "--reason", "quick look")
    jit.cli("bob", "approve", request_id)
    assert "nginx" in jit.kubectl("alice", "get", "pods", "-n", "default", check=True).stdout
    time.sleep(7)
    after = jit.kubectl("alice", "get", "pods", "-n", "default")
    assert after.returncode != 0 and "Forbidden" in after.stderr
    assert jit.show("alice", request_id)["grant"]["state"] in ("expired", "active")  # swept within a second
    grant_id = jit.show("alice", request_id)["grant"]["id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [e for e in jit.gateway.audit_events()
                                               if e["annotations"].get("jitgate.dev/workflow") == "grant.expired"
                                               and e["objectRef"]["name"] == grant_id]:
        time.sleep(0.2)
    expired = [e for e in jit.gateway.audit_events() if e["annotations"].get("jitgate.dev/workflow") == "grant.expired"
               and e["objectRef"]["name"] == grant_id]
    assert len(expired) == 1 and expired[0]["verb"] == "expire" and expired[0]["user"]["username"] == "system:jitgate"


def test_bad_reviews_change_nothing(jit: JIT) -> None:
    too_long = jit.cli("alice", "request", "--cluster", "dev", "--namespace", "dev", "--resource", "pods",
                       "--verb", "get", "--duration", "5h", "--reason", "x", check=False)
    assert too_long.returncode != 0 and "maximum" in (too_long.stdout + too_long.stderr).lower()
    unknown = jit.cli("alice", "request", "--cluster", "dev", "--namespace", "kube-system", "--resource", "nodes",
                      "--verb", "delete", "--reason", "x", check=False)
    assert unknown.returncode != 0
    request_id = jit.request("alice", "--namespace", "dev", "--resource", "configmaps", "--verb", "get",
                             "--reason", "x; db password=reason-canary-41")
    # A reason is typed text: the audit event keeps it through the masking detectors.
    assert "reason-canary-41" not in jit.gateway.audit_path.read_text()
    assert any(e["annotations"].get("jitgate.dev/api-reason", "").startswith("x; db password=[masked:")
               for e in jit.gateway.audit_events())
    jit.cli("alice", "cancel", request_id)
    late = jit.cli("bob", "approve", request_id, check=False)
    assert late.returncode != 0 and "cancelled" in (late.stdout + late.stderr).lower()
    assert jit.show("alice", request_id)["state"] == "cancelled"


def test_auto_approval_fires_unless_denied_first(jit: JIT) -> None:
    kept = jit.request("alice", "--namespace", "prod", "--resource", "configmaps", "--verb", "get", "--verb", "list",
                       "--reason", "check config")
    denied = jit.request("alice", "--namespace", "prod", "--resource", "configmaps", "--verb", "get", "--reason", "again")
    jit.cli("carol", "deny", denied, "--reason", "not needed")
    assert jit.show("alice", kept)["state"] == "pending"  # (6 s leave room for three CLI calls on a loaded CI)
    deadline = time.monotonic() + 15
    while jit.show("alice", kept)["state"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jit.show("alice", kept)["state"] == "approved"
    assert jit.show("alice", denied)["state"] == "denied"
    auto = [e for e in jit.gateway.audit_events() if e["annotations"].get("jitgate.dev/workflow") == "request.auto_approved"]
    assert [e["objectRef"]["name"] for e in auto] == [kept]
    assert auto[0]["annotations"]["jitgate.dev/grant"] == jit.show("alice", kept)["grant"]["id"]
    assert auto[0]["annotations"]["jitgate.dev/scope"] == "get, list configmaps in namespace prod on cluster dev"
    assert "app-config" in jit.kubectl("alice", "get", "configmaps", "-n", "prod", check=True).stdout


def test_held_call_is_released_by_an_approval_from_another_process(jit: JIT) -> None:
    results: list[subprocess.CompletedProcess] = []
    started = time.monotonic()
    held = threading.Thread(target=lambda: results.append(jit.kubectl("agent", "get", "pods", "-n", "dev", timeout=60)))
    held.start()
    request_id = None
    deadline = time.monotonic() + 15
    while request_id is None and time.monotonic() < deadline:
        listing = jit.cli("bob", "list", "--reviewable", "-o", "json").stdout
        pending = [r for r in json.loads(listing)["items"] if r["requester"] == "mcp-agent@example.com"]
        request_id = pending[0]["id"] if pending else None
        time.sleep(0.3)
    assert request_id, "the gateway filed the access request for the held call"
    # Meanwhile other calls are not slowed by the held one.
    t0 = time.monotonic()
    jit.cli("bob", "whoami")
    assert time.monotonic() - t0 < 5
    assert held.is_alive(), "the call is still held"
    jit.cli("bob", "approve", request_id, "--reason", "agent may read dev pods")
    held.join(30)
    assert results and results[0].returncode == 0, results
    assert "toolbox" in results[0].stdout
    assert time.monotonic() - started < 30


def test_held_call_denied_by_a_reviewer_returns_the_reviewers_reason(jit: JIT) -> None:
    results: list[subprocess.CompletedProcess] = []
    held = threading.Thread(target=lambda: results.append(jit.kubectl("agent", "get", "pod", "toolbox", "-n", "dev", timeout=60)))
    held.start()
    request_id = None
    deadline = time.monotonic() + 15
    while request_id is None and time.monotonic() < deadline:
        listing = json.loads(jit.cli("bob", "list", "--reviewable", "-o", "json").stdout)["items"]
        pending = [r for r in listing if r["requester"] == "mcp-agent@example.com" and r["scope"]["verbs"] == ["get"]]
        request_id = pending[0]["id"] if pending else None
        time.sleep(0.3)
    assert request_id, "the gateway filed the access request for the held call"
    jit.cli("bob", "deny", request_id, "--reason", "agents read single pods only through the runbook")
    held.join(30)
    assert results and results[0].returncode != 0
    assert f"access request {request_id} was denied by bob@example.com: agents read single pods only through the runbook" \
        in results[0].stderr, results[0].stderr


def test_revocation_ends_live_watch_and_exec(jit: JIT) -> None:
    request_id = jit.request("alice", "--namespace", "dev", "--resource", "pods", "--resource", "pods/exec",
                             "--verb", "get", "--verb", "list", "--verb", "watch", "--verb", "create", "--reason", "debug")
    jit.cli("carol", "approve", request_id)
    grant_id = jit.show("alice", request_id)["grant"]["id"]
    env = kubectl_env(jit.configs["alice"])
    watch = subprocess.Popen([KUBECTL, "get", "pods", "-n", "dev", "-w"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    shell = subprocess.Popen([KUBECTL, "exec", "-i", "-n", "dev", "toolbox", "--", "sh"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert b"toolbox" in read_until(watch.stdout, b"toolbox")
        shell.stdin.write(b"echo alive\n")
        shell.stdin.flush()
        assert shell.stdout.readline() == b"alive\n"
        revoked_at = time.monotonic()
        jit.cli("carol", "revoke", grant_id, "--reason", "incident over")
        watch.wait(10)
        shell.wait(10)
        assert time.monotonic() - revoked_at < 10, "sessions end within seconds of the revocation"
    finally:
        for proc in (watch, shell):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    # (alice still holds the read grant of an earlier test; exec came only with the revoked one)
    refused = jit.kubectl("alice", "exec", "-n", "dev", "toolbox", "--", "echo", "hi")
    assert refused.returncode != 0 and "jitgate: no active grant" in refused.stderr
    ended = [e for e in jit.gateway.audit_events() if e["annotations"].get("jitgate.dev/terminated", "").startswith("grant revoked")]
    assert {e.get("objectRef", {}).get("subresource", "") for e in ended} >= {"", "exec"}, ended
    # Each ending is also an event of its own, by the gateway, naming the session's call and the grant.
    terminations = [e for e in jit.gateway.audit_events() if e["annotations"].get("jitgate.dev/workflow") == "session.terminated"
                    and e["annotations"].get("jitgate.dev/grant") == grant_id]
    assert {e["objectRef"]["name"] for e in terminations} >= {e["auditID"] for e in ended if e["stage"] == "ResponseComplete"}
    assert all(e["user"]["username"] == "system:jitgate" and e["verb"] == "terminate" for e in terminations)
    assert all(e["annotations"]["jitgate.dev/user"] == "alice@example.com" for e in terminations)


def test_restart_mid_workflow_loses_nothing(jit: JIT) -> None:
    request_id = jit.request("alice", "--namespace", "dev", "--resource", "configmaps", "--verb", "get", "--verb", "list",
                             "--reason", "across a restart")
    jit.cli("dave", "approve", request_id, "--reason", "first")
    jit.gateway.stop()
    jit.gateway.start()  # same ports and CA: the users' kubeconfigs stay valid
    shown = jit.show("alice", request_id)
    assert shown["state"] == "pending" and len(shown["reviews"]) == 1
    jit.cli("bob", "approve", request_id, "--reason", "second")
    grant_id = jit.show("alice", request_id)["grant"]["id"]
    jit.kubectl("alice", "get", "configmaps", "-n", "dev", check=True)
    jit.gateway.stop()
    jit.gateway.start()
    jit.kubectl("alice", "get", "configmaps", "-n", "dev", check=True)
    allowed = [e for e in jit.gateway.audit_events() if e["annotations"].get("jitgate.dev/grant") == grant_id]
    assert len(allowed) >= 2, "the same grant allowed the call before and after the restart"


def test_grant_uses_the_rules_upstream_role(jit: JIT) -> None:
    """A rule with `upstream_role: readonly` makes the gateway assume the read-only IAM role for it."""
    def readonly_sessions() -> list:
        return [c for c in jit.stack.sts.assume_role_calls(jit.stack.readonly_role_arn)
                if c.params.get("RoleSessionName") == "alice@example.com"]

    assert not readonly_sessions()
    request_id = jit.request("alice", "--namespace", "kube-system", "--resource", "pods", "--verb", "get",
                             "--verb", "list", "--reason", "look at coredns")
    jit.cli("bob", "approve", request_id)
    assert "coredns" in jit.kubectl("alice", "get", "pods", "-n", "kube-system", check=True).stdout
    (session,) = readonly_sessions()
    assert session.params["SourceIdentity"] == "alice@example.com"
