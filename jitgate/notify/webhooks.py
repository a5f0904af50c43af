"""Webhook notifications for access requests: a JSON event (or a Slack message) per change.

On a new pending request and on each decision the gateway POSTs one event to every configured
webhook that wants that kind of event. Delivery never stands in a decision's way: `Notifier.notify`
only renders the payload and appends it to a bounded per-webhook queue; a background task per
webhook sends it, retrying connection errors, timeouts, 5xx and 429 with exponential backoff
(honouring Retry-After up to a bound), and gives up after `max_attempts`. A dead receiver only
delays its own queue, and when that queue is full the oldest event is dropped (and logged).

Receivers can verify where an event came from: with a `secret`, each attempt carries
`X-Jitgate-Timestamp: <unix seconds>` and `X-Jitgate-Signature: sha256=<hex>`, the HMAC-SHA256 of
`<timestamp>.<body>` (see `sign` and `verify_signature`). `X-Jitgate-Delivery` is the event id,
the same on every attempt, so a receiver can drop duplicates after a retry.

Nothing here logs a webhook's headers, secret or URL path (Slack puts its credential in the path):
a webhook appears in logs by its `name`, which defaults to the URL's scheme://host:port.

Event kinds: created, approved, auto_approved, denied, expired, cancelled, revoked; the event's
`type` is `access_request.<kind>`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import hashlib
import hmac
import json
import logging
import random
import re
import shlex
import ssl
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jitgate.timefmt import format_duration, rfc3339

if TYPE_CHECKING:
    # Only for annotations: policy.py reads this module's config, and `jitgate policy check`
    # should not pay for importing aiohttp, which is imported where deliveries start.
    import aiohttp


logger = logging.getLogger("jitgate.notify")



EVENT_PREFIX = "access_request."
# kind -> the request's state after it, used when the caller's request mapping has no `state`.
KINDS: Mapping[str, str] = MappingProxyType({
    "created": "pending",
    "approved": "approved",
    "auto_approved": "approved",
    "denied": "denied",
    "expired": "expired",
    "cancelled": "cancelled",
    "revoked": "revoked",
})
FORMATS = ("json", "slack")
CLI = "jitgate"
USER_AGENT = "jitgate-notify/1"

SIGNATURE_HEADER = "X-Jitgate-Signature"
TIMESTAMP_HEADER = "X-Jitgate-Timestamp"
EVENT_HEADER = "X-Jitgate-Event"
DELIVERY_HEADER = "X-Jitgate-Delivery"
# Headers the notifier sets itself; a configured header must not replace them.
_RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (SIGNATURE_HEADER, TIMESTAMP_HEADER, EVENT_HEADER, DELIVERY_HEADER,
              "Host", "Content-Type", "Content-Length", "Transfer-Encoding", "Connection", "User-Agent")
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token

DEFAULT_QUEUE_SIZE = 1000
MAX_ATTEMPTS_LIMIT = 20
MAX_TEXT = 1000  # user-supplied text in a Slack message is cut here (section text is capped at 3000)


# ---------------------------------------------------------------------------------------------
# Events


def _rfc3339_ms(moment: float | datetime.datetime) -> str:
    return rfc3339(moment, milliseconds=True)


def make_event(kind: str, request: Mapping[str, Any], actor: str | None = None, reason: str | None = None,
               now: float | None = None) -> dict[str, Any]:
    """The JSON event for `kind` ("created", "approved", ...) about `request`.

    `request` is plain data (a mapping, or a dataclass instance) with `id`, `requester` and
    `cluster`, and optionally `rule`, `namespaces`, `cluster_wide`, `resources`, `verbs`,
    `duration_seconds`, `reason`, `state`, `approvals` (reviewer names, or mappings with `reviewer`,
    `time`, `reason`), `required` (approvals needed), `created_at`, `expires_at` (epoch seconds,
    aware datetimes or RFC 3339 strings). Anything else in it is not sent. `actor` is who made the
    change (None for the gateway's own timers: expiry, automatic approval). Raises ValueError on
    an unknown kind or a malformed request.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r} (known: {', '.join(KINDS)})")
    if dataclasses.is_dataclass(request) and not isinstance(request, type):
        request = dataclasses.asdict(request)
    if not isinstance(request, Mapping):
        raise ValueError(f"request: expected a mapping, got {type(request).__name__}")
    if actor is not None and not isinstance(actor, str):
        raise ValueError(f"actor: expected a string, got {type(actor).__name__}")
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"reason: expected a string, got {type(reason).__name__}")
    view = _request_view(request, KINDS[kind])
    quoted = shlex.quote(view["id"])
    links = {"show_command": f"{CLI} show {quoted}"}
    if view["state"] == "pending":
        links["approve_command"] = f"{CLI} approve {quoted}"
        links["deny_command"] = f"{CLI} deny {quoted} --reason '...'"
    return {
        "type": EVENT_PREFIX + kind,
        "id": str(uuid.uuid4()),
        "time": _rfc3339_ms(time.time() if now is None else now),
        "request": view,
        "actor": None if actor is None else {"username": actor},
        "reason": reason,
        "links": links,
    }


def _request_view(request: Mapping[str, Any], default_state: str) -> dict[str, Any]:
    ident = request.get("id")
    if isinstance(ident, (int, uuid.UUID)) and not isinstance(ident, bool):
        ident = str(ident)
    if not isinstance(ident, str) or not ident:
        raise ValueError("request.id: expected a non-empty string")
    approvals = request.get("approvals") or ()
    if isinstance(approvals, (str, Mapping)) or not isinstance(approvals, Iterable):
        raise ValueError("request.approvals: expected a list")
    return {
        "id": ident,
        "requester": _text(request, "requester", required=True),
        "rule": _text(request, "rule"),
        "cluster": _text(request, "cluster", required=True),
        "namespaces": _texts(request, "namespaces"),
        "cluster_wide": _flag(request, "cluster_wide"),
        "resources": _texts(request, "resources"),
        "verbs": _texts(request, "verbs"),
        "duration_seconds": _count(request, "duration_seconds"),
        "reason": _text(request, "reason"),
        "state": _text(request, "state") or default_state,
        "approvals": [_approval(item, i) for i, item in enumerate(approvals)],
        "required": _count(request, "required"),
        "created_at": _moment(request, "created_at"),
        "expires_at": _moment(request, "expires_at"),
    }


def _text(data: Mapping[str, Any], key: str, required: bool = False, where: str = "request") -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}.{key}: missing")
        return None
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{where}.{key}: expected a string, got {type(value).__name__}")
    return value


def _texts(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"request.{key}: expected a list of strings")
    items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"request.{key}: expected a list of strings")
    return items


def _flag(data: Mapping[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"request.{key}: expected true or false")
    return value


def _count(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"request.{key}: expected a non-negative integer")
    return value


def _moment(data: Mapping[str, Any], key: str, where: str = "request") -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, datetime.datetime)) and not isinstance(value, bool):
        return _rfc3339_ms(value)
    raise ValueError(f"{where}.{key}: expected a time")


def _approval(item: Any, index: int) -> dict[str, Any]:
    where = f"request.approvals[{index}]"
    if isinstance(item, str):
        return {"reviewer": item, "time": None, "reason": None}
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        item = dataclasses.asdict(item)
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a reviewer name or a mapping")
    return {
        "reviewer": _text(item, "reviewer", required=True, where=where),
        "time": _moment(item, "time", where=where),
        "reason": _text(item, "reason", where=where),
    }


# ---------------------------------------------------------------------------------------------
# Slack


_SLACK_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def slack_escape(text: str, limit: int = MAX_TEXT) -> str:
    """Text that Slack shows as written: `<...>` (links, `<!channel>`, `<@U123>`) cannot be formed.

    Cut before escaping so an entity is never split."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.translate(_SLACK_ESCAPES)


def _code(text: str) -> str:
    """An inline code span for a value; a backtick or newline in it cannot end the span early."""
    return "`" + slack_escape(text.replace("`", "'").replace("\n", " "), 200) + "`"


def _duration(seconds: int | None) -> str:
    return "policy default" if seconds is None else format_duration(seconds)


_HEADLINES = {
    "created": "Access request waiting for approval",
    "approved": "Access request approved",
    "auto_approved": "Access request approved automatically",
    "denied": "Access request denied",
    "expired": "Access request expired undecided",
    "cancelled": "Access request cancelled",
    "revoked": "Access revoked",
}


def _mrkdwn(text: str) -> dict[str, Any]:
    # verbatim: no auto-linking of URLs, channel names or mentions in what we send.
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def slack_message(event: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message (`text` fallback + section blocks) for a `make_event` event."""
    kind = event["type"].removeprefix(EVENT_PREFIX)
    req = event["request"]
    actor = event["actor"]["username"] if event.get("actor") else None
    headline = _HEADLINES.get(kind, kind)
    who = slack_escape(req["requester"], 200)
    by = f" by {slack_escape(actor, 200)}" if actor and kind != "created" else ""
    text = f"{headline}{by}: {who} on cluster {slack_escape(req['cluster'], 200)} (request {slack_escape(req['id'], 200)})"

    if req["cluster_wide"]:
        namespaces = "all namespaces (cluster-wide)"
    else:
        namespaces = ", ".join(_code(n) for n in req["namespaces"]) or "none"
    fields = [
        f"*Requester*\n{who}",
        f"*Cluster*\n{_code(req['cluster'])}",
        f"*Namespaces*\n{namespaces}",
        f"*Resources*\n{', '.join(_code(r) for r in req['resources']) or 'none'}",
        f"*Verbs*\n{', '.join(_code(v) for v in req['verbs']) or 'none'}",
        f"*Duration*\n{_duration(req['duration_seconds'])}",
    ]
    if req["rule"]:
        fields.append(f"*Rule*\n{_code(req['rule'])}")
    if req["required"] is not None:
        reviewers = ", ".join(slack_escape(a["reviewer"], 200) for a in req["approvals"])
        fields.append(f"*Approvals*\n{len(req['approvals'])} of {req['required']}" + (f": {reviewers}" if reviewers else ""))
    fields = fields[:10]  # Slack's limit per section

    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": _mrkdwn(f"*{headline}*{by}\nRequest {_code(req['id'])}")},
        {"type": "section", "fields": [_mrkdwn(f) for f in fields]},
    ]
    if req["reason"]:
        blocks.append({"type": "section", "text": _mrkdwn("*Reason given by the requester*\n" + _quote(req["reason"]))})
    if event.get("reason"):
        blocks.append({"type": "section", "text": _mrkdwn("*Reason for the decision*\n" + _quote(event["reason"]))})
    links = event["links"]
    commands = [f"Approve: {_code(links['approve_command'])}", f"Deny: {_code(links['deny_command'])}"] if "approve_command" in links else []
    commands.append(f"Details: {_code(links['show_command'])}")
    blocks.append({"type": "section", "text": _mrkdwn("\n".join(commands))})
    blocks.append({"type": "context", "elements": [_mrkdwn(f"event {_code(event['id'])} at {slack_escape(event['time'], 64)}")]})
    return {"text": text, "blocks": blocks, "unfurl_links": False, "unfurl_media": False}


def _quote(text: str) -> str:
    return "\n".join(">" + line for line in slack_escape(text).split("\n"))


def render(fmt: str, event: Mapping[str, Any]) -> bytes:
    payload = slack_message(event) if fmt == "slack" else event
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# Signatures


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The `X-Jitgate-Signature` value: `sha256=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, timestamp: str, body: bytes, signature: str, *,
                     now: float | None = None, tolerance: float = 300.0) -> bool:
    """A receiver's check: the signature matches and the timestamp is within `tolerance` seconds
    of now (so a captured request cannot be replayed later)."""
    if not timestamp.isdigit() or abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Webhook:
    """One receiver. `headers` and `secret` are credentials: kept out of repr and logs."""

    url: str = field(repr=False)  # a Slack webhook's path is its credential
    format: str = "json"
    events: frozenset[str] = frozenset(KINDS)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    secret: str | None = field(default=None, repr=False)
    ca_file: Path | None = None  # CA bundle for the receiver; the system's when None
    timeout: float = 10.0  # seconds per attempt, connecting to reading the response
    max_attempts: int = 5
    backoff: float = 1.0  # delay before the first retry; doubles each time, with jitter
    max_backoff: float = 60.0
    max_retry_after: float = 300.0  # a receiver's Retry-After is honoured up to this
    allow_insecure: bool = False  # plain http: events describe who gets access to what
    name: str = ""  # how logs refer to it; scheme://host:port by default (never the path)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("url: must be an https:// URL")
        if parts.scheme == "http" and not self.allow_insecure:
            raise ValueError("url: plain http sends access details unencrypted; use https:// (or set allow_insecure: true)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url: must not carry credentials; put them in headers")
        if parts.fragment:
            raise ValueError("url: must not have a fragment")
        try:
            parts.port
        except ValueError:
            raise ValueError("url: invalid port") from None
        if self.format not in FORMATS:
            raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        events = frozenset(self.events)
        unknown = sorted(e for e in events if e not in KINDS)
        if unknown:
            raise ValueError(f"events: unknown event {unknown[0]!r} (known: {', '.join(KINDS)})")
        if not events:
            raise ValueError("events: must name at least one event")
        headers = dict(self.headers)
        for key, value in headers.items():
            if not isinstance(key, str) or not _HEADER_NAME.fullmatch(key):
                raise ValueError(f"headers: invalid header name {key!r}")
            if key.lower() in _RESERVED_HEADERS:
                raise ValueError(f"headers: {key} is set by the notifier")
            if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"headers: {key}: expected a single-line string")
        if self.secret is not None and (not isinstance(self.secret, str) or not self.secret):
            raise ValueError("secret: must be a non-empty string")
        for name, low, high in (("timeout", 0, 300), ("backoff", 0, 3600), ("max_backoff", 0, 3600), ("max_retry_after", 0, 3600)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"{name}: must be a number of seconds above {low} and at most {high}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts: must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}")
        object.__setattr__(self, "events", events)
        object.__setattr__(self, "headers", MappingProxyType(headers))
        if not self.name:
            object.__setattr__(self, "name", f"{parts.scheme}://{parts.netloc.lower()}")

    def wants(self, kind: str) -> bool:
        return kind in self.events


# ---------------------------------------------------------------------------------------------
# Delivery


@dataclass
class NotifierStats:
    sent: int = 0  # deliveries a receiver accepted (2xx)
    failed: int = 0  # deliveries given up: attempts exhausted or refused for good
    retried: int = 0  # attempts after the first
    dropped: int = 0  # deliveries never attempted to the end: queue overflow or shutdown


@dataclass(frozen=True)
class _Delivery:
    event_type: str
    event_id: str
    request_id: str
    body: bytes


class _Retry(Exception):
    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.retry_after = retry_after


class _GiveUp(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None if absent
    or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now)


class _Outbox:
    """One webhook's queue and the task draining it: a dead receiver delays only its own events."""

    def __init__(self, webhook: Webhook, size: int) -> None:
        self.webhook = webhook
        self.pending: deque[_Delivery] = deque()
        self.size = size
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.current: _Delivery | None = None
        ca = str(webhook.ca_file) if webhook.ca_file else None
        # Built now so an unreadable CA bundle fails at start, not at the first event.
        self.ssl = ssl.create_default_context(cafile=ca)


class Notifier:
    """Sends access-request events to webhooks from background tasks of the running event loop.

    `start()` inside the loop, `notify()` from anywhere (never blocks, never raises), and
    `await close(timeout)` at shutdown to deliver what is queued for at most `timeout` seconds.
    `session_factory` makes the aiohttp ClientSession (called in `start()`); the notifier closes it.
    """

    def __init__(self, webhooks: Iterable[Webhook], *, session_factory: Callable[[], aiohttp.ClientSession] | None = None,
                 now: Callable[[], float] = time.time, queue_size: int = DEFAULT_QUEUE_SIZE,
                 jitter: Callable[[], float] = random.random) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.outboxes = [_Outbox(w, queue_size) for w in webhooks]
        self.stats = NotifierStats()
        self._session_factory = session_factory or _default_session
        self._session: aiohttp.ClientSession | None = None
        self._now = now
        self._jitter = jitter
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    @property
    def queued(self) -> int:
        return sum(len(o.pending) for o in self.outboxes)

    def start(self) -> None:
        if self._loop is not None or self._closing:
            return
        self._loop = asyncio.get_running_loop()
        if not self.outboxes:
            return
        self._session = self._session_factory()
        for outbox in self.outboxes:
            outbox.task = self._loop.create_task(self._run(outbox), name=f"jitgate.notify {outbox.webhook.name}")

    def notify(self, kind: str, request: Mapping[str, Any], actor: str | None = None, reason: str | None = None) -> None:
        """Queue the event for every webhook that wants `kind`. Returns at once; failures are logged."""
        try:
            targets = [o for o in self.outboxes if o.webhook.wants(kind)]
            if not targets and kind in KINDS:
                return
            event = make_event(kind, request, actor, reason, self._now())
            rendered: dict[str, bytes] = {}
            work = []
            for outbox in targets:
                fmt = outbox.webhook.format
                if fmt not in rendered:
                    rendered[fmt] = render(fmt, event)
                work.append((outbox, _Delivery(event["type"], event["id"], event["request"]["id"], rendered[fmt])))
            loop = self._loop
            if loop is not None and _running_loop() is not loop:
                loop.call_soon_threadsafe(self._enqueue, work)  # called from another thread
            else:
                self._enqueue(work)
        except Exception as e:
            # A notification must never fail the decision it reports.
            logger.error("notification %s not sent: %s", kind, e if isinstance(e, ValueError) else type(e).__name__)

    def _enqueue(self, work: list[tuple[_Outbox, _Delivery]]) -> None:
        for outbox, delivery in work:
            if self._closing:
                self.stats.dropped += 1
                logger.warning("webhook %s: %s event %s for request %s dropped: the notifier is closed",
                               outbox.webhook.name, delivery.event_type, delivery.event_id, delivery.request_id)
                continue
            if len(outbox.pending) >= outbox.size:
                old = outbox.pending.popleft()
                self.stats.dropped += 1
                logger.warning("webhook %s: queue full (%d undelivered), dropped the oldest: %s event %s for request %s",
                               outbox.webhook.name, outbox.size, old.event_type, old.event_id, old.request_id)
            outbox.pending.append(delivery)
            outbox.wakeup.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking events, deliver the queued ones for up to `timeout` seconds, drop the rest."""
        if self._closing:
            return
        self._closing = True
        tasks = [o.task for o in self.outboxes if o.task is not None]
        for outbox in self.outboxes:
            outbox.wakeup.set()
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        for outbox in self.outboxes:
            if outbox.pending:
                self.stats.dropped += len(outbox.pending)
                logger.warning("webhook %s: %d event(s) not delivered before shutdown", outbox.webhook.name, len(outbox.pending))
                outbox.pending.clear()
        if self._session is not None:
            await self._session.close()

    async def _run(self, outbox: _Outbox) -> None:
        while True:
            if not outbox.pending:
                if self._closing:
                    return
                outbox.wakeup.clear()
                await outbox.wakeup.wait()
                continue
            delivery = outbox.current = outbox.pending.popleft()
            try:
                await self._deliver(outbox, delivery)
            except asyncio.CancelledError:
                self.stats.dropped += 1
                logger.warning("webhook %s: %s event %s for request %s not delivered before shutdown",
                               outbox.webhook.name, delivery.event_type, delivery.event_id, delivery.request_id)
                raise
            except Exception as e:  # a bug here must not stop the queue
                self.stats.failed += 1
                logger.error("webhook %s: %s event %s: unexpected %s", outbox.webhook.name, delivery.event_type,
                             delivery.event_id, type(e).__name__)
            finally:
                outbox.current = None

    async def _deliver(self, outbox: _Outbox, delivery: _Delivery) -> None:
        webhook = outbox.webhook
        what = f"webhook {webhook.name}: {delivery.event_type} event {delivery.event_id} for request {delivery.request_id}"
        for attempt in range(1, webhook.max_attempts + 1):
            try:
                await self._attempt(outbox, delivery)
            except _GiveUp as e:
                self.stats.failed += 1
                logger.error("%s: %s; not retried", what, e.problem)
                return
            except _Retry as e:
                if attempt == webhook.max_attempts:
                    self.stats.failed += 1
                    logger.error("%s: %s; giving up after %d attempt(s)", what, e.problem, attempt)
                    return
                delay = self._delay(webhook, attempt, e.retry_after)
                logger.warning("%s: attempt %d of %d failed: %s; retrying in %.2fs", what, attempt,
                               webhook.max_attempts, e.problem, delay)
                self.stats.retried += 1
                await asyncio.sleep(delay)
            else:
                self.stats.sent += 1
                logger.debug("%s: delivered (attempt %d)", what, attempt)
                return

    def _delay(self, webhook: Webhook, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, webhook.max_retry_after)
        ceiling = min(webhook.max_backoff, webhook.backoff * 2 ** (attempt - 1))
        # "Equal jitter": never less than half the step, so retries stay spaced out.
        return ceiling / 2 + self._jitter() * ceiling / 2

    async def _attempt(self, outbox: _Outbox, delivery: _Delivery) -> None:
        webhook = outbox.webhook
        timestamp = str(int(self._now()))
        headers = {
            **webhook.headers,
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": USER_AGENT,
            EVENT_HEADER: delivery.event_type,
            DELIVERY_HEADER: delivery.event_id,
            TIMESTAMP_HEADER: timestamp,
        }
        if webhook.secret is not None:
            headers[SIGNATURE_HEADER] = sign(webhook.secret, timestamp, delivery.body)
        import aiohttp

        assert self._session is not None
        try:
            async with self._session.post(
                webhook.url, data=delivery.body, headers=headers, ssl=outbox.ssl,
                allow_redirects=False,  # a redirect could carry a signed event somewhere unconfigured
                timeout=aiohttp.ClientTimeout(total=webhook.timeout),
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
        # Problems are described without the URL (its path may be a credential) or headers.
        except aiohttp.ClientConnectorCertificateError as e:
            raise _GiveUp(f"TLS certificate verification failed: {getattr(e.certificate_error, 'verify_message', None) or 'untrusted'}") from None
        except TimeoutError:
            raise _Retry(f"no response within {webhook.timeout:g}s") from None
        except aiohttp.ClientConnectorError as e:
            raise _Retry(f"cannot connect: {e.os_error.strerror or type(e.os_error).__name__}") from None
        except aiohttp.ServerDisconnectedError:
            raise _Retry("the receiver closed the connection") from None
        except (aiohttp.ClientError, OSError) as e:
            raise _Retry(type(e).__name__) from None
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status}", parse_retry_after(retry_after, self._now()))
        raise _GiveUp(f"HTTP {status}")


# CPython before 3.12.8 and 3.13.0 never free a TLS connection closed while the peer ignores the
# close (python/cpython#118960): a receiver that hangs would leak one per timeout. On those,
# aiohttp's own cleanup aborts such connections (it refuses the option elsewhere).
_CLEANUP_CLOSED_TLS = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)


def _default_session() -> aiohttp.ClientSession:
    import aiohttp

    # No proxy from the environment (the gateway's own HTTPS_PROXY may point at itself), no
    # cookies carried between receivers.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(enable_cleanup_closed=_CLEANUP_CLOSED_TLS),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
