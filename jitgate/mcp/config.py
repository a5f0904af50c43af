"""What the `mcp:` policy section describes: servers behind the front, trusted issuers, origins, rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from jitgate.identity.oidc import IssuerConfig
from jitgate.masking.detectors import DEFAULT_DETECTORS, DetectorSet
from jitgate.mcp.rules import Rule

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def upstream_address(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an upstream URL, as mitmproxy's reverse mode reads its target."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream must be an http:// or https:// URL, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"upstream names a host and port only (the MCP path is `path`), got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname.lower(), port


def same_resource(a: str, b: str) -> bool:
    """Resource identifiers compare exactly, except for one trailing slash (`https://x/` is `https://x`)."""
    return a == b or a.rstrip("/") == b.rstrip("/")


@dataclass(frozen=True)
class TokenExchange:
    """The caller's identity sent upstream as a short-lived token the front signs (jitgate.mcp.exchange)."""

    issuer: str
    audience: str
    signing_key: str  # PEM private key file
    lifetime: int = 300  # seconds


@dataclass(frozen=True)
class McpServer:
    """One MCP server behind the front, reached through one reverse-mode listener."""

    name: str
    upstream: str
    resource: str
    """This server's canonical URI as clients know it: tokens must name it in `aud` (RFC 8707)."""
    path: str = "/mcp"
    trusted: bool = False
    """Only a trusted server's tool annotations (readOnlyHint, destructiveHint...) are believed."""
    upstream_token_file: str | None = None
    """The front's own credential for this server (sent as `Authorization: Bearer`); never the caller's."""
    scopes: tuple[str, ...] = ()
    """Scopes every token must carry (its `scope` or `scp` claim); published as `scopes_supported`."""
    token_exchange: TokenExchange | None = None
    """Send the caller's identity as a token the front mints (never the caller's own token)."""

    @property
    def address(self) -> tuple[str, str, int]:
        return upstream_address(self.upstream)

    @property
    def metadata_path(self) -> str:
        """RFC 9728 §3.1: the well-known prefix inserted before the resource's path."""
        path = urlsplit(self.resource).path
        return WELL_KNOWN + ("" if path in ("", "/") else path.rstrip("/"))

    @property
    def metadata_url(self) -> str:
        parts = urlsplit(self.resource)
        return f"{parts.scheme}://{parts.netloc}{self.metadata_path}"


@dataclass(frozen=True)
class McpConfig:
    servers: tuple[McpServer, ...]
    issuers: tuple[IssuerConfig, ...]
    rules: tuple[Rule, ...] = ()
    allowed_origins: frozenset[str] = frozenset()
    detectors: DetectorSet = field(default=DEFAULT_DETECTORS, repr=False, compare=False)
    sources: tuple[str, ...] = ()

    def server_at(self, scheme: str, host: str, port: int) -> McpServer | None:
        key = (scheme, host.lower(), port)
        return next((s for s in self.servers if s.address == key), None)

    def origin_allowed(self, origin: str) -> bool:
        return origin.rstrip("/").lower() in self.allowed_origins
