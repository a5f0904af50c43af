"""What refusals say: the exact `jitgate request` command that would cover a call."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from typing import Any

from jitgate.access.authorize import suggested_scopes
from jitgate.access.errors import AccessError, InvalidRequest
from jitgate.access.model import AccessRequest, Decision
from jitgate.access.rules import AccessRule, ApprovalMode, choose_rule, rule_named
from jitgate.access.scope import ResourceRef, Scope
from jitgate.kube.request_info import RequestInfo
from jitgate.timefmt import format_duration


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


def how_to_request(rules: Sequence[AccessRule], groups: Iterable[str], cluster: str, info: RequestInfo,
                   pending: AccessRequest | None = None) -> str:
    """The refusal message for a call no grant covers: what was refused and either the caller's
    pending request that covers it (`pending`) or the exact command to ask for the whole operation,
    or why the caller cannot ask. kubectl prints it verbatim."""
    if not info.is_resource_request:
        return f"jitgate: {info.path} is not available through the gateway"
    groups = tuple(groups)
    what = _describe_call(cluster, info)
    if pending is not None:
        return f"jitgate: no active grant lets you {what} yet: your access request {pending.id} covers it and " \
               f"{waiting_for(pending, rule_named(rules, pending.rule))}; see `jitgate show {pending.id}`"
    try:
        scopes = suggested_scopes(cluster, info)
    except InvalidRequest as e:
        return f"jitgate: no active grant lets you {what}; {e.message}"
    for scope in scopes:
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


def waiting_for(request: AccessRequest, rule: AccessRule | None) -> str:
    """What a pending request waits for, in words: "waits for 1 more approval from oidc:sre"."""
    if rule is not None and rule.approval.mode is ApprovalMode.AUTO and request.auto_approve_at is not None:
        return "is approved automatically soon unless a reviewer denies it"
    needed = approvals_required(rule)
    if needed is None:
        return "waits for a decision"
    more = max(needed - len(request.approvers), 1)
    reviewers = f" from {', '.join(rule.approval.reviewers)}" if rule is not None and rule.approval.reviewers else ""
    return f"waits for {more} more approval{'s' if more > 1 else ''}{reviewers}"


def _describe_call(cluster: str, info: RequestInfo) -> str:
    resource = str(ResourceRef(info.resource, info.api_group, info.subresource))
    where = f"in namespace {info.namespace}" if info.namespace else "cluster-wide"
    return f"{info.verb or 'use'} {resource} {where} on cluster {cluster}"


def approvals_required(rule: AccessRule | None) -> int | None:
    """Distinct approvals that approve a request under `rule`; None when approvals never do
    (mode auto without `required`, mode immediate) or the rule is gone."""
    if rule is None or rule.approval.mode is ApprovalMode.IMMEDIATE:
        return None
    return rule.approval.required


def notification_view(request: AccessRequest, rules: Sequence[AccessRule], state: str | None = None) -> dict[str, Any]:
    """The flat request mapping `jitgate.notify.make_event` takes. For an approved request,
    `expires_at` is when its grant ends; `state` overrides the request's (e.g. "revoked")."""
    scope = request.scope
    expires_at = request.grant.ends_at if request.grant is not None else request.expires_at
    return {
        "id": request.id,
        "requester": request.requester,
        "rule": request.rule,
        "cluster": scope.cluster,
        "namespaces": list(scope.namespaces),
        "cluster_wide": scope.cluster_wide,
        "resources": [str(r) for r in scope.resources],
        "verbs": list(scope.verbs),
        "duration_seconds": request.duration,
        "reason": request.reason or None,
        "state": state or str(request.state),
        "approvals": [
            {"reviewer": r.reviewer, "time": r.at, "reason": r.reason or None} for r in request.reviews if r.decision is Decision.APPROVE
        ],
        "required": approvals_required(rule_named(rules, request.rule)),
        "created_at": request.created_at,
        "expires_at": expires_at,
    }
