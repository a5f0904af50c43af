"""Session recordings end to end: real kubectl -> the gateway (real mitmdump) -> the stand-in clusters.

One workflow (a denied call, get, list, apply, `get -w` ended, `logs -f` ended, exec of a command with
known output, exec of `env` under a Secret-fed variable, an interactive tty exec with a typed secret)
is recorded into the grant's session: its flows.mitm reads back with mitmproxy's FlowReader and in a
real mitmweb behind a password; its HAR validates as HAR 1.2 and loads with mitmproxy's HAR reader;
its exec casts are asciicast v2 that asciinema reads; `jitgate sessions` lists, shows, plays, exports
and opens it. No canary secret value and no token used here is in any byte under the recordings
folder. Replaying the flow file through the gateway sends nothing to a cluster.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from testkit.net import free_port, stop
from testkit.recording import (
    JITGATE,
    MITMDUMP,
    Mitmweb,
    RecordingGateway,
    leaks,
    load_cast,
    load_har,
    read_flows,
    web_flows,
    web_get,
    web_post,
)
from testkit.standin.process import KUBECTL, TerminalSession, kubectl_env, read_until
from testkit.standin.seed import API_TOKEN, SECRET_VALUES
from tests.conftest import DEV_HOST, LAB_CLUSTER_TOKEN

REPO = Path(__file__).resolve().parents[1]
ASCIINEMA = str(Path(JITGATE).with_name("asciinema"))
CANARY_ENV = "canary-env-pw-7d41c9"
CANARY_TYPED = "canary-typed-tok-5a0e"
POD = f"""\
apiVersion: v1
kind: Pod
metadata: {{name: recorded, namespace: dev}}
spec:
  containers:
    - name: app
      image: busybox:1.36
      command: [sleep, infinity]
      env:
        - {{name: APP_PASSWORD, value: {CANARY_ENV}}}
"""
KNOWN_OUTPUT = "echo one; echo two; echo three"


def follow(config: Path, needle: bytes, *args: str, during=None) -> bytes:
    """A long-running kubectl (watch, log follow) read until `needle`, then ended by the user (SIGINT)."""
    proc = subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kubectl_env(config))
    try:
        seen = read_until(proc.stdout, needle)
        if during is not None:
            during()
            seen += proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    return seen


@pytest.fixture(scope="module")
def recorded(stack, tmp_path_factory):
    """The workflow, run once through a gateway that records; the gateway keeps running."""
    env = RecordingGateway(stack, tmp_path_factory.mktemp("recording")).start()
    grant = env.grant("dev", ("dev", "prod"), ("pods", "pods/log", "pods/exec", "secrets", "configmaps"),
                      ("get", "list", "watch", "create", "patch"))
    lab_grant = env.grant("lab", ("dev",), ("secrets",), ("get",))
    config = env.kubeconfig("dev")
    out: dict[str, str] = {}
    denied = env.kubectl("get", "deployments", "-n", "dev")
    assert denied.returncode != 0 and "jitgate request" in denied.stderr, denied
    out["get"] = env.kubectl("get", "pod", "toolbox", "-n", "dev", "-o", "json", check=True).stdout
    out["list"] = env.kubectl("get", "pods", "-n", "dev", check=True).stdout
    out["secrets"] = env.kubectl("get", "secrets", "-n", "prod", "-o", "yaml", check=True).stdout
    env.kubectl("apply", "-f", "-", input=POD, check=True)
    out["watch"] = follow(config, b"toolbox", "get", "pods", "-n", "dev", "-w",
                          during=lambda: env.kubectl("label", "pod", "toolbox", "-n", "dev", "recorded=yes", "--overwrite",
                                                     check=True)).decode()
    out["logs"] = follow(config, b"heartbeat", "logs", "-f", "api", "-n", "prod").decode()
    out["exec"] = env.kubectl("exec", "-n", "dev", "toolbox", "--", "sh", "-c", KNOWN_OUTPUT, check=True).stdout
    out["env"] = env.kubectl("exec", "-n", "prod", "api", "--", "env", check=True).stdout
    terminal = TerminalSession([KUBECTL, "exec", "-it", "-n", "dev", "toolbox", "--", "sh"], kubectl_env(config))
    try:
        terminal.expect(b":/# ")
        terminal.type(b"echo hello-tty")
        terminal.expect(b"hello-tty\r\n")
        terminal.type(f"echo API_TOKEN={CANARY_TYPED}".encode())
        terminal.expect(b"API_TOKEN=")
        terminal.type(b"exit")
        terminal.proc.wait(10)
    finally:
        terminal.close()
    out["lab"] = env.kubectl("get", "secret", "db-credentials", "-n", "dev", "-o", "json", cluster="lab", check=True).stdout
    unauthenticated = env.kubectl("get", "pods", "-n", "dev", "--token", "not-a-valid-token")
    assert unauthenticated.returncode != 0 and "invalid bearer token" in unauthenticated.stderr
    with socket.create_connection(("127.0.0.1", env.gateway.proxy_port), timeout=10) as conn:  # the gateway as an open proxy
        conn.sendall(b"CONNECT evil.example.org:443 HTTP/1.1\r\nHost: evil.example.org:443\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.1 403")
    calls = env.wait_for_calls(lambda calls: sum(c["subresource"] == "exec" for c in calls) >= 3
                               and any(c["verb"] == "watch" for c in calls) and any(c["subresource"] == "log" for c in calls)
                               and any(c["grant_id"] == lab_grant for c in calls) and any(c["verb"] == "connect" for c in calls))
    yield env, grant, lab_grant, calls, out
    env.stop()


def grant_session(calls: list[dict], grant: str) -> str:
    (session,) = {c["session"] for c in calls if c["grant_id"] == grant}
    return session


def test_one_session_per_grant_and_the_hour_for_calls_without_one(recorded) -> None:
    env, grant, lab_grant, calls, _ = recorded
    session = grant_session(calls, grant)
    assert session == f"alice-example-com-{grant}"
    mine = [c for c in calls if c["session"] == session]
    seen = {(c["verb"], c["resource"], c["subresource"]) for c in mine}
    assert {("get", "pods", ""), ("list", "pods", ""), ("watch", "pods", ""), ("get", "pods", "log"),
            ("create", "pods", "exec"), ("create", "pods", ""), ("patch", "pods", "")} <= seen, seen
    assert all(c["decision"] == "allow" and c["rule"] == "e2e-admin" for c in mine)
    assert sum(1 for c in mine if c["cast_file"]) == 3
    denials = [c for c in calls if c["decision"] == "deny" and c["user"]]  # `kubectl get deployments`; apply reads its namespace
    assert {c["resource"] for c in denials} == {"deployments", "namespaces"}
    hour = time.strftime("%Y%m%d%H", time.gmtime(denials[0]["time"]))
    assert {(c["session"], c["code"], c["grant_id"]) for c in denials} == {(f"alice-example-com-{hour}", 403, "")}
    assert {c["session"] for c in calls if c["path"].startswith("/api?")} == {f"alice-example-com-{hour}"}, "discovery"
    assert grant_session(calls, lab_grant) == f"alice-example-com-{lab_grant}"
    anonymous = [c for c in calls if c["session"] == f"anonymous-{hour}"]
    assert {c["code"] for c in anonymous} == {401, 403} and all(c["decision"] == "deny" and not c["user"] for c in anonymous)
    assert [c["path"] for c in anonymous if c["verb"] == "connect"] == ["evil.example.org:443"]
    # Each call's completing audit event names the session it is recorded in.
    completed = {e["auditID"]: e for e in env.gateway.audit_events() if e["stage"] == "ResponseComplete"}
    for c in mine + denials:
        assert completed[c["audit_id"]]["annotations"]["jitgate.dev/session"] == c["session"], c
    for folder in (env.recordings, env.recordings / session):
        assert folder.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in env.recordings.rglob("*") if p.is_file()} == {0o600}


def test_the_flow_file_reads_back_with_the_jitgate_record_on_each_flow(recorded) -> None:
    env, grant, _, calls, _ = recorded
    session = grant_session(calls, grant)
    flows = read_flows(env.session_folder(session) / "flows.mitm")
    assert {f.metadata["jitgate"]["auditID"] for f in flows} == {c["audit_id"] for c in calls if c["session"] == session}
    for f in flows:
        record = f.metadata["jitgate"]
        assert (record["decision"], record["grant"], record["rule"]) == ("allow", grant, "e2e-admin")
        assert f"grant {grant} (rule e2e-admin)" in f.comment
        assert "authorization" not in {k.lower() for k in f.request.headers} or f.request.headers["Authorization"] == "jitgate:removed"
    watch = next(f for f in flows if f.metadata["jitgate"]["request"]["verb"] == "watch")
    assert b"toolbox" in watch.response.content and b'"type":"MODIFIED"' in watch.response.content.replace(b" ", b"")
    logs = next(f for f in flows if f.metadata["jitgate"]["request"].get("subresource") == "log")
    assert b"heartbeat" in logs.response.content
    known = next(f for f in flows if "three" in " ".join(f.metadata["jitgate"]["request"].get("command", [])))
    output = b"".join(m.content[1:] for m in known.websocket.messages if not m.from_client and m.content[:1] == b"\x01")
    assert output == b"one\ntwo\nthree\n"
    hourly = read_flows(env.session_folder(next(c["session"] for c in calls if c["decision"] == "deny" and c["user"])) / "flows.mitm")
    denied = [f for f in hourly if f.metadata["jitgate"]["decision"] == "deny"]
    assert len(denied) == 2 and {f.response.status_code for f in denied} == {403} and {f.marked for f in denied} == {":no_entry:"}
    assert all("jitgate request" in f.comment for f in denied)


def test_the_har_is_har_1_2_and_mitmproxy_reads_it(recorded) -> None:
    env, grant, _, calls, _ = recorded
    session = grant_session(calls, grant)
    path = env.session_folder(session) / "session.har"
    doc = load_har(path)
    entries = doc["log"]["entries"]
    # In the order the calls completed (a watch when it ended), as the index inserted them.
    assert [e["_jitgate"]["auditID"] for e in entries] == [c["audit_id"] for c in sorted(calls, key=lambda c: c["id"])
                                                            if c["session"] == session]
    assert len(read_flows(path)) == len(entries)  # mitmproxy's own HAR reader
    watch = next(e for e in entries if e["_jitgate"]["request"]["verb"] == "watch")
    assert "toolbox" in watch["response"]["content"]["text"]
    execs = [e for e in entries if e.get("_resourceType") == "websocket"]
    assert len(execs) == 3 and all(e["_webSocketMessages"] for e in execs)
    assert {m["type"] for e in execs for m in e["_webSocketMessages"]} == {"send", "receive"}
    known = next(e for e in execs if "three" in " ".join(e["_jitgate"]["request"].get("command", [])))
    output = b"".join(base64.b64decode(m["data"])[1:] for m in known["_webSocketMessages"]
                      if m["type"] == "receive" and base64.b64decode(m["data"])[:1] == b"\x01")
    assert output == b"one\ntwo\nthree\n"


def test_each_exec_is_an_asciicast_v2_with_its_output_in_order(recorded) -> None:
    env, grant, _, calls, _ = recorded
    session = grant_session(calls, grant)
    folder = env.session_folder(session)
    known = next(c for c in calls if c["cast_file"] and "three" in c["path"])
    header, events = load_cast(folder / known["cast_file"])
    assert "kubectl exec -n dev toolbox" in header["title"] and "echo one" in header["title"]
    output = "".join(data for _, kind, data in events if kind == "o")
    assert output == "one\r\ntwo\r\nthree\r\n"
    assert events[-1][1:] == ["m", "exit: Success"]
    played = subprocess.run([ASCIINEMA, "cat", str(folder / known["cast_file"])], capture_output=True, timeout=20)
    assert played.returncode == 0 and played.stdout.replace(b"\r\n", b"\n") == b"one\ntwo\nthree\n", played
    played = subprocess.run([ASCIINEMA, "play", "-s", "100", str(folder / known["cast_file"])], capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=20)
    assert played.returncode == 0 and played.stdout == b"one\r\ntwo\r\nthree\r\n", played
    tty = next(c for c in calls if c["cast_file"] and "tty=true" in c["path"])
    header, events = load_cast(folder / tty["cast_file"])
    typed = [data for _, kind, data in events if kind == "i"]
    assert typed[0] == "echo hello-tty\r" and typed[1].startswith("echo API_TOKEN=[masked:") and typed[-1] == "exit\r"
    assert (header["width"], header["height"]) != (0, 0)
    assert "hello-tty" in "".join(data for _, kind, data in events if kind == "o")


def test_mitmweb_lists_the_flows_behind_its_password(recorded, tmp_path: Path) -> None:
    env, grant, _, calls, _ = recorded
    session = grant_session(calls, grant)
    web = Mitmweb(env.session_folder(session) / "flows.mitm", "recording-test-pw", tmp_path).start()
    try:
        count = sum(c["session"] == session for c in calls)
        flows = web_flows(web.port, "recording-test-pw", want=count)
        assert len(flows) == count
        assert all(f"grant {grant} (rule e2e-admin)" in f["comment"] for f in flows)
        assert {f["request"]["path"].split("?")[0] for f in flows} >= {"/api/v1/namespaces/dev/pods",
                                                                        "/api/v1/namespaces/dev/pods/toolbox/exec"}
        assert web_get(web.port, "/flows", None)[0] == 403
        assert web_get(web.port, "/flows", "wrong")[0] == 403
    finally:
        web.stop()


def test_sessions_cli_lists_shows_plays_and_exports(recorded, tmp_path: Path) -> None:
    env, grant, _, calls, _ = recorded
    session = grant_session(calls, grant)
    base = [JITGATE, "sessions", "--dir", str(env.recordings)]
    listed = subprocess.run(base + ["--user", "alice", "--cluster", "dev", "-o", "json"], capture_output=True, text=True, check=True)
    ids = {s["id"]: s for s in json.loads(listed.stdout)}
    assert session in ids and ids[session]["grant"] == grant and ids[session]["execs"] == 3
    denials = subprocess.run(base + ["--decision", "deny"], capture_output=True, text=True, check=True).stdout
    assert "alice-example-com-20" in denials and session not in denials
    assert subprocess.run(base + ["--grant", grant, "--since", "1h"], capture_output=True, text=True, check=True).stdout.count("\n") == 2
    shown = subprocess.run([JITGATE, "sessions", "show", session, "--dir", str(env.recordings)], capture_output=True, text=True, check=True).stdout
    assert f"grant    {grant} (rule e2e-admin)" in shown
    assert re.search(r"watch\s+pods -n dev\s+200\s+allow\s+e2e-admin/" + grant, shown), shown
    assert re.search(r"create\s+pods/exec -n dev toolbox\s+101\s+allow", shown), shown
    known = next(c for c in calls if c["cast_file"] and "three" in c["path"])
    played = subprocess.run([JITGATE, "sessions", "play", session, "--dir", str(env.recordings), "--exec", known["audit_id"][:8],
                             "--speed", "1000"], capture_output=True, timeout=30, check=True)
    assert played.stdout == b"one\r\ntwo\r\nthree\r\n"
    har = tmp_path / "out.har"
    subprocess.run([JITGATE, "sessions", "export", session, "--dir", str(env.recordings), "--har", str(har)], check=True, capture_output=True)
    assert len(load_har(har)["log"]["entries"]) == sum(c["session"] == session for c in calls)
    assert har.stat().st_mode & 0o777 == 0o600
    missing = subprocess.run([JITGATE, "sessions", "show", "nobody-2000010100", "--dir", str(env.recordings)], capture_output=True, text=True)
    assert missing.returncode == 2 and "no session" in missing.stderr


def test_sessions_open_serves_mitmweb_with_a_password_and_refuses_replays(recorded, stack) -> None:
    env, grant, _, calls, _ = recorded
    session = grant_session(calls, grant)
    proc = subprocess.Popen([JITGATE, "sessions", "open", session, "--dir", str(env.recordings)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = proc.stdout.readline()
        password = proc.stdout.readline().split(": ", 1)[1].strip()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", url).group(1))
        count = sum(c["session"] == session for c in calls)
        flows = web_flows(port, password, want=count)
        assert len(flows) == count
        before = len(stack.dev.requests_seen())
        target = next(f for f in flows if f["request"]["method"] == "GET" and f["request"]["path"].startswith("/api/v1/namespaces/dev/pods/toolbox"))
        assert web_post(port, f"/flows/{target['id']}/replay", password) == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            replayed = next(f for f in web_flows(port, password) if f["id"] == target["id"])
            if replayed.get("response") and replayed["response"]["status_code"] == 403:
                break
            time.sleep(0.3)
        assert replayed["response"]["status_code"] == 403, replayed
        time.sleep(1)
        assert len(stack.dev.requests_seen()) == before, "a replay from the viewer reached the cluster"
    finally:
        stop(proc)
    # Ending the command (SIGTERM, as a closed terminal or `kill` does) ends the viewer it started.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _listening(port):
        time.sleep(0.2)
    assert not _listening(port), "mitmweb kept running after `jitgate sessions open` ended"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_no_canary_and_no_token_in_any_stored_byte(recorded, stack) -> None:
    env, _, _, _, out = recorded
    assert "one\ntwo\nthree" in out["exec"] and "DB_PASSWORD=" in out["env"] and "heartbeat" in out["logs"]
    values = {"dev password": SECRET_VALUES["dev"]["password"], "prod password": SECRET_VALUES["prod"]["password"],
              "prod api token": API_TOKEN, "APP_PASSWORD env": CANARY_ENV, "typed token": CANARY_TYPED,
              "caller's OIDC ID token": env.token, "lab cluster token": LAB_CLUSTER_TOKEN}
    for name, text in out.items():  # the gateway masked what kubectl showed...
        assert not [v for v in values.values() if v in text], name
    stored = [p for p in env.recordings.rglob("*") if p.is_file()]
    assert {p.name for p in stored} >= {"flows.mitm", "session.har", "session.json", "index.db"}
    assert leaks(env.recordings, values) == []  # ...and nothing stored keeps any of it, in any form
    for path in stored:
        data = path.read_bytes()
        assert b"k8s-aws-v1." not in data and b"X-Amz-Signature" not in data, f"an EKS token in {path}"
    seen = stack.dev.requests_seen()
    assert any(r.get("eks") for r in seen), "the dev cluster was reached with an EKS token"


def test_replaying_the_flow_file_through_the_gateway_sends_nothing(recorded, stack, tmp_path: Path) -> None:
    from tests.conftest import aws_env

    env, grant, _, calls, _ = recorded
    flows = env.session_folder(grant_session(calls, grant)) / "flows.mitm"
    count = len(read_flows(flows))
    before = len(stack.dev.requests_seen()), len(stack.lab.requests_seen())
    for no_server in (True, False):
        work = tmp_path / f"replay-{no_server}"
        work.mkdir()
        cmd = [MITMDUMP, "-s", str(REPO / "addons/gateway.py"), "--set", f"policy={stack.policy}", "--set", f"confdir={work / 'certs'}",
               "--set", f"grant_store={env.store}", "--set", f"recordings={work / 'recordings'}",
               "--set", f"audit_log={work / 'audit.log'}", "-r", str(flows)]
        if no_server:
            cmd.append("-n")
        else:
            cmd += ["--mode", f"reverse:https://{DEV_HOST}@127.0.0.1:{free_port()}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=work, env=aws_env({**__import__("os").environ}, work))
        try:
            output = b""
            deadline = time.monotonic() + 30
            while output.count(b"\n") < count and time.monotonic() < deadline and proc.poll() is None:
                output += proc.stdout.readline()
            time.sleep(1)
        finally:
            stop(proc)
            output += proc.stdout.read() or b""
        assert b"/api/v1/namespaces/dev/pods" in output, output[-2000:]
        assert (len(stack.dev.requests_seen()), len(stack.lab.requests_seen())) == before, "a replayed flow reached a cluster"
        assert not [p for p in (work / "recordings").iterdir() if p.is_dir()], "a replayed flow was recorded again"
        audit = work / "audit.log"
        assert not audit.exists() or not audit.read_text().strip(), "a replayed flow was checked and audited again"
