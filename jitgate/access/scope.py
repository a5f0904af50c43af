"""Just-in-time access: access rules, scopes, the request/review workflow and per-call checks.

Nothing here is stored or sent anywhere: this module decides, `jitgate.store.sqlite` makes the decisions
durable. Every workflow step is a pure function from the current state (a request or a grant,
the policy's rules, the acting person, the time) to a `Transition` the store applies in one
transaction, so an SQLite and a PostgreSQL backend decide the same way.

The vocabulary follows Kubernetes RBAC: a scope names resources as `resource[.group][/subresource]`
(`pods`, `pods/log`, `deployments.apps/scale`) and Kubernetes verbs. Unlike RBAC, `*` is not
everything: it never covers `secrets` or the subresources that open a shell, a tunnel or mint a
credential (`SENSITIVE_SUBRESOURCES`); those must be named, so `get pods` or `*` never implies exec.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jitgate.access.errors import InvalidRequest

# The actor recorded for decisions nobody typed: auto-approval, immediate grants, expiry.
# `system:` names are reserved (the identity step refuses them), so no person can be this.
SYSTEM_ACTOR = "system:jitgate"

# Kubernetes verbs, in the order kubectl users think of them. `*` in a rule or a request means
# all of these; the path-prefix `proxy` verb (removed from the apiserver long ago) is never granted.
VERBS: tuple[str, ...] = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
VERB_ORDER = {v: i for i, v in enumerate(VERBS)}
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

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
NAMESPACE_PATTERN = re.compile(r"[-a-z0-9*?]{1,63}")
_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_GROUP = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
RULE_NAME = re.compile(r"[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?")


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


def expand_verbs(verbs: Iterable[str]) -> tuple[str, ...]:
    out: set[str] = set()
    for verb in verbs:
        verb = verb.strip()
        if verb == "*":
            out.update(VERBS)
        elif verb in VERB_ORDER:
            out.add(verb)
        else:
            raise ValueError(f"unknown verb {verb!r} (known: {', '.join(VERBS)}, or * for all)")
    return tuple(sorted(out, key=VERB_ORDER.__getitem__))


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
    reveal: bool = False  # responses carry secret values unmasked (see jitgate.masking)
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
            if not isinstance(ns, str) or not DNS_LABEL.fullmatch(ns):
                raise ValueError(f"invalid namespace {ns!r}: a namespace is a DNS label (lower-case letters, digits, '-')")
        if not isinstance(self.cluster_wide, bool):
            raise ValueError("cluster_wide must be true or false")
        if not isinstance(self.reveal, bool):
            raise ValueError("reveal must be true or false")
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
        set_(self, "verbs", expand_verbs(verbs))

    def contains(self, other: Scope) -> bool:
        """Whether every call `other` allows is allowed by this scope too."""
        if other.cluster != self.cluster or not other._verb_set <= self._verb_set:
            return False
        if other.reveal and not self.reveal:
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
        revealed = ", secret values revealed" if self.reveal else ""
        return f"{', '.join(self.verbs)} {resources} {where} on cluster {self.cluster}{revealed}"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "cluster": self.cluster,
            "namespaces": list(self.namespaces),
            "cluster_wide": self.cluster_wide,
            "resources": [str(r) for r in self.resources],
            "verbs": list(self.verbs),
        }
        if self.reveal:  # only when set: scopes stored before reveal existed read back the same
            out["reveal"] = True
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Scope:
        """A scope from JSON (API bodies, stored rows); raises `InvalidRequest`."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("invalid scope: expected a JSON object")
        unknown = set(data) - {"cluster", "namespaces", "cluster_wide", "resources", "verbs", "reveal"}
        if unknown:
            raise InvalidRequest(f"invalid scope: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        return cls(
            cluster=data.get("cluster"),
            namespaces=data.get("namespaces") or (),
            cluster_wide=data.get("cluster_wide", False),
            resources=data.get("resources") or (),
            verbs=data.get("verbs") or (),
            reveal=data.get("reveal", False),
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


