"""Cluster routing: which cluster a call is for, and a verified TLS connection to exactly that cluster.

Regular mode (HTTPS_PROXY / kubeconfig proxy-url): the CONNECT host picks the cluster, and a host that
is no configured cluster is refused, so the gateway is never an open proxy. Reverse mode: each
`--mode reverse:<cluster endpoint>@<port>` listener serves the cluster with that endpoint.

Upstream TLS is verified against the cluster's own CA bundle from the policy (never skipped), with
the endpoint's hostname, even when the policy sends the connection to another address (`connect:`).

    mitmdump -s addons/clusters.py --set policy=policies/
"""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.proxy import mode_specs, server_hooks
from OpenSSL import SSL

from jitgate.chain.flow import call_of, current_policy, declare_policy_option, refuse
from jitgate.policy.clusters import ClientCertCredential, Cluster
from jitgate.policy.loader import Policy

log = logging.getLogger("jitgate.clusters")

# As mitmproxy's tlsconfig: no partial wildcards, never fall back to the subject CN.
_HOSTFLAGS = SSL._lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | getattr(SSL._lib, "X509_CHECK_FLAG_NEVER_CHECK_SUBJECT", 0)  # type: ignore[attr-defined]


def upstream_tls_context(cluster: Cluster) -> SSL.Context:
    """A client TLS context trusting only the cluster's CA, with its client certificate if it has one."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.set_verify(SSL.VERIFY_PEER, None)
    # Idle watches are the common case: let OpenSSL free its 16 KiB buffers between reads.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.load_verify_locations(str(cluster.ca_file))
    if isinstance(cluster.credential, ClientCertCredential):
        context.use_certificate_chain_file(str(cluster.credential.cert_file))
        context.use_privatekey_file(str(cluster.credential.key_file))
        context.check_privatekey()
    return context


class ClusterRouting:
    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.tls_contexts: dict[str, SSL.Context] = {}

    def load(self, loader) -> None:
        declare_policy_option(loader)

    def configure(self, updated: set[str]) -> None:
        if "policy" in updated:
            policy = current_policy()
            try:
                contexts = {c.name: upstream_tls_context(c) for c in policy.clusters}
            except SSL.Error as e:
                raise exceptions.OptionsError(f"cannot set up upstream TLS from the policy: {e}") from None
            self.policy, self.tls_contexts = policy, contexts
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # Eager mode would connect to the cluster before the caller is authenticated, and in
            # reverse mode bind the request's Host to the connect address; jitgate needs lazy.
            log.info("jitgate sets connection_strategy=lazy: no upstream connection before a call is checked")
            ctx.options.connection_strategy = "lazy"

    def cluster_for_flow(self, flow: http.HTTPFlow) -> Cluster | None:
        mode = flow.client_conn.proxy_mode
        if isinstance(mode, mode_specs.ReverseMode):
            host, port = mode.address
        else:
            host, port = flow.request.host, flow.request.port
        return self.policy.cluster_for(host, port) if self.policy else None

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.policy is None or self.policy.cluster_for(flow.request.host, flow.request.port) is None:
            refuse(flow, 403, f"jitgate: {flow.request.host}:{flow.request.port} is not a cluster behind this gateway")

    def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        cluster = self.cluster_for_flow(flow)
        call.cluster = cluster
        if flow.response:
            return
        if cluster is None:
            refuse(flow, 403, f"jitgate: {flow.request.host}:{flow.request.port} is not a cluster behind this gateway")
        elif not flow.client_conn.tls_established or flow.request.scheme != "https":
            # The caller's token would have crossed the network in clear text.
            refuse(flow, 400, "jitgate: the Kubernetes API is only served over TLS; use an https:// server URL")
        else:
            # Target the address we connect to (so mitmproxy reuses upstream connections), while
            # the Host header and, in server_connect, the TLS SNI name the cluster's endpoint.
            flow.request.host, flow.request.port = cluster.connect_address
            authority = cluster.endpoint.removeprefix("https://")
            if flow.request.host_header != authority:  # reverse mode has set it already
                flow.request.host_header = authority

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        cluster = self.policy.cluster_at(*server.address) if self.policy and server.address else None
        if cluster is None:
            # Only checked calls reach here; anything else must not open a connection.
            server.error = f"jitgate: refusing to connect to {server.address}: not a configured cluster"
            return
        server.sni = cluster.host

    def tls_established_client(self, data: tls.TlsData) -> None:
        # mitmproxy builds the client-side context; release idle buffers on each connection.
        if data.ssl_conn is not None:
            SSL._lib.SSL_set_mode(data.ssl_conn._ssl, SSL._lib.SSL_MODE_RELEASE_BUFFERS)  # type: ignore[attr-defined]

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        assert isinstance(server, connection.Server)
        cluster = self.policy.by_endpoint_host(server.sni) if self.policy and server.sni else None
        if cluster is None:
            # Leave ssl_conn unset: mitmproxy's own TLS setup verifies against its defaults instead.
            return
        conn = SSL.Connection(self.tls_contexts[cluster.name])
        param = SSL._lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
        SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, _HOSTFLAGS)  # type: ignore[attr-defined]
        try:
            ip = ipaddress.ip_address(cluster.host).packed
        except ValueError:
            name = cluster.host.encode("idna")
            conn.set_tlsext_host_name(name)
            ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))  # type: ignore[attr-defined]
        else:
            ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))  # type: ignore[attr-defined]
        if ok != 1:
            raise RuntimeError(f"cannot set hostname verification for {cluster.host}")
        offers = [p for p in tls_start.context.client.alpn_offers if p in (b"http/1.1", b"h2")]
        if not ctx.options.http2:
            offers = [p for p in offers if p != b"h2"]
        if offers:
            server.alpn_offers = tuple(offers)
            conn.set_alpn_protos(offers)
        conn.set_connect_state()
        tls_start.ssl_conn = conn


addons = [ClusterRouting()]
