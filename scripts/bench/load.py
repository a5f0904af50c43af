"""Load generators, each returning the same `LoadResult`.

- wrk (Debian): reverse mode and direct. Least client CPU per request, so on a 2-core machine the
  proxy gets the most of its core. Its latency starts when the request is written, i.e. after the
  client's own TCP+TLS handshake (that cost shows in the throughput of new-connection runs).
- hey (Debian, Go): regular mode. wrk cannot send CONNECT; hey's `-x` tunnels every HTTPS request
  through the proxy (CONNECT, then TLS to the proxy's certificate for the cluster), with keep-alive
  or a new tunnel per request. Its latency covers the whole request including connection setup.
- A pure-Python asyncio client (stdlib `ssl`, raw HTTP/1.1): both modes, needs nothing installed;
  used by the smoke test and when wrk or hey is missing. It verifies every certificate.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scripts.bench.upstream import on_cpus

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk-report.lua"
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class LoadResult:
    tool: str
    ok: int  # 2xx responses
    errors: int  # non-2xx responses, connection errors, timeouts
    seconds: float
    p50_ms: float
    p99_ms: float
    note: str = ""  # the first error seen, for the report

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Target:
    """Where requests go. `proxy` set: regular mode, each connection is a CONNECT tunnel to `url`'s host."""

    url: str
    token: str | None = None
    proxy: str | None = None  # "127.0.0.1:port"
    ca_file: Path | None = None  # verify the server (through a tunnel: the proxy's) certificate

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "jitgate-bench"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


# -- wrk ------------------------------------------------------------------------------------------

def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(target: Target, connections: int, seconds: float, keepalive: bool,
            cpus: Iterable[int] | None = None) -> LoadResult:
    if target.proxy:
        raise ValueError("wrk cannot tunnel through a proxy (CONNECT); use hey or the Python client")
    cmd = ["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
           "--timeout", f"{int(REQUEST_TIMEOUT)}s", "-s", str(WRK_SCRIPT)]
    headers = dict(target.headers)
    if not keepalive:
        headers["Connection"] = "close"
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(target.url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=on_cpus(cpus))
    match = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    r = json.loads(match.group(1))
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    note = ""
    if errors:
        note = (f"wrk errors: connect {r['connect']}, read {r['read']}, write {r['write']}, "
                f"non-2xx {r['status']}, timeout {r['timeout']}")
    return LoadResult("wrk", r["requests"] - r["status"], errors, r["duration_us"] / 1e6,
                      r["p50_us"] / 1000, r["p99_us"] / 1000, note)


# -- hey ------------------------------------------------------------------------------------------

def hey_available() -> bool:
    return shutil.which("hey") is not None


def parse_hey(output: str) -> LoadResult:
    """Read hey's text summary: total time, latency distribution, status codes and errors."""
    total = re.search(r"Total:\s+([\d.]+) secs", output)
    if total is None:
        raise RuntimeError(f"hey printed no summary:\n{output[-2000:]}")
    latencies = {int(p): float(s) for p, s in re.findall(r"^\s+(\d+)% in ([\d.]+) secs", output, re.M)}
    statuses = {int(c): int(n) for c, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", output, re.M)}
    error_lines = re.findall(r"^\s+\[(\d+)\]\s+(.+)$", output.split("Error distribution:")[1], re.M) \
        if "Error distribution:" in output else []
    ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
    errors = sum(n for code, n in statuses.items() if not 200 <= code < 300) + sum(int(n) for n, _ in error_lines)
    note = error_lines[0][1].strip()[:200] if error_lines else ""
    if not note and errors:
        note = "non-2xx: " + ", ".join(f"{c}x{n}" for c, n in statuses.items() if not 200 <= c < 300)
    return LoadResult("hey", ok, errors, float(total.group(1)),
                      latencies.get(50, float("nan")) * 1000, latencies.get(99, float("nan")) * 1000, note)


def run_hey(target: Target, connections: int, seconds: float, keepalive: bool,
            cpus: Iterable[int] | None = None) -> LoadResult:
    cmd = ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(connections), "-t", str(int(REQUEST_TIMEOUT)),
           "-disable-compression"]
    if target.proxy:
        cmd += ["-x", f"http://{target.proxy}"]
    if not keepalive:
        cmd.append("-disable-keepalive")
    for name, value in target.headers.items():
        if name == "Accept":
            cmd += ["-A", value]
        else:
            cmd += ["-H", f"{name}: {value}"]
    cmd.append(target.url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=on_cpus(cpus))
    if out.returncode != 0:
        raise RuntimeError(f"hey failed ({out.returncode}): {out.stderr.strip()}")
    return parse_hey(out.stdout)


# -- pure Python ----------------------------------------------------------------------------------

class _Connection:
    """One HTTP/1.1 connection over TLS, directly or through a CONNECT tunnel."""

    def __init__(self, target: Target) -> None:
        self.target = target
        parts = urlsplit(target.url)
        self.host, self.port = parts.hostname, parts.port or 443
        self.authority = parts.netloc
        context = ssl.create_default_context(cafile=str(target.ca_file)) if target.ca_file else ssl.create_default_context()
        if not target.ca_file:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.context = context
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self.target.proxy:
            proxy_host, proxy_port = self.target.proxy.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(proxy_host, int(proxy_port))
            writer.write(f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.split(b" ", 2)[1].startswith(b"2"):
                writer.close()
                raise ConnectionError(f"CONNECT refused: {head.splitlines()[0].decode(errors='replace')}")
            await writer.start_tls(self.context, server_hostname=self.host)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.context,
                                                           server_hostname=self.host)
        self.reader, self.writer = reader, writer

    async def request(self, path: str, keepalive: bool) -> tuple[int, bytes, bool]:
        """Send one GET; returns status, body and whether the connection may be reused."""
        headers = {"Host": self.authority, **self.target.headers}
        if not keepalive:
            headers["Connection"] = "close"
        self.writer.write((f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                           + "\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        fields = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            body = await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            body = await self.reader.read()
            keepalive = False
        reusable = keepalive and fields.get("connection", "").lower() != "close"
        return status, body, reusable

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _worker(target: Target, path: str, keepalive: bool, deadline: float, max_requests: int | None,
                  latencies: list[float], failures: list[str], counter: list[int]) -> None:
    conn: _Connection | None = None
    while time.perf_counter() < deadline and (max_requests is None or counter[0] < max_requests):
        counter[0] += 1
        started = time.perf_counter()
        try:
            if conn is None:
                conn = _Connection(target)
                await conn.open()
            status, _, reusable = await asyncio.wait_for(conn.request(path, keepalive), REQUEST_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ssl.SSLError, ValueError, IndexError) as e:
            failures.append(f"{type(e).__name__}: {e}")
            if conn is not None:
                conn.close()
            conn = None
            continue
        if 200 <= status < 300:
            latencies.append(time.perf_counter() - started)
        else:
            failures.append(f"HTTP {status}")
        if not reusable:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


async def python_load(target: Target, connections: int, seconds: float, keepalive: bool,
                      max_requests: int | None = None) -> LoadResult:
    """Run `connections` concurrent clients for `seconds` (or until `max_requests` were sent)."""
    path = urlsplit(target.url).path or "/"
    query = urlsplit(target.url).query
    if query:
        path += "?" + query
    latencies: list[float] = []
    failures: list[str] = []
    counter = [0]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_worker(target, path, keepalive, deadline, max_requests, latencies, failures, counter)
                           for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult("python", len(latencies), len(failures), elapsed, percentile(latencies, 50) * 1000,
                      percentile(latencies, 99) * 1000, failures[0] if failures else "")


def run_python(target: Target, connections: int, seconds: float, keepalive: bool,
               cpus: Iterable[int] | None = None, max_requests: int | None = None) -> LoadResult:
    """Same signature as run_wrk/run_hey. Runs in this process: `cpus` is not applied here (run.py
    pins the driver itself to the load side)."""
    return asyncio.run(python_load(target, connections, seconds, keepalive, max_requests))


def generator_for(regular_mode: bool, prefer_native: bool = True):
    """The load generator for a mode: (name, run function)."""
    if prefer_native and regular_mode and hey_available():
        return "hey", run_hey
    if prefer_native and not regular_mode and wrk_available():
        return "wrk", run_wrk
    return "python", run_python
