"""HTTP/2 for the stand-in (`--h2`), as kube-apiserver offers it (ALPN h2, then http/1.1).

aiohttp serves HTTP/1.1 only, so with `--h2` the stand-in's app listens on a private Unix socket and
this front takes the TLS connections: one that negotiated `h2` is served here, each stream forwarded
to the app as an HTTP/1.1 request and its response (a watch, a followed log: streamed) sent back as
DATA frames under HTTP/2 flow control; any other connection (WebSocket exec, clients without h2) is
relayed to the app byte for byte. A request that came over HTTP/2 reaches the app with the header
`X-Standin-Protocol: HTTP/2` (the front drops that header from clients), which the request record
shows as `protocol`. TLS client certificates do not cross the front: `--h2` excludes `--client-ca`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import h2.config
import h2.connection
import h2.events
import h2.exceptions

log = logging.getLogger("standin.h2")

PROTOCOL_HEADER = "X-Standin-Protocol"
# Connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2), never copied from an HTTP/1.1 response.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"})


class H2Front:
    """Serves the TLS listener in front of the app's Unix socket `backend`."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.connections: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                await _H2Connection(reader, writer, self.backend).serve()
            else:
                await self.relay(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, h2.exceptions.ProtocolError) as e:
            log.info("connection ended: %s", e)
        finally:
            self.connections.discard(task)
            writer.close()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app_reader, app_writer = await asyncio.open_unix_connection(self.backend)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    sink.write_eof() if sink.can_write_eof() else sink.close()

        try:
            await asyncio.gather(pipe(reader, app_writer), pipe(app_reader, writer))
        finally:
            app_writer.close()

    def close(self) -> None:
        for task in list(self.connections):
            task.cancel()


class _H2Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: str) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=backend), auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=None))
        self.requests: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.window_open = asyncio.Event()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def serve(self) -> None:
        self.conn.initiate_connection()
        self.flush()
        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    self.on(event)
                self.flush()
                if self.conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
                    break
        finally:
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self.session.close()

    def on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.requests[event.stream_id] = (list(event.headers), bytearray())
            if event.stream_ended is not None:
                self.start(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            if event.stream_id in self.requests:
                self.requests[event.stream_id][1].extend(event.data)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.start(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(event.stream_id, None)
            task = self.tasks.pop(event.stream_id, None)
            if task is not None:
                task.cancel()  # the client is gone: so is the app's request (a watch ends)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window_open.set()

    def start(self, stream_id: int) -> None:
        if stream_id in self.requests and stream_id not in self.tasks:
            self.tasks[stream_id] = asyncio.ensure_future(self.forward(stream_id))

    async def forward(self, stream_id: int) -> None:
        headers, body = self.requests.pop(stream_id)
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        fields = [(k, v) for k, v in headers if not k.startswith(":") and k.lower() != PROTOCOL_HEADER.lower()]
        fields += [("Host", pseudo.get(":authority", "standin")), (PROTOCOL_HEADER, "HTTP/2")]
        method, path = pseudo.get(":method", "GET"), pseudo.get(":path", "/")
        log.info("h2 stream %d: %s %s", stream_id, method, path)
        try:
            async with self.session.request(method, "http://standin" + path, headers=fields, data=bytes(body) or None,
                                            allow_redirects=False, skip_auto_headers=("User-Agent", "Accept-Encoding",
                                                                                     "Content-Type")) as response:
                answer = [(":status", str(response.status))]
                answer += [(k.lower(), v) for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP]
                self.conn.send_headers(stream_id, answer)
                self.flush()
                async for chunk in response.content.iter_any():
                    await self.send(stream_id, chunk)
            self.conn.end_stream(stream_id)
            self.flush()
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            log.info("h2 stream %d ended: %s", stream_id, e)
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.reset_stream(stream_id)
                self.flush()
        finally:
            self.tasks.pop(stream_id, None)

    async def send(self, stream_id: int, data: bytes) -> None:
        while data:
            size = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size, len(data))
            if size <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            self.conn.send_data(stream_id, data[:size])
            data = data[size:]
            self.flush()
        await self.writer.drain()
