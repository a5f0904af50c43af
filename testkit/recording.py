"""Test support for session recordings: a gateway with a recordings folder and a grant, readers that
check the files against their formats (HAR 1.2, asciicast v2, mitmproxy flow files), mitmweb, and a
walk of every stored byte for values that must not be there.

    env = RecordingGateway(stack, tmp / "gw").start()
    env.kubectl("get", "pods", "-n", "dev")
    har = load_har(env.session_folder(env.grant_session()) / "session.har")   # validated against HAR 1.2
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema

from testkit.gateway import REPO, GatewayProcess
from testkit.net import free_port, stop, wait_for_port
from testkit.standin.process import run_kubectl

JITGATE = str(Path(sys.executable).with_name("jitgate"))
MITMWEB = str(Path(sys.executable).with_name("mitmweb"))
MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
ALICE = ("alice@example.com", ("oidc:developers",))
REVIEWER = ("rita@example.com", ("oidc:sre",))


# --- a gateway that records ---------------------------------------------------------------------------


class RecordingGateway:
    """A gateway of its own (recordings under `work/recordings`) over the session's stand-in clusters,
    with the session policy (`stack.policy`), a grant store of its own and kubeconfigs for alice."""

    def __init__(self, stack, work: Path, options: dict[str, str] | None = None, script: str = "addons/gateway.py") -> None:
        self.stack = stack
        self.work = work
        self.store = work / "grants.db"
        self.options = {"grant_store": str(self.store), "recordings": str(work / "recordings"), **(options or {})}
        self.recordings = Path(self.options["recordings"])
        self.script = script
        self.gateway: GatewayProcess | None = None
        self.token = stack.idp.token("alice", email=ALICE[0], email_verified=True, groups=["developers"])

    def start(self) -> RecordingGateway:
        from tests.conftest import DEV_HOST, LAB_HOST, aws_env

        if self.gateway is not None:  # started again: the same ports, so kubeconfigs still hold
            self.gateway.start()
            return self
        self.gateway = GatewayProcess(self.work / "gw", self.stack.policy,
                                      reverse_endpoints={"dev": f"https://{DEV_HOST}", "lab": f"https://{LAB_HOST}:6443"},
                                      options=self.options, script=self.script, env=aws_env(dict(os.environ), self.work)).start()
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()

    def kill(self) -> None:
        """SIGKILL: no `done` hook, no flush, no close."""
        self.gateway.proc.kill()
        self.gateway.proc.wait(10)

    def grant(self, cluster: str, namespaces: tuple[str, ...], resources: tuple[str, ...], verbs: tuple[str, ...]) -> str:
        """File and approve (by another person) a grant for alice; returns its id."""
        from jitgate.access.model import Person
        from jitgate.access.scope import Scope
        from jitgate.policy.loader import load_policy
        from jitgate.store.sqlite import SQLiteStore

        rules = load_policy(self.stack.policy).access_rules
        with SQLiteStore(self.store) as store:
            now = time.time()
            request = store.create_request(rules, Person(*ALICE), Scope(cluster, namespaces, False, resources, verbs),
                                           now=now, reason="recording tests")
            return store.review(rules, request.id, Person(*REVIEWER), "approve", "ok", now=now).grant.id

    def kubeconfig(self, cluster: str = "dev") -> Path:
        path = self.work / f"kubeconfig-{cluster}"
        if not path.exists():
            subprocess.run([JITGATE, "kubeconfig", "--policy", str(self.stack.policy), "--cluster", cluster, "--user", "alice",
                            "--token", self.token, "--gateway-ca", str(self.gateway.ca_path),
                            "--server", self.gateway.reverse_url(cluster), "-o", str(path)], check=True, capture_output=True)
        return path

    def kubectl(self, *args: str, cluster: str = "dev", **kw) -> subprocess.CompletedProcess:
        return run_kubectl(self.kubeconfig(cluster), *args, **kw)

    # --- what was recorded

    def calls(self) -> list[dict]:
        """Every row of the recordings index."""
        return index_calls(self.recordings)

    def wait_for_calls(self, predicate, timeout: float = 15) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            calls = self.calls()
            if predicate(calls) or time.monotonic() > deadline:
                return calls
            time.sleep(0.2)

    def session_folder(self, session_id: str) -> Path:
        return self.recordings / session_id


# --- formats ------------------------------------------------------------------------------------------

# HAR 1.2 (http://www.softwareishard.com/blog/har-12-spec/): the required fields of each object, their
# types, and the numbers that may not be negative. Custom fields start with "_" and are allowed.
_NAME_VALUE = {"type": "object", "required": ["name", "value"],
               "properties": {"name": {"type": "string"}, "value": {"type": "string"}, "comment": {"type": "string"}}}
_COOKIE = {"type": "object", "required": ["name", "value"],
           "properties": {"name": {"type": "string"}, "value": {"type": "string"}, "path": {"type": "string"},
                          "domain": {"type": "string"}, "expires": {"type": ["string", "null"]},
                          "httpOnly": {"type": "boolean"}, "secure": {"type": "boolean"}, "comment": {"type": "string"}}}
_SIZE = {"type": "integer", "minimum": -1}
_OPTIONAL_MS = {"type": "number", "minimum": -1}
_MS = {"type": "number", "minimum": 0}
HAR_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["log"],
    "properties": {"log": {
        "type": "object", "required": ["version", "creator", "entries"],
        "properties": {
            "version": {"const": "1.2"},
            "creator": {"type": "object", "required": ["name", "version"],
                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "comment": {"type": "string"}}},
            "browser": {"type": "object", "required": ["name", "version"]},
            "pages": {"type": "array", "items": {
                "type": "object", "required": ["startedDateTime", "id", "title", "pageTimings"]}},
            "comment": {"type": "string"},
            "entries": {"type": "array", "items": {
                "type": "object",
                "required": ["startedDateTime", "time", "request", "response", "cache", "timings"],
                "properties": {
                    "pageref": {"type": "string"},
                    "startedDateTime": {"type": "string",
                                        "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$"},
                    "time": _MS,
                    "request": {
                        "type": "object",
                        "required": ["method", "url", "httpVersion", "cookies", "headers", "queryString", "headersSize", "bodySize"],
                        "properties": {
                            "method": {"type": "string"}, "url": {"type": "string"}, "httpVersion": {"type": "string"},
                            "cookies": {"type": "array", "items": _COOKIE}, "headers": {"type": "array", "items": _NAME_VALUE},
                            "queryString": {"type": "array", "items": _NAME_VALUE},
                            "postData": {"type": "object", "required": ["mimeType"],
                                         "properties": {"mimeType": {"type": "string"}, "text": {"type": "string"},
                                                        "params": {"type": "array"}, "comment": {"type": "string"}}},
                            "headersSize": _SIZE, "bodySize": _SIZE, "comment": {"type": "string"}}},
                    "response": {
                        "type": "object",
                        "required": ["status", "statusText", "httpVersion", "cookies", "headers", "content", "redirectURL",
                                     "headersSize", "bodySize"],
                        "properties": {
                            "status": {"type": "integer"}, "statusText": {"type": "string"}, "httpVersion": {"type": "string"},
                            "cookies": {"type": "array", "items": _COOKIE}, "headers": {"type": "array", "items": _NAME_VALUE},
                            "content": {"type": "object", "required": ["size", "mimeType"],
                                        "properties": {"size": {"type": "integer", "minimum": 0}, "compression": {"type": "integer"},
                                                       "mimeType": {"type": "string"}, "text": {"type": "string"},
                                                       "encoding": {"type": "string"}, "comment": {"type": "string"}}},
                            "redirectURL": {"type": "string"}, "headersSize": _SIZE, "bodySize": _SIZE,
                            "comment": {"type": "string"}}},
                    "cache": {"type": "object"},
                    "timings": {"type": "object", "required": ["send", "wait", "receive"],
                                "properties": {"blocked": _OPTIONAL_MS, "dns": _OPTIONAL_MS, "connect": _OPTIONAL_MS,
                                               "send": _MS, "wait": _MS, "receive": _MS, "ssl": _OPTIONAL_MS,
                                               "comment": {"type": "string"}}},
                    "serverIPAddress": {"type": "string"},
                    "connection": {"type": "string"},
                    "comment": {"type": "string"},
                }}},
        }}},
}


def index_calls(recordings: Path) -> list[dict]:
    """Every row of the recordings index in `recordings`, read beside the gateway writing it."""
    path = recordings / "index.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM calls ORDER BY time, id")]
        except sqlite3.OperationalError as e:
            # The gateway creates the file (mode 0600) before its schema commits: nothing recorded yet.
            if "no such table" in str(e):
                return []
            raise


def load_har(path: Path) -> dict:
    """A HAR file, parsed and validated against HAR 1.2's required fields."""
    doc = json.loads(path.read_bytes())
    jsonschema.validate(doc, HAR_SCHEMA)
    return doc


def read_flows(path: Path) -> list:
    """Flows of a file, read by mitmproxy itself (a flow file, or a HAR: mitmproxy reads both)."""
    from mitmproxy import io as mitmproxy_io

    with path.open("rb") as f:
        return list(mitmproxy_io.FlowReader(f).stream())


def load_cast(path: Path) -> tuple[dict, list[list]]:
    """An asciicast v2 file: the header line, then `[time, type, data]` lines with increasing times."""
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and isinstance(header["width"], int) and isinstance(header["height"], int), header
    assert isinstance(header["timestamp"], int) and isinstance(header.get("title", ""), str), header
    events = [json.loads(line) for line in lines[1:]]
    last = 0.0
    for event in events:
        assert isinstance(event, list) and len(event) == 3, event
        at, kind, data = event
        assert isinstance(at, (int, float)) and at >= last, (at, last)
        assert kind in ("o", "i", "r", "m") and isinstance(data, str), event
        last = at
    return header, events


# --- stored bytes -------------------------------------------------------------------------------------


def forms(value: str) -> list[bytes]:
    """A value as stored bytes may hold it: raw, and base64 (standard and URL-safe) at each of the three
    alignments it can have inside a longer encoded text (only the characters its bytes alone decide)."""
    raw = value.encode()
    out = [raw]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw + b"\0\0")
        core = encoded[-(-8 * shift // 6):(8 * (shift + len(raw))) // 6]
        out += [core, core.replace(b"+", b"-").replace(b"/", b"_")]
    return out


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def leaks(root: Path, values: dict[str, str]) -> list[str]:
    """Which of `values` (name -> value) show, in any form, in any byte of any file under `root`."""
    found = []
    for path in files_under(root):
        data = path.read_bytes()
        for name, value in values.items():
            if any(form in data for form in forms(value)):
                found.append(f"{name} in {path}")
    return found


# --- mitmweb ------------------------------------------------------------------------------------------


class Mitmweb:
    """A real mitmweb reading a flow file, on a free port of 127.0.0.1, behind a web password."""

    def __init__(self, flows: Path, password: str, work: Path, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.log_path = work / f"mitmweb-{self.port}.log"
        self.cmd = [MITMWEB, "--no-server", "-r", str(flows), "--set", "web_host=127.0.0.1", "--set", f"web_port={self.port}",
                    "--set", f"web_password={password}", "--set", "web_open_browser=false", *(extra or [])]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Mitmweb:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        wait_for_port(self.port, self.proc, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def web_get(port: int, path: str, password: str | None) -> tuple[int, bytes]:
    """GET from mitmweb's API; the password as `Authorization: Bearer` (as mitmweb 12.2 reads it)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if password is not None:
        request.add_header("Authorization", f"Bearer {password}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def web_flows(port: int, password: str, want: int = 1, timeout: float = 20) -> list[dict]:
    """mitmweb's `GET /flows` once it has read at least `want` flows."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, body = web_get(port, "/flows", password)
        except urllib.error.URLError:  # not listening yet
            code, body = 0, b""
            if time.monotonic() > deadline:
                raise
        flows = json.loads(body) if code == 200 else []
        if len(flows) >= want or time.monotonic() > deadline:
            assert code == 200, (code, body[:300])
            return flows
        time.sleep(0.3)


def web_post(port: int, path: str, password: str) -> int:
    """POST to mitmweb's API: the password, and tornado's XSRF double submit (the same token as the
    `_mitmproxy_xsrf` cookie and the `X-XSRFToken` header, as mitmweb's UI sends them)."""
    token = "jitgate-recording-tests"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    request.add_header("Authorization", f"Bearer {password}")
    request.add_header("Cookie", f"_mitmproxy_xsrf={token}")
    request.add_header("X-XSRFToken", token)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
