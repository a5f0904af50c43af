"""pods/exec and pods/attach over WebSocket, the Kubernetes channel protocol (v4/v5.channel.k8s.io).

Every binary message starts with a channel byte: 0 stdin, 1 stdout, 2 stderr, 3 error (the final
metav1.Status as JSON), 4 resize (JSON {"Width","Height"}), and in v5 only 255 "close" whose
payload names the channel the client closed (stdin EOF). The server sends the Status on channel 3
when the command ends, then closes the socket.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from dataclasses import dataclass

from aiohttp import WSMsgType, web

from .container import CommandNotFound, Container, ProcessIO, Shell, ShellExit
from .errors import bad_request
from .logs import format_line, heartbeat_line

log = logging.getLogger(__name__)

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255

SUCCESS = {"metadata": {}, "status": "Success"}


def exit_status(code: int) -> dict:
    if code == 0:
        return SUCCESS
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def not_found_status(executable: str, container_id: str) -> dict:
    """What containerd/runc report for an exec of a missing executable, wrapped as kubelet does."""
    return {"metadata": {}, "status": "Failure",
            "message": "Internal error occurred: error executing command in container: failed to exec in container: "
                       f'failed to start exec "{container_id}": OCI runtime exec failed: exec failed: unable to start '
                       f'container process: exec: "{executable}": executable file not found in $PATH: unknown',
            "reason": "InternalError", "code": 500,
            "details": {"causes": [{"message": f'exec: "{executable}": executable file not found in $PATH'}]}}


@dataclass
class ExecRequest:
    container: Container
    command: list[str]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    attach: bool = False
    log_interval: float = 0.5


def wants_websocket_protocol(request: web.Request) -> bool:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    return any(p in PROTOCOLS for p in offered)


async def serve_exec(request: web.Request, exec_request: ExecRequest) -> web.StreamResponse:
    if not wants_websocket_protocol(request):
        raise bad_request("the jitgate stand-in supports only the v5.channel.k8s.io and v4.channel.k8s.io "
                          "WebSocket subprotocols")
    ws = web.WebSocketResponse(protocols=PROTOCOLS, compress=False, max_msg_size=0, autoclose=True)
    await ws.prepare(request)
    session = ExecSession(ws, exec_request)
    await session.run()
    return ws


class ExecSession:
    def __init__(self, ws: web.WebSocketResponse, req: ExecRequest):
        self.ws = ws
        self.req = req
        self.v5 = ws.ws_protocol == "v5.channel.k8s.io"
        self.io = ProcessIO(self.write, tty=req.tty, stdin=req.stdin)
        self.client_gone = asyncio.Event()
        self.size: tuple[int, int] | None = None

    async def write(self, channel: int, data: bytes) -> None:
        if channel == STDOUT and not self.req.stdout or channel == STDERR and not self.req.stderr:
            return
        if self.ws.closed:
            raise ConnectionResetError("exec client went away")
        await self.ws.send_bytes(bytes([channel]) + data)

    async def read_loop(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                channel, payload = msg.data[0], msg.data[1:]
                if channel == STDIN:
                    self.io.feed(payload)
                elif channel == RESIZE:
                    try:
                        size = json.loads(payload)
                        self.size = (int(size.get("Width", 0)), int(size.get("Height", 0)))
                    except (ValueError, AttributeError):
                        pass
                elif channel == CLOSE and self.v5 and payload[:1] == bytes([STDIN]):
                    self.io.feed_eof()
        finally:
            self.io.feed_eof()
            self.client_gone.set()

    async def run(self) -> None:
        reader = asyncio.create_task(self.read_loop())
        program = asyncio.create_task(self.program())
        gone = asyncio.create_task(self.client_gone.wait())
        try:
            done, _ = await asyncio.wait({program, gone}, return_when=asyncio.FIRST_COMPLETED)
            if program not in done:
                program.cancel()
                return
            try:
                status = program.result()
            except ConnectionResetError:
                return
            if not self.ws.closed:
                await self.ws.send_bytes(bytes([ERROR]) + json.dumps(status).encode())
                await self.ws.close()
        finally:
            for task in (program, gone):
                task.cancel()
            reader.cancel()
            await asyncio.gather(reader, program, gone, return_exceptions=True)

    async def program(self) -> dict:
        try:
            return await self.run_command()
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - a stand-in bug ends the session like a runtime failure
            log.exception("exec failed")
            return {"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                    "message": f"Internal error occurred: {type(e).__name__}: {e}"}

    async def run_command(self) -> dict:
        shell = Shell(self.req.container)
        if self.req.attach:
            return await self.attached()
        try:
            code = await shell.run(self.req.command, self.io)
        except CommandNotFound:
            container_id = self.req.container.pod.get("status", {}).get("containerStatuses", [{}])[0].get(
                "containerID", "containerd://0")[-64:]
            return not_found_status(self.req.command[0], container_id)
        except ShellExit as e:
            code = e.code
        return exit_status(code)

    async def attached(self) -> dict:
        """Attach to the container's main process: with stdin, its shell; otherwise its ongoing output."""
        spec = self.req.container.spec()
        if self.req.stdin and (spec.get("stdin") or spec.get("tty") or self.req.tty):
            try:
                return exit_status(await Shell(self.req.container).cmd_sh([], self.io))
            except ShellExit as e:
                return exit_status(e.code)
        n = 0
        while True:
            await asyncio.sleep(self.req.log_interval)
            n += 1
            now = datetime.datetime.now(datetime.timezone.utc)
            await self.io.out(format_line(now, heartbeat_line(self.req.container, n), False))
