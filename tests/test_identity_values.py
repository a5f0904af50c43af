"""Identity values into headers (issue 7, class 4): a username or group goes to the cluster exactly as
the gateway checked it.

With `impersonate: true` the gateway copies the caller's username and groups into `Impersonate-*`
headers. A claim with CRLF would inject a header (`Impersonate-Group: system:masters`); a leading
space or tab before `system:` passes a prefix check and is trimmed by the cluster's header parser.
Such identities are refused (401, audited) and never reach the cluster; reserved names are checked on
the exact value the cluster would see (403). Reviews compare people case-insensitively, so
`Alice@Example.com` cannot approve alice@example.com's request, nor count as a second reviewer.
"""

from __future__ import annotations

import asyncio
import textwrap

import pytest
from mitmproxy.test import taddons, tflow

from jitgate.access.errors import Conflict, NotAllowed
from jitgate.access.model import Decision, Person, RequestState
from jitgate.access.scope import Scope
from jitgate.access.workflow import open_request, review_request, same_person
from jitgate.chain.flow import call_of
from jitgate.identity.oidc import IssuerConfig, OIDCVerifier, TokenError
from jitgate.policy.loader import load_policy
from testkit import forge
from testkit.standin.process import run_kubectl
from tests.conftest import LAB_HOST, Stack, grant_everything
from tests.test_framing import (
    MODES,
    Target,
    completed,
    h1_request,
    h2_request,
    load_addon,
)

BAD_EMAILS = {
    "CRLF header injection": "mallory@example.com\r\nImpersonate-Group: system:masters",
    "bare LF": "mallory@example.com\nImpersonate-Group: system:masters",
    "leading space before system:": " system:admin",
    "leading tab before system:": "\tsystem:admin",
    "trailing space": "mallory@example.com ",
    "NUL": "mallory@example.com\x00system:admin",
    "bidi override": "mallory\u202e@example.com",
    "no-break space": "\u00a0system:admin",
}
BAD_GROUPS = {
    "CRLF header injection": ["developers", "sre\r\nImpersonate-Group: system:masters"],
    "leading space": ["developers", " sre"],
    "trailing space": ["developers", "sre "],
    "empty group without prefix": [""],
}


def verifier_for(idp, **kw) -> OIDCVerifier:
    kw.setdefault("username_claim", "email")
    return OIDCVerifier([IssuerConfig(idp.issuer, audiences=("jitgate",), ca_file=str(idp.ca_file), **kw)])


# --- the verifier -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_EMAILS))
def test_usernames_with_control_characters_or_padding_are_refused(idp, case) -> None:
    token = idp.token(f"user-{abs(hash(case))}", email=BAD_EMAILS[case], email_verified=True)
    with pytest.raises(TokenError) as e:
        verifier_for(idp).verify(token)
    assert e.value.reason == 'token claim "email" holds a name with control characters or leading or trailing whitespace'
    assert "system" not in e.value.reason and "\r" not in e.value.reason


@pytest.mark.parametrize("case", list(BAD_GROUPS))
def test_groups_with_control_characters_or_padding_are_refused(idp, case) -> None:
    token = idp.token(f"group-{abs(hash(case))}", email="gina@example.com", email_verified=True, groups=BAD_GROUPS[case])
    with pytest.raises(TokenError) as e:
        verifier_for(idp).verify(token)
    assert 'token claim "groups" holds' in e.value.reason


def test_names_are_checked_after_the_prefix_and_clean_names_pass(idp) -> None:
    # A forged-but-validly-signed token (an IdP that issues odd claims) with a padded sub claim.
    kid, key = idp.signing_key()
    padded = forge.sign(forge.id_claims(idp.issuer, " system:admin", "jitgate"), key, kid=kid)
    with pytest.raises(TokenError):
        verifier_for(idp, username_claim="sub", username_prefix="-").verify(padded)
    # The check is on the whole name the cluster is sent: behind a prefix the space is inside the
    # name ("oidc: system:admin"), which no parser trims and which is not a reserved name.
    prefixed = verifier_for(idp, username_claim="sub", username_prefix="oidc:").verify(padded)
    assert prefixed.username == "oidc: system:admin"
    assert load_addon("identity").reserved_name(prefixed.username, prefixed.groups) is None
    good = idp.token("clean", email="Ünïcode.Name@example.com", email_verified=True, groups=["dev ops", "sre"])
    identity = verifier_for(idp, groups_prefix="oidc:").verify(good)
    assert identity.username == "Ünïcode.Name@example.com" and identity.groups == ("oidc:dev ops", "oidc:sre")


# --- the identity step --------------------------------------------------------------------------------


def test_reserved_names_are_checked_on_the_exact_value() -> None:
    module = load_addon("identity")
    assert module.reserved_name("system:admin", ()) == "system:admin"
    assert module.reserved_name("alice", ("oidc:dev", "system:masters")) == "system:masters"
    assert module.reserved_name("alice", ("oidc:system:masters",)) is None  # prefixed: not reserved


def test_identity_step_authenticates_at_requestheaders() -> None:
    module = load_addon("identity")
    step = module.Identity()
    with taddons.context(step):
        step.verifier = type("V", (), {})()  # never reached: no token

        async def run(flow):
            await step.requestheaders(flow)
            return flow

        flow = asyncio.run(run(tflow.tflow()))
        assert flow.response.status_code == 401 and call_of(flow).denied
        for header in ("X-Remote-User", "x-remote-group", "X-Remote-Extra-Scopes", "X-Forwarded-User",
                       "Impersonate-User"):
            f = tflow.tflow()
            f.request.headers["Authorization"] = "Bearer t"
            f.request.headers[header] = "system:admin"
            asyncio.run(run(f))
            assert f.response.status_code == 403, header
            assert "Authorization" not in f.request.headers  # the caller's credential is gone either way
            assert "system:admin" not in f.response.text


def test_an_unreachable_identity_provider_is_503_without_its_urls(caplog) -> None:
    """The verifier's reason names discovery/JWKS URLs: the log keeps them, the caller gets the audit ID."""
    from jitgate.identity.oidc import IssuerUnavailable

    module = load_addon("identity")
    step = module.Identity()

    class Unreachable:
        async def averify(self, token):
            raise IssuerUnavailable("cannot fetch https://idp.internal.example:8443/.well-known/jwks.json: timed out")

    with taddons.context(step):
        step.verifier = Unreachable()
        flow = tflow.tflow()
        flow.request.headers["Authorization"] = "Bearer t"
        caplog.set_level("WARNING", "jitgate.identity")
        asyncio.run(step.requestheaders(flow))
        assert flow.response.status_code == 503 and call_of(flow).denied
        assert "idp.internal" not in flow.response.text and "https://" not in flow.response.text
        assert call_of(flow).audit_id in flow.response.text
        assert "idp.internal.example" in caplog.text


# --- end to end against a cluster with impersonation ------------------------------------------------


@pytest.fixture(scope="module")
def lab(stack: Stack) -> Target:
    return Target("lab", stack.gateway, LAB_HOST, 6443, stack.lab)


def mallory_token(stack: Stack, email: str, groups: list[str] = ("developers",)) -> str:
    """A real token for an odd identity that also holds a grant, as an attacker with some legitimate
    access would: without the checks, the call is forwarded and the cluster reads the odd headers."""
    grant_everything(stack.grant_store, stack.policy, "lab", user=(email, tuple(f"oidc:{g}" for g in groups)))
    return stack.idp.token(f"mallory-{abs(hash((email, tuple(groups))))}", email=email, email_verified=True, groups=groups)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["CRLF header injection", "leading space before system:", "leading tab before system:",
                                  "NUL", "bidi override"])
def test_bad_usernames_never_reach_an_impersonating_cluster(stack, lab, mode, case) -> None:
    token = mallory_token(stack, BAD_EMAILS[case])
    lab.standin.clear_seen()
    for call in (h1_request, h2_request):
        reply = call(lab, mode, "GET", "/api/v1/namespaces/default/pods", token)
        assert reply.status == 401, (case, reply)
        assert "control characters or leading or trailing whitespace" in reply.json()["message"]
    assert [r for r in lab.standin.requests_seen() if not r["path"].startswith("/_standin")] == []
    assert completed(stack.gateway, lambda e: e.get("responseStatus", {}).get("code") == 401
                     and "leading or trailing whitespace" in e["annotations"].get("jitgate.dev/reason", ""))


@pytest.mark.parametrize("case", ["CRLF header injection", "trailing space"])  # the stack prefixes groups with "oidc:"
def test_bad_groups_never_reach_an_impersonating_cluster(stack, lab, case) -> None:
    token = mallory_token(stack, "mallory@example.com", BAD_GROUPS[case])
    lab.standin.clear_seen()
    reply = h1_request(lab, "reverse", "GET", "/api/v1/namespaces/default/pods", token)
    assert reply.status == 401 and 'claim \\"groups\\"' in reply.body.decode(), reply
    assert [r for r in lab.standin.requests_seen() if not r["path"].startswith("/_standin")] == []


@pytest.mark.parametrize("mode", MODES)
def test_reserved_username_is_refused_with_403(stack, lab, mode) -> None:
    token = mallory_token(stack, "system:admin")
    lab.standin.clear_seen()
    reply = h1_request(lab, mode, "GET", "/api/v1/namespaces/default/pods", token)
    assert reply.status == 403 and 'reserved \\"system:\\" prefix' in reply.body.decode(), reply
    assert [r for r in lab.standin.requests_seen() if not r["path"].startswith("/_standin")] == []


def test_kubectl_prints_why_an_identity_is_refused(stack, tmp_path) -> None:
    from tests.test_gateway_e2e import kubeconfig

    config = kubeconfig(stack, tmp_path / "kc", mallory_token(stack, " system:admin"), cluster="lab")
    result = run_kubectl(config, "get", "--raw", "/api/v1/namespaces/default/pods")
    assert result.returncode != 0
    assert "control characters or leading or trailing whitespace" in result.stderr, result.stderr


def test_a_clean_identity_is_impersonated_exactly(stack, lab) -> None:
    """The control: what the cluster sees is byte for byte what the verifier accepted."""
    token = mallory_token(stack, "Mallory O'Neil@example.com", ["developers", "dev ops"])
    lab.standin.clear_seen()
    assert h2_request(lab, "regular", "GET", "/api/v1/namespaces/default/pods", token).status == 200
    (record,) = [r for r in lab.standin.requests_seen() if r["path"] == "/api/v1/namespaces/default/pods"]
    assert record["impersonate_user"] == "Mallory O'Neil@example.com"
    assert record["impersonate_groups"] == ["oidc:developers", "oidc:dev ops"]


# --- reviewers compared case-insensitively --------------------------------------------------------


@pytest.fixture
def two_reviewer_rules(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "token").write_text("t")
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent("""\
        clusters:
          - name: prod
            endpoint: https://api.prod.example
            ca_file: ca.pem
            credential: {token_file: token}
        identity_providers:
          - issuer: https://idp.example
            client_ids: [jitgate]
            username_claim: email
        access_rules:
          - name: prod-exec
            requesters: [oidc:developers]
            clusters: [prod]
            namespaces: [payments]
            resources: [pods, pods/exec]
            verbs: [get, create]
            duration: {default: 30m, max: 1h}
            approval: {mode: reviewers, reviewers: [oidc:sre], required: 2}
        """))
    return load_policy(policy).access_rules


def test_the_requester_cannot_review_under_another_spelling(two_reviewer_rules) -> None:
    scope = Scope("prod", ("payments",), False, ("pods/exec",), ("create",))
    alice = Person("alice@example.com", ("oidc:developers", "oidc:sre"))
    request = open_request(two_reviewer_rules, alice, scope, now=0.0).request
    for spelling in ("Alice@Example.com", "ALICE@EXAMPLE.COM", "alice@example.com"):
        with pytest.raises(NotAllowed, match="your own request"):
            review_request(two_reviewer_rules, request, Person(spelling, ("oidc:sre",)), Decision.APPROVE, None, now=1.0)


def test_one_reviewer_under_two_spellings_counts_once(two_reviewer_rules) -> None:
    scope = Scope("prod", ("payments",), False, ("pods/exec",), ("create",))
    request = open_request(two_reviewer_rules, Person("alice@example.com", ("oidc:developers",)), scope, now=0.0).request
    first = review_request(two_reviewer_rules, request, Person("bob@example.com", ("oidc:sre",)), "approve", None, now=1.0).request
    assert first.state is RequestState.PENDING
    with pytest.raises(Conflict, match="already approved"):
        review_request(two_reviewer_rules, first, Person("Bob@Example.COM", ("oidc:sre",)), "approve", None, now=2.0)
    done = review_request(two_reviewer_rules, first, Person("carol@example.com", ("oidc:sre",)), "approve", None, now=3.0)
    assert done.request.state is RequestState.APPROVED and done.new_grant is not None


def test_same_person() -> None:
    assert same_person("a@x.io", "A@X.IO") and same_person("straße@x.io", "STRASSE@x.io")
    assert not same_person("alice@x.io", "alicia@x.io")


def test_identity_value_checks_cost_little(idp) -> None:
    """The check runs once per token (verified identities are cached): a few microseconds."""
    import timeit

    from jitgate.identity import oidc

    groups = tuple(f"oidc:group-{i}" for i in range(20))
    n = 5000
    us = timeit.timeit(lambda: [oidc._check_name(g, "groups") for g in ("alice@example.com", *groups)], number=n) / n * 1e6
    print(f"identity value check: {us:.1f} us per token with 20 groups")
    assert us < 200
