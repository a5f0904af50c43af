"""The MCP front's exchanges in the session recordings (`mcp_recordings`): the real front before the real
MCP server (SSE answers, the front's own upstream token), tokens from the real OIDC provider.

One front, one round of calls (module scope): a tools/list, an allowed tools/call, a denied one whose
arguments hold secrets, one whose result holds a (fake) AWS secret key, a call without a token and one
with a token for another resource. Then the recordings folder is read as an operator would: the index
(`jitgate sessions --dir`), flows.mitm with mitmproxy's FlowReader, session.har as JSON, and every byte
of it searched for the secrets and tokens.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from jitgate.recording.index import Index
from testkit.mcp_server import (
    FAKE_AWS_KEY_ID,
    FAKE_AWS_SECRET,
    MCPFrontProcess,
    MCPServerProcess,
)
from tests.test_mcp_front import (
    FRONT_TOKEN,
    KUBE,
    MODERN,
    modern_call,
    modern_headers,
    post,
    rpc,
    token_for,
    write_policy,
)

ARGUMENT_SECRET = "hunter2-canary-password-value"
USER = "agent-7@example.com"
RULES = """\
    rules:
      - name: agents-read
        action: allow
        groups: ["oidc:agents"]
        servers: [kube]
        annotations: {readOnlyHint: true}
      - name: no-recursive-deletes
        action: deny
        tools: [exec]
        arguments: {command: 're:rm\\s+-rf'}
        message: recursive deletes are never run through an agent
"""


@pytest.fixture(scope="module")
def recorded(idp, tmp_path_factory):
    """The front, the calls made through it, and where it recorded them."""
    work = tmp_path_factory.mktemp("mcp-front-recording")
    kube = MCPServerProcess(work, stateless=False, name="kube").start()
    root = work / "recordings"
    front = MCPFrontProcess(work, write_policy(work, idp, kube, rules=RULES), {"kube": kube.upstream},
                            {"mcp_recordings": str(root)})
    try:
        front.start()
        token = token_for(idp, KUBE)
        other = token_for(idp, "https://other.jitgate.test/mcp")  # valid, for another resource: 401
        meta = modern_call("x", {})["params"]["_meta"]
        answers = {}
        answers["list"] = post(front, "kube", {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}},
                               modern_headers(token, method="tools/list"))
        answers["allowed"] = post(front, "kube", modern_call("get_pod", {"namespace": "dev", "name": "web"}, 2),
                                  modern_headers(token, name="get_pod"))
        answers["denied"] = post(front, "kube", modern_call("exec", {
            "namespace": "dev", "pod": "web", "command": f"rm -rf /data; echo {FAKE_AWS_KEY_ID}",
            "password": ARGUMENT_SECRET}, 3), modern_headers(token, name="exec"))
        answers["canary"] = post(front, "kube", modern_call("get_credentials", {"profile": "prod"}, 4),
                                 modern_headers(token, name="get_credentials"))
        answers["anonymous"] = post(front, "kube", modern_call("get_pod", {"namespace": "dev", "name": "a"}, 5),
                                    {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "get_pod"})
        answers["other"] = post(front, "kube", modern_call("get_pod", {"namespace": "dev", "name": "b"}, 6),
                                modern_headers(other, name="get_pod"))
        # SSE answers are recorded when the stream has ended, just after the caller read its last byte.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _call_count(root) < 6:
            time.sleep(0.05)
        yield {"root": root, "answers": answers, "tokens": (token, other), "front": front}
    finally:
        front.stop()
        kube.stop()


def _call_count(root: Path) -> int:
    if not (root / "index.db").exists():
        return 0
    index = Index(root / "index.db")
    try:
        return sum(s.calls for s in index.sessions())
    finally:
        index.close()


def _sessions(root: Path) -> dict[str, tuple]:
    assert (root / "index.db").exists(), "nothing was recorded"
    index = Index(root / "index.db")
    try:
        return {s.user or "anonymous": (s, index.calls(s.id)) for s in index.sessions()}
    finally:
        index.close()


def _flows(folder: Path) -> list:
    from mitmproxy import io

    with open(folder / "flows.mitm", "rb") as f:
        return list(io.FlowReader(f).stream())


def test_the_calls_are_in_the_callers_session_of_the_hour(recorded):
    answers = recorded["answers"]
    assert answers["allowed"][0] == 200 and "Running" in rpc(answers["allowed"][2])["result"]["content"][0]["text"]
    assert rpc(answers["denied"][2])["error"]["code"] == -32010
    assert answers["anonymous"][0] == 401 and answers["other"][0] == 401
    sessions = _sessions(recorded["root"])
    session, calls = sessions[USER]
    assert session.kind == "hour" and session.id.startswith("agent-7-example-com-") and session.cluster == "mcp:kube"
    assert [(c["verb"], c["resource"], c["name"], c["decision"], c["code"]) for c in calls] == [
        ("tools/list", "tools", "", "allow", 200),
        ("tools/call", "tools", "get_pod", "allow", 200),
        ("tools/call", "tools", "exec", "deny", 200),
        ("tools/call", "tools", "get_credentials", "allow", 200),
    ]
    assert calls[2]["rule"] == "no-recursive-deletes" and calls[1]["rule"] == "agents-read"
    assert session.denied == 1
    assert all(c["api_group"] == "mcp.jitgate.dev" and c["path"] == "/mcp" for c in calls)
    # Refusals before an identity is known: the anonymous session of the hour, as on the Kubernetes side.
    anonymous, refused = sessions["anonymous"]
    assert anonymous.kind == "anonymous" and anonymous.id.startswith("anonymous-")
    assert [(c["code"], c["decision"]) for c in refused] == [(401, "deny"), (401, "deny")]
    assert "invalid token" in refused[1]["reason"]


def test_flows_open_in_mitmproxy_with_the_fronts_record_and_the_har_parses(recorded):
    root = recorded["root"]
    session, calls = _sessions(root)[USER]
    flows = _flows(root / session.id)
    records = [f.metadata["jitgate-mcp"] for f in flows]
    assert [(r["method"], r["tool"], r["decision"]) for r in records] == [
        ("tools/list", None, "allow"), ("tools/call", "get_pod", "allow"), ("tools/call", "exec", "deny"),
        ("tools/call", "get_credentials", "allow")]
    assert [r["auditID"] for r in records] == [c["audit_id"] for c in calls]
    assert all(r["caller"]["username"] == USER and r["session"] == session.id for r in records)
    assert flows[2].marked and "deny" in flows[2].comment and "exec" in flows[2].comment
    # The answers as the caller got them (SSE bodies kept), the secret in the result masked.
    assert b"pod dev/web: Running" in flows[1].response.content
    canary = flows[3].response.content
    assert b"[masked:" in canary and FAKE_AWS_SECRET.encode() not in canary
    assert canary == recorded["answers"]["canary"][2]
    # The request's arguments masked (it was refused; an allowed one was forwarded as sent).
    arguments = json.loads(flows[2].request.content)["params"]["arguments"]
    assert arguments["password"] == "[masked:secret-name]" and FAKE_AWS_KEY_ID not in arguments["command"]
    assert arguments["namespace"] == "dev"
    # Credentials: the marker where the front's token (or the caller's) was.
    for flow in flows[1:]:
        assert flow.request.headers.get("authorization") in (None, "jitgate:removed")
    assert _flows(root / _sessions(root)["anonymous"][0].id)[1].request.headers["authorization"] == "jitgate:removed"
    har = json.loads((root / session.id / "session.har").read_text())
    entries = har["log"]["entries"]
    assert [e["_jitgate"]["mcp"]["tool"] for e in entries] == [None, "get_pod", "exec", "get_credentials"]
    assert [e["_jitgate"]["decision"] for e in entries] == ["allow", "allow", "deny", "allow"]


def test_no_secret_or_token_in_any_recorded_byte(recorded):
    root = recorded["root"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"index.db", "flows.mitm", "session.har", "session.json"}
    assert sum(1 for p in files if p.name == "flows.mitm") == 2  # the caller's session and the anonymous one
    data = b"".join(p.read_bytes() for p in files)
    caller, other = recorded["tokens"]
    for secret in (FAKE_AWS_SECRET, FAKE_AWS_KEY_ID, ARGUMENT_SECRET, caller, other, FRONT_TOKEN):
        value = secret.encode()
        for form in (value, base64.b64encode(value), base64.urlsafe_b64encode(value).rstrip(b"=")):
            assert form not in data, secret
    assert b"jitgate:removed" in data


def test_the_sessions_cli_reads_the_fronts_folder(recorded):
    import subprocess
    import sys

    root = recorded["root"]
    session, _ = _sessions(root)[USER]
    out = subprocess.run([sys.executable, "-m", "jitgate.cli.main", "sessions", "--dir", str(root), "show", session.id],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert "get_credentials" in out.stdout and "tools/call" in out.stdout


def _addon_module():
    import importlib.util
    import sys

    name = "mcp_gateway_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "addons" / "mcp_gateway.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_kubernetes_gateways_folder_is_refused(recorded, tmp_path):
    """Both chains in one process (the folder lock is the process's): the front's folder must be its own."""
    from mitmproxy import exceptions
    from mitmproxy.test import taddons

    front = recorded["front"]
    addon = _addon_module().McpFront()
    with taddons.context() as tctx:
        tctx.options.add_option("recordings", str, "", "the Kubernetes gateway's recordings folder")
        tctx.master.addons.add(addon)
        settings = {"mcp_policy": str(front.policy), "mcp_audit_log": str(tmp_path / "audit.log"),
                    "mode": [f"reverse:{front.listeners['kube'][0]}@0"]}
        tctx.configure(addon, **settings, recordings=str(tmp_path / "rec"))
        assert addon.recording is None  # off by default
        with pytest.raises(exceptions.OptionsError, match="a folder of its own"):
            tctx.configure(addon, mcp_recordings=str(tmp_path / "rec"))
        assert addon.recording is None
        tctx.configure(addon, mcp_recordings=str(tmp_path / "mcp-rec"))
        assert addon.recording is not None and (tmp_path / "mcp-rec" / "index.db").exists()
        tctx.configure(addon, mcp_recordings="")
        assert addon.recording is None


def test_a_recording_failure_changes_nothing_and_is_audited(tmp_path, recorded):
    """The writer breaks: the exchange goes on, its audit end line says so (in-process, the addon's class)."""
    from mitmproxy.test import taddons, tflow

    from jitgate.audit.log import AuditLog
    from jitgate.mcp.front import Exchange, Front
    from jitgate.policy.mcp import load_mcp_policy

    module = _addon_module()
    config = load_mcp_policy(next(recorded["root"].parent.glob("mcp.yaml")))

    class Broken:
        def resolve(self, ref):
            raise OSError("disk full")

    with taddons.context():
        front = Front(config, AuditLog(tmp_path / "audit.log"))
        ex = Exchange(config.servers[0], "POST", "/mcp")
        recording = module.FrontRecording(Broken(), 1024)
        flow = tflow.tflow(resp=True)
        before = flow.response.content
        recording.safely(flow, ex, front)
        front.finish(ex, 200)
    assert flow.response.content == before and ex.recording == "failed"
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert lines[-1]["stage"] == "end" and lines[-1]["recording"] == "failed"


def test_a_folder_another_process_writes_is_refused(recorded, tmp_path):
    """The running front holds its folder: a second front on it stops at start."""
    import os
    import subprocess

    front = recorded["front"]
    second = MCPFrontProcess(tmp_path, front.policy, {"kube": front.listeners["kube"][0]},
                             {"mcp_recordings": str(recorded["root"])})
    command = [part for part in second.command() if part != "-q"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=15, check=False, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode != 0
    assert "mcp_recordings: the recordings folder" in out.stdout + out.stderr
    assert "written by another gateway process" in out.stdout + out.stderr


def test_a_held_calls_exchange_goes_to_its_access_requests_session():
    """Plain values (jitgate.mcp.recording): the session of an access request, under the access rule
    whose reviewers may read it; an exchange without identity is anonymous."""
    from types import SimpleNamespace

    from jitgate.mcp.recording import call_record, masked_request
    from jitgate.policy.masking import MaskingPolicy
    from jitgate.recording.sessions import session_for

    message = SimpleNamespace(method="tools/call", name="delete_pod")
    held = SimpleNamespace(rule=SimpleNamespace(approval=SimpleNamespace(access_rule="mcp-held-calls")))
    ex = SimpleNamespace(message=message, approval={"request": "req-abc123", "state": "used"}, rule="prod-deletes",
                         held=held, audit_id="a-1", server=SimpleNamespace(name="kube"), http_method="POST",
                         decision="require-approval", answered=False, reason="",
                         caller_record=lambda: {"username": USER, "groups": ["oidc:agents"]})
    ref = session_for(call_record(ex), time.time())
    assert (ref.id, ref.kind, ref.grant, ref.rule, ref.cluster) == (
        "agent-7-example-com-req-abc123", "grant", "req-abc123", "mcp-held-calls", "mcp:kube")
    anonymous = SimpleNamespace(**{**vars(ex), "approval": None, "held": None, "message": None,
                                   "caller_record": lambda: None, "decision": "", "answered": True})
    record = call_record(anonymous)
    assert session_for(record, time.time()).kind == "anonymous"
    assert record["decision"] == "deny" and record["request"]["verb"] == "post"
    detectors = MaskingPolicy().detectors()
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":"b"}}}'
    assert masked_request(body, detectors) is body  # nothing to mask: the bytes as sent
