"""The README's first command works: scripts/quickstart sets up and shows kubectl through the gateway."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_kubectl_through_the_gateway() -> None:
    result = subprocess.run([str(REPO / "scripts/quickstart"), "--no-wait"], cwd=REPO, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    # Refused first, with the command to ask; then the request (immediate rule); then the read works.
    assert "Error from server (Forbidden): jitgate: no active grant lets you list pods in namespace dev" in result.stdout
    assert "approved: get, list, watch pods in namespace dev on cluster demo" in result.stdout
    assert "toolbox" in result.stdout and "READY" in result.stdout
    assert "by alice@example.com -> 200 (allow, grant grant-" in result.stdout
    last = json.loads((REPO / "state/audit.log").read_text().splitlines()[-1])
    assert last["user"]["username"] == "alice@example.com"
    # The demo's kubeconfigs hold an ID token only, and are private.
    for name in ("alice", "bob", "carol", "proxy"):
        config = REPO / f"state/demo/kubeconfig-{name}"
        assert oct(config.stat().st_mode & 0o777) == "0o600"
        assert (REPO / "state/demo/cluster-token").read_text() not in config.read_text()
    # With the demo's files in place, the shipped demo policy checks clean.
    check = subprocess.run([str(REPO / ".venv/bin/jitgate"), "policy", "check", str(REPO / "policies/demo.yaml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
