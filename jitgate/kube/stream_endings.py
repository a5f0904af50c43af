"""The last message of a session the gateway ends, in each protocol's own way.

When a grant ends under a live session, the client is told why before the connection closes:

- a watch gets an `ERROR` event whose object is a metav1.Status (kubectl prints
  `Error from server (Forbidden): <message>` and exits);
- an exec or attach session (WebSocket `v5.channel.k8s.io` / `v4.channel.k8s.io`) gets a Status on
  the error channel (3), which kubectl prints as the command's error; the older `channel.k8s.io`
  carries plain text there, `base64.channel.k8s.io` the same in base64 after an ASCII channel digit;
- a followed log, which has no error shape, gets a final line.
"""

from __future__ import annotations

import base64
import json

from jitgate.kube.status import status

ERROR_CHANNEL = 3
# The reason and code of a session the gateway ended: access was withdrawn.
ENDED_CODE = 403


def ended_status(message: str) -> dict:
    return status(ENDED_CODE, message)


def watch_error_event(message: str) -> bytes:
    """One JSON watch event line: `{"type":"ERROR","object":<Status>}`."""
    return json.dumps({"type": "ERROR", "object": ended_status(message)}, separators=(",", ":")).encode() + b"\n"


def exec_error_frames(subprotocol: str, message: str) -> list[bytes]:
    """The error-channel message that ends an exec/attach session for the negotiated subprotocol
    (then the WebSocket is closed normally: the client reads the error channel to its end). Empty
    for a subprotocol the gateway cannot speak (it only closes)."""
    proto = subprotocol.strip().lower()
    body = json.dumps(ended_status(message), separators=(",", ":")).encode()
    if proto in ("v5.channel.k8s.io", "v4.channel.k8s.io"):
        return [bytes([ERROR_CHANNEL]) + body]
    if proto in ("v5.base64.channel.k8s.io", "v4.base64.channel.k8s.io"):
        return [str(ERROR_CHANNEL).encode() + base64.b64encode(body)]
    if proto in ("channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io"):
        return [bytes([ERROR_CHANNEL]) + message.encode()]
    if proto in ("base64.channel.k8s.io", "v2.base64.channel.k8s.io", "v3.base64.channel.k8s.io"):
        return [str(ERROR_CHANNEL).encode() + base64.b64encode(message.encode())]
    return []


def websocket_close_frame(code: int = 1000, reason: str = "") -> bytes:
    """An unmasked WebSocket close frame, as a server sends it (RFC 6455 5.5.1)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes([0x88, len(payload)]) + payload


def log_final_line(message: str) -> bytes:
    """A followed log's last line (kube sends whole lines: the log's last one is finished)."""
    return message.replace("\n", " ").encode() + b"\n"


def stream_ending(content_type: str, content_encoding: str, is_log: bool, message: str) -> bytes | None:
    """The bytes that end a streamed HTTP response the client reads as `content_type`, or None when
    there is no safe way to add any (a compressed or protobuf stream: it is only closed)."""
    if content_encoding.strip().lower() not in ("", "identity"):
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if is_log:
        return log_final_line(message) if media in ("", "text/plain") else None
    if media == "application/json":
        return watch_error_event(message)
    return None
