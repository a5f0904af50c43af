"""Token buckets per identity: `rate` messages per second on average, bursts of up to `burst`."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
_UNIT = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(text: str) -> float:
    """`10/s`, `600/m`, `5000/h` -> messages per second; `0` or `` -> 0 (no limit)."""
    if text.strip() in ("", "0"):
        return 0.0
    m = _RATE.fullmatch(text)
    if m is None:
        raise ValueError(f"a rate is <number>/<s|m|h>, e.g. 10/s or 600/m; got {text!r}")
    rate = float(m.group(1)) / _UNIT[m.group(2)]
    if rate <= 0:
        raise ValueError("a rate must be more than 0 (or 0 alone for no limit)")
    return rate


class TokenBuckets:
    def __init__(self, rate: float, burst: int, now: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._now = now
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 when a message may pass (one token is taken); else seconds until the next token."""
        if self.rate <= 0:
            return 0.0
        now = self._now()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate
