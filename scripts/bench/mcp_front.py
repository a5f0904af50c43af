"""What the MCP front costs per message: `.venv/bin/python -m scripts.bench.mcp_front` prints it.

In process: the front's own work on one `tools/call` and its answer (token check from the cache,
strict parse, header rules, tool rules, audit lines on a real file, the answer's inspection with and
without a secret to mask, an SSE event split and rebuilt). Then end to end, with real processes: the
same call sent straight to the MCP server and through the front (`mitmdump -s addons/mcp_gateway.py`),
sequentially on one connection each, p50 of the round trip (`--in-process`: the first part only).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from jitgate.audit.log import AuditLog
from jitgate.identity.oidc import Identity
from jitgate.mcp.front import Exchange, Front
from jitgate.mcp.rules import Caller
from jitgate.mcp.sse import EventSplitter, event_data, with_data
from jitgate.policy.mcp import load_mcp_policy

POLICY = """\
    mcp:
      servers:
        - name: kube
          upstream: http://127.0.0.1:8000
          resource: https://mcp.example.com/kube
          trusted: true
      authorization_servers:
        - issuer: https://login.example.com
      rules:
        - {name: read, action: allow, groups: ["oidc:agents"], annotations: {readOnlyHint: true}}
        - {name: dev-writes, action: allow, tools: [delete_pod, exec], arguments: {namespace: [dev, "dev-*"]}}
        - {name: no-rm, action: deny, tools: [exec], arguments: {command: 're:rm\\s+-rf'}}
        - {name: prod, action: require-approval, tools: [delete_pod], arguments: {namespace: "prod*"}}
    """
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
CALL = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                   "params": {"name": "delete_pod", "arguments": {"namespace": "dev", "name": "web"}, "_meta": META}}).encode()
HEADERS = [("Host", "mcp.example.com"), ("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"),
           ("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"), ("Mcp-Name", "delete_pod")]
ANSWER = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "pod dev/web deleted"}],
                                                          "isError": False}}).encode()
SECRET_ANSWER = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text":
                           "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}]}}).encode()
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL21jcC5leGFtcGxlLmNvbS9rdWJlIn0.sig"


def per_call_us(fn, n: int, rounds: int = 5) -> float:
    """Best of `rounds`: on a shared machine the slowest rounds measure the neighbours."""
    for _ in range(min(200, n)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(max(1, n // rounds)):
            fn()
        best = min(best, (time.perf_counter() - start) / max(1, n // rounds))
    return best * 1e6


def in_process(n: int = 5000) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "mcp.yaml"
        policy.write_text(textwrap.dedent(POLICY))
        config = load_mcp_policy(policy)
        server = config.servers[0]
        audit = AuditLog(Path(tmp) / "audit.log")
        front = Front(config, audit)
        # A verified token, as the cache holds it after the first call (verification itself is OIDCVerifier's).
        identity = Identity("agent@example.com", ("oidc:agents",), "https://login.example.com", "agent", time.time() + 3600)
        front.tokens._cache[hashlib.sha256(TOKEN.encode()).digest()] = (identity, (server.resource,), frozenset())
        loop = asyncio.new_event_loop()

        def authenticate():
            ex = Exchange(server, "POST", "/mcp")
            loop.run_until_complete(front.authenticate(ex, [f"Bearer {TOKEN}"]))
            return ex

        caller = Caller("agent@example.com", ("oidc:agents",))

        def judged():
            ex = Exchange(server, "POST", "/mcp", caller=caller)
            assert front.admit(ex, CALL, HEADERS) is None

        def answered(answer: bytes):
            def fn():
                ex = Exchange(server, "POST", "/mcp", caller=caller)
                front.server_message(ex, answer, 200)
                front.finish(ex, 200)
            return fn

        event = b"id: 12\nevent: message\ndata: " + SECRET_ANSWER + b"\n\n"

        def sse_event():
            splitter = EventSplitter()
            (one,) = splitter.feed(event)
            with_data(one, event_data(one))

        results = {
            "token check (cached) + Exchange": per_call_us(authenticate, n),
            "tools/call judged (parse, headers, rules, audit)": per_call_us(judged, n),
            "its answer inspected (JSON, audit)": per_call_us(answered(ANSWER), n),
            "an answer with a secret, masked (audit)": per_call_us(answered(SECRET_ANSWER), n),
            "one SSE event split and rebuilt": per_call_us(sse_event, n),
        }
        front.audit.close()
        audit.close()
        loop.close()
        return results


def end_to_end(n: int = 300) -> dict[str, float]:
    from testkit.mcp_server import MCPFrontProcess, MCPServerProcess
    from testkit.net import TestCA, free_port, stop, wait_for_port
    from testkit.oidc_provider import OIDCProviderProcess

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ca = TestCA.create(work / "ca")
        with OIDCProviderProcess(work / "idp").start(ca) as idp, \
                MCPServerProcess(work, stateless=True, name="lite") as lite:
            lite.start()
            (work / "mcp.yaml").write_text(textwrap.dedent(f"""\
                mcp:
                  servers: [{{name: lite, upstream: "{lite.upstream}", resource: "https://mcp.example.com/lite"}}]
                  authorization_servers: [{{issuer: "{idp.issuer}", ca_file: "{idp.ca_file}", groups_prefix: "oidc:"}}]
                  rules: [{{name: pods, action: allow, groups: ["oidc:agents"], tools: [get_pod]}}]
                """))
            front = MCPFrontProcess(work / "front", work / "mcp.yaml", {"lite": lite.upstream},
                                    {"mcp_audit_log": str(work / "audit.log")}).start()
            try:
                token = idp.token("agent", groups=["agents"], client_id="mcp-agent",
                                  extra_claims={"aud": "https://mcp.example.com/lite"})
                body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                   "params": {"name": "get_pod", "arguments": {"namespace": "dev", "name": "a"},
                                              "_meta": META}}).encode()
                headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                           "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "get_pod",
                           "Authorization": f"Bearer {token}"}
                bare_port = free_port()
                bare = subprocess.Popen([str(Path(sys.executable).with_name("mitmdump")), "-q", "--mode",
                                         f"reverse:{lite.upstream}@127.0.0.1:{bare_port}", "--set",
                                         f"confdir={work / 'bare'}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                try:
                    wait_for_port(bare_port, bare)
                    targets = {"direct to the MCP server": lite.port,
                               "bare mitmdump (reverse mode, no addon)": bare_port,
                               "through the MCP front": front.port("lite")}
                    rows = {name: float("inf") for name in targets}
                    for _ in range(3):  # interleaved rounds, the best kept: a busy machine moves every figure
                        for name, port in targets.items():
                            rows[name] = min(rows[name], _p50(port, body, headers, n))
                    return rows
                finally:
                    stop(bare)
            finally:
                front.stop()


def _p50(port: int, body: bytes, headers: dict, n: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for i in range(n + 20):
        start = time.perf_counter()
        conn.request("POST", "/mcp", body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        if i >= 20:
            times.append(time.perf_counter() - start)
    assert response.status == 200 and b"Running" in answer, answer
    conn.close()
    return statistics.median(times) * 1000


def main() -> None:
    for name, us in in_process().items():
        print(f"{name:<48} {us:8.1f} µs")
    if "--in-process" not in sys.argv:
        for name, ms in end_to_end().items():
            print(f"{name:<48} {ms:8.2f} ms (p50 round trip)")


if __name__ == "__main__":
    main()
