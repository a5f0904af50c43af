"""The access HTTP API, served by the gateway itself under /jitgate/v1/ on every listener.

Requesters and reviewers (the `jitgate` CLI, any UI) use it with the same OIDC ID token they give
kubectl; the identity addon has verified it before this runs. Kubernetes never uses this path
prefix, so these calls are answered here and never reach a cluster. The step is handed the access
service it serves (the gateway hands the same one to the grants step); loaded alone, it hosts one.

With the recording step loaded (its `recordings` option), it also serves the recorded sessions
(`/jitgate/v1/sessions...`: list, timeline, HAR, flow file, exec asciicasts) to those the policy's
`sessions:` section lets see them; each view and export is a call of this API, so it is audited
(`jitgate.dev/api-session`, `-visibility`, `-export`) and recorded like any other.

    mitmdump -s addons/gateway.py ...   # then: curl -H "Authorization: Bearer $ID_TOKEN" https://gateway/jitgate/v1/whoami
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from mitmproxy import ctx, http

from jitgate.access.service import AccessService
from jitgate.api.access_api import AccessAPI, Download, audit_annotations, is_api_path, is_sessions_path
from jitgate.api.sessions_api import SessionViews
from jitgate.chain.flow import call_of, current_policy, refuse
from jitgate.chain.service_host import AccessServiceHost
from jitgate.policy.sessions import SessionsPolicy
from jitgate.recording.scrub import scrub_bytes
from jitgate.store.sqlite import StoreError

log = logging.getLogger("jitgate.api")


class AccessAPIServer:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        self.sessions_policy = SessionsPolicy()
        self.detectors = None
        self.sessions: SessionViews | None = None
        self.api = AccessAPI(store=service.current_store, rules_provider=lambda: service.rules,
                             notifier=service.thread_notifier, now=time.time)

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        if "policy" in updated and options.policy:
            policy = current_policy()
            self.sessions_policy = policy.sessions
            self.detectors = policy.masking.detectors()
        # The recordings are the recording step's (its options); without it there are no sessions to serve.
        if {"recordings", "recording_viewer"} & updated or (self.sessions is None and hasattr(options, "recordings")):
            folder = getattr(options, "recordings", "")
            if self.sessions is not None:
                self.sessions.close()
            self.sessions = None
            if folder and not getattr(options, "recording_viewer", False):
                self.sessions = SessionViews(Path(folder).resolve(), lambda: self.service.rules,
                                             lambda: self.sessions_policy, self.mask_text)
            self.api.sessions = self.sessions

    def done(self) -> None:
        if self.sessions is not None:
            self.sessions.close()

    def mask_text(self, text: str) -> str:
        """Free text from the recordings index, as every answer carries it: no token, no detected secret."""
        text = scrub_bytes(text.encode()).decode("utf-8", "replace")
        return self.detectors.mask_text(text)[0] if self.detectors is not None and text else text

    async def request(self, flow: http.HTTPFlow) -> None:
        if not is_api_path(flow.request.path):
            return
        call = call_of(flow)
        call.annotations["jitgate.dev/api"] = "true"
        if flow.response:
            return  # e.g. no or bad token: already answered 401
        # Sessions are read from the recordings on a worker thread; the rest is store work, on the store thread.
        run = asyncio.to_thread if is_sessions_path(flow.request.path) else self.service.run
        try:
            # On the store thread: SQLite may wait on a writer in another process.
            status, body = await run(
                self.api.handle, flow.request.method, flow.request.path, flow.request.raw_content or b"",
                call.identity, flow.request.headers.get("Content-Type"))
        except StoreError as e:
            # The store's message names its file: for the gateway's log, not for callers.
            log.error("access API: grant store unavailable (audit ID %s): %s", call.audit_id, e)
            refuse(flow, 503, "jitgate: the grant store is unavailable, so the access API cannot answer now "
                              f"(fail closed; audit ID {call.audit_id})")
            return
        if flow.request.method != "GET" and status < 400:
            # A change (an approval, a revocation): the very next call sees it, not the grant cache's copy.
            self.service.counter_checked = float("-inf")
        annotations = audit_annotations(flow.request.method, flow.request.path, flow.request.raw_content or b"", status, body)
        if "jitgate.dev/api-reason" in annotations:
            # A reason is free text a person typed: it goes through the detectors like any response text.
            annotations["jitgate.dev/api-reason"] = current_policy().masking.detectors().mask_text(
                annotations["jitgate.dev/api-reason"])[0]
        call.annotations.update(annotations)
        if status < 400:
            call.allow("jitgate access API")
        else:
            call.deny(str(body.get("message", "refused")))
        if isinstance(body, Download):
            flow.response = http.Response.make(status, body.data, {
                "Content-Type": body.content_type, "Content-Disposition": f'attachment; filename="{body.filename}"',
                "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
            return
        flow.response = http.Response.make(status, json.dumps(body).encode(),
                                           {"Content-Type": "application/json", "Cache-Control": "no-store"})


_service = AccessService()
addons = [AccessServiceHost(_service), AccessAPIServer(_service)]
