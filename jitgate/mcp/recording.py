"""The MCP front's exchanges in the session recordings (plain values; the addon writes them).

Each completed HTTP exchange through the front becomes one call of the caller's session, in the same
recordings folder layout as the Kubernetes gateway's (jitgate.recording.recorder: flows.mitm,
session.har, index.db), so `jitgate sessions --dir` and `mitmweb -r` read both. This module turns an
`Exchange` into what those writers take:

- `call_record`: the record in the Kubernetes side's shape (`user`, `cluster`, `request`, `decision`,
  `grant`, `rule`) that `session_for`, `call_row` and the HAR entry read. The session is the caller's
  of the hour (`anonymous-<hour>` without an identity, e.g. a 401); a held call's session is its
  access request's (`<user>-<request id>`, under the access rule that reviews it). The index row's
  cluster is `mcp:<server>` (as held calls name it), verb the JSON-RPC method (or the HTTP method),
  api group `mcp.jitgate.dev`, resource `tools`/`resources`/`prompts`, name the tool, URI or prompt.
- `masked_request`: the client's message as recorded: it was forwarded as sent, but is stored with
  every string through the front's detectors and, in tool arguments, values under a secret-sounding
  name replaced (as the audit log keeps them).
"""

from __future__ import annotations

import json
from typing import Any

from jitgate.masking.detectors import DetectorSet
from jitgate.mcp.messages import mask_secret_names, mask_strings

API_GROUP = "mcp.jitgate.dev"
RESOURCES = {"tools/call": "tools", "tools/list": "tools", "resources/read": "resources",
             "resources/list": "resources", "resources/templates/list": "resources", "prompts/get": "prompts",
             "prompts/list": "prompts"}


def call_record(ex) -> dict[str, Any]:
    """The recordings' view of one exchange (`ex`: jitgate.mcp.front.Exchange)."""
    message = ex.message
    method = message.method if message is not None and message.method else ""
    name = message.name if message is not None and isinstance(message.name, str) else ""
    approval = ex.approval or {}
    grant = str(approval.get("request") or "")
    rule = ex.rule or ""
    if grant and ex.held is not None and ex.held.rule.approval is not None:
        rule = ex.held.rule.approval.access_rule  # the access rule whose reviewers may read the session
    return {
        "auditID": ex.audit_id,
        "user": ex.caller_record(),
        "cluster": f"mcp:{ex.server.name}",
        "request": {"verb": method or ex.http_method.lower(), "apiGroup": API_GROUP if method else "",
                    "resource": RESOURCES.get(method, ""), "name": name[:1000]},
        "decision": ex.decision or ("deny" if ex.answered else "allow"),
        "reason": ex.reason,
        "rule": rule,
        "grant": grant,
    }


def masked_request(body: bytes, detectors: DetectorSet) -> bytes:
    """The client's message as the recording keeps it (the same bytes when nothing was masked)."""
    if not body:
        return body
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace")
        masked, count = detectors.mask_text(text)
        return masked.encode() if count else body
    count = 0
    params = message.get("params") if isinstance(message, dict) else None
    arguments = params.get("arguments") if isinstance(params, dict) else None
    if isinstance(arguments, (dict, list)):
        count += mask_secret_names(arguments, detectors)
    message, n = mask_strings(message, detectors)
    count += n
    if not count:
        return body
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
