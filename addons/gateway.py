"""jitgate: the whole chain, in order, as one mitmproxy addon.

    mitmdump -s addons/gateway.py --set policy=policies/ --set confdir=certs \\
        --mode reverse:https://api.dev.example:443@7443

Order matters: each step reads the decisions of the steps before it from the call on
flow.metadata. Each step is also an addon of its own (`mitmdump -s addons/<step>.py`); here they
run behind one dispatcher, because mitmproxy walks every registered addon for every event of
every flow: eight addons cost a quarter more CPU per call than the steps' own code (measured with
scripts/benchmark --profile). The dispatcher also fails closed: a step that breaks unexpectedly
refuses the call (or the connection, in a connection or TLS hook) instead of letting it go on past
the steps it skipped, or with mitmproxy's defaults; the audit step still runs, so the refusal is
recorded.

Which step runs in which hook (hooks by name, steps in chain order; tests/test_gateway_table.py
checks this table against the code, `python -m tests.test_gateway_table` prints it):

    error                    Grants, UpstreamCredential, Recording, Audit
    http_connect             ClusterRouting, Recording, Audit
    next_layer               ClusterRouting
    request                  ClusterRouting, RequestHygiene, Streaming, AccessAPIServer, SelfReview, Grants, Guardrails, UpstreamCredential, Masking, Recording, Audit
    requestheaders           RequestHygiene, Identity, RequestAttributes, Streaming, Audit
    response                 Streaming, SelfReview, Grants, Masking, Recording, Audit
    responseheaders          Streaming, Grants, UpstreamCredential, Masking, Recording, Audit
    server_connect           ClusterRouting
    tcp_message              ClusterRouting
    tcp_start                ClusterRouting, Audit
    tls_established_client   ClusterRouting
    tls_start_server         ClusterRouting
    websocket_end            Grants, Guardrails, Masking, Recording, Audit
    websocket_message        Guardrails, Masking, Recording
    websocket_start          Recording

Lifecycle hooks (load, configure, running, done) run in every step that has them. Flows read back
with `-r` (not live) skip the chain: nothing is checked or sent again.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import weakref
from pathlib import Path

from mitmproxy import connection, ctx, hooks, http, tls
from mitmproxy import flow as mflow
from mitmproxy.proxy import commands, layer, server_hooks
from OpenSSL import SSL

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from jitgate.access.service import AccessService  # noqa: E402
from jitgate.chain.flow import call_of, publish, refuse  # noqa: E402
from jitgate.chain.service_host import AccessServiceHost  # noqa: E402
from jitgate.kube.status import status_body  # noqa: E402

log = logging.getLogger("jitgate.gateway")

CHAIN = (
    "clusters",  # which cluster; refuse hosts that are none (no open proxy); verified upstream TLS
    "request_hygiene",  # clean framing and headers, bounded bodies; refusals answered before bodies are read
    "identity",  # OIDC token -> username and groups; strip caller credentials; refuse impersonation
    "request_attributes",  # verb, resource, namespace, name, exec command, as kube-apiserver reads them
    "streaming",  # watch / log -f flow through unbuffered; marks long-running calls
    "access_api",  # /jitgate/v1/: requests, reviews, grants, whoami (answered here, never forwarded)
    "self_review",  # kubectl auth whoami / can-i / can-i --list: answered for every caller, from grants and cluster RBAC
    "grants",  # an active grant must cover the call (or it is held for approval); ends sessions of ended grants
    "guardrails",  # dangerous operations denied, held for approval or marked, whatever the grant; typed exec lines
    "upstream_credential",  # the gateway's own cluster credential; scrubbed once sent
    "masking",  # secret values masked in every response shape, before anything records or audits it
    "recording",  # per-session flows.mitm, HAR, exec asciicasts and index: masked, without credentials
    "audit",  # one audit.k8s.io Event per call, written before the response is released
)

# Hooks where a failing step must stop the call rather than let it through: nothing was sent upstream yet.
REQUEST_HOOKS = {"http_connect", "requestheaders", "request"}
# Hooks after which the call's plain record is put on the flow (for -w, mitmweb, HAR).
PUBLISH_HOOKS = {"request", "responseheaders", "response", "error", "websocket_end"}
# Hooks a flow ends with: nothing is left to refuse, but the steps that record and scrub still run.
END_HOOKS = {"error", "websocket_end", "http_connect_error", "tcp_end", "tcp_error", "udp_end", "udp_error",
             "dns_error", "client_disconnected", "server_disconnected", "server_connect_error",
             "tls_failed_client", "tls_failed_server"}
# Always dispatched, even when no step implements them: the dispatcher itself acts there.
DISPATCHER_HOOKS = {"response"}


def _load(name: str):
    """Import a sibling addon script under a private module name, so names never clash.

    Always freshly: when mitmproxy reloads this script, the chain gets new addon instances.
    """
    module_name = f"jitgate_addons.{name}"
    spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


STEP_FAILED = "jitgate: internal error while checking this call, so it is refused"
RESPONSE_WITHHELD = "jitgate: internal error while checking the response, so it is withheld"
CONNECTION_REFUSED = "jitgate: internal error while setting up this connection, so it is refused"

# Flows whose response a step failed to check at responseheaders: replaced by a Status at `response`.
_withheld: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()


class RefusedLayer(layer.Layer):
    """The protocol layer of a connection whose layer decision failed: it is closed, nothing is relayed."""

    def __init__(self, context) -> None:
        super().__init__(context)
        self.closed = False

    def _handle_event(self, event):
        if not self.closed:
            self.closed = True
            if self.context.server.connected:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)


def _refusing_tls_connection() -> SSL.Connection:
    """A TLS connection whose handshake fails at its first step (no hello, no certificate; at most an
    alert): what a failed tls_start_* hook leaves, so mitmproxy's own TLS setup never fills in defaults."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)  # no protocol left: "no protocols available"
    return SSL.Connection(context)


def drop_connection(client: connection.Client, reason: str) -> bool:
    """Close a client connection and its server connections now: nothing more is sent either way.

    Closing the writers is immediate (mitmproxy skips sends to a closing writer); cancelling the
    handler then tears the connection down as mitmproxy's idle timeout does.
    """
    master = getattr(ctx, "master", None)
    server = master.addons.get("proxyserver") if master else None
    handler = server.connections.get(client.id) if server else None
    if handler is None:
        return False
    for io in list(handler.transports.values()):
        try:
            if io.writer is not None and not io.writer.is_closing():
                io.writer.close()
        except (OSError, RuntimeError):
            pass
    transport = handler.transports.get(handler.client)
    if transport is not None and transport.handler is not None:
        transport.handler.cancel(reason)
    return True


def _read_back(flow: mflow.Flow) -> bool:
    """A flow read from a file (-r), not a live call: nothing is checked or sent again.

    A live flow that was killed is not live either, but its connection is still registered, and
    its last hook (error) must still reach the steps that record and scrub it.
    """
    if flow.live:
        return False
    master = getattr(ctx, "master", None)
    server = master.addons.get("proxyserver") if master else None
    return server is None or flow.client_conn.id not in server.connections


def _withhold(flow: http.HTTPFlow, call) -> None:
    flow.response = http.Response.make(
        500, status_body(500, f"{RESPONSE_WITHHELD} (audit ID {call.audit_id})"),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def _fail_closed(hook: str, step: object, args: tuple) -> None:
    """A step raised in `hook`: refuse what the hook is about, as fits the hook; never go on with defaults."""
    name = type(step).__name__
    subject = args[0] if args else None
    if hook == "add_log":
        return  # logging it would call the failing step again
    if isinstance(subject, http.HTTPFlow):
        call = call_of(subject)
        log.exception("jitgate step %s failed in %s (auditID %s)", name, hook, call.audit_id)
        _refuse_http(hook, subject, call, f"{name} in {hook}")
        return
    log.exception("jitgate step %s failed in %s; refusing the connection", name, hook)
    if hook in END_HOOKS:
        return
    if isinstance(subject, mflow.Flow):  # raw TCP, UDP, DNS: kill() is not honoured there, so drop
        if subject.killable:
            subject.kill()
        messages = getattr(subject, "messages", None)
        if messages:
            messages[-1].content = b""
        if subject.server_conn.timestamp_start is None:
            subject.server_conn.error = CONNECTION_REFUSED  # checked after server_connect: never opened
        drop_connection(subject.client_conn, CONNECTION_REFUSED)
    elif isinstance(subject, tls.TlsData):
        if hook in ("tls_start_client", "tls_start_server"):
            subject.ssl_conn = _refusing_tls_connection()  # set, so mitmproxy's TlsConfig adds nothing
        drop_connection(subject.context.client, CONNECTION_REFUSED)
    elif isinstance(subject, tls.ClientHelloData):
        subject.ignore_connection = False  # never pass the encrypted bytes through
        subject.establish_server_tls_first = False
        drop_connection(subject.context.client, CONNECTION_REFUSED)
    elif isinstance(subject, server_hooks.ServerConnectionHookData):
        subject.server.error = CONNECTION_REFUSED  # server_connect: mitmproxy does not connect (the call gets a 502)
        if hook != "server_connect":
            drop_connection(subject.client, CONNECTION_REFUSED)  # server_connected: nothing is sent on it
    elif isinstance(subject, connection.Client):
        subject.error = CONNECTION_REFUSED  # client_connected: mitmproxy closes the connection
        drop_connection(subject, CONNECTION_REFUSED)
    elif isinstance(subject, layer.NextLayer):
        subject.layer = RefusedLayer(subject.context)  # the built-in next_layer then keeps out
        drop_connection(subject.context.client, CONNECTION_REFUSED)
    elif hasattr(subject, "valid"):  # socks5_auth
        subject.valid = False


def _refuse_http(hook: str, flow: http.HTTPFlow, call, where: str) -> None:
    call.annotations["jitgate.dev/failed-step"] = where
    if hook in REQUEST_HOOKS:
        if flow.response is None:
            flow.request.stream = False  # mitmproxy cannot stream a request body and answer it too
            refuse(flow, 500, f"{STEP_FAILED} (audit ID {call.audit_id})")
    elif hook == "responseheaders":
        if flow.response is not None and not flow.response.stream:
            _withheld.add(flow)  # the body is buffered: the response hook replaces it
        elif flow.killable:
            flow.kill()  # a streamed body would go out unchecked
    elif hook == "response":
        if flow.response is not None and not flow.response.stream:
            _withhold(flow, call)
        elif flow.killable:
            flow.kill()
    elif hook in ("websocket_start", "websocket_message"):
        if flow.websocket is not None and flow.websocket.messages:
            flow.websocket.messages[-1].drop()
        drop_connection(flow.client_conn, STEP_FAILED)  # kill() is not honoured on WebSocket messages
    elif hook not in END_HOOKS:  # http_connected, http_connect_upstream
        if flow.killable:
            flow.kill()
        drop_connection(flow.client_conn, STEP_FAILED)


# Steps that still get an event after an earlier step failed on it (None: every hook): the audit
# records the refused call, and the cluster credential is scrubbed from the flow before it is saved.
AFTER_FAILURE: dict[str, frozenset[str] | None] = {
    "audit": None,
    "upstreamcredential": frozenset({"responseheaders", "error"}),
    # A withheld response is the 500 Status by then, and dropped frames are never kept: safe to record.
    "recording": frozenset({"response", "error", "websocket_end"}),
}


def _runs_after_failure(step: object, hook: str) -> bool:
    name = type(step).__name__.lower()
    return name in AFTER_FAILURE and (AFTER_FAILURE[name] is None or hook in AFTER_FAILURE[name])


class Gateway:
    """Dispatches each mitmproxy hook to the steps that implement it, in chain order."""

    def __init__(self, steps: list) -> None:
        self.steps = steps
        for name in hooks.all_hooks:
            handlers = [(step, getattr(step, name)) for step in steps if callable(getattr(step, name, None))]
            if handlers or name in DISPATCHER_HOOKS:
                setattr(self, name, self._dispatcher(name, handlers))

    def step(self, name: str):
        """A step by its addon name (the lowercased class name), e.g. "grants"."""
        return next((s for s in self.steps if type(s).__name__.lower() == name), None)

    @staticmethod
    def _dispatcher(name: str, handlers: list):
        """One hook's dispatcher. After a step fails, only the steps that run after failures (audit)
        get the event; the failure itself was turned into a refusal by _fail_closed."""
        lifecycle = name in ("load", "configure", "running", "done")
        publishes = name in PUBLISH_HOOKS
        withholds = name == "response"
        entries = [(step, fn, _runs_after_failure(step, name)) for step, fn in handlers]

        def proceed(subject: mflow.Flow | None) -> bool:
            if subject is None:
                return True
            if _read_back(subject):
                return False  # flows read back with -r: nothing is checked or sent again
            if withholds and subject in _withheld:
                _withhold(subject, call_of(subject))
            return True

        if any(inspect.iscoroutinefunction(fn) for _, fn in handlers):
            async def dispatch(*args):
                subject = args[0] if args and isinstance(args[0], mflow.Flow) else None
                if not proceed(subject):
                    return
                failing = False
                for step, fn, after_failure in entries:
                    if failing and not after_failure:
                        continue
                    try:
                        result = fn(*args)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        if lifecycle:
                            raise  # e.g. OptionsError: the gateway must not start half-configured
                        _fail_closed(name, step, args)
                        failing = True
                if publishes and isinstance(subject, http.HTTPFlow):
                    publish(subject)
        else:
            def dispatch(*args):
                subject = args[0] if args and isinstance(args[0], mflow.Flow) else None
                if not proceed(subject):
                    return
                failing = False
                for step, fn, after_failure in entries:
                    if failing and not after_failure:
                        continue
                    try:
                        fn(*args)
                    except Exception:
                        if lifecycle:
                            raise
                        _fail_closed(name, step, args)
                        failing = True
                if publishes and isinstance(subject, http.HTTPFlow):
                    publish(subject)
        dispatch.__name__ = name
        return dispatch


def build_chain() -> list:
    """The steps in CHAIN order; the access API and the grants step share one access service."""
    modules = {name: _load(name) for name in CHAIN}
    service = AccessService()
    steps: list = []
    for name in CHAIN:
        if name == "access_api":
            steps += [AccessServiceHost(service), modules[name].AccessAPIServer(service)]
        elif name == "grants":
            steps.append(modules[name].Grants(service))
        elif name == "self_review":
            steps.append(modules[name].SelfReview(service))
        elif name == "guardrails":
            steps.append(modules[name].Guardrails(service))  # files and decides operation approvals
        elif name == "audit":
            steps.append(modules[name].Audit(service))  # also writes the service's workflow events
        else:
            steps += modules[name].addons
    return steps


addons = [Gateway(build_chain())]
