"""The guardrail rule model: what a rule matches on and what it does.

A rule matches a call when every condition it names holds (conditions it leaves out match
anything); each condition is a set of alternatives. Patterns are globs (`team-*`), or regular
expressions written `re:<expression>` (searched, not anchored).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Action(StrEnum):
    DENY = "deny"
    REQUIRE_APPROVAL = "require-approval"
    AUDIT = "audit"


# Deny wins, then require-approval, then audit.
PRECEDENCE = {Action.DENY: 0, Action.REQUIRE_APPROVAL: 1, Action.AUDIT: 2}

# What the body inspectors can find in an object a call would produce (see jitgate.guardrails.bodies).
FINDINGS: dict[str, str] = {
    "privileged": "a container runs privileged",
    "capabilities": "a container adds Linux capabilities",
    "host-path": "a pod mounts a hostPath volume",
    "host-network": "a pod uses the node's network (hostNetwork)",
    "host-pid": "a pod uses the node's PID namespace (hostPID)",
    "host-ipc": "a pod uses the node's IPC namespace (hostIPC)",
    "run-as-root": "a pod or container runs as root (runAsUser 0 or runAsNonRoot false)",
    "cluster-admin-binding": "a role binding grants cluster-admin",
    "rbac-escalation": "a role allows every verb (*) or escalate, bind or impersonate",
}


class Pattern:
    """A glob or `re:` expression, compiled once; ValueError for a bad one (reported at its line)."""

    __slots__ = ("text", "literal", "_match")

    def __init__(self, text: str) -> None:
        self.text = text
        if text.startswith("re:"):
            try:
                compiled = re.compile(text[3:])
            except re.error as e:
                raise ValueError(f"invalid regular expression {text[3:]!r}: {e}") from None
            self.literal = None
            self._match = lambda s: compiled.search(s) is not None
        elif any(c in text for c in "*?["):
            try:
                compiled = re.compile(fnmatch.translate(text), re.DOTALL)
            except re.error as e:
                raise ValueError(f"invalid pattern {text!r}: {e}") from None
            self.literal = None
            self._match = lambda s: compiled.match(s) is not None
        else:
            self.literal = text
            self._match = text.__eq__

    def matches(self, value: str) -> bool:
        return self._match(value)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def any_matches(patterns: Iterable[Pattern], value: str) -> bool:
    return any(p.matches(value) for p in patterns)


@dataclass(frozen=True, slots=True)
class ResourceMatch:
    """`resource[.group][/subresource]`; `*` in a part matches anything there. A rule naming `pods`
    matches only the pods themselves, `pods/*` any of their subresources, `pods/exec` exec only."""

    resource: str
    group: str = ""
    subresource: str = ""
    any_group: bool = False  # `*.*`-style or a bare `*`

    @classmethod
    def parse(cls, text: str) -> ResourceMatch:
        text = text.strip()
        if not text or any(c.isspace() for c in text):
            raise ValueError(f"invalid resource {text!r}: write it as resource[.group][/subresource]")
        if text == "*":  # any resource, any group, with or without a subresource
            return cls("*", "", "*", any_group=True)
        name, _, sub = text.partition("/")
        resource, dot, group = name.partition(".")
        if not resource:
            raise ValueError(f"invalid resource {text!r}")
        return cls(resource, group, sub, any_group=(resource == "*" and not dot) or group == "*")

    def matches(self, group: str, resource: str, subresource: str) -> bool:
        if self.resource != "*" and self.resource != resource:
            return False
        if not self.any_group and self.group != group:
            return False
        if self.subresource == "*":
            return True
        return self.subresource == subresource

    def __str__(self) -> str:
        text = self.resource + (f".{self.group}" if self.group else "")
        return text + (f"/{self.subresource}" if self.subresource else "")


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What a guardrail can know about one call (plain values; built by the adapter or by
    `jitgate policy explain`)."""

    cluster: str
    verb: str
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    username: str = ""
    groups: tuple[str, ...] = ()
    access_rule: str = ""  # the access rule of the grant the call runs under
    grant: str = ""
    command: tuple[str, ...] = ()  # exec/attach argv
    is_resource_request: bool = True


@dataclass(frozen=True)
class Guardrail:
    name: str
    action: Action
    message: str = ""
    dry_run: bool = False
    clusters: tuple[Pattern, ...] = ()
    namespaces: tuple[Pattern, ...] = ()
    resources: tuple[ResourceMatch, ...] = ()
    verbs: frozenset[str] = frozenset()
    names: tuple[Pattern, ...] = ()
    users: tuple[Pattern, ...] = ()
    groups: tuple[Pattern, ...] = ()
    access_rules: tuple[Pattern, ...] = ()
    argv: tuple[Pattern, ...] = ()  # element-wise from argv[0]; the command may have more arguments
    commands: tuple[Pattern, ...] = ()  # on the joined command line, and on each `sh -c` script
    body: frozenset[str] = frozenset()  # findings (FINDINGS) of which any one matches
    approvals: int | None = None  # require-approval: distinct approvals needed; None: the access rule's count
    hold_seconds: int | None = None  # require-approval: hold the call this long for the decision; None: refuse at once
    source: str = ""
    order: int = 0  # position in the policy, so outcomes are stable

    @property
    def matches_commands(self) -> bool:
        return bool(self.argv or self.commands)

    def why(self) -> str:
        verb = {Action.DENY: "denies", Action.REQUIRE_APPROVAL: "needs approval for", Action.AUDIT: "marks"}[self.action]
        return self.message or f"guardrail {self.name!r} {verb} this call"

    def matches_call(self, facts: CallFacts, findings: frozenset[str] | None, name: str, commands: bool = True) -> bool:
        """Whether the rule matches; `findings` None means the body could not be judged (a body
        rule then matches: what cannot be read is not let through), `name` the object's name
        (from the body for a create)."""
        if self.clusters and not any_matches(self.clusters, facts.cluster):
            return False
        if self.verbs and facts.verb not in self.verbs:
            return False
        if self.resources and not any(r.matches(facts.api_group, facts.resource, facts.subresource) for r in self.resources):
            return False
        if self.namespaces and not any_matches(self.namespaces, facts.namespace):
            return False
        if self.names and not any_matches(self.names, name):
            return False
        if self.users and not any_matches(self.users, facts.username):
            return False
        if self.groups and not any(any_matches(self.groups, g) for g in facts.groups):
            return False
        if self.access_rules and not any_matches(self.access_rules, facts.access_rule):
            return False
        if commands and self.matches_commands and not self.matches_argv(facts.command):
            return False
        if self.body:
            if findings is None:
                return True
            if not (self.body & findings):
                return False
        return True

    def matches_argv(self, argv: tuple[str, ...]) -> bool:
        if not argv:
            return False
        if self.argv:
            if len(argv) < len(self.argv):
                return False
            if not all(p.matches(a) for p, a in zip(self.argv, argv)):
                return False
        if self.commands:
            return any(any_matches(self.commands, line) for line in command_lines(argv))
        return True

    def matches_line(self, line: str) -> bool:
        """A line typed into an interactive session, checked like a command."""
        try:
            argv = tuple(shlex.split(line))
        except ValueError:
            argv = tuple(line.split())
        if self.argv and not self.matches_argv(argv):
            return False
        if self.commands:
            return any_matches(self.commands, line.strip()) or any(
                any_matches(self.commands, c) for c in command_lines(argv))
        return bool(self.argv)


SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh", "busybox"})


def command_lines(argv: tuple[str, ...]) -> list[str]:
    """The joined command line, plus the script of `<shell> -c <script>` (what the shell runs)."""
    lines = [" ".join(argv)]
    if len(argv) >= 3 and argv[0].rsplit("/", 1)[-1] in SHELLS:
        for i, arg in enumerate(argv[1:-1], 1):
            if arg.startswith("-") and "c" in arg[1:]:
                lines.append(argv[i + 1])
                break
    return lines


@dataclass(frozen=True)
class Match:
    """One matching rule in an outcome."""

    rule: Guardrail
    effective: bool  # False in dry-run: recorded, not enforced

    def to_dict(self) -> dict:
        return {"rule": self.rule.name, "action": str(self.rule.action), "dry_run": not self.effective,
                "why": self.rule.why(), "source": self.rule.source}


@dataclass(frozen=True)
class Outcome:
    """What the guardrails say about a call: the deciding rule (None: nothing to enforce) and all matches."""

    action: Action | None
    rule: Guardrail | None
    matches: tuple[Match, ...] = field(default_factory=tuple)
    unreadable: str = ""  # why the body could not be judged, when a rule needed it

    @property
    def dry_runs(self) -> tuple[Match, ...]:
        return tuple(m for m in self.matches if not m.effective)


NO_OUTCOME = Outcome(None, None)
