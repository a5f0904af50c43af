"""The recordings folder: one folder per session, the index, and the sessions open for writing.

    <recordings>/
        index.db                  SQLite index: sessions, one row per call (see jitgate.recording.index)
        deletions.jsonl           one line per session retention deleted
        <session id>/
            session.json          who, which grant and rule, when it started
            flows.mitm            mitmproxy flow file, one flow appended per completed call
            session.har           HAR 1.2, valid after every write
            exec-<auditID>.cast   asciicast v2 of each exec/attach session

Folders are 0700 and files 0600. Everything is written as it happens (nothing is held until
exit): a call's flow, HAR entry and index row when it completes, a terminal session's frames as
they pass. One gateway process writes a recordings folder (an exclusive lock on `.lock`; a second
gateway on the same folder is refused at start). At most `max_open` sessions keep files open; the
least recently used is closed and reopened when needed.

Plain Python (no mitmproxy): the flow file's bytes come from the caller, in pieces written together.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from jitgate.files import make_private_dirs
from jitgate.recording.cast import CastFile
from jitgate.recording.flowfile import complete_length
from jitgate.recording.har import HarFile
from jitgate.recording.index import Index
from jitgate.recording.sessions import SESSION_ID, SessionRef

FLOWS = "flows.mitm"
HAR = "session.har"
META = "session.json"
INDEX = "index.db"
DELETIONS = "deletions.jsonl"
LOCK = ".lock"


class RecordingsError(Exception):
    """The recordings folder cannot be used (not writable, or another gateway writes it)."""


def cast_name(audit_id: str) -> str:
    return f"exec-{audit_id}.cast"


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def append_line(path: Path, value: dict) -> None:
    """One JSON line appended in one write (O_APPEND): whole lines only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(value, separators=(",", ":")).encode() + b"\n")
    finally:
        os.close(fd)


# Locks held by this process, by folder: a reloaded addon takes the folder again.
_held: dict[str, list] = {}
_held_lock = threading.Lock()


class FolderLock:
    def __init__(self, root: Path) -> None:
        self.key = str(root.resolve())
        with _held_lock:
            held = _held.get(self.key)
            if held is not None:
                held[1] += 1
                return
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise RecordingsError(f"the recordings folder {root} is written by another gateway process; "
                                          "give each gateway its own (recordings option)") from None
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _held[self.key] = [fd, 1]

    def release(self) -> None:
        with _held_lock:
            held = _held.get(self.key)
            if held is None:
                return
            held[1] -= 1
            if held[1] <= 0:
                os.close(held[0])
                del _held[self.key]


class FlowFile:
    """flows.mitm: serialized flows appended, one write each."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        end = complete_length(lambda n, offset: os.pread(self.fd, n, offset), os.fstat(self.fd).st_size)
        if end != os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, end)

    def append(self, pieces: list[bytes]) -> None:
        """One flow's pieces in one write (gathered: its bodies are not copied)."""
        written = os.writev(self.fd, pieces)
        if written < sum(map(len, pieces)):  # cut short (a signal, a full disk): the rest as one buffer
            view = memoryview(b"".join(pieces))[written:]
            while view:
                view = view[os.write(self.fd, view):]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SessionFiles:
    """The open files of one session."""

    def __init__(self, folder: Path, ref: SessionRef, har_max_bytes: int, version: str) -> None:
        self.folder = folder
        self.ref = ref
        self.checked = time.monotonic()  # when the folder was last seen to exist (checked once a second)
        self.flows = FlowFile(folder / FLOWS)
        try:
            self.har = HarFile(folder / HAR, ref.id, har_max_bytes, version)
        except BaseException:
            self.flows.close()
            raise

    def close(self) -> None:
        self.flows.close()
        self.har.close()


class Recorder:
    def __init__(self, root: Path, har_max_bytes: int, version: str = "0", max_open: int = 64) -> None:
        self.root = root
        self.har_max_bytes = har_max_bytes
        self.version = version
        self.max_open = max_open
        try:
            make_private_dirs(root)
            if not root.is_dir():
                raise RecordingsError(f"{root} is not a folder")
            self.lock = FolderLock(root)
        except OSError as e:
            raise RecordingsError(f"cannot use the recordings folder {root}: {e.strerror or e}") from None
        try:
            self.index = Index(root / INDEX, checkpoint_every=1.0)
        except (sqlite3.Error, OSError) as e:
            self.lock.release()
            raise RecordingsError(f"cannot open the recordings index {root / INDEX}: {e}") from None
        self.mutex = threading.RLock()  # the event loop writes, retention deletes from a thread
        self.open: OrderedDict[str, SessionFiles] = OrderedDict()
        self.busy: dict[str, int] = {}  # sessions with a live terminal recording: never deleted
        self.resolved: dict[SessionRef, SessionRef] = {}

    # -- sessions ---------------------------------------------------------------------------------

    def resolve(self, ref: SessionRef) -> SessionRef:
        """The session's id, made distinct when another user's session has the same id."""
        known = self.resolved.get(ref)
        if known is not None:
            return known
        resolved = ref
        owner = self.index.session_user(ref.id)
        if owner is not None and owner != ref.user:
            resolved = ref.disambiguated()
        if len(self.resolved) > 4096:
            self.resolved.clear()
        self.resolved[ref] = resolved
        return resolved

    def files(self, ref: SessionRef) -> SessionFiles:
        with self.mutex:
            files = self.open.get(ref.id)
            if files is not None:
                now = time.monotonic()
                if now - files.checked < 1.0 or files.folder.exists():
                    files.checked = now if now - files.checked >= 1.0 else files.checked
                    self.open.move_to_end(ref.id)
                    return files
                self._close(ref.id)  # its folder went away (deleted by hand): start it again
            if not SESSION_ID.fullmatch(ref.id):
                raise RecordingsError(f"invalid session id {ref.id!r}")
            folder = self.root / ref.id
            created = not folder.exists()
            make_private_dirs(folder)
            now = time.time()
            if created or not (folder / META).exists():
                meta = {"id": ref.id, "kind": ref.kind, "user": ref.user, "grant": ref.grant, "rule": ref.rule,
                        "cluster": ref.cluster, "created": now}
                write_private(folder / META, json.dumps(meta, indent=2).encode() + b"\n")
            self.index.add_session(ref, now)
            files = self.open[ref.id] = SessionFiles(folder, ref, self.har_max_bytes, self.version)
            while len(self.open) > self.max_open:
                oldest = next(iter(self.open))
                if oldest in self.busy:
                    self.open.move_to_end(oldest)
                    if all(s in self.busy for s in self.open):
                        break
                    continue
                self._close(oldest)
            return files

    def _close(self, session_id: str) -> None:
        files = self.open.pop(session_id, None)
        if files is not None:
            files.close()

    # -- writing ----------------------------------------------------------------------------------

    def record(self, ref: SessionRef, flow: list[bytes], har_entry: list[bytes], started: float, row: tuple) -> bool:
        """One completed call: its flow and HAR entry (pieces: flowfile.flow_pieces, har.entry_pieces;
        False: the HAR's cap stopped the entry), its index row."""
        files = self.files(ref)
        files.flows.append(flow)
        added = files.har.add(har_entry, started)
        self.index.add_call(row)
        return added

    def open_cast(self, ref: SessionRef, audit_id: str, width: int, height: int, started: float, title: str,
                  env: dict | None = None) -> CastFile:
        files = self.files(ref)
        return CastFile(files.folder / cast_name(audit_id), width, height, started, title, env)

    def hold(self, session_id: str) -> None:
        with self.mutex:
            self.busy[session_id] = self.busy.get(session_id, 0) + 1

    def release(self, session_id: str) -> None:
        with self.mutex:
            left = self.busy.get(session_id, 0) - 1
            if left > 0:
                self.busy[session_id] = left
            else:
                self.busy.pop(session_id, None)

    # -- retention's side -------------------------------------------------------------------------

    def take_for_deletion(self, session_id: str, index: Index) -> Path | None:
        """Move a session's folder out of the way (atomically, under the writers' lock) and drop its
        index rows; returns where it went (the caller deletes it), None when the session is in use."""
        with self.mutex:
            if session_id in self.busy:
                return None
            self._close(session_id)
            folder = self.root / session_id
            doomed = self.root / f".deleted-{session_id}-{time.time_ns()}"
            try:
                os.rename(folder, doomed)
            except FileNotFoundError:
                doomed = None
            index.delete_session(session_id)
            self.resolved = {k: v for k, v in self.resolved.items() if v.id != session_id}
            return doomed

    def close(self) -> None:
        with self.mutex:
            for session_id in list(self.open):
                self._close(session_id)
            self.index.close()
            self.lock.release()
