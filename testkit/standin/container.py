"""A pretend container for pods/exec: its environment, a small filesystem and a busybox-like shell.

The environment and files come from the pod spec and the store (env valueFrom secrets/configmaps,
configMap/secret volume mounts, the service account token), so what an exec shows is what a real
container of that pod would show, secrets included, which is what masking has to deal with.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .store import Store

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
OS_RELEASE = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""
BASE_DIRS = ("/", "/bin", "/dev", "/etc", "/home", "/proc", "/root", "/run", "/sbin", "/tmp", "/usr", "/usr/bin",
             "/usr/local", "/usr/local/bin", "/usr/sbin", "/var", "/var/log", "/var/run")
BIN_DIRS = ("/bin", "/usr/bin", "/sbin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


def _decode(b64: str) -> bytes:
    try:
        return base64.b64decode(b64)
    except ValueError:
        return b""


@dataclass
class Container:
    """One container of one pod, as exec sees it. `files` is shared across execs (writes persist)."""

    pod: dict
    name: str
    env: dict[str, str]
    files: dict[str, bytes]
    read_only: set[str] = field(default_factory=set)

    @property
    def pod_name(self) -> str:
        return self.pod["metadata"]["name"]

    def spec(self) -> dict:
        return next(c for c in self.pod["spec"]["containers"] if c["name"] == self.name)

    def dirs(self) -> set[str]:
        out = set(BASE_DIRS)
        for path in self.files:
            parent = posixpath.dirname(path)
            while parent not in out:
                out.add(parent)
                parent = posixpath.dirname(parent)
        return out


def build_container(store: Store, pod: dict, container_name: str, files: dict[str, bytes] | None = None) -> Container:
    ns = pod["metadata"]["namespace"]
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container_name)
    secrets, configmaps = store.rt("", "secrets"), store.rt("", "configmaps")

    def secret_data(name: str) -> dict[str, bytes]:
        obj = store.try_get(secrets, ns, name) or {}
        return {k: _decode(v) for k, v in (obj.get("data") or {}).items()}

    def configmap_data(name: str) -> dict[str, bytes]:
        obj = store.try_get(configmaps, ns, name) or {}
        return {k: v.encode() for k, v in (obj.get("data") or {}).items()}

    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME": pod["metadata"]["name"]}
    for source in spec.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = configmap_data(source["configMapRef"]["name"])
        else:
            data = secret_data(source.get("secretRef", {}).get("name", ""))
        env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
    fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": ns,
              "status.podIP": pod.get("status", {}).get("podIP", ""),
              "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "")}
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                                      str(var["value"]))
        elif "valueFrom" in var:
            ref = var["valueFrom"]
            if "secretKeyRef" in ref:
                value = secret_data(ref["secretKeyRef"]["name"]).get(ref["secretKeyRef"]["key"], b"")
                env[var["name"]] = value.decode(errors="replace")
            elif "configMapKeyRef" in ref:
                value = configmap_data(ref["configMapKeyRef"]["name"]).get(ref["configMapKeyRef"]["key"], b"")
                env[var["name"]] = value.decode(errors="replace")
            elif "fieldRef" in ref:
                env[var["name"]] = fields.get(ref["fieldRef"].get("fieldPath", ""), "")
        else:
            env[var["name"]] = ""
    env.update({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
                "KUBERNETES_SERVICE_PORT_HTTPS": "443", "KUBERNETES_PORT": "tcp://10.96.0.1:443",
                "HOME": "/root"})

    # configMap and secret volumes are always read-only in kube, whatever the mount says.
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    read_only = {m["mountPath"] for m in spec.get("volumeMounts", [])
                 if m.get("readOnly") or {"configMap", "secret"} & set(volumes.get(m["name"], {}))}
    read_only.add(SERVICE_ACCOUNT_DIR)
    if files is None:
        files = {}
        pod_ip = pod.get("status", {}).get("podIP", "")
        files["/etc/hostname"] = f"{pod['metadata']['name']}\n".encode()
        files["/etc/hosts"] = (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                               f"{pod_ip}\t{pod['metadata']['name']}\n").encode()
        files["/etc/os-release"] = OS_RELEASE.encode()
        files["/etc/resolv.conf"] = (f"search {ns}.svc.cluster.local svc.cluster.local cluster.local\n"
                                     "nameserver 10.96.0.10\noptions ndots:5\n").encode()
        files["/etc/passwd"] = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        sa = pod["spec"].get("serviceAccountName", "default")
        files[f"{SERVICE_ACCOUNT_DIR}/namespace"] = ns.encode()
        files[f"{SERVICE_ACCOUNT_DIR}/token"] = _service_account_token(ns, sa, pod["metadata"]["uid"]).encode()
        files[f"{SERVICE_ACCOUNT_DIR}/ca.crt"] = (b"-----BEGIN CERTIFICATE-----\nstand-in cluster CA\n"
                                                  b"-----END CERTIFICATE-----\n")
        for mount in spec.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            if "configMap" in volume:
                data, items = configmap_data(volume["configMap"].get("name", "")), volume["configMap"].get("items")
            elif "secret" in volume:
                data, items = secret_data(volume["secret"].get("secretName", "")), volume["secret"].get("items")
            else:
                continue
            paths = {i["key"]: i.get("path", i["key"]) for i in items} if items else {k: k for k in data}
            for key, rel in paths.items():
                if key in data:
                    files[posixpath.join(mount["mountPath"], rel)] = data[key]
    return Container(pod, container_name, env, files, read_only)


def _service_account_token(ns: str, sa: str, uid: str) -> str:
    """A JWT-shaped projected token: header.payload.signature, all fake but the shape masking looks for."""
    enc = lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")
    header = enc('{"alg":"RS256","kid":"standin"}')
    payload = enc(f'{{"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:{ns}:{sa}",'
                  f'"aud":["https://kubernetes.default.svc"],"kubernetes.io":{{"pod":{{"uid":"{uid}"}}}}}}')
    return f"{header}.{payload}.{enc('standin-signature-' + uid)}"


# Process I/O --------------------------------------------------------------------------------------

Writer = Callable[[int, bytes], Awaitable[None]]


class ProcessIO:
    """stdin/stdout/stderr of one process. With a tty: a line discipline that echoes and maps \\n to \\r\\n."""

    def __init__(self, write: Writer, tty: bool, stdin: bool):
        self._write = write
        self.tty = tty
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._pending = b""
        self._eof = not stdin
        self.interrupted = False

    def feed(self, data: bytes) -> None:
        if data:
            self._chunks.put_nowait(data)

    def feed_eof(self) -> None:
        self._chunks.put_nowait(b"")

    async def _next_chunk(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._eof:
            return b""
        data = await self._chunks.get()
        if not data:
            self._eof = True
        return data

    async def read(self) -> bytes:
        """The next chunk of raw stdin, b"" at end of input."""
        return await self._next_chunk()

    async def readline(self) -> str | None:
        """One line without its terminator; None at end of input."""
        return await (self._tty_readline() if self.tty else self._plain_readline())

    async def _plain_readline(self) -> str | None:
        buf = b""
        while True:
            if b"\n" in buf:
                line, rest = buf.split(b"\n", 1)
                self._pending = rest + self._pending
                return line.decode(errors="replace").rstrip("\r")
            chunk = await self._next_chunk()
            if not chunk:
                return buf.decode(errors="replace") if buf else None
            buf += chunk

    async def _tty_readline(self) -> str | None:
        line = ""
        while True:
            chunk = await self._next_chunk()
            if not chunk:
                return line or None
            text = chunk.decode(errors="replace")
            i = 0
            while i < len(text):
                ch = text[i]
                i += 1
                if ch in "\r\n":
                    await self._write(1, b"\r\n")
                    self._pending = text[i:].lstrip("\n").encode() + self._pending
                    return line
                if ch in "\x7f\x08":
                    if line:
                        line = line[:-1]
                        await self._write(1, b"\b \b")
                elif ch == "\x03":
                    await self._write(1, b"^C\r\n")
                    self.interrupted = True
                    self._pending = text[i:].encode() + self._pending
                    return ""
                elif ch == "\x04":
                    if not line:
                        self._pending = text[i:].encode() + self._pending
                        return None
                elif ch == "\x15":
                    await self._write(1, b"\b \b" * len(line))
                    line = ""
                elif ch == "\x1b":
                    # Swallow an escape sequence (arrow keys): ESC [ ... final byte.
                    if i < len(text) and text[i] in "[O":
                        i += 1
                        while i < len(text) and not text[i].isalpha() and text[i] != "~":
                            i += 1
                        i += 1
                elif ch >= " " or ch == "\t":
                    line += ch
                    await self._write(1, ch.encode())

    async def out(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        if self.tty:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if data:
            await self._write(1, data)

    async def err(self, text: str) -> None:
        data = text.encode()
        if self.tty:
            await self._write(1, data.replace(b"\n", b"\r\n"))
        elif data:
            await self._write(2, data)


class CapturedIO(ProcessIO):
    """The left side of a pipe or a redirect: output goes to a buffer, stdin comes from a given text."""

    def __init__(self, parent: ProcessIO, stdin: bytes | None):
        self.buffer = bytearray()

        async def write(channel: int, data: bytes) -> None:
            if channel == 1:
                self.buffer.extend(data)
            else:
                await parent._write(channel, data)

        super().__init__(write, tty=False, stdin=stdin is not None)
        self._parent = parent
        if stdin is not None:
            self.feed(stdin)
            self.feed_eof()

    async def err(self, text: str) -> None:
        await self._parent.err(text)


# The shell --------------------------------------------------------------------------------------

class CommandNotFound(Exception):
    pass


class ShellExit(Exception):
    def __init__(self, code: int):
        self.code = code


class Shell:
    """A busybox-flavoured command interpreter over a Container."""

    COMMANDS = ("cat", "cd", "date", "echo", "env", "exit", "false", "grep", "head", "hostname", "id", "ls",
                "printenv", "pwd", "sh", "bash", "ash", "sleep", "true", "uname", "wc", "whoami")

    def __init__(self, container: Container):
        self.container = container
        self.cwd = "/"
        self.last_status = 0
        self.shell_vars: dict[str, str] = {}

    # Lookup and dispatch --------------------------------------------------------------------------

    def resolve(self, argv0: str) -> str:
        name = argv0
        if "/" in argv0:
            directory, name = posixpath.split(posixpath.normpath(argv0))
            if directory not in BIN_DIRS:
                raise CommandNotFound(argv0)
        if name not in self.COMMANDS:
            raise CommandNotFound(argv0)
        return name

    async def run(self, argv: list[str], io: ProcessIO) -> int:
        """Run one command (no shell syntax). Raises CommandNotFound for unknown executables."""
        name = self.resolve(argv[0])
        handler = getattr(self, "cmd_" + name if name not in ("bash", "ash") else "cmd_sh")
        return await handler(argv[1:], io)

    # Shell language -------------------------------------------------------------------------------

    def _expand(self, line: str) -> str:
        """$VAR, ${VAR} and $? outside single quotes; the result is re-quoted so shlex keeps it one word."""
        env = {**self.container.env, **self.shell_vars, "?": str(self.last_status)}
        out, single, double, i = [], False, False, 0
        while i < len(line):
            ch = line[i]
            if ch == "'" and not double:
                single = not single
            elif ch == '"' and not single:
                double = not double
            elif ch == "\\" and not single and i + 1 < len(line):
                out.append(line[i:i + 2])
                i += 2
                continue
            elif ch == "$" and not single:
                m = re.match(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*|\?))", line[i:])
                if m:
                    value = env.get(m.group(1) or m.group(2), "")
                    if double:
                        out.append(re.sub(r'([\\"$`])', r"\\\1", value))
                    elif value:
                        out.append(shlex.quote(value))
                    i += m.end()
                    continue
            out.append(ch)
            i += 1
        return "".join(out)

    def _tokens(self, line: str) -> list[str]:
        lexer = shlex.shlex(self._expand(line), posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        return list(lexer)

    async def run_line(self, line: str, io: ProcessIO) -> int:
        status = self.last_status
        for join, segment in _split_list(line):
            if join == "&&" and status != 0 or join == "||" and status == 0:
                continue
            # Expanded only now, so `$?` sees the status of the command before it.
            try:
                words = self._tokens(segment)
            except ValueError as e:
                await io.err(f"sh: syntax error: {e}\n")
                status = 2
            else:
                if not words:
                    continue
                status = await self._pipeline(words, io)
            self.last_status = status
        return status

    async def _pipeline(self, words: list[str], io: ProcessIO) -> int:
        stages: list[list[str]] = [[]]
        for w in words:
            if w == "|":
                stages.append([])
            else:
                stages[-1].append(w)
        if any(not s for s in stages):
            await io.err('sh: syntax error: unexpected "|"\n')
            return 2
        data: bytes | None = None  # what the previous stage wrote: the next stage's stdin
        status = 0
        for index, stage in enumerate(stages):
            argv, redirect = self._redirects(stage)
            if not argv:
                await io.err("sh: syntax error: bad redirect\n")
                return 2
            last = index == len(stages) - 1
            if len(stages) == 1 and redirect is None:
                return await self._simple(argv, io)
            captured = CapturedIO(io, data)
            status = await self._simple(argv, captured)
            data = bytes(captured.buffer)
            if redirect is not None:
                target, append = redirect
                if target != "/dev/null":
                    error = self._write_file(target, data, append)
                    if error:
                        await io.err(f"sh: can't create {target}: {error}\n")
                        return 1
                data = b""
            elif last:
                await io.out(data)
        return status

    def _redirects(self, words: list[str]) -> tuple[list[str] | None, tuple[str, bool] | None]:
        argv, redirect, i = [], None, 0
        while i < len(words):
            w = words[i]
            if w in (">", ">>"):
                if i + 1 >= len(words):
                    return None, None
                redirect = (self._path(words[i + 1]), w == ">>")
                i += 2
                continue
            if w == ">&":
                # `2>&1`: stderr and stdout already share the session's channels; the "2" was split off.
                if argv and argv[-1] == "2":
                    argv.pop()
                i += 2
                continue
            if w == "<":
                return None, None
            argv.append(w)
            i += 1
        return argv, redirect

    async def _simple(self, argv: list[str], io: ProcessIO) -> int:
        assignments = []
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            assignments.append(argv.pop(0))
        if not argv:
            for a in assignments:
                k, _, v = a.partition("=")
                self.shell_vars[k] = v
            return 0
        try:
            return await self.run(argv, io)
        except CommandNotFound:
            await io.err(f"sh: {argv[0]}: not found\n")
            return 127

    # Files ----------------------------------------------------------------------------------------

    def _path(self, p: str) -> str:
        return posixpath.normpath(posixpath.join(self.cwd, p)) if p else self.cwd

    def _write_file(self, path: str, data: bytes, append: bool) -> str | None:
        if path in self.container.dirs():
            return "Is a directory"
        if posixpath.dirname(path) not in self.container.dirs():
            return "nonexistent directory"
        if any(path == ro or path.startswith(ro.rstrip("/") + "/") for ro in self.container.read_only):
            return "Read-only file system"
        old = self.container.files.get(path, b"") if append else b""
        self.container.files[path] = old + data
        return None

    # Commands -------------------------------------------------------------------------------------

    async def cmd_echo(self, args: list[str], io: ProcessIO) -> int:
        newline = True
        if args and args[0] == "-n":
            newline, args = False, args[1:]
        await io.out(" ".join(args) + ("\n" if newline else ""))
        return 0

    async def cmd_cat(self, args: list[str], io: ProcessIO) -> int:
        if not args or args == ["-"]:
            if io.tty:
                while (line := await io.readline()) is not None:
                    await io.out(line + "\n")
            else:
                while chunk := await io.read():
                    await io.out(chunk)
            return 0
        status = 0
        for name in args:
            path = self._path(name)
            if path in self.container.files:
                await io.out(self.container.files[path])
            elif path in self.container.dirs():
                await io.err("cat: read error: Is a directory\n")
                status = 1
            else:
                await io.err(f"cat: can't open '{name}': No such file or directory\n")
                status = 1
        return status

    async def cmd_head(self, args: list[str], io: ProcessIO) -> int:
        return await self._lines(args, io, lambda lines, n: lines[:n])

    async def cmd_wc(self, args: list[str], io: ProcessIO) -> int:
        data = await self._input(args[1:] if args and args[0] == "-l" else args, io)
        if data is None:
            return 1
        await io.out(f"{data.count(b'\n')}\n")
        return 0

    async def cmd_grep(self, args: list[str], io: ProcessIO) -> int:
        flags = {a for a in args if re.fullmatch(r"-[vi]+", a)}
        args = [a for a in args if a not in flags]
        invert, ignore_case = any("v" in f for f in flags), any("i" in f for f in flags)
        if not args:
            await io.err("Usage: grep [-vi] PATTERN [FILE]...\n")
            return 2
        pattern, files = args[0], args[1:]
        data = await self._input(files, io)
        if data is None:
            return 2
        options = re.IGNORECASE if ignore_case else 0
        try:
            regex = re.compile(pattern, options)
        except re.error:
            regex = re.compile(re.escape(pattern), options)
        matched = [line for line in data.decode(errors="replace").splitlines()
                   if bool(regex.search(line)) != invert]
        await io.out("".join(line + "\n" for line in matched))
        return 0 if matched else 1

    async def _lines(self, args: list[str], io: ProcessIO, pick: Callable[[list[str], int], list[str]]) -> int:
        n, files = 10, []
        i = 0
        while i < len(args):
            if args[i] == "-n" and i + 1 < len(args):
                n, i = int(args[i + 1]), i + 2
            elif re.fullmatch(r"-\d+", args[i]):
                n, i = int(args[i][1:]), i + 1
            else:
                files.append(args[i])
                i += 1
        data = await self._input(files, io)
        if data is None:
            return 1
        await io.out("".join(line + "\n" for line in pick(data.decode(errors="replace").splitlines(), n)))
        return 0

    async def _input(self, files: list[str], io: ProcessIO) -> bytes | None:
        if not files:
            chunks = []
            while chunk := await io.read():
                chunks.append(chunk)
            return b"".join(chunks)
        out = b""
        for name in files:
            path = self._path(name)
            if path not in self.container.files:
                await io.err(f"{name}: No such file or directory\n")
                return None
            out += self.container.files[path]
        return out

    async def cmd_env(self, args: list[str], io: ProcessIO) -> int:
        await io.out("".join(f"{k}={v}\n" for k, v in self.container.env.items()))
        return 0

    async def cmd_printenv(self, args: list[str], io: ProcessIO) -> int:
        if not args:
            return await self.cmd_env(args, io)
        values = [self.container.env[a] for a in args if a in self.container.env]
        await io.out("".join(v + "\n" for v in values))
        return 0 if len(values) == len(args) else 1

    async def cmd_hostname(self, args: list[str], io: ProcessIO) -> int:
        await io.out(self.container.pod_name + "\n")
        return 0

    async def cmd_pwd(self, args: list[str], io: ProcessIO) -> int:
        await io.out(self.cwd + "\n")
        return 0

    async def cmd_cd(self, args: list[str], io: ProcessIO) -> int:
        target = self._path(args[0] if args else "/root")
        if target not in self.container.dirs():
            await io.err(f"sh: cd: can't cd to {args[0] if args else target}: No such file or directory\n")
            return 2
        self.cwd = target
        return 0

    async def cmd_ls(self, args: list[str], io: ProcessIO) -> int:
        paths = [a for a in args if not a.startswith("-")] or ["."]
        status = 0
        dirs = self.container.dirs()
        for p in paths:
            path = self._path(p)
            if path in self.container.files:
                await io.out(p + "\n")
            elif path in dirs:
                children = {posixpath.basename(f) for f in list(self.container.files) + list(dirs)
                            if posixpath.dirname(f) == path and f != path}
                if len(paths) > 1:
                    await io.out(f"{p}:\n")
                await io.out("".join(c + "\n" for c in sorted(children)))
            else:
                await io.err(f"ls: {p}: No such file or directory\n")
                status = 1
        return status

    async def cmd_whoami(self, args: list[str], io: ProcessIO) -> int:
        await io.out("root\n")
        return 0

    async def cmd_id(self, args: list[str], io: ProcessIO) -> int:
        await io.out("uid=0(root) gid=0(root) groups=0(root)\n")
        return 0

    async def cmd_uname(self, args: list[str], io: ProcessIO) -> int:
        if "-a" in args:
            await io.out(f"Linux {self.container.pod_name} 6.1.0-standin #1 SMP x86_64 GNU/Linux\n")
        else:
            await io.out("Linux\n")
        return 0

    async def cmd_date(self, args: list[str], io: ProcessIO) -> int:
        await io.out(datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y\n"))
        return 0

    async def cmd_sleep(self, args: list[str], io: ProcessIO) -> int:
        try:
            seconds = float(args[0]) if args and args[0] != "infinity" else float("inf")
        except ValueError:
            await io.err(f"sleep: invalid number '{args[0]}'\n")
            return 1
        await asyncio.sleep(seconds if seconds != float("inf") else 10 ** 9)
        return 0

    async def cmd_true(self, args: list[str], io: ProcessIO) -> int:
        return 0

    async def cmd_false(self, args: list[str], io: ProcessIO) -> int:
        return 1

    async def cmd_exit(self, args: list[str], io: ProcessIO) -> int:
        try:
            code = int(args[0]) if args else self.last_status
        except ValueError:
            await io.err(f"sh: exit: Illegal number: {args[0]}\n")
            code = 2
        raise ShellExit(code & 0xFF)

    async def cmd_sh(self, args: list[str], io: ProcessIO) -> int:
        sub = Shell(self.container)
        sub.cwd = self.cwd
        script: str | None = None
        if "-c" in args:
            script = args[args.index("-c") + 1] if args.index("-c") + 1 < len(args) else ""
        elif args and not args[0].startswith("-"):
            path = self._path(args[0])
            if path not in self.container.files:
                await io.err(f"sh: can't open '{args[0]}': No such file or directory\n")
                return 2
            script = self.container.files[path].decode(errors="replace")
        if script is not None:
            try:
                for line in script.splitlines() or [""]:
                    await sub.run_line(line, io)
                return sub.last_status
            except ShellExit as e:
                return e.code
        try:
            while True:
                if io.tty:
                    await io.out(f"{self.container.pod_name}:{sub.cwd}# ")
                line = await io.readline()
                if line is None:
                    if io.tty:
                        await io.out("exit\n")
                    return sub.last_status
                if line.strip():
                    await sub.run_line(line, io)
        except ShellExit as e:
            return e.code


def _split_list(line: str) -> list[tuple[str, str]]:
    """Split a command line at `;`, `&`, `&&`, `||` outside quotes: [(joiner, segment), ...]."""
    out: list[tuple[str, str]] = []
    joiner, current, quote, i = ";", [], "", 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"' and i + 1 < len(line):
                current.append(line[i:i + 2])
                i += 2
                continue
            current.append(ch)
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == "\\" and i + 1 < len(line):
            current.append(line[i:i + 2])
            i += 2
            continue
        elif ch == "#" and (not current or current[-1] in " \t"):
            break
        elif line.startswith("&&", i) or line.startswith("||", i):
            out.append((joiner, "".join(current)))
            joiner, current = line[i:i + 2], []
            i += 2
            continue
        elif ch == ";" or (ch == "&" and not line.startswith(">&", i - 1)):
            out.append((joiner, "".join(current)))
            joiner, current = ";", []
        else:
            current.append(ch)
        i += 1
    out.append((joiner, "".join(current)))
    return out
