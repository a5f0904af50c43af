"""Guardrails: dangerous operations are stopped before they reach the cluster, whatever the grant.

Runs after the grant check (rules may name the access rule the call runs under) and judges the API
operation itself: verb, resource, namespace, name, caller, exec command, and what a create, update
or patch would produce (privileged pods, hostPath, RBAC escalation...). `deny` refuses with 403
naming the rule; `require-approval` turns the call into an access request for that one operation
(bound to a digest of method, raw target and body, reviewed like any request under the access rule
the call runs under) and refuses it with the request id; once approved, the same call passes
exactly once (`jitgate.dev/guardrail-approval: <request id>`) and a changed body needs a new
approval; `audit` lets the call through marked; a rule in dry-run only records what it would have done. In an
interactive exec/attach over WebSocket the typed lines are checked against the command rules: a
line a deny rule matches is not delivered and the session ends (stderr message, Status on the
error channel). Audit annotations: `jitgate.dev/guardrail`, `jitgate.dev/guardrail-action`,
`jitgate.dev/guardrail-dry-run`, `jitgate.dev/guardrail-line` (masked by the masking detectors),
`jitgate.dev/guardrail-approval`.

    mitmdump -s addons/gateway.py --set policy=policies/
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref

from mitmproxy import ctx, http

from jitgate.access.errors import AccessError, StoreError
from jitgate.access.model import RequestState
from jitgate.access.service import AccessService
from jitgate.chain.call import Call
from jitgate.chain.flow import call_of, close_client_connection, current_policy, declare_policy_option, refuse
from jitgate.guardrails.approval import operation_for
from jitgate.guardrails.decide import decide, line_rule
from jitgate.guardrails.index import GuardrailIndex
from jitgate.guardrails.rules import Action, CallFacts, Outcome
from jitgate.guardrails.stdin import STDIN, LineAssembler
from jitgate.kube.status import status
from jitgate.masking.detectors import DEFAULT_DETECTORS, DetectorSet

log = logging.getLogger("jitgate.guardrails")

EXEC_LIKE = frozenset({"exec", "attach"})
STDERR, ERROR = 2, 3


def facts_of(call: Call) -> CallFacts:
    info = call.info
    identity = call.identity
    grant = call.grant
    return CallFacts(
        cluster=call.cluster.name if call.cluster else "",
        verb=info.verb,
        api_group=info.api_group,
        resource=info.resource,
        subresource=info.subresource,
        namespace=info.namespace,
        name=info.name,
        username=identity.username if identity else "",
        groups=tuple(identity.groups) if identity else (),
        access_rule=grant.rule if grant else "",
        grant=grant.id if grant else "",
        command=info.exec.command if info.exec is not None else (),
        is_resource_request=info.is_resource_request,
    )


def refusal(outcome: Outcome, call: Call) -> str:
    rule = outcome.rule
    what = f"{call.info.verb} {call.info.resource_path or call.info.path}"
    why = rule.why()
    if outcome.unreadable and rule.body:
        why = f"{why} (the gateway could not judge the body: {outcome.unreadable})"
    if rule.action is Action.DENY:
        return f"jitgate: guardrail {rule.name!r} denies {what}: {why}"
    return f"jitgate: guardrail {rule.name!r} requires a reviewer's approval for {what}: {why}"


def approval_refusal(base: str, request_id: str, joined: bool) -> str:
    filed = "is waiting for review in" if joined else "was filed as"
    return (f"{base}. This operation {filed} access request {request_id}; a reviewer runs "
            f"`jitgate approve {request_id}` (see it with `jitgate show {request_id}`); "
            "retry the same command after approval: it passes once, and a changed command needs a new approval")


def _base64_protocol(flow: http.HTTPFlow) -> bool:
    """The older `base64.channel.k8s.io` protocols: an ASCII channel digit, then base64 text."""
    chosen = flow.response.headers.get("sec-websocket-protocol", "") if flow.response else ""
    return chosen.startswith("base64.")


class Guardrails:
    def __init__(self, service: AccessService | None = None) -> None:
        # The access service files and decides operation requests; without one (this addon loaded
        # alone) a require-approval call can only be refused.
        self.service = service
        self.detectors: DetectorSet = DEFAULT_DETECTORS
        self.index = GuardrailIndex()
        # Interactive sessions being watched: flow -> its line assembler.
        self.sessions: weakref.WeakKeyDictionary[http.HTTPFlow, LineAssembler] = weakref.WeakKeyDictionary()
        self.ended: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def load(self, loader) -> None:
        declare_policy_option(loader)

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated:
            policy = current_policy()
            self.index = policy.guardrails
            masking = getattr(policy, "masking", None)
            self.detectors = masking.detectors() if masking is not None else DEFAULT_DETECTORS
            for warning in self.index.warnings:
                log.warning("policy: %s", warning)

    async def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call.info is None or call.cluster is None or call.identity is None or not self.index.rules:
            return
        if flow.response is not None:
            if "jitgate.dev/upgrade-refused" in call.annotations and call.info.is_connect:
                self.name_refused_upgrade(flow, call)
            return
        if call.denied:
            return
        info = call.info
        if not self.index.candidates(info.verb, info.resource, info.namespace, info.subresource):
            return  # most calls: no rule can meet their verb, resource and namespace
        request = flow.request
        outcome = decide(self.index, facts_of(call), request.headers.get("content-type", ""),
                         lambda: request.get_content(strict=False) or b"")
        if not outcome.matches:
            return
        self.record(call, outcome)
        if outcome.action is Action.REQUIRE_APPROVAL:
            await self.require_approval(flow, call, outcome)
        elif outcome.action is Action.DENY:
            refuse(flow, 403, refusal(outcome, call))
        elif call.info.subresource in EXEC_LIKE and call.info.is_websocket and self.index.command_rules:
            self.sessions[flow] = LineAssembler()

    async def require_approval(self, flow: http.HTTPFlow, call: Call, outcome: Outcome) -> None:
        """Let the call through on an approved, unused permit for exactly it; else file (or join)
        the operation request and refuse with its id."""
        text = refusal(outcome, call)
        if self.service is None or self.service.store is None:
            refuse(flow, 403, f"{text}; this gateway has no grant store, so the operation cannot be approved")
            return
        request = flow.request
        operation = operation_for(outcome.rule, facts_of(call), request.method, request.path,
                                  request.get_content(strict=False) or b"")
        try:
            kind, access_request = await self.service.operation(call.identity, call.cluster.name, call.info, operation,
                                                                call.grant.rule if call.grant else None)
            call.annotations["jitgate.dev/guardrail-approval"] = access_request.id
            if kind != "allowed" and outcome.rule.hold_seconds:
                kind, access_request, why = await self.hold(call, operation, access_request, outcome.rule.hold_seconds)
                call.annotations["jitgate.dev/guardrail-approval"] = access_request.id
                if why:
                    refuse(flow, 403, f"{text}. {why}")
                    return
        except StoreError as e:
            log.error("grant store unavailable, refusing call %s: %s", call.audit_id, e)
            refuse(flow, 503, "jitgate: the grant store is unavailable, so calls are refused until it is back "
                              f"(audit ID {call.audit_id})")
            return
        except AccessError as e:
            refuse(flow, 403, f"{text}; no approval can be asked for it: {e}")
            return
        if kind == "allowed":
            approvers = ",".join(access_request.approvers)
            call.annotations["jitgate.dev/guardrail-approvers"] = approvers
            call.allow(f"{call.reason or 'allowed'}; guardrail {outcome.rule.name!r}: operation approved by "
                       f"{approvers} in access request {access_request.id} (used once)")
            return
        refuse(flow, 403, approval_refusal(text, access_request.id, joined=kind == "pending"))

    async def hold(self, call: Call, operation, access_request, max_wait: int):
        """Wait (the event loop does not) until the request is decided or `max_wait` passes; an
        approval is used at once. Returns (kind, request, why refused or "")."""
        log.info("holding %s for %s until operation request %s is decided", operation.summary,
                 call.identity.username, access_request.id)
        poll = getattr(ctx.options, "hold_poll_interval_ms", 1000) / 1000
        store = self.service.current_store
        deadline = time.monotonic() + max_wait
        while access_request.state is RequestState.PENDING and time.monotonic() < deadline:
            await asyncio.sleep(poll)
            access_request = await self.service.run(store.get_request, access_request.id)
        if access_request.state is RequestState.APPROVED:
            kind, used = await self.service.operation(call.identity, call.cluster.name, call.info, operation,
                                                      call.grant.rule if call.grant else None)
            if kind == "allowed":
                return kind, used, ""
            return kind, used, (f"Access request {access_request.id} was approved, but its permit was already used; "
                                f"this call is access request {used.id}")
        if access_request.state is RequestState.PENDING:
            return "pending", access_request, (
                f"Access request {access_request.id} is still pending after {max_wait}s; a reviewer runs "
                f"`jitgate approve {access_request.id}`; retry the same command after approval")
        return "", access_request, f"Access request {access_request.id} was {access_request.state.value}"

    def name_refused_upgrade(self, flow: http.HTTPFlow, call: Call) -> None:
        """A SPDY exec is refused anyway; when a deny rule matches it, the refusal names the rule."""
        outcome = decide(self.index, facts_of(call))
        if outcome.action is Action.DENY:
            self.record(call, outcome)
            refuse(flow, 403, refusal(outcome, call))

    @staticmethod
    def record(call: Call, outcome: Outcome) -> None:
        if outcome.rule is not None:
            call.annotations["jitgate.dev/guardrail"] = outcome.rule.name
            call.annotations["jitgate.dev/guardrail-action"] = str(outcome.action)
        dry = outcome.dry_runs
        if dry:
            call.annotations["jitgate.dev/guardrail-dry-run"] = ",".join(f"{m.rule.name}:{m.rule.action}" for m in dry)
        if outcome.action is None and not dry:
            return
        if outcome.action is Action.AUDIT:
            call.allow(call.reason or "allowed")

    # --- interactive sessions ---------------------------------------------------------------------

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        lines = self.sessions.get(flow)
        if lines is None or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        if not message.from_client:
            return
        if flow in self.ended:
            message.drop()  # the session is ending: nothing more is delivered
            return
        data = message.content
        if _base64_protocol(flow):
            import base64  # the base64 channel protocols: an ASCII channel digit, then base64

            if not data or data[:1] != b"0":
                return
            try:
                payload = base64.b64decode(data[1:])
            except ValueError:
                payload = b""
        else:
            if not data or data[0] != STDIN:
                return
            payload = data[1:]
        call = call_of(flow)
        facts = facts_of(call)
        for line in lines.feed(payload):
            deny, hits = line_rule(self.index, facts, line)
            for rule in hits:
                if rule.dry_run:
                    call.annotations["jitgate.dev/guardrail-dry-run"] = f"{rule.name}:{rule.action}"
            if deny is not None:
                message.drop()
                self.end_session(flow, call, deny, line)
                return
            audit = next((r for r in hits if r.action is Action.AUDIT and not r.dry_run), None)
            if audit is not None:
                call.annotations["jitgate.dev/guardrail"] = audit.name
                call.annotations["jitgate.dev/guardrail-action"] = str(Action.AUDIT)
                call.annotations["jitgate.dev/guardrail-line"] = self.masked(line)

    def masked(self, line: str) -> str:
        """A typed line as the audit may keep it: secret values replaced, as in masked output."""
        return self.detectors.mask_text(line)[0][:1000]

    def end_session(self, flow: http.HTTPFlow, call: Call, rule, line: str) -> None:
        self.ended.add(flow)
        line = self.masked(line)
        text = f"jitgate: guardrail {rule.name!r} refused the command {line!r}: {rule.why()}; the session is ended"
        call.annotations["jitgate.dev/guardrail"] = rule.name
        call.annotations["jitgate.dev/guardrail-action"] = str(Action.DENY)
        call.annotations["jitgate.dev/guardrail-line"] = line
        call.annotations["jitgate.dev/terminated"] = f"guardrail {rule.name}"
        call.deny(text)
        log.warning("ended the %s session of %s: guardrail %s matched a typed line", call.info.resource_path,
                    call.identity.username if call.identity else "?", rule.name)
        failure = json.dumps(status(403, text, "Forbidden")).encode()
        stderr = (text + "\r\n").encode()
        base64_protocol = _base64_protocol(flow)
        for channel, payload in ((STDERR, stderr), (ERROR, failure)):
            if base64_protocol:
                import base64

                frame, is_text = str(channel).encode() + base64.b64encode(payload), True
            else:
                frame, is_text = bytes([channel]) + payload, False
            ctx.master.commands.call("inject.websocket", flow, True, frame, is_text)
        # Give the injected frames a moment to go out, then end the connection (both sides).
        asyncio.get_running_loop().call_later(0.3, self.close, flow)

    @staticmethod
    def close(flow: http.HTTPFlow) -> None:
        if not close_client_connection(flow, "guardrail ended the session") and flow.killable:
            flow.kill()

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.sessions.pop(flow, None)


addons = [Guardrails()]
