"""`jitgate sessions`: list, inspect, play, export and open session recordings.

Two ways to reach them:

- through the gateway's access API (the default), connecting as every `jitgate` command does (the
  kubeconfig context, or --server/--proxy/--ca/--token): the caller sees the sessions the policy
  lets them see (their own; those of grants under access rules they review; every one as an
  auditor), and the gateway audits each view and export;
- from a local recordings folder (`--dir`, or `$JITGATE_RECORDINGS`): the gateway operator's way,
  on the gateway's host, reading the files directly (folders 0700, files 0600: only the operator can).

    jitgate sessions [--dir DIR] [--user U] [--cluster C] [--namespace N] [--since 2h] [--until 1h] [--grant G] [--decision deny]
    jitgate sessions show ID
    jitgate sessions play ID [--speed 2] [--exec AUDITID] [--idle-limit 2]
    jitgate sessions export ID --har FILE [--flows FILE]
    jitgate sessions open ID [--port 8081] [--password PW]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from jitgate.cli.client import Client, ClientError, connection_flags, load_connection
from jitgate.recording import har
from jitgate.recording.index import Filters, Index, SessionRow
from jitgate.recording.recorder import FLOWS, HAR, INDEX
from jitgate.recording.sessions import parse_when
from jitgate.timefmt import rfc3339

DEFAULT_DIR = "state/recordings"
ACCESS_NOTE = ("By default it asks the gateway's access API, connecting like every jitgate command (the kubeconfig "
               "context, or --server/--proxy/--ca/--token), and shows the sessions the policy lets you see: your own, "
               "those of grants under access rules you review, every one if you are an auditor; the gateway audits "
               "each view and export. With --dir (or $JITGATE_RECORDINGS) it reads a local recordings folder "
               "instead: the gateway operator's way, on the gateway's host.")
REPO = Path(__file__).resolve().parents[2]
CONNECTION_FLAGS = ("kubeconfig", "context", "server", "proxy", "ca", "token")
MAX_DOWNLOAD = 160 * 1024 * 1024  # above what the gateway serves (128 MiB): its refusal is what the user reads
PAGE = 10000  # timeline calls per API call (the API's maximum)


class SessionsError(Exception):
    pass


# -- arguments ---------------------------------------------------------------------------------


def parse_since(text: str, now: float | None = None) -> float:
    """`2h`, `30m`, `7d` (that long ago), an RFC 3339 time, or a date (`2026-12-01`, UTC)."""
    try:
        return parse_when(text, time.time() if now is None else now)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _connection(suppress: bool) -> argparse.ArgumentParser:
    """The connection flags every access command has. On the subcommands they have no defaults of
    their own, so `jitgate sessions --server URL show ID` keeps the URL."""
    flags = connection_flags()
    if suppress:
        for action in flags._actions:
            action.default = argparse.SUPPRESS
    return flags


def add_parser(sub) -> None:
    """Register `jitgate sessions` and its commands on the main parser's subparsers."""
    dir_help = ("read this local recordings folder (the gateway's `recordings` option, e.g. "
                f"{DEFAULT_DIR}) instead of asking the gateway; $JITGATE_RECORDINGS does the same")
    where = argparse.ArgumentParser(add_help=False, parents=[_connection(suppress=True)])
    where.add_argument("--dir", default=argparse.SUPPRESS, metavar="DIR", help=dir_help)
    sessions = sub.add_parser(
        "sessions", help="session recordings: list, show, play, export, open in mitmweb",
        parents=[_connection(suppress=False)],
        description="List session recordings, or show, play, export or open one. " + ACCESS_NOTE,
        epilog="examples:\n  jitgate sessions --user alice@example.com --since 24h\n  jitgate sessions show alice-example-com-grant-abc\n"
               "  jitgate sessions play alice-example-com-grant-abc --speed 2\n"
               "  jitgate sessions export alice-example-com-grant-abc --har alice.har\n"
               "  jitgate sessions open alice-example-com-grant-abc\n"
               "  jitgate sessions --dir /var/lib/jitgate/recordings --decision deny   # the operator, on the gateway's host",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sessions.add_argument("--dir", default=None, metavar="DIR", help=dir_help)
    sessions.add_argument("--user", default="", help="username (alice@example.com, or alice for alice@...)")
    sessions.add_argument("--cluster", default="", help="sessions with calls on this cluster")
    sessions.add_argument("--namespace", "-n", default="", help="sessions with calls in this namespace")
    sessions.add_argument("--since", type=parse_since, default=None, help="active since: 2h, 7d, 2026-12-01, or RFC 3339")
    sessions.add_argument("--until", type=parse_since, default=None, help="active until: 1h (ago), 2026-12-02, or RFC 3339")
    sessions.add_argument("--grant", default="", help="the session of this grant id")
    sessions.add_argument("--decision", choices=("allow", "deny", "none"), default="", help="sessions with a call so decided")
    sessions.add_argument("--limit", type=int, default=None, metavar="N",
                          help="at most N sessions, the last active first (through the gateway: default 200, at most 1000)")
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
                                description="Start mitmweb on 127.0.0.1 reading the session's flows.mitm (through the gateway: "
                                            "downloaded into a private temporary folder, deleted when mitmweb ends), protected "
                                            "by a web password it prints; it sends nothing anywhere (replays are refused). " + ACCESS_NOTE)
    open_.add_argument("id")
    open_.add_argument("--port", type=int, default=0, help="web UI port (default: a free one)")
    open_.add_argument("--password", default=None, help="web password (default: a random one, printed)")
    open_.set_defaults(func=_guarded(cmd_open))


# -- where the recordings are --------------------------------------------------------------------


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


def local_dir(args: argparse.Namespace) -> Path | None:
    """The local recordings folder to read, or None to ask the gateway: --dir, else
    $JITGATE_RECORDINGS unless a connection flag names a gateway."""
    given = [f"--{name}" for name in CONNECTION_FLAGS if getattr(args, name, None)]
    folder = getattr(args, "dir", None)
    if folder:
        if given:
            raise SessionsError(f"--dir reads a local recordings folder, {', '.join(given)} name a gateway: give one or the other")
        return Path(folder)
    if not given and os.environ.get("JITGATE_RECORDINGS"):
        return Path(os.environ["JITGATE_RECORDINGS"])
    return None


def recordings_dir(args: argparse.Namespace) -> Path:
    return local_dir(args) or Path(DEFAULT_DIR)


def open_index(root: Path) -> Index:
    if not (root / INDEX).exists():
        raise SessionsError(f"no recordings index at {root / INDEX} (--dir names the gateway's recordings folder)")
    return Index(root / INDEX)


def session_folder(root: Path, session_id: str) -> Path:
    folder = root / session_id
    if "/" in session_id or session_id.startswith(".") or not folder.is_dir():
        raise SessionsError(f"no session {session_id!r} in {root}")
    return folder


class Gateway:
    """The sessions routes of the gateway's access API."""

    def __init__(self, args: argparse.Namespace) -> None:
        try:
            connection = load_connection(**{name: getattr(args, name, None) for name in CONNECTION_FLAGS})
        except ClientError as e:
            raise ClientError(f"{e}\n(or read a local recordings folder on the gateway's host with --dir)") from None
        self.client = Client(connection, timeout=getattr(args, "request_timeout", None) or 30.0)

    def sessions(self, query: dict[str, str]) -> list[dict]:
        return self.client.request("GET", "sessions", query=query)["items"]

    def session(self, session_id: str) -> dict:
        """The session with its whole timeline (paged)."""
        view = self.client.request("GET", f"sessions/{_segment(session_id)}", query={"limit": str(PAGE)})
        timeline = list(view["timeline"])
        while len(timeline) < view["calls"] and len(view["timeline"]) == PAGE:
            view = self.client.request("GET", f"sessions/{_segment(session_id)}",
                                       query={"limit": str(PAGE), "offset": str(len(timeline))})
            timeline += view["timeline"]
            view["casts"] = []  # only the last page's; rebuilt below
        view["timeline"] = timeline
        view["casts"] = [{"exec": c["exec"], "time": c["time"], "audit_id": c["audit_id"]} for c in timeline if c.get("exec")]
        view["offset"] = 0
        return view

    def download(self, path: str) -> bytes:
        """A recording's bytes (HAR, flow file, asciicast), not JSON."""
        return self.client.download(path, MAX_DOWNLOAD)

    def har(self, session_id: str) -> bytes:
        return self.download(f"sessions/{_segment(session_id)}/har")

    def flows(self, session_id: str) -> bytes:
        return self.download(f"sessions/{_segment(session_id)}/flows")

    def cast(self, session_id: str, exec_id: str) -> bytes:
        return self.download(f"sessions/{_segment(session_id)}/casts/{_segment(exec_id)}")


def _segment(text: str) -> str:
    return quote(text, safe="")


# -- output --------------------------------------------------------------------------------------


def _when(timestamp: float | None, full: bool = True) -> str:
    if not timestamp:
        return "-"
    return rfc3339(timestamp) if full else time.strftime("%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}"


def _clock(text: str | None) -> str:
    """`HH:MM:SS.mmm` of an RFC 3339 time from the API."""
    if not text:
        return "-"
    _, _, clock = text.partition("T")
    return clock.rstrip("Z")[:12] or text


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _session_dict(row: SessionRow) -> dict:
    return {"id": row.id, "kind": row.kind, "user": row.user, "grant": row.grant, "rule": row.rule,
            "cluster": row.cluster, "first": rfc3339(row.first), "last": rfc3339(row.last), "calls": row.calls,
            "denied": row.denied, "execs": row.execs}


def _print_sessions(items: list[dict], through_gateway: bool) -> None:
    head = ["SESSION", "USER", "GRANT", "RULE", "CLUSTER", "FIRST", "LAST", "CALLS", "DENIED", "EXECS"]
    table = [head + (["SEEN AS"] if through_gateway else [])]
    for s in items:
        table.append([s["id"], s["user"] or "-", s["grant"] or "-", s["rule"] or "-", s["cluster"] or "-", s["first"] or "-",
                      s["last"] or "-", str(s["calls"]), str(s["denied"]), str(s["execs"])]
                     + ([s.get("visible_as", "")] if through_gateway else []))
    print(_table(table))


def _print_timeline(session: dict, calls: list[dict], where: str) -> None:
    print(f"session  {session['id']}")
    print(f"user     {session['user'] or 'anonymous'}")
    if session["grant"]:
        print(f"grant    {session['grant']} (rule {session['rule']})")
    print(f"cluster  {session['cluster'] or '-'}")
    print(where)
    print(f"calls    {session['calls']} ({session['denied']} denied), {session['first'] or '-'} .. {session['last'] or '-'}")
    print()
    table = [["TIME", "VERB", "RESOURCE", "STATUS", "DECISION", "RULE/GRANT", "AUDIT ID"]]
    for c in calls:
        resource = c["resource"] + (f"/{c['subresource']}" if c["subresource"] else "")
        if c["namespace"]:
            resource = f"{resource} -n {c['namespace']}"
        if c["name"]:
            resource = f"{resource} {c['name']}"
        rule = f"{c['rule']}/{c['grant']}" if c["grant"] else "-"
        table.append([c["clock"], c["verb"] or "-", resource if c["resource"] else c["path"][:60],
                      str(c["code"] or "-"), c["decision"], rule, c["audit_id"] + (" (exec recording)" if c["exec"] else "")])
    print(_table(table))
    for c in calls:
        if c["decision"] == "deny" and c["reason"]:
            print(f"\n{c['clock']} denied: {c['reason']}")


# -- commands ----------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    root = local_dir(args)
    if root is None:
        query = {key: value for key, value in (("user", args.user), ("cluster", args.cluster), ("namespace", args.namespace),
                                               ("grant", args.grant), ("decision", args.decision)) if value}
        for key in ("since", "until"):
            if getattr(args, key) is not None:
                query[key] = rfc3339(getattr(args, key))
        if args.limit is not None:
            query["limit"] = str(args.limit)
        items = Gateway(args).sessions(query)
    else:
        index = open_index(root)
        try:
            rows = index.sessions(Filters(args.user, args.cluster, args.namespace, args.grant, args.decision, args.since,
                                          args.until), limit=args.limit)
        finally:
            index.close()
        items = [_session_dict(r) for r in rows]
    if args.output == "json":
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print("no sessions" + (" that you can see" if root is None else ""), file=sys.stderr)
        return 0
    _print_sessions(items, root is None)
    return 0


def _local_call(c: dict) -> dict:
    cast = c["cast_file"]
    return {**c, "grant": c["grant_id"], "clock": _when(c["time"], full=False),
            "exec": cast[len("exec-"):-len(".cast")] if cast else None}


def cmd_show(args: argparse.Namespace) -> int:
    root = local_dir(args)
    if root is None:
        view = Gateway(args).session(args.id)
        if args.output == "json":
            print(json.dumps(view, indent=2))
            return 0
        calls = [{**c, "clock": _clock(c["time"])} for c in view["timeline"]]
        _print_timeline(view, calls, f"seen as  {view['visible_as']} (through the gateway)")
        return 0
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
    _print_timeline(_session_dict(row), [_local_call(c) for c in calls], f"folder   {root / row.id}")
    return 0


def parse_cast(data: bytes, name: str) -> tuple[dict, list[list]]:
    """An asciicast v2 file's header and events (a partial last line, from a killed gateway, is skipped)."""
    lines = data.split(b"\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise SessionsError(f"{name} is not asciicast v2")
    events = []
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            break
    return header, events


def read_cast(path: Path) -> tuple[dict, list[list]]:
    return parse_cast(path.read_bytes(), str(path))


def casts_of(folder: Path, exec_id: str | None) -> list[Path]:
    casts = sorted(folder.glob("exec-*.cast"), key=lambda p: read_cast(p)[0].get("timestamp", 0))
    if exec_id:
        casts = [p for p in casts if p.name[len("exec-"):].startswith(exec_id)]
    return casts


def play_cast(header: dict, events: list[list], name: str, speed: float, idle_limit: float | None, out=None,
              sleep=time.sleep) -> None:
    out = out or sys.stdout
    print(f"--- {header.get('title', name)} ({header.get('width')}x{header.get('height')}, "
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


def play(path: Path, speed: float, idle_limit: float | None, out=None, sleep=time.sleep) -> None:
    header, events = read_cast(path)
    play_cast(header, events, path.name, speed, idle_limit, out, sleep)


def cmd_play(args: argparse.Namespace) -> int:
    if args.speed <= 0:
        raise SessionsError("--speed must be more than 0")
    root = local_dir(args)
    missing = f"session {args.id} has no exec recording" + (f" {args.exec_id}" if args.exec_id else "")
    if root is None:
        gateway = Gateway(args)
        execs = [c["exec"] for c in gateway.session(args.id)["casts"]]
        execs = [e for e in execs if not args.exec_id or e.startswith(args.exec_id)]
        if not execs:
            raise SessionsError(missing)
        casts = [parse_cast(gateway.cast(args.id, e), f"exec-{e}.cast") + (f"exec-{e}.cast",) for e in execs]
        for header, events, name in sorted(casts, key=lambda c: c[0].get("timestamp", 0)):
            play_cast(header, events, name, args.speed, args.idle_limit)
        return 0
    casts = casts_of(session_folder(root, args.id), args.exec_id)
    if not casts:
        raise SessionsError(missing)
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
    root = local_dir(args)
    if root is None:
        gateway = Gateway(args)
        har_data = gateway.har(args.id) if args.har else None
        flows_data = gateway.flows(args.id) if args.flows else None
    else:
        folder = session_folder(root, args.id)
        har_data = har_bytes(folder / HAR) if args.har else None
        flows_data = (folder / FLOWS).read_bytes() if args.flows else None
    if args.har:
        _write_private(args.har, har_data)
    if args.flows:
        _write_private(args.flows, flows_data)
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
    root = local_dir(args)
    temp = None
    try:
        if root is None:
            data = Gateway(args).flows(args.id)
            temp = Path(tempfile.mkdtemp(prefix="jitgate-session-"))  # 0700: only you read the download
            flows = temp / FLOWS
            _write_private(str(flows), data)
        else:
            flows = session_folder(root, args.id) / FLOWS
        return _run_viewer(args, flows)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _run_viewer(args: argparse.Namespace, flows: Path) -> int:
    port = args.port or free_port()
    password = args.password or secrets.token_urlsafe(18)
    cmd = mitmweb_command(flows, port, password)
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
