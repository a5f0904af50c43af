"""`jitgate login` and `jitgate token`: sign in once, then kubectl through the gateway all day.

The real OIDC provider process issues the tokens (authorization code, then refresh tokens); the
test plays the browser (the provider's sign-in form, then the loopback redirect). The kubeconfig
names the plugin, never a token; the cache is the user's alone (0600 in a 0700 folder); an expired
token is refreshed once however many kubectl calls ask at the same moment; an ended sign-in says
what to run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from jitgate.cli.token import cache_path
from testkit.standin.process import KUBECTL, kubectl_env
from tests.conftest import Stack

REPO = Path(__file__).resolve().parents[1]
JITGATE = str(REPO / ".venv/bin/jitgate")
EXPIRED = "x." + base64.urlsafe_b64encode(json.dumps({"exp": 1}).encode()).decode().rstrip("=") + ".y"


def _env(tmp: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("KUBE")}, "HOME": str(tmp), "XDG_CACHE_HOME": str(tmp / "cache")}


def _sign_in(stack: Stack, tmp: Path) -> subprocess.CompletedProcess:
    """`jitgate login --no-browser`, with the test as the browser that signs alice in."""
    idp = stack.idp
    idp.set_user("alice", {"email": "alice@example.com", "email_verified": True, "groups": ["developers", "sre"]})
    secret = tmp / "client-secret"
    secret.write_text("jitgate-secret\n")
    proc = subprocess.Popen([JITGATE, "login", "--no-browser", "--issuer", idp.issuer, "--client-id", "jitgate",
                             "--client-secret-file", str(secret), "--ca-file", str(idp.ca_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp))
    first = proc.stderr.readline()
    assert first.startswith("Sign in to "), first
    url = proc.stderr.readline().strip()
    target = urlsplit(url)
    status, headers, _ = idp.request("POST", f"{target.path}?{target.query}", b"sub=alice&action=allow",
                                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 302, status
    callback = headers["location"]
    assert callback.startswith("http://127.0.0.1:") and "code=" in callback
    with urllib.request.urlopen(callback, timeout=10) as answer:
        assert b"Signed in to jitgate" in answer.read()
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, first + url + "\n" + err)


def _cache(stack: Stack, tmp: Path) -> Path:
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    try:
        return cache_path(stack.idp.issuer, "jitgate")
    finally:
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old


def _token(tmp: Path, stack: Stack) -> subprocess.CompletedProcess:
    return subprocess.run([JITGATE, "token", "--issuer", stack.idp.issuer, "--client-id", "jitgate", "--client-secret-file",
                           str(tmp / "client-secret"), "--ca-file", str(stack.idp.ca_file)],
                          capture_output=True, text=True, env=_env(tmp), timeout=30)


def test_sign_in_once_then_kubectl_refreshes_its_own_tokens(stack: Stack, tmp_path: Path) -> None:
    signed = _sign_in(stack, tmp_path)
    assert signed.returncode == 0, signed.stderr
    assert "signed in as alice@example.com" in signed.stderr and "refreshed automatically" in signed.stderr
    cache = _cache(stack, tmp_path)
    entry = json.loads(cache.read_text())
    assert entry["refresh_token"] and entry["id_token"].count(".") == 2
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700

    config = tmp_path / "kubeconfig"
    subprocess.run([JITGATE, "kubeconfig", "--policy", str(stack.policy), "--cluster", "dev", "--user", "alice",
                    "--server", stack.gateway.reverse_url("dev"), "--gateway-ca", str(stack.gateway.ca_path),
                    "--login-issuer", stack.idp.issuer, "--oidc-ca-file", str(stack.idp.ca_file),
                    "--oidc-client-secret-file", str(tmp_path / "client-secret"), "-o", str(config)],
                   check=True, capture_output=True)
    text = config.read_text()
    assert "exec:" in text and "token" in text and entry["id_token"] not in text and entry["refresh_token"] not in text
    env = {**kubectl_env(config), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def kubectl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([KUBECTL, *args], env=env, capture_output=True, text=True, timeout=30)

    first = kubectl("get", "pods", "-n", "dev")
    assert first.returncode == 0 and "toolbox" in first.stdout, first.stderr
    assert json.loads(cache.read_text())["id_token"] == entry["id_token"], "a valid token is used as it is"

    # The hour is over: the next call refreshes, without a sign-in, and keeps working.
    cache.write_text(json.dumps({**entry, "id_token": EXPIRED}))
    again = kubectl("get", "pods", "-n", "dev")
    assert again.returncode == 0, again.stderr
    refreshed = json.loads(cache.read_text())
    assert refreshed["id_token"] not in (EXPIRED, entry["id_token"]) and refreshed.get("refreshed_at")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600

    # Many calls at once with an expired token: one refresh, every call gets the same fresh token.
    cache.write_text(json.dumps({**refreshed, "id_token": EXPIRED}))
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: _token(tmp_path, stack), range(6)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    tokens = {json.loads(r.stdout)["status"]["token"] for r in results}
    assert len(tokens) == 1 and tokens != {EXPIRED}
    credential = json.loads(results[0].stdout)
    assert credential["kind"] == "ExecCredential" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", credential["status"]["expirationTimestamp"])

    # The provider ended the sign-in (the refresh token no longer works): kubectl says what to run.
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "id_token": EXPIRED, "refresh_token": "ended"}))
    ended = kubectl("get", "pods", "-n", "dev")
    assert ended.returncode != 0
    assert f"the sign-in has ended, run: jitgate login --issuer {stack.idp.issuer} --client-id jitgate" in ended.stderr, ended.stderr


def test_token_without_a_sign_in_says_how(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "client-secret").write_text("jitgate-secret\n")
    done = _token(tmp_path, stack)
    assert done.returncode == 1 and done.stdout == ""
    assert f"not signed in to {stack.idp.issuer}; run: jitgate login --issuer {stack.idp.issuer}" in done.stderr
