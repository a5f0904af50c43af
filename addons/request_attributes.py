"""Request attributes: read each call as kube-apiserver's RequestInfo would.

Verb, API group and version, namespace, resource, subresource, name and exec parameters go on the
call for every later step. A target the apiserver could read differently from us (dot segments,
encoded slashes, `//`, path parameters, non-UTF-8) is refused with 400 rather than guessed at; a
target naming another host than the connection's cluster (absolute-form `https://other/...`, or a
Host / :authority for another host inside a CONNECT tunnel) with 403. This runs at
`requestheaders`, so even calls refused before their body is read are audited with what they asked.

    mitmdump -s addons/request_attributes.py
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy import mode_specs

from jitgate.chain.flow import call_of, refuse
from jitgate.kube.request_info import AmbiguousRequestError, parse_request
from jitgate.kube.request_target import has_path_parameters, same_host, split_authority

OTHER_HOST = ("jitgate: the request names another host than this cluster; a connection to the gateway "
              "serves only the cluster it was opened for")


def served_address(flow: http.HTTPFlow) -> tuple[str, int]:
    """The (host, port) this connection serves: the listener's endpoint in reverse mode, the
    CONNECT target inside a tunnel (mitmproxy sets the request's host to it)."""
    mode = flow.client_conn.proxy_mode
    if isinstance(mode, mode_specs.ReverseMode):
        return mode.address
    return flow.request.host, flow.request.port


def target_problem(flow: http.HTTPFlow) -> tuple[int, str] | None:
    """A refusal for a request naming another host; an absolute-form target naming the served
    cluster is turned into origin-form (the cluster sees the path only)."""
    request = flow.request
    data = request.data
    served = served_address(flow)
    if data.authority and not (request.is_http2 or request.is_http3):
        # HTTP/1 absolute-form: `GET https://host/path`. (mitmproxy keeps the named authority here,
        # while it sets request.host to the connection's target.)
        authority = data.authority.decode("ascii", "replace")
        if data.scheme != b"https" or not same_host(authority, "https", served):
            named = split_authority(authority)
            if named:
                call_of(flow).annotations["jitgate.dev/requested-host"] = f"{named[0]}:{named[1]}"
            return 403, OTHER_HOST
        request.authority = ""
        return None
    if isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
        return None  # mitmproxy has rewritten Host / :authority to the endpoint; clients name the gateway
    named = request.host_header
    if named is None:
        return (400, "jitgate: the request has no Host header") if request.http_version == "HTTP/1.1" else None
    if not same_host(named, request.scheme, served):
        return 403, OTHER_HOST
    return None


class RequestAttributes:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        problem = None if flow.response else target_problem(flow)
        try:
            if has_path_parameters(flow.request.data.path):
                raise AmbiguousRequestError("request path contains a path parameter (';')")
            # mitmproxy keeps the target's raw bytes; decode strictly so nothing is smoothed over.
            target = flow.request.data.path.decode("utf-8")
            call.info = parse_request(flow.request.method, target, flow.request.headers)
        except UnicodeDecodeError:
            problem = problem or (400, "jitgate: the request path is not valid UTF-8")
        except AmbiguousRequestError as e:
            problem = problem or (400, f"jitgate: refusing an ambiguous request path: {e}")
        # Parsed even after an earlier denial, so the audit line names what was asked; the first
        # refusal stands.
        if problem and not flow.response:
            refuse(flow, *problem)


addons = [RequestAttributes()]
