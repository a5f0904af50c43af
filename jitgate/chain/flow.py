"""The mitmproxy side of the shared pieces: what every jitgate addon needs from a flow.

This is the one module in the package that imports mitmproxy; Kubernetes and policy knowledge stay
in the plain modules.
"""

from __future__ import annotations

import weakref

from mitmproxy import ctx, exceptions, http

from jitgate.chain.call import Call
from jitgate.kube.status import status_body
from jitgate.policy.document import PolicyError
from jitgate.policy.loader import Policy, load_policy_cached

METADATA_KEY = "jitgate"

POLICY_HELP = (
    "Policy file or folder of *.yaml files (clusters, identity providers, access rules). "
    "The gateway refuses to start on a policy error, naming file, line and field."
)


# The live Call of each flow, beside it and never on it: flow.metadata is serialised by `-w`, by
# mitmweb and by flow copies, and must only hold plain values (see `publish`).
_calls: weakref.WeakKeyDictionary[http.HTTPFlow, Call] = weakref.WeakKeyDictionary()


def call_of(flow: http.HTTPFlow) -> Call:
    call = _calls.get(flow)
    if call is None:
        call = _calls[flow] = Call()
    return call


def publish(flow: http.HTTPFlow) -> None:
    """Put the call's plain record on the flow, where `-w`, mitmweb and the HAR exporter see it."""
    call = _calls.get(flow)
    if call is not None:
        flow.metadata[METADATA_KEY] = call.record()


def refuse(flow: http.HTTPFlow, code: int, message: str, reason: str | None = None) -> None:
    """Answer the client with a metav1.Status and record the denial for the steps after this one."""
    call_of(flow).deny(message)
    publish(flow)
    flow.response = http.Response.make(
        code,
        status_body(code, message, reason),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def declare_policy_option(loader) -> None:
    """Every addon that reads the policy declares the same option, so each can be loaded alone."""
    loader.add_option("policy", str, "", POLICY_HELP)


def current_policy() -> Policy:
    """The parsed policy (one parse shared by all addons); OptionsError when it is wrong."""
    if not ctx.options.policy:
        raise exceptions.OptionsError("jitgate needs a policy: --set policy=<file-or-folder>")
    try:
        return load_policy_cached(ctx.options.policy)
    except PolicyError as e:
        raise exceptions.OptionsError(f"policy error: {e}") from None


def close_client_connection(flow: http.HTTPFlow, reason: str) -> bool:
    """End a live client connection now, even mid-stream (a quiet watch, an idle exec session).

    `flow.kill()` only takes effect at the flow's next event (mitmproxy#4711), which may never come
    on a quiet stream; this cancels the connection's handler the way mitmproxy's idle timeout does.
    """
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server else None
    transport = handler.transports.get(handler.client) if handler else None
    if transport is None or transport.handler is None:
        return False
    transport.handler.cancel(reason)
    return True
