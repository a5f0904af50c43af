"""The three patch formats kube accepts on PATCH: JSON merge patch, strategic merge patch, JSON patch.

Strategic merge knows the merge keys of the built-in types the stand-in serves (containers by name,
volumeMounts by mountPath, ...) and the directives kubectl emits ($patch, $retainKeys,
$setElementOrder, $deleteFromPrimitiveList); everything else merges like a JSON merge patch.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ApiError

# Field name -> merge key for lists of objects, as the Go types' `patchMergeKey` tags say.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "ports": "containerPort",  # pod container ports; service ports use "port" (handled below)
    "ownerReferences": "uid",
    "conditions": "type",
    "hostAliases": "ip",
    "secrets": "name",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}
# Primitive lists merged as sets rather than replaced.
MERGED_PRIMITIVE_LISTS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _merge_key(field: str, items: list) -> str | None:
    key = MERGE_KEYS.get(field)
    if field == "ports" and items and isinstance(items[0], dict) and "containerPort" not in items[0]:
        return "port"
    return key


def strategic_merge_patch(target: Any, patch: Any, field: str = "") -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(result.get(name), list):
                result[name] = [v for v in result[name] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        else:
            merged = strategic_merge_patch(result.get(key), value, key)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(field: str, current: Any, patch: list) -> list:
    current = current if isinstance(current, list) else []
    if field in MERGED_PRIMITIVE_LISTS:
        return current + [v for v in patch if v not in current]
    if patch and all(isinstance(p, dict) for p in patch):
        if any(p.get("$patch") == "replace" for p in patch):
            return [copy.deepcopy(p) for p in patch if p.get("$patch") != "replace"]
        key = _merge_key(field, patch if patch else current)
        if key:
            result = copy.deepcopy(current)
            for item in patch:
                pos = next((i for i, c in enumerate(result)
                            if isinstance(c, dict) and c.get(key) == item.get(key)), None)
                if item.get("$patch") == "delete":
                    if pos is not None:
                        result.pop(pos)
                elif pos is None:
                    result.append(strategic_merge_patch({}, item, field))
                else:
                    result[pos] = strategic_merge_patch(result[pos], item, field)
            return result
    return copy.deepcopy(patch)


# RFC 6902 JSON patch ------------------------------------------------------------------------------

def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f'the server rejected our request due to an error in our request: invalid path "{path}"',
                       "Invalid")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise KeyError(part)
    return doc


def _add(doc: Any, parts: list[str], value: Any, replace: bool) -> Any:
    if not parts:
        return value
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif replace:
            parent[int(last)] = value
        else:
            index = int(last)
            if index > len(parent):
                raise IndexError(last)
            parent.insert(index, value)
    elif isinstance(parent, dict):
        if replace and last not in parent:
            raise KeyError(last)
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    parent = _resolve(doc, parts[:-1])
    if isinstance(parent, list):
        parent.pop(int(parts[-1]))
    else:
        del parent[parts[-1]]
    return parent


def json_patch(target: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise ApiError(400, "json: cannot unmarshal object into Go value of type jsonpatch.Patch", "BadRequest")
    doc = copy.deepcopy(target)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        try:
            parts = _pointer(path)
            if kind == "add":
                doc = _add(doc, parts, copy.deepcopy(op["value"]), replace=False)
            elif kind == "replace":
                doc = _add(doc, parts, copy.deepcopy(op["value"]), replace=True)
            elif kind == "remove":
                _remove(doc, parts)
            elif kind in ("move", "copy"):
                source = _pointer(op["from"])
                value = copy.deepcopy(_resolve(doc, source))
                if kind == "move":
                    _remove(doc, source)
                doc = _add(doc, parts, value, replace=False)
            elif kind == "test":
                if _resolve(doc, parts) != op.get("value"):
                    raise ApiError(422, f"the server rejected our request due to an error in our request: "
                                        f"testing value {path} failed", "Invalid")
            else:
                raise ApiError(422, f"Unexpected kind: {kind}", "Invalid")
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "the server rejected our request due to an error in our request: "
                                f"{kind} operation does not apply: doc is missing path: {path}", "Invalid") from None
    return doc
