"""A client of the gateway's access API that connects the way kubectl does.

Connection settings come from the kubeconfig the user already has for the gateway: the context's
cluster gives `server` (reverse mode: the gateway's URL; proxy mode: the cluster endpoint, reached
through `proxy-url`, the gateway as an HTTP CONNECT proxy) and the CA that verifies the gateway;
its user gives the OIDC ID token (`token`, `tokenFile`, or an `exec` credential plugin such as
kubelogin, run as client-go runs it). Flags override each part.

TLS is always verified (a kubeconfig that skips verification is refused), the token is never
printed, and no redirect is followed. Errors come in two kinds: `ApiError` when the gateway
answered with a refusal (its `metav1.Status` message, for people), `ClientError` when there was no
usable answer (configuration, connection, TLS).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import calendar
import http.client
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit
from urllib.request import proxy_bypass_environment

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

API_PREFIX = "/jitgate/v1/"
USER_AGENT = "jitgate-cli/1"
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
MAX_RESPONSE = 16 * 1024 * 1024


class ClientError(Exception):
    """No usable answer from the gateway: bad configuration, no connection, TLS failure."""


class ApiError(Exception):
    """The gateway refused the call; `message` is its Status message, written for people."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Tokens


class TokenSource(ABC):
    """Where the caller's OIDC ID token comes from (kubeconfig token, tokenFile, exec plugin)."""

    @abstractmethod
    def token(self) -> str: ...


@dataclass
class StaticToken(TokenSource):
    value: str = field(repr=False)

    def token(self) -> str:
        return self.value


@dataclass
class TokenFile(TokenSource):
    path: Path

    def token(self) -> str:
        try:
            value = self.path.read_text().strip()
        except OSError as e:
            raise ClientError(f"cannot read the token file {self.path}: {e.strerror or e}") from None
        if not value:
            raise ClientError(f"the token file {self.path} is empty")
        return value


@dataclass
class ExecPlugin(TokenSource):
    """A client-go exec credential plugin: run with `KUBERNETES_EXEC_INFO` set to an
    ExecCredential spec, it prints an ExecCredential whose `status.token` is the ID token."""

    config: Mapping[str, Any]
    base_dir: Path  # the kubeconfig's folder: a command with a path separator is relative to it
    cluster_info: Mapping[str, Any] | None = None  # for provideClusterInfo
    _cached: tuple[str, float | None] | None = field(default=None, repr=False)

    def token(self) -> str:
        if self._cached is not None:
            value, expires = self._cached
            if expires is None or expires > time.time() + 10:
                return value
        self._cached = self._run()
        return self._cached[0]

    def _run(self) -> tuple[str, float | None]:
        cfg = self.config
        api_version = cfg.get("apiVersion")
        if api_version not in EXEC_API_VERSIONS:
            raise ClientError(f"exec credential plugin: apiVersion {api_version!r} is not supported (use {EXEC_API_VERSIONS[0]})")
        command = cfg.get("command")
        if not isinstance(command, str) or not command:
            raise ClientError("exec credential plugin: no command")
        if os.sep in command and not os.path.isabs(command):
            command = str(self.base_dir / command)  # as client-go: PATH lookups stay PATH lookups
        args = cfg.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ClientError("exec credential plugin: args must be a list of strings")
        mode = cfg.get("interactiveMode")
        if mode is None:
            if api_version.endswith("/v1"):
                raise ClientError("exec credential plugin: interactiveMode must be set (Never, IfAvailable or Always)")
            mode = "IfAvailable"
        if mode not in ("Never", "IfAvailable", "Always"):
            raise ClientError(f"exec credential plugin: unknown interactiveMode {mode!r}")
        terminal = sys.stdin is not None and sys.stdin.isatty()
        if mode == "Always" and not terminal:
            raise ClientError(f"exec credential plugin {command} needs an interactive terminal (interactiveMode: Always)")
        interactive = mode != "Never" and terminal

        spec: dict[str, Any] = {"interactive": interactive}
        if cfg.get("provideClusterInfo") and self.cluster_info is not None:
            spec["cluster"] = dict(self.cluster_info)
        env = dict(os.environ)
        for item in cfg.get("env") or []:
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not isinstance(item.get("value"), str):
                raise ClientError("exec credential plugin: env must be a list of {name, value}")
            env[item["name"]] = item["value"]
        env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": api_version, "kind": "ExecCredential", "spec": spec})

        try:
            # The plugin's stderr is the user's (login prompts, its own errors); stdout is the credential.
            done = subprocess.run([command, *args], env=env, stdin=None if interactive else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, check=False)
        except OSError as e:
            hint = cfg.get("installHint")
            raise ClientError(f"exec credential plugin {command} cannot run: {e.strerror or e}" + (f"\n{hint}" if hint else "")) from None
        if done.returncode != 0:
            raise ClientError(f"exec credential plugin {command} failed with exit code {done.returncode}")
        try:
            credential = json.loads(done.stdout)
        except ValueError:
            raise ClientError(f"exec credential plugin {command} did not print an ExecCredential (JSON)") from None
        if not isinstance(credential, dict) or credential.get("kind") != "ExecCredential":
            raise ClientError(f"exec credential plugin {command} did not print an ExecCredential")
        if credential.get("apiVersion") != api_version:
            raise ClientError(f"exec credential plugin {command} answered with apiVersion {credential.get('apiVersion')!r}, "
                              f"not the configured {api_version}")
        status = credential.get("status")
        if not isinstance(status, dict):
            raise ClientError(f"exec credential plugin {command} printed an ExecCredential without status")
        token = status.get("token")
        if not isinstance(token, str) or not token:
            if status.get("clientCertificateData"):
                raise ClientError(f"exec credential plugin {command} gave a client certificate; the gateway needs an OIDC ID token")
            raise ClientError(f"exec credential plugin {command} gave no token")
        return token, parse_time(status.get("expirationTimestamp"))


# ---------------------------------------------------------------------------------------------
# Connection settings


@dataclass(frozen=True)
class Connection:
    server: str  # https URL of the gateway (reverse mode) or of the cluster endpoint (proxy mode)
    tokens: TokenSource = field(repr=False)
    proxy: str | None = None  # http:// URL of the gateway as a CONNECT proxy
    ca_file: Path | None = None
    ca_data: bytes | None = field(default=None, repr=False)  # PEM; with neither, the system's CAs
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.server)
        if parts.scheme != "https" or not parts.hostname:
            raise ClientError(f"the server must be an https:// URL, not {self.server!r} (the token must not travel unencrypted)")
        if self.proxy is not None:
            proxy = urlsplit(self.proxy)
            if proxy.scheme != "http" or not proxy.hostname:
                raise ClientError(f"the proxy must be an http:// URL of the gateway's proxy listener, not {_redact(self.proxy)!r}")


@dataclass
class _Kubeconfig:
    """The merge of kubeconfig files as client-go does it: the first file to set a value wins."""

    current_context: str | None = None
    clusters: dict[str, tuple[dict, Path]] = field(default_factory=dict)  # entry, folder of its file
    users: dict[str, tuple[dict, Path]] = field(default_factory=dict)
    contexts: dict[str, dict] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def kubeconfig_paths(explicit: str | None, env: Mapping[str, str]) -> tuple[list[Path], bool]:
    """The files to read, and whether they must exist (an explicit --kubeconfig must)."""
    if explicit:
        return [Path(explicit).expanduser()], True
    if env.get("KUBECONFIG"):
        return [Path(p).expanduser() for p in env["KUBECONFIG"].split(os.pathsep) if p], False
    return [Path(env.get("HOME") or Path.home()) / ".kube" / "config"], False


def read_kubeconfig(paths: list[Path], required: bool) -> _Kubeconfig:
    merged = _Kubeconfig()
    yaml = YAML(typ="safe", pure=True)
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            if required:
                raise ClientError(f"kubeconfig {path} does not exist") from None
            continue
        except OSError as e:
            raise ClientError(f"cannot read kubeconfig {path}: {e.strerror or e}") from None
        try:
            data = yaml.load(text) or {}
        except YAMLError as e:
            raise ClientError(f"kubeconfig {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ClientError(f"kubeconfig {path} is not a mapping")
        merged.files.append(path)
        folder = path.resolve().parent
        if not merged.current_context and isinstance(data.get("current-context"), str):
            merged.current_context = data["current-context"] or None
        for key, target, inner in (("clusters", merged.clusters, "cluster"), ("users", merged.users, "user")):
            for item in _named(data, key, path):
                target.setdefault(item["name"], (item.get(inner) or {}, folder))
        for item in _named(data, "contexts", path):
            merged.contexts.setdefault(item["name"], item.get("context") or {})
    return merged


def _named(data: dict, key: str, path: Path) -> list[dict]:
    items = data.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        raise ClientError(f"kubeconfig {path}: {key} must be a list of entries with a name")
    return items


def load_connection(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    server: str | None = None,
    proxy: str | None = None,
    ca: str | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Connection:
    """Settings from the kubeconfig's context, each overridable (flags win, then
    `$JITGATE_TOKEN` for the token, then the kubeconfig)."""
    env = os.environ if env is None else env
    paths, required = kubeconfig_paths(kubeconfig, env)
    config = read_kubeconfig(paths, required)
    where = ", ".join(str(p) for p in config.files) or ", ".join(str(p) for p in paths)

    cluster: dict = {}
    cluster_dir = Path.cwd()
    user: dict | None = None
    user_dir = Path.cwd()
    name = context or config.current_context
    if name:
        ctx = config.contexts.get(name)
        if ctx is None:
            raise ClientError(f"context {name!r} is not in the kubeconfig ({where})")
        if ctx.get("cluster"):
            if ctx["cluster"] not in config.clusters:
                raise ClientError(f"context {name!r} names cluster {ctx['cluster']!r}, which is not in the kubeconfig ({where})")
            cluster, cluster_dir = config.clusters[ctx["cluster"]]
        if ctx.get("user"):
            if ctx["user"] not in config.users:
                raise ClientError(f"context {name!r} names user {ctx['user']!r}, which is not in the kubeconfig ({where})")
            user, user_dir = config.users[ctx["user"]]
    elif not server:
        raise ClientError(f"no kubeconfig context to take the gateway's address from ({where}): "
                          "give --context, set current-context, or give --server")

    if cluster.get("insecure-skip-tls-verify"):
        raise ClientError("the kubeconfig skips TLS verification (insecure-skip-tls-verify); jitgate never does: "
                          "set certificate-authority to the gateway's CA")
    server = server or cluster.get("server")
    if not server:
        raise ClientError(f"context {name!r} has no server")

    ca_file = ca_data = None
    if ca:
        ca_file = Path(ca)
    elif cluster.get("certificate-authority-data"):
        try:
            ca_data = base64.b64decode(cluster["certificate-authority-data"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ClientError("the kubeconfig's certificate-authority-data is not base64") from None
    elif cluster.get("certificate-authority"):
        ca_file = cluster_dir / cluster["certificate-authority"]

    if proxy is None:
        proxy = cluster.get("proxy-url") or proxy_from_environment(server, env)

    tokens: TokenSource
    token = token or env.get("JITGATE_TOKEN")
    if token:
        tokens = StaticToken(token.strip())
    elif user is not None and user.get("tokenFile"):
        tokens = TokenFile(user_dir / user["tokenFile"])
    elif user is not None and user.get("token"):
        tokens = StaticToken(str(user["token"]))
    elif user is not None and isinstance(user.get("exec"), dict):
        info = {"server": server, "insecure-skip-tls-verify": False}
        if ca_data is not None:
            info["certificate-authority-data"] = base64.b64encode(ca_data).decode()
        if proxy:
            info["proxy-url"] = proxy
        if cluster.get("tls-server-name"):
            info["tls-server-name"] = cluster["tls-server-name"]
        extension = next((e.get("extension") for e in cluster.get("extensions") or []
                          if isinstance(e, dict) and e.get("name") == "client.authentication.k8s.io/exec"), None)
        if extension is not None:
            info["config"] = extension
        tokens = ExecPlugin(user["exec"], user_dir, info)
    elif user is not None and user.get("auth-provider"):
        raise ClientError("the kubeconfig user uses an auth-provider, which kubectl no longer supports; "
                          "use an exec plugin such as kubelogin (see `jitgate kubeconfig --oidc-issuer`)")
    else:
        raise ClientError("no OIDC ID token: the kubeconfig user has no token, tokenFile or exec plugin "
                          "(or give --token, or set JITGATE_TOKEN)")
    return Connection(server=server, tokens=tokens, proxy=proxy or None, ca_file=ca_file, ca_data=ca_data,
                      tls_server_name=cluster.get("tls-server-name") or None)


def proxy_from_environment(server: str, env: Mapping[str, str]) -> str | None:
    """HTTPS_PROXY as Go clients read it: never for localhost or loopback addresses, and not for
    hosts NO_PROXY names."""
    host = urlsplit(server).hostname or ""
    if host == "localhost" or _is_loopback(host):
        return None
    proxy = env.get("HTTPS_PROXY") or env.get("https_proxy")
    if not proxy:
        return None
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
    if no_proxy and proxy_bypass_environment(host, {"no": no_proxy}):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# HTTP


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS, through a CONNECT tunnel when one is set, checking the certificate for
    `server_name` (kubeconfig tls-server-name) when given, else for the host connected to."""

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext, timeout: float, server_name: str | None) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP, and the CONNECT exchange with a proxy
        name = self._server_name or self._tunnel_host or self.host
        self.sock = self._context.wrap_socket(self.sock, server_hostname=name)


class Client:
    def __init__(self, connection: Connection, timeout: float = 30.0) -> None:
        self.connection = connection
        self.timeout = timeout
        self._context = self._ssl_context()

    def _ssl_context(self) -> ssl.SSLContext:
        c = self.connection
        try:
            if c.ca_data is not None:
                return ssl.create_default_context(cadata=c.ca_data.decode("ascii", "replace"))
            if c.ca_file is not None:
                return ssl.create_default_context(cafile=str(c.ca_file))
            return ssl.create_default_context()
        except FileNotFoundError:
            raise ClientError(f"the CA file {c.ca_file} does not exist") from None
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ClientError(f"the gateway's CA certificate cannot be loaded: {e}") from None

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: Any = None) -> dict:
        """One API call (`path` below /jitgate/v1/); the answer's JSON object."""
        target = path + ("?" + urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        response, raw, where = self._exchange(method, target, headers, data, MAX_RESPONSE)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ClientError(f"the answer from {where} is not a JSON object: is {self.connection.server} the jitgate gateway?")
        return answer

    def download(self, path: str, max_bytes: int) -> bytes:
        """A GET whose answer is bytes, not JSON (a recording: HAR, flow file, asciicast)."""
        return self._exchange("GET", path, {"Accept": "*/*"}, None, max_bytes)[1]

    def _exchange(self, method: str, target: str, headers: dict[str, str], data: bytes | None,
                  max_bytes: int) -> tuple[http.client.HTTPResponse, bytes, str]:
        """One request below /jitgate/v1/ with the caller's token: (response, its body, where it went).
        An error status raises ApiError with the gateway's message; a body over `max_bytes`, ClientError."""
        c = self.connection
        server = urlsplit(c.server)
        headers = {**headers, "User-Agent": USER_AGENT, "Authorization": f"Bearer {c.tokens.token()}"}
        where = f"{server.hostname}:{server.port or 443}" + (f" through the proxy {_redact(c.proxy)}" if c.proxy else "")
        conn = self._open(server)
        try:
            conn.request(method, server.path.rstrip("/") + API_PREFIX + target, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read(max_bytes + 1)
        except ssl.SSLCertVerificationError as e:
            raise ClientError(f"cannot verify the TLS certificate of {server.hostname}: {e.verify_message}; "
                              "is the kubeconfig's certificate-authority (or --ca) the gateway's CA?") from None
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"cannot reach the gateway at {where}: {_describe(e)}") from None
        finally:
            conn.close()
        if len(raw) > max_bytes:
            raise ClientError(f"the answer from {where} is too large")
        if response.status >= 400:
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            if isinstance(answer, dict) and isinstance(answer.get("message"), str):
                raise ApiError(response.status, answer["message"], str(answer.get("reason") or ""))
            text = raw[:300].decode("utf-8", "replace").strip()
            raise ApiError(response.status, f"HTTP {response.status} {response.reason}" + (f": {text}" if text else ""))
        return response, raw, where

    def _open(self, server) -> http.client.HTTPSConnection:
        c = self.connection
        port = server.port or 443
        if c.proxy is None:
            return _HTTPSConnection(server.hostname, port, context=self._context, timeout=self.timeout, server_name=c.tls_server_name)
        proxy = urlsplit(c.proxy)
        conn = _HTTPSConnection(proxy.hostname, proxy.port or 80, context=self._context, timeout=self.timeout,
                                server_name=c.tls_server_name)
        headers = {}
        if proxy.username is not None:
            credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        conn.set_tunnel(server.hostname, port, headers=headers)
        return conn

    # -- the API

    def whoami(self) -> dict:
        return self.request("GET", "whoami")

    def create_request(self, body: Mapping[str, Any]) -> dict:
        return self.request("POST", "requests", body=dict(body))

    def list_requests(self, scope: str = "mine", states: str | None = None) -> list[dict]:
        query = {"scope": scope}
        if states:
            query["state"] = states
        return self.request("GET", "requests", query=query)["items"]

    def get_request(self, request_id: str) -> dict:
        return self.request("GET", f"requests/{_segment(request_id)}")

    def decide(self, request_id: str, action: str, reason: str | None = None) -> dict:
        """`action`: approve, deny or cancel."""
        return self.request("POST", f"requests/{_segment(request_id)}/{action}", body={"reason": reason} if reason else {})

    def list_grants(self, scope: str = "mine", active: bool = True) -> list[dict]:
        return self.request("GET", "grants", query={"scope": scope, "active": "true" if active else "false"})["items"]

    def get_grant(self, grant_id: str) -> dict:
        return self.request("GET", f"grants/{_segment(grant_id)}")

    def revoke(self, grant_id: str, reason: str) -> dict:
        return self.request("POST", f"grants/{_segment(grant_id)}/revoke", body={"reason": reason})


def _segment(ident: str) -> str:
    return quote(ident, safe="")


def _redact(url: str | None) -> str:
    """A proxy URL without its password."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 UTC time (`2025-01-02T03:04:05Z`), else None."""
    if not isinstance(value, str):
        return None
    text = value.strip().replace("z", "Z")
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    return None


def connection_flags() -> argparse.ArgumentParser:
    """The flags that say how a command reaches the gateway (every access command, `jitgate sessions`)."""
    flags = argparse.ArgumentParser(add_help=False)
    g = flags.add_argument_group("connection (by default from the kubeconfig context you use for the gateway)")
    g.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    g.add_argument("--context", help="kubeconfig context (default: its current-context)")
    g.add_argument("--server", metavar="URL", help="the gateway's URL, or the cluster endpoint when going through --proxy")
    g.add_argument("--proxy", metavar="URL", help="the gateway as HTTP CONNECT proxy, e.g. http://127.0.0.1:8080 (default: proxy-url)")
    g.add_argument("--ca", metavar="FILE", help="the gateway's CA certificate (default: certificate-authority[-data])")
    g.add_argument("--token", help="OIDC ID token (visible to other local users in the process list: prefer "
                                   "$JITGATE_TOKEN or the kubeconfig user)")
    g.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS", help="per call (default: 30)")
    return flags
