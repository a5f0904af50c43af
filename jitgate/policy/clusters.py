"""Clusters behind the gateway and the credential the gateway uses for each; the `clusters:` section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from jitgate.policy.document import Node
from jitgate.upstream.eks import EKSClusterCredentialConfig


@dataclass(frozen=True)
class TokenFileCredential:
    """A bearer token read from a file (re-read when the file changes, as projected tokens rotate)."""

    path: Path


@dataclass(frozen=True)
class ClientCertCredential:
    cert_file: Path
    key_file: Path


UpstreamCredential = EKSClusterCredentialConfig | TokenFileCredential | ClientCertCredential


@dataclass(frozen=True)
class Cluster:
    name: str
    endpoint: str  # the URL clients use, e.g. https://ABC.gr7.eu-west-1.eks.amazonaws.com
    host: str
    port: int
    ca_file: Path  # verifies the upstream; verification is never skipped
    credential: UpstreamCredential
    connect: tuple[str, int] | None = None  # where to actually connect, when not the endpoint's host
    impersonate: bool = False  # send Impersonate-User/Group so cluster RBAC and audit see the human
    # Named IAM roles an access rule may pick (`upstream_role:`), e.g. readonly vs admin, per scope.
    upstream_roles: Mapping[str, str] = field(default_factory=dict)

    def credential_for_role(self, role: str | None) -> UpstreamCredential:
        """The credential a grant with this upstream role uses: the named IAM role, or the default."""
        if role is None:
            return self.credential
        return dataclasses.replace(self.credential, role_arn=self.upstream_roles[role])

    @property
    def connect_address(self) -> tuple[str, int]:
        return self.connect or (self.host, self.port)


# ---------------------------------------------------------------------------------------------
# Sections


def _parse_host_port(node: Node, key: str, text: str, default_port: int | None) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    host = host.strip("[]")
    if not host:
        raise node.error(key, f"expected host:port, got {text!r}")
    if not port_text:
        if default_port is None:
            raise node.error(key, f"expected host:port, got {text!r}")
        return host.lower(), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise node.error(key, f"invalid port in {text!r}")
    return host.lower(), int(port_text)


def _credential(node: Node) -> tuple[UpstreamCredential, dict[str, str]]:
    kinds = [k for k in ("eks", "token_file", "client_cert") if k in node.data]
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none"
        raise node.error(None, f"exactly one of eks, token_file, client_cert is required (found: {found})")
    roles: dict[str, str] = {}
    if kinds[0] == "token_file":
        cred: UpstreamCredential = TokenFileCredential(node.path_value("token_file", required=True))
    elif kinds[0] == "client_cert":
        cc = node.child("client_cert", required=True)
        cred = ClientCertCredential(cc.path_value("cert_file", required=True), cc.path_value("key_file", required=True))
        cc.finish()
    else:
        eks = node.child("eks", required=True)
        sts_ca = eks.path_value("sts_ca_file")
        cred = eks.check(
            lambda: EKSClusterCredentialConfig(
                region=eks.string("region", required=True),
                cluster_name=eks.string("cluster_name", required=True),
                role_arn=eks.string("role_arn", required=True),
                sts_endpoint=eks.string("sts_endpoint"),
                session_duration=eks.get("session_duration", int, default=3600),
                external_id=eks.string("external_id"),
                ca_bundle=str(sts_ca) if sts_ca else None,
            )
        )
        roles_node = eks.child("roles")
        if roles_node is not None:
            for role in list(roles_node.data):
                arn = roles_node.string(role, required=True)
                # Each named role must be as valid as the default one.
                roles_node.check(lambda: dataclasses.replace(cred, role_arn=arn), role)
                roles[str(role)] = arn
            roles_node.finish()
        eks.finish()
    node.finish()
    return cred, roles


def parse_cluster(node: Node) -> Cluster:
    name = node.string("name", required=True)
    endpoint = node.string("endpoint", required=True)
    url = urlsplit(endpoint)
    if url.scheme != "https" or not url.hostname:
        raise node.error("endpoint", f"must be an https:// URL, got {endpoint!r}")
    if url.path not in ("", "/") or url.query or url.username:
        raise node.error("endpoint", "must be scheme://host[:port] only (no path, query or credentials)")
    connect_text = node.string("connect")
    connect = _parse_host_port(node, "connect", connect_text, default_port=None) if connect_text else None
    ca_file = node.path_value("ca_file", required=True)
    credential, roles = _credential(node.child("credential", required=True))
    cluster = Cluster(
        name=name,
        endpoint=f"https://{url.netloc.lower()}",
        host=url.hostname.lower(),
        port=url.port or 443,
        ca_file=ca_file,
        credential=credential,
        upstream_roles=roles,
        connect=connect,
        impersonate=node.get("impersonate", bool, default=False),
    )
    node.finish()
    return cluster


