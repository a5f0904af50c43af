"""Terminal sessions (exec, attach) as asciicast v2, and their WebSocket messages as recordings keep them.

asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/): a header line (`version`, `width`,
`height`, `timestamp`, `title`), then one JSON array per line, `[seconds, type, data]`, times
increasing: `o` output (stdout and stderr frames, as the masking step let them through), `i`
input, `r` resize (`COLSxROWS`), `m` a marker (here: how the command ended). Each line is one
`write` on an O_APPEND file, so a killed gateway leaves whole lines.

Typed input is never kept as keystrokes: stdin is reassembled into lines as the shell reads them
(jitgate.guardrails.stdin: backspace, Ctrl-U, escape sequences), each line passes the masking
detectors, and a line typed right after a prompt that asks for a password, passphrase, PIN or token
is masked whole (`[masked:prompted-secret]`). The same lines replace the stdin frames in flows.mitm
and the HAR. Output frames the masking step dropped (a held partial line) are left out; for a grant
that reveals secrets the recording masks the output itself. Port-forward payloads are not kept.

Plain Python (no mitmproxy).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from jitgate.guardrails.stdin import LineAssembler
from jitgate.masking.detectors import TEXT_MARKER, DetectorSet
from jitgate.masking.streams import BASE64_PROTOCOLS, ExecMasker

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
OUTPUT = (STDOUT, STDERR)
PROMPTED_SECRET = TEXT_MARKER.format(name="prompted-secret")
_SECRET_PROMPT = re.compile(r"(?i)(pass(word|phrase|code)?|pin|secret|token|otp|credential)[^\n]{0,60}[:?>]\s*$")
PROMPT_CONTEXT = 200  # characters of output kept to tell whether input answers a secret prompt
DEFAULT_SIZE = (80, 24)


class Frames:
    """The channel framing of one session's protocol (v4/v5.channel.k8s.io, or the base64 ones)."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.base64 = protocol.strip().lower() in BASE64_PROTOCOLS

    def parse(self, content: bytes | str) -> tuple[int | None, bytes]:
        if isinstance(content, str):
            content = content.encode()
        if not content:
            return None, b""
        if self.base64:
            channel = content[0] - ord("0")
            try:
                return channel, base64.b64decode(content[1:])
            except ValueError:
                return channel, b""
        return content[0], content[1:]

    def encode(self, channel: int, payload: bytes) -> bytes:
        if self.base64:
            return bytes([ord("0") + channel]) + base64.b64encode(payload)
        return bytes([channel]) + payload


class TypedInput:
    """stdin bytes -> the lines the shell reads, masked; knows the output before them (prompts)."""

    def __init__(self, detectors: DetectorSet) -> None:
        self.detectors = detectors
        self.lines = LineAssembler()
        self.context = ""

    def output(self, text: str) -> None:
        self.context = (self.context + text)[-PROMPT_CONTEXT:]

    def _mask(self, line: str) -> str:
        if _SECRET_PROMPT.search(self.context.rpartition("\n")[2] or self.context):
            masked = PROMPTED_SECRET if line else line
        else:
            masked = self.detectors.mask_text(line)[0]
        self.context = ""  # the answer is given; the next line needs a prompt of its own
        return masked

    def feed(self, data: bytes) -> list[str]:
        return [self._mask(line) for line in self.lines.feed(data)]

    def pending(self) -> str:
        """The line typed but not entered when the session ended, masked ("" if none)."""
        rest = self.lines.pending
        return self._mask(rest) if rest else ""


def _resize(payload: bytes) -> tuple[int, int] | None:
    try:
        size = json.loads(payload)
        width, height = int(size["Width"]), int(size["Height"])
    except (ValueError, KeyError, TypeError):
        return None
    return (width, height) if 0 < width < 10000 and 0 < height < 10000 else None


def _status_label(payload: bytes) -> str:
    try:
        status = json.loads(payload)
    except ValueError:
        return "ended"
    if not isinstance(status, dict):
        return "ended"
    if status.get("status") == "Success":
        return "exit: Success"
    return f"exit: {status.get('message') or status.get('reason') or 'Failure'}"[:500]


class CastFile:
    """An asciicast v2 file, written line by line."""

    def __init__(self, path: Path, width: int, height: int, started: float, title: str, env: dict | None = None) -> None:
        self.path = path
        self.started = started
        self.last = 0.0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        header = {"version": 2, "width": width, "height": height, "timestamp": int(started), "title": title}
        if env:
            header["env"] = env
        self._line(header)

    def _line(self, value) -> None:
        os.write(self.fd, json.dumps(value, separators=(", ", ": ")).encode() + b"\n")

    def event(self, when: float, kind: str, data: str) -> None:
        elapsed = max(self.last, round(when - self.started, 6))
        self.last = elapsed
        self._line([elapsed, kind, data])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TerminalRecorder:
    """One exec/attach session into one cast file, frame by frame as the session goes.

    The file is made at the first frame worth keeping: a resize from kubectl (sent first with a
    tty) sets the header's size, otherwise it is 80x24."""

    def __init__(self, open_cast: Callable[[int, int], CastFile], protocol: str, tty: bool, detectors: DetectorSet,
                 reveal: bool = False) -> None:
        self.open_cast = open_cast
        self.frames = Frames(protocol)
        self.tty = tty
        self.input = TypedInput(detectors)
        self.masker = ExecMasker(detectors, protocol) if reveal else None  # the masking step did not mask
        self.decoders = {c: codecs.getincrementaldecoder("utf-8")("replace") for c in OUTPUT}
        self.cast: CastFile | None = None
        self.enter = "\r" if tty else "\n"

    def _file(self, size: tuple[int, int] = DEFAULT_SIZE) -> CastFile:
        if self.cast is None:
            self.cast = self.open_cast(*size)
        return self.cast

    def client_frame(self, content: bytes, when: float) -> None:
        channel, payload = self.frames.parse(content)
        if channel == RESIZE:
            size = _resize(payload)
            if size is None:
                return
            if self.cast is None:
                self._file(size)
            else:
                self.cast.event(when, "r", f"{size[0]}x{size[1]}")
        elif channel == STDIN and payload:
            for line in self.input.feed(payload):
                self._file().event(when, "i", line + self.enter)

    def server_frame(self, content: bytes, when: float) -> None:
        if self.masker is not None:
            channel, payload = self.masker.frame(content)
            if channel is None:
                for held_channel, out in self.masker.finish():
                    self._output(held_channel, out, when)
                channel, payload = self.frames.parse(content)
        else:
            channel, payload = self.frames.parse(content)
        if channel in OUTPUT:
            self._output(channel, payload, when)
        elif channel == ERROR:
            self._file().event(when, "m", _status_label(payload))

    def _output(self, channel: int, payload: bytes, when: float) -> None:
        if not payload:
            return
        text = self.decoders[channel].decode(payload)
        if not text:
            return
        if not self.tty:  # a terminal turns \n into \r\n; a player shows the raw data
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        self.input.output(text)
        self._file().event(when, "o", text)

    def finish(self, when: float) -> None:
        if self.masker is not None:
            for channel, out in self.masker.finish():
                self._output(channel, out, when)
        for channel, decoder in self.decoders.items():
            rest = decoder.decode(b"", final=True)
            if rest:
                self._file().event(when, "o", rest)
        rest = self.input.pending()
        if rest and self.cast is not None:
            self.cast.event(when, "i", rest)
        if self.cast is not None:
            self.cast.close()


def stored_messages(messages, protocol: str, detectors: DetectorSet, tty: bool, reveal: bool = False,
                    portforward: bool = False) -> list[tuple]:
    """A WebSocket flow's messages (`get_state()` tuples: type, from_client, content, timestamp,
    dropped, injected) as recordings keep them: stdin frames replaced by masked typed lines,
    output frames that were never delivered left out, output masked when the grant revealed it,
    port-forward payloads emptied."""
    if portforward:
        return [(kind, from_client, b"", timestamp, *rest) for kind, from_client, _content, timestamp, *rest in messages]
    frames = Frames(protocol)
    typed = TypedInput(detectors)
    masker = ExecMasker(detectors, protocol) if reveal else None
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    enter = b"\r" if tty else b"\n"
    out: list[tuple] = []
    last = (2, 0.0)
    for message in messages:
        kind, from_client, content, timestamp = message[:4]
        dropped = message[4] if len(message) > 4 else False
        last = (kind, timestamp)
        if from_client:
            channel, payload = frames.parse(content)
            if channel == STDIN:
                for line in typed.feed(payload):
                    out.append((kind, True, frames.encode(STDIN, line.encode() + enter), timestamp, False, False))
            else:
                out.append((kind, True, content, timestamp, False, False))
            continue
        if dropped:
            continue
        if masker is not None:
            channel, payload = masker.frame(content)
            if channel is None:
                out += [(kind, False, frames.encode(c, p), timestamp, False, True) for c, p in masker.finish()]
                out.append((kind, False, content, timestamp, False, False))
            elif payload:
                out.append((kind, False, frames.encode(channel, payload), timestamp, False, False))
                typed.output(decoder.decode(payload))
            continue
        channel, payload = frames.parse(content)
        if channel in OUTPUT:
            typed.output(decoder.decode(payload))
        out.append((kind, False, content, timestamp, False, False))
    if masker is not None:
        out += [(last[0], False, frames.encode(c, p), last[1], False, True) for c, p in masker.finish()]
    rest = typed.pending()
    if rest:
        out.append((last[0], True, frames.encode(STDIN, rest.encode()), last[1], False, False))
    return out
