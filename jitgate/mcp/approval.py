"""Require-approval on the MCP front: a held call becomes an operation-bound access request.

The same machinery as a guardrail's require-approval on the Kubernetes side (jitgate.access,
jitgate.store): the call is filed as an access request for that one operation, reviewed with
`jitgate approve` / `jitgate deny` (or the access API) by the reviewers of an access rule of the
Kubernetes policy, and its approval creates a one-use permit; using it is one store transaction,
so of two identical calls exactly one runs. The front and the Kubernetes gateway share the SQLite
store, so an approval made through either process releases a call held by the other.

What binds an approval to one call (`call_digest`): the server, the method, the target (tool name,
resource URI or prompt name) and the canonical JSON of the arguments (keys sorted, no spaces),
each length-prefixed (jitgate.guardrails.approval.operation_digest), with the permit held by the
caller's username and expiring (an hour after the approval). Other arguments, another tool or
server, another caller: another digest, another request. `_meta` (progress tokens...) is not part
of it, so a retry of the same call joins the same request.

The request's scope names the MCP operation in the access vocabulary (cluster `mcp:<server>`, which
no Kubernetes cluster can be named, cluster-wide, resource `tools.mcp.jitgate.dev` verb `create`,
or `resources.mcp.jitgate.dev` / `prompts.mcp.jitgate.dev` verb `get`): the access rule must cover it
(clusters `*`), and may list those resources only, so a grant under it reaches no cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jitgate.access.errors import AccessError, StoreError
from jitgate.access.model import AccessRequest, Operation, Person, RequestState
from jitgate.access.rules import AccessRule, rule_named
from jitgate.access.scope import Scope
from jitgate.access.service import AccessService, ended_request_message
from jitgate.guardrails.approval import operation_digest
from jitgate.masking.detectors import DetectorSet
from jitgate.mcp.audit import masked_arguments
from jitgate.mcp.rules import METHOD_OF_KIND, Kind, Rule

log = logging.getLogger("jitgate.mcp.approval")

RESOURCE_OF_KIND = {Kind.TOOL: "tools.mcp.jitgate.dev", Kind.RESOURCE: "resources.mcp.jitgate.dev",
                    Kind.PROMPT: "prompts.mcp.jitgate.dev"}
VERB_OF_KIND = {Kind.TOOL: "create", Kind.RESOURCE: "get", Kind.PROMPT: "get"}


def canonical_arguments(arguments: Any) -> bytes:
    return json.dumps(arguments if arguments is not None else {}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogatepass")


def call_digest(server: str, kind: Kind, target: str, arguments: Any) -> str:
    return operation_digest(f"mcp:{server}", METHOD_OF_KIND[kind], target, canonical_arguments(arguments))


def scope_for(server: str, kind: Kind) -> Scope:
    return Scope(f"mcp:{server}", (), True, (RESOURCE_OF_KIND[kind],), (VERB_OF_KIND[kind],))


def summary(server: str, kind: Kind, target: str, arguments: Any, detectors: DetectorSet) -> str:
    """What a reviewer reads (secret values in the arguments masked)."""
    what = {Kind.TOOL: "call tool", Kind.RESOURCE: "read resource", Kind.PROMPT: "get prompt"}[kind]
    text = f"{what} {target} on MCP server {server}"
    if kind is not Kind.RESOURCE:
        shown = json.dumps(masked_arguments(arguments or {}, detectors), sort_keys=True, ensure_ascii=False)
        text += f" with {shown}"
    return text[:500]


@dataclass(frozen=True)
class HeldCall:
    """One call a require-approval rule holds: everything the approval is bound to."""

    caller: Person
    server: str
    kind: Kind
    target: str
    rule: Rule
    operation: Operation
    scope: Scope

    @classmethod
    def of(cls, caller: Person, server: str, kind: Kind, target: str, arguments: Any, rule: Rule,
           detectors: DetectorSet) -> HeldCall:
        assert rule.approval is not None
        digest = call_digest(server, kind, target, arguments)
        operation = Operation(digest, METHOD_OF_KIND[kind], f"mcp://{server}/{target}"[:2000],
                              summary(server, kind, target, arguments, detectors), f"mcp:{rule.name}",
                              rule.approval.approvals)
        return cls(caller, server, kind, target, rule, operation, scope_for(server, kind))


@dataclass(frozen=True)
class Outcome:
    """How a hold ended: `request` approved and its permit used now (allowed), or refused with a JSON-RPC
    error (`code`, `message`)."""

    allowed: bool
    request: AccessRequest | None
    code: int = 0
    message: str = ""

    @property
    def request_id(self) -> str:
        return self.request.id if self.request is not None else ""


def check_rules(mcp_rules: Sequence[Rule], access_rules: Sequence[AccessRule]) -> list[str]:
    """What keeps the require-approval rules from holding calls (each problem names the rule's file:line)."""
    problems = []
    for rule in mcp_rules:
        if rule.approval is None:
            continue
        access = rule_named(access_rules, rule.approval.access_rule)
        where = f"{rule.source}: rule {rule.name!r}"
        if access is None:
            problems.append(f"{where}: approval.access_rule {rule.approval.access_rule!r} is not an access rule of "
                            "mcp_access_policy")
            continue
        if not access.approval.reviewers:
            problems.append(f"{where}: access rule {access.name!r} names no reviewers, so nobody could approve")
        why = access.why_not(scope_for("any", rule.kind))
        if why:
            problems.append(f"{where}: access rule {access.name!r} ({access.source}) does not cover held MCP "
                            f"{rule.kind.value}s ({why}); give it clusters [\"*\"], cluster_wide: true, resources "
                            f"[{RESOURCE_OF_KIND[rule.kind]}] and verbs [{VERB_OF_KIND[rule.kind]}]")
    return problems


class Approvals:
    """Held calls over the shared store: file or join the request, wait for its decision, use its permit.

    The store work runs on the access service's own thread (`AccessService.run`): the event loop never
    waits on SQLite, which another process (the Kubernetes gateway, the CLI) may be writing."""

    def __init__(self, service: AccessService, poll: float = 1.0) -> None:
        self.service = service
        self.poll = poll

    async def use_or_file(self, held: HeldCall) -> tuple[str, AccessRequest]:
        """("allowed", request) when an approved, unused permit of this caller for this call existed (used up
        now), ("pending", request) when the same call already waits (a retry joins it), else ("filed", new)."""
        store = self.service.store
        if store is None:
            raise StoreError("no grant store is configured")
        rules = self.service.rules
        kind, request = await self.service.run(
            lambda: store.operation_request(rules, held.caller, held.scope, held.operation, now=time.time(),
                                            rule_name=held.rule.approval.access_rule))
        if kind == "filed":
            self.service.notify("created", request)
        return kind, request

    async def hold(self, held: HeldCall, on_wait: Callable[[AccessRequest, float], Awaitable[bool]],
                   keepalive: float, on_filed: Callable[[AccessRequest, str], None] | None = None) -> Outcome:
        """Hold until decided or `rule.approval.hold` passes. `on_wait(request, waited)` runs every `keepalive`
        seconds (progress, keep-alive); it returns False when the caller is gone (then nothing is made).
        Raises StoreError (the caller refuses: fail closed)."""
        from jitgate.mcp import protocol

        try:
            kind, request = await self.use_or_file(held)
        except AccessError as e:
            if isinstance(e, StoreError):
                raise
            return Outcome(False, None, protocol.APPROVAL_REQUIRED,
                           f"jitgate: {held.operation.summary} needs a human's approval under rule "
                           f"'{held.rule.name}', and none can be asked for: {e}")
        if on_filed is not None:
            on_filed(request, kind)
        if kind == "allowed":
            return Outcome(True, request)
        started = time.monotonic()
        max_wait = held.rule.approval.hold
        deadline = started + max(0.0, min(max_wait, request.expires_at - time.time()))
        next_beat = started + keepalive if keepalive > 0 else float("inf")
        log.info("holding %s for %s until access request %s is decided", held.operation.summary,
                 held.caller.username, request.id)
        while request.state is RequestState.PENDING and time.monotonic() < deadline:
            now = time.monotonic()
            await asyncio.sleep(max(0.0, min(self.poll, deadline - now, next_beat - now)))
            if time.monotonic() >= next_beat:
                next_beat += keepalive
                if not await on_wait(request, time.monotonic() - started):
                    return Outcome(False, request, protocol.APPROVAL_REQUIRED, "the caller went away")
            request = await self.service.run(self.service.store.get_request, request.id)
        if request.state is RequestState.APPROVED:
            if not await on_wait(request, time.monotonic() - started):
                return Outcome(False, request, protocol.APPROVAL_REQUIRED, "the caller went away")
            kind, used = await self.use_or_file(held)
            if kind == "allowed":
                return Outcome(True, used)
            return Outcome(False, used, protocol.APPROVAL_REQUIRED,
                           f"jitgate: access request {request.id} was approved, but its one use went to an identical "
                           f"call that ran first (an approval runs a call exactly once); this call was not made and "
                           f"is access request {used.id} now: a reviewer runs `jitgate approve {used.id}`")
        if request.state is RequestState.PENDING:
            return Outcome(False, request, protocol.APPROVAL_REQUIRED,
                           f"jitgate: access request {request.id} for {held.operation.summary} is still pending after "
                           f"{max_wait}s, so the call was not made. A reviewer runs `jitgate approve {request.id}` "
                           f"(see it with `jitgate show {request.id}`); retry the same call after approval: it joins "
                           "this request and runs once (other arguments need their own approval)")
        return Outcome(False, request, protocol.POLICY_DENIED,
                       ended_request_message(request).replace("this call is refused", "the call was not made"))
