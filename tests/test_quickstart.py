"""The README's first command works: scripts/quickstart sets up and shows kubectl through the gateway.

The tests run it in folders of their own and on free ports, so they never clobber a user's state/
or certs/, and pass while the user's own quick start runs on the demo's ports."""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "scripts/quickstart")
DEMO_PORTS = (16443, 16600, 18080, 17443)  # policies/demo.yaml's, and the gateway's in the README
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
    for name in ("alice", "bob", "carol", "proxy"):
        config = state / f"demo/kubeconfig-{name}"
        assert oct(config.stat().st_mode & 0o777) == "0o600"
        assert (state / "demo/cluster-token").read_text() not in config.read_text()
    # The policy it ran is the shipped demo policy with only this run's ports and paths, and checks clean.
    ran = (state / "demo/policy.yaml").read_text().splitlines()[2:]
    shipped = (REPO / "policies/demo.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, ran, strict=True) if a != b]
    assert changed and all(re.search(r"connect:|issuer:|ca_file:|token_file:|\$schema=", a) for a, _ in changed), changed
    check = subprocess.run([str(REPO / ".venv/bin/jitgate"), "policy", "check", str(state / "demo/policy.yaml")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


def test_a_second_quick_start_never_clobbers_a_running_one(tmp_path: Path) -> None:
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
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(block)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "toolbox" in out and "approved" in out and "revoked" in out and "Username: alice@example.com" in out
    assert out.count("api\n") >= 1, out  # the exec's hostname
    last = json.loads(out[out.rindex("\n{") + 1:])
    assert last["kind"] == "Event" and last["user"]["username"] == "alice@example.com"
