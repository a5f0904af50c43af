"""The access HTTP API, served by the gateway itself under /jitgate/v1/ on every listener.

Requesters and reviewers (the `jitgate` CLI, any UI) use it with the same OIDC ID token they give
kubectl; the identity addon has verified it before this runs. Kubernetes never uses this path
prefix, so these calls are answered here and never reach a cluster. Needs addons/grants.py (it
owns the grant store, the rules and the notifier).

    mitmdump -s addons/gateway.py ...   # then: curl -H "Authorization: Bearer $ID_TOKEN" https://gateway/jitgate/v1/whoami
"""

from __future__ import annotations

import asyncio
import json
import time

from mitmproxy import ctx, http

from jitgate.api.access_api import AccessAPI, is_api_path
from jitgate.chain.flow import call_of, find_addon, refuse


class AccessAPIServer:
    def __init__(self) -> None:
        self.api: AccessAPI | None = None

    def running(self) -> None:
        if find_addon("grants") is None:
            raise RuntimeError("addons/access_api.py needs addons/grants.py loaded too")

    def access_api(self) -> AccessAPI | None:
        # Built on first use: listeners may accept calls before every addon's running() has run.
        if self.api is None:
            grants = find_addon("grants")
            if grants is not None:
                self.api = AccessAPI(store=_Lazy(grants), rules_provider=lambda: grants.rules,
                                     notifier=_Notifier(grants), now=time.time)
        return self.api

    async def request(self, flow: http.HTTPFlow) -> None:
        if not is_api_path(flow.request.path):
            return
        call = call_of(flow)
        call.annotations["jitgate.dev/api"] = "true"
        if flow.response:
            return  # e.g. no or bad token: already answered 401
        api = self.access_api()
        if api is None:
            refuse(flow, 503, "jitgate: the access API is not running (addons/grants.py is not loaded)")
            return
        # SQLite may wait on a writer in another process: keep the event loop free.
        status, body = await asyncio.to_thread(
            api.handle, flow.request.method, flow.request.path, flow.request.raw_content or b"",
            call.identity, flow.request.headers.get("Content-Type"))
        if status < 400:
            call.allow("jitgate access API")
        else:
            call.deny(str(body.get("message", "refused")))
        flow.response = http.Response.make(status, json.dumps(body).encode(),
                                           {"Content-Type": "application/json", "Cache-Control": "no-store"})


class _Lazy:
    """The grants addon's current store, looked up on each use (the store may be reopened)."""

    def __init__(self, grants) -> None:
        self._grants = grants

    def __getattr__(self, name: str):
        return getattr(self._grants.store, name)


class _Notifier:
    """Forwards to the grants addon's notifier, which runs in the event loop (calls come from a thread)."""

    def __init__(self, grants) -> None:
        self._grants = grants

    def notify(self, kind, request, actor=None, reason=None) -> None:
        notifier = self._grants.notifier
        if notifier is not None:
            loop = ctx.master.event_loop
            loop.call_soon_threadsafe(notifier.notify, kind, request, actor, reason)


addons = [AccessAPIServer()]
