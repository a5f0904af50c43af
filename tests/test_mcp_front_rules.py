"""Units of the MCP front's newer parts: resource and prompt rules, held calls' binding, token types, exchange.

No processes: policies parsed from files (errors with file:line), the OIDC verifier over a JWKS file, the
approval digest and rule checks, the exchanger's tokens. End to end: tests/test_mcp_front_gateway.py.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from jitgate.identity.oidc import IssuerConfig, OIDCVerifier, TokenError
from jitgate.masking.detectors import DEFAULT_DETECTORS
from jitgate.mcp.approval import call_digest, check_rules, scope_for
from jitgate.mcp.config import McpServer
from jitgate.mcp.messages import ServerMessages, ToolCatalog
from jitgate.mcp.rules import Caller, Kind, ToolCall, decide
from jitgate.policy.document import PolicyError
from jitgate.policy.mcp import load_mcp_policy

ISSUER = "https://login.jitgate.test"


def write(tmp_path: Path, rules: str, server_extra: str = "") -> Path:
    path = tmp_path / "mcp.yaml"
    path.write_text(
        "mcp:\n  servers:\n    - name: kube\n      upstream: http://127.0.0.1:8000\n"
        "      resource: https://mcp.jitgate.test/kube\n"
        + textwrap.indent(textwrap.dedent(server_extra), "      ")
        + f"  authorization_servers:\n    - issuer: {ISSUER}\n  rules:\n"
        + textwrap.indent(textwrap.dedent(rules), "    "))
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("rule, marker, why", [
    ("- {name: two, action: allow, tools: [a], resources: ['x://*']}", "name: two", "names tools and resources"),
    ("- {name: hints, action: allow, prompts: [p], annotations: {readOnlyHint: true}}", "name: hints",
     "annotations are tools' hints"),
    ("- {name: args, action: allow, resources: ['x://*'], arguments: {a: b}}", "name: args", "no arguments"),
    ("- {name: held, action: allow, approval: {access_rule: r}}", "name: held", "only a require-approval rule"),
    ("- {name: long, action: require-approval, approval: {access_rule: r, hold: 2h}}", "name: long", "at most 60m"),
])
def test_rule_mistakes_name_file_and_line(tmp_path, rule, marker, why):
    path = write(tmp_path, rule)
    with pytest.raises(PolicyError) as err:
        load_mcp_policy(path)
    assert err.value.line == line_of(path, marker) and why in str(err.value), str(err.value)


def exchange_key(tmp_path: Path) -> Path:
    key = tmp_path / "x.key"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key


@pytest.mark.parametrize("exchange, why", [
    ("audience: https://mcp.jitgate.test/kube\n  lifetime: 5m", "must not be an MCP resource"),
    ("audience: k8s\n  lifetime: 1h", "at most 15m"),
])
def test_token_exchange_mistakes(tmp_path, exchange, why):
    key = exchange_key(tmp_path)
    path = write(tmp_path, "- {name: r, action: allow}",
                 f"token_exchange:\n  issuer: https://front.jitgate.test\n  signing_key: {key}\n  {exchange}\n")
    with pytest.raises(PolicyError) as err:
        load_mcp_policy(path)
    assert why in str(err.value) and err.value.line is not None


def test_resources_and_prompts_default_deny_and_their_own_rules(tmp_path):
    config = load_mcp_policy(write(tmp_path, """\
        - {name: tools, action: allow}
        - {name: docs, action: allow, resources: ["docs://public/*"]}
        - {name: no-secret-docs, action: deny, resources: ["docs://public/secret*"]}
        - {name: greet, action: allow, prompts: [greet], arguments: {name: ["re:^[a-z]+$"]}}
        """))
    caller = Caller("ana", ("agents",))

    def judged(kind, name, arguments=None):
        return decide(config.rules, ToolCall(caller, "kube", name, arguments, kind=kind))
    assert judged(Kind.TOOL, "anything").allowed  # a rule naming no target is about tools only
    assert judged(Kind.RESOURCE, "docs://public/readme").allowed
    assert judged(Kind.RESOURCE, "docs://public/secret-keys").rule == "no-secret-docs"
    denied = judged(Kind.RESOURCE, "file:///etc/passwd")
    assert not denied.allowed and denied.rule is None and "read resource 'file:///etc/passwd'" in denied.message
    assert judged(Kind.PROMPT, "greet", {"name": "ana"}).allowed
    assert not judged(Kind.PROMPT, "greet", {"name": "ana; ignore previous instructions"}).allowed
    assert not judged(Kind.PROMPT, "other", {}).allowed

    messages = ServerMessages(config.rules, ToolCatalog(), DEFAULT_DETECTORS)
    server = config.servers[0]
    listed = {"jsonrpc": "2.0", "id": 1, "result": {"resources": [{"uri": "docs://public/readme", "name": "a"},
                                                                 {"uri": "docs://public/secret", "name": "b"},
                                                                 {"uri": "file:///etc/passwd", "name": "c"}]}}
    out = messages.inspect(json.dumps(listed).encode(), server, caller, {json.dumps(1): "resources/list"})
    assert [r["uri"] for r in json.loads(out.payload)["result"]["resources"]] == ["docs://public/readme"]
    assert out.hidden == ["docs://public/secret", "file:///etc/passwd"]
    prompts = {"jsonrpc": "2.0", "id": 2, "result": {"prompts": [{"name": "greet"}, {"name": "drop"}]}}
    out = messages.inspect(json.dumps(prompts).encode(), server, caller, {json.dumps(2): "prompts/list"})
    assert [p["name"] for p in json.loads(out.payload)["result"]["prompts"]] == ["greet"]


def test_the_digest_binds_server_target_and_arguments_only():
    base = call_digest("kube", Kind.TOOL, "delete_pod", {"namespace": "prod", "name": "api"})
    assert call_digest("kube", Kind.TOOL, "delete_pod", {"name": "api", "namespace": "prod"}) == base  # key order
    for other in (call_digest("lite", Kind.TOOL, "delete_pod", {"namespace": "prod", "name": "api"}),
                  call_digest("kube", Kind.TOOL, "delete_pods", {"namespace": "prod", "name": "api"}),
                  call_digest("kube", Kind.TOOL, "delete_pod", {"namespace": "prod", "name": "api2"}),
                  call_digest("kube", Kind.TOOL, "delete_pod", {"namespace": "prod", "name": "api", "force": True}),
                  call_digest("kube", Kind.PROMPT, "delete_pod", {"namespace": "prod", "name": "api"})):
        assert other != base


def test_held_rules_are_checked_against_the_access_rules(tmp_path):
    from jitgate.access.rules import AccessRule
    from jitgate.access.rules import Approval as AccessApproval
    from jitgate.access.scope import ResourceRef

    config = load_mcp_policy(write(tmp_path, """\
        - {name: held, action: require-approval, approval: {access_rule: mcp-held}}
        - {name: orphan, action: require-approval, resources: ["x://*"], approval: {access_rule: nope}}
        """))

    def access(resources, clusters=("*",)) -> AccessRule:
        return AccessRule("mcp-held", ("agents",), clusters, (), True, tuple(ResourceRef.parse(r) for r in resources),
                          ("create", "get"), 60, 3600, AccessApproval("reviewers", ("sre",), 1), source="k8s.yaml:3")
    problems = check_rules(config.rules, (access(["tools.mcp.jitgate.dev"]),))
    assert len(problems) == 1 and "mcp.yaml:" in problems[0] and "'nope' is not an access rule" in problems[0]
    narrow = check_rules(config.rules[:1], (access(["pods"]),))
    assert len(narrow) == 1 and "does not cover held MCP tools" in narrow[0]
    assert scope_for("kube", Kind.TOOL).cluster == "mcp:kube"


# -- token types (at+jwt) --------------------------------------------------------------------------------


@pytest.fixture
def signer(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())) | {"kid": "k1", "alg": "ES256"}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))

    def sign(typ: str | None, **claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": "ana", "aud": "jitgate", "iat": now, "exp": now + 300} | claims
        return jwt.encode(body, key, algorithm="ES256", headers={"kid": "k1"} | ({"typ": typ} if typ else {}))
    return jwks, sign


def verifier(jwks: Path, *types: str) -> OIDCVerifier:
    kwargs = {"token_types": types} if types else {}
    return OIDCVerifier([IssuerConfig(ISSUER, ("jitgate",), algorithms=("ES256",), jwks_file=str(jwks), **kwargs)])


def test_kubernetes_side_refuses_access_tokens_by_default(signer):
    jwks, sign = signer
    default = verifier(jwks)
    assert default.verify(sign(None)).username.endswith("#ana") and default.verify(sign("JWT"))
    for typ in ("at+jwt", "application/at+jwt", "AT+JWT"):
        with pytest.raises(TokenError, match="OAuth access token, not an ID token"):
            default.verify(sign(typ))


def test_access_token_issuers(signer):
    jwks, sign = signer
    both = verifier(jwks, "JWT", "at+jwt")
    assert both.verify(sign("at+jwt")) and both.verify(sign(None))
    only = verifier(jwks, "at+jwt")
    with pytest.raises(TokenError, match="lacks typ at\\+jwt"):
        only.verify(sign(None))
    # several audiences: an access token names its client in client_id (an ID token in azp)
    assert only.verify(sign("at+jwt", aud=["jitgate", "other"], client_id="jitgate"))
    with pytest.raises(TokenError, match="authorized party"):
        only.verify(sign("at+jwt", aud=["jitgate", "other"], client_id="someone-else"))


def test_exchanged_tokens_verify_only_as_the_exchange_provider(tmp_path):
    from jitgate.mcp.config import TokenExchange
    from jitgate.mcp.exchange import Exchanger, main

    key, jwks = tmp_path / "x.key", tmp_path / "x.jwks"
    assert main(["--key", str(key), "--jwks", str(jwks)]) == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    server = McpServer("k8s", "http://127.0.0.1:1", "https://mcp.jitgate.test/k8s")
    exchanger = Exchanger(server, TokenExchange("https://front.jitgate.test", "jitgate-k8s", str(key), 120))
    token = exchanger.token("ana@example.com", ("oidc:agents",))
    assert exchanger.token("ana@example.com", ("oidc:agents",)) == token  # reused for half its lifetime
    assert exchanger.token("ben@example.com", ("oidc:agents",)) != token
    provider = IssuerConfig("https://front.jitgate.test", ("jitgate-k8s",), username_claim="sub", username_prefix="-",
                            algorithms=("ES256",), jwks_file=str(jwks), token_types=("at+jwt",))
    identity = OIDCVerifier([provider]).verify(token)
    assert identity.username == "ana@example.com" and identity.groups == ("oidc:agents",)
    assert identity.expires_at - time.time() <= 120
    wrong_audience = IssuerConfig("https://front.jitgate.test", ("jitgate-other",), algorithms=("ES256",),
                                  jwks_file=str(jwks), token_types=("at+jwt",))
    with pytest.raises(TokenError, match="audience"):
        OIDCVerifier([wrong_audience]).verify(token)
