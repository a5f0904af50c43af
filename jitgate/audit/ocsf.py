"""An audit event as an OCSF 1.3 "API Activity" event (class_uid 6003, category Application Activity).

What goes where (the audit.k8s.io/v1 Event on the left):

| audit event | OCSF |
| --- | --- |
| verb | `api.operation`; `activity_id` (create 1, get/list/watch 2, update/patch 3, delete/deletecollection 4, else 99) |
| auditID | `api.request.uid`, `metadata.correlation_uid` (shared by a call's stages); `metadata.uid` is `<auditID>/<stage>` |
| stage | `metadata.event_code` |
| user.username, user.uid, user.groups | `actor.user.name`, `actor.user.uid`, `actor.user.groups[].name` |
| impersonatedUser | `unmapped.impersonatedUser` |
| sourceIPs | `src_endpoint.ip` (the first), `src_endpoint.intermediate_ips` (the rest) |
| requestURI, userAgent | `http_request.url.path` / `.query_string` / `.url_string`, `http_request.user_agent`, `http_request.http_method` (from the verb) |
| objectRef | `resources[0]`: `type` (resource[/subresource]), `name`, `data` (namespace, apiGroup, apiVersion) |
| responseStatus.code, .message, .reason | `api.response.code`, `.message`, `.error`; `http_response.code`; `status_code` |
| stageTimestamp, requestReceivedTimestamp | `time` (epoch ms), `start_time`, `metadata.original_time` |
| annotations jitgate.dev/decision | `action_id`/`action` and `disposition_id`/`disposition` (allow: 1 Allowed; deny: 2 Denied / 2 Blocked), security_control profile |
| annotations jitgate.dev/reason | `status_detail`, `message` |
| annotations jitgate.dev/cluster | `dst_endpoint.name`, `api.service.name` is "kubernetes" |
| the chain member (seq) | `metadata.sequence` |
| the original line | `raw_data` (its bytes, so the chain can be checked from the SIEM copy); the event's annotations in `unmapped` |

`status_id` is 1 Success for codes below 400 and for the RequestReceived stage (no code yet: 0
Unknown), else 2 Failure.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

VERSION = "1.3.0"
CLASS_UID = 6003
CATEGORY_UID = 6

_ACTIVITY = {"create": 1, "get": 2, "list": 2, "watch": 2, "update": 3, "patch": 3, "delete": 4, "deletecollection": 4}
_ACTIVITY_NAMES = {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}
_METHODS = {"create": "POST", "get": "GET", "list": "GET", "watch": "GET", "update": "PUT", "patch": "PATCH",
            "delete": "DELETE", "deletecollection": "DELETE"}


def _millis(text: str | None) -> int | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return int(moment.timestamp() * 1000)


def to_ocsf(event: Mapping, raw: bytes | None = None, seq: int | None = None, product_version: str = "") -> dict:
    """The OCSF API Activity event for one audit event (`raw`: the log line, kept in raw_data)."""
    verb = event.get("verb") or ""
    activity = _ACTIVITY.get(verb, 99)
    annotations = event.get("annotations") or {}
    decision = annotations.get("jitgate.dev/decision")
    status = event.get("responseStatus") or {}
    code = status.get("code")
    stage = event.get("stage", "")
    user = event.get("user") or {}
    stamp = event.get("stageTimestamp")

    ocsf_user: dict = {"name": user.get("username", "")}
    if user.get("uid"):
        ocsf_user["uid"] = user["uid"]
    if user.get("groups"):
        ocsf_user["groups"] = [{"name": g} for g in user["groups"]]

    uri = event.get("requestURI", "")
    path, _, query = uri.partition("?")
    url: dict = {"url_string": uri, "path": path}
    if query:
        url["query_string"] = query
    http_request: dict = {"url": url}
    if verb in _METHODS:
        http_request["http_method"] = _METHODS[verb]
    if event.get("userAgent"):
        http_request["user_agent"] = event["userAgent"]

    api: dict = {"operation": verb, "service": {"name": "kubernetes"}, "request": {"uid": event.get("auditID", "")}}
    ref = event.get("objectRef") or {}
    if ref.get("apiGroup") or ref.get("apiVersion"):
        api["version"] = "/".join(v for v in (ref.get("apiGroup"), ref.get("apiVersion")) if v)
    if code is not None:
        response: dict = {"code": code}
        if status.get("message"):
            response["message"] = status["message"]
        if status.get("reason"):
            response["error"] = status["reason"]
        api["response"] = response

    ips = list(event.get("sourceIPs") or [])
    src: dict = {"ip": ips[0]} if ips else {}
    if len(ips) > 1:
        src["intermediate_ips"] = ips[1:]

    metadata: dict = {
        "version": VERSION,
        "product": {"name": "jitgate", "vendor_name": "jitgate", **({"version": product_version} if product_version else {})},
        "uid": f"{event.get('auditID', '')}/{stage}",
        "correlation_uid": event.get("auditID", ""),
        "event_code": stage,
        "log_name": "audit.k8s.io/v1",
        "profiles": ["security_control"],
    }
    if stamp:
        metadata["original_time"] = stamp
    if seq is not None:
        metadata["sequence"] = seq

    out: dict = {
        "class_uid": CLASS_UID,
        "class_name": "API Activity",
        "category_uid": CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": activity,
        "activity_name": _ACTIVITY_NAMES[activity],
        "type_uid": CLASS_UID * 100 + activity,
        "type_name": f"API Activity: {_ACTIVITY_NAMES[activity]}",
        "severity_id": 1 if decision == "allow" else 3,  # Informational; Medium for refusals
        "severity": "Informational" if decision == "allow" else "Medium",
        "time": _millis(stamp) or 0,
        "metadata": metadata,
        "actor": {"user": ocsf_user},
        "api": api,
        "src_endpoint": src,
        "http_request": http_request,
    }
    start = _millis(event.get("requestReceivedTimestamp"))
    if start is not None:
        out["start_time"] = start
    if code is None:
        out["status_id"], out["status"] = 0, "Unknown"
    elif code < 400:
        out["status_id"], out["status"] = 1, "Success"
    else:
        out["status_id"], out["status"] = 2, "Failure"
    if code is not None:
        out["status_code"] = str(code)
        out["http_response"] = {"code": code}
    reason = annotations.get("jitgate.dev/reason")
    if reason:
        out["status_detail"] = reason
        out["message"] = reason
    if decision == "allow":
        out.update(action_id=1, action="Allowed", disposition_id=1, disposition="Allowed")
    elif decision == "deny":
        out.update(action_id=2, action="Denied", disposition_id=2, disposition="Blocked")
    else:
        out.update(action_id=0, action="Unknown", disposition_id=0, disposition="Unknown")
    if ref:
        resource: dict = {"type": ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")}
        if ref.get("name"):
            resource["name"] = ref["name"]
        data = {k: ref[k] for k in ("namespace", "apiGroup", "apiVersion") if ref.get(k)}
        if data:
            resource["data"] = data
        out["resources"] = [resource]
    cluster = annotations.get("jitgate.dev/cluster")
    if cluster:
        out["dst_endpoint"] = {"name": cluster}
    unmapped: dict = {}
    if annotations:
        unmapped["annotations"] = dict(annotations)
    if event.get("impersonatedUser"):
        unmapped["impersonatedUser"] = event["impersonatedUser"]
    if unmapped:
        out["unmapped"] = unmapped
    if raw is not None:
        out["raw_data"] = raw.decode("utf-8", "replace")
    return out

