"""RequestInfo parsing, checked against the cases of kube's own requestinfo_test.go
(k8s.io/apiserver/pkg/endpoints/request) plus the gateway's refusals and exec handling."""

from __future__ import annotations

import pytest
from mitmproxy.http import Headers

from jitgate.kube.request_info import (
    MAX_PATH_SEGMENTS,
    MAX_TARGET_LENGTH,
    AmbiguousRequestError,
    ExecParams,
    RequestInfo,
    parse_request,
    upgrade_refusal,
)

# TestGetAPIRequestInfo successCases:
# method, url, verb, apiPrefix, apiGroup, apiVersion, namespace, resource, subresource, name, parts
KUBE_RESOURCE_CASES = [
    ("GET", "/api/v1/namespaces", "list", "api", "", "v1", "", "namespaces", "", "", ["namespaces"]),
    ("GET", "/api/v1/namespaces/other", "get", "api", "", "v1", "other", "namespaces", "", "other", ["namespaces", "other"]),
    ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("GET", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("HEAD", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", ["pods"]),
    # special verbs
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo", "subpath", "not", "a", "subresource"]),
    ("GET", "/api/v1/watch/pods", "watch", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/pods?watch=true", "watch", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/pods?watch=false", "list", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    # subresource identification
    ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "api", "", "v1", "other", "pods", "status", "foo", ["pods", "foo", "status"]),
    ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "api", "", "v1", "other", "pods", "proxy", "foo", ["pods", "foo", "proxy", "subpath"]),
    ("PUT", "/api/v1/namespaces/other/finalize", "update", "api", "", "v1", "other", "namespaces", "finalize", "other", ["namespaces", "other", "finalize"]),
    ("PUT", "/api/v1/namespaces/other/status", "update", "api", "", "v1", "other", "namespaces", "status", "other", ["namespaces", "other", "status"]),
    # verb identification
    ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("POST", "/api/v1/namespaces/other/pods", "create", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    # deletecollection verb identification
    ("DELETE", "/api/v1/nodes", "deletecollection", "api", "", "v1", "", "nodes", "", "", ["nodes"]),
    ("DELETE", "/api/v1/namespaces", "deletecollection", "api", "", "v1", "", "namespaces", "", "", ["namespaces"]),
    ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "apis", "extensions", "v1", "other", "pods", "", "", ["pods"]),
    # api group and version identification
    ("POST", "/apis/extensions/v1/namespaces/other/pods", "create", "apis", "extensions", "v1", "other", "pods", "", "", ["pods"]),
    ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "apis", "extensions", "v1beta3", "other", "pods", "", "", ["pods"]),
]

# The gateway's own additions, same columns.
MORE_RESOURCE_CASES = [
    # the namespace object itself, and its subresources
    ("DELETE", "/api/v1/namespaces/other", "delete", "api", "", "v1", "other", "namespaces", "", "other", ["namespaces", "other"]),
    ("GET", "/api/v1/watch/namespaces/other", "watch", "api", "", "v1", "other", "namespaces", "", "other", ["namespaces", "other"]),
    ("GET", "/api/v1/namespaces/other/status", "get", "api", "", "v1", "other", "namespaces", "status", "other", ["namespaces", "other", "status"]),
    ("GET", "/apis/apps/v1/namespaces", "list", "apis", "apps", "v1", "", "namespaces", "", "", ["namespaces"]),
    # deprecated watch prefix on a single object
    ("GET", "/apis/apps/v1/watch/namespaces/ns/deployments/web", "watch", "apis", "apps", "v1", "ns", "deployments", "", "web", ["deployments", "web"]),
    # a name with watch=true is a get: kube converts only nameless gets
    ("GET", "/api/v1/namespaces/ns/pods/foo?watch=true", "get", "api", "", "v1", "ns", "pods", "", "foo", ["pods", "foo"]),
    # cluster-scoped, grouped
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin", "get", "apis", "rbac.authorization.k8s.io", "v1", "", "clusterroles", "", "admin", ["clusterroles", "admin"]),
    ("PUT", "/api/v1/nodes/n1/status", "update", "api", "", "v1", "", "nodes", "status", "n1", ["nodes", "n1", "status"]),
    # subresources
    ("GET", "/apis/apps/v1/namespaces/ns/deployments/web/scale", "get", "apis", "apps", "v1", "ns", "deployments", "scale", "web", ["deployments", "web", "scale"]),
    ("PATCH", "/apis/apps/v1/namespaces/ns/deployments/web/scale", "patch", "apis", "apps", "v1", "ns", "deployments", "scale", "web", ["deployments", "web", "scale"]),
    ("GET", "/api/v1/namespaces/ns/pods/foo/log?follow=true&container=c", "get", "api", "", "v1", "ns", "pods", "log", "foo", ["pods", "foo", "log"]),
    ("POST", "/api/v1/namespaces/ns/pods/foo/eviction", "create", "api", "", "v1", "ns", "pods", "eviction", "foo", ["pods", "foo", "eviction"]),
    ("POST", "/api/v1/namespaces/ns/pods/foo/binding", "create", "api", "", "v1", "ns", "pods", "binding", "foo", ["pods", "foo", "binding"]),
    ("PATCH", "/api/v1/namespaces/ns/pods/foo/ephemeralcontainers", "patch", "api", "", "v1", "ns", "pods", "ephemeralcontainers", "foo", ["pods", "foo", "ephemeralcontainers"]),
    ("POST", "/api/v1/namespaces/ns/serviceaccounts/sa/token", "create", "api", "", "v1", "ns", "serviceaccounts", "token", "sa", ["serviceaccounts", "sa", "token"]),
    ("PUT", "/apis/example.com/v1/namespaces/ns/widgets/w/status", "update", "apis", "example.com", "v1", "ns", "widgets", "status", "w", ["widgets", "w", "status"]),
    # <resource>/<name>/proxy/<rest>: the rest is kept in parts, not interpreted
    ("GET", "/api/v1/namespaces/ns/services/https:web:443/proxy/api/x/", "get", "api", "", "v1", "ns", "services", "proxy", "https:web:443", ["services", "https:web:443", "proxy", "api", "x"]),
    ("POST", "/api/v1/nodes/n1/proxy/configz", "create", "api", "", "v1", "", "nodes", "proxy", "n1", ["nodes", "n1", "proxy", "configz"]),
    ("GET", "/api/v1/proxy/nodes/n1/stats", "proxy", "api", "", "v1", "", "nodes", "", "n1", ["nodes", "n1", "stats"]),
    # the proxy prefix sets the verb whatever the method
    ("DELETE", "/api/v1/proxy/namespaces/ns/pods/foo", "proxy", "api", "", "v1", "ns", "pods", "", "foo", ["pods", "foo"]),
    # a trailing slash is trimmed, as kube's splitPath does
    ("GET", "/api/v1/namespaces/ns/pods/", "list", "api", "", "v1", "ns", "pods", "", "", ["pods"]),
    # methods kube has no verb for
    ("OPTIONS", "/api/v1/namespaces/ns/pods", "", "api", "", "v1", "ns", "pods", "", "", ["pods"]),
    ("TRACE", "/api/v1/pods/foo", "", "api", "", "v1", "", "pods", "", "foo", ["pods", "foo"]),
    ("CONNECT", "/api/v1/namespaces/ns/pods/foo", "", "api", "", "v1", "ns", "pods", "", "foo", ["pods", "foo"]),
    ("get", "/api/v1/pods", "", "api", "", "v1", "", "pods", "", "", ["pods"]),
    # percent-encoded characters Python and JavaScript clients send in names
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/system%3Aaggregate-to-admin", "get", "apis", "rbac.authorization.k8s.io", "v1", "", "clusterroles", "", "system:aggregate-to-admin", ["clusterroles", "system:aggregate-to-admin"]),
    ("GET", "/api/v1/namespaces/ns/configmaps/a%2Eb", "get", "api", "", "v1", "ns", "configmaps", "", "a.b", ["configmaps", "a.b"]),
]


@pytest.mark.parametrize(
    "method,url,verb,prefix,group,version,namespace,resource,subresource,name,parts",
    KUBE_RESOURCE_CASES + MORE_RESOURCE_CASES,
)
def test_resource_requests(method, url, verb, prefix, group, version, namespace, resource, subresource, name, parts):
    info = parse_request(method, url)
    assert info.is_resource_request
    assert (info.verb, info.api_prefix, info.api_group, info.api_version) == (verb, prefix, group, version)
    assert (info.namespace, info.resource, info.subresource, info.name) == (namespace, resource, subresource, name)
    assert info.parts == tuple(parts)


@pytest.mark.parametrize(
    "method,url,verb",
    [
        # TestGetAPIRequestInfo errorCases and TestGetNonAPIRequestInfo
        ("GET", "/", "get"),
        ("GET", "/api/version/", "get"),
        ("GET", "/apis/group/version/", "get"),
        ("GET", "/badprefix/version/resource", "get"),
        ("GET", "/apis/version/resource", "get"),
        ("GET", "/not-api/version/resource", "get"),
        ("GET", "/apis/extensions/v1beta1", "get"),
        ("GET", "/apis/extensions/v1beta1/", "get"),
        ("GET", "/api/version", "get"),
        ("GET", "/api", "get"),
        # more non-resource endpoints
        ("GET", "/version", "get"),
        ("GET", "/healthz/etcd", "get"),
        ("GET", "/openapi/v3/apis/apps/v1?hash=ABC", "get"),
        ("POST", "/apis", "post"),
        ("PUT", "/logs/x", "put"),
        ("OPTIONS", "/api", "options"),
    ],
)
def test_non_resource_requests(method, url, verb):
    info = parse_request(method, url)
    assert not info.is_resource_request
    assert info.verb == verb
    assert (info.resource, info.name, info.namespace, info.parts) == ("", "", "", ())
    assert info.path == url.partition("?")[0]


@pytest.mark.parametrize(
    "url,resource_request",
    [
        # TestGetNonAPIRequestInfo
        ("/api/version/resource", True),
        ("/apis/group/version/resource/name/subresource", True),
        ("/api/version/resource/name/subresource", True),
        ("/apis/batch/v1/job", True),
        ("/apis/batch/v1/job/foo", True),
        ("/apis/batch/v1/job/foo/scale", True),
        ("/not-api/version/resource", False),
        ("/apis/extensions/v1beta1", False),
        ("/apis/extensions/v1beta1/", False),
        ("/api/version", False),
        ("/api", False),
        ("/", False),
    ],
)
def test_resource_or_not(url, resource_request):
    assert parse_request("GET", url).is_resource_request is resource_request


# TestSelectorParsing (its repeated-parameter case is refused here instead, see REFUSED),
# then the gateway's own cases.
# method, url, name, verb, fieldSelector, labelSelector
SELECTOR_CASES = [
    ("GET", "/apis/group/version/resource", "", "list", "", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1", "name1", "list", "metadata.name=name1", ""),
    ("GET", "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1", "name1", "watch", "metadata.name=name1", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "", "list", "foo=bar", "baz=qux"),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo", "", "list", "metadata.name=name1,foo", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=true", "", "watch", "metadata.name=name1,foo", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=false", "", "list", "metadata.name=name1,foo", ""),
    ("DELETE", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "", "deletecollection", "foo=bar", "baz=qux"),
    ("GET", "/apis/group/version/resource/name?fieldSelector=foo=bar&labelSelector=foo=bar", "name", "get", "", ""),
    ("GET", "/apis/group/version/watch/resource?fieldSelector=metadata.name=foo&labelSelector=foo=bar", "", "watch", "", ""),
    ("GET", "/apis/group/version/watch/resource/name?fieldSelector=metadata.name=foo&labelSelector=foo=bar", "name", "watch", "", ""),
    # kubectl get pod foo -w / kubectl wait: URL-encoded selector, watch, paging options
    ("GET", "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%3Dfoo&watch=true&resourceVersion=1&allowWatchBookmarks=true", "foo", "watch", "metadata.name=foo", ""),
    ("GET", "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%3D%3Dfoo&limit=500", "foo", "list", "metadata.name==foo", ""),
    ("GET", "/api/v1/pods?fieldSelector=status.phase%3DRunning,metadata.name%3Dfoo", "foo", "list", "status.phase=Running,metadata.name=foo", ""),
    # terms are sorted before the first metadata.name term is taken
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=b,metadata.name=a", "a", "list", "metadata.name=b,metadata.name=a", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name!=foo", "", "list", "metadata.name!=foo", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=", "", "list", "metadata.name=", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.namespace=foo", "", "list", "metadata.namespace=foo", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=a%5C,b", "a,b", "list", "metadata.name=a\\,b", ""),
    # values that are not path segment names, or selectors that do not parse, name nothing
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=..", "", "list", "metadata.name=..", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=a%2Fb", "", "list", "metadata.name=a/b", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=a%5Cx", "", "list", "metadata.name=a\\x", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=a=b", "", "list", "metadata.name=a=b", ""),
    # any list option that fails to decode makes kube drop the name
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=foo&limit=ten", "", "list", "metadata.name=foo", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=foo&timeoutSeconds=1.5&watch=1", "", "watch", "metadata.name=foo", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=foo&timeoutSeconds=-30", "foo", "list", "metadata.name=foo", ""),
    # with a label selector the gateway does not name the object (conservative, see module doc)
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=foo&labelSelector=app%3Dweb", "", "list", "metadata.name=foo", "app=web"),
    # a delete never takes its name from a selector
    ("DELETE", "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name=foo", "", "deletecollection", "metadata.name=foo", ""),
    # kube's bool conversion: only "0" and "false" (any case) are false; empty is true
    ("GET", "/api/v1/pods?watch", "", "watch", "", ""),
    ("GET", "/api/v1/pods?watch=", "", "watch", "", ""),
    ("GET", "/api/v1/pods?watch=FALSE", "", "list", "", ""),
    ("GET", "/api/v1/pods?watch=no", "", "watch", "", ""),
    ("GET", "/api/v1/pods?Watch=true", "", "list", "", ""),
    # Go decodes query keys too
    ("GET", "/api/v1/pods?w%61tch=true", "", "watch", "", ""),
]


@pytest.mark.parametrize("method,url,name,verb,field_selector,label_selector", SELECTOR_CASES)
def test_selectors(method, url, name, verb, field_selector, label_selector):
    info = parse_request(method, url)
    assert (info.name, info.verb) == (name, verb)
    assert (info.field_selector, info.label_selector) == (field_selector, label_selector)


def test_missing_resource_after_special_verb_is_refused():
    # kube returns an error here ("unable to determine kind and namespace from url")
    with pytest.raises(AmbiguousRequestError):
        parse_request("GET", "/api/v1/watch")
    with pytest.raises(AmbiguousRequestError):
        parse_request("GET", "/apis/apps/v1/proxy/")


EXEC = "/api/v1/namespaces/ns/pods/web-0/exec"


@pytest.mark.parametrize(
    "query,expected",
    [
        (
            "command=sh&command=-c&command=echo+hi%3B+id&container=app&stdin=true&stdout=true&stderr=true&tty=true",
            ExecParams(("sh", "-c", "echo hi; id"), "app", True, True, True, True),
        ),
        ("command=ls&stdout=1&stderr=0", ExecParams(("ls",), "", False, True, False, False)),
        ("command=ls&stdin=&tty=False&stdout=yes", ExecParams(("ls",), "", True, True, False, False)),
        ("command=sh&command=-c&command=a%0Ab", ExecParams(("sh", "-c", "a\nb"))),
        ("", ExecParams()),
    ],
)
def test_exec_params(query, expected):
    info = parse_request("POST", f"{EXEC}?{query}" if query else EXEC)
    assert info.exec == expected
    assert (info.verb, info.resource_path, info.name) == ("create", "pods/exec", "web-0")
    assert info.is_connect


def test_attach_and_portforward_params():
    attach = parse_request("POST", "/api/v1/namespaces/ns/pods/p/attach?container=c&stdin=1&tty=1&command=ignored")
    assert attach.exec == ExecParams(container="c", stdin=True, tty=True)
    forward = parse_request("GET", "/api/v1/namespaces/ns/pods/p/portforward?ports=8080,9090&ports=443")
    assert forward.exec == ExecParams(ports=(8080, 9090, 443))
    assert forward.verb == "create"


WS = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Protocol": "v5.channel.k8s.io"}


@pytest.mark.parametrize(
    "method,target,headers,verb,upgrade",
    [
        # kubectl >= 1.30: WebSocket GET; authorized as create (AuthorizePodWebsocketUpgradeCreatePermission)
        ("GET", EXEC + "?command=sh&stdin=true&tty=true", WS, "create", "websocket"),
        ("GET", "/api/v1/namespaces/ns/pods/p/attach?stdin=true", WS, "create", "websocket"),
        ("GET", "/api/v1/namespaces/ns/pods/p/portforward?ports=80", WS, "create", "websocket"),
        # the SPDY fallback is a POST
        ("POST", EXEC + "?command=sh", {"Upgrade": "SPDY/3.1", "Connection": "Upgrade"}, "create", "spdy/3.1"),
        # a GET that does not ask for an upgrade on a stream subresource is no read either
        ("GET", EXEC + "?command=id", None, "create", ""),
        ("HEAD", EXEC + "?command=id", None, "create", ""),
        # lower-case header names (plain dicts) and mitmproxy's Headers
        ("GET", EXEC, {"upgrade": "WebSocket", "connection": "upgrade"}, "create", "websocket"),
        ("GET", EXEC, Headers(upgrade="websocket", connection="Upgrade"), "create", "websocket"),
        # logs stay a read; proxy keeps kube's verb but the upgrade is reported
        ("GET", "/api/v1/namespaces/ns/pods/p/log?follow=true", WS, "get", "websocket"),
        ("GET", "/api/v1/namespaces/ns/services/s/proxy/ws", WS, "get", "websocket"),
        # not core pods: no compound create check in kube
        ("GET", "/apis/example.com/v1/namespaces/ns/pods/p/exec", None, "get", ""),
        # the deprecated watch prefix keeps its verb (kube serves no exec there)
        ("GET", "/api/v1/watch/namespaces/ns/pods/p/exec", None, "watch", ""),
    ],
)
def test_stream_subresources_are_not_reads(method, target, headers, verb, upgrade):
    info = parse_request(method, target, headers)
    assert (info.verb, info.upgrade) == (verb, upgrade)
    assert info.is_websocket is (upgrade == "websocket")


def test_connect_and_resource_path():
    assert parse_request("GET", "/api/v1/namespaces/ns/pods/p/proxy/x").is_connect
    assert parse_request("GET", "/api/v1/proxy/namespaces/ns/pods/p").is_connect
    assert not parse_request("GET", "/api/v1/namespaces/ns/pods/p/log").is_connect
    assert not parse_request("GET", "/api/v1/namespaces/ns/pods/p").is_connect
    assert not parse_request("GET", "/healthz").is_connect
    assert parse_request("GET", "/api/v1/namespaces/ns/pods/p/log").resource_path == "pods/log"
    assert parse_request("GET", "/apis/apps/v1/deployments").resource_path == "deployments"
    assert parse_request("GET", "/api/v1/namespaces/ns/pods/p").exec is None


def test_decoded_path_is_reported():
    info = parse_request("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/system%3Acontroller/")
    assert info.path == "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:controller/"


def test_result_is_immutable():
    info = parse_request("GET", "/api/v1/pods")
    assert isinstance(info, RequestInfo)
    with pytest.raises(AttributeError):
        info.verb = "get"  # type: ignore[misc]


REFUSED = [
    # encoded separators: kube splits the decoded path, so these move segments
    "/api/v1/namespaces/a%2Fb/pods",
    "/api/v1/namespaces/a%2fb/pods",
    "/api/v1/namespaces/a%5Cb/pods",
    "/api/v1/namespaces/a%5cb/pods",
    # dot segments, plain and encoded
    "/api/v1/../v1/pods",
    "/api/v1/./pods",
    "/api/v1/namespaces/ns/pods/..",
    "/api/v1/namespaces/%2e%2e/pods",
    "/api/v1/namespaces/%2E/pods",
    "/api/v1/namespaces/.%2e/secrets",
    # empty segments
    "/api//v1/pods",
    "//api/v1/pods",
    "/api/v1/pods//",
    "//",
    # not origin form
    "https://cluster.example/api/v1/pods",
    "api/v1/pods",
    "*",
    "cluster.example:443",
    "",
    # fragments, backslashes, spaces, control and non-ASCII characters
    "/api/v1/pods#frag",
    "/api/v1/pods\\x",
    "/api/v1/po ds",
    "/api/v1/po\x00ds",
    "/api/v1/po\tds",
    "/api/v1/pods?x=\x01",
    "/api/v1/pods/\x7f",
    "/api/v1/namespaces/é/pods",
    # percent-encoding that decodes to control characters, non-UTF-8, or is not encoding
    "/api/v1/p%00ods",
    "/api/v1/namespaces/ns/pods/p%0A",
    "/api/v1/namespaces/ns/pods/p%E2%80%AE",
    "/api/v1/namespaces/ns/pods/p%ff",
    "/api/v1/namespaces/ns/pods/p%zz",
    "/api/v1/namespaces/ns/pods/p%4",
    "/api/v1/namespaces/ns/pods/p%",
    # double encoding: a second decoder would read %2F as a slash
    "/api/v1/namespaces/a%252Fb/pods",
    # query parameters the apiserver could read differently
    "/api/v1/pods?watch=true&watch=false",
    "/api/v1/pods?watch=false&w%61tch=true",
    "/api/v1/pods?watch=false;x=1&watch=true",
    "/api/v1/pods?w%zzatch=1",
    "/api/v1/pods?watch=fal%C5%BFe",
    "/api/v1/pods?x=%00",
    "/api/v1/pods?x=%ff",
    "/api/v1/pods?fieldSelector=metadata.name=foo&fieldSelector=metadata.name=bar",
    "/api/v1/pods?labelSelector=a=b&labelSelector=c=d",
    EXEC + "?command=sh&container=a&container=b",
    EXEC + "?command=sh&tty=false&tty=true",
    EXEC + "?command=%ff",
    "/api/v1/namespaces/ns/pods/p/portforward?ports=http",
    "/api/v1/namespaces/ns/pods/p/portforward?ports=70000",
    "/api/v1/namespaces/ns/pods/p/portforward?ports=80,,81",
    # too long, too deep
    "/api/v1/namespaces/ns/configmaps/" + "a" * MAX_TARGET_LENGTH,
    "/api/v1/namespaces/ns/services/s/proxy" + "/a" * MAX_PATH_SEGMENTS,
]


@pytest.mark.parametrize("target", REFUSED)
def test_refused(target):
    with pytest.raises(AmbiguousRequestError):
        parse_request("GET", target)


def test_refusal_message_does_not_quote_the_target():
    with pytest.raises(AmbiguousRequestError) as e:
        parse_request("GET", "/api/v1/namespaces/a%2Fb/pods?access_token=s3cr3t-t0ken")
    assert "s3cr3t" not in str(e.value)
    assert "a%2Fb" not in str(e.value)
    assert str(e.value)


def test_limits_are_inclusive():
    deep = "/api/v1/namespaces/ns/services/s/proxy" + "/a" * (MAX_PATH_SEGMENTS - 7)
    assert parse_request("GET", deep).subresource == "proxy"
    long = "/api/v1/namespaces/ns/configmaps/"
    long += "a" * (MAX_TARGET_LENGTH - len(long))
    assert len(parse_request("GET", long).name) == MAX_TARGET_LENGTH - len("/api/v1/namespaces/ns/configmaps/")


# --- long-running calls and the `follow` attribute -------------------------------------------------

LOG = "/api/v1/namespaces/ns/pods/p/log"


@pytest.mark.parametrize(
    "query,follow",
    [
        # runtime.Convert_Slice_string_To_bool, as the apiserver decodes PodLogOptions: only "0"
        # and "false" (any case) are false; absent is false; anything else is true.
        ("follow=true", True), ("follow=True", True), ("follow=TRUE", True), ("follow=1", True),
        ("follow=t", True), ("follow=T", True), ("follow=yes", True), ("follow=", True), ("follow", True),
        ("follow=false", False), ("follow=False", False), ("follow=FALSE", False), ("follow=0", False),
        ("", False), ("container=c&tailLines=5", False),
        ("follow=%54rue", True), ("follow=fal%73e", False),
    ],
)
def test_log_follow_is_read_as_the_apiserver_reads_it(query, follow):
    info = parse_request("GET", f"{LOG}?{query}" if query else LOG)
    assert info.resource_path == "pods/log"
    assert info.follow is follow
    assert info.long_running is follow


def test_follow_is_single_valued_and_ascii():
    # kube takes the first value: a repeat could be read differently by another component
    with pytest.raises(AmbiguousRequestError):
        parse_request("GET", f"{LOG}?follow=false&follow=true")
    with pytest.raises(AmbiguousRequestError):
        parse_request("GET", f"{LOG}?follow=fal%C5%BFe")  # "falſe": Go's EqualFold says false


def test_follow_only_means_something_on_pod_logs():
    assert not parse_request("GET", "/api/v1/namespaces/ns/pods?follow=true").follow
    assert not parse_request("GET", "/apis/example.com/v1/namespaces/ns/pods/p/log?follow=true").follow


@pytest.mark.parametrize(
    "method,target,headers,long_running",
    [
        # kube's BasicLongRunningRequestCheck: watch and proxy verbs...
        ("GET", "/api/v1/pods?watch=true", None, True),
        ("GET", "/api/v1/pods?watch=1", None, True),
        ("GET", "/api/v1/watch/namespaces/ns/pods", None, True),
        ("GET", "/api/v1/proxy/namespaces/ns/pods/p", None, True),
        # ...and the attach, exec, portforward and proxy subresources, whatever the transport
        ("GET", EXEC + "?command=sh", WS, True),
        ("POST", EXEC + "?command=sh", {"Upgrade": "SPDY/3.1", "Connection": "Upgrade"}, True),
        ("POST", EXEC + "?command=sh", None, True),
        ("GET", "/api/v1/namespaces/ns/pods/p/attach", None, True),
        ("GET", "/api/v1/namespaces/ns/pods/p/portforward?ports=80", None, True),
        ("GET", "/api/v1/namespaces/ns/pods/p/proxy/x", None, True),
        ("GET", "/api/v1/namespaces/ns/services/s/proxy/", None, True),
        ("POST", "/api/v1/nodes/n/proxy/configz", None, True),
        # any upgrade, on any path
        ("GET", "/version", {"Upgrade": "websocket"}, True),
        ("GET", "/api/v1/namespaces/ns/configmaps", {"Upgrade": "h2c"}, True),
        # everything else ends with its response
        ("GET", "/api/v1/pods", None, False),
        ("GET", "/api/v1/pods?watch=false", None, False),
        ("GET", "/api/v1/namespaces/ns/pods/p", None, False),
        ("GET", "/api/v1/namespaces/ns/pods/p/log", None, False),
        ("GET", "/api/v1/namespaces/ns/pods/p?watch=true", None, False),
        ("POST", "/api/v1/namespaces/ns/pods/p/eviction", None, False),
        ("GET", "/version", None, False),
        ("GET", "/healthz/watch", None, False),
    ],
)
def test_long_running_from_the_attributes_alone(method, target, headers, long_running):
    assert parse_request(method, target, headers).long_running is long_running


# --- upgrade handshakes the gateway can inspect ----------------------------------------------------

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample nonce
GOOD = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Key", KEY), (b"Sec-WebSocket-Protocol", b"v5.channel.k8s.io")]


def _without(fields, name):
    return [(k, v) for k, v in fields if k.lower() != name.lower()]


@pytest.mark.parametrize(
    "method,version,fields",
    [
        ("GET", "HTTP/1.1", []),
        ("POST", "HTTP/2.0", [(b"content-type", b"application/json")]),
        ("GET", "HTTP/1.1", [(b"Connection", b"keep-alive")]),
        ("GET", "HTTP/1.1", GOOD),
        ("GET", "HTTP/1.1", [(b"upgrade", b"WebSocket"), (b"connection", b"keep-alive, Upgrade"),
                             (b"sec-websocket-version", b"13"), (b"sec-websocket-key", KEY)]),
        ("GET", "HTTP/1.1", _without(GOOD, b"Connection") + [(b"Connection", b"keep-alive"), (b"Connection", b"upgrade")]),
    ],
)
def test_no_upgrade_or_a_well_formed_websocket_is_fine(method, version, fields):
    assert upgrade_refusal(method, version, fields) is None


@pytest.mark.parametrize(
    "method,version,fields,what",
    [
        ("POST", "HTTP/1.1", [(b"Upgrade", b"SPDY/3.1"), (b"Connection", b"Upgrade")], "a SPDY upgrade"),
        ("POST", "HTTP/1.1", [(b"Upgrade", b"spdy/3.1")], "a SPDY upgrade"),
        ("GET", "HTTP/1.1", [(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade, HTTP2-Settings")], "an upgrade to another protocol"),
        ("GET", "HTTP/1.1", [(b"Upgrade", b"tcp")], "an upgrade to another protocol"),
        ("GET", "HTTP/1.1", [(b"Upgrade", b"")], "an upgrade to another protocol"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Upgrade") + [(b"Upgrade", b"websocket, SPDY/3.1")], "a SPDY upgrade"),
        # kube's IsUpgradeRequest reads only Connection, and proxies relay whatever follows
        ("GET", "HTTP/1.1", [(b"Connection", b"Upgrade")], "a connection upgrade without an Upgrade header"),
        ("GET", "HTTP/1.1", [(b"Connection", b"x-upgraded")], "a connection upgrade without an Upgrade header"),
        # WebSocket handshakes mitmproxy would not read as WebSocket, or not as the cluster does
        ("GET", "HTTP/1.1", GOOD + [(b"Sec-WebSocket-Version", b"13")], "Sec-WebSocket-Version"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Sec-WebSocket-Version") + [(b"Sec-WebSocket-Version", b"8")], "Sec-WebSocket-Version"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Sec-WebSocket-Version"), "Sec-WebSocket-Version"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Sec-WebSocket-Version") + [(b"Sec-WebSocket-Version", b"13, 13")], "Sec-WebSocket-Version"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Sec-WebSocket-Key"), "Sec-WebSocket-Key"),
        ("GET", "HTTP/1.1", GOOD + [(b"Sec-WebSocket-Key", KEY)], "Sec-WebSocket-Key"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Sec-WebSocket-Key") + [(b"Sec-WebSocket-Key", b"c2hvcnQ=")], "Sec-WebSocket-Key"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Sec-WebSocket-Key") + [(b"Sec-WebSocket-Key", b"!" * 24)], "Sec-WebSocket-Key"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Sec-WebSocket-Key") + [(b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ")], "Sec-WebSocket-Key"),
        ("GET", "HTTP/1.1", GOOD + [(b"Upgrade", b"websocket")], "Upgrade must be exactly"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Upgrade") + [(b"Upgrade", b"websocket, websocket")], "Upgrade must be exactly"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Connection"), "Connection must name"),
        ("GET", "HTTP/1.1", _without(GOOD, b"Connection") + [(b"Connection", b"upgraded")], "Connection must name"),
        ("POST", "HTTP/1.1", GOOD, "HTTP/1.1 GET"),
        ("GET", "HTTP/1.0", GOOD, "HTTP/1.1 GET"),
        ("GET", "HTTP/2.0", GOOD, "HTTP/1.1 GET"),
    ],
)
def test_uninspectable_upgrades(method, version, fields, what):
    refusal = upgrade_refusal(method, version, fields)
    assert refusal is not None and what in refusal


def test_upgrade_refusal_never_quotes_header_values():
    refusal = upgrade_refusal("GET", "HTTP/1.1", [(b"Upgrade", b"evil\x1b[31m<script>"), (b"Connection", b"upgrade")])
    assert refusal == "an upgrade to another protocol"
