"""Request targets (issue 7, class 3): a connection serves exactly the cluster it was opened for.

An absolute-form target naming another host (`GET https://other.example/api/...`), in reverse mode
or inside a CONNECT tunnel, and a Host / :authority for another host inside a tunnel, are refused
with 403 and audited as refused; an absolute-form target naming the cluster's own endpoint is
accepted and forwarded in origin-form. Path parameters (`;x=y` in a segment) are refused with 400.
"""

from __future__ import annotations

import json

import pytest
from mitmproxy import http
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow, tutils

from jitgate.chain.flow import call_of
from jitgate.kube.request_target import has_path_parameters, same_host, split_authority
from tests.test_framing import (  # noqa: F401 - fixtures
    MODES,
    alice_token,
    audited_as_refused,
    certs,
    completed,
    h1_request,
    h2_request,
    load_addon,
    seen,
    targets,
)

PODS = "/api/v1/namespaces/dev/pods"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("credential", ["eks", "client_cert"])
@pytest.mark.parametrize("named", ["https://other.example", "https://127.0.0.1:1", "https://{host}:8443",
                                   "https://{host}@other.example", "https://{host}.other.example"])
def test_absolute_form_naming_another_host_is_refused(targets, alice_token, credential, mode, named) -> None:
    target = targets[credential]
    target.standin.clear_seen()
    url = named.format(host=target.host) + PODS
    reply = h1_request(target, mode, "GET", url, alice_token)
    assert reply.status in (400, 403), reply
    if reply.status == 403:
        body = reply.json()
        assert body["kind"] == "Status" and "another host than this cluster" in body["message"]
        assert "other.example" not in body["message"]  # the caller's bytes are not echoed
        assert audited_as_refused(target.gateway, 403, "another host")
    # (a target mitmproxy's reader cannot parse at all is its own 400)
    assert seen(target) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("credential", ["eks", "client_cert"])
def test_absolute_form_naming_the_cluster_is_served_in_origin_form(targets, alice_token, credential, mode) -> None:
    target = targets[credential]
    target.standin.clear_seen()
    # (Inside TLS mitmproxy sets the scheme from the connection, so an `http://<endpoint>` target
    # reads as the endpoint too: the same cluster, over the same verified connection.)
    urls = (f"https://{target.authority}{PODS}", f"https://{target.host.upper()}:{target.port}{PODS}")
    for url in urls:
        reply = h1_request(target, mode, "GET", url, alice_token)
        assert reply.status == 200, (url, reply)
    assert [r["path"] for r in seen(target)] == [PODS, PODS]
    events = completed(target.gateway, lambda e: e["requestURI"] == PODS and e.get("responseStatus", {}).get("code") == 200)
    assert events and events[-1]["objectRef"]["namespace"] == "dev"


@pytest.mark.parametrize("credential", ["eks", "client_cert"])
def test_host_for_another_host_inside_a_tunnel_is_refused(targets, alice_token, credential) -> None:
    target = targets[credential]
    target.standin.clear_seen()
    reply = h1_request(target, "regular", "GET", PODS, alice_token, host="other.example")
    assert reply.status == 403 and "another host" in reply.json()["message"], reply
    reply = h2_request(target, "regular", "GET", PODS, alice_token, authority="other.example")
    assert reply.status == 403 and "another host" in reply.json()["message"], reply
    assert seen(target) == []
    assert audited_as_refused(target.gateway, 403, "another host")
    # The tunnel's own host, with or without the default port, is the cluster.
    assert h1_request(target, "regular", "GET", PODS, alice_token, host=f"{target.host}:{target.port}").status == 200
    assert h2_request(target, "regular", "GET", PODS, alice_token).status == 200


def test_host_in_reverse_mode_names_the_gateway_and_is_not_checked(targets, alice_token) -> None:
    """In reverse mode clients name the gateway (its own hostname); mitmproxy sets the endpoint's."""
    target = targets["client_cert"]
    target.standin.clear_seen()
    assert h1_request(target, "reverse", "GET", PODS, alice_token, host="jitgate.example.com:7443").status == 200
    assert [r["headers"]["Host"] for r in seen(target)] == [target.authority]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", ["h1", "h2"])
@pytest.mark.parametrize("path", ["/api/v1/namespaces/dev;x=y/pods", "/api/v1/namespaces/dev/pods;jsessionid=1",
                                  "/api/v1;/namespaces/dev/pods", "/apis/apps/v1/namespaces/dev/deployments/web;/scale"])
def test_path_parameters_are_refused(targets, alice_token, mode, protocol, path) -> None:
    target = targets["client_cert"]
    target.standin.clear_seen()
    call = h1_request if protocol == "h1" else h2_request
    reply = call(target, mode, "GET", path, alice_token)
    assert reply.status == 400, reply
    body = reply.json()
    assert body["reason"] == "BadRequest" and "path parameter" in body["message"]
    assert seen(target) == []
    assert audited_as_refused(target.gateway, 400, "path parameter")


def test_a_semicolon_in_the_query_is_still_refused_and_an_encoded_one_is_a_name(targets, alice_token) -> None:
    target = targets["client_cert"]
    assert h1_request(target, "reverse", "GET", PODS + "?limit=1;x", alice_token).status == 400
    # %3B is a character of the name as Go and kube read it (and no pod is called that): the cluster's 404.
    assert h1_request(target, "reverse", "GET", PODS + "/web%3Bx", alice_token).status == 404


# --- unit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("authority, expected", [
    ("api.x.test", ("api.x.test", 443)),
    ("API.X.Test:443", ("api.x.test", 443)),
    ("api.x.test:6443", ("api.x.test", 6443)),
    ("[::1]:8443", ("::1", 8443)),
    ("10.0.0.1", ("10.0.0.1", 443)),
    ("", None), ("a:b:c", None), ("host:", ("host", 443)), ("host:99999", None), ("user@host", None),
    ("host:+1", None), ("ho st", None), ("[::1", None), ("[::1]x", None),
])
def test_split_authority(authority, expected) -> None:
    assert split_authority(authority) == expected


def test_same_host_and_path_parameters() -> None:
    assert same_host("api.x.test", "https", ("API.x.test", 443))
    assert not same_host("api.x.test", "http", ("api.x.test", 443))
    assert same_host("api.x.test:80", "http", ("api.x.test", 80))
    assert has_path_parameters(b"/api/v1;x/pods") and has_path_parameters(b"/a;b?c=d")
    assert not has_path_parameters(b"/api/v1/pods?watch=1;x") and not has_path_parameters(b"/a%3Bb")


def flow_for(mode: str, *, authority: bytes = b"", scheme: bytes = b"https", path: bytes = b"/api/v1/namespaces/dev/pods",
             host_header: str | None = "api.x.test", http_version: bytes = b"HTTP/1.1"):
    headers = [(b"Host", host_header.encode())] if host_header is not None else []
    request = tutils.treq(host="api.x.test", port=443, scheme=scheme, authority=authority, path=path,
                          http_version=http_version, headers=http.Headers(headers))
    flow = tflow.tflow(req=request)
    flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse(
        "reverse:https://api.x.test@7443" if mode == "reverse" else "regular")
    return flow


def test_request_attributes_refuses_other_hosts_and_path_parameters() -> None:
    step = load_addon("request_attributes").RequestAttributes()
    with taddons.context(step):
        other = flow_for("reverse", authority=b"other.example")
        step.requestheaders(other)
        assert other.response.status_code == 403 and call_of(other).denied
        assert call_of(other).annotations["jitgate.dev/requested-host"] == "other.example:443"
        assert call_of(other).info is not None and call_of(other).info.namespace == "dev"  # still audited with what was asked

        own = flow_for("reverse", authority=b"api.x.test:443")
        step.requestheaders(own)
        assert own.response is None and own.request.data.authority == b"" and call_of(own).info.resource == "pods"

        plain = flow_for("regular", authority=b"api.x.test", scheme=b"http")
        step.requestheaders(plain)
        assert plain.response.status_code == 403

        tunnel = flow_for("regular", host_header="other.example")
        step.requestheaders(tunnel)
        assert tunnel.response.status_code == 403

        ok = flow_for("regular", host_header="api.x.test:443")
        step.requestheaders(ok)
        assert ok.response is None

        no_host = flow_for("regular", host_header=None)
        step.requestheaders(no_host)
        assert no_host.response.status_code == 400

        h2 = flow_for("regular", authority=b"other.example", host_header=None, http_version=b"HTTP/2.0")
        step.requestheaders(h2)
        assert h2.response.status_code == 403

        params = flow_for("reverse", path=b"/api/v1/namespaces/dev;x=y/pods")
        step.requestheaders(params)
        assert params.response.status_code == 400
        assert "path parameter" in json.loads(params.response.content)["message"]
