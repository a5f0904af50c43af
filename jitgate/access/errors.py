"""Why an access operation was refused, as an HTTP status the API and the CLI can show."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Errors


class AccessError(Exception):
    """A refused access operation. `message` is written for the person who asked, and `status`
    and `reason` are the HTTP code and metav1 StatusReason to answer with."""

    status = 400
    reason = "BadRequest"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class InvalidRequest(AccessError):
    """Malformed input: bad scope, unknown rule, duration above the maximum, missing reason."""


class NotAllowed(AccessError):
    """The person may not do this: not a requester or reviewer of the rule, or their own request."""

    status = 403
    reason = "Forbidden"


class NotFound(AccessError):
    status = 404
    reason = "NotFound"


class Conflict(AccessError):
    """The request or grant is not in a state that allows this (decided, expired, reviewed)."""

    status = 409
    reason = "Conflict"


class StoreError(AccessError):
    """The grant store cannot answer (raised by jitgate.store backends); callers deny (fail closed)."""

    status = 503
    reason = "ServiceUnavailable"

    def __init__(self, message: str) -> None:
        super().__init__(f"grant store unavailable: {message}")
