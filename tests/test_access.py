"""Access rules, scopes and per-call checks: policy parsing with located errors, what a rule lets
people request, what a grant lets a call do, and the message that says how to ask."""

from __future__ import annotations

import shlex
import textwrap
from pathlib import Path

import pytest

from jitgate.access.authorize import (
    authorize_call,
    call_allowed_by,
    is_discovery,
    scope_for_call,
)
from jitgate.access.errors import AccessError, Conflict, InvalidRequest, NotAllowed
from jitgate.access.messages import how_to_request, request_command
from jitgate.access.model import Decision, Grant, GrantState, Person, RequestState
from jitgate.access.rules import AccessRule, Approval, ApprovalMode, choose_rule
from jitgate.access.scope import ANY_RESOURCE, SYSTEM_ACTOR, ResourceRef, Scope
from jitgate.access.workflow import open_request, review_request
from jitgate.kube.request_info import parse_request
from jitgate.policy.access_rules import parse_access_rules
from jitgate.policy.clusters import Cluster, TokenFileCredential
from jitgate.policy.document import Node, PolicyError
from jitgate.policy.loader import _read_file
from jitgate.timefmt import format_duration, parse_duration


def clusters(tmp_path: Path) -> dict[str, Cluster]:
    token = tmp_path / "token"
    token.write_text("t")
    return {
        name: Cluster(name, f"https://{name}.example", f"{name}.example", 443, tmp_path / "ca.pem", TokenFileCredential(token),
                      upstream_roles={"readonly": f"arn:aws:iam::123456789012:role/{name}-readonly"})
        for name in ("dev", "prod")
    }


def parse(tmp_path: Path, text: str) -> tuple[AccessRule, ...]:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    root = Node(_read_file(path), path, "")
    return parse_access_rules(root.children("access_rules"), clusters(tmp_path))


GOOD = """
    access_rules:
      - name: dev-read
        description: Read workloads in dev and the team namespaces
        requesters: [oidc:developers]
        clusters: [dev]
        namespaces: [dev, "team-*"]
        resources: [pods, pods/log, configmaps, deployments.apps, "deployments.apps/scale"]
        verbs: [get, list, watch]
        duration: {default: 1h, max: 4h}
        upstream_role: readonly
        approval:
          mode: auto
          reviewers: [oidc:sre]
          auto_approve_after: 2m
        require_reason: true
        request_ttl: 30m
        hold: {max_wait: 3m}
      - name: prod-exec
        requesters: [oidc:sre, oidc:oncall]
        clusters: [prod]
        namespaces: [payments]
        resources: [pods, pods/exec]
        verbs: [get, create]
        duration: 30m
        approval:
          mode: reviewers
          reviewers: [oidc:sre, oidc:security]
          required: 2
      - name: sandbox
        requesters: [oidc:developers]
        clusters: ["*"]
        namespaces: [sandbox]
        cluster_wide: false
        resources: ["*"]
        verbs: ["*"]
        duration: {max: 8h}
        approval: {mode: immediate}
      - name: cluster-read
        requesters: [oidc:sre]
        clusters: [dev, prod]
        cluster_wide: true
        resources: [nodes, namespaces, pods]
        verbs: [get, list, watch]
        duration: 1h
        approval: {mode: reviewers, reviewers: [oidc:sre]}
"""


@pytest.fixture
def rules(tmp_path: Path) -> tuple[AccessRule, ...]:
    return parse(tmp_path, GOOD)


def test_good_rules(rules: tuple[AccessRule, ...], tmp_path: Path) -> None:
    dev_read, prod_exec, sandbox, cluster_read = rules
    assert [r.name for r in rules] == ["dev-read", "prod-exec", "sandbox", "cluster-read"]
    assert dev_read.requesters == ("oidc:developers",) and dev_read.clusters == ("dev",)
    assert dev_read.resources == (
        ResourceRef("pods"),
        ResourceRef("pods", "", "log"),
        ResourceRef("configmaps"),
        ResourceRef("deployments", "apps"),
        ResourceRef("deployments", "apps", "scale"),
    )
    assert (dev_read.duration_default, dev_read.duration_max, dev_read.request_ttl) == (3600, 4 * 3600, 1800)
    assert dev_read.approval == Approval(ApprovalMode.AUTO, ("oidc:sre",), None, 120)
    assert dev_read.require_reason and dev_read.upstream_role == "readonly" and dev_read.hold.max_wait == 180
    assert dev_read.source == f"{tmp_path / 'policy.yaml'}:2"
    assert prod_exec.approval == Approval(ApprovalMode.REVIEWERS, ("oidc:sre", "oidc:security"), 2, None)
    assert (prod_exec.duration_default, prod_exec.duration_max) == (1800, 1800)
    assert not prod_exec.require_reason and prod_exec.hold is None and prod_exec.upstream_role is None
    assert sandbox.verbs == ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
    assert sandbox.resources == (ANY_RESOURCE,) and sandbox.duration_default == 8 * 3600
    assert sandbox.approval.mode is ApprovalMode.IMMEDIATE
    assert cluster_read.cluster_wide and cluster_read.namespaces == () and cluster_read.approval.required == 1
    assert dev_read.to_dict()["approval"] == {"mode": "auto", "reviewers": ["oidc:sre"], "required": None, "auto_approve_after": "2m"}


RULE = """
    access_rules:
      - name: r
        requesters: [devs]
        clusters: [dev]
        namespaces: [dev]
        resources: [pods]
        verbs: [get]
        duration: {default: 1h, max: 4h}
        approval:
          mode: reviewers
          reviewers: [sre]
"""


@pytest.mark.parametrize(
    "old, new, line, field, message",
    [
        ("clusters: [dev]", "clusters: [dev, staging]", 4, "access_rules[0].clusters[1]", "unknown cluster 'staging' (defined: dev, prod)"),
        ("clusters: [dev]", 'clusters: [dev, "*"]', 4, "access_rules[0].clusters[1]", "'*' already means every cluster"),
        ("verbs: [get]", "verbs: [get, exec]", 7, "access_rules[0].verbs[1]", "unknown verb 'exec'"),
        ("resources: [pods]", "resources: [pods, deployments]", 6, "access_rules[0].resources[1]", "'deployments' is not a resource of the core API group; write deployments.apps"),
        ("resources: [pods]", "resources: [pod]", 6, "access_rules[0].resources[0]", "did you mean pods?"),
        ("resources: [pods]", "resources: [Pods/Log]", 6, "access_rules[0].resources[0]", "invalid resource 'Pods/Log'"),
        ("namespaces: [dev]", "namespaces: [dev, Team_A]", 5, "access_rules[0].namespaces[1]", "invalid namespace 'Team_A'"),
        ("namespaces: [dev]", "cluster_wide: false", 2, "access_rules[0]", "needs 'namespaces', or 'cluster_wide: true'"),
        ("max: 4h", "max: 4 hours", 8, "access_rules[0].duration.max", "invalid duration '4 hours'"),
        ("max: 4h", "max: 30m", 8, "access_rules[0].duration.default", "the default 1h is longer than the max 30m"),
        ("max: 4h", "max: 0s", 8, "access_rules[0].duration.max", "must be longer than 0s"),
        ("default: 1h, max: 4h", "max: 30d", 8, "access_rules[0].duration.max", "30d is longer than 7d"),
        ("duration: {default: 1h, max: 4h}", "duration: 3600", 8, "access_rules[0].duration", "expected a string or a mapping, got a number"),
        ("duration: {default: 1h, max: 4h}", "duration: {default: 1h, maximum: 4h}", 8, "access_rules[0].duration", "missing required field 'max'"),
        ("mode: reviewers", "mode: vote", 10, "access_rules[0].approval.mode", "unknown approval mode 'vote'"),
        ("reviewers: [sre]", "required: 2", 10, "access_rules[0].approval", "mode reviewers needs 'reviewers'"),
        ("reviewers: [sre]", "reviewers: [sre]\n          required: 0", 12, "access_rules[0].approval.required", "must be at least 1"),
        ("reviewers: [sre]", "reviewers: [sre]\n          required: true", 12, "access_rules[0].approval.required", "expected a number, got a boolean"),
        ("reviewers: [sre]", "reviewers: [sre]\n          auto_approve_after: 2m", 12, "access_rules[0].approval.auto_approve_after", "only mode auto"),
        ("mode: reviewers", "mode: auto", 10, "access_rules[0].approval", "mode auto needs 'auto_approve_after'"),
        ("mode: reviewers", "mode: auto\n          auto_approve_after: 2h", 11, "access_rules[0].approval.auto_approve_after", "not shorter than the request_ttl 1h"),
        ("mode: reviewers", "mode: immediate\n          required: 1", 11, "access_rules[0].approval.required", "mode immediate approves at once"),
        ("resources: [pods]", "resources: [pods, pods/exec]", 10, "access_rules[0].approval.mode", "mode immediate cannot grant pods/exec"),
        ("verbs: [get]", "verbs: [get]\n        hold: {max_wait: 2h}", 8, "access_rules[0].hold.max_wait", "longer than the request_ttl 1h"),
        ("verbs: [get]", "verbs: [get]\n        requester: [devs]", 8, "access_rules[0].requester", "unknown field 'requester'"),
        ("requesters: [devs]", "requesters: []", 3, "access_rules[0].requesters", "must list at least one value"),
        ("name: r", "name: My Rule", 2, "access_rules[0].name", "invalid rule name 'My Rule'"),
        ("name: r", "id: r", 2, "access_rules[0]", "missing required field 'name'"),
        ("verbs: [get]", "verbs: [get]\n        require_reason: yes please", 8, "access_rules[0].require_reason", "expected true or false"),
    ],
)
def test_rule_errors_are_located(tmp_path: Path, old: str, new: str, line: int, field: str, message: str) -> None:
    text = RULE.replace(old, new)
    if "pods/exec" in new:
        text = text.replace("mode: reviewers", "mode: immediate").replace("reviewers: [sre]", "")
    assert text != RULE
    with pytest.raises(PolicyError) as e:
        parse(tmp_path, text)
    assert (e.value.line, e.value.field) == (line, field), str(e.value)
    assert message in e.value.message
    assert str(e.value).startswith(f"{tmp_path / 'policy.yaml'}:{line}: {field}: ")


def test_auto_hold_that_could_never_be_released_is_an_error(tmp_path: Path) -> None:
    text = RULE.replace("mode: reviewers", "mode: auto\n          auto_approve_after: 5m").replace("verbs: [get]", "verbs: [get]\n        hold: {max_wait: 1m}")
    with pytest.raises(PolicyError, match=r"policy.yaml:8: access_rules\[0\].hold.max_wait: a held call waits at most 1m but"):
        parse(tmp_path, text)
    # With `required`, an approval can release the hold before the delay ends.
    (rule,) = parse(tmp_path, text.replace("reviewers: [sre]", "reviewers: [sre]\n          required: 1"))
    assert rule.hold.max_wait == 60 and rule.approval.required == 1


def test_duplicate_rule_name(tmp_path: Path) -> None:
    text = RULE + RULE.split("access_rules:\n", 1)[1]
    with pytest.raises(PolicyError, match=r"policy.yaml:12: access_rules\[1\].name: access rule 'r' is already defined at .*policy.yaml:2"):
        parse(tmp_path, text)


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90s", "15m", "1h", "1h30m", "2d", "1d2h3m4s")] == [90, 900, 3600, 5400, 172800, 93784]
    assert [format_duration(s) for s in (90, 900, 3600, 5400, 172800, 0)] == ["1m30s", "15m", "1h", "1h30m", "2d", "0s"]
    for bad in ("", "1", "h", "1m1h", "-1h", "1.5h", "1 h", "1hh"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


# ---------------------------------------------------------------------------------------------
# Scopes


def test_scope_normalizes() -> None:
    scope = Scope("dev", ["team-b", "dev", "dev"], False, ["pods/log", "pods", "deployments.apps"], ["list", "get", "get"])
    assert scope.namespaces == ("dev", "team-b")
    assert scope.resources == (ResourceRef("deployments", "apps"), ResourceRef("pods"), ResourceRef("pods", "", "log"))
    assert scope.verbs == ("get", "list")
    assert Scope("dev", (), True, ["*"], ["*"]).verbs[-1] == "deletecollection"
    assert Scope.from_dict(scope.to_dict()) == scope
    assert scope.describe() == "get, list deployments.apps, pods, pods/log in namespaces dev, team-b on cluster dev"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"namespaces": ()}, "name at least one namespace, or ask for cluster-wide access"),
        ({"cluster_wide": True}, "cluster-wide access covers every namespace"),
        ({"namespaces": ("Dev",)}, "invalid namespace 'Dev'"),
        ({"namespaces": ("team-*",)}, "invalid namespace 'team-*'"),
        ({"resources": ()}, "name at least one resource"),
        ({"resources": ("deployments",)}, "write deployments.apps"),
        ({"verbs": ("exec",)}, "unknown verb 'exec'"),
        ({"verbs": ()}, "name at least one verb"),
        ({"cluster": ""}, "a cluster name is required"),
        ({"namespaces": tuple(f"ns-{i}" for i in range(65))}, "too many namespaces"),
    ],
)
def test_scope_errors(kwargs: dict, message: str) -> None:
    args = {"cluster": "dev", "namespaces": ("dev",), "cluster_wide": False, "resources": ("pods",), "verbs": ("get",)} | kwargs
    with pytest.raises(InvalidRequest, match="invalid scope: .*" + message.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")) as e:
        Scope(**args)
    assert e.value.status == 400


def test_scope_from_dict_rejects_bad_json() -> None:
    for data, message in (([], "expected a JSON object"), ({"cluster": "dev", "namspaces": ["x"]}, "unknown field"), ({"cluster": "dev", "namespaces": "dev", "resources": [1], "verbs": ["get"]}, "list of strings")):
        with pytest.raises(InvalidRequest, match=message):
            Scope.from_dict(data)


def test_rule_covers(rules: tuple[AccessRule, ...]) -> None:
    dev_read, prod_exec, sandbox, cluster_read = rules

    def covers(rule: AccessRule, **kwargs) -> str | None:
        args = {"cluster": "dev", "namespaces": ("dev",), "cluster_wide": False, "resources": ("pods",), "verbs": ("get",)} | kwargs
        return rule.why_not(Scope(**args))

    assert covers(dev_read) is None
    assert covers(dev_read, namespaces=("dev", "team-a", "team-payments")) is None
    assert covers(dev_read, resources=("pods", "pods/log", "deployments.apps/scale"), verbs=("get", "list", "watch")) is None
    assert covers(dev_read, cluster="prod") == "cluster prod is not one of dev"
    assert covers(dev_read, namespaces=("dev", "kube-system", "team")) == "namespace(s) kube-system, team not allowed"
    assert covers(dev_read, namespaces=(), cluster_wide=True) == "cluster-wide access is not allowed"
    assert covers(dev_read, resources=("pods/exec", "secrets")) == "resource(s) pods/exec, secrets not allowed"
    assert covers(dev_read, resources=("deployments.extensions",)) == "resource(s) deployments.extensions not allowed"
    assert covers(dev_read, resources=("*",)) == "resource(s) * not allowed"
    assert covers(dev_read, verbs=("get", "delete")) == "verb(s) delete not allowed"
    # `*` covers any resource and subresource, except secrets and the connect-like subresources.
    assert covers(sandbox, cluster="prod", namespaces=("sandbox",), resources=("*", "pods/log", "widgets.example.com", "deployments.apps/scale"), verbs=("*",)) is None
    for sensitive in ("secrets", "pods/exec", "pods/attach", "pods/portforward", "pods/proxy", "services/proxy", "nodes/proxy", "serviceaccounts/token", "pods/ephemeralcontainers"):
        assert covers(sandbox, namespaces=("sandbox",), resources=(sensitive,)) == f"resource(s) {sensitive} not allowed"
    assert covers(prod_exec, cluster="prod", namespaces=("payments",), resources=("pods/exec",), verbs=("create",)) is None
    assert covers(cluster_read, cluster="prod", namespaces=(), cluster_wide=True, resources=("nodes",)) is None
    assert covers(cluster_read, cluster="prod", namespaces=("payments",), resources=("nodes",)) == "namespace(s) payments not allowed"


def test_scope_contains() -> None:
    wide = Scope("dev", (), True, ("*", "secrets"), ("get", "list"))
    assert wide.contains(Scope("dev", ("a", "b"), False, ("pods", "pods/log", "secrets"), ("get",)))
    assert wide.contains(Scope("dev", (), True, ("*",), ("list",)))
    assert not wide.contains(Scope("dev", ("a",), False, ("pods/exec",), ("get",)))
    assert not wide.contains(Scope("dev", ("a",), False, ("pods",), ("watch",)))
    assert not wide.contains(Scope("prod", ("a",), False, ("pods",), ("get",)))
    narrow = Scope("dev", ("a",), False, ("pods",), ("get",))
    assert not narrow.contains(Scope("dev", ("b",), False, ("pods",), ("get",)))
    assert not narrow.contains(Scope("dev", (), True, ("pods",), ("get",)))
    assert not narrow.contains(Scope("dev", ("a",), False, ("*",), ("get",)))


# ---------------------------------------------------------------------------------------------
# Per-call matching

GRANT = Scope("dev", ("dev",), False, ("pods", "pods/log", "configmaps", "deployments.apps", "deployments.apps/scale", "namespaces"), ("get", "list", "watch"))
ANY = Scope("dev", ("dev",), False, ("*",), ("*",))
WIDE = Scope("dev", (), True, ("pods", "nodes", "secrets"), ("get", "list", "watch"))
EXEC = Scope("dev", ("dev",), False, ("pods/exec",), ("create",))


@pytest.mark.parametrize(
    "scope, method, target, headers, allowed",
    [
        (GRANT, "GET", "/api/v1/namespaces/dev/pods", None, True),
        (GRANT, "GET", "/api/v1/namespaces/dev/pods/web-1", None, True),
        (GRANT, "GET", "/api/v1/namespaces/dev/pods?watch=true", None, True),
        (GRANT, "GET", "/api/v1/namespaces/dev/pods/web-1/log?follow=true", None, True),
        (GRANT, "GET", "/apis/apps/v1/namespaces/dev/deployments/web", None, True),
        (GRANT, "GET", "/apis/apps/v1/namespaces/dev/deployments/web/scale", None, True),
        (GRANT, "GET", "/api/v1/namespaces/dev", None, True),  # the namespace object is in its namespace
        (GRANT, "GET", "/api/v1/namespaces/prod/pods", None, False),  # another namespace
        (GRANT, "DELETE", "/api/v1/namespaces/dev/pods/web-1", None, False),  # another verb
        (GRANT, "PATCH", "/apis/apps/v1/namespaces/dev/deployments/web/scale", None, False),
        (GRANT, "GET", "/api/v1/namespaces/dev/pods/web-1/exec?command=sh&stdin=1", {"Upgrade": "websocket"}, False),  # get pods never implies exec
        (GRANT, "POST", "/api/v1/namespaces/dev/pods/web-1/exec?command=sh", None, False),
        (GRANT, "GET", "/api/v1/namespaces/dev/pods/web-1/status", None, False),  # pods does not imply a subresource
        (GRANT, "GET", "/api/v1/namespaces/dev/secrets", None, False),
        (GRANT, "GET", "/apis/extensions/v1beta1/namespaces/dev/deployments", None, False),  # another API group
        (GRANT, "GET", "/apis/apps/v1/namespaces/dev/statefulsets", None, False),
        (GRANT, "GET", "/api/v1/pods", None, False),  # list across namespaces needs cluster-wide
        (GRANT, "GET", "/api/v1/pods?watch=1", None, False),
        (GRANT, "GET", "/api/v1/namespaces", None, False),  # listing namespaces is cluster-wide
        (GRANT, "GET", "/api/v1/nodes/n1", None, False),  # cluster-scoped
        (GRANT, "GET", "/version", None, False),  # non-resource: never a grant's business
        (ANY, "GET", "/api/v1/namespaces/dev/pods/web-1/log", None, True),
        (ANY, "DELETE", "/apis/apps/v1/namespaces/dev/deployments/web", None, True),
        (ANY, "GET", "/apis/example.com/v1/namespaces/dev/widgets", None, True),
        (ANY, "GET", "/api/v1/namespaces/dev/secrets/db", None, False),  # * never implies secrets
        (ANY, "GET", "/apis/example.com/v1/namespaces/dev/secrets/db", None, False),  # ...in any group
        (ANY, "POST", "/api/v1/namespaces/dev/pods/web-1/exec?command=sh", None, False),
        (ANY, "GET", "/api/v1/namespaces/dev/pods/web-1/attach", {"Upgrade": "SPDY/3.1"}, False),
        (ANY, "POST", "/api/v1/namespaces/dev/pods/web-1/portforward?ports=80", None, False),
        (ANY, "GET", "/api/v1/namespaces/dev/pods/web-1/proxy/metrics", None, False),
        (ANY, "GET", "/api/v1/namespaces/dev/services/web/proxy/", None, False),
        (ANY, "POST", "/api/v1/namespaces/dev/serviceaccounts/default/token", None, False),
        (ANY, "PATCH", "/api/v1/namespaces/dev/pods/web-1/ephemeralcontainers", None, False),
        (ANY, "GET", "/api/v1/proxy/namespaces/dev/pods/web-1", None, False),  # the old proxy verb
        (ANY, "GET", "/api/v1/pods", None, False),
        (WIDE, "GET", "/api/v1/pods?watch=1", None, True),
        (WIDE, "GET", "/api/v1/namespaces/anything/pods/x", None, True),
        (WIDE, "GET", "/api/v1/nodes/n1", None, True),
        (WIDE, "GET", "/api/v1/namespaces/kube-system/secrets/admin", None, True),  # named explicitly
        (WIDE, "GET", "/api/v1/namespaces", None, False),
        (WIDE, "GET", "/api/v1/nodes/n1/proxy/metrics", None, False),
        (EXEC, "GET", "/api/v1/namespaces/dev/pods/web-1/exec?command=sh&stdin=1&tty=1", {"Upgrade": "websocket"}, True),
        (EXEC, "POST", "/api/v1/namespaces/dev/pods/web-1/exec?command=sh", {"Upgrade": "SPDY/3.1"}, True),
        (EXEC, "GET", "/api/v1/namespaces/dev/pods/web-1", None, False),
        (EXEC, "POST", "/api/v1/namespaces/dev/pods/web-1/attach", None, False),
        (EXEC, "POST", "/api/v1/namespaces/prod/pods/web-1/exec?command=sh", None, False),
    ],
)
def test_call_allowed_by(scope: Scope, method: str, target: str, headers: dict | None, allowed: bool) -> None:
    assert call_allowed_by(scope, parse_request(method, target, headers)) is allowed


@pytest.mark.parametrize(
    "method, target, headers, discovery",
    [
        ("GET", "/api", None, True),
        ("GET", "/api/", None, True),
        ("GET", "/api/v1", None, True),
        ("GET", "/apis", None, True),
        ("GET", "/apis/apps", None, True),
        ("GET", "/apis/apps/v1", None, True),
        ("GET", "/version", None, True),
        ("GET", "/version/", None, True),
        ("HEAD", "/version", None, True),
        ("GET", "/openapi/v2", None, True),
        ("GET", "/openapi/v3", None, True),
        ("GET", "/openapi/v3/apis/apps/v1?hash=abc", None, True),
        ("GET", "/healthz", None, True),
        ("GET", "/livez", None, True),
        ("GET", "/readyz", None, True),
        ("POST", "/api", None, False),
        ("GET", "/api/v1/pods", None, False),  # a resource request
        ("GET", "/apis/apps/v1/deployments", None, False),
        ("GET", "/metrics", None, False),
        ("GET", "/logs/", None, False),
        ("GET", "/debug/pprof/", None, False),
        ("GET", "/healthz/etcd", None, False),
        ("GET", "/openapi", None, False),
        ("GET", "/versions", None, False),
        ("GET", "/", None, False),
        ("GET", "/version", {"Upgrade": "websocket"}, False),
    ],
)
def test_is_discovery(method: str, target: str, headers: dict | None, discovery: bool) -> None:
    info = parse_request(method, target, headers)
    assert is_discovery(info) is discovery
    assert (authorize_call((), "dev", info, 0.0).allowed) is discovery  # no grant needed


def grant(scope: Scope, *, starts_at: float = 100.0, ends_at: float = 200.0, state: GrantState = GrantState.ACTIVE, id: str = "grant-1") -> Grant:
    return Grant(id, "req-1", "alice", "dev-read", scope, None, starts_at, ends_at, state)


def test_authorize_call() -> None:
    info = parse_request("GET", "/api/v1/namespaces/dev/pods")
    g = grant(GRANT)
    assert authorize_call([g], "dev", info, 150.0).grant is g
    assert authorize_call([g], "dev", info, 150.0).reason == "allowed by grant grant-1"
    assert not authorize_call([g], "prod", info, 150.0).allowed  # another cluster
    assert not authorize_call([g], "dev", info, 200.0).allowed  # ended
    assert not authorize_call([g], "dev", info, 99.0).allowed  # not started
    assert not authorize_call([grant(GRANT, state=GrantState.REVOKED)], "dev", info, 150.0).allowed
    exec_grant = grant(EXEC, id="grant-2")
    exec_info = parse_request("POST", "/api/v1/namespaces/dev/pods/web-1/exec?command=sh")
    assert authorize_call([g, exec_grant], "dev", exec_info, 150.0).grant is exec_grant
    other = authorize_call([g], "dev", parse_request("GET", "/metrics"), 150.0)
    assert (other.allowed, other.reason) == (False, "non-resource path /metrics is not available through the gateway")


# ---------------------------------------------------------------------------------------------
# Asking for access


def test_scope_for_call_and_request_command(rules: tuple[AccessRule, ...]) -> None:
    info = parse_request("GET", "/api/v1/namespaces/dev/pods?watch=1")
    assert scope_for_call("dev", info) == Scope("dev", ("dev",), False, ("pods",), ("watch",))
    assert scope_for_call("dev", info, widen_reads=True) == Scope("dev", ("dev",), False, ("pods",), ("get", "list", "watch"))
    exec_info = parse_request("GET", "/api/v1/namespaces/dev/pods/web/exec?command=sh", {"Upgrade": "websocket"})
    assert scope_for_call("dev", exec_info, widen_reads=True) == Scope("dev", ("dev",), False, ("pods/exec",), ("create",))
    assert scope_for_call("dev", parse_request("GET", "/api/v1/nodes")) == Scope("dev", (), True, ("nodes",), ("list",))
    with pytest.raises(InvalidRequest, match="/metrics is not a Kubernetes resource"):
        scope_for_call("dev", parse_request("GET", "/metrics"))

    scope = Scope("dev", ("team-a", "dev"), False, ("pods", "deployments.apps/scale"), ("list", "get"))
    assert request_command(scope, rules[0]) == (
        "jitgate request --cluster dev --namespace dev --namespace team-a --resource deployments.apps/scale --resource pods "
        "--verb get --verb list --duration 1h --reason '<why you need this access>'"
    )
    wide = Scope("prod", (), True, ("*",), ("get",))
    assert request_command(wide, reason="incident 42: it's down") == (
        "jitgate request --cluster prod --cluster-wide --resource '*' --verb get --reason 'incident 42: it'\"'\"'s down'"
    )
    assert shlex.split(request_command(wide, reason="incident 42: it's down"))[-1] == "incident 42: it's down"


def test_how_to_request(rules: tuple[AccessRule, ...]) -> None:
    devs = ("oidc:developers",)
    watch = parse_request("GET", "/api/v1/namespaces/team-a/pods?watch=1")
    assert how_to_request(rules, devs, "dev", watch) == (
        "jitgate: no active grant lets you watch pods in namespace team-a on cluster dev. Request access (rule dev-read, "
        "is approved automatically after 2m unless a reviewer denies it) with:\n"
        "  jitgate request --cluster dev --namespace team-a --resource pods --resource pods/log --verb get --verb list "
        "--verb watch --duration 1h --reason '<why you need this access>'"
    )  # reading pods goes on with their logs: one request covers list, get, watch and logs
    # `kubectl exec` gets the pod, then creates pods/exec: the suggestion covers both in one request.
    exec_info = parse_request("POST", "/api/v1/namespaces/payments/pods/api-0/exec?command=sh")
    message = how_to_request(rules, ("oidc:oncall",), "prod", exec_info)
    assert "(rule prod-exec, needs 2 approval(s) from oidc:sre, oidc:security)" in message
    assert message.endswith("--resource pods --resource pods/exec --verb get --verb create --duration 30m "
                            "--reason '<why you need this access>'")
    # `kubectl logs -f` reads the pod and its log.
    logs = how_to_request(rules, devs, "dev", parse_request("GET", "/api/v1/namespaces/dev/pods/api-0/log?follow=true"))
    assert "--resource pods --resource pods/log --verb get --verb list --verb watch" in logs
    # A rule that admits only the call itself: that is what is offered (dev-read has no pods/exec).
    only = how_to_request(rules, ("oidc:oncall",), "prod", parse_request("GET", "/api/v1/namespaces/payments/pods/api-0"))
    assert only.endswith("--resource pods --verb get --duration 30m --reason '<why you need this access>'")
    sandbox = how_to_request(rules, devs, "prod", parse_request("DELETE", "/apis/apps/v1/namespaces/sandbox/deployments/x"))
    assert "(rule sandbox, is granted immediately)" in sandbox and "--verb delete --duration 8h" in sandbox
    secrets = parse_request("GET", "/api/v1/namespaces/dev/secrets/db")
    assert how_to_request(rules, devs, "dev", secrets) == (
        "jitgate: no active grant lets you get secrets in namespace dev on cluster dev, and no access rule lets your groups "
        "(oidc:developers) request it; ask your platform team"
    )
    assert "you are in no group" in how_to_request(rules, (), "dev", watch)
    assert how_to_request(rules, devs, "dev", parse_request("GET", "/metrics")) == "jitgate: /metrics is not available through the gateway"


def test_choose_rule(rules: tuple[AccessRule, ...]) -> None:
    scope = Scope("dev", ("dev",), False, ("pods",), ("get",))
    assert choose_rule(rules, ("oidc:developers",), scope).name == "dev-read"
    # Policy order decides between rules that both cover the scope.
    assert choose_rule(rules, ("oidc:developers",), Scope("dev", ("sandbox",), False, ("pods",), ("get",))).name == "sandbox"
    assert choose_rule(rules, ("oidc:sre",), Scope("dev", (), True, ("pods",), ("list",))).name == "cluster-read"
    with pytest.raises(NotAllowed, match=r"no access rule lets groups \[oidc:sre\] request get pods in namespace dev on cluster dev") as e:
        choose_rule(rules, ("oidc:sre",), scope)
    assert e.value.status == 403
    with pytest.raises(NotAllowed, match="no access rule lets callers in no group request"):
        choose_rule(rules, (), scope)
    with pytest.raises(InvalidRequest, match="no access rule covers delete pods") as e:
        choose_rule(rules, ("oidc:developers",), Scope("dev", ("dev",), False, ("pods",), ("delete",)))
    assert e.value.status == 400
    with pytest.raises(InvalidRequest, match="no access rule named 'nope'"):
        choose_rule(rules, ("oidc:developers",), scope, "nope")
    with pytest.raises(NotAllowed, match="access rule 'prod-exec' does not let groups"):
        choose_rule(rules, ("oidc:developers",), scope, "prod-exec")
    with pytest.raises(NotAllowed, match="'sandbox' does not cover .*: namespace\\(s\\) dev not allowed"):
        choose_rule(rules, ("oidc:developers",), scope, "sandbox")


def test_open_request_validation(rules: tuple[AccessRule, ...]) -> None:
    alice = Person("alice", ("oidc:developers",))
    scope = Scope("dev", ("dev",), False, ("pods",), ("get",))
    t = open_request(rules, alice, scope, now=1000.0, reason="debugging")
    r = t.request
    assert (r.state, r.rule, r.duration, r.expires_at, r.auto_approve_at) == (RequestState.PENDING, "dev-read", 3600, 2800.0, 1120.0)
    assert t.new_grant is None and [e.kind for e in t.events] == ["request.created"]
    assert r.id.startswith("req-") and len(r.id) == 14
    cases = [
        ({"duration": 5 * 3600}, "duration 5h is above the maximum 4h of access rule 'dev-read'"),
        ({"duration": 0}, "positive number of seconds"),
        ({"reason": "  "}, "access rule 'dev-read' requires a reason"),
        ({"reason": "line\nbreak"}, "one line of printable text"),
        ({"reason": "x" * 1001}, "too long"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            open_request(rules, alice, scope, now=1000.0, **({"reason": "why"} | kwargs))
    # Immediate: approved by the system at creation, the grant starts now.
    t = open_request(rules, alice, Scope("prod", ("sandbox",), False, ("*",), ("get",)), now=1000.0)
    assert t.request.state is RequestState.APPROVED and t.request.decided_by == SYSTEM_ACTOR
    assert (t.new_grant.starts_at, t.new_grant.ends_at, t.new_grant.scope) == (1000.0, 1000.0 + 8 * 3600, t.request.scope)
    assert [e.kind for e in t.events] == ["request.created", "request.approved"]


def test_review_rechecks_the_policy_at_approval(rules: tuple[AccessRule, ...], tmp_path: Path) -> None:
    oncall = Person("olga", ("oidc:oncall",))
    scope = Scope("prod", ("payments",), False, ("pods/exec",), ("create",))
    request = open_request(rules, oncall, scope, now=0.0, duration=1800).request
    first = review_request(rules, request, Person("sam", ("oidc:sre",)), Decision.APPROVE, None, now=1.0).request
    assert first.state is RequestState.PENDING and first.approvers == ("sam",)
    # The policy changes while the request waits: oncall may no longer ask, or the maximum shrinks.
    narrowed = parse(tmp_path, GOOD.replace("requesters: [oidc:sre, oidc:oncall]", "requesters: [oidc:sre]"))
    with pytest.raises(Conflict, match="'prod-exec' no longer lets olga request access") as e:
        review_request(narrowed, first, Person("sec", ("oidc:security",)), "approve", "ok", now=2.0)
    assert e.value.status == 409
    shorter = parse(tmp_path, GOOD.replace("duration: 30m", "duration: 10m"))
    t = review_request(shorter, first, Person("sec", ("oidc:security",)), "approve", "ok", now=2.0)
    assert t.new_grant.ends_at == 2.0 + 600 and t.events[-1].detail["shortened_from"] == 1800
    gone = tuple(r for r in rules if r.name != "prod-exec")
    with pytest.raises(Conflict, match="'prod-exec' of request req-.* is no longer in the policy"):
        review_request(gone, first, Person("sec", ("oidc:security",)), "approve", "ok", now=2.0)
    with pytest.raises(InvalidRequest, match="'approve' or 'deny', not 'maybe'"):
        review_request(rules, first, Person("sec", ("oidc:security",)), "maybe", "ok", now=2.0)


def test_errors_form_one_hierarchy() -> None:
    for cls, status, reason in ((InvalidRequest, 400, "BadRequest"), (NotAllowed, 403, "Forbidden"), (Conflict, 409, "Conflict")):
        error = cls("message")
        assert isinstance(error, AccessError) and (error.status, error.reason, error.message) == (status, reason, "message")


def test_upstream_role_must_exist_on_every_cluster_of_the_rule(tmp_path: Path) -> None:
    text = GOOD.replace("upstream_role: readonly", "upstream_role: admin")
    with pytest.raises(PolicyError) as err:
        parse(tmp_path, text)
    assert "access_rules[0].upstream_role" in str(err.value)
    assert "cluster 'dev' has no upstream role 'admin' (known: readonly)" in str(err.value)
