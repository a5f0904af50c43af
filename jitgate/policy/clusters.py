"""Clusters behind the gateway and the credential the gateway uses for each; the `clusters:` section."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from jitgate.policy.document import Node
from jitgate.policy.schema import Bool, Field, FilePath, Int, Map, Section, Str, Values, dataclass_default
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
# The `clusters:` section


def _endpoint(text: str) -> str:
    url = urlsplit(text)
    if url.scheme != "https" or not url.hostname:
        raise ValueError(f"must be an https:// URL, got {text!r}")
    if url.path not in ("", "/") or url.query or url.username:
        raise ValueError("must be scheme://host[:port] only (no path, query or credentials)")
    return text


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text:
        raise ValueError(f"expected host:port, got {text!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port in {text!r}")
    return host.lower(), int(port_text)


def _eks_default(name: str):
    return dataclass_default(EKSClusterCredentialConfig, name)


EKS = Section("eks_credential", "Assume an IAM role for each caller and mint EKS tokens from it.", (
    Field("region", Str(), "AWS region of the cluster, e.g. `eu-west-1`.", required=True),
    Field("cluster_name", Str(), "The EKS cluster's name (the token is signed for it).", required=True),
    Field("role_arn", Str(), "IAM role assumed for each caller (session name and SourceIdentity are the caller's "
          "username, so CloudTrail names the human); used by rules that name no `upstream_role`.", required=True),
    Field("session_duration", Int(), "Seconds of each AssumeRole session (900..43200).", default=_eks_default("session_duration")),
    Field("external_id", Str(), "External ID, if the role's trust policy asks for one."),
    Field("sts_endpoint", Str(), "STS endpoint URL; default: the region's. Leave it unset for a real cluster: EKS "
          "accepts tokens only for its known STS hosts."),
    Field("sts_ca_file", FilePath(), "CA file that verifies the STS endpoint; default: botocore's bundle."),
    Field("roles", Map(Str()), "Named IAM role ARNs an access rule may pick with `upstream_role` "
          "(e.g. `readonly` vs `admin`)."),
))

CLIENT_CERT = Section("client_cert_credential", "A client certificate the gateway presents to the cluster.", (
    Field("cert_file", FilePath(), "PEM client certificate.", required=True),
    Field("key_file", FilePath(), "PEM private key of the certificate.", required=True),
))

CREDENTIAL = Section(
    "cluster_credential",
    "How the gateway (never the caller) authenticates to the cluster.",
    (
        Field("eks", EKS, "Amazon EKS: STS AssumeRole per caller, then an EKS token."),
        Field("token_file", FilePath(), "A bearer token read from this file (re-read when it changes, as projected tokens rotate)."),
        Field("client_cert", CLIENT_CERT, "A client certificate and key."),
    ),
    exactly_one=("eks", "token_file", "client_cert"),
)

CLUSTER = Section("cluster", "A Kubernetes API server behind the gateway and the credential the gateway uses for it.", (
    Field("name", Str(), "Unique name, used in kubeconfigs, access rules and audit events.", required=True),
    Field("endpoint", Str(), "The URL clients use, `https://host[:port]` (no path); its host is unique across clusters.",
          required=True, check=_endpoint),
    Field("connect", Str(), "Where to connect instead, `host:port` (private endpoints, tests); TLS is still checked "
          "against the endpoint's hostname.", check=_host_port),
    Field("ca_file", FilePath(), "CA that verifies the cluster's serving certificate; verification is never skipped.", required=True),
    Field("credential", CREDENTIAL, "How the gateway authenticates to the cluster.", required=True),
    Field("impersonate", Bool(), "Send `Impersonate-User`/`Impersonate-Group` with the caller's identity, so cluster RBAC "
          "and the cluster's audit log see the human (the credential must be allowed to impersonate).",
          default=dataclass_default(Cluster, "impersonate")),
))


def _credential(c: Values) -> tuple[UpstreamCredential, dict[str, str]]:
    if c["token_file"] is not None:
        return TokenFileCredential(c["token_file"]), {}
    if c["client_cert"] is not None:
        cc = c["client_cert"]
        return ClientCertCredential(cc["cert_file"], cc["key_file"]), {}
    eks = c["eks"]
    sts_ca = eks["sts_ca_file"]
    cred = eks.node.check(
        lambda: EKSClusterCredentialConfig(
            region=eks["region"],
            cluster_name=eks["cluster_name"],
            role_arn=eks["role_arn"],
            sts_endpoint=eks["sts_endpoint"],
            session_duration=eks["session_duration"],
            external_id=eks["external_id"],
            ca_bundle=str(sts_ca) if sts_ca else None,
        )
    )
    roles: dict[str, str] = dict(eks["roles"] or {})
    for role, arn in roles.items():
        # Each named role must be as valid as the default one.
        eks["roles"].node.check(functools.partial(dataclasses.replace, cred, role_arn=arn), role)
    return cred, roles


def parse_cluster(node: Node) -> Cluster:
    v = CLUSTER.read_node(node)
    url = urlsplit(v["endpoint"])
    credential, roles = _credential(v["credential"])
    return Cluster(
        name=v["name"],
        endpoint=f"https://{url.netloc.lower()}",
        host=url.hostname.lower(),
        port=url.port or 443,
        ca_file=v["ca_file"],
        credential=credential,
        upstream_roles=roles,
        connect=v["connect"],
        impersonate=v["impersonate"],
    )
