"""Request attributes: read each call as kube-apiserver's RequestInfo would.

Verb, API group and version, namespace, resource, subresource, name and exec parameters go on the
call for every later step. A target the apiserver could read differently from us (dot segments,
encoded slashes, `//`, non-UTF-8) is refused with 400 rather than guessed at.

    mitmdump -s addons/request_attributes.py
"""

from __future__ import annotations

from mitmproxy import http

from jitgate.chain.flow import call_of, refuse
from jitgate.kube.request_info import AmbiguousRequestError, parse_request


class RequestAttributes:
    def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        try:
            # mitmproxy keeps the target's raw bytes; decode strictly so nothing is smoothed over.
            target = flow.request.data.path.decode("utf-8")
            call.info = parse_request(flow.request.method, target, flow.request.headers)
        except UnicodeDecodeError:
            reason = "jitgate: the request path is not valid UTF-8"
        except AmbiguousRequestError as e:
            reason = f"jitgate: refusing an ambiguous request path: {e}"
        else:
            return
        # Parsed even after an earlier denial, so the audit line names what was asked; the first
        # refusal stands.
        if not flow.response:
            refuse(flow, 400, reason)


addons = [RequestAttributes()]
