"""The quick-start demo: a local stand-in cluster, a real OIDC provider and the gateway in front.

    scripts/quickstart              # run until Ctrl-C
    scripts/quickstart --no-wait    # set up, show kubectl working through the gateway, stop

Everything it makes lives in state/demo/ (certificates, the cluster token only the gateway reads,
kubeconfigs for alice and the reviewers bob and carol, the grant store) and state/audit.log; the gateway's CA is made in certs/ on first start. The ports are
the ones policies/demo.yaml names.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jitgate.cli import kubeconfig  # noqa: E402
from jitgate.policy.loader import load_policy  # noqa: E402
from testkit.net import TestCA, stop, wait_for_port  # noqa: E402
from testkit.oidc_provider import OIDCProviderProcess  # noqa: E402

POLICY = REPO / "policies" / "demo.yaml"
STATE = REPO / "state" / "demo"
PORTS = {"stand-in cluster": 16443, "OIDC provider": 16600, "gateway (regular mode)": 18080, "gateway (reverse mode)": 17443}
ENDPOINT = "https://api.demo.jitgate.test:443"
BIN = Path(sys.executable).parent


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-wait", action="store_true", help="stop after showing kubectl working through the gateway")
    parser.add_argument("--user", default="alice", help="demo user (default: alice)")
    parser.add_argument("--groups", default="developers,sre", help="comma-separated groups (default: developers,sre)")
    args = parser.parse_args()

    busy = [f"{name} port {port}" for name, port in PORTS.items() if port_in_use(port)]
    if busy:
        print(f"quickstart: already in use: {', '.join(busy)} (is another quickstart running?)", file=sys.stderr)
        return 2

    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True, mode=0o700)
    ca = TestCA.create(STATE)  # state/demo/ca.pem: signs the stand-in's and the provider's certificates
    cluster_token = STATE / "cluster-token"
    cluster_token.write_text(secrets.token_urlsafe(32))
    cluster_token.chmod(0o600)
    cert, key = ca.issue("standin", ["127.0.0.1", "localhost", "api.demo.jitgate.test"])

    procs: list[subprocess.Popen] = []
    idp = OIDCProviderProcess(STATE / "idp")

    def shutdown(*_: object) -> None:
        for proc in reversed(procs):
            stop(proc)
        idp.stop()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        standin_log = (STATE / "standin.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "testkit.standin", "--port", str(PORTS["stand-in cluster"]), "--cert", str(cert),
             "--key", str(key), "--token-file", str(cluster_token)],
            stdout=standin_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO))
        idp.start(ca, port=PORTS["OIDC provider"])
        wait_for_port(PORTS["stand-in cluster"], procs[0])

        (REPO / "state").mkdir(exist_ok=True)
        gateway_log = (STATE / "gateway.log").open("wb")
        gateway = subprocess.Popen(
            [str(BIN / "mitmdump"), "-s", str(REPO / "addons/gateway.py"), "--set", f"policy={POLICY}",
             "--set", f"confdir={REPO / 'certs'}", "--set", f"audit_log={REPO / 'state/audit.log'}",
             "--set", f"grant_store={STATE / 'jitgate.db'}",
             "--mode", f"regular@127.0.0.1:{PORTS['gateway (regular mode)']}",
             "--mode", f"reverse:{ENDPOINT}@127.0.0.1:{PORTS['gateway (reverse mode)']}"],
            cwd=REPO, stdout=gateway_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(gateway)
        wait_for_port(PORTS["gateway (regular mode)"], gateway, timeout=30)
        wait_for_port(PORTS["gateway (reverse mode)"], gateway, timeout=30)

        cluster = load_policy(POLICY).by_name["demo"]
        gateway_ca = (REPO / "certs/mitmproxy-ca-cert.pem").read_bytes()
        reverse_url = f"https://127.0.0.1:{PORTS['gateway (reverse mode)']}"
        users = {args.user: args.groups.split(","), "bob": ["sre"], "carol": ["sre"]}
        for name, groups in users.items():
            email = f"{name}@example.com"
            tokens = kubeconfig.TokenSource(token=idp.token(name, email=email, email_verified=True, groups=groups))
            kubeconfig.write(kubeconfig.build_kubeconfig(cluster, email, gateway_ca, tokens, server_url=reverse_url),
                             STATE / f"kubeconfig-{name}")
            if name == args.user:
                kubeconfig.write(kubeconfig.build_kubeconfig(
                    cluster, email, gateway_ca, tokens, proxy_url=f"http://127.0.0.1:{PORTS['gateway (regular mode)']}"),
                    STATE / "kubeconfig-proxy")
        email = f"{args.user}@example.com"

        def run(*argv: str, user: str = args.user) -> subprocess.CompletedProcess:
            env = {**os.environ, "KUBECONFIG": str(STATE / f"kubeconfig-{user}"), "KUBECACHEDIR": str(STATE / "kube-cache" / user)}
            shown = shlex.join(argv)
            print(f"\n$ {shown}" + (f"      # as {user}" if user != args.user else ""))
            result = subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env, capture_output=True, text=True, timeout=60)
            print((result.stdout + result.stderr).rstrip())
            return result

        print(f"You are {email} (groups: {args.groups}), holding only an OIDC ID token. Nobody has standing access:")
        refused = run("kubectl", "get", "pods", "-n", "dev")
        granted = run("jitgate", "request", "--cluster", "demo", "--namespace", "dev", "--resource", "pods",
                      "--verb", "get", "--verb", "list", "--verb", "watch", "--duration", "1h", "--reason", "quick start")
        result = run("kubectl", "get", "pods", "-n", "dev")
        audit_lines = (REPO / "state/audit.log").read_text().splitlines()
        last = json.loads(audit_lines[-1])
        print(f"\nlast audit event (state/audit.log): {last['verb']} {last['requestURI']} by {last['user']['username']} "
              f"-> {last['responseStatus']['code']} ({last['annotations'].get('jitgate.dev/decision')}, "
              f"grant {last['annotations'].get('jitgate.dev/grant')})")
        if refused.returncode == 0 or granted.returncode != 0 or result.returncode != 0:
            print("quickstart: the demo did not go as expected; see state/demo/gateway.log", file=sys.stderr)
            return 1
        print(textwrap_instructions(email))
        if args.no_wait:
            return 0
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("quickstart: a process ended; see state/demo/*.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        shutdown()


def textwrap_instructions(email: str) -> str:
    user = email.split("@")[0]
    return f"""
jitgate is running in front of the demo cluster (Ctrl-C stops everything). In another terminal:

    export PATH=$PWD/.venv/bin:$PATH                        # kubectl and jitgate from the venv
    export KUBECONFIG=$PWD/state/demo/kubeconfig-{user}     # or kubeconfig-proxy (regular mode)
    kubectl get pods -n dev -w                              # granted above

    # exec in prod needs two SREs (never the requester):
    jitgate request --cluster demo --namespace prod --resource pods --resource pods/exec \\
        --verb get --verb create --duration 30m --reason "look at the api pod"
    KUBECONFIG=state/demo/kubeconfig-bob   jitgate list --reviewable
    KUBECONFIG=state/demo/kubeconfig-bob   jitgate approve <request id>
    KUBECONFIG=state/demo/kubeconfig-carol jitgate approve <request id>
    kubectl exec -n prod api -- cat /etc/hostname
    KUBECONFIG=state/demo/kubeconfig-bob   jitgate revoke <grant id> --reason "done"   # ends live sessions
    jitgate whoami
    tail -f state/audit.log

The gateway alone holds the cluster token (state/demo/cluster-token) and tells the cluster who you
are with impersonation headers. Grants live in state/demo/jitgate.db.
"""


if __name__ == "__main__":
    sys.exit(main())
