"""Guardrail decision time: the default pack plus N extra rules, per call shape.

The extra rules are what a large organisation writes: each names a verb, a resource and a team's
namespace (and some a body finding or a command), so the index spreads them over buckets. The curve
should stay flat: a call looks only at the rules its verb, resource and namespace can meet.

    .venv/bin/python -m scripts.bench.guardrails
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from jitgate.guardrails.decide import decide
from jitgate.guardrails.index import GuardrailIndex
from jitgate.guardrails.rules import Action, CallFacts, Guardrail, Pattern, ResourceMatch
from jitgate.policy.document import Node
from jitgate.policy.guardrails import parse_guardrails
from jitgate.policy.loader import _read_file
from scripts.bench.curves import Curve, best_seconds_per_call, spread

REPO = Path(__file__).resolve().parents[2]
EXTRA_COUNTS = (0, 10, 100, 1_000, 10_000)
VERBS = ("get", "list", "create", "update", "patch", "delete")
RESOURCES = ("pods", "configmaps", "services", "deployments", "jobs", "pods/exec")

POD = json.dumps({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}}).encode()
CALLS = {
    "get pods (no rule applies)": (CallFacts("demo", "get", resource="pods", namespace="team-3", name="web"), "", None),
    "create pod, body judged": (CallFacts("demo", "create", resource="pods", namespace="team-3"), "application/json", POD),
    "exec ls in prod": (CallFacts("demo", "create", resource="pods", subresource="exec", namespace="prod", name="api",
                                  command=("ls", "/")), "", None),
}


def default_pack() -> tuple[Guardrail, ...]:
    path = REPO / "policies/guardrails.yaml"
    return parse_guardrails(Node(_read_file(path), path, "").children("guardrails")).rules


def extra_rules(count: int, start: int, seed: int = 7) -> list[Guardrail]:
    rng = random.Random(seed)
    rules = []
    for i in range(count):
        resource = rng.choice(RESOURCES)
        name, _, sub = resource.partition("/")
        rules.append(Guardrail(
            name=f"extra-{i}", action=rng.choice((Action.DENY, Action.AUDIT, Action.REQUIRE_APPROVAL)),
            verbs=frozenset({rng.choice(VERBS)}), resources=(ResourceMatch(name, "apps" if name == "deployments" else "", sub),),
            namespaces=(Pattern(f"team-{rng.randrange(count * 2 + 10) + 100}"),),
            commands=(Pattern("re:shutdown"),) if sub == "exec" else (), order=start + i))
    return rules


def decision_curve(counts: tuple[int, ...] = EXTRA_COUNTS, calls: int = 20_000) -> Curve:
    curve = Curve("Guardrail decision vs extra rules (default pack + N)", "extra rules", "µs per call")
    base = default_pack()
    for count in counts:
        index = GuardrailIndex(list(base) + extra_rules(count, len(base)))
        for label, (facts, ct, body) in CALLS.items():
            seconds = best_seconds_per_call(lambda i=index, f=facts, c=ct, b=body: decide(i, f, c, b), calls)
            curve.add(label, count, seconds * 1e6)
    for label, points in curve.series.items():
        curve.notes.append(f"{label}: spread {spread([y for _, y in points]):.0%} from {counts[0]} to {counts[-1]:,} extra rules")
    return curve


if __name__ == "__main__":
    result = decision_curve()
    for label, points in result.series.items():
        print(f"{label:32} " + "  ".join(f"{x:>6,}: {y:6.2f} µs" for x, y in points))
    for note in result.notes:
        print(note)
