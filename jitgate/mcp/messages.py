"""What the front does to each message an MCP server sends, in a JSON body or one SSE event.

- a `tools/list` result: the tools the caller may not call are removed, tools that need an
  approval are marked (`_meta["jitgate.dev/approval"] = "required"`); a trusted server's tool
  annotations are learned first, for the decisions on later `tools/call`s; `resources/list` and
  `prompts/list` results alike, by the resource and prompt rules (resource templates are listed as
  they are: a template is no URI a rule can judge, and every read of one is judged);
- every string of a result, an error or a server notification/request (tool results' text and
  `structuredContent`, resource contents, log messages...) passes through the masking detectors:
  secret values become `[masked:<detector>]`.

A message whose request the front knows (the POST it answers) is judged by that request's method;
one on a standalone GET stream or a resumed stream by its shape (a result with a `tools` list).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jitgate.masking.detectors import DetectorSet
from jitgate.mcp.config import McpServer
from jitgate.mcp.rules import (
    DEFAULT_ANNOTATIONS,
    Annotations,
    Caller,
    Kind,
    Rule,
    listing,
)

APPROVAL_META = "jitgate.dev/approval"
MAX_TOOLS_PER_SERVER = 10000


class Unreadable(Exception):
    """A server message the front cannot read, so it is withheld."""


class ToolCatalog:
    """Tool annotations as trusted servers list them; untrusted servers' tools get the defaults."""

    def __init__(self) -> None:
        self._tools: dict[str, dict[str, Annotations]] = {}

    def learn(self, server: McpServer, tools: list) -> None:
        if not server.trusted:
            return
        known = self._tools.setdefault(server.name, {})
        for tool in tools:
            if isinstance(tool, Mapping) and isinstance(tool.get("name"), str):
                if len(known) >= MAX_TOOLS_PER_SERVER and tool["name"] not in known:
                    continue
                known[tool["name"]] = Annotations.from_tool(tool)

    def annotations(self, server: McpServer, tool: str) -> Annotations:
        if not server.trusted:
            return DEFAULT_ANNOTATIONS
        return self._tools.get(server.name, {}).get(tool, DEFAULT_ANNOTATIONS)


@dataclass
class Inspected:
    """One server message after the front: its bytes and what the audit says about it."""

    payload: bytes
    kind: str = ""  # "response", "error", "notification", "request"
    id: Any = None
    method: str | None = None
    is_error: bool = False
    masked: int = 0
    hidden: list[str] = field(default_factory=list)


def mask_strings(value: Any, detectors: DetectorSet) -> tuple[Any, int]:
    """`value` with every string passed through the detectors, and how many values were masked."""
    if isinstance(value, str):
        return detectors.mask_text(value)
    if isinstance(value, list):
        total = 0
        for i, item in enumerate(value):
            value[i], n = mask_strings(item, detectors)
            total += n
        return value, total
    if isinstance(value, dict):
        total = 0
        for key, item in value.items():
            value[key], n = mask_strings(item, detectors)
            total += n
        return value, total
    return value, 0


SECRET_NAME_MARKER = "[masked:secret-name]"


def mask_secret_names(value: Any, detectors: DetectorSet, depth: int = 0) -> int:
    """In place: strings under a key that says secret (`password`, `aws_secret_access_key`...) become
    the marker. For structured values (structuredContent), whose keys the text detectors never see."""
    count = 0
    if depth > 64:
        return 0
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and item and not item.startswith("[masked:") and detectors.is_secret_name(str(key)):
                value[key] = SECRET_NAME_MARKER
                count += 1
            else:
                count += mask_secret_names(item, detectors, depth + 1)
    elif isinstance(value, list):
        for item in value:
            count += mask_secret_names(item, detectors, depth + 1)
    return count


class ServerMessages:
    def __init__(self, rules: tuple[Rule, ...], catalog: ToolCatalog, detectors: DetectorSet) -> None:
        self.rules = rules
        self.catalog = catalog
        self.detectors = detectors

    def inspect(self, payload: bytes, server: McpServer, caller: Caller, methods: Mapping[Any, str]) -> Inspected:
        """`methods`: request id -> method of the requests this body answers."""
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise Unreadable("a message from the MCP server is not JSON") from None
        if not isinstance(message, dict):
            raise Unreadable("a message from the MCP server is not one JSON-RPC object")
        out = Inspected(payload, id=message.get("id"))
        changed = False
        if "method" in message:
            out.kind = "request" if "id" in message else "notification"
            out.method = message["method"] if isinstance(message["method"], str) else None
            part = "params"
        elif "error" in message:
            out.kind, out.is_error, part = "error", True, "error"
            out.method = methods.get(_key(out.id))
        elif "result" in message:
            out.kind, part = "response", "result"
            out.method = methods.get(_key(out.id))
            result = message["result"]
            if isinstance(result, dict):
                out.is_error = result.get("isError") is True
                if out.method == "tools/list" or (out.method is None and isinstance(result.get("tools"), list)):
                    out.method = out.method or "tools/list"
                    changed = self._filter_tools(result, server, caller, out)
                elif out.method == "resources/list" or (out.method is None and isinstance(result.get("resources"), list)):
                    out.method = out.method or "resources/list"
                    changed = self._filter(result, "resources", "uri", Kind.RESOURCE, server, caller, out)
                elif out.method == "prompts/list" or (out.method is None and isinstance(result.get("prompts"), list)):
                    out.method = out.method or "prompts/list"
                    changed = self._filter(result, "prompts", "name", Kind.PROMPT, server, caller, out)
                if isinstance(result.get("structuredContent"), (dict, list)):
                    out.masked += mask_secret_names(result["structuredContent"], self.detectors)
        else:
            raise Unreadable("a message from the MCP server is no JSON-RPC message")
        if part in message and self.detectors.could_detect(payload):
            message[part], found = mask_strings(message[part], self.detectors)
            out.masked += found
        changed = changed or out.masked > 0
        if changed:
            out.payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
        return out

    def _filter_tools(self, result: dict, server: McpServer, caller: Caller, out: Inspected) -> bool:
        tools = result.get("tools")
        if not isinstance(tools, list):
            return False
        self.catalog.learn(server, tools)
        return self._filter(result, "tools", "name", Kind.TOOL, server, caller, out)

    def _filter(self, result: dict, key: str, name_key: str, kind: Kind, server: McpServer, caller: Caller,
                out: Inspected) -> bool:
        items = result.get(key)
        if not isinstance(items, list):
            return False
        kept = []
        changed = False
        for tool in items:
            name = tool.get(name_key) if isinstance(tool, dict) else None
            if not isinstance(name, str):
                changed = True
                continue
            annotations = self.catalog.annotations(server, name) if kind is Kind.TOOL else DEFAULT_ANNOTATIONS
            seen = listing(self.rules, caller, server.name, name, annotations, kind)
            if not seen.visible:
                out.hidden.append(name)
                changed = True
                continue
            if seen.approval:
                meta = tool.get("_meta") if isinstance(tool.get("_meta"), dict) else {}
                tool["_meta"] = {**meta, APPROVAL_META: "required"}
                changed = True
            kept.append(tool)
        result[key] = kept
        return changed


def _key(request_id: Any) -> Any:
    return json.dumps(request_id) if request_id is not None else None


def request_key(request_id: Any) -> Any:
    """How request ids are looked up (1 and "1" are different ids)."""
    return _key(request_id)
