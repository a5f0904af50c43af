"""The `guardrails:` section: rules that deny, ask for a reviewer, or only audit dangerous calls.

Mistakes stop the start with file:line (unknown fields, bad patterns, unknown actions or body
findings). An unknown verb or resource is only a warning with a suggestion, since a rule that
names a custom resource or a future verb is legitimate; `jitgate policy check` prints it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from jitgate.access.scope import CORE_RESOURCES, KNOWN_GROUPS, RULE_NAME, VERBS
from jitgate.guardrails.index import GuardrailIndex
from jitgate.guardrails.rules import FINDINGS, Action, Guardrail, Pattern, ResourceMatch
from jitgate.policy.document import Node
from jitgate.policy.schema import Bool, Duration, Field, Int, Section, Str, Strings, Values

# Verbs a rule may name beyond the API verbs (kube's `proxy` path verb is refused upstream anyway).
KNOWN_VERBS = (*VERBS, "*")
KNOWN_RESOURCES = frozenset(CORE_RESOURCES) | {
    "pods/exec", "pods/attach", "pods/portforward", "pods/proxy", "pods/log", "pods/ephemeralcontainers",
    "pods/eviction", "pods/status", "pods/binding", "nodes/proxy", "services/proxy", "serviceaccounts/token",
    "namespaces/finalize", "namespaces/status",
}


def _rule_name(name: str) -> str:
    if not RULE_NAME.fullmatch(name):
        raise ValueError(f"invalid guardrail name {name!r}: use lower-case letters, digits, '-', '.' and '_'")
    return name


GUARDRAIL_HOLD = Section("guardrail_hold", "Hold a require-approval call open while reviewers decide, instead of "
                         "refusing it at once.", (
    Field("max_wait", Duration(), "How long the call waits for the approval; then it is refused with the request id "
          "(the approval still lets the retried call through once).", required=True),
))

GUARDRAIL = Section(
    "guardrail",
    "A rule that nobody passes without a second look, whatever their grant. It matches when every condition it "
    "names holds (an absent condition matches anything); each condition lists alternatives. Patterns are globs "
    "(`team-*`) or regular expressions written `re:<expression>` (searched).",
    (
        Field("name", Str(), "Unique name; shown in refusals and audit events (`jitgate.dev/guardrail`).",
              required=True, check=_rule_name),
        Field("description", Str(empty=True), "What the rule protects against.", default=""),
        Field("action", Str(choices=tuple(a.value for a in Action), noun="action"),
              "`deny`: refused (403); `require-approval`: the call becomes an access request for that one "
              "operation (bound to a digest of method, target and body), reviewed by the reviewers of the access rule "
              "the call runs under; once approved, the same call passes exactly once (the caller retries it); "
              "`audit`: let through and marked. Deny wins, then require-approval.", required=True),
        Field("message", Str(), "Why, as the caller reads it in the refusal."),
        Field("approvals", Int(minimum=1), "`require-approval` only: distinct reviewers who must approve the operation "
              "(default: the access rule's `required`, at least 1; an immediate or automatic rule still needs a person)."),
        Field("hold", GUARDRAIL_HOLD, "`require-approval` only: hold the call while reviewers decide; without it the "
              "call is refused at once with the request id to approve and retry."),
        Field("dry_run", Bool(), "Only record what the rule would have done (`jitgate.dev/guardrail-dry-run`).",
              default=False),
        Field("clusters", Strings(each=Pattern), "Cluster names or patterns."),
        Field("namespaces", Strings(each=Pattern), "Namespace names or patterns (`\"\"` never matches: cluster-scoped "
              "calls have no namespace)."),
        Field("resources", Strings(each=ResourceMatch.parse), "`resource[.group][/subresource]`; `*` for any part, "
              "e.g. `pods/*`, `*.apps`; `pods` alone is not its subresources."),
        Field("verbs", Strings(), "Kubernetes verbs; exec and attach are `create` on `pods/exec`, `pods/attach`."),
        Field("names", Strings(each=Pattern), "Object names or patterns (a create's name is read from its body)."),
        Field("users", Strings(each=Pattern), "Usernames or patterns of the caller."),
        Field("groups", Strings(each=Pattern), "Groups or patterns; any of the caller's groups."),
        Field("access_rules", Strings(each=Pattern), "The access rule of the grant the call runs under."),
        Field("argv", Strings(each=Pattern), "Exec/attach command, element by element from the program "
              "(e.g. `[\"re:(^|/)(ba)?sh$\", \"-c\"]`); longer commands match too."),
        Field("commands", Strings(each=Pattern), "Patterns on the command line joined with spaces, on the script "
              "of `sh -c`, and on each line typed into an interactive session."),
        Field("body", Strings(choices=tuple(FINDINGS), noun="body finding"),
              "What a create/update/patch would produce: " + "; ".join(f"`{k}`: {v}" for k, v in FINDINGS.items())
              + ". Patches are judged on the values they set; a body the gateway cannot read matches."),
    ),
)


def parse_guardrails(nodes: Iterable[Node]) -> GuardrailIndex:
    rules: list[Guardrail] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for node in nodes:
        v = GUARDRAIL.read_node(node)
        where = f"{node.file}:{node.line()}"
        if v["name"] in seen:
            raise node.error("name", f"guardrail {v['name']!r} is already defined at {seen[v['name']]}")
        seen[v["name"]] = where
        rules.append(_rule(v, len(rules), where, warnings))
    return GuardrailIndex(rules, warnings)


def _rule(v: Values, order: int, where: str, warnings: list[str]) -> Guardrail:
    node = v.node
    action = Action(v["action"])
    verbs = v["verbs"] or ()
    for i, verb in enumerate(verbs):
        if verb not in KNOWN_VERBS:
            hint = _suggest(verb, KNOWN_VERBS)
            if verb in ("exec", "attach", "portforward"):
                hint = f"; exec is verb create on resource pods/{verb}"
            warnings.append(f"{node.file}:{node._item_line('verbs', i)}: {node.field('verbs')}[{i}]: unknown verb "
                            f"{verb!r}, the rule never matches it{hint}")
    for i, ref in enumerate(v["resources"] or ()):
        if ref.resource == "*" or ref.group:
            continue
        name = f"{ref.resource}/{ref.subresource}" if ref.subresource and ref.subresource != "*" else ref.resource
        if name in KNOWN_RESOURCES or ref.resource in KNOWN_RESOURCES and ref.subresource in ("", "*"):
            continue
        if ref.resource in KNOWN_GROUPS:
            hint = f"; {ref.resource} is in API group {KNOWN_GROUPS[ref.resource]}: write {ref.resource}.{KNOWN_GROUPS[ref.resource]}"
        else:
            hint = _suggest(name, sorted(KNOWN_RESOURCES) + [f"{r}.{g}" for r, g in KNOWN_GROUPS.items()])
        warnings.append(f"{node.file}:{node._item_line('resources', i)}: {node.field('resources')}[{i}]: unknown resource "
                        f"{str(ref)!r} in the core API group{hint}")
    body = frozenset(v["body"] or ())
    for field in ("approvals", "hold"):
        if v[field] is not None and action is not Action.REQUIRE_APPROVAL:
            raise node.error(field, f"only a require-approval rule has {field!r}")
    return Guardrail(
        name=v["name"], action=action, message=v["message"] or "", dry_run=v["dry_run"],
        clusters=v["clusters"] or (), namespaces=v["namespaces"] or (), resources=v["resources"] or (),
        verbs=frozenset(verbs), names=v["names"] or (), users=v["users"] or (), groups=v["groups"] or (),
        access_rules=v["access_rules"] or (), argv=v["argv"] or (), commands=v["commands"] or (), body=body,
        approvals=v["approvals"], hold_seconds=v["hold"]["max_wait"] if v["hold"] is not None else None,
        source=where, order=order,
    )


def _suggest(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
