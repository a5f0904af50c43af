"""Retention: sessions older than the age limit, then the oldest ones while the folder is over its
size limit, are deleted; every deletion is recorded.

A session's age is the time since its last write (the newest file in its folder). A session with a
live terminal recording is never deleted; other sessions that are in use are closed first, and a
call that completes later starts the session again. Each deletion is appended to
`deletions.jsonl` in the recordings folder at once, and returned, so the gateway writes each to
the audit log too. Run at start and every `interval` seconds, off the per-call path (in a thread).

Plain Python (no mitmproxy).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jitgate.recording.index import Index
from jitgate.recording.recorder import DELETIONS, INDEX, META, Recorder, append_line
from jitgate.recording.sessions import SESSION_ID
from jitgate.timefmt import rfc3339

log = logging.getLogger("jitgate.recording")

AGE, SIZE = "age", "size"


@dataclass(frozen=True)
class Usage:
    id: str
    folder: Path
    bytes: int
    files: int
    last_activity: float


@dataclass(frozen=True)
class Deletion:
    session: str
    reason: str  # AGE or SIZE
    bytes: int
    files: int
    last_activity: float
    meta: dict  # session.json: user, grant, rule, cluster

    def record(self, now: float, max_age: int, max_total: int) -> dict:
        return {
            "time": rfc3339(now, milliseconds=True), "session": self.session, "reason": self.reason,
            "bytes": self.bytes, "files": self.files, "lastActivity": rfc3339(self.last_activity, milliseconds=True),
            "user": self.meta.get("user", ""), "grant": self.meta.get("grant", ""), "rule": self.meta.get("rule", ""),
            "cluster": self.meta.get("cluster", ""), "maxAgeSeconds": max_age, "maxTotalBytes": max_total,
        }


def scan(root: Path) -> list[Usage]:
    """Every session folder with its size and last activity."""
    out = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False) or not SESSION_ID.fullmatch(entry.name):
            continue
        size = count = 0
        last = 0.0
        try:
            for item in os.scandir(entry.path):
                st = item.stat(follow_symlinks=False)
                size += st.st_size
                count += 1
                last = max(last, st.st_mtime)
            last = last or entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        out.append(Usage(entry.name, Path(entry.path), size, count, last))
    return out


def plan(usages: list[Usage], now: float, max_age: int, max_total: int) -> list[tuple[Usage, str]]:
    """Which sessions go, and why: too old first, then the oldest while the total is over the limit."""
    doomed: list[tuple[Usage, str]] = []
    kept = []
    for usage in usages:
        if max_age and usage.last_activity < now - max_age:
            doomed.append((usage, AGE))
        else:
            kept.append(usage)
    total = sum(u.bytes for u in kept)
    if max_total:
        for usage in sorted(kept, key=lambda u: u.last_activity):
            if total <= max_total:
                break
            doomed.append((usage, SIZE))
            total -= usage.bytes
    return doomed


def _meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META).read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


class Retention:
    def __init__(self, recorder: Recorder, max_age: int, max_total: int) -> None:
        self.recorder = recorder
        self.max_age = max_age
        self.max_total = max_total

    def run(self, now: float | None = None) -> list[tuple[Deletion, dict]]:
        """One pass; the deletions made, each with its deletions.jsonl line."""
        now = time.time() if now is None else now
        root = self.recorder.root
        deleted: list[tuple[Deletion, dict]] = []
        index = Index(root / INDEX)  # this thread's own connection
        try:
            for usage, reason in plan(scan(root), now, self.max_age, self.max_total):
                meta = _meta(usage.folder)
                doomed = self.recorder.take_for_deletion(usage.id, index)
                if doomed is None:
                    if (root / usage.id).exists():
                        log.info("retention keeps session %s for now: a terminal session is being recorded", usage.id)
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
                deletion = Deletion(usage.id, reason, usage.bytes, usage.files, usage.last_activity, meta)
                line = deletion.record(now, self.max_age, self.max_total)
                append_line(root / DELETIONS, line)
                deleted.append((deletion, line))
                log.info("retention deleted session %s (%s, %d bytes)", usage.id, reason, usage.bytes)
            for leftover in root.glob(".deleted-*"):  # a deletion a crash interrupted
                shutil.rmtree(leftover, ignore_errors=True)
        finally:
            index.close()
        return deleted
