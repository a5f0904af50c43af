"""The access service: grants, held calls and the background workflow, with an explicit async boundary.

The gateway's event loop must never wait on SQLite: another process (the CLI, a second gateway) may
hold the write lock for seconds. Every store read and write therefore runs on one dedicated worker
thread (`run`), and the hot path is served from a per-caller cache that is re-read only after the
store's change counter moved (checked at most every `CHANGE_CHECK_SECONDS`). The mitmproxy adapters
(addons/grants.py for the per-call check, addons/access_api.py for the HTTP API) are handed one
instance; nothing here imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from jitgate.access.authorize import CallDecision, authorize_call, scope_for_call, suggested_scopes
from jitgate.access.errors import AccessError, StoreError
from jitgate.access.messages import notification_view, waiting_for
from jitgate.access.model import (
    AccessRequest,
    EventKind,
    Grant,
    Operation,
    Principal,
    RequestState,
)
from jitgate.access.rules import AccessRule, choose_rule
from jitgate.access.scope import Scope
from jitgate.kube.request_info import RequestInfo
from jitgate.notify.webhooks import Notifier, Webhook

log = logging.getLogger("jitgate.access.service")

T = TypeVar("T")

ENDED_GRANT_EVENTS = (EventKind.GRANT_EXPIRED, EventKind.GRANT_REVOKED)
MAX_CACHED_CALLERS = 10_000


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    """How a held call ended: allowed by a decision, or refused with a status and message."""

    decision: CallDecision | None
    request_id: str
    status: int = 403
    message: str = ""


def ended_request_message(request: AccessRequest) -> str:
    """Why a held call is refused when its request was decided against it: the reviewer's words."""
    state = request.state.value
    if request.state is RequestState.DENIED:
        by = f" by {request.decided_by}" if request.decided_by else ""
        why = f": {request.decision_reason}" if request.decision_reason else " (no reason given)"
        return f"jitgate: access request {request.id} was denied{by}{why}; this call is refused"
    if request.state is RequestState.CANCELLED:
        return f"jitgate: access request {request.id} was cancelled; this call is refused"
    return f"jitgate: access request {request.id} {state} before anyone decided it; this call is refused"


class AccessService:
    """Grant decisions, held calls, automatic approval and expiry over one grant store."""

    # Asking SQLite whether anything changed costs a query; on a busy gateway once per this many
    # seconds is enough (a revocation reaches new calls within it, live sessions within the
    # maintenance interval).
    CHANGE_CHECK_SECONDS = 0.1

    def __init__(self, store_factory: Callable[[str], Any] | None = None) -> None:
        # A jitgate.store backend (SQLiteStore), opened by `open_store` through the factory the host
        # gives: the store package builds on this one (it persists its records), so this one never imports it.
        self.store = None
        self.store_factory = store_factory
        self.rules: tuple[AccessRule, ...] = ()
        self.webhooks: tuple[Webhook, ...] = ()
        self.notifier: Notifier | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # One thread owns all store work, so the event loop never blocks on a database lock.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jitgate-store")
        # (username, cluster) -> (store change counter, grants), least recently used first.
        self.cache: OrderedDict[tuple[str, str], tuple[Hashable, tuple[Grant, ...]]] = OrderedDict()
        self.approvers: OrderedDict[str, str] = OrderedDict()  # grant id -> approvers (never change)
        self.counter: Hashable = None
        self.counter_checked = float("-inf")
        self.event_cursor = 0
        # Told after each maintenance run: (now, [(grant id, why it ended)]); e.g. the grants step,
        # which ends the live sessions of ended grants.
        self.listeners: list[Callable[[float, list[tuple[str, str]]], None]] = []
        # Workflow events that are no API call (an automatic approval, an expiry, a session ended):
        # the audit step writes each as an event of its own. Called with (kind, details).
        self.workflow_listeners: list[Callable[[str, dict], None]] = []
        # What the HTTP API (run on the store thread) uses: the current store and a notifier that
        # hands notifications back to the event loop.
        self.current_store = _CurrentStore(self)
        self.thread_notifier = _LoopNotifier(self)

    # --- configuration and lifecycle --------------------------------------------------------------

    def open_store(self, path: str) -> None:
        """Open (or replace) the store; raises StoreError. Called at configuration time."""
        if self.store_factory is None:
            raise StoreError("no grant store backend is configured")
        store = self.store_factory(path)
        try:
            cursor = store.last_event_id()
        except StoreError:
            store.close()
            raise
        old, self.store = self.store, store
        self.event_cursor, self.cache, self.counter_checked = cursor, OrderedDict(), float("-inf")
        if old is not None:
            old.close()

    def set_policy(self, rules: Sequence[AccessRule], webhooks: Sequence[Webhook]) -> None:
        self.rules, self.webhooks = tuple(rules), tuple(webhooks)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        if self.webhooks and self.notifier is None:
            self.notifier = Notifier(self.webhooks)
            self.notifier.start()

    async def stop(self) -> None:
        if self.notifier is not None:
            await self.notifier.close(timeout=2.0)
            self.notifier = None
        if self.store is not None:
            store, self.store = self.store, None
            await self.run(store.close)
        self.executor.shutdown(wait=False)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run store work on the store thread; the caller's flow waits, the event loop does not."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def notify(self, kind: str, request: AccessRequest, actor: str | None = None, reason: str | None = None) -> None:
        """Queue a webhook notification; call on the event loop."""
        if self.notifier is not None:
            self.notifier.notify(kind, notification_view(request, self.rules), actor=actor, reason=reason)

    # --- the per-call check -----------------------------------------------------------------------

    def _require_store(self):
        if self.store is None:
            raise StoreError("no grant store is configured")
        return self.store

    async def active_grants(self, username: str, cluster: str) -> tuple[Grant, ...]:
        store = self._require_store()
        now = time.monotonic()
        if now - self.counter_checked >= self.CHANGE_CHECK_SECONDS:
            self.counter = await self.run(store.change_counter)
            self.counter_checked = now
        key = (username, cluster)
        hit = self.cache.get(key)
        if hit is not None and hit[0] == self.counter:
            self.cache.move_to_end(key)
            return hit[1]
        counter = self.counter
        grants = await self.run(store.active_grants_for, username, cluster, time.time())
        self.cache[key] = (counter, grants)
        self.cache.move_to_end(key)
        while len(self.cache) > MAX_CACHED_CALLERS:
            self.cache.popitem(last=False)
        return grants

    async def decide(self, username: str, cluster: str, info: RequestInfo) -> CallDecision:
        """Whether an active grant of `username` covers the call; raises StoreError (fail closed)."""
        grants = await self.active_grants(username, cluster)
        return authorize_call(grants, cluster, info, time.time())

    async def approvers_of(self, grant: Grant) -> str:
        """Who approved a grant, for audit annotations; read once per grant."""
        names = self.approvers.get(grant.id)
        if names is None:
            request = await self.run(self._require_store().get_request, grant.request_id)
            names = ",".join(request.approvers) or "system:jitgate"
            self.approvers[grant.id] = names
            while len(self.approvers) > MAX_CACHED_CALLERS:
                self.approvers.popitem(last=False)
        return names

    # --- held calls -------------------------------------------------------------------------------

    def hold_rule(self, groups: Sequence[str], cluster: str, info: RequestInfo) -> AccessRule | None:
        """The rule under which this call may be held while a human decides, if any."""
        plan = self._hold_plan(groups, cluster, info)
        return plan[0] if plan else None

    def _hold_plan(self, groups: Sequence[str], cluster: str, info: RequestInfo) -> tuple[AccessRule, Scope] | None:
        """The rule with a hold and the widest scope it admits for the operation behind this call:
        an agent's list, get and logs of pods become one request, not three."""
        try:
            scopes = suggested_scopes(cluster, info)
        except AccessError:
            return None
        for scope in scopes:
            try:
                rule = choose_rule(self.rules, groups, scope)
            except AccessError:
                continue
            if rule.hold is not None:
                return rule, scope
        return None

    async def pending_covering(self, username: str, cluster: str, info: RequestInfo) -> AccessRequest | None:
        """The caller's pending access request whose scope covers this call (for the refusal to
        name it instead of suggesting a new one). Raises StoreError."""
        store = self._require_store()
        try:
            scope = scope_for_call(cluster, info)
        except AccessError:
            return None
        pending = await self.run(lambda: store.list_requests(requester=username, states=[RequestState.PENDING]))
        return next((r for r in pending if r.operation is None and r.scope.contains(scope)), None)

    async def hold(self, who: Principal, cluster: str, info: RequestInfo, rule: AccessRule, client: str,
                   poll: float, on_filed: Callable[[str], None]) -> HoldOutcome:
        """File (or join) an access request for this call and wait until it is decided or the
        rule's `hold.max_wait` passes. Raises StoreError."""
        store = self._require_store()
        minimal = scope_for_call(cluster, info)
        plan = self._hold_plan(who.groups, cluster, info)
        scope = plan[1] if plan is not None and plan[0].name == rule.name else minimal
        now = time.time()
        # A request of the caller's that covers the call already (a retry, the next call of the
        # same operation): the call waits for that one.
        pending = [r for r in await self.run(lambda: store.list_requests(requester=who.username, states=[RequestState.PENDING]))
                   if r.operation is None and r.scope.contains(minimal) and r.rule == rule.name]
        if pending:
            request = pending[0]
        else:
            reason = f"held call: {info.verb} {info.resource_path} ({client})"
            try:
                request = await self.run(lambda: store.create_request(self.rules, who, scope, now=now, reason=reason[:900],
                                                                       rule_name=rule.name))
            except StoreError:
                raise
            except AccessError as e:
                return HoldOutcome(None, "", e.status, f"jitgate: cannot request access for this call: {e}")
            self.notify("created" if request.state is RequestState.PENDING else "approved", request)
        on_filed(request.id)
        log.info("holding %s %s for %s until access request %s is decided", info.verb, info.resource_path,
                 who.username, request.id)
        deadline = now + rule.hold.max_wait
        while True:
            if request.state is RequestState.APPROVED:
                self.counter_checked = float("-inf")  # the approval is a change: see it now
                decision = await self.decide(who.username, cluster, info)
                if decision.allowed:
                    return HoldOutcome(decision, request.id)
            if request.state in (RequestState.DENIED, RequestState.EXPIRED, RequestState.CANCELLED):
                return HoldOutcome(None, request.id, 403, ended_request_message(request))
            if time.time() >= deadline:
                return HoldOutcome(None, request.id, 403,
                                   f"jitgate: access request {request.id} is still pending after {rule.hold.max_wait:.0f}s, "
                                   f"so this call is refused; it {waiting_for(request, rule)}. Retry the same call once it "
                                   f"is approved (it joins this request, never files a new one); `jitgate show {request.id}` "
                                   "shows its state")
            await asyncio.sleep(poll)
            request = await self.run(store.get_request, request.id)

    # --- operations a guardrail holds for approval ------------------------------------------------

    async def operation(self, who: Principal, cluster: str, info: RequestInfo, operation: Operation,
                        rule_name: str | None) -> tuple[str, AccessRequest]:
        """Use an approved permit of `who` for this operation (("allowed", request)), or join the
        pending request for it (("pending", ...)), or file one (("filed", ...)); one store
        transaction, so two identical calls cannot both use one permit. Raises AccessError
        (no access rule covers the call, nobody can review it) and StoreError."""
        store = self._require_store()
        scope = scope_for_call(cluster, info)
        kind, request = await self.run(lambda: store.operation_request(self.rules, who, scope, operation, now=time.time(),
                                                                       rule_name=rule_name))
        if kind == "filed":
            self.notify("created", request)
        return kind, request

    # --- background workflow ----------------------------------------------------------------------

    async def maintain(self, now: float) -> list[tuple[str, str]]:
        """Approve due automatic approvals, expire requests and grants, and return the grants that
        ended since the last call (by this process or any other) as (grant id, why)."""
        ended, decided = await self.run(self._maintain_store, now)
        for kind, request in decided:
            self.notify(kind, request, actor="system:jitgate")
            grant = request.grant
            self.emit_workflow(f"request.{kind}", {
                "access-request": request.id, "requester": request.requester, "rule": request.rule,
                "scope": request.scope.describe(), "grant": grant.id if grant is not None else "",
                "reason": "approved automatically: no reviewer denied it in time" if kind == "auto_approved"
                else "nobody decided it before it expired"})
        for grant_id, why in ended:
            if why == "grant expired":  # a revocation is an access API call, audited as such
                self.emit_workflow("grant.expired", {"grant": grant_id, "reason": why})
        return ended

    def emit_workflow(self, kind: str, details: dict) -> None:
        for listener in self.workflow_listeners:
            try:
                listener(kind, details)
            except Exception:
                log.exception("a workflow listener failed on %s", kind)

    def tell_listeners(self, now: float, ended: list[tuple[str, str]]) -> None:
        for listener in self.listeners:
            try:
                listener(now, ended)
            except Exception:
                log.exception("a grant listener failed")

    def _maintain_store(self, now: float) -> tuple[list[tuple[str, str]], list[tuple[str, AccessRequest]]]:
        store = self._require_store()
        decided = [("auto_approved", r) for r in store.approve_due_auto(self.rules, now=now)]
        swept = store.sweep(now=now)
        decided += [("expired", r) for r in swept.expired_requests]
        ended: list[tuple[str, str]] = []
        # Every process reads the shared event history, so revocations made through another gateway
        # replica or by the CLI end this process's sessions too.
        while True:
            events = store.events_since(self.event_cursor, limit=1000)
            for event in events:
                self.event_cursor = event.id
                if event.kind in ENDED_GRANT_EVENTS and event.grant_id:
                    why = "grant revoked by " + event.actor if event.kind is EventKind.GRANT_REVOKED else "grant expired"
                    ended.append((event.grant_id, why))
            if len(events) < 1000:
                break
        return ended, decided


class _CurrentStore:
    """The service's current store, looked up on each use (the store may be reopened)."""

    def __init__(self, service: AccessService) -> None:
        self._service = service

    def __getattr__(self, name: str):
        return getattr(self._service._require_store(), name)


class _LoopNotifier:
    """API notifications come from the store thread; the notifier runs on the event loop."""

    def __init__(self, service: AccessService) -> None:
        self._service = service

    def notify(self, kind, request, actor=None, reason=None) -> None:
        service = self._service
        if service.notifier is not None and service.loop is not None:
            service.loop.call_soon_threadsafe(service.notifier.notify, kind, request, actor, reason)
