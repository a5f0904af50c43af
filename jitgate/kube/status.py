"""metav1.Status objects: the error shape every Kubernetes client understands.

kubectl prints `Error from server (<Reason>): <message>` verbatim from these, so the message is
the user interface of every refusal the gateway makes.
"""

from __future__ import annotations

import json

# HTTP code -> StatusReason, as k8s.io/apimachinery/pkg/apis/meta/v1 defines them.
REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "AlreadyExists",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status(code: int, message: str, reason: str | None = None, details: dict | None = None) -> dict:
    """A failure `Status` object for HTTP `code`; `reason` defaults to the one Kubernetes uses."""
    obj: dict = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or REASONS.get(code, ""),
        "code": code,
    }
    if details:
        obj["details"] = details
    return obj


def status_body(code: int, message: str, reason: str | None = None, details: dict | None = None) -> bytes:
    return json.dumps(status(code, message, reason, details), separators=(",", ":")).encode()


def success(details: dict | None = None) -> dict:
    """The `Status` a delete returns when the object is already gone from the response's view."""
    obj: dict = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    if details:
        obj["details"] = details
    return obj
