"""Who may call which tool, read which resource and get which prompt of which MCP server.

A rule is about one kind of target: tool calls (`tools/call`; a rule that names `tools`, or none of
`tools`, `resources`, `prompts`), resource reads (`resources/read`; a rule that names `resources`,
URI patterns) or prompts (`prompts/get`; a rule that names `prompts`). It matches when every condition
it names holds (an absent condition matches anything; a list is alternatives): the caller's username
(`users`) or any of their groups (`groups`), the server's name (`servers`), the target's name (the
tool, the resource URI, the prompt), patterns on named arguments (`arguments`, tools and prompts:
every named argument must be present and match one of its patterns) and the tool's annotations
(`annotations`: exact booleans). Patterns are globs (`prod*`) or regular expressions written
`re:<expression>` (searched). An argument that is not a string is matched as its compact JSON text
(`true`, `42`, `["sh","-c","rm -rf /"]`).

Annotations are the server's hints from `tools/list`; they are believed only for servers the policy
trusts. Anywhere else (and for a tool the front has not seen listed) a tool has the protocol's
defaults: `readOnlyHint` false, `destructiveHint` true, `idempotentHint` false, `openWorldHint` true.

Deny wins, then require-approval, then allow; among equals the first rule in the policy. Nothing
allows by default: a call, read or prompt no allow rule matches is denied.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from jitgate.guardrails.rules import Pattern


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require-approval"


PRECEDENCE = (Action.DENY, Action.REQUIRE_APPROVAL, Action.ALLOW)


class Kind(StrEnum):
    """What a rule (and a judged message) is about, with the method that carries it."""

    TOOL = "tool"
    RESOURCE = "resource"
    PROMPT = "prompt"


KIND_OF_METHOD: Mapping[str, Kind] = {"tools/call": Kind.TOOL, "resources/read": Kind.RESOURCE,
                                      "prompts/get": Kind.PROMPT}
METHOD_OF_KIND: Mapping[Kind, str] = {v: k for k, v in KIND_OF_METHOD.items()}
_WHAT = {Kind.TOOL: "call tool", Kind.RESOURCE: "read resource", Kind.PROMPT: "get prompt"}
_NOUN = {Kind.TOOL: "tool", Kind.RESOURCE: "resource", Kind.PROMPT: "prompt"}


@dataclass(frozen=True)
class Approval:
    """How a require-approval rule's calls are held: reviewed under an access rule of the Kubernetes policy."""

    access_rule: str
    approvals: int | None = None  # distinct approvals; None: the access rule's count
    hold: int = 300  # seconds a call is held open while a human decides

# The tool annotations of the MCP schema and their defaults when a tool does not set them.
HINT_DEFAULTS: Mapping[str, bool] = {
    "readOnlyHint": False,
    "destructiveHint": True,
    "idempotentHint": False,
    "openWorldHint": True,
}


@dataclass(frozen=True)
class Annotations:
    """A tool's effective hints: the server's (trusted servers only) over the protocol's defaults."""

    hints: tuple[tuple[str, bool], ...] = tuple(HINT_DEFAULTS.items())
    declared: bool = False
    """True when they come from a trusted server's tools/list; False: the defaults."""

    @classmethod
    def from_tool(cls, tool: Mapping[str, Any]) -> Annotations:
        given = tool.get("annotations")
        given = given if isinstance(given, Mapping) else {}
        hints = tuple((k, given[k] if isinstance(given.get(k), bool) else v) for k, v in HINT_DEFAULTS.items())
        return cls(hints, True)

    @functools.cached_property
    def _by_name(self) -> dict[str, bool]:
        return dict(self.hints)

    def get(self, hint: str) -> bool:
        return self._by_name.get(hint, HINT_DEFAULTS.get(hint, False))


DEFAULT_ANNOTATIONS = Annotations()


@dataclass(frozen=True)
class Caller:
    username: str
    groups: tuple[str, ...] = ()


def argument_text(value: Any) -> str:
    """How a pattern sees an argument: a string as it is, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Rule:
    name: str
    action: Action
    description: str = ""
    message: str = ""
    users: tuple[Pattern, ...] = ()
    groups: tuple[Pattern, ...] = ()
    servers: tuple[Pattern, ...] = ()
    tools: tuple[Pattern, ...] = ()
    arguments: tuple[tuple[str, tuple[Pattern, ...]], ...] = ()
    annotations: tuple[tuple[str, bool], ...] = ()
    resources: tuple[Pattern, ...] = ()
    prompts: tuple[Pattern, ...] = ()
    approval: Approval | None = None
    source: str = ""  # file:line, for messages

    @property
    def kind(self) -> Kind:
        return Kind.RESOURCE if self.resources else Kind.PROMPT if self.prompts else Kind.TOOL

    def matches_target(self, caller: Caller, server: str, tool: str, annotations: Annotations,
                       kind: Kind = Kind.TOOL) -> bool:
        """Every condition but the arguments."""
        if self.kind is not kind:
            return False
        if self.users and not _any(self.users, (caller.username,)):
            return False
        if self.groups and not _any(self.groups, caller.groups):
            return False
        if self.servers and not _any(self.servers, (server,)):
            return False
        names = self.tools if kind is Kind.TOOL else self.resources if kind is Kind.RESOURCE else self.prompts
        if names and not _any(names, (tool,)):
            return False
        return all(annotations.get(hint) is value for hint, value in self.annotations)

    def matches_arguments(self, arguments: Mapping[str, Any] | None) -> bool:
        if not self.arguments:
            return True
        if not isinstance(arguments, Mapping):
            return False
        for name, patterns in self.arguments:
            if name not in arguments:
                return False
            text = argument_text(arguments[name])
            if not any(p.matches(text) for p in patterns):
                return False
        return True

    def why(self) -> str:
        return self.message or self.description


def _any(patterns: Iterable[Pattern], values: Iterable[str]) -> bool:
    return any(p.matches(v) for v in values for p in patterns)


@dataclass(frozen=True)
class ToolCall:
    caller: Caller
    server: str
    tool: str
    arguments: Mapping[str, Any] | None
    annotations: Annotations = DEFAULT_ANNOTATIONS
    kind: Kind = Kind.TOOL
    """`tool` is the tool's name, a resource's URI or a prompt's name."""


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str | None
    message: str
    """What the caller reads: why, and what to do about it (empty when allowed)."""
    approval: Approval | None = None
    """A require-approval rule's hold (None: the call can only be refused)."""

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


def decide(rules: Iterable[Rule], call: ToolCall, trusted: bool = False) -> Decision:
    """`trusted`: the server's annotations would count (only for the message when they are unknown)."""
    best: Rule | None = None
    for rule in rules:
        if not rule.matches_target(call.caller, call.server, call.tool, call.annotations, call.kind):
            continue
        if not rule.matches_arguments(call.arguments):
            continue
        if best is None or PRECEDENCE.index(rule.action) < PRECEDENCE.index(best.action):
            best = rule
            if rule.action is Action.DENY:
                break
    if best is None:
        return Decision(Action.DENY, None, no_rule_message(call, trusted))
    if best.action is Action.ALLOW:
        return Decision(Action.ALLOW, best.name, "")
    noun = _NOUN[call.kind]
    if best.action is Action.DENY:
        why = f": {best.why()}" if best.why() else ""
        return Decision(Action.DENY, best.name,
                        f"jitgate: rule '{best.name}' denies {noun} '{call.tool}' on MCP server '{call.server}'{why}. "
                        "The call was not made; do not retry it as it is.")
    why = f" ({best.why()})" if best.why() else ""
    if best.approval is not None:
        return Decision(Action.REQUIRE_APPROVAL, best.name,
                        f"jitgate: {noun} '{call.tool}' on MCP server '{call.server}' needs a human's approval under "
                        f"rule '{best.name}'{why}.", best.approval)
    return Decision(Action.REQUIRE_APPROVAL, best.name,
                    f"jitgate: {noun} '{call.tool}' on MCP server '{call.server}' needs a human's approval under rule "
                    f"'{best.name}'{why}. The call was not made. The rule names no `approval` (the access rule whose "
                    "reviewers decide), so it cannot be held for one: ask a person to make this call, or the owner of "
                    "the jitgate MCP policy for a rule that allows it.")


def no_rule_message(call: ToolCall, trusted: bool = False) -> str:
    if call.annotations.declared:
        hints = ""
    elif trusted:
        hints = (" (the gateway has not seen it in this server's tools/list yet, so it counts as destructive; "
                 "list the tools, then call again)")
    else:
        hints = " (its annotations are not trusted, so it counts as destructive)"
    if call.kind is not Kind.TOOL:
        hints = ""
    with_arguments = " with these arguments" if call.kind is not Kind.RESOURCE else ""
    return (f"jitgate: no rule allows {call.caller.username} to {_WHAT[call.kind]} '{call.tool}'{hints} on MCP "
            f"server '{call.server}'{with_arguments}. The call was not made; ask the owner of the jitgate MCP policy "
            "for a rule (mcp.rules) that allows it.")


@dataclass(frozen=True)
class Listing:
    """Whether tools/list shows a tool to a caller, and whether calling it needs an approval."""

    visible: bool
    approval: bool = False


def listing(rules: Iterable[Rule], caller: Caller, server: str, tool: str, annotations: Annotations,
            kind: Kind = Kind.TOOL) -> Listing:
    """A tool (resource, prompt) is listed when some allow or require-approval rule could admit a call
    (whatever its arguments) and no deny rule refuses every call of it (one without argument conditions)."""
    admits = approval_always = False
    for rule in rules:
        if not rule.matches_target(caller, server, tool, annotations, kind):
            continue
        if rule.action is Action.DENY:
            if not rule.arguments:
                return Listing(False)
        elif rule.action is Action.REQUIRE_APPROVAL:
            admits = True
            approval_always = approval_always or not rule.arguments
        else:
            admits = True
    return Listing(admits, admits and approval_always)
