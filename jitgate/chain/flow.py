"""The mitmproxy side of the shared pieces: what every jitgate addon needs from a flow.

This is the one module in the package that imports mitmproxy; Kubernetes and policy knowledge stay
in the plain modules.
"""

from __future__ import annotations

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


def call_of(flow: http.HTTPFlow) -> Call:
    call = flow.metadata.get(METADATA_KEY)
    if call is None:
        call = flow.metadata[METADATA_KEY] = Call()
    return call


def refuse(flow: http.HTTPFlow, code: int, message: str, reason: str | None = None) -> None:
    """Answer the client with a metav1.Status and record the denial for the steps after this one."""
    call_of(flow).deny(message)
    flow.response = http.Response.make(
        code,
        status_body(code, message, reason),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def find_addon(name: str):
    """A jitgate step by addon name, whether loaded alone (`-s addons/grants.py`) or inside the
    gateway's dispatcher (addons/gateway.py)."""
    addon = ctx.master.addons.get(name)
    if addon is None and (gateway := ctx.master.addons.get("gateway")) is not None:
        addon = gateway.step(name)
    return addon


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
