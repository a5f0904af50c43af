"""The resource types the stand-in serves, and the discovery documents kubectl reads to find them.

One `ResourceType` per resource drives everything else: routing, list kinds, the legacy discovery
documents (/api, /api/v1, /apis, /apis/apps/v1) and the aggregated ones kubectl >= 1.30 asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STANDARD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Subresource:
    name: str
    kind: str
    verbs: tuple[str, ...]
    # The kind's group/version when it differs from the parent's (deployments/scale is autoscaling/v1).
    group: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = STANDARD_VERBS
    subresources: tuple[Subresource, ...] = ()
    # Only pods/deployments/... are "real" storage; review-style resources exist only as POST targets.
    stored: bool = True

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    api_version = group_version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def key(self) -> tuple[str, str]:
        return self.group, self.plural

    def subresource(self, name: str) -> Subresource | None:
        return next((s for s in self.subresources if s.name == name), None)

    def qualified(self) -> str:
        """`pods` or `deployments.apps`: how kube names the resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


_STATUS_VERBS = ("get", "patch", "update")

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", "namespace", False, ("ns",),
                 verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
                 subresources=(Subresource("status", "Namespace", _STATUS_VERBS),)),
    ResourceType("", "v1", "nodes", "Node", "node", False, ("no",),
                 subresources=(Subresource("status", "Node", _STATUS_VERBS),)),
    ResourceType("", "v1", "pods", "Pod", "pod", True, ("po",), ("all",),
                 subresources=(
                     Subresource("attach", "PodAttachOptions", ("create", "get")),
                     Subresource("exec", "PodExecOptions", ("create", "get")),
                     Subresource("log", "Pod", ("get",)),
                     Subresource("portforward", "PodPortForwardOptions", ("create", "get")),
                     Subresource("status", "Pod", _STATUS_VERBS),
                 )),
    ResourceType("", "v1", "secrets", "Secret", "secret", True),
    ResourceType("", "v1", "configmaps", "ConfigMap", "configmap", True, ("cm",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", "serviceaccount", True, ("sa",)),
    ResourceType("", "v1", "services", "Service", "service", True, ("svc",), ("all",),
                 subresources=(Subresource("status", "Service", _STATUS_VERBS),)),
    ResourceType("", "v1", "events", "Event", "event", True, ("ev",)),
    ResourceType("apps", "v1", "deployments", "Deployment", "deployment", True, ("deploy",), ("all",),
                 subresources=(
                     Subresource("scale", "Scale", _STATUS_VERBS, group="autoscaling", version="v1"),
                     Subresource("status", "Deployment", _STATUS_VERBS),
                 )),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", "replicaset", True, ("rs",), ("all",),
                 subresources=(Subresource("status", "ReplicaSet", _STATUS_VERBS),)),
    ResourceType("authentication.k8s.io", "v1", "selfsubjectreviews", "SelfSubjectReview", "selfsubjectreview",
                 False, verbs=("create",), stored=False),
    ResourceType("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview",
                 "selfsubjectaccessreview", False, verbs=("create",), stored=False),
)


@dataclass
class Catalogue:
    """Lookup of resource types by group/version/plural, and the discovery documents built from them."""

    resources: tuple[ResourceType, ...] = RESOURCES
    _by_path: dict[tuple[str, str, str], ResourceType] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_path = {(r.group, r.version, r.plural): r for r in self.resources}

    def find(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        return next((r for r in self.resources if r.api_version == api_version and r.kind == kind), None)

    def groups(self) -> dict[str, list[str]]:
        """Non-core group -> versions, in first-seen order."""
        out: dict[str, list[str]] = {}
        for r in self.resources:
            if r.group and r.version not in out.setdefault(r.group, []):
                out[r.group].append(r.version)
        return out

    def has_group_version(self, group: str, version: str) -> bool:
        return any(r.group == group and r.version == version for r in self.resources)

    # Legacy discovery ----------------------------------------------------------------------------

    def api_versions(self, server_address: str) -> dict:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        }

    def api_group(self, group: str) -> dict:
        versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in self.groups()[group]]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
                "preferredVersion": versions[0]}

    def api_group_list(self) -> dict:
        groups = [self.api_group(g) for g in self.groups()]
        for g in groups:
            del g["kind"], g["apiVersion"]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def api_resource_list(self, group: str, version: str) -> dict:
        resources = []
        for r in self.resources:
            if r.group != group or r.version != version:
                continue
            entry = {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                     "kind": r.kind, "verbs": list(r.verbs)}
            if r.short_names:
                entry["shortNames"] = list(r.short_names)
            if r.categories:
                entry["categories"] = list(r.categories)
            resources.append(entry)
            for s in r.subresources:
                sub = {"name": f"{r.plural}/{s.name}", "singularName": "", "namespaced": r.namespaced,
                       "kind": s.kind, "verbs": list(s.verbs)}
                if s.group is not None:
                    sub["group"], sub["version"] = s.group, s.version
                resources.append(sub)
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}

    # Aggregated discovery (apidiscovery.k8s.io/v2) -----------------------------------------------

    def _discovery_resource(self, r: ResourceType) -> dict:
        entry: dict = {
            "resource": r.plural,
            "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
            "scope": "Namespaced" if r.namespaced else "Cluster",
            "singularResource": r.singular,
            "verbs": list(r.verbs),
        }
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        if r.subresources:
            entry["subresources"] = [
                {"subresource": s.name,
                 "responseKind": {"group": r.group if s.group is None else s.group,
                                  "version": r.version if s.version is None else s.version,
                                  "kind": s.kind},
                 "verbs": list(s.verbs)}
                for s in r.subresources
            ]
        return entry

    def aggregated(self, legacy: bool, api_version: str) -> dict:
        """APIGroupDiscoveryList for /api (legacy=True: the core group) or /apis (everything else)."""
        if legacy:
            names = [""]
        else:
            names = list(self.groups())
        items = []
        for name in names:
            versions = self.groups()[name] if name else ["v1"]
            items.append({
                "metadata": {"name": name, "creationTimestamp": None},
                "versions": [
                    {"version": v, "freshness": "Current",
                     "resources": [self._discovery_resource(r) for r in self.resources
                                   if r.group == name and r.version == v]}
                    for v in versions
                ],
            })
        return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{api_version}",
                "metadata": {}, "items": items}
