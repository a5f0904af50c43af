"""kubectl's own questions: SelfSubjectReview, SelfSubjectAccessReview, SelfSubjectRulesReview.

`kubectl auth whoami`, `kubectl auth can-i` and `kubectl auth can-i --list` create these review
objects; they read nothing and change nothing, so the gateway answers them for every authenticated
caller. This module reads their bodies (JSON, or the protobuf kubectl sends: a `runtime.Unknown`
envelope, decoded by k8s.io/api's generated.proto field numbers) and builds the answers; the
mitmproxy side is addons/self_review.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from jitgate.kube.protobuf import MAGIC, ProtobufError, fields
from jitgate.kube.request_info import RequestInfo

# (group, resource) -> the review kind, and the versions each group serves it in.
REVIEWS = {
    ("authentication.k8s.io", "selfsubjectreviews"): "SelfSubjectReview",
    ("authorization.k8s.io", "selfsubjectaccessreviews"): "SelfSubjectAccessReview",
    ("authorization.k8s.io", "selfsubjectrulesreviews"): "SelfSubjectRulesReview",
}
# kubectl auth whoami tries v1, then v1beta1, then v1alpha1 (where a cluster lacks v1).
VERSIONS = {
    "SelfSubjectReview": frozenset({"v1", "v1beta1", "v1alpha1"}),
    "SelfSubjectAccessReview": frozenset({"v1"}),
    "SelfSubjectRulesReview": frozenset({"v1"}),
}
RESOURCE_FIELDS = ("namespace", "verb", "group", "version", "resource", "subresource", "name")

# What the gateway lets any authenticated caller read (jitgate.access.authorize.is_discovery).
DISCOVERY_RULE = {"verbs": ["get"], "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/version",
                                                          "/openapi/*", "/healthz", "/livez", "/readyz"]}


def review_kind(info: RequestInfo) -> str | None:
    """The review kind this call creates, or None when it is something else."""
    if (not info.is_resource_request or info.verb != "create" or info.namespace or info.name
            or info.subresource):
        return None
    kind = REVIEWS.get((info.api_group, info.resource))
    return kind if kind is not None and info.api_version in VERSIONS[kind] else None


class ReviewError(ValueError):
    """The body is not a review kubectl or the apiserver would accept."""


@dataclass(frozen=True, slots=True)
class AccessQuestion:
    """The spec of a SelfSubjectAccessReview: resource attributes, or a non-resource path."""

    verb: str
    namespace: str = ""
    group: str = ""
    version: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""  # set for nonResourceAttributes

    @property
    def is_resource(self) -> bool:
        return not self.path

    def request_info(self) -> RequestInfo:
        """The call this question is about, as the grant check reads calls."""
        if not self.is_resource:
            return RequestInfo(is_resource_request=False, path=self.path, verb=self.verb)
        return RequestInfo(is_resource_request=True, path="", verb=self.verb, api_prefix="apis" if self.group else "api",
                           api_group=self.group, api_version=self.version, namespace=self.namespace,
                           resource=self.resource, subresource=self.subresource, name=self.name)

    def spec(self) -> dict:
        if not self.is_resource:
            return {"nonResourceAttributes": {"path": self.path, "verb": self.verb}}
        attrs = {k: getattr(self, k) for k in RESOURCE_FIELDS if getattr(self, k)}
        return {"resourceAttributes": attrs}


# --- reading bodies ---------------------------------------------------------------------------


def _fields(data: bytes) -> dict[int, list]:
    try:
        return fields(data)
    except ProtobufError as e:
        raise ReviewError(f"malformed protobuf: {e}") from None


def _text(f: dict[int, list], n: int) -> str:
    value = f.get(n, [b""])[-1]
    if not isinstance(value, bytes):
        raise ReviewError("malformed protobuf string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ReviewError("protobuf string is not UTF-8") from None


def _message(f: dict[int, list], n: int) -> dict[int, list]:
    value = f.get(n, [b""])[-1]
    if not isinstance(value, bytes):
        raise ReviewError("malformed protobuf message")
    return _fields(value)


def read_spec(body: bytes, kind: str) -> dict:
    """The `spec` of a review body as JSON, from JSON or protobuf; ReviewError when it is neither
    or is another kind."""
    if body.startswith(MAGIC):
        unknown = _fields(body[len(MAGIC):])
        type_meta = _message(unknown, 1)
        if _text(type_meta, 2) != kind:
            raise ReviewError(f"the body is not a {kind}")
        spec = _message(_fields(unknown.get(2, [b""])[-1] or b""), 2)
        if kind == "SelfSubjectAccessReview":
            if 1 in spec:
                attrs = _message(spec, 1)
                return {"resourceAttributes": {k: _text(attrs, i) for i, k in enumerate(RESOURCE_FIELDS, 1) if i in attrs}}
            if 2 in spec:
                attrs = _message(spec, 2)
                return {"nonResourceAttributes": {"path": _text(attrs, 1), "verb": _text(attrs, 2)}}
            return {}
        if kind == "SelfSubjectRulesReview":
            return {"namespace": _text(spec, 1)} if 1 in spec else {}
        return {}
    try:
        obj = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ReviewError(f"the body is not a {kind} (neither JSON nor protobuf)") from None
    if not isinstance(obj, dict) or obj.get("kind", kind) != kind:
        raise ReviewError(f"the body is not a {kind}")
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise ReviewError("spec must be an object")
    return spec


def access_question(spec: dict) -> AccessQuestion:
    resource, non_resource = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    if (resource is None) == (non_resource is None):
        # The apiserver's validation: exactly one of them.
        raise ReviewError("exactly one of resourceAttributes or nonResourceAttributes must be specified")
    attrs = resource if resource is not None else non_resource
    if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
        raise ReviewError("review attributes must be strings")
    if non_resource is not None:
        return AccessQuestion(verb=attrs.get("verb", ""), path=attrs.get("path", "") or "/")
    return AccessQuestion(**{k: attrs.get(k, "") for k in RESOURCE_FIELDS})


# --- answers ----------------------------------------------------------------------------------


def _review(kind: str, api_version: str, spec: dict, status: dict) -> bytes:
    obj = {"kind": kind, "apiVersion": api_version, "metadata": {"creationTimestamp": None}, "spec": spec,
           "status": status}
    return json.dumps(obj, separators=(",", ":")).encode()


def self_subject_review(api_version: str, username: str, groups: Iterable[str]) -> bytes:
    obj = {"kind": "SelfSubjectReview", "apiVersion": api_version, "metadata": {"creationTimestamp": None},
           "status": {"userInfo": {"username": username, "groups": list(groups)}}}
    return json.dumps(obj, separators=(",", ":")).encode()


def access_review(api_version: str, question: AccessQuestion, allowed: bool, reason: str,
                  denied: bool = False) -> bytes:
    status: dict = {"allowed": allowed}
    if denied and not allowed:
        status["denied"] = True
    if reason:
        status["reason"] = reason
    return _review("SelfSubjectAccessReview", api_version, question.spec(), status)


def access_review_request(question: AccessQuestion) -> bytes:
    """The review the gateway asks the cluster: only the attributes it decided on, as JSON."""
    return _review("SelfSubjectAccessReview", "authorization.k8s.io/v1", question.spec(), {}).replace(
        b',"status":{}', b"")


def cluster_answer(body: bytes) -> tuple[bool, bool, str]:
    """(allowed, denied, reason) from the cluster's SelfSubjectAccessReview answer (JSON: the gateway
    asked for JSON); ReviewError when the answer is not one."""
    try:
        obj = json.loads(body)
        status = obj["status"] if obj.get("kind", "SelfSubjectAccessReview") == "SelfSubjectAccessReview" else None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        status = None
    if not isinstance(status, dict):
        raise ReviewError("the cluster's answer is not a SelfSubjectAccessReview")
    reason = status.get("reason") or status.get("evaluationError") or ""
    return status.get("allowed") is True, status.get("denied") is True, str(reason)


@dataclass(frozen=True, slots=True)
class GrantedScope:
    """What one active grant allows, as rules review entries read it (from jitgate.access.scope.Scope)."""

    grant_id: str
    namespaces: tuple[str, ...]
    cluster_wide: bool
    resources: tuple[tuple[str, str, str], ...]  # (group, resource, subresource); resource "*" for any
    verbs: tuple[str, ...]


def rules_review(namespace: str, scopes: Iterable[GrantedScope], never_by_any: Iterable[str] = ()) -> bytes:
    """The SelfSubjectRulesReview answer: the resource rules the caller's active grants give in
    `namespace` (cluster-wide grants apply everywhere), plus the discovery reads anyone may make.

    `*` in a grant means any resource except the sensitive ones (secrets, pods/exec...), which RBAC
    rules cannot say: such an answer lists `*` and is marked incomplete, naming `never_by_any`.
    The cluster's own RBAC is not consulted: it may allow less.
    """
    rules: list[dict] = []
    any_resource = False
    for scope in scopes:
        if not (scope.cluster_wide or namespace in scope.namespaces):
            continue
        by_group: dict[str, list[str]] = {}
        for group, resource, subresource in scope.resources:
            if resource == "*":
                any_resource = True
                by_group.setdefault("*", []).append("*")
            else:
                by_group.setdefault(group, []).append(f"{resource}/{subresource}" if subresource else resource)
        for group, resources in by_group.items():
            rules.append({"verbs": list(scope.verbs), "apiGroups": [group], "resources": resources})
    status: dict = {"resourceRules": rules, "nonResourceRules": [DISCOVERY_RULE], "incomplete": any_resource}
    if any_resource:
        status["evaluationError"] = ("jitgate: '*' in a grant covers every resource except "
                                     f"{', '.join(never_by_any) or 'the sensitive ones'}, unless the grant names them")
    spec = {"namespace": namespace} if namespace else {}
    return _review("SelfSubjectRulesReview", "authorization.k8s.io/v1", spec, status)
