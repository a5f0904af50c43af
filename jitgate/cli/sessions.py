"""`jitgate sessions`: list, inspect, play, export and open session recordings.

Reads a local recordings folder (the gateway's `recordings` option, default `state/recordings`),
which only the gateway's operator can read (folders 0700, files 0600). Deciding who may see which
session through the gateway's access API is a later step; until then this is an operator's tool.

    jitgate sessions [--dir DIR] [--user U] [--cluster C] [--namespace N] [--since 2h] [--grant G] [--decision deny]
    jitgate sessions show ID
    jitgate sessions play ID [--speed 2] [--exec AUDITID] [--idle-limit 2]
    jitgate sessions export ID --har FILE [--flows FILE]
    jitgate sessions open ID [--port 8081] [--password PW]
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import secrets
import signal
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from jitgate.recording import har
from jitgate.recording.index import Filters, Index, SessionRow
from jitgate.recording.recorder import FLOWS, HAR, INDEX
from jitgate.timefmt import parse_duration, rfc3339

DEFAULT_DIR = "state/recordings"
ACCESS_NOTE = ("Reads the local recordings folder (the gateway's `recordings` option), which only the gateway's "
               "operator can read; access to sessions through the gateway's API is a later step.")
REPO = Path(__file__).resolve().parents[2]


class SessionsError(Exception):
    pass


# -- arguments ---------------------------------------------------------------------------------


def parse_since(text: str, now: float | None = None) -> float:
    """`2h`, `30m`, `7d` (that long ago), an RFC 3339 time, or a date (`2026-12-01`, UTC)."""
    now = time.time() if now is None else now
    text = text.strip()
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text.replace("z", "Z"), fmt)))
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"invalid time {text!r}: write 2h, 7d, 2026-12-01 or 2026-12-01T10:00:00Z")


def add_parser(sub) -> None:
    """Register `jitgate sessions` and its commands on the main parser's subparsers."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", default=argparse.SUPPRESS, metavar="DIR",
                       help=f"recordings folder (default: $JITGATE_RECORDINGS or {DEFAULT_DIR})")
    sessions = sub.add_parser(
        "sessions", help="session recordings: list, show, play, export, open in mitmweb",
        description="List session recordings, or show, play, export or open one. " + ACCESS_NOTE,
        epilog="examples:\n  jitgate sessions --user alice@example.com --since 24h\n  jitgate sessions show alice-example-com-grant-abc\n"
               "  jitgate sessions play alice-example-com-grant-abc --speed 2\n"
               "  jitgate sessions export alice-example-com-grant-abc --har alice.har\n"
               "  jitgate sessions open alice-example-com-grant-abc",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sessions.add_argument("--dir", default=None, metavar="DIR",
                          help=f"recordings folder (default: $JITGATE_RECORDINGS or {DEFAULT_DIR})")
    sessions.add_argument("--user", default="", help="username (alice@example.com, or alice for alice@...)")
    sessions.add_argument("--cluster", default="", help="sessions with calls on this cluster")
    sessions.add_argument("--namespace", "-n", default="", help="sessions with calls in this namespace")
    sessions.add_argument("--since", type=parse_since, default=None, help="active since: 2h, 7d, 2026-12-01, or RFC 3339")
    sessions.add_argument("--grant", default="", help="the session of this grant id")
    sessions.add_argument("--decision", choices=("allow", "deny", "none"), default="", help="sessions with a call so decided")
    sessions.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sessions.set_defaults(func=_guarded(cmd_list))
    commands = sessions.add_subparsers(dest="sessions_command", metavar="{show,play,export,open}")

    show = commands.add_parser("show", parents=[where], help="a session's calls, in order",
                               description="A session's timeline: time, verb, resource, status, decision, rule or grant. " + ACCESS_NOTE)
    show.add_argument("id")
    show.add_argument("-o", "--output", choices=("table", "json"), default="table")
    show.set_defaults(func=_guarded(cmd_show))

    play = commands.add_parser("play", parents=[where], help="play a session's exec/attach recordings in this terminal",
                               description="Play exec and attach recordings (asciicast v2) at their own pace or faster. " + ACCESS_NOTE)
    play.add_argument("id")
    play.add_argument("--speed", type=float, default=1.0, help="playback speed (2: twice as fast; default 1)")
    play.add_argument("--exec", dest="exec_id", default=None, metavar="AUDITID",
                      help="only this exec (its audit ID, or a prefix); default: every exec of the session in order")
    play.add_argument("--idle-limit", type=float, default=None, metavar="SECONDS", help="shorten longer pauses to this")
    play.set_defaults(func=_guarded(cmd_play))

    export = commands.add_parser("export", parents=[where], help="copy a session's HAR (and flow file) out",
                                 description="Write a session's HAR 1.2 file (and, with --flows, its mitmproxy flow file). " + ACCESS_NOTE)
    export.add_argument("id")
    export.add_argument("--har", metavar="FILE", help="HAR file to write (0600), or - for standard output")
    export.add_argument("--flows", metavar="FILE", help="mitmproxy flow file to write (0600)")
    export.set_defaults(func=_guarded(cmd_export))

    open_ = commands.add_parser("open", parents=[where], help="open a session's flows in mitmweb (127.0.0.1, with a password)",
                                description="Start mitmweb on 127.0.0.1 reading the session's flows.mitm, protected by a "
                                            "web password it prints; it sends nothing anywhere (replays are refused). " + ACCESS_NOTE)
    open_.add_argument("id")
    open_.add_argument("--port", type=int, default=0, help="web UI port (default: a free one)")
    open_.add_argument("--password", default=None, help="web password (default: a random one, printed)")
    open_.set_defaults(func=_guarded(cmd_open))


# -- helpers -----------------------------------------------------------------------------------


def _guarded(command):
    """Exit status 2 with a one-line message for what the folder or its files make impossible."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except SessionsError as e:
            print(f"jitgate: {e}", file=sys.stderr)
        except OSError as e:
            print(f"jitgate: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        except sqlite3.Error as e:
            print(f"jitgate: cannot read the recordings index: {e}", file=sys.stderr)
        return 2

    run.__name__ = command.__name__
    return run


def recordings_dir(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "dir", None) or os.environ.get("JITGATE_RECORDINGS") or DEFAULT_DIR)


def open_index(root: Path) -> Index:
    if not (root / INDEX).exists():
        raise SessionsError(f"no recordings index at {root / INDEX} (--dir names the gateway's recordings folder)")
    return Index(root / INDEX)


def session_folder(root: Path, session_id: str) -> Path:
    folder = root / session_id
    if "/" in session_id or session_id.startswith(".") or not folder.is_dir():
        raise SessionsError(f"no session {session_id!r} in {root}")
    return folder


def _when(timestamp: float | None, full: bool = True) -> str:
    if not timestamp:
        return "-"
    return rfc3339(timestamp) if full else time.strftime("%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _session_dict(row: SessionRow) -> dict:
    return {"id": row.id, "kind": row.kind, "user": row.user, "grant": row.grant, "rule": row.rule,
            "cluster": row.cluster, "first": rfc3339(row.first), "last": rfc3339(row.last), "calls": row.calls,
            "denied": row.denied, "execs": row.execs}


# -- commands ----------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    root = recordings_dir(args)
    index = open_index(root)
    try:
        rows = index.sessions(Filters(args.user, args.cluster, args.namespace, args.grant, args.decision, args.since))
    finally:
        index.close()
    if args.output == "json":
        print(json.dumps([_session_dict(r) for r in rows], indent=2))
        return 0
    if not rows:
        print("no sessions", file=sys.stderr)
        return 0
    table = [["SESSION", "USER", "GRANT", "RULE", "CLUSTER", "FIRST", "LAST", "CALLS", "DENIED", "EXECS"]]
    for r in rows:
        table.append([r.id, r.user or "-", r.grant or "-", r.rule or "-", r.cluster or "-", _when(r.first), _when(r.last),
                      str(r.calls), str(r.denied), str(r.execs)])
    print(_table(table))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    root = recordings_dir(args)
    index = open_index(root)
    try:
        row = index.session(args.id)
        if row is None:
            raise SessionsError(f"no session {args.id!r} in {root}")
        calls = index.calls(args.id)
    finally:
        index.close()
    if args.output == "json":
        print(json.dumps({**_session_dict(row), "calls": calls}, indent=2))
        return 0
    print(f"session  {row.id}")
    print(f"user     {row.user or 'anonymous'}")
    if row.grant:
        print(f"grant    {row.grant} (rule {row.rule})")
    print(f"cluster  {row.cluster or '-'}")
    print(f"folder   {root / row.id}")
    print(f"calls    {row.calls} ({row.denied} denied), {_when(row.first)} .. {_when(row.last)}")
    print()
    table = [["TIME", "VERB", "RESOURCE", "STATUS", "DECISION", "RULE/GRANT", "AUDIT ID"]]
    for c in calls:
        resource = c["resource"] + (f"/{c['subresource']}" if c["subresource"] else "")
        if c["namespace"]:
            resource = f"{resource} -n {c['namespace']}"
        if c["name"]:
            resource = f"{resource} {c['name']}"
        rule = f"{c['rule']}/{c['grant_id']}" if c["grant_id"] else "-"
        table.append([_when(c["time"], full=False), c["verb"] or "-", resource if c["resource"] else c["path"][:60],
                      str(c["code"] or "-"), c["decision"], rule, c["audit_id"] + (" (exec recording)" if c["cast_file"] else "")])
    print(_table(table))
    denied = [c for c in calls if c["decision"] == "deny" and c["reason"]]
    for c in denied:
        print(f"\n{_when(c['time'], full=False)} denied: {c['reason']}")
    return 0


def read_cast(path: Path) -> tuple[dict, list[list]]:
    """An asciicast v2 file's header and events (a partial last line, from a killed gateway, is skipped)."""
    lines = path.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get("version") != 2:
        raise SessionsError(f"{path} is not asciicast v2")
    events = []
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            break
    return header, events


def casts_of(folder: Path, exec_id: str | None) -> list[Path]:
    casts = sorted(folder.glob("exec-*.cast"), key=lambda p: read_cast(p)[0].get("timestamp", 0))
    if exec_id:
        casts = [p for p in casts if p.name[len("exec-"):].startswith(exec_id)]
    return casts


def play(path: Path, speed: float, idle_limit: float | None, out=None, sleep=time.sleep) -> None:
    out = out or sys.stdout
    header, events = read_cast(path)
    print(f"--- {header.get('title', path.name)} ({header.get('width')}x{header.get('height')}, "
          f"{_when(header.get('timestamp'))})", file=sys.stderr)
    previous = 0.0
    for at, kind, data in events:
        pause = max(at - previous, 0.0)
        previous = at
        if idle_limit is not None:
            pause = min(pause, idle_limit)
        if pause > 0:
            sleep(pause / speed)
        if kind == "o":
            out.write(data)
            out.flush()
        elif kind == "m":
            print(f"\r\n--- {data}", file=sys.stderr)


def cmd_play(args: argparse.Namespace) -> int:
    if args.speed <= 0:
        raise SessionsError("--speed must be more than 0")
    folder = session_folder(recordings_dir(args), args.id)
    casts = casts_of(folder, args.exec_id)
    if not casts:
        raise SessionsError(f"session {args.id} has no exec recording" + (f" {args.exec_id}" if args.exec_id else ""))
    for path in casts:
        play(path, args.speed, args.idle_limit)
    return 0


def _write_private(target: str, data: bytes) -> None:
    if target == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def har_bytes(path: Path) -> bytes:
    """The session's HAR as it is, or repaired when the gateway was killed in the middle of a write."""
    return har.repaired(path.read_bytes())


def cmd_export(args: argparse.Namespace) -> int:
    if not args.har and not args.flows:
        raise SessionsError("say what to export: --har FILE and/or --flows FILE")
    folder = session_folder(recordings_dir(args), args.id)
    if args.har:
        _write_private(args.har, har_bytes(folder / HAR))
    if args.flows:
        _write_private(args.flows, (folder / FLOWS).read_bytes())
    if args.har and args.har != "-":
        print(f"wrote {args.har}", file=sys.stderr)
    if args.flows:
        print(f"wrote {args.flows}", file=sys.stderr)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mitmweb_command(flows: Path, port: int, password: str) -> list[str]:
    binary = shutil.which("mitmweb", path=str(Path(sys.executable).parent)) or shutil.which("mitmweb")
    if binary is None:
        raise SessionsError("mitmweb is not installed (it comes with mitmproxy)")
    cmd = [binary, "--no-server", "-r", str(flows), "--set", "web_host=127.0.0.1", "--set", f"web_port={port}",
           "--set", f"web_password={password}", "--set", "web_open_browser=false",
           "--set", "web_columns=icon,path,method,status,size,time,comment"]
    viewer = REPO / "addons" / "recording.py"
    if viewer.exists():  # refuses replays from the UI: nothing recorded is sent anywhere again
        cmd[1:1] = ["-s", str(viewer), "--set", "recording_viewer=true"]
    return cmd


def cmd_open(args: argparse.Namespace) -> int:
    folder = session_folder(recordings_dir(args), args.id)
    port = args.port or free_port()
    password = args.password or secrets.token_urlsafe(18)
    cmd = mitmweb_command(folder / FLOWS, port, password)
    print(f"mitmweb: http://127.0.0.1:{port}/  (session {args.id})")
    print(f"web password: {password}")
    print("Ctrl-C stops it.", flush=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def stop_viewer(signum, _frame) -> None:
        raise SystemExit(128 + signum)

    # A closed terminal (SIGHUP) or a `kill` (SIGTERM) must not leave the viewer running on its own.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_viewer)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

