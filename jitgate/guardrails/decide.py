"""One call's guardrail outcome: the matching rules, and the one that decides.

Deny wins, then require-approval, then audit; among equals the first in the policy. Rules in
dry-run are matched and reported, never enforced. The body is read only when a candidate rule
needs it (a body rule, or a name rule on a create, whose name is in the body).
"""

from __future__ import annotations

from collections.abc import Callable

from jitgate.guardrails.bodies import (
    UnreadableBody,
    findings,
    object_name,
    produced_object,
)
from jitgate.guardrails.index import GuardrailIndex
from jitgate.guardrails.rules import (
    NO_OUTCOME,
    PRECEDENCE,
    Action,
    CallFacts,
    Match,
    Outcome,
)

BODY_VERBS = frozenset({"create", "update", "patch"})


def decide(index: GuardrailIndex, facts: CallFacts, content_type: str = "",
           body: bytes | Callable[[], bytes] | None = None) -> Outcome:
    candidates = index.candidates(facts.verb, facts.resource, facts.namespace, facts.subresource)
    if not candidates:
        return NO_OUTCOME
    has_body = facts.verb in BODY_VERBS
    read = False
    found: frozenset[str] | None = frozenset()
    name = facts.name
    unreadable = ""
    matches: list[Match] = []
    for rule in candidates:
        if rule.body and not has_body:
            continue  # a body rule judges what a write would produce; other verbs produce nothing
        needs = has_body and (rule.body or (rule.names and not facts.name))
        if needs and not read:
            read = True
            raw = body() if callable(body) else body
            try:
                obj = produced_object(content_type, raw or b"")
                found = findings(facts.api_group, facts.resource, facts.subresource, obj)
                name = facts.name or object_name(obj)
            except UnreadableBody as e:
                found, unreadable = None, str(e)
        if rule.names and needs and found is None:
            matched = True  # the name is in a body the gateway cannot read
        else:
            matched = rule.matches_call(facts, found if rule.body else frozenset(), name)
        if matched:
            matches.append(Match(rule, not rule.dry_run))
    effective = [m for m in matches if m.effective]
    if not effective:
        return Outcome(None, None, tuple(matches), unreadable) if matches else NO_OUTCOME
    winner = min(effective, key=lambda m: (PRECEDENCE[m.rule.action], m.rule.order)).rule
    return Outcome(winner.action, winner, tuple(matches), unreadable)


def line_rule(index: GuardrailIndex, facts: CallFacts, line: str):
    """The first deny rule (or dry-run matches) for a line typed into an interactive session:
    (deny rule or None, all matching rules). Only rules whose call conditions fit the session apply."""
    hits = []
    for rule in index.command_rules:
        if rule.body:
            continue
        if rule.matches_call(facts, frozenset(), facts.name, commands=False) and rule.matches_line(line):
            hits.append(rule)
    deny = next((r for r in hits if r.action is Action.DENY and not r.dry_run), None)
    return deny, hits
