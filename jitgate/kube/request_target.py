"""Which host a request names, and path forms that others read differently from kube.

A connection to the gateway serves exactly one cluster: the CONNECT target in regular mode, the
listener's endpoint in reverse mode. A request that names another host (absolute-form target
`GET https://other.example/api/...`, or a Host / :authority for another host inside a CONNECT
tunnel) is refused rather than served from the connection's cluster, so what the caller asked
for, what is audited and what the cluster serves are one and the same.

An absolute-form target naming the cluster's own endpoint is accepted (RFC 9112 3.2.2: a server
must accept absolute-form) and forwarded in origin-form.

Path parameters (`;x=y` in a segment) are refused: Go and kube read `pods;x=y` as a name, while
other servers and proxies strip parameters and read `pods` (Tomcat-style matrix parameters).
"""

from __future__ import annotations

_DEFAULT_PORTS = {"https": 443, "http": 80}
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._:")


def split_authority(authority: str, scheme: str = "https") -> tuple[str, int] | None:
    """(lower-cased host, port) of `host[:port]` / `[v6]:port`; None when it is not one."""
    if not authority or "@" in authority:
        return None
    host, port_text = authority, ""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        host, rest = authority[1:end], authority[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    elif ":" in authority:
        return None
    if port_text:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            return None
        port = int(port_text)
    else:
        port = _DEFAULT_PORTS.get(scheme, 0)
    host = host.lower()
    if not host or not 0 < port < 65536 or not set(host) <= _HOST_CHARS:
        return None
    return host, port


def same_host(authority: str, scheme: str, expected: tuple[str, int]) -> bool:
    """Does `authority` name exactly the `expected` (host, port)? Host names compare
    case-insensitively; a missing port is the scheme's default."""
    named = split_authority(authority, scheme)
    return named is not None and named == (expected[0].lower(), expected[1])


def has_path_parameters(path: bytes) -> bool:
    """Does the path part of an origin-form target hold a `;` (a path parameter)?"""
    return b";" in path.partition(b"?")[0]
