"""The EKS upstream credential: the gateway's own STS AssumeRole and the EKS bearer token it mints.

Callers never hold a cluster credential. For each caller the gateway assumes the cluster's IAM role
itself, with RoleSessionName and SourceIdentity naming the caller so CloudTrail shows who acted, and
signs an EKS token with those role credentials: `k8s-aws-v1.` + unpadded urlsafe base64 of an STS
GetCallerIdentity URL presigned with the header `x-k8s-aws-id: <cluster>` among the signed headers
(what `aws eks get-token` and aws-iam-authenticator produce). EKS accepts such a token for 15
minutes from its X-Amz-Date, as long as the role credentials that signed it are still valid.

Base credentials: the STS client that calls AssumeRole uses boto3's normal credential chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and the shared config
files, web identity as with IRSA or EKS Pod Identity, the container or instance role), or whatever
the boto3.Session handed to EKSTokenProvider carries. That principal needs sts:AssumeRole and
sts:SetSourceIdentity on the role, and the role's trust policy must allow both actions.

One STS client per provider calls AssumeRole with the gateway's own credentials. What is kept per
caller is small (the role session's three credential strings and the current token, a few KiB) and
bounded: at most `max_callers` callers are cached, the least recently used leaving first, and an
evicted caller simply assumes the role again on its next call. Role credentials are refreshed
`refresh_margin` seconds before they expire; tokens are reused for `token_reuse` seconds. A refresh
is one STS call however many requests wait for it. When STS fails, the next attempt for that caller
waits `failure_backoff` seconds (requests in between get the same error at once), and a session
that is due for refresh but not yet expired keeps serving meanwhile. Nothing here logs or puts into an error message an access key, a
secret key, a session token or a minted token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import functools
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("jitgate.upstream.eks")

TOKEN_PREFIX = "k8s-aws-v1."
CLUSTER_ID_HEADER = "x-k8s-aws-id"
PRESIGN_EXPIRES_IN = 60  # what `aws eks get-token` asks for; EKS applies its own 15-minute window
EKS_TOKEN_LIFETIME = datetime.timedelta(minutes=15)
_GET_CALLER_IDENTITY = {"Action": "GetCallerIdentity", "Version": "2011-06-15"}
# Callers whose role session stays cached; a few KiB each. Beyond it the least recently used goes.
DEFAULT_MAX_CALLERS = 1024

# STS limits for RoleSessionName and SourceIdentity: `[\w+=,.@-]{2,64}`, where \w is ASCII only.
_STS_NAME_OUTSIDE = re.compile(r"[^A-Za-z0-9_+=,.@-]+")
_STS_NAME_MIN = 2
_STS_NAME_MAX = 64
_DIGEST_HEX = 16
# The shape of a name we had to alter: `<readable part>+<digest>`. A valid caller name of the same
# shape is digested too, so it cannot pose as the altered name of somebody else.
_DIGESTED_NAME = re.compile(r"\+[0-9a-f]{%d}\Z" % _DIGEST_HEX)

_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")

# A stand-in session is dropped this long before it expires: EKS must still accept what it signed.
_EXPIRY_SAFETY = 60.0

_STS_CLIENT_CONFIG = Config(
    connect_timeout=5,
    read_timeout=10,
    retries={"mode": "standard", "max_attempts": 3},
)


def _sts_name(caller: str) -> str:
    """A deterministic, readable STS name for `caller`, distinct for distinct callers.

    Valid names pass unchanged (`alice@example.com`). Anything else is altered (runs of characters
    STS refuses become `-`, the result is cut to fit) and, because altering can map two callers to
    the same text, gets `+` and a digest of the original appended.
    """
    if not caller:
        raise ValueError("an empty caller name has no STS session name")
    readable = _STS_NAME_OUTSIDE.sub("-", caller)
    if (
        readable == caller
        and _STS_NAME_MIN <= len(caller) <= _STS_NAME_MAX
        and not _DIGESTED_NAME.search(caller)
    ):
        return caller
    digest = hashlib.sha256(caller.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_HEX]
    return f"{readable[: _STS_NAME_MAX - _DIGEST_HEX - 1]}+{digest}"


def role_session_name(caller: str) -> str:
    """The RoleSessionName for `caller`: it ends the assumed-role ARN CloudTrail records."""
    return _sts_name(caller)


def source_identity(caller: str) -> str:
    """The SourceIdentity for `caller`: it follows the session through role chaining.

    STS reserves the prefix `aws:` here. `:` is outside the STS name characters and so always
    replaced, which means `aws:x` becomes `aws-x+<digest>` and a result never starts with `aws:`.
    """
    name = _sts_name(caller)
    assert not name.lower().startswith("aws:"), name
    return name


def _redact(text: str) -> str:
    """Belt and braces for error text from AWS: access key ids never reach our messages or logs."""
    return _ACCESS_KEY_ID.sub("<access-key-id>", text)


class UpstreamCredentialError(Exception):
    """The gateway could not get the cluster credential. The message is safe to show and to log."""


class InvalidEKSToken(ValueError):
    """The text is not an EKS token: no prefix, not unpadded base64, or not a presigned STS URL."""


@dataclass(frozen=True)
class EKSClusterCredentialConfig:
    """How the gateway reaches one EKS cluster as the given IAM role."""

    region: str
    cluster_name: str
    role_arn: str
    sts_endpoint: str | None = None
    """STS endpoint URL for AssumeRole and for the presigned URL; default: the region's endpoint.
    EKS accepts tokens only for its known STS hosts, so leave it unset for a real cluster (a VPC
    endpoint with private DNS answers under the regional name anyway)."""
    session_duration: int = 3600
    external_id: str | None = None
    ca_bundle: str | None = None
    """CA file to verify the STS endpoint's TLS certificate with; default: botocore's bundle."""

    def __post_init__(self) -> None:
        if not self.region:
            raise ValueError("region must be set")
        if not self.cluster_name:
            raise ValueError("cluster_name must be set")
        if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", self.role_arn):
            raise ValueError(f"role_arn {self.role_arn!r} is not an IAM role ARN")
        if not 900 <= self.session_duration <= 43200:
            raise ValueError(f"session_duration {self.session_duration} is outside STS's 900..43200 seconds")
        if self.sts_endpoint is not None and urlsplit(self.sts_endpoint).scheme not in ("https", "http"):
            raise ValueError(f"sts_endpoint {self.sts_endpoint!r} is not an http(s) URL")


@dataclass
class ProviderStats:
    """Counters that show what the cache saves: in steady state only cache_hits grows."""

    assume_role_calls: int = 0
    tokens_minted: int = 0
    cache_hits: int = 0
    evictions: int = 0  # callers dropped to stay within max_callers; each costs one AssumeRole when it returns


@dataclass(frozen=True)
class _RoleSession:
    """One assumed-role session: the role credentials STS issued, to presign with."""

    credentials: ReadOnlyCredentials = field(repr=False)
    refresh_at: float
    expires_at: float


@dataclass(frozen=True)
class _CachedToken:
    value: str = field(repr=False)
    reuse_until: float


class _Slot:
    """Cache entry of one (role, caller); its lock makes refreshes single-flight."""

    __slots__ = ("lock", "session", "token", "retry_at", "failure")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.session: _RoleSession | None = None
        self.token: _CachedToken | None = None
        # After STS failed: no new attempt before retry_at, the safe message of the failure meanwhile.
        self.retry_at: float | None = None
        self.failure: str = ""


class EKSTokenProvider:
    """Mints EKS tokens for callers, assuming the cluster role as each of them (cached, single-flight)."""

    def __init__(
        self,
        config: EKSClusterCredentialConfig,
        session: boto3.Session | None = None,
        now: Callable[[], float] = time.time,
        refresh_margin: float = 300.0,
        token_reuse: float = 600.0,
        failure_backoff: float = 5.0,
        client_config: Config | None = None,
        max_callers: int = DEFAULT_MAX_CALLERS,
    ) -> None:
        if not 0 <= refresh_margin < config.session_duration:
            raise ValueError(f"refresh_margin {refresh_margin} must be in [0, session_duration)")
        # EKS accepts a token for 15 minutes; leave a minute for clock skew and the request itself.
        if not 0 < token_reuse <= 14 * 60:
            raise ValueError(f"token_reuse {token_reuse} must be in (0, 840] seconds")
        if failure_backoff < 0:
            raise ValueError(f"failure_backoff {failure_backoff} must not be negative")
        if max_callers < 1:
            raise ValueError(f"max_callers {max_callers} must be at least 1")
        self.config = config
        self.refresh_margin = refresh_margin
        self.token_reuse = token_reuse
        self.failure_backoff = failure_backoff
        self.max_callers = max_callers
        self.stats = ProviderStats()
        self._now = now
        # One client for every caller: AssumeRole goes out with the gateway's own credentials, and
        # botocore clients are thread-safe. Its endpoint and region are also what tokens are signed for.
        self._sts = (session or boto3.Session()).client(
            "sts",
            region_name=config.region,
            endpoint_url=config.sts_endpoint,
            verify=config.ca_bundle,
            config=_STS_CLIENT_CONFIG.merge(client_config) if client_config else _STS_CLIENT_CONFIG,
        )
        # Least recently used first; guarded by _slots_lock, which is never held across STS calls.
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()
        self._slots_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._inflight: dict[tuple[str, str], asyncio.Task[str]] = {}

    def token_for(self, identity: str) -> str:
        """An EKS bearer token acting as `identity`. Blocks on STS when the cache cannot answer."""
        if not identity:
            raise ValueError("identity must be set")
        slot = self._slot(identity)
        if (token := self._fresh_token(slot)) is not None:
            return token
        with slot.lock:
            # Whoever held the lock before us may just have refreshed.
            if (token := self._fresh_token(slot)) is not None:
                return token
            now = self._now()
            session = slot.session
            if session is None or now >= session.refresh_at:
                session = self._renew(slot, identity, now)
            # A token dies with the session that signed it: reuse it until the session is due for
            # refresh or, while an older session stands in for a failed refresh, until the next try.
            if now < session.refresh_at:
                horizon = session.refresh_at
            else:
                horizon = min(slot.retry_at or now, session.expires_at - _EXPIRY_SAFETY)
            cached = slot.token = self._mint(session, min(now + self.token_reuse, horizon))
            return cached.value

    async def atoken_for(self, identity: str) -> str:
        """token_for for the event loop: cached tokens inline, STS work in a thread, one per caller."""
        if not identity:
            raise ValueError("identity must be set")
        key = (self.config.role_arn, identity)
        # Through _slot even when warm: a hit must count as use, or a busy caller would age out.
        if (token := self._fresh_token(self._slot(identity))) is not None:
            return token
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(asyncio.to_thread(self.token_for, identity))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._flight_landed, key))
        # One awaiter giving up must not cancel the refresh the others wait for.
        return await asyncio.shield(task)

    def invalidate(self, identity: str | None = None) -> None:
        """Forget cached role credentials and tokens of `identity`, or of everybody."""
        with self._slots_lock:
            if identity is None:
                self._slots.clear()
            else:
                self._slots.pop((self.config.role_arn, identity), None)
        log.info("dropped cached EKS credentials of %s", "all callers" if identity is None else repr(identity))

    @property
    def cached_callers(self) -> int:
        """How many callers the cache holds now (at most max_callers, see _evict)."""
        return len(self._slots)

    def _flight_landed(self, key: tuple[str, str], task: asyncio.Task[str]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure nobody awaited any more is not reported twice

    def _renew(self, slot: _Slot, identity: str, now: float) -> _RoleSession:
        """A new role session. While STS fails, the current one stands in as long as it is valid."""
        current = slot.session
        usable = current is not None and now < current.expires_at - _EXPIRY_SAFETY
        if slot.retry_at is not None and now < slot.retry_at:
            # STS failed a moment ago; asking again on every request would only add to its load.
            if usable:
                return current
            raise UpstreamCredentialError(slot.failure)
        try:
            session = self._assume_role(identity)
        except UpstreamCredentialError as e:
            slot.retry_at, slot.failure = now + self.failure_backoff, str(e)
            if usable:
                log.warning("keeping the current role session of %r until it expires", identity)
                return current
            raise
        slot.session, slot.retry_at, slot.failure = session, None, ""
        return session

    def _slot(self, identity: str) -> _Slot:
        """The cache entry of `identity`, now the most recently used; a new one if it had none."""
        key = (self.config.role_arn, identity)
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                return slot
            slot = self._slots[key] = _Slot()
            self._evict()
        return slot

    def _evict(self) -> None:
        """Drop least recently used callers beyond max_callers. Call with _slots_lock held.

        A slot whose lock is held has a refresh under way: it stays, since a new slot for the same
        caller would start a second AssumeRole beside it. When every old slot is busy the cache runs
        over its bound until those refreshes end (at most one per thread asking STS).
        """
        excess = len(self._slots) - self.max_callers
        if excess <= 0:
            return
        idle = []
        for key, slot in self._slots.items():
            if not slot.lock.locked():
                idle.append(key)
                if len(idle) == excess:
                    break
        for key in idle:
            del self._slots[key]
        self._count("evictions", len(idle))

    def _fresh_token(self, slot: _Slot) -> str | None:
        token = slot.token
        if token is None or self._now() >= token.reuse_until:
            return None
        self._count("cache_hits")
        return token.value

    def _count(self, counter: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + n)

    def _assume_role(self, identity: str) -> _RoleSession:
        config = self.config
        params: dict[str, Any] = {
            "RoleArn": config.role_arn,
            "RoleSessionName": role_session_name(identity),
            "SourceIdentity": source_identity(identity),
            "DurationSeconds": config.session_duration,
        }
        if config.external_id is not None:
            params["ExternalId"] = config.external_id
        started = self._now()
        self._count("assume_role_calls")
        try:
            response = self._sts.assume_role(**params)
        except ClientError as e:
            error = e.response.get("Error", {})
            reason = f"{error.get('Code', 'Unknown')}: {error.get('Message', '')}"
            message = f"STS refused AssumeRole of {config.role_arn} for {identity!r}: {reason}"
            raise self._failure(message) from None
        except BotoCoreError as e:
            raise self._failure(f"STS AssumeRole of {config.role_arn} for {identity!r} failed: {e}") from None
        issued = response["Credentials"]
        # Three strings, not a client per caller: a botocore client weighs about 134 KiB.
        credentials = ReadOnlyCredentials(issued["AccessKeyId"], issued["SecretAccessKey"], issued["SessionToken"])
        # STS grants exactly DurationSeconds or refuses the call, so our own clock tells the expiry
        # (and an injected clock stays consistent with it).
        expires_at = started + config.session_duration
        log.info(
            "assumed %s for %r as session %s, refreshing in %ds",
            config.role_arn, identity, params["RoleSessionName"], config.session_duration - self.refresh_margin,
        )
        return _RoleSession(credentials, expires_at - self.refresh_margin, expires_at)

    def _mint(self, session: _RoleSession, reuse_until: float) -> _CachedToken:
        # What the STS client's generate_presigned_url("get_caller_identity") produces, signed with the
        # role credentials instead of the client's own: a SigV4 query-string signature of a GET to the
        # client's endpoint, with x-k8s-aws-id among the signed headers (it binds the token to the
        # cluster; botocore leaves out of the signature only headers such as User-Agent).
        request = AWSRequest(
            method="GET",
            url=self._sts.meta.endpoint_url.rstrip("/") + "/",
            params=dict(_GET_CALLER_IDENTITY),
            headers={CLUSTER_ID_HEADER: self.config.cluster_name},
        )
        signer = SigV4QueryAuth(session.credentials, "sts", self._sts.meta.region_name, expires=PRESIGN_EXPIRES_IN)
        try:
            signer.add_auth(request)
            url = request.url
        except BotoCoreError as e:
            raise self._failure(f"presigning the EKS token for {self.config.cluster_name} failed: {e}") from None
        self._count("tokens_minted")
        token = TOKEN_PREFIX + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")
        return _CachedToken(token, reuse_until)

    @staticmethod
    def _failure(message: str) -> UpstreamCredentialError:
        message = _redact(message)
        log.warning("%s", message)
        return UpstreamCredentialError(message)


_REQUIRED_PARAMS = (
    "Action",
    "Version",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)
# What aws-iam-authenticator lets through; anything else in the query makes the token invalid.
_ALLOWED_PARAMS = frozenset(_REQUIRED_PARAMS) | {"X-Amz-Security-Token"}


def decode_eks_token(token: str) -> dict[str, Any]:
    """Take an EKS token apart. Raises InvalidEKSToken if it is not one.

    Returns `url`, `scheme`, `host` (with port, if any), `path`, `params` (query parameter -> value),
    `action`, `version`, `access_key_id`, `region` and `service` (from the credential scope),
    `signed_headers` (list), `cluster_bound` (whether x-k8s-aws-id is signed), `amz_date` (aware
    datetime), `expires` (X-Amz-Expires, seconds) and `valid_until` (amz_date + EKS's 15 minutes).
    The cluster name itself is not in the token: only the signature over the header binds it.
    The signature is not checked here; that takes STS.
    """
    if not token.startswith(TOKEN_PREFIX):
        raise InvalidEKSToken(f"an EKS token starts with {TOKEN_PREFIX!r}")
    encoded = token[len(TOKEN_PREFIX) :]
    # Unpadded urlsafe base64, as aws-iam-authenticator decodes it (RawURLEncoding).
    if not re.fullmatch(r"[A-Za-z0-9_-]+", encoded):
        raise InvalidEKSToken("an EKS token is unpadded urlsafe base64 after its prefix")
    try:
        url = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise InvalidEKSToken(f"the EKS token does not decode: {e}") from None
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidEKSToken("the EKS token does not hold an http(s) URL")
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidEKSToken("the EKS token's URL has a malformed query") from None
    for name, value in pairs:
        if name in params:
            raise InvalidEKSToken(f"the EKS token's URL repeats {name}")
        params[name] = value
    if missing := [p for p in _REQUIRED_PARAMS if p not in params]:
        raise InvalidEKSToken(f"the EKS token's URL lacks {', '.join(missing)}")
    if unknown := sorted(params.keys() - _ALLOWED_PARAMS):
        raise InvalidEKSToken(f"the EKS token's URL has unexpected parameters {', '.join(unknown)}")
    scope = params["X-Amz-Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise InvalidEKSToken("the EKS token's X-Amz-Credential is not a SigV4 credential scope")
    try:
        amz_date = datetime.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
        expires = int(params["X-Amz-Expires"])
    except ValueError:
        raise InvalidEKSToken("the EKS token's X-Amz-Date or X-Amz-Expires is malformed") from None
    signed_headers = params["X-Amz-SignedHeaders"].split(";")
    return {
        "url": url,
        "scheme": parts.scheme,
        "host": parts.netloc,
        "path": parts.path,
        "params": params,
        "action": params["Action"],
        "version": params["Version"],
        "access_key_id": scope[0],
        "region": scope[2],
        "service": scope[3],
        "signed_headers": signed_headers,
        "cluster_bound": CLUSTER_ID_HEADER in signed_headers,
        "amz_date": amz_date,
        "expires": expires,
        "valid_until": amz_date + EKS_TOKEN_LIFETIME,
    }
