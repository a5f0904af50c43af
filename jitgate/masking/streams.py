"""Incremental maskers for what the cluster streams: watch events, log lines, exec/attach frames.

Each keeps bounded memory whatever the stream's length: a watch masker holds at most one event
(`max_event` bytes), a line masker at most one partial line (`max_line` bytes). A value split
across chunks or frames is still masked because masking happens on whole lines (whole events);
a partial line is released at its end, at the end of the stream, when it grows past `max_line`,
or when the caller's timer calls `flush()` (exec output: so prompts show without a newline).

Plain Python (no mitmproxy).
"""

from __future__ import annotations

import base64
import json
import re

from jitgate.kube.status import status
from jitgate.masking.detectors import TEXT_MARKER, DetectorSet
from jitgate.masking.objects import Masker, MaskingError

MAX_EVENT = 16 * 1024 * 1024  # kube objects are at most ~1.5 MB in etcd; a Table event of many rows more
MAX_LINE = 64 * 1024

_BEGIN_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")
_END_KEY = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")
_KEY_MARKER = TEXT_MARKER.format(name="private-key")
_VALUE_TAIL = re.compile(r"[^\s\"',;&]*")


class WatchMasker:
    """A JSON watch stream (one event per line, as kube-apiserver writes them) masked event by event."""

    def __init__(self, masker: Masker, secrets: bool = False, max_event: int = MAX_EVENT) -> None:
        self.masker = masker
        self.secrets = secrets
        self.max_event = max_event
        self.buffer = bytearray()
        self.masked = 0
        self.failed: str | None = None  # why the stream was cut off

    def feed(self, chunk: bytes) -> bytes:
        """Masked complete events of what has arrived; `b""` ends the stream (the rest is flushed)."""
        if self.failed:
            return b""
        if not chunk:
            rest, self.buffer = bytes(self.buffer), bytearray()
            return self._events(rest) if rest.strip() else b""
        end = chunk.rfind(b"\n")
        if end < 0:
            self.buffer += chunk
            if len(self.buffer) > self.max_event:
                return self._fail(f"a watch event is larger than {self.max_event} bytes")
            return b""
        if self.buffer:
            complete = bytes(self.buffer) + chunk[:end + 1]
            self.buffer = bytearray(chunk[end + 1:])
        else:
            complete, self.buffer = chunk[:end + 1], bytearray(chunk[end + 1:])
        return self._events(complete)

    def _events(self, data: bytes) -> bytes:
        out = []
        mask, secrets = self.masker.mask_json, self.secrets
        for line in data.split(b"\n"):
            if not line or line.isspace():
                continue
            try:
                result = mask(line, secrets)
            except MaskingError as e:
                out.append(self._fail(f"a watch event could not be read for masking: {e}")[:-1])
                break
            self.masked += result.masked
            out.append(result.body)
        return b"\n".join(out) + b"\n" if out else b""

    def _fail(self, why: str) -> bytes:
        """An ERROR event kubectl prints, then nothing more: an unreadable event must not pass."""
        self.failed = why
        self.buffer = bytearray()
        event = {"type": "ERROR", "object": status(502, f"jitgate: {why}, so the watch was ended")}
        return json.dumps(event, separators=(",", ":")).encode() + b"\n"


class LineMasker:
    """Text (log lines, a terminal's output) masked line by line, the partial last line held back."""

    def __init__(self, detectors: DetectorSet, max_line: int = MAX_LINE) -> None:
        self.detectors = detectors
        self.max_line = max_line
        self.held = ""
        self.decoder_rest = b""  # an incomplete UTF-8 sequence at a chunk's end
        self.in_key = False  # inside a private key block: its lines are dropped
        self.value_continues = False  # a flushed partial line ended inside a secret value
        self.masked = 0

    @property
    def holding(self) -> bool:
        return bool(self.held or self.decoder_rest)

    def feed(self, chunk: bytes) -> bytes:
        """Masked complete lines of what has arrived; `b""` ends the stream (the held rest is flushed)."""
        if not chunk:
            return self.flush()
        data = self.decoder_rest + chunk
        try:
            text = data.decode("utf-8")
            self.decoder_rest = b""
        except UnicodeDecodeError as e:
            if e.start >= len(data) - 3 and e.reason == "unexpected end of data":
                text, self.decoder_rest = data[:e.start].decode("utf-8", "replace"), data[e.start:]
            else:
                text, self.decoder_rest = data.decode("utf-8", "replace"), b""
        if self.value_continues:
            text = self._drop_value_tail(text)
        text = self.held + text
        end = text.rfind("\n")
        if end < 0:
            self.held = text
            if len(text) > self.max_line:
                return self.flush()
            return b""
        self.held = text[end + 1:]
        out = self._lines(text[:end + 1])
        if len(self.held) > self.max_line:
            out += self.flush()
        return out

    def flush(self) -> bytes:
        """Release the held partial line, masked (a timer's or the stream end's call)."""
        text, self.held = self.held, ""
        if self.decoder_rest:
            text += self.decoder_rest.decode("utf-8", "replace")
            self.decoder_rest = b""
        if not text:
            return b""
        out = self._line(text)
        # The line may go on with the rest of a secret value: that rest is masked too.
        self.value_continues = out.endswith("]") and out.rstrip("]").endswith(tuple(
            d.marker[:-1] for d in self.detectors.detectors))
        return out.encode()

    def _drop_value_tail(self, text: str) -> str:
        self.value_continues = False
        tail = _VALUE_TAIL.match(text)
        return text[tail.end():] if tail else text

    def _lines(self, text: str) -> bytes:
        return "".join(self._line(line) for line in text.splitlines(keepends=True)).encode()

    def _line(self, line: str) -> str:
        if self.in_key:
            if _END_KEY.search(line):
                self.in_key = False
                return line[_END_KEY.search(line).start():]
            return ""
        begin = _BEGIN_KEY.search(line)
        if begin and not _END_KEY.search(line, begin.end()):
            self.in_key = True
            self.masked += 1
            eol = "\r\n" if line.endswith("\r\n") else "\n"
            head, _ = self.detectors.mask_text(line[:begin.end()])
            return head + _KEY_MARKER + eol
        masked, n = self.detectors.mask_text(line)
        self.masked += n
        return masked


# Exec/attach channels (k8s.io/apimachinery/pkg/util/remotecommand): 1 stdout, 2 stderr are masked.
OUTPUT_CHANNELS = (1, 2)
BASE64_PROTOCOLS = ("base64.channel.k8s.io", "v4.base64.channel.k8s.io")


class ExecMasker:
    """The server-to-client frames of one exec/attach session, per output channel."""

    def __init__(self, detectors: DetectorSet, protocol: str = "v5.channel.k8s.io", max_line: int = MAX_LINE) -> None:
        self.base64 = protocol in BASE64_PROTOCOLS
        self.channels = {c: LineMasker(detectors, max_line) for c in OUTPUT_CHANNELS}

    @property
    def masked(self) -> int:
        return sum(m.masked for m in self.channels.values())

    def frame(self, content: bytes | str) -> tuple[int | None, bytes | None]:
        """(channel, masked payload) of one frame; payload None: pass the frame as it is (another
        channel); b"": hold it (the partial line waits for its end)."""
        if isinstance(content, str):
            content = content.encode()
        if not content:
            return None, None
        if self.base64:
            channel = content[0] - ord("0")
            if channel not in self.channels:
                return None, None
            try:
                payload = base64.b64decode(content[1:], validate=False)
            except ValueError:
                return channel, b""  # undecodable output is not passed on
        else:
            channel = content[0]
            if channel not in self.channels:
                return None, None
            payload = content[1:]
        return channel, self.channels[channel].feed(payload) if payload else b""

    def encode(self, channel: int, payload: bytes) -> bytes:
        if self.base64:
            return bytes([ord("0") + channel]) + base64.b64encode(payload)
        return bytes([channel]) + payload

    def flush(self, channel: int) -> bytes:
        return self.channels[channel].flush()

    def finish(self) -> list[tuple[int, bytes]]:
        return [(c, out) for c, m in self.channels.items() if (out := m.flush())]
