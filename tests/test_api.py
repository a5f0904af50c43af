"""The access HTTP API handler over a real SQLite store and rules parsed from policy YAML: every
route, every refusal (with nothing changed in the store), visibility, failing closed, webhook
notifications to a real HTTPS receiver, and docs/openapi.yaml checked against the code that serves
it: the same routes, and for each route the query values, body fields (with their required-ness and
types) and statuses the handler accepts and gives, found by probing it; every answer in these tests
has the documented shape."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import ssl
import textwrap
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec
from ruamel.yaml import YAML

from jitgate.access.model import RequestState
from jitgate.access.rules import AccessRule
from jitgate.api.access_api import (
    API_PREFIX,
    DEFAULT_LIMIT,
    MAX_BODY,
    MAX_LIMIT,
    ROUTES,
    SESSION_ROUTES,
    AccessAPI,
    Route,
    is_api_path,
)
from jitgate.identity.oidc import Identity
from jitgate.notify.webhooks import Notifier, Webhook
from jitgate.policy.access_rules import parse_access_rules
from jitgate.policy.clusters import Cluster, TokenFileCredential
from jitgate.policy.document import Node
from jitgate.policy.loader import _read_file
from jitgate.store.sqlite import SQLiteStore
from testkit.net import TestCA, free_port

REPO = Path(__file__).resolve().parents[1]
DOC = YAML(typ="safe", pure=True).load((REPO / "docs/openapi.yaml").read_text())
T0 = 1_700_000_000.0

RULES_YAML = """
    access_rules:
      - name: dev-read
        requesters: [oidc:developers]
        clusters: [dev]
        namespaces: [dev, "team-*"]
        resources: [pods, pods/log]
        verbs: [get, list, watch]
        duration: {default: 1h, max: 4h}
        approval: {mode: reviewers, reviewers: ["oidc:sre", "oidc:security"], required: 2}
        require_reason: true
        request_ttl: 30m
      - name: staging-auto
        requesters: [oidc:developers]
        clusters: [dev]
        namespaces: [staging]
        resources: [pods]
        verbs: [get, list]
        duration: 1h
        approval: {mode: auto, reviewers: ["oidc:sre"], auto_approve_after: 2m}
      - name: sandbox
        requesters: [oidc:developers]
        clusters: [dev]
        namespaces: [sandbox]
        resources: ["*"]
        verbs: ["*"]
        duration: {default: 1h, max: 8h}
        approval: {mode: immediate}
      - name: prod-exec
        requesters: [oidc:sre]
        clusters: [prod]
        namespaces: [payments]
        resources: [pods, pods/exec]
        verbs: [get, create]
        duration: 30m
        approval: {mode: reviewers, reviewers: ["oidc:security"]}
"""


def person(name: str, *groups: str) -> Identity:
    return Identity(username=f"{name}@example.com", groups=tuple(f"oidc:{g}" for g in groups),
                    issuer="https://idp.example.com", subject=name, expires_at=T0 + 86400)


ERIN = person("erin", "developers")  # requests
ALICE = person("alice", "developers", "sre")  # requests, and reviews dev-read (never her own)
BOB = person("bob", "sre")
CAROL = person("carol", "security")
DAVE = person("dave", "developers")  # neither the requester nor a reviewer of erin's requests

DEV_PODS = {"cluster": "dev", "namespaces": ["dev"], "resources": ["pods", "pods/log"], "verbs": ["get", "list"],
            "duration": "2h", "reason": "INC-42 payments crash-looping"}


def parse_rules(tmp_path: Path) -> tuple[AccessRule, ...]:
    token = tmp_path / "token"
    token.write_text("t")
    clusters = {n: Cluster(n, f"https://{n}.example", f"{n}.example", 443, tmp_path / "ca.pem", TokenFileCredential(token))
                for n in ("dev", "prod")}
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(RULES_YAML).lstrip())
    return parse_access_rules(Node(_read_file(path), path, "").children("access_rules"), clusters)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


# -- checking answers against the OpenAPI document ------------------------------------------------


def _resolve(obj: dict) -> dict:
    while "$ref" in obj:
        node: Any = DOC
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def check_against_doc(route: Route, code: int, body: dict) -> None:
    """The answer is one the document lists for this operation, in the shape it describes."""
    operation = DOC["paths"][route.path][route.method.lower()]
    assert str(code) in operation["responses"], f"{route.method} {route.path} answered {code}, which docs/openapi.yaml does not list"
    schema = _resolve(operation["responses"][str(code)])["content"]["application/json"]["schema"]
    OAS31Validator({**schema, "components": DOC["components"]}).validate(body)


class Harness:
    def __init__(self, store: SQLiteStore, rules: tuple[AccessRule, ...], db: Path, notifier=None) -> None:
        self.store, self.rules, self.db = store, rules, db
        self.clock = Clock()
        self.api = AccessAPI(store, lambda: self.rules, notifier, now=self.clock)

    def call(self, method: str, target: str, body: Any = None, who: Identity | None = ERIN, *,
             raw: bytes | None = None, content_type: str | None = "application/json") -> tuple[int, dict]:
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        code, answer = self.api.handle(method, target, data, who, content_type)
        json.dumps(answer)  # JSON-able, always
        path = target.partition("?")[0]
        segments = path.removeprefix(API_PREFIX).split("/")
        route = next((r for r in ROUTES if r.method == method and r.match(segments)[0]), None) if is_api_path(path) else None
        if route is not None:
            check_against_doc(route, code, answer)
        if code >= 400:
            assert answer["kind"] == "Status" and answer["code"] == code and answer["message"]
        return code, answer

    def ok(self, method: str, target: str, body: Any = None, who: Identity | None = ERIN, expect: int = 200) -> dict:
        code, answer = self.call(method, target, body, who)
        assert code == expect, answer
        return answer

    def snapshot(self) -> dict[str, list[tuple]]:
        db = sqlite3.connect(self.db)
        try:
            return {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in ("requests", "reviews", "grants", "events")}
        finally:
            db.close()


@pytest.fixture
def rules(tmp_path: Path) -> tuple[AccessRule, ...]:
    return parse_rules(tmp_path)


@pytest.fixture
def h(tmp_path: Path, rules):
    db = tmp_path / "state" / "grants.db"
    with SQLiteStore(db) as store:
        yield Harness(store, rules, db)


R = API_PREFIX + "requests"
G = API_PREFIX + "grants"


# -- the document and the router ------------------------------------------------------------------


def test_openapi_document_describes_exactly_the_routes() -> None:
    validate_spec(DOC)
    documented = {(method.upper(), path) for path, item in DOC["paths"].items() for method in item if method != "parameters"}
    # The sessions routes are checked against the document in tests/test_sessions_api.py.
    assert documented == {(r.method, r.path) for r in ROUTES + SESSION_ROUTES}  # query parameters and bodies: below


def test_every_documented_path_is_routed(h: Harness) -> None:
    for path, item in DOC["paths"].items():
        for method in (m for m in item if m != "parameters"):
            concrete = path.replace("{id}", "req-nothere0" if "/requests/" in path else "grant-nothere")
            code, answer = h.call(method.upper(), concrete, {"reason": "r"} if method == "post" else None)
            assert code not in (405, 500) and "not a path" not in answer.get("message", ""), (method, path, answer)


# -- the document checked against the handler that serves it --------------------------------------
# Not a second hand-written list: each check below asks the handler itself (fresh store per probe)
# and compares its answers with docs/openapi.yaml, so a change on either side alone fails here.

SANDBOX_BODY = {"cluster": "dev", "namespaces": ["sandbox"], "cluster_wide": False, "resources": ["pods"], "verbs": ["get"], "reveal": False,
                "duration": "1h", "reason": "probe", "rule": "sandbox"}
# Refusals of the body's shape (the handler's own parsing), as opposed to the policy's refusals.
SHAPE_REFUSAL = re.compile(r"field '[^']+' (is required|must be|appears)|field '[^']+': |unknown field|the request body|takes no request body")
WITNESSES: tuple[Any, ...] = (None, 7, 0, -1, "x", "", "1h", "3600", True, False, [], ["x"], ["get"], [7], {"a": 1})
QUERY_WITNESSES = ("", "bogus", "0", "1", "-1", "1000", "1001", "true", "false", "mine", "reviewable", "all",
                   "pending", "pending,approved", "pending,granted", "approved,denied,expired,cancelled")


def operation(route: Route) -> dict:
    return DOC["paths"][route.path][route.method.lower()]


def schema_valid(schema: dict, value: Any) -> bool:
    return OAS31Validator({**_resolve(schema), "components": DOC["components"]}).is_valid(value)


class Probe:
    """Fresh stores for probing one route: state set up by `scenario`, replaced after any call
    that changed something (refusals change nothing, so they share one)."""

    def __init__(self, tmp_path: Path, rules, route: Route) -> None:
        self.tmp_path, self.rules, self.route = tmp_path, rules, route
        self.made = 0
        self.stores: list[SQLiteStore] = []
        self._reset()

    def _reset(self) -> None:
        self.made += 1
        db = self.tmp_path / f"probe-{self.route.action}-{self.made}" / "grants.db"
        self.stores.append(SQLiteStore(db))
        self.h = Harness(self.stores[-1], self.rules, db)
        self.target, self.who, self.body = scenario(self.h, self.route)

    def call(self, body: Any = None, *, target: str | None = None, who: Identity | None | str = "scenario",
             raw: bytes | None = None, content_type: str | None = "application/json", keep: bool = False) -> tuple[int, dict]:
        who = self.who if who == "scenario" else who
        code, answer = self.h.call(self.route.method, target or self.target, body, who, raw=raw, content_type=content_type)
        if code < 400 and self.route.method != "GET" and not keep:  # it changed something
            self._reset()
        return code, answer

    def close(self) -> None:
        for store in self.stores:
            store.close()


def scenario(h: Harness, route: Route) -> tuple[str, Identity, dict | None]:
    """Set up a store in which one call of `route` succeeds, and give that call: (target, caller,
    body with every field the route takes). List routes get data on which every query value differs."""
    def pending() -> str:  # erin's, under dev-read: bob and carol review it
        return h.ok("POST", R, DEV_PODS, expect=201)["id"]

    def sandbox_grant() -> str:
        return h.ok("POST", R, SANDBOX_BODY, expect=201)["grant"]["id"]

    match route.method, route.template:
        case "GET", "whoami":
            sandbox_grant()
            return API_PREFIX + "whoami", ERIN, None
        case "GET", "requests":
            pending()
            h.ok("POST", R, {"cluster": "prod", "namespaces": ["payments"], "resources": ["pods"], "verbs": ["get"]}, who=BOB,
                 expect=201)  # bob's own, reviewed by carol
            return R, BOB, None
        case "POST", "requests":
            return R, ERIN, dict(SANDBOX_BODY)
        case "GET", "requests/{id}":
            return f"{R}/{pending()}", ERIN, None
        case "POST", "requests/{id}/approve":
            return f"{R}/{pending()}/approve", BOB, {"reason": "seen"}
        case "POST", "requests/{id}/deny":
            return f"{R}/{pending()}/deny", CAROL, {"reason": "not now"}
        case "POST", "requests/{id}/cancel":
            return f"{R}/{pending()}/cancel", ERIN, {"reason": "wrong namespace"}
        case "GET", "grants":
            rid = pending()
            h.ok("POST", f"{R}/{rid}/approve", None, who=BOB)
            h.ok("POST", f"{R}/{rid}/approve", None, who=CAROL)  # erin's grant, under a rule bob reviews
            own = h.ok("POST", R, {"cluster": "prod", "namespaces": ["payments"], "resources": ["pods"], "verbs": ["get"]},
                       who=BOB, expect=201)["id"]
            gid = h.ok("POST", f"{R}/{own}/approve", None, who=CAROL)["grant"]["id"]
            h.ok("POST", f"{G}/{gid}/revoke", {"reason": "done"}, who=BOB)  # bob's, no longer active
            return G, BOB, None
        case "GET", "grants/{id}":
            return f"{G}/{sandbox_grant()}", ERIN, None
        case "POST", "grants/{id}/revoke":
            return f"{G}/{sandbox_grant()}/revoke", ERIN, {"reason": "done"}
    raise AssertionError(f"no probe scenario for {route.method} {route.path}: add one here")


class Exploding:
    """A store with a bug: every method raises something unexpected."""

    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            raise RuntimeError("a bug")
        return fail


@pytest.fixture
def probes(tmp_path: Path, rules):
    made: list[Probe] = []

    def make(route: Route) -> Probe:
        made.append(Probe(tmp_path, rules, route))
        return made[-1]

    yield make
    for probe in made:
        probe.close()


def statuses_given(probe: Probe) -> set[int]:
    """Every status the handler gives for this route, from one call per way an answer can arise."""
    route = probe.route
    seen = {probe.call(probe.body, keep=True)[0], probe.call(probe.body)[0]}  # succeeds; then again (already decided?)
    seen.add(probe.call(probe.body, who=None)[0])  # no token
    seen.add(probe.call(probe.body, who=Identity("system:admin", (), "https://idp.example.com", "x", T0 + 60))[0])
    seen.add(probe.call(probe.body, target=probe.target + "?nosuch=1")[0])  # a query the route does not take
    seen.add(probe.call(raw=b'{"reason": "' + b"x" * MAX_BODY + b'"}')[0])  # too large, on any route
    if route.body is not None:
        seen.add(probe.call(raw=json.dumps(probe.body).encode(), content_type="text/plain")[0])
    if "{id}" in route.template:
        segments = probe.target.removeprefix(API_PREFIX).split("/")
        segments[1] = "req-nothere0" if segments[0] == "requests" else "grant-nothere"
        seen.add(probe.call(probe.body, target=API_PREFIX + "/".join(segments))[0])
    probe.h.api.store = Exploding()
    seen.add(probe.call(probe.body)[0])
    probe.h.store.close()
    probe.h.api.store = probe.h.store
    seen.add(probe.call(probe.body)[0])  # the store is gone: fail closed
    return seen


def test_documented_statuses_are_exactly_those_the_handler_gives(probes) -> None:
    for route in ROUTES:
        documented = {int(code) for code in operation(route)["responses"]}
        assert statuses_given(probes(route)) == documented, f"{route.method} {route.path}"


def test_documented_query_parameters_match_what_the_handler_accepts(probes) -> None:
    assert DOC["components"]["parameters"]["limit"]["schema"] == {
        "type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}
    for route in ROUTES:
        params = [_resolve(p) for p in operation(route).get("parameters", ()) if _resolve(p)["in"] == "query"]
        assert {p["name"] for p in params} == route.query, route
        if not params:
            continue
        probe = probes(route)
        for param in params:
            name, schema = param["name"], param["schema"]
            for text in QUERY_WITNESSES:
                if schema.get("type") == "integer":
                    value: Any = int(text) if re.fullmatch(r"-?[0-9]+", text) else text
                elif schema.get("type") == "array":
                    assert (param.get("style"), param.get("explode")) == ("form", False), param
                    value = text.split(",")
                else:
                    value = text
                code, answer = probe.call(target=f"{probe.target}?{urlencode({name: text})}")
                assert (code != 400) == schema_valid(schema, value), (route.path, name, text, answer)
            if "enum" in schema:
                # The values the handler names when refusing one are the documented ones...
                message = probe.call(target=f"{probe.target}?{name}=bogus")[1]["message"]
                assert re.search(r"must be one of (.*), not", message).group(1).split(", ") == schema["enum"], message
                # ...and leaving the parameter out is the documented default, on data where the values differ.
                answers = {v: probe.call(target=f"{probe.target}?{name}={v}")[1] for v in schema["enum"]}
                assert probe.call()[1] == answers[schema["default"]], (route.path, name)
                assert len({json.dumps(a, sort_keys=True) for a in answers.values()}) == len(answers), (route.path, name)
            if schema.get("type") == "array":
                assert set(schema["items"]["enum"]) == {str(s) for s in RequestState}


def test_documented_request_bodies_match_what_the_handler_accepts(probes) -> None:
    for route in ROUTES:
        op = operation(route)
        if route.body is None:
            assert "requestBody" not in op, route
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert set(_resolve(schema)["properties"]) == route.body and _resolve(schema)["additionalProperties"] is False
        probe = probes(route)
        assert set(probe.body) == route.body, "the scenario's call must carry every field the route takes"
        assert schema_valid(schema, probe.body) and probe.call(probe.body)[0] < 300
        # No body at all: refused exactly when the document says a body is required.
        code, answer = probe.call(raw=b"")
        assert (code < 300) == (not op["requestBody"].get("required", False)), (route.path, answer)
        for field in sorted(route.body):
            # Left out: refused exactly when the document says it is required (or the rest needs it).
            without = {k: v for k, v in probe.body.items() if k != field}
            code, answer = probe.call(without)
            assert (code < 300) == schema_valid(schema, without), (route.path, field, answer)
            # Any value: one the document allows is never refused for its shape, and one it does not
            # allow is refused (by the handler's parsing, or by the policy's checks).
            for value in WITNESSES:
                body = {**probe.body, field: value}
                code, answer = probe.call(body)
                if schema_valid(schema, body):
                    assert not (code == 400 and SHAPE_REFUSAL.match(answer["message"])), (route.path, field, value, answer)
                else:
                    assert code == 400, (route.path, field, value, answer)


def test_routing_and_authentication(h: Harness) -> None:
    assert is_api_path("/jitgate/v1/whoami") and is_api_path("/jitgate/v1/requests?scope=mine")
    assert not is_api_path("/api/v1/namespaces/jitgate/v1/pods") and not is_api_path("/jitgate/v10/whoami")
    code, answer = h.call("GET", API_PREFIX + "nothing")
    assert (code, answer["reason"]) == (404, "NotFound") and "not a path of the jitgate access API" in answer["message"]
    code, answer = h.call("DELETE", R)
    assert (code, answer["message"]) == (405, "method DELETE is not allowed on /jitgate/v1/requests (allowed: GET, POST)")
    code, answer = h.call("GET", API_PREFIX + "requests/req-1/approve")
    assert code == 405 and "allowed: POST" in answer["message"]
    code, answer = h.call("GET", API_PREFIX + "whoami", who=None)
    assert (code, answer["reason"]) == (401, "Unauthorized") and "OIDC ID token" in answer["message"]
    code, answer = h.call("GET", API_PREFIX + "whoami", who=Identity("system:jitgate", (), "https://idp.example.com", "x", T0 + 60))
    assert code == 403 and "reserved" in answer["message"]
    code, answer = h.call("GET", API_PREFIX + "whoami", who=Identity("mallory", ("system:masters",), "https://i", "m", T0 + 60))
    assert code == 403 and "system:masters" in answer["message"]


# -- the workflow ---------------------------------------------------------------------------------


def test_request_two_approvals_grant_whoami_revoke(h: Harness) -> None:
    created = h.ok("POST", R, DEV_PODS, expect=201)
    rid = created["id"]
    assert created["state"] == "pending" and created["rule"] == "dev-read" and created["duration_seconds"] == 7200
    assert (created["approval_mode"], created["approvals_required"], created["approvals"]) == ("reviewers", 2, 0)
    assert created["scope"] == {"cluster": "dev", "namespaces": ["dev"], "cluster_wide": False,
                                "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}

    # Who sees it where.
    assert [r["id"] for r in h.ok("GET", R)["items"]] == [rid]
    assert [r["id"] for r in h.ok("GET", R + "?scope=reviewable", who=BOB)["items"]] == [rid]
    assert [r["id"] for r in h.ok("GET", R + "?scope=reviewable&state=pending", who=CAROL)["items"]] == [rid]
    assert h.ok("GET", R + "?scope=reviewable&state=approved", who=CAROL)["items"] == []
    assert h.ok("GET", R + "?scope=reviewable")["items"] == []  # erin reviews nothing
    assert h.ok("GET", R, who=BOB)["items"] == []  # bob's own: none

    h.clock.now += 60
    partial = h.ok("POST", f"{R}/{rid}/approve", {"reason": "saw the incident"}, who=BOB)
    assert partial["state"] == "pending" and partial["approvals"] == 1 and partial["reviews"][0]["reviewer"] == "bob@example.com"
    assert h.ok("GET", R + "?scope=reviewable", who=BOB)["items"] == []  # already reviewed by bob
    h.clock.now += 60
    approved = h.ok("POST", f"{R}/{rid}/approve", None, who=CAROL)  # no body: no reason
    grant = approved["grant"]
    assert approved["state"] == "approved" and approved["decided_by"] == "carol@example.com" and approved["approvals"] == 2
    assert (grant["state"], grant["username"], grant["scope"]) == ("active", "erin@example.com", created["scope"])

    detail = h.ok("GET", f"{R}/{rid}", who=BOB)
    assert [e["kind"] for e in detail["events"]] == ["request.created", "review.approved", "review.approved", "request.approved"]
    assert h.ok("GET", f"{R}/{rid}")["grant"]["id"] == grant["id"]  # the requester sees it too

    me = h.ok("GET", API_PREFIX + "whoami")
    assert (me["username"], me["groups"]) == ("erin@example.com", ["oidc:developers"])
    assert [g["id"] for g in me["grants"]] == [grant["id"]] and me["grants"][0]["active"] is True
    assert [r["name"] for r in me["requestable"]] == ["dev-read", "staging-auto", "sandbox"] and me["reviews"] == []
    assert h.ok("GET", API_PREFIX + "whoami", who=BOB)["reviews"] == ["dev-read", "staging-auto"]
    assert h.ok("GET", API_PREFIX + "whoami", who=BOB)["requestable"][0]["name"] == "prod-exec"

    assert [g["id"] for g in h.ok("GET", G + "?active=true")["items"]] == [grant["id"]]
    assert [g["id"] for g in h.ok("GET", G + "?scope=all", who=CAROL)["items"]] == [grant["id"]]
    assert h.ok("GET", f"{G}/{grant['id']}", who=BOB)["id"] == grant["id"]

    h.clock.now += 60
    revoked = h.ok("POST", f"{G}/{grant['id']}/revoke", {"reason": "incident over"}, who=BOB)
    assert (revoked["state"], revoked["revoked_by"], revoked["revoke_reason"], revoked["active"]) == \
        ("revoked", "bob@example.com", "incident over", False)
    assert h.ok("GET", G + "?active=true")["items"] == [] and len(h.ok("GET", G)["items"]) == 1
    assert h.ok("GET", API_PREFIX + "whoami")["grants"] == []
    assert h.store.active_grants_for("erin@example.com", "dev", h.clock.now) == ()


def test_immediate_auto_deny_cancel_and_listing(h: Harness) -> None:
    sandbox = h.ok("POST", R, {"cluster": "dev", "namespaces": ["sandbox"], "resources": ["*"], "verbs": ["delete"],
                               "duration": 5400}, expect=201)
    assert sandbox["state"] == "approved" and sandbox["decided_by"] == "system:jitgate" and sandbox["approvals_required"] is None
    assert sandbox["grant"]["ends_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 5400))

    auto = h.ok("POST", R, {"cluster": "dev", "namespaces": ["staging"], "resources": ["pods"], "verbs": ["get"]}, expect=201)
    assert (auto["state"], auto["approval_mode"], auto["approvals_required"], auto["duration"]) == ("pending", "auto", None, "1h")
    assert auto["auto_approve_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 120))

    h.clock.now += 1
    denied = h.ok("POST", f"{R}/{auto['id']}/deny", {"reason": "not during the freeze"}, who=BOB)
    assert (denied["state"], denied["decision_reason"]) == ("denied", "not during the freeze")

    pending = h.ok("POST", R, dict(DEV_PODS, duration="30m"), expect=201)
    h.clock.now += 1
    cancelled = h.ok("POST", f"{R}/{pending['id']}/cancel", {}, who=ERIN)
    assert cancelled["state"] == "cancelled" and cancelled["decided_by"] == "erin@example.com"

    states = [r["state"] for r in h.ok("GET", R)["items"]]
    assert states == ["cancelled", "denied", "approved"]  # newest first
    assert [r["state"] for r in h.ok("GET", R + "?state=approved,denied")["items"]] == ["denied", "approved"]
    assert len(h.ok("GET", R + "?limit=1")["items"]) == 1
    # scope=all: what a reviewer may see; sandbox (reviewed by nobody) stays the requester's.
    assert {r["rule"] for r in h.ok("GET", R + "?scope=all", who=BOB)["items"]} == {"dev-read", "staging-auto"}
    assert {r["rule"] for r in h.ok("GET", R + "?scope=all", who=CAROL)["items"]} == {"dev-read"}
    code, answer = h.call("GET", R + "?scope=all", who=DAVE)
    assert code == 403 and "you review none" in answer["message"]
    code, answer = h.call("GET", G + "?scope=all", who=DAVE)
    assert code == 403


def test_others_cannot_see_or_touch(h: Harness) -> None:
    rid = h.ok("POST", R, DEV_PODS, expect=201)["id"]
    sandbox = h.ok("POST", R, {"cluster": "dev", "namespaces": ["sandbox"], "resources": ["pods"], "verbs": ["get"]}, expect=201)
    gid = sandbox["grant"]["id"]
    before = h.snapshot()
    unseen = [
        ("GET", f"{R}/{rid}", None, DAVE),
        ("POST", f"{R}/{rid}/approve", {}, DAVE),
        ("POST", f"{R}/{rid}/deny", {"reason": "no"}, DAVE),
        ("POST", f"{R}/{rid}/cancel", {}, DAVE),
        ("GET", f"{R}/{sandbox['id']}", None, BOB),  # the sandbox rule has no reviewers
        ("GET", f"{G}/{gid}", None, BOB),
        ("POST", f"{G}/{gid}/revoke", {"reason": "x"}, CAROL),
    ]
    for method, target, body, who in unseen:
        code, answer = h.call(method, target, body, who)
        assert code == 404, (target, answer)
        assert "that you can see" in answer["message"]
    # ...answered exactly like ids that do not exist.
    assert h.call("GET", f"{R}/req-doesnotexist", who=DAVE)[1]["message"].replace("req-doesnotexist", rid) == \
        h.call("GET", f"{R}/{rid}", who=DAVE)[1]["message"]
    assert h.call("GET", f"{R}/REQ..%2F", who=DAVE)[0] == 404
    assert h.ok("GET", R, who=DAVE)["items"] == [] and h.ok("GET", G, who=DAVE)["items"] == []
    assert h.snapshot() == before


# -- refusals change nothing ----------------------------------------------------------------------


def test_bad_input_is_refused_and_changes_nothing(h: Harness) -> None:
    rid = h.ok("POST", R, DEV_PODS, expect=201)["id"]
    h.ok("POST", f"{R}/{rid}/approve", {}, who=BOB)
    mine = h.ok("POST", R, dict(DEV_PODS, namespaces=["team-a"]), who=ALICE, expect=201)["id"]
    cancelled = h.ok("POST", R, dict(DEV_PODS, namespaces=["team-b"]), expect=201)["id"]
    h.ok("POST", f"{R}/{cancelled}/cancel", {"reason": "wrong namespace"})
    gid = h.ok("POST", R, {"cluster": "dev", "namespaces": ["sandbox"], "resources": ["pods"], "verbs": ["get"],
                           "duration": "1h"}, expect=201)["grant"]["id"]
    before = h.snapshot()

    cases: list[tuple[str, str, Any, Identity, int, str]] = [
        # scope and policy
        ("POST", R, dict(DEV_PODS, cluster="nope"), ERIN, 400, "no access rule covers"),
        ("POST", R, dict(DEV_PODS, namespaces=["kube-system"]), ERIN, 400, "no access rule covers"),
        ("POST", R, dict(DEV_PODS, resources=["secrets"]), ERIN, 400, "no access rule covers"),
        ("POST", R, dict(DEV_PODS, resources=["deployments"]), ERIN, 400, "write deployments.apps"),
        ("POST", R, dict(DEV_PODS, verbs=["get", "sudo"]), ERIN, 400, "unknown verb 'sudo'"),
        ("POST", R, {"cluster": "prod", "namespaces": ["payments"], "resources": ["pods/exec"], "verbs": ["create"]}, ERIN, 403,
         "no access rule lets groups [oidc:developers] request"),
        ("POST", R, dict(DEV_PODS, duration="5h"), ERIN, 400, "duration 5h is above the maximum 4h of access rule 'dev-read'"),
        ("POST", R, dict(DEV_PODS, duration=4 * 3600 + 1), ERIN, 400, "above the maximum 4h"),
        ("POST", R, dict(DEV_PODS, duration=0), ERIN, 400, "positive number of seconds"),
        ("POST", R, dict(DEV_PODS, duration="soon"), ERIN, 400, "invalid duration 'soon'"),
        ("POST", R, {k: v for k, v in DEV_PODS.items() if k != "reason"}, ERIN, 400, "requires a reason"),
        ("POST", R, dict(DEV_PODS, rule="nope"), ERIN, 400, "there is no access rule named 'nope'"),
        ("POST", R, dict(DEV_PODS, namespaces=[], cluster_wide=False), ERIN, 400, "name at least one namespace"),
        # the JSON itself
        ("POST", R, {**DEV_PODS, "admin": True}, ERIN, 400, "unknown field(s) 'admin'"),
        ("POST", R, dict(DEV_PODS, namespaces="dev"), ERIN, 400, "field 'namespaces' must be a list of strings"),
        ("POST", R, dict(DEV_PODS, cluster_wide="yes"), ERIN, 400, "field 'cluster_wide' must be true or false"),
        ("POST", R, dict(DEV_PODS, cluster=7), ERIN, 400, "field 'cluster' must be a string"),
        ("POST", R, dict(DEV_PODS, duration=True), ERIN, 400, "field 'duration' must be a duration"),
        ("POST", R, {k: v for k, v in DEV_PODS.items() if k != "verbs"}, ERIN, 400, "field 'verbs' is required"),
        ("POST", R, [DEV_PODS], ERIN, 400, "must be a JSON object"),
        # reviews
        ("POST", f"{R}/{mine}/approve", {}, ALICE, 403, f"you cannot review your own request {mine}"),
        ("POST", f"{R}/{rid}/approve", {}, BOB, 409, f"you already approved request {rid}"),
        ("POST", f"{R}/{rid}/deny", {"reason": "changed my mind"}, BOB, 409, f"you already approved request {rid}"),
        ("POST", f"{R}/{rid}/approve", {}, DAVE, 404, "that you can see"),
        ("POST", f"{R}/{cancelled}/approve", {}, BOB, 409, f"request {cancelled} is already cancelled"),
        ("POST", f"{R}/{rid}/deny", {}, CAROL, 400, "a reason for the denial is required"),
        ("POST", f"{R}/{rid}/deny", {"reason": "two\nlines"}, CAROL, 400, "one line of printable text"),
        ("POST", f"{R}/{rid}/cancel", {}, BOB, 403, "only erin@example.com, who made request"),
        ("POST", f"{R}/{rid}/approve", {"reason": 5}, CAROL, 400, "field 'reason' must be a string"),
        ("POST", f"{R}/{rid}/approve", {"decision": "approve"}, CAROL, 400, "unknown field(s) 'decision'"),
        ("POST", f"{G}/{gid}/revoke", {}, ERIN, 400, "a reason for the revocation is required"),
        # queries
        ("GET", R + "?scope=everyone", None, ERIN, 400, "query parameter 'scope' must be one of mine, reviewable, all"),
        ("GET", R + "?state=pending,granted", None, ERIN, 400, "unknown request state 'granted'"),
        ("GET", R + "?sort=age", None, ERIN, 400, "unknown query parameter 'sort'"),
        ("GET", R + "?scope=mine&scope=all", None, ERIN, 400, "given more than once"),
        ("GET", R + "?limit=0", None, ERIN, 400, "'limit' must be a number from 1 to 1000"),
        ("GET", G + "?active=yes", None, ERIN, 400, "query parameter 'active' must be one of true, false"),
        ("GET", API_PREFIX + "whoami?verbose=1", None, ERIN, 400, "unknown query parameter 'verbose'"),
    ]
    for case in cases:
        method, target, body, who, code, message = case
        got, answer = h.call(method, target, body, who)
        assert (got, message in answer["message"]) == (code, True), (case, answer)

    raw_cases: list[tuple[str, bytes, str | None, int, str]] = [
        (R, b'{"cluster": "dev",', "application/json", 400, "the request body is not valid JSON: Expecting"),
        (R, b'{"cluster": "dev", "cluster": "prod"}', "application/json", 400, "field 'cluster' appears more than once"),
        (R, b'{"duration": NaN}', "application/json", 400, "NaN is not a JSON number"),
        (R, b'\xff\xfe{}', "application/json", 400, "not UTF-8"),
        (R, json.dumps(DEV_PODS).encode(), "application/x-www-form-urlencoded", 415, "must be JSON"),
        (R, json.dumps(DEV_PODS).encode(), None, 415, "must be JSON"),
        (R, json.dumps(DEV_PODS).encode(), "application/json; charset=latin-1", 415, "UTF-8"),
        (R, b'{"reason": "' + b"x" * MAX_BODY + b'"}', "application/json", 413, "larger than 64 KiB"),
        (f"{R}/{rid}/approve", b"[1, 2]", "application/json", 400, "must be a JSON object"),
    ]
    for target, raw, content_type, code, message in raw_cases:
        got, answer = h.call("POST", target, who=CAROL, raw=raw, content_type=content_type)
        assert (got, message in answer["message"]) == (code, True), (raw[:40], answer)
    got, answer = h.call("GET", R, raw=b'{"scope": "all"}')
    assert got == 400 and "takes no request body" in answer["message"]

    assert h.snapshot() == before

    # Time passes: the request and the grant are past their ends, and still nothing changes.
    h.clock.now += 3 * 3600
    for method, target, body, who, code, message in [
        ("POST", f"{R}/{rid}/approve", {}, CAROL, 409, f"request {rid} expired at"),
        ("POST", f"{G}/{gid}/revoke", {"reason": "late"}, ERIN, 409, f"grant {gid} is expired, not active"),
    ]:
        got, answer = h.call(method, target, body, who)
        assert (got, message in answer["message"]) == (code, True), answer
    assert h.snapshot() == before


def test_json_content_type_parameters_and_duration_forms(h: Harness) -> None:
    body = json.dumps(dict(DEV_PODS, duration="90m")).encode()
    code, answer = h.call("POST", R, raw=body, content_type="Application/JSON; charset=UTF-8")
    assert code == 201 and answer["duration"] == "1h30m"
    code, answer = h.call("POST", R, dict(DEV_PODS, duration="3600"))
    assert code == 201 and answer["duration_seconds"] == 3600
    code, answer = h.call("POST", R, dict(DEV_PODS, duration=None, verbs="get,list".split(","), resources=["pods"]))
    assert code == 201 and answer["duration"] == "1h"  # the rule's default
    code, answer = h.call("POST", R, {"cluster": "dev", "namespaces": ["sandbox"], "resources": ["*"], "verbs": ["*"]})
    assert code == 201 and answer["scope"]["verbs"] == ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]


# -- failing closed -------------------------------------------------------------------------------


def test_store_unavailable_fails_closed(tmp_path: Path, rules) -> None:
    db = tmp_path / "grants.db"
    store = SQLiteStore(db)
    h = Harness(store, rules, db)
    rid = h.ok("POST", R, DEV_PODS, expect=201)["id"]
    gid = h.ok("POST", R, {"cluster": "dev", "namespaces": ["sandbox"], "resources": ["pods"], "verbs": ["get"]}, expect=201)["grant"]["id"]

    # A record that no longer decodes: every read that touches it fails, never a guess.
    raw = sqlite3.connect(db)
    raw.execute("UPDATE grants SET scope = '{\"cluster\": \"dev\", \"verbs\": \"bogus\"}'")
    raw.commit()
    raw.close()
    for method, target, body in [("GET", API_PREFIX + "whoami", None), ("GET", f"{G}/{gid}", None),
                                 ("POST", f"{G}/{gid}/revoke", {"reason": "x"})]:
        code, answer = h.call(method, target, body)
        assert (code, answer["reason"]) == (503, "ServiceUnavailable"), answer
        assert "grant store is unavailable" in answer["message"] and "fail closed" in answer["message"]
        assert str(db) not in answer["message"]  # internals stay in the gateway's log

    store.close()
    before = h.snapshot()
    for method, target, body, who in [("GET", API_PREFIX + "whoami", None, ERIN), ("POST", R, DEV_PODS, ERIN),
                                      ("GET", R + "?scope=reviewable", None, BOB), ("POST", f"{R}/{rid}/approve", {}, BOB),
                                      ("POST", f"{R}/{rid}/cancel", {}, ERIN)]:
        code, answer = h.call(method, target, body, who)
        assert code == 503 and "grant store is unavailable" in answer["message"], answer
    assert h.snapshot() == before


# -- notifications --------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver over TLS and the notifier, both on an event loop in a thread of their own
    (the gateway runs the handler in a worker thread, the notifier in its loop)."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.port = free_port()
        self.events: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-webhook-receiver", daemon=True)
        self.notifier: Notifier | None = None
        self.runner: web.AppRunner | None = None

    def start(self) -> Notifier:
        cert, key = self.ca.issue("api-webhook", hosts=["127.0.0.1"])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.notifier = Notifier([Webhook(f"https://127.0.0.1:{self.port}/hook", ca_file=self.ca.cert_path, timeout=5, backoff=0.05)])
        self.thread.start()
        self._run(self._start(context))
        return self.notifier

    async def _start(self, context: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=context).start()
        self.notifier.start()

    async def _receive(self, request: web.Request) -> web.Response:
        self.events.append(await request.json())
        return web.Response(status=204)

    def _run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def wait_for(self, count: int) -> list[dict]:
        deadline = time.monotonic() + 10
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.events)

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.notifier.close(2)
            await self.runner.cleanup()

        self._run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_notifications_for_new_requests_and_decisions(tmp_path: Path, rules, ca: TestCA) -> None:
    receiver = Receiver(ca)
    notifier = receiver.start()
    try:
        with SQLiteStore(tmp_path / "grants.db") as store:
            h = Harness(store, rules, tmp_path / "grants.db", notifier)
            rid = h.ok("POST", R, DEV_PODS, expect=201)["id"]
            h.ok("POST", f"{R}/{rid}/approve", {"reason": "seen"}, who=BOB)  # 1 of 2: no notification
            approved = h.ok("POST", f"{R}/{rid}/approve", {"reason": "fine"}, who=CAROL)
            other = h.ok("POST", R, dict(DEV_PODS, namespaces=["team-a"]), expect=201)["id"]
            h.ok("POST", f"{R}/{other}/deny", {"reason": "not now"}, who=BOB)
            third = h.ok("POST", R, dict(DEV_PODS, namespaces=["team-b"]), expect=201)["id"]
            h.ok("POST", f"{R}/{third}/cancel", {})
            h.ok("POST", R, {"cluster": "dev", "namespaces": ["sandbox"], "resources": ["pods"], "verbs": ["get"]}, expect=201)
            h.ok("POST", f"{G}/{approved['grant']['id']}/revoke", {"reason": "done"}, who=CAROL)
            # Refusals notify nobody.
            assert h.call("POST", f"{R}/{rid}/approve", {}, who=BOB)[0] == 409
            events = receiver.wait_for(8)
    finally:
        receiver.stop()

    kinds = [(e["type"].removeprefix("access_request."), e["request"]["id"]) for e in events]
    assert kinds[:7] == [("created", rid), ("approved", rid), ("created", other), ("denied", other),
                         ("created", third), ("cancelled", third), ("approved", kinds[6][1])]
    assert kinds[7:] == [("revoked", rid)] and notifier.stats.failed == 0
    created, approved_event = events[0], events[1]
    assert created["actor"] == {"username": "erin@example.com"}
    assert created["request"] | {"created_at": None, "expires_at": None} == {
        "id": rid, "requester": "erin@example.com", "rule": "dev-read", "cluster": "dev", "namespaces": ["dev"],
        "cluster_wide": False, "resources": ["pods", "pods/log"], "verbs": ["get", "list"], "duration_seconds": 7200,
        "reason": "INC-42 payments crash-looping", "state": "pending", "approvals": [], "required": 2,
        "created_at": None, "expires_at": None,
    }
    assert created["links"]["approve_command"] == f"jitgate approve {rid}"
    assert approved_event["actor"] == {"username": "carol@example.com"} and approved_event["reason"] == "fine"
    assert [a["reviewer"] for a in approved_event["request"]["approvals"]] == ["bob@example.com", "carol@example.com"]
    assert approved_event["request"]["expires_at"] == approved["grant"]["ends_at"].replace("Z", ".000Z")  # when access ends
    assert events[6]["actor"] is None and events[6]["request"]["state"] == "approved"  # immediate: the gateway decided
    assert events[7]["request"]["state"] == "revoked" and events[7]["reason"] == "done"


def test_an_operation_request_shows_its_operation_and_permit(h: Harness) -> None:
    from jitgate.access.model import Operation
    from jitgate.access.scope import Scope

    op = Operation("a" * 64, "DELETE", "/api/v1/namespaces/dev/pods/api", "delete pods api in namespace dev on cluster dev",
                   "prod-delete", required=1)
    _, request = h.store.operation_request(h.rules, ERIN, Scope("dev", ("dev",), False, ("pods",), ("get",)), op,
                                           now=h.clock.now, rule_name="dev-read")
    listed = h.ok("GET", R + "?scope=reviewable", who=BOB)["items"]  # checked against docs/openapi.yaml
    assert [r["id"] for r in listed] == [request.id] and listed[0]["operation"] == op.to_dict()
    assert (listed[0]["approvals_required"], listed[0]["permit"], listed[0]["grant"]) == (1, None, None)
    approved = h.ok("POST", f"{R}/{request.id}/approve", None, who=BOB)
    assert approved["state"] == "approved" and approved["grant"] is None and approved["permit"]["used"] is False
    detail = h.ok("GET", f"{R}/{request.id}")
    assert detail["events"][-1]["kind"] == "request.approved"


REVEAL_RULES_YAML = """
    access_rules:
      - name: secrets-read
        requesters: [oidc:developers]
        clusters: [dev]
        namespaces: [dev]
        resources: [secrets]
        verbs: [get, list]
        duration: 1h
        approval: {mode: reviewers, reviewers: ["oidc:sre"]}
      - name: secrets-reveal
        requesters: [oidc:developers]
        clusters: [dev]
        namespaces: [dev]
        resources: [secrets]
        verbs: [get]
        duration: 30m
        reveal: true
        approval: {mode: reviewers, reviewers: ["oidc:security"]}
"""


def test_reveal_is_asked_for_and_granted_only_under_a_rule_that_allows_it(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    cluster = {"dev": Cluster("dev", "https://dev.example", "dev.example", 443, tmp_path / "ca.pem", TokenFileCredential(tmp_path / "token"))}
    path = tmp_path / "reveal.yaml"
    path.write_text(textwrap.dedent(REVEAL_RULES_YAML).lstrip())
    rules = parse_access_rules(Node(_read_file(path), path, "").children("access_rules"), cluster)
    db = tmp_path / "state" / "grants.db"
    with SQLiteStore(db) as store:
        h = Harness(store, rules, db)
        body = {"cluster": "dev", "namespaces": ["dev"], "resources": ["secrets"], "verbs": ["get"]}
        # Without `reveal`, the first rule that fits takes it and the grant masks.
        plain = h.ok("POST", R, body, expect=201)
        assert plain["rule"] == "secrets-read" and "reveal" not in plain["scope"]
        # With it, only the reveal rule can: its reviewers decide, and the grant says reveal.
        asked = h.ok("POST", R, {**body, "reveal": True}, expect=201)
        assert asked["rule"] == "secrets-reveal" and asked["scope"]["reveal"] is True
        code, refused = h.call("POST", R, {**body, "reveal": True, "rule": "secrets-read"})
        assert code == 403 and "revealing secret values is not allowed" in refused["message"]
        code, bad = h.call("POST", R, {**body, "reveal": "yes"})
        assert code == 400 and "'reveal' must be true or false" in bad["message"]
        approved = h.ok("POST", f"{R}/{asked['id']}/approve", {"reason": "incident 7"}, who=CAROL)
        assert approved["grant"]["scope"]["reveal"] is True
        grants = h.store.active_grants_for("erin@example.com", "dev", h.clock.now)
        assert [g.scope.reveal for g in grants] == [True]


def test_audit_annotations_name_the_request_grant_scope_reason_and_outcome(h: Harness) -> None:
    from jitgate.api.access_api import audit_annotations

    def annotated(method: str, target: str, body=None, who=ERIN) -> dict[str, str]:
        raw = b"" if body is None else json.dumps(body).encode()
        code, answer = h.call(method, target, body, who)
        return audit_annotations(method, target, raw, code, answer)

    created = annotated("POST", R, {**DEV_PODS, "reason": "INC-7 payments"})
    rid = created["jitgate.dev/api-access-request"]
    assert created["jitgate.dev/api-action"] == "create_request" and created["jitgate.dev/api-outcome"] == "request pending"
    assert created["jitgate.dev/api-reason"] == "INC-7 payments"
    assert created["jitgate.dev/scope"] == "get, list pods, pods/log in namespace dev on cluster dev"
    annotated("POST", f"{R}/{rid}/approve", {"reason": "ok"}, who=BOB)
    approved = annotated("POST", f"{R}/{rid}/approve", {"reason": "seen it"}, who=CAROL)
    grant = approved["jitgate.dev/api-grant"]
    assert approved["jitgate.dev/api-outcome"] == "request approved, grant active" and approved["jitgate.dev/api-reason"] == "seen it"
    revoked = annotated("POST", f"{G}/{grant}/revoke", {"reason": "done"}, who=BOB)
    assert (revoked["jitgate.dev/api-action"], revoked["jitgate.dev/api-outcome"], revoked["jitgate.dev/api-access-request"]) == \
        ("revoke", "grant revoked", rid)
    refused = annotated("POST", f"{R}/{rid}/approve", {"reason": "again"}, who=BOB)
    assert refused["jitgate.dev/api-outcome"].startswith("refused 409") and refused["jitgate.dev/api-access-request"] == rid
    assert annotated("GET", API_PREFIX + "whoami")["jitgate.dev/api-outcome"] == "answered 200"
