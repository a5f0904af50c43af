"""The quick-start demo: a local stand-in cluster, a real OIDC provider and the gateway in front.

    scripts/quickstart                      # run until Ctrl-C
    scripts/quickstart --no-wait            # set up, show kubectl working through the gateway, stop
    scripts/quickstart --state /tmp/demo2   # a second, independent demo beside a running one

Everything it makes lives in state/demo/ (certificates, the cluster token only the gateway reads,
kubeconfigs for alice and the reviewers bob and carol, the agent mcp-agent's ID token, kubeconfig and
MCP host configuration, the grant store) and state/audit.log; the
gateway's CA is made in certs/ on first start. With `--state DIR` all of it, the gateway's CA too,
lives under DIR instead, and the clone's state/ and certs/ are not touched. One quick start at a
time uses a state folder (a second one is refused, never clobbers it).

The ports are the ones policies/demo.yaml names (and 18080, 17443 for the gateway); when one is
taken, or with `--ports auto`, free ports are used. With other ports or another folder the gateway
runs a copy of policies/demo.yaml with them (state/demo/policy.yaml); the kubeconfigs it writes
always name the ports in use.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jitgate.cli import kubeconfig  # noqa: E402
from jitgate.policy.loader import load_policy  # noqa: E402
from testkit.net import TestCA, stop, wait_for_port  # noqa: E402
from testkit.oidc_provider import OIDCProviderProcess  # noqa: E402

POLICY = REPO / "policies" / "demo.yaml"
DEFAULT_STATE = REPO / "state"
DEFAULT_CERTS = REPO / "certs"
STANDIN, IDP, REGULAR, REVERSE = "stand-in cluster", "OIDC provider", "gateway (regular mode)", "gateway (reverse mode)"
DEMO_PORTS = {STANDIN: 16443, IDP: 16600, REGULAR: 18080, REVERSE: 17443}
ENDPOINT = "https://api.demo.jitgate.test:443"
AGENT = "mcp-agent@example.com"  # the demo's agent: group `agents` (policies/demo.yaml's agent-read-dev)
TOKEN_PLUGIN = REPO / "docs" / "agents" / "agent-token-plugin"
MCP_CONFIG = REPO / "docs" / "agents" / "mcp-servers.json"  # what an agent host runs; the demo names its own kubeconfig
EXAMPLE_KUBECONFIG = "/home/agent/.kube/jitgate-dev"  # the kubeconfig path MCP_CONFIG names
BIN = Path(sys.executable).parent


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (bound the way servers bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(names: list[str]) -> dict[str, int]:
    # Hold every socket until all are chosen, so no two names get the same port.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in names]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return {name: s.getsockname()[1] for name, s in zip(names, sockets)}


def choose_ports(mode: str) -> dict[str, int]:
    if mode == "demo":
        busy = [f"{name} {port}" for name, port in DEMO_PORTS.items() if not port_free(port)]
        if not busy:
            return dict(DEMO_PORTS)
        print(f"quickstart: already in use: {', '.join(busy)}; using free ports instead", file=sys.stderr)
    return free_ports(list(DEMO_PORTS))


def lock_state(root: Path) -> IO[str] | None:
    """Hold the state folder for this run (released when the process ends, however it ends);
    None when another quick start holds it."""
    root.mkdir(parents=True, exist_ok=True)
    handle = (root / ".quickstart.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        print(f"quickstart: another quick start (pid {holder or '?'}) is using {shown(root)}; stop it (Ctrl-C), "
              "or give this one a folder of its own: --state DIR", file=sys.stderr)
        return None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def write_policy(state: Path, demo: Path, ports: dict[str, int]) -> Path:
    """The policy folder the gateway runs: a copy of policies/demo.yaml beside the demo's files with
    this run's ports and paths, and the default guardrail pack (policies/guardrails.yaml) beside it."""
    text = POLICY.read_text()
    for old, new in ((f"connect: 127.0.0.1:{DEMO_PORTS[STANDIN]}", f"connect: 127.0.0.1:{ports[STANDIN]}"),
                     (f"issuer: https://127.0.0.1:{DEMO_PORTS[IDP]}", f"issuer: https://127.0.0.1:{ports[IDP]}"),
                     ("../state/demo/", "")):  # relative to the copy's folder, state/demo/ itself
        if old not in text:
            raise SystemExit(f"quickstart: {POLICY} no longer contains {old!r}; update scripts/demo.py to match")
        text = text.replace(old, new)
    text = text.replace("$schema=../", f"$schema={REPO}/")  # the editor's schema, if the policy names one
    path = demo / "policy.yaml"
    path.write_text("# Written by scripts/quickstart from policies/demo.yaml with this run's ports and folder;\n"
                    "# rewritten at every start (edit policies/demo.yaml instead).\n" + text)
    pack = (REPO / "policies" / "guardrails.yaml").read_text().replace("$schema=../", f"$schema={REPO}/")
    (demo / "guardrails.yaml").write_text(pack)
    return demo  # a folder: policy.yaml and guardrails.yaml, read in name order


def shown(path: Path) -> str:
    """A path as the user types it: relative to where they ran the quick start, when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-wait", action="store_true", help="stop after showing kubectl working through the gateway")
    parser.add_argument("--user", default="alice", help="demo user (default: alice)")
    parser.add_argument("--groups", default="developers,sre", help="comma-separated groups (default: developers,sre)")
    parser.add_argument("--state", type=Path, metavar="DIR",
                        help="folder for everything the demo makes, the gateway's CA included "
                             "(default: state/ in the clone, with the CA in certs/)")
    parser.add_argument("--ports", choices=("demo", "auto"), default="demo",
                        help="demo (default): the demo policy's ports, or free ones when any is taken; auto: free ports")
    args = parser.parse_args()

    state = args.state.resolve() if args.state else DEFAULT_STATE
    certs = DEFAULT_CERTS if state == DEFAULT_STATE else state / "certs"
    demo, audit_log = state / "demo", state / "audit.log"
    lock = lock_state(state)
    if lock is None:
        return 2
    ports = choose_ports(args.ports)

    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True, mode=0o700)
    policy = write_policy(state, demo, ports)
    ca = TestCA.create(demo)  # demo/ca.pem: signs the stand-in's and the provider's certificates
    cluster_token = demo / "cluster-token"
    cluster_token.write_text(secrets.token_urlsafe(32))
    cluster_token.chmod(0o600)
    cert, key = ca.issue("standin", ["127.0.0.1", "localhost", "api.demo.jitgate.test"])
    gateway_log_path = demo / "gateway.log"

    procs: list[subprocess.Popen] = []
    idp = OIDCProviderProcess(demo / "idp", token_max_age=12 * 3600)  # the demo's tokens last a working day

    def shutdown(*_: object) -> None:
        for proc in reversed(procs):
            stop(proc)
        idp.stop()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        standin_log = (demo / "standin.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "testkit.standin", "--port", str(ports[STANDIN]), "--cert", str(cert),
             "--key", str(key), "--token-file", str(cluster_token)],
            stdout=standin_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO))
        idp.start(ca, port=ports[IDP])
        wait_for_port(ports[STANDIN], procs[0])

        gateway_log = gateway_log_path.open("wb")
        gateway = subprocess.Popen(
            [str(BIN / "mitmdump"), "-s", str(REPO / "addons/gateway.py"), "--set", f"policy={policy}",
             "--set", f"confdir={certs}", "--set", f"audit_log={audit_log}",
             "--set", f"grant_store={demo / 'jitgate.db'}", "--set", f"recordings={state / 'recordings'}",
             "--mode", f"regular@127.0.0.1:{ports[REGULAR]}",
             "--mode", f"reverse:{ENDPOINT}@127.0.0.1:{ports[REVERSE]}"],
            cwd=REPO, stdout=gateway_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(gateway)
        wait_for_port(ports[REGULAR], gateway, timeout=30)
        wait_for_port(ports[REVERSE], gateway, timeout=30)
        print(f"quickstart: stand-in cluster on 127.0.0.1:{ports[STANDIN]}, OIDC provider on 127.0.0.1:{ports[IDP]}, "
              f"gateway on 127.0.0.1:{ports[REGULAR]} (regular mode) and 127.0.0.1:{ports[REVERSE]} (reverse mode); "
              f"files in {shown(state)}/")

        cluster = load_policy(policy).by_name["demo"]
        gateway_ca = (certs / "mitmproxy-ca-cert.pem").read_bytes()
        reverse_url = f"https://127.0.0.1:{ports[REVERSE]}"
        users = {args.user: args.groups.split(","), "bob": ["sre"], "carol": ["sre"]}
        for name, groups in users.items():
            email = f"{name}@example.com"
            tokens = kubeconfig.TokenSource(token=idp.token(name, email=email, email_verified=True, groups=groups))
            kubeconfig.write(kubeconfig.build_kubeconfig(cluster, email, gateway_ca, tokens, server_url=reverse_url),
                             demo / f"kubeconfig-{name}")
            if name == args.user:
                kubeconfig.write(kubeconfig.build_kubeconfig(
                    cluster, email, gateway_ca, tokens, proxy_url=f"http://127.0.0.1:{ports[REGULAR]}"),
                    demo / "kubeconfig-proxy")
        agent_command = write_agent(demo, idp, policy, certs / "mitmproxy-ca-cert.pem", reverse_url)
        email = f"{args.user}@example.com"

        def run(*argv: str, user: str = args.user) -> subprocess.CompletedProcess:
            env = {**os.environ, "KUBECONFIG": str(demo / f"kubeconfig-{user}"), "KUBECACHEDIR": str(demo / "kube-cache" / user)}
            shown_argv = shlex.join(argv)
            print(f"\n$ {shown_argv}" + (f"      # as {user}" if user != args.user else ""))
            result = subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env, capture_output=True, text=True, timeout=60)
            print((result.stdout + result.stderr).rstrip())
            return result

        print(f"You are {email} (groups: {args.groups}), holding only an OIDC ID token. Nobody has standing access:")
        refused = run("kubectl", "get", "pods", "-n", "dev")
        granted = run("jitgate", "request", "--cluster", "demo", "--namespace", "dev", "--resource", "pods",
                      "--verb", "get", "--verb", "list", "--verb", "watch", "--duration", "1h", "--reason", "quick start")
        result = run("kubectl", "get", "pods", "-n", "dev")
        last = json.loads(audit_log.read_text().splitlines()[-1])
        print(f"\nlast audit event ({shown(audit_log)}): {last['verb']} {last['requestURI']} by {last['user']['username']} "
              f"-> {last['responseStatus']['code']} ({last['annotations'].get('jitgate.dev/decision')}, "
              f"grant {last['annotations'].get('jitgate.dev/grant')})")
        if refused.returncode != 0 and granted.returncode == 0 and result.returncode == 0:
            print(instructions(demo, args.user, waiting=not args.no_wait, agent_command=agent_command))
        else:
            print(f"quickstart: the demo did not go as expected; see {shown(gateway_log_path)}", file=sys.stderr)
            return 1
        sys.stdout.flush()
        if args.no_wait:
            return 0
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print(f"quickstart: a process ended; see {shown(demo)}/*.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        shutdown()


def write_agent(demo: Path, idp: OIDCProviderProcess, policy: Path, gateway_ca: Path, server_url: str) -> list[str]:
    """The demo's agent: an identity of its own (group `agents`, which the demo policy's agent rules
    name), its ID token in a file only its token plugin reads, a kubeconfig `jitgate kubeconfig` writes
    with that plugin (so no token sits in it for an MCP server's configuration tool to show the model),
    and the MCP host configuration (docs/agents/mcp-servers.json's kubernetes-mcp-server with that
    kubeconfig). Returns the `jitgate kubeconfig` command it ran."""
    from jitgate.cli.main import main as jitgate

    token_file = demo / "agent.token"
    token_file.touch(mode=0o600)
    token_file.write_text(idp.token(AGENT.split("@")[0], email=AGENT, email_verified=True, groups=["agents"]))  # no newline
    kubeconfig_path = demo / "kubeconfig-agent"
    argv = ["kubeconfig", "--policy", str(policy), "--cluster", "demo", "--user", AGENT, "--namespace", "dev",
            "--server", server_url, "--gateway-ca", str(gateway_ca),
            "--exec-command", str(TOKEN_PLUGIN), str(token_file), "-o", str(kubeconfig_path)]
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # its "wrote ...": the note after the walkthrough
        code = jitgate(argv)
    if code != 0:
        raise SystemExit(f"quickstart: jitgate kubeconfig for the agent failed ({code})")
    text = MCP_CONFIG.read_text()  # as shown in the README, with this kubeconfig
    if json.dumps(EXAMPLE_KUBECONFIG) not in text or "kubernetes" not in json.loads(text)["mcpServers"]:
        raise SystemExit(f"quickstart: {MCP_CONFIG} no longer names {EXAMPLE_KUBECONFIG} for server kubernetes; "
                         "update scripts/demo.py to match")
    (demo / "mcp-servers.json").write_text(text.replace(json.dumps(EXAMPLE_KUBECONFIG), json.dumps(str(kubeconfig_path))))
    # As the user would type it; the plugin and its token file stay absolute (the server runs them from
    # wherever it runs).
    relative = {str(policy), str(gateway_ca), str(kubeconfig_path)}
    return ["jitgate", *(shown(Path(a)) if a in relative else a for a in argv)]


def walkthrough(demo: Path, user: str = "alice") -> str:
    """What to paste into another terminal. The README shows the same block (its first line with the
    clone's default paths); tests/test_quickstart.py pastes this one as printed and checks they agree."""
    return f"""\
cd {shlex.quote(str(REPO))} && export JITGATE_DEMO={shlex.quote(str(demo))}
export PATH=$PWD/.venv/bin:$PATH KUBECONFIG=$JITGATE_DEMO/kubeconfig-{user}    # or kubeconfig-proxy (regular mode)
kubectl get pods -n dev                                                       # granted by the quick start
req=$(jitgate request --cluster demo --namespace prod --resource pods --resource pods/exec \\
    --verb get --verb create --duration 30m --reason "look at the api pod" -o id)
KUBECONFIG=$JITGATE_DEMO/kubeconfig-bob   jitgate approve $req                # two different SREs, never the requester
KUBECONFIG=$JITGATE_DEMO/kubeconfig-carol jitgate approve $req
kubectl exec -n prod api -- cat /etc/hostname
KUBECONFIG=$JITGATE_DEMO/kubeconfig-bob jitgate revoke $req --reason "done"   # a reviewer ends it; live sessions end too
jitgate whoami
tail -n 1 $JITGATE_DEMO/../audit.log | python3 -m json.tool
# An agent: kubernetes-mcp-server (npm) under its own identity, driven over stdio by a tiny MCP host
scripts/install-mcp-servers                                                   # the pinned servers, once (npm)
cat $JITGATE_DEMO/mcp-servers.json                                            # an agent host's config: no token in it
scripts/agent-call --config $JITGATE_DEMO/mcp-servers.json pods_list_in_namespace '{{"namespace": "dev"}}' &
held=$(scripts/agent-call --config $JITGATE_DEMO/mcp-servers.json --held)    # the request the gateway filed for the held call
KUBECONFIG=$JITGATE_DEMO/kubeconfig-bob jitgate approve $held                 # a reviewer approves: the call goes on
wait $!                                                                       # the agent reads the pods
KUBECONFIG=$JITGATE_DEMO/kubeconfig-bob jitgate revoke $held --reason "task done"   # no standing access left
jitgate audit --log $JITGATE_DEMO/../audit.log --user {AGENT} -n dev  # under the agent's own name
"""


def instructions(demo: Path, user: str, waiting: bool, agent_command: list[str]) -> str:
    if waiting:
        head = "jitgate is running in front of the demo cluster (Ctrl-C stops everything). In another terminal:"
    else:
        head = "The demo stopped (--no-wait). Run scripts/quickstart without it to keep it running, then in another terminal:"
    block = "\n".join(f"    {line}" for line in walkthrough(demo, user).splitlines())
    return f"""
{head}

{block}

The agent {AGENT} (group agents) has an ID token of its own in {shown(demo / "agent.token")}.
Its kubeconfig names the token plugin that reads it, never a token (an MCP server's configuration tool
shows the kubeconfig to the model); it was written with:
{wrapped(agent_command)}
The demo policy's rule agent-read-dev holds the agent's reads in dev until an SRE approves (up to 2 minutes).

The gateway alone holds the cluster token ({shown(demo / "cluster-token")}) and tells the cluster who you
are with impersonation headers. Grants live in {shown(demo / "jitgate.db")}.
"""


def wrapped(argv: list[str], width: int = 100) -> str:
    """A command as a shell reads it, indented and folded with backslashes between options (an option
    stays with its values)."""
    words = [shlex.quote(a) for a in argv]
    groups: list[str] = []
    for word in words:
        if groups and not word.startswith("-") and groups[-1].startswith("-"):
            groups[-1] += " " + word
        else:
            groups.append(word)
    lines, line = [], "   "
    for group in groups:
        if len(line) + 1 + len(group) > width and line.strip():
            lines.append(line + " \\")
            line = "       "
        line += " " + group
    return "\n".join([*lines, line])

if __name__ == "__main__":
    sys.exit(main())
