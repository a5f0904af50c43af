"""The `access_rules:` section of a policy, parsed with file:line errors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from jitgate.access.rules import AccessRule, Approval, ApprovalMode, Hold, is_pattern
from jitgate.access.scope import (
    DNS_LABEL,
    MAX_GRANT_DURATION,
    NAMESPACE_PATTERN,
    RULE_NAME,
    VERB_ORDER,
    VERBS,
    ResourceRef,
    expand_verbs,
)
from jitgate.timefmt import format_duration, parse_duration

if TYPE_CHECKING:  # jitgate.policy imports this module to parse its `access_rules` section
    from jitgate.policy.clusters import Cluster
    from jitgate.policy.document import Node, PolicyError



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
    if not RULE_NAME.fullmatch(name):
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
        if not (DNS_LABEL.fullmatch(ns) if not is_pattern(ns) else NAMESPACE_PATTERN.fullmatch(ns)):
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
        if verb != "*" and verb not in VERB_ORDER:
            raise _item_error(node, "verbs", i, f"unknown verb {verb!r} (known: {', '.join(VERBS)}, or * for all)")
    verbs = expand_verbs(verb_texts)

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
    from jitgate.policy.document import PolicyError

    seq = node.data.get(key)
    lc = getattr(seq, "lc", None)
    line = lc.item(index)[0] + 1 if isinstance(seq, list) and lc is not None else node.line(key)
    return PolicyError(node.file, line, f"{node.field(key)}[{index}]", message)


