"""What refusals say: the exact `jitgate request` command that would cover a call."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from jitgate.access.authorize import scope_for_call
from jitgate.access.errors import AccessError, InvalidRequest
from jitgate.access.rules import AccessRule, ApprovalMode, choose_rule
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
