"""Audit events in the kube-apiserver's `audit.k8s.io/v1` Event shape, and the log they go to.

Field names and omission rules follow k8s.io/apiserver/pkg/apis/audit/v1/types.go (`Event`,
`ObjectReference`) and authentication/v1 `UserInfo`; how they are filled follows
k8s.io/apiserver/pkg/audit/request.go (`LogRequestMetadata`), so tools that read the cluster's
own audit log read the gateway's too. The gateway adds its decision, grant and approvers as
annotations, as kube-apiserver does with `authorization.k8s.io/decision`.

The log is JSON lines on an append-only file. Each event is one `os.write` of one whole line on
an `O_APPEND` descriptor: Linux appends such a write to a regular file in one piece, so several
threads and processes can share one log without interleaving lines. Any failure raises
`AuditLogError`; the caller refuses the API call rather than let it through unrecorded.
"""

from __future__ import annotations

import json

import time
import uuid
from collections.abc import Mapping, Sequence
from urllib.parse import unquote

from jitgate.kube.request_info import RequestInfo
from jitgate.kube.status import REASONS

API_VERSION = "audit.k8s.io/v1"
LEVELS = frozenset({"None", "Metadata", "Request", "RequestResponse"})
STAGES = frozenset({"RequestReceived", "ResponseStarted", "ResponseComplete", "Panic"})

# audit/request.go: maxUserAgentLength, userAgentTruncateSuffix.
MAX_USER_AGENT_LENGTH = 1024
USER_AGENT_TRUNCATE_SUFFIX = "...TRUNCATED"

REDACTED = "REDACTED"
# A query parameter whose (lower-cased) name contains one of these carries a credential in
# some client (access_token, id_token, X-Amz-Security-Token, X-Amz-Signature, client_secret,
# password...). No Kubernetes API parameter contains any of them, so none is hidden by mistake.
SECRET_PARAM_WORDS = (
    "token",
    "secret",
    "passw",
    "credential",
    "signature",
    "apikey",
    "api_key",
    "api-key",
    "auth",
    "session",
    "jwt",
    "assertion",
)
# ...and these are credentials on their own: SAS signatures, OAuth codes, bare keys.
SECRET_PARAM_NAMES = frozenset({"sig", "code", "key", "pwd", "pass"})


def new_audit_id() -> str:
    return str(uuid.uuid4())


# The formatted second of the last timestamp: events of one second (most of them) reuse it, which
# halves micro_time's cost; each event formats two timestamps.
_last_second: tuple[int, str] = (-1, "")


def micro_time(timestamp: float) -> str:
    """A Unix timestamp as metav1.MicroTime serializes it: RFC 3339, UTC, microseconds."""
    global _last_second
    micros = round(timestamp * 1_000_000)
    seconds, fraction = divmod(micros, 1_000_000)
    cached = _last_second
    if cached[0] != seconds:
        cached = _last_second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{cached[1]}.{fraction:06d}Z"


def is_secret_param(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_PARAM_NAMES or any(word in lowered for word in SECRET_PARAM_WORDS)


def redact_request_uri(uri: str) -> str:
    """`uri` with the values of credential-bearing query parameters replaced by REDACTED.

    Everything else is kept byte for byte, as the apiserver records `URL.RequestURI()`.
    A fragment (never sent by HTTP clients) is dropped.
    """
    uri = uri.partition("#")[0]
    path, sep, query = uri.partition("?")
    if not sep or not query:
        return uri
    pairs = query.split("&")
    for i, pair in enumerate(pairs):
        key, eq, _ = pair.partition("=")
        if key and is_secret_param(unquote(key.replace("+", " "))):
            pairs[i] = f"{key}={REDACTED}" if eq else key
    return f"{path}?{'&'.join(pairs)}"


MAX_NAMED_BODY = 3 * 1024 * 1024  # a create's body read for its object's name (etcd's object limit is ~1.5 MB)


def name_from_body(body: bytes | None, content_type: str) -> str:
    """The `metadata.name` of a JSON object in a create's body ("" when there is none or it cannot
    be read): kube-apiserver completes a create's objectRef with it, the URL has no name."""
    if not body or len(body) > MAX_NAMED_BODY or "json" not in content_type.lower():
        return ""
    try:
        obj = json.loads(body)
    except ValueError:
        return ""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


def object_ref_from(info: RequestInfo, body_name: str = "") -> dict | None:
    """The `objectRef` the apiserver records for a request: only resource requests have one. A
    create names the object from its body (`body_name`), as kube-apiserver's audit does."""
    if not info.is_resource_request:
        return None
    return _drop_empty(
        {
            "resource": info.resource,
            "namespace": info.namespace,
            "name": info.name or (body_name if info.verb == "create" and not info.subresource else ""),
            "apiGroup": info.api_group,
            "apiVersion": info.api_version,
            "subresource": info.subresource,
        }
    )


def user_info(user: Mapping) -> dict:
    """authentication/v1 UserInfo: username, uid, groups, extra (each omitted when empty)."""
    info: dict = {}
    if user.get("username"):
        info["username"] = user["username"]
    if user.get("uid"):
        info["uid"] = user["uid"]
    if user.get("groups"):
        info["groups"] = list(user["groups"])
    if user.get("extra"):
        info["extra"] = {k: [v] if isinstance(v, str) else list(v) for k, v in user["extra"].items()}
    return info


def response_status(code: int, message: str | None = None, reason: str | None = None) -> dict:
    """The `responseStatus` (a metav1.Status): only the code for successes, as kube records
    them; status, message and reason as well for failures."""
    status: dict = {"metadata": {}}
    failed = code >= 400
    if failed:
        status["status"] = "Failure"
    if message:
        status["message"] = message
    reason = reason or (REASONS.get(code) if failed else None)
    if reason:
        status["reason"] = reason
    status["code"] = code
    return status


def build_event(
    *,
    audit_id: str,
    stage: str,
    request_uri: str,
    verb: str,
    user: Mapping,
    source_ips: Sequence[str],
    user_agent: str,
    object_ref: Mapping | None,
    response_code: int | None,
    response_message: str | None = None,
    request_received: float,
    stage_timestamp: float,
    annotations: Mapping[str, str],
    impersonated_user: Mapping | None = None,
    level: str = "Metadata",
    response_reason: str | None = None,
) -> dict:
    """An `audit.k8s.io/v1` Event, keys in the order and with the omissions kube uses."""
    if stage not in STAGES:
        raise ValueError(f"unknown audit stage {stage!r}")
    if level not in LEVELS:
        raise ValueError(f"unknown audit level {level!r}")
    if len(user_agent) > MAX_USER_AGENT_LENGTH:
        user_agent = user_agent[:MAX_USER_AGENT_LENGTH] + USER_AGENT_TRUNCATE_SUFFIX
    event: dict = {
        "kind": "Event",
        "apiVersion": API_VERSION,
        "level": level,
        "auditID": audit_id,
        "stage": stage,
        "requestURI": redact_request_uri(request_uri),
        "verb": verb,
        "user": user_info(user),
    }
    if impersonated_user:
        event["impersonatedUser"] = user_info(impersonated_user)
    if source_ips:
        event["sourceIPs"] = list(source_ips)
    if user_agent:
        event["userAgent"] = user_agent
    if object_ref:
        event["objectRef"] = _drop_empty(object_ref)
    if response_code is not None:
        event["responseStatus"] = response_status(response_code, response_message, response_reason)
    event["requestReceivedTimestamp"] = micro_time(request_received)
    event["stageTimestamp"] = micro_time(stage_timestamp)
    if annotations:
        event["annotations"] = dict(annotations)
    return event


def _drop_empty(fields: Mapping) -> dict:
    return {k: v for k, v in fields.items() if v}


