"""Verify OIDC ID tokens and map their claims to a Kubernetes-style identity.

The semantics follow kube-apiserver's OIDC authenticator (and kube-oidc-proxy, which reuses it):
the token's `iss` selects the issuer configuration, keys come from the issuer's discovery document
and JWKS, `aud` must name one of the configured client IDs, the username comes from a claim with an
optional prefix (`<issuer>#` by default unless the claim is `email`), groups from another claim.

Token types (the JOSE header's `typ`): by default an issuer's tokens are ID tokens, and an OAuth access
token (`typ: at+jwt`, RFC 9068) is refused, so an access token a client got for some other resource
is never taken as proof of who the caller is. An issuer configured with `token_types` including
`at+jwt` (the MCP front's authorization servers, and the front's own token exchange on the Kubernetes
side) accepts access tokens; `token_types: [at+jwt]` alone accepts nothing else. An issuer may also
name a local JWKS file instead of discovery (`jwks_file`): an issuer that is no web service, such as
the MCP front's token exchange.

Verification is on the per-request hot path, so a verified token's identity is cached (keyed by a
hash of the token) until the token expires: steady state costs one hash and one dict lookup and
never touches the identity provider. Nothing here logs or echoes a token or any part of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import http.client
import json
import logging
import math
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

logger = logging.getLogger("jitgate.identity.oidc")

# Only signature algorithms whose verification key is public. HMAC ("HS*") would make the IdP's
# public key a shared secret (algorithm confusion) and "none" is no signature at all.
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

MAX_TOKEN_LENGTH = 64 * 1024
MAX_DOCUMENT_SIZE = 1024 * 1024
FETCH_TIMEOUT = 5.0
_LATEST_TIME = 253402300799  # 9999-12-31: bounds absurd (huge integer) expiry claims
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
ID_TOKEN_TYPE = "JWT"  # `typ` absent, `JWT`, or anything but at+jwt: how ID tokens come
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1 (also written `application/at+jwt`)
TOKEN_TYPES = (ID_TOKEN_TYPE, ACCESS_TOKEN_TYPE)


def token_type(typ: object) -> str:
    """The kind of token a JOSE `typ` header names: ACCESS_TOKEN_TYPE or ID_TOKEN_TYPE."""
    text = str(typ if typ is not None else "").lower()
    text = text.removeprefix("application/")
    return ACCESS_TOKEN_TYPE if text == ACCESS_TOKEN_TYPE else ID_TOKEN_TYPE


class TokenError(Exception):
    """The token is not accepted. `reason` is safe to show to the caller and to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IssuerUnavailable(TokenError):
    """The token could not be checked because its issuer's discovery document or keys are out of
    reach. Still a denial, but the caller may answer 503 rather than 401."""


class _NeedsIO(Exception):
    """Raised on the no-I/O path when verification would have to reach the issuer."""


def _https_url(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: must be a non-empty https:// URL")
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{name}: must be an https:// URL, got {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{name}: must not carry a query, fragment or credentials, got {value!r}")
    return value


def _string_tuple(value: object, name: str, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name}: must be a list of strings")
    items = tuple(value)
    if not items and not allow_empty:
        raise ValueError(f"{name}: must not be empty")
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{name}: every entry must be a non-empty string, got {item!r}")
    return items


def _non_empty_str(value: object, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: must be a non-empty string")


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted identity provider and how its tokens map to a username and groups."""

    issuer_url: str
    audiences: tuple[str, ...]
    """Client IDs accepted in the token's `aud`."""
    username_claim: str = "sub"
    username_prefix: str | None = None
    """None: `<issuer_url>#` unless the username claim is `email`; "-": no prefix."""
    groups_claim: str = "groups"
    groups_prefix: str = ""
    required_claims: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Claims the token must carry with exactly these string values."""
    algorithms: tuple[str, ...] = ("RS256",)
    ca_file: str | None = None
    """CA bundle that verifies the issuer's TLS certificate; None uses the system store."""
    discovery_url: str | None = None
    """Defaults to `<issuer_url>/.well-known/openid-configuration`."""
    jwks_min_refresh_interval: float = 30.0
    """An unknown `kid` refetches the JWKS at most this often (forged kids cannot hammer the IdP)."""
    jwks_max_age: float = 3600.0
    """Keys are refetched after this long so keys the IdP has retired stop being trusted."""
    token_types: tuple[str, ...] = (ID_TOKEN_TYPE,)
    """Accepted kinds of token: `JWT` (ID tokens) and/or `at+jwt` (OAuth access tokens, RFC 9068)."""
    jwks_file: str | None = None
    """Keys from this local JWKS file instead of discovery (re-read like a fetched JWKS)."""

    def __post_init__(self) -> None:
        _https_url(self.issuer_url, "issuer_url")
        object.__setattr__(self, "audiences", _string_tuple(self.audiences, "audiences"))
        _non_empty_str(self.username_claim, "username_claim")
        if self.username_prefix is not None and not isinstance(self.username_prefix, str):
            raise ValueError("username_prefix: must be a string (\"-\" for no prefix) or unset")
        _non_empty_str(self.groups_claim, "groups_claim")
        if not isinstance(self.groups_prefix, str):
            raise ValueError("groups_prefix: must be a string")
        if not isinstance(self.required_claims, Mapping):
            raise ValueError("required_claims: must be a mapping of claim name to string value")
        for name, value in self.required_claims.items():
            if not isinstance(name, str) or not name or not isinstance(value, str):
                raise ValueError(f"required_claims: {name!r} must map a claim name to a string value")
        object.__setattr__(self, "required_claims", MappingProxyType(dict(self.required_claims)))
        algorithms = _string_tuple(self.algorithms, "algorithms")
        for alg in algorithms:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"algorithms: {alg!r} is not allowed; only asymmetric signature algorithms "
                    f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))}) may be configured"
                )
        object.__setattr__(self, "algorithms", algorithms)
        if self.ca_file is not None and not (isinstance(self.ca_file, str) and os.path.isfile(self.ca_file)):
            raise ValueError(f"ca_file: {self.ca_file!r} is not a readable file")
        if self.discovery_url is not None:
            _https_url(self.discovery_url, "discovery_url")
        types = _string_tuple(self.token_types, "token_types")
        for kind in types:
            if kind not in TOKEN_TYPES:
                raise ValueError(f"token_types: {kind!r} is not one of {', '.join(TOKEN_TYPES)}")
        object.__setattr__(self, "token_types", tuple(dict.fromkeys(types)))
        if self.jwks_file is not None:
            if not (isinstance(self.jwks_file, str) and os.path.isfile(self.jwks_file)):
                raise ValueError(f"jwks_file: {self.jwks_file!r} is not a readable file")
            if self.discovery_url is not None:
                raise ValueError("jwks_file: an issuer's keys come from a JWKS file or from discovery, not both")
        for name in ("jwks_min_refresh_interval", "jwks_max_age"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: must be a number of seconds >= 0")

    @property
    def effective_username_prefix(self) -> str:
        if self.username_prefix is None:
            return "" if self.username_claim == "email" else f"{self.issuer_url}#"
        if self.username_prefix == "-":
            return ""
        return self.username_prefix

    @property
    def effective_discovery_url(self) -> str:
        return self.discovery_url or f"{self.issuer_url.rstrip('/')}/.well-known/openid-configuration"


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the caller is, in Kubernetes user-info terms."""

    username: str
    groups: tuple[str, ...]
    issuer: str
    subject: str
    expires_at: float
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}), hash=False)


def _quote(value: object, limit: int = 80) -> str:
    """Quote a claim value for a reason: JSON-escaped (no control characters) and bounded."""
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value[:5])
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text)


def _check_name(name: str, claim: str) -> None:
    """A username or group goes into `Impersonate-*` headers, audit lines and approvals as it is:
    it must be one printable line without surrounding whitespace. A CR/LF would split the header
    (a second `Impersonate-Group: system:masters`), a leading space or tab is trimmed by the cluster's
    header parser after the reserved-name check saw it, and format characters (bidi overrides,
    zero-width joiners) make two names look alike to a reviewer."""
    if not name.isprintable() or name != name.strip():
        raise TokenError(f"token claim {_quote(claim)} holds a name with control characters or leading or "
                         "trailing whitespace")
    if not name:
        raise TokenError(f"token claim {_quote(claim)} holds an empty name")


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def parse_unverified(token: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a compact JWS into its header and payload, without checking anything else.

    Used only to pick the issuer and key; every claim is checked again after the signature."""
    if not isinstance(token, str) or not token:
        raise TokenError("token is not a JWT")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token is too large")
    segments = token.split(".")
    if not all(_SEGMENT.fullmatch(s) for s in segments) or not segments[0]:
        raise TokenError("token is not a JWT")
    if len(segments) == 5:
        raise TokenError("token is encrypted (JWE); a signed ID token is required")
    if len(segments) != 3 or not segments[1]:
        raise TokenError("token is not a JWT")
    try:
        header = json.loads(_b64decode(segments[0]))
        payload = json.loads(_b64decode(segments[1]))
    except (binascii.Error, ValueError):
        raise TokenError("token is not a JWT") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenError("token is not a JWT")
    return header, payload


@dataclass(frozen=True)
class _Key:
    kid: str | None
    alg: str | None
    """The JWK's own `alg`, when it names one: then only that algorithm may use the key."""
    public_key: Any

    def accepts(self, alg: str) -> bool:
        """Whether a token signed with `alg` may be checked with this key (no algorithm confusion)."""
        if self.alg is not None and self.alg != alg:
            return False
        key = self.public_key
        if alg.startswith(("RS", "PS")):
            return isinstance(key, rsa.RSAPublicKey)
        if alg in _EC_CURVES:
            return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[alg]
        if alg == "EdDSA":
            return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        return False


@dataclass(frozen=True)
class _KeySet:
    keys: tuple[_Key, ...]
    fetched_at: float

    def find(self, kid: str | None) -> list[_Key]:
        if kid is None:
            return list(self.keys)
        return [k for k in self.keys if k.kid == kid]


def parse_jwks(document: object) -> tuple[_Key, ...]:
    """The signature keys of a JWKS document. Symmetric and unusable keys are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS document has no \"keys\" list")
    keys: list[_Key] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        alg = entry.get("alg")
        if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
            continue
        try:
            key = jwt.PyJWK(entry).key
        except jwt.PyJWTError as e:
            logger.debug("skipping unusable JWKS key: %s", e)
            continue
        if hasattr(key, "private_bytes"):
            logger.warning("JWKS publishes a private key; using only its public part")
            key = key.public_key()
        kid = entry.get("kid")
        keys.append(_Key(kid if isinstance(kid, str) else None, alg, key))
    return tuple(keys)


class _Issuer:
    """Per-issuer state: where its keys are, the keys themselves and when they were fetched."""

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.ssl_context = ssl.create_default_context(cafile=config.ca_file)
        self.lock = threading.Lock()
        self.jwks_uri: str | None = None
        self.keyset: _KeySet | None = None
        self.failed_at = -math.inf
        self.failure = ""


class OIDCVerifier:
    """Verifies ID tokens from a fixed set of trusted issuers."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        clock_skew: float = 60,
        cache_size: int = 10000,
        now: Callable[[], float] = time.time,
        retry_interval: float = 5.0,
    ) -> None:
        """
        `clock_skew`: seconds an `nbf`/`iat` may lie in the future (expiry is strict).
        `cache_size`: verified tokens remembered (LRU, each until its `exp`); 0 disables the cache.
        `now`: the clock for every time check and refresh interval (injectable for tests).
        `retry_interval`: after a failed fetch the issuer is not contacted again for this long,
        so a down IdP does not turn every request into a multi-second timeout.
        """
        self._issuers: dict[str, _Issuer] = {}
        for config in issuers:
            if not isinstance(config, IssuerConfig):
                raise TypeError(f"issuers: expected IssuerConfig, got {type(config).__name__}")
            if config.issuer_url in self._issuers:
                raise ValueError(f"issuers: {config.issuer_url!r} is configured twice")
            self._issuers[config.issuer_url] = _Issuer(config)
        if not clock_skew >= 0 or not cache_size >= 0 or not retry_interval >= 0:
            raise ValueError("clock_skew, cache_size and retry_interval must be >= 0")
        self._clock_skew = clock_skew
        self._cache_size = cache_size
        self._now = now
        self._retry_interval = retry_interval
        self._cache: OrderedDict[bytes, Identity] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._jws = jwt.PyJWS(algorithms=sorted(ASYMMETRIC_ALGORITHMS), options={"enforce_minimum_key_length": True})
        self.stats: dict[str, int] = {"discovery_fetches": 0, "jwks_fetches": 0, "cache_hits": 0, "cache_misses": 0}

    @property
    def issuers(self) -> tuple[IssuerConfig, ...]:
        return tuple(i.config for i in self._issuers.values())

    # -- public entry points ---------------------------------------------------------------

    def verify(self, token: str) -> Identity:
        """Verify a token; may fetch discovery/JWKS (blocking) on a cold cache."""
        key = _cache_key(token)
        identity = self._cached(key)
        if identity is None:
            identity = self._verify_and_store(token, key, allow_io=True)
        return identity

    def verify_cached(self, token: str) -> Identity | None:
        """The identity of an already verified, unexpired token; never does I/O."""
        return self._cached(_cache_key(token))

    async def averify(self, token: str) -> Identity:
        """Like verify(), but network work runs in a thread so the event loop is never blocked.

        Cache hits and tokens checkable with keys already at hand are answered inline."""
        key = _cache_key(token)
        identity = self._cached(key)
        if identity is not None:
            return identity
        try:
            return self._verify_and_store(token, key, allow_io=False)
        except _NeedsIO:
            return await asyncio.to_thread(self._verify_and_store, token, key, True)

    def prefetch(self) -> None:
        """Fetch discovery and JWKS of every issuer (at startup). Failures are logged, not raised."""
        for issuer in self._issuers.values():
            try:
                with issuer.lock:
                    self._fetch_keys(issuer)
            except IssuerUnavailable as e:
                logger.warning("%s", e.reason)

    # -- cache -----------------------------------------------------------------------------

    def _cached(self, key: bytes) -> Identity | None:
        now = self._now()
        with self._cache_lock:
            identity = self._cache.get(key)
            if identity is not None and identity.expires_at > now:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return identity
            if identity is not None:
                del self._cache[key]
            self.stats["cache_misses"] += 1
            return None

    def _verify_and_store(self, token: str, key: bytes, allow_io: bool) -> Identity:
        identity = self._verify_uncached(token, allow_io)
        if self._cache_size:
            with self._cache_lock:
                self._cache[key] = identity
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return identity

    # -- verification ----------------------------------------------------------------------

    def _verify_uncached(self, token: str, allow_io: bool) -> Identity:
        header, unverified = parse_unverified(token)
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise TokenError("token has no issuer (iss)")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise TokenError(f"token issuer {_quote(iss)} is not trusted")

        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise TokenError("token has no algorithm (alg)")
        if alg not in issuer.config.algorithms:
            raise TokenError(f"token algorithm {_quote(alg)} is not allowed")
        if "crit" in header:
            raise TokenError("token uses critical header extensions, which are not supported")
        kind = token_type(header.get("typ"))
        if kind not in issuer.config.token_types:
            if kind == ACCESS_TOKEN_TYPE:
                raise TokenError("token is an OAuth access token, not an ID token")
            raise TokenError("token is not an OAuth access token (its JOSE header lacks typ at+jwt)")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("token is not a JWT")
        # Keys come only from the issuer's JWKS; jku/x5u/jwk headers in the token are ignored.

        keys = self._keys(issuer, kid, allow_io)
        if not keys and kid is not None:
            raise TokenError(f"token key ID (kid) {_quote(kid)} is not known to the issuer")
        candidates = [k for k in keys if k.accepts(alg)]
        if not candidates:
            raise TokenError(f"token algorithm {_quote(alg)} does not match the issuer's signing key")
        claims = self._verified_payload(token, alg, candidates)
        if claims.get("iss") != iss:  # the verified bytes are the ones parsed; stay paranoid
            raise TokenError("token signature is invalid")
        return self._identity(issuer.config, claims, kind)

    def _verified_payload(self, token: str, alg: str, candidates: list[_Key]) -> dict[str, Any]:
        for key in candidates:
            try:
                decoded = self._jws.decode_complete(token, key=key.public_key, algorithms=[alg])
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidKeyError:
                raise TokenError("token is signed with a key that is too weak") from None
            except jwt.PyJWTError:
                raise TokenError("token is not a JWT") from None
            return json.loads(decoded["payload"])
        raise TokenError("token signature is invalid")

    def _identity(self, config: IssuerConfig, claims: dict[str, Any], kind: str = ID_TOKEN_TYPE) -> Identity:
        now = self._now()
        exp = claims.get("exp")
        if exp is None:
            raise TokenError("token has no expiry (exp)")
        if not _is_number(exp):
            raise TokenError('token claim "exp" is not a number')
        # Expiry is strict (as go-oidc); the skew only tolerates an IdP clock slightly ahead.
        if now >= exp:
            raise TokenError("token has expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or nbf > now + self._clock_skew):
            raise TokenError("token is not yet valid")
        iat = claims.get("iat")
        if iat is not None and (not _is_number(iat) or iat > now + self._clock_skew):
            raise TokenError("token is not yet valid (issued in the future)")

        aud = claims.get("aud")
        if aud is None:
            raise TokenError("token has no audience (aud)")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise TokenError('token claim "aud" is not a string or a list of strings')
        if not any(a in config.audiences for a in audiences):
            raise TokenError(f"token audience {_quote(audiences)} is not accepted")
        # OIDC Core 3.1.3.7: with several audiences the authorized party must be one of ours (an access
        # token names it `client_id`, RFC 9068 §2.2).
        party = claims.get("azp", claims.get("client_id")) if kind == ACCESS_TOKEN_TYPE else claims.get("azp")
        if len(audiences) > 1 and party not in config.audiences:
            raise TokenError("token has several audiences and its authorized party (azp) is not accepted")

        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenError("token has no subject (sub)")
        for name, value in config.required_claims.items():
            if name not in claims:
                raise TokenError(f"token is missing required claim {_quote(name)}")
            if claims[name] != value:
                raise TokenError(f"token claim {_quote(name)} does not have the required value")

        username = claims.get(config.username_claim)
        if username is None:
            raise TokenError(f"token is missing the username claim {_quote(config.username_claim)}")
        if not isinstance(username, str) or not username:
            raise TokenError(f"token claim {_quote(config.username_claim)} is not a non-empty string")
        if config.username_claim == "email" and "email_verified" in claims:
            verified = claims["email_verified"]
            if not isinstance(verified, bool):
                raise TokenError('token claim "email_verified" is not a boolean')
            if not verified:
                raise TokenError("token email is not verified")

        groups = claims.get(config.groups_claim, [])
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TokenError(f"token claim {_quote(config.groups_claim)} is not a string or a list of strings")

        username = config.effective_username_prefix + username
        groups = tuple(config.groups_prefix + g for g in groups)
        _check_name(username, config.username_claim)
        for group in groups:
            _check_name(group, config.groups_claim)
        return Identity(
            username=username,
            groups=groups,
            issuer=config.issuer_url,
            subject=subject,
            expires_at=float(min(exp, _LATEST_TIME)),
        )

    # -- keys and fetching -----------------------------------------------------------------

    def _keys(self, issuer: _Issuer, kid: str | None, allow_io: bool) -> list[_Key]:
        """The issuer's keys matching `kid`, fetching or refetching the JWKS when that is due."""
        if self._fetch_due(issuer, kid):
            if not allow_io:
                raise _NeedsIO()
            with issuer.lock:
                # Another thread may have fetched while this one waited for the lock.
                if self._fetch_due(issuer, kid):
                    self._refresh(issuer)
        keyset = issuer.keyset
        if keyset is None:
            raise IssuerUnavailable(issuer.failure or f"issuer unavailable: {issuer.config.issuer_url}")
        return keyset.find(kid)

    def _fetch_due(self, issuer: _Issuer, kid: str | None) -> bool:
        now = self._now()
        keyset = issuer.keyset
        if now - issuer.failed_at < self._retry_interval:
            return False
        if keyset is None:
            return True
        age = now - keyset.fetched_at
        if age >= issuer.config.jwks_max_age:
            return True
        return kid is not None and not keyset.find(kid) and age >= issuer.config.jwks_min_refresh_interval

    def _refresh(self, issuer: _Issuer) -> None:
        """Refetch keys (under issuer.lock). Old keys stay in use if a refresh fails."""
        try:
            self._fetch_keys(issuer)
        except IssuerUnavailable as e:
            if issuer.keyset is None:
                raise
            logger.warning("%s; keeping the keys fetched earlier", e.reason)

    def _fetch_keys(self, issuer: _Issuer) -> None:
        config = issuer.config
        try:
            if config.jwks_file is not None:
                self._count("jwks_fetches")
                try:
                    with open(config.jwks_file, "rb") as f:
                        data = f.read(MAX_DOCUMENT_SIZE + 1)
                    if len(data) > MAX_DOCUMENT_SIZE:
                        raise ValueError(f"larger than {MAX_DOCUMENT_SIZE} bytes")
                    keys = parse_jwks(json.loads(data))
                except (OSError, ValueError) as e:
                    raise IssuerUnavailable(f"issuer unavailable: JWKS file {config.jwks_file} of "
                                            f"{config.issuer_url}: {e}") from None
                self._store_keys(issuer, keys)
                return
            if issuer.jwks_uri is None:
                self._count("discovery_fetches")
                discovery = self._get_json(issuer, config.effective_discovery_url, "discovery document")
                if not isinstance(discovery, dict):
                    raise IssuerUnavailable(f"issuer unavailable: discovery document of {config.issuer_url} is not an object")
                if discovery.get("issuer") != config.issuer_url:
                    raise IssuerUnavailable(
                        f"issuer unavailable: discovery document names issuer {_quote(discovery.get('issuer'))}, "
                        f"expected {_quote(config.issuer_url)}"
                    )
                try:
                    issuer.jwks_uri = _https_url(discovery.get("jwks_uri"), "jwks_uri")
                except ValueError as e:
                    raise IssuerUnavailable(f"issuer unavailable: discovery document of {config.issuer_url}: {e}") from None
            self._count("jwks_fetches")
            document = self._get_json(issuer, issuer.jwks_uri, "JWKS")
            try:
                keys = parse_jwks(document)
            except ValueError as e:
                raise IssuerUnavailable(f"issuer unavailable: {issuer.jwks_uri}: {e}") from None
        except IssuerUnavailable as e:
            issuer.failed_at = self._now()
            issuer.failure = e.reason
            raise
        self._store_keys(issuer, keys)

    def _store_keys(self, issuer: _Issuer, keys: tuple[_Key, ...]) -> None:
        issuer.keyset = _KeySet(keys, self._now())
        issuer.failure = ""
        logger.info("fetched %d signing key(s) of issuer %s", len(keys), issuer.config.issuer_url)

    def _get_json(self, issuer: _Issuer, url: str, what: str) -> Any:
        # http.client rather than urllib: no redirects (a redirect could leave https) and no
        # environment proxies; the issuer is reached directly, over TLS checked with its CA.
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=FETCH_TIMEOUT, context=issuer.ssl_context)
        try:
            conn.request("GET", path, headers={"Accept": "application/json", "User-Agent": "jitgate"})
            response = conn.getresponse()
            body = response.read(MAX_DOCUMENT_SIZE + 1)
            if response.status != 200:
                raise IssuerUnavailable(f"issuer unavailable: {what} {url} answered HTTP {response.status}")
            if len(body) > MAX_DOCUMENT_SIZE:
                raise IssuerUnavailable(f"issuer unavailable: {what} {url} is larger than {MAX_DOCUMENT_SIZE} bytes")
            return json.loads(body)
        except (OSError, http.client.HTTPException) as e:
            raise IssuerUnavailable(f"issuer unavailable: cannot fetch {what} {url}: {e}") from None
        except ValueError:
            raise IssuerUnavailable(f"issuer unavailable: {what} {url} is not JSON") from None
        finally:
            conn.close()

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1


def _cache_key(token: str) -> bytes:
    # The cache holds hashes, never tokens. surrogatepass: any str hashes, garbage included.
    if not isinstance(token, str):
        raise TokenError("token is not a JWT")
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
