"""Guardrails end to end: real kubectl -> jitgate (real mitmdump, the default rule pack) -> stand-in.

Each refused case of the issue and its harmless neighbour, in reverse and in regular (proxy) mode;
what a refused call asked for never reaches the cluster, and the audit names the rule."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from testkit.gateway import GatewayProcess
from testkit.standin.process import KUBECTL, TerminalSession, kubectl_env, run_kubectl
from tests.conftest import DEV_HOST, LAB_HOST, aws_env, grant_everything, write_policy

REPO = Path(__file__).resolve().parents[1]

PRIVILEGED_POD = json.dumps({"spec": {"containers": [{"name": "x", "image": "busybox",
                                                       "securityContext": {"privileged": True}}]}})
PRIVILEGED_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: dev}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: nginx
          securityContext: {privileged: true}
"""


# Changing a production deployment needs two people besides the caller (the pack's delete rule, one).
APPROVAL_RULES = """\
guardrails:
  - name: prod-deploy-changes-need-two
    action: require-approval
    namespaces: [prod]
    resources: [deployments.apps]
    verbs: [patch]
    approvals: 2
    message: changes to production deployments need two reviewers
  - name: prod-scale-held
    action: require-approval
    namespaces: [prod]
    resources: [deployments.apps/scale]
    verbs: [patch, update]
    hold: {max_wait: 40s}
    message: scaling production waits for a reviewer
"""
JITGATE = str(REPO / ".venv/bin/jitgate")


@pytest.fixture(scope="module")
def guarded(ca, idp, sts, dev_cluster, lab_cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("guarded")
    role_arn = sts.create_role("jitgate-guarded")
    readonly = sts.create_role("jitgate-guarded-ro")
    folder = work / "policy"
    folder.mkdir()
    policy_file = write_policy(folder, ca, idp, sts, role_arn, dev_cluster, lab_cluster, readonly)
    shutil.copy(REPO / "policies/guardrails.yaml", folder / "guardrails.yaml")
    (folder / "approvals.yaml").write_text(APPROVAL_RULES)
    store = work / "jitgate.db"
    grant_everything(store, policy_file, "dev")
    gateway = GatewayProcess(work, folder, reverse_endpoints={"dev": f"https://{DEV_HOST}", "lab": f"https://{LAB_HOST}:6443"},
                             options={"grant_store": str(store)}, env=aws_env(dict(os.environ), work)).start()
    yield gateway, dev_cluster
    gateway.stop()


@pytest.fixture(scope="module", params=["reverse", "proxy"])
def kc(request, guarded, idp, tmp_path_factory) -> Path:
    gateway, _ = guarded
    token = idp.token("alice", email="alice@example.com", email_verified=True, groups=["developers", "sre"])
    path = tmp_path_factory.mktemp("kc") / request.param
    args = [str(REPO / ".venv/bin/jitgate"), "kubeconfig", "--policy", str(gateway.policy / "policy.yaml"),
            "--cluster", "dev", "--user", "alice", "--token", token, "--gateway-ca", str(gateway.ca_path), "-o", str(path)]
    args += ["--server", gateway.reverse_url("dev")] if request.param == "reverse" else ["--proxy", gateway.proxy_url]
    subprocess.run(args, check=True, capture_output=True)
    return path


def guardrail_events(gateway: GatewayProcess, rule: str) -> list[dict]:
    return [e for e in gateway.audit_events() if e.get("annotations", {}).get("jitgate.dev/guardrail") == rule]


def refused(result: subprocess.CompletedProcess, rule: str) -> None:
    assert result.returncode != 0, result.stdout
    assert f"guardrail '{rule}'" in result.stderr, result.stderr


def test_delete_namespace_refused(guarded, kc: Path) -> None:
    gateway, cluster = guarded
    cluster.clear_seen()
    refused(run_kubectl(kc, "delete", "ns", "prod"), "no-namespace-delete")
    assert not [r for r in cluster.requests_seen() if r["method"] == "DELETE"]
    event = guardrail_events(gateway, "no-namespace-delete")[-1]
    assert event["annotations"]["jitgate.dev/guardrail-action"] == "deny"
    assert event["responseStatus"]["code"] == 403
    assert run_kubectl(kc, "get", "ns", "prod").returncode == 0


def test_delete_all_pods_in_prod_refused_delete_in_dev_passes(guarded, kc: Path) -> None:
    gateway, _ = guarded
    refused(run_kubectl(kc, "delete", "pods", "--all", "-n", "prod"), "prod-delete-needs-approval")
    assert guardrail_events(gateway, "prod-delete-needs-approval")[-1]["annotations"]["jitgate.dev/guardrail-action"] == "require-approval"
    assert "api" in run_kubectl(kc, "get", "pods", "-n", "prod", check=True).stdout
    name = f"scratch-{kc.name}"
    run_kubectl(kc, "run", name, "-n", "dev", "--image=busybox", check=True)
    result = run_kubectl(kc, "delete", "pod", name, "-n", "dev", "--wait=false")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("websockets", ["true", "false"])
def test_destructive_exec_refused_ls_passes(guarded, kc: Path, websockets: str) -> None:
    env = {**kubectl_env(kc), "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets}
    bad = subprocess.run([KUBECTL, "exec", "-n", "prod", "api", "--", "sh", "-c", "rm -rf /"], env=env,
                         capture_output=True, text=True, timeout=30)
    refused(bad, "no-destructive-commands-in-prod")
    if websockets == "true":
        good = subprocess.run([KUBECTL, "exec", "-n", "prod", "api", "--", "ls", "/"], env=env,
                              capture_output=True, text=True, timeout=30)
        assert good.returncode == 0, good.stderr


def test_privileged_run_refused_unprivileged_passes(guarded, kc: Path) -> None:
    gateway, cluster = guarded
    cluster.clear_seen()
    refused(run_kubectl(kc, "run", f"priv-{kc.name}", "-n", "dev", "--image=busybox",
                        f"--overrides={PRIVILEGED_POD}"), "no-privileged-workloads")
    assert run_kubectl(kc, "get", "pod", f"priv-{kc.name}", "-n", "dev").returncode != 0
    assert not [r for r in cluster.requests_seen() if r["method"] == "POST"]  # nothing of it reached the cluster
    assert guardrail_events(gateway, "no-privileged-workloads")[-1]["responseStatus"]["code"] == 403
    run_kubectl(kc, "run", f"plain-{kc.name}", "-n", "dev", "--image=busybox", check=True)
    # kubectl's typed create sends protobuf: the gateway reads the pod template's fields and lets it through.
    run_kubectl(kc, "create", "deployment", f"typed-{kc.name}", "-n", "dev", "--image=busybox", check=True)


def test_cluster_admin_binding_refused(guarded, kc: Path) -> None:
    refused(run_kubectl(kc, "create", "clusterrolebinding", f"root-{kc.name}", "--clusterrole=cluster-admin",
                        "--user=mallory"), "no-rbac-escalation")
    # The harmless neighbour passes the gateway; the stand-in serves no RBAC API and answers 404.
    result = run_kubectl(kc, "create", "clusterrolebinding", f"view-{kc.name}", "--clusterrole=view", "--user=mallory")
    assert "guardrail" not in result.stderr and "could not find the requested resource" in result.stderr, result.stderr


def test_server_side_apply_and_strategic_patch_privileged_refused(guarded, kc: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(PRIVILEGED_DEPLOYMENT)
    refused(run_kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f", str(manifest)), "no-privileged-workloads")
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "web", "securityContext": {"privileged": True}}]}}}}
    refused(run_kubectl(kc, "patch", "deployment", "web", "-n", "dev", "-p", json.dumps(patch)), "no-privileged-workloads")
    harmless = {"spec": {"template": {"metadata": {"labels": {"patched": kc.name}}}}}
    result = run_kubectl(kc, "patch", "deployment", "web", "-n", "dev", "-p", json.dumps(harmless))
    assert result.returncode == 0, result.stderr


def test_typed_rm_rf_ends_the_interactive_session(guarded, kc: Path) -> None:
    gateway, _ = guarded
    session = TerminalSession([KUBECTL, "exec", "-it", "-n", "prod", "api", "--", "sh"], kubectl_env(kc))
    try:
        session.expect(b"#")
        session.type(b"ls /")  # the harmless neighbour
        session.expect(b"etc")
        session.type(b"echo still-here")
        session.expect(b"still-here")
        for ch in b"rm -rf /tmpX\x7f":  # one key per frame; a backspace edits the line
            os.write(session.master, bytes([ch]))
        os.write(session.master, b"\x15")  # Ctrl-U: the line is dropped
        for ch in b"rm -rf /":
            os.write(session.master, bytes([ch]))
            time.sleep(0.01)
        os.write(session.master, b"\r")
        session.expect(b"no-destructive-commands-in-prod")
        session.proc.wait(15)
        assert session.proc.returncode != 0
    finally:
        session.close()
    events = [e for e in guardrail_events(gateway, "no-destructive-commands-in-prod")
              if e["annotations"].get("jitgate.dev/guardrail-line") == "rm -rf /"]
    assert events and events[-1]["annotations"]["jitgate.dev/guardrail-action"] == "deny"
    assert events[-1]["annotations"]["jitgate.dev/terminated"]


def reviewer_kubeconfig(gateway: GatewayProcess, idp, name: str, path: Path) -> Path:
    token = idp.token(name, email=f"{name}@example.com", email_verified=True, groups=["sre"])
    subprocess.run([JITGATE, "kubeconfig", "--policy", str(gateway.policy / "policy.yaml"), "--cluster", "dev",
                    "--user", f"{name}@example.com", "--token", token, "--gateway-ca", str(gateway.ca_path),
                    "--server", gateway.reverse_url("dev"), "-o", str(path)], check=True, capture_output=True)
    return path


def jitgate_cli(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([JITGATE, *args], env=kubectl_env(kubeconfig), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def request_id_of(result: subprocess.CompletedProcess, rule: str) -> str:
    refused(result, rule)
    match = re.search(r"access request (req-[a-z0-9]+)", result.stderr)
    assert match, result.stderr
    assert f"jitgate approve {match.group(1)}" in result.stderr and "retry the same command" in result.stderr
    return match.group(1)


def test_require_approval_lets_the_approved_call_through_once(guarded, kc: Path, idp, tmp_path: Path) -> None:
    gateway, cluster = guarded
    rita = reviewer_kubeconfig(gateway, idp, "rita", tmp_path / "rita")
    bob = reviewer_kubeconfig(gateway, idp, "bob", tmp_path / "bob")
    name = f"shop-{kc.name}"
    run_kubectl(kc, "create", "deployment", name, "-n", "prod", "--image=nginx", check=True)
    patch = ["patch", "deployment", name, "-n", "prod", "-p", json.dumps({"metadata": {"labels": {"release": "1"}}})]
    rule = "prod-deploy-changes-need-two"

    cluster.clear_seen()
    request_id = request_id_of(run_kubectl(kc, *patch), rule)
    assert request_id_of(run_kubectl(kc, *patch), rule) == request_id  # a retry joins the pending request
    assert not [r for r in cluster.requests_seen() if r["method"] == "PATCH"]  # nothing reached the cluster

    # Reviewers see the one operation, not a scope of standing access.
    listed = jitgate_cli(rita, "list", "--reviewable").stdout
    assert request_id in listed and f"once: patch deployments.apps {name} in namespace prod" in listed
    shown = jitgate_cli(rita, "show", request_id).stdout
    assert "Operation:  patch deployments.apps" in shown and f"Guardrail:  {rule}" in shown
    assert "needs 2 approval(s), has 0" in shown

    jitgate_cli(rita, "approve", request_id, "--reason", "release 1")
    assert request_id_of(run_kubectl(kc, *patch), rule) == request_id  # one approval of two: still refused
    jitgate_cli(bob, "approve", request_id, "--reason", "ok")
    detail = json.loads(jitgate_cli(bob, "show", request_id, "-o", "json").stdout)
    assert detail["state"] == "approved" and detail["grant"] is None and detail["permit"]["used"] is False

    passed = run_kubectl(kc, *patch)
    assert passed.returncode == 0, passed.stderr
    assert len([r for r in cluster.requests_seen() if r["method"] == "PATCH"]) == 1
    event = [e for e in gateway.audit_events() if e["annotations"].get("jitgate.dev/guardrail-approval") == request_id
             and e.get("responseStatus", {}).get("code") == 200][-1]
    assert event["annotations"]["jitgate.dev/guardrail"] == rule
    assert event["annotations"]["jitgate.dev/guardrail-approvers"] == "rita@example.com,bob@example.com"
    assert json.loads(jitgate_cli(bob, "show", request_id, "-o", "json").stdout)["permit"]["used"] is True

    # Exactly once: the same command again is a new request.
    again = request_id_of(run_kubectl(kc, *patch), rule)
    assert again != request_id
    # A changed body is another operation: another request, not the pending one of the first body.
    changed = request_id_of(run_kubectl(kc, "patch", "deployment", name, "-n", "prod", "-p",
                                        json.dumps({"metadata": {"labels": {"release": "2"}}})), rule)
    assert changed not in (request_id, again)
    assert len([r for r in cluster.requests_seen() if r["method"] == "PATCH"]) == 1


def test_pack_delete_rule_needs_the_access_rules_reviewer(guarded, kc: Path, idp, tmp_path: Path) -> None:
    gateway, cluster = guarded
    rita = reviewer_kubeconfig(gateway, idp, "rita", tmp_path / "rita")
    name = f"victim-{kc.name}"
    run_kubectl(kc, "run", name, "-n", "prod", "--image=busybox", check=True)
    delete = ["delete", "pod", name, "-n", "prod", "--wait=false"]
    request_id = request_id_of(run_kubectl(kc, *delete), "prod-delete-needs-approval")
    jitgate_cli(rita, "approve", request_id)  # access rule e2e-admin: one reviewer of oidc:sre
    result = run_kubectl(kc, *delete)
    assert result.returncode == 0, result.stderr
    assert run_kubectl(kc, "get", "pod", name, "-n", "prod").returncode != 0


def test_a_held_call_passes_once_a_reviewer_approves(guarded, kc: Path, idp, tmp_path: Path) -> None:
    gateway, cluster = guarded
    rita = reviewer_kubeconfig(gateway, idp, "rita", tmp_path / "rita")
    name = f"held-{kc.name}"
    run_kubectl(kc, "create", "deployment", name, "-n", "prod", "--image=nginx", check=True)
    cluster.clear_seen()
    held = subprocess.Popen([KUBECTL, "scale", "deployment", name, "-n", "prod", "--replicas=3"], env=kubectl_env(kc),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, waiting = time.monotonic() + 20, []
        while not waiting and time.monotonic() < deadline:
            items = json.loads(jitgate_cli(rita, "list", "--reviewable", "-o", "json").stdout)["items"]
            waiting = [r for r in items if (r.get("operation") or {}).get("guardrail") == "prod-scale-held"
                       and name in r["operation"]["path"]]
            time.sleep(0.3)
        assert len(waiting) == 1, "the held call filed no request"
        assert held.poll() is None  # still held open, nothing sent
        assert not [r for r in cluster.requests_seen() if r["method"] == "PATCH"]
        jitgate_cli(rita, "approve", waiting[0]["id"])
        out, err = held.communicate(timeout=30)
    finally:
        if held.poll() is None:
            held.kill()
    assert held.returncode == 0, err
    assert len([r for r in cluster.requests_seen() if r["method"] == "PATCH"]) == 1
    assert json.loads(jitgate_cli(rita, "show", waiting[0]["id"], "-o", "json").stdout)["permit"]["used"] is True
