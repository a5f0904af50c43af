"""Request bodies judged on what they would produce, and the findings body rules look at.

A create or update body is the object. A patch is judged conservatively, without reading the
current object: JSON merge patch, strategic merge patch and server-side apply bodies are
object-shaped, so their values are judged as an object (a patch that sets a watched field is
judged on the value it sets); a JSON patch is turned into the object its `add`/`replace` values
would write at their paths. A `copy` or `move` into an object cannot be judged without the current
object: the body counts as unreadable, and a rule that needs it matches (fail closed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from jitgate.guardrails import protobuf

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PROTOBUF = "application/vnd.kubernetes.protobuf"

# Where a resource keeps its pod spec (the URL's resource decides, as for the apiserver, never the
# body's kind).
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "pods": ("spec",),
    "podtemplates": ("template", "spec"),
    "deployments": ("spec", "template", "spec"),
    "replicasets": ("spec", "template", "spec"),
    "statefulsets": ("spec", "template", "spec"),
    "daemonsets": ("spec", "template", "spec"),
    "replicationcontrollers": ("spec", "template", "spec"),
    "jobs": ("spec", "template", "spec"),
    "cronjobs": ("spec", "jobTemplate", "spec", "template", "spec"),
}
BINDINGS = frozenset({"rolebindings", "clusterrolebindings"})
ROLES = frozenset({"roles", "clusterroles"})
RBAC_GROUP = "rbac.authorization.k8s.io"
ESCALATING_VERBS = frozenset({"*", "escalate", "bind", "impersonate"})


class UnreadableBody(ValueError):
    """The body cannot be judged; the message says why (it never quotes the body)."""


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def produced_object(content_type: str, body: bytes) -> dict:
    """The object (or the part of it) the request would write, judged conservatively."""
    kind = media_type(content_type) or JSON
    if kind == PROTOBUF:
        try:
            return protobuf.decode(body)
        except ValueError as e:
            raise UnreadableBody(f"a protobuf body the gateway cannot read ({e}); send JSON") from None
    if kind not in (JSON, MERGE_PATCH, STRATEGIC_PATCH, JSON_PATCH, APPLY_PATCH):
        raise UnreadableBody(f"a body of type {kind!r} the gateway cannot read")
    try:
        doc = json.loads(body)
    except ValueError:
        if kind != APPLY_PATCH:
            raise UnreadableBody("a body that is not valid JSON") from None
        doc = _yaml(body)
    if kind == JSON_PATCH:
        return json_patch_values(doc)
    if not isinstance(doc, dict):
        raise UnreadableBody("a body that is not an object")
    return doc


def _yaml(body: bytes) -> Any:
    from ruamel.yaml import (
        YAML,  # only server-side apply sends YAML; kubectl sends JSON there too
    )

    try:
        docs = list(YAML(typ="safe", pure=True).load_all(body.decode("utf-8")))
    except Exception:
        raise UnreadableBody("an apply body that is neither JSON nor YAML") from None
    if len(docs) != 1:
        raise UnreadableBody("an apply body with more than one document")
    return docs[0]


def json_patch_values(ops: Any) -> dict:
    """The object a JSON patch's values would write: each add/replace value set at its path."""
    if not isinstance(ops, list):
        raise UnreadableBody("a JSON patch that is not a list of operations")
    root: dict = {}
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("path"), str):
            raise UnreadableBody("a JSON patch operation without a path")
        verb = op.get("op")
        if verb in ("add", "replace"):
            _set_path(root, _pointer(op["path"]), op.get("value"))
        elif verb in ("copy", "move"):
            raise UnreadableBody(f"a JSON patch {verb} needs the current object to be judged")
        elif verb not in ("remove", "test"):
            raise UnreadableBody(f"an unknown JSON patch operation {verb!r}")
    return root


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise UnreadableBody("a JSON patch path that is not a JSON pointer")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _set_path(root: dict, parts: list[str], value: Any) -> None:
    """Set `value` at `parts`; list indexes become list items (order does not matter to the judge)."""
    if not parts:
        if isinstance(value, dict):
            root.update(value)
        return
    node: Any = root
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            child: Any = value if last else ({} if not (parts[i + 1] == "-" or parts[i + 1].isdigit()) else [])
            node.append(child)
            node = child
            continue
        if last:
            node[part] = value
            return
        nxt = parts[i + 1]
        default: Any = [] if (nxt == "-" or nxt.isdigit()) else {}
        existing = node.get(part)
        if not isinstance(existing, (dict, list)):
            existing = node[part] = default
        node = existing


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _items(value: Any) -> Iterator[dict]:
    # Strategic merge patches may carry `$patch`/`$setElementOrder` keys: ignored, values judged.
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))
    elif isinstance(value, dict):  # a JSON patch's list written as {index: item} never happens; be lenient
        yield from (v for v in value.values() if isinstance(v, dict))


def _is_true(value: Any) -> bool:
    return value is True


def pod_spec_findings(spec: Any) -> set[str]:
    found: set[str] = set()
    if not isinstance(spec, dict):
        return found
    for key, finding in (("hostNetwork", "host-network"), ("hostPID", "host-pid"), ("hostIPC", "host-ipc")):
        if _is_true(spec.get(key)):
            found.add(finding)
    for volume in _items(spec.get("volumes")):
        if volume.get("hostPath") is not None:
            found.add("host-path")
    pod_sc = spec.get("securityContext")
    if isinstance(pod_sc, dict) and (pod_sc.get("runAsUser") == 0 or pod_sc.get("runAsNonRoot") is False):
        found.add("run-as-root")
    containers = [*_items(spec.get("containers")), *_items(spec.get("initContainers")), *_items(spec.get("ephemeralContainers"))]
    for container in containers:
        sc = container.get("securityContext")
        if not isinstance(sc, dict):
            continue
        if _is_true(sc.get("privileged")):
            found.add("privileged")
        caps = sc.get("capabilities")
        if isinstance(caps, dict) and caps.get("add"):
            found.add("capabilities")
        if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
            found.add("run-as-root")
    return found


def findings(group: str, resource: str, subresource: str, obj: dict) -> frozenset[str]:
    """What the body inspectors find in the object a call would produce on `resource`."""
    found: set[str] = set()
    if subresource in ("", "ephemeralcontainers"):
        path = POD_SPEC_PATHS.get(resource)
        if path is not None and group in ("", "apps", "batch"):
            found |= pod_spec_findings(_at(obj, path))
    if group == RBAC_GROUP and not subresource:
        if resource in BINDINGS:
            ref = obj.get("roleRef")
            if isinstance(ref, dict) and ref.get("name") == "cluster-admin":
                found.add("cluster-admin-binding")
        elif resource in ROLES:
            for rule in _items(obj.get("rules")):
                verbs = rule.get("verbs")
                if isinstance(verbs, list) and ESCALATING_VERBS & {v for v in verbs if isinstance(v, str)}:
                    found.add("rbac-escalation")
    return frozenset(found)


def object_name(obj: dict) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""
