"""Forged and malformed tokens, the way an attacker (or a broken IdP) would make them.

Each function returns a compact token string; none of them talks to the network. Tokens that
should fail only on one claim check are signed with the real provider's key
(`OIDCProviderProcess.signing_key()`), so the verifier gets past the signature to that check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature))
    )


def id_claims(issuer: str, sub: str, audience: str | list[str], lifetime: float = 600, /, **extra: Any) -> dict[str, Any]:
    """Claims of a plausible ID token; `extra` adds or overrides (None removes a claim)."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": issuer, "sub": sub, "aud": audience, "iat": now, "exp": int(now + lifetime)}
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def sign(claims: dict[str, Any], key: Any, *, alg: str = "RS256", kid: str | None = None, headers: dict[str, Any] | None = None) -> str:
    all_headers = dict(headers or {})
    if kid is not None:
        all_headers["kid"] = kid
    return jwt.encode(claims, key, algorithm=alg, headers=all_headers)


def attacker_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def alg_none(claims: dict[str, Any], kid: str | None = None) -> str:
    """An unsigned token (`alg: none`, empty signature)."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return compact(header, claims)


def hs256_with_public_key(claims: dict[str, Any], public_key: Any, kid: str | None = None) -> str:
    """Algorithm confusion: HMAC-SHA256 keyed with the issuer's *public* key (PEM bytes).

    PyJWT refuses to build such a token, so the MAC is computed by hand."""
    secret = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tamper(token: str, **changes: Any) -> str:
    """The token with its payload changed (None removes a claim) and the original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def with_header(token: str, **changes: Any) -> str:
    """The token with its header changed and the original payload and signature kept."""
    header, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    fields.update(changes)
    return f"{b64url(json.dumps(fields).encode())}.{payload}.{signature}"


def jwe_like() -> str:
    """Five segments, shaped like a compact JWE (encrypted token)."""
    header = b64url(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"}).encode())
    return ".".join((header, b64url(b"k" * 32), b64url(b"iv" * 6), b64url(b"ciphertext"), b64url(b"tag" * 5)))


GARBAGE: tuple[str, ...] = (
    "",
    "not-a-token",
    "a.b",
    "a.b.c.d",
    "....",
    "!!!.???.***",
    "eyJhbGciOiJSUzI1NiJ9.%%%%.c2ln",
    b64url(b"[1,2,3]") + "." + b64url(b"{}") + ".c2ln",  # header is JSON, but not an object
    b64url(b'{"alg":"RS256"}') + "." + b64url(b"not json") + ".c2ln",
    "x" * 70000,
    "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\u00e9",
)
