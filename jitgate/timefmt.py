"""Durations and timestamps as jitgate writes them: `1h30m`, RFC 3339, audit micro-time."""

from __future__ import annotations

import datetime
import re
import time

# ---------------------------------------------------------------------------------------------
# Durations


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> int:
    """Seconds in `90s`, `15m`, `1h`, `1h30m`, `2d` (units in this order, each at most once)."""
    text = text.strip()
    m = _DURATION.fullmatch(text)
    if not text or m is None:
        raise ValueError(f"invalid duration {text!r}: write it like 90s, 15m, 1h or 1h30m")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def format_duration(seconds: float, units: int | None = None) -> str:
    """The shortest `1h30m`-style text for whole seconds; `units` keeps only the largest ones
    (`units=2`: 3d4h, 1h5m, 59s), for tables people scan."""
    seconds = int(seconds)
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out[:units])


def rfc3339(moment: float | datetime.datetime | None, milliseconds: bool = False) -> str | None:
    """UTC RFC 3339 (`2026-12-01T10:00:00Z`, or with `.123` milliseconds); None stays None.
    A datetime must say its time zone."""
    if moment is None:
        return None
    if isinstance(moment, datetime.datetime):
        if moment.tzinfo is None:
            raise ValueError("naive datetime: its time zone is unknown")
        moment = moment.timestamp()
    if not milliseconds:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
    instant = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc)
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


