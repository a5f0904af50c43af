"""The access HTTP API, served by the gateway itself under /jitgate/v1/ on every listener.

Requesters and reviewers (the `jitgate` CLI, any UI) use it with the same OIDC ID token they give
kubectl; the identity addon has verified it before this runs. Kubernetes never uses this path
prefix, so these calls are answered here and never reach a cluster. The step is handed the access
service it serves (the gateway hands the same one to the grants step); loaded alone, it hosts one.

    mitmdump -s addons/gateway.py ...   # then: curl -H "Authorization: Bearer $ID_TOKEN" https://gateway/jitgate/v1/whoami
"""

from __future__ import annotations

import json
import logging
import time

from mitmproxy import http

from jitgate.access.service import AccessService
from jitgate.api.access_api import AccessAPI, audit_annotations, is_api_path
from jitgate.chain.flow import call_of, current_policy, refuse
from jitgate.chain.service_host import AccessServiceHost
from jitgate.store.sqlite import StoreError

log = logging.getLogger("jitgate.api")


class AccessAPIServer:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        self.api = AccessAPI(store=service.current_store, rules_provider=lambda: service.rules,
                             notifier=service.thread_notifier, now=time.time)

    async def request(self, flow: http.HTTPFlow) -> None:
        if not is_api_path(flow.request.path):
            return
        call = call_of(flow)
        call.annotations["jitgate.dev/api"] = "true"
        if flow.response:
            return  # e.g. no or bad token: already answered 401
        try:
            # On the store thread: SQLite may wait on a writer in another process.
            status, body = await self.service.run(
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
        flow.response = http.Response.make(status, json.dumps(body).encode(),
                                           {"Content-Type": "application/json", "Cache-Control": "no-store"})


_service = AccessService()
addons = [AccessServiceHost(_service), AccessAPIServer(_service)]
