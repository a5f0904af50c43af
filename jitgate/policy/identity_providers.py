"""The `identity_providers:` section: OIDC issuers whose ID tokens the gateway accepts."""

from __future__ import annotations

from jitgate.identity.oidc import IssuerConfig
from jitgate.policy.document import Node


def parse_identity_provider(node: Node) -> IssuerConfig:
    required = node.child("required_claims")
    required_claims: dict[str, str] = {}
    if required is not None:
        for key in list(required.data):
            required_claims[str(key)] = required.string(key, required=True)
        required.finish()
    ca_file = node.path_value("ca_file")
    algorithms = node.strings("algorithms")
    username_prefix = node.get("username_prefix", str)
    config = node.check(
        lambda: IssuerConfig(
            issuer_url=node.string("issuer", required=True),
            audiences=node.strings("client_ids", required=True),
            username_claim=node.string("username_claim", default="sub"),
            username_prefix=username_prefix,
            groups_claim=node.string("groups_claim", default="groups"),
            groups_prefix=node.get("groups_prefix", str, default=""),
            required_claims=required_claims,
            algorithms=algorithms or ("RS256",),
            ca_file=str(ca_file) if ca_file else None,
            discovery_url=node.string("discovery_url"),
        )
    )
    node.finish()
    return config



