"""Who is calling: static bearer tokens, EKS tokens (checked by shape), TLS client certificates.

Plus a tiny authorizer: deny rules (`user=alice,verb=delete,resource=pods,namespace=prod`) that turn
matching requests into kube's Forbidden, so tests can see cluster-side refusals pass through.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fnmatch
import hashlib
import re
import urllib.parse
from dataclasses import dataclass, field

EKS_PREFIX = "k8s-aws-v1."
EKS_TOKEN_LIFETIME = datetime.timedelta(minutes=15)
# Presigning clocks drift; kube's authenticator tolerates a little future skew too.
EKS_CLOCK_SKEW = datetime.timedelta(minutes=5)


class AuthError(Exception):
    """The credential is missing or unacceptable; the message says why (for logs, not for the client)."""


@dataclass(frozen=True)
class Identity:
    kind: str  # "token" | "eks" | "cert"
    user: str
    groups: tuple[str, ...]
    token_sha256: str | None = None
    cert_subject: str | None = None
    eks: dict | None = None


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_eks_token(token: str, now: datetime.datetime | None = None) -> dict:
    """Check an EKS token's shape; return what it says (access key, region, signing time, ...).

    The cluster name is signed (header `x-k8s-aws-id`) but not carried in the URL, so only STS
    could confirm it; by shape we require that the header was among the signed ones.
    """
    if not token.startswith(EKS_PREFIX):
        raise AuthError("not an EKS token")
    payload = token[len(EKS_PREFIX):]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", payload):
        raise AuthError("EKS token is not unpadded URL-safe base64")
    try:
        url = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise AuthError(f"EKS token does not decode: {e}") from None
    parsed = urllib.parse.urlsplit(url)
    # http is tolerated: a gateway under test may presign against a local STS (moto) endpoint.
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise AuthError("EKS token is not an http(s) URL")
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    if query.get("Action") != "GetCallerIdentity":
        raise AuthError("EKS token is not a GetCallerIdentity request")
    for required in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                     "X-Amz-SignedHeaders", "X-Amz-Signature"):
        if not query.get(required):
            raise AuthError(f"EKS token URL lacks {required}")
    if query["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise AuthError("EKS token is not signed with AWS4-HMAC-SHA256")
    credential = query["X-Amz-Credential"].split("/")
    if len(credential) != 5 or credential[3] != "sts" or credential[4] != "aws4_request":
        raise AuthError("EKS token credential scope is not <key>/<date>/<region>/sts/aws4_request")
    signed_headers = query["X-Amz-SignedHeaders"].split(";")
    if "x-k8s-aws-id" not in signed_headers:
        raise AuthError("EKS token does not sign the x-k8s-aws-id header")
    if not re.fullmatch(r"[0-9a-f]{64}", query["X-Amz-Signature"]):
        raise AuthError("EKS token signature is not 64 hex digits")
    try:
        signed_at = datetime.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc)
        expires = int(query["X-Amz-Expires"])
    except ValueError:
        raise AuthError("EKS token has a malformed X-Amz-Date or X-Amz-Expires") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if signed_at > now + EKS_CLOCK_SKEW:
        raise AuthError("EKS token is signed in the future")
    if now - signed_at > EKS_TOKEN_LIFETIME:
        raise AuthError("EKS token expired (signed more than 15 minutes ago)")
    return {
        "access_key_id": credential[0],
        "region": credential[2],
        "signed_at": signed_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires": expires,
        "signed_headers": signed_headers,
        "session_token": bool(query.get("X-Amz-Security-Token")),
        "host": parsed.netloc,
        "url": url,
    }


class Authenticator:
    def __init__(self, tokens: list[str], eks_cluster: str | None = None):
        self.tokens = {sha256_hex(t) for t in tokens}
        self.eks_cluster = eks_cluster

    def authenticate(self, authorization: str | None, peer_cert: dict | None) -> Identity:
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise AuthError("Authorization is not a bearer token")
            digest = sha256_hex(token)
            if digest in self.tokens:
                return Identity("token", "standin-admin", ("system:masters", "system:authenticated"),
                                token_sha256=digest)
            if token.startswith(EKS_PREFIX):
                if self.eks_cluster is None:
                    raise AuthError("EKS tokens are not accepted (no --eks-cluster)")
                eks = parse_eks_token(token)
                eks["cluster"] = self.eks_cluster
                return Identity("eks", f"eks:{eks['access_key_id']}", ("system:authenticated",),
                                token_sha256=digest, eks=eks)
            raise AuthError("unknown bearer token")
        if peer_cert:
            subject = {k: v for rdn in peer_cert.get("subject", ()) for k, v in rdn}
            groups = tuple(v for rdn in peer_cert.get("subject", ()) for k, v in rdn if k == "organizationName")
            name = subject.get("commonName", "")
            if name:
                return Identity("cert", name, groups + ("system:authenticated",), cert_subject=_subject_text(peer_cert))
        raise AuthError("no credential")


def _subject_text(peer_cert: dict) -> str:
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
    return ",".join(f"{short.get(k, k)}={v}" for rdn in peer_cert.get("subject", ()) for k, v in rdn)


# Authorization ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DenyRule:
    """A request matching every given field (globs) is Forbidden. Unset fields match anything."""

    fields: dict[str, str] = field(default_factory=dict)

    KEYS = ("user", "group", "verb", "resource", "namespace", "name")

    @classmethod
    def parse(cls, text: str) -> "DenyRule":
        fields = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in cls.KEYS:
                raise ValueError(f"deny rule {text!r}: expected comma-separated {'|'.join(cls.KEYS)}=GLOB")
            fields[key] = value.strip()
        return cls(fields)

    def matches(self, user: str, groups: tuple[str, ...], attrs: dict[str, str]) -> bool:
        for key, pattern in self.fields.items():
            if key == "user":
                ok = fnmatch.fnmatchcase(user, pattern)
            elif key == "group":
                ok = any(fnmatch.fnmatchcase(g, pattern) for g in groups)
            else:
                ok = fnmatch.fnmatchcase(attrs.get(key, ""), pattern)
            if not ok:
                return False
        return True


def forbidden_message(user: str, verb: str, resource: str, group: str, subresource: str, namespace: str,
                      name: str) -> str:
    """`pods "x" is forbidden: User "alice" cannot delete resource "pods" in API group "" in the namespace "dev"`."""
    qualified = f"{resource}.{group}" if group else resource
    subject = f'{qualified} "{name}"' if name else qualified
    full = f"{resource}/{subresource}" if subresource else resource
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return f'{subject} is forbidden: User "{user}" cannot {verb} resource "{full}" in API group "{group}" {scope}'
