"""Cluster routing: which cluster a call is for, and a verified TLS connection to exactly that cluster.

Regular mode (HTTPS_PROXY / kubeconfig proxy-url): the CONNECT host picks the cluster, and a host that
is no configured cluster is refused, so the gateway is never an open proxy. Reverse mode: each
`--mode reverse:<cluster endpoint>@<port>` listener serves the cluster with that endpoint.

Upstream TLS is verified against the cluster's own CA bundle from the policy (never skipped), with
the endpoint's hostname, even when the policy sends the connection to another address (`connect:`).

The gateway only ever speaks HTTP to a cluster. It picks each connection's protocol layers itself
(`next_layer`) instead of mitmproxy's guess from the first bytes, which falls back to relaying raw
TCP when they look like neither TLS nor HTTP: after a CONNECT the client must speak TLS (or the
connection is closed), and inside it HTTP. A raw TCP flow, should one ever start, is ended before a
byte of it is relayed. mitmproxy's onboarding app (`mitm.it`) is switched off.

    mitmdump -s addons/clusters.py --set policy=policies/
"""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy import connection, ctx, exceptions, http, tcp, tls
from mitmproxy.proxy import commands, events, layer, mode_specs, server_hooks, tunnel
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer, modes
from mitmproxy.proxy.layers.http import HttpStream, HTTPMode
from OpenSSL import SSL

from jitgate.chain.flow import METADATA_KEY, call_of, close_client_connection, current_policy, declare_policy_option, refuse
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


def may_be_tls(data: bytes) -> bool:
    """The client's first bytes are, or could still become, a TLS handshake record.

    mitmproxy's own test needs three bytes, so a ClientHello split after one or two is read as
    "not TLS"; here those are TLS so far (the TLS layer then waits for the rest, or fails).
    """
    return (data[:1] == b"\x16" and data[1:2] in (b"", b"\x03")
            and (len(data) < 3 or data[2] <= 0x03))


class Refused(layer.Layer):
    """Closes the client connection without relaying anything: bytes the gateway will not carry."""

    def __init__(self, context, why: str) -> None:
        super().__init__(context)
        self.why = why

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield commands.Log(f"jitgate: closing the connection from {self.context.client.peername}: {self.why}",
                           logging.WARNING)
        yield commands.CloseConnection(self.context.client)
        self._handle_event = self.closed  # type: ignore[method-assign]

    def closed(self, _: events.Event) -> layer.CommandGenerator[None]:
        yield from ()


def choose_layer(context, data: bytes) -> layer.Layer:
    """The next protocol layer for a connection of the gateway: HTTP, in TLS where it must be."""
    stack = context.layers
    top = stack[0]
    if isinstance(top, modes.HttpProxy):
        if len(stack) == 1:
            # A new client of the regular listener: HTTP to the proxy (CONNECT), in TLS if it starts so.
            layers = tunnel.LayerStack()
            if may_be_tls(data):
                layers /= ClientTLSLayer(context)
            layers /= HttpLayer(context, HTTPMode.regular)
            return layers[0]
        if isinstance(stack[-1], HttpStream):
            # The tunnel after a CONNECT to a cluster: TLS, intercepted, or nothing.
            if not may_be_tls(data):
                return Refused(context, "the tunnel to a cluster must start with TLS")
            server_tls = ServerTLSLayer(context)
            server_tls.child_layer = ClientTLSLayer(context)
            return server_tls
        if (len(stack) >= 3 and isinstance(stack[-1], ClientTLSLayer) and isinstance(stack[-2], ServerTLSLayer)
                and isinstance(stack[-3], HttpStream)):
            # Inside the tunnel's TLS: HTTP whatever the first bytes or the ALPN say.
            return HttpLayer(context, HTTPMode.transparent)
    elif isinstance(top, modes.ReverseProxy) and len(stack) == 1:
        if context.client.proxy_mode.scheme != "https":
            return Refused(context, "a cluster is served only over https")
        layers = tunnel.LayerStack()
        layers /= ServerTLSLayer(context)
        if may_be_tls(data):
            layers /= ClientTLSLayer(context)
        layers /= HttpLayer(context, HTTPMode.transparent)  # plain HTTP is answered with a 400 Status
        return layers[0]
    return Refused(context, "no protocol the gateway serves")


# mitmproxy options that relay some connections raw, past every HTTP hook (next_layer ignores them).
PASSTHROUGH_OPTIONS = frozenset({"ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts"})


def check_modes(specs) -> None:
    """jitgate serves clusters in regular mode and in https reverse mode only."""
    for spec in specs:
        mode = mode_specs.ProxyMode.parse(spec)
        if isinstance(mode, mode_specs.RegularMode):
            continue
        if isinstance(mode, mode_specs.ReverseMode) and mode.scheme == "https":
            continue
        raise exceptions.OptionsError(f"jitgate serves --mode regular and --mode reverse:https://<cluster endpoint> "
                                      f"only, not {spec!r}")


def _no_payload_lines(flow) -> None:
    """The dumper's websocket_message, silenced."""


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
        if "onboarding" in updated and ctx.options.onboarding:
            # mitmproxy's onboarding app answers http://mitm.it/ on every regular listener, before any check.
            log.info("jitgate sets onboarding=false: the gateway answers nothing but cluster calls")
            ctx.options.onboarding = False
        if "mode" in updated:
            check_modes(ctx.options.mode)
        for name in PASSTHROUGH_OPTIONS & updated:
            if getattr(ctx.options, name, None):
                raise exceptions.OptionsError(f"jitgate relays nothing unchecked: {name} is not supported")
        if "flow_detail" in updated and getattr(ctx.options, "flow_detail", 0) >= 3:
            # mitmproxy's dumper runs before any script: at 3 and 4 it prints bodies before masking.
            raise exceptions.OptionsError("flow_detail 3 and 4 print message bodies before jitgate masks them, so "
                                          "jitgate refuses them; use flow_detail 2 at most (recordings keep the masked bodies)")

    def running(self) -> None:
        # The dumper logs one line per WebSocket message: every keystroke and output frame of an
        # exec session, with its timing, in the gateway's log. The audit and recordings keep sessions.
        dumper = ctx.master.addons.get("dumper") if hasattr(ctx.master, "addons") else None
        if dumper is not None:
            dumper.websocket_message = _no_payload_lines

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # Scripts run before mitmproxy's NextLayer addon, which skips a connection decided here;
        # its guess from the first bytes is what relays raw TCP.
        if nextlayer.layer is not None:
            return
        try:
            nextlayer.layer = choose_layer(nextlayer.context, nextlayer.data_client())
        except Exception:
            # Left undecided, mitmproxy would guess (and may relay raw): close the connection instead.
            log.exception("jitgate could not choose the protocol of a connection; closing it")
            nextlayer.layer = Refused(nextlayer.context, "internal error")

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
            # The address stays in the log; mitmproxy's error page repeats server.error to the caller.
            log.error("refusing to connect to %s: not a configured cluster", server.address)
            server.error = "jitgate: refusing to connect: not a configured cluster"
            return
        server.sni = cluster.host

    # --- raw TCP: never relayed ---------------------------------------------------------------------
    # next_layer never picks raw TCP, and streaming ends a 101 that is no WebSocket before mitmproxy
    # turns it into a TCP relay; should a TCP flow start anyway, nothing of it reaches a cluster.

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        why = f"jitgate relays no raw TCP (towards {self.target_of(flow)})"
        flow.metadata[METADATA_KEY] = {"decision": "deny", "reason": why}  # plain values: audit reads it
        if flow.server_conn.timestamp_start is None:
            flow.server_conn.error = why  # not connected yet: server_connect will not open it
        if flow.killable:
            flow.kill()
        log.warning("%s; closing the connection from %s", why, flow.client_conn.peername)
        close_client_connection(flow, why)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        flow.messages[-1].content = b""  # mitmproxy sends the message on: it must be empty

    def target_of(self, flow: tcp.TCPFlow) -> str:
        address = flow.server_conn.address
        cluster = None
        if self.policy is not None and address:
            cluster = self.policy.cluster_for(*address) or self.policy.cluster_at(*address)
        return f"cluster {cluster.name}" if cluster else "no cluster"

    def tls_established_client(self, data: tls.TlsData) -> None:
        # mitmproxy builds the client-side context; release idle buffers on each connection.
        if data.ssl_conn is not None:
            SSL._lib.SSL_set_mode(data.ssl_conn._ssl, SSL._lib.SSL_MODE_RELEASE_BUFFERS)  # type: ignore[attr-defined]

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        assert isinstance(server, connection.Server)
        cluster = self.policy.by_endpoint_host(server.sni) if self.policy and server.sni else None
        if cluster is None:
            # Never fall back to mitmproxy's own TLS defaults; the dispatcher refuses the handshake.
            raise RuntimeError(f"upstream TLS to {server.sni!r}, which names no cluster")
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
