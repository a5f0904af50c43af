"""Access rules: who may ask for which scope, for how long, approved how."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from jitgate.access.errors import InvalidRequest, NotAllowed
from jitgate.access.scope import ANY_RESOURCE, ResourceRef, Scope
from jitgate.timefmt import format_duration

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
    reveal: bool = False  # requests may ask for secret values unmasked
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
        set_(self, "_namespace_names", frozenset(n for n in self.namespaces if not is_pattern(n)))
        set_(self, "_namespace_patterns", tuple(re.compile(fnmatch.translate(n)) for n in self.namespaces if is_pattern(n)))
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
        if scope.reveal and not self.reveal:
            return "revealing secret values is not allowed"
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
            "reveal": self.reveal,
            "request_ttl": format_duration(self.request_ttl),
            "hold": {"max_wait": format_duration(self.hold.max_wait)} if self.hold else None,
        }


def is_pattern(name: str) -> bool:
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


