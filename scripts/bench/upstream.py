"""Everything the proxies talk to: nginx (Kubernetes API stand-in and OIDC issuer), an idle-watch
server, STS (moto_server), and the policy that points the gateway at them. Only 127.0.0.1, free
ports, certificates from the test CA, and every process stopped by its handle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from scripts.bench import bodies
from testkit.moto import MotoServer
from testkit.net import TestCA, free_port, stop, wait_for_port

HERE = Path(__file__).resolve().parent
NGINX_TEMPLATE = HERE / "nginx.conf.in"
ROLE_NAME = "jitgate-bench"
CLUSTER_NAME = "bench"
NAMESPACE = bodies.NAMESPACE
# The benchmark user reads pods at once (immediate approval); Secrets need a reviewer, as in
# production. run.py files both requests through the gateway's access API before measuring.
ACCESS_RULES = (
    "access_rules:",
    "  - name: bench-read",
    f"    requesters: [oidc:{bodies.USER_GROUPS[0]}]",
    f"    clusters: [{CLUSTER_NAME}]",
    f"    namespaces: [{NAMESPACE}]",
    "    resources: [pods, configmaps]",
    "    verbs: [get, list, watch]",
    "    duration: {default: 8h, max: 8h}",
    "    approval: {mode: immediate}",
    "  - name: bench-secrets",
    f"    requesters: [oidc:{bodies.USER_GROUPS[0]}]",
    f"    clusters: [{CLUSTER_NAME}]",
    f"    namespaces: [{NAMESPACE}]",
    "    resources: [secrets]",
    "    verbs: [get, list]",
    "    duration: {default: 8h, max: 8h}",
    f"    approval: {{mode: reviewers, reviewers: [oidc:{bodies.REVIEWER_GROUPS[0]}], required: 1}}",
)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def on_cpus(cpus: Iterable[int] | None):
    """A preexec_fn that pins a child (all its future threads) to `cpus`; None leaves it free."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def render(template: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    return template


class Nginx:
    """nginx serving the canned Kubernetes API on `api_port` and the OIDC issuer on `oidc_port`."""

    def __init__(self, workdir: Path, cert: Path, key: Path, issuer_port: int, cpus: Iterable[int] | None = None) -> None:
        self.workdir = workdir
        self.cert, self.key = cert, key
        self.api_port = free_port()
        self.oidc_port = issuer_port
        self.cpus = cpus
        self.conf = workdir / "nginx.conf"
        self.access_log = workdir / "oidc-access.log"
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def start(self) -> "Nginx":
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (scripts/benchmark installs Debian's nginx-light)")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(render(NGINX_TEMPLATE.read_text(), {
            # Workers drop to an unprivileged user when started as root; they must still read the bodies.
            "USER": "user root;" if os.geteuid() == 0 else "",
            "DIR": str(self.workdir), "BODIES": str(self.workdir / "bodies"),
            "CERT": str(self.cert), "KEY": str(self.key),
            "API_PORT": str(self.api_port), "OIDC_PORT": str(self.oidc_port),
        }))
        self.access_log.touch()
        log = (self.workdir / "nginx.out").open("ab")
        self.proc = subprocess.Popen([binary, "-p", str(self.workdir), "-c", str(self.conf),
                                      "-e", str(self.workdir / "nginx-error.log")],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=on_cpus(self.cpus))
        try:
            wait_for_port(self.api_port, self.proc)
            wait_for_port(self.oidc_port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"nginx did not start: {self.error_log()}") from None
        return self

    def oidc_hits(self) -> int:
        """Requests the OIDC issuer has served so far (discovery and JWKS)."""
        with self.access_log.open("rb") as f:
            return sum(1 for _ in f)

    def worker_pids(self) -> list[int]:
        """The worker processes (they serve the requests; the master only supervises)."""
        if self.proc is None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def error_log(self) -> str:
        path = self.workdir / "nginx-error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)  # SIGTERM: the master stops its worker before it exits


class WatchServer:
    """scripts/bench/watchserver.py as a process: holds `?watch=1` streams open and idle."""

    def __init__(self, workdir: Path, cert: Path, key: Path, cpus: Iterable[int] | None = None) -> None:
        self.workdir = workdir
        self.cert, self.key = cert, key
        self.port = free_port()
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> "WatchServer":
        log = (self.workdir / "watchserver.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "watchserver.py"), "--port", str(self.port),
                                      "--cert", str(self.cert), "--key", str(self.key)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=on_cpus(self.cpus))
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def gateway_env(workdir: Path) -> dict[str, str]:
    """The gateway's own AWS credentials for moto (boto3's chain: environment variables only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="AKIAGATEWAYBENCHKEY1", AWS_SECRET_ACCESS_KEY="gateway-bench-secret",
               AWS_CONFIG_FILE=str(workdir / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(workdir / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


@dataclass
class Backends:
    """The test CA, the issuer and its token, nginx, STS, and a policy for each upstream."""

    workdir: Path
    ca: TestCA
    issuer: bodies.Issuer
    token: str
    reviewer_token: str
    server_cert: Path
    server_key: Path
    nginx: Nginx
    sts: MotoServer | None = None
    role_arn: str = ""

    @classmethod
    def start(cls, workdir: Path, cpus: Iterable[int] | None = None, with_sts: bool = True) -> "Backends":
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)  # nginx workers read the bodies from here
        ca = TestCA.create(workdir / "ca")
        os.chmod(ca.directory, 0o755)
        cert, key = ca.issue("upstream", hosts=["127.0.0.1", "localhost"])
        issuer_port = free_port()
        issuer = bodies.Issuer(f"https://127.0.0.1:{issuer_port}")
        bodies.write_bodies(workdir / "bodies", issuer)
        nginx = Nginx(workdir, cert, key, issuer_port, cpus)
        reviewer_token = issuer.token(bodies.REVIEWER_EMAIL, groups=bodies.REVIEWER_GROUPS)
        backends = cls(workdir, ca, issuer, issuer.token(), reviewer_token, cert, key, nginx)
        try:
            nginx.start()
            if with_sts:
                backends.sts = MotoServer.start(workdir / "sts", ca)
                backends.role_arn = backends.sts.create_role(ROLE_NAME)
        except BaseException:
            backends.stop()
            raise
        return backends

    def assume_role_calls(self) -> int | None:
        return len(self.sts.assume_role_calls()) if self.sts else None

    def write_policy(self, path: Path, cluster_url: str) -> Path:
        """A policy with one cluster at `cluster_url` (EKS credential via moto when STS runs), our issuer,
        and the access rules the benchmark user's grants come from."""
        if self.sts is not None:
            credential = ["      eks:", "        region: us-east-1", f"        cluster_name: {CLUSTER_NAME}",
                          f"        role_arn: {self.role_arn}", f"        sts_endpoint: {self.sts.endpoint_url}",
                          f"        sts_ca_file: {self.ca.cert_path}"]
        else:
            token_file = self.workdir / "cluster-token"
            token_file.write_text("bench-cluster-token-held-by-the-gateway\n")
            credential = [f"      token_file: {token_file}"]
        lines = [
            "# Written by scripts/bench: one cluster (nginx or the idle-watch server) and the static issuer.",
            "clusters:",
            f"  - name: {CLUSTER_NAME}",
            f"    endpoint: {cluster_url}",
            f"    ca_file: {self.ca.cert_path}",
            "    credential:",
            *credential,
            "    impersonate: true",
            *ACCESS_RULES,
            "identity_providers:",
            f"  - issuer: {self.issuer.url}",
            f"    client_ids: [{bodies.CLIENT_ID}]",
            f"    ca_file: {self.ca.cert_path}",
            "    username_claim: email",
            "    groups_claim: groups",
            '    groups_prefix: "oidc:"',
        ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def stop(self) -> None:
        for stoppable in (self.sts, self.nginx):
            if stoppable is not None:
                try:
                    stoppable.stop()
                except Exception as e:  # keep stopping the others
                    print(f"bench: could not stop {stoppable!r}: {e}", file=sys.stderr)
