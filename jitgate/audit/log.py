"""The audit log: append-only JSON lines, one whole line per write, fail closed."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from jitgate.files import make_private_dirs


class AuditLogError(Exception):
    """The audit event could not be recorded; the call it describes must not proceed."""


class AuditLog:
    """Append-only JSON-lines audit log; `path` "-" writes to standard output.

    Rotation: before each write the path is `stat`ed and compared with the open file's device
    and inode; when the file was renamed or deleted (logrotate's default), a new one is opened.
    A stat costs about 2 µs here, as much as the write itself and nothing next to the ~1.4 ms
    the proxy spends on a call, so every write checks and no line lands in a rotated-away file
    once the rename is done. (copytruncate needs no reopen: writes are O_APPEND.)

    Directories it creates are 0700 and a file it creates is 0600; existing ones keep their
    modes. With `fsync`, each line is on disk before `write` returns.

    A failing device may take part of a line. That part is cut off again (the file stays valid
    JSON lines), or, where it cannot be, ended with a newline; when even that fails, the next
    write starts with one. A reader never sees two events on one line.
    """

    def __init__(self, path: str | Path, fsync: bool = False) -> None:
        self.to_stdout = str(path) == "-"
        self.path = Path(path)
        self.fsync = fsync and not self.to_stdout  # fsync is meaningless on a pipe or tty
        self._lock = threading.Lock()
        self._partial = False  # the log may end in part of a line: start the next write on a new one
        if self.to_stdout:
            self._fd, self._ident = 1, (0, 0)
        else:
            self._fd, self._ident = self._open()

    def _open(self) -> tuple[int, tuple[int, int]]:
        try:
            make_private_dirs(self.path.parent)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise AuditLogError(f"cannot open audit log {self.path}: {e.strerror or e}") from e
        st = os.fstat(fd)
        return fd, (st.st_dev, st.st_ino)

    def _reopen_if_rotated(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                return
        except FileNotFoundError:
            pass
        except OSError as e:
            raise AuditLogError(f"cannot stat audit log {self.path}: {e.strerror or e}") from e
        # Open the new file first: if that fails the old descriptor stays for the next try.
        fd, ident = self._open()
        old, self._fd, self._ident = self._fd, fd, ident
        self._partial = False
        os.close(old)

    def write(self, event: Mapping) -> None:
        try:
            line = json.dumps(event, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as e:
            raise AuditLogError(f"audit event cannot be serialized: {e}") from e
        with self._lock:
            if self._fd < 0:
                raise AuditLogError("audit log is closed")
            if self.to_stdout:
                self._write_all(b"\n" + line if self._partial else line)
                self._partial = False
                return
            self._reopen_if_rotated()
            data = b"\n" + line if self._partial else line
            try:
                written = os.write(self._fd, data)
            except OSError as e:  # nothing was written
                raise AuditLogError(f"cannot write audit log {self.path}: {e.strerror or e}") from e
            if written != len(data):
                self._partial = self._after_short_write(written)
                raise AuditLogError(f"short write to audit log {self.path}")
            self._partial = False
            if self.fsync:
                try:
                    os.fsync(self._fd)
                except OSError as e:
                    raise AuditLogError(f"cannot flush audit log {self.path}: {e.strerror or e}") from e

    def _after_short_write(self, written: int) -> bool:
        """Undo or end the part of a line just written; returns whether the log may end in a partial line."""
        if written <= 0:
            return self._partial
        try:
            # O_APPEND put our bytes at the end: when nothing was appended after them, cut them off.
            end = os.lseek(self._fd, 0, os.SEEK_CUR)
            if os.fstat(self._fd).st_size == end:
                os.ftruncate(self._fd, end - written)
                return self._partial
        except OSError:
            pass
        return not _try_write(self._fd, b"\n")

    def _write_all(self, data: bytes) -> None:
        # Pipes take large writes in pieces; lines up to PIPE_BUF (4 KiB) are still whole.
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            if len(view) < len(data):
                self._partial = True  # a pipe cannot be cut back
            raise AuditLogError(f"cannot write audit log to stdout: {e.strerror or e}") from e

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0 and not self.to_stdout:
                try:
                    os.close(fd)
                except OSError as e:
                    raise AuditLogError(f"cannot close audit log {self.path}: {e.strerror or e}") from e

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _try_write(fd: int, data: bytes) -> bool:
    try:
        return os.write(fd, data) == len(data)
    except OSError:
        return False
