"""Upstream credential: the gateway, not the caller, authenticates to the cluster.

For `eks` clusters the gateway assumes the configured IAM role (session name and SourceIdentity name
the caller, so CloudTrail shows the human) and presents an EKS token; it can also use a token file or
a client certificate (the latter is set on the TLS connection by addons/clusters.py). Credentials are
cached and refreshed before expiry, never fetched per call. Once the request has been sent, the
credential is removed from the flow so no log, `-w` flow file or HAR recording can carry it.

    mitmdump -s addons/clusters.py -s addons/identity.py -s addons/upstream_credential.py --set policy=policies/
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mitmproxy import http

from jitgate.chain.flow import call_of, current_policy, declare_policy_option, refuse
from jitgate.kube import http_framing
from jitgate.policy.clusters import Cluster, TokenFileCredential
from jitgate.upstream.eks import (
    EKSClusterCredentialConfig,
    EKSTokenProvider,
    UpstreamCredentialError,
)

log = logging.getLogger("jitgate.upstream")

# botocore logs AssumeRole response bodies (secret keys included) at DEBUG: never let them through,
# whatever verbosity mitmproxy runs at.
for _name in ("botocore", "boto3", "urllib3"):
    logging.getLogger(_name).setLevel(logging.INFO)


class TokenFile:
    """A bearer token in a file, re-read when the file changes (projected tokens rotate)."""

    RECHECK_SECONDS = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.token = ""
        self.stamp: tuple[int, int] | None = None
        self.checked = 0.0

    def read(self) -> str:
        now = time.monotonic()
        if now - self.checked >= self.RECHECK_SECONDS or not self.token:
            self.checked = now
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) != self.stamp:
                    self.token = self.path.read_text().strip()
                    self.stamp = (st.st_mtime_ns, st.st_size)
            except OSError as e:
                raise UpstreamCredentialError(f"cannot read the cluster token file {self.path}: {e.strerror}") from None
            if not self.token:
                raise UpstreamCredentialError(f"the cluster token file {self.path} is empty")
        return self.token


def reframe(request: http.Request) -> None:
    """Right before the request leaves: its length is the checked body's, set by the gateway.

    mitmproxy forwards the client's framing headers as they came; an HTTP/2 request without
    content-length would reach an HTTP/1.1 cluster with no length at all, and the cluster would
    read its body as a second request on the gateway's connection.
    """
    body = request.raw_content
    if body is None:
        # Streamed past the chain: the length is unknown, and so is what the cluster would read.
        raise RuntimeError("request body was not read before forwarding")
    request.headers.fields = http_framing.reframe(request.headers.fields, request.method, len(body))


class UpstreamCredential:
    def __init__(self) -> None:
        # (cluster, upstream role or None for the default) -> provider; role sessions are per caller.
        self.eks: dict[tuple[str, str | None], EKSTokenProvider] = {}
        self.token_files: dict[str, TokenFile] = {}

    def load(self, loader) -> None:
        declare_policy_option(loader)

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated:
            policy = current_policy()
            eks, files = {}, {}
            for cluster in policy.clusters:
                if isinstance(cluster.credential, EKSClusterCredentialConfig):
                    for role in (None, *cluster.upstream_roles):
                        config = cluster.credential_for_role(role)
                        # Keep warm providers (and their cached credentials) across policy reloads.
                        old = self.eks.get((cluster.name, role))
                        eks[(cluster.name, role)] = old if old and old.config == config else EKSTokenProvider(config)
                elif isinstance(cluster.credential, TokenFileCredential):
                    files[cluster.name] = TokenFile(cluster.credential.path)
            self.eks, self.token_files = eks, files

    async def bearer_token(self, cluster: Cluster, username: str, role: str | None) -> str | None:
        if isinstance(cluster.credential, EKSClusterCredentialConfig):
            provider = self.eks.get((cluster.name, role))
            if provider is None:  # a grant under a role the policy no longer has
                raise UpstreamCredentialError(f"upstream role {role!r} is not configured for cluster {cluster.name}")
            return await provider.atoken_for(username)
        if cluster.name in self.token_files:
            return self.token_files[cluster.name].read()
        return None  # client certificate: authenticated on the TLS connection

    async def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if flow.response:
            return
        if call.cluster is None or call.identity is None or call.info is None:
            # A chain missing its checks must not turn into an open door to the cluster.
            refuse(flow, 500, "jitgate: refusing to forward a call that was not checked "
                              "(load addons/gateway.py, or clusters, identity and request_attributes first)")
            return
        if not call.decision:
            # Only an explicit allow is forwarded (addons/grants.py decides, require_grant included).
            refuse(flow, 403, "jitgate: no step allowed this call (is addons/grants.py loaded?), so it is refused")
            return
        try:
            role = call.grant.upstream_role if call.grant is not None else None
            token = await self.bearer_token(call.cluster, call.identity.username, role)
        except UpstreamCredentialError as e:
            # The cause names role ARNs, STS URLs or file paths: the operator's log has it, the caller
            # gets the audit ID to quote.
            log.warning("no upstream credential for cluster %s (auditID %s): %s", call.cluster.name, call.audit_id, e)
            refuse(flow, 503, f"jitgate: cannot obtain the gateway's credential for cluster {call.cluster.name} "
                              f"right now; the gateway's log has the cause (audit ID {call.audit_id})")
            return
        headers = flow.request.headers
        # kube-apiserver takes Audit-ID as its own audit ID: the cluster's audit log and ours correlate.
        headers["Audit-ID"] = call.audit_id
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
            call.credential_sent = True
        if call.cluster.impersonate:
            headers["Impersonate-User"] = call.identity.username
            headers.set_all("Impersonate-Group", list(call.identity.groups))
        reframe(flow.request)

    @staticmethod
    def scrub(flow: http.HTTPFlow) -> None:
        # The request has been sent: from here on the flow is only logged, saved and recorded.
        # (The caller's own credentials were removed by the identity step already.)
        if call_of(flow).credential_sent:
            flow.request.headers.pop("Authorization", None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.scrub(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.scrub(flow)


addons = [UpstreamCredential()]
