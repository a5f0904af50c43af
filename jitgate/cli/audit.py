"""`jitgate audit`: read the gateway's audit log as a table (filtered, followed), and verify its hash chain.

    jitgate audit --user alice@example.com --decision deny --since 1h
    jitgate audit -f --cluster dev                 # new events as they are written, across rotations
    jitgate audit -o json --verb delete | jq .     # the matching lines as they are in the log
    jitgate audit verify                           # the log, its rotated copies and the checkpoint

These read the files directly (on the gateway's host, or a copy); they need no gateway and no
token. Exit status: 0 done (verify: the chain is intact), 1 verify found a problem, 2 bad usage
or no log to read.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

from jitgate.audit.checkpoint import CheckpointError, read_checkpoint
from jitgate.audit.files import live_name, log_files, read_lines
from jitgate.audit.verify import verify
from jitgate.cli.output import output_flag, table
from jitgate.timefmt import parse_duration, rfc3339

DEFAULT_LOG = "state/audit.log"  # the gateway's default audit_log, from the folder it runs in
DEFAULT_STORES = ("state/jitgate.db",)  # the gateway's default grant_store, which holds the checkpoint
STAGES = {"received": "RequestReceived", "started": "ResponseStarted", "complete": "ResponseComplete"}
DEFAULT_STAGES = ("started", "complete")  # RequestReceived repeats what its call's later line says
REASON_WIDTH = 60
FOLLOW_POLL = 0.2  # seconds between looks at a followed log
# Column widths of a followed table (printed before the rows to come are known).
FOLLOW_WIDTHS = (20, 24, 8, 8, 16, 36, 14)
HEADER = ("TIME", "USER", "CLUSTER", "DECISION", "VERB", "RESOURCE", "CODE", "REASON")


class UsageError(Exception):
    pass


# -- filters


def parse_moment(text: str, now: float) -> float:
    """`10m`, `2h`, `1d` (that long ago) or an RFC 3339 time with its zone (`2026-12-01T10:00:00Z`)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{text!r} is neither a duration (10m, 2h, 1d) nor an RFC 3339 time "
                         "(2026-12-01T10:00:00Z)") from None
    if moment.tzinfo is None:
        raise UsageError(f"{text!r} has no time zone: end it with Z (UTC) or an offset like +02:00")
    return moment.timestamp()


def _stamp(seconds: float) -> str:
    """A bound in the audit events' own timestamp form, so bounds compare as strings."""
    micros = round(seconds * 1_000_000)
    whole, fraction = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{fraction:06d}Z"


def _items(values: Iterable[str] | None) -> list[str]:
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


def _matcher(pattern: str | None) -> Callable[[str], bool] | None:
    if pattern is None:
        return None
    if any(c in pattern for c in "*?["):
        return lambda value: fnmatch.fnmatchcase(value, pattern)
    return lambda value: value == pattern


@dataclass
class Filter:
    user: Callable[[str], bool] | None = None
    cluster: Callable[[str], bool] | None = None
    namespace: Callable[[str], bool] | None = None
    verbs: frozenset[str] | None = None
    decision: str | None = None
    stages: frozenset[str] | None = None
    since: str | None = None  # timestamps in the events' form
    until: str | None = None
    retries: bool = False  # kubectl's automatic retries of a refused call (jitgate.dev/retry-of) shown too

    @classmethod
    def from_args(cls, args: argparse.Namespace, now: float) -> Filter:
        stages = _items(args.stage) or list(DEFAULT_STAGES)
        if "all" in stages:
            chosen = None
        else:
            unknown = [s for s in stages if s not in STAGES]
            if unknown:
                raise UsageError(f"unknown stage {unknown[0]!r}: use received, started, complete or all")
            chosen = frozenset(STAGES[s] for s in stages)
        since = _stamp(parse_moment(args.since, now)) if args.since else None
        until = _stamp(parse_moment(args.until, now)) if args.until else None
        return cls(user=_matcher(args.user), cluster=_matcher(args.cluster), namespace=_matcher(args.namespace),
                   verbs=frozenset(_items(args.verb)) or None, decision=args.decision, stages=chosen,
                   since=since, until=until, retries=getattr(args, "retries", False))

    def __call__(self, event: dict) -> bool:
        if self.stages is not None and event.get("stage") not in self.stages:
            return False
        if self.since is not None or self.until is not None:
            stamp = event.get("stageTimestamp")
            if not isinstance(stamp, str):
                return False
            if (self.since is not None and stamp < self.since) or (self.until is not None and stamp > self.until):
                return False
        annotations = event.get("annotations") or {}
        if not self.retries and "jitgate.dev/retry-of" in annotations:
            return False  # the same refusal as the event it names: one refused command, one row
        if self.user is not None and not self.user((event.get("user") or {}).get("username", "")):
            return False
        if self.cluster is not None and not self.cluster(annotations.get("jitgate.dev/cluster", "")):
            return False
        if self.namespace is not None and not self.namespace((event.get("objectRef") or {}).get("namespace", "")):
            return False
        if self.verbs is not None and event.get("verb") not in self.verbs:
            return False
        if self.decision is not None and annotations.get("jitgate.dev/decision", "none") != self.decision:
            return False
        return True


# -- reading


def _events(lines: Iterable[bytes]) -> Iterator[tuple[bytes, dict]]:
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a fragment a failing disk left: not an event
        if isinstance(event, dict):
            yield line, event


def _file_lines(files: Iterable[Path], since: float | None) -> Iterator[bytes]:
    for path in files:
        try:
            if since is not None and path.stat().st_mtime < since - 1:
                continue  # last written before the window opened: none of its events can match
            for _, line in read_lines(path):
                yield line
        except FileNotFoundError:
            continue  # rotated away while we read


class Follower:
    """The lines appended to a live log, across logrotate's renames (and copytruncate)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = None
        self.ident: tuple[int, int] | None = None
        self.carry = b""
        self._open()

    def _open(self) -> bool:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return False
        st = os.fstat(f.fileno())
        self.file, self.ident, self.carry = f, (st.st_dev, st.st_ino), b""
        return True

    def read(self) -> list[bytes]:
        """The whole lines written since the last call (none yet: [])."""
        if self.file is None:
            self._open()
            if self.file is None:
                return []
        lines = self._drain()
        if lines:
            return lines
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []  # renamed, the new one not there yet: keep reading the old one
        if (st.st_dev, st.st_ino) != self.ident:
            lines = self._drain()  # whatever the writer added to the old file before it moved on
            self.file.close()
            self._open()
            return lines + self._drain()
        if st.st_size < self.file.tell():  # copytruncate: the file starts again
            self.file.seek(0)
            self.carry = b""
            return self._drain()
        return []

    def _drain(self) -> list[bytes]:
        data = self.file.read()
        if not data:
            return []
        parts = (self.carry + data).split(b"\n")
        self.carry = parts.pop()  # an unfinished line waits for the rest
        return [p for p in parts if p]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# -- output


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def row(event: dict) -> tuple[str, ...]:
    stamp = event.get("stageTimestamp") or ""
    annotations = event.get("annotations") or {}
    ref = event.get("objectRef")
    if ref:
        resource = ref.get("resource", "") + (f".{ref['apiGroup']}" if ref.get("apiGroup") else "") \
            + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        where = "/".join(v for v in (ref.get("namespace"), ref.get("name")) if v)
        resource = f"{resource} {where}" if where else resource
    else:
        resource = (event.get("requestURI") or "").partition("?")[0]
    code = str((event.get("responseStatus") or {}).get("code", ""))
    stage = event.get("stage")
    if stage == "ResponseStarted":
        code = f"{code} (started)"
    elif stage == "RequestReceived":
        code = "(received)"
    reason = annotations.get("jitgate.dev/reason") or (event.get("responseStatus") or {}).get("message", "")
    return (
        stamp[:19] + "Z" if len(stamp) >= 19 else stamp,
        (event.get("user") or {}).get("username", ""),
        annotations.get("jitgate.dev/cluster", "-"),
        annotations.get("jitgate.dev/decision", "none"),
        event.get("verb") or "-",
        resource or "-",
        code or "-",
        _short(reason, REASON_WIDTH) if reason else "",
    )


def _fixed(cells: tuple[str, ...]) -> str:
    out = [_short(c, w).ljust(w) for c, w in zip(cells, FOLLOW_WIDTHS)]
    return "   ".join(out + list(cells[len(FOLLOW_WIDTHS):])).rstrip()


class Printer:
    def __init__(self, output: str | None, follow: bool) -> None:
        self.output, self.follow = output, follow
        self.rows: list[tuple[str, ...]] = []
        self.count = 0
        if follow and not output:
            print(_fixed(HEADER), flush=True)

    def add(self, line: bytes, event: dict) -> None:
        self.count += 1
        if self.output == "json":
            sys.stdout.write(line.decode("utf-8", "replace") + "\n")
        elif self.output == "yaml":
            out = io.StringIO()
            yaml = YAML(typ="safe", pure=True)
            yaml.default_flow_style = False
            yaml.dump(event, out)
            sys.stdout.write("---\n" + out.getvalue())
        elif self.follow:
            print(_fixed(row(event)))
        else:
            self.rows.append(row(event))
        if self.follow:
            sys.stdout.flush()

    def finish(self) -> None:
        if self.output or self.follow:
            return
        if not self.rows:
            print("No matching audit events.", file=sys.stderr)
        else:
            table([HEADER, *self.rows])


# -- commands


def cmd_audit(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        keep = Filter.from_args(args, now)
        since = parse_moment(args.since, now) if args.since else None
    except UsageError as e:
        print(f"jitgate: {e}", file=sys.stderr)
        return 2
    live = Path(args.log)
    follower = Follower(live) if args.follow else None  # opened first: nothing written meanwhile is missed
    files = rotated_and_live(live, follower)
    if not files and follower is None:
        print(f"jitgate: no audit log at {live} (set --log to the gateway's audit_log)", file=sys.stderr)
        return 2
    printer = Printer(args.output, args.follow)
    for line, event in _events(_file_lines(files, since)):
        if keep(event):
            printer.add(line, event)
    if follower is None:
        printer.finish()
        return 0
    try:
        for line, event in _events(follower.read()):  # the live log, from the start
            if keep(event):
                printer.add(line, event)
        while True:
            time.sleep(FOLLOW_POLL)
            for line, event in _events(follower.read()):
                if keep(event):
                    printer.add(line, event)
    finally:
        follower.close()


def rotated_and_live(live: Path, follower: Follower | None) -> list[Path]:
    files = log_files(live)
    if follower is None:
        return files

    def followed(path: Path) -> bool:  # the follower reads the live log itself, even if it was just rotated
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        return path == live or (st.st_dev, st.st_ino) == follower.ident

    return [f for f in files if not followed(f)]


def _checkpoint_for(live: Path, store: str | None) -> tuple[object, str | None, str | None]:
    """(checkpoint, store used, note)."""
    candidates = [Path(store)] if store else [Path(s) for s in DEFAULT_STORES] + [live.parent / "jitgate.db",
                                                                                    live.parent / "audit-chain.db"]
    seen = set()
    for candidate in candidates:
        if candidate.resolve() in seen:
            continue
        seen.add(candidate.resolve())
        found = read_checkpoint(candidate, live)
        if found is not None:
            return found, str(candidate), None
    if store:
        return None, store, f"no checkpoint for {live} in {store}: a cut-off end cannot be detected"
    return None, None, f"no checkpoint for {live} found (looked in {', '.join(map(str, candidates))}; " \
                       "give the gateway's grant store with --store): a cut-off end cannot be detected"


def cmd_verify(args: argparse.Namespace) -> int:
    if args.files:
        files = [Path(f) for f in args.files]
        live = Path(args.log) if args.log else live_name(files[-1])
        missing = [f for f in files if not f.exists()]
        if missing:
            print(f"jitgate: no such file: {missing[0]}", file=sys.stderr)
            return 2
    else:
        live = Path(args.log or DEFAULT_LOG)
        files = log_files(live)
        if not files:
            print(f"jitgate: no audit log at {live} (give --log or the files)", file=sys.stderr)
            return 2
    # The checkpoint is read before the files: a gateway writing meanwhile only adds lines after it.
    # It only says something about the end when the live log itself is among the files.
    checkpoint = note = store = None
    if any(f.resolve() == live.resolve() for f in files):
        try:
            found, store, note = _checkpoint_for(live, args.store)
        except CheckpointError as e:
            print(f"jitgate: {e}", file=sys.stderr)
            return 2
        checkpoint = found
    else:
        note = f"{live} is not among the files: its checkpoint is not checked"
    report = verify(files, checkpoint[0] if checkpoint else None)
    if args.output:
        data = {**report.to_dict(), "files": [str(f) for f in files], "store": store, "note": note}
        if checkpoint:
            data["checkpoint"]["savedAt"] = rfc3339(checkpoint[1])
        if args.output == "json":
            print(json.dumps(data, indent=2))
        else:
            yaml = YAML(typ="safe", pure=True)
            yaml.default_flow_style = False
            yaml.dump(data, sys.stdout)
        return 0 if report.ok else 1
    if not report.ok:
        print(f"{report.place}: {report.problem}" if report.place else report.problem)
        print(f"verification FAILED after {report.events} intact events")
        return 1
    span = f" (seq {report.first_seq}..{report.last.seq})" if report.last else ""
    print(f"verified {report.events} events{span} in {len(files)} file{'s' if len(files) != 1 else ''}")
    if report.first_seq and report.first_seq > 1:
        print(f"  the chain starts at seq {report.first_seq}: its earlier lines are in files rotated away or not given")
    if report.unchained:
        print(f"  {report.unchained} earlier lines carry no chain (written before chaining) and were not checked")
    if report.fragments:
        shown = ", ".join(str(p) for p in report.fragments[:5]) + (" ..." if len(report.fragments) > 5 else "")
        print(f"  skipped {len(report.fragments)} lines that are no whole event (left by failed writes): {shown}")
    if checkpoint:
        head, saved = checkpoint
        where = f"found at {report.checkpoint_found}" if report.checkpoint_found else "in a file rotated away"
        print(f"  checkpoint: seq {head.seq} saved {rfc3339(saved)} in {store}, {where}")
    if note:
        print(f"  note: {note}")
    return 0


def add_audit_commands(sub) -> None:
    """Register `jitgate audit` (show, filter, follow) and `jitgate audit verify`."""
    audit = sub.add_parser(
        "audit", help="show, filter and follow the audit log, or verify its hash chain",
        description="Print the audit log's events as a table (RequestReceived lines hidden unless --stage asks), "
                    "filtered; --follow keeps printing new ones, across log rotations.",
    )
    audit.add_argument("--log", default=DEFAULT_LOG, metavar="PATH",
                       help=f"the live audit log; its rotated copies (PATH.1, PATH.2.gz, ...) are read first "
                            f"(default: {DEFAULT_LOG})")
    audit.add_argument("--user", metavar="U", help="username (glob patterns allowed: '*@example.com')")
    audit.add_argument("--cluster", metavar="C", help="cluster name (globs allowed)")
    audit.add_argument("--namespace", "-n", metavar="N", help="namespace of the object (globs allowed)")
    audit.add_argument("--verb", action="append", metavar="V", help="verb: get, list, watch, create, ... (repeatable, or comma-separated)")
    audit.add_argument("--decision", choices=("allow", "deny", "none"), help="the gateway's decision")
    audit.add_argument("--stage", action="append", metavar="S",
                       help="received, started, complete or all (repeatable; default: started,complete)")
    audit.add_argument("--since", metavar="WHEN", help="events from then on: 10m, 2h, 1d ago, or RFC 3339 (2026-12-01T10:00:00Z)")
    audit.add_argument("--until", metavar="WHEN", help="events up to then (same forms)")
    audit.add_argument("-f", "--follow", action="store_true", help="keep printing new events (Ctrl-C ends)")
    audit.add_argument("--retries", action="store_true",
                       help="also show kubectl's automatic retries of a refused call (audited with jitgate.dev/retry-of)")
    output_flag(audit, "a table")
    audit.set_defaults(func=cmd_audit)

    commands = audit.add_subparsers(dest="audit_command", metavar="{verify}")
    check = commands.add_parser(
        "verify", help="check the audit log's hash chain and checkpoint",
        description="Recompute the hash chain over the files (default: the log's rotated copies, oldest first, "
                    "then the log) and report the first line changed, removed, inserted or reordered, or a "
                    "cut-off end (the checkpointed head is missing). Exit 0: intact; 1: a problem.",
    )
    check.add_argument("files", nargs="*", metavar="FILES", help="log files in order, oldest first (default: --log and its rotated copies)")
    check.add_argument("--log", default=None, metavar="PATH",
                       help=f"the live audit log (default: {DEFAULT_LOG}; with FILES, the last one without its .N suffix)")
    check.add_argument("--store", metavar="PATH",
                       help="SQLite file with the chain checkpoint: the gateway's audit_chain_store or grant_store "
                            f"(default: {DEFAULT_STORES[0]}, else jitgate.db or audit-chain.db beside the log)")
    output_flag(check, "a summary")
    check.set_defaults(func=cmd_verify)
