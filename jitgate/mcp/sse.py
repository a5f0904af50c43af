"""`text/event-stream` bodies, event by event, for a stream that must never be buffered whole.

`EventSplitter` takes the body's chunks as they arrive and hands out each complete event (its
lines and the blank line that ends it) as soon as that blank line is in; line ends are `\\r\\n`,
`\\n` or `\\r` as the SSE grammar allows, also when a chunk ends between `\\r` and `\\n`. One event
may not grow past `max_event` bytes (a server that never ends an event is cut off, not buffered).
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(Exception):
    pass


class EventSplitter:
    def __init__(self, max_event: int = 4 * 1024 * 1024) -> None:
        self.max_event = max_event
        self._buf = bytearray()
        self._line = 0  # where the current, unended line starts

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        events: list[bytes] = []
        start = 0
        pos = self._line
        while True:
            m = _LINE_END.search(buf, pos)
            if m is None or (m.end() == len(buf) and buf[m.start()] == 0x0D and m.end() - m.start() == 1):
                break  # no line end yet, or a `\r` whose `\n` may be in the next chunk
            empty = m.start() == pos
            pos = m.end()
            if empty:
                events.append(bytes(buf[start:pos]))
                start = pos
        if start:
            del buf[:start]
            pos -= start
        self._line = pos
        if len(buf) > self.max_event:
            raise EventTooLarge(f"an event of the stream is larger than {self.max_event} bytes")
        return events

    def rest(self) -> bytes:
        """What is left when the stream ends: an event without its blank line (sent as it is)."""
        rest, self._buf, self._line = bytes(self._buf), bytearray(), 0
        return rest


def lines(event: bytes) -> list[bytes]:
    parts = _LINE_END.split(event)
    while parts and parts[-1] == b"":
        parts.pop()
    return parts


def event_data(event: bytes) -> bytes | None:
    """The event's data (its `data:` lines joined with `\\n`), or None when it has none."""
    data = []
    for line in lines(event):
        if line == b"data":
            data.append(b"")
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
    return b"\n".join(data) if data else None


def with_data(event: bytes, data: bytes) -> bytes:
    """The event with its data replaced: its other fields (id, event, retry) and comments kept."""
    kept = [line for line in lines(event) if not (line.startswith(b"data:") or line == b"data")]
    out = b"".join(line + b"\n" for line in kept)
    out += b"".join(b"data: " + part + b"\n" for part in data.split(b"\n"))
    return out + b"\n"
