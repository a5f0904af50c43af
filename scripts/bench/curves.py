"""Scaling curves, measured in-process on the gateway's own code (no proxy in between).

Each curve gives the cost of one per-call operation as a size grows (identities cached, grants
active, access rules, response bytes). The access decision is timed on the access service that
the grants addon awaits per call (jitgate.access.service), on an event loop of its own and against
a real SQLite grant store, so it is exactly what the gateway runs per call. Steps of the chain that do not exist yet raise `NotYetMeasurable`:
their functions are where the measurement plugs in once the step lands, and the report lists them
with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from jitgate.access.messages import how_to_request
from jitgate.access.model import Person
from jitgate.access.scope import Scope
from jitgate.access.service import AccessService
from jitgate.identity.oidc import IssuerConfig, OIDCVerifier
from jitgate.kube.request_info import RequestInfo, parse_request
from jitgate.policy.loader import Policy
from jitgate.store.sqlite import SQLiteStore
from scripts.bench import bodies

REPO = Path(__file__).resolve().parents[2]

IDENTITY_COUNTS = (10, 100, 1_000, 10_000, 100_000)
GRANT_COUNTS = (10, 100, 1_000, 10_000, 100_000)
RULE_COUNTS = (10, 100, 1_000, 10_000)
MASKING_SIZES = (1_000, 100_000, 1_000_000, 10_000_000, 50_000_000)

# The gateway's OIDCVerifier is built with the default cache size (addons/identity.py).
GATEWAY_IDENTITY_CACHE_SIZE = 10_000


class NotYetMeasurable(Exception):
    """The step a curve measures is not part of jitgate yet."""


@dataclass
class Curve:
    name: str
    x_label: str
    y_label: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # label -> (x, y) points
    not_measurable: str = ""  # why there are no points
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, x: int, y: float) -> None:
        self.series.setdefault(label, []).append((x, y))


def best_seconds_per_call(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """The fastest of `repeats` timed runs of `calls` calls, per call: least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def best_seconds_per_await(loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[object]], calls: int,
                           repeats: int = 5) -> float:
    """best_seconds_per_call for a coroutine function. Timed inside the running loop, so the figure
    is the await's own cost (a hop to the store thread included, if it makes one), not the loop's."""
    async def timed() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await fn()
        return (time.perf_counter() - started) / calls

    return min(loop.run_until_complete(timed()) for _ in range(repeats))


# -- identity: verified-token cache ---------------------------------------------------------------

def identity_cache_curve(issuer: bodies.Issuer, ca_file: str, counts: Sequence[int] = IDENTITY_COUNTS,
                         sample: int = 2000) -> Curve:
    """Cost of verifying an already verified token (the steady state of every call) as the number of
    cached identities grows. The cache is filled through the public API (each token really
    verified), with EdDSA tokens so 100,000 of them take seconds; a hit costs the same for any
    algorithm (a hash of the token and a dictionary lookup)."""
    curve = Curve("Identity: cached token verification", "cached identities", "µs per verification")
    config = IssuerConfig(issuer.url, audiences=(bodies.CLIENT_ID,), username_claim="email",
                          algorithms=("EdDSA",), ca_file=ca_file)
    verifier = OIDCVerifier([config], cache_size=max(counts))
    verifier.prefetch()
    tokens: list[str] = []
    rng = random.Random(4)
    for count in sorted(counts):
        while len(tokens) < count:
            token = issuer.curve_token(f"user{len(tokens)}@example.com")
            verifier.verify(token)
            tokens.append(token)
        picks = [rng.choice(tokens) for _ in range(sample)]
        it = iter(picks * 10)
        per_call = best_seconds_per_call(lambda: verifier.verify(next(it)), sample, repeats=5)
        curve.add("cache hit", count, per_call * 1e6)
    if verifier.stats["discovery_fetches"] + verifier.stats["jwks_fetches"] > 2:
        curve.notes.append(f"unexpected issuer fetches during the curve: {verifier.stats}")
    # What a miss costs: full RS256 verification with the keys at hand (no I/O), as the gateway does.
    rs_verifier = OIDCVerifier([IssuerConfig(issuer.url, audiences=(bodies.CLIENT_ID,), username_claim="email",
                                             ca_file=ca_file)], cache_size=0)
    rs_verifier.prefetch()
    token = issuer.token()
    miss = best_seconds_per_call(lambda: rs_verifier.verify(token), 200, repeats=3)
    curve.notes.append(f"a cache miss (full RS256 verification, keys already fetched) costs {miss * 1e6:.0f} µs")
    curve.notes.append(f"the gateway's cache holds {GATEWAY_IDENTITY_CACHE_SIZE:,} tokens (OIDCVerifier default); "
                       "with more distinct live tokens than that, LRU evictions turn hits into misses")
    return curve


# -- request attributes ---------------------------------------------------------------------------

PARSE_CASES: tuple[tuple[str, str, str], ...] = (
    ("discovery", "GET", "/api/v1"),
    ("list pods", "GET", bodies.PODS_PATH),
    ("get deployment", "GET", "/apis/apps/v1/namespaces/default/deployments/web"),
    ("watch pods", "GET", bodies.PODS_PATH + "?watch=1&resourceVersion=2000&allowWatchBookmarks=true"),
    ("list, selectors", "GET", bodies.PODS_PATH + "?labelSelector=app%3Dweb%2Ctier%20in%20%28frontend%29"
                                                  "&fieldSelector=status.phase%3DRunning&limit=500"),
    ("exec", "POST", bodies.PODS_PATH + "/web-0/exec?command=sh&command=-c&command=echo%20hello"
                                        "&container=web&stdin=true&stdout=true&stderr=true&tty=true"),
)


def request_parsing_costs(calls: int = 5000) -> list[tuple[str, str, float]]:
    """µs per `parse_request` for representative kubectl requests, each timed over `calls` calls:
    (case, target, µs)."""
    headers = {"Accept": "application/json", "User-Agent": "kubectl/v1.33.1"}
    rows = []
    for name, method, target in PARSE_CASES:
        per_call = best_seconds_per_call(lambda: parse_request(method, target, headers), calls)
        rows.append((name, f"{method} {target}", per_call * 1e6))
    return rows


# -- access decision: grants and rules ------------------------------------------------------------

def scratch_dir() -> Path:
    """Where the curves' grant store lives: tmpfs when there is one, so filling 100,000 grants does
    not wait on 100,000 fsyncs (the lookups being timed read pages from memory either way)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="jitgate-bench-grants-", dir=base))


class DecisionBench:
    """The gateway's per-call access check (`AccessService.decide`, what addons/grants.py awaits for
    every call, then `hold_rule` and the refusal text for a call without a grant) on a real SQLite
    store, with the service's own store thread."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.directory = scratch_dir()
        self.service = AccessService(store_factory=SQLiteStore)
        self.service.open_store(str(self.directory / "grants.db"))
        self.service.set_policy(policy.access_rules, ())
        self.store: SQLiteStore = self.service.store
        self.loop = asyncio.new_event_loop()
        self.service.start(self.loop)
        self.read_rule = policy.access_rules[0]  # bench-read: pods, approved at once
        self.grants = 0
        self.cluster = policy.clusters[0].name
        self.groups = tuple(f"oidc:{g}" for g in bodies.USER_GROUPS)
        # What the steps before the grants step know of a call: who, and its request attributes.
        self.info: RequestInfo = parse_request("GET", bodies.PODS_PATH, {})

    def grant(self, username: str) -> None:
        person = Person(username, (f"oidc:{bodies.USER_GROUPS[0]}",))
        scope = Scope(self.policy.clusters[0].name, namespaces=(bodies.NAMESPACE,), resources=("pods",),
                      verbs=("get", "list", "watch"))
        self.store.create_request(self.policy.access_rules, person, scope, now=time.time(), reason="benchmark")
        self.grants += 1

    def fill(self, active_grants: int) -> None:
        if self.grants == 0:
            self.grant(bodies.USER_EMAIL)
        while self.grants < active_grants:
            self.grant(f"user{self.grants}@example.com")

    def set_rules(self, rules: Sequence) -> None:
        self.service.set_policy(rules, ())

    def timed(self, fn: Callable[[], Awaitable[object]], calls: int, repeats: int = 5) -> float:
        return best_seconds_per_await(self.loop, fn, calls, repeats)

    async def decide_allowed(self) -> None:
        decision = await self.service.decide(bodies.USER_EMAIL, self.cluster, self.info)
        if not decision.allowed:
            raise RuntimeError(f"the benchmark user's grant does not cover the call: {decision.reason}")

    async def decide_uncached(self) -> None:
        self.service.cache.clear()  # as after any change to the store: the caller's grants are re-read
        await self.decide_allowed()

    async def decide_refused(self) -> None:
        # Somebody with no grant asking for pods: refused with the message that says how to ask.
        decision = await self.service.decide("nobody@example.com", self.cluster, self.info)
        if decision.allowed or self.service.hold_rule(self.groups, self.cluster, self.info) is not None:
            raise RuntimeError("a call without a grant was not refused")
        how_to_request(self.service.rules, self.groups, self.cluster, self.info)

    def close(self) -> None:
        self.loop.run_until_complete(self.service.stop())  # closes the store on its own thread
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def grant_decision_curve(policy: Policy, counts: Sequence[int] = GRANT_COUNTS) -> Curve:
    """Decision time per call as the store fills with active grants (other users' and the caller's)."""
    curve = Curve("Decision time vs active grants", "active grants in the store", "µs per decision")
    bench = DecisionBench(policy)
    try:
        for count in sorted(counts):
            bench.fill(count)
            bench.timed(bench.decide_allowed, 1, repeats=1)
            curve.add("steady state (cached grants)", count, bench.timed(bench.decide_allowed, 2000) * 1e6)
            curve.add("after a store change (SQL lookup)", count, bench.timed(bench.decide_uncached, 300) * 1e6)
    finally:
        bench.close()
    for label, points in curve.series.items():
        curve.notes.append(f"{label}: {spread([y for _, y in points]):.0%} from the smallest to the largest store "
                           "(target: within 10%)")
    curve.notes.append("the gateway asks SQLite whether the store changed (PRAGMA data_version) at most every "
                       f"{AccessService.CHANGE_CHECK_SECONDS * 1000:.0f} ms; the caller's grants are re-read (indexed by "
                       "user and cluster, on the service's store thread) only after a change")
    return curve


def rule_decision_curve(policy: Policy, counts: Sequence[int] = RULE_COUNTS, calls: int = 20_000) -> Curve:
    """Decision time per call as the policy grows to thousands of access rules (other teams'
    rules first, so a refusal scans them all before it can name the rule to ask under); a covered
    call timed over `calls` / 10 calls, a refused one over `calls` rule reads."""
    curve = Curve("Decision time vs access rules", "access rules in the policy", "µs per decision")
    bench = DecisionBench(policy)
    own = policy.access_rules
    try:
        bench.fill(1)
        for count in sorted(counts):
            others = tuple(dataclasses.replace(own[0], name=f"team-{i}", requesters=(f"oidc:team-{i}",),
                                               namespaces=(f"team-{i}",), source="")
                           for i in range(max(0, count - len(own))))
            bench.set_rules(others + own)
            bench.timed(bench.decide_allowed, 1, repeats=1)
            curve.add("call covered by a grant", count, bench.timed(bench.decide_allowed, max(100, calls // 10)) * 1e6)
            curve.add("call without a grant (refusal names the rule to ask under)", count,
                      bench.timed(bench.decide_refused, max(20, calls // count), repeats=3) * 1e6)
    finally:
        bench.close()
    curve.notes.append("a call covered by a grant never reads the rules; a refused call scans them in policy order")
    return curve


# -- steps that do not exist yet ------------------------------------------------------------------

def masking_bytes_per_second(response_bytes: int) -> float:
    """Masking throughput for a SecretList of about `response_bytes` (1 KB to 50 MB), bytes per second."""
    if find_spec("jitgate.masking") is None:
        raise NotYetMeasurable("no masking step in jitgate yet")
    from scripts.bench.masking import masking_seconds, secret_list_of_size

    body = secret_list_of_size(response_bytes)
    return len(body) / masking_seconds(body)


def masking_curve(max_bytes: int = MASKING_SIZES[-1], secret_items: int = 5000, watch_events: int = 20_000) -> Curve:
    """Masking against json.loads + json.dumps of the same SecretList, and the check a body without
    secrets costs (a PodList of the same size), in MB/s, for bodies up to `max_bytes`; the ratios of
    scripts/bench/masking.py (lists of `secret_items`, a watch of `watch_events`) as notes."""
    curve = Curve("Masking throughput vs response size", "response bytes", "MB/s")
    sizes = [s for s in MASKING_SIZES if s <= max_bytes]
    try:
        for size in sizes:
            curve.add("masking (SecretList)", size, masking_bytes_per_second(size) / 1e6)
    except NotYetMeasurable as e:
        curve.not_measurable = str(e)
        return curve
    from scripts.bench import masking as bench_masking

    for size in (s for s in sizes if s <= 10_000_000):  # the 50 MB point: masking alone (time)
        secrets, pods = bench_masking.secret_list_of_size(size), bench_masking.pod_list_of_size(size)
        curve.add("json.loads + json.dumps (SecretList)", size, len(secrets) / bench_masking.json_seconds(secrets) / 1e6)
        curve.add("no-secret check (PodList)", size, len(pods) / bench_masking.masking_seconds(pods) / 1e6)
    for name, row in bench_masking.measure(secret_items, watch_events).items():
        curve.notes.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return curve


def spread(values: Sequence[float]) -> float:
    """(max - min) / min: how far a curve strays from flat."""
    return (max(values) - min(values)) / min(values) if values and min(values) > 0 else float("nan")
