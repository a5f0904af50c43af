"""Audit sinks against a real HTTPS receiver (aiohttp on its own thread, certificate from a test CA)
that fails, is down, hangs and recovers: every event arrives once, in order, signed; OCSF events
carry the fields the mapping promises; the addon's options are validated and wired."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
from aiohttp import web
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from jitgate.audit import sinks as sinks_module
from jitgate.audit.log import AuditLog
from jitgate.audit.sinks import StdoutSink, WebhookSink, parse_webhook_url
from jitgate.chain.flow import call_of
from jitgate.identity.oidc import Identity
from jitgate.kube.audit_event import build_event, new_audit_id
from jitgate.kube.request_info import parse_request
from jitgate.notify.webhooks import verify_signature
from testkit.net import TestCA, free_port

REPO = Path(__file__).resolve().parents[1]
JITGATE = REPO / ".venv" / "bin" / "jitgate"
SECRET = b"siem-shared-secret"
FAST = dict(batch_size=10, flush_interval=0.05, backoff=0.02, max_backoff=0.1)


class Receiver:
    """A SIEM collector over real TLS: POST /ingest takes NDJSON batches. `fail` answers the next N
    requests with 500; `hang` holds requests until released; it can start later (down, then up)."""

    def __init__(self, ca: TestCA, port: int | None = None) -> None:
        self.ca = ca
        self.port = port or free_port()
        self.fail = 0
        self.hang = False
        self.requests: list[tuple[dict[str, str], bytes, int]] = []  # headers, body, the status answered
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.runner: web.AppRunner | None = None
        self.release: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/ingest?source=jitgate"

    def start(self) -> Receiver:
        cert, key = self.ca.issue("siem", hosts=["127.0.0.1"])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="siem", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(context), self.loop).result(10)
        return self

    async def _serve(self, context) -> None:
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/ingest", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=context).start()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hang:
            with self.lock:
                self.requests.append((dict(request.headers), body, 0))
            await self.release.wait()
            return web.Response(status=503)
        with self.lock:
            status = 500 if self.fail > 0 else 200
            self.fail -= status == 500
            self.requests.append((dict(request.headers), body, status))
        return web.Response(status=status)

    def unhang(self) -> None:
        self.hang = False
        self.loop.call_soon_threadsafe(self.release.set)

    def accepted(self) -> list[bytes]:
        """The event lines of the batches answered 200, in arrival order."""
        with self.lock:
            return [line for _, body, status in self.requests if status == 200 for line in body.splitlines()]

    def stop(self) -> None:
        if self.loop is None:
            return

        async def shutdown() -> None:
            self.release.set()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.loop = None


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("siem-ca"))


@pytest.fixture
def receiver(ca):
    r = Receiver(ca).start()
    yield r
    r.stop()


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def event(i: int, decision: str = "allow", code: int = 200, verb: str = "get") -> dict:
    return build_event(
        audit_id=new_audit_id(), stage="ResponseComplete", request_uri=f"/api/v1/namespaces/dev/pods/web-{i}?pretty=1",
        verb=verb, user={"username": "alice@example.com", "uid": "u-1", "groups": ["sre", "system:authenticated"]},
        source_ips=["10.0.0.7", "127.0.0.1"], user_agent="kubectl/v1.37.1",
        object_ref={"resource": "pods", "namespace": "dev", "name": f"web-{i}", "apiVersion": "v1"},
        response_code=code, response_message=None if code < 400 else "forbidden: no grant",
        request_received=1_796_000_000 + i, stage_timestamp=1_796_000_000.25 + i,
        annotations={"jitgate.dev/decision": decision, "jitgate.dev/cluster": "dev",
                     "jitgate.dev/reason": "granted by grant-1" if decision == "allow" else "no grant covers it"},
    )


def feed(log: AuditLog, sink, count: int, start: int = 1) -> list[bytes]:
    """Write `count` events to the local log, then hand each to the sink, as the addon does."""
    lines = []
    for i in range(start, start + count):
        e = event(i)
        written = log.write(e)
        sink.submit(e, written)
        lines.append(written.line)
    return lines


def check_signatures(receiver: Receiver) -> None:
    for headers, body, _ in receiver.requests:
        assert verify_signature(SECRET, headers["X-Jitgate-Timestamp"], body, headers["X-Jitgate-Signature"])
        assert headers["Content-Type"] == "application/x-ndjson"
        assert int(headers["X-Jitgate-Event-Count"]) == len(body.splitlines())


def test_retried_batches_arrive_once_in_order_signed(receiver: Receiver, ca: TestCA, tmp_path: Path):
    receiver.fail = 3
    log = AuditLog(tmp_path / "audit.log", chain=True)
    sink = WebhookSink(receiver.url, secret=SECRET, ca=str(ca.cert_path), spool_dir=tmp_path / "spool", **FAST)
    sent = feed(log, sink, 35)
    wait_until(lambda: len(receiver.accepted()) == 35)
    sink.close()
    log.close()
    assert receiver.accepted() == sent, "every event once, in order, the log's own bytes"
    statuses = [status for _, _, status in receiver.requests]
    assert statuses[:3] == [500, 500, 500] and set(statuses[3:]) == {200}
    first_batch = {h["X-Jitgate-Delivery"] for h, _, _ in receiver.requests[:4]}
    assert len(first_batch) == 1, "a retried batch keeps its delivery id"
    assert len({body for _, body, _ in receiver.requests[:4]}) == 1
    check_signatures(receiver)
    assert sink.stats["delivered"] == 35 and sink.stats["failures"] == 3 and sink.stats["dropped"] == 0
    # The SIEM's copy checks out with the same verifier as the local log.
    copy = tmp_path / "siem-copy.log"
    copy.write_bytes(b"".join(line + b"\n" for line in receiver.accepted()))
    result = subprocess.run([str(JITGATE), "audit", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "verified 35 events" in result.stdout, result.stdout


def test_endpoint_down_spools_to_disk_then_replays(ca: TestCA, tmp_path: Path):
    receiver = Receiver(ca)  # not listening yet
    spool = tmp_path / "spool"
    log = AuditLog(tmp_path / "audit.log", chain=True)
    sink = WebhookSink(receiver.url, secret=SECRET, ca=str(ca.cert_path), spool_dir=spool, queue_size=5, **FAST)
    try:
        sent = feed(log, sink, 40)
        assert sink.stats["spooled"] == 35 and sink.stats["dropped"] == 0, "beyond 5 in memory: on disk"
        on_disk = (spool / "webhook.0.jsonl").read_bytes().splitlines()
        assert on_disk == sent[5:]
        wait_until(lambda: sink.stats["failures"] >= 3)  # it keeps trying
        more = feed(log, sink, 5, start=41)  # while spooling, new events queue behind the spool
        receiver.start()
        wait_until(lambda: len(receiver.accepted()) == 45)
        assert receiver.accepted() == sent + more
        wait_until(lambda: not (spool / "webhook.0.jsonl").exists())
        check_signatures(receiver)
    finally:
        sink.close()
        receiver.stop()
        log.close()


def test_events_unsent_at_close_are_sent_first_after_a_restart(ca: TestCA, tmp_path: Path):
    receiver = Receiver(ca)
    spool = tmp_path / "spool"
    log = AuditLog(tmp_path / "audit.log", chain=True)
    first = WebhookSink(receiver.url, ca=str(ca.cert_path), spool_dir=spool, queue_size=10, **FAST)
    sent = feed(log, first, 25)  # 10 in memory, 15 spooled
    first.close(timeout=0.2)
    assert (spool / "webhook.0.head.jsonl").read_bytes().splitlines() == sent[:10]
    second = WebhookSink(receiver.url, ca=str(ca.cert_path), spool_dir=spool, queue_size=10, **FAST)
    try:
        sent += feed(log, second, 5, start=26)
        receiver.start()
        wait_until(lambda: len(receiver.accepted()) == 30)
        assert receiver.accepted() == sent
    finally:
        second.close()
        receiver.stop()
        log.close()
    assert not list(spool.glob("*.jsonl")), "the spool is empty once sent"


def test_two_processes_never_share_a_spool(ca: TestCA, tmp_path: Path):
    receiver = Receiver(ca)
    a = WebhookSink(receiver.url, ca=str(ca.cert_path), spool_dir=tmp_path, queue_size=1, **FAST)
    b = WebhookSink(receiver.url, ca=str(ca.cert_path), spool_dir=tmp_path, queue_size=1, **FAST)
    try:
        assert a.spool.where != b.spool.where
    finally:
        a.close(0)
        b.close(0)


def test_a_hanging_receiver_never_blocks_the_caller(receiver: Receiver, ca: TestCA, tmp_path: Path):
    receiver.hang = True
    log = AuditLog(tmp_path / "audit.log", chain=True)
    sink = WebhookSink(receiver.url, ca=str(ca.cert_path), spool_dir=tmp_path / "spool", queue_size=50, timeout=30, **FAST)
    feed(log, sink, 1)
    wait_until(lambda: len(receiver.requests) == 1)  # its thread now waits on the receiver
    sent = feed(log, sink, 500, start=2)  # returns at once: memory (50, the one in flight too), then disk
    assert sink.stats["submitted"] == 501 and sink.stats["spooled"] == 451 and sink.stats["dropped"] == 0
    assert len((tmp_path / "audit.log").read_bytes().splitlines()) == 501, "the local log has every line"
    receiver.unhang()  # the held request gets a 503: retried
    wait_until(lambda: len(receiver.accepted()) == 501)
    assert receiver.accepted()[1:] == sent
    sink.close()
    log.close()


def test_full_spool_drops_and_says_so(ca: TestCA, tmp_path: Path, caplog):
    receiver = Receiver(ca)
    log = AuditLog(tmp_path / "audit.log", chain=True)
    sink = WebhookSink(receiver.url, ca=str(ca.cert_path), spool_dir=tmp_path / "spool", queue_size=2,
                       spool_max_bytes=4000, **FAST)
    feed(log, sink, 20)
    sink.close(0)
    log.close()
    assert sink.stats["dropped"] > 0 and "drops events" in caplog.text and "local audit log still has them" in caplog.text
    assert len((tmp_path / "audit.log").read_bytes().splitlines()) == 20


def test_stdout_sink_writes_json_lines(tmp_path: Path):
    r, w = os.pipe()
    log = AuditLog(tmp_path / "audit.log", chain=True)
    sink = StdoutSink(fd=w, fmt="k8s", **FAST)
    sent = feed(log, sink, 12)
    sink.close()
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        assert reader.read().splitlines() == sent
    log.close()


# --- OCSF ---------------------------------------------------------------------------------------------

# The OCSF 1.3 API Activity attributes the mapping fills, as a schema: required ones and their types.
OCSF_SCHEMA = {
    "type": "object",
    "required": ["class_uid", "category_uid", "activity_id", "type_uid", "severity_id", "time", "metadata",
                 "actor", "api", "src_endpoint", "http_request", "status_id", "disposition_id", "raw_data"],
    "properties": {
        "class_uid": {"const": 6003},
        "category_uid": {"const": 6},
        "activity_id": {"enum": [0, 1, 2, 3, 4, 99]},
        "type_uid": {"type": "integer"},
        "severity_id": {"enum": [1, 3]},
        "time": {"type": "integer", "minimum": 1_000_000_000_000},
        "start_time": {"type": "integer"},
        "status_id": {"enum": [0, 1, 2]},
        "status": {"enum": ["Unknown", "Success", "Failure"]},
        "status_code": {"type": "string"},
        "disposition_id": {"enum": [0, 1, 2]},
        "action_id": {"enum": [0, 1, 2]},
        "raw_data": {"type": "string"},
        "metadata": {
            "type": "object",
            "required": ["version", "product", "uid", "correlation_uid", "event_code", "sequence"],
            "properties": {"version": {"pattern": r"^1\.\d+\.\d+$"},
                           "product": {"type": "object", "required": ["name", "vendor_name"]},
                           "sequence": {"type": "integer", "minimum": 1},
                           "profiles": {"type": "array", "items": {"type": "string"}}},
        },
        "actor": {"type": "object", "required": ["user"],
                  "properties": {"user": {"type": "object", "required": ["name"],
                                          "properties": {"name": {"type": "string", "minLength": 1},
                                                         "groups": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}}},
        "api": {"type": "object", "required": ["operation", "request"],
                "properties": {"operation": {"type": "string", "minLength": 1},
                               "request": {"type": "object", "required": ["uid"]},
                               "response": {"type": "object", "required": ["code"], "properties": {"code": {"type": "integer"}}}}},
        "src_endpoint": {"type": "object", "required": ["ip"], "properties": {"ip": {"type": "string"}}},
        "http_request": {"type": "object", "required": ["url"],
                         "properties": {"url": {"type": "object", "required": ["path"]},
                                        "http_method": {"enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]}}},
        "resources": {"type": "array", "items": {"type": "object", "required": ["type"]}},
    },
}


def test_ocsf_events(receiver: Receiver, ca: TestCA, tmp_path: Path):
    log = AuditLog(tmp_path / "audit.log", chain=True)
    sink = WebhookSink(receiver.url, secret=SECRET, ca=str(ca.cert_path), fmt="ocsf", **FAST)
    originals = [event(1), event(2, decision="deny", code=403, verb="delete"), event(3, verb="patch")]
    lines = []
    for e in originals:
        written = log.write(e)
        sink.submit(e, written)
        lines.append(written.line)
    wait_until(lambda: len(receiver.accepted()) == 3)
    sink.close()
    log.close()
    received = [json.loads(line) for line in receiver.accepted()]
    for got in received:
        jsonschema.validate(got, OCSF_SCHEMA)
        assert got["type_uid"] == 600300 + got["activity_id"]
    allowed, denied, patched = received
    assert allowed["actor"]["user"] == {"name": "alice@example.com", "uid": "u-1",
                                        "groups": [{"name": "sre"}, {"name": "system:authenticated"}]}
    assert allowed["api"]["operation"] == "get" and allowed["activity_id"] == 2
    assert allowed["src_endpoint"] == {"ip": "10.0.0.7", "intermediate_ips": ["127.0.0.1"]}
    assert allowed["http_request"]["url"] == {"url_string": "/api/v1/namespaces/dev/pods/web-1?pretty=1",
                                              "path": "/api/v1/namespaces/dev/pods/web-1", "query_string": "pretty=1"}
    assert allowed["http_request"]["http_method"] == "GET" and allowed["http_request"]["user_agent"] == "kubectl/v1.37.1"
    assert (allowed["status"], allowed["disposition"], allowed["action"]) == ("Success", "Allowed", "Allowed")
    assert allowed["time"] == 1_796_000_001_250 and allowed["start_time"] == 1_796_000_001_000
    assert allowed["resources"] == [{"type": "pods", "name": "web-1", "data": {"namespace": "dev", "apiVersion": "v1"}}]
    assert allowed["dst_endpoint"] == {"name": "dev"}
    assert allowed["metadata"]["correlation_uid"] == originals[0]["auditID"]
    assert allowed["metadata"]["uid"] == originals[0]["auditID"] + "/ResponseComplete"
    assert [r["metadata"]["sequence"] for r in received] == [1, 2, 3]
    assert (denied["status"], denied["status_id"], denied["disposition_id"], denied["action"]) == ("Failure", 2, 2, "Denied")
    assert denied["api"]["response"] == {"code": 403, "message": "forbidden: no grant", "error": "Forbidden"}
    assert denied["activity_id"] == 4 and denied["severity_id"] == 3 and denied["status_detail"] == "no grant covers it"
    assert patched["activity_id"] == 3 and patched["http_request"]["http_method"] == "PATCH"
    assert [r["raw_data"].encode() for r in received] == lines, "the original lines, chain included"
    assert received[0]["unmapped"]["annotations"]["jitgate.dev/cluster"] == "dev"
    check_signatures(receiver)


# --- the addon: options and wiring ---------------------------------------------------------------------

def load_addon(name: str):
    spec = importlib.util.spec_from_file_location(f"jitgate_addons_under_test.{name}", REPO / f"addons/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


audit_module = load_addon("audit")
ALICE = Identity("alice@example.com", ("oidc:developers",), "https://idp.example", "alice", 4e9, {})


def test_addon_ships_after_the_local_line(receiver: Receiver, ca: TestCA, tmp_path: Path):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log=str(tmp_path / "audit.log"), audit_webhook=receiver.url,
                       audit_webhook_ca=str(ca.cert_path), audit_webhook_secret_file=str(secret_file),
                       audit_sink_flush_ms=50, audit_format="ocsf")
        assert audit.log.chain and audit.log._checkpoint.store == tmp_path / "audit-chain.db"
        for path in ("/api/v1/namespaces/dev/pods", "/api/v1/namespaces/dev/secrets/db"):
            f = tflow.tflow()
            call = call_of(f)
            call.identity = ALICE
            call.info = parse_request("GET", path)
            call.allow("granted")
            assert audit.write(f, "ResponseComplete", 200)
        wait_until(lambda: len(receiver.accepted()) == 2)
        audit.done()
    local = (tmp_path / "audit.log").read_bytes().splitlines()
    shipped = [json.loads(line) for line in receiver.accepted()]
    assert [s["raw_data"].encode() for s in shipped] == local
    assert shipped[1]["resources"][0] == {"type": "secrets", "name": "db", "data": {"namespace": "dev", "apiVersion": "v1"}}
    check_signatures(receiver)


def test_addon_local_log_stays_fail_closed_and_first(receiver: Receiver, ca: TestCA, tmp_path: Path):
    """/dev/full takes the open and refuses every write: the call is refused, nothing is shipped."""
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        tctx.configure(audit, audit_log="/dev/full", audit_webhook=receiver.url, audit_webhook_ca=str(ca.cert_path),
                       audit_sink_flush_ms=20, audit_spool_dir=str(tmp_path / "spool"))
        f = tflow.tflow()
        call_of(f).allow("granted")
        audit.request(f)
        assert f.response is not None and f.response.status_code == 503
        time.sleep(0.2)
        audit.done()
    assert receiver.requests == []


@pytest.mark.parametrize("options,message", [
    ({"audit_webhook": "http://siem.example/ingest"}, "must use https"),
    ({"audit_webhook": "ftp://siem.example/"}, "https:// URL"),
    ({"audit_webhook": "https://user:pw@siem.example/"}, "must not carry credentials"),
    ({"audit_webhook": "https://siem.example/", "audit_webhook_secret": "a", "audit_webhook_secret_file": "/etc/x"}, "not both"),
    ({"audit_webhook": "https://siem.example/", "audit_webhook_secret_file": "/nonexistent/secret"}, "cannot read"),
    ({"audit_webhook": "https://siem.example/", "audit_webhook_ca": "/nonexistent/ca.pem"}, "no such file"),
    ({"audit_webhook_secret": "s"}, "audit_webhook is not"),
    ({"audit_webhook": "https://siem.example/", "audit_sink_batch": 0}, "at least 1"),
    ({"audit_stdout": True, "audit_spool_max": "lots"}, "no size"),
    ({"audit_stdout": True, "audit_log": "-"}, "twice"),
])
def test_addon_refuses_bad_options(tmp_path: Path, options: dict, message: str):
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        options = {"audit_log": str(tmp_path / "audit.log"), "audit_spool_dir": str(tmp_path / "spool"), **options}
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(audit, **options)
        audit.done()


def test_addon_empty_secret_file_and_bad_ca_are_refused(tmp_path: Path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    audit = audit_module.Audit()
    with taddons.context(audit) as tctx:
        base = {"audit_log": str(tmp_path / "audit.log"), "audit_webhook": "https://siem.example/"}
        with pytest.raises(exceptions.OptionsError, match="is empty"):
            tctx.configure(audit, **base, audit_webhook_secret_file=str(tmp_path / "empty"))
        with pytest.raises(exceptions.OptionsError, match="cannot set up the audit webhook"):
            tctx.configure(audit, **base, audit_webhook_ca=str(tmp_path / "not-a-cert.pem"))
        audit.done()


def test_loopback_http_is_allowed():
    assert parse_webhook_url("http://127.0.0.1:8088/services/collector").target == "/services/collector"
    assert parse_webhook_url("https://siem.example").name == "https://siem.example:443"


def test_addon_reconfigured_while_down_loses_nothing(ca: TestCA, tmp_path: Path, monkeypatch):
    """Changing a sink option restarts the sinks: what the old one held is spooled and sent first by the new one."""
    monkeypatch.setattr(sinks_module, "MAX_BACKOFF", 0.2)  # test-sized waits between retries
    receiver = Receiver(ca)
    audit = audit_module.Audit()
    try:
        with taddons.context(audit) as tctx:
            tctx.configure(audit, audit_log=str(tmp_path / "audit.log"), audit_webhook=receiver.url,
                           audit_webhook_ca=str(ca.cert_path), audit_sink_flush_ms=20, audit_sink_queue=4)
            for i in range(10):
                f = tflow.tflow()
                call_of(f).allow(f"call {i}")
                assert audit.write(f, "ResponseComplete", 200)
            tctx.configure(audit, audit_sink_batch=3)
            spool = list((tmp_path / "audit-spool").glob("webhook.*.jsonl"))
            assert sorted(p.name for p in spool) == ["webhook.0.head.jsonl", "webhook.0.jsonl"], "one slot, reused"
            for i in range(10, 15):
                f = tflow.tflow()
                call_of(f).allow(f"call {i}")
                assert audit.write(f, "ResponseComplete", 200)
            receiver.start()
            wait_until(lambda: len(receiver.accepted()) == 15)
            audit.done()
    finally:
        receiver.stop()
    assert receiver.accepted() == (tmp_path / "audit.log").read_bytes().splitlines()


def test_gateway_ships_its_audit_to_the_siem(receiver: Receiver, ca: TestCA, tmp_path: Path):
    """The real gateway (mitmdump -s addons/gateway.py --set audit_webhook=...): every audited call
    reaches the receiver as OCSF, signed, in the order of the local log."""
    import http.client

    from testkit.gateway import GatewayProcess
    from tests.test_audit_chain import POLICY

    (tmp_path / "token").write_text("cluster-token\n")
    (tmp_path / "secret").write_bytes(SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(ca=ca.cert_path, token=tmp_path / "token"))
    gateway = GatewayProcess(tmp_path / "gw", policy, reverse_endpoints={"dev": "https://api.dev.jitgate.test"},
                             options={"grant_store": str(tmp_path / "gw" / "state" / "jitgate.db"),
                                      "audit_webhook": receiver.url, "audit_webhook_ca": str(ca.cert_path),
                                      "audit_webhook_secret_file": str(tmp_path / "secret"), "audit_format": "ocsf",
                                      "audit_sink_flush_ms": "50"}).start()
    try:
        context = ssl.create_default_context(cafile=str(gateway.ca_path))
        for i in range(4):
            conn = http.client.HTTPSConnection("127.0.0.1", gateway.reverse["dev"][1], context=context, timeout=10)
            conn.request("GET", f"/api/v1/namespaces/dev/pods/p{i}")
            assert conn.getresponse().status == 401
            conn.close()
        wait_until(lambda: len(receiver.accepted()) == 4)
    finally:
        gateway.stop()
    shipped = [json.loads(line) for line in receiver.accepted()]
    for got in shipped:
        jsonschema.validate(got, OCSF_SCHEMA)
    assert [s["raw_data"].encode() for s in shipped] == gateway.audit_path.read_bytes().splitlines()
    assert {s["actor"]["user"]["name"] for s in shipped} == {"system:anonymous"}
    assert {s["status_code"] for s in shipped} == {"401"} and {s["disposition"] for s in shipped} == {"Blocked"}
    check_signatures(receiver)
