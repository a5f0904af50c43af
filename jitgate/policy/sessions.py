"""The `sessions:` section: who may see which recorded session through the access API.

    sessions:
      auditors: [oidc:security-auditors]   # see every session (read-only)
      reviewers: true                      # reviewers of an access rule see the sessions of its grants

Whoever a session belongs to always sees it (a requester sees their own). The reviewers of the
access rule a session's grant came from see it too, unless `reviewers: false`: they are the people
who may approve, deny and revoke that rule's grants, and the access API already shows them every
request and grant under it, so they see what the grants were used for — including grants approved
automatically or at once, that no reviewer approved (limiting them to the grants they approved
would leave those unseen). Sessions without a grant (denials, discovery, the identity's session of
the hour) and anonymous ones belong to no rule: only their owner and the auditors see them. Anyone
else is told the session does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from jitgate.policy.schema import Bool, Field, Section, Strings, dataclass_default

if TYPE_CHECKING:
    from jitgate.access.rules import AccessRule
    from jitgate.policy.document import Node

OWNER, REVIEWER, AUDITOR = "owner", "reviewer", "auditor"
_RESERVED_PREFIX = "system:"


class Viewer(Protocol):
    username: str
    groups: Sequence[str]


def _group(name: str) -> str:
    if name.startswith(_RESERVED_PREFIX):
        raise ValueError(f"group {name!r} uses the reserved \"system:\" prefix, which no caller of the access API may have")
    return name


@dataclass(frozen=True)
class SessionsPolicy:
    auditors: tuple[str, ...] = ()  # groups that see every session
    reviewers: bool = True  # reviewers of an access rule see the sessions of its grants

    def visible_as(self, who: Viewer, owner: str, rule: str, rules: Sequence[AccessRule]) -> str | None:
        """Why `who` may see a session of `owner` ("" when anonymous) under access rule `rule` ("" without
        a grant): OWNER, AUDITOR or REVIEWER; None when they may not."""
        if owner and who.username == owner:
            return OWNER
        groups = set(who.groups)
        if not groups.isdisjoint(self.auditors):
            return AUDITOR
        if self.reviewers and rule:
            named = next((r for r in rules if r.name == rule), None)
            if named is not None and named.is_reviewer(groups):
                return REVIEWER
        return None

    def reviewed_rules(self, who: Viewer, rules: Sequence[AccessRule]) -> frozenset[str]:
        """The rules whose grants' sessions `who` sees as a reviewer."""
        if not self.reviewers:
            return frozenset()
        return frozenset(r.name for r in rules if r.is_reviewer(who.groups))

    def is_auditor(self, who: Viewer) -> bool:
        return not set(who.groups).isdisjoint(self.auditors)


SESSIONS = Section(
    "sessions",
    "Who sees which recorded session through the access API (`jitgate sessions` with a gateway). A session's "
    "owner always sees it; anyone else is told it does not exist.",
    (
        Field("auditors", Strings(each=_group), "Groups whose members see every session, of every identity, rule and "
              "cluster (read-only); each view and export is audited.", default=()),
        Field("reviewers", Bool(), "Reviewers of an access rule see the sessions of every grant under it (as they see "
              "its requests and grants); `false`: only owners and auditors see sessions.",
              default=dataclass_default(SessionsPolicy, "reviewers")),
    ),
)


def parse_sessions(node: Node | None) -> SessionsPolicy:
    """The policy's `sessions:` section; without one, owners and rule reviewers see sessions, nobody audits."""
    if node is None:
        return SessionsPolicy()
    v = SESSIONS.read_node(node)
    return SessionsPolicy(auditors=tuple(dict.fromkeys(v["auditors"])), reviewers=v["reviewers"])
