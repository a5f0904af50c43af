"""Memory per idle watch: open N watches through a proxy in reverse mode and read its RSS.

Each watch is a real TLS connection with a `?watch=1` request; it counts once its first event has
come back through the proxy (so the proxy streams it, not buffers it). Then nothing more is sent,
the way most watches spend their lives.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scripts.bench.proxies import ProxyProcess

WATCH_TARGET = "/api/v1/namespaces/default/pods?watch=1&resourceVersion=1"
OPEN_CONCURRENCY = 20  # handshakes in flight at once; the proxy does two TLS handshakes per watch
SETTLE_SECONDS = 1.0


@dataclass
class WatchMemory:
    proxy: str
    baseline_kb: int = 0
    points: list[tuple[int, int]] = field(default_factory=list)  # (open watches, RSS kB)
    failures: list[str] = field(default_factory=list)

    def per_watch_kb(self) -> list[tuple[int, float]]:
        return [(n, (rss - self.baseline_kb) / n) for n, rss in self.points if n]


def raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _open_watch(host: str, port: int, context: ssl.SSLContext, token: str | None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET {WATCH_TARGET} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n"
                 f"User-Agent: jitgate-bench\r\n{auth}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status != b"200":
        body = await asyncio.wait_for(reader.read(400), 5)  # the Status message says why
        writer.close()
        raise ConnectionError(f"watch answered {status.decode()}: {body.decode(errors='replace').strip()}")
    first = await reader.readuntil(b"\n")  # chunk size line
    await reader.readuntil(b"\r\n")  # the ADDED event
    if not first.strip():
        raise ConnectionError("watch sent an empty first chunk")
    return reader, writer


async def _measure(proxy: ProxyProcess, ca_file: Path, token: str | None, counts: Sequence[int]) -> WatchMemory:
    result = WatchMemory(proxy.name)
    context = ssl.create_default_context(cafile=str(ca_file))
    host, port = "127.0.0.1", proxy.reverse_port
    # A few watches opened and closed first, so the baseline has every code path loaded.
    for _ in range(3):
        _, writer = await _open_watch(host, port, context, token)
        writer.close()
    await asyncio.sleep(SETTLE_SECONDS)
    result.baseline_kb = proxy.stat.rss_kb()
    open_streams: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> None:
        async with gate:
            try:
                _, writer = await asyncio.wait_for(_open_watch(host, port, context, token), 30)
                open_streams.append(writer)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                result.failures.append(f"{type(e).__name__}: {e}")

    try:
        for count in sorted(counts):
            await asyncio.gather(*(one() for _ in range(count - len(open_streams))))
            if result.failures:
                break
            await asyncio.sleep(SETTLE_SECONDS)
            result.points.append((len(open_streams), proxy.stat.rss_kb()))
    finally:
        for writer in open_streams:
            writer.close()
        await asyncio.sleep(0.2)
    return result


def idle_watch_memory(proxy: ProxyProcess, ca_file: Path, token: str | None,
                      counts: Sequence[int] = (10, 100, 1000)) -> WatchMemory:
    raise_open_file_limit(max(counts) * 2 + 256)
    started = time.monotonic()
    result = asyncio.run(_measure(proxy, ca_file, token, counts))
    if not proxy.alive():
        result.failures.append(f"{proxy.name} exited during the watch test after {time.monotonic() - started:.0f}s")
    return result
