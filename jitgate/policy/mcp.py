"""The MCP front's policy: a file of its own with one `mcp:` section (`--set mcp_policy=<file>`).

    mcp:
      servers: [...]                # the MCP servers behind the front, one reverse-mode listener each
      authorization_servers: [...]  # trusted token issuers (identity-provider fields, without client_ids)
      allowed_origins: [...]        # browser origins allowed to call (absent Origin: always allowed)
      rules: [...]                  # who may call which tool, read which resource, get which prompt
      masking: {...}                # as the Kubernetes policy's `masking:`; default: the built-in detectors

Every mistake stops the front with `file:line: field: message`, as the other sections do (the
same Node/Section machinery). The Kubernetes gateway skips a file's `mcp:` section, so the file
may live in the same `policies/` folder.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from jitgate.access.scope import RULE_NAME
from jitgate.guardrails.rules import Pattern
from jitgate.identity.oidc import (
    ACCESS_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    TOKEN_TYPES,
    IssuerConfig,
)
from jitgate.mcp.config import McpConfig, McpServer, TokenExchange, upstream_address
from jitgate.mcp.rules import HINT_DEFAULTS, Action, Approval, Rule
from jitgate.policy.document import Node, PolicyError
from jitgate.policy.identity_providers import IDENTITY_PROVIDER
from jitgate.policy.loader import _read_file
from jitgate.policy.masking import MASKING, parse_masking
from jitgate.policy.schema import (
    Bool,
    Duration,
    Field,
    FilePath,
    Int,
    ListOf,
    Map,
    Section,
    Str,
    Strings,
    json_schema_text,
)


def _name(name: str) -> str:
    if not RULE_NAME.fullmatch(name):
        raise ValueError(f"invalid name {name!r}: use lower-case letters, digits, '-', '.' and '_'")
    return name


def _upstream(text: str) -> str:
    upstream_address(text)
    return text


def _resource(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"must be the absolute https:// URI clients use for this server, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not carry a query, fragment or credentials (RFC 8707)")
    return text


def _path(text: str) -> str:
    if not text.startswith("/") or any(c in text for c in "?#") or "//" in text:
        raise ValueError(f"must be an absolute path such as /mcp, got {text!r}")
    return text


def _scope(text: str) -> str:
    if any(c.isspace() or c in '"\\' for c in text) or not text.isprintable():
        raise ValueError(f"a scope is one token without spaces or quotes, got {text!r}")
    return text


def _origin(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise ValueError(f"an origin is scheme://host[:port], got {text!r}")
    return text.rstrip("/").lower()


MAX_HOLD = 3600
MAX_EXCHANGE_LIFETIME = 15 * 60


def _exchange_issuer(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ValueError(f"must be an https:// URL naming the front as an issuer (the `iss` of its tokens), got {text!r}")
    return text


MCP_TOKEN_EXCHANGE = Section(
    "mcp_token_exchange",
    "The caller's identity for the server, as a short-lived token the front signs (instead of a credential of the "
    "server's own): for a server that forwards the bearer token it gets to jitgate's Kubernetes side "
    "(kubernetes-mcp-server's passthrough). The caller's own token never goes upstream.",
    (
        Field("issuer", Str(), "The tokens' `iss`: the issuer the Kubernetes policy's identity provider names for them.",
              required=True, check=_exchange_issuer),
        Field("audience", Str(), "The tokens' `aud`: one of that identity provider's `client_ids` (never the MCP "
              "resource, never an audience another service accepts).", required=True),
        Field("signing_key", FilePath(), "PEM private key the front signs with (EC P-256, RSA >= 2048 or Ed25519; "
              "`python -m jitgate.mcp.exchange` makes one and its JWKS); its public JWKS is the identity provider's "
              "`jwks_file`.", required=True),
        Field("lifetime", Duration(), f"How long a token is valid (at most {MAX_EXCHANGE_LIFETIME // 60}m).",
              default=300),
    ),
)

MCP_SERVER = Section("mcp_server", "An MCP server behind the front (Streamable HTTP), reached through one "
                     "`--mode reverse:<upstream>@<port>` listener.", (
    Field("name", Str(), "Unique name; rules' `servers` and audit lines use it.", required=True, check=_name),
    Field("upstream", Str(), "The server's address as the reverse mode names it, e.g. `http://127.0.0.1:8000`.",
          required=True, check=_upstream),
    Field("resource", Str(), "This server's canonical URI as clients reach it (the protected resource of RFC 9728): "
          "tokens must name it in `aud`.", required=True, check=_resource),
    Field("path", Str(), "The MCP endpoint's path; other paths are answered 404 (except the resource metadata).",
          default="/mcp", check=_path),
    Field("trusted", Bool(), "Believe the server's tool annotations (`readOnlyHint`, `destructiveHint`...) in rules; "
          "otherwise every tool has the protocol's defaults (not read-only, destructive).", default=False),
    Field("upstream_token_file", Str(), "File with the front's own bearer token for this server (read on each "
          "change); without it the server gets no Authorization header. The caller's token never reaches it."),
    Field("scopes", Strings(each=_scope), "Scopes every token must carry (`scope` or `scp` claim); published as "
          "`scopes_supported` and named in challenges. A valid token without them gets 403 `insufficient_scope`."),
    Field("token_exchange", MCP_TOKEN_EXCHANGE, "Send the server a token naming the caller (signed by the front, "
          "short-lived, audience-bound) instead of `upstream_token_file`."),
))

_ISSUER_FIELDS = tuple(f for f in IDENTITY_PROVIDER.fields if f.key not in ("client_ids", "token_types"))
MCP_AUTHORIZATION_SERVER = Section(
    "mcp_authorization_server",
    "A trusted token issuer (OIDC discovery and JWKS, as `identity_providers`). A token's `aud` must name the "
    "server's `resource`; `client_ids` only lists authorized parties (`azp`) a token with several audiences may have.",
    (Field("client_ids", Strings(), "Clients accepted as `azp` of a token with several audiences."),) + _ISSUER_FIELDS + (
        Field("token_types", Strings(choices=TOKEN_TYPES, noun="token type"), "Kinds of token accepted (JOSE `typ`): "
              "OAuth access tokens (`at+jwt`, RFC 9068) and JWTs of another `typ` whose `aud` names the resource "
              "(many issuers type access tokens `JWT`). `[at+jwt]` alone is RFC 9068's strict resource-server check.",
              default=(ID_TOKEN_TYPE, ACCESS_TOKEN_TYPE)),
    ),
)

MCP_ANNOTATIONS = Section("mcp_annotations", "Tool annotations a rule requires, exactly (trusted servers' hints; "
                          "defaults elsewhere).", tuple(
    Field(hint, Bool(), f"Default `{str(default).lower()}`.") for hint, default in HINT_DEFAULTS.items()))

MCP_APPROVAL = Section(
    "mcp_approval",
    "How a require-approval rule's calls wait for a human: held open while reviewers of an access rule of the "
    "Kubernetes policy decide (`jitgate approve`), then made once.",
    (
        Field("access_rule", Str(), "The Kubernetes policy's access rule whose reviewers decide (`mcp_access_policy` "
              "names that policy); it must cover the call's scope (cluster `*`, `cluster_wide`, resources "
              "`tools.mcp.jitgate.dev`, `resources.mcp.jitgate.dev` or `prompts.mcp.jitgate.dev`, verbs `create` for "
              "tools and `get` for the others) and let the caller's groups request.", required=True, check=_name),
        Field("approvals", Int(minimum=1), "Distinct approvals needed.", shown_default="the access rule's `required`"),
        Field("hold", Duration(), f"How long a call is held open while a human decides (at most {MAX_HOLD // 60}m); "
              "then it is refused naming the request, and a retry of the same call joins it.", default=300),
    ),
)

MCP_RULE = Section(
    "mcp_rule",
    "Who may call which tool, read which resource (`resources`) or get which prompt (`prompts`). Matches when every "
    "condition it names holds (absent: any; lists are alternatives). Patterns are globs or `re:<expression>` "
    "(searched). Deny wins, then require-approval, then allow; whatever no rule allows is denied.",
    (
        Field("name", Str(), "Unique name; shown in refusals and audit lines.", required=True, check=_name),
        Field("description", Str(empty=True), "What the rule is for.", default=""),
        Field("action", Str(choices=tuple(a.value for a in Action), noun="action"),
              "`allow`, `deny` (JSON-RPC error, the call is not made) or `require-approval` (held while a human "
              "decides, with `approval`; without it refused with what to do).", required=True),
        Field("message", Str(), "Why, as the caller reads it when refused."),
        Field("users", Strings(each=Pattern), "Usernames or patterns of the caller."),
        Field("groups", Strings(each=Pattern), "Groups or patterns; any of the caller's groups."),
        Field("servers", Strings(each=Pattern), "Server names (`mcp.servers[].name`) or patterns."),
        Field("tools", Strings(each=Pattern), "Tool names or patterns (a rule naming none of `tools`, `resources`, "
              "`prompts` is about tool calls)."),
        Field("resources", Strings(each=Pattern), "Resource URIs or patterns: the rule is about `resources/read` "
              "(and what `resources/list` shows)."),
        Field("prompts", Strings(each=Pattern), "Prompt names or patterns: the rule is about `prompts/get` (and "
              "what `prompts/list` shows)."),
        Field("arguments", Map(Strings(each=Pattern)), "Argument name -> patterns (tools and prompts); the argument "
              "must be present and match one. Non-strings are matched as compact JSON (`true`, `42`, `[\"a\",\"b\"]`)."),
        Field("annotations", MCP_ANNOTATIONS, "Tool annotations the tool must have (tool rules only)."),
        Field("approval", MCP_APPROVAL, "require-approval only: hold the call while reviewers decide."),
    ),
)

MCP = Section("mcp", "The MCP front: servers, trusted issuers, origins, tool rules and masking.", (
    Field("servers", ListOf(MCP_SERVER), "The MCP servers behind the front.", required=True),
    Field("authorization_servers", ListOf(MCP_AUTHORIZATION_SERVER), "Issuers whose tokens the front accepts; "
          "published as the resource metadata's `authorization_servers`.", required=True),
    Field("allowed_origins", Strings(each=_origin), "Browser origins allowed to send requests; a request with "
          "another `Origin` is refused 403 (DNS-rebinding protection). Requests without `Origin` are allowed.",
          default=()),
    Field("rules", ListOf(MCP_RULE), "Tool rules, in order."),
    Field("masking", MASKING, "Masking of tool results; default: the built-in detectors."),
))

MCP_POLICY = Section("mcp_policy", "The MCP front's policy file.", (
    Field("mcp", MCP, "The MCP front.", required=True),
))


def mcp_policy_json_schema() -> str:
    return json_schema_text(MCP_POLICY, "jitgate MCP front policy")


def _rule(v) -> Rule:
    hints = v["annotations"]
    named = [key for key in ("tools", "resources", "prompts") if v[key]]
    if len(named) > 1:
        raise v.error(named[1], f"a rule is about tools, resources or prompts: this one names {' and '.join(named)}; "
                      "write one rule for each")
    if hints is not None and named and named[0] != "tools":
        raise v.error("annotations", "annotations are tools' hints; a rule about resources or prompts has none")
    if v["arguments"] and named == ["resources"]:
        raise v.error("arguments", "resources/read has no arguments; match the URI in `resources`")
    approval = v["approval"]
    if approval is not None and v["action"] != Action.REQUIRE_APPROVAL.value:
        raise v.error("approval", "only a require-approval rule holds calls for an approval")
    if approval is not None and approval["hold"] > MAX_HOLD:
        raise approval.error("hold", f"at most {MAX_HOLD // 60}m: a held call keeps a connection open")
    return Rule(
        name=v["name"], action=Action(v["action"]), description=v["description"], message=v["message"] or "",
        users=v["users"] or (), groups=v["groups"] or (), servers=v["servers"] or (), tools=v["tools"] or (),
        arguments=tuple((name, patterns) for name, patterns in (v["arguments"] or {}).items()),
        annotations=tuple((k, hints[k]) for k in HINT_DEFAULTS if hints is not None and hints[k] is not None),
        resources=v["resources"] or (), prompts=v["prompts"] or (),
        approval=Approval(approval["access_rule"], approval["approvals"], approval["hold"]) if approval else None,
        source=f"{v.node.file}:{v.node.line() or '?'}",
    )


def _token_exchange(v) -> TokenExchange | None:
    if v is None:
        return None
    if v["lifetime"] > MAX_EXCHANGE_LIFETIME:
        raise v.error("lifetime", f"at most {MAX_EXCHANGE_LIFETIME // 60}m: an exchanged token is short-lived")
    from jitgate.mcp.exchange import load_signing_key

    try:
        load_signing_key(str(v["signing_key"]))
    except ValueError as e:
        raise v.error("signing_key", str(e)) from None
    return TokenExchange(v["issuer"], v["audience"], str(v["signing_key"]), v["lifetime"])


def _issuer(v, audiences: tuple[str, ...]) -> IssuerConfig:
    return IssuerConfig(
        issuer_url=v["issuer"], audiences=audiences, username_claim=v["username_claim"],
        username_prefix=v["username_prefix"], groups_claim=v["groups_claim"], groups_prefix=v["groups_prefix"],
        required_claims=dict(v["required_claims"] or {}), algorithms=v["algorithms"],
        ca_file=str(v["ca_file"]) if v["ca_file"] else None, discovery_url=v["discovery_url"],
        jwks_file=str(v["jwks_file"]) if v["jwks_file"] else None, token_types=v["token_types"])


def parse_mcp(node: Node) -> McpConfig:
    v = MCP.read_node(node)
    servers: list[McpServer] = []
    for item in v["servers"]:
        for key, what in (("name", "name"), ("upstream", "address"), ("resource", "resource")):
            taken = next((s for s in servers if getattr(s, key if key != "upstream" else "address")
                          == (item[key] if key != "upstream" else upstream_address(item[key]))), None)
            if taken is not None:
                raise item.error(key, f"this {what} is already used by server {taken.name!r}")
        token_file = item["upstream_token_file"]
        if token_file is not None:
            path = Path(token_file).expanduser()
            path = path if path.is_absolute() else (node.file.parent / path).resolve()
            if not path.is_file():
                raise item.error("upstream_token_file", f"file not found: {path}")
            token_file = str(path)
        exchange = _token_exchange(item["token_exchange"])
        if exchange is not None and token_file is not None:
            raise item.error("token_exchange", "a server gets the front's own token (upstream_token_file) or the "
                             "caller's exchanged one (token_exchange), not both")
        if exchange is not None and any(exchange.audience == s.resource for s in servers) or \
                (exchange is not None and exchange.audience == item["resource"]):
            raise item["token_exchange"].error("audience", "must not be an MCP resource: the exchanged token would be "
                                               "accepted by the front itself")
        servers.append(McpServer(item["name"], item["upstream"], item["resource"], item["path"], item["trusted"],
                                 token_file, tuple(item["scopes"] or ()), exchange))
    if not servers:
        raise v.error("servers", "must list at least one server")
    audiences = tuple(dict.fromkeys(s.resource for s in servers))
    issuers: list[IssuerConfig] = []
    for item in v["authorization_servers"]:
        accepted = audiences + tuple(item["client_ids"] or ())
        issuer = item.node.check(lambda item=item, accepted=accepted: _issuer(item, accepted))
        if any(x.issuer_url == issuer.issuer_url for x in issuers):
            raise item.error("issuer", f"issuer {issuer.issuer_url!r} is listed twice")
        issuers.append(issuer)
    if not issuers:
        raise v.error("authorization_servers", "must list at least one issuer")
    rules: list[Rule] = []
    for item in v["rules"]:
        if any(r.name == item["name"] for r in rules):
            raise item.error("name", f"rule {item['name']!r} is already defined")
        rules.append(_rule(item))
    masking = parse_masking(v["masking"].node if v["masking"] is not None else None)
    return McpConfig(tuple(servers), tuple(issuers), tuple(rules), frozenset(v["allowed_origins"]),
                     masking.detectors(), (str(node.file),))


def load_mcp_policy(path: Path | str) -> McpConfig:
    path = Path(path)
    if not path.is_file():
        raise PolicyError(path, None, "", "no such MCP policy file")
    root = Node(_read_file(path), path, "")
    node = root.child("mcp", required=True)
    root.finish()  # any other top-level key is a mistake
    return parse_mcp(node)
