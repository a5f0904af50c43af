"""Just-in-time access: access rules, scopes, the request/review workflow and per-call checks.

Nothing here is stored or sent anywhere: this module decides, `jitgate.store` makes the decisions
durable. Every workflow step is a pure function from the current state (a request or a grant,
the policy's rules, the acting person, the time) to a `Transition` the store applies in one
transaction, so an SQLite and a PostgreSQL backend decide the same way.

The vocabulary follows Kubernetes RBAC: a scope names resources as `resource[.group][/subresource]`
(`pods`, `pods/log`, `deployments.apps/scale`) and Kubernetes verbs. Unlike RBAC, `*` is not
everything: it never covers `secrets` or the subresources that open a shell, a tunnel or mint a
credential (`SENSITIVE_SUBRESOURCES`); those must be named, so `get pods` or `*` never implies exec.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from jitgate.requestinfo import RequestInfo

if TYPE_CHECKING:  # jitgate.policy imports this module to parse its `access_rules` section
    from jitgate.policy import Cluster, Node, PolicyError

# The actor recorded for decisions nobody typed: auto-approval, immediate grants, expiry.
# `system:` names are reserved (the identity step refuses them), so no person can be this.
SYSTEM_ACTOR = "system:jitgate"

# Kubernetes verbs, in the order kubectl users think of them. `*` in a rule or a request means
# all of these; the path-prefix `proxy` verb (removed from the apiserver long ago) is never granted.
VERBS: tuple[str, ...] = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
_VERB_ORDER = {v: i for i, v in enumerate(VERBS)}
READ_VERBS: tuple[str, ...] = ("get", "list", "watch")

# Subresources `*` never covers: they open a shell or a tunnel into a workload or node, add a
# container to a running pod (`kubectl debug`), or mint a service account token.
SENSITIVE_SUBRESOURCES: frozenset[tuple[str, str]] = frozenset(
    {
        ("pods", "exec"),
        ("pods", "attach"),
        ("pods", "portforward"),
        ("pods", "proxy"),
        ("pods", "ephemeralcontainers"),
        ("services", "proxy"),
        ("nodes", "proxy"),
        ("serviceaccounts", "token"),
    }
)
SENSITIVE_RESOURCES: frozenset[str] = frozenset({"secrets"})

# The core ("") API group's resources: a group-less name in a rule must be one of these, so that
# `deployments` (which lives in `apps`) is an error instead of a rule that never matches.
CORE_RESOURCES: frozenset[str] = frozenset(
    {
        "bindings",
        "componentstatuses",
        "configmaps",
        "endpoints",
        "events",
        "limitranges",
        "namespaces",
        "nodes",
        "persistentvolumeclaims",
        "persistentvolumes",
        "pods",
        "podtemplates",
        "replicationcontrollers",
        "resourcequotas",
        "secrets",
        "serviceaccounts",
        "services",
    }
)
# Where well-known resources live, for the hint in that error.
KNOWN_GROUPS: Mapping[str, str] = {
    "deployments": "apps",
    "replicasets": "apps",
    "statefulsets": "apps",
    "daemonsets": "apps",
    "controllerrevisions": "apps",
    "jobs": "batch",
    "cronjobs": "batch",
    "ingresses": "networking.k8s.io",
    "ingressclasses": "networking.k8s.io",
    "networkpolicies": "networking.k8s.io",
    "roles": "rbac.authorization.k8s.io",
    "rolebindings": "rbac.authorization.k8s.io",
    "clusterroles": "rbac.authorization.k8s.io",
    "clusterrolebindings": "rbac.authorization.k8s.io",
    "horizontalpodautoscalers": "autoscaling",
    "poddisruptionbudgets": "policy",
    "storageclasses": "storage.k8s.io",
    "customresourcedefinitions": "apiextensions.k8s.io",
    "leases": "coordination.k8s.io",
    "endpointslices": "discovery.k8s.io",
    "priorityclasses": "scheduling.k8s.io",
}

# Grants are just-in-time: a rule whose maximum exceeds this is standing access in disguise.
MAX_GRANT_DURATION = 7 * 24 * 3600
MAX_REASON_LENGTH = 1000
MAX_SCOPE_ITEMS = 64

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_NAMESPACE_PATTERN = re.compile(r"[-a-z0-9*?]{1,63}")
_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_GROUP = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_RULE_NAME = re.compile(r"[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


# ---------------------------------------------------------------------------------------------
# Errors


class AccessError(Exception):
    """A refused access operation. `message` is written for the person who asked, and `status`
    and `reason` are the HTTP code and metav1 StatusReason to answer with."""

    status = 400
    reason = "BadRequest"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class InvalidRequest(AccessError):
    """Malformed input: bad scope, unknown rule, duration above the maximum, missing reason."""


class NotAllowed(AccessError):
    """The person may not do this: not a requester or reviewer of the rule, or their own request."""

    status = 403
    reason = "Forbidden"


class NotFound(AccessError):
    status = 404
    reason = "NotFound"


class Conflict(AccessError):
    """The request or grant is not in a state that allows this (decided, expired, reviewed)."""

    status = 409
    reason = "Conflict"


# ---------------------------------------------------------------------------------------------
# Durations


def parse_duration(text: str) -> int:
    """Seconds in `90s`, `15m`, `1h`, `1h30m`, `2d` (units in this order, each at most once)."""
    text = text.strip()
    m = _DURATION.fullmatch(text)
    if not text or m is None:
        raise ValueError(f"invalid duration {text!r}: write it like 90s, 15m, 1h or 1h30m")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def format_duration(seconds: float) -> str:
    """The shortest `1h30m`-style text for whole seconds."""
    seconds = int(seconds)
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out)


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# ---------------------------------------------------------------------------------------------
# Resources and scopes


@dataclass(frozen=True, slots=True, order=True)
class ResourceRef:
    """`resource[.group][/subresource]`, or `*` for any resource that is not sensitive."""

    resource: str
    group: str = ""
    subresource: str = ""

    @classmethod
    def parse(cls, text: str) -> ResourceRef:
        """Raises ValueError with a message fit for a policy error or an API answer."""
        text = text.strip()
        if text == "*":
            return ANY_RESOURCE
        name, _, sub = text.partition("/")
        resource, _, group = name.partition(".")
        if not _RESOURCE.fullmatch(resource):
            raise ValueError(
                f"invalid resource {text!r}: write it as resource[.group][/subresource], e.g. pods, pods/log, deployments.apps"
            )
        if group and not _GROUP.fullmatch(group):
            raise ValueError(f"invalid API group in {text!r}")
        if "/" in sub or (sub and not _RESOURCE.fullmatch(sub)):
            raise ValueError(f"invalid subresource in {text!r}")
        if not group and resource not in CORE_RESOURCES:
            if resource in KNOWN_GROUPS:
                hint = f"; write {resource}.{KNOWN_GROUPS[resource]}{'/' + sub if sub else ''}"
            elif resource + "s" in CORE_RESOURCES:
                hint = f"; did you mean {resource}s?"
            else:
                hint = " (name a custom resource with its group, e.g. widgets.example.com)"
            raise ValueError(f"{resource!r} is not a resource of the core API group{hint}")
        return cls(resource, group, sub)

    @property
    def is_any(self) -> bool:
        return self.resource == "*"

    @property
    def is_sensitive(self) -> bool:
        return is_sensitive_resource(self.resource, self.subresource)

    def __str__(self) -> str:
        text = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{text}/{self.subresource}" if self.subresource else text


ANY_RESOURCE = ResourceRef("*")


def is_sensitive_resource(resource: str, subresource: str) -> bool:
    """Never covered by `*`, in any API group (a look-alike custom resource errs on the safe side)."""
    return resource in SENSITIVE_RESOURCES or (resource, subresource) in SENSITIVE_SUBRESOURCES


def _expand_verbs(verbs: Iterable[str]) -> tuple[str, ...]:
    out: set[str] = set()
    for verb in verbs:
        verb = verb.strip()
        if verb == "*":
            out.update(VERBS)
        elif verb in _VERB_ORDER:
            out.add(verb)
        else:
            raise ValueError(f"unknown verb {verb!r} (known: {', '.join(VERBS)}, or * for all)")
    return tuple(sorted(out, key=_VERB_ORDER.__getitem__))


@dataclass(frozen=True)
class Scope:
    """What a request asks for and a grant allows, on one cluster.

    Either `namespaces` names concrete namespaces, or `cluster_wide` is set (and covers every
    namespace, cluster-scoped resources and lists across all namespaces). Construction normalizes
    (strings become `ResourceRef`s, `*` verbs expand, items are sorted and deduplicated) and
    raises `InvalidRequest` for anything malformed, so a Scope in hand is always valid.
    """

    cluster: str
    namespaces: tuple[str, ...] = ()
    cluster_wide: bool = False
    resources: tuple[ResourceRef, ...] = ()
    verbs: tuple[str, ...] = ()
    # Precomputed for `call_allowed_by`, which runs on every API call.
    _namespace_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _resource_set: frozenset[tuple[str, str, str]] = field(init=False, repr=False, compare=False)
    _verb_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _any_resource: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self._normalize()
        except ValueError as e:
            raise InvalidRequest(f"invalid scope: {e}") from None
        set_ = object.__setattr__
        set_(self, "_namespace_set", frozenset(self.namespaces))
        set_(self, "_resource_set", frozenset((r.group, r.resource, r.subresource) for r in self.resources if not r.is_any))
        set_(self, "_verb_set", frozenset(self.verbs))
        set_(self, "_any_resource", any(r.is_any for r in self.resources))

    def _normalize(self) -> None:
        if not isinstance(self.cluster, str) or not self.cluster or not self.cluster.isprintable() or " " in self.cluster:
            raise ValueError("a cluster name is required")
        namespaces = _as_strings(self.namespaces, "namespaces")
        resources = _as_strings(self.resources, "resources")
        verbs = _as_strings(self.verbs, "verbs")
        for ns in namespaces:
            if not isinstance(ns, str) or not _DNS_LABEL.fullmatch(ns):
                raise ValueError(f"invalid namespace {ns!r}: a namespace is a DNS label (lower-case letters, digits, '-')")
        if not isinstance(self.cluster_wide, bool):
            raise ValueError("cluster_wide must be true or false")
        if self.cluster_wide and namespaces:
            raise ValueError("cluster-wide access covers every namespace: do not name namespaces as well")
        if not self.cluster_wide and not namespaces:
            raise ValueError("name at least one namespace, or ask for cluster-wide access")
        refs = tuple(sorted({r if isinstance(r, ResourceRef) else ResourceRef.parse(r) for r in resources}, key=str))
        if not refs:
            raise ValueError("name at least one resource")
        if not verbs:
            raise ValueError("name at least one verb")
        if not all(isinstance(v, str) for v in verbs):
            raise ValueError("verbs must be a list of strings")
        for what, items in (("namespaces", namespaces), ("resources", refs), ("verbs", verbs)):
            if len(items) > MAX_SCOPE_ITEMS:
                raise ValueError(f"too many {what} (at most {MAX_SCOPE_ITEMS})")
        set_ = object.__setattr__
        set_(self, "namespaces", tuple(sorted(set(namespaces))))
        set_(self, "resources", refs)
        set_(self, "verbs", _expand_verbs(verbs))

    def contains(self, other: Scope) -> bool:
        """Whether every call `other` allows is allowed by this scope too."""
        if other.cluster != self.cluster or not other._verb_set <= self._verb_set:
            return False
        if other.cluster_wide:
            if not self.cluster_wide:
                return False
        elif not self.cluster_wide and not other._namespace_set <= self._namespace_set:
            return False
        for ref in other.resources:
            if ref.is_any:
                if not self._any_resource:
                    return False
            elif (ref.group, ref.resource, ref.subresource) not in self._resource_set and (ref.is_sensitive or not self._any_resource):
                return False
        return True

    def describe(self) -> str:
        """`get, list pods, pods/log in namespace dev on cluster dev`."""
        if self.cluster_wide:
            where = "cluster-wide"
        elif len(self.namespaces) == 1:
            where = f"in namespace {self.namespaces[0]}"
        else:
            where = f"in namespaces {', '.join(self.namespaces)}"
        resources = ", ".join("any resource" if r.is_any else str(r) for r in self.resources)
        return f"{', '.join(self.verbs)} {resources} {where} on cluster {self.cluster}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "namespaces": list(self.namespaces),
            "cluster_wide": self.cluster_wide,
            "resources": [str(r) for r in self.resources],
            "verbs": list(self.verbs),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Scope:
        """A scope from JSON (API bodies, stored rows); raises `InvalidRequest`."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("invalid scope: expected a JSON object")
        unknown = set(data) - {"cluster", "namespaces", "cluster_wide", "resources", "verbs"}
        if unknown:
            raise InvalidRequest(f"invalid scope: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        return cls(
            cluster=data.get("cluster"),
            namespaces=data.get("namespaces") or (),
            cluster_wide=data.get("cluster_wide", False),
            resources=data.get("resources") or (),
            verbs=data.get("verbs") or (),
        )


def _as_strings(value: Any, what: str) -> tuple:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list")
    for item in value:
        if not isinstance(item, (str, ResourceRef)):
            raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


# ---------------------------------------------------------------------------------------------
# Per-call checks (the hot path)

_DISCOVERY_PATHS = frozenset({"/api", "/apis", "/version", "/openapi/v2", "/openapi/v3", "/healthz", "/livez", "/readyz"})


def is_discovery(info: RequestInfo) -> bool:
    """Discovery, version, OpenAPI and health reads, which any authenticated caller may make.

    These are what kube's `system:discovery` and `system:public-info-viewer` roles allow. Under
    `/api` and `/apis` every non-resource path is discovery (`/api/v1`, `/apis/apps`,
    `/apis/apps/v1`): RequestInfo makes anything deeper a resource request.
    """
    if info.is_resource_request or info.upgrade or info.verb not in ("get", "head"):
        return False
    path = info.path.rstrip("/")
    if path in _DISCOVERY_PATHS:
        return True
    first = path[1:].partition("/")[0]
    return first in ("api", "apis") or path.startswith("/openapi/v3/")


def call_allowed_by(grant_scope: Scope, info: RequestInfo) -> bool:
    """Whether the grant scope covers this resource call (the caller compares the cluster).

    A call without a namespace (cluster-scoped resources, lists and watches across namespaces,
    `GET /api/v1/namespaces`) needs a cluster-wide scope; the namespace object itself
    (`GET /api/v1/namespaces/dev`) is in namespace `dev`, as kube RBAC reads it. Non-resource
    calls are never covered by a grant: see `is_discovery`.
    """
    if not info.is_resource_request or info.verb not in grant_scope._verb_set:
        return False
    if not grant_scope.cluster_wide and info.namespace not in grant_scope._namespace_set:
        return False  # "" (no namespace) is never in the set
    if (info.api_group, info.resource, info.subresource) in grant_scope._resource_set:
        return True
    return grant_scope._any_resource and not is_sensitive_resource(info.resource, info.subresource)


def scope_for_call(cluster: str, info: RequestInfo, widen_reads: bool = False) -> Scope:
    """The smallest scope that covers this call; with `widen_reads`, a read asks for get, list
    and watch at once (kubectl's `get -w` needs list then watch). Raises `InvalidRequest` for
    calls no scope can cover (non-resource paths, unknown verbs, non-DNS namespaces)."""
    if not info.is_resource_request:
        raise InvalidRequest(f"{info.path} is not a Kubernetes resource; no access request can cover it")
    verbs = READ_VERBS if widen_reads and info.verb in READ_VERBS else (info.verb,)
    ref = ResourceRef(info.resource, info.api_group, info.subresource)
    if info.namespace:
        return Scope(cluster, (info.namespace,), False, (ref,), verbs)
    return Scope(cluster, (), True, (ref,), verbs)


def request_command(scope: Scope, rule: AccessRule | None = None, reason: str | None = None) -> str:
    """The exact `jitgate request` command for `scope`; the duration is the rule's default."""
    args = ["jitgate", "request", "--cluster", scope.cluster]
    if scope.cluster_wide:
        args.append("--cluster-wide")
    for ns in scope.namespaces:
        args += ["--namespace", ns]
    for ref in scope.resources:
        args += ["--resource", str(ref)]
    for verb in scope.verbs:
        args += ["--verb", verb]
    if rule is not None:
        args += ["--duration", format_duration(rule.duration_default)]
    args += ["--reason", reason or "<why you need this access>"]
    return shlex.join(args)


# ---------------------------------------------------------------------------------------------
# Access rules


class ApprovalMode(StrEnum):
    REVIEWERS = "reviewers"  # `required` distinct reviewers approve
    AUTO = "auto"  # approved after a delay unless a reviewer denies first
    IMMEDIATE = "immediate"  # approved at creation


@dataclass(frozen=True)
class Approval:
    mode: ApprovalMode
    reviewers: tuple[str, ...] = ()  # groups whose members may approve, deny and revoke
    required: int | None = 1  # distinct approvals that approve; None: approvals never do (auto only)
    auto_approve_after: int | None = None  # seconds, mode auto


@dataclass(frozen=True)
class Hold:
    """The gateway may file the request itself for a caller without one and hold the call."""

    max_wait: int  # seconds


@dataclass(frozen=True)
class AccessRule:
    name: str
    requesters: tuple[str, ...]  # groups
    clusters: tuple[str, ...]  # names, or ("*",)
    namespaces: tuple[str, ...]  # names and glob patterns
    cluster_wide: bool
    resources: tuple[ResourceRef, ...]
    verbs: tuple[str, ...]
    duration_default: int
    duration_max: int
    approval: Approval
    request_ttl: int = 3600
    require_reason: bool = False
    upstream_role: str | None = None
    hold: Hold | None = None
    description: str = ""
    source: str = ""  # file:line, for messages
    _requester_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _reviewer_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _namespace_names: frozenset[str] = field(init=False, repr=False, compare=False)
    _namespace_patterns: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)
    _resource_set: frozenset[ResourceRef] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "_requester_set", frozenset(self.requesters))
        set_(self, "_reviewer_set", frozenset(self.approval.reviewers))
        set_(self, "_namespace_names", frozenset(n for n in self.namespaces if not _is_pattern(n)))
        set_(self, "_namespace_patterns", tuple(re.compile(fnmatch.translate(n)) for n in self.namespaces if _is_pattern(n)))
        set_(self, "_resource_set", frozenset(self.resources))

    def may_request(self, groups: Iterable[str]) -> bool:
        return not self._requester_set.isdisjoint(groups)

    def is_reviewer(self, groups: Iterable[str]) -> bool:
        return not self._reviewer_set.isdisjoint(groups)

    def allows_cluster(self, cluster: str) -> bool:
        return "*" in self.clusters or cluster in self.clusters

    def allows_namespace(self, namespace: str) -> bool:
        return namespace in self._namespace_names or any(p.fullmatch(namespace) for p in self._namespace_patterns)

    def allows_resource(self, ref: ResourceRef) -> bool:
        if ref in self._resource_set:
            return True
        return ANY_RESOURCE in self._resource_set and not ref.is_any and not ref.is_sensitive

    def why_not(self, scope: Scope) -> str | None:
        """None when the rule permits requesting `scope`, else what it does not permit."""
        if not self.allows_cluster(scope.cluster):
            return f"cluster {scope.cluster} is not one of {', '.join(self.clusters)}"
        if scope.cluster_wide and not self.cluster_wide:
            return "cluster-wide access is not allowed"
        outside = [ns for ns in scope.namespaces if not self.allows_namespace(ns)]
        if outside:
            return f"namespace(s) {', '.join(outside)} not allowed"
        resources = [str(r) for r in scope.resources if not self.allows_resource(r)]
        if resources:
            return f"resource(s) {', '.join(resources)} not allowed"
        verbs = [v for v in scope.verbs if v not in self.verbs]
        if verbs:
            return f"verb(s) {', '.join(verbs)} not allowed"
        return None

    def covers(self, scope: Scope) -> bool:
        return self.why_not(scope) is None

    def to_dict(self) -> dict[str, Any]:
        """What the API shows people about a rule (who may request what, how it is decided)."""
        return {
            "name": self.name,
            "description": self.description,
            "requesters": list(self.requesters),
            "clusters": list(self.clusters),
            "namespaces": list(self.namespaces),
            "cluster_wide": self.cluster_wide,
            "resources": [str(r) for r in self.resources],
            "verbs": list(self.verbs),
            "duration": {"default": format_duration(self.duration_default), "max": format_duration(self.duration_max)},
            "approval": {
                "mode": str(self.approval.mode),
                "reviewers": list(self.approval.reviewers),
                "required": self.approval.required,
                "auto_approve_after": format_duration(self.approval.auto_approve_after) if self.approval.auto_approve_after else None,
            },
            "require_reason": self.require_reason,
            "request_ttl": format_duration(self.request_ttl),
            "hold": {"max_wait": format_duration(self.hold.max_wait)} if self.hold else None,
        }


def _is_pattern(name: str) -> bool:
    return "*" in name or "?" in name


def rule_named(rules: Sequence[AccessRule], name: str) -> AccessRule | None:
    return next((r for r in rules if r.name == name), None)


def choose_rule(rules: Sequence[AccessRule], groups: Iterable[str], scope: Scope, rule_name: str | None = None) -> AccessRule:
    """The first rule (in policy order) that lets one of `groups` request `scope`.

    Raises `NotAllowed` (403) when rules cover the scope but not for these groups, and
    `InvalidRequest` (400) when no rule covers the scope for anybody.
    """
    groups = tuple(groups)
    if rule_name is not None:
        rule = rule_named(rules, rule_name)
        if rule is None:
            raise InvalidRequest(f"there is no access rule named {rule_name!r}")
        if not rule.may_request(groups):
            raise NotAllowed(f"access rule {rule.name!r} does not let groups [{', '.join(groups)}] request access")
        problem = rule.why_not(scope)
        if problem:
            raise NotAllowed(f"access rule {rule.name!r} does not cover {scope.describe()}: {problem}")
        return rule
    for rule in rules:
        if rule.may_request(groups) and rule.covers(scope):
            return rule
    if any(rule.covers(scope) for rule in rules):
        who = f"groups [{', '.join(groups)}]" if groups else "callers in no group"
        raise NotAllowed(f"no access rule lets {who} request {scope.describe()}")
    raise InvalidRequest(f"no access rule covers {scope.describe()}; ask your platform team which scopes can be requested")


def rules_for(rules: Sequence[AccessRule], groups: Iterable[str]) -> tuple[AccessRule, ...]:
    """The rules these groups may request under (what `jitgate request --help` can list)."""
    groups = tuple(groups)
    return tuple(r for r in rules if r.may_request(groups))


# ---------------------------------------------------------------------------------------------
# Parsing the `access_rules` policy section


def parse_access_rules(nodes: Iterable[Node], clusters: Mapping[str, Cluster]) -> tuple[AccessRule, ...]:
    """Rules from the `access_rules` list items, in policy order; raises `PolicyError`."""
    rules: list[AccessRule] = []
    seen: dict[str, str] = {}
    for node in nodes:
        rule = _parse_rule(node, clusters)
        if rule.name in seen:
            raise node.error("name", f"access rule {rule.name!r} is already defined at {seen[rule.name]}")
        seen[rule.name] = rule.source
        rules.append(rule)
    return tuple(rules)


def _parse_rule(node: Node, clusters: Mapping[str, Cluster]) -> AccessRule:
    name = node.string("name", required=True)
    if not _RULE_NAME.fullmatch(name):
        raise node.error("name", f"invalid rule name {name!r}: use lower-case letters, digits, '-', '.' and '_'")
    description = node.get("description", str, default="")
    requesters = node.strings("requesters", required=True)

    rule_clusters = node.strings("clusters", required=True)
    for i, cluster in enumerate(rule_clusters):
        if cluster == "*":
            if len(rule_clusters) > 1:
                raise _item_error(node, "clusters", i, "'*' already means every cluster; list nothing else")
        elif cluster not in clusters:
            known = ", ".join(clusters) or "none"
            raise _item_error(node, "clusters", i, f"unknown cluster {cluster!r} (defined: {known})")

    namespaces = node.strings("namespaces")
    for i, ns in enumerate(namespaces):
        if not (_DNS_LABEL.fullmatch(ns) if not _is_pattern(ns) else _NAMESPACE_PATTERN.fullmatch(ns)):
            raise _item_error(node, "namespaces", i, f"invalid namespace {ns!r}: a DNS label, or a glob pattern like team-*")
    cluster_wide = node.get("cluster_wide", bool, default=False)
    if not namespaces and not cluster_wide:
        raise node.error(None, "an access rule needs 'namespaces', or 'cluster_wide: true', or both")

    resources: list[ResourceRef] = []
    for i, text in enumerate(node.strings("resources", required=True)):
        try:
            resources.append(ResourceRef.parse(text))
        except ValueError as e:
            raise _item_error(node, "resources", i, str(e)) from None
    verb_texts = node.strings("verbs", required=True)
    for i, verb in enumerate(verb_texts):
        if verb != "*" and verb not in _VERB_ORDER:
            raise _item_error(node, "verbs", i, f"unknown verb {verb!r} (known: {', '.join(VERBS)}, or * for all)")
    verbs = _expand_verbs(verb_texts)

    duration_default, duration_max = _parse_durations(node)
    upstream_role = node.string("upstream_role")
    if upstream_role is not None:
        named = clusters.keys() if "*" in rule_clusters else rule_clusters
        for cluster_name in named:
            roles = getattr(clusters[cluster_name], "upstream_roles", {})
            if upstream_role not in roles:
                known = ", ".join(sorted(roles)) or "none: upstream roles need an eks credential with `roles:`"
                raise node.error("upstream_role", f"cluster {cluster_name!r} has no upstream role {upstream_role!r} (known: {known})")
    require_reason = node.get("require_reason", bool, default=False)
    request_ttl = _duration_field(node, "request_ttl", default=3600)
    approval = _parse_approval(node, resources, request_ttl)

    hold = None
    hold_node = node.child("hold")
    if hold_node is not None:
        max_wait = _duration_field(hold_node, "max_wait", required=True)
        if max_wait > request_ttl:
            raise hold_node.error("max_wait", f"{format_duration(max_wait)} is longer than the request_ttl {format_duration(request_ttl)}")
        a = approval
        if a.mode is ApprovalMode.AUTO and a.required is None and a.auto_approve_after > max_wait:
            raise hold_node.error(
                "max_wait",
                f"a held call waits at most {format_duration(max_wait)} but this rule auto-approves only after "
                f"{format_duration(a.auto_approve_after)}, so a held call could never be let through",
            )
        hold = Hold(max_wait)
        hold_node.finish()

    node.finish()
    return AccessRule(
        name=name,
        requesters=requesters,
        clusters=rule_clusters,
        namespaces=namespaces,
        cluster_wide=cluster_wide,
        resources=tuple(resources),
        verbs=verbs,
        duration_default=duration_default,
        duration_max=duration_max,
        approval=approval,
        request_ttl=request_ttl,
        require_reason=require_reason,
        upstream_role=upstream_role,
        hold=hold,
        description=description,
        source=f"{node.file}:{node.line()}",
    )


def _parse_durations(node: Node) -> tuple[int, int]:
    """`duration: 1h` (default and maximum) or `duration: {default: 1h, max: 4h}`."""
    value = node.get("duration", (str, dict), required=True)
    if isinstance(value, str):
        default = maximum = _duration_field(node, "duration", required=True)
        where, key = node, "duration"
    else:
        where, key = node.child("duration", required=True), "max"
        maximum = _duration_field(where, "max", required=True)
        default = _duration_field(where, "default", default=maximum)
        if default > maximum:
            raise where.error("default", f"the default {format_duration(default)} is longer than the max {format_duration(maximum)}")
        where.finish()
    if maximum > MAX_GRANT_DURATION:
        longest = format_duration(MAX_GRANT_DURATION)
        raise where.error(key, f"{format_duration(maximum)} is longer than {longest}: grants are just-in-time, not standing access")
    return default, maximum


def _parse_approval(node: Node, resources: Sequence[ResourceRef], request_ttl: int) -> Approval:
    a = node.child("approval", required=True)
    mode_text = a.string("mode", required=True)
    try:
        mode = ApprovalMode(mode_text)
    except ValueError:
        raise a.error("mode", f"unknown approval mode {mode_text!r} (known: reviewers, auto, immediate)") from None
    reviewers = a.strings("reviewers")
    required = a.get("required", int)
    if required is not None and required < 1:
        raise a.error("required", "must be at least 1")
    auto_after = _duration_field(a, "auto_approve_after")

    if mode is ApprovalMode.REVIEWERS:
        if not reviewers:
            raise a.error(None, "mode reviewers needs 'reviewers' (the groups that may approve)")
        if auto_after is not None:
            raise a.error("auto_approve_after", "only mode auto approves after a delay")
        required = required or 1
    elif mode is ApprovalMode.AUTO:
        if not reviewers:
            raise a.error(None, "mode auto needs 'reviewers' (the groups that may deny before the delay ends)")
        if auto_after is None:
            raise a.error(None, "mode auto needs 'auto_approve_after' (e.g. 2m)")
        if auto_after >= request_ttl:
            raise a.error(
                "auto_approve_after",
                f"{format_duration(auto_after)} is not shorter than the request_ttl {format_duration(request_ttl)}: "
                "requests would expire first",
            )
    else:
        if required is not None:
            raise a.error("required", "mode immediate approves at once; 'required' is for modes reviewers and auto")
        if auto_after is not None:
            raise a.error("auto_approve_after", "mode immediate approves at once; 'auto_approve_after' is for mode auto")
        sensitive = [str(r) for r in resources if r.is_sensitive]
        if sensitive:
            # Immediate approval of a shell, a tunnel or secrets is standing access to them.
            raise a.error(
                "mode", f"mode immediate cannot grant {', '.join(sensitive)}: use mode reviewers or auto for secrets and exec-like access"
            )
    a.finish()
    return Approval(mode, reviewers, required, auto_after)


def _duration_field(node: Node, key: str, required: bool = False, default: int | None = None) -> int | None:
    text = node.get(key, str, required)
    if text is None:
        return default
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise node.error(key, str(e)) from None
    if seconds <= 0:
        raise node.error(key, "must be longer than 0s")
    return seconds


def _item_error(node: Node, key: str, index: int, message: str) -> PolicyError:
    from jitgate.policy import PolicyError

    seq = node.data.get(key)
    lc = getattr(seq, "lc", None)
    line = lc.item(index)[0] + 1 if isinstance(seq, list) and lc is not None else node.line(key)
    return PolicyError(node.file, line, f"{node.field(key)}[{index}]", message)


# ---------------------------------------------------------------------------------------------
# Requests, reviews, grants, events


class Principal(Protocol):
    """A person as the workflow needs them (jitgate.oidc.Identity is one)."""

    @property
    def username(self) -> str: ...

    @property
    def groups(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Person:
    username: str
    groups: tuple[str, ...] = ()


SYSTEM = Person(SYSTEM_ACTOR)


class RequestState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class GrantState(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


@dataclass(frozen=True)
class Review:
    reviewer: str
    groups: tuple[str, ...]
    decision: Decision
    reason: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "reviewer": self.reviewer,
            "groups": list(self.groups),
            "decision": str(self.decision),
            "reason": self.reason,
            "at": rfc3339(self.at),
        }


@dataclass(frozen=True)
class Grant:
    id: str
    request_id: str
    username: str
    rule: str
    scope: Scope
    upstream_role: str | None
    starts_at: float
    ends_at: float
    state: GrantState = GrantState.ACTIVE
    revoked_by: str | None = None
    revoked_at: float | None = None
    revoke_reason: str | None = None

    @property
    def cluster(self) -> str:
        return self.scope.cluster

    def is_active(self, now: float) -> bool:
        return self.state is GrantState.ACTIVE and self.starts_at <= now < self.ends_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "username": self.username,
            "rule": self.rule,
            "scope": self.scope.to_dict(),
            "upstream_role": self.upstream_role,
            "state": str(self.state),
            "starts_at": rfc3339(self.starts_at),
            "ends_at": rfc3339(self.ends_at),
            "revoked_by": self.revoked_by,
            "revoked_at": rfc3339(self.revoked_at),
            "revoke_reason": self.revoke_reason,
        }


@dataclass(frozen=True)
class AccessRequest:
    id: str
    requester: str
    requester_groups: tuple[str, ...]  # as they were when the request was made
    rule: str
    scope: Scope
    duration: int  # seconds asked for
    reason: str
    state: RequestState
    created_at: float
    expires_at: float  # a pending request nobody decided expires then
    auto_approve_at: float | None = None
    decided_at: float | None = None
    decided_by: str | None = None
    decision_reason: str | None = None
    reviews: tuple[Review, ...] = ()
    grant: Grant | None = None

    @property
    def cluster(self) -> str:
        return self.scope.cluster

    @property
    def approvers(self) -> tuple[str, ...]:
        return tuple(r.reviewer for r in self.reviews if r.decision is Decision.APPROVE)

    def review_by(self, username: str) -> Review | None:
        return next((r for r in self.reviews if r.reviewer == username), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": str(self.state),
            "requester": self.requester,
            "requester_groups": list(self.requester_groups),
            "rule": self.rule,
            "scope": self.scope.to_dict(),
            "duration": format_duration(self.duration),
            "duration_seconds": self.duration,
            "reason": self.reason,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "auto_approve_at": rfc3339(self.auto_approve_at),
            "decided_at": rfc3339(self.decided_at),
            "decided_by": self.decided_by,
            "decision_reason": self.decision_reason,
            "approvals": len(self.approvers),
            "reviews": [r.to_dict() for r in self.reviews],
            "grant": self.grant.to_dict() if self.grant else None,
        }


class EventKind(StrEnum):
    REQUEST_CREATED = "request.created"
    REVIEW_APPROVED = "review.approved"  # one reviewer's approval, the request may stay pending
    REVIEW_DENIED = "review.denied"
    REQUEST_APPROVED = "request.approved"  # the request is approved and its grant created
    REQUEST_DENIED = "request.denied"
    REQUEST_EXPIRED = "request.expired"
    REQUEST_CANCELLED = "request.cancelled"
    AUTO_APPROVAL_WITHDRAWN = "request.auto_approval_withdrawn"
    GRANT_EXPIRED = "grant.expired"
    GRANT_REVOKED = "grant.revoked"


@dataclass(frozen=True)
class Event:
    """One line of the append-only history: who did what, when, why."""

    at: float
    kind: EventKind
    actor: str
    request_id: str | None
    grant_id: str | None = None
    reason: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None  # assigned by the store

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": rfc3339(self.at),
            "kind": str(self.kind),
            "actor": self.actor,
            "request_id": self.request_id,
            "grant_id": self.grant_id,
            "reason": self.reason,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True)
class Transition:
    """What one workflow step changes; a store applies all of it in one transaction."""

    request: AccessRequest | None = None  # the request after the step (new or updated)
    new_review: Review | None = None
    new_grant: Grant | None = None
    grant: Grant | None = None  # an existing grant after the step (revoked, expired)
    events: tuple[Event, ...] = ()


def new_id(prefix: str) -> str:
    """`req-` / `grant-` + 10 random base32 characters (50 bits): short, URL-safe, unguessable enough
    that ids are not enumerated (authorization never depends on them)."""
    return f"{prefix}-{base64.b32encode(os.urandom(10)).decode()[:10].lower()}"


def check_reason(reason: str | None, required: bool, what: str = "a reason") -> str:
    reason = (reason or "").strip()
    if required and not reason:
        raise InvalidRequest(f"{what} is required")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidRequest(f"the reason is too long (at most {MAX_REASON_LENGTH} characters)")
    if not reason.isprintable():
        raise InvalidRequest("the reason must be one line of printable text")
    return reason


def open_request(
    rules: Sequence[AccessRule],
    requester: Principal,
    scope: Scope,
    *,
    now: float,
    duration: int | None = None,
    reason: str | None = None,
    rule_name: str | None = None,
) -> Transition:
    """A new request: pending, or approved with its grant for mode immediate."""
    groups = tuple(requester.groups)
    rule = choose_rule(rules, groups, scope, rule_name)
    if duration is None:
        duration = rule.duration_default
    if not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
        raise InvalidRequest("the duration must be a positive number of seconds")
    if duration > rule.duration_max:
        maximum = format_duration(rule.duration_max)
        raise InvalidRequest(f"duration {format_duration(duration)} is above the maximum {maximum} of access rule {rule.name!r}")
    reason = check_reason(reason, rule.require_reason, f"access rule {rule.name!r} requires a reason")
    mode = rule.approval.mode
    request = AccessRequest(
        id=new_id("req"),
        requester=requester.username,
        requester_groups=groups,
        rule=rule.name,
        scope=scope,
        duration=duration,
        reason=reason,
        state=RequestState.PENDING,
        created_at=now,
        expires_at=now + rule.request_ttl,
        auto_approve_at=now + rule.approval.auto_approve_after if mode is ApprovalMode.AUTO else None,
    )
    detail = {"rule": rule.name, "scope": scope.to_dict(), "duration": duration, "mode": str(mode)}
    created = Event(now, EventKind.REQUEST_CREATED, requester.username, request.id, reason=reason, detail=detail)
    if mode is ApprovalMode.IMMEDIATE:
        return _approve(rules, request, SYSTEM_ACTOR, "immediate approval by access rule " + repr(rule.name), now, (created,))
    return Transition(request=request, events=(created,))


def review_request(
    rules: Sequence[AccessRule], request: AccessRequest, reviewer: Principal, decision: Decision | str, reason: str | None, *, now: float
) -> Transition:
    """One reviewer's approval or denial. A denial decides at once; approvals decide when
    `required` distinct people approved. Raises without changing anything when the review
    is not allowed."""
    try:
        decision = Decision(decision)
    except ValueError:
        raise InvalidRequest(f"a review decision is 'approve' or 'deny', not {decision!r}") from None
    _require_pending(request, now)
    rule = rule_named(rules, request.rule)
    if rule is None:
        raise Conflict(
            f"access rule {request.rule!r} of request {request.id} is no longer in the policy; "
            f"the request cannot be reviewed (it expires at {rfc3339(request.expires_at)})"
        )
    if reviewer.username == request.requester:
        raise NotAllowed(f"you cannot review your own request {request.id}")
    if not rule.is_reviewer(reviewer.groups):
        groups = ", ".join(rule.approval.reviewers) or "none"
        raise NotAllowed(f"you are not a reviewer of access rule {rule.name!r} (reviewer groups: {groups})")
    earlier = request.review_by(reviewer.username)
    if earlier is not None:
        raise Conflict(f"you already {'approved' if earlier.decision is Decision.APPROVE else 'denied'} request {request.id}")
    reason = check_reason(reason, decision is Decision.DENY, "a reason for the denial")

    review = Review(reviewer.username, tuple(reviewer.groups), decision, reason, now)
    reviewed = replace(request, reviews=request.reviews + (review,))
    if decision is Decision.DENY:
        denied = _decided(reviewed, RequestState.DENIED, now, reviewer.username, reason)
        events = (
            Event(now, EventKind.REVIEW_DENIED, reviewer.username, request.id, reason=reason),
            Event(now, EventKind.REQUEST_DENIED, reviewer.username, request.id, reason=reason),
        )
        return Transition(request=denied, new_review=review, events=events)

    approvals = len(reviewed.approvers)
    # A rule switched to mode immediate while this request waited: one approval is enough.
    required = 1 if rule.approval.mode is ApprovalMode.IMMEDIATE else rule.approval.required
    detail = {"approvals": approvals, "required": required}
    voted = Event(now, EventKind.REVIEW_APPROVED, reviewer.username, request.id, reason=reason, detail=detail)
    if required is None or approvals < required:
        return Transition(request=reviewed, new_review=review, events=(voted,))
    t = _approve(rules, reviewed, reviewer.username, reason, now, (voted,))
    return replace(t, new_review=review)


def _approve(
    rules: Sequence[AccessRule], request: AccessRequest, actor: str, reason: str, now: float, events: tuple[Event, ...]
) -> Transition:
    """Approve and create the grant, re-checking the current policy: the rule may have changed
    since the request was made. Its clock starts now and never exceeds the rule's maximum."""
    rule = rule_named(rules, request.rule)
    if rule is None:
        raise Conflict(f"access rule {request.rule!r} is no longer in the policy; request {request.id} cannot be approved")
    if not rule.may_request(request.requester_groups):
        raise Conflict(
            f"access rule {rule.name!r} no longer lets {request.requester} request access; request {request.id} cannot be approved"
        )
    problem = rule.why_not(request.scope)
    if problem:
        raise Conflict(f"access rule {rule.name!r} no longer covers request {request.id} ({problem}); it cannot be approved")
    duration = min(request.duration, rule.duration_max)
    grant = Grant(
        id=new_id("grant"),
        request_id=request.id,
        username=request.requester,
        rule=rule.name,
        scope=request.scope,
        upstream_role=rule.upstream_role,
        starts_at=now,
        ends_at=now + duration,
    )
    approved = replace(_decided(request, RequestState.APPROVED, now, actor, reason), grant=grant)
    detail: dict[str, Any] = {"approvers": list(request.approvers), "ends_at": rfc3339(grant.ends_at), "duration": duration}
    if duration < request.duration:
        detail["shortened_from"] = request.duration  # the policy's maximum shrank since the request
    done = Event(now, EventKind.REQUEST_APPROVED, actor, request.id, grant.id, reason=reason, detail=detail)
    return Transition(request=approved, new_grant=grant, events=events + (done,))


def auto_approve(rules: Sequence[AccessRule], request: AccessRequest, *, now: float) -> Transition:
    """The delayed approval of a mode-auto request that is due. If the policy changed so that
    it can no longer be approved, the request is denied by the system, or (if the rule merely
    stopped auto-approving) left to its reviewers."""
    _require_pending(request, now)
    if request.auto_approve_at is None or request.auto_approve_at > now:
        raise Conflict(f"request {request.id} is not due for automatic approval")
    rule = rule_named(rules, request.rule)
    if rule is not None and rule.approval.mode is not ApprovalMode.AUTO:
        withdrawn = replace(request, auto_approve_at=None)
        why = f"access rule {rule.name!r} no longer approves automatically"
        event = Event(now, EventKind.AUTO_APPROVAL_WITHDRAWN, SYSTEM_ACTOR, request.id, reason=why)
        return Transition(request=withdrawn, events=(event,))
    try:
        delay = format_duration(request.auto_approve_at - request.created_at)
        return _approve(rules, request, SYSTEM_ACTOR, f"approved automatically: no reviewer denied within {delay}", now, ())
    except Conflict as e:
        denied = _decided(request, RequestState.DENIED, now, SYSTEM_ACTOR, e.message)
        return Transition(request=denied, events=(Event(now, EventKind.REQUEST_DENIED, SYSTEM_ACTOR, request.id, reason=e.message),))


def cancel_request(request: AccessRequest, actor: Principal, reason: str | None, *, now: float) -> Transition:
    if actor.username != request.requester:
        raise NotAllowed(f"only {request.requester}, who made request {request.id}, can cancel it")
    _require_pending(request, now)
    reason = check_reason(reason, False)
    cancelled = _decided(request, RequestState.CANCELLED, now, actor.username, reason)
    return Transition(request=cancelled, events=(Event(now, EventKind.REQUEST_CANCELLED, actor.username, request.id, reason=reason),))


def expire_request(request: AccessRequest, *, now: float) -> Transition:
    if request.state is not RequestState.PENDING or request.expires_at > now:
        raise Conflict(f"request {request.id} is not a pending request past its expiry")
    reason = "nobody decided within the request TTL"
    expired = _decided(request, RequestState.EXPIRED, now, SYSTEM_ACTOR, reason)
    return Transition(request=expired, events=(Event(now, EventKind.REQUEST_EXPIRED, SYSTEM_ACTOR, request.id, reason=reason),))


def revoke_grant(rules: Sequence[AccessRule], grant: Grant, actor: Principal, reason: str | None, *, now: float) -> Transition:
    """End an active grant now: by the person it was granted to, or by a reviewer of its rule."""
    if actor.username != grant.username:
        rule = rule_named(rules, grant.rule)
        if rule is None or not rule.is_reviewer(actor.groups):
            raise NotAllowed(f"only {grant.username} or a reviewer of access rule {grant.rule!r} can revoke grant {grant.id}")
    if grant.state is not GrantState.ACTIVE or grant.ends_at <= now:
        state = "expired" if grant.state is GrantState.ACTIVE else str(grant.state)
        raise Conflict(f"grant {grant.id} is {state}, not active")
    reason = check_reason(reason, True, "a reason for the revocation")
    revoked = replace(grant, state=GrantState.REVOKED, revoked_by=actor.username, revoked_at=now, revoke_reason=reason)
    event = Event(now, EventKind.GRANT_REVOKED, actor.username, grant.request_id, grant.id, reason=reason)
    return Transition(grant=revoked, events=(event,))


def expire_grant(grant: Grant, *, now: float) -> Transition:
    if grant.state is not GrantState.ACTIVE or grant.ends_at > now:
        raise Conflict(f"grant {grant.id} is not an active grant past its end")
    expired = replace(grant, state=GrantState.EXPIRED)
    event = Event(now, EventKind.GRANT_EXPIRED, SYSTEM_ACTOR, grant.request_id, grant.id, reason="the grant's time ended")
    return Transition(grant=expired, events=(event,))


def _decided(request: AccessRequest, state: RequestState, now: float, actor: str, reason: str) -> AccessRequest:
    return replace(request, state=state, decided_at=now, decided_by=actor, decision_reason=reason, auto_approve_at=None)


def _require_pending(request: AccessRequest, now: float) -> None:
    if request.state is not RequestState.PENDING:
        raise Conflict(f"request {request.id} is already {request.state}")
    if request.expires_at <= now:
        raise Conflict(f"request {request.id} expired at {rfc3339(request.expires_at)}; nobody decided in time")


# ---------------------------------------------------------------------------------------------
# Deciding a call


@dataclass(frozen=True, slots=True)
class CallDecision:
    allowed: bool
    grant: Grant | None  # the grant that allowed the call
    reason: str  # for the audit log


DISCOVERY_ALLOWED = CallDecision(True, None, "discovery is allowed for any authenticated caller")


def authorize_call(grants: Iterable[Grant], cluster: str, info: RequestInfo, now: float) -> CallDecision:
    """The first of `grants` (the caller's, from `Store.active_grants_for`) that allows the call."""
    if is_discovery(info):
        return DISCOVERY_ALLOWED
    if not info.is_resource_request:
        return CallDecision(False, None, f"non-resource path {info.path} is not available through the gateway")
    for grant in grants:
        if grant.scope.cluster == cluster and grant.is_active(now) and call_allowed_by(grant.scope, info):
            return CallDecision(True, grant, f"allowed by grant {grant.id}")
    return CallDecision(False, None, "no active grant covers the call")


def how_to_request(rules: Sequence[AccessRule], groups: Iterable[str], cluster: str, info: RequestInfo) -> str:
    """The refusal message for a call no grant covers: what was refused and the exact command
    to ask for it, or why the caller cannot ask. kubectl prints it verbatim."""
    if not info.is_resource_request:
        return f"jitgate: {info.path} is not available through the gateway"
    groups = tuple(groups)
    what = _describe_call(cluster, info)
    try:
        minimal = scope_for_call(cluster, info)
    except InvalidRequest as e:
        return f"jitgate: no active grant lets you {what}; {e.message}"
    wide = scope_for_call(cluster, info, widen_reads=True)
    for scope in (wide, minimal) if wide != minimal else (minimal,):
        try:
            rule = choose_rule(rules, groups, scope)
        except AccessError:
            continue
        mode = {
            ApprovalMode.REVIEWERS: f"needs {rule.approval.required} approval(s) from {', '.join(rule.approval.reviewers)}",
            ApprovalMode.AUTO: f"is approved automatically after {format_duration(rule.approval.auto_approve_after or 0)} "
            "unless a reviewer denies it",
            ApprovalMode.IMMEDIATE: "is granted immediately",
        }[rule.approval.mode]
        command = request_command(scope, rule)
        return f"jitgate: no active grant lets you {what}. Request access (rule {rule.name}, {mode}) with:\n  {command}"
    who = f"your groups ({', '.join(groups)})" if groups else "you (you are in no group)"
    return f"jitgate: no active grant lets you {what}, and no access rule lets {who} request it; ask your platform team"


def _describe_call(cluster: str, info: RequestInfo) -> str:
    resource = str(ResourceRef(info.resource, info.api_group, info.subresource))
    where = f"in namespace {info.namespace}" if info.namespace else "cluster-wide"
    return f"{info.verb or 'use'} {resource} {where} on cluster {cluster}"
