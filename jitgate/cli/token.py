"""`jitgate login` and `jitgate token`: OIDC ID tokens that last a working day, for kubectl, the
jitgate CLI and MCP servers.

`jitgate login` signs in once with the identity provider's authorization-code flow (PKCE, a
loopback redirect on 127.0.0.1, the browser opened or the URL printed) and keeps the ID token and
the refresh token in a cache file of the user's own (0600, one per issuer and client).
`jitgate token` is a kubectl exec credential plugin: it prints the cached ID token while it is
valid for more than a minute, refreshes it with the refresh token when not (under a lock, so
parallel kubectl calls refresh once), and says how to sign in again when the provider ends the
session. The refresh token never leaves the cache file; kubeconfigs name the plugin, not a token.

    jitgate login --issuer https://idp.example.com --client-id jitgate
    jitgate kubeconfig --cluster dev --user me --server https://127.0.0.1:7443 \\
        --login-issuer https://idp.example.com -o ~/.kube/jitgate-dev
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import http.server
import json
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from pathlib import Path
from typing import Any

from jitgate.files import make_private_dirs

EXEC_API = "client.authentication.k8s.io/v1"
MIN_VALIDITY = 60  # seconds a printed token is still good for at least
DEFAULT_SCOPE = "openid email profile groups offline_access"


class LoginError(Exception):
    """Signing in or refreshing failed; the message says what to do."""


# -- the cache ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jitgate" / "tokens"


def cache_path(issuer: str, client_id: str) -> Path:
    key = hashlib.sha256(f"{issuer.rstrip('/')}\n{client_id}".encode()).hexdigest()[:24]
    return cache_dir() / f"{key}.json"


def read_cache(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LoginError(f"the token cache {path} cannot be read ({e}); sign in again with `jitgate login`") from None


def write_cache(path: Path, data: dict[str, Any]) -> None:
    """Atomically, 0600, in a 0700 folder: a crash leaves the old file or the new one."""
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def token_expiry(id_token: str) -> float:
    """The `exp` of a JWT (read, not verified: the gateway verifies it; this only says when to refresh)."""
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0


def token_subject(id_token: str) -> str:
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("email") or claims.get("sub") or "?")
    except (IndexError, ValueError, TypeError):
        return "?"


# -- talking to the identity provider -------------------------------------------------------------


class Provider:
    def __init__(self, issuer: str, client_id: str, client_secret: str | None, ca_file: str | None) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._discovery: dict[str, Any] | None = None

    def _open(self, request: urllib.request.Request | str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            try:
                detail = json.loads(detail).get("error_description") or json.loads(detail).get("error") or detail
            except ValueError:
                pass
            raise LoginError(f"the identity provider {self.issuer} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LoginError(f"cannot reach the identity provider {self.issuer}: {getattr(e, 'reason', e)}") from None

    @property
    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            self._discovery = self._open(f"{self.issuer}/.well-known/openid-configuration")
        return self._discovery

    def token_request(self, form: dict[str, str]) -> dict[str, Any]:
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if self.client_secret:
            pair = f"{urllib.parse.quote(self.client_id)}:{urllib.parse.quote(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form = {**form, "client_id": self.client_id}
        request = urllib.request.Request(self.discovery["token_endpoint"], urllib.parse.urlencode(form).encode(), headers)
        answer = self._open(request)
        if not isinstance(answer.get("id_token"), str):
            raise LoginError(f"the identity provider {self.issuer} returned no ID token")
        return answer


# -- jitgate login --------------------------------------------------------------------------------


class _Callback(http.server.BaseHTTPRequestHandler):
    result: dict[str, str] = {}
    done = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        type(self).result = query
        ok = "code" in query
        body = ("Signed in to jitgate; you can close this tab." if ok else
                f"Sign-in failed: {query.get('error_description') or query.get('error') or 'no code'}").encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        type(self).done.set()


def login(provider: Provider, scope: str, open_browser: bool, timeout: float) -> dict[str, Any]:
    handler = type("Callback", (_Callback,), {"result": {}, "done": threading.Event()})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        redirect = f"http://127.0.0.1:{server.server_port}/callback"
        state = secrets.token_urlsafe(16)
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        url = provider.discovery["authorization_endpoint"] + "?" + urllib.parse.urlencode({
            "response_type": "code", "client_id": provider.client_id, "redirect_uri": redirect, "scope": scope,
            "state": state, "code_challenge": challenge, "code_challenge_method": "S256"})
        print(f"Sign in to {provider.issuer} in your browser:\n  {url}", file=sys.stderr, flush=True)
        if open_browser:
            webbrowser.open(url)
        if not handler.done.wait(timeout):
            raise LoginError(f"no sign-in within {timeout:.0f}s; run `jitgate login` again")
        answer = handler.result
    finally:
        server.shutdown()
        server.server_close()
    if answer.get("state") != state:
        raise LoginError("the sign-in answer does not belong to this login (state mismatch); run `jitgate login` again")
    if "code" not in answer:
        raise LoginError(f"sign-in refused: {answer.get('error_description') or answer.get('error') or 'no code returned'}")
    return provider.token_request({"grant_type": "authorization_code", "code": answer["code"], "redirect_uri": redirect,
                                   "code_verifier": verifier})


def cmd_login(args: argparse.Namespace) -> int:
    provider = _provider(args)
    try:
        tokens = login(provider, args.scope, not args.no_browser, args.timeout)
    except LoginError as e:
        print(f"jitgate login: {e}", file=sys.stderr)
        return 1
    path = cache_path(provider.issuer, provider.client_id)
    write_cache(path, {"issuer": provider.issuer, "client_id": provider.client_id, "id_token": tokens["id_token"],
                       "refresh_token": tokens.get("refresh_token"), "signed_in_at": time.time()})
    expires = token_expiry(tokens["id_token"])
    refresh = "refreshed automatically" if tokens.get("refresh_token") else "NOT refreshable (the provider gave no refresh token)"
    print(f"signed in as {token_subject(tokens['id_token'])}; the ID token is valid until "
          f"{time.strftime('%H:%M', time.localtime(expires))} and {refresh} by `jitgate token` (cache {path})", file=sys.stderr)
    return 0


# -- jitgate token (the exec credential plugin) ---------------------------------------------------


def fresh_token(provider: Provider, now: float | None = None) -> str:
    """A valid ID token from the cache, refreshed when it is about to expire. Raises LoginError."""
    path = cache_path(provider.issuer, provider.client_id)
    now = time.time() if now is None else now
    cached = read_cache(path)
    if cached and token_expiry(cached.get("id_token", "")) - now > MIN_VALIDITY:
        return cached["id_token"]
    make_private_dirs(path.parent)
    with open(path.with_suffix(".lock"), "a") as lock:
        os.chmod(lock.name, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel kubectl calls: one refreshes, the others read its result
        cached = read_cache(path)
        if cached and token_expiry(cached.get("id_token", "")) - now > MIN_VALIDITY:
            return cached["id_token"]
        if not cached or not cached.get("refresh_token"):
            raise LoginError(f"not signed in to {provider.issuer}; run: "
                             f"jitgate login --issuer {provider.issuer} --client-id {provider.client_id}")
        try:
            tokens = provider.token_request({"grant_type": "refresh_token", "refresh_token": cached["refresh_token"]})
        except LoginError as e:
            raise LoginError(f"{e}; the sign-in has ended, run: "
                             f"jitgate login --issuer {provider.issuer} --client-id {provider.client_id}") from None
        tokens.setdefault("refresh_token", cached["refresh_token"])  # providers that do not rotate it
        write_cache(path, {**cached, "id_token": tokens["id_token"], "refresh_token": tokens["refresh_token"],
                           "refreshed_at": now})
        return tokens["id_token"]


def cmd_token(args: argparse.Namespace) -> int:
    try:
        token = fresh_token(_provider(args))
    except LoginError as e:
        print(f"jitgate token: {e}", file=sys.stderr)  # kubectl shows the plugin's stderr
        return 1
    api = EXEC_API
    info = os.environ.get("KUBERNETES_EXEC_INFO")
    if info:
        try:
            api = json.loads(info).get("apiVersion") or EXEC_API
        except ValueError:
            pass
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token_expiry(token)))
    print(json.dumps({"apiVersion": api, "kind": "ExecCredential", "status": {"token": token, "expirationTimestamp": expires}}))
    return 0


# -- wiring ---------------------------------------------------------------------------------------


def _provider(args: argparse.Namespace) -> Provider:
    secret = None
    if args.client_secret_file:
        try:
            secret = Path(args.client_secret_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"jitgate: cannot read the client secret file {args.client_secret_file}: {e.strerror}") from None
    return Provider(args.issuer, args.client_id, secret, args.ca_file)


def plugin_command(issuer: str, client_id: str, ca_file: str | None = None,
                   client_secret_file: str | None = None) -> tuple[str, ...]:
    """The exec credential plugin call a kubeconfig names: this jitgate, by absolute path."""
    script = Path(sys.executable).with_name("jitgate")
    command = [str(script) if script.exists() else "jitgate", "token", "--issuer", issuer, "--client-id", client_id]
    if ca_file:
        command += ["--ca-file", str(Path(ca_file).resolve())]
    if client_secret_file:
        command += ["--client-secret-file", str(Path(client_secret_file).resolve())]
    return tuple(command)


def add_commands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--issuer", required=True, help="the OIDC issuer URL the gateway trusts")
    common.add_argument("--client-id", default="jitgate", help="the OIDC client (default: jitgate)")
    common.add_argument("--client-secret-file", help="a file with the client's secret, for providers whose CLI client has one")
    common.add_argument("--ca-file", help="CA bundle that verifies the provider's TLS certificate (default: the system's)")

    login_p = sub.add_parser("login", parents=[common], help="sign in with your identity provider (kept for `jitgate token`)",
                             description="Sign in once (browser, authorization code with PKCE); `jitgate token` then "
                                         "keeps the ID token fresh with the refresh token. Cached 0600 under "
                                         "$XDG_CACHE_HOME/jitgate/tokens (default ~/.cache/jitgate/tokens).")
    login_p.add_argument("--scope", default=DEFAULT_SCOPE, help=f"scopes to ask for (default: {DEFAULT_SCOPE})")
    login_p.add_argument("--no-browser", action="store_true", help="print the sign-in URL only (open it on any browser of this machine)")
    login_p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the sign-in (default 300)")
    login_p.set_defaults(func=cmd_login)

    token_p = sub.add_parser("token", parents=[common], help="kubectl exec credential plugin: print a fresh ID token",
                             description="Prints an ExecCredential with a valid ID token, refreshed from the cache of "
                                         "`jitgate login`; exits 1 with what to run when the sign-in has ended.")
    token_p.set_defaults(func=cmd_token)
