"""Scaling curves, measured in-process on jitgate's own modules (no proxy in between).

Each curve is a function from a size (identities cached, grants active, policy rules, bytes) to the
cost of one operation at that size. Steps of the chain that do not exist yet raise
`NotYetMeasurable`: their functions are where the measurement plugs in once the step lands, and the
report lists them with the reason.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec

from jitgate.oidc import IssuerConfig, OIDCVerifier
from jitgate.requestinfo import parse_request
from scripts.bench import bodies

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
    points: list[tuple[int, float]] = field(default_factory=list)
    not_measurable: str = ""  # why there are no points
    notes: list[str] = field(default_factory=list)


def best_seconds_per_call(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """The fastest of `repeats` timed runs of `calls` calls, per call: least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


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
        curve.points.append((count, per_call * 1e6))
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


def request_parsing_costs() -> list[tuple[str, str, float]]:
    """µs per `parse_request` for representative kubectl requests: (case, target, µs)."""
    headers = {"Accept": "application/json", "User-Agent": "kubectl/v1.33.1"}
    rows = []
    for name, method, target in PARSE_CASES:
        per_call = best_seconds_per_call(lambda: parse_request(method, target, headers), 5000)
        rows.append((name, f"{method} {target}", per_call * 1e6))
    return rows


# -- steps that do not exist yet ------------------------------------------------------------------

def grant_decision_seconds(active_grants: int) -> float:
    """Seconds per access decision with `active_grants` active grants in the store.

    Where the grant lookup plugs in (issue #3): fill a store with `active_grants` grants spread over
    many identities and clusters, then time the check the gateway makes per call (identity + cluster
    + request attributes -> covering grant or not) with `best_seconds_per_call`. The target is
    within 10% from 10 to 100,000 grants (indexed lookups, not scans)."""
    if find_spec("jitgate.grants") is None:
        raise NotYetMeasurable("no grant store in jitgate yet (issue #3)")
    raise NotYetMeasurable("jitgate.grants exists now: time its per-call lookup in grant_decision_seconds")


def rule_decision_seconds(rules: int) -> float:
    """Seconds per decision with `rules` access rules / guardrails in the policy (10 to 10,000)."""
    raise NotYetMeasurable("the policy has no access rules or guardrails yet (policy sections: clusters, "
                           "identity_providers)")


def masking_bytes_per_second(response_bytes: int) -> float:
    """Masking throughput for a response of `response_bytes` (1 KB to 50 MB)."""
    if find_spec("jitgate.masking") is None:
        raise NotYetMeasurable("no masking step in jitgate yet")
    raise NotYetMeasurable("jitgate.masking exists now: time it in masking_bytes_per_second")


def pending_curves() -> list[Curve]:
    """The curves of steps that do not exist yet, each tried at its first size for its reason."""
    curves = []
    for name, x_label, y_label, fn, sizes in (
        ("Decision time vs active grants", "active grants", "µs per decision", grant_decision_seconds, GRANT_COUNTS),
        ("Decision time vs policy rules", "policy rules", "µs per decision", rule_decision_seconds, RULE_COUNTS),
        ("Masking throughput vs response size", "response bytes", "MB/s", masking_bytes_per_second, MASKING_SIZES),
    ):
        curve = Curve(name, x_label, y_label)
        try:
            for size in sizes:
                value = fn(size)
                curve.points.append((size, value * 1e6 if y_label.startswith("µs") else value / 1e6))
        except NotYetMeasurable as e:
            curve.not_measurable = str(e)
        curves.append(curve)
    return curves


def spread(values: Sequence[float]) -> float:
    """(max - min) / min: how far a curve strays from flat."""
    return (max(values) - min(values)) / min(values) if values and min(values) > 0 else float("nan")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
