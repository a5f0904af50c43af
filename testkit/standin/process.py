"""Start the Kubernetes API stand-in as a real process, and talk to it directly.

    ca = TestCA.create(tmp_path / "ca")
    api = StandinProcess(tmp_path / "standin").start(ca, tokens=["gateway-token"],
                                                     hostnames=["api.dev.jitgate.test"])
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", token="gateway-token")
    run_kubectl(kubeconfig, "get", "pods", "-A")
    api.requests_seen()   # what the stand-in saw: auth kind, token hash, impersonation headers, ...
    api.stop()
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from testkit.net import TestCA, free_port, stop, wait_for_port

KUBECTL = str(Path(sys.executable).parent / "kubectl")
DEFAULT_TOKEN = "standin-test-token"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StandinProcess:
    """One stand-in process on a free port, with a server certificate from a TestCA."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.tokens: list[str] = []
        self.ca_path: Path | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return self.tokens[0]

    def start(self, ca: TestCA, tokens: list[str] | tuple[str, ...] = (DEFAULT_TOKEN,), eks_cluster: str | None = None,
              client_ca: Path | str | None = None, hostnames: list[str] | tuple[str, ...] = (),
              deny: list[str] | tuple[str, ...] = (), seed: bool = True, log_interval: float = 0.5,
              bookmark_interval: float = 5.0, h2: bool = False, timeout: float = 20.0) -> "StandinProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tokens = list(tokens)
        self.ca_path = ca.cert_path
        cert, key = ca.issue(f"standin-{self.port}", hosts=["127.0.0.1", "localhost", *hostnames])
        args = [sys.executable, "-m", "testkit.standin", "--port", str(self.port), "--cert", str(cert),
                "--key", str(key), "--log-interval", str(log_interval),
                "--bookmark-interval", str(bookmark_interval), "--verbose"]
        for t in self.tokens:
            args += ["--token", t]
        if eks_cluster:
            args += ["--eks-cluster", eks_cluster]
        if client_ca:
            args += ["--client-ca", str(client_ca)]
        for rule in deny:
            args += ["--deny", rule]
        if not seed:
            args.append("--no-seed")
        if h2:
            args.append("--h2")  # HTTP/2 as kube-apiserver offers it (testkit.standin.h2front)
        self.log_path = self.workdir / f"standin-{self.port}.log"
        with open(self.log_path, "wb") as log:
            # Output goes to a file, not a pipe: a chatty server never blocks on a full pipe.
            # From the checkout's root: testkit is a test-only package, never installed.
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=Path(__file__).resolve().parents[2])
        wait_for_port(self.port, self.proc, timeout)
        deadline = time.monotonic() + timeout
        while b"jitgate-standin listening on" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stand-in did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self) -> "StandinProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    # Direct HTTP --------------------------------------------------------------------------------------

    def ssl_context(self, client_cert: Path | None = None, client_key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        if client_cert:
            ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
        return ctx

    def request(self, method: str, path: str, body: Any = None, token: str | None = "", headers: dict | None = None,
                content_type: str = "application/json", client_cert: Path | None = None,
                client_key: Path | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request; token "" means the first configured token, None means no Authorization."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token or self.token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(client_cert, client_key),
                                        timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        code, _, raw = self.request(method, path, body, **kwargs)
        return code, json.loads(raw) if raw else None

    def requests_seen(self) -> list[dict]:
        """Every request the stand-in recorded (auth_kind, user, token_sha256, cert_subject, eks,
        impersonate_user, impersonate_groups, user_agent, protocol, headers, status, method, path, query)."""
        code, records = self.json("GET", "/_standin/requests")
        assert code == 200, records
        return records

    def clear_seen(self) -> None:
        code, body = self.json("DELETE", "/_standin/requests")
        assert code == 200, body

    # kubectl --------------------------------------------------------------------------------------------

    def write_kubeconfig(self, path: Path, token: str | None = "", server: str | None = None,
                         namespace: str | None = None, client_cert: Path | None = None,
                         client_key: Path | None = None, ca_path: Path | None = None,
                         proxy_url: str | None = None) -> Path:
        """A kubeconfig for direct access (or, with `server`/`ca_path`/`proxy_url`, through a gateway)."""
        user: dict = {}
        if token is not None:
            user["token"] = token or self.token
        if client_cert:
            user["client-certificate"] = str(client_cert)
            user["client-key"] = str(client_key)
        return write_kubeconfig(path, server or self.url, ca_path or self.ca_path, user, namespace, proxy_url)


def write_kubeconfig(path: Path, server: str, ca_path: Path, user: dict, namespace: str | None = None,
                     proxy_url: str | None = None) -> Path:
    cluster: dict = {"server": server, "certificate-authority": str(ca_path)}
    if proxy_url:
        cluster["proxy-url"] = proxy_url
    context: dict = {"cluster": "standin", "user": "standin"}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "standin", "preferences": {},
        "clusters": [{"name": "standin", "cluster": cluster}],
        "users": [{"name": "standin", "user": user}],
        "contexts": [{"name": "standin", "context": context}],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def kubectl_env(kubeconfig: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE") and k.upper() not in
           ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")}
    env["KUBECONFIG"] = str(kubeconfig)
    # A private cache dir: discovery caching across tests would hide discovery bugs.
    env["KUBECACHEDIR"] = str(Path(kubeconfig).parent / f".kube-cache-{Path(kubeconfig).name}")
    return env


def run_kubectl(kubeconfig: Path, *args: str, input: str | bytes | None = None, timeout: float = 20.0,
                check: bool = False) -> subprocess.CompletedProcess:
    """Run the real kubectl against `kubeconfig`; text output."""
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run([KUBECTL, *args], input=data, capture_output=True, timeout=timeout,
                          env=kubectl_env(kubeconfig))
    result = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                         proc.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


class TerminalSession:
    """A command on a real pseudo-terminal (as `kubectl exec -it` needs), driven like a person would."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import os

        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.screen = b""

    def expect(self, text: bytes, timeout: float = 10) -> None:
        import os
        import select

        deadline = time.monotonic() + timeout
        while text not in self.screen:
            assert time.monotonic() < deadline, f"{text!r} not in {self.screen!r}"
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:
                    break

    def type(self, line: bytes) -> None:
        import os

        os.write(self.master, line + b"\r")

    def close(self) -> None:
        import os

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def read_until(stream, needle: bytes, max_lines: int = 50) -> bytes:
    """Lines of a kubectl stream up to the first that holds `needle` (or EOF): `get -w` lists every
    pod of the namespace first, and other tests may have left pods there."""
    seen = b""
    for _ in range(max_lines):
        line = stream.readline()
        seen += line
        if not line or needle in line:
            break
    return seen
