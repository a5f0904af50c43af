"""scripts/agent-call: a tiny MCP host, so a newcomer can see an agent's call go through jitgate.

It starts one MCP server from an agent host's configuration (the `mcpServers` JSON that Claude
Desktop, Claude Code and other hosts read; the quick start writes one in state/demo/mcp-servers.json),
talks to it over stdio with the Python MCP SDK as a host does, calls one tool and prints what the model
would read. While the call is out it asks the gateway's access API, as the agent (the kubeconfig the
server runs with), whether the gateway holds the call, and says so with the access request a reviewer
approves.

    scripts/agent-call --config state/demo/mcp-servers.json pods_list_in_namespace '{"namespace": "dev"}'
    scripts/agent-call --config state/demo/mcp-servers.json --held    # the id of the request a held call waits for

`npx` runs in .mcp-servers/ when scripts/install-mcp-servers has installed the servers there, so it
starts the pinned install (offline) instead of fetching from the registry.

Exit status: 0 the tool returned a result; 1 an error result (a refusal: its text is what the model
reads), or no held call found with --held; 2 bad configuration or usage, or the server could not be
started or the call not made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jitgate.cli.client import (  # noqa: E402
    ApiError,
    Client,
    ClientError,
    load_connection,
    parse_time,
)

SERVERS_DIR = REPO / ".mcp-servers"  # scripts/install-mcp-servers puts the pinned servers here
VENV_BIN = Path(sys.executable).parent  # kubectl (for servers that run it) is here
HELD_REASON = "held call:"  # how the gateway words the access request it files for a call it holds


def say(text: str) -> None:
    print(f"agent-call: {text}", file=sys.stderr, flush=True)


def fail(text: str) -> SystemExit:
    say(text)
    return SystemExit(2)


def server_entry(config_path: Path, name: str | None) -> tuple[str, dict]:
    try:
        servers = json.loads(config_path.read_text())["mcpServers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fail(f"{config_path} is no MCP host configuration with mcpServers: {e}") from None
    if name is None:
        name = next(iter(servers), None)
    if name not in servers:
        raise fail(f"{config_path} has no server {name!r} (it has {', '.join(servers) or 'none'})")
    return name, servers[name]


def kubeconfig_of(entry: dict) -> str | None:
    """The kubeconfig the server runs with: its --kubeconfig argument, or KUBECONFIG in its env."""
    args = entry.get("args", [])
    for i, arg in enumerate(args):
        if arg == "--kubeconfig" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--kubeconfig="):
            return arg.split("=", 1)[1]
    return entry.get("env", {}).get("KUBECONFIG")


def server_params(entry: dict):
    """The server started as a host starts it: its command, args and env over the SDK's default
    environment (HOME, PATH, ...; never this shell's KUBECONFIG)."""
    from mcp.client.stdio import StdioServerParameters, get_default_environment

    base = get_default_environment()
    env = {**base, "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', os.defpath)}", **entry.get("env", {})}
    cwd = None
    if entry["command"] == "npx" and (SERVERS_DIR / ".installed").is_file():
        cwd = str(SERVERS_DIR)
        env.update(npm_config_offline="true", npm_config_update_notifier="false", NO_UPDATE_NOTIFIER="1")
    return StdioServerParameters(command=entry["command"], args=list(entry.get("args", [])), env=env, cwd=cwd)


def held_requests(client: Client, since: float, states: str = "pending") -> list[dict]:
    """The agent's access requests (pending ones by default) the gateway filed for calls it holds,
    filed since `since`, newest first."""
    items = client.list_requests("mine", states)
    found = [r for r in items if (str(r.get("reason") or "").startswith(HELD_REASON) or r.get("operation"))
             and (parse_time(r.get("created_at")) or 0) >= since]
    return sorted(found, key=lambda r: parse_time(r.get("created_at")) or 0, reverse=True)


def held_line(request: dict) -> str:
    required = request.get("approvals_required")
    needs = f", needs {required} approval(s)" if required else ""
    return (f"held: the gateway holds this call until a reviewer decides access request {request['id']} "
            f"(rule {request['rule']}{needs}); a reviewer approves it with: jitgate approve {request['id']}")


class HoldWatch:
    """Asks the access API, as the agent, whether the gateway holds the call; says so once."""

    def __init__(self, kubeconfig: str | None, since: float) -> None:
        self.client = None
        if kubeconfig:
            try:
                self.client = Client(load_connection(kubeconfig=kubeconfig), timeout=10)
            except ClientError as e:
                say(f"cannot ask the gateway whether it holds the call ({e})")
        self.since = since
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:  # approved already counts: a reviewer may have been quicker than this look
                held = held_requests(self.client, self.since, "pending,approved")
            except (ApiError, ClientError):
                continue
            if held and not self.done.is_set():
                print(held_line(held[0]), flush=True)
                return

    def __enter__(self) -> HoldWatch:
        if self.client is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()


async def call(params, tool: str, arguments: dict, timeout: float, errlog) -> tuple[str, bool | None]:
    """The tool result's text and whether it is an error result; (why, None) when there is no such tool."""
    from mcp import Client as MCPClient
    from mcp.client.stdio import stdio_client
    from mcp.shared.exceptions import MCPError

    async with MCPClient(stdio_client(params, errlog=errlog)) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        if tool not in tools:
            name = client.server_info.name if client.server_info else "the server"
            return f"{name} has no tool {tool!r} (it has: {', '.join(sorted(tools))})", None
        try:
            result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout)
        except MCPError as e:  # a JSON-RPC error: what some servers answer a refused call with
            return str(e), True
        text = "\n".join(c.text for c in result.content if getattr(c, "text", None) is not None)
        return text, bool(result.is_error)


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/agent-call", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="an MCP host configuration (mcpServers JSON)")
    parser.add_argument("--server", help="which of its servers (default: the first)")
    parser.add_argument("--held", action="store_true",
                        help="print the id of the access request the gateway filed for the agent's held call "
                             "(waiting for one up to --wait seconds), and nothing else")
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="with --held: how long to wait (default 60)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long the tool call may take, held time included (default 300)")
    parser.add_argument("tool", nargs="?", help="the tool to call, e.g. pods_list_in_namespace")
    parser.add_argument("arguments", nargs="?", default="{}", help="its arguments as a JSON object (default: {})")
    args = parser.parse_args()

    name, entry = server_entry(args.config, args.server)
    kubeconfig = kubeconfig_of(entry)
    if args.held:
        if not kubeconfig:
            raise fail(f"server {name} of {args.config} names no kubeconfig")
        try:
            client = Client(load_connection(kubeconfig=kubeconfig), timeout=10)
            deadline = time.monotonic() + args.wait
            while not (held := held_requests(client, 0)) and time.monotonic() < deadline:
                time.sleep(0.5)
        except (ApiError, ClientError) as e:
            say(f"cannot ask the gateway: {e}")
            return 2
        if not held:
            say(f"no call of the agent's is held (no pending request filed for one) after {args.wait:g}s")
            return 1
        print(held[0]["id"])
        return 0
    if not args.tool:
        parser.error("give the tool to call (or --held)")
    try:
        arguments = json.loads(args.arguments)
        if not isinstance(arguments, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        parser.error(f"arguments must be a JSON object: {e}")

    params = server_params(entry)
    say(f"{name}: {params.command} {' '.join(params.args)}; calling {args.tool} {json.dumps(arguments)}")
    with tempfile.TemporaryFile("w+") as errlog, HoldWatch(kubeconfig, time.time() - 1):
        try:
            text, is_error = asyncio.run(call(params, args.tool, arguments, args.timeout, errlog))
        except Exception as e:  # noqa: BLE001 (the server did not start, or broke off: say so, with its log)
            errlog.seek(0)
            say(f"the call to {args.tool} failed: {e!r}\n{errlog.read()[-4000:]}")
            return 2
    if is_error is None:
        say(text)
        return 2
    print(text, flush=True)
    if is_error:
        say(f"{args.tool} returned an error result (above: what the model reads)")
    return 1 if is_error else 0


if __name__ == "__main__":
    sys.exit(main())
