"""addons/access_api.py inside mitmproxy's test harness: it answers /jitgate/v1/ calls itself with
the access service it was handed (store work on the service's thread, never the event loop), fails
closed with a Status when the store cannot answer, and leaves every other path untouched."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import textwrap
import threading
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow

from jitgate.access.service import AccessService
from jitgate.chain.flow import call_of
from jitgate.chain.service_host import AccessServiceHost
from jitgate.identity.oidc import Identity
from jitgate.store.sqlite import StoreError
from testkit.gateway import REPO

_spec = importlib.util.spec_from_file_location("jitgate_addons_under_test.access_api", REPO / "addons/access_api.py")
access_api_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(access_api_module)

ALICE = Identity("alice@example.com", ("oidc:developers",), "https://idp.example", "alice", 4e9, {})


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


@pytest.fixture
def served(policy: Path, tmp_path: Path):
    """The API step and the service it is handed, configured as the gateway would."""
    service = AccessService()
    host, addon = AccessServiceHost(service), access_api_module.AccessAPIServer(service)
    with taddons.context(host, addon) as tctx:
        tctx.configure(host, policy=str(policy), grant_store=str(tmp_path / "grants.db"))
        yield service, addon
    if service.store is not None:
        service.store.close()
    service.executor.shutdown(wait=True)


def api_flow(addon, method: str, path: str, identity: Identity | None = ALICE, http_version: str = "HTTP/1.1",
             body: bytes = b"", content_type: str | None = None):
    """A flow as the steps before this one leave it (identity verified), run through the request hook."""
    flow = tflow.tflow()
    flow.request.method, flow.request.path, flow.request.http_version = method, path, http_version
    flow.request.content = body
    if content_type:
        flow.request.headers["Content-Type"] = content_type
    call_of(flow).identity = identity
    asyncio.run(addon.request(flow))
    return flow


@pytest.mark.parametrize("http_version", ["HTTP/1.1", "HTTP/2.0"])
def test_whoami_is_answered_by_the_gateway_on_the_store_thread(served, http_version: str) -> None:
    _, addon = served
    threads = []
    handle = addon.api.handle

    def recording(*args):
        threads.append(threading.current_thread().name)
        return handle(*args)

    addon.api.handle = recording
    flow = api_flow(addon, "GET", "/jitgate/v1/whoami", http_version=http_version)
    assert flow.response.status_code == 200
    assert flow.response.headers["Content-Type"] == "application/json"
    assert flow.response.headers["Cache-Control"] == "no-store"
    me = json.loads(flow.response.content)
    assert (me["username"], me["groups"], me["grants"]) == ("alice@example.com", ["oidc:developers"], [])
    assert [r["name"] for r in me["requestable"]] == ["dev-read"]
    call = call_of(flow)
    assert call.decision == "allow" and call.annotations["jitgate.dev/api"] == "true"
    assert threads and all(name.startswith("jitgate-store") for name in threads)  # never the event loop

    # A refusal of the API itself is a Status, and recorded as a denial for the audit step.
    refused = api_flow(addon, "POST", "/jitgate/v1/requests", body=b'{"cluster": "dev"}', content_type="application/json",
                       http_version=http_version)
    assert refused.response.status_code == 400
    assert json.loads(refused.response.content)["message"] == "field 'resources' is required"
    assert call_of(refused).decision == "deny" and call_of(refused).reason == "field 'resources' is required"


def test_no_token_is_401_and_an_earlier_answer_is_kept(served) -> None:
    _, addon = served
    anonymous = api_flow(addon, "GET", "/jitgate/v1/whoami", identity=None)
    assert anonymous.response.status_code == 401 and json.loads(anonymous.response.content)["kind"] == "Status"
    assert call_of(anonymous).decision == "deny"

    flow = tflow.tflow(resp=True)  # e.g. the identity step already refused a bad token
    flow.request.path = "/jitgate/v1/whoami"
    answered = flow.response
    asyncio.run(addon.request(flow))
    assert flow.response is answered and call_of(flow).annotations["jitgate.dev/api"] == "true"


def test_store_failure_is_503_and_fails_closed(served, tmp_path: Path) -> None:
    service, addon = served
    service.store.close()  # the database goes away under the gateway
    flow = api_flow(addon, "GET", "/jitgate/v1/whoami")
    assert flow.response.status_code == 503
    status = json.loads(flow.response.content)
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "ServiceUnavailable", 503)
    assert "grant store is unavailable" in status["message"] and str(tmp_path) not in status["message"]
    assert call_of(flow).decision == "deny"

    # The service itself failing (not just the store behind the handler): still a 503 Status.
    async def failing(*args):
        raise StoreError("gone")

    service.run = failing
    flow = api_flow(addon, "GET", "/jitgate/v1/whoami")
    assert flow.response.status_code == 503
    assert json.loads(flow.response.content)["reason"] == "ServiceUnavailable"
    assert call_of(flow).decision == "deny"


@pytest.mark.parametrize("path", ["/api/v1/namespaces/dev/pods", "/api/v1/namespaces/jitgate/v1/pods", "/jitgate/v10/whoami",
                                  "/apis/jitgate/v1"])
def test_other_paths_pass_untouched(served, path: str) -> None:
    service, addon = served
    ran = []

    async def run(*args):
        ran.append(args)

    service.run = run
    flow = tflow.tflow()
    flow.request.path = path
    before = flow.request.get_state()
    asyncio.run(addon.request(flow))
    assert flow.response is None and flow.request.get_state() == before
    assert ran == [] and call_of(flow).decision == "" and call_of(flow).annotations == {}
