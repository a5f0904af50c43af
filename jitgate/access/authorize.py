"""Deciding one call: does an active grant cover it (the hot path of every request)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jitgate.access.errors import InvalidRequest
from jitgate.access.model import Grant
from jitgate.access.scope import READ_VERBS, ResourceRef, Scope, is_sensitive_resource
from jitgate.kube.request_info import RequestInfo

# ---------------------------------------------------------------------------------------------
# Per-call checks (the hot path)

_DISCOVERY_PATHS = frozenset({"/api", "/apis", "/version", "/openapi/v2", "/openapi/v3", "/healthz", "/livez", "/readyz"})


def is_discovery(info: RequestInfo) -> bool:
    """Discovery, version, OpenAPI and health reads, which any authenticated caller may make.

    These are what kube's `system:discovery` and `system:public-info-viewer` roles allow. Under
    `/api` and `/apis` every non-resource path is discovery (`/api/v1`, `/apis/apps`,
    `/apis/apps/v1`): RequestInfo makes anything deeper a resource request.
    """
    if info.is_resource_request or info.upgrade or info.verb not in ("get", "head"):
        return False
    path = info.path.rstrip("/")
    if path in _DISCOVERY_PATHS:
        return True
    first = path[1:].partition("/")[0]
    return first in ("api", "apis") or path.startswith("/openapi/v3/")


def call_allowed_by(grant_scope: Scope, info: RequestInfo) -> bool:
    """Whether the grant scope covers this resource call (the caller compares the cluster).

    A call without a namespace (cluster-scoped resources, lists and watches across namespaces,
    `GET /api/v1/namespaces`) needs a cluster-wide scope; the namespace object itself
    (`GET /api/v1/namespaces/dev`) is in namespace `dev`, as kube RBAC reads it. Non-resource
    calls are never covered by a grant: see `is_discovery`.
    """
    if not info.is_resource_request or info.verb not in grant_scope._verb_set:
        return False
    if not grant_scope.cluster_wide and info.namespace not in grant_scope._namespace_set:
        return False  # "" (no namespace) is never in the set
    if (info.api_group, info.resource, info.subresource) in grant_scope._resource_set:
        return True
    return grant_scope._any_resource and not is_sensitive_resource(info.resource, info.subresource)


def scope_for_call(cluster: str, info: RequestInfo, widen_reads: bool = False) -> Scope:
    """The smallest scope that covers this call; with `widen_reads`, a read asks for get, list
    and watch at once (kubectl's `get -w` needs list then watch). Raises `InvalidRequest` for
    calls no scope can cover (non-resource paths, unknown verbs, non-DNS namespaces)."""
    if not info.is_resource_request:
        raise InvalidRequest(f"{info.path} is not a Kubernetes resource; no access request can cover it")
    verbs = READ_VERBS if widen_reads and info.verb in READ_VERBS else (info.verb,)
    ref = ResourceRef(info.resource, info.api_group, info.subresource)
    if info.namespace:
        return Scope(cluster, (info.namespace,), False, (ref,), verbs)
    return Scope(cluster, (), True, (ref,), verbs)


# What one kubectl command needs besides the call that was refused: `kubectl exec`, `attach`,
# `port-forward` and `logs` read the pod first. (subresource) -> (extra resource, extra verbs).
_OPERATION_NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "exec": ("", ("get",)), "attach": ("", ("get",)), "portforward": ("", ("get",)), "log": ("", READ_VERBS),
}


def suggested_scopes(cluster: str, info: RequestInfo) -> list[Scope]:
    """Scopes to ask for so that the whole operation behind this call works, widest first: the
    one that also covers what the kubectl command does around it (a pod's reads with its logs,
    the pod get before an exec), then reads widened to get/list/watch, then the call alone. A
    caller takes the first one an access rule admits. Raises `InvalidRequest` like scope_for_call."""
    minimal = scope_for_call(cluster, info)
    wide = scope_for_call(cluster, info, widen_reads=True)
    whole = _whole_operation(wide, info)
    out: list[Scope] = []
    for scope in (whole, wide, minimal):
        if scope is not None and scope not in out:
            out.append(scope)
    return out


def _whole_operation(scope: Scope, info: RequestInfo) -> Scope | None:
    if info.resource != "pods" or info.api_group:
        return None
    if info.subresource in _OPERATION_NEEDS:
        _, verbs = _OPERATION_NEEDS[info.subresource]
        resources = (ResourceRef("pods"), *scope.resources)
        return Scope(scope.cluster, scope.namespaces, scope.cluster_wide, resources,
                     tuple(dict.fromkeys((*verbs, *scope.verbs))))
    if not info.subresource and info.verb in READ_VERBS:
        # Reading pods usually goes on with their logs (an agent's list, get, logs): one request.
        return Scope(scope.cluster, scope.namespaces, scope.cluster_wide, (*scope.resources, ResourceRef("pods", "", "log")),
                     scope.verbs)
    return None


# ---------------------------------------------------------------------------------------------
# Deciding a call


@dataclass(frozen=True, slots=True)
class CallDecision:
    allowed: bool
    grant: Grant | None  # the grant that allowed the call
    reason: str  # for the audit log


DISCOVERY_ALLOWED = CallDecision(True, None, "discovery is allowed for any authenticated caller")


def authorize_call(grants: Iterable[Grant], cluster: str, info: RequestInfo, now: float) -> CallDecision:
    """The first of `grants` (the caller's, from `SQLiteStore.active_grants_for`) that allows the call."""
    if is_discovery(info):
        return DISCOVERY_ALLOWED
    if not info.is_resource_request:
        return CallDecision(False, None, f"non-resource path {info.path} is not available through the gateway")
    for grant in grants:
        if grant.scope.cluster == cluster and grant.is_active(now) and call_allowed_by(grant.scope, info):
            return CallDecision(True, grant, f"allowed by grant {grant.id}")
    return CallDecision(False, None, "no active grant covers the call")


