"""Which session a call belongs to.

A session is the activity of one identity under one grant: `<user>-<grant id>`. Calls of a known
identity without a grant (denials, discovery, the access API) go to that identity's session of the
hour, `<user>-<YYYYMMDDHH>` (UTC); calls nobody could be identified for go to `anonymous-<YYYYMMDDHH>`.
`<user>` is the username as a slug (`alice@example.com` -> `alice-example-com`). Ids are folder names:
lower-case letters, digits and `-` only.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import re
import time
from dataclasses import dataclass

from jitgate.timefmt import parse_duration

ANONYMOUS = "anonymous"
GRANT, HOUR = "grant", "hour"

_NOT_SLUG = re.compile(r"[^a-z0-9]+")
SESSION_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")


@functools.lru_cache(maxsize=4096)
def slug(text: str, limit: int = 48) -> str:
    return _NOT_SLUG.sub("-", text.lower()).strip("-")[:limit].strip("-")


@functools.lru_cache(maxsize=64)
def _hour(hour: int) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(hour * 3600))


def hour_of(timestamp: float) -> str:
    return _hour(int(timestamp // 3600))


@dataclass(frozen=True, slots=True)
class SessionRef:
    id: str
    kind: str  # GRANT, HOUR or ANONYMOUS
    user: str = ""  # username, "" when anonymous
    grant: str = ""
    rule: str = ""
    cluster: str = ""

    def disambiguated(self) -> SessionRef:
        """The same session under an id that also names a hash of the user: for the rare two
        usernames with one slug (`a.b@x` and `a-b@x`)."""
        digest = hashlib.sha256(self.user.encode()).hexdigest()[:6]
        head, _, tail = self.id.rpartition("-") if self.kind == HOUR else (self.id, "", "")
        new = f"{head}-{digest}-{tail}" if tail else f"{self.id}-{digest}"
        return SessionRef(new, self.kind, self.user, self.grant, self.rule, self.cluster)


def session_for(record: dict, when: float) -> SessionRef:
    """The session of a call from its plain record (`Call.record()`) and its start time."""
    user = (record.get("user") or {}).get("username") or ""
    cluster = record.get("cluster") or ""
    if not user:
        return SessionRef(f"{ANONYMOUS}-{hour_of(when)}", ANONYMOUS, cluster=cluster)
    user_slug = slug(user) or "user"
    grant = record.get("grant") or ""
    if grant:
        return SessionRef(f"{user_slug}-{slug(grant, 64)}", GRANT, user, grant, record.get("rule") or "", cluster)
    return SessionRef(f"{user_slug}-{hour_of(when)}", HOUR, user, cluster=cluster)


_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def parse_when(text: str, now: float) -> float:
    """A moment for session filters: `2h`, `30m`, `7d` (that long before `now`), an RFC 3339 UTC time
    (`2026-12-01T10:00:00Z`), or a date (`2026-12-01`, UTC midnight). Raises ValueError."""
    text = text.strip()
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    for fmt in _TIME_FORMATS:
        try:
            return float(calendar.timegm(time.strptime(text.replace("z", "Z"), fmt)))
        except ValueError:
            continue
    raise ValueError(f"invalid time {text!r}: write 2h, 7d, 2026-12-01 or 2026-12-01T10:00:00Z")
