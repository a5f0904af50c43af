"""Existing Kubernetes MCP servers work through jitgate unchanged, each call under the agent's own identity.

Real parts only: the npm servers `kubernetes-mcp-server` (Go, client-go) and `mcp-server-kubernetes` (Node,
runs the real kubectl from .venv; reads MCP resources with @kubernetes/client-node), installed pinned by
scripts/install-mcp-servers and started from the client configuration the README shows
(docs/agents/mcp-servers.json), driven over stdio by the Python MCP SDK the way an agent host drives
them; the real gateway with the README's agent policy (docs/agents/agent-policy.yaml) and the default
guardrail pack; the stand-in cluster; ID tokens from the real OIDC provider; kubeconfigs written by
`jitgate kubeconfig` from the README's commands (regular mode with proxy-url and reverse mode; the token
from a token file or from an exec credential plugin); access requests and approvals with the `jitgate` CLI.

Every call is checked against the gateway's audit log: the agent's username on every event, the verb,
resource, namespace and outcome each call should have had.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testkit.gateway import GatewayProcess
from testkit.mcp import (
    AGENTS_DOCS,
    EXAMPLE_KUBECONFIG,
    TOKEN_PLUGIN,
    MCPSession,
    ToolOutcome,
    client_config,
    mcp_servers,  # noqa: F401 (mcp_servers is a fixture)
    server_params,
)
from testkit.standin.process import KUBECTL, kubectl_env
from testkit.standin.seed import API_TOKEN, SECRET_VALUES
from tests.conftest import DEV_HOST, INSPECTOR_TOKEN, LAB_CLUSTER_TOKEN, aws_env, write_policy

REPO = Path(__file__).resolve().parents[1]
JITGATE = str(REPO / ".venv/bin/jitgate")
README_SECTION = "## AI agents (MCP servers) through jitgate"
GO, NODE = "kubernetes", "kubernetes-kubectl"  # the servers' names in docs/agents/mcp-servers.json
MASKED_B64 = base64.b64encode(b"jitgate:masked").decode()
# What must never reach the model: secret values (plain and base64) and credentials.
SECRETS = [v for ns in ("dev", "prod") for v in SECRET_VALUES[ns].values()] + [API_TOKEN]
SECRETS += [base64.b64encode(v.encode()).decode() for v in SECRETS]
CLUSTER_CREDENTIALS = [LAB_CLUSTER_TOKEN, INSPECTOR_TOKEN, "k8s-aws-v1.", "AKIAGATEWAYBASEKEY01", "gateway-base-secret"]

APP_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: dev
  labels: {{app: agent-app}}
spec:
  containers:
    - name: app
      image: busybox:1.36
      command: [sleep, infinity]
      env:
        - name: DB_PASSWORD
          valueFrom: {{secretKeyRef: {{name: db-credentials, key: password}}}}
        - {{name: MODE, value: agent-mode}}
"""
PRIVILEGED_POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: dev}}
spec:
  containers:
    - name: app
      image: busybox:1.36
      securityContext: {{privileged: true}}
"""

# Each server in both modes, each credential kind with each server.
GO_CASES = [("proxy", "token-file"), ("reverse", "exec")]
KUBECTL_VERSION = json.loads(subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True, text=True,
                                            check=True).stdout)["clientVersion"]["gitVersion"]
NODE_CASES = [("proxy", "exec"), ("reverse", "token-file")]


# --- the README section ----------------------------------------------------------------------------


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    return text[start:end if end != -1 else len(text)]


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", readme_section(), re.DOTALL | re.MULTILINE)


def readme_kubeconfig_commands() -> list[list[str]]:
    commands = []
    for block in readme_blocks("sh"):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [shlex.split(line, comments=True) for line in joined.splitlines() if line.startswith("jitgate kubeconfig ")]
    return commands


def option(argv: list[str], name: str) -> list[str]:
    """The values of option `name` (up to the next option)."""
    i = argv.index(name)
    j = i + 1
    while j < len(argv) and not argv[j].startswith("-"):
        j += 1
    return argv[i + 1:j]


def jitgate(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """The `jitgate` command run in this process (`main(argv)`; a new process costs 1-2 s of imports)."""
    from jitgate.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                err.write(f"{e.code}\n")
    result = subprocess.CompletedProcess(["jitgate", *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"jitgate {shlex.join(argv)} failed ({code}):\n{result.stdout}{result.stderr}")
    return result


# --- the world: gateway, people, agents, servers --------------------------------------------------


@dataclass
class Agent:
    name: str
    email: str
    token: str
    token_file: Path
    kubeconfig: Path
    mode: str
    credential: str
    kubeconfig_argv: list[str] = field(default_factory=list)


class World:
    def __init__(self, ca, idp, sts, dev, lab, work: Path, bin_dir: Path) -> None:
        self.idp, self.dev, self.work, self.bin_dir = idp, dev, work, bin_dir
        folder = work / "policy"
        folder.mkdir()
        base = write_policy(folder, ca, idp, sts, sts.create_role("jitgate-mcp"), dev, lab, sts.create_role("jitgate-mcp-ro"))
        text = base.read_text()
        base.write_text(text[text.index("\nclusters:") + 1:])  # clusters and identity providers only
        shutil.copy(AGENTS_DOCS / "agent-policy.yaml", folder / "agents.yaml")
        shutil.copy(REPO / "policies/guardrails.yaml", folder / "guardrails.yaml")
        self.policy = folder
        self.gateway = GatewayProcess(work / "gw", folder, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                                      options={"grant_store": str(work / "grants.db"), "hold_poll_interval_ms": "100"},
                                      env=aws_env(dict(os.environ), work)).start()
        # Humans: a developer whose token must never show up in what an agent sees, and a reviewer.
        self.alice_token = idp.token("alice", email="alice@example.com", email_verified=True, groups=["developers"])
        self.rita_token = idp.token("rita", email="rita@example.com", email_verified=True, groups=["sre"])
        self.rita = work / "kubeconfig-rita"
        jitgate("kubeconfig", "--policy", str(folder), "--cluster", "dev", "--user", "rita@example.com",
                "--token", self.rita_token, "--gateway-ca", str(self.gateway.ca_path),
                "--server", self.gateway.reverse_url("dev"), "-o", str(self.rita))
        self.agents: dict[str, Agent] = {}
        self.sessions: dict[tuple[str, str], MCPSession] = {}

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.gateway.stop()

    # -- agents --

    def kubeconfig_argv(self, mode: str, credential: str, values: dict[str, list[str]]) -> list[str]:
        """The README's `jitgate kubeconfig` command for this credential, with the test's values in it
        (and the other mode's option where the README shows the command in the other mode)."""
        flag = {"token-file": "--token-file", "exec": "--exec-command"}[credential]
        (template,) = [c for c in readme_kubeconfig_commands() if flag in c]
        argv, i = [], 2
        while i < len(template):
            name = template[i]
            n = len(option(template, name)) if name.startswith("-") else 0
            if name in ("--server", "--proxy"):
                name = "--server" if mode == "reverse" else "--proxy"
            argv += [name, *values[name]] if name in values else template[i:i + 1 + n]
            i += 1 + n
        return ["jitgate", "kubeconfig", *argv]

    def agent(self, name: str, mode: str, credential: str, grant: bool = True) -> Agent:
        if name in self.agents:
            return self.agents[name]
        email = f"{name}@agents.example.com"
        token = self.idp.token(name, email=email, email_verified=True, groups=["agents"])
        home = self.work / name
        home.mkdir()
        token_file = home / "id-token"
        token_file.write_text(token)  # no newline: @kubernetes/client-node sends the file's bytes as they are (README)
        token_file.chmod(0o600)
        kubeconfig = home / "kubeconfig"
        values = {"--policy": [str(self.policy)], "--cluster": ["dev"], "--user": [email],
                  "--server": [self.gateway.reverse_url("dev")], "--proxy": [self.gateway.proxy_url],
                  "--gateway-ca": [str(self.gateway.ca_path)], "--token-file": [str(token_file)],
                  "--exec-command": [str(TOKEN_PLUGIN), str(token_file)], "-o": [str(kubeconfig)]}
        argv = self.kubeconfig_argv(mode, credential, values)
        jitgate(*argv[1:])
        agent = Agent(name, email, token, token_file, kubeconfig, mode, credential, argv)
        self.agents[name] = agent
        if grant:  # the agent asks for its task's scope, a human approves (the README's flow)
            out = self.cli(kubeconfig, "request", "--cluster", "dev", "--namespace", "dev", "--resource", "pods",
                           "--resource", "pods/log", "--resource", "pods/exec", "--resource", "secrets",
                           "--resource", "configmaps", *[a for v in ("get", "list", "watch", "create", "update", "patch", "delete")
                                                         for a in ("--verb", v)],
                           "--duration", "1h", "--reason", "agent task: dev pods").stdout
            self.approve(re.search(r"\breq-[a-z0-9]+", out).group(0))
        return agent

    def session(self, server: str, agent: Agent) -> MCPSession:
        key = (server, agent.name)
        if key not in self.sessions:
            self.sessions[key] = MCPSession(server_params(server, agent.kubeconfig),
                                            log=self.work / f"{server}-{agent.name}.log").start()
        return self.sessions[key]

    # -- the jitgate CLI --

    def cli(self, kubeconfig: Path, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return jitgate(command, "--kubeconfig", str(kubeconfig), *args, check=check)

    def approve(self, request_id: str) -> None:
        self.cli(self.rita, "approve", request_id, "--reason", "ok for the agent")

    def pending_for(self, agent: Agent, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            items = json.loads(self.cli(self.rita, "list", "--reviewable", "-o", "json").stdout)["items"]
            mine = [r for r in items if r["requester"] == agent.email and r["state"] == "pending"]
            if mine:
                assert len(mine) == 1, mine
                return mine[0]
            time.sleep(0.2)
        raise AssertionError(f"no access request of {agent.email} waits for review")

    # -- audit --

    def audit_mark(self) -> int:
        return len(self.gateway.audit_events())

    def audit_since(self, mark: int) -> list[dict]:
        return self.gateway.audit_events()[mark:]


@pytest.fixture(scope="module")
def world(mcp_servers,  # noqa: F811 (the fixture imported above)
           ca, idp, sts, dev_cluster, lab_cluster, tmp_path_factory):
    w = World(ca, idp, sts, dev_cluster, lab_cluster, tmp_path_factory.mktemp("mcp"), mcp_servers)
    yield w
    w.close()


# --- one conversation: calls and what each should have been -----------------------------------------


def assert_no_secret(text: str, where: str, tokens: tuple[str, ...] = ()) -> None:
    for value in SECRETS:
        assert value not in text, f"secret value {value!r} reached the model in {where}"
    for value in (*tokens, *CLUSTER_CREDENTIALS):
        assert value not in text, f"a credential ({value[:12]}...) reached the model in {where}"


def fits(e: dict, verb: str | None, resource: str, namespace: str, name: str | None = None,
         subresource: str | None = None, code: int | None = None) -> bool:
    ref = e.get("objectRef", {})
    return (e["stage"] == "ResponseComplete" and (verb is None or e["verb"] == verb)
            and ref.get("resource") == resource and ref.get("namespace") == namespace
            and (name is None or ref.get("name") == name) and ref.get("subresource", "") == (subresource or "")
            and (code is None or e["responseStatus"]["code"] == code))


class Conversation:
    """Tool calls of one agent through one server, each checked against the audit log."""

    def __init__(self, world: World, server: str, agent: Agent) -> None:
        self.world, self.agent = world, agent
        self.session = world.session(server, agent)
        self.outcomes: list[ToolOutcome] = []
        self.tokens = (agent.token, world.alice_token, world.rita_token)

    def _call(self, tool: str, arguments: dict, timeout: float | None = None) -> tuple[ToolOutcome, int]:
        mark = self.world.audit_mark()
        outcome = self.session.call(tool, arguments, timeout=timeout)
        self.outcomes.append(outcome)
        assert_no_secret(outcome.text, str(outcome), self.tokens)
        return outcome, mark

    def audited(self, mark: int, verb: str | None, resource: str, namespace: str, name: str | None = None,
                subresource: str | None = None, code: int | None = None, outcome: ToolOutcome | None = None) -> dict:
        """The call's final audit event (an exec session's is written when the session has closed, which
        may be just after the server has the output), and every event since `mark` is the agent's."""
        deadline = time.monotonic() + 5
        while True:
            events = self.world.audit_since(mark)
            found = [e for e in events if fits(e, verb, resource, namespace, name, subresource, code)]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert found, (f"{outcome}\nno audit event {verb} {resource}/{subresource or ''} {namespace}/{name or ''} "
                       f"{code or ''}; audited: {[(e['stage'], e['verb'], e['requestURI'], e.get('responseStatus', {}).get('code')) for e in events]}")
        # Every call on the cluster's resources since the mark is the agent's (the reviewer's calls to the
        # access API are audited under the reviewer; other agents' idle kubernetes-mcp-server sessions
        # refresh discovery, /api and /apis, every 30 s).
        strangers = {e["user"]["username"] for e in events if "objectRef" in e} - {self.agent.email}
        assert not strangers, f"{outcome}\naudited under {strangers}, not the agent {self.agent.email}"
        return found[-1]

    def allowed(self, tool: str, arguments: dict, verb: str | None, resource: str, namespace: str,
                name: str | None = None, subresource: str | None = None) -> tuple[ToolOutcome, dict]:
        outcome, mark = self._call(tool, arguments)
        assert not outcome.is_error, str(outcome)
        event = self.audited(mark, verb, resource, namespace, name, subresource, outcome=outcome)
        code = event["responseStatus"]["code"]
        assert 200 <= code < 300 or code == 101 and subresource == "exec", (str(outcome), event)
        assert event["annotations"]["jitgate.dev/decision"] == "allow", event
        return outcome, event

    def refused(self, tool: str, arguments: dict, says: str, verb: str | None, resource: str, namespace: str,
                name: str | None = None, subresource: str | None = None, guardrail: str | None = None) -> tuple[ToolOutcome, dict]:
        outcome, mark = self._call(tool, arguments)
        assert says in outcome.text, f"the refusal did not reach the model:\n{outcome}"
        event = self.audited(mark, verb, resource, namespace, name, subresource, code=403, outcome=outcome)
        assert event["annotations"]["jitgate.dev/decision"] == "deny", event
        if guardrail:
            assert event["annotations"]["jitgate.dev/guardrail"] == guardrail, event
        return outcome, event

    def held(self, tool: str, arguments: dict, verb: str, resource: str, namespace: str, name: str | None = None,
             annotation: str = "jitgate.dev/held-for-request") -> tuple[ToolOutcome, dict]:
        """The call waits at the gateway until a reviewer approves the request it filed, then passes."""
        mark = self.world.audit_mark()
        box: list = []
        thread = threading.Thread(target=lambda: box.append(self._call(tool, arguments, timeout=60)))
        thread.start()
        try:
            request = self.world.pending_for(self.agent)
            time.sleep(0.5)
            assert thread.is_alive(), f"{tool} was not held: {box}"
            assert not [e for e in self.world.audit_since(mark) if e.get("objectRef", {}).get("resource") == resource
                        and e["verb"] == verb and e["stage"] == "RequestReceived"], "a held call reached the cluster"
            self.world.approve(request["id"])
            thread.join(45)
            assert not thread.is_alive(), f"{tool} still held after the approval"
        finally:
            thread.join(60)
        assert box, f"{tool} raised (see the test output)"
        outcome, _ = box[0]
        assert not outcome.is_error, str(outcome)
        event = self.audited(mark, verb, resource, namespace, name, outcome=outcome)
        assert 200 <= event["responseStatus"]["code"] < 300 and event["annotations"].get(annotation) == request["id"], event
        return outcome, event


# --- the tests -------------------------------------------------------------------------------------


def test_a_token_file_kubeconfig_serves_client_go_and_client_node(tmp_path: Path, monkeypatch) -> None:
    """`--token-file` is written for both clients (client-node reads only `token-file`), as an absolute path
    (client-go resolves a relative one against the kubeconfig's folder, client-node against its cwd)."""
    from jitgate.cli.kubeconfig import TokenSource

    monkeypatch.chdir(tmp_path)
    assert TokenSource(token_file="agent/id-token").user_entry() == {
        "tokenFile": str(tmp_path / "agent/id-token"), "token-file": str(tmp_path / "agent/id-token")}
    assert TokenSource(exec_command=(str(TOKEN_PLUGIN), "/run/agent/id-token")).user_entry()["exec"]["args"] == ["/run/agent/id-token"]
    assert TokenSource(token="t").user_entry() == {"token": "t"}


@pytest.mark.parametrize("mode,credential", GO_CASES, ids=[f"{m}-{c}" for m, c in GO_CASES])
def test_kubernetes_mcp_server_tools_under_the_agents_grant_and_guardrails(world: World, mode: str, credential: str) -> None:
    agent = world.agent(f"go-{mode}", mode, credential)
    c = Conversation(world, GO, agent)
    # The SDK speaks the current revision with it (server/discover, no initialize)
    assert (c.session.server_name, c.session.protocol_version) == ("kubernetes-mcp-server", "2026-07-28")
    pod = f"agent-app-{mode}"

    out, event = c.allowed("pods_list_in_namespace", {"namespace": "dev"}, "list", "pods", "dev")
    assert "toolbox" in out.text and event["userAgent"].startswith("kubernetes-mcp-server/v0.0.67 ")
    out, _ = c.allowed("pods_get", {"namespace": "dev", "name": "toolbox"}, "get", "pods", "dev", "toolbox")
    assert "hello from toolbox" in out.text
    out, event = c.allowed("resources_get", {"apiVersion": "v1", "kind": "Secret", "namespace": "dev", "name": "db-credentials"},
                           "get", "secrets", "dev", "db-credentials")
    assert f"password: {MASKED_B64}" in out.text and event["annotations"].get("jitgate.dev/masked")
    # apply (server-side apply: a patch), then the new pod's logs and an exec: values masked on the way back
    out, _ = c.allowed("resources_create_or_update", {"resource": APP_POD.format(name=pod)}, "patch", "pods", "dev", pod)
    assert pod in out.text
    out, _ = c.allowed("pods_log", {"namespace": "dev", "name": pod}, "get", "pods", "dev", pod, "log")
    assert "DB_PASSWORD=[masked:" in out.text and "MODE=agent-mode" in out.text
    out, _ = c.allowed("pods_exec", {"namespace": "dev", "name": pod, "command": ["env"]}, None, "pods", "dev", pod, "exec")
    assert "DB_PASSWORD=[masked:" in out.text and "MODE=agent-mode" in out.text
    # guardrails: no shells for agents, no privileged pods for anyone
    c.refused("pods_exec", {"namespace": "dev", "name": pod, "command": ["sh", "-c", "id"]},
              "jitgate: guardrail 'agents-run-no-shells' denies", None, "pods", "dev", pod, "exec", guardrail="agents-run-no-shells")
    c.refused("resources_create_or_update", {"resource": PRIVILEGED_POD.format(name=f"root-{mode}")},
              "jitgate: guardrail 'no-privileged-workloads' denies", "patch", "pods", "dev", f"root-{mode}",
              guardrail="no-privileged-workloads")
    # no grant in prod: the model reads the exact command to ask
    c.refused("pods_list_in_namespace", {"namespace": "prod"},
              "jitgate request --cluster dev --namespace prod --resource pods --verb list", "list", "pods", "prod")
    # a delete waits for a human, then goes through
    out, _ = c.held("pods_delete", {"namespace": "dev", "name": pod}, "delete", "pods", "dev", pod,
                    annotation="jitgate.dev/guardrail-approval")
    assert "deleted" in out.text.lower(), out.text
    assert world.dev.json("GET", f"/api/v1/namespaces/dev/pods/{pod}", token=INSPECTOR_TOKEN)[0] == 404


@pytest.mark.parametrize("mode,credential", NODE_CASES, ids=[f"{m}-{c}" for m, c in NODE_CASES])
def test_mcp_server_kubernetes_tools_under_the_agents_grant_and_guardrails(world: World, mode: str, credential: str) -> None:
    agent = world.agent(f"node-{mode}", mode, credential)
    c = Conversation(world, NODE, agent)
    # mcp-server-kubernetes's name for itself; the SDK falls back to the initialize handshake with it
    assert (c.session.server_name, c.session.protocol_version) == ("kubernetes", "2025-11-25")
    pod = f"agent-app-node-{mode}"

    out, event = c.allowed("kubectl_get", {"resourceType": "pods", "namespace": "dev"}, "list", "pods", "dev")
    assert "toolbox" in out.text and event["userAgent"].startswith(f"kubectl/{KUBECTL_VERSION} ")  # the venv's kubectl
    out, _ = c.allowed("kubectl_get", {"resourceType": "pods", "namespace": "dev", "name": "toolbox", "output": "yaml"},
                       "get", "pods", "dev", "toolbox")
    assert "hello from toolbox" in out.text
    # The server masks Secrets in kubectl_get itself ("***"); kubectl_generic shows what the gateway sent.
    out, event = c.allowed("kubectl_generic", {"command": "get", "resourceType": "secret", "name": "db-credentials",
                                               "namespace": "dev", "outputFormat": "json"}, "get", "secrets", "dev", "db-credentials")
    assert json.loads(out.text)["data"] == {"password": MASKED_B64, "username": MASKED_B64}
    assert event["annotations"].get("jitgate.dev/masked")
    # client-side apply: a get (404), then a create (whose audit event names the object: test below)
    out, _ = c.allowed("kubectl_apply", {"manifest": APP_POD.format(name=pod), "namespace": "dev"}, "create", "pods", "dev")
    assert f"pod/{pod} created" in out.text
    out, _ = c.allowed("kubectl_logs", {"resourceType": "pod", "name": pod, "namespace": "dev"}, "get", "pods", "dev", pod, "log")
    assert "DB_PASSWORD=[masked:" in out.text and "MODE=agent-mode" in out.text
    out, _ = c.allowed("exec_in_pod", {"name": pod, "namespace": "dev", "command": ["env"]}, None, "pods", "dev", pod, "exec")
    assert "DB_PASSWORD=[masked:" in out.text and "MODE=agent-mode" in out.text
    # MCP resources come through @kubernetes/client-node, with the same kubeconfig
    mark = world.audit_mark()
    res = c.session.read_resource("k8s://dev/pods")
    assert not res.is_error and "toolbox" in res.text, str(res)
    assert_no_secret(res.text, "k8s://dev/pods", c.tokens)
    c.audited(mark, "list", "pods", "dev", code=200, outcome=res)

    c.refused("exec_in_pod", {"name": pod, "namespace": "dev", "command": ["sh", "-c", "id"]},
              "jitgate: guardrail 'agents-run-no-shells' denies", None, "pods", "dev", pod, "exec", guardrail="agents-run-no-shells")
    c.refused("kubectl_apply", {"manifest": PRIVILEGED_POD.format(name=f"root-node-{mode}"), "namespace": "dev"},
              "jitgate: guardrail 'no-privileged-workloads' denies", "create", "pods", "dev", guardrail="no-privileged-workloads")
    c.refused("kubectl_get", {"resourceType": "pods", "namespace": "prod"},
              "jitgate request --cluster dev --namespace prod --resource pods --verb list", "list", "pods", "prod")
    out, _ = c.held("kubectl_delete", {"resourceType": "pod", "name": pod, "namespace": "dev"}, "delete", "pods", "dev", pod,
                    annotation="jitgate.dev/guardrail-approval")
    assert f'pod "{pod}" deleted' in out.text, out.text
    assert world.dev.json("GET", f"/api/v1/namespaces/dev/pods/{pod}", token=INSPECTOR_TOKEN)[0] == 404


LIST_PODS = {GO: lambda ns: ("pods_list_in_namespace", {"namespace": ns}),
             NODE: lambda ns: ("kubectl_get", {"resourceType": "pods", "namespace": ns})}


@pytest.mark.parametrize("server,mode,credential", [(GO, "reverse", "token-file"), (NODE, "proxy", "token-file")])
def test_grant_approved_mid_conversation_and_a_held_call_released(world: World, server: str, mode: str, credential: str) -> None:
    agent = world.agent(f"conversation-{server}", mode, credential, grant=False)
    c = Conversation(world, server, agent)
    tool, args = LIST_PODS[server]("prod")
    out, _ = c.refused(tool, args, "Request access (rule agent-prod-read, needs 1 approval(s) from oidc:sre) with:",
                       "list", "pods", "prod")
    # What the model read is what it (or its operator) runs: the command from the tool result, as is.
    command = shlex.split(re.search(r"jitgate request [^\n]*", out.text).group(0))
    command[command.index("--reason") + 1] = "agent: why is the api pod restarting"
    filed = subprocess.run([JITGATE, *command[1:]], env=kubectl_env(agent.kubeconfig), capture_output=True, text=True,
                           timeout=60, check=True).stdout  # as the README says: KUBECONFIG=<the agent's> jitgate request ...
    request_id = re.search(r"\breq-[a-z0-9]+", filed).group(0)
    c.refused(tool, args, f"your access request {request_id} covers it", "list", "pods", "prod")
    world.approve(request_id)
    # The gateway sees an approval made through its access API at once (test below).
    out, event = c.allowed(tool, args, "list", "pods", "prod")  # same session, next call
    assert "api" in out.text and "worker" in out.text
    assert event["annotations"]["jitgate.dev/access-request"] == request_id
    assert event["annotations"]["jitgate.dev/approvers"] == "rita@example.com"

    # namespace default: rule agent-default-held holds the unattended agent's call until a human decides
    tool, args = LIST_PODS[server]("default")
    out, _ = c.held(tool, args, "list", "pods", "default")
    assert "nginx" in out.text


@pytest.mark.parametrize("server,mode,credential", [(GO, *GO_CASES[0]), (GO, *GO_CASES[1]), (NODE, *NODE_CASES[0]),
                                                    (NODE, *NODE_CASES[1])])
def test_configuration_tools_show_no_token_and_no_cluster_credential(world: World, server: str, mode: str, credential: str) -> None:
    agent = world.agent(f"{'go' if server == GO else 'node'}-{mode}", mode, credential)
    session = world.session(server, agent)
    if server == GO:
        views = [session.call("configuration_view", {"minified": True}), session.call("configuration_view", {"minified": False})]
    else:
        views = [session.call("kubectl_context", {"operation": "list", "detailed": True}),
                 session.call("kubectl_generic", {"command": "config", "subCommand": "view", "args": ["--raw"]})]
    for view in views:
        assert not view.is_error, str(view)
        for secret in (world.alice_token, world.rita_token, agent.token, *CLUSTER_CREDENTIALS):
            assert secret not in view.text, f"{secret[:16]}... in {view}"
    raw = views[-1].text  # the whole kubeconfig
    assert (world.gateway.reverse_url("dev") if mode == "reverse" else world.gateway.proxy_url) in raw, raw
    if credential == "token-file":
        assert str(agent.token_file) in raw  # only where the token is, never the token
    else:
        assert str(TOKEN_PLUGIN) in raw


def test_readme_shows_the_configuration_and_commands_the_tests_run(world: World) -> None:
    (config,) = [json.loads(b) for b in readme_blocks("json")]
    assert config == client_config(), "the README's mcpServers JSON is docs/agents/mcp-servers.json"
    assert EXAMPLE_KUBECONFIG in json.dumps(config)
    commands = readme_kubeconfig_commands()
    assert {("--token-file" in c, "--exec-command" in c) for c in commands} == {(True, False), (False, True)}
    for c in commands:
        assert option(c, "-o") == [EXAMPLE_KUBECONFIG]
    # What the agent sees when refused, as the README shows it: the servers' own words around the gateway's.
    shown = readme_blocks("text")
    assert len(shown) == 2
    go = world.agent("go-proxy", *GO_CASES[0])
    node = world.agent("node-reverse", *NODE_CASES[1])
    for sample, (server, agent) in zip(shown, [(GO, go), (NODE, node)]):
        tool, args = LIST_PODS[server]("prod")
        outcome = world.session(server, agent).call(tool, args)
        assert sample.strip() in outcome.text, f"README sample:\n{sample}\nactual:\n{outcome.text}"


# --- gateway problems found on the way (fixed; the tests keep them fixed) ---------------------------


class Direct:
    """One kept-alive HTTPS connection to the gateway's reverse listener: the fastest a caller can be."""

    def __init__(self, world: World, token: str) -> None:
        import http.client
        import ssl

        ctx = ssl.create_default_context(cafile=str(world.gateway.ca_path))
        ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT  # mitmproxy's CA lacks what Python's strict mode wants
        self.conn = http.client.HTTPSConnection("127.0.0.1", world.gateway.reverse["dev"][1], context=ctx, timeout=10)
        self.token = token

    def __call__(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()


def test_an_approval_counts_for_the_agents_very_next_call(world: World) -> None:
    """Seen first through kubernetes-mcp-server (a retry right after `jitgate approve` returned); shown here
    with the agent's and the reviewer's calls sent straight to the gateway, so that the next call comes
    well within the 100 ms however busy the machine is."""
    agent = world.agent("prompt-agent", "reverse", "token-file", grant=False)
    as_agent, as_reviewer = Direct(world, agent.token), Direct(world, world.rita_token)
    pods = "/api/v1/namespaces/prod/pods"
    stale = []
    for trial in range(5):
        filed = world.cli(agent.kubeconfig, "request", "--cluster", "dev", "--namespace", "prod", "--resource", "pods",
                          "--verb", "list", "--duration", "15m", "--reason", f"trial {trial}").stdout
        request_id = re.search(r"\breq-[a-z0-9]+", filed).group(0)
        time.sleep(0.15)  # so that the next call re-reads the store's change counter
        assert as_agent("GET", pods)[0] == 403
        assert as_reviewer("POST", f"/jitgate/v1/requests/{request_id}/approve", {"reason": "ok"})[0] == 200
        code, body = as_agent("GET", pods)
        if code != 200:
            stale.append(json.loads(body)["message"])
        world.cli(world.rita, "revoke", request_id, "--reason", "next trial")
        time.sleep(0.3)
    assert not stale, f"refused right after the approval, {len(stale)} of 5 times:\n{stale[0]}"


CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}, namespace: dev}}
data: {{created-by: agent}}
"""


def test_audit_names_the_object_an_agents_create_makes(world: World) -> None:
    agent = world.agent("node-reverse", *NODE_CASES[1])
    c = Conversation(world, NODE, agent)
    _, event = c.allowed("kubectl_apply", {"manifest": CONFIG_MAP.format(name="agent-notes"), "namespace": "dev"},
                         "create", "configmaps", "dev")
    assert event["objectRef"].get("name") == "agent-notes", event["objectRef"]
