"""JSON-RPC messages from MCP clients, and the HTTP header rules of both protocol generations.

Revision 2026-07-28 has no sessions: every request carries its protocol version in
`params._meta`, and the `MCP-Protocol-Version`, `Mcp-Method` and (for tools/call, prompts/get,
resources/read) `Mcp-Name` headers must repeat what the body says, so intermediaries can route on
headers without reading bodies. A header that disagrees with the body is refused with JSON-RPC
error -32020 and HTTP 400: the front judges the body (what the server executes), and no one behind
or beside it may be told something else. Revisions 2025-03-26 .. 2025-11-25 negotiate a version
with `initialize` and carry `Mcp-Session-Id`; the routing headers are not required there, but when a
client sends them they must agree with the body too.

Client messages are read strictly: one JSON object per POST (JSON-RPC batches, which only
2025-03-26 allowed, are refused), and an object with a duplicated key is refused, since parsers
disagree on which copy wins and the front must judge what the server will read.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MODERN_VERSIONS: tuple[str, ...] = ("2026-07-28",)
HANDSHAKE_VERSIONS: tuple[str, ...] = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
NAME_PARAMS: Mapping[str, str] = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
ROUTING_HEADERS = ("mcp-protocol-version", "mcp-method", "mcp-name")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020
# jitgate's own codes, in JSON-RPC's implementation-defined band (-32000..-32019). -32000 and
# -32001 are taken by the Python SDK (connection closed, request timeout), so the front's start at -32010.
POLICY_DENIED = -32010
APPROVAL_REQUIRED = -32011
RATE_LIMITED = -32012
GATEWAY_UNAVAILABLE = -32013


class ProtocolError(Exception):
    """A client message the front refuses before judging it: answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, status: int = 400, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message from the client."""

    kind: str  # "request", "notification" or "response"
    id: Any
    method: str | None
    params: Mapping[str, Any] | None

    @property
    def name(self) -> Any:
        """The tool name, prompt name or resource URI a name-bearing method targets (None otherwise)."""
        key = NAME_PARAMS.get(self.method or "")
        return self.params.get(key) if key and self.params is not None else None

    @property
    def meta_version(self) -> Any:
        meta = self.params.get("_meta") if self.params is not None else None
        return meta.get(PROTOCOL_VERSION_META) if isinstance(meta, Mapping) else None

    @property
    def arguments(self) -> Any:
        return self.params.get("arguments") if self.params is not None else None


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_client_message(body: bytes) -> Message:
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ProtocolError(INVALID_REQUEST, f"jitgate: the message repeats the key {str(e)!r}; "
                            "send each key once") from None
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(PARSE_ERROR, "jitgate: the request body is not JSON") from None
    if isinstance(obj, list):
        raise ProtocolError(INVALID_REQUEST, "jitgate: JSON-RPC batches are not accepted; send one message per "
                            "request (MCP 2025-06-18 and later have no batches)")
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        raise ProtocolError(INVALID_REQUEST, "jitgate: the body is not a JSON-RPC 2.0 message")
    request_id = obj.get("id")
    method = obj.get("method")
    if method is not None:
        if not isinstance(method, str) or not method:
            raise ProtocolError(INVALID_REQUEST, "jitgate: the message's method is not a string")
        if "id" in obj and not _valid_id(request_id):
            raise ProtocolError(INVALID_REQUEST, "jitgate: a request id must be a string or an integer")
        params = obj.get("params")
        if params is not None and not isinstance(params, dict):
            raise ProtocolError(INVALID_PARAMS, "jitgate: params must be an object",
                                request_id=request_id if _valid_id(request_id) else None)
        return Message("request" if "id" in obj else "notification", request_id, method, params)
    if "id" in obj and ("result" in obj) != ("error" in obj):
        return Message("response", request_id, None, None)
    raise ProtocolError(INVALID_REQUEST, "jitgate: the body is neither a JSON-RPC request, notification nor response")


_B64_SENTINEL = re.compile(r"=\?base64\?(?P<payload>.*)\?=")


def decode_header_value(value: str | None) -> str | None:
    """A header value as the client meant it: values that do not fit a header are sent as
    `=?base64?...?=`; a malformed one decodes to None (it matches nothing)."""
    if value is None:
        return None
    m = _B64_SENTINEL.fullmatch(value)
    if m is None:
        return value
    try:
        decoded = base64.b64decode(m.group("payload"), validate=True)
        if base64.b64encode(decoded).decode("ascii") != m.group("payload"):
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def generation(message: Message, version_header: str | None) -> str:
    """The protocol revision a message is sent under: a modern version, or "legacy" (initialize-era)."""
    if version_header is not None and version_header not in HANDSHAKE_VERSIONS:
        return version_header
    if message.meta_version is not None:
        return str(message.meta_version)
    return "legacy"


def check_headers(message: Message, header_lines: Iterable[tuple[str, str]]) -> str:
    """The message's protocol generation; ProtocolError(-32020, 400) when its headers contradict the body."""
    headers: dict[str, str] = {}
    for name, value in header_lines:
        key = name.lower()
        if key in ROUTING_HEADERS:
            if key in headers:
                raise _mismatch(message, f"the {key} header is sent more than once")
            headers[key] = value
    version = headers.get("mcp-protocol-version")
    era = generation(message, version)
    if message.kind == "response":
        return era
    modern = era != "legacy"
    if modern and (version is None or version != message.meta_version):
        raise _mismatch(message, "the MCP-Protocol-Version header does not match params._meta's protocol version")
    method_header = headers.get("mcp-method")
    if (modern or method_header is not None) and method_header != message.method:
        raise _mismatch(message, "the Mcp-Method header does not match the body's method")
    key = NAME_PARAMS.get(message.method or "")
    body_name = message.name
    name_header = headers.get("mcp-name")
    if key and body_name is not None and (modern or name_header is not None) \
            and decode_header_value(name_header) != body_name:
        raise _mismatch(message, f"the Mcp-Name header does not match the body's {key!r}")
    return era


def _mismatch(message: Message, why: str) -> ProtocolError:
    return ProtocolError(HEADER_MISMATCH, f"jitgate: {why}", 400, message.id if message.kind == "request" else None)


def error_body(request_id: Any, code: int, message: str, data: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}, separators=(",", ":")).encode()
