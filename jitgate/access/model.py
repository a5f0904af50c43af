"""Requests, reviews, grants and events: the records the workflow moves between states."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from jitgate.access.scope import SYSTEM_ACTOR, Scope
from jitgate.timefmt import format_duration, rfc3339

# ---------------------------------------------------------------------------------------------
# Requests, reviews, grants, events


class Principal(Protocol):
    """A person as the workflow needs them (jitgate.oidc.Identity is one)."""

    @property
    def username(self) -> str: ...

    @property
    def groups(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Person:
    username: str
    groups: tuple[str, ...] = ()


SYSTEM = Person(SYSTEM_ACTOR)


class RequestState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class GrantState(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


@dataclass(frozen=True)
class Review:
    reviewer: str
    groups: tuple[str, ...]
    decision: Decision
    reason: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "reviewer": self.reviewer,
            "groups": list(self.groups),
            "decision": str(self.decision),
            "reason": self.reason,
            "at": rfc3339(self.at),
        }


@dataclass(frozen=True)
class Grant:
    id: str
    request_id: str
    username: str
    rule: str
    scope: Scope
    upstream_role: str | None
    starts_at: float
    ends_at: float
    state: GrantState = GrantState.ACTIVE
    revoked_by: str | None = None
    revoked_at: float | None = None
    revoke_reason: str | None = None

    @property
    def cluster(self) -> str:
        return self.scope.cluster

    def is_active(self, now: float) -> bool:
        return self.state is GrantState.ACTIVE and self.starts_at <= now < self.ends_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "username": self.username,
            "rule": self.rule,
            "scope": self.scope.to_dict(),
            "upstream_role": self.upstream_role,
            "state": str(self.state),
            "starts_at": rfc3339(self.starts_at),
            "ends_at": rfc3339(self.ends_at),
            "revoked_by": self.revoked_by,
            "revoked_at": rfc3339(self.revoked_at),
            "revoke_reason": self.revoke_reason,
        }


@dataclass(frozen=True)
class Operation:
    """The one API call an operation-bound request is about (a guardrail's require-approval): its
    approval permits exactly this call once, recognised by `digest` (method, target and body)."""

    digest: str
    method: str
    path: str
    summary: str  # what a reviewer reads: "delete deployments/web in prod on dev"
    guardrail: str
    required: int | None = None  # approvals the guardrail asks for; None: the access rule's count

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "method": self.method, "path": self.path, "summary": self.summary,
                "guardrail": self.guardrail, "required": self.required}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Operation:
        return cls(d["digest"], d["method"], d["path"], d["summary"], d["guardrail"], d.get("required"))


@dataclass(frozen=True)
class Permit:
    """What approving an operation-bound request creates instead of a grant: one use of one call."""

    request_id: str
    username: str
    digest: str
    created_at: float
    expires_at: float
    used_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"created_at": rfc3339(self.created_at), "expires_at": rfc3339(self.expires_at),
                "used_at": rfc3339(self.used_at), "used": self.used_at is not None}


@dataclass(frozen=True)
class AccessRequest:
    id: str
    requester: str
    requester_groups: tuple[str, ...]  # as they were when the request was made
    rule: str
    scope: Scope
    duration: int  # seconds asked for
    reason: str
    state: RequestState
    created_at: float
    expires_at: float  # a pending request nobody decided expires then
    auto_approve_at: float | None = None
    decided_at: float | None = None
    decided_by: str | None = None
    decision_reason: str | None = None
    reviews: tuple[Review, ...] = ()
    grant: Grant | None = None
    operation: Operation | None = None  # set: the request is for this one call only, never standing access
    permit: Permit | None = None  # an approved operation-bound request's one-use permit

    @property
    def cluster(self) -> str:
        return self.scope.cluster

    @property
    def approvers(self) -> tuple[str, ...]:
        return tuple(r.reviewer for r in self.reviews if r.decision is Decision.APPROVE)

    def review_by(self, username: str) -> Review | None:
        return next((r for r in self.reviews if r.reviewer == username), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": str(self.state),
            "requester": self.requester,
            "requester_groups": list(self.requester_groups),
            "rule": self.rule,
            "scope": self.scope.to_dict(),
            "duration": format_duration(self.duration),
            "duration_seconds": self.duration,
            "reason": self.reason,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "auto_approve_at": rfc3339(self.auto_approve_at),
            "decided_at": rfc3339(self.decided_at),
            "decided_by": self.decided_by,
            "decision_reason": self.decision_reason,
            "approvals": len(self.approvers),
            "reviews": [r.to_dict() for r in self.reviews],
            "grant": self.grant.to_dict() if self.grant else None,
            "operation": self.operation.to_dict() if self.operation else None,
            "permit": self.permit.to_dict() if self.permit else None,
        }


class EventKind(StrEnum):
    REQUEST_CREATED = "request.created"
    REVIEW_APPROVED = "review.approved"  # one reviewer's approval, the request may stay pending
    REVIEW_DENIED = "review.denied"
    REQUEST_APPROVED = "request.approved"  # the request is approved and its grant created
    REQUEST_DENIED = "request.denied"
    REQUEST_EXPIRED = "request.expired"
    REQUEST_CANCELLED = "request.cancelled"
    AUTO_APPROVAL_WITHDRAWN = "request.auto_approval_withdrawn"
    PERMIT_USED = "permit.used"  # an approved operation was let through (once)
    GRANT_EXPIRED = "grant.expired"
    GRANT_REVOKED = "grant.revoked"


@dataclass(frozen=True)
class Event:
    """One line of the append-only history: who did what, when, why."""

    at: float
    kind: EventKind
    actor: str
    request_id: str | None
    grant_id: str | None = None
    reason: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None  # assigned by the store

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": rfc3339(self.at),
            "kind": str(self.kind),
            "actor": self.actor,
            "request_id": self.request_id,
            "grant_id": self.grant_id,
            "reason": self.reason,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True)
class Transition:
    """What one workflow step changes; a store applies all of it in one transaction."""

    request: AccessRequest | None = None  # the request after the step (new or updated)
    new_review: Review | None = None
    new_grant: Grant | None = None
    new_permit: Permit | None = None  # an approved operation-bound request's one-use permit
    grant: Grant | None = None  # an existing grant after the step (revoked, expired)
    events: tuple[Event, ...] = ()


