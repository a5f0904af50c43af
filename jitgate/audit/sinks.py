"""Shipping audit events elsewhere (a SIEM's HTTPS collector, standard output) besides the local log.

The local log stays the record: the gateway writes its line first and fails closed on it; a sink
gets the event only after that, and a sink never blocks a call or refuses one. Each sink has:

- a bounded in-memory queue (`submit` appends and returns; about a microsecond on the proxy's thread);
- a thread that sends batches of up to `batch_size` events, at the latest `flush_interval`
  seconds after they arrive, one batch at a time, retrying a failed batch with exponential backoff
  (with jitter, up to `max_backoff`) until it is taken: events leave in the order they came;
- a disk spool (JSON lines under the state folder): when the memory queue is full, events go to
  the spool instead of being dropped, and while the spool holds any, new events go there too (so
  order is kept); the thread sends the spool once the memory queue is empty, and at close whatever
  is still in memory is written to the spool's head file, sent first at the next start. Only a
  spool over `spool_max_bytes`, or a disk that refuses the write, drops events (counted and logged;
  they are still in the local log).

Delivery is at least once: a batch whose answer was lost is sent again. Every event carries its
chain seq and hash (k8s: the `jitgate.dev/chain` member; OCSF: `metadata.sequence` and the line in
`raw_data`), which lets a receiver drop the duplicates. Events still in memory when the process is
killed (not stopped) are not sent again; the local log has them.

Webhook batches are `application/x-ndjson` (one event per line), POSTed to the URL. With a secret,
each attempt is signed as the access-request webhooks are (jitgate.notify.webhooks):
`X-Jitgate-Timestamp: <unix seconds>` and `X-Jitgate-Signature: sha256=<hex HMAC-SHA256 of
"<timestamp>.<body>">`; `X-Jitgate-Delivery` names the batch, the same on every attempt.
"""

from __future__ import annotations

import fcntl
import http.client
import ipaddress
import json
import logging
import os
import random
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from urllib.parse import urlsplit

from jitgate.audit.log import Written
from jitgate.audit.ocsf import to_ocsf
from jitgate.files import make_private_dirs
from jitgate.notify.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)

log = logging.getLogger("jitgate.audit.sinks")

FORMATS = ("k8s", "ocsf")
USER_AGENT = "jitgate-audit/1"
COUNT_HEADER = "X-Jitgate-Event-Count"
BACKOFF = 0.5  # seconds before the first retry of a batch; doubles per attempt, with jitter
MAX_BACKOFF = 30.0
FORMAT_HEADER = "X-Jitgate-Audit-Format"


def render(fmt: str, event: Mapping, written: Written) -> bytes:
    """One event as the sink sends it: a JSON line without its newline."""
    if fmt == "k8s":
        return written.line  # the log's own bytes: the chain can be checked from the copy
    return json.dumps(to_ocsf(event, written.line, written.seq), separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# The disk spool


class _Segment:
    """A JSON-lines file sent from the front, with the delivered offset in a side file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        self.offset = 0
        try:
            self.offset = int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            self.offset = 0
        self.size = self.path.stat().st_size if self.path.exists() else 0
        if self.offset > self.size:
            self.offset = 0
        self._fd: int | None = None  # kept open while the segment grows

    @property
    def pending(self) -> bool:
        return self.size > self.offset

    def append(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self.size += written
            view = view[written:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, limit: int) -> tuple[list[bytes], int]:
        lines: list[bytes] = []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while len(lines) < limit:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break  # the end, or a line cut by a crash: never sent half
                if line.strip():
                    lines.append(line[:-1])
            return lines, f.tell()

    def commit(self, offset: int) -> None:
        self.offset = offset
        if self.offset >= self.size:
            self.close()
            for p in (self.path, self.offset_path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            self.offset = self.size = 0
        else:
            tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
            tmp.write_text(str(offset))
            os.replace(tmp, self.offset_path)


class Spool:
    """The events of one sink that wait on disk: `<name>.<slot>.head.jsonl` (what was in memory at
    the last close), then `<name>.<slot>.jsonl` (what overflowed memory). Each process holds its own
    slot (an flock), so gateway processes sharing a state folder never share a spool; a restarted
    one takes the free slot, usually its previous one."""

    def __init__(self, directory: Path, name: str, max_bytes: int) -> None:
        make_private_dirs(directory)
        self.max_bytes = max_bytes
        for slot in range(64):
            lock_path = directory / f"{name}.{slot}.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd = fd
            break
        else:
            raise OSError(f"every spool slot under {directory} is in use")
        self.head = _Segment(directory / f"{name}.{slot}.head.jsonl")
        self.tail = _Segment(directory / f"{name}.{slot}.jsonl")
        self.where = str(self.tail.path)

    @property
    def pending(self) -> bool:
        return self.head.pending or self.tail.pending

    def append(self, line: bytes) -> bool:
        if self.tail.size + len(line) + 1 > self.max_bytes:
            return False
        self.tail.append(line + b"\n")
        return True

    def prepend(self, lines: Sequence[bytes]) -> None:
        if lines:
            self.head.append(b"".join(line + b"\n" for line in lines))

    def read(self, limit: int) -> tuple[_Segment, list[bytes], int]:
        segment = self.head if self.head.pending else self.tail
        lines, offset = segment.read(limit)
        return segment, lines, offset

    def close(self) -> None:
        self.head.close()
        self.tail.close()
        os.close(self._lock_fd)


# ---------------------------------------------------------------------------------------------
# Sinks


class QueuedSink:
    """The queue, spool, batching and retry of a sink; `deliver` is what one kind of sink does."""

    name = "sink"

    def __init__(self, *, fmt: str = "k8s", batch_size: int = 100, flush_interval: float = 1.0,
                 queue_size: int = 10_000, spool_dir: Path | None = None, spool_max_bytes: int = 1 << 30,
                 backoff: float | None = None, max_backoff: float | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown audit format {fmt!r} (known: {', '.join(FORMATS)})")
        self.fmt = fmt
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        self.backoff = BACKOFF if backoff is None else backoff
        self.max_backoff = MAX_BACKOFF if max_backoff is None else max_backoff
        self.spool = Spool(spool_dir, self.name, spool_max_bytes) if spool_dir is not None else None
        self.stats = {"submitted": 0, "delivered": 0, "batches": 0, "failures": 0, "spooled": 0, "dropped": 0}
        self._memory: deque[tuple[Mapping, Written]] = deque()
        self._cond = threading.Condition()
        self._spooling = self.spool is not None and self.spool.pending
        self._stopping = False
        self._closed = False
        self._deadline = 0.0
        self._failing = False
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name=f"jitgate-audit-{self.name}", daemon=True)
        self._thread.start()

    # -- the proxy's side

    def submit(self, event: Mapping, written: Written) -> None:
        """Queue one event; never blocks on the receiver (a full memory queue spills to disk)."""
        with self._cond:
            self.stats["submitted"] += 1
            if self._closed:
                self._drop("the sink is closed")
                return
            if not self._spooling and len(self._memory) < self.queue_size:
                self._memory.append((event, written))
                if len(self._memory) == self.batch_size:
                    self._cond.notify()
                return
            if self.spool is None:
                self._drop("its memory queue is full and it has no spool")
                return
            if not self._spooling:
                log.warning("audit sink %s: memory queue full (%d events); spooling to %s",
                            self.name, self.queue_size, self.spool.where)
            self._spooling = True
            try:
                ok = self.spool.append(render(self.fmt, event, written))
            except (OSError, TypeError, ValueError) as e:
                self._drop(f"the spool cannot be written: {e}")
                return
            if ok:
                self.stats["spooled"] += 1
                self._cond.notify()
            else:
                self._drop(f"the spool {self.spool.where} is full")

    def _drop(self, why: str) -> None:
        self.stats["dropped"] += 1
        if not self._dropping:
            self._dropping = True
            log.error("audit sink %s drops events (the local audit log still has them): %s", self.name, why)

    # -- the sending thread

    def _next_batch(self) -> tuple[str, list[bytes], object] | None:
        items = None
        with self._cond:
            if self._closed:
                return None
            if not self._memory and not (self.spool is not None and self.spool.pending):
                if self._stopping:
                    return None
                self._cond.wait(self.flush_interval)
            elif len(self._memory) < self.batch_size and not self._stopping and not self._spooling:
                self._cond.wait(self.flush_interval)  # let a batch fill, for at most the interval
            if self._memory:
                items = list(islice(self._memory, 0, self.batch_size))
            elif self.spool is not None and self.spool.pending:
                segment, lines, offset = self.spool.read(self.batch_size)
                if not lines:  # only a line cut by a crash is left: skip it
                    return "spool", [], (segment, segment.size)
                return "spool", lines, (segment, offset)
            else:
                return "idle", [], None
        # Rendered outside the lock: submit() on the proxy's thread never waits for it.
        return "memory", [render(self.fmt, e, w) for e, w in items], len(items)

    def _commit(self, source: str, lines: list[bytes], token: object) -> None:
        with self._cond:
            if self._closed:
                return  # a late answer after close: what was left is in the spool, sent again (never lost)
            if source == "memory":
                for _ in range(token):
                    self._memory.popleft()
            else:
                segment, offset = token
                segment.commit(offset)
                if not self.spool.pending:
                    self._spooling = False
                    self._dropping = False
            self.stats["delivered"] += len(lines)
            self.stats["batches"] += 1 if lines else 0

    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:  # a bug must not end the shipping silently: say so, go on
                _say(log.exception, "audit sink %s: unexpected error; going on", self.name)
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(self.max_backoff)

    def _step(self) -> bool:
        """Send the next batch (retrying it until taken); False when the thread should end."""
        try:
            batch = self._next_batch()
        except OSError as e:
            _say(log.error, "audit sink %s cannot read its spool: %s", self.name, e)
            with self._cond:
                self._cond.wait(self.max_backoff)
            return not self._stopping
        if batch is None:
            return False
        source, lines, token = batch
        if source == "idle":
            return True
        if not lines:
            self._commit(source, lines, token)
            return True
        body = b"".join(line + b"\n" for line in lines)
        delivery = str(uuid.uuid4())
        attempt = 0
        while True:
            error = self._attempt(body, len(lines), delivery)
            if error is None:
                self._commit(source, lines, token)
                if self._failing:
                    self._failing = False
                    _say(log.warning, "audit sink %s delivers again", self.name)
                break
            self.stats["failures"] += 1
            if not self._failing:
                self._failing = True
                _say(log.warning, "audit sink %s failing (%s); retrying with backoff, events wait in memory%s",
                     self.name, error, f" and then in {self.spool.where}" if self.spool else "")
            attempt += 1
            delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            with self._cond:
                if self._stopping and time.monotonic() + delay > self._deadline:
                    return False  # close() spools what is left
                self._cond.wait(delay)
        with self._cond:
            return not (self._stopping and (time.monotonic() > self._deadline or not self._memory))

    def _attempt(self, body: bytes, count: int, delivery: str) -> str | None:
        try:
            return self.deliver(body, count, delivery)
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def deliver(self, body: bytes, count: int, delivery: str) -> str | None:
        """Send one batch; None when it was taken, else why not."""
        raise NotImplementedError

    # -- stopping

    def close(self, timeout: float = 5.0) -> None:
        """Send what is in memory for up to `timeout` seconds; spool what is left (in order)."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)
        with self._cond:
            self._closed = True
            left = list(self._memory)
            self._memory.clear()
        if left:
            if self.spool is not None:
                try:
                    self.spool.prepend([render(self.fmt, e, w) for e, w in left])
                    self.stats["spooled"] += len(left)
                except OSError as e:
                    self.stats["dropped"] += len(left)
                    log.error("audit sink %s cannot spool %d events at close (the local audit log has them): %s",
                              self.name, len(left), e)
            else:
                self.stats["dropped"] += len(left)
                log.error("audit sink %s stops with %d events unsent (the local audit log has them)", self.name, len(left))
        self.close_transport()
        if self.spool is not None:
            self.spool.close()

    def close_transport(self) -> None:
        pass


class StdoutSink(QueuedSink):
    """JSON lines on standard output (for a container's log collector)."""

    name = "stdout"

    def __init__(self, fd: int = 1, **kwargs) -> None:
        self.fd = fd
        super().__init__(**kwargs)

    def deliver(self, body: bytes, count: int, delivery: str) -> str | None:
        view = memoryview(body)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:  # a retry repeats the batch: a reader may see some lines twice
            return f"cannot write to standard output: {e.strerror or e}"
        return None


@dataclass(frozen=True)
class WebhookTarget:
    """A parsed webhook URL: HTTPS (HTTP only to a loopback address, e.g. a local collector)."""

    scheme: str
    host: str
    port: int
    target: str  # path and query

    @property
    def name(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"  # for logs: the path may hold a credential


def parse_webhook_url(url: str) -> WebhookTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise ValueError(f"the audit webhook must be an https:// URL, not {parts.scheme or 'no scheme'}")
    if not parts.hostname:
        raise ValueError("the audit webhook URL names no host")
    if parts.username or parts.password:
        raise ValueError("the audit webhook URL must not carry credentials; sign batches with audit_webhook_secret")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"the audit webhook URL has a bad port: {e}") from None
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError("the audit webhook must use https:// (plain http:// is allowed only to a loopback address)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(parts.scheme, parts.hostname, port, target)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebhookSink(QueuedSink):
    """POSTs batches to an HTTPS endpoint (the receiver's certificate verified, optionally against `ca`)."""

    name = "webhook"

    def __init__(self, url: str, *, secret: bytes | None = None, ca: str | None = None, timeout: float = 10.0,
                 context_factory: Callable[[], ssl.SSLContext] | None = None, **kwargs) -> None:
        self.target = parse_webhook_url(url)
        self.secret = secret
        self.timeout = timeout
        if self.target.scheme == "https":
            self.context = context_factory() if context_factory else ssl.create_default_context(cafile=ca)
        self._conn: http.client.HTTPConnection | None = None
        super().__init__(**kwargs)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.target.scheme == "https":
                self._conn = http.client.HTTPSConnection(self.target.host, self.target.port,
                                                         context=self.context, timeout=self.timeout)
            else:
                self._conn = http.client.HTTPConnection(self.target.host, self.target.port, timeout=self.timeout)
        return self._conn

    def deliver(self, body: bytes, count: int, delivery: str) -> str | None:
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/x-ndjson",
            "User-Agent": USER_AGENT,
            TIMESTAMP_HEADER: timestamp,
            DELIVERY_HEADER: delivery,
            COUNT_HEADER: str(count),
            FORMAT_HEADER: self.fmt,
        }
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, timestamp, body)
        conn = self._connection()
        try:
            conn.request("POST", self.target.target, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as e:
            self.close_transport()
            return f"{type(e).__name__}: {e}"
        if response.will_close:
            self.close_transport()
        if 200 <= response.status < 300:
            return None
        return f"HTTP {response.status} from {self.target.name}"

    def close_transport(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _say(emit: Callable, message: str, *args) -> None:
    """Log from a sink's thread: a log handler that fails (mitmproxy's, once its event loop is
    closed) must not end the thread."""
    try:
        emit(message, *args)
    except Exception:  # noqa: BLE001
        pass


class Sinks:
    """The configured sinks, fed together."""

    def __init__(self, sinks: Sequence[QueuedSink] = ()) -> None:
        self.sinks = list(sinks)

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def submit(self, event: Mapping, written: Written) -> None:
        for sink in self.sinks:
            sink.submit(event, written)

    def close(self, timeout: float = 5.0) -> None:
        for sink in self.sinks:
            try:
                sink.close(timeout)
            except Exception:
                log.exception("audit sink %s failed to close", sink.name)
