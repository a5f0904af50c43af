"""Raw HTTP/1.1 and HTTP/2 over TLS to a gateway, in reverse mode or after a CONNECT: byte-exact
requests that well-behaved client libraries refuse to send.

    sock = open_tls(("127.0.0.1", port), server_hostname="api.x.test", cafiles=[gateway_ca])
    status, raw = h1_exchange(sock, b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    status, body = h2_exchange(open_tls(..., alpn=["h2"]), [(":method", "GET"), ...])

Every read is bounded (a refused or swallowed request must not hang a test), and none of these
helpers raise on a connection the other side closes: the caller wants the outcome, whatever it is.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def client_context(cafiles: Iterable[Path | str], alpn: Sequence[str] = ("http/1.1",),
                   check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for f in cafiles:
        ctx.load_verify_locations(str(f))
    ctx.check_hostname = check_hostname
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def connect_tunnel(proxy: tuple[str, int], authority: str, timeout: float = 3.0) -> tuple[socket.socket, int]:
    """A plain TCP connection to a regular-mode proxy, after `CONNECT authority`; (socket, status)."""
    sock = socket.create_connection(proxy, timeout=timeout)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return sock, status


def open_tls(address: tuple[str, int], server_hostname: str, cafiles: Iterable[Path | str],
             alpn: Sequence[str] = ("http/1.1",), tunnel_to: str | None = None, timeout: float = 3.0,
             check_hostname: bool = True) -> ssl.SSLSocket:
    """TLS to `address` (reverse mode), or to `tunnel_to` through the proxy at `address` (regular mode)."""
    if tunnel_to:
        sock, status = connect_tunnel(address, tunnel_to, timeout)
        if status != 200:
            sock.close()
            raise ConnectionRefusedError(f"CONNECT {tunnel_to}: {status}")
    else:
        sock = socket.create_connection(address, timeout=timeout)
    ctx = client_context(cafiles, alpn, check_hostname)
    return ctx.wrap_socket(sock, server_hostname=server_hostname)


def read_until_quiet(sock: socket.socket, timeout: float = 1.0, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes, or stays silent for `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    return data


def _complete_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ")
    if len(status) > 1 and status[1] in (b"101", b"204", b"304"):
        return True
    headers = {l.split(b":", 1)[0].strip().lower(): l.split(b":", 1)[1].strip() for l in lines[1:] if b":" in l}
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return body.endswith(b"0\r\n\r\n")
    if headers.get(b"content-length", b"").isdigit():
        return len(body) >= int(headers[b"content-length"])
    return False


def read_h1_response(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """One HTTP/1.1 response (or whatever arrives before close/timeout)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while not _complete_response(data) and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    return data


def status_of(raw: bytes) -> int | None:
    try:
        return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else None
    except (IndexError, ValueError):
        return None


def h1_exchange(sock: socket.socket, request: bytes, timeout: float = 2.0) -> tuple[int | None, bytes]:
    try:
        sock.sendall(request)
    except OSError as e:
        return None, f"send failed: {e}".encode()
    raw = read_h1_response(sock, timeout)
    return status_of(raw), raw


def h2_exchange(sock: ssl.SSLSocket, headers: list[tuple[bytes | str, bytes | str]], body: bytes | None = None,
                timeout: float = 2.0, split_body: int | None = None) -> tuple[int | None, bytes]:
    """One HTTP/2 request with no client-side validation of its headers; (status, body or error)."""
    config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                       normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    enc = [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v) for k, v in headers]
    status: int | None = None
    received = b""
    try:
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, enc, end_stream=body is None)
        if body is not None:
            conn.send_data(sid, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        done = False
        while not done and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    if isinstance(event, h2.events.StreamReset):
                        received += f"[stream reset: {event.error_code!r}]".encode()
                    if isinstance(event, h2.events.ConnectionTerminated):
                        received += f"[GOAWAY: {event.error_code!r} {event.additional_data!r}]".encode()
                    done = True
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
    except (TimeoutError, ssl.SSLError, OSError, h2.exceptions.ProtocolError) as e:
        received += f"[{type(e).__name__}: {e}]".encode()
    return status, received


class MemoryTLS:
    """A TLS client on memory BIOs, so a test decides how its bytes are cut into TCP writes."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def handshake(self, first_write: int | None = None, pause: float = 0.3, timeout: float = 3.0) -> None:
        """Complete the handshake; with `first_write`, the ClientHello's first TCP write is that many bytes."""
        self.sock.settimeout(timeout)
        first = True
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                data = self.outgoing.read()
                if first and first_write:
                    self.sock.sendall(data[:first_write])
                    time.sleep(pause)
                    self.sock.sendall(data[first_write:])
                elif data:
                    self.sock.sendall(data)
                first = False
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the TLS handshake")
                self.incoming.write(chunk)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv_until_quiet(self, timeout: float = 1.0) -> bytes:
        out = b""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.incoming.write(chunk)
                while True:
                    try:
                        out += self.tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
        except (TimeoutError, ssl.SSLError, OSError):
            pass
        return out
