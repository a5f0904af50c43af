"""Audit: one `audit.k8s.io/v1` Event line per API call, written before the response is released.

Denied and unauthenticated calls are audited too, with the gateway's decision and reason as
annotations. Long-running calls (watch, log follow, exec) get a `ResponseStarted` event before the
stream opens and a `ResponseComplete` one when it ends, sharing the auditID, as kube-apiserver does.
When the log cannot be written the call is refused (fail closed): a response whose line failed is
replaced by a 500 Status, and while the log is failing new calls are refused before they are sent.

    mitmdump -s addons/audit.py --set audit_log=state/audit.log
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mitmproxy import ctx, exceptions, http, tcp

from jitgate.audit.log import AuditLog, AuditLogError
from jitgate.chain.call import Call
from jitgate.chain.flow import METADATA_KEY, call_of, refuse
from jitgate.kube.audit_event import build_event, new_audit_id, object_ref_from
from jitgate.kube.status import status_body

log = logging.getLogger("jitgate.audit")

ANONYMOUS = {"username": "system:anonymous", "groups": ["system:unauthenticated"]}


def event_for(flow: http.HTTPFlow, call: Call, stage: str, code: int | None, message: str | None = None) -> dict:
    info = call.info
    if call.identity is not None:
        user = {"username": call.identity.username, "groups": list(call.identity.groups)}
    else:
        user = ANONYMOUS
    annotations = {
        "jitgate.dev/decision": call.decision or "none",
        "authorization.k8s.io/decision": "allow" if call.decision == "allow" else "forbid",
    }
    if call.reason:
        annotations["jitgate.dev/reason"] = call.reason
        annotations["authorization.k8s.io/reason"] = call.reason
    if call.cluster is not None:
        annotations["jitgate.dev/cluster"] = call.cluster.name
    annotations.update(call.annotations)
    peer = flow.client_conn.peername
    return build_event(
        audit_id=call.audit_id,
        stage=stage,
        request_uri=flow.request.path if flow.request.method != "CONNECT" else f"{flow.request.host}:{flow.request.port}",
        verb=info.verb if info else flow.request.method.lower(),
        user=user,
        source_ips=[peer[0]] if peer else [],
        user_agent=flow.request.headers.get("User-Agent", ""),
        object_ref=object_ref_from(info) if info else None,
        response_code=code,
        response_message=message,
        request_received=call.received,
        stage_timestamp=time.time(),
        annotations=annotations,
    )


class Audit:
    def __init__(self) -> None:
        self.log: AuditLog | None = None
        self.failing = False

    def load(self, loader) -> None:
        loader.add_option(
            "audit_log", str, "state/audit.log",
            "Where audit events go: a JSON-lines file (created 0600, appended to, reopened after "
            "rotation), or '-' for standard output.",
        )
        loader.add_option(
            "audit_fsync", bool, False,
            "fsync the audit log after every event (survives a machine crash, costs a disk flush per call).",
        )

    def configure(self, updated: set[str]) -> None:
        if "audit_log" in updated or "audit_fsync" in updated:
            if not ctx.options.audit_log:
                raise exceptions.OptionsError("audit_log must name a file (or '-' for standard output)")
            try:
                new = AuditLog(ctx.options.audit_log if ctx.options.audit_log == "-" else Path(ctx.options.audit_log),
                               fsync=ctx.options.audit_fsync)
            except AuditLogError as e:
                raise exceptions.OptionsError(f"cannot open the audit log: {e}") from None
            if self.log is not None:
                self.log.close()
            self.log, self.failing = new, False

    def done(self) -> None:
        if self.log is not None:
            self.log.close()

    def write(self, flow: http.HTTPFlow, stage: str, code: int | None, message: str | None = None) -> bool:
        call = call_of(flow)
        try:
            if self.log is None:
                raise AuditLogError("no audit log is configured")
            self.log.write(event_for(flow, call, stage, code, message))
        except AuditLogError as e:
            if not self.failing:
                log.error("audit log write failed; refusing calls until it works again: %s", e)
            self.failing = True
            return False
        if self.failing:
            log.warning("audit log is written again; calls are let through")
            self.failing = False
        return True

    def received(self, flow: http.HTTPFlow) -> None:
        """The durable record that a call is about to be forwarded, as kube's RequestReceived stage:
        written before the first byte goes upstream, or the call is refused."""
        if self.write(flow, "RequestReceived", None):
            return
        call = call_of(flow)
        flow.request.stream = False  # mitmproxy cannot stream a request body and answer it too
        refuse(flow, 503, f"jitgate: the audit log cannot be written, so no call is let through (audit ID {call.audit_id})")
        # Its ResponseComplete line would fail the same way; a 500 must not replace this 503.
        call.completed_audited = True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A refused CONNECT (host that is no cluster) is a call too.
        if flow.response is not None:
            self.write(flow, "ResponseComplete", flow.response.status_code)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A step chose to stream this request's body: it goes upstream right after this hook.
        if flow.request.stream and flow.response is None:
            self.received(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        # Every step has decided (audit runs last): a call still unanswered is forwarded next.
        if flow.response is None and not flow.request.stream:
            self.received(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call.long_running and not call.started_audited:
            call.started_audited = True
            if not self.write(flow, "ResponseStarted", flow.response.status_code):
                flow.kill()  # the stream must not open unaudited

    def response(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call.completed_audited or flow.websocket is not None:
            return  # a WebSocket session (exec...) completes when it really ends, at websocket_end
        call.completed_audited = True
        if not self.write(flow, "ResponseComplete", flow.response.status_code) and not flow.response.stream:
            flow.response = http.Response.make(
                500,
                status_body(500, "jitgate: the audit log cannot be written, so the response is withheld"),
                {"Content-Type": "application/json"},
            )

    def error(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if not call.completed_audited:
            call.completed_audited = True
            code = flow.response.status_code if flow.response else 502
            self.write(flow, "ResponseComplete", code, str(flow.error) if flow.error else None)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if not call.completed_audited:
            call.completed_audited = True
            self.write(flow, "ResponseComplete", flow.response.status_code if flow.response else None)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # jitgate never relays raw TCP (the clusters step ends such a flow at once); the refusal is
        # audited like any other, with what little is known of it.
        if self.log is None:
            return
        record = flow.metadata.get(METADATA_KEY) or {}
        reason = record.get("reason", "jitgate relays no raw TCP")
        address = flow.server_conn.address
        peer = flow.client_conn.peername
        now = time.time()
        event = build_event(
            audit_id=new_audit_id(), stage="ResponseComplete",
            request_uri=f"{address[0]}:{address[1]}" if address else "", verb="", user=ANONYMOUS,
            source_ips=[peer[0]] if peer else [], user_agent="", object_ref=None, response_code=403,
            response_message=reason, request_received=flow.timestamp_created, stage_timestamp=now,
            annotations={"jitgate.dev/decision": "deny", "authorization.k8s.io/decision": "forbid",
                         "jitgate.dev/reason": reason, "jitgate.dev/raw-tcp": "refused"},
        )
        try:
            self.log.write(event)
        except AuditLogError as e:
            log.error("audit log write failed for a refused raw TCP flow: %s", e)
            self.failing = True


addons = [Audit()]
