"""Token exchange: the caller's identity for an MCP server, as a short-lived token the front signs.

An MCP server that acts on Kubernetes with the caller's own bearer token (kubernetes-mcp-server's
passthrough authorization) must never get the caller's token: it was minted for the MCP resource
(`aud` = the resource), and a server that holds it could replay it anywhere that resource's tokens
count. Instead the front mints, per caller and server, an RFC 9068-shaped access token:

    header  {"alg": ES256 | RS256 | EdDSA, "typ": "at+jwt", "kid": <RFC 7638 thumbprint>}
    claims  iss (the exchange's issuer), sub (the caller's username as the front mapped it), groups,
            aud (the exchange's audience: jitgate's Kubernetes side, never an MCP resource),
            iat, nbf, exp (minutes), jti, client_id ("jitgate-mcp-front"),
            act {"sub": "mcp-server:<name>"} (RFC 8693: the server acts for the caller)

jitgate's Kubernetes side accepts it as one more identity provider (`identity_providers[]` with
`jwks_file` = this key's public JWKS, `token_types: [at+jwt]`, `username_claim: sub`,
`username_prefix: "-"`), so grants, guardrails, masking and audit apply to the caller, while the
shared MCP server holds no credential of its own. A token is reused for half its lifetime.

    python -m jitgate.mcp.exchange --key state/mcp-exchange.key --jwks policies/mcp-exchange.jwks.json
        # makes the key (EC P-256, 0600) if it is missing and writes its public JWKS
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from jitgate.mcp.config import McpServer, TokenExchange

CLIENT_ID = "jitgate-mcp-front"


def load_signing_key(path: str) -> Any:
    """The private key in a PEM file; ValueError saying what is wrong with it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({e})") from None
    algorithm(key)
    return key


def algorithm(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise ValueError("an EC signing key must be on P-256 (ES256)")
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError("an RSA signing key must have at least 2048 bits")
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError("the signing key must be EC P-256, RSA or Ed25519")


def public_jwk(key: Any) -> dict[str, str]:
    """The public key as a JWK with `kid` (its RFC 7638 thumbprint), `alg` and `use`."""
    alg = algorithm(key)
    public = key.public_key()
    if alg == "ES256":
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
        members = ("crv", "kty", "x", "y")
    elif alg == "RS256":
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        members = ("e", "kty", "n")
    else:
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
        members = ("crv", "kty", "x")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    return {**{m: jwk[m] for m in members}, "kid": kid, "alg": alg, "use": "sig"}


class Exchanger:
    """Mints (and reuses, for half their lifetime) the exchanged tokens of one server."""

    def __init__(self, server: McpServer, exchange: TokenExchange, now: Callable[[], float] = time.time,
                 cache_size: int = 10000) -> None:
        self.server = server
        self.exchange = exchange
        self.key = load_signing_key(exchange.signing_key)
        self.jwk = public_jwk(self.key)
        self._now = now
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], tuple[float, str]] = OrderedDict()
        self._cache_size = cache_size

    def token(self, username: str, groups: Sequence[str]) -> str:
        key = (username, tuple(groups))
        now = self._now()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        token = self.mint(username, groups, now)
        self._cache[key] = (now + self.exchange.lifetime / 2, token)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return token

    def mint(self, username: str, groups: Sequence[str], now: float | None = None) -> str:
        issued = int(self._now() if now is None else now)
        claims = {
            "iss": self.exchange.issuer, "sub": username, "aud": self.exchange.audience, "groups": list(groups),
            "iat": issued, "nbf": issued, "exp": issued + self.exchange.lifetime, "jti": str(uuid.uuid4()),
            "client_id": CLIENT_ID, "act": {"sub": f"mcp-server:{self.server.name}"},
        }
        return jwt.encode(claims, self.key, algorithm=self.jwk["alg"],
                          headers={"typ": "at+jwt", "kid": self.jwk["kid"]})

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jitgate.mcp.exchange",
                                     description="Make the MCP front's token-exchange key and its public JWKS.")
    parser.add_argument("--key", required=True, help="PEM private key file (made, EC P-256 and 0600, if missing)")
    parser.add_argument("--jwks", required=True, help="where to write the public JWKS (the Kubernetes policy's "
                        "identity provider `jwks_file`)")
    args = parser.parse_args(argv)
    path = Path(args.key)
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    try:
        key = load_signing_key(str(path))
    except ValueError as e:
        print(f"jitgate.mcp.exchange: {e}", file=sys.stderr)
        return 2
    Path(args.jwks).write_text(json.dumps({"keys": [public_jwk(key)]}, indent=2) + "\n")
    print(f"key {path} (kid {public_jwk(key)['kid']}); public JWKS written to {args.jwks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
