"""The `identity_providers:` section: OIDC issuers whose ID tokens the gateway accepts."""

from __future__ import annotations

from jitgate.identity.oidc import TOKEN_TYPES, IssuerConfig
from jitgate.policy.document import Node
from jitgate.policy.schema import (
    Field,
    FilePath,
    Map,
    Section,
    Str,
    Strings,
    dataclass_default,
)


def _default(name: str):
    return dataclass_default(IssuerConfig, name)


IDENTITY_PROVIDER = Section(
    "identity_provider",
    "An OIDC issuer whose ID tokens the gateway accepts; claims map to a username and groups as "
    "kube-apiserver's `--oidc-*` flags do.",
    (
        Field("issuer", Str(), "Issuer URL (`https://`), exactly as in the tokens' `iss`; unique.", required=True),
        Field("client_ids", Strings(), "Accepted audiences (the tokens' `aud`).", required=True),
        Field("username_claim", Str(), "Claim that holds the username.", default=_default("username_claim")),
        Field("username_prefix", Str(empty=True), "Prefix of usernames; `-` for none.",
              shown_default="`<issuer>#`, none for `email`"),
        Field("groups_claim", Str(), "Claim that holds the groups.", default=_default("groups_claim")),
        Field("groups_prefix", Str(empty=True), "Prefix of every group, e.g. `oidc:`.", default=_default("groups_prefix")),
        Field("algorithms", Strings(), "Accepted signature algorithms; asymmetric only (HS* and none are refused).",
              default=_default("algorithms")),
        Field("required_claims", Map(Str()), "Claims a token must carry, with exactly these string values."),
        Field("ca_file", FilePath(), "CA that verifies the issuer's TLS certificate; default: the system's."),
        Field("discovery_url", Str(), "Discovery document URL; default: `<issuer>/.well-known/openid-configuration`."),
        Field("jwks_file", FilePath(), "The issuer's keys from this JWKS file instead of discovery (an issuer that is "
              "no web service, e.g. the MCP front's token exchange); re-read like a fetched JWKS."),
        Field("token_types", Strings(choices=TOKEN_TYPES, noun="token type"), "Kinds of token accepted (JOSE `typ`): "
              "`JWT` (ID tokens) and `at+jwt` (OAuth access tokens, RFC 9068). List `at+jwt` only for an issuer whose "
              "access tokens name this gateway in `aud` (the MCP front's token exchange): an access token minted for "
              "another resource is never proof of who the caller is.", default=_default("token_types")),
    ),
)


def parse_identity_provider(node: Node) -> IssuerConfig:
    v = IDENTITY_PROVIDER.read_node(node)
    return node.check(
        lambda: IssuerConfig(
            issuer_url=v["issuer"],
            audiences=v["client_ids"],
            username_claim=v["username_claim"],
            username_prefix=v["username_prefix"],
            groups_claim=v["groups_claim"],
            groups_prefix=v["groups_prefix"],
            required_claims=dict(v["required_claims"] or {}),
            algorithms=v["algorithms"],
            ca_file=str(v["ca_file"]) if v["ca_file"] else None,
            discovery_url=v["discovery_url"],
            jwks_file=str(v["jwks_file"]) if v["jwks_file"] else None,
            token_types=v["token_types"],
        )
    )
