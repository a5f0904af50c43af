"""jitgate: the whole chain, in order, as one mitmproxy addon.

    mitmdump -s addons/gateway.py --set policy=policies/ --set confdir=certs \\
        --mode reverse:https://api.dev.example:443@7443

Order matters: each step reads the decisions of the steps before it from the call on
flow.metadata. Each step is also an addon of its own (`mitmdump -s addons/<step>.py`); here they
run behind one dispatcher, because mitmproxy walks every registered addon for every event of
every flow: eight addons cost a quarter more CPU per call than the steps' own code (measured with
scripts/benchmark --profile). The dispatcher also fails closed: a step that breaks unexpectedly
refuses the call instead of letting it go on past the steps it skipped.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from pathlib import Path

from mitmproxy import hooks, http

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from jitgate.access.service import AccessService  # noqa: E402
from jitgate.chain.flow import publish, refuse  # noqa: E402
from jitgate.chain.service_host import AccessServiceHost  # noqa: E402
from jitgate.kube.status import status_body  # noqa: E402

log = logging.getLogger("jitgate.gateway")

CHAIN = (
    "clusters",  # which cluster; refuse hosts that are none (no open proxy); verified upstream TLS
    "identity",  # OIDC token -> username and groups; strip caller credentials; refuse impersonation
    "request_attributes",  # verb, resource, namespace, name, exec command, as kube-apiserver reads them
    "streaming",  # watch / log -f flow through unbuffered; marks long-running calls
    "access_api",  # /jitgate/v1/: requests, reviews, grants, whoami (answered here, never forwarded)
    "grants",  # an active grant must cover the call (or it is held for approval); ends sessions of ended grants
    "upstream_credential",  # the gateway's own cluster credential; scrubbed once sent
    "audit",  # one audit.k8s.io Event per call, written before the response is released
)

# Hooks where a failing step must stop the call rather than let it through.
REQUEST_HOOKS = {"http_connect", "requestheaders", "request"}
# Hooks after which the call's plain record is put on the flow (for -w, mitmweb, HAR).
PUBLISH_HOOKS = {"request", "responseheaders", "response", "error", "websocket_end"}


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


def _fail_closed(hook: str, step: object, args: tuple) -> None:
    log.exception("jitgate step %s failed in %s", type(step).__name__, hook)
    flow = args[0] if args and isinstance(args[0], http.HTTPFlow) else None
    if flow is None:
        return
    if hook in REQUEST_HOOKS and not flow.response:
        refuse(flow, 500, "jitgate: internal error while checking this call, so it is refused")
    elif hook == "response" and flow.response is not None and not flow.response.stream:
        flow.response = http.Response.make(500, status_body(500, "jitgate: internal error; the response is withheld"),
                                           {"Content-Type": "application/json"})
    elif flow.killable:
        flow.kill()


class Gateway:
    """Dispatches each mitmproxy hook to the steps that implement it, in chain order."""

    def __init__(self, steps: list) -> None:
        self.steps = steps
        for name in hooks.all_hooks:
            handlers = [(step, getattr(step, name)) for step in steps if callable(getattr(step, name, None))]
            if handlers:
                setattr(self, name, self._dispatcher(name, handlers))

    def step(self, name: str):
        """A step by its addon name (the lowercased class name), e.g. "grants"."""
        return next((s for s in self.steps if type(s).__name__.lower() == name), None)

    @staticmethod
    def _dispatcher(name: str, handlers: list):
        lifecycle = name in ("load", "configure", "running", "done")
        publishes = name in PUBLISH_HOOKS
        if any(inspect.iscoroutinefunction(fn) for _, fn in handlers):
            async def dispatch(*args):
                flow = args[0] if args and isinstance(args[0], http.HTTPFlow) else None
                if flow is not None and not flow.live:
                    return  # flows read back with -r: nothing is checked or sent again
                for step, fn in handlers:
                    try:
                        result = fn(*args)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        if lifecycle:
                            raise  # e.g. OptionsError: the gateway must not start half-configured
                        _fail_closed(name, step, args)
                        break
                if publishes and flow is not None:
                    publish(flow)
        else:
            def dispatch(*args):
                flow = args[0] if args and isinstance(args[0], http.HTTPFlow) else None
                if flow is not None and not flow.live:
                    return
                for step, fn in handlers:
                    try:
                        fn(*args)
                    except Exception:
                        if lifecycle:
                            raise
                        _fail_closed(name, step, args)
                        break
                if publishes and flow is not None:
                    publish(flow)
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
        else:
            steps += modules[name].addons
    return steps


addons = [Gateway(build_chain())]
