"""jitgate.notify against a real HTTPS webhook receiver (aiohttp, its own thread and event loop)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from ruamel.yaml import YAML

from jitgate.notify.webhooks import (
    KINDS,
    Notifier,
    Webhook,
    make_event,
    parse_retry_after,
    slack_escape,
    slack_message,
    verify_signature,
)
from jitgate.policy.document import Node, PolicyError
from jitgate.policy.notifications import parse_notifications
from testkit import net

REQUEST = {
    "id": "7d4f6c1e-3b8a-4f0e-9a51-2c6e0b1d9f30",
    "requester": "alice@example.com",
    "rule": "dev-read",
    "cluster": "dev",
    "namespaces": ["team-a", "team-b"],
    "cluster_wide": False,
    "resources": ["pods", "pods/log"],
    "verbs": ["get", "list", "watch"],
    "duration_seconds": 5400,
    "reason": "debugging INC-42",
    "state": "pending",
    "approvals": [],
    "required": 2,
    "created_at": 1_700_000_000.0,
    "store_row": 17,  # not part of the event
}
NOW = 1_700_000_123.25


# -- the receiver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # never answer (until the receiver stops)


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver over real TLS (and plain HTTP on a second port). Each test registers its
    own path with the replies to give, in order; after those it answers `then`."""

    def __init__(self, ca: net.TestCA) -> None:
        self.ca = ca
        self.port = net.free_port()
        self.plain_port = net.free_port()
        self._scripts: dict[str, tuple[deque[Reply], Reply]] = {}
        self._received: dict[str, list[Received]] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    def start(self) -> "Receiver":
        import ssl

        cert, key = self.ca.issue("receiver", hosts=["127.0.0.1", "localhost"])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(context), self._loop).result(10)
        return self

    async def _serve(self, context) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)  # the access log would show the URL paths
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context).start()
        await web.TCPSite(self._runner, "127.0.0.1", self.plain_port).start()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self._received.setdefault(request.path, []).append(Received(dict(request.headers), body, time.monotonic()))
            replies, then = self._scripts.get(request.path, (deque(), Reply(404)))
            reply = replies.popleft() if replies else then
        if reply.hang:
            await self._release.wait()
        return web.Response(status=reply.status, headers=reply.headers)

    def hook(self, replies: Iterable[Reply] = (), then: Reply = Reply(), prefix: str = "/hooks/") -> str:
        path = f"{prefix}{uuid.uuid4().hex}"
        with self._lock:
            self._scripts[path] = (deque(replies), then)
        return path

    def url(self, path: str, plain: bool = False) -> str:
        return f"http://127.0.0.1:{self.plain_port}{path}" if plain else f"https://127.0.0.1:{self.port}{path}"

    def requests(self, path: str) -> list[Received]:
        with self._lock:
            return list(self._received.get(path, ()))

    def stop(self) -> None:
        async def shutdown() -> None:
            self._release.set()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> net.TestCA:
    return net.TestCA.create(tmp_path_factory.mktemp("notify-ca"))


@pytest.fixture(scope="module")
def receiver(ca: net.TestCA):
    r = Receiver(ca).start()
    yield r
    r.stop()


def webhook(receiver: Receiver, path: str, **kw) -> Webhook:
    """A webhook with test-sized waits, trusting the test CA."""
    kw.setdefault("ca_file", receiver.ca.cert_path)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return Webhook(receiver.url(path, plain=kw.get("allow_insecure", False)), **kw)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# -- payloads as received -------------------------------------------------------------------------


def test_json_event_as_received(receiver):
    created, approved = receiver.hook(), receiver.hook()

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, created, events={"created"}), webhook(receiver, approved, events={"approved"})],
                     now=lambda: NOW)
        n.start()
        n.notify("created", REQUEST)
        decided = dict(REQUEST, state="approved", approvals=[
            {"reviewer": "bob@example.com", "time": NOW - 60, "reason": "ok"},
            {"reviewer": "carol@example.com", "time": "2023-11-14T22:15:00Z"},
        ], expires_at=NOW + 5400)
        n.notify("approved", decided, actor="carol@example.com", reason="looks fine")
        await until(lambda: receiver.requests(created) and receiver.requests(approved))
        await n.close()
        return n

    n = asyncio.run(main())
    assert (n.stats.sent, n.stats.failed, n.stats.retried, n.stats.dropped) == (2, 0, 0, 0)

    [got] = receiver.requests(created)
    event = got.json()
    uuid.UUID(event["id"])
    assert got.headers["Content-Type"] == "application/json; charset=utf-8"
    assert got.headers["X-Jitgate-Event"] == "access_request.created"
    assert got.headers["X-Jitgate-Delivery"] == event["id"]
    assert got.headers["X-Jitgate-Timestamp"] == "1700000123"
    assert "X-Jitgate-Signature" not in got.headers  # no secret configured
    expected_request = {k: v for k, v in REQUEST.items() if k not in ("store_row", "created_at")}
    assert event == {
        "type": "access_request.created",
        "id": event["id"],
        "time": "2023-11-14T22:15:23.250Z",
        "request": {**expected_request, "created_at": "2023-11-14T22:13:20.000Z", "expires_at": None},
        "actor": None,
        "reason": None,
        "links": {
            "show_command": f"jitgate show {REQUEST['id']}",
            "approve_command": f"jitgate approve {REQUEST['id']}",
            "deny_command": f"jitgate deny {REQUEST['id']} --reason '...'",
        },
    }

    [got] = receiver.requests(approved)
    event = got.json()
    assert event["type"] == got.headers["X-Jitgate-Event"] == "access_request.approved"
    assert event["actor"] == {"username": "carol@example.com"}
    assert event["reason"] == "looks fine"
    assert event["request"]["state"] == "approved"
    assert event["request"]["expires_at"] == "2023-11-14T23:45:23.250Z"
    assert event["request"]["approvals"] == [
        {"reviewer": "bob@example.com", "time": "2023-11-14T22:14:23.250Z", "reason": "ok"},
        {"reviewer": "carol@example.com", "time": "2023-11-14T22:15:00Z", "reason": None},
    ]
    assert event["links"] == {"show_command": f"jitgate show {REQUEST['id']}"}  # nothing left to approve


def test_signature_verifies(receiver):
    path = receiver.hook()
    secret = "s3cret-for-hmac"

    async def main() -> None:
        n = Notifier([webhook(receiver, path, secret=secret)])
        n.start()
        n.notify("denied", dict(REQUEST, state="denied"), actor="bob@example.com", reason="not during the freeze")
        await until(lambda: receiver.requests(path))
        await n.close()

    asyncio.run(main())
    [got] = receiver.requests(path)
    timestamp, signature = got.headers["X-Jitgate-Timestamp"], got.headers["X-Jitgate-Signature"]
    # What a receiver computes, independently of jitgate.
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + got.body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}"
    assert abs(int(timestamp) - time.time()) < 60
    assert verify_signature(secret, timestamp, got.body, signature)
    assert not verify_signature("another secret", timestamp, got.body, signature)
    assert not verify_signature(secret, timestamp, got.body.replace(b"denied", b"approved"), signature)
    assert not verify_signature(secret, str(int(timestamp) + 1), got.body, signature)
    assert not verify_signature(secret, timestamp, got.body, signature, now=int(timestamp) + 301)  # replayed later


def test_slack_message_as_received_escapes_user_text(receiver):
    path = receiver.hook()
    hostile = dict(
        REQUEST,
        requester="mallory <@U024BE7LH>",
        namespaces=["team-a`<!here>"],
        reason="urgent <!channel> & see <https://evil.example/login|the runbook>\nsecond line > quoted",
    )

    async def main() -> None:
        n = Notifier([webhook(receiver, path, format="slack")])
        n.start()
        n.notify("created", hostile)
        await until(lambda: receiver.requests(path))
        await n.close()

    asyncio.run(main())
    message = receiver.requests(path)[0].json()
    assert set(message) == {"text", "blocks", "unfurl_links", "unfurl_media"}
    assert message["text"].startswith("Access request waiting for approval: mallory &lt;@U024BE7LH&gt; on cluster dev")
    assert [b["type"] for b in message["blocks"]] == ["section", "section", "section", "section", "context"]

    texts = [message["text"]]
    for block in message["blocks"]:
        objects = [block["text"]] if "text" in block else block.get("fields", []) + block.get("elements", [])
        for obj in objects:
            assert obj["type"] == "mrkdwn" and obj["verbatim"] is True  # no auto-linking of mentions
            texts.append(obj["text"])
    for text in texts:
        # No '<' at all (links and mentions need one); '>' only as our own quote marker.
        assert "<" not in text
        assert all(">" not in line[1:] for line in text.split("\n")), text
    everything = "\n".join(texts)
    assert "&lt;!channel&gt; &amp; see &lt;https://evil.example/login|the runbook&gt;" in everything
    assert ">urgent &lt;!channel&gt;" in everything and ">second line &gt; quoted" in everything
    assert "`team-a'&lt;!here&gt;`" in everything  # a backtick cannot close the code span
    assert "*Requester*\nmallory &lt;@U024BE7LH&gt;" in everything
    assert f"Approve: `jitgate approve {REQUEST['id']}`" in everything
    assert f"Deny: `jitgate deny {REQUEST['id']} --reason '...'`" in everything
    assert "*Duration*\n1h30m" in everything
    assert "*Approvals*\n0 of 2" in everything


def test_slack_cluster_wide_and_decision():
    event = make_event("revoked", dict(REQUEST, cluster_wide=True, namespaces=[], state="revoked",
                                       approvals=["bob@example.com", "carol@example.com"]),
                       actor="dave@example.com", reason="incident closed", now=NOW)
    message = slack_message(event)
    text = "\n".join(f["text"] for f in message["blocks"][1]["fields"])
    assert "*Namespaces*\nall namespaces (cluster-wide)" in text
    assert "*Approvals*\n2 of 2: bob@example.com, carol@example.com" in text
    assert message["text"].startswith("Access revoked by dave@example.com")
    assert message["blocks"][3]["text"]["text"] == "*Reason for the decision*\n>incident closed"
    assert "approve" not in json.dumps(message)  # decided: no approve/deny commands
    created = slack_message(make_event("created", REQUEST, actor=REQUEST["requester"], now=NOW))
    assert created["text"] == f"Access request waiting for approval: alice@example.com on cluster dev (request {REQUEST['id']})"
    assert slack_escape("x" * 2000).endswith("…") and len(slack_escape("x" * 2000)) == 1000
    assert slack_escape("&" * 2000).startswith("&amp;")  # cut before escaping: entities stay whole


def test_event_filter(receiver):
    decisions, everything = receiver.hook(), receiver.hook()

    async def main() -> None:
        n = Notifier([webhook(receiver, decisions, events={"approved", "denied"}),
                      webhook(receiver, everything, format="slack")])
        n.start()
        n.notify("created", REQUEST)
        n.notify("approved", dict(REQUEST, state="approved"), actor="bob@example.com")
        n.notify("expired", dict(REQUEST, state="expired"))
        await until(lambda: len(receiver.requests(everything)) == 3 and receiver.requests(decisions))
        await n.close()

    asyncio.run(main())
    assert [r.headers["X-Jitgate-Event"] for r in receiver.requests(decisions)] == ["access_request.approved"]
    assert [r.headers["X-Jitgate-Event"] for r in receiver.requests(everything)] == [
        "access_request.created", "access_request.approved", "access_request.expired"]  # in order


# -- retries --------------------------------------------------------------------------------------


def test_retries_5xx_then_succeeds(receiver, caplog):
    caplog.set_level(logging.DEBUG, "jitgate.notify")
    path = receiver.hook([Reply(500), Reply(503)])

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, path)])
        n.start()
        n.notify("created", REQUEST)
        await until(lambda: len(receiver.requests(path)) == 3)
        await n.close()
        return n

    n = asyncio.run(main())
    attempts = receiver.requests(path)
    assert len(attempts) == 3
    assert len({a.body for a in attempts}) == 1  # the same event each time
    assert len({a.headers["X-Jitgate-Delivery"] for a in attempts}) == 1  # so receivers can drop duplicates
    assert (n.stats.sent, n.stats.retried, n.stats.failed) == (1, 2, 0)
    assert "attempt 1 of 5 failed: HTTP 500; retrying" in caplog.text
    assert "attempt 2 of 5 failed: HTTP 503; retrying" in caplog.text
    assert "delivered (attempt 3)" in caplog.text


def test_4xx_is_not_retried_and_redirects_not_followed(receiver, caplog):
    bad = receiver.hook([Reply(400)])
    moved = receiver.hook([Reply(302, {"Location": "/hooks/elsewhere"})])

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, bad, name="bad"), webhook(receiver, moved, name="moved")])
        n.start()
        n.notify("created", REQUEST)
        await until(lambda: n.stats.failed == 2)
        await asyncio.sleep(0.3)  # a retry would come within ~0.05 s
        await n.close()
        return n

    n = asyncio.run(main())
    assert len(receiver.requests(bad)) == 1
    assert len(receiver.requests(moved)) == 1
    assert receiver.requests("/hooks/elsewhere") == []
    assert (n.stats.sent, n.stats.retried, n.stats.failed) == (0, 0, 2)
    assert "webhook bad: access_request.created event" in caplog.text
    assert "HTTP 400; not retried" in caplog.text and "HTTP 302; not retried" in caplog.text


def test_retry_after_is_honoured_within_bounds(receiver):
    path = receiver.hook([Reply(429, {"Retry-After": "1"}), Reply(503, {"Retry-After": "86400"})])

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, path, max_retry_after=1.5)])
        n.start()
        n.notify("created", REQUEST)
        await until(lambda: n.stats.sent == 1, timeout=8)
        await n.close()
        return n

    n = asyncio.run(main())
    first, second, third = (r.at for r in receiver.requests(path))
    assert 0.95 <= second - first < 1.4  # Retry-After: 1, not the 0.01 s backoff
    assert 1.45 <= third - second < 2.2  # a day's Retry-After is capped at max_retry_after
    assert n.stats.retried == 2


def test_parse_retry_after():
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:16:23 GMT", NOW) == pytest.approx(59.75)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", NOW) == 0.0  # in the past
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-5", NOW) is None


def test_hanging_receiver_times_out_retries_and_gives_up(receiver, caplog):
    path = receiver.hook(then=Reply(hang=True))

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, path, timeout=0.3, max_attempts=3)])
        n.start()
        n.notify("created", REQUEST)
        await until(lambda: n.stats.failed == 1)
        await n.close()
        return n

    n = asyncio.run(main())
    assert len(receiver.requests(path)) == 3
    assert (n.stats.sent, n.stats.retried, n.stats.failed) == (0, 2, 1)
    assert "attempt 1 of 3 failed: no response within 0.3s; retrying" in caplog.text
    assert "no response within 0.3s; giving up after 3 attempt(s)" in caplog.text


def test_notify_never_blocks_the_caller(receiver, caplog):
    stuck, healthy = receiver.hook(then=Reply(hang=True)), receiver.hook()

    async def main() -> tuple[Notifier, list[float], int, float]:
        n = Notifier([webhook(receiver, stuck, name="stuck", timeout=30), webhook(receiver, healthy, name="healthy")])
        n.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        beat = asyncio.create_task(ticker())
        n.notify("created", REQUEST)
        await until(lambda: receiver.requests(stuck))  # the stuck receiver now holds a request open
        durations = []
        for i in range(20):
            started = time.perf_counter()
            n.notify("created", dict(REQUEST, id=f"req-{i}"))
            durations.append(time.perf_counter() - started)
        # The other webhook is not held up behind the stuck one.
        await until(lambda: len(receiver.requests(healthy)) == 21)
        ticks_before = ticks
        await until(lambda: ticks - ticks_before >= 10)  # the event loop keeps running while a delivery hangs
        ticked = ticks - ticks_before
        started = time.monotonic()
        await n.close(timeout=0.3)
        closed_in = time.monotonic() - started
        beat.cancel()
        return n, durations, ticked, closed_in

    n, durations, ticked, closed_in = asyncio.run(main())
    assert max(durations) < 1.0, durations  # queued, not delivered: the stuck delivery waits 30 s
    assert ticked >= 10
    assert closed_in < 5.0  # close(timeout=0.3) is bounded even with a delivery stuck for 30 s
    assert len(receiver.requests(stuck)) == 1
    assert n.stats.sent == 21
    assert n.stats.dropped == 21  # the hung one and the 20 queued behind it
    assert "webhook stuck: 20 event(s) not delivered before shutdown" in caplog.text
    assert "not delivered before shutdown" in caplog.text


def test_notify_never_raises(receiver, caplog):
    path = receiver.hook()

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, path)])
        n.start()
        n.notify("created", {"requester": "alice@example.com", "cluster": "dev"})  # no id
        n.notify("promoted", REQUEST)
        n.notify("created", dict(REQUEST, verbs="get"))
        n.notify("created", REQUEST)
        await n.close()
        n.notify("created", REQUEST)  # after close: dropped, logged
        return n

    n = asyncio.run(main())
    assert [r.json()["request"]["id"] for r in receiver.requests(path)] == [REQUEST["id"]]
    assert "notification created not sent: request.id: expected a non-empty string" in caplog.text
    assert "notification promoted not sent: unknown event kind 'promoted'" in caplog.text
    assert "request.verbs: expected a list of strings" in caplog.text
    assert "dropped: the notifier is closed" in caplog.text
    assert (n.stats.sent, n.stats.dropped) == (1, 1)


def test_queue_overflow_drops_the_oldest(receiver, caplog):
    path = receiver.hook()

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, path)], queue_size=3)
        for i in range(5):  # queued before the sender starts
            n.notify("created", dict(REQUEST, id=f"req-{i}"))
        assert n.queued == 3
        n.start()
        await until(lambda: n.stats.sent == 3)
        await n.close()
        return n

    n = asyncio.run(main())
    assert [r.json()["request"]["id"] for r in receiver.requests(path)] == ["req-2", "req-3", "req-4"]
    assert n.stats.dropped == 2
    assert re.search(r"queue full \(3 undelivered\), dropped the oldest: access_request.created event \S+ for request req-0", caplog.text)
    assert "for request req-1" in caplog.text


def test_close_drains_the_queue(receiver):
    path = receiver.hook([Reply(500)])

    async def main() -> tuple[Notifier, int]:
        n = Notifier([webhook(receiver, path)])
        n.start()
        for i in range(10):
            n.notify("created", dict(REQUEST, id=f"req-{i}"))
        await n.close(timeout=5)
        return n, len(receiver.requests(path))

    n, received_when_closed = asyncio.run(main())
    assert received_when_closed == 11  # ten events, one of them twice
    assert [r.json()["request"]["id"] for r in receiver.requests(path)][1:] == [f"req-{i}" for i in range(10)]
    assert (n.stats.sent, n.stats.retried, n.stats.dropped, n.queued) == (10, 1, 0, 0)


def test_notify_from_another_thread(receiver):
    path = receiver.hook()

    async def main() -> None:
        n = Notifier([webhook(receiver, path)])
        n.start()
        await asyncio.to_thread(n.notify, "created", REQUEST)
        await until(lambda: receiver.requests(path))
        await n.close()

    asyncio.run(main())
    assert receiver.requests(path)[0].json()["request"]["id"] == REQUEST["id"]


def test_session_factory_is_used_and_closed(receiver):
    import aiohttp

    path = receiver.hook()
    sessions: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession(headers={"X-Egress": "gateway-7"}))
        return sessions[-1]

    async def main() -> None:
        n = Notifier([webhook(receiver, path)], session_factory=factory)
        n.start()
        n.notify("cancelled", dict(REQUEST, state="cancelled"), actor=REQUEST["requester"])
        await until(lambda: receiver.requests(path))
        await n.close()

    asyncio.run(main())
    assert receiver.requests(path)[0].headers["X-Egress"] == "gateway-7"
    assert len(sessions) == 1 and sessions[0].closed


# -- TLS and plain HTTP ---------------------------------------------------------------------------


def test_untrusted_certificate_is_refused_and_not_retried(receiver, caplog):
    path = receiver.hook()

    async def main() -> Notifier:
        n = Notifier([webhook(receiver, path, ca_file=None)])  # system CAs do not know the test CA
        n.start()
        n.notify("created", REQUEST)
        await until(lambda: n.stats.failed == 1)
        await n.close()
        return n

    n = asyncio.run(main())
    assert receiver.requests(path) == []
    assert n.stats.retried == 0
    assert "TLS certificate verification failed" in caplog.text and "not retried" in caplog.text


def test_plain_http_only_when_allowed(receiver):
    path = receiver.hook()
    with pytest.raises(ValueError, match="plain http"):
        Webhook(receiver.url(path, plain=True))

    async def main() -> None:
        n = Notifier([webhook(receiver, path, allow_insecure=True)])
        n.start()
        n.notify("created", REQUEST)
        await until(lambda: receiver.requests(path))
        await n.close()

    asyncio.run(main())
    assert receiver.requests(path)[0].json()["type"] == "access_request.created"


# -- no secrets in logs ---------------------------------------------------------------------------


def test_no_credentials_in_logs_or_repr(receiver, caplog):
    caplog.set_level(logging.DEBUG)
    slack_like = receiver.hook([Reply(500)], then=Reply(hang=True), prefix="/services/T0/B0/xoxb-path-secret-")
    refused = receiver.hook([Reply(403)])
    credentials = {
        "headers": {"Authorization": "Bearer header-secret-123", "X-Api-Key": "apikey-secret-789"},
        "secret": "hmac-secret-456",
    }
    hooks = [webhook(receiver, slack_like, format="slack", timeout=0.2, max_attempts=3, **credentials),
             webhook(receiver, refused, name="refused", **credentials)]

    async def main() -> Notifier:
        n = Notifier(hooks)
        n.start()
        n.notify("created", REQUEST)
        await until(lambda: n.stats.failed == 2)
        await n.close()
        return n

    asyncio.run(main())
    got = receiver.requests(slack_like)
    assert len(got) == 3 and got[0].headers["Authorization"] == "Bearer header-secret-123"  # they were sent
    assert "giving up after 3 attempt(s)" in caplog.text and "HTTP 403; not retried" in caplog.text
    assert f"webhook https://127.0.0.1:{receiver.port}:" in caplog.text  # named by origin only
    shown = caplog.text + "".join(repr(h) for h in hooks)
    for secret in ("path-secret", "header-secret-123", "apikey-secret-789", "hmac-secret-456", "/services/"):
        assert secret not in shown


# -- configuration ---------------------------------------------------------------------------------


def test_webhook_validation(tmp_path):
    ok = "https://hooks.example.com/x"
    for kwargs, message in [
        ({"url": "ftp://hooks.example.com/x"}, "url: must be an https:// URL"),
        ({"url": "https://user:pw@hooks.example.com/x"}, "url: must not carry credentials"),
        ({"url": ok, "format": "teams"}, "format: must be one of json, slack"),
        ({"url": ok, "events": {"created", "approved-ish"}}, "events: unknown event 'approved-ish'"),
        ({"url": ok, "events": set()}, "events: must name at least one event"),
        ({"url": ok, "headers": {"Content-Type": "text/plain"}}, "headers: Content-Type is set by the notifier"),
        ({"url": ok, "headers": {"X-Jitgate-Signature": "forged"}}, "is set by the notifier"),
        ({"url": ok, "headers": {"Bad Name": "x"}}, "invalid header name"),
        ({"url": ok, "headers": {"X-A": "a\r\nX-B: b"}}, "single-line"),
        ({"url": ok, "timeout": 0}, "timeout: must be a number"),
        ({"url": ok, "max_attempts": 0}, "max_attempts: must be an integer from 1 to 20"),
        ({"url": ok, "max_attempts": True}, "max_attempts"),
        ({"url": ok, "secret": ""}, "secret: must be a non-empty string"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Webhook(**kwargs)
    hook = Webhook("https://Hooks.Example.com:8443/services/T/B/X")
    assert hook.name == "https://hooks.example.com:8443"
    assert hook.events == frozenset(KINDS) and hook.wants("revoked")
    with pytest.raises(TypeError):
        hook.headers["Authorization"] = "x"  # read-only


def _policy(tmp_path: Path, text: str) -> Node:
    file = tmp_path / "notify.yaml"
    file.write_text(text)
    return Node(YAML(typ="rt", pure=True).load(file.read_text()), file, "").child("notifications")


def test_parse_notifications(tmp_path, ca, monkeypatch):
    monkeypatch.setenv("JITGATE_TEST_HOOK_TOKEN", "Bearer from-env")
    (tmp_path / "hook-secret.txt").write_text("from-file\n")
    (tmp_path / "ca.pem").write_bytes(ca.cert_path.read_bytes())
    webhooks = parse_notifications(_policy(tmp_path, """\
notifications:
  webhooks:
    - url: https://hooks.slack.example/services/T/B/X
      name: slack-approvers
      format: slack
      events: [created, access_request.approved]
      headers:
        Authorization: {env: JITGATE_TEST_HOOK_TOKEN}
        X-Team: platform
      secret: {file: hook-secret.txt}
      ca_file: ca.pem
      timeout: 2.5
      max_attempts: 3
      backoff: 0.5
      max_retry_after: 30
    - url: https://audit.example.com/hooks/jitgate
"""))
    slack, audit = webhooks
    assert slack.url == "https://hooks.slack.example/services/T/B/X" and slack.name == "slack-approvers"
    assert slack.format == "slack" and slack.events == {"created", "approved"}
    assert dict(slack.headers) == {"Authorization": "Bearer from-env", "X-Team": "platform"}
    assert slack.secret == "from-file"
    assert slack.ca_file == tmp_path / "ca.pem"
    assert (slack.timeout, slack.max_attempts, slack.backoff, slack.max_retry_after) == (2.5, 3, 0.5, 30)
    assert audit == Webhook("https://audit.example.com/hooks/jitgate")
    assert parse_notifications(None) == ()


@pytest.mark.parametrize("body, where, message", [
    ("    - url: http://hooks.example.com/x\n", "4: notifications.webhooks[0].url", "plain http"),
    ("    - url: https://a.example/x\n      retries: 3\n", "5: notifications.webhooks[0].retries", "unknown field 'retries'"),
    ("    - url: https://a.example/x\n      events: [created, granted]\n", "5: notifications.webhooks[0].events", "unknown event 'granted'"),
    ("    - url: https://a.example/x\n      timeout: true\n", "5: notifications.webhooks[0].timeout", "expected a number"),
    ("    - url: https://a.example/x\n      secret: {env: JITGATE_TEST_UNSET_VARIABLE}\n",
     "5: notifications.webhooks[0].secret.env", "environment variable JITGATE_TEST_UNSET_VARIABLE is not set"),
    ("    - url: https://a.example/x\n      secret: {file: a, env: B}\n",
     "5: notifications.webhooks[0].secret", "exactly one of file, env"),
    ("    - url: https://a.example/x\n      ca_file: missing.pem\n", "5: notifications.webhooks[0].ca_file", "file not found"),
    ("    - url: https://a.example/x\n    - url: https://a.example/y\n", "5: notifications.webhooks[1].url",
     "another webhook is already named 'https://a.example'"),
    ("    - {url: https://a.example/x}\n  retry: 1\n", "5: notifications.retry", "unknown field 'retry'"),
])
def test_policy_errors_are_located(tmp_path, monkeypatch, body, where, message):
    monkeypatch.delenv("JITGATE_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(PolicyError) as info:
        parse_notifications(_policy(tmp_path, "# notifications\nnotifications:\n  webhooks:\n" + body))
    assert f"notify.yaml:{where}: " in str(info.value)
    assert message in str(info.value)
