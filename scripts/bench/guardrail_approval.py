"""Require-approval cost: what a guardrail's one-shot approval adds to a call.

Calls no require-approval rule matches pay nothing new (the guardrail step only became a
coroutine). A matching call pays the operation digest (SHA-256 over cluster, method, target and
body: linear in the body) and one store transaction (use a permit, join, or file a request),
which runs on the store thread, not the event loop.

    .venv/bin/python -m scripts.bench.guardrail_approval
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from jitgate.access.model import Person
from jitgate.access.rules import AccessRule, Approval, ApprovalMode
from jitgate.access.scope import ANY_RESOURCE, Scope
from jitgate.guardrails.approval import operation_for
from jitgate.guardrails.rules import Action, CallFacts, Guardrail
from jitgate.store.sqlite import SQLiteStore
from scripts.bench.curves import Curve, best_seconds_per_call

BODY_SIZES = (0, 1_024, 65_536, 1_048_576)
RULE = Guardrail("prod-changes", Action.REQUIRE_APPROVAL)
FACTS = CallFacts("dev", "patch", "apps", "deployments", namespace="prod", name="web")
TARGET = "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=kubectl-patch"
RULES = (AccessRule(name="ops", requesters=("devs",), clusters=("dev",), namespaces=("prod",), cluster_wide=False,
                    resources=(ANY_RESOURCE,), verbs=("patch",), duration_default=3600, duration_max=3600,
                    request_ttl=3600, approval=Approval(ApprovalMode.REVIEWERS, ("sre",), 1)),)


def approval_curve(calls: int = 2_000) -> Curve:
    curve = Curve("Require-approval: digest and store transaction per matching call", "body bytes", "µs per call")
    for size in BODY_SIZES:
        body = b"x" * size
        n = max(50, calls // (1 + size // 65_536))
        curve.add("operation digest", size, best_seconds_per_call(
            lambda b=body: operation_for(RULE, FACTS, "PATCH", TARGET, b), n) * 1e6)
    with tempfile.TemporaryDirectory() as tmp, SQLiteStore(Path(tmp) / "bench.db") as store:
        alice, bob = Person("alice", ("devs",)), Person("bob", ("sre",))
        scope = Scope("dev", ("prod",), False, ("deployments.apps",), ("patch",))
        op = operation_for(RULE, FACTS, "PATCH", TARGET, b"{}")
        store.operation_request(RULES, alice, scope, op, now=time.time())
        joined = best_seconds_per_call(lambda: store.operation_request(RULES, alice, scope, op, now=time.time()), 200, 3)
        curve.add("store: retry joins the pending request", 2, joined * 1e6)

        def approve_then_use() -> float:
            _, request = store.operation_request(RULES, alice, scope, op, now=time.time())
            store.review(RULES, request.id, bob, "approve", "", now=time.time())
            started = time.perf_counter()
            store.operation_request(RULES, alice, scope, op, now=time.time())
            return time.perf_counter() - started

        curve.add("store: the approved call uses its permit", 2, min(approve_then_use() for _ in range(50)) * 1e6)
    curve.notes.append("store transactions run on the access service's store thread (synchronous=FULL commits)")
    return curve


async def _guard_cost(calls: int = 200_000) -> tuple[float, float]:
    """The coroutine a non-matching call now awaits, against the plain function it was."""
    def plain() -> None:
        return None

    async def coroutine() -> None:
        return None

    started = time.perf_counter()
    for _ in range(calls):
        plain()
    sync = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for _ in range(calls):
        await coroutine()
    return sync, (time.perf_counter() - started) / calls


if __name__ == "__main__":
    result = approval_curve()
    for label, points in result.series.items():
        print(f"{label:42} " + "  ".join(f"{x:>9,}: {y:9.2f} µs" for x, y in points))
    sync, coro = asyncio.run(_guard_cost())
    print(f"non-matching call: hook as coroutine {coro * 1e6:.3f} µs vs plain {sync * 1e6:.3f} µs")
