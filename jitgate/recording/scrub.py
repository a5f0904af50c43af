"""No credential in any stored byte: headers, query strings and bodies scrubbed at write time.

The identity step already removed the caller's token before forwarding, and the upstream-credential
step removes the cluster credential once it was sent; recordings scrub again, defensively, because a
recording outlives the call and one missed path would keep a token for months:

- credential headers (`Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie`, and any header
  whose name says token, secret, password, credential or api key) keep their name, their value
  becomes `jitgate:removed`;
- `Sec-WebSocket-Protocol` entries `base64url.bearer.authorization.k8s.io.<token>` lose the token;
- query parameters whose name says credential (`access_token=`, `id_token=`, `X-Amz-Signature=`, the
  audit log's own list) get the marker as value;
- everywhere (header values, the target, bodies, WebSocket messages): JSON Web Tokens, EKS tokens
  (`k8s-aws-v1.`), and `Bearer <token>` text become the marker.

Works on the plain state dicts of mitmproxy flows (`Flow.get_state()`: bytes and tuples), without
importing mitmproxy.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from jitgate.kube.audit_event import is_secret_param

MARKER = "jitgate:removed"
MARKER_BYTES = MARKER.encode()

WS_TOKEN_PREFIX = b"base64url.bearer.authorization.k8s.io."
CREDENTIAL_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
CREDENTIAL_HEADER_WORDS = (b"token", b"secret", b"password", b"passwd", b"credential", b"api-key", b"apikey")

# (literal that any match holds, pattern, replacement): the literal is a cheap `in` test first.
_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_EKS = re.compile(rb"k8s-aws-v1\.[A-Za-z0-9_=-]+")
_WS_TOKEN = re.compile(rb"base64url\.bearer\.authorization\.k8s\.io\.[A-Za-z0-9_=-]+")
_BEARER = re.compile(rb"((?i:bearer)\s+)[A-Za-z0-9._~+/-]{8,}=*")


def may_hold_token(data: bytes) -> bool:
    """A cheap look first (each `in` of a multi-byte literal costs ~0.7 ns a byte; "J" is a memchr
    and rare in bodies, so JWTs cost nearly nothing to rule out)."""
    return ((b"J" in data and b"eyJ" in data) or b"k8s-aws-v1." in data or b"earer" in data or b"EARER" in data)


def scrub_bytes(data: bytes, detected: bool = False) -> bytes:
    """`data` with every token-shaped value replaced by the marker (unchanged, same object, when none).
    `detected`: the masking detectors ran on it (they mask JWTs and bearer tokens), so only the
    cluster credential's EKS token, which they do not know, is looked for. (The WebSocket token
    protocol travels in a header only: `scrub_headers` removes it.)"""
    if not data:
        return data
    if detected:
        return _EKS.sub(MARKER_BYTES, data) if b"k8s-aws-v1." in data else data
    if not may_hold_token(data):
        return data
    if b"eyJ" in data:
        data = _JWT.sub(MARKER_BYTES, data)
    if b"k8s-aws-v1." in data:
        data = _EKS.sub(MARKER_BYTES, data)
    if WS_TOKEN_PREFIX in data:
        data = _WS_TOKEN.sub(WS_TOKEN_PREFIX + MARKER_BYTES, data)
    if b"earer" in data or b"EARER" in data:
        data = _BEARER.sub(rb"\1" + MARKER_BYTES, data)
    return data


def is_credential_header(lowered_name: bytes) -> bool:
    return lowered_name in CREDENTIAL_HEADERS or any(word in lowered_name for word in CREDENTIAL_HEADER_WORDS)


# Header names seen, by their exact bytes: None (an ordinary header), "credential" or "protocols".
_NAMES: dict[bytes, str | None] = {}


def _kind(name: bytes) -> str | None:
    kind = _NAMES.get(name, "")
    if kind == "":
        lowered = name.lower()
        kind = "credential" if is_credential_header(lowered) else "protocols" if lowered == b"sec-websocket-protocol" else None
        if len(_NAMES) < 4096:
            _NAMES[name] = kind
    return kind


def scrub_headers(fields) -> tuple[tuple[bytes, bytes], ...]:
    """Header fields (name, value) as stored: credential values replaced, token-shaped text removed."""
    kinds = [_kind(name) for name, _ in fields]
    if not any(kinds) and not may_hold_token(b"\n".join(value for _, value in fields)):
        return tuple(fields)  # the usual case: one look at all values
    out = []
    for (name, value), kind in zip(fields, kinds):
        if kind == "credential":
            value = MARKER_BYTES
        elif kind == "protocols" and WS_TOKEN_PREFIX in value:
            value = b", ".join(WS_TOKEN_PREFIX + MARKER_BYTES if p.strip().startswith(WS_TOKEN_PREFIX) else p.strip()
                               for p in value.split(b","))
        else:
            value = scrub_bytes(value)
        out.append((name, value))
    return tuple(out)


def scrub_target(target: bytes) -> bytes:
    """A request target (path and query) with credential query values replaced by the marker."""
    path, sep, query = target.partition(b"?")
    if sep and query:
        pairs = query.split(b"&")
        for i, pair in enumerate(pairs):
            key, eq, _ = pair.partition(b"=")
            if key and is_secret_param(unquote(key.decode("utf-8", "replace").replace("+", " "))):
                pairs[i] = key + b"=" + MARKER_BYTES if eq else key
        target = path + b"?" + b"&".join(pairs)
    return scrub_bytes(target)


def scrub_message(message: dict | None, detected: bool = False) -> None:
    """One request or response state, in place."""
    if not message:
        return
    message["headers"] = scrub_headers(message.get("headers") or ())
    if message.get("trailers"):
        message["trailers"] = scrub_headers(message["trailers"])
    if message.get("content"):
        message["content"] = scrub_bytes(message["content"], detected)
    if "path" in message:
        message["path"] = scrub_target(message["path"])


def scrub_state(state: dict, detected: bool = False) -> dict:
    """A flow's state (`Flow.get_state()`), in place and returned: nothing in it carries a credential.
    `detected`: its bodies and messages went through the masking detectors (see `scrub_bytes`)."""
    scrub_message(state.get("request"), detected)
    scrub_message(state.get("response"), detected)
    websocket = state.get("websocket")
    if websocket:
        websocket["messages"] = [
            (kind, from_client, scrub_bytes(content, detected), *rest)
            for kind, from_client, content, *rest in websocket["messages"]
        ]
    error = state.get("error")
    if error and error.get("msg"):
        error["msg"] = scrub_bytes(error["msg"].encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
    return state
