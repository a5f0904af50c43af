"""The README's first command works: scripts/quickstart sets up and shows kubectl through the gateway.

The tests run it in folders of their own and on free ports, so they never clobber a user's state/
or certs/, and pass while the user's own quick start runs on the demo's ports. The walkthrough it
prints is pasted into a shell as it is, its agent part included: the real kubernetes-mcp-server (npm,
installed once per test session by scripts/install-mcp-servers) driven over stdio by the Python MCP SDK
(scripts/agent-call), its call held by the gateway until a reviewer approves."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from ruamel.yaml import YAML

from jitgate.cli.main import main as jitgate_cli
from testkit.mcp import mcp_servers  # noqa: F401 (a fixture: the pinned MCP servers, installed once per session)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "scripts/quickstart")
DEMO_PORTS = (16443, 16600, 18080, 17443)  # policies/demo.yaml's, and the gateway's in the README
AGENT = "mcp-agent@example.com"  # the demo's agent
TOKEN_PLUGIN = REPO / "docs/agents/agent-token-plugin"
PORTS_LINE = re.compile(r"stand-in cluster on 127\.0\.0\.1:(\d+), OIDC provider on 127\.0\.0\.1:(\d+), "
                        r"gateway on 127\.0\.0\.1:(\d+) \(regular mode\) and 127\.0\.0\.1:(\d+) \(reverse mode\)")


def quickstart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QUICKSTART, *args], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)


def ports_of(output: str) -> tuple[int, ...]:
    match = PORTS_LINE.search(output)
    assert match, output
    return tuple(int(p) for p in match.groups())


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_quickstart_runs_kubectl_through_the_gateway(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = quickstart("--no-wait", "--state", str(state), "--ports", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    # Refused first, with the command to ask; then the request (immediate rule); then the read works.
    assert "Error from server (Forbidden): jitgate: no active grant lets you list pods in namespace dev" in result.stdout
    assert "approved: get, list, watch pods in namespace dev on cluster demo" in result.stdout
    assert "toolbox" in result.stdout and "READY" in result.stdout
    assert "by alice@example.com -> 200 (allow, grant grant-" in result.stdout
    last = json.loads((state / "audit.log").read_text().splitlines()[-1])
    assert last["user"]["username"] == "alice@example.com"
    # What to paste next names this run's files, wherever they are.
    assert f"cd {REPO} && export JITGATE_DEMO={state}/demo\n" in result.stdout
    assert "The demo stopped (--no-wait)" in result.stdout and "jitgate is running" not in result.stdout
    # Free ports, not the demo's; everything it made (the gateway's CA too) is in its folder.
    assert not set(ports_of(result.stdout)) & set(DEMO_PORTS)
    assert (state / "certs/mitmproxy-ca-cert.pem").is_file()
    # The demo's kubeconfigs hold an ID token only, and are private.
    for name in ("alice", "bob", "carol", "proxy", "agent"):
        config = state / f"demo/kubeconfig-{name}"
        assert oct(config.stat().st_mode & 0o777) == "0o600"
        assert (state / "demo/cluster-token").read_text() not in config.read_text()
    check_the_agent(state, result.stdout)
    # The policy it ran is the shipped demo policy with only this run's ports and paths, and checks clean.
    ran = (state / "demo/policy.yaml").read_text().splitlines()[2:]
    shipped = (REPO / "policies/demo.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, ran, strict=True) if a != b]
    assert changed and all(re.search(r"connect:|issuer:|ca_file:|token_file:|\$schema=", a) for a, _ in changed), changed
    check = subprocess.run([str(REPO / ".venv/bin/jitgate"), "policy", "check", str(state / "demo/policy.yaml")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


def check_the_agent(state: Path, printed: str) -> None:
    """The agent has an identity of its own (group agents), an ID token only its plugin reads, a
    kubeconfig that `jitgate kubeconfig` writes (the command the quick start prints, run again, writes
    the same file) naming that plugin and no token, and the host configuration of docs/agents with it."""
    demo = state / "demo"
    token_file = demo / "agent.token"
    token = token_file.read_text()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600" and not token.endswith("\n")
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["email"] == AGENT and claims["groups"] == ["agents"]
    config_text = (demo / "kubeconfig-agent").read_text()
    humans = [YAML(typ="safe").load((demo / f"kubeconfig-{n}").read_text())["users"][0]["user"]["token"]
              for n in ("alice", "bob", "carol")]
    assert all(t not in config_text for t in (token, *humans))
    config = YAML(typ="safe").load(config_text)
    (user,) = config["users"]
    assert user == {"name": AGENT, "user": {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(TOKEN_PLUGIN), "args": [str(token_file)],
        "interactiveMode": "IfAvailable", "provideClusterInfo": False}}}
    assert config["contexts"][0]["context"]["namespace"] == "dev"
    # The printed `jitgate kubeconfig` command is what wrote it.
    folded = printed.split("it was written with:\n", 1)[1].split("\nThe demo policy's rule agent-read-dev", 1)[0]
    argv = shlex.split(folded.replace("\\\n", " "))
    assert argv[:2] == ["jitgate", "kubeconfig"] and argv[argv.index("-o") + 1] == str(demo / "kubeconfig-agent")
    argv[argv.index("-o") + 1] = str(state / "again")
    with contextlib.redirect_stderr(io.StringIO()) as said:  # in this process: a new one costs 1-2 s of imports
        assert jitgate_cli(argv[1:]) == 0, said.getvalue()
    assert (state / "again").read_text() == config_text
    # The host configuration: docs/agents/mcp-servers.json (the README's) with the agent's kubeconfig.
    shipped = (REPO / "docs/agents/mcp-servers.json").read_text().replace("/home/agent/.kube/jitgate-dev", str(demo / "kubeconfig-agent"))
    assert json.loads((demo / "mcp-servers.json").read_text()) == json.loads(shipped)


def test_a_second_quick_start_never_clobbers_a_running_one(tmp_path: Path, mcp_servers: Path) -> None:  # noqa: F811
    """A user's quick start keeps running (files, ports) while another one starts: the same folder is
    refused, another folder works beside it, on free ports where the first holds the demo's."""
    first_state = tmp_path / "first"
    first = subprocess.Popen([QUICKSTART, "--state", str(first_state)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in first.stdout], daemon=True).start()
    seen = ""
    try:
        deadline = time.monotonic() + 120
        while "Grants live in" not in seen:  # the end of what it prints
            assert first.poll() is None and time.monotonic() < deadline, seen
            try:
                seen += lines.get(timeout=0.5)
            except queue.Empty:
                pass
        first_ports = ports_of(seen)
        assert "jitgate is running in front of the demo cluster" in seen
        paste_the_walkthrough(seen, first_state, tmp_path)
        kubeconfig = first_state / "demo/kubeconfig-alice"
        before = {p.name: p.read_bytes() for p in (first_state / "demo").glob("kubeconfig-*")}

        again = quickstart("--no-wait", "--state", str(first_state))
        assert again.returncode == 2, again.stdout + again.stderr
        assert f"another quick start (pid {first.pid}) is using {first_state};" in again.stderr
        assert "give this one a folder of its own: --state DIR" in again.stderr
        assert {p.name: p.read_bytes() for p in (first_state / "demo").glob("kubeconfig-*")} == before

        second = quickstart("--no-wait", "--state", str(tmp_path / "second"))  # default ports
        assert second.returncode == 0, second.stdout + second.stderr
        second_ports = ports_of(second.stdout)
        assert not set(second_ports) & set(first_ports)
        if first_ports == DEMO_PORTS:
            assert "already in use" in second.stderr and "using free ports instead" in second.stderr

        # The first one still serves its user.
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(tmp_path / "kube-cache")}
        pods = subprocess.run([str(REPO / ".venv/bin/kubectl"), "get", "pods", "-n", "dev"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert pods.returncode == 0 and "toolbox" in pods.stdout, pods.stderr
    finally:
        first.terminate()  # what Ctrl-C or a closed terminal does: it stops everything it started
        first.wait(30)
    assert first.returncode == 0
    deadline = time.monotonic() + 10
    while any(listening(p) for p in first_ports) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(listening(p) for p in first_ports)


def paste_the_walkthrough(printed: str, state: Path, tmp_path: Path) -> None:
    """The block the running quick start printed equals the README's (but for the paths of its first
    line), and pasted into a shell as it is, every command in it succeeds."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "In another terminal:" in line) + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("    "))
    block = [line[4:] for line in lines[start:end]]
    readme = (REPO / "README.md").read_text()
    shown = readme.split("<!-- walkthrough:begin -->\n```sh\n", 1)[1].split("```\n<!-- walkthrough:end -->", 1)[0].splitlines()
    assert shown[0] == "cd jitgate && export JITGATE_DEMO=$PWD/state/demo"
    assert block[0] == f"cd {REPO} && export JITGATE_DEMO={state / 'demo'}"
    assert block[1:] == shown[1:], "the README's walkthrough is what the quick start prints"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE") and k not in ("JITGATE_TOKEN",)}
    env["HOME"] = str(tmp_path)  # no kubeconfig or cache of the machine's user
    # Its own process group, and files rather than pipes: should the block break off, its background
    # agent call (which would hold pipes open) ends with it, and the test reads what was printed.
    with (tmp_path / "walkthrough.out").open("w+") as stdout, (tmp_path / "walkthrough.err").open("w+") as stderr:
        shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", "\n".join(block)], cwd=tmp_path, env=env, text=True,
                                 stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            shell.wait(timeout=150)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGKILL)  # anything of the block still running (nothing, when it passed)
            shell.wait()
    out, err = (tmp_path / "walkthrough.out").read_text(), (tmp_path / "walkthrough.err").read_text()
    assert shell.returncode == 0, out + err
    assert "toolbox" in out and "approved" in out and "revoked" in out and "Username: alice@example.com" in out
    assert out.count("api\n") >= 1, out  # the exec's hostname
    start = out.index("\n{", out.index("Username: alice@example.com")) + 1  # `python3 -m json.tool`'s output
    last, _ = json.JSONDecoder().raw_decode(out, start)
    assert last["kind"] == "Event" and last["user"]["username"] == "alice@example.com"
    check_the_agents_call(out[start:], err, state)


def check_the_agents_call(out: str, err: str, state: Path) -> None:
    """kubernetes-mcp-server's call was held at the gateway (it filed the access request itself) until
    bob approved it, then completed with the pods; the audit log has it under the agent's name."""
    assert "already installed in .mcp-servers: kubernetes-mcp-server 0.0.67" in err, err  # installed by the session
    assert f'"kubernetes-mcp-server@0.0.67", "--kubeconfig", "{state}/demo/kubeconfig-agent"' in out  # the host config
    approved = re.search(r"^request (req-[a-z0-9]+) approved: get, list, watch pods, pods/log in namespace dev on cluster "
                         r"demo for 15m \(rule agent-read-dev\)$", out, re.MULTILINE)
    assert approved, out
    request_id = approved.group(1)
    assert (f"held: the gateway holds this call until a reviewer decides access request {request_id} "
            f"(rule agent-read-dev, needs 1 approval(s)); a reviewer approves it with: jitgate approve {request_id}") in out, out
    # The tool result (what the model reads): kubernetes-mcp-server's table of the pods, after the approval.
    assert re.search(r"^NAMESPACE\s+APIVERSION\s+KIND\s+NAME\b.*\ndev\s+v1\s+Pod\s+toolbox\s", out[approved.end():], re.MULTILINE), out
    # The reviewer ends the grant: the agent keeps no standing access.
    assert re.search(rf"^grant grant-[a-z0-9]+ of {re.escape(AGENT)} revoked: get, list, watch pods, pods/log in namespace dev",
                     out, re.MULTILINE), out
    # `jitgate audit`: the agent's list, allowed by the grant the approval made.
    assert re.search(rf"^\S+\s+{re.escape(AGENT)}\s+demo\s+allow\s+list\s+pods dev\s+200\s+allowed by grant grant-", out,
                     re.MULTILINE), out

    events = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    (listed,) = [e for e in events if e["stage"] == "ResponseComplete" and e["user"]["username"] == AGENT
                 and e["verb"] == "list" and e.get("objectRef", {}).get("resource") == "pods"]
    assert listed["objectRef"]["namespace"] == "dev" and listed["responseStatus"]["code"] == 200, listed
    assert listed["userAgent"].startswith("kubernetes-mcp-server/v0.0.67 "), listed
    notes = listed["annotations"]
    assert notes["jitgate.dev/held-for-request"] == request_id and notes["jitgate.dev/access-request"] == request_id, notes
    assert notes["jitgate.dev/approvers"] == "bob@example.com" and notes["jitgate.dev/decision"] == "allow", notes
    # Held across the approval: received before bob approved, answered after.
    (approval,) = [e for e in events if e["stage"] == "ResponseComplete" and e["user"]["username"] == "bob@example.com"
                   and e["requestURI"].startswith(f"/jitgate/v1/requests/{request_id}/approve")]
    assert listed["requestReceivedTimestamp"] < approval["stageTimestamp"] < listed["stageTimestamp"], (listed, approval)
    # Every cluster call of the agent's ran under its own name (no human's token reached it).
    agent_calls = [e for e in events if "kubernetes-mcp-server" in e.get("userAgent", "") and e["stage"] == "ResponseComplete"]
    assert agent_calls and {e["user"]["username"] for e in agent_calls} == {AGENT}, agent_calls
