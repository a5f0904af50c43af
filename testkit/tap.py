"""A recording tap in front of a stand-in cluster: what the cluster really received, byte for byte.

    tap = TapProcess(tmp_path / "tap").start(ca, upstream_port=api.port, hostnames=["api.x.test"])
    # the policy's cluster `connect:` (or endpoint) points at 127.0.0.1:{tap.port} instead of the stand-in
    ...
    for conn in tap.connections():
        for req in conn.requests:      # parsed as a strict HTTP/1.1 server reads the stream
            print(req.method, req.target, req.header("Audit-ID"), req.response_status)
        conn.problems                  # bytes that are no well-formed request: non-TLS, garbage, ...

The tap is a TLS terminator (a certificate from the test CA for the cluster's hostnames, ALPN
http/1.1 only, like the stand-in) that relays every connection to the stand-in over TLS. It writes
each chunk to a JSON-lines recording *before* relaying it, so a response the gateway gets back
implies the request bytes are already on disk. TLS is done on memory BIOs, so the bytes of a
connection that never becomes TLS (a raw relay of a client's first bytes) are recorded too.

The parser (`parse_connection`) reads the client->cluster stream the way a strict server does:
request line, header fields (obs-fold, CR/LF/NUL, duplicate framing headers are reported and read
as Go's net/textproto would), Content-Length or chunked bodies, and whatever follows: a second
request smuggled inside a body shows up as one more request. The cluster->client stream is read
for each request's status line; after a 101 the rest of the connection is an upgraded stream,
kept raw.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from testkit.net import TestCA, free_port, stop, wait_for_port

REPO = Path(__file__).resolve().parents[1]

# --- the tap server ----------------------------------------------------------------------------------


class Recorder:
    """Appends one JSON line per event; each line is written whole with one os.write."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.next_id = 0

    def new_connection(self) -> int:
        self.next_id += 1
        return self.next_id

    def write(self, conn: int, kind: str, data: bytes | None = None, **extra) -> None:
        event = {"c": conn, "t": time.time(), "k": kind, **extra}
        if data is not None:
            event["b"] = base64.b64encode(data).decode()
        os.write(self.fd, (json.dumps(event) + "\n").encode())


class Tap:
    def __init__(self, recorder: Recorder, server_ctx: ssl.SSLContext, upstream: tuple[str, int],
                 upstream_ctx: ssl.SSLContext, upstream_name: str) -> None:
        self.recorder = recorder
        self.server_ctx = server_ctx
        self.upstream = upstream
        self.upstream_ctx = upstream_ctx
        self.upstream_name = upstream_name
        self.sni: dict[int, str | None] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = self.recorder
        conn = rec.new_connection()
        peer = writer.get_extra_info("peername")
        rec.write(conn, "open", peer=list(peer) if peer else None)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.server_ctx.wrap_bio(incoming, outgoing, server_side=True)
        received = b""  # pre-TLS bytes, recorded only when the connection never becomes TLS

        async def flush() -> None:
            if outgoing.pending:
                writer.write(outgoing.read())
                await writer.drain()

        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await flush()
                    data = await reader.read(65536)
                    if not data:
                        rec.write(conn, "raw", received, reason="closed before the TLS handshake completed")
                        return
                    if not received and data[0] != 0x16:
                        # Not a TLS handshake record: plain bytes reached the cluster's port.
                        data += await _read_more(reader, 0.3)
                        rec.write(conn, "raw", data, reason="not TLS")
                        return
                    received += data
                    incoming.write(data)
                except ssl.SSLError as e:
                    rec.write(conn, "raw", received, reason=f"TLS handshake failed: {e.reason or e}")
                    await flush()
                    return
            await flush()
            cert = tls.getpeercert()
            rec.write(conn, "tls", sni=getattr(tls, "jitgate_sni", None), alpn=tls.selected_alpn_protocol(),
                      version=tls.version(), client_cert=_subject(cert) if cert else None)
            await self.relay(conn, reader, writer, tls, incoming, outgoing, flush)
        except (ConnectionError, OSError) as e:
            rec.write(conn, "error", reason=str(e))
        finally:
            rec.write(conn, "close")
            writer.close()

    async def relay(self, conn, reader, writer, tls, incoming, outgoing, flush) -> None:
        rec = self.recorder
        try:
            up_reader, up_writer = await asyncio.open_connection(
                *self.upstream, ssl=self.upstream_ctx, server_hostname=self.upstream_name)
        except (OSError, ssl.SSLError) as e:
            rec.write(conn, "error", reason=f"upstream: {e}")
            return

        async def client_to_cluster() -> None:
            try:
                while True:
                    # Drain first: records that came with the handshake's last flight are buffered already.
                    plain, closed = b"", False
                    while True:
                        try:
                            chunk = tls.read(65536)
                        except ssl.SSLWantReadError:
                            break
                        except ssl.SSLZeroReturnError:
                            closed = True
                            break
                        if not chunk:
                            closed = True
                            break
                        plain += chunk
                    await flush()  # post-handshake messages, alerts
                    if plain:
                        rec.write(conn, "in", plain)  # recorded before the cluster gets it
                        up_writer.write(plain)
                        await up_writer.drain()
                    if closed:
                        break
                    data = await reader.read(65536)
                    if not data:
                        break
                    incoming.write(data)
            except (ConnectionError, ssl.SSLError, OSError) as e:
                rec.write(conn, "error", reason=f"client side: {e}")
            finally:
                rec.write(conn, "eof", side="client")
                try:
                    up_writer.write_eof()
                except (OSError, RuntimeError):
                    up_writer.close()

        async def cluster_to_client() -> None:
            try:
                while True:
                    data = await up_reader.read(65536)
                    if not data:
                        break
                    rec.write(conn, "out", data)
                    tls.write(data)
                    await flush()
            except (ConnectionError, ssl.SSLError, OSError) as e:
                rec.write(conn, "error", reason=f"cluster side: {e}")
            finally:
                rec.write(conn, "eof", side="cluster")
                try:
                    tls.unwrap()
                except ssl.SSLError:
                    pass
                try:
                    await flush()
                except OSError:
                    pass
                writer.close()

        tasks = [asyncio.create_task(client_to_cluster()), asyncio.create_task(cluster_to_client())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait(tasks, timeout=2)
        for t in tasks:
            t.cancel()
        up_writer.close()


async def _read_more(reader: asyncio.StreamReader, seconds: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), seconds)
    except (TimeoutError, OSError):
        return b""


def _subject(cert: dict) -> str:
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


def server_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])  # as the stand-in (and kube-apiserver behind an h1-only LB)
    if client_ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(client_ca)

    def remember_sni(sslobj, name, _ctx):
        sslobj.jitgate_sni = name

    ctx.sni_callback = remember_sni
    return ctx


async def serve(args: argparse.Namespace) -> None:
    recorder = Recorder(Path(args.record))
    up_ctx = ssl.create_default_context(cafile=args.upstream_ca)
    up_ctx.set_alpn_protocols(["http/1.1"])
    if args.upstream_cert:
        up_ctx.load_cert_chain(args.upstream_cert, args.upstream_key)
    host, _, port = args.upstream.rpartition(":")
    tap = Tap(recorder, server_context(args.cert, args.key, args.client_ca), (host, int(port)), up_ctx, host)
    server = await asyncio.start_server(tap.handle, "127.0.0.1", args.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(f"jitgate-tap listening on 127.0.0.1:{args.port}", flush=True)
    async with server:
        await stopping.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m testkit.tap", description="record what a cluster receives")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True, help="server certificate for the cluster's hostnames (PEM)")
    p.add_argument("--key", required=True)
    p.add_argument("--upstream", required=True, help="the stand-in, host:port (TLS)")
    p.add_argument("--upstream-ca", required=True, help="CA bundle the stand-in's certificate is checked against")
    p.add_argument("--upstream-cert", help="client certificate to present to the stand-in")
    p.add_argument("--upstream-key")
    p.add_argument("--client-ca", help="ask clients for a certificate from this CA (recorded, optional)")
    p.add_argument("--record", required=True, help="JSON-lines recording to append to")
    asyncio.run(serve(p.parse_args(argv)))


# --- the process wrapper -----------------------------------------------------------------------------


class TapProcess:
    """`python -m testkit.tap` on a free port, recording to a file in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.record_path = self.workdir / "tap.jsonl"
        self.log_path = self.workdir / "tap.log"

    def start(self, ca: TestCA, upstream_port: int, hostnames: list[str] | tuple[str, ...] = (),
              client_ca: Path | None = None, upstream_cert: tuple[Path, Path] | None = None,
              timeout: float = 15.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cert, key = ca.issue(f"tap-{self.port}", hosts=["127.0.0.1", "localhost", *hostnames])
        args = [sys.executable, "-m", "testkit.tap", "--port", str(self.port), "--cert", str(cert), "--key", str(key),
                "--upstream", f"127.0.0.1:{upstream_port}", "--upstream-ca", str(ca.cert_path),
                "--record", str(self.record_path)]
        if client_ca:
            args += ["--client-ca", str(client_ca)]
        if upstream_cert:
            args += ["--upstream-cert", str(upstream_cert[0]), "--upstream-key", str(upstream_cert[1])]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + timeout
        while b"jitgate-tap listening on" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tap did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        wait_for_port(self.port, self.proc, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        if not self.record_path.exists():
            return []
        events = []
        for line in self.record_path.read_bytes().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass  # a line being written right now
        return events

    def last_activity(self) -> float:
        events = self.events()
        return events[-1]["t"] if events else 0.0

    def settle(self, quiet: float = 0.15, timeout: float = 3.0) -> None:
        """Wait until nothing was recorded for `quiet` seconds (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        size = -1
        while time.monotonic() < deadline:
            now = self.record_path.stat().st_size if self.record_path.exists() else 0
            if now == size:
                return
            size = now
            time.sleep(quiet)

    def connections(self) -> list[Connection]:
        return connections_from_events(self.events())

    def requests(self, since: float = 0.0) -> list[ReceivedRequest]:
        return [r for c in self.connections() for r in c.requests if r.time >= since]


# --- reading the recording -----------------------------------------------------------------------------


class Stream:
    """The bytes of one direction of a connection, with the arrival time of every offset."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.offsets: list[int] = []
        self.times: list[float] = []

    def append(self, data: bytes, t: float) -> None:
        self.offsets.append(len(self.data))
        self.times.append(t)
        self.data += data

    def time_at(self, offset: int) -> float:
        i = bisect.bisect_right(self.offsets, offset) - 1
        return self.times[max(i, 0)] if self.times else 0.0


@dataclass
class ReceivedRequest:
    """One HTTP/1.1 request as the cluster read it."""

    connection: int
    index: int
    time: float  # arrival of its first byte
    end_time: float
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    problems: list[str] = field(default_factory=list)  # anything a strict server would not accept as is
    trailers: list[tuple[str, str]] = field(default_factory=list)
    response_status: int | None = None
    response_time: float | None = None
    upgraded_in: bytes | None = None  # client->cluster bytes after a 101 (raw: WebSocket frames, SPDY...)
    upgraded_out: bytes | None = None
    stream_last_byte: float | None = None  # last byte either way on the upgraded stream

    def header_values(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def describe(self) -> str:
        return f"conn {self.connection} #{self.index} {self.method} {self.target[:120]}"


@dataclass
class StreamProblem:
    """Bytes that reached the cluster and are not (the rest of) a well-formed request."""

    connection: int
    time: float
    reason: str
    data: bytes

    def describe(self) -> str:
        shown = re.sub(rb"(?i)(bearer )[A-Za-z0-9._~+/=-]{8,}", rb"\1<token>", bytes(self.data[:400]))[:160]
        return f"conn {self.connection}: {self.reason}: {shown!r}{'...' if len(self.data) > 160 else ''}"


@dataclass
class Connection:
    id: int
    opened: float
    closed: float | None = None
    tls: dict | None = None
    raw: bytes | None = None  # bytes received on a connection that never became TLS
    raw_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    inbound: Stream = field(default_factory=Stream)
    outbound: Stream = field(default_factory=Stream)
    requests: list[ReceivedRequest] = field(default_factory=list)
    problems: list[StreamProblem] = field(default_factory=list)


def connections_from_events(events: list[dict]) -> list[Connection]:
    conns: dict[int, Connection] = {}
    for e in events:
        c = conns.setdefault(e["c"], Connection(e["c"], e["t"]))
        kind = e["k"]
        data = base64.b64decode(e["b"]) if "b" in e else None
        if kind == "in":
            c.inbound.append(data, e["t"])
        elif kind == "out":
            c.outbound.append(data, e["t"])
        elif kind == "tls":
            c.tls = {k: e.get(k) for k in ("sni", "alpn", "version", "client_cert")}
        elif kind == "raw":
            c.raw, c.raw_reason = data, e.get("reason")
            if data:  # a port probe that sent nothing delivered nothing
                c.problems.append(StreamProblem(c.id, e["t"], f"{e.get('reason')} ({len(data)} bytes reached the cluster's port)",
                                                data))
        elif kind == "error":
            c.errors.append(e.get("reason", ""))
        elif kind == "close":
            c.closed = e["t"]
    for c in conns.values():
        parse_connection(c)
    return sorted(conns.values(), key=lambda c: c.id)


# --- the strict HTTP/1.1 reader -------------------------------------------------------------------------

TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) (HTTP/1\.[01])$")
# What the first bytes of a request line can be, however few of them have arrived.
REQUEST_LINE_PREFIX = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]*( [^ \r\n]*)?( [HTP/1.0-9]*)?\r?$|^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/")
MAX_HEAD = 1 << 20


class Fatal(Exception):
    """The stream cannot be read on from here (a strict server answers 400 and closes)."""


def _lines(data: bytearray, pos: int, problems: list[str], what: str) -> tuple[list[bytes], int] | None:
    """Lines up to the first empty one (LF-terminated, CR stripped as Go's textproto does); None if incomplete."""
    lines = []
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            if len(data) - pos > MAX_HEAD:
                raise Fatal(f"{what} longer than {MAX_HEAD} bytes")
            return None
        line = bytes(data[pos:nl])
        if line.endswith(b"\r"):
            line = line[:-1]
        else:
            problems.append(f"bare LF line ending in the {what}")
        if b"\r" in line:
            problems.append(f"bare CR in the {what}: {line[:80]!r}")
        pos = nl + 1
        if not line:
            return lines, pos
        lines.append(line)


def _read_head(data: bytearray, pos: int, problems: list[str]):
    first = bytes(data[pos:pos + 64]).split(b"\n", 1)[0]
    if not REQUEST_LINE_PREFIX.match(first):
        raise Fatal(f"not an HTTP/1.1 request line: {first[:120]!r}")
    got = _lines(data, pos, problems, "request head")
    if got is None:
        return None
    lines, end = got
    if not lines:
        raise Fatal("empty request head")
    m = REQUEST_LINE.match(lines[0])
    if not m:
        raise Fatal(f"not an HTTP/1.1 request line: {lines[0][:120]!r}")
    method, target, version = (x.decode("latin-1") for x in m.groups())
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            problems.append(f"obs-fold header line: {line[:80]!r}")
            if not headers:
                raise Fatal("continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + line.strip(b" \t").decode("latin-1")).strip())
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            raise Fatal(f"header line without a colon: {line[:80]!r}")
        if not TOKEN.match(name):
            problems.append(f"invalid header name {name[:60]!r}")
        value = value.strip(b" \t")
        if CTL.search(value):
            problems.append(f"control character in header {name.decode('latin-1')}: {value[:80]!r}")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return method, target, version, headers, end


def _read_chunked(data: bytearray, pos: int, problems: list[str]):
    body = bytearray()
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return None
        line = bytes(data[pos:nl]).rstrip(b"\r")
        size_text = line.split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size_text):
            raise Fatal(f"bad chunk size line {line[:60]!r}")
        size = int(size_text, 16)
        pos = nl + 1
        if size == 0:
            got = _lines(data, pos, problems, "chunked trailer")
            if got is None:
                return None
            trailer_lines, pos = got
            trailers = []
            for t in trailer_lines:
                name, _, value = t.partition(b":")
                trailers.append((name.decode("latin-1").strip(), value.strip().decode("latin-1")))
            return bytes(body), trailers, pos
        if len(data) < pos + size + 2:
            return None
        body += data[pos:pos + size]
        if data[pos + size:pos + size + 2] != b"\r\n":
            raise Fatal("chunk data not followed by CRLF")
        pos += size + 2


def _framing(headers: list[tuple[str, str]], problems: list[str]) -> tuple[str, int]:
    """("chunked", 0) or ("length", n); raises Fatal when the length cannot be known."""
    te = [v for k, v in headers if k.lower() == "transfer-encoding"]
    cl = [v for k, v in headers if k.lower() == "content-length"]
    if len(te) > 1:
        problems.append(f"duplicate Transfer-Encoding headers: {te}")
    if len(cl) > 1:
        problems.append(f"duplicate Content-Length headers: {cl}")
    if te and cl:
        problems.append(f"both Transfer-Encoding {te} and Content-Length {cl}")
    if te:
        codings = [c.strip().lower() for v in te for c in v.split(",")]
        if codings != ["chunked"]:
            problems.append(f"Transfer-Encoding other than exactly 'chunked': {te}")
        if codings[-1:] != ["chunked"]:
            raise Fatal(f"request body length unknown (Transfer-Encoding {te})")
        return "chunked", 0  # RFC 9112 6.3: Transfer-Encoding overrides Content-Length
    if cl:
        values = {v.strip() for v in cl}
        if len(values) > 1:
            raise Fatal(f"conflicting Content-Length values {cl}")
        value = values.pop()
        if not value.isdigit():
            raise Fatal(f"invalid Content-Length {value!r}")
        return "length", int(value)
    return "length", 0


@dataclass
class _Response:
    status: int
    time: float
    end: int  # offset after it


def _responses(stream: Stream, requests: list[ReceivedRequest]) -> tuple[list[_Response], int | None]:
    """Status lines of the cluster's responses in order; and where the stream switched protocols."""
    data, pos, out = stream.data, 0, []
    i = 0  # which request this response answers
    while pos < len(data):
        got = _lines(data, pos, [], "response head")
        if got is None:
            break
        lines, end = got
        m = re.match(rb"^HTTP/1\.[01] (\d{3})", lines[0] if lines else b"")
        if not m:
            break
        status = int(m.group(1))
        headers = [tuple(x.strip() for x in line.decode("latin-1").split(":", 1)) for line in lines[1:] if b":" in line]
        hv = {k.lower(): v for k, v in headers}
        t = stream.time_at(pos)
        if status == 101:
            out.append(_Response(status, t, end))
            return out, end
        if 100 <= status < 200:
            pos = end
            continue
        method = requests[i].method if i < len(requests) else "GET"
        i += 1
        if method == "HEAD" or status in (204, 304):
            pos = end
        elif "chunked" in hv.get("transfer-encoding", "").lower():
            got = _read_chunked(data, end, [])
            if got is None:
                out.append(_Response(status, t, len(data)))
                break
            pos = got[2]
        elif hv.get("content-length", "").isdigit():
            pos = end + int(hv["content-length"])
        else:
            pos = len(data)
        out.append(_Response(status, t, pos))
    return out, None


def parse_connection(conn: Connection) -> None:
    """Fill `conn.requests` and `conn.problems` from its recorded client->cluster bytes."""
    data, pos = conn.inbound.data, 0
    if data and conn.tls is None:
        conn.problems.append(StreamProblem(conn.id, conn.inbound.time_at(0), "plaintext without TLS", bytes(data)))
    requests: list[ReceivedRequest] = []
    while pos < len(data):
        problems: list[str] = []
        start = pos
        while data[pos:pos + 2] == b"\r\n":  # Go skips no empty lines before a request line
            problems.append("empty line before the request line")
            pos += 2
        try:
            head = _read_head(data, pos, problems)
            if head is None:
                reason = "incomplete request head" if conn.closed else "request head not complete (yet)"
                conn.problems.append(StreamProblem(conn.id, conn.inbound.time_at(start), reason, bytes(data[start:])))
                break
            method, target, version, headers, body_at = head
            kind, length = _framing(headers, problems)
            trailers: list[tuple[str, str]] = []
            if kind == "chunked":
                got = _read_chunked(data, body_at, problems)
                if got is None:
                    conn.problems.append(StreamProblem(conn.id, conn.inbound.time_at(start),
                                                       "incomplete chunked body", bytes(data[start:])))
                    body, end = bytes(data[body_at:]), len(data)
                else:
                    body, trailers, end = got
            else:
                end = body_at + length
                if end > len(data):
                    problems.append(f"body shorter than Content-Length {length} ({len(data) - body_at} bytes)")
                    end = len(data)
                body = bytes(data[body_at:end])
        except Fatal as e:
            conn.problems.append(StreamProblem(conn.id, conn.inbound.time_at(start), f"not a well-formed request: {e}",
                                               bytes(data[start:])))
            break
        requests.append(ReceivedRequest(conn.id, len(requests), conn.inbound.time_at(start),
                                        conn.inbound.time_at(max(end - 1, start)), method, target, version, headers,
                                        body, bytes(data[start:end]), problems, trailers))
        pos = end
        # Does the cluster's answer switch protocols? Then the rest is an upgraded stream.
        responses, switched_at = _responses(conn.outbound, requests)
        if switched_at is not None and len(responses) >= len(requests):
            break
        if any(k.lower() == "upgrade" for k, _ in headers) and len(responses) < len(requests) and not conn.closed:
            break  # an upgrade still waiting for its answer: what follows is not HTTP yet
    conn.requests = requests
    responses, switched_at = _responses(conn.outbound, requests)
    for req, resp in zip(requests, responses):
        req.response_status, req.response_time = resp.status, resp.time
    if requests and pos < len(data):
        last = requests[-1]
        if switched_at is not None or any(k.lower() == "upgrade" for k, _ in last.headers):
            last.upgraded_in = bytes(data[pos:])
    if switched_at is not None and requests:
        last = requests[min(len(responses), len(requests)) - 1]
        last.upgraded_out = bytes(conn.outbound.data[switched_at:])
        if last.upgraded_in is None:
            last.upgraded_in = bytes(data[pos:])
        ends = [s.times[-1] for s, o in ((conn.inbound, pos), (conn.outbound, switched_at)) if len(s.data) > o]
        last.stream_last_byte = max(ends) if ends else None


def websocket_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of the whole RFC 6455 frames in `data` (an upgraded stream)."""
    frames, pos = [], 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        length, at = b1 & 0x7F, pos + 2
        if length == 126:
            length, at = int.from_bytes(data[at:at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at:at + 8], "big"), at + 8
        mask = data[at:at + 4] if b1 & 0x80 else b""
        at += len(mask)
        if len(data) < at + length:
            break
        payload = data[at:at + length]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((b0 & 0x0F, payload))
        pos = at + length
    return frames


if __name__ == "__main__":
    main()
