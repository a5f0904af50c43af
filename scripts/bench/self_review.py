"""Per-call cost of the self-review step and of the grants step's live-session bookkeeping.

What every call pays: SelfReview.request's guard on a call that is no review (a `get pods`), and
SelfReview.response on it; what a review pays where it is answered locally (whoami, a rules review
from a cached grant, a can-i no grant covers); and the pure ending pieces (watch ERROR event,
exec error frame) a session end builds once.

    .venv/bin/python -m scripts.bench.self_review
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from mitmproxy.test import tflow

from jitgate.access.model import Grant
from jitgate.access.scope import Scope
from jitgate.access.service import AccessService
from jitgate.chain.flow import call_of
from jitgate.identity.oidc import Identity
from jitgate.kube import reviews, stream_endings
from jitgate.kube.request_info import parse_request
from scripts.bench.curves import Curve, best_seconds_per_await, best_seconds_per_call

REPO = Path(__file__).resolve().parents[2]


def _step(service: AccessService):
    spec = importlib.util.spec_from_file_location("jitgate_bench_self_review", REPO / "addons/self_review.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.SelfReview(service)


class _CachedService(AccessService):
    """The service with one caller's grants already cached: what a warm gateway serves from."""

    def __init__(self, grants: tuple[Grant, ...]) -> None:
        super().__init__()
        self.grants = grants

    async def active_grants(self, username: str, cluster: str) -> tuple[Grant, ...]:
        return self.grants


def _flow(method: str, path: str, body: bytes = b""):
    flow = tflow.tflow()
    flow.request.method, flow.request.path, flow.request.content = method, path, body
    call = call_of(flow)
    call.identity = Identity("alice@example.com", ("oidc:developers",), "https://idp.example", "alice", time.time() + 3600)
    call.cluster = CLUSTER
    call.info = parse_request(method, path)
    return flow


CLUSTER = SimpleNamespace(name="dev")  # the step reads only the cluster's name


def measure(calls: int = 20_000) -> dict[str, float]:
    """Microseconds per call for each case."""
    now = time.time()
    grant = Grant("grant-1", "req-1", "alice@example.com", "dev-read", Scope("dev", ("dev",), False, ("pods", "pods/log"),
                                                                            ("get", "list", "watch")), None, now, now + 3600)
    service = _CachedService((grant,))
    step = _step(service)
    cluster = CLUSTER
    loop = asyncio.new_event_loop()
    out: dict[str, float] = {}

    plain = _flow("GET", "/api/v1/namespaces/dev/pods")
    call_of(plain).cluster = cluster
    out["request guard, not a review (every call)"] = best_seconds_per_await(loop, lambda: step.request(plain), calls) * 1e6
    plain.response = tflow.tresp()
    out["response guard, not a review (every call)"] = best_seconds_per_call(lambda: step.response(plain), calls) * 1e6

    def answered(path: str, body: bytes):
        async def one():
            flow = _flow("POST", path, body)
            call_of(flow).cluster = cluster
            await step.request(flow)
        return one

    ssar = b'{"kind":"SelfSubjectAccessReview","spec":{"resourceAttributes":{"verb":"delete","resource":"pods","namespace":"dev"}}}'
    ssrr = b'{"kind":"SelfSubjectRulesReview","spec":{"namespace":"dev"}}'
    few = max(1, calls // 10)
    out["whoami (answered here, incl. flow setup)"] = best_seconds_per_await(
        loop, answered("/apis/authentication.k8s.io/v1/selfsubjectreviews", b"{}"), few) * 1e6
    out["can-i --list (answered here, incl. flow setup)"] = best_seconds_per_await(
        loop, answered("/apis/authorization.k8s.io/v1/selfsubjectrulesreviews", ssrr), few) * 1e6
    out["can-i, no grant (answered here, incl. flow setup)"] = best_seconds_per_await(
        loop, answered("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", ssar), few) * 1e6
    out["watch ERROR event bytes"] = best_seconds_per_call(lambda: stream_endings.watch_error_event("ended"), calls) * 1e6
    out["exec error frame"] = best_seconds_per_call(
        lambda: stream_endings.exec_error_frames("v5.channel.k8s.io", "ended"), calls) * 1e6
    out["review_kind on a plain call"] = best_seconds_per_call(lambda: reviews.review_kind(call_of(plain).info), calls) * 1e6
    loop.close()
    return out


def cost_curve(calls: int = 20_000) -> Curve:
    """The costs as notes of one curve (run.py collects curves)."""
    curve = Curve("Self-review step: per-call cost", "case", "µs per call")
    for name, micros in measure(calls).items():
        curve.notes.append(f"{name}: {micros:.2f} µs")
    return curve


if __name__ == "__main__":
    for name, micros in measure().items():
        print(f"{name:55s} {micros:8.2f} µs")
