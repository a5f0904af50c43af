"""Identity: every call must carry a valid OIDC ID token from a configured issuer.

The caller's token is verified (issuer discovery, JWKS, signature, iss/aud/exp/nbf) and mapped to a
username and groups; then it is removed from the request, so it never reaches the cluster, a log or a
recording. Client-supplied `Impersonate-*` headers, and the headers of an authenticating proxy
(`X-Remote-User`, `X-Remote-Group`, `X-Remote-Extra-*`, ...), are refused: only the gateway says who a
call is for.

This runs at `requestheaders`, before the body is read: an unauthenticated caller is answered
without the gateway holding its upload (with addons/request_hygiene.py loaded, the body is dropped
unread). Verified tokens are cached, so the check costs a hash and a lookup.

    mitmdump -s addons/identity.py --set policy=policies/
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from mitmproxy import ctx, exceptions, http

from jitgate.chain.flow import call_of, current_policy, declare_policy_option, refuse
from jitgate.identity.oidc import IssuerUnavailable, OIDCVerifier, TokenError

log = logging.getLogger("jitgate.identity")

# Browsers cannot set headers on a WebSocket, so Kubernetes also takes the token as a subprotocol.
WS_TOKEN_PREFIX = "base64url.bearer.authorization.k8s.io."


# Headers an authenticating proxy sets for kube-apiserver (--requestheader-username-headers, -group-,
# -uid-, -extra-headers-prefix; X-Remote-* by convention) and the ones common front proxies use. The
# cluster honours them from a front-proxy client certificate: they must only ever come from the gateway.
AUTH_PROXY_PREFIXES = (b"x-remote-",)
AUTH_PROXY_HEADERS = frozenset({
    b"x-forwarded-user", b"x-forwarded-groups", b"x-forwarded-email", b"x-forwarded-preferred-username",
    b"x-auth-request-user", b"x-auth-request-groups", b"x-auth-request-email",
    b"x-auth-request-preferred-username",
})


def take_bearer_token(request: http.Request) -> tuple[str | None, str | None]:
    """Remove every form of caller credential from the request; return (bearer token, first
    Impersonate-* or authenticating-proxy header name). One pass over the raw header fields: this
    runs on every call, and each mitmproxy Headers lookup scans all fields again."""
    token = impersonation = None
    # Cookies too: kube-apiserver reads none, and a browser's or an auth proxy's session cookie is a
    # credential of the caller's that must not reach the cluster (or its recordings).
    credential_names = (b"authorization", b"proxy-authorization", b"cookie")
    found_credential = found_protocols = False
    for name, value in request.headers.fields:
        lname = name.lower()
        if lname in credential_names:
            found_credential = True
            scheme, _, rest = value.partition(b" ")
            if lname == b"authorization" and scheme.lower() == b"bearer" and rest.strip() and token is None:
                token = rest.strip().decode("latin-1")
        elif lname == b"sec-websocket-protocol":
            found_protocols = True
        elif impersonation is None and (lname.startswith(b"impersonate-") or lname.startswith(AUTH_PROXY_PREFIXES)
                                        or lname in AUTH_PROXY_HEADERS):
            impersonation = name.decode("latin-1")
    if found_credential:
        request.headers.fields = tuple(f for f in request.headers.fields if f[0].lower() not in credential_names)
    if found_protocols:
        protocols = request.headers.get("Sec-WebSocket-Protocol", "")
        if WS_TOKEN_PREFIX in protocols:
            kept = []
            for proto in (p.strip() for p in protocols.split(",")):
                if proto.startswith(WS_TOKEN_PREFIX):
                    encoded = proto[len(WS_TOKEN_PREFIX):]
                    try:
                        token = token or base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
                    except (binascii.Error, UnicodeDecodeError):
                        pass
                elif proto:
                    kept.append(proto)
            request.headers["Sec-WebSocket-Protocol"] = ", ".join(kept)
    return token, impersonation


def reserved_name(username: str, groups: tuple[str, ...]) -> str | None:
    """The first name with Kubernetes' reserved prefix. Checked on the exact values the cluster is
    sent (the verifier refuses names with whitespace or control characters a header parser would
    trim or split, so `" system:masters"` cannot pass here and become `system:masters` there)."""
    for name in (username, *groups):
        if name.startswith("system:"):
            return name
    return None


class Identity:
    def __init__(self) -> None:
        self.verifier: OIDCVerifier | None = None

    def load(self, loader) -> None:
        declare_policy_option(loader)
        loader.add_option(
            "oidc_clock_skew", int, 60,
            "Seconds of clock difference tolerated when checking a token's exp, nbf and iat.",
        )

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated or "oidc_clock_skew" in updated:
            if ctx.options.oidc_clock_skew < 0 or ctx.options.oidc_clock_skew > 600:
                raise exceptions.OptionsError("oidc_clock_skew must be between 0 and 600 seconds")
            policy = current_policy()
            self.verifier = OIDCVerifier(policy.identity_providers, clock_skew=ctx.options.oidc_clock_skew)

    async def running(self) -> None:
        # Warm discovery and JWKS so the first caller does not pay for it; failures are retried on use.
        if self.verifier is not None:
            await asyncio.to_thread(self.verifier.prefetch)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        token, impersonation = take_bearer_token(flow.request)
        if flow.response:
            return
        if impersonation:
            if impersonation.lower().startswith("impersonate-"):
                refuse(flow, 403, f"jitgate: impersonation is not allowed (header {impersonation}); "
                                  "the gateway itself tells the cluster who you are")
            else:
                refuse(flow, 403, "jitgate: authenticating-proxy headers (X-Remote-User, X-Remote-Group, ...) "
                                  "are not allowed; the gateway itself tells the cluster who you are")
            return
        if token is None:
            refuse(flow, 401, "jitgate: no bearer token: every call needs an OIDC ID token "
                              "(see `jitgate kubeconfig` for a kubeconfig that sends one)")
            return
        if self.verifier is None:
            refuse(flow, 500, "jitgate: identity is not configured")
            return
        try:
            identity = await self.verifier.averify(token)
        except IssuerUnavailable as e:
            # The reason names the issuer's discovery and JWKS URLs: for the gateway's log only.
            log.warning("cannot verify a token (audit ID %s): %s", call.audit_id, e.reason)
            refuse(flow, 503, "jitgate: the identity provider cannot be reached to verify the token now; "
                              f"try again shortly (audit ID {call.audit_id})")
            return
        except TokenError as e:
            refuse(flow, 401, f"jitgate: invalid bearer token: {e.reason}")
            return
        reserved = reserved_name(identity.username, identity.groups)
        if reserved:
            # `system:` names belong to Kubernetes (system:masters is cluster-admin); an IdP claim
            # must never become one, least of all through impersonation.
            refuse(flow, 403, f"jitgate: the identity {reserved!r} uses the reserved \"system:\" prefix")
            return
        call.identity = identity


addons = [Identity()]
