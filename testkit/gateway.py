"""Start the real gateway (`mitmdump -s addons/gateway.py`) as a separate process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from testkit.net import free_port, stop, wait_for_port

REPO = Path(__file__).resolve().parents[1]
MITMDUMP = Path(sys.executable).with_name("mitmdump")


class GatewayProcess:
    """One mitmdump running the whole jitgate chain, with a regular listener and reverse listeners."""

    def __init__(self, workdir: Path, policy: Path, reverse_endpoints: dict[str, str] | None = None,
                 options: dict[str, str] | None = None, script: str = "addons/gateway.py",
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.policy = policy
        self.confdir = workdir / "certs"
        self.audit_path = workdir / "audit.log"
        self.log_path = workdir / "gateway.log"
        self.proxy_port = free_port()
        # cluster name -> (endpoint, listen port)
        self.reverse = {name: (endpoint, free_port()) for name, endpoint in (reverse_endpoints or {}).items()}
        self.options = {"audit_log": str(self.audit_path), **(options or {})}
        self.script = script
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def reverse_url(self, cluster: str) -> str:
        return f"https://127.0.0.1:{self.reverse[cluster][1]}"

    @property
    def ca_path(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def command(self) -> list[str]:
        cmd = [str(MITMDUMP), "-s", str(REPO / self.script), "--set", f"policy={self.policy}",
               "--set", f"confdir={self.confdir}", "--mode", f"regular@127.0.0.1:{self.proxy_port}"]
        for endpoint, port in self.reverse.values():
            cmd += ["--mode", f"reverse:{endpoint}@127.0.0.1:{port}"]
        for key, value in self.options.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    def start(self) -> "GatewayProcess":
        return self.launch().wait_ready()

    def launch(self) -> "GatewayProcess":
        """Start the process without waiting for it: several gateways start faster side by side."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        return self

    def wait_ready(self) -> "GatewayProcess":
        try:
            wait_for_port(self.proxy_port, self.proc, timeout=30)
            for _, port in self.reverse.values():
                wait_for_port(port, self.proc, timeout=10)
        except Exception:
            self.stop()
            raise RuntimeError(f"gateway did not start:\n{self.log()}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def audit_events(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]
