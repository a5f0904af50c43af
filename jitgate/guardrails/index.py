"""Guardrails indexed by what they match on, so a decision looks at the few rules that can apply.

Each rule goes into one bucket per (verb, resource, namespace) it names, with `*` for a condition it
leaves open or gives as a pattern; a call looks up the 8 buckets its own (verb, resource,
namespace) and the wildcards could fall in, then checks only those rules. With thousands of rules
spread over verbs, resources and namespaces, the cost stays that of the few candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from jitgate.guardrails.rules import Guardrail

ANY = "*"
_EMPTY: tuple[Guardrail, ...] = ()


def _literal_namespaces(rule: Guardrail) -> list[str]:
    if not rule.namespaces or any(p.literal is None for p in rule.namespaces):
        return [ANY]
    return [p.literal for p in rule.namespaces]


def _resources(rule: Guardrail) -> list[str]:
    """Bucket keys: `pods` (no subresource), `pods/exec`, `pods/*` (any or none), or `*`."""
    if not rule.resources or any(r.resource == ANY for r in rule.resources):
        return [ANY]
    return list(dict.fromkeys(f"{r.resource}/{r.subresource}" if r.subresource else r.resource for r in rule.resources))


class GuardrailIndex:
    def __init__(self, rules: Sequence[Guardrail] = (), warnings: Sequence[str] = ()) -> None:
        self.rules = tuple(rules)
        self.warnings = tuple(warnings)  # unknown verbs and resources, with suggestions
        buckets: dict[tuple[str, str, str], list[Guardrail]] = {}
        for rule in self.rules:
            for verb in (sorted(rule.verbs) or [ANY]):
                for resource in _resources(rule):
                    for namespace in _literal_namespaces(rule):
                        bucket = buckets.setdefault((verb, resource, namespace), [])
                        if not bucket or bucket[-1] is not rule:
                            bucket.append(rule)
        self.buckets = {k: tuple(v) for k, v in buckets.items()}
        # The keys in use per dimension: a call forms only the bucket keys that exist.
        self.verb_keys = frozenset(k[0] for k in buckets)
        self.resource_keys = frozenset(k[1] for k in buckets)
        self.namespace_keys = frozenset(k[2] for k in buckets)
        # Interactive input is checked against the command rules only.
        self.command_rules = tuple(r for r in self.rules if r.matches_commands)

    def candidates(self, verb: str, resource: str, namespace: str, subresource: str = "") -> list[Guardrail]:
        keys = self.resource_keys
        path = f"{resource}/{subresource}" if subresource else resource
        resources = [k for k in (path, f"{resource}/*", ANY) if k in keys]
        if not resources:
            return []
        verbs = [k for k in (verb, ANY) if k in self.verb_keys]
        namespaces = [k for k in (namespace, ANY) if k in self.namespace_keys]
        get = self.buckets.get
        found: list[Guardrail] = []
        for v in verbs:
            for r in resources:
                for n in namespaces:
                    bucket = get((v, r, n))
                    if bucket:
                        found.extend(bucket)
        if len(found) > 1:  # a rule may sit in several of the buckets; keep policy order
            found = sorted({r.order: r for r in found}.values(), key=_order)
        return found

    def __len__(self) -> int:
        return len(self.rules)


def _order(rule: Guardrail) -> int:
    return rule.order
