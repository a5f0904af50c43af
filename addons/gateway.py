"""jitgate: the whole chain, in order.

    mitmdump -s addons/gateway.py --set policy=policies/ --set confdir=certs \\
        --mode reverse:https://api.dev.example:443@7443

Order matters: each step reads the decisions of the steps before it from the call on
flow.metadata, and mitmproxy runs every hook through the addons in this order.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

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


addons = [addon for name in CHAIN for addon in _load(name).addons]
