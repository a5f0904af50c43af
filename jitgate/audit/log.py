"""The audit log: append-only JSON lines, one whole line per write, fail closed, optionally hash-chained."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from jitgate.audit.chain import (
    CHAIN_KEY,
    Head,
    Link,
    Unchained,
    chained_line,
    read_line,
)
from jitgate.audit.checkpoint import Checkpoint, CheckpointError
from jitgate.audit.files import last_lines, rotated_files
from jitgate.files import make_private_dirs

log = logging.getLogger("jitgate.audit")

# Checkpoint the chain's head once this many lines or seconds have passed since the last one (and on close).
CHECKPOINT_EVERY = 100
CHECKPOINT_INTERVAL = 1.0


class AuditLogError(Exception):
    """The audit event could not be recorded; the call it describes must not proceed."""


class Written(NamedTuple):
    """What `AuditLog.write` put in the log: the line (without its newline) and, when chained, its place."""

    line: bytes
    seq: int | None = None
    hash: str | None = None


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

    With `chain`, every line carries the hash-chain member described in `jitgate.audit.chain`.
    The head (last seq and hash) is kept in memory and, at start, taken from the last chained line
    of the file (or, when the file is new or empty, of its newest rotated copy), so the chain goes
    on across restarts and logrotate's renames. Writers share a log safely: each chained write
    holds an exclusive `flock` on the file, checks under it that the file is still the live one
    and that nobody appended since its own last line (else it reads the new last line first), so
    processes writing one log build one chain. The head only moves forward: a file whose end was
    cut off under a running writer, or while it was stopped (seen against the checkpoint), is
    continued from the higher seq, leaving the gap in the chain for `jitgate audit verify`.

    With `checkpoint_store` (an SQLite file), the head is also recorded there by a write once
    `checkpoint_every` lines or `checkpoint_interval` seconds have passed since the last
    checkpoint, and on close: a commit costs ~35 µs, so every line would triple a write's cost.
    A failed checkpoint is an `AuditLogError` (after the line was written; the next write tries
    again). What this leaves uncovered: the lines written since the last checkpoint (fewer than
    `checkpoint_every`; none after a clean close) can be cut off the end and the log still
    verifies, just shorter; cutting off a checkpointed line is reported as a truncated end.
    """

    def __init__(self, path: str | Path, fsync: bool = False, *, chain: bool = False,
                 checkpoint_store: str | Path | None = None, checkpoint_every: int = CHECKPOINT_EVERY,
                 checkpoint_interval: float = CHECKPOINT_INTERVAL) -> None:
        self.to_stdout = str(path) == "-"
        self.path = Path(path)
        self.fsync = fsync and not self.to_stdout  # fsync is meaningless on a pipe or tty
        self.chain = chain
        self._lock = threading.Lock()
        self._partial = False  # the log may end in part of a line: start the next write on a new one
        self._head: Head | None = None
        self._end: int | None = None  # the file's size after our last chained write
        self._checkpoint: Checkpoint | None = None
        self._checkpointed: Head | None = None
        self._checkpoint_every = max(1, checkpoint_every)
        self._checkpoint_interval = checkpoint_interval
        self._checkpoint_due = 0.0
        if self.to_stdout:
            self._fd, self._ident = 1, (0, 0)
            return
        self._fd, self._ident = self._open()
        if not chain:
            return
        try:
            if checkpoint_store is not None:
                self._checkpoint = Checkpoint(checkpoint_store, self.path)
            self._head = self._recover()
        except (CheckpointError, OSError) as e:
            self._close_quietly()
            raise AuditLogError(f"cannot recover the audit chain of {self.path}: {e}") from e
        self._checkpointed = self._head
        self._checkpoint_due = time.monotonic() + checkpoint_interval

    def _open(self) -> tuple[int, tuple[int, int]]:
        try:
            make_private_dirs(self.path.parent)
            # A chained writer reads the file's last line back (pread) when another writer appended.
            mode = os.O_RDWR if self.chain else os.O_WRONLY
            flags = mode | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
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

    @property
    def head(self) -> Head | None:
        """The chain's last (seq, hash) as this writer knows it."""
        return self._head

    def write(self, event: Mapping) -> Written:
        """Append one event as one line; returns the line (and its chain seq and hash) for the sinks."""
        try:
            body = json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise AuditLogError(f"audit event cannot be serialized: {e}") from e
        if self.chain:
            if CHAIN_KEY in event:
                raise AuditLogError(f"an audit event must not carry {CHAIN_KEY!r}: the log adds it")
            return self._write_chained(body)
        line = body + b"\n"
        with self._lock:
            if self._fd < 0:
                raise AuditLogError("audit log is closed")
            if self.to_stdout:
                self._write_all(b"\n" + line if self._partial else line)
                self._partial = False
                return Written(body)
            self._reopen_if_rotated()
            self._append(b"\n" + line if self._partial else line)
            self._flush()
        return Written(body)

    def _append(self, data: bytes) -> None:
        """One whole line (or a failure that leaves the file one event per line); lock held."""
        try:
            written = os.write(self._fd, data)
        except OSError as e:  # nothing was written
            raise AuditLogError(f"cannot write audit log {self.path}: {e.strerror or e}") from e
        if written != len(data):
            self._partial = self._after_short_write(written)
            raise AuditLogError(f"short write to audit log {self.path}")
        self._partial = False

    def _flush(self) -> None:
        if self.fsync:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise AuditLogError(f"cannot flush audit log {self.path}: {e.strerror or e}") from e

    # -- the chained path

    def _write_chained(self, body: bytes) -> Written:
        with self._lock:
            if self._fd < 0:
                raise AuditLogError("audit log is closed")
            if self.to_stdout:
                line, head = chained_line(body, self._head)
                self._write_all(b"\n" + line + b"\n" if self._partial else line + b"\n")
                self._partial = False
                self._head = head
                return Written(line, head.seq, head.hash)
            size = self._lock_live_file()
            try:
                if size != self._end:
                    self._catch_up(size)  # another writer appended, or the file was cut or replaced
                line, head = chained_line(body, self._head)
                data = b"\n" + line + b"\n" if self._partial else line + b"\n"
                self._end = None  # unknown until the write is known to be whole
                self._append(data)
                self._head, self._end = head, size + len(data)
                self._flush()
            finally:
                _unlock(self._fd)
            self._maybe_checkpoint()
            return Written(line, head.seq, head.hash)

    def _lock_live_file(self) -> int:
        """Lock the log file and make sure it is still the live one; returns its size.

        Every chained writer checks, holding the lock, that its file is still at `path` before
        writing to it. So once a writer holding the lock of a renamed file has read its last line,
        no writer appends to that file again, and the new file's first line chains to it."""
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as e:
                raise AuditLogError(f"cannot lock audit log {self.path}: {e.strerror or e}") from e
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as e:
                _unlock(self._fd)
                raise AuditLogError(f"cannot stat audit log {self.path}: {e.strerror or e}") from e
            if st is not None and (st.st_dev, st.st_ino) == self._ident:
                return st.st_size
            try:
                fd, ident = self._open()
            except AuditLogError:
                _unlock(self._fd)  # the old descriptor stays for the next try
                raise
            try:
                old_end = self._tail_head(self._fd, os.fstat(self._fd).st_size)
            except OSError:
                old_end = None
            old, self._fd, self._ident = self._fd, fd, ident
            os.close(old)  # and its lock
            self._head = _later(self._head, old_end)
            self._end, self._partial = None, False

    def _catch_up(self, size: int) -> None:
        if size > 0:
            try:
                self._head = _later(self._head, self._tail_head(self._fd, size))
            except OSError as e:
                raise AuditLogError(f"cannot read audit log {self.path}: {e.strerror or e}") from e

    @staticmethod
    def _tail_head(fd: int, size: int) -> Head | None:
        """The head at the end of an open log: its last intact chained line, or None when its last
        whole event carries no chain (or there is none)."""
        for line in last_lines(fd, size):
            found = read_line(line)
            if isinstance(found, Link):
                if found.intact:
                    return found.head
            elif isinstance(found, Unchained):
                return None
        return None

    def _recover(self) -> Head | None:
        """The head at start: the log's end, else its newest rotated copy's, else the checkpoint's,
        whichever is furthest (a checkpoint ahead of the files means lines were cut off)."""
        size = os.fstat(self._fd).st_size
        head = self._tail_head(self._fd, size) if size else None
        if head is None:
            for older in reversed(rotated_files(self.path)):
                if older.suffix != ".gz":  # logrotate's delaycompress keeps the newest copy plain
                    fd = os.open(older, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        head = self._tail_head(fd, os.fstat(fd).st_size)
                    finally:
                        os.close(fd)
                break
        if self._checkpoint is not None:
            saved = self._checkpoint.load()
            if saved is not None and (head is None or saved[0].seq > head.seq):
                log.error("the audit log %s ends at seq %s but seq %s was checkpointed: lines were removed; "
                          "the chain goes on from the checkpoint, so `jitgate audit verify` shows the gap",
                          self.path, head.seq if head else 0, saved[0].seq)
                head = saved[0]
        return head

    def _maybe_checkpoint(self) -> None:
        if self._checkpoint is None or self._head is None or self._head == self._checkpointed:
            return
        now = time.monotonic()
        if self._head.seq - (self._checkpointed.seq if self._checkpointed else 0) < self._checkpoint_every \
                and now < self._checkpoint_due:
            return
        self._save_checkpoint(now)

    def _save_checkpoint(self, now: float) -> None:
        head = self._head
        try:
            self._checkpoint.save(head)
        except CheckpointError as e:
            raise AuditLogError(str(e)) from e
        self._checkpointed, self._checkpoint_due = head, now + self._checkpoint_interval

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
            failure: AuditLogError | None = None
            if self._checkpoint is not None:
                if fd >= 0 and self._head is not None and self._head != self._checkpointed:
                    try:
                        self._save_checkpoint(time.monotonic())
                    except AuditLogError as e:
                        failure = e
                self._checkpoint.close()
                self._checkpoint = None
            if fd >= 0 and not self.to_stdout:
                try:
                    os.close(fd)
                except OSError as e:
                    raise AuditLogError(f"cannot close audit log {self.path}: {e.strerror or e}") from e
            if failure is not None:
                raise failure

    def _close_quietly(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.close()
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _later(a: Head | None, b: Head | None) -> Head | None:
    """The head further along the chain: a head never moves back."""
    if a is None:
        return b
    if b is None:
        return a
    return b if b.seq > a.seq else a


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass  # closing the descriptor releases it


def _try_write(fd: int, data: bytes) -> bool:
    try:
        return os.write(fd, data) == len(data)
    except OSError:
        return False
