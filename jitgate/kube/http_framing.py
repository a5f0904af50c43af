"""Request framing and header syntax, as the cluster's HTTP server will read them.

The gateway must forward each checked request as exactly one message, with exactly the headers it
checked. Two things can break that: a request whose length the gateway and the cluster could read
differently (two Content-Length headers, Content-Length with Transfer-Encoding, a coding other than
chunked), and header bytes that a later reader splits into more headers than the gateway saw (CR,
LF or NUL in a value; obs-fold continuation lines, which mitmproxy's HTTP/1 reader joins into the
previous value as "\\r\\n " and forwards as they came). Both are refused, not repaired.

`reframe` then gives every forwarded request a length the gateway set itself, so a body can never
run on into a second request (an HTTP/2 request without content-length is otherwise forwarded over
HTTP/1.1 with neither Content-Length nor Transfer-Encoding).

Messages never quote header names or values: they are the caller's bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Field = tuple[bytes, bytes]

# RFC 9110 5.1: a field name is a token. (bytes.translate with these as deletechars: C speed.)
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 5.5: no control characters in a value except HTAB (what Go's httpguts also refuses).
_CONTROL_CHARS = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")

# Go's http.DefaultMaxHeaderBytes: kube-apiserver answers 431 above it.
MAX_HEADER_BYTES = 1 << 20

# RFC 9113 8.2.2: connection-specific fields make an HTTP/2 request malformed. Forwarded over
# HTTP/1.1 they would turn into framing or an upgrade the gateway never decided on.
_H2_CONNECTION_FIELDS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_FRAMING_FIELDS = (b"content-length", b"transfer-encoding")
_FRAMING_NAME_LENGTHS = frozenset({len(b"host"), len(b"content-length"), len(b"transfer-encoding")})
# Methods whose requests carry a body by definition: sent with Content-Length even when empty, as
# Go's client does, so the cluster never waits for or guesses at one.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# The methods kube-apiserver serves (RequestInfo maps them to verbs; Go compares methods
# case-sensitively, so "get" is no GET there). CONNECT never reaches the request checks.
KUBE_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})


def method_problem(method: bytes) -> tuple[int, str] | None:
    if method in KUBE_METHODS:
        return None
    return 405, "the request method is not one the Kubernetes API serves (GET, POST, PUT, PATCH, DELETE, ...)"


def check_request_head(fields: Iterable[Field], http_version: str) -> tuple[int, str, int]:
    """(code, reason, declared length) of a request head; code 0 when it is clean.

    This runs on every call: the byte checks run once over all names and once over all values
    (C-speed translate), the loop only looks at what framing needs. The declared length is the
    Content-Length value, or -1 when there is none (chunked or HTTP/2 without content-length).
    """
    fields = fields if isinstance(fields, tuple) else tuple(fields)
    # Joined with a space: no token character, and no control character either.
    names = b" ".join(f[0] for f in fields)
    values = b" ".join(f[1] for f in fields)
    if (fields and names.translate(None, _TOKEN_CHARS) != b" " * (len(fields) - 1)) or not all(f[0] for f in fields):
        return 400, "a request header name is not a valid HTTP token", -1
    if len(values.translate(None, _CONTROL_CHARS)) != len(values):
        if b"\r\n " in values or b"\r\n\t" in values:
            return 400, "a request header is folded over several lines (obs-fold); send each header on one line", -1
        return 400, "a request header value contains a control character (CR, LF, NUL, ...)", -1
    if len(names) + len(values) + 3 * len(fields) > MAX_HEADER_BYTES:
        return 431, f"the request headers are larger than {MAX_HEADER_BYTES} bytes", -1
    http2 = http_version.startswith(("HTTP/2", "HTTP/3"))
    length = -1
    lengths = codings = hosts = 0
    chunked = False
    for name, value in fields:
        if value and (value[0] in (32, 9) or value[-1] in (32, 9)):
            # HTTP/1 readers strip this; a value the cluster would read trimmed must be checked trimmed.
            return 400, "a request header value has leading or trailing whitespace", -1
        if len(name) not in _FRAMING_NAME_LENGTHS and not http2:
            continue  # only Host, Content-Length and Transfer-Encoding matter below (lower() is not free)
        lname = name.lower()
        if lname == b"content-length":
            lengths += 1
            if not _DIGITS.match(value):
                return 400, "the Content-Length header is not a number", -1
            length = int(value)
        elif lname == b"transfer-encoding":
            codings += 1
            chunked = value.lower() == b"chunked"
        elif lname == b"host":
            hosts += 1
        if http2 and lname in _H2_CONNECTION_FIELDS:
            return 400, "an HTTP/2 request carries a connection-specific header (Connection, Transfer-Encoding, Upgrade, ...)", -1
    if lengths > 1:
        return 400, "the request has more than one Content-Length header", -1
    if hosts > 1:
        return 400, "the request has more than one Host header", -1
    if codings:
        if lengths:
            return 400, "the request has both Content-Length and Transfer-Encoding", -1
        if codings > 1 or not chunked:
            return 400, "the only Transfer-Encoding accepted is a single \"chunked\"", -1
        if http_version != "HTTP/1.1":
            return 400, f"Transfer-Encoding is not allowed in {http_version}", -1
    return 0, "", length


def reframe(fields: Iterable[Field], method: str, body_length: int) -> tuple[Field, ...]:
    """The fields with the gateway's own framing: every Content-Length and Transfer-Encoding
    removed, and one Content-Length for the body that was checked (none for a bodyless GET)."""
    kept = tuple(f for f in fields if f[0].lower() not in _FRAMING_FIELDS)
    if body_length or method in BODY_METHODS:
        kept += ((b"Content-Length", b"%d" % body_length),)
    return kept
