"""One JSON line per JSON-RPC message through the front (`kind: MCPMessage`).

Client messages are recorded when the front has judged them, before they are forwarded (a
refused one is recorded with the refusal); server messages when they pass, with how long the
request had been open. Arguments are recorded with secret values masked: detector matches, and
any scalar under a name that says secret (`password`, `apiKey`, `token`...). Lines go to
jitgate.audit.log.AuditLog, which fails closed: the caller of `write` refuses (or withholds) the
message when it raises.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from jitgate.masking.detectors import DetectorSet
from jitgate.mcp.messages import SECRET_NAME_MARKER, mask_strings
from jitgate.timefmt import rfc3339

API_VERSION = "jitgate.dev/v1"
KIND = "MCPMessage"
MAX_ARGUMENT_TEXT = 4096


def new_audit_id() -> str:
    return str(uuid.uuid4())


def masked_arguments(arguments: Any, detectors: DetectorSet) -> Any:
    """A copy of a tool call's arguments fit for the audit log."""
    if arguments is None:
        return None
    copy = _copy(arguments, detectors)
    masked, _ = mask_strings(copy, detectors)
    return masked


def _copy(value: Any, detectors: DetectorSet, depth: int = 0) -> Any:
    if depth > 32:
        return "[too deep]"
    if isinstance(value, dict):
        return {k: (SECRET_NAME_MARKER if detectors.is_secret_name(str(k)) and not isinstance(v, (dict, list))
                    and v is not None and not isinstance(v, bool) else _copy(v, detectors, depth + 1))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v, detectors, depth + 1) for v in value]
    if isinstance(value, str) and len(value) > MAX_ARGUMENT_TEXT:
        return value[:MAX_ARGUMENT_TEXT] + "...[truncated]"
    return value


def message_event(*, audit_id: str, stage: str, server: str, caller: Mapping[str, Any] | None,
                  http: Mapping[str, Any], message: Mapping[str, Any], decision: str, rule: str | None = None,
                  reason: str = "", duration_ms: float | None = None, session_id: str | None = None,
                  protocol: str | None = None, now: float | None = None, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "auditID": audit_id,
        "time": rfc3339(time.time() if now is None else now, milliseconds=True),
        "stage": stage,
        "server": server,
        "caller": dict(caller) if caller else None,
        "http": dict(http),
        "message": dict(message),
        "decision": decision,
    }
    if rule:
        event["rule"] = rule
    if reason:
        event["reason"] = reason
    if duration_ms is not None:
        event["durationMs"] = round(duration_ms, 3)
    if session_id:
        event["sessionId"] = session_id
    if protocol:
        event["protocolVersion"] = protocol
    event.update({k: v for k, v in extra.items() if v not in (None, [], 0, "")})
    return event
