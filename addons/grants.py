"""Just-in-time grants: every Kubernetes call needs an active grant that covers it.

A call no grant covers is refused with a Status that says how to ask for access (the exact
`jitgate request ...` command), or, where the access rule allows it, the gateway files the request
itself and holds the call open until a reviewer decides or the bounded wait ends: the way an
unattended MCP server gets access. Discovery is open to any authenticated caller so kubectl works.

The grant store (SQLite in the state folder by default) is shared with the CLI and the HTTP API;
a store failure refuses calls (fail closed). A background task approves due automatic approvals,
expires requests and grants, and ends the live watches, log follows and exec sessions of grants
that expired or were revoked (by this process or any other), within seconds.

    mitmdump -s addons/gateway.py --set policy=policies/ --set grant_store=state/jitgate.db
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Hashable

from mitmproxy import ctx, exceptions, http

from jitgate.access.authorize import authorize_call, scope_for_call
from jitgate.access.errors import AccessError
from jitgate.access.messages import how_to_request
from jitgate.access.model import AccessRequest, EventKind, Grant, RequestState
from jitgate.access.rules import choose_rule
from jitgate.api.access_api import notification_view
from jitgate.chain.call import Call
from jitgate.chain.flow import (
    call_of,
    close_client_connection,
    current_policy,
    declare_policy_option,
    refuse,
)
from jitgate.notify.webhooks import Notifier
from jitgate.store.sqlite import SQLiteStore, Store, StoreError

log = logging.getLogger("jitgate.grants")

ENDED_GRANT_EVENTS = (EventKind.GRANT_EXPIRED, EventKind.GRANT_REVOKED)


class Grants:
    def __init__(self) -> None:
        self.store: Store | None = None
        self.rules: tuple = ()
        self.notifier: Notifier | None = None
        self.notifier_config: tuple = ()
        # (username, cluster) -> (store change counter, grants): re-read only after a change.
        self.cache: dict[tuple[str, str], tuple[Hashable, tuple[Grant, ...]]] = {}
        # grant id -> long-running flows on it, and when the grant ends.
        self.live: dict[str, set[http.HTTPFlow]] = defaultdict(set)
        self.live_ends: dict[str, float] = {}
        self.approvers: dict[str, str] = {}  # grant id -> who approved it, for audit annotations
        self.counter: Hashable = None
        self.counter_checked = float("-inf")
        self.event_cursor = 0
        self.maintenance: asyncio.Task | None = None
        self.store_failing = False

    def load(self, loader) -> None:
        declare_policy_option(loader)
        loader.add_option(
            "grant_store", str, "state/jitgate.db",
            "SQLite file holding access requests, reviews and grants (shared with the jitgate CLI "
            "and other gateway processes on this host; created 0600).",
        )
        loader.add_option(
            "grant_maintenance_interval", int, 1,
            "Seconds between runs of automatic approvals, expiry, and ending the sessions of ended grants.",
        )
        loader.add_option(
            "hold_poll_interval_ms", int, 250,
            "How often a held call re-reads its access request, in milliseconds.",
        )

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated:
            policy = current_policy()
            self.rules = policy.access_rules
            self.notifier_config = policy.webhooks
        if "grant_store" in updated:
            if not ctx.options.grant_store:
                raise exceptions.OptionsError("grant_store must name a file")
            try:
                store = SQLiteStore(ctx.options.grant_store)
                self.event_cursor = store.last_event_id()
            except StoreError as e:
                raise exceptions.OptionsError(f"cannot open the grant store: {e}") from None
            if self.store is not None:
                self.store.close()
            self.store, self.cache, self.counter_checked = store, {}, float("-inf")
        if "grant_maintenance_interval" in updated and ctx.options.grant_maintenance_interval < 1:
            raise exceptions.OptionsError("grant_maintenance_interval must be at least 1 second")
        if "hold_poll_interval_ms" in updated and not 10 <= ctx.options.hold_poll_interval_ms <= 10_000:
            raise exceptions.OptionsError("hold_poll_interval_ms must be between 10 and 10000")

    async def running(self) -> None:
        if self.notifier_config:
            self.notifier = Notifier(self.notifier_config)
            self.notifier.start()
        self.maintenance = asyncio.create_task(self.maintain())

    async def done(self) -> None:
        if self.maintenance is not None:
            self.maintenance.cancel()
        if self.notifier is not None:
            await self.notifier.close(timeout=2.0)
        if self.store is not None:
            self.store.close()

    def notify(self, kind: str, request: AccessRequest, actor: str | None = None, reason: str | None = None) -> None:
        if self.notifier is not None:
            self.notifier.notify(kind, notification_view(request, self.rules), actor=actor, reason=reason)

    # --- the per-call check -----------------------------------------------------------------------

    # Asking SQLite whether anything changed costs a query; on a busy gateway once per this many
    # seconds is enough (a revocation reaches new calls within it, and live sessions within the
    # maintenance interval).
    CHANGE_CHECK_SECONDS = 0.1

    def current_counter(self) -> Hashable:
        now = time.monotonic()
        if now - self.counter_checked >= self.CHANGE_CHECK_SECONDS:
            self.counter, self.counter_checked = self.store.change_counter(), now
        return self.counter

    def active_grants(self, username: str, cluster: str) -> tuple[Grant, ...]:
        counter = self.current_counter()
        hit = self.cache.get((username, cluster))
        if hit is not None and hit[0] == counter:
            return hit[1]
        grants = self.store.active_grants_for(username, cluster, time.time())
        if len(self.cache) > 10_000:
            self.cache.clear()
        self.cache[(username, cluster)] = (counter, grants)
        return grants

    def decide(self, call: Call) -> bool | None:
        """True allowed, False refused by a denial already set, None: no grant covers the call."""
        decision = authorize_call(self.active_grants(call.identity.username, call.cluster.name),
                                  call.cluster.name, call.info, time.time())
        if decision.allowed:
            call.allow(decision.reason)
            if decision.grant is not None:
                call.grant = decision.grant
                call.annotations["jitgate.dev/grant"] = decision.grant.id
                call.annotations["jitgate.dev/access-request"] = decision.grant.request_id
                call.annotations["jitgate.dev/approvers"] = self.approvers_of(decision.grant)
            return True
        return None

    def approvers_of(self, grant: Grant) -> str:
        """Read once per grant: reviews never change after approval."""
        names = self.approvers.get(grant.id)
        if names is None:
            request = self.store.get_request(grant.request_id)
            names = ",".join(request.approvers) or "system:jitgate"
            if len(self.approvers) > 10_000:
                self.approvers.clear()
            self.approvers[grant.id] = names
        return names

    async def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if flow.response or call.denied or call.identity is None or call.cluster is None or call.info is None:
            return
        if self.store is None:
            refuse(flow, 503, "jitgate: no grant store is configured, so no call is let through")
            return
        try:
            if self.decide(call):
                return
            rule = self.hold_rule(call)
            if rule is not None:
                await self.hold(flow, call, rule)
                return
        except StoreError as e:
            refuse(flow, 503, f"jitgate: {e}; calls are refused until it is back")
            return
        message = how_to_request(self.rules, call.identity.groups, call.cluster.name, call.info)
        refuse(flow, 403, message)

    # --- held calls -------------------------------------------------------------------------------

    def hold_rule(self, call: Call):
        try:
            scope = scope_for_call(call.cluster.name, call.info)
            rule = choose_rule(self.rules, call.identity.groups, scope)
        except AccessError:
            return None
        return rule if rule.hold is not None else None

    async def hold(self, flow: http.HTTPFlow, call: Call, rule) -> None:
        identity, scope = call.identity, scope_for_call(call.cluster.name, call.info)
        now = time.time()
        pending = [r for r in self.store.list_requests(requester=identity.username, states=[RequestState.PENDING])
                   if r.scope.contains(scope) and r.rule == rule.name]
        if pending:
            request = pending[0]
        else:
            reason = f"held call: {call.info.verb} {call.info.resource_path} ({flow.request.headers.get('User-Agent', 'unknown client')})"
            try:
                request = self.store.create_request(self.rules, identity, scope, now=now, reason=reason[:900], rule_name=rule.name)
            except AccessError as e:
                if isinstance(e, StoreError):
                    raise
                refuse(flow, e.status, f"jitgate: cannot request access for this call: {e}")
                return
            self.notify("created" if request.state is RequestState.PENDING else "approved", request)
        call.annotations["jitgate.dev/held-for-request"] = request.id
        log.info("holding %s %s for %s until access request %s is decided", call.info.verb,
                 call.info.resource_path, identity.username, request.id)
        deadline = now + rule.hold.max_wait
        poll = ctx.options.hold_poll_interval_ms / 1000
        while True:
            if request.state is RequestState.APPROVED and self.decide(call):
                return
            if request.state in (RequestState.DENIED, RequestState.EXPIRED, RequestState.CANCELLED):
                refuse(flow, 403, f"jitgate: access request {request.id} was {request.state.value}; this call is refused")
                return
            if time.time() >= deadline:
                refuse(flow, 403, f"jitgate: access request {request.id} is still pending after {rule.hold.max_wait:.0f}s; "
                                  f"this call is refused (it may be approved later: `jitgate show {request.id}`)")
                return
            await asyncio.sleep(poll)
            request = self.store.get_request(request.id)

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

    async def maintain(self) -> None:
        interval = ctx.options.grant_maintenance_interval
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            # Grants end on time here even if the store cannot be read.
            for grant_id, ends_at in list(self.live_ends.items()):
                if ends_at <= now:
                    self.end_sessions(grant_id, "grant expired")
            try:
                ended, decided = await asyncio.to_thread(self.maintain_store, now)
            except StoreError as e:
                if not self.store_failing:
                    log.error("grant store maintenance failed: %s", e)
                self.store_failing = True
                continue
            except Exception:  # keep the loop alive: it is what ends revoked sessions
                log.exception("grant maintenance failed")
                continue
            self.store_failing = False
            for grant_id, why in ended:
                self.end_sessions(grant_id, why)
            for kind, request in decided:
                self.notify(kind, request, actor="system:jitgate")

    def maintain_store(self, now: float) -> tuple[list[tuple[str, str]], list[tuple[str, AccessRequest]]]:
        """Runs in a worker thread: store work only, no flows touched."""
        decided = [("auto_approved", r) for r in self.store.approve_due_auto(self.rules, now=now)]
        swept = self.store.sweep(now=now)
        decided += [("expired", r) for r in swept.expired_requests]
        ended: list[tuple[str, str]] = []
        # Every process reads the shared event history, so revocations made through another gateway
        # replica or by the CLI end this process's sessions too.
        while True:
            events = self.store.events_since(self.event_cursor, limit=1000)
            for event in events:
                self.event_cursor = event.id
                if event.kind in ENDED_GRANT_EVENTS and event.grant_id:
                    why = "grant revoked by " + event.actor if event.kind is EventKind.GRANT_REVOKED else "grant expired"
                    ended.append((event.grant_id, why))
            if len(events) < 1000:
                break
        return ended, decided


addons = [Grants()]
