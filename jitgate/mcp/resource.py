"""The front as an OAuth 2.0 protected resource, as MCP requires of a server that asks for tokens.

- RFC 9728 metadata (`resource`, `authorization_servers`: the trusted issuers,
  `bearer_methods_supported`), served at `/.well-known/oauth-protected-resource` and at the
  path-suffixed form RFC 9728 §3.1 derives from the resource's own path;
- `401` with `WWW-Authenticate: Bearer resource_metadata="..."` when no token is given, with
  `error="invalid_token"` and a description when the one given is not accepted (RFC 6750 §3);
- tokens verified by jitgate's OIDCVerifier (issuer, signature, expiry...) and bound to this
  resource: the token's `aud` must name the server's resource (RFC 8707), so a token minted for
  another service cannot be replayed here;
- `Origin` checked against an allow-list (DNS-rebinding protection): absent is fine (agents are no
  browsers), present and unlisted is 403.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jitgate.identity.oidc import (
    Identity,
    IssuerConfig,
    OIDCVerifier,
    TokenError,
    parse_unverified,
)
from jitgate.mcp.config import McpConfig, McpServer, same_resource


@dataclass(frozen=True)
class HttpAnswer:
    """A response the front gives itself, instead of the server's."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))


def metadata_document(server: McpServer, issuers: Sequence[IssuerConfig]) -> dict:
    document = {
        "resource": server.resource,
        "authorization_servers": [i.issuer_url for i in issuers],
        "bearer_methods_supported": ["header"],
        "resource_name": f"MCP server {server.name} (through jitgate)",
    }
    if server.scopes:
        document["scopes_supported"] = list(server.scopes)
    return document


class InsufficientScope(TokenError):
    """A valid token for this resource that lacks scopes the server requires (403, not 401)."""

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(f"the token lacks the scope(s) {' '.join(missing)}; ask for a token with them")
        self.missing = tuple(missing)


def metadata_answer(server: McpServer, issuers: Sequence[IssuerConfig]) -> HttpAnswer:
    return HttpAnswer(200, (("Content-Type", "application/json"), ("Cache-Control", "max-age=300")),
                      json.dumps(metadata_document(server, issuers)).encode())


def _quoted(text: str) -> str:
    """An RFC 9110 quoted-string's content: printable ASCII, `"` and `\\` escaped."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean.replace("\\", "\\\\").replace('"', '\\"')


def www_authenticate(server: McpServer, error: str | None = None, description: str | None = None) -> str:
    value = f'Bearer resource_metadata="{_quoted(server.metadata_url)}"'
    if server.scopes:
        value += f', scope="{_quoted(" ".join(server.scopes))}"'
    if error:
        value += f', error="{error}"'
    if description:
        value += f', error_description="{_quoted(description)}"'
    return value


def unauthorized(server: McpServer, error: str | None = None, description: str | None = None) -> HttpAnswer:
    body = {"error": error or "unauthorized",
            "error_description": description or "jitgate: this MCP server needs a bearer token; "
                                                "see the resource metadata for who issues them"}
    return HttpAnswer(401, JSON_HEADERS + (("WWW-Authenticate", www_authenticate(server, error, description)),),
                      json.dumps(body).encode())


def insufficient_scope(server: McpServer, description: str) -> HttpAnswer:
    """RFC 6750 §3.1 / MCP's scope challenge: 403 naming the scopes to ask for."""
    body = {"error": "insufficient_scope", "error_description": description}
    return HttpAnswer(403, JSON_HEADERS + (("WWW-Authenticate", www_authenticate(server, "insufficient_scope",
                                                                               description)),),
                      json.dumps(body).encode())


def forbidden_origin(origin: str) -> HttpAnswer:
    body = {"jsonrpc": "2.0", "id": None,
            "error": {"code": -32600, "message": f"jitgate: requests from origin {json.dumps(origin[:200])} are not "
                                                 "allowed (DNS-rebinding protection)"}}
    return HttpAnswer(403, JSON_HEADERS, json.dumps(body).encode())


def origin_problem(config: McpConfig, origins: Sequence[str]) -> str | None:
    """The offending Origin, or None: absent is allowed, one listed value is allowed."""
    if not origins:
        return None
    if len(origins) > 1:
        return ", ".join(origins)
    return None if config.origin_allowed(origins[0]) else origins[0]


def bearer_token(values: Sequence[str]) -> str | None:
    """The token of exactly one `Authorization: Bearer <token>` header; TokenError for anything else."""
    if not values:
        return None
    if len(values) > 1:
        raise TokenError("several Authorization headers were sent; send one")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("the Authorization header is not `Bearer <token>`")
    return token.strip()


def _strings(value: object, split: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _audiences_and_scopes(token: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """Read from a token whose signature was verified (the same bytes): `aud`, and `scope` (RFC 8693/9068,
    space-separated) or `scp` (a list, as some issuers write it)."""
    claims = parse_unverified(token)[1]
    scopes = _strings(claims.get("scope"), split=True) + _strings(claims.get("scp"), split=True)
    return _strings(claims.get("aud")), frozenset(scopes)


class TokenChecker:
    """OIDCVerifier, plus the audience binding to one server's resource.

    A verified token's identity and audiences are kept (keyed by the token's hash) until it expires,
    so a steady caller costs one hash and one lookup per message."""

    def __init__(self, verifier: OIDCVerifier, cache_size: int = 10000, now: Callable[[], float] = time.time) -> None:
        self.verifier = verifier
        self._cache: OrderedDict[bytes, tuple[Identity, tuple[str, ...], frozenset[str]]] = OrderedDict()
        self._cache_size = cache_size
        self._now = now

    async def check(self, token: str, server: McpServer) -> Identity:
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self._cache.get(key)
        if hit is not None and hit[0].expires_at > self._now():
            identity, audiences, scopes = hit
        else:
            identity = await self.verifier.averify(token)  # raises TokenError / IssuerUnavailable
            audiences, scopes = _audiences_and_scopes(token)
            self._cache[key] = (identity, audiences, scopes)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if not any(same_resource(a, server.resource) for a in audiences):
            raise TokenError(f"the token's audience does not name this MCP server ({server.resource}); "
                             "ask the authorization server for a token for this resource")
        missing = [s for s in server.scopes if s not in scopes]
        if missing:
            raise InsufficientScope(missing)
        return identity
