"""Audit: one `audit.k8s.io/v1` Event line per API call, written before the response is released.

Denied and unauthenticated calls are audited too, with the gateway's decision and reason as
annotations. Long-running calls (watch, log follow, exec) get a `ResponseStarted` event before the
stream opens and a `ResponseComplete` one when it ends, sharing the auditID, as kube-apiserver does.
When the log cannot be written the call is refused (fail closed): a response whose line failed is
replaced by a 500 Status, and while the log is failing new calls are refused before they are sent.

Every line is hash-chained to the one before (jitgate.audit.chain), and the chain's head is
checkpointed in SQLite (`audit_chain_store`: by default audit-chain.db beside the log), so
`jitgate audit verify` finds a changed, removed, inserted or reordered line and a cut-off end.
Optional sinks ship each event to a SIEM's HTTPS endpoint or to standard output, in the k8s shape
or as OCSF, after the local line is written and without ever holding a call (jitgate.audit.sinks).

    mitmdump -s addons/audit.py --set audit_log=state/audit.log
    mitmdump -s addons/audit.py --set audit_webhook=https://siem.example/ingest \
        --set audit_webhook_secret_file=/etc/jitgate/siem-secret --set audit_format=ocsf
"""

from __future__ import annotations

import logging
import ssl
import stat
import time
from pathlib import Path

from mitmproxy import ctx, exceptions, http, tcp
from mitmproxy.utils import human

from jitgate.audit.log import AuditLog, AuditLogError
from jitgate.audit.sinks import (
    FORMATS,
    Sinks,
    StdoutSink,
    WebhookSink,
    parse_webhook_url,
)
from jitgate.chain.call import Call
from jitgate.chain.flow import METADATA_KEY, call_of, current_policy, refuse
from jitgate.kube.audit_event import build_event, name_from_body, new_audit_id, object_ref_from
from jitgate.masking.detectors import DEFAULT_DETECTORS
from jitgate.masking.targets import mask_command_query
from jitgate.kube.status import status_body

log = logging.getLogger("jitgate.audit")

ANONYMOUS = {"username": "system:anonymous", "groups": ["system:unauthenticated"]}

# Options whose change reopens the log, and those whose change rebuilds the sinks.
LOG_OPTIONS = frozenset({"audit_log", "audit_fsync", "audit_chain_store", "grant_store"})
SINK_OPTIONS = frozenset({
    "audit_log", "audit_chain_store", "grant_store", "audit_webhook", "audit_webhook_ca", "audit_webhook_secret",
    "audit_webhook_secret_file", "audit_sink_batch", "audit_sink_flush_ms", "audit_webhook_timeout",
    "audit_sink_queue", "audit_spool_dir", "audit_spool_max", "audit_stdout", "audit_format",
})
SINK_CLOSE_TIMEOUT = 5.0  # seconds a stopping gateway spends sending what its sinks hold in memory


def _request_uri(flow: http.HTTPFlow, info) -> str:
    """The target as sent, but an exec/attach command through the masking detectors (no audit line
    holds a secret typed on a command line)."""
    if flow.request.method == "CONNECT":
        return f"{flow.request.host}:{flow.request.port}"
    path = flow.request.path
    if info is not None and info.subresource in ("exec", "attach") and "command=" in path:
        try:
            detectors = current_policy().masking.detectors()
        except exceptions.OptionsError:
            detectors = DEFAULT_DETECTORS
        path, _ = mask_command_query(path, detectors)
    return path


def _created_name(flow: http.HTTPFlow, info) -> str:
    """A create's object name from its JSON body (read once per call, only for creates without one)."""
    if info.verb != "create" or info.name or info.subresource or not flow.request.raw_content:
        return ""
    return name_from_body(flow.request.get_content(strict=False), flow.request.headers.get("Content-Type", ""))


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
        request_uri=_request_uri(flow, info),
        verb=info.verb if info else flow.request.method.lower(),
        user=user,
        source_ips=[peer[0]] if peer else [],
        user_agent=flow.request.headers.get("User-Agent", ""),
        object_ref=object_ref_from(info, _created_name(flow, info)) if info else None,
        response_code=code,
        response_message=message,
        request_received=call.received,
        stage_timestamp=time.time(),
        annotations=annotations,
    )


def chain_store() -> Path | None:
    """Where the chain's head is checkpointed: audit_chain_store, else audit-chain.db beside a
    regular log file. Never the grant store: the checkpoint commits on the event loop, and waiting
    there on a lock the store's own thread holds stalled the ending of revoked sessions."""
    if ctx.options.audit_chain_store:
        return Path(ctx.options.audit_chain_store)
    if ctx.options.audit_log == "-":
        return None
    log_path = Path(ctx.options.audit_log)
    try:
        if not stat.S_ISREG(log_path.stat().st_mode):
            return None  # a device or pipe (/dev/full, a FIFO): nothing to checkpoint beside it
    except FileNotFoundError:
        pass
    except OSError:
        return None
    return log_path.parent / "audit-chain.db"


def state_folder() -> Path:
    store = chain_store()
    if store is not None:
        return store.parent
    return Path("state")


def _positive(name: str) -> int:
    value = getattr(ctx.options, name)
    if value < 1:
        raise exceptions.OptionsError(f"{name} must be at least 1")
    return value


def sink_plan() -> list[tuple[type, dict]]:
    """The sinks the options ask for, as (class, arguments), validated: raises OptionsError on a
    bad value. Nothing is started here, so the running sinks keep going until the new ones are sure."""
    o = ctx.options
    if o.audit_format not in FORMATS:
        raise exceptions.OptionsError(f"audit_format must be one of {', '.join(FORMATS)}, not {o.audit_format!r}")
    if o.audit_stdout and o.audit_log == "-":
        raise exceptions.OptionsError("audit_stdout with audit_log=- would print every event twice: choose one")
    for name in ("audit_webhook_ca", "audit_webhook_secret", "audit_webhook_secret_file"):
        if getattr(o, name) and not o.audit_webhook:
            raise exceptions.OptionsError(f"{name} is set but audit_webhook is not")
    if not (o.audit_webhook or o.audit_stdout):
        return []
    try:
        spool_max = human.parse_size(o.audit_spool_max)
    except ValueError:
        raise exceptions.OptionsError(f"audit_spool_max: {o.audit_spool_max!r} is no size (e.g. 512m, 1g)") from None
    if not spool_max:
        raise exceptions.OptionsError("audit_spool_max must be above zero")
    common = dict(fmt=o.audit_format, batch_size=_positive("audit_sink_batch"),
                  flush_interval=_positive("audit_sink_flush_ms") / 1000, queue_size=_positive("audit_sink_queue"),
                  spool_dir=Path(o.audit_spool_dir) if o.audit_spool_dir else state_folder() / "audit-spool",
                  spool_max_bytes=spool_max)
    plan: list[tuple[type, dict]] = []
    if o.audit_webhook:
        try:
            target = parse_webhook_url(o.audit_webhook)
        except ValueError as e:
            raise exceptions.OptionsError(f"audit_webhook: {e}") from None
        secret = _webhook_secret()
        context = None
        if target.scheme == "https":
            if o.audit_webhook_ca and not Path(o.audit_webhook_ca).is_file():
                raise exceptions.OptionsError(f"audit_webhook_ca: no such file: {o.audit_webhook_ca}")
            try:
                context = ssl.create_default_context(cafile=o.audit_webhook_ca or None)
            except (ssl.SSLError, OSError) as e:  # a CA file that holds no certificate
                raise exceptions.OptionsError(f"cannot set up the audit webhook: audit_webhook_ca: {e}") from None
        plan.append((WebhookSink, dict(url=o.audit_webhook, secret=secret, timeout=_positive("audit_webhook_timeout"),
                                       context_factory=(lambda: context) if context else None, **common)))
    if o.audit_stdout:
        plan.append((StdoutSink, common))
    return plan


def start_sinks(plan: list[tuple[type, dict]]) -> Sinks:
    started = []
    for cls, kwargs in plan:
        try:
            started.append(cls(**kwargs))
        except OSError as e:  # the spool folder
            Sinks(started).close(0)
            raise exceptions.OptionsError(f"cannot set up the audit spool under {kwargs['spool_dir']}: {e}") from None
    return Sinks(started)


def _webhook_secret() -> bytes | None:
    o = ctx.options
    if o.audit_webhook_secret and o.audit_webhook_secret_file:
        raise exceptions.OptionsError("set audit_webhook_secret or audit_webhook_secret_file, not both")
    if o.audit_webhook_secret_file:
        try:
            secret = Path(o.audit_webhook_secret_file).read_bytes().strip()
        except OSError as e:
            raise exceptions.OptionsError(f"audit_webhook_secret_file: cannot read it: {e.strerror or e}") from None
        if not secret:
            raise exceptions.OptionsError("audit_webhook_secret_file is empty")
        return secret
    return o.audit_webhook_secret.encode() if o.audit_webhook_secret else None


GATEWAY_USER = {"username": "system:jitgate", "groups": ["system:jitgate"]}
# Workflow event kind -> (verb, resource of the jitgate.dev API it is about, the detail naming it).
WORKFLOW = {
    "request.auto_approved": ("approve", "accessrequests", "access-request"),
    "request.expired": ("expire", "accessrequests", "access-request"),
    "grant.expired": ("expire", "grants", "grant"),
    "session.terminated": ("terminate", "sessions", "session"),
}


def workflow_event(kind: str, details: dict, now: float) -> dict:
    """An audit event for what the gateway did on its own (no API call): an automatic approval, an
    expiry, a live session ended. Its user is the gateway; its objectRef the request, grant or
    session (the auditID of the session's call); the details are annotations."""
    verb, resource, subject = WORKFLOW[kind]
    name = str(details.get(subject, ""))
    annotations = {"jitgate.dev/workflow": kind, "jitgate.dev/decision": "none",
                   **{f"jitgate.dev/{key}": str(value) for key, value in details.items() if value}}
    return build_event(
        audit_id=new_audit_id(), stage="ResponseComplete", request_uri=f"/jitgate/v1/{resource}/{name}", verb=verb,
        user=GATEWAY_USER, source_ips=[], user_agent="jitgate", response_code=200, request_received=now,
        stage_timestamp=now, annotations=annotations,
        object_ref={"apiGroup": "jitgate.dev", "apiVersion": "v1", "resource": resource, "name": name},
    )


class Audit:
    def __init__(self, service=None) -> None:
        self.log: AuditLog | None = None
        self.sinks = Sinks()
        self.failing = False
        self.service = service  # the access service whose workflow events this step writes (the gateway's)
        if service is not None:
            service.workflow_listeners.append(self.workflow)

    def workflow(self, kind: str, details: dict) -> None:
        """Write a workflow event; a failing log refuses the next calls (there is no call to refuse now)."""
        try:
            self.record(workflow_event(kind, details, time.time()))
        except AuditLogError as e:
            if not self.failing:
                log.error("audit log write failed (%s event); refusing calls until it works again: %s", kind, e)
            self.failing = True

    def load(self, loader) -> None:
        loader.add_option(
            "audit_log", str, "state/audit.log",
            "Where audit events go: a JSON-lines file (created 0600, appended to, reopened after "
            "rotation), or '-' for standard output. Every line is hash-chained to the one before "
            "(check with `jitgate audit verify`).",
        )
        loader.add_option(
            "audit_fsync", bool, False,
            "fsync the audit log after every event (survives a machine crash, costs a disk flush per call).",
        )
        loader.add_option(
            "audit_chain_store", str, "",
            "SQLite file where the audit chain's head is checkpointed, so a log cut off at its end "
            "is caught. Empty: audit-chain.db beside the audit log (never the grant store: its "
            "commits would wait on the store's own thread).",
        )
        loader.add_option(
            "audit_webhook", str, "",
            "Also send every audit event to this URL (a SIEM's HTTPS collector), in batches of "
            "JSON lines, retried until taken, spooled to disk while it is down. https:// with a "
            "verified certificate; http:// only to a loopback address. Empty: off.",
        )
        loader.add_option(
            "audit_webhook_ca", str, "",
            "CA certificate file (PEM) the audit webhook's certificate must chain to (default: the system's CAs).",
        )
        loader.add_option(
            "audit_webhook_secret", str, "",
            "Sign each audit webhook batch with HMAC-SHA256 under this secret (X-Jitgate-Signature: "
            "sha256=HMAC(secret, '<X-Jitgate-Timestamp>.<body>')). Visible in the process list: "
            "prefer audit_webhook_secret_file.",
        )
        loader.add_option(
            "audit_webhook_secret_file", str, "",
            "File holding the audit webhook's HMAC secret (surrounding whitespace is ignored).",
        )
        loader.add_option(
            "audit_sink_batch", int, 100,
            "Most events per audit sink batch (a batch leaves when full, or audit_sink_flush_ms after it began).",
        )
        loader.add_option(
            "audit_sink_flush_ms", int, 1000,
            "Longest wait, in milliseconds, before an audit sink sends a batch that is not full.",
        )
        loader.add_option(
            "audit_webhook_timeout", int, 10,
            "Seconds to wait for the audit webhook's answer before the batch is retried.",
        )
        loader.add_option(
            "audit_sink_queue", int, 10000,
            "Events each audit sink keeps in memory; beyond that (the receiver is down or slow) "
            "they go to its disk spool, in order, and are sent when it is back.",
        )
        loader.add_option(
            "audit_spool_dir", str, "",
            "Folder of the audit sinks' disk spools (0700). Empty: audit-spool/ in the state folder "
            "(the folder of audit_chain_store).",
        )
        loader.add_option(
            "audit_spool_max", str, "1g",
            "Largest disk spool per audit sink (k/m/g). Events beyond it are dropped from the sink "
            "and logged; the local audit log still has them.",
        )
        loader.add_option(
            "audit_stdout", bool, False,
            "Also print every audit event to standard output, one JSON line each (for a container's "
            "log collector), in audit_format.",
        )
        loader.add_option(
            "audit_format", str, "k8s",
            "What the audit sinks send: k8s (the log's own audit.k8s.io/v1 lines, chain included) or "
            "ocsf (OCSF 1.3 API Activity, class_uid 6003, with the original line in raw_data). "
            "The local log is always k8s.",
            choices=FORMATS,
        )

    def configure(self, updated: set[str]) -> None:
        if updated & LOG_OPTIONS:
            if not ctx.options.audit_log:
                raise exceptions.OptionsError("audit_log must name a file (or '-' for standard output)")
            try:
                new = AuditLog(ctx.options.audit_log if ctx.options.audit_log == "-" else Path(ctx.options.audit_log),
                               fsync=ctx.options.audit_fsync, chain=True, checkpoint_store=chain_store())
            except AuditLogError as e:
                raise exceptions.OptionsError(f"cannot open the audit log: {e}") from None
            if self.log is not None:
                self._close_log()
            self.log, self.failing = new, False
        if updated & SINK_OPTIONS:
            plan = sink_plan()  # validated before the running sinks stop
            self.sinks.close(0)  # what they hold goes to their spools, which the new ones send first
            self.sinks = Sinks()
            self.sinks = start_sinks(plan)

    def done(self) -> None:
        if self.log is not None:
            self._close_log()
        self.sinks.close(SINK_CLOSE_TIMEOUT)
        self.sinks = Sinks()

    def _close_log(self) -> None:
        try:
            self.log.close()
        except AuditLogError as e:
            log.error("closing the audit log: %s", e)

    def record(self, event: dict) -> None:
        """The local line first (fail closed: raises AuditLogError), then the sinks (never fail)."""
        if self.log is None:
            raise AuditLogError("no audit log is configured")
        written = self.log.write(event)
        if self.sinks and written is not None:
            self.sinks.submit(event, written)

    def write(self, flow: http.HTTPFlow, stage: str, code: int | None, message: str | None = None) -> bool:
        call = call_of(flow)
        try:
            self.record(event_for(flow, call, stage, code, message))
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
            self.record(event)
        except AuditLogError as e:
            log.error("audit log write failed for a refused raw TCP flow: %s", e)
            self.failing = True


addons = [Audit()]
