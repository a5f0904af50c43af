"""The MCP front end to end: a real MCP server (the Python SDK's MCPServer over Streamable HTTP, its own
process), the real front (`mitmdump -s addons/mcp_gateway.py`), tokens from the real OIDC provider, the
SDK's client as the agent, and raw HTTP for what a well-behaved client never sends.

Two servers: `kube` keeps sessions and answers over SSE (revisions 2025-03-26..2025-11-25 with
initialize, plus 2026-07-28), trusted by the policy; `lite` is stateless with JSON answers and not
trusted (its tools' annotations do not count).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import textwrap
import time
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from testkit.mcp_server import (
    FAKE_AWS_KEY_ID,
    FAKE_AWS_SECRET,
    MCPFrontProcess,
    MCPServerProcess,
)

KUBE = "https://mcp.jitgate.test/kube"
LITE = "https://mcp.jitgate.test/lite"
FRONT_TOKEN = "the-fronts-own-token-for-kube"
ORIGIN = "https://chat.jitgate.test"
MODERN = "2026-07-28"

RULES = """\
    rules:
      - name: agents-read
        action: allow
        groups: ["oidc:agents"]
        servers: [kube]
        annotations: {readOnlyHint: true}
      - name: lite-get-pod
        action: allow
        groups: ["oidc:agents"]
        servers: [lite]
        tools: [get_pod]
      - name: agents-dev-writes
        action: allow
        groups: ["oidc:agents"]
        tools: [delete_pod, exec]
        arguments: {namespace: [dev]}
      - name: no-recursive-deletes
        action: deny
        tools: [exec]
        arguments: {command: 're:rm\\s+-rf'}
        message: recursive deletes are never run through an agent
      - name: prod-deletes-need-a-human
        action: require-approval
        tools: [delete_pod]
        arguments: {namespace: "prod*"}
"""


def write_policy(folder: Path, idp, kube: MCPServerProcess, lite: MCPServerProcess | None = None,
                 rules: str = RULES) -> Path:
    """The front's policy: `kube` (trusted, the front's own token) and, when given, `lite`."""
    (folder / "kube-token").write_text(FRONT_TOKEN + "\n")
    policy = folder / "mcp.yaml"
    lite_server = "" if lite is None else (f"    - name: lite\n      upstream: {lite.upstream}\n"
                                           f"      resource: {LITE}\n      scopes: [mcp.tools]\n")
    policy.write_text(textwrap.dedent(f"""\
        mcp:
          servers:
            - name: kube
              upstream: {kube.upstream}
              resource: {KUBE}
              trusted: true
              upstream_token_file: kube-token
        """) + lite_server + textwrap.indent(textwrap.dedent(f"""\
          authorization_servers:
            - issuer: {idp.issuer}
              ca_file: {idp.ca_file}
              username_claim: email
              groups_claim: groups
              groups_prefix: "oidc:"
          allowed_origins: [{ORIGIN}]
        """) + textwrap.dedent(rules), "  "))
    return policy


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mcp-servers")
    kube = MCPServerProcess(folder, stateless=False, name="kube").start()
    lite = MCPServerProcess(folder, stateless=True, name="lite").start()
    yield kube, lite
    kube.stop()
    lite.stop()


@pytest.fixture(scope="module")
def front(servers, idp, tmp_path_factory):
    kube, lite = servers
    work = tmp_path_factory.mktemp("mcp-front")
    policy = write_policy(work, idp, kube, lite)
    process = MCPFrontProcess(work, policy, {"kube": kube.upstream, "lite": lite.upstream}).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def strict_front(servers, idp, tmp_path_factory):
    """A second front: a tight rate limit, and an audit log the test can break."""
    kube, lite = servers
    work = tmp_path_factory.mktemp("mcp-front-strict")
    policy = write_policy(work, idp, kube, lite)
    process = MCPFrontProcess(work, policy, {"kube": kube.upstream, "lite": lite.upstream},
                              {"mcp_rate_limit": "6/m", "mcp_rate_burst": "5",
                               "save_stream_file": str(work / "flows.mitm")}).start()
    yield process
    process.stop()


def token_for(idp, resource: str, sub: str = "agent-7", groups: tuple[str, ...] = ("agents",),
              scope: str | None = "mcp.tools") -> str:
    """A real ID token whose audience is the MCP server's resource (as an IdP honouring RFC 8707's
    resource indicator issues it; the provider's user claims set `aud` and `scope`). `lite` requires
    the scope `mcp.tools`."""
    claims = {"aud": resource} | ({"scope": scope} if scope else {})
    return idp.token(sub, email=f"{sub}@example.com", groups=list(groups), client_id="mcp-agent",
                     extra_claims=claims)


@pytest.fixture(scope="module")
def agent_token(idp, front):
    tokens = {"kube": token_for(idp, KUBE), "lite": token_for(idp, LITE)}
    # The front learns a trusted server's annotations from its tools/list (as an agent lists first);
    # until then every tool counts as destructive.
    list_tools = {"jsonrpc": "2.0", "id": 0, "method": "tools/list",
                  "params": {"_meta": modern_call("x", {})["params"]["_meta"]}}
    status, _, _ = post(front, "kube", list_tools, modern_headers(tokens["kube"], method="tools/list"))
    assert status == 200
    return tokens


# -- helpers ----------------------------------------------------------------------------------------


def post(front: MCPFrontProcess, server: str, body: dict | bytes, headers: dict | None = None,
         method: str = "POST", path: str = "/mcp") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", front.port(server), timeout=15)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        conn.request(method, path, body=data if method == "POST" else None, headers={**base, **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def modern_call(tool: str, arguments: dict, request_id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments,
                       "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                                 "io.modelcontextprotocol/clientCapabilities": {}}}}


def modern_headers(token: str, method: str = "tools/call", name: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}", "MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def rpc(body: bytes) -> dict:
    text = body.decode()
    if text.startswith(("event:", "data:", "id:")) or "\ndata:" in text:
        datas = [line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]
        return json.loads(datas[-1])
    return json.loads(text)


def agent(front: MCPFrontProcess, server: str, token: str, mode: str = "legacy", **headers: str) -> Client:
    http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {token}", **headers})
    return Client(streamable_http_client(front.url(server), http_client=http_client), mode=mode)


def run(coro):
    return asyncio.run(coro)


def calls_reaching(server: MCPServerProcess) -> int:
    return len(server.recorded())


# -- stage 1: the front as an OAuth protected resource --------------------------------------------------


def test_resource_metadata_names_the_resource_and_the_trusted_issuers(front, idp):
    for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/kube"):
        status, _, body = post(front, "kube", b"", method="GET", path=path)
        assert status == 200, body
        assert json.loads(body) == {"resource": KUBE, "authorization_servers": [idp.issuer],
                                    "bearer_methods_supported": ["header"],
                                    "resource_name": "MCP server kube (through jitgate)"}


def test_no_token_is_401_with_the_resource_metadata(front, servers):
    kube, _ = servers
    before = calls_reaching(kube)
    status, headers, _ = post(front, "kube", modern_call("get_pod", {"namespace": "dev", "name": "a"}),
                              {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "get_pod"})
    assert status == 401
    assert headers["www-authenticate"] == \
        'Bearer resource_metadata="https://mcp.jitgate.test/.well-known/oauth-protected-resource/kube"'
    assert calls_reaching(kube) == before  # nothing was forwarded


@pytest.mark.parametrize("case", ["wrong-audience", "other-server", "garbage", "basic"])
def test_bad_tokens_are_401_invalid_token(front, servers, idp, agent_token, case):
    kube, _ = servers
    token = {"wrong-audience": lambda: idp.token("agent-7", email="agent-7@example.com", groups=["agents"],
                                                 client_id="jitgate"),
             "other-server": lambda: agent_token["lite"],  # a token for another resource is not replayable here
             "garbage": lambda: "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln",
             "basic": lambda: None}[case]()
    auth = "Basic YWdlbnQ6cGFzcw==" if token is None else f"Bearer {token}"
    before = calls_reaching(kube)
    status, headers, body = post(front, "kube", modern_call("get_pod", {"namespace": "dev", "name": "a"}),
                                 {**modern_headers("x", name="get_pod"), "Authorization": auth})
    assert status == 401, body
    challenge = headers["www-authenticate"]
    assert challenge.startswith('Bearer resource_metadata="https://mcp.jitgate.test/.well-known/')
    assert 'error="invalid_token"' in challenge
    if case in ("wrong-audience", "other-server"):
        assert "audience" in challenge
    assert calls_reaching(kube) == before


def test_missing_scope_is_403_insufficient_scope(front, servers, idp):
    _, lite = servers
    token = token_for(idp, LITE, sub="narrow", scope="profile")
    before = calls_reaching(lite)
    status, headers, body = post(front, "lite", modern_call("get_pod", {"namespace": "dev", "name": "a"}),
                                 modern_headers(token, name="get_pod"))
    assert status == 403, body
    assert headers["www-authenticate"] == (
        'Bearer resource_metadata="https://mcp.jitgate.test/.well-known/oauth-protected-resource/lite", '
        'scope="mcp.tools", error="insufficient_scope", '
        'error_description="jitgate: the token lacks the scope(s) mcp.tools; ask for a token with them"')
    assert calls_reaching(lite) == before
    status, _, body = post(front, "lite", b"", method="GET", path="/.well-known/oauth-protected-resource/lite")
    assert json.loads(body)["scopes_supported"] == ["mcp.tools"]
    status, headers, _ = post(front, "lite", b"", {})  # no token: the challenge names the scope to ask for
    assert status == 401 and 'scope="mcp.tools"' in headers["www-authenticate"]


def test_origin_allow_list(front, servers, agent_token):
    kube, _ = servers
    body = modern_call("get_pod", {"namespace": "dev", "name": "a"})
    headers = modern_headers(agent_token["kube"], name="get_pod")
    before = calls_reaching(kube)
    status, _, answer = post(front, "kube", body, {**headers, "Origin": "http://evil.example:8080"})
    assert status == 403 and "origin" in rpc(answer)["error"]["message"]
    assert calls_reaching(kube) == before
    status, _, answer = post(front, "kube", body, {**headers, "Origin": ORIGIN})
    assert status == 200 and rpc(answer)["result"]["content"][0]["text"] == "pod dev/a: Running"
    status, _, answer = post(front, "kube", body, headers)  # no Origin: an agent, not a browser
    assert status == 200


def test_callers_token_never_reaches_the_server(front, servers, agent_token):
    kube, lite = servers

    async def session():
        async with agent(front, "kube", agent_token["kube"]) as client:
            await client.call_tool("get_pod", {"namespace": "dev", "name": "web"})
        async with agent(front, "lite", agent_token["lite"], mode=MODERN) as client:
            await client.call_tool("get_pod", {"namespace": "dev", "name": "web"})
    run(session())
    for server, expected in ((kube, [f"Bearer {FRONT_TOKEN}"]), (lite, None)):
        recorded = server.recorded()
        assert recorded
        for request in recorded:
            assert request["headers"].get("authorization") == expected, request
            assert not any(agent_token[n] in json.dumps(request) for n in agent_token)


# -- stage 2: tools/call under the policy -----------------------------------------------------------


def test_sdk_agent_allowed_denied_and_approval(front, servers, agent_token):
    async def session():
        async with agent(front, "kube", agent_token["kube"]) as client:
            got = await client.call_tool("get_pod", {"namespace": "prod", "name": "api"})
            assert got.content[0].text == "pod prod/api: Running"
            got = await client.call_tool("delete_pod", {"namespace": "dev", "name": "web"})
            assert got.content[0].text == "pod dev/web deleted"
            with pytest.raises(MCPError) as denied:
                await client.call_tool("exec", {"namespace": "dev", "pod": "web", "command": "rm -rf /data"})
            assert denied.value.code == -32010
            assert "rule 'no-recursive-deletes' denies tool 'exec'" in denied.value.message
            assert "recursive deletes are never run through an agent" in denied.value.message
            assert denied.value.data["rule"] == "no-recursive-deletes"
            with pytest.raises(MCPError) as held:
                await client.call_tool("delete_pod", {"namespace": "prod", "name": "api"})
            assert held.value.code == -32011 and "needs a human's approval" in held.value.message
            with pytest.raises(MCPError) as nothing:
                await client.call_tool("delete_pod", {"namespace": "staging", "name": "api"})
            assert nothing.value.code == -32010 and "no rule allows agent-7@example.com" in nothing.value.message
    run(session())


def test_denied_calls_never_reach_the_server(front, servers, agent_token):
    kube, _ = servers
    before = calls_reaching(kube)
    status, _, answer = post(front, "kube", modern_call("exec", {"namespace": "dev", "pod": "w", "command": "rm -rf /"}),
                             modern_headers(agent_token["kube"], name="exec"))
    assert status == 200 and rpc(answer)["error"]["code"] == -32010
    assert calls_reaching(kube) == before


def test_untrusted_servers_annotations_do_not_count(front, servers, agent_token):
    """`tidy_cache` claims readOnlyHint: on the trusted server the read rule admits it; on the untrusted one
    it counts as destructive, and no rule allows it."""
    body = modern_call("tidy_cache", {"namespace": "dev"})
    status, _, answer = post(front, "kube", body, modern_headers(agent_token["kube"], name="tidy_cache"))
    assert status == 200 and "result" in rpc(answer)
    status, _, answer = post(front, "lite", body, modern_headers(agent_token["lite"], name="tidy_cache"))
    error = rpc(answer)["error"]
    assert error["code"] == -32010 and "its annotations are not trusted" in error["message"]


# -- stage 3: tools/list filtered ---------------------------------------------------------------------


def test_tools_list_is_filtered_over_sse_and_json(front, agent_token):
    async def names(server: str, mode: str) -> dict[str, dict | None]:
        async with agent(front, server, agent_token[server], mode=mode) as client:
            return {t.name: t.meta for t in (await client.list_tools()).tools}
    kube = run(names("kube", "legacy"))  # SSE answers
    # read-only tools (trusted hints), the argument-bound writes; tidy_cache claims read-only and is believed here
    assert set(kube) == {"get_pod", "get_credentials", "slow_count", "tidy_cache", "delete_pod", "exec"}
    lite = run(names("lite", MODERN))  # JSON answers
    assert set(lite) == {"get_pod", "delete_pod", "exec"}


# -- stage 4: both protocol generations -------------------------------------------------------------


@pytest.mark.parametrize("headers, why", [
    ({"Mcp-Method": "tools/list"}, "Mcp-Method"),
    ({"Mcp-Name": "get_pod"}, "Mcp-Name"),
    ({"MCP-Protocol-Version": "2025-11-25"}, "MCP-Protocol-Version"),
])
def test_routing_headers_must_match_the_body(front, servers, agent_token, headers, why):
    kube, _ = servers
    before = calls_reaching(kube)
    status, _, answer = post(front, "kube", modern_call("delete_pod", {"namespace": "dev", "name": "web"}),
                             {**modern_headers(agent_token["kube"], name="delete_pod"), **headers})
    assert status == 400
    error = rpc(answer)["error"]
    assert error["code"] == -32020 and why in error["message"]
    assert rpc(answer)["id"] == 1
    assert calls_reaching(kube) == before


def test_strict_json_rpc(front, agent_token):
    auth = {"Authorization": f"Bearer {agent_token['lite']}"}
    batch = [modern_call("get_pod", {"namespace": "dev", "name": "a"})]
    status, _, answer = post(front, "lite", batch, auth)
    assert status == 400 and rpc(answer)["error"]["code"] == -32600
    # a parser that keeps the first "name" would run delete_pod while the policy judged get_pod (or back)
    duplicated = (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_pod","name":"delete_pod",'
                  b'"arguments":{"namespace":"prod","name":"a"}}}')
    status, _, answer = post(front, "lite", duplicated, auth)
    assert status == 400 and "repeats the key 'name'" in rpc(answer)["error"]["message"]


def test_legacy_session_id_get_stream_and_delete_pass(front, servers, agent_token):
    kube, _ = servers
    start = len(kube.recorded())

    async def session():
        async with agent(front, "kube", agent_token["kube"]) as client:
            await client.call_tool("get_pod", {"namespace": "dev", "name": "web"})
            await asyncio.sleep(0.3)  # the SDK opens its GET stream after initialized
    run(session())
    recorded = kube.recorded()[start:]
    methods = [r["method"] for r in recorded]
    assert methods[0] == "POST" and "GET" in methods and methods[-1] == "DELETE"
    session_ids = {r["headers"].get("mcp-session-id", [None])[0] for r in recorded[1:]}
    assert len(session_ids) == 1 and None not in session_ids


def test_sse_events_stream_one_by_one(front, agent_token):
    """Progress notifications arrive while the tool still runs: the SSE body is not buffered."""
    seen: list[float] = []

    async def progress(value, total, message):
        seen.append(time.monotonic())

    async def session():
        async with agent(front, "kube", agent_token["kube"]) as client:
            result = await client.call_tool("slow_count", {"n": 3, "delay": 0.6}, progress_callback=progress)
            return time.monotonic(), result
    done, result = run(session())
    assert len(seen) == 3
    assert done - seen[0] >= 1.0  # the first event came >= 2 delays before the answer
    assert FAKE_AWS_SECRET not in result.content[0].text  # the last event was masked on the way


# -- stage 5: masking, audit, rate limit ----------------------------------------------------------------


@pytest.mark.parametrize("server, mode", [("kube", "legacy"), ("kube", MODERN)])
def test_secrets_in_tool_results_are_masked(front, agent_token, server, mode):
    async def session():
        async with agent(front, server, agent_token[server], mode=mode) as client:
            return await client.call_tool("get_credentials", {})
    result = run(session())
    text = result.content[0].text
    assert FAKE_AWS_SECRET not in text and FAKE_AWS_KEY_ID not in text
    assert "[masked:aws-secret-access-key]" in text and "[masked:aws-access-key-id]" in text
    structured = result.structured_content
    assert structured["profile"] == "default"
    assert FAKE_AWS_SECRET not in json.dumps(structured) and FAKE_AWS_KEY_ID not in json.dumps(structured)


def test_every_message_is_audited(front, agent_token):
    marker = f"audit-{time.monotonic_ns()}"

    async def session():
        async with agent(front, "lite", agent_token["lite"], mode=MODERN) as client:
            await client.call_tool("get_pod", {"namespace": "dev", "name": marker})
            with pytest.raises(MCPError):
                await client.call_tool("exec", {"namespace": "dev", "pod": marker,
                                                "command": "rm -rf / --password=hunter2hunter2"})
    run(session())
    events = [e for e in front.audit_events() if marker in json.dumps(e)]
    allowed = next(e for e in events if e["message"].get("method") == "tools/call" and e["decision"] == "allow")
    assert allowed["caller"] == {"username": "agent-7@example.com", "groups": ["oidc:agents"]}
    assert allowed["tool"] == "get_pod" and allowed["rule"] == "lite-get-pod" and allowed["server"] == "lite"
    answer = next(e for e in front.audit_events() if e["auditID"] == allowed["auditID"] and e["stage"] == "response")
    assert answer["durationMs"] > 0 and answer["tool"] == "get_pod"
    denied = next(e for e in events if e["decision"] == "deny")
    assert denied["rule"] == "no-recursive-deletes" and denied["http"]["status"] == 200
    assert "hunter2hunter2" not in json.dumps(denied) and "[masked:secret-pair]" in denied["arguments"]["command"]
    # every message: the agent's tools/list (the SDK lists after a call) and the server's answers too
    methods = {(e["stage"], e["message"].get("method")) for e in front.audit_events()}
    assert {("request", "tools/list"), ("response", "tools/list"), ("request", "tools/call"),
            ("response", "tools/call")} <= methods


def test_rate_limit_per_identity(strict_front, idp):
    flood, calm = token_for(idp, LITE, sub="flood"), token_for(idp, LITE, sub="calm")
    body = modern_call("get_pod", {"namespace": "dev", "name": "a"})
    statuses = [post(strict_front, "lite", body, modern_headers(flood, name="get_pod"))[0] for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    status, headers, answer = post(strict_front, "lite", body, modern_headers(flood, name="get_pod"))
    assert status == 429 and int(headers["retry-after"]) >= 1
    error = rpc(answer)["error"]
    assert error["code"] == -32012 and "too many messages from flood@example.com" in error["message"]
    assert rpc(answer)["id"] == 1
    assert post(strict_front, "lite", body, modern_headers(calm, name="get_pod"))[0] == 200  # per identity


def test_audit_log_that_cannot_be_written_refuses(strict_front, servers, idp):
    """Fail closed: the call is refused (503) before anything reaches the server."""
    _, lite = servers
    token = token_for(idp, LITE, sub="audited")
    body = modern_call("get_pod", {"namespace": "dev", "name": "a"})
    assert post(strict_front, "lite", body, modern_headers(token, name="get_pod"))[0] == 200
    path = strict_front.audit_path
    path.rename(path.with_suffix(".rotated"))
    path.mkdir()  # the log reopens after rotation, and cannot: a directory is in its place
    try:
        before = calls_reaching(lite)
        status, _, answer = post(strict_front, "lite", body, modern_headers(token, name="get_pod"))
        assert status == 503 and "audit log cannot be written" in rpc(answer)["error"]["message"]
        assert calls_reaching(lite) == before
    finally:
        path.rmdir()
    assert post(strict_front, "lite", body, modern_headers(token, name="get_pod"))[0] == 200


def initialize(front: MCPFrontProcess, token: str) -> str:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    status, headers, answer = post(front, "kube", body, {"Authorization": f"Bearer {token}"})
    assert status == 200 and "result" in rpc(answer), answer
    return headers["mcp-session-id"]


def open_get(front: MCPFrontProcess, headers: dict) -> tuple[int, dict[str, str]]:
    """A GET stream's head only (the stream itself stays open)."""
    conn = http.client.HTTPConnection("127.0.0.1", front.port("kube"), timeout=10)
    try:
        conn.request("GET", "/mcp", headers={"Accept": "text/event-stream", **headers})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def test_get_stream_resumption_headers_pass_and_are_audited(front, servers, agent_token):
    """A GET (the standalone stream, or resuming one with Last-Event-ID) goes through with its session and
    resumption headers, without the caller's token; its end is audited."""
    kube, _ = servers
    session = initialize(front, agent_token["kube"])
    auth = {"Authorization": f"Bearer {agent_token['kube']}", "Mcp-Session-Id": session,
            "MCP-Protocol-Version": "2025-11-25"}
    start = len(kube.recorded())
    status, headers = open_get(front, auth)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    # Resuming: this server keeps no event store, so it answers as it can (a 500); what counts is what it got.
    open_get(front, {**auth, "Last-Event-ID": "42"})
    opened, resumed = kube.recorded()[start:]
    assert opened["method"] == resumed["method"] == "GET" and resumed["headers"]["last-event-id"] == ["42"]
    for got in (opened, resumed):
        assert got["headers"]["mcp-session-id"] == [session]
        assert got["headers"]["authorization"] == [f"Bearer {FRONT_TOKEN}"]
    for _ in range(50):  # the stream's end is written once the front sees the client go
        ends = [e for e in front.audit_events() if e.get("sessionId") == session and e["http"]["method"] == "GET"]
        if ends:
            break
        time.sleep(0.1)
    assert ends and ends[-1]["stage"] == "end"


def test_sessions_are_bound_to_their_caller(front, servers, idp, agent_token):
    """The server sees only the front, so it cannot tell callers apart: the front refuses a session id that
    another caller opened (or that it never saw opened), before anything reaches the server."""
    kube, _ = servers
    session = initialize(front, agent_token["kube"])
    other = token_for(idp, KUBE, sub="agent-8")
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "get_pod", "arguments": {"namespace": "dev", "name": "a"}}}
    before = calls_reaching(kube)
    for token, sid in ((other, session), (agent_token["kube"], "a-session-nobody-opened")):
        status, _, answer = post(front, "kube", call, {"Authorization": f"Bearer {token}", "Mcp-Session-Id": sid,
                                                       "MCP-Protocol-Version": "2025-11-25"})
        assert status == 404 and "start a new session" in rpc(answer)["error"]["message"]
        assert rpc(answer)["id"] == 2
    assert calls_reaching(kube) == before
    status, _, _ = post(front, "kube", b"", {"Authorization": f"Bearer {agent_token['kube']}",
                                             "Mcp-Session-Id": session}, method="DELETE")
    assert status == 200
    status, _, _ = post(front, "kube", call, {"Authorization": f"Bearer {agent_token['kube']}",
                                              "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"})
    assert status == 404  # ended


@pytest.mark.parametrize("server", ["kube", "lite"])
def test_sdk_default_mode_negotiates_through_the_front(front, agent_token, server):
    """The SDK's default `auto` mode probes server/discover and falls back to initialize where needed."""
    async def session():
        async with agent(front, server, agent_token[server], mode="auto") as client:
            names = {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool("get_pod", {"namespace": "dev", "name": "web"})
            return client.protocol_version, names, result
    version, names, result = run(session())
    assert version and "get_pod" in names and result.content[0].text == "pod dev/web: Running"


def test_flow_files_hold_no_credentials(strict_front, idp):
    """`-w` keeps every flow: neither the caller's token nor the front's own credential is in it."""
    token = token_for(idp, KUBE, sub="recorded")
    status, _, _ = post(strict_front, "kube", modern_call("get_pod", {"namespace": "dev", "name": "a"}),
                        modern_headers(token, name="get_pod"))
    assert status == 200  # get_pod is unknown to this front's catalog: denied (-32010), still a flow
    flows = (strict_front.workdir / "flows.mitm")
    for _ in range(50):
        if flows.exists() and b"recorded" in flows.read_bytes():
            break
        time.sleep(0.1)
    data = flows.read_bytes()
    assert b"agent-7" in data or b"recorded" in data  # the file has the flows
    assert token.encode() not in data and FRONT_TOKEN.encode() not in data


def test_unreadable_upstream_credential_refuses(strict_front, servers, idp):
    kube, _ = servers
    token = token_for(idp, KUBE, sub="credless")
    list_tools = {"jsonrpc": "2.0", "id": 5, "method": "tools/list",
                  "params": {"_meta": modern_call("x", {})["params"]["_meta"]}}
    token_file = strict_front.workdir / "kube-token"
    token_file.rename(token_file.with_suffix(".away"))
    try:
        before = calls_reaching(kube)
        status, _, answer = post(strict_front, "kube", list_tools, modern_headers(token, method="tools/list"))
        assert status == 503 and "no credential for MCP server kube" in rpc(answer)["error"]["message"]
        assert calls_reaching(kube) == before
    finally:
        token_file.with_suffix(".away").rename(token_file)
    ends = [e for e in strict_front.audit_events() if e["caller"] and e["caller"]["username"] == "credless@example.com"]
    assert ends[-1]["stage"] == "end" and ends[-1]["decision"] == "deny" and ends[-1]["http"]["status"] == 503
    assert post(strict_front, "kube", list_tools, modern_headers(token, method="tools/list"))[0] == 200
