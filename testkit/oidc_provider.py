"""A real OIDC provider for tests: PyPI `oidc-provider-mock` in its own process, over TLS.

    provider = OIDCProviderProcess(tmp_path).start(ca)
    token = provider.token("alice", email="alice@example.com", groups=["dev"], client_id="jitgate")
    ...
    provider.stop()

`token()` walks the provider's own authorization-code flow (set the user's claims, authorize,
exchange the code at the token endpoint with client credentials) and returns the ID token it
signed. The runner also exports the provider's signing key to a file so tests can have the
provider's key sign crafted claims (an IdP that issues a token with odd claims), see forge.py.

The runner half of this module (`python -m tests.support.oidc_provider ...`) serves the provider's
Flask app with werkzeug's threaded server and an ssl context, since the package's own CLI (uvicorn)
and `run_server_in_thread` only speak plain HTTP.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import ssl
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import jwt

from testkit.net import TestCA, free_port, stop, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIRECT_URI = "https://client.jitgate.test/callback"


class OIDCProviderProcess:
    def __init__(self, directory: Path, name: str = "oidc-provider", token_max_age: int = 3600) -> None:
        self.directory = Path(directory)
        self.name = name
        self.token_max_age = token_max_age
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._ssl: ssl.SSLContext | None = None
        self.ca_file: Path | None = None
        """CA bundle that verifies the provider's TLS certificate (give it to IssuerConfig.ca_file)."""
        self.signing_key_path = self.directory / f"{name}-signing-key.json"
        self.log_path = self.directory / f"{name}.log"

    @property
    def issuer(self) -> str:
        if self.port is None:
            raise RuntimeError("provider not started")
        return f"https://127.0.0.1:{self.port}"

    def policy_section(self) -> str:
        """The policy's `identity_providers:` section that trusts this provider as the tests use it
        (audience jitgate, email as the username, groups prefixed "oidc:"), at the top level."""
        return (f"identity_providers:\n  - issuer: {self.issuer}\n    client_ids: [jitgate]\n"
                f"    ca_file: {self.ca_file}\n    username_claim: email\n    groups_claim: groups\n"
                f'    groups_prefix: "oidc:"\n')

    def start(self, ca: TestCA, port: int | None = None) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        cert, key, self.ca_file = strict_server_cert(ca, self.directory, self.name, ["127.0.0.1", "localhost"])
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        self.port = port or free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "testkit.oidc_provider",
                    "--port", str(self.port),
                    "--cert", str(cert),
                    "--key", str(key),
                    "--signing-key-out", str(self.signing_key_path),
                    "--token-max-age", str(self.token_max_age),
                ],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- talking to the provider -------------------------------------------------------------

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        assert self.port is not None and self._ssl is not None, "provider not started"
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ssl, timeout=10)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def set_user(self, sub: str, claims: Mapping[str, Any]) -> None:
        status, _, body = self.request(
            "PUT", f"/users/{quote(sub, safe='')}", json.dumps(dict(claims)).encode(), {"Content-Type": "application/json"}
        )
        if status != 204:
            raise RuntimeError(f"setting user claims failed: HTTP {status}: {body[:300]!r}")

    def token(
        self,
        sub: str,
        *,
        email: str | None = None,
        email_verified: bool | None = None,
        groups: Iterable[str] = (),
        client_id: str = "jitgate",
        client_secret: str = "jitgate-secret",
        extra_claims: Mapping[str, Any] | None = None,
        scope: str = "openid email profile",
    ) -> str:
        """A real ID token for `sub`, issued to `client_id` through the authorization-code flow."""
        claims: dict[str, Any] = {}
        if email is not None:
            claims["email"] = email
        if email_verified is not None:
            claims["email_verified"] = email_verified
        if groups:
            claims["groups"] = list(groups)
        claims.update(extra_claims or {})
        self.set_user(sub, claims)

        query = urlencode(
            {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT_URI, "scope": scope, "state": "s1"}
        )
        status, headers, body = self.request(
            "POST",
            f"/oauth2/authorize?{query}",
            urlencode({"sub": sub, "action": "allow"}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        if status != 302:
            raise RuntimeError(f"authorization failed: HTTP {status}: {body[:300]!r}")
        redirect = urlsplit(headers["location"])
        code = parse_qs(redirect.query)["code"][0]

        credentials = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        status, _, body = self.request(
            "POST",
            "/oauth2/token",
            urlencode({"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Basic {credentials}"},
        )
        if status != 200:
            raise RuntimeError(f"token exchange failed: HTTP {status}: {body[:300]!r}")
        return json.loads(body)["id_token"]

    def jwks(self) -> dict[str, Any]:
        status, _, body = self.request("GET", "/jwks")
        if status != 200:
            raise RuntimeError(f"JWKS fetch failed: HTTP {status}")
        return json.loads(body)

    def signing_key(self) -> tuple[str, Any]:
        """(kid, private key) the provider signs ID tokens with."""
        jwk = json.loads(self.signing_key_path.read_text())
        return jwk["kid"], jwt.PyJWK(jwk).key


def strict_server_cert(ca: TestCA, directory: Path, name: str, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A server certificate Python 3.13's strict default client context accepts: (cert, key, ca_file).
    TestCA adds the key identifiers strict verification wants, so its own files serve."""
    cert_path, key_path = ca.issue(name, hosts=hosts)
    return cert_path, key_path, ca.cert_path


# -- runner (the separate process) --------------------------------------------------------------


def _serve(argv: list[str] | None = None) -> None:
    import flask
    import joserfc.jwk
    import werkzeug.serving
    from oidc_provider_mock import app as make_app

    parser = argparse.ArgumentParser(description="oidc-provider-mock over TLS, for jitgate tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--signing-key-out", required=True)
    parser.add_argument("--token-max-age", type=int, default=3600)
    args = parser.parse_args(argv)

    app = make_app(access_token_max_age=datetime.timedelta(seconds=args.token_max_age))
    # The provider makes its RSA key when the app is set up and hands it to requests through a
    # before_request hook; run that hook once to export the key for tests that forge signed tokens.
    with app.test_request_context():
        app.preprocess_request()
        jwk = flask.g.oidc_provider_mock_storage.jwk
        # Through a KeySet, as the provider's /jwks does, so the exported key carries the same kid.
        exported = joserfc.jwk.KeySet([jwk]).as_dict(private=True)["keys"][0]
        Path(args.signing_key_out).write_text(json.dumps(exported))
        Path(args.signing_key_out).chmod(0o600)

    server = werkzeug.serving.make_server(
        "127.0.0.1", args.port, app, threaded=True, ssl_context=(args.cert, args.key)
    )
    server.serve_forever()


if __name__ == "__main__":
    _serve()
