"""The proxies under test, as processes: bare `mitmdump` and the jitgate gateway, started with the
same listeners and the same options, so the only difference is the addon chain. CPU time and peak
memory come from /proc of the proxy process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.upstream import on_cpus
from testkit.net import free_port, stop, wait_for_port

REPO = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
GATEWAY_SCRIPT = REPO / "addons" / "gateway.py"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Identical for both proxies. No per-flow or per-connection console lines (printing would weigh on
# both; warnings and errors are still logged), and lazy
# upstream connections: jitgate forces `lazy` (no upstream connection before a call is checked), so
# bare mitmdump runs the same way and the comparison isolates the addons.
COMMON_OPTIONS = {"flow_detail": "0", "termlog_verbosity": "warn", "connection_strategy": "lazy"}


@dataclass(frozen=True)
class Usage:
    """What a proxy process used between two samples."""

    cpu_seconds: float
    peak_rss_kb: int


class ProcStat:
    """CPU time and memory of one process from /proc (all of its threads)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            # The command name (field 2) may hold spaces; fields after its ')' are fixed.
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def _status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/{self.pid}/status has no {key}")

    def rss_kb(self) -> int:
        return self._status_kb("VmRSS")

    def peak_rss_kb(self) -> int:
        return self._status_kb("VmHWM")

    def reset_peak(self) -> bool:
        """Start a new peak-RSS window (Linux: writing 5 to clear_refs); False if not permitted."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


class ProxyProcess:
    """One mitmdump with a regular (CONNECT) listener and a reverse listener for the cluster."""

    def __init__(self, name: str, workdir: Path, cluster_url: str, ca_file: Path, *,
                 policy: Path | None = None, env: dict[str, str] | None = None,
                 cpus: Iterable[int] | None = None, extra_options: dict[str, str] | None = None,
                 script: Path = GATEWAY_SCRIPT) -> None:
        self.name = name
        self.script = script  # the gateway's addon script (a benchmark variant of it for feature costs)
        self.workdir = workdir / name
        self.cluster_url = cluster_url
        self.policy = policy  # None: bare mitmdump, no addons
        self.env = env
        self.cpus = cpus
        self.regular_port = free_port()
        self.reverse_port = free_port()
        self.log_path = self.workdir / "mitmdump.log"
        self.options = {**COMMON_OPTIONS, "confdir": str(self.workdir / "confdir"),
                        # Bare mitmdump verifies the upstream against the same CA the policy names.
                        "ssl_verify_upstream_trusted_ca": str(ca_file), **(extra_options or {})}
        if policy is not None:
            self.options.update(policy=str(policy), audit_log=str(self.workdir / "audit.log"),
                                grant_store=str(self.workdir / "grants.db"))
        self.proc: subprocess.Popen | None = None
        self.stat: ProcStat | None = None

    @property
    def is_gateway(self) -> bool:
        return self.policy is not None

    @property
    def regular_proxy(self) -> str:
        return f"127.0.0.1:{self.regular_port}"

    @property
    def reverse_url(self) -> str:
        return f"https://127.0.0.1:{self.reverse_port}"

    def command(self) -> list[str]:
        cmd = [str(MITMDUMP)]
        if self.is_gateway:
            cmd += ["-s", str(self.script)]
        cmd += ["--mode", f"regular@127.0.0.1:{self.regular_port}",
                "--mode", f"reverse:{self.cluster_url}@127.0.0.1:{self.reverse_port}"]
        for key, value in self.options.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    def start(self) -> "ProxyProcess":
        return self.launch().wait_ready()

    def launch(self) -> "ProxyProcess":
        """Start the process without waiting for it (several proxies start faster side by side)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, preexec_fn=on_cpus(self.cpus))
        return self

    def wait_ready(self) -> "ProxyProcess":
        try:
            wait_for_port(self.regular_port, self.proc, timeout=60)
            wait_for_port(self.reverse_port, self.proc, timeout=20)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}") from None
        self.stat = ProcStat(self.proc.pid)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=10)
