"""One-shot approval of a single operation: the digest that binds an approval to one call.

A guardrail's `require-approval` turns a call into an access request for that operation only;
its approval permits the call whose digest matches, once. The digest covers the cluster, the
method, the raw request target (path and query, as the client sent it) and the body, each
length-prefixed so no two different calls share an encoding: a changed body, a different
object or an added `?dryRun` is a different operation and needs its own approval.
"""

from __future__ import annotations

import hashlib

from jitgate.access.model import Operation
from jitgate.guardrails.rules import CallFacts, Guardrail


def operation_digest(cluster: str, method: str, target: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (cluster.encode(), method.upper().encode(), target.encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def summary(facts: CallFacts, target: str) -> str:
    """What a reviewer reads: `delete deployments.apps/web in namespace prod on cluster dev`."""
    what = facts.resource + (f".{facts.api_group}" if facts.api_group else "")
    if facts.subresource:
        what += f"/{facts.subresource}"
    if facts.name:
        what += f" {facts.name}"
    where = f" in namespace {facts.namespace}" if facts.namespace else ""
    command = f" -- {' '.join(facts.command)}" if facts.command else ""
    text = f"{facts.verb} {what}{where}{command} on cluster {facts.cluster}" if facts.resource else f"{facts.verb} {target}"
    return text[:500]


def operation_for(rule: Guardrail, facts: CallFacts, method: str, target: str, body: bytes) -> Operation:
    return Operation(operation_digest(facts.cluster, method, target, body), method.upper(), target[:2000],
                     summary(facts, target), rule.name, rule.approvals)
