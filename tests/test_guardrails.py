"""Guardrails as plain logic: matchers, the index, body inspectors and patches, typed lines, the policy section."""

from __future__ import annotations

import json
import textwrap
import timeit
from pathlib import Path

import pytest

from jitgate.guardrails import protobuf
from jitgate.guardrails.bodies import (APPLY_PATCH, JSON_PATCH, MERGE_PATCH, PROTOBUF, STRATEGIC_PATCH, UnreadableBody,
                                       findings, produced_object)
from jitgate.guardrails.decide import decide, line_rule
from jitgate.guardrails.index import GuardrailIndex
from jitgate.guardrails.rules import Action, CallFacts, Guardrail, Pattern, ResourceMatch, command_lines
from jitgate.guardrails.stdin import LineAssembler
from jitgate.policy.document import Node, PolicyError
from jitgate.policy.guardrails import parse_guardrails
from jitgate.policy.loader import _read_file

REPO = Path(__file__).resolve().parents[1]


def pack() -> GuardrailIndex:
    path = REPO / "policies/guardrails.yaml"
    return parse_guardrails(Node(_read_file(path), path, "").children("guardrails"))


def rules_from(tmp_path: Path, text: str) -> GuardrailIndex:
    path = tmp_path / "g.yaml"
    path.write_text(textwrap.dedent(text))
    return parse_guardrails(Node(_read_file(path), path, "").children("guardrails"))


def outcome(index, body: object = None, ct: str = "application/json", **kw):
    raw = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    o = decide(index, CallFacts(cluster="demo", **kw), ct, raw)
    return (str(o.action) if o.action else None), (o.rule.name if o.rule else None)


PRIV_POD = {"spec": {"containers": [{"name": "a", "securityContext": {"privileged": True}}]}}


# --- the default pack: each case and its harmless neighbour ----------------------------------------


@pytest.mark.parametrize("call, expected", [
    (dict(verb="delete", resource="namespaces", name="prod"), ("deny", "no-namespace-delete")),
    (dict(verb="get", resource="namespaces", name="prod"), (None, None)),
    (dict(verb="deletecollection", resource="pods", namespace="dev"), ("deny", "no-deletecollection")),
    (dict(verb="delete", resource="pods", namespace="prod", name="api"), ("require-approval", "prod-delete-needs-approval")),
    (dict(verb="delete", resource="pods", namespace="dev", name="api"), (None, None)),
    (dict(verb="create", resource="pods", subresource="exec", namespace="kube-system", command=("ls",)),
     ("deny", "no-exec-kube-system")),
    (dict(verb="create", resource="pods", subresource="exec", namespace="prod", command=("sh", "-c", "rm -rf /")),
     ("deny", "no-destructive-commands-in-prod")),
    (dict(verb="create", resource="pods", subresource="exec", namespace="prod", command=("rm", "-fr", "/")),
     ("deny", "no-destructive-commands-in-prod")),
    (dict(verb="create", resource="pods", subresource="exec", namespace="prod", command=("ls", "/")), (None, None)),
    (dict(verb="create", resource="pods", subresource="exec", namespace="prod", command=("rm", "-rf", "/tmp/cache")), (None, None)),
    (dict(verb="create", resource="pods", subresource="exec", namespace="prod", command=("/bin/bash",)),
     ("audit", "audit-shells-in-prod")),
    (dict(verb="get", resource="nodes", subresource="proxy", name="n1"), ("deny", "no-node-proxy")),
    (dict(verb="create", api_group="admissionregistration.k8s.io", resource="validatingwebhookconfigurations"),
     ("require-approval", "admission-webhooks-need-approval")),
    (dict(verb="patch", resource="configmaps", namespace="kube-system", name="aws-auth"),
     ("require-approval", "aws-auth-needs-approval")),
    (dict(verb="patch", resource="configmaps", namespace="kube-system", name="coredns"), (None, None)),
])
def test_default_pack(call: dict, expected: tuple) -> None:
    assert outcome(pack(), **call) == expected


def test_bodies_in_the_default_pack() -> None:
    index = pack()
    assert outcome(index, PRIV_POD, verb="create", resource="pods", namespace="dev") == ("deny", "no-privileged-workloads")
    assert outcome(index, {"spec": {"containers": [{"name": "a"}]}}, verb="create", resource="pods", namespace="dev") == (None, None)
    host = {"spec": {"template": {"spec": {"hostNetwork": True, "containers": [{"name": "a"}]}}}}
    assert outcome(index, host, verb="update", api_group="apps", resource="deployments", namespace="dev", name="w")[1] == "no-privileged-workloads"
    root = {"spec": {"securityContext": {"runAsUser": 0}, "containers": [{"name": "a"}]}}
    assert outcome(index, root, verb="create", resource="pods", namespace="dev") == ("audit", "audit-run-as-root")
    crb = {"roleRef": {"kind": "ClusterRole", "name": "cluster-admin"}, "subjects": []}
    rbac = dict(verb="create", api_group="rbac.authorization.k8s.io", resource="clusterrolebindings")
    assert outcome(index, crb, **rbac) == ("deny", "no-rbac-escalation")
    assert outcome(index, {"roleRef": {"name": "view"}}, **rbac) == (None, None)
    role = {"rules": [{"verbs": ["get", "escalate"], "resources": ["clusterroles"]}]}
    assert outcome(index, role, verb="create", api_group="rbac.authorization.k8s.io", resource="roles", namespace="dev")[1] == "no-rbac-escalation"
    # aws-auth on create: the name is in the body
    aws = dict(verb="create", resource="configmaps", namespace="kube-system")
    assert outcome(index, {"metadata": {"name": "aws-auth"}}, **aws)[1] == "aws-auth-needs-approval"
    assert outcome(index, {"metadata": {"name": "other"}}, **aws) == (None, None)
    # a body the gateway cannot read is refused where a rule needs it, and only there
    assert outcome(index, b"\x00garbage", ct=PROTOBUF, verb="create", resource="pods", namespace="dev")[1] == "no-privileged-workloads"
    assert outcome(index, b"\x00garbage", ct=PROTOBUF, verb="create", resource="services", namespace="dev") == (None, None)


# --- patches judged on what they would produce --------------------------------------------------------

DEPLOY = dict(verb="patch", api_group="apps", resource="deployments", namespace="dev", name="web")


@pytest.mark.parametrize("ct, body", [
    (STRATEGIC_PATCH, {"spec": {"template": {"spec": {"containers": [{"name": "web", "securityContext": {"privileged": True}}]}}}}),
    (MERGE_PATCH, {"spec": {"template": {"spec": {"hostPID": True}}}}),
    (APPLY_PATCH, {"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}}}),
    (JSON_PATCH, [{"op": "add", "path": "/spec/template/spec/containers/0/securityContext", "value": {"privileged": True}}]),
    (JSON_PATCH, [{"op": "replace", "path": "/spec/template/spec/containers/0/securityContext/capabilities/add", "value": ["SYS_ADMIN"]}]),
    (JSON_PATCH, [{"op": "add", "path": "/spec/template/spec/hostIPC", "value": True}]),
    (JSON_PATCH, [{"op": "copy", "from": "/metadata", "path": "/spec/template/spec"}]),  # unjudgeable: refused
])
def test_patches_that_make_a_deployment_privileged(ct: str, body: object) -> None:
    assert outcome(pack(), body, ct=ct, **DEPLOY) == ("deny", "no-privileged-workloads")


@pytest.mark.parametrize("ct, body", [
    (STRATEGIC_PATCH, {"spec": {"template": {"metadata": {"labels": {"x": "y"}}}}}),
    (STRATEGIC_PATCH, {"spec": {"template": {"spec": {"containers": [{"name": "web", "securityContext": {"privileged": False}}]}}}}),
    (JSON_PATCH, [{"op": "replace", "path": "/spec/replicas", "value": 3}]),
    (JSON_PATCH, [{"op": "remove", "path": "/spec/template/spec/hostNetwork"}]),
])
def test_harmless_patches_pass(ct: str, body: object) -> None:
    assert outcome(pack(), body, ct=ct, **DEPLOY) == (None, None)


def test_apply_yaml_body_and_unreadable_bodies() -> None:
    yaml_body = b"spec:\n  template:\n    spec:\n      hostNetwork: true\n"
    assert "host-network" in findings("apps", "deployments", "", produced_object(APPLY_PATCH, yaml_body))
    for ct, body in (("application/json", b"{not json"), ("text/plain", b"x"), (JSON_PATCH, b'{"op":"add"}'),
                     (APPLY_PATCH, b"a: 1\n---\nb: 2\n")):
        with pytest.raises(UnreadableBody):
            produced_object(ct, body)


# --- protobuf bodies ------------------------------------------------------------------------------------


def _field(number: int, payload: bytes | int | bool) -> bytes:
    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out
    if isinstance(payload, (bool, int)):
        return varint(number << 3) + varint(int(payload))
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _envelope(kind: str, raw: bytes) -> bytes:
    type_meta = _field(1, b"v1") + _field(2, kind.encode())
    return protobuf.MAGIC + _field(1, type_meta) + _field(2, raw)


def test_protobuf_pod_fields() -> None:
    container = _field(1, b"c") + _field(15, _field(2, True) + _field(1, _field(1, b"NET_ADMIN")))
    spec = _field(2, container) + _field(11, True) + _field(1, _field(1, b"h") + _field(2, _field(1, _field(1, b"/"))))
    pod = _field(1, _field(1, b"p")) + _field(2, spec)
    obj = produced_object(PROTOBUF, _envelope("Pod", pod))
    assert obj["metadata"]["name"] == "p"
    assert findings("", "pods", "", obj) == {"privileged", "capabilities", "host-network", "host-path"}
    plain = _field(1, _field(1, b"q")) + _field(2, _field(2, _field(1, b"c") + _field(2, b"busybox")))
    assert findings("", "pods", "", produced_object(PROTOBUF, _envelope("Pod", plain))) == frozenset()
    with pytest.raises(UnreadableBody):
        produced_object(PROTOBUF, _envelope("Widget", b""))


# --- matchers ------------------------------------------------------------------------------------------


def test_patterns_and_resources() -> None:
    assert Pattern("team-*").matches("team-a") and not Pattern("team-*").matches("xteam-a")
    assert Pattern("re:^prod").matches("prod-eu") and not Pattern("re:^prod").matches("preprod")
    with pytest.raises(ValueError, match="invalid regular expression"):
        Pattern("re:(")
    assert ResourceMatch.parse("pods").matches("", "pods", "") and not ResourceMatch.parse("pods").matches("", "pods", "exec")
    assert ResourceMatch.parse("pods/*").matches("", "pods", "exec")
    assert ResourceMatch.parse("deployments.apps").matches("apps", "deployments", "")
    assert not ResourceMatch.parse("deployments.apps").matches("extensions", "deployments", "")
    assert ResourceMatch.parse("*").matches("apps", "deployments", "scale")
    assert command_lines(("sh", "-c", "rm -rf /")) == ["sh -c rm -rf /", "rm -rf /"]
    assert command_lines(("bash", "-ec", "x")) == ["bash -ec x", "x"]


def test_callers_and_access_rules(tmp_path: Path) -> None:
    index = rules_from(tmp_path, """
        guardrails:
          - {name: agents, action: deny, groups: ["oidc:agents"], verbs: [delete]}
          - {name: mallory, action: deny, users: ["re:^mallory@"]}
          - {name: breakglass, action: audit, access_rules: [break-glass]}
          - {name: staging, action: deny, clusters: ["staging-*"], verbs: [create]}
    """)
    assert outcome(index, verb="delete", resource="pods", groups=("oidc:agents",)) == ("deny", "agents")
    assert outcome(index, verb="delete", resource="pods", groups=("oidc:humans",)) == (None, None)
    assert outcome(index, verb="get", resource="pods", username="mallory@example.com") == ("deny", "mallory")
    assert outcome(index, verb="get", resource="pods", access_rule="break-glass") == ("audit", "breakglass")
    o = decide(index, CallFacts(cluster="staging-eu", verb="create", resource="pods"))
    assert o.rule.name == "staging"


def test_deny_wins_then_approval_and_dry_run_is_only_recorded(tmp_path: Path) -> None:
    index = rules_from(tmp_path, """
        guardrails:
          - {name: a-audit, action: audit, verbs: [delete]}
          - {name: b-approve, action: require-approval, verbs: [delete]}
          - {name: c-deny, action: deny, verbs: [delete], namespaces: [prod]}
          - {name: d-new, action: deny, verbs: [delete], namespaces: [dev], dry_run: true}
    """)
    assert outcome(index, verb="delete", resource="pods", namespace="prod") == ("deny", "c-deny")
    o = decide(index, CallFacts(cluster="x", verb="delete", resource="pods", namespace="dev"))
    assert (str(o.action), o.rule.name) == ("require-approval", "b-approve")
    assert [m.rule.name for m in o.dry_runs] == ["d-new"]


def test_index_stays_flat_with_many_rules(tmp_path: Path) -> None:
    base = pack().rules
    extra = [Guardrail(name=f"extra-{i}", action=Action.DENY, verbs=frozenset({"delete"}),
                       namespaces=(Pattern(f"team-{i}"),), resources=(ResourceMatch.parse("configmaps"),), order=100 + i)
             for i in range(1000)]
    small, big = GuardrailIndex(base), GuardrailIndex(list(base) + extra)
    facts = CallFacts(cluster="demo", verb="get", resource="pods", namespace="team-7", name="x")
    assert len(list(big.candidates("get", "pods", "team-7"))) == len(list(small.candidates("get", "pods", "team-7")))
    assert decide(big, CallFacts(cluster="demo", verb="delete", resource="configmaps", namespace="team-7")).rule.name == "extra-7"
    t_small = min(timeit.repeat(lambda: decide(small, facts), number=2000, repeat=3))
    t_big = min(timeit.repeat(lambda: decide(big, facts), number=2000, repeat=3))
    assert t_big < t_small * 2 + 0.002, (t_small, t_big)


# --- interactive sessions ------------------------------------------------------------------------------


def test_lines_are_reassembled_across_frames() -> None:
    lines = LineAssembler()
    out = []
    for ch in b"rm -rf /tmpX\x7f\x7f\x7f\x7f":  # backspaces edit the line
        out += lines.feed(bytes([ch]))
    assert out == [] and lines.pending == "rm -rf /"
    assert lines.feed(b"\r") == ["rm -rf /"]
    assert lines.feed(b"ls\x15echo hi\n") == ["echo hi"]  # Ctrl-U clears
    assert lines.feed(b"\x1b[Als\r") == ["ls"]  # an arrow key's escape sequence is dropped
    assert lines.feed(b"a\x08b\r") == ["b"]


def test_typed_lines_against_command_rules() -> None:
    index = pack()
    session = CallFacts(cluster="demo", verb="create", resource="pods", subresource="exec", namespace="prod", command=("sh",))
    assert line_rule(index, session, "rm -rf /")[0].name == "no-destructive-commands-in-prod"
    assert line_rule(index, session, "cd /tmp && rm -rf *")[0] is not None
    assert line_rule(index, session, "ls -la")[0] is None
    dev = CallFacts(cluster="demo", verb="create", resource="pods", subresource="exec", namespace="dev", command=("sh",))
    assert line_rule(index, dev, "rm -rf /")[0] is None  # the rule is for production


# --- the policy section ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, line, message", [
    ("{name: x, action: deny, verb: [delete]}", 3, "unknown field 'verb'"),
    ("{name: x, action: block}", 3, "unknown action 'block'"),
    ("{name: x, action: deny, commands: ['re:(']}", 3, "invalid regular expression"),
    ("{name: x, action: deny, body: [root]}", 3, "unknown body finding 'root'"),
    ("{name: Bad Name, action: deny}", 3, "invalid guardrail name"),
])
def test_section_errors_are_located(tmp_path: Path, rule: str, line: int, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as e:
        rules_from(tmp_path, f"# a rule\nguardrails:\n  - {rule}\n")
    assert e.value.line == line and str(e.value).startswith(f"{tmp_path / 'g.yaml'}:{line}:")


def test_unknown_verbs_and_resources_are_warnings_with_suggestions(tmp_path: Path) -> None:
    index = rules_from(tmp_path, """
        guardrails:
          - name: x
            action: deny
            verbs: [delet, exec]
            resources: [deployments, podz, widgets.example.com]
    """)
    assert len(index.warnings) == 4
    assert "unknown verb 'delet'" in index.warnings[0] and "did you mean 'delete'" in index.warnings[0]
    assert "exec is verb create on resource pods/exec" in index.warnings[1]
    assert "write deployments.apps" in index.warnings[2]
    assert "did you mean 'pods'" in index.warnings[3]
    assert index.warnings[0].startswith(f"{tmp_path / 'g.yaml'}:5:")


# --- require-approval: the digest that binds an approval to one call ------------------------------

def test_operation_digest_binds_method_target_body_and_cluster() -> None:
    from jitgate.guardrails.approval import operation_digest

    base = operation_digest("dev", "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=kubectl-patch", b'{"a":1}')
    assert base == operation_digest("dev", "patch", "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=kubectl-patch",
                                    b'{"a":1}')
    others = {
        operation_digest("dev", "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=kubectl-patch", b'{"a":2}'),
        operation_digest("dev", "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=kubectl-patch&dryRun=All",
                         b'{"a":1}'),
        operation_digest("dev", "PUT", "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=kubectl-patch", b'{"a":1}'),
        operation_digest("lab", "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=kubectl-patch", b'{"a":1}'),
        # Length-prefixed parts: moving a byte from the target into the body is a different call.
        operation_digest("dev", "PATCH", "/apis/apps/v1/namespaces/prod/deployments/we", b'b{"a":1}'),
    }
    assert base not in others and len(others) == 5


def test_operation_for_a_call_names_the_rule_and_what_it_does(tmp_path: Path) -> None:
    from jitgate.guardrails.approval import operation_for

    index = rules_from(tmp_path, """\
        guardrails:
          - name: prod-deploy-changes
            action: require-approval
            namespaces: [prod]
            resources: [deployments.apps]
            verbs: [patch]
            approvals: 2
        """)
    facts = CallFacts(cluster="dev", verb="patch", api_group="apps", resource="deployments", namespace="prod", name="web")
    rule = decide(index, facts, "application/strategic-merge-patch+json", b"{}").rule
    op = operation_for(rule, facts, "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web", b"{}")
    assert (op.guardrail, op.required, op.method) == ("prod-deploy-changes", 2, "PATCH")
    assert op.summary == "patch deployments.apps web in namespace prod on cluster dev"
    assert len(op.digest) == 64


def test_approvals_must_be_a_positive_count(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="approvals.*at least 1"):
        rules_from(tmp_path, """\
            guardrails:
              - name: x
                action: require-approval
                verbs: [delete]
                approvals: 0
            """)


def test_typed_lines_are_masked_before_the_audit_keeps_them() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("guardrails_addon", REPO / "addons/guardrails.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    masked = module.Guardrails().masked("mysql -u root --password=hunter2secret -e 'drop database x'")
    assert "hunter2secret" not in masked and "[masked:" in masked
    assert module.Guardrails().masked("ls -la /") == "ls -la /"


def test_hold_and_approvals_belong_to_require_approval_rules(tmp_path: Path) -> None:
    held = rules_from(tmp_path, """\
        guardrails:
          - name: held
            action: require-approval
            verbs: [delete]
            hold: {max_wait: 2m}
        """).rules[0]
    assert (held.hold_seconds, held.approvals) == (120, None)
    with pytest.raises(PolicyError, match=r"g.yaml:5.*only a require-approval rule has 'hold'"):
        rules_from(tmp_path, """\
            guardrails:
              - name: x
                action: deny
                verbs: [delete]
                hold: {max_wait: 2m}
            """)
