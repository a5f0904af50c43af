"""Just-in-time grants: every Kubernetes call needs an active grant that covers it.

A call no grant covers is refused with a Status that says how to ask for access (the exact
`jitgate request ...` command), or, where the access rule allows it, the gateway files the request
itself and holds the call open until a reviewer decides or the bounded wait ends: the way an
unattended MCP server gets access. Discovery is open to any authenticated caller so kubectl works.

Decisions come from the access service (jitgate.access.service), which reads the grant store
(SQLite in the state folder by default, shared with the CLI and the HTTP API) on its own thread;
a store failure refuses calls (fail closed). Its background run approves due automatic approvals
and expires requests and grants; this step then ends the live watches, log follows and exec
sessions of grants that expired or were revoked (by this process or any other), within seconds.

    mitmdump -s addons/gateway.py --set policy=policies/ --set grant_store=state/jitgate.db
"""

from __future__ import annotations

import logging
from collections import defaultdict

from mitmproxy import ctx, exceptions, http

from jitgate.access.messages import how_to_request
from jitgate.access.service import AccessService
from jitgate.chain.call import Call
from jitgate.chain.flow import call_of, close_client_connection, current_policy, declare_policy_option, refuse
from jitgate.chain.service_host import AccessServiceHost
from jitgate.store.sqlite import StoreError

log = logging.getLogger("jitgate.grants")


class Grants:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        # grant id -> long-running flows on it, and when the grant ends.
        self.live: dict[str, set[http.HTTPFlow]] = defaultdict(set)
        self.live_ends: dict[str, float] = {}
        service.listeners.append(self.grants_ended)

    def load(self, loader) -> None:
        declare_policy_option(loader)
        loader.add_option(
            "hold_poll_interval_ms", int, 250,
            "How often a held call re-reads its access request, in milliseconds.",
        )

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated:
            current_policy()  # a policy error stops the start here too when loaded alone
        if "hold_poll_interval_ms" in updated and not 10 <= ctx.options.hold_poll_interval_ms <= 10_000:
            raise exceptions.OptionsError("hold_poll_interval_ms must be between 10 and 10000")

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
        if flow.response or call.denied or call.identity is None or call.cluster is None or call.info is None:
            return
        try:
            if await self.allow_if_granted(call):
                return
            rule = self.service.hold_rule(call.identity.groups, call.cluster.name, call.info)
            if rule is not None:
                await self.hold(flow, call, rule)
                return
        except StoreError as e:
            refuse(flow, 503, f"jitgate: {e}; calls are refused until it is back")
            return
        refuse(flow, 403, how_to_request(self.service.rules, call.identity.groups, call.cluster.name, call.info))

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
        if call.long_running and grant is not None:
            self.live[grant.id].add(flow)
            self.live_ends[grant.id] = grant.ends_at

    def forget(self, flow: http.HTTPFlow) -> None:
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

    def end_sessions(self, grant_id: str, why: str) -> None:
        for flow in list(self.live.pop(grant_id, ())):
            call = call_of(flow)
            call.annotations["jitgate.dev/terminated"] = why
            call.reason = f"{call.reason}; session ended: {why}"
            closed = close_client_connection(flow, why)
            log.info("ended a live %s of %s on grant %s (%s)%s", call.info.resource_path if call.info else "call",
                     call.identity.username if call.identity else "?", grant_id, why, "" if closed else " [already closed]")
        self.live_ends.pop(grant_id, None)

    def grants_ended(self, now: float, ended: list[tuple[str, str]]) -> None:
        """After each maintenance run: end sessions whose grant ran out or was ended."""
        for grant_id, ends_at in list(self.live_ends.items()):
            if ends_at <= now:
                self.end_sessions(grant_id, "grant expired")
        for grant_id, why in ended:
            self.end_sessions(grant_id, why)


_service = AccessService()
addons = [AccessServiceHost(_service), Grants(_service)]
