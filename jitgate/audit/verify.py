"""Checking an audit log's hash chain: the first line changed, removed, inserted or moved, or a cut-off end.

`verify(files, checkpoint)` reads the files in the order given (oldest first), recomputes each
line's hash and follows seq and prev from line to line. It stops at the first problem, because
everything after a break is suspect, and names the line where the damage shows:

- a line whose content no longer matches its hash: changed;
- a seq that skips ahead: the lines in between were removed, or moved (when they come later);
- a seq already seen: a copy inserted (same hash), or a line moved or inserted;
- the right seq linked to another hash: the line before was rewritten together with its hash,
  or this one was made up (when the next line links to the line before);
- a line without a chain member after chained ones: inserted, or changed;
- the checkpointed head missing, or present with another hash: the end was cut off, or rewritten.

Lines that are not JSON objects (a failing disk's fragment, `AuditLog` leaves none it could undo)
are skipped when the chain goes on across them; when it breaks right after one, that line is
named. Whole events without a chain before the first chained line (a log begun before chaining
was on) are counted and not checked. A chain that starts past seq 1 is fine when its older files
were rotated away; the report says where it starts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jitgate.audit.chain import (
    GENESIS,
    Fragment,
    Head,
    Link,
    Malformed,
    Unchained,
    read_line,
)
from jitgate.audit.files import read_lines

_RECENT = 100_000  # seqs remembered to name the line a repeated seq first appeared on


@dataclass(frozen=True)
class Place:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Report:
    events: int = 0  # chained lines checked
    first_seq: int | None = None
    last: Head | None = None
    last_place: Place | None = None
    unchained: int = 0  # whole events before the chain began
    fragments: list[Place] = field(default_factory=list)
    checkpoint: Head | None = None
    checkpoint_found: Place | None = None
    problem: str | None = None
    place: Place | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "events": self.events,
            "firstSeq": self.first_seq,
            "lastSeq": self.last.seq if self.last else None,
            "lastHash": self.last.hash if self.last else None,
            "unchainedBefore": self.unchained,
            "fragments": [str(p) for p in self.fragments],
            "checkpoint": {"seq": self.checkpoint.seq, "hash": self.checkpoint.hash,
                           "foundAt": str(self.checkpoint_found) if self.checkpoint_found else None}
            if self.checkpoint else None,
            "problem": {"at": str(self.place) if self.place else None, "what": self.problem} if self.problem else None,
        }


def _lines(files: Sequence[Path]) -> Iterator[tuple[Place, bytes]]:
    for path in files:
        for number, line in read_lines(path):
            yield Place(str(path), number), line


def _chained_after(files: Sequence[Path], place: Place) -> Iterator[tuple[Place, Link]]:
    """The chained lines after `place` (read again: this runs once, at the first problem)."""
    lines = _lines(files)
    for p, _ in lines:
        if p == place:
            break
    for p, line in lines:
        found = read_line(line)
        if isinstance(found, Link):
            yield p, found


def verify(files: Sequence[Path], checkpoint: Head | None = None) -> Report:
    report = Report(checkpoint=checkpoint)
    files = [Path(f) for f in files]
    last: Link | None = None
    last_place: Place | None = None
    fragment: Place | None = None  # the first fragment since the last chained line
    first_place: Place | None = None
    recent: OrderedDict[int, tuple[str, Place]] = OrderedDict()

    def fail(place: Place | None, what: str) -> Report:
        report.place, report.problem = place, what
        return report

    for place, line in _lines(files):
        found = read_line(line)
        if isinstance(found, Fragment):
            report.fragments.append(place)
            fragment = fragment or place
            continue
        if isinstance(found, Unchained):
            if last is None:
                report.unchained += 1
                continue
            return fail(place, "carries no chain member after chained lines: inserted, or its chain member was removed")
        if isinstance(found, Malformed):
            return fail(place, f"changed: {found.why}")
        if not found.intact:
            return fail(place, f"changed: its content no longer matches its hash (seq {found.seq})")
        if last is None:
            if found.seq == 1 and found.prev != GENESIS:
                return fail(place, "seq 1 does not start from the genesis hash: changed")
            if report.unchained and found.seq != 1:
                return fail(place, f"the chain starts at seq {found.seq} right after lines without a chain: "
                                   f"seq 1..{found.seq - 1} were removed")
            report.first_seq, first_place = found.seq, place
        else:
            expected = last.seq + 1
            if found.seq == expected and found.prev != last.hash:
                after = next(_chained_after(files, place), None)
                if after is not None and after[1].seq == expected and after[1].prev == last.hash:
                    return fail(place, f"inserted: seq {found.seq} does not link to the line before, "
                                       f"and the next line ({after[0]}) does")
                return fail(last_place, f"changed: the line was rewritten with a new hash; the next line "
                                        f"({place}) links to a different one (seq {last.seq})")
            if found.seq > expected:
                moved = next((p for p, link in _chained_after(files, place) if link.seq == expected), None)
                if moved is not None:
                    return fail(place, f"out of order: seq {found.seq} where seq {expected} was due; "
                                       f"seq {expected} comes later, at {moved} (lines swapped or moved)")
                missing = f"seq {expected}" if found.seq == expected + 1 else f"seq {expected}..{found.seq - 1}"
                if fragment is not None:
                    return fail(fragment, f"damaged: not a whole event, and {missing} is missing here")
                count = found.seq - expected
                return fail(place, f"{count} line{'s' if count > 1 else ''} removed before this one ({missing} missing)")
            if found.seq < expected:
                earlier = recent.get(found.seq)
                if earlier is not None and earlier[0] == found.hash:
                    return fail(place, f"inserted: a copy of {earlier[1]} (seq {found.seq})")
                before = recent.get(found.seq - 1)
                if earlier is not None and before is not None and before[0] == found.prev:
                    # Two lines with this seq link to the same line: one of them was made up. The one
                    # the chain goes on from is the original.
                    after = next(_chained_after(files, place), None)
                    if after is not None and after[1].prev == found.hash:
                        return fail(earlier[1], f"inserted: seq {found.seq} appears again at {place}, "
                                                "and the chain goes on from there")
                    return fail(place, f"inserted: seq {found.seq} again (first at {earlier[1]})")
                if report.first_seq is not None and found.seq < report.first_seq:
                    return fail(place, f"out of order: seq {found.seq} after seq {last.seq}, in a chain that began at "
                                       f"seq {report.first_seq} ({first_place}): files in the wrong order, or lines moved")
                if found.seq == 1 and found.prev == GENESIS:
                    return fail(place, f"a new chain starts here (seq 1) after seq {last.seq}: "
                                       "inserted, or the log was restarted without its earlier lines")
                where = f", first at {earlier[1]}" if earlier is not None else ""
                return fail(place, f"out of order: seq {found.seq} after seq {last.seq}{where} "
                                   "(a line moved or inserted)")
        if checkpoint is not None and found.seq == checkpoint.seq:
            if found.hash != checkpoint.hash:
                return fail(place, f"changed: seq {found.seq} was checkpointed with another hash "
                                   "(the log was rewritten from here or before)")
            report.checkpoint_found = place
        last, last_place, fragment = found, place, None
        report.events += 1
        recent[found.seq] = (found.hash, place)
        if len(recent) > _RECENT:
            recent.popitem(last=False)
    report.last = last.head if last else None
    report.last_place = last_place
    if checkpoint is not None and (last is None or last.seq < checkpoint.seq):
        end = last_place or (Place(str(files[-1]), 0) if files else None)
        reached = f"seq {last.seq}" if last else "no chained line"
        gone = checkpoint.seq - (last.seq if last else 0)
        return fail(end, f"truncated: the log ends at {reached} but seq {checkpoint.seq} was checkpointed: "
                         f"at least {gone} line{'s' if gone > 1 else ''} cut off the end")
    return report

