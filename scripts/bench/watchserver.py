"""An upstream that holds watches open and idle, for the gateway's memory per idle watch.

nginx can only send a canned watch body and end it; a real watch stays open for minutes with
nothing to say. This server answers `?watch=1` with one ADDED event and then keeps the stream
open (chunked, never finished) until the client goes away; anything else gets a small PodList.

    python scripts/bench/watchserver.py --port 8443 --cert server.pem --key server-key.pem
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl

EVENT = (json.dumps({"type": "ADDED", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {
    "name": "idle-watch", "namespace": "default", "resourceVersion": "1"}}}) + "\n").encode()
LIST = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b"\r\n", 1)[0].split(b" ")[1]
            if b"watch=1" in target or b"watch=true" in target:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunk(EVENT))
                await writer.drain()
                await reader.read()  # idle until the client (the gateway) hangs up
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(LIST), LIST))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, IndexError):
        pass
    finally:
        writer.close()


async def main(port: int, cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(serve_connection, "127.0.0.1", port, ssl=context, backlog=4096)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    async with server:
        await stopped.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.cert, args.key))
