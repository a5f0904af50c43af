"""Finding and reading an audit log and the files logrotate made of it."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from pathlib import Path

# logrotate's names for rotated copies of `audit.log`: audit.log.1 (newest) .. audit.log.N, with
# `dateext` audit.log-20261201 (oldest sorts first); `compress` adds .gz.
_NUMBERED = re.compile(r"\.([0-9]{1,6})(\.gz)?")
_DATED = re.compile(r"-([0-9][0-9_.-]*?)(\.gz)?")


def rotated_files(path: Path) -> list[Path]:
    """`path`'s rotated copies, oldest first (dated ones, then numbered from the highest)."""
    path = Path(path)
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    numbered, dated = [], []
    for name in names:
        if not name.startswith(path.name) or name == path.name:
            continue
        rest = name[len(path.name):]
        if m := _NUMBERED.fullmatch(rest):
            numbered.append((int(m.group(1)), path.parent / name))
        elif m := _DATED.fullmatch(rest):
            dated.append((m.group(1), path.parent / name))
    return [p for _, p in sorted(dated)] + [p for _, p in sorted(numbered, reverse=True)]


def log_files(path: Path) -> list[Path]:
    """The rotated copies, oldest first, then the live log (when it exists)."""
    path = Path(path)
    return rotated_files(path) + ([path] if path.exists() else [])


def live_name(path: Path) -> Path:
    """The live log a rotated copy was made from (`audit.log.3.gz` -> `audit.log`)."""
    path = Path(path)
    for pattern in (_NUMBERED, _DATED):
        for m in pattern.finditer(path.name):
            if m.end() == len(path.name) and m.start() > 0:
                return path.with_name(path.name[: m.start()])
    return path


def open_log(path: Path):
    """A binary reader for a log file, decompressing `.gz` ones."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) for every line; an unterminated last line too."""
    with open_log(path) as f:
        for number, line in enumerate(f, 1):
            yield number, line[:-1] if line.endswith(b"\n") else line


def last_lines(fd: int, size: int, limit: int = 16 << 20) -> Iterator[bytes]:
    """The whole lines of the open file `fd` (of `size` bytes), last one first, reading at most
    about `limit` bytes; an unterminated tail is skipped (a write under way, or a fragment)."""
    pos, buf, started = size, b"", False
    while pos > 0 and size - pos < limit:
        step = min(64 << 10, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        if not started:
            cut = buf.rfind(b"\n")
            if cut < 0:
                continue
            buf, started = buf[:cut], True
        while (i := buf.rfind(b"\n")) >= 0:
            yield buf[i + 1:]
            buf = buf[:i]
    if started and pos == 0:
        yield buf  # the file's first line
