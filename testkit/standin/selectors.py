"""Label and field selectors, parsed the way kube-apiserver reads `labelSelector=` and `fieldSelector=`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .errors import ApiError

Matcher = Callable[[dict], bool]


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return has and value == self.values[0]
        if self.op == "!=":
            return not has or value != self.values[0]
        if self.op == "in":
            return has and value in self.values
        if self.op == "notin":
            return not has or value not in self.values
        if self.op == "exists":
            return has
        return not has  # "!"


_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(notin|in)\s*\(([^)]*)\)|(==|=|!=)\s*([A-Za-z0-9_.-]*))?\s*$")


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside `in (a,b)` parentheses."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def parse_label_selector(selector: str) -> list[Requirement]:
    reqs = []
    for part in _split_top_level(selector):
        m = _SET_RE.match(part)
        if not m:
            raise ApiError(400, f"unable to parse requirement: found '{part.strip()}', expected: identifier",
                           "BadRequest")
        bang, key, set_op, set_values, op, value = m.groups()
        if bang:
            if set_op or op:
                raise ApiError(400, f"unable to parse requirement: {part.strip()}", "BadRequest")
            reqs.append(Requirement(key, "!"))
        elif set_op:
            reqs.append(Requirement(key, set_op, tuple(v.strip() for v in set_values.split(",") if v.strip())))
        elif op:
            reqs.append(Requirement(key, "!=" if op == "!=" else "=", (value,)))
        else:
            reqs.append(Requirement(key, "exists"))
    return reqs


def label_matcher(selector: str | None) -> Matcher:
    if not selector:
        return lambda obj: True
    reqs = parse_label_selector(selector)
    return lambda obj: all(r.matches(obj.get("metadata", {}).get("labels") or {}) for r in reqs)


def field_value(obj: dict, path: str) -> str:
    """A field as a selector sees it: dotted path, missing -> "", bools lowercase."""
    cur: object = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_matcher(selector: str | None) -> Matcher:
    if not selector:
        return lambda obj: True
    terms: list[tuple[str, bool, str]] = []
    for part in selector.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", part)
        if not m:
            raise ApiError(400, f"invalid selector: '{selector}'; can't understand '{part}'", "BadRequest")
        terms.append((m.group(1), m.group(2) == "!=", m.group(3)))
    return lambda obj: all((field_value(obj, path) != value) if negate else (field_value(obj, path) == value)
                           for path, negate, value in terms)


def name_from_field_selector(selector: str | None) -> str | None:
    """`metadata.name=x` in a field selector, which lets the watch of one object skip the others cheaply."""
    for part in (selector or "").split(","):
        m = re.match(r"^\s*metadata\.name\s*==?\s*(.+?)\s*$", part)
        if m:
            return m.group(1)
    return None
