"""testkit.net's ports: a port handed out stays the caller's until its server listens.

Every process-starting fixture picks a port and starts a server on it seconds later. A CI run once
failed because another pick or connection could take the port in those seconds (the gateway then
could not listen, and the readiness probe met some other listener)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from testkit import net


def test_ports_handed_out_are_distinct_until_their_servers_listen() -> None:
    # Picking and letting go returns a port already handed out within a few hundred picks (every
    # trial of 500 did on this machine); reserved ones never come back.
    ports = [net.free_port() for _ in range(500)]
    try:
        assert len(set(ports)) == len(ports)
    finally:
        for port in ports:
            net.release_port(port)


def test_a_reserved_port_is_closed_to_everyone_but_a_server_that_listens_on_it() -> None:
    port = net.free_port()
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # another pick, or a server without SO_REUSEADDR
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # nothing answers yet
        # A server binds it as asyncio (the gateway's mitmproxy) does, after a slow start.
        script = ("import asyncio, time\ntime.sleep(0.5)\n"
                  "async def main():\n"
                  f"    server = await asyncio.start_server(lambda r, w: w.close(), '127.0.0.1', {port})\n"
                  "    await server.serve_forever()\n"
                  "asyncio.run(main())\n")
        proc = subprocess.Popen([sys.executable, "-c", script])
        try:
            net.wait_for_port(port, proc)
            assert port not in net._reserved  # noqa: SLF001 - the reservation ended once the server listened
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        finally:
            net.stop(proc)
    finally:
        net.release_port(port)


def test_a_server_that_never_listens_still_ends_the_reservation() -> None:
    port = net.free_port()
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=f"exited with 3 before listening on {port}"):
        net.wait_for_port(port, proc)
    assert port not in net._reserved  # noqa: SLF001
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again for anyone
