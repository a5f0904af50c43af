"""addons/grants.py inside a real mitmproxy test harness: refusals, discovery, and failing closed."""

from __future__ import annotations

import asyncio
import importlib.util
import textwrap
import time
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from jitgate.access.model import Person
from jitgate.access.service import AccessService
from jitgate.access.scope import Scope
from jitgate.chain.flow import call_of
from jitgate.chain.service_host import AccessServiceHost
from jitgate.identity.oidc import Identity
from jitgate.kube.request_info import parse_request
from jitgate.store.sqlite import SQLiteStore
from testkit.gateway import REPO

_spec = importlib.util.spec_from_file_location("jitgate_addons_under_test.grants", REPO / "addons/grants.py")
grants_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grants_module)

ALICE = Identity("alice@example.com", ("oidc:developers",), "https://idp.example", "alice", 4e9, {})
BOB = Person("bob@example.com", ("oidc:sre",))


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    (tmp_path / "ca.pem").write_text("x")
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent("""\
        clusters:
          - name: dev
            endpoint: https://api.dev.example
            ca_file: ca.pem
            credential: {token_file: ca.pem}
        identity_providers:
          - issuer: https://idp.example
            client_ids: [jitgate]
        access_rules:
          - name: dev-read
            requesters: [oidc:developers]
            clusters: [dev]
            namespaces: [dev]
            resources: [pods]
            verbs: [get, list]
            duration: {default: 1h, max: 1h}
            approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
        """))
    return path


def flow_for(addon, method: str, path: str):
    """A flow as the steps before grants leave it: identity, cluster and request attributes set."""
    from mitmproxy import ctx

    from jitgate.policy.loader import load_policy_cached

    flow = tflow.tflow()
    flow.request.method, flow.request.path = method, path
    call = call_of(flow)
    call.identity = ALICE
    call.cluster = load_policy_cached(ctx.options.policy).by_name["dev"]
    call.info = parse_request(method, path)
    asyncio.run(addon.request(flow))
    return flow


def test_refusal_discovery_grant_and_store_failure(policy: Path, tmp_path: Path) -> None:
    service = AccessService()
    host, addon = AccessServiceHost(service), grants_module.Grants(service)
    with taddons.context(host, addon) as tctx:
        tctx.configure(host, policy=str(policy), grant_store=str(tmp_path / "grants.db"))
        miss = flow_for(addon, "GET", "/api/v1/namespaces/dev/pods")
        assert miss.response.status_code == 403
        assert b"jitgate request --cluster dev --namespace dev --resource pods" in miss.response.content

        discovery = flow_for(addon, "GET", "/apis")
        assert discovery.response is None and call_of(discovery).decision == "allow"

        store = SQLiteStore(tmp_path / "grants.db")
        rules = service.rules
        request = store.create_request(rules, ALICE, Scope("dev", ("dev",), False, ("pods",), ("get", "list")), now=time.time())
        store.review(rules, request.id, BOB, "approve", "ok", now=time.time())
        store.close()
        time.sleep(service.CHANGE_CHECK_SECONDS)  # another process's change is seen within this
        allowed = flow_for(addon, "GET", "/api/v1/namespaces/dev/pods")
        assert allowed.response is None and call_of(allowed).grant is not None
        wider = flow_for(addon, "GET", "/api/v1/namespaces/prod/pods")
        assert wider.response.status_code == 403

        service.store.close()  # the store goes away under the gateway: fail closed
        time.sleep(service.CHANGE_CHECK_SECONDS)  # cached grants serve at most this long
        broken = flow_for(addon, "GET", "/api/v1/namespaces/dev/pods")
        assert broken.response.status_code == 503
        assert b"grant store" in broken.response.content


def test_a_corrupt_store_stops_the_start(policy: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "grants.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    service = AccessService()
    host = AccessServiceHost(service)
    with taddons.context(host, grants_module.Grants(service)) as tctx:
        tctx.configure(host, policy=str(policy), grant_store=str(tmp_path / "fine.db"))
        with pytest.raises(exceptions.OptionsError, match="cannot open the grant store: .*not a database"):
            tctx.configure(host, grant_store=str(corrupt))


def test_a_held_call_that_times_out_says_what_to_do_and_a_retry_joins_the_same_request(policy: Path, tmp_path: Path) -> None:
    approval = "    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}\n"
    assert approval in policy.read_text()
    policy.write_text(policy.read_text().replace(approval, approval + "    hold: {max_wait: 1s}\n"))
    service = AccessService()
    host, addon = AccessServiceHost(service), grants_module.Grants(service)
    with taddons.context(host, addon) as tctx:
        tctx.configure(host, policy=str(policy), grant_store=str(tmp_path / "grants.db"), hold_poll_interval_ms=50)
        first = flow_for(addon, "GET", "/api/v1/namespaces/dev/pods")
        request_id = call_of(first).annotations["jitgate.dev/held-for-request"]
        message = first.response.content.decode()
        assert first.response.status_code == 403
        assert f"access request {request_id} is still pending after 1s, so this call is refused" in message
        assert "waits for 1 more approval from oidc:sre" in message and "Retry the same call once it is approved" in message
        retry = flow_for(addon, "GET", "/api/v1/namespaces/dev/pods")
        assert call_of(retry).annotations["jitgate.dev/held-for-request"] == request_id  # joined, not filed again
        with SQLiteStore(tmp_path / "grants.db") as store:
            assert [r.id for r in store.list_requests(requester=ALICE.username)] == [request_id]
