"""kubectl's own questions, answered for every authenticated caller without a grant.

- `kubectl auth whoami` (SelfSubjectReview): the identity the gateway verified, answered here.
- `kubectl auth can-i` (SelfSubjectAccessReview): yes only if an active grant covers the call AND the
  cluster's RBAC allows it. The grant part is decided here; for the cluster part the review is
  forwarded with the credential the call itself would use (the grant's upstream role; as the caller
  where the cluster has `impersonate: true`), carrying only the attributes decided on. The answer's
  reason names the grant, or says how to request one.
- `kubectl auth can-i --list` (SelfSubjectRulesReview): the rules the caller's active grants give,
  answered here.

Every one of them is audited like any call. Runs right before the grants step, which leaves alone a
call this step has decided.

    mitmdump -s addons/gateway.py --set policy=policies/
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

from mitmproxy import ctx, http

from jitgate.access.messages import how_to_request
from jitgate.access.scope import SENSITIVE_RESOURCES, SENSITIVE_SUBRESOURCES
from jitgate.access.service import AccessService
from jitgate.chain.call import Call
from jitgate.chain.flow import call_of, refuse
from jitgate.chain.service_host import AccessServiceHost
from jitgate.kube import reviews
from jitgate.store.sqlite import StoreError
from jitgate.timefmt import format_duration

log = logging.getLogger("jitgate.self_review")

NEVER_BY_ANY = tuple(sorted(SENSITIVE_RESOURCES)) + tuple(sorted(f"{r}/{s}" for r, s in SENSITIVE_SUBRESOURCES))
JSON_HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A review sent on to the cluster: what the client asked and what the grant part said."""

    api_version: str
    question: reviews.AccessQuestion
    granted_by: str  # "grant g-... (rule r, ends in 7h59m)" or "discovery"


class SelfReview:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        self.forwarded: weakref.WeakKeyDictionary[http.HTTPFlow, Forwarded] = weakref.WeakKeyDictionary()

    async def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if flow.response or call.decision or call.identity is None or call.cluster is None or call.info is None:
            return
        kind = reviews.review_kind(call.info)
        if kind is None:
            return
        api_version = f"{call.info.api_group}/{call.info.api_version}"
        if kind == "SelfSubjectReview":
            self.answer(flow, call, "self-review: who am I",
                        reviews.self_subject_review(api_version, call.identity.username, call.identity.groups))
            return
        try:
            spec = reviews.read_spec(flow.request.raw_content or b"", kind)
            question = reviews.access_question(spec) if kind == "SelfSubjectAccessReview" else None
            namespace = spec.get("namespace", "") if question is None else ""
            if not isinstance(namespace, str):
                raise reviews.ReviewError("spec.namespace must be a string")
        except reviews.ReviewError as e:
            refuse(flow, 400, f"jitgate: {e}")
            return
        try:
            if question is None:
                await self.rules(flow, call, namespace)
            else:
                await self.access(flow, call, api_version, question)
        except StoreError as e:
            log.error("grant store unavailable, refusing review %s: %s", call.audit_id, e)
            refuse(flow, 503, "jitgate: the grant store is unavailable, so calls are refused until it is back "
                              f"(audit ID {call.audit_id})")

    @staticmethod
    def answer(flow: http.HTTPFlow, call: Call, reason: str, body: bytes) -> None:
        call.allow(reason)
        flow.response = http.Response.make(201, body, JSON_HEADERS)

    async def rules(self, flow: http.HTTPFlow, call: Call, namespace: str) -> None:
        if not _grants_required():
            # jitgate asks for no grant: what the caller may do is what the cluster's RBAC says.
            call.annotations["jitgate.dev/self-review"] = "require_grant is off; asked the cluster"
            call.allow("self-review: require_grant is off, the cluster's RBAC decides")
            return
        now = time.time()
        grants = [g for g in await self.service.active_grants(call.identity.username, call.cluster.name)
                  if g.scope.cluster == call.cluster.name and g.is_active(now)]
        scopes = [reviews.GrantedScope(g.id, g.scope.namespaces, g.scope.cluster_wide,
                                       tuple((r.group, r.resource, r.subresource) for r in g.scope.resources),
                                       g.scope.verbs) for g in grants]
        call.annotations["jitgate.dev/self-review"] = "rules from grants " + (",".join(g.id for g in grants) or "(none)")
        self.answer(flow, call, "self-review: the rules of the caller's grants",
                    reviews.rules_review(namespace, scopes, NEVER_BY_ANY))

    async def access(self, flow: http.HTTPFlow, call: Call, api_version: str, question: reviews.AccessQuestion) -> None:
        info = question.request_info()
        decision = await self.service.decide(call.identity.username, call.cluster.name, info)
        if not decision.allowed and not _grants_required():
            decision = None  # a staged rollout: jitgate allows what the cluster's RBAC allows
        elif not decision.allowed:
            try:
                reason = how_to_request(self.service.rules, call.identity.groups, call.cluster.name, info)
            except ValueError:  # e.g. `can-i '*' '*'`: no access request can name that scope
                reason = f"jitgate: no active grant covers it ({decision.reason})"
            call.annotations["jitgate.dev/self-review"] = "no grant covers it"
            self.answer(flow, call, "self-review: no grant covers the reviewed call",
                        reviews.access_review(api_version, question, False, reason))
            return
        grant = decision.grant if decision is not None else None
        if decision is None:
            granted_by = "require_grant is off (jitgate asks for no grant)"
        elif grant is None:
            granted_by = "discovery is open to every authenticated caller"
        else:
            left = format_duration(max(0, int(grant.ends_at - time.time())))
            granted_by = f"grant {grant.id} (rule {grant.rule}, ends in {left})"
            call.grant = grant  # the cluster is asked with the credential the call would use (upstream role)
            call.annotations["jitgate.dev/grant"] = grant.id
            call.annotations["jitgate.dev/access-request"] = grant.request_id
        call.annotations["jitgate.dev/self-review"] = f"{granted_by}; asked the cluster"
        call.allow(f"self-review: {granted_by}; the cluster's RBAC decides the rest")
        # The cluster sees exactly the attributes decided on, as JSON, and answers in JSON.
        flow.request.content = reviews.access_review_request(question)
        flow.request.headers["Content-Type"] = "application/json"
        flow.request.headers["Accept"] = "application/json"
        self.forwarded[flow] = Forwarded(api_version, question, granted_by)

    def response(self, flow: http.HTTPFlow) -> None:
        forwarded = self.forwarded.pop(flow, None)
        if forwarded is None or flow.response is None:
            return
        call = call_of(flow)
        if flow.response.status_code != 201:
            return  # the cluster's own error (a Status) goes back as it is
        try:
            allowed, denied, cluster_reason = reviews.cluster_answer(flow.response.content or b"")
        except reviews.ReviewError:
            allowed, denied, cluster_reason = False, False, "the cluster's answer could not be read"
        if allowed:
            reason = f"jitgate: allowed by {forwarded.granted_by} and by the cluster's RBAC"
        else:
            reason = f"jitgate: {forwarded.granted_by} covers it, but the cluster's RBAC does not allow it"
        if cluster_reason:
            reason += f" (cluster: {cluster_reason})"
        call.annotations["jitgate.dev/self-review"] = f"{forwarded.granted_by}; cluster {'allows' if allowed else 'denies'}"
        flow.response.headers["Content-Type"] = "application/json"
        flow.response.content = reviews.access_review(forwarded.api_version, forwarded.question, allowed, reason, denied)


def _grants_required() -> bool:
    """The grants step's `require_grant` (True when that step is not loaded: nothing is allowed without a grant)."""
    options = getattr(ctx, "options", None)  # None: driven outside a running mitmproxy (the benchmark's curve)
    return getattr(options, "require_grant", True)


_service = AccessService()
addons = [AccessServiceHost(_service), SelfReview(_service)]
