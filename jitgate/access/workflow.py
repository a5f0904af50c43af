"""The request/review/grant workflow as pure functions from state to a `Transition` the store applies."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from jitgate.access.errors import Conflict, InvalidRequest, NotAllowed
from jitgate.access.model import (
    AccessRequest,
    Decision,
    Event,
    EventKind,
    Grant,
    GrantState,
    Operation,
    Permit,
    Principal,
    RequestState,
    Review,
    Transition,
)
from jitgate.access.rules import AccessRule, ApprovalMode, choose_rule, rule_named

# How long an approved operation stays usable: the caller retries the same command soon after.
OPERATION_PERMIT_SECONDS = 3600
from jitgate.access.scope import MAX_REASON_LENGTH, SYSTEM_ACTOR, Scope
from jitgate.timefmt import format_duration, rfc3339


def new_id(prefix: str) -> str:
    """`req-` / `grant-` + 10 random base32 characters (50 bits): short, URL-safe, unguessable enough
    that ids are not enumerated (authorization never depends on them)."""
    return f"{prefix}-{base64.b32encode(os.urandom(10)).decode()[:10].lower()}"


def same_person(a: str, b: str) -> bool:
    """Whether two usernames may be one person, for the checks that need different people (never
    the requester, N distinct reviewers). Identity providers treat emails case-insensitively
    (Alice@Example.com signs in as alice@example.com), so names are compared case-folded: the
    cautious reading, since it can only refuse a review, never let one count twice."""
    return a == b or a.casefold() == b.casefold()


def check_reason(reason: str | None, required: bool, what: str = "a reason") -> str:
    reason = (reason or "").strip()
    if required and not reason:
        # `what` names either the missing thing ("a reason for the denial") or who asks for it
        # ("access rule 'x' requires a reason"): only the first takes "is required".
        raise InvalidRequest(what if " requires " in what else f"{what} is required")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidRequest(f"the reason is too long (at most {MAX_REASON_LENGTH} characters)")
    if not reason.isprintable():
        raise InvalidRequest("the reason must be one line of printable text")
    return reason


def open_request(
    rules: Sequence[AccessRule],
    requester: Principal,
    scope: Scope,
    *,
    now: float,
    duration: int | None = None,
    reason: str | None = None,
    rule_name: str | None = None,
) -> Transition:
    """A new request: pending, or approved with its grant for mode immediate."""
    groups = tuple(requester.groups)
    rule = choose_rule(rules, groups, scope, rule_name)
    if duration is None:
        duration = rule.duration_default
    if not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
        raise InvalidRequest("the duration must be a positive number of seconds")
    if duration > rule.duration_max:
        maximum = format_duration(rule.duration_max)
        raise InvalidRequest(f"duration {format_duration(duration)} is above the maximum {maximum} of access rule {rule.name!r}")
    reason = check_reason(reason, rule.require_reason, f"access rule {rule.name!r} requires a reason")
    mode = rule.approval.mode
    request = AccessRequest(
        id=new_id("req"),
        requester=requester.username,
        requester_groups=groups,
        rule=rule.name,
        scope=scope,
        duration=duration,
        reason=reason,
        state=RequestState.PENDING,
        created_at=now,
        expires_at=now + rule.request_ttl,
        auto_approve_at=now + rule.approval.auto_approve_after if mode is ApprovalMode.AUTO else None,
    )
    detail = {"rule": rule.name, "scope": scope.to_dict(), "duration": duration, "mode": str(mode)}
    created = Event(now, EventKind.REQUEST_CREATED, requester.username, request.id, reason=reason, detail=detail)
    if mode is ApprovalMode.IMMEDIATE:
        return _approve(rules, request, SYSTEM_ACTOR, "immediate approval by access rule " + repr(rule.name), now, (created,))
    return Transition(request=request, events=(created,))


def open_operation_request(
    rules: Sequence[AccessRule], requester: Principal, scope: Scope, operation: Operation, *, now: float,
    rule_name: str | None = None,
) -> Transition:
    """A request for one call a guardrail holds back, decided by the reviewers of the access rule
    the call runs under (`rule_name`) or of the first rule covering it. Always reviewed by people:
    an immediate or automatic rule does not approve an operation a guardrail asked a human about."""
    groups = tuple(requester.groups)
    rule = rule_named(rules, rule_name) if rule_name else None
    if rule is None:
        rule = choose_rule(rules, groups, scope, None)
    if not rule.approval.reviewers:
        raise NotAllowed(f"access rule {rule.name!r} names no reviewers, so nobody can approve this operation")
    reason = f"guardrail {operation.guardrail}: {operation.summary}"[:MAX_REASON_LENGTH]
    request = AccessRequest(
        id=new_id("req"), requester=requester.username, requester_groups=groups, rule=rule.name, scope=scope,
        duration=OPERATION_PERMIT_SECONDS, reason=reason, state=RequestState.PENDING, created_at=now,
        expires_at=now + rule.request_ttl, operation=operation,
    )
    detail = {"rule": rule.name, "scope": scope.to_dict(), "operation": operation.to_dict()}
    created = Event(now, EventKind.REQUEST_CREATED, requester.username, request.id, reason=reason, detail=detail)
    return Transition(request=request, events=(created,))


def operation_approvals(rule: AccessRule, request: AccessRequest) -> int:
    """Approvals an operation-bound request needs: the guardrail's count, else the rule's (at least one)."""
    op = request.operation
    return max(1, (op.required if op and op.required else None) or rule.approval.required or 1)


def review_request(
    rules: Sequence[AccessRule], request: AccessRequest, reviewer: Principal, decision: Decision | str, reason: str | None, *, now: float
) -> Transition:
    """One reviewer's approval or denial. A denial decides at once; approvals decide when
    `required` distinct people approved. Raises without changing anything when the review
    is not allowed."""
    try:
        decision = Decision(decision)
    except ValueError:
        raise InvalidRequest(f"a review decision is 'approve' or 'deny', not {decision!r}") from None
    _require_pending(request, now)
    rule = rule_named(rules, request.rule)
    if rule is None:
        raise Conflict(
            f"access rule {request.rule!r} of request {request.id} is no longer in the policy; "
            f"the request cannot be reviewed (it expires at {rfc3339(request.expires_at)})"
        )
    if same_person(reviewer.username, request.requester):
        raise NotAllowed(f"you cannot review your own request {request.id}")
    if not rule.is_reviewer(reviewer.groups):
        groups = ", ".join(rule.approval.reviewers) or "none"
        raise NotAllowed(f"you are not a reviewer of access rule {rule.name!r} (reviewer groups: {groups})")
    earlier = next((r for r in request.reviews if same_person(r.reviewer, reviewer.username)), None)
    if earlier is not None:
        raise Conflict(f"you already {'approved' if earlier.decision is Decision.APPROVE else 'denied'} request {request.id}")
    reason = check_reason(reason, decision is Decision.DENY, "a reason for the denial")

    review = Review(reviewer.username, tuple(reviewer.groups), decision, reason, now)
    reviewed = replace(request, reviews=request.reviews + (review,))
    if decision is Decision.DENY:
        denied = _decided(reviewed, RequestState.DENIED, now, reviewer.username, reason)
        events = (
            Event(now, EventKind.REVIEW_DENIED, reviewer.username, request.id, reason=reason),
            Event(now, EventKind.REQUEST_DENIED, reviewer.username, request.id, reason=reason),
        )
        return Transition(request=denied, new_review=review, events=events)

    approvals = len(reviewed.approvers)
    # A rule switched to mode immediate while this request waited: one approval is enough.
    required = 1 if rule.approval.mode is ApprovalMode.IMMEDIATE else rule.approval.required
    if request.operation is not None:
        required = operation_approvals(rule, request)
    detail = {"approvals": approvals, "required": required}
    voted = Event(now, EventKind.REVIEW_APPROVED, reviewer.username, request.id, reason=reason, detail=detail)
    if required is None or approvals < required:
        return Transition(request=reviewed, new_review=review, events=(voted,))
    t = _approve(rules, reviewed, reviewer.username, reason, now, (voted,))
    return replace(t, new_review=review)


def _approve(
    rules: Sequence[AccessRule], request: AccessRequest, actor: str, reason: str, now: float, events: tuple[Event, ...]
) -> Transition:
    """Approve and create the grant, re-checking the current policy: the rule may have changed
    since the request was made. Its clock starts now and never exceeds the rule's maximum."""
    rule = rule_named(rules, request.rule)
    if rule is None:
        raise Conflict(f"access rule {request.rule!r} is no longer in the policy; request {request.id} cannot be approved")
    if not rule.may_request(request.requester_groups):
        raise Conflict(
            f"access rule {rule.name!r} no longer lets {request.requester} request access; request {request.id} cannot be approved"
        )
    problem = rule.why_not(request.scope)
    if problem:
        raise Conflict(f"access rule {rule.name!r} no longer covers request {request.id} ({problem}); it cannot be approved")
    if request.operation is not None:
        # Nothing standing: the approval permits this one call once, for a short while.
        permit = Permit(request.id, request.requester, request.operation.digest, now, now + request.duration)
        approved = _decided(request, RequestState.APPROVED, now, actor, reason)
        approved = replace(approved, permit=permit)
        detail = {"approvers": list(request.approvers), "permit_expires_at": rfc3339(permit.expires_at),
                  "digest": request.operation.digest}
        done = Event(now, EventKind.REQUEST_APPROVED, actor, request.id, reason=reason, detail=detail)
        return Transition(request=approved, new_permit=permit, events=events + (done,))
    duration = min(request.duration, rule.duration_max)
    grant = Grant(
        id=new_id("grant"),
        request_id=request.id,
        username=request.requester,
        rule=rule.name,
        scope=request.scope,
        upstream_role=rule.upstream_role,
        starts_at=now,
        ends_at=now + duration,
    )
    approved = replace(_decided(request, RequestState.APPROVED, now, actor, reason), grant=grant)
    detail: dict[str, Any] = {"approvers": list(request.approvers), "ends_at": rfc3339(grant.ends_at), "duration": duration}
    if duration < request.duration:
        detail["shortened_from"] = request.duration  # the policy's maximum shrank since the request
    done = Event(now, EventKind.REQUEST_APPROVED, actor, request.id, grant.id, reason=reason, detail=detail)
    return Transition(request=approved, new_grant=grant, events=events + (done,))


def auto_approve(rules: Sequence[AccessRule], request: AccessRequest, *, now: float) -> Transition:
    """The delayed approval of a mode-auto request that is due. If the policy changed so that
    it can no longer be approved, the request is denied by the system, or (if the rule merely
    stopped auto-approving) left to its reviewers."""
    _require_pending(request, now)
    if request.auto_approve_at is None or request.auto_approve_at > now:
        raise Conflict(f"request {request.id} is not due for automatic approval")
    rule = rule_named(rules, request.rule)
    if rule is not None and rule.approval.mode is not ApprovalMode.AUTO:
        withdrawn = replace(request, auto_approve_at=None)
        why = f"access rule {rule.name!r} no longer approves automatically"
        event = Event(now, EventKind.AUTO_APPROVAL_WITHDRAWN, SYSTEM_ACTOR, request.id, reason=why)
        return Transition(request=withdrawn, events=(event,))
    try:
        delay = format_duration(request.auto_approve_at - request.created_at)
        return _approve(rules, request, SYSTEM_ACTOR, f"approved automatically: no reviewer denied within {delay}", now, ())
    except Conflict as e:
        denied = _decided(request, RequestState.DENIED, now, SYSTEM_ACTOR, e.message)
        return Transition(request=denied, events=(Event(now, EventKind.REQUEST_DENIED, SYSTEM_ACTOR, request.id, reason=e.message),))


def cancel_request(request: AccessRequest, actor: Principal, reason: str | None, *, now: float) -> Transition:
    if actor.username != request.requester:
        raise NotAllowed(f"only {request.requester}, who made request {request.id}, can cancel it")
    _require_pending(request, now)
    reason = check_reason(reason, False)
    cancelled = _decided(request, RequestState.CANCELLED, now, actor.username, reason)
    return Transition(request=cancelled, events=(Event(now, EventKind.REQUEST_CANCELLED, actor.username, request.id, reason=reason),))


def expire_request(request: AccessRequest, *, now: float) -> Transition:
    if request.state is not RequestState.PENDING or request.expires_at > now:
        raise Conflict(f"request {request.id} is not a pending request past its expiry")
    reason = "nobody decided within the request TTL"
    expired = _decided(request, RequestState.EXPIRED, now, SYSTEM_ACTOR, reason)
    return Transition(request=expired, events=(Event(now, EventKind.REQUEST_EXPIRED, SYSTEM_ACTOR, request.id, reason=reason),))


def revoke_grant(rules: Sequence[AccessRule], grant: Grant, actor: Principal, reason: str | None, *, now: float) -> Transition:
    """End an active grant now: by the person it was granted to, or by a reviewer of its rule."""
    if actor.username != grant.username:
        rule = rule_named(rules, grant.rule)
        if rule is None or not rule.is_reviewer(actor.groups):
            raise NotAllowed(f"only {grant.username} or a reviewer of access rule {grant.rule!r} can revoke grant {grant.id}")
    if grant.state is not GrantState.ACTIVE or grant.ends_at <= now:
        state = "expired" if grant.state is GrantState.ACTIVE else str(grant.state)
        raise Conflict(f"grant {grant.id} is {state}, not active")
    reason = check_reason(reason, True, "a reason for the revocation")
    revoked = replace(grant, state=GrantState.REVOKED, revoked_by=actor.username, revoked_at=now, revoke_reason=reason)
    event = Event(now, EventKind.GRANT_REVOKED, actor.username, grant.request_id, grant.id, reason=reason)
    return Transition(grant=revoked, events=(event,))


def expire_grant(grant: Grant, *, now: float) -> Transition:
    if grant.state is not GrantState.ACTIVE or grant.ends_at > now:
        raise Conflict(f"grant {grant.id} is not an active grant past its end")
    expired = replace(grant, state=GrantState.EXPIRED)
    event = Event(now, EventKind.GRANT_EXPIRED, SYSTEM_ACTOR, grant.request_id, grant.id, reason="the grant's time ended")
    return Transition(grant=expired, events=(event,))


def _decided(request: AccessRequest, state: RequestState, now: float, actor: str, reason: str) -> AccessRequest:
    return replace(request, state=state, decided_at=now, decided_by=actor, decision_reason=reason, auto_approve_at=None)


def _require_pending(request: AccessRequest, now: float) -> None:
    if request.state is not RequestState.PENDING:
        raise Conflict(f"request {request.id} is already {request.state}")
    if request.expires_at <= now:
        raise Conflict(f"request {request.id} expired at {rfc3339(request.expires_at)}; nobody decided in time")


