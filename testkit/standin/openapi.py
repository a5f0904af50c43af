"""Just enough OpenAPI v3 for kubectl: per group-version documents listing each resource's operations.

`kubectl create/apply` (--validate=strict, the default) asks /openapi/v3 whether the server supports
the `fieldValidation` query parameter on PATCH of the kind; if so it leaves validation to the server
instead of downloading full schemas. There are no schemas here, so `kubectl apply` computes its
strategic merge patches from its compiled-in types, as it does for any server without them.
"""

from __future__ import annotations

import hashlib
import json

from .resources import Catalogue, ResourceType

PATCH_TYPES = ("application/apply-patch+yaml", "application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json")


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _param(name: str, where: str = "query", required: bool = False) -> dict:
    return {"name": name, "in": where, "required": required, "schema": {"type": "string", "uniqueItems": True}}


def _operation(rt: ResourceType, action: str, op_id: str, params: list[dict], body: tuple[str, ...] = ()) -> dict:
    op: dict = {
        "operationId": op_id,
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{_schema_name(rt)}"}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
    }
    if body:
        op["requestBody"] = {"content": {t: {"schema": {"$ref": f"#/components/schemas/{_schema_name(rt)}"}}
                                         for t in body}, "required": True}
    return op


def _schema_name(rt: ResourceType) -> str:
    return f"io.k8s.api.{rt.group.split('.')[0] or 'core'}.{rt.version}.{rt.kind}"


def group_version_document(catalogue: Catalogue, group: str, version: str) -> dict:
    prefix = "/" + _gv_path(group, version)
    paths: dict[str, dict] = {}
    schemas: dict[str, dict] = {}
    for rt in catalogue.resources:
        if rt.group != group or rt.version != version:
            continue
        base = f"{prefix}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{prefix}/{rt.plural}"
        scope = [_param("namespace", "path", True)] if rt.namespaced else []
        name = "Namespaced" + rt.kind if rt.namespaced else rt.kind
        gv = (group.split(".")[0].capitalize() if group else "Core") + version.capitalize()
        write = [_param("dryRun"), _param("fieldManager"), _param("fieldValidation")]
        collection: dict = {"parameters": scope}
        if "list" in rt.verbs:
            collection["get"] = _operation(rt, "list", f"list{gv}{name}", [_param("labelSelector"),
                                                                             _param("fieldSelector"),
                                                                             _param("limit"), _param("watch")])
        if "create" in rt.verbs:
            collection["post"] = _operation(rt, "post", f"create{gv}{name}", write, ("application/json",))
        paths[base] = collection
        if rt.stored:
            item: dict = {"parameters": scope + [_param("name", "path", True)],
                          "get": _operation(rt, "get", f"read{gv}{name}", []),
                          "put": _operation(rt, "put", f"replace{gv}{name}", write, ("application/json",)),
                          "patch": _operation(rt, "patch", f"patch{gv}{name}", write + [_param("force")],
                                              PATCH_TYPES),
                          "delete": _operation(rt, "delete", f"delete{gv}{name}", [_param("dryRun")])}
            paths[f"{base}/{{name}}"] = item
        # Deliberately no x-kubernetes-group-version-kind here: with it, kubectl would compute apply
        # patches from these (empty) schemas instead of from its built-in types.
        schemas[_schema_name(rt)] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.0"}, "paths": paths,
            "components": {"schemas": schemas}}


def _group_versions(catalogue: Catalogue) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for rt in catalogue.resources:
        if (rt.group, rt.version) not in out:
            out.append((rt.group, rt.version))
    return out


def index(catalogue: Catalogue) -> dict:
    """/openapi/v3: each group-version's document, addressed with a content hash as kube does."""
    paths = {}
    for group, version in _group_versions(catalogue):
        doc = json.dumps(group_version_document(catalogue, group, version), sort_keys=True).encode()
        digest = hashlib.sha512(doc).hexdigest()[:128].upper()
        path = _gv_path(group, version)
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": paths}


def document_for_path(catalogue: Catalogue, path: str) -> dict | None:
    """The document for `/openapi/v3/<path>` (e.g. `api/v1`, `apis/apps/v1`), or None."""
    for group, version in _group_versions(catalogue):
        if _gv_path(group, version) == path:
            return group_version_document(catalogue, group, version)
    return None
