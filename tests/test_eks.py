"""The EKS upstream credential against a real moto_server over TLS: AssumeRole, token shape, caching."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import logging
import random
import re
import socket
import threading
import time
import tracemalloc
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from jitgate.upstream.eks import (
    TOKEN_PREFIX,
    EKSClusterCredentialConfig,
    EKSTokenProvider,
    InvalidEKSToken,
    UpstreamCredentialError,
    decode_eks_token,
    role_session_name,
    source_identity,
)
from testkit import net
from testkit.moto import MotoServer

CLUSTER = "demo"
REGION = "us-east-1"
BASE_ACCESS_KEY_ID = "AKIAJITGATEBASEKEY00"
BASE_SECRET_ACCESS_KEY = "jitgate-test-base-secret-key-000000000000"
STS_NAME = re.compile(r"[A-Za-z0-9_+=,.@-]{2,64}")
FAST_FAILURE = Config(connect_timeout=1, read_timeout=1, retries={"mode": "standard", "max_attempts": 1})


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> net.TestCA:
    return net.TestCA.create(tmp_path_factory.mktemp("eks-ca"))


@pytest.fixture(scope="module")
def moto(tmp_path_factory, ca) -> MotoServer:
    server = MotoServer.start(tmp_path_factory.mktemp("moto"), ca)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def role_arn(moto) -> str:
    return moto.create_role("jitgate-eks-admin")


@pytest.fixture(autouse=True)
def base_credentials(monkeypatch, tmp_path):
    """The gateway's own credentials come from boto3's chain; here: environment variables only."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CA_BUNDLE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", BASE_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", BASE_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def fresh_recording(request):
    if "moto" in request.fixturenames:
        request.getfixturevalue("moto").reset_recording()


class Clock:
    """An injectable clock that starts at the real time and moves only when told to."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def config_for(moto: MotoServer, role_arn: str, **changes) -> EKSClusterCredentialConfig:
    return EKSClusterCredentialConfig(
        region=REGION,
        cluster_name=CLUSTER,
        role_arn=role_arn,
        sts_endpoint=moto.endpoint_url,
        ca_bundle=moto.ca_bundle,
        **changes,
    )


def capturing_session() -> tuple[boto3.Session, list[dict]]:
    """A boto3 session that hands the test every AssumeRole result, to check signatures with."""
    session = boto3.Session()
    issued: list[dict] = []

    def capture(parsed, **kwargs):
        if "Credentials" in parsed:
            issued.append(parsed["Credentials"])

    session.events.register("after-call.sts.AssumeRole", capture)
    return session, issued


def sigv4_query_signature(url: str, headers: dict[str, str], secret_access_key: str) -> str:
    """SigV4 of a presigned GET, computed from the spec (independently of botocore)."""
    parts = urlsplit(url)
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "X-Amz-Signature"]
    query = dict(params)

    def enc(s: str) -> str:
        return quote(s, safe="-_.~")

    encoded = sorted((enc(k), enc(v)) for k, v in params)
    canonical_query = "&".join(f"{k}={v}" for k, v in encoded)
    signed = query["X-Amz-SignedHeaders"].split(";")
    canonical_headers = "".join(f"{h}:{headers[h].strip()}\n" for h in signed)
    canonical_request = "\n".join(
        ["GET", parts.path or "/", canonical_query, canonical_headers, ";".join(signed),
         hashlib.sha256(b"").hexdigest()]
    )
    _, date, region, service, terminator = query["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/{terminator}"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", query["X-Amz-Date"], scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret_access_key).encode()
    for part in (date, region, service, terminator):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def test_token_shape(moto, role_arn):
    session, issued = capturing_session()
    provider = EKSTokenProvider(config_for(moto, role_arn), session=session)
    before = time.time()
    token = provider.token_for("alice@example.com")

    assert token.startswith(TOKEN_PREFIX)
    encoded = token[len(TOKEN_PREFIX) :]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", encoded), "urlsafe base64 without padding"
    d = decode_eks_token(token)
    assert d["scheme"] == "https" and d["host"] == urlsplit(moto.endpoint_url).netloc and d["path"] == "/"
    assert d["action"] == "GetCallerIdentity" and d["version"] == "2011-06-15"
    assert d["params"]["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert d["expires"] == 60
    assert (d["region"], d["service"]) == (REGION, "sts")
    assert {"host", "x-k8s-aws-id"} <= set(d["signed_headers"]) and d["cluster_bound"]
    assert abs(d["amz_date"].timestamp() - before) < 60
    assert d["valid_until"].timestamp() - d["amz_date"].timestamp() == 15 * 60

    # Signed as the assumed role (moto issues ASIA... session keys), never with the gateway's own key.
    [credentials] = issued
    assert d["access_key_id"] == credentials["AccessKeyId"] and d["access_key_id"].startswith("ASIA")
    assert d["params"]["X-Amz-Security-Token"] == credentials["SessionToken"]
    assert BASE_ACCESS_KEY_ID not in d["url"]

    # The signature covers the cluster name: right for "demo", wrong for any other cluster.
    signature = d["params"]["X-Amz-Signature"]
    secret = credentials["SecretAccessKey"]
    assert sigv4_query_signature(d["url"], {"host": d["host"], "x-k8s-aws-id": CLUSTER}, secret) == signature
    assert sigv4_query_signature(d["url"], {"host": d["host"], "x-k8s-aws-id": "prod"}, secret) != signature


def test_assume_role_names_the_caller(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn, session_duration=1800, external_id="jitgate-ext-1"))
    token = provider.token_for("alice@example.com")

    [call] = moto.assume_role_calls(role_arn)
    assert call.params["RoleSessionName"] == "alice@example.com"
    assert call.params["SourceIdentity"] == "alice@example.com"
    assert call.params["DurationSeconds"] == "1800"
    assert call.params["ExternalId"] == "jitgate-ext-1"
    # AssumeRole itself went out with the base credentials from the environment.
    assert call.access_key_id == BASE_ACCESS_KEY_ID

    # STS knows the token's key as the caller's session of the role (what EKS maps to a username).
    # moto does not check signatures, so the key id alone identifies the session here.
    key = decode_eks_token(token)["access_key_id"]
    who = moto.client("sts", aws_access_key_id=key, aws_secret_access_key="unused").get_caller_identity()
    assert who["Arn"] == "arn:aws:sts::123456789012:assumed-role/jitgate-eks-admin/alice@example.com"
    assert who["UserId"].endswith(":alice@example.com")


def test_session_name_of_an_awkward_caller_reaches_sts(moto, role_arn):
    caller = "aws:system:serviceaccount:agents:k8s-mcp-server-with-a-very-long-name-indeed"
    provider = EKSTokenProvider(config_for(moto, role_arn))
    provider.token_for(caller)
    [call] = moto.assume_role_calls(role_arn)
    assert call.params["RoleSessionName"] == role_session_name(caller)
    assert call.params["SourceIdentity"] == source_identity(caller)
    assert STS_NAME.fullmatch(call.params["SourceIdentity"])
    assert call.params["SourceIdentity"].startswith("aws-system-serviceaccount-agents-")


def test_steady_state_makes_no_sts_calls(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn))
    tokens = {provider.token_for("alice@example.com") for _ in range(100)}
    assert len(tokens) == 1
    assert len(moto.assume_role_calls(role_arn)) == 1
    assert (provider.stats.assume_role_calls, provider.stats.tokens_minted, provider.stats.cache_hits) == (1, 1, 99)


def test_cold_cache_threads_make_one_sts_call(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn))
    start = threading.Barrier(20)
    tokens: list[str] = []

    def worker():
        start.wait()
        tokens.append(provider.token_for("alice@example.com"))

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(tokens) == 20 and len(set(tokens)) == 1
    assert len(moto.assume_role_calls(role_arn)) == 1
    assert provider.stats.assume_role_calls == 1 and provider.stats.tokens_minted == 1


def test_cold_cache_tasks_make_one_sts_call(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn))

    async def main():
        return await asyncio.gather(*(provider.atoken_for("alice@example.com") for _ in range(20)))

    tokens = asyncio.run(main())
    assert len(set(tokens)) == 1
    assert len(moto.assume_role_calls(role_arn)) == 1
    assert provider.stats.assume_role_calls == 1 and provider.stats.tokens_minted == 1


def test_warm_async_path_never_suspends(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn))
    token = provider.token_for("alice@example.com")
    # A cached token comes back on the first step of the coroutine: no thread, no await.
    coroutine = provider.atoken_for("alice@example.com")
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    assert done.value.value == token


def test_refresh_follows_the_clock(moto, role_arn):
    clock = Clock()
    provider = EKSTokenProvider(
        config_for(moto, role_arn, session_duration=3600), now=clock, refresh_margin=300, token_reuse=600
    )
    first = decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"]

    clock.advance(599)
    provider.token_for("alice@example.com")
    assert provider.stats.tokens_minted == 1

    # Past token_reuse: a new token from the same role session.
    clock.advance(2)
    second = decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"]
    assert provider.stats.tokens_minted == 2 and second == first
    assert len(moto.assume_role_calls(role_arn)) == 1

    # Within refresh_margin of the session's end: a new session, before the old one expires.
    clock.advance(3600 - 300 - 601)
    third = decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"]
    assert third != first
    assert len(moto.assume_role_calls(role_arn)) == 2 and provider.stats.assume_role_calls == 2


def test_token_never_outlives_its_session(moto, role_arn):
    clock = Clock()
    provider = EKSTokenProvider(
        config_for(moto, role_arn, session_duration=900), now=clock, refresh_margin=600, token_reuse=600
    )
    provider.token_for("alice@example.com")
    clock.advance(301)  # token_reuse is not over, but the session is due for refresh
    provider.token_for("alice@example.com")
    assert provider.stats.assume_role_calls == 2 and provider.stats.tokens_minted == 2


def test_callers_get_their_own_sessions(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn))
    alice = decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"]
    bob = decode_eks_token(provider.token_for("bob@example.com"))["access_key_id"]
    assert alice != bob
    names = [c.params["RoleSessionName"] for c in moto.assume_role_calls(role_arn)]
    assert names == ["alice@example.com", "bob@example.com"]

    provider.invalidate("alice@example.com")
    assert decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"] != alice
    assert decode_eks_token(provider.token_for("bob@example.com"))["access_key_id"] == bob
    assert len(moto.assume_role_calls(role_arn)) == 3

    provider.invalidate()
    provider.token_for("bob@example.com")
    assert len(moto.assume_role_calls(role_arn)) == 4


# The cache is bounded: least recently used callers leave, and come back with a new AssumeRole.


class InProcessSTS:
    """A boto3 session whose AssumeRole is answered inside botocore (a before-call handler), for tests
    with thousands of callers: moto_server takes about 25 ms a call. Each answer is a new session;
    `hold` makes the calls for one caller wait until released."""

    def __init__(self) -> None:
        self.session = boto3.Session()
        self.calls: list[str] = []  # RoleSessionName of each AssumeRole, in order
        self.hold: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.session.events.register("before-call.sts.AssumeRole", self._answer)

    def _answer(self, params, **kwargs):
        name = params["body"]["RoleSessionName"]
        if name in self.hold:
            assert self.hold[name].wait(10), f"AssumeRole of {name} was never released"
        with self._lock:
            self.calls.append(name)
            n = len(self.calls)
        credentials = {"AccessKeyId": f"ASIA{n:016d}", "SecretAccessKey": f"secret-{n:036d}",
                       "SessionToken": f"session-token-{n}-" + "t" * 400, "Expiration": time.time() + 3600}
        return AWSResponse("https://sts.us-east-1.amazonaws.com/", 200, {}, None), {"Credentials": credentials}

    def count(self, name: str) -> int:
        return self.calls.count(name)


def in_process_provider(sts: InProcessSTS, **options) -> EKSTokenProvider:
    config = EKSClusterCredentialConfig(REGION, CLUSTER, "arn:aws:iam::123456789012:role/jitgate-eks-admin")
    return EKSTokenProvider(config, session=sts.session, **options)


def warm_token(provider: EKSTokenProvider, identity: str) -> str:
    """atoken_for of a caller whose token is cached: it must finish without suspending."""
    coroutine = provider.atoken_for(identity)
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    return done.value.value


def test_cache_holds_at_most_max_callers_least_recently_used_first():
    sts = InProcessSTS()
    provider = in_process_provider(sts, max_callers=100)
    provider.token_for("alice@example.com")
    most = 0
    for i in range(3000):
        provider.token_for(f"user{i}@example.com")
        if i % 10 == 0:
            warm_token(provider, "alice@example.com")  # in use all along, also on the async path
        most = max(most, provider.cached_callers)
    assert most == 100 and provider.cached_callers == 100
    assert len(sts.calls) == provider.stats.assume_role_calls == 3001
    assert provider.stats.evictions == 3001 - 100
    # Least recently used first: alice stayed, and so did the 99 callers seen last.
    assert sts.count("alice@example.com") == 1
    for i in range(2901, 3000):
        provider.token_for(f"user{i}@example.com")
    assert provider.stats.assume_role_calls == 3001

    # An evicted caller works again: one new AssumeRole, and a token of its new session.
    token = provider.token_for("user0@example.com")
    assert decode_eks_token(token)["access_key_id"] == "ASIA" + f"{3002:016d}"
    assert sts.count("user0@example.com") == 2 and provider.stats.assume_role_calls == 3002
    assert provider.token_for("user0@example.com") == token and provider.cached_callers == 100


def test_evicted_caller_assumes_the_role_again(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn), max_callers=2)
    alice = decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"]
    provider.token_for("bob@example.com")
    provider.token_for("carol@example.com")  # alice is the least recently used: she leaves
    assert provider.cached_callers == 2 and provider.stats.evictions == 1

    again = decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"]
    assert again != alice  # a new role session, which EKS maps to the same user
    provider.token_for("carol@example.com")  # still cached: bob left to make room for alice
    names = [c.params["RoleSessionName"] for c in moto.assume_role_calls(role_arn)]
    assert names == ["alice@example.com", "bob@example.com", "carol@example.com", "alice@example.com"]
    assert (provider.stats.assume_role_calls, provider.stats.evictions) == (4, 2)


def test_a_refresh_under_way_is_not_evicted():
    sts = InProcessSTS()
    sts.hold["alice@example.com"] = threading.Event()
    provider = in_process_provider(sts, max_callers=2)
    tokens: list[str] = []
    first = threading.Thread(target=lambda: tokens.append(provider.token_for("alice@example.com")))
    first.start()
    deadline = time.monotonic() + 5
    while not provider.cached_callers and time.monotonic() < deadline:
        time.sleep(0.001)
    # Many callers pass while alice's AssumeRole hangs; her slot, the oldest, must stay...
    for i in range(10):
        provider.token_for(f"user{i}@example.com")
    assert provider.cached_callers == 2
    # ...so a second request for her waits for the same refresh instead of starting another.
    second = threading.Thread(target=lambda: tokens.append(provider.token_for("alice@example.com")))
    second.start()
    time.sleep(0.05)
    sts.hold["alice@example.com"].set()
    first.join(10)
    second.join(10)
    assert len(tokens) == 2 and tokens[0] == tokens[1]
    assert sts.count("alice@example.com") == 1


def test_memory_per_cached_caller_is_a_few_kib():
    sts = InProcessSTS()
    provider = in_process_provider(sts, max_callers=2000)
    for i in range(20):  # botocore's own caches fill on first use
        provider.token_for(f"warm-up-{i}@example.com")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            provider.token_for(f"user{i}@example.com")
        gc.collect()
        per_caller = (tracemalloc.get_traced_memory()[0] - before) / 1000
    finally:
        tracemalloc.stop()
    # A botocore client per caller, as before, held about 145 KiB each.
    assert per_caller < 16 * 1024, f"{per_caller / 1024:.1f} KiB per cached caller"


def assert_no_secrets(text: str) -> None:
    for secret in (BASE_ACCESS_KEY_ID, BASE_SECRET_ACCESS_KEY, "AKIA", "ASIA"):
        assert secret not in text


def test_sts_unreachable(caplog):
    caplog.set_level(logging.DEBUG, logger="jitgate.upstream.eks")
    config = EKSClusterCredentialConfig(
        REGION, CLUSTER, "arn:aws:iam::123456789012:role/jitgate-eks-admin",
        sts_endpoint=f"https://127.0.0.1:{net.free_port()}",
    )
    provider = EKSTokenProvider(config, client_config=FAST_FAILURE)
    with pytest.raises(UpstreamCredentialError) as e:
        provider.token_for("alice@example.com")
    message = str(e.value)
    assert "arn:aws:iam::123456789012:role/jitgate-eks-admin" in message and "alice@example.com" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert_no_secrets(message)
    assert_no_secrets(caplog.text)
    assert provider.stats.tokens_minted == 0


def test_sts_failure_is_not_retried_on_every_request():
    clock = Clock()
    config = EKSClusterCredentialConfig(
        REGION, CLUSTER, "arn:aws:iam::123456789012:role/jitgate-eks-admin",
        sts_endpoint=f"https://127.0.0.1:{net.free_port()}",
    )
    provider = EKSTokenProvider(config, now=clock, failure_backoff=5, client_config=FAST_FAILURE)
    with pytest.raises(UpstreamCredentialError) as first:
        provider.token_for("alice@example.com")
    for _ in range(10):
        with pytest.raises(UpstreamCredentialError) as again:
            provider.token_for("alice@example.com")
        assert str(again.value) == str(first.value)
    assert provider.stats.assume_role_calls == 1

    clock.advance(5)
    with pytest.raises(UpstreamCredentialError):
        provider.token_for("alice@example.com")
    assert provider.stats.assume_role_calls == 2


def test_current_session_stands_in_while_sts_is_down(tmp_path, ca):
    clock = Clock()
    own = MotoServer.start(tmp_path / "moto", ca)
    try:
        role = own.create_role("jitgate-eks-admin")
        provider = EKSTokenProvider(
            config_for(own, role, session_duration=3600), now=clock, refresh_margin=300,
            failure_backoff=5, client_config=FAST_FAILURE,
        )
        key = decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"]
    finally:
        own.stop()

    # Due for refresh, STS unreachable: the session has 250 s left, so it keeps signing tokens.
    clock.advance(3600 - 250)
    assert decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"] == key
    assert provider.stats.assume_role_calls == 2
    # Until the next attempt the stand-in token is reused; no STS call, no new token.
    provider.token_for("alice@example.com")
    assert (provider.stats.assume_role_calls, provider.stats.tokens_minted) == (2, 2)
    clock.advance(5)
    assert decode_eks_token(provider.token_for("alice@example.com"))["access_key_id"] == key
    assert provider.stats.assume_role_calls == 3
    # Less than a minute before it expires the old session is no use: EKS could not verify its tokens.
    clock.advance(250 - 5 - 60)
    with pytest.raises(UpstreamCredentialError):
        provider.token_for("alice@example.com")


def test_sts_with_untrusted_certificate(moto, role_arn, tmp_path):
    stranger = net.TestCA.create(tmp_path / "stranger", name="not the moto CA")
    config = EKSClusterCredentialConfig(
        REGION, CLUSTER, role_arn, sts_endpoint=moto.endpoint_url, ca_bundle=str(stranger.cert_path)
    )
    provider = EKSTokenProvider(config, client_config=FAST_FAILURE)
    with pytest.raises(UpstreamCredentialError, match="(?i)ssl|certificate") as e:
        provider.token_for("alice@example.com")
    assert_no_secrets(str(e.value))
    assert moto.assume_role_calls(role_arn) == []


def test_sts_refusal(tmp_path, ca, caplog):
    # A moto that checks IAM permissions from its first call on: our base key belongs to no IAM user.
    strict = MotoServer.start(tmp_path / "strict-moto", ca, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        config = config_for(strict, "arn:aws:iam::123456789012:role/jitgate-eks-admin")
        provider = EKSTokenProvider(config, client_config=FAST_FAILURE)
        with pytest.raises(UpstreamCredentialError, match="STS refused AssumeRole") as e:
            provider.token_for("alice@example.com")
    finally:
        strict.stop()
    assert "InvalidClientTokenId" in str(e.value)
    assert_no_secrets(str(e.value))
    assert_no_secrets(caplog.text)


def test_hanging_sts_blocks_neither_the_loop_nor_more_than_one_thread(ca):
    # TCP connects (the kernel's backlog accepts) but the TLS handshake never gets an answer.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        config = EKSClusterCredentialConfig(
            REGION, CLUSTER, "arn:aws:iam::123456789012:role/jitgate-eks-admin",
            sts_endpoint=f"https://127.0.0.1:{listener.getsockname()[1]}", ca_bundle=str(ca.cert_path),
        )
        provider = EKSTokenProvider(config, client_config=FAST_FAILURE)

        async def main():
            ticks = 0

            async def heartbeat():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            beat = asyncio.create_task(heartbeat())
            results = await asyncio.gather(
                *(provider.atoken_for("alice@example.com") for _ in range(10)), return_exceptions=True
            )
            beat.cancel()
            return ticks, results

        started = time.monotonic()
        ticks, results = asyncio.run(main())
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert all(isinstance(r, UpstreamCredentialError) for r in results)
    assert provider.stats.assume_role_calls == 1
    # The loop kept running while STS hung: about one tick per 10 ms of the wait.
    assert elapsed >= 0.9 and ticks >= elapsed * 100 * 0.5


def test_a_cancelled_awaiter_does_not_cancel_the_refresh(moto, role_arn):
    provider = EKSTokenProvider(config_for(moto, role_arn))

    async def main():
        impatient = asyncio.create_task(provider.atoken_for("alice@example.com"))
        patient = asyncio.create_task(provider.atoken_for("alice@example.com"))
        await asyncio.sleep(0)
        impatient.cancel()
        return await patient

    assert asyncio.run(main()).startswith(TOKEN_PREFIX)
    assert provider.stats.assume_role_calls == 1


# Session names: deterministic, valid for STS, readable, and distinct for distinct callers.

TRICKY_CALLERS = [
    "alice@example.com",
    "alice+tag@example.com",
    "Alice@Example.com",
    "bob",
    "a",
    "ab",
    "a-",
    "-",
    " ",
    "  ",
    "alice smith",
    "alice-smith",
    "alice\tsmith",
    "alice\nsmith",
    "alice--smith",
    "système:serviceaccount:agents:mcp",
    "system:serviceaccount:agents:mcp",
    "system-serviceaccount-agents-mcp",
    "aws:internal",
    "AWS:internal",
    "aws-internal",
    "aws:",
    "用户",
    "用户名",
    "emoji🙂user",
    "emoji😀user",
    "x" * 64,
    "x" * 65,
    "x" * 64 + "y",
    "x" * 200,
    "x" * 200 + "z",
    "https://issuer.example.com#1234567890",
    "https://issuer.example.com#1234567891",
    "CN=Alice,OU=Eng",
    "a/b",
    "a\\b",
    "a%2Fb",
    "a\x00b",
    "a\udcffb",
    "alice-smith+" + "0" * 16,
    "alice smith+" + "0" * 16,
    "name=value,other.thing@x_y",
]


@pytest.mark.parametrize("name", [role_session_name, source_identity])
def test_sts_names_are_valid_deterministic_and_distinct(name):
    names = {}
    for caller in TRICKY_CALLERS:
        result = name(caller)
        assert STS_NAME.fullmatch(result), (caller, result)
        assert not result.lower().startswith("aws:")
        assert name(caller) == result
        names[caller] = result
    assert len(set(names.values())) == len(TRICKY_CALLERS), "two callers share a session name"

    # Valid names stay as they are, so CloudTrail reads like the identity provider.
    for caller in ("alice@example.com", "alice+tag@example.com", "bob", "ab", "a-", "x" * 64, "aws-internal"):
        assert names[caller] == caller
    # Altered names keep the readable part.
    assert names["alice smith"].startswith("alice-smith+")
    assert names["x" * 200].startswith("x" * 47 + "+")
    assert names["x" * 200] != names["x" * 200 + "z"]
    # A valid caller cannot pose as the altered name of another.
    assert names["alice-smith+" + "0" * 16] != names["alice smith"]
    assert name(names["alice smith"]) != names["alice smith"]


def test_sts_names_of_random_callers():
    rng = random.Random(20240613)
    alphabet = "abcXYZ019_+=,.@- :/\\#é用🙂\t"
    callers = {"".join(rng.choices(alphabet, k=rng.randint(1, 90))) for _ in range(3000)}
    names = {role_session_name(c) for c in callers}
    assert all(STS_NAME.fullmatch(n) for n in names)
    assert len(names) == len(callers)
    assert all(source_identity(c) == role_session_name(c) for c in callers)


def test_empty_caller_is_refused():
    with pytest.raises(ValueError):
        role_session_name("")
    with pytest.raises(ValueError):
        source_identity("")


# Decoding rejects what aws-iam-authenticator would reject.


def token_of(url: str) -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


GOOD_URL = (
    "https://sts.us-east-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15"
    "&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIAEXAMPLE%2F20250101%2Fus-east-1%2Fsts%2Faws4_request"
    "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host%3Bx-k8s-aws-id"
    "&X-Amz-Signature=" + "0" * 64
)


def test_decode_of_a_regional_token():
    d = decode_eks_token(token_of(GOOD_URL))
    assert d["host"] == "sts.us-east-1.amazonaws.com" and d["region"] == "us-east-1"
    assert d["signed_headers"] == ["host", "x-k8s-aws-id"] and d["cluster_bound"]
    assert "X-Amz-Security-Token" not in d["params"]


@pytest.mark.parametrize(
    "token",
    [
        "Bearer " + token_of(GOOD_URL),
        "k8s-aws-v2." + token_of(GOOD_URL)[len(TOKEN_PREFIX) :],
        TOKEN_PREFIX + base64.urlsafe_b64encode(GOOD_URL.encode() + b"x").decode(),  # padded
        TOKEN_PREFIX + base64.b64encode(GOOD_URL.encode() + b"??>").decode().rstrip("="),  # not urlsafe
        TOKEN_PREFIX,
        TOKEN_PREFIX + "A",
        token_of("ftp://sts.amazonaws.com/?Action=GetCallerIdentity"),
        token_of(GOOD_URL.replace("&X-Amz-Date=20250101T000000Z", "")),
        token_of(GOOD_URL + "&Action=GetSessionToken"),
        token_of(GOOD_URL + "&X-Amz-Extra=1"),
        token_of(GOOD_URL.replace("20250101T000000Z", "yesterday")),
        token_of(GOOD_URL.replace("%2Faws4_request", "")),
    ],
)
def test_decode_rejects_what_is_no_eks_token(token):
    with pytest.raises(InvalidEKSToken):
        decode_eks_token(token)


def test_config_and_provider_validate():
    good = dict(region=REGION, cluster_name=CLUSTER, role_arn="arn:aws:iam::123456789012:role/x")
    with pytest.raises(ValueError, match="role_arn"):
        EKSClusterCredentialConfig(**{**good, "role_arn": "arn:aws:iam::123456789012:user/x"})
    with pytest.raises(ValueError, match="session_duration"):
        EKSClusterCredentialConfig(**good, session_duration=600)
    with pytest.raises(ValueError, match="sts_endpoint"):
        EKSClusterCredentialConfig(**good, sts_endpoint="sts.amazonaws.com")
    config = EKSClusterCredentialConfig(**good, session_duration=900)
    with pytest.raises(ValueError, match="refresh_margin"):
        EKSTokenProvider(config, refresh_margin=900)
    with pytest.raises(ValueError, match="token_reuse"):
        EKSTokenProvider(config, token_reuse=15 * 60)
    with pytest.raises(ValueError, match="max_callers"):
        EKSTokenProvider(config, max_callers=0)
