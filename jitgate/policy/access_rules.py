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
    SENSITIVE_RESOURCES,
    SENSITIVE_SUBRESOURCES,
    VERBS,
    ResourceRef,
    expand_verbs,
)
from jitgate.policy.schema import Bool, Duration, Field, Int, OneOf, Section, Str, Strings, Values, dataclass_default
from jitgate.timefmt import format_duration

if TYPE_CHECKING:
    from jitgate.policy.clusters import Cluster
    from jitgate.policy.document import Node


# ---------------------------------------------------------------------------------------------
# The `access_rules:` section


def _rule_name(name: str) -> str:
    if not RULE_NAME.fullmatch(name):
        raise ValueError(f"invalid rule name {name!r}: use lower-case letters, digits, '-', '.' and '_'")
    return name


def _namespace(ns: str) -> str:
    if not (DNS_LABEL.fullmatch(ns) if not is_pattern(ns) else NAMESPACE_PATTERN.fullmatch(ns)):
        raise ValueError(f"invalid namespace {ns!r}: a DNS label, or a glob pattern like team-*")
    return ns


_NEVER_IN_ANY = ", ".join(f"`{r}`" for r in sorted(SENSITIVE_RESOURCES)) + ", " + ", ".join(
    f"`{r}/{s}`" for r, s in sorted(SENSITIVE_SUBRESOURCES))

DURATION = Section("grant_duration", "Grant lengths: the default and the longest a request may ask for.", (
    Field("default", Duration(), "Length of a grant whose request names none.", shown_default="`max`"),
    Field("max", Duration(), f"Longest grant (at most {format_duration(MAX_GRANT_DURATION)}).", required=True),
))

APPROVAL = Section("approval", "Who decides a request, and how.", (
    Field("mode", Str(choices=tuple(m.value for m in ApprovalMode), noun="approval mode"),
          "`reviewers`: `required` distinct reviewers approve; `auto`: approved after `auto_approve_after` unless a "
          "reviewer denies first; `immediate`: approved at once (never for secrets or exec-like access).", required=True),
    Field("reviewers", Strings(), "Groups whose members may approve, deny and revoke (never their own request); "
          "any reviewer's deny wins.", default=()),
    Field("required", Int(minimum=1), "Distinct approvals that approve (modes reviewers and auto; in mode auto, "
          "approvals may release a request before the delay ends).", shown_default="`1` in mode reviewers"),
    Field("auto_approve_after", Duration(), "Mode auto: approved after this delay unless denied first; shorter "
          "than `request_ttl`."),
))

HOLD = Section("hold", "Hold the call of an unattended caller (an agent) without a grant while a human decides.", (
    Field("max_wait", Duration(), "How long a held call waits for the decision; at most `request_ttl`.", required=True),
))

ACCESS_RULE = Section(
    "access_rule",
    "Who may ask for what, for how long, and who decides. Nobody has standing access: every call needs an "
    "active grant, and grants come only from requests a rule allows.",
    (
        Field("name", Str(), "Unique name (lower-case letters, digits, `-`, `.`, `_`); shown in requests and refusals.",
              required=True, check=_rule_name),
        Field("description", Str(empty=True), "What the rule is for, shown to people who may request it.",
              default=dataclass_default(AccessRule, "description")),
        Field("requesters", Strings(), "Groups whose members may ask; anyone else gets nothing.", required=True),
        Field("clusters", Strings(), "Cluster names, or `*` for every cluster.", required=True),
        Field("namespaces", Strings(each=_namespace), "Namespaces a request may name: names, or glob patterns "
              "like `team-*` (`*` for any).", default=()),
        Field("cluster_wide", Bool(), "May requests cover all namespaces and cluster-scoped resources?", default=False),
        Field("resources", Strings(each=ResourceRef.parse), "`resource[.group][/subresource]`, or `*` for any "
              f"resource except {_NEVER_IN_ANY}, which must be named.", required=True),
        Field("verbs", Strings(choices=(*VERBS, "*"), noun="verb"), "Kubernetes verbs, or `*` for all; exec is "
              "`create` on `pods/exec`.", required=True),
        Field("duration", OneOf((Duration(), DURATION)), "Grant length: one duration (default and maximum), or "
              "`{default, max}`. The clock starts at approval; a grant never outlives `max`.", required=True),
        Field("upstream_role", Str(), "A role named in the clusters' eks `roles:`; default: the cluster's `role_arn`."),
        Field("require_reason", Bool(), "Requests must say why.", default=dataclass_default(AccessRule, "require_reason")),
        Field("request_ttl", Duration(), "Undecided requests expire after this.",
              default=dataclass_default(AccessRule, "request_ttl")),
        Field("approval", APPROVAL, "Who decides.", required=True),
        Field("hold", HOLD, "Hold an unattended caller's call while a human decides."),
        Field("reveal", Bool(), "Requests may ask for `reveal: true`: responses to the grant's calls carry secret "
              "values unmasked (Secrets' data, detected values; audited `jitgate.dev/revealed`). Needs `secrets` in "
              "`resources` and an approval mode other than immediate; give it its own rule to require more reviewers.",
              default=dataclass_default(AccessRule, "reveal")),
    ),
)


def parse_access_rules(nodes: Iterable[Node], clusters: Mapping[str, Cluster]) -> tuple[AccessRule, ...]:
    """Rules from the `access_rules` list items, in policy order; raises `PolicyError`."""
    rules: list[AccessRule] = []
    seen: dict[str, str] = {}
    for node in nodes:
        rule = _parse_rule(ACCESS_RULE.read_node(node), clusters)
        if rule.name in seen:
            raise node.error("name", f"access rule {rule.name!r} is already defined at {seen[rule.name]}")
        seen[rule.name] = rule.source
        rules.append(rule)
    return tuple(rules)


def _parse_rule(v: Values, clusters: Mapping[str, Cluster]) -> AccessRule:
    node = v.node
    rule_clusters = v["clusters"]
    for i, cluster in enumerate(rule_clusters):
        if cluster == "*":
            if len(rule_clusters) > 1:
                raise node.item_error("clusters", i, "'*' already means every cluster; list nothing else")
        elif cluster not in clusters:
            known = ", ".join(clusters) or "none"
            raise node.item_error("clusters", i, f"unknown cluster {cluster!r} (defined: {known})")
    if not v["namespaces"] and not v["cluster_wide"]:
        raise node.error(None, "an access rule needs 'namespaces', or 'cluster_wide: true', or both")

    duration_default, duration_max = _durations(v)
    upstream_role = v["upstream_role"]
    if upstream_role is not None:
        named = clusters.keys() if "*" in rule_clusters else rule_clusters
        for cluster_name in named:
            roles = getattr(clusters[cluster_name], "upstream_roles", {})
            if upstream_role not in roles:
                known = ", ".join(sorted(roles)) or "none: upstream roles need an eks credential with `roles:`"
                raise node.error("upstream_role", f"cluster {cluster_name!r} has no upstream role {upstream_role!r} (known: {known})")
    request_ttl = v["request_ttl"]
    approval = _approval(v["approval"], v["resources"], request_ttl)

    if v["reveal"]:
        if ResourceRef("secrets") not in v["resources"]:
            raise node.error("reveal", "reveal is for secret values: name secrets in resources")
        if approval.mode is ApprovalMode.IMMEDIATE:
            raise node.error("reveal", "revealing secret values needs a decision: use approval mode reviewers or auto")

    hold = None
    if v["hold"] is not None:
        h = v["hold"]
        max_wait = h["max_wait"]
        if max_wait > request_ttl:
            raise h.error("max_wait", f"{format_duration(max_wait)} is longer than the request_ttl {format_duration(request_ttl)}")
        a = approval
        if a.mode is ApprovalMode.AUTO and a.required is None and a.auto_approve_after > max_wait:
            raise h.error(
                "max_wait",
                f"a held call waits at most {format_duration(max_wait)} but this rule auto-approves only after "
                f"{format_duration(a.auto_approve_after)}, so a held call could never be let through",
            )
        hold = Hold(max_wait)

    return AccessRule(
        name=v["name"],
        requesters=v["requesters"],
        clusters=rule_clusters,
        namespaces=v["namespaces"],
        cluster_wide=v["cluster_wide"],
        resources=v["resources"],
        verbs=expand_verbs(v["verbs"]),
        duration_default=duration_default,
        duration_max=duration_max,
        approval=approval,
        request_ttl=request_ttl,
        require_reason=v["require_reason"],
        upstream_role=upstream_role,
        hold=hold,
        reveal=v["reveal"],
        description=v["description"],
        source=f"{node.file}:{node.line()}",
    )


def _durations(v: Values) -> tuple[int, int]:
    """`duration: 1h` (default and maximum) or `duration: {default: 1h, max: 4h}`."""
    duration = v["duration"]
    if isinstance(duration, int):
        default = maximum = duration
        where, key = v, "duration"
    else:
        where, key = duration, "max"
        maximum = duration["max"]
        default = duration["default"] or maximum
        if default > maximum:
            raise where.error("default", f"the default {format_duration(default)} is longer than the max {format_duration(maximum)}")
    if maximum > MAX_GRANT_DURATION:
        longest = format_duration(MAX_GRANT_DURATION)
        raise where.error(key, f"{format_duration(maximum)} is longer than {longest}: grants are just-in-time, not standing access")
    return default, maximum


def _approval(a: Values, resources: Sequence[ResourceRef], request_ttl: int) -> Approval:
    mode = ApprovalMode(a["mode"])
    reviewers, required, auto_after = a["reviewers"], a["required"], a["auto_approve_after"]
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
    return Approval(mode, reviewers, required, auto_after)
