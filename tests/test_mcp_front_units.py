"""The MCP front's plain logic (jitgate/mcp, jitgate/policy/mcp.py), without processes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from jitgate.mcp import protocol
from jitgate.mcp.config import McpServer
from jitgate.mcp.messages import ServerMessages, ToolCatalog
from jitgate.mcp.protocol import ProtocolError, check_headers, parse_client_message
from jitgate.mcp.ratelimit import TokenBuckets, parse_rate
from jitgate.mcp.rules import (
    DEFAULT_ANNOTATIONS,
    Action,
    Annotations,
    Caller,
    ToolCall,
    decide,
    listing,
)
from jitgate.mcp.sse import EventSplitter, EventTooLarge, event_data, with_data
from jitgate.policy.document import PolicyError
from jitgate.policy.mcp import load_mcp_policy

REPO = Path(__file__).resolve().parents[1]
AGENT = Caller("agent@example.com", ("oidc:agents",))


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mcp.yaml"
    path.write_text(textwrap.dedent(text))
    return path


BASE = """\
    mcp:
      servers:
        - name: kube
          upstream: http://127.0.0.1:8000
          resource: https://mcp.example.com/kube
          trusted: true
      authorization_servers:
        - issuer: https://login.example.com
      rules:
        - name: read
          action: allow
          groups: ["oidc:agents"]
          annotations: {readOnlyHint: true}
        - name: dev-writes
          action: allow
          tools: [delete_pod, exec]
          arguments: {namespace: [dev, "dev-*"]}
        - name: no-rm
          action: deny
          tools: [exec]
          arguments: {command: 're:rm\\s+-rf'}
        - name: prod-deletes
          action: require-approval
          tools: [delete_pod]
          arguments: {namespace: "prod*"}
    """


@pytest.fixture
def config(tmp_path):
    return load_mcp_policy(policy_file(tmp_path, BASE))


def test_the_example_policy_parses():
    config = load_mcp_policy(REPO / "policies" / "mcp.example.yaml")
    assert [s.name for s in config.servers] == ["kube", "vendor-tools"]
    assert config.issuers[0].audiences == ("https://mcp.example.com/kube", "https://mcp.example.com/vendor")


def test_the_kubernetes_loader_skips_the_mcp_section(tmp_path):
    """policies/mcp.example.yaml may sit in a policy folder the Kubernetes gateway reads."""
    import shutil

    from jitgate.policy.loader import load_policy
    shutil.copy(REPO / "policies" / "mcp.example.yaml", tmp_path / "mcp.yaml")
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "clusters.yaml").write_text(textwrap.dedent("""\
        clusters:
          - {name: dev, endpoint: "https://api.dev.example", ca_file: ca.pem, credential: {token_file: ca.pem}}
        identity_providers:
          - {issuer: "https://login.example.com", client_ids: [jitgate]}
        """))
    assert [c.name for c in load_policy(tmp_path).clusters] == ["dev"]


@pytest.mark.parametrize("change, where", [
    (("action: allow", "action: permit", 1), "mcp.yaml:11: mcp.rules[0].action: unknown action 'permit'"),
    (("trusted: true", "trusted: yes please", 1), "mcp.yaml:6: mcp.servers[0].trusted: expected true or false"),
    (("re:rm\\s+-rf", "re:rm(", 1), "mcp.yaml:21: mcp.rules[2].arguments.command[0]: invalid regular expression"),
    (("upstream: http://127.0.0.1:8000", "upstream: ftp://x", 1), "mcp.yaml:4: mcp.servers[0].upstream:"),
    (("      rules:", "      rulez:", 1), "mcp.yaml:9: mcp.rulez: unknown field 'rulez'"),
    (("annotations: {readOnlyHint: true}", "annotations: {readonly: true}", 1),
     "mcp.yaml:13: mcp.rules[0].annotations.readonly: unknown field"),
])
def test_policy_errors_name_file_line_and_field(tmp_path, change, where):
    text = BASE.replace(*change)
    assert text != BASE
    with pytest.raises(PolicyError) as e:
        load_mcp_policy(policy_file(tmp_path, text))
    assert str(e.value).replace(f"{tmp_path}/", "").startswith(where), str(e.value)


def call(tool, arguments, annotations=DEFAULT_ANNOTATIONS, caller=AGENT):
    return ToolCall(caller, "kube", tool, arguments, annotations)


READ_ONLY = Annotations((("readOnlyHint", True), ("destructiveHint", False), ("idempotentHint", False),
                         ("openWorldHint", False)), True)


def test_rules(config):
    rules = config.rules
    assert decide(rules, call("get_pod", {}, READ_ONLY)).rule == "read"
    assert decide(rules, call("get_pod", {})).action is Action.DENY  # unknown annotations: destructive
    assert "not seen it in this server's tools/list" in decide(rules, call("get_pod", {}), trusted=True).message
    assert "not trusted" in decide(rules, call("get_pod", {})).message
    assert decide(rules, call("delete_pod", {"namespace": "dev-2"})).allowed
    assert decide(rules, call("delete_pod", {"namespace": "prod-eu"})).action is Action.REQUIRE_APPROVAL
    assert decide(rules, call("delete_pod", {"namespace": "staging"})).rule is None
    assert decide(rules, call("delete_pod", {"namespace": ["dev"]})).rule is None  # a list is its JSON text
    assert decide(rules, call("delete_pod", None)).rule is None  # the argument must be there
    denied = decide(rules, call("exec", {"namespace": "dev", "command": "x; rm -rf /"}))
    assert (denied.action, denied.rule) == (Action.DENY, "no-rm")  # deny wins over the allow
    assert decide(rules, call("exec", {"namespace": "dev", "command": ["sh", "-c", "rm  -rf /"]})).rule == "no-rm"


def test_listing(config):
    rules = config.rules
    assert listing(rules, AGENT, "kube", "get_pod", READ_ONLY).visible
    assert not listing(rules, AGENT, "kube", "get_pod", DEFAULT_ANNOTATIONS).visible
    assert listing(rules, AGENT, "kube", "delete_pod", DEFAULT_ANNOTATIONS) .visible  # some arguments are allowed
    assert not listing(rules, AGENT, "kube", "tidy", DEFAULT_ANNOTATIONS).visible


def test_tools_list_filtering_and_annotation_learning(config):
    server = config.servers[0]
    catalog = ToolCatalog()
    messages = ServerMessages(config.rules, catalog, config.detectors)
    payload = json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"tools": [
        {"name": "get_pod", "annotations": {"readOnlyHint": True}},
        {"name": "tidy", "annotations": {"readOnlyHint": False}},
        {"name": "delete_pod"}]}}).encode()
    out = messages.inspect(payload, server, AGENT, {})
    assert [t["name"] for t in json.loads(out.payload)["result"]["tools"]] == ["get_pod", "delete_pod"]
    assert out.hidden == ["tidy"] and out.method == "tools/list"
    assert catalog.annotations(server, "get_pod").get("readOnlyHint") is True
    untrusted = McpServer("x", "http://127.0.0.1:1", "https://x", trusted=False)
    catalog.learn(untrusted, [{"name": "get_pod", "annotations": {"readOnlyHint": True}}])
    assert catalog.annotations(untrusted, "get_pod") is DEFAULT_ANNOTATIONS


def test_masking_of_results(config):
    messages = ServerMessages(config.rules, ToolCatalog(), config.detectors)
    payload = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {
        "content": [{"type": "text", "text": "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"}],
        "structuredContent": {"db": {"password": "hunter2", "host": "db"}}}}).encode()
    out = json.loads(messages.inspect(payload, config.servers[0], AGENT, {}).payload)
    assert "AKIA" not in out["result"]["content"][0]["text"]
    assert out["result"]["structuredContent"] == {"db": {"password": "[masked:secret-name]", "host": "db"}}
    plain = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"fine"}]}}'
    assert messages.inspect(plain, config.servers[0], AGENT, {}).payload is plain  # untouched, not re-encoded


def test_strict_messages():
    with pytest.raises(ProtocolError) as e:
        parse_client_message(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]')
    assert e.value.code == protocol.INVALID_REQUEST
    with pytest.raises(ProtocolError):
        parse_client_message(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"a":1,"a":2}}}')
    with pytest.raises(ProtocolError) as e:
        parse_client_message(b"not json")
    assert e.value.code == protocol.PARSE_ERROR
    assert parse_client_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}').kind == "notification"


META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def modern(name="get_pod"):
    return parse_client_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                            "params": {"name": name, "_meta": META}}).encode())


def test_header_rules():
    ok = [("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"), ("Mcp-Name", "get_pod")]
    assert check_headers(modern(), ok) == "2026-07-28"
    assert check_headers(modern("ümlaut"), ok[:2] + [("Mcp-Name", "=?base64?w7xtbGF1dA==?=")]) == "2026-07-28"
    for bad in (ok[:2], ok[1:], [ok[0], ("Mcp-Method", "tools/list"), ok[2]], ok + [("mcp-method", "tools/call")]):
        with pytest.raises(ProtocolError) as e:
            check_headers(modern(), bad)
        assert (e.value.code, e.value.status) == (-32020, 400)
    legacy = parse_client_message(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}}')
    assert check_headers(legacy, [("MCP-Protocol-Version", "2025-11-25")]) == "legacy"
    with pytest.raises(ProtocolError):  # not required before 2026-07-28, but never contradicting the body
        check_headers(legacy, [("Mcp-Name", "b")])


@pytest.mark.parametrize("chunks", [
    [b"data: a\n\nid: 2\ndata: b\n\n"],
    [b"data: a\n", b"\n", b"id: 2\r\ndata: b\r", b"\n\r\n"],
    [b"data: a\r\r", b"id: 2\ndata: b\n\n"],
    [b"data", b": a\n\nid: 2\ndata: b", b"\n", b"\n"],
])
def test_sse_events_split_on_blank_lines(chunks):
    splitter = EventSplitter()
    events = [e for c in chunks for e in splitter.feed(c)]
    assert [event_data(e) for e in events] == [b"a", b"b"]
    assert splitter.rest() == b""
    assert with_data(events[1], b"c") == b"id: 2\ndata: c\n\n"


def test_sse_event_size_is_bounded():
    splitter = EventSplitter(max_event=1024)
    with pytest.raises(EventTooLarge):
        splitter.feed(b"data: " + b"x" * 2000)


def test_session_bindings():
    from jitgate.mcp.sessions import SessionBindings
    now = [0.0]
    sessions = SessionBindings(max_sessions=2, idle_timeout=10, now=lambda: now[0])
    sessions.bind("s1", "kube", "alice")
    assert sessions.allows("s1", "kube", "alice")
    assert not sessions.allows("s1", "kube", "bob") and not sessions.allows("s1", "lite", "alice")
    now[0] = 11
    assert not sessions.allows("s1", "kube", "alice")  # idle too long
    sessions.bind("s2", "kube", "alice")
    sessions.end("s2")
    assert not sessions.allows("s2", "kube", "alice")


def test_token_buckets():
    now = [0.0]
    buckets = TokenBuckets(parse_rate("60/m"), 2, now=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 1.0]
    assert buckets.take("b") == 0
    now[0] = 1.0
    assert buckets.take("a") == 0
    with pytest.raises(ValueError):
        parse_rate("fast")


# -- the addon's SSE stream, on a mitmproxy test flow -------------------------------------------------


def load_addon():
    import importlib.util
    spec = importlib.util.spec_from_file_location("mcp_gateway_under_test", REPO / "addons" / "mcp_gateway.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BrokenLog:
    def write(self, event):
        from jitgate.audit.log import AuditLogError
        raise AuditLogError("disk full")


def test_sse_stream_masks_each_event_and_fails_closed(config, tmp_path):
    from mitmproxy.test import taddons, tflow

    from jitgate.audit.log import AuditLog
    from jitgate.mcp.front import Exchange, Front

    addon = load_addon()
    secret = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"AKIAIOSFODNN7EXAMPLE"}]}}'
    with taddons.context():
        front = Front(config, AuditLog(tmp_path / "audit.log"))
        ex = Exchange(config.servers[0], "POST", "/mcp", caller=AGENT)
        stream = addon.SseStream(front, ex, tflow.tflow(resp=True), 200)
        out = b"".join(stream(b"event: message\nid: 4\ndata: " + secret[:30]) + stream(secret[30:] + b"\n\n: ping\n\n"))
        assert out.startswith(b"event: message\nid: 4\ndata: ") and b"AKIA" not in out and b": ping\n\n" in out
        assert [json.loads(line)["stage"] for line in (tmp_path / "audit.log").read_text().splitlines()] == ["response"]
        front.audit = BrokenLog()  # the next event cannot be recorded: it is withheld, and the stream ends
        withheld = b"".join(stream(b"data: " + secret + b"\n\n"))
        assert b"AKIA" not in withheld and b"could not be checked" in withheld
        assert stream(b"data: " + secret + b"\n\n") == [] and stream(b"") == []


def readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## MCP servers behind jitgate (the MCP front)")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_documents_every_option_and_its_example_parses(tmp_path):
    from mitmproxy.test import taddons

    addon = load_addon().McpFront()
    with taddons.context() as tctx:
        tctx.master.addons.add(addon)
        declared = {name for name in tctx.options.keys() if name.startswith("mcp_")}  # noqa: SIM118 - Options is no dict
    section = readme_section()
    assert declared and all(f"| `{name}` |" in section for name in declared), declared
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load_mcp_policy(policy_file(tmp_path, example))
    assert [r.name for r in config.rules][-1] == "prod-deletes-need-a-human"
