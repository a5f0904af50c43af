"""Kubeconfigs that reach a cluster only through the gateway.

Proxy mode keeps the cluster's own endpoint as `server:` and sends it through the gateway with
`proxy-url:`; reverse mode points `server:` at the gateway's listener for that cluster. Either way the
CA is the gateway's (it terminates TLS), and the user entry supplies an OIDC ID token, never a
cluster credential.

The same kubeconfig serves kubectl, client-go programs (kubernetes-mcp-server) and Node programs on
@kubernetes/client-node (mcp-server-kubernetes reads MCP resources with it): a token file is named
under both spellings they read (`tokenFile`, `token-file`), with an absolute path, since client-go
resolves a relative one against the kubeconfig's folder and client-node against its working folder.
For agents, prefer a token file or an exec plugin to a static `token`: MCP servers' configuration
tools (`configuration_view`, `kubectl config view --raw`) show the kubeconfig to the model.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

from jitgate.policy.clusters import Cluster


@dataclass(frozen=True)
class TokenSource:
    """How kubectl gets the user's OIDC ID token: exactly one of the three."""

    token: str | None = None
    token_file: str | None = None
    exec_command: tuple[str, ...] | None = None  # e.g. kubectl oidc-login get-token --oidc-issuer-url=...

    def user_entry(self) -> dict:
        if self.token:
            return {"token": self.token}
        if self.token_file:
            # client-go (kubectl) reads `tokenFile` (again every minute, so a refreshed file is picked up);
            # @kubernetes/client-node reads only `token-file`, and without it sends no token at all.
            path = str(Path(self.token_file).expanduser().absolute())
            return {"tokenFile": path, "token-file": path}
        if self.exec_command:
            return {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": self.exec_command[0],
                    "args": list(self.exec_command[1:]),
                    "interactiveMode": "IfAvailable",
                    "provideClusterInfo": False,
                }
            }
        raise ValueError("a token, a token file or an exec command is required")


def oidc_login_command(issuer: str, client_id: str, client_secret: str | None = None, extra_scopes: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The kubelogin (`kubectl oidc-login`) exec plugin call that fetches and refreshes ID tokens."""
    args = ["kubectl", "oidc-login", "get-token", f"--oidc-issuer-url={issuer}", f"--oidc-client-id={client_id}"]
    if client_secret:
        args.append(f"--oidc-client-secret={client_secret}")
    args += [f"--oidc-extra-scope={s}" for s in extra_scopes]
    return tuple(args)


def build_kubeconfig(
    cluster: Cluster,
    user: str,
    gateway_ca_pem: bytes,
    tokens: TokenSource,
    *,
    proxy_url: str | None = None,
    server_url: str | None = None,
    namespace: str | None = None,
) -> dict:
    if (proxy_url is None) == (server_url is None):
        raise ValueError("give exactly one of proxy_url (regular mode) or server_url (reverse mode)")
    entry: dict = {
        "server": server_url or cluster.endpoint,
        "certificate-authority-data": base64.b64encode(gateway_ca_pem).decode(),
    }
    if proxy_url:
        entry["proxy-url"] = proxy_url
    context = {"cluster": cluster.name, "user": user}
    if namespace:
        context["namespace"] = namespace
    name = f"{user}@{cluster.name}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster.name, "cluster": entry}],
        "users": [{"name": user, "user": tokens.user_entry()}],
        "contexts": [{"name": name, "context": context}],
        "current-context": name,
        "preferences": {},
    }


def dump(config: dict) -> str:
    out = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(config, out)
    return out.getvalue()


def write(config: dict, path: Path) -> None:
    """Kubeconfigs can hold tokens: written 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(dump(config))
