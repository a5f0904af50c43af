"""Typed input of an interactive exec/attach session, reassembled into lines.

kubectl sends stdin as WebSocket messages whose first byte is the channel (0 = stdin). With a tty
the terminal is raw: each keystroke may arrive in a frame of its own, nothing is echoed locally,
backspace (0x7f or 0x08) edits the line, Ctrl-U clears it, and Enter is `\\r` (or `\\n`). A line is
complete at Enter; what it holds then is what the shell will run.
"""

from __future__ import annotations

MAX_LINE = 64 * 1024  # a longer line is judged as it stands, so pasting cannot outrun the check

STDIN = 0


class LineAssembler:
    __slots__ = ("buffer", "escape")

    def __init__(self) -> None:
        self.buffer: list[str] = []
        self.escape = False

    def feed(self, data: bytes) -> list[str]:
        """The lines completed by `data` (stdin bytes without the channel byte)."""
        lines: list[str] = []
        for ch in data.decode("utf-8", "replace"):
            if self.escape:  # drop terminal escape sequences (arrow keys...): ESC [ ... final byte
                if ch.isalpha() or ch == "~":
                    self.escape = False
                continue
            if ch == "\x1b":
                self.escape = True
            elif ch in "\r\n":
                lines.append("".join(self.buffer))
                self.buffer.clear()
            elif ch in "\x7f\x08":
                if self.buffer:
                    self.buffer.pop()
            elif ch == "\x15":  # Ctrl-U
                self.buffer.clear()
            elif ch == "\x03":  # Ctrl-C: the shell drops the line
                self.buffer.clear()
            elif ch == "\t" or ch >= " ":
                self.buffer.append(ch)
                if len(self.buffer) >= MAX_LINE:
                    lines.append("".join(self.buffer))
                    self.buffer.clear()
        return lines

    @property
    def pending(self) -> str:
        return "".join(self.buffer)
