"""jitgate.identity.oidc against a real OIDC provider process (oidc-provider-mock over TLS)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from jitgate.identity.oidc import (
    Identity,
    IssuerConfig,
    IssuerUnavailable,
    OIDCVerifier,
    TokenError,
)
from testkit import forge, net
from testkit.oidc_provider import OIDCProviderProcess

CLIENT = "jitgate"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> net.TestCA:
    return net.TestCA.create(tmp_path_factory.mktemp("oidc-ca"))


@pytest.fixture(scope="module")
def provider(ca: net.TestCA, tmp_path_factory: pytest.TempPathFactory):
    with OIDCProviderProcess(tmp_path_factory.mktemp("idp1"), name="idp1").start(ca) as p:
        yield p


@pytest.fixture(scope="module")
def provider2(ca: net.TestCA, tmp_path_factory: pytest.TempPathFactory):
    with OIDCProviderProcess(tmp_path_factory.mktemp("idp2"), name="idp2").start(ca) as p:
        yield p


def config(provider: OIDCProviderProcess, **kw) -> IssuerConfig:
    kw.setdefault("audiences", (CLIENT,))
    return IssuerConfig(provider.issuer, ca_file=str(provider.ca_file), **kw)


def rejection(verifier: OIDCVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        verifier.verify(token)
    return info.value


class FakeClock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


# -- real tokens ---------------------------------------------------------------------------------


def test_real_token_maps_identity(provider):
    token = provider.token("alice", email="alice@example.com", groups=["dev", "ops"])
    identity = OIDCVerifier([config(provider)]).verify(token)
    assert identity.username == f"{provider.issuer}#alice"  # kube default prefix for non-email claims
    assert identity.groups == ("dev", "ops")
    assert identity.issuer == provider.issuer
    assert identity.subject == "alice"
    assert time.time() < identity.expires_at <= time.time() + 3600 + 5
    assert dict(identity.extra) == {}


@pytest.mark.parametrize(
    "kw, username, groups",
    [
        ({"username_claim": "email"}, "alice@example.com", ("dev",)),  # email: no prefix by default
        ({"username_prefix": "-"}, "alice", ("dev",)),
        ({"username_prefix": "corp:", "groups_prefix": "corp:"}, "corp:alice", ("corp:dev",)),
        ({"username_claim": "email", "username_prefix": "oidc:"}, "oidc:alice@example.com", ("dev",)),
        ({"username_claim": "preferred_username", "groups_claim": "roles"}, "{issuer}#alice.l", ("admin",)),
    ],
)
def test_username_and_group_mapping(provider, kw, username, groups):
    token = provider.token(
        "alice",
        email="alice@example.com",
        email_verified=True,
        groups=["dev"],
        extra_claims={"preferred_username": "alice.l", "roles": "admin"},  # a string group claim
    )
    identity = OIDCVerifier([config(provider, **kw)]).verify(token)
    assert identity.username == username.format(issuer=provider.issuer)
    assert identity.groups == groups


def test_email_verified_semantics(provider):
    verifier = OIDCVerifier([config(provider, username_claim="email")])
    unverified = provider.token("bob", email="bob@example.com", email_verified=False)
    assert rejection(verifier, unverified).reason == "token email is not verified"
    absent = provider.token("bob", email="bob@example.com")
    assert verifier.verify(absent).username == "bob@example.com"
    # Only the email claim cares about email_verified.
    assert OIDCVerifier([config(provider, username_prefix="-")]).verify(unverified).username == "bob"


def test_required_claims(provider):
    token = provider.token("carol", extra_claims={"tenant": "acme", "level": 3})
    assert OIDCVerifier([config(provider, required_claims={"tenant": "acme"})]).verify(token).subject == "carol"
    wrong = OIDCVerifier([config(provider, required_claims={"tenant": "other"})])
    assert rejection(wrong, token).reason == 'token claim "tenant" does not have the required value'
    missing = OIDCVerifier([config(provider, required_claims={"hd": "example.com"})])
    assert rejection(missing, token).reason == 'token is missing required claim "hd"'
    not_a_string = OIDCVerifier([config(provider, required_claims={"level": "3"})])
    assert rejection(not_a_string, token).reason == 'token claim "level" does not have the required value'


def test_bad_claim_shapes_from_the_issuer(provider):
    verifier = OIDCVerifier([config(provider, username_claim="email")])
    no_email = provider.token("dave")
    assert rejection(verifier, no_email).reason == 'token is missing the username claim "email"'
    empty = provider.token("dave", email="")
    assert rejection(verifier, empty).reason == 'token claim "email" is not a non-empty string'
    bad_groups = provider.token("dave", email="dave@example.com", extra_claims={"groups": [1, 2]})
    assert rejection(verifier, bad_groups).reason == 'token claim "groups" is not a string or a list of strings'


def test_audience_must_be_accepted(provider):
    token = provider.token("erin", client_id="some-other-app")
    verifier = OIDCVerifier([config(provider)])
    assert rejection(verifier, token).reason == 'token audience "some-other-app" is not accepted'
    both = OIDCVerifier([config(provider, audiences=("some-other-app", CLIENT))])
    assert both.verify(token).subject == "erin"


def test_cache_makes_second_verify_free(provider):
    clock = FakeClock()
    verifier = OIDCVerifier([config(provider)], now=clock)
    token = provider.token("frank", groups=["dev"])
    assert verifier.verify_cached(token) is None  # nothing cached, and no I/O to find out
    assert verifier.stats["discovery_fetches"] == verifier.stats["jwks_fetches"] == 0

    first = verifier.verify(token)
    fetches = (verifier.stats["discovery_fetches"], verifier.stats["jwks_fetches"])
    assert fetches == (1, 1)
    for _ in range(100):
        assert verifier.verify(token) is first
        assert verifier.verify_cached(token) is first
    assert (verifier.stats["discovery_fetches"], verifier.stats["jwks_fetches"]) == fetches
    assert verifier.stats["cache_hits"] == 200

    # A second token from the same issuer needs a signature check but no fetch.
    verifier.verify(provider.token("grace"))
    assert (verifier.stats["discovery_fetches"], verifier.stats["jwks_fetches"]) == fetches

    # Once the token expires, the cache forgets it and verification says so.
    clock.t = first.expires_at
    assert verifier.verify_cached(token) is None
    assert rejection(verifier, token).reason == "token has expired"


def test_cache_hit_is_cheap(provider):
    verifier = OIDCVerifier([config(provider)])
    token = provider.token("heidi", groups=[f"group-{i}" for i in range(50)])
    verifier.verify(token)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        verifier.verify_cached(token)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per cache hit"


def test_cache_is_bounded(provider):
    verifier = OIDCVerifier([config(provider)], cache_size=2)
    tokens = [provider.token(f"user{i}") for i in range(3)]
    for token in tokens:
        verifier.verify(token)
    assert verifier.verify_cached(tokens[0]) is None  # least recently used, evicted
    assert verifier.verify_cached(tokens[1]) is not None
    assert verifier.verify_cached(tokens[2]) is not None


# -- forged tokens -------------------------------------------------------------------------------

Forger = Callable[[OIDCProviderProcess], str]


def _idp_signed(**claims) -> Forger:
    """Claims signed with the provider's own key: only the claim check can reject them."""

    def make(p: OIDCProviderProcess) -> str:
        kid, key = p.signing_key()
        return forge.sign(forge.id_claims(p.issuer, "mallory", CLIENT, **claims), key, kid=kid)

    return make


def _idp_signed_with_headers(**headers) -> Forger:
    def make(p: OIDCProviderProcess) -> str:
        kid, key = p.signing_key()
        return forge.sign(forge.id_claims(p.issuer, "mallory", CLIENT), key, kid=kid, headers=headers)

    return make


def _attacker_signed(kid: str | None | Callable[[OIDCProviderProcess], str], alg: str = "RS256") -> Forger:
    def make(p: OIDCProviderProcess) -> str:
        key = ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else forge.attacker_rsa_key()
        return forge.sign(
            forge.id_claims(p.issuer, "mallory", CLIENT), key, alg=alg, kid=kid(p) if callable(kid) else kid
        )

    return make


def _provider_kid(p: OIDCProviderProcess) -> str:
    return p.signing_key()[0]


FORGED: dict[str, tuple[Forger, str]] = {
    "alg none": (
        lambda p: forge.alg_none(forge.id_claims(p.issuer, "mallory", CLIENT), kid=_provider_kid(p)),
        'token algorithm "none" is not allowed',
    ),
    "HS256 keyed with the public key": (
        lambda p: forge.hs256_with_public_key(
            forge.id_claims(p.issuer, "mallory", CLIENT), p.signing_key()[1].public_key(), kid=_provider_kid(p)
        ),
        'token algorithm "HS256" is not allowed',
    ),
    "attacker key, provider's kid": (_attacker_signed(_provider_kid), "token signature is invalid"),
    "attacker key, no kid": (_attacker_signed(None), "token signature is invalid"),
    "attacker key, unknown kid": (
        _attacker_signed("attacker-key-1"),
        'token key ID (kid) "attacker-key-1" is not known to the issuer',
    ),
    "ES256 against the provider's RSA kid": (
        _attacker_signed(_provider_kid, alg="ES256"),
        "token algorithm \"ES256\" does not match the issuer's signing key",
    ),
    "tampered payload": (
        lambda p: forge.tamper(p.token("mallory"), sub="admin", groups=["system:masters"]),
        "token signature is invalid",
    ),
    "tampered header alg": (
        lambda p: forge.with_header(p.token("mallory"), alg="HS256"),
        'token algorithm "HS256" is not allowed',
    ),
    "signature stripped": (lambda p: p.token("mallory").rsplit(".", 1)[0] + ".", "token signature is invalid"),
    "untrusted issuer": (_idp_signed(iss="https://evil.example"), 'token issuer "https://evil.example" is not trusted'),
    "no issuer": (_idp_signed(iss=None), "token has no issuer (iss)"),
    "wrong audience": (_idp_signed(aud="kubectl-evil"), 'token audience "kubectl-evil" is not accepted'),
    "several audiences, no azp": (
        _idp_signed(aud=[CLIENT, "other"]),
        "token has several audiences and its authorized party (azp) is not accepted",
    ),
    "several audiences, foreign azp": (
        _idp_signed(aud=[CLIENT, "other"], azp="other"),
        "token has several audiences and its authorized party (azp) is not accepted",
    ),
    "audience not a string": (_idp_signed(aud=42), 'token claim "aud" is not a string or a list of strings'),
    "expired": (_idp_signed(exp=int(time.time()) - 5), "token has expired"),
    "no expiry": (_idp_signed(exp=None), "token has no expiry (exp)"),
    "expiry not a number": (_idp_signed(exp="never"), 'token claim "exp" is not a number'),
    "nbf in the future": (_idp_signed(nbf=int(time.time()) + 600), "token is not yet valid"),
    "iat in the future": (_idp_signed(iat=int(time.time()) + 600), "token is not yet valid (issued in the future)"),
    "no subject": (_idp_signed(sub=None), "token has no subject (sub)"),
    "access token type": (_idp_signed_with_headers(typ="at+jwt"), "token is an OAuth access token, not an ID token"),
    "critical header": (
        _idp_signed_with_headers(crit=["exp"], exp=1),
        "token uses critical header extensions, which are not supported",
    ),
    "JWE-shaped": (lambda p: forge.jwe_like(), "token is encrypted (JWE); a signed ID token is required"),
    **{
        f"garbage {i}": (lambda p, g=g: g, "token is too large" if len(g) > 65536 else "token is not a JWT")
        for i, g in enumerate(forge.GARBAGE)
    },
}


@pytest.mark.parametrize("name", FORGED)
def test_forged_tokens_are_rejected_with_a_safe_reason(provider, caplog, name):
    make, reason = FORGED[name]
    token = make(provider)
    # An EC algorithm is allowed too, so the RSA key must refuse it on its own.
    verifier = OIDCVerifier([config(provider, algorithms=("RS256", "ES256"))])
    with caplog.at_level(logging.DEBUG, logger="jitgate.identity.oidc"):
        error = rejection(verifier, token)
    assert error.reason == reason
    assert not isinstance(error, IssuerUnavailable)
    # Neither the reason nor anything logged carries the token or a piece of it.
    pieces = [s for s in token.split(".") if len(s) >= 8] or ([token] if len(token) >= 8 else [])
    said = [error.reason, str(error)] + [r.getMessage() for r in caplog.records]
    for piece in pieces:
        assert not any(piece[:16] in text for text in said)
    assert verifier.verify_cached(token) is None


def test_several_audiences_with_our_azp_verify(provider):
    token = _idp_signed(aud=["other", CLIENT], azp=CLIENT)(provider)
    assert OIDCVerifier([config(provider)]).verify(token).subject == "mallory"


def test_clock_skew_tolerates_a_slightly_fast_issuer(provider):
    token = _idp_signed(iat=int(time.time()) + 30, nbf=int(time.time()) + 30)(provider)
    assert OIDCVerifier([config(provider)], clock_skew=60).verify(token).subject == "mallory"
    assert rejection(OIDCVerifier([config(provider)], clock_skew=0), token).reason == "token is not yet valid"


# -- keys, issuers, outages ------------------------------------------------------------------------


def test_unknown_kid_refetch_is_rate_limited(provider):
    clock = FakeClock()
    verifier = OIDCVerifier([config(provider, jwks_min_refresh_interval=30)], now=clock)
    verifier.verify(provider.token("ivan"))
    assert verifier.stats["jwks_fetches"] == 1

    def flood(count: int) -> None:
        for i in range(count):
            token = _attacker_signed(f"forged-{clock.t}-{i}")(provider)
            assert "is not known to the issuer" in rejection(verifier, token).reason

    flood(20)  # keys are fresh: a flood of forged kids fetches nothing
    assert verifier.stats["jwks_fetches"] == 1
    clock.t += 31
    flood(20)  # the interval has passed: one refetch, then quiet again
    assert verifier.stats["jwks_fetches"] == 2
    clock.t += 10
    flood(5)
    assert verifier.stats["jwks_fetches"] == 2
    assert verifier.stats["discovery_fetches"] == 1


def test_keys_are_refetched_after_their_max_age(provider):
    clock = FakeClock()
    verifier = OIDCVerifier([config(provider, jwks_max_age=600)], now=clock)
    verifier.verify(provider.token("judy"))
    clock.t += 601
    verifier.verify(provider.token("judy"))
    assert verifier.stats["jwks_fetches"] == 2


def test_multiple_issuers(provider, provider2):
    verifier = OIDCVerifier([config(provider), config(provider2, groups_prefix="idp2:")])
    one = verifier.verify(provider.token("kim", groups=["dev"]))
    two = verifier.verify(provider2.token("kim", groups=["dev"]))
    assert (one.username, one.groups) == (f"{provider.issuer}#kim", ("dev",))
    assert (two.username, two.groups) == (f"{provider2.issuer}#kim", ("idp2:dev",))

    # Claiming issuer 2 while signed by issuer 1's key gets nowhere.
    kid, key = provider.signing_key()
    cross = forge.sign(forge.id_claims(provider2.issuer, "kim", CLIENT), key, kid=kid)
    assert "is not known to the issuer" in rejection(verifier, cross).reason
    cross_no_kid = forge.sign(forge.id_claims(provider2.issuer, "kim", CLIENT), key)
    assert rejection(verifier, cross_no_kid).reason == "token signature is invalid"

    # Issuer 2 alone does not trust issuer 1.
    only_two = OIDCVerifier([config(provider2)])
    assert rejection(only_two, provider.token("kim")).reason == f'token issuer "{provider.issuer}" is not trusted'


def test_issuer_down_is_issuer_unavailable(tmp_path, caplog):
    clock = FakeClock()
    down = f"https://127.0.0.1:{net.free_port()}"
    ca = net.TestCA.create(tmp_path / "ca")
    verifier = OIDCVerifier([IssuerConfig(down, (CLIENT,), ca_file=str(ca.cert_path))], now=clock, retry_interval=5)
    token = forge.sign(forge.id_claims(down, "alice", CLIENT), forge.attacker_rsa_key(), kid="k1")
    with pytest.raises(IssuerUnavailable) as info:
        verifier.verify(token)
    assert info.value.reason.startswith("issuer unavailable: cannot fetch discovery document")
    assert down in info.value.reason
    # Within the retry interval the down issuer is not contacted again.
    with pytest.raises(IssuerUnavailable):
        verifier.verify(token)
    assert verifier.stats["discovery_fetches"] == 1
    clock.t += 6
    with pytest.raises(IssuerUnavailable):
        verifier.verify(token)
    assert verifier.stats["discovery_fetches"] == 2

    with caplog.at_level(logging.WARNING, logger="jitgate.identity.oidc"):
        verifier.prefetch()  # logs, does not raise
    assert any("issuer unavailable" in r.getMessage() for r in caplog.records)


def test_issuer_with_untrusted_tls_is_unavailable(provider, tmp_path):
    other_ca = net.TestCA.create(tmp_path / "other-ca")
    verifier = OIDCVerifier([IssuerConfig(provider.issuer, (CLIENT,), ca_file=str(other_ca.cert_path))])
    with pytest.raises(IssuerUnavailable) as info:
        verifier.verify(provider.token("leo"))
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.reason


def test_discovery_must_name_the_configured_issuer(provider):
    # Configured as a different issuer whose discovery document is the provider's.
    pretend = IssuerConfig(
        provider.issuer + "/tenant",
        (CLIENT,),
        ca_file=str(provider.ca_file),
        discovery_url=provider.issuer + "/.well-known/openid-configuration",
    )
    verifier = OIDCVerifier([pretend])
    kid, key = provider.signing_key()
    token = forge.sign(forge.id_claims(pretend.issuer_url, "mallory", CLIENT), key, kid=kid)
    with pytest.raises(IssuerUnavailable) as info:
        verifier.verify(token)
    assert info.value.reason == (
        f'issuer unavailable: discovery document names issuer "{provider.issuer}", expected "{pretend.issuer_url}"'
    )


def test_prefetch_warms_keys(provider):
    verifier = OIDCVerifier([config(provider)])
    verifier.prefetch()
    assert (verifier.stats["discovery_fetches"], verifier.stats["jwks_fetches"]) == (1, 1)
    verifier.verify(provider.token("mia"))
    assert (verifier.stats["discovery_fetches"], verifier.stats["jwks_fetches"]) == (1, 1)


# -- asyncio ----------------------------------------------------------------------------------------


def test_averify_in_event_loop(provider):
    verifier = OIDCVerifier([config(provider)])
    token = provider.token("nina", groups=["dev"])
    forged = _attacker_signed(_provider_kid)(provider)

    async def main() -> tuple[Identity, Identity, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        ticks = 0
        cold = await verifier.averify(token)  # fetches discovery + JWKS in a thread
        ticks_during_cold = ticks
        warm = await verifier.averify(token)
        with pytest.raises(TokenError) as info:
            await verifier.averify(forged)  # keys at hand: rejected inline
        assert info.value.reason == "token signature is invalid"
        task.cancel()
        return cold, warm, ticks_during_cold

    cold, warm, ticks = asyncio.run(main())
    assert cold is warm and cold.groups == ("dev",)
    assert ticks > 0, "the event loop did not run while the cold verification fetched keys"
    assert verifier.stats["jwks_fetches"] == 1


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"algorithms": ("HS256",)}, "algorithms"),
        ({"algorithms": ("RS256", "none")}, "algorithms"),
        ({"algorithms": ()}, "algorithms"),
        ({"algorithms": "RS256"}, "algorithms"),
        ({"issuer_url": "http://idp.example"}, "issuer_url"),
        ({"issuer_url": "https://idp.example?x=1"}, "issuer_url"),
        ({"audiences": ()}, "audiences"),
        ({"audiences": "jitgate"}, "audiences"),
        ({"username_claim": ""}, "username_claim"),
        ({"groups_claim": None}, "groups_claim"),
        ({"required_claims": {"tenant": 1}}, "required_claims"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
        ({"discovery_url": "http://idp.example/.well-known/openid-configuration"}, "discovery_url"),
        ({"jwks_min_refresh_interval": -1}, "jwks_min_refresh_interval"),
    ],
)
def test_config_validation(kw, field):
    args = {"issuer_url": "https://idp.example", "audiences": (CLIENT,), **kw}
    with pytest.raises(ValueError) as info:
        IssuerConfig(**args)
    assert str(info.value).startswith(f"{field}:")


def test_config_normalises_and_duplicate_issuers_are_refused():
    c = IssuerConfig("https://idp.example", [CLIENT], algorithms=["RS256", "ES256"], required_claims={"a": "b"})
    assert c.audiences == (CLIENT,) and c.algorithms == ("RS256", "ES256")
    hash(c)  # usable as a dict key despite the mapping field
    with pytest.raises(ValueError, match="configured twice"):
        OIDCVerifier([c, c])
