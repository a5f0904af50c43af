"""Just-in-time grants: every Kubernetes call needs an active grant that covers it.

A call no grant covers is refused with a Status that says how to ask for access (the exact
`jitgate request ...` command), or, where the access rule allows it, the gateway files the request
itself and holds the call open until a reviewer decides or the bounded wait ends: the way an
unattended MCP server gets access. Discovery is open to any authenticated caller so kubectl works.

Decisions come from the access service (jitgate.access.service), which reads the grant store
(SQLite in the state folder by default, shared with the CLI and the HTTP API) on its own thread;
a store failure refuses calls (fail closed). Its background run approves due automatic approvals
and expires requests and grants; this step then ends the live watches, log follows and exec
sessions of grants that expired or were revoked (by this process or any other), within seconds:
unless another active grant of the same caller covers the session, which then moves to it
(`jitgate.dev/grant-moved`). An ended session is told why in its protocol's own way first (see
jitgate.kube.stream_endings; in either proxy mode, over HTTP/1.1 or HTTP/2), and its audit event says the same
(`jitgate.dev/terminated`, `jitgate.dev/termination-notice`).

    mitmdump -s addons/gateway.py --set policy=policies/ --set grant_store=state/jitgate.db
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict, defaultdict

from mitmproxy import ctx, exceptions, http

from jitgate.access.authorize import authorize_call
from jitgate.access.messages import how_to_request
from jitgate.access.service import AccessService
from jitgate.chain.call import Call
from jitgate.chain.flow import (
    call_of,
    close_client_connection,
    current_policy,
    declare_policy_option,
    end_response_stream,
    end_websocket,
    refuse,
)
from jitgate.chain.service_host import AccessServiceHost
from jitgate.kube import stream_endings
from jitgate.store.sqlite import StoreError

log = logging.getLogger("jitgate.grants")

ENDED_GRANTS_KEPT = 1024

REQUIRE_GRANT_OFF = "require_grant is off: no grant covers this call"


class Grants:
    # How long an ending session's notice (watch ERROR event, exec error channel, last log line)
    # has to go out before the connection is closed.
    NOTICE_SECONDS = 0.5

    def __init__(self, service: AccessService) -> None:
        self.service = service
        # grant id -> long-running flows on it, and when the grant ends.
        self.live: dict[str, set[http.HTTPFlow]] = defaultdict(set)
        self.live_ends: dict[str, float] = {}
        # Grants ended lately (revoked...), for sessions whose response starts after the sweep.
        self.ended: OrderedDict[str, str] = OrderedDict()
        # Sessions whose grant ended, while another grant that may cover them is looked up.
        self.pending: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.tasks: set[asyncio.Task] = set()
        service.listeners.append(self.grants_ended)

    def load(self, loader) -> None:
        declare_policy_option(loader)
        loader.add_option(
            "hold_poll_interval_ms", int, 250,
            "How often a held call re-reads its access request, in milliseconds.",
        )
        loader.add_option(
            "require_grant", bool, True,
            "Forward only calls a grant covers. Turn off only for a staged rollout: then every "
            "authenticated caller reaches the cluster with the gateway's credential, calls no grant "
            "covers are let through (audited as allowed, reason 'require_grant is off') and nobody is held.",
        )

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated:
            current_policy()  # a policy error stops the start here too when loaded alone
        if "hold_poll_interval_ms" in updated and not 10 <= ctx.options.hold_poll_interval_ms <= 10_000:
            raise exceptions.OptionsError("hold_poll_interval_ms must be between 10 and 10000")
        if "require_grant" in updated and not ctx.options.require_grant:
            log.warning("require_grant is off: EVERY AUTHENTICATED CALLER REACHES THE CLUSTERS without a grant, "
                        "with the gateway's credential (audited as allowed, reason %r)", REQUIRE_GRANT_OFF)

    # --- the per-call check -----------------------------------------------------------------------

    async def allow_if_granted(self, call: Call) -> bool:
        decision = await self.service.decide(call.identity.username, call.cluster.name, call.info)
        if not decision.allowed:
            return False
        call.allow(decision.reason)
        if decision.grant is not None:
            call.grant = decision.grant
            call.annotations["jitgate.dev/grant"] = decision.grant.id
            call.annotations["jitgate.dev/access-request"] = decision.grant.request_id
            call.annotations["jitgate.dev/approvers"] = await self.service.approvers_of(decision.grant)
        return True

    async def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        # A call an earlier step decided (self_review: kubectl's own questions) is not checked again.
        if flow.response or call.decision or call.identity is None or call.cluster is None or call.info is None:
            return
        try:
            if await self.allow_if_granted(call):
                return
            if not ctx.options.require_grant:
                call.allow(REQUIRE_GRANT_OFF)  # a staged rollout: the audit shows what a grant would have had to cover
                return
            rule = self.service.hold_rule(call.identity.groups, call.cluster.name, call.info)
            if rule is not None:
                await self.hold(flow, call, rule)
                return
            # A refusal names the caller's pending request that would cover the call, if any.
            pending = await self.service.pending_covering(call.identity.username, call.cluster.name, call.info)
        except StoreError as e:
            # The store's message names its file: for the gateway's log, not for callers.
            log.error("grant store unavailable, refusing call %s: %s", call.audit_id, e)
            refuse(flow, 503, "jitgate: the grant store is unavailable, so calls are refused until it is back "
                              f"(audit ID {call.audit_id})")
            return
        refuse(flow, 403, how_to_request(self.service.rules, call.identity.groups, call.cluster.name, call.info, pending))

    async def hold(self, flow: http.HTTPFlow, call: Call, rule) -> None:
        def filed(request_id: str) -> None:
            call.annotations["jitgate.dev/held-for-request"] = request_id

        outcome = await self.service.hold(call.identity, call.cluster.name, call.info, rule,
                                          flow.request.headers.get("User-Agent", "unknown client"),
                                          ctx.options.hold_poll_interval_ms / 1000, filed)
        if outcome.decision is None:
            refuse(flow, outcome.status, outcome.message)
        elif not await self.allow_if_granted(call):
            refuse(flow, 403, f"jitgate: access request {outcome.request_id} was approved, but its grant "
                              "no longer covers this call")

    # --- live sessions on grants ------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        grant = call.grant
        if not call.long_running or grant is None:
            return
        # The grant may have ended while the call was on its way (after the sweep that ended its
        # other sessions): such a session must not start.
        why = self.ended.get(grant.id) or ("grant expired" if grant.ends_at <= time.time() else None)
        if why is not None:
            self.terminated(call, why)
            call.long_running = False
            if flow.killable:
                flow.kill()
            return
        self.live[grant.id].add(flow)
        self.live_ends[grant.id] = grant.ends_at

    def forget(self, flow: http.HTTPFlow) -> None:
        self.pending.discard(flow)
        grant = call_of(flow).grant
        if grant is not None and grant.id in self.live:
            self.live[grant.id].discard(flow)
            if not self.live[grant.id]:
                del self.live[grant.id]
                self.live_ends.pop(grant.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self.forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.forget(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.forget(flow)

    def terminated(self, call: Call, why: str, message: str = "") -> None:
        call.annotations["jitgate.dev/terminated"] = why
        call.reason = f"{call.reason}; session ended: {message or why}"
        info = call.info
        self.service.emit_workflow("session.terminated", {
            "session": call.audit_id, "user": call.identity.username if call.identity else "",
            "grant": call.grant.id if call.grant else "", "cluster": call.cluster.name if call.cluster else "",
            "call": f"{info.verb} {info.resource_path}" if info else "", "reason": why})

    def end_sessions(self, grant_id: str, why: str) -> None:
        """The grant ended: each of its live sessions moves to another active grant of the same
        caller that covers it, or ends, telling the client why."""
        flows = list(self.live.pop(grant_id, ()))
        self.live_ends.pop(grant_id, None)
        for flow in flows:
            self.pending.add(flow)
            task = asyncio.ensure_future(self.move_or_end(flow, grant_id, why))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def covering_grant(self, call: Call, ended_id: str):
        """Another active grant of the caller that covers the call, or None (a store failure: None,
        fail closed). The service's cached grants may still hold the ended one: it is left out."""
        self.service.counter_checked = float("-inf")  # the ending is a change: read the store now
        try:
            grants = await self.service.active_grants(call.identity.username, call.cluster.name)
        except StoreError as e:
            log.error("grant store unavailable, ending a session of grant %s: %s", ended_id, e)
            return None
        others = [g for g in grants if g.id != ended_id and g.id not in self.ended]
        return authorize_call(others, call.cluster.name, call.info, time.time()).grant

    async def move_or_end(self, flow: http.HTTPFlow, grant_id: str, why: str) -> None:
        call = call_of(flow)
        try:
            grant = None
            if call.identity is not None and call.cluster is not None and call.info is not None:
                grant = await self.covering_grant(call, grant_id)
            if flow not in self.pending:
                return  # the session ended on its own meanwhile
            if grant is not None and grant.ends_at > time.time():
                self.move(flow, call, grant_id, grant, why)
            else:
                self.end_session(flow, call, grant_id, why)
        finally:
            self.pending.discard(flow)

    def move(self, flow: http.HTTPFlow, call: Call, old_id: str, grant, why: str) -> None:
        call.grant = grant
        call.annotations["jitgate.dev/grant"] = grant.id
        call.annotations["jitgate.dev/access-request"] = grant.request_id
        call.annotations["jitgate.dev/grant-moved"] = f"{old_id} -> {grant.id} ({why})"
        call.reason = f"{call.reason}; {why}: continues under grant {grant.id}"
        self.live[grant.id].add(flow)
        self.live_ends[grant.id] = grant.ends_at
        log.info("a live %s of %s moved from grant %s (%s) to grant %s", call.info.resource_path,
                 call.identity.username, old_id, why, grant.id)

    def ending_message(self, call: Call, why: str) -> str:
        message = f"jitgate: this session ended: {why}"
        if call.identity is not None and call.cluster is not None and call.info is not None:
            try:
                hint = how_to_request(self.service.rules, call.identity.groups, call.cluster.name, call.info)
            except ValueError:
                hint = ""
            if hint.startswith("jitgate: "):
                message += "; " + hint[len("jitgate: "):]
        return message

    def end_session(self, flow: http.HTTPFlow, call: Call, grant_id: str, why: str) -> None:
        message = self.ending_message(call, why)
        # Annotated first: the notice may run the flow's last hooks (audit) before the send returns.
        self.terminated(call, why, message)
        call.annotations["jitgate.dev/termination-notice"] = "sent"
        told = False
        if flow.websocket is not None:
            protocol = flow.response.headers.get("Sec-WebSocket-Protocol", "") if flow.response else ""
            frames = stream_endings.exec_error_frames(protocol, message)
            close = stream_endings.websocket_close_frame(1000, "jitgate: session ended")
            told = bool(frames) and end_websocket(flow, frames, close)
        elif flow.response is not None:
            headers = flow.response.headers
            data = stream_endings.stream_ending(headers.get("Content-Type", ""), headers.get("Content-Encoding", ""),
                                                call.info is not None and call.info.subresource == "log", message)
            told = data is not None and end_response_stream(flow, data)
        if not told:
            call.annotations["jitgate.dev/termination-notice"] = "none (connection closed only)"
        # The notice is on its way through the connection's own event queue; the close comes after it.
        delay = self.NOTICE_SECONDS if told else 0
        asyncio.get_running_loop().call_later(delay, self.close, flow, why)
        log.info("ended a live %s of %s on grant %s (%s)%s", call.info.resource_path if call.info else "call",
                 call.identity.username if call.identity else "?", grant_id, why, "" if told else " [no notice]")

    @staticmethod
    def close(flow: http.HTTPFlow, why: str) -> None:
        close_client_connection(flow, why)

    def grants_ended(self, now: float, ended: list[tuple[str, str]]) -> None:
        """After each maintenance run: move or end the sessions whose grant ran out or was ended."""
        for grant_id, why in ended:
            self.ended[grant_id] = why
            self.ended.move_to_end(grant_id)
        for grant_id, ends_at in list(self.live_ends.items()):
            if ends_at <= now:
                self.end_sessions(grant_id, "grant expired")
        for grant_id, why in ended:
            self.end_sessions(grant_id, why)
        while len(self.ended) > ENDED_GRANTS_KEPT:
            self.ended.popitem(last=False)


_service = AccessService()
addons = [AccessServiceHost(_service), Grants(_service)]
