"""Audit events (audit.k8s.io/v1 shape) and the append-only JSON-lines log."""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from jitgate.audit.log import AuditLog, AuditLogError
from jitgate.kube.audit_event import (
    MAX_USER_AGENT_LENGTH,
    build_event,
    micro_time,
    new_audit_id,
    object_ref_from,
    redact_request_uri,
)
from jitgate.kube.request_info import parse_request

# JSON names of audit/v1 Event, ObjectReference and authentication/v1 UserInfo
# (k8s.io/apiserver/pkg/apis/audit/v1/types.go, k8s.io/api/authentication/v1/types.go).
EVENT_FIELDS = {
    "kind", "apiVersion", "level", "auditID", "stage", "requestURI", "verb", "user",
    "impersonatedUser", "authenticationMetadata", "sourceIPs", "userAgent", "objectRef",
    "responseStatus", "requestObject", "responseObject", "requestReceivedTimestamp",
    "stageTimestamp", "annotations",
}  # fmt: skip
OBJECT_REF_FIELDS = {"resource", "namespace", "name", "uid", "apiGroup", "apiVersion", "resourceVersion", "subresource"}
USER_FIELDS = {"username", "uid", "groups", "extra"}
STATUS_FIELDS = {"metadata", "status", "message", "reason", "details", "code"}

RECEIVED = datetime.datetime(2026, 11, 21, 20, 30, 0, 123456, tzinfo=datetime.UTC).timestamp()


def event(**overrides) -> dict:
    args = dict(
        audit_id="6d3f1c52-7a43-4f0e-9b8e-2f4a8f0c1e11",
        stage="ResponseComplete",
        request_uri="/api/v1/namespaces/default/pods/web-0/exec?command=sh&stdin=true&tty=true",
        verb="create",
        user={"username": "alice@example.com", "groups": ["sre", "system:authenticated"]},
        source_ips=["10.0.0.7", "127.0.0.1"],
        user_agent="kubectl/v1.37.1 (linux/amd64) kubernetes/abcdef",
        object_ref=object_ref_from(parse_request("GET", "/api/v1/namespaces/default/pods/web-0/exec")),
        response_code=403,
        response_message='pods "web-0" is forbidden: no active grant',
        request_received=RECEIVED,
        stage_timestamp=RECEIVED + 0.25,
        annotations={"authorization.k8s.io/decision": "forbid", "jitgate.io/reason": "no grant"},
    )
    args.update(overrides)
    return build_event(**args)


def test_event_shape():
    ev = event(impersonated_user={"username": "sre-admin", "groups": ["admins"], "extra": {"scope": "x"}})
    assert ev == {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": "6d3f1c52-7a43-4f0e-9b8e-2f4a8f0c1e11",
        "stage": "ResponseComplete",
        "requestURI": "/api/v1/namespaces/default/pods/web-0/exec?command=sh&stdin=true&tty=true",
        "verb": "create",
        "user": {"username": "alice@example.com", "groups": ["sre", "system:authenticated"]},
        "impersonatedUser": {"username": "sre-admin", "groups": ["admins"], "extra": {"scope": ["x"]}},
        "sourceIPs": ["10.0.0.7", "127.0.0.1"],
        "userAgent": "kubectl/v1.37.1 (linux/amd64) kubernetes/abcdef",
        "objectRef": {
            "resource": "pods",
            "namespace": "default",
            "name": "web-0",
            "apiVersion": "v1",
            "subresource": "exec",
        },
        "responseStatus": {
            "metadata": {},
            "status": "Failure",
            "message": 'pods "web-0" is forbidden: no active grant',
            "reason": "Forbidden",
            "code": 403,
        },
        "requestReceivedTimestamp": "2026-11-21T20:30:00.123456Z",
        "stageTimestamp": "2026-11-21T20:30:00.373456Z",
        "annotations": {"authorization.k8s.io/decision": "forbid", "jitgate.io/reason": "no grant"},
    }
    assert set(ev) <= EVENT_FIELDS
    assert set(ev["objectRef"]) <= OBJECT_REF_FIELDS
    assert set(ev["user"]) <= USER_FIELDS and set(ev["impersonatedUser"]) <= USER_FIELDS
    assert set(ev["responseStatus"]) <= STATUS_FIELDS


def test_omitted_fields_and_success_status():
    ev = event(
        stage="RequestReceived",
        response_code=None,
        response_message=None,
        object_ref=None,
        source_ips=[],
        user_agent="",
        annotations={},
        user={"username": "bob", "uid": "u-1", "groups": []},
        level="Request",
    )
    assert set(ev) == {
        "kind", "apiVersion", "level", "auditID", "stage", "requestURI", "verb", "user",
        "requestReceivedTimestamp", "stageTimestamp",
    }  # fmt: skip
    assert ev["user"] == {"username": "bob", "uid": "u-1"}
    assert ev["level"] == "Request"
    # kube records a success as its code only
    assert event(response_code=200, response_message=None)["responseStatus"] == {"metadata": {}, "code": 200}
    assert event(response_code=429, response_message=None, response_reason="TooManyRequests")["responseStatus"] == {
        "metadata": {},
        "status": "Failure",
        "reason": "TooManyRequests",
        "code": 429,
    }


def test_unknown_stage_or_level_is_refused():
    with pytest.raises(ValueError):
        event(stage="Done")
    with pytest.raises(ValueError):
        event(level="Everything")


def test_user_agent_is_truncated_like_kube():
    ua = event(user_agent="x" * 5000)["userAgent"]
    assert ua == "x" * MAX_USER_AGENT_LENGTH + "...TRUNCATED"


@pytest.mark.parametrize(
    "timestamp,expected",
    [
        (0.0, "1970-01-01T00:00:00.000000Z"),
        (RECEIVED, "2026-11-21T20:30:00.123456Z"),
        (1_700_000_000.5, "2023-11-14T22:13:20.500000Z"),
        # rounding to the microsecond carries into the seconds
        (1_700_000_000.9999999, "2023-11-14T22:13:21.000000Z"),
    ],
)
def test_micro_time(timestamp, expected):
    assert micro_time(timestamp) == expected


def test_audit_ids_are_uuid4():
    ids = {new_audit_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(i).version == 4 for i in ids)


@pytest.mark.parametrize(
    "method,target,expected",
    [
        (
            "GET",
            "/api/v1/namespaces/ns/pods/p",
            {"resource": "pods", "namespace": "ns", "name": "p", "apiVersion": "v1"},
        ),
        ("GET", "/api/v1/namespaces/ns/pods", {"resource": "pods", "namespace": "ns", "apiVersion": "v1"}),
        (
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin",
            {"resource": "clusterroles", "name": "admin", "apiGroup": "rbac.authorization.k8s.io", "apiVersion": "v1"},
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/ns/deployments/web/scale",
            {
                "resource": "deployments",
                "namespace": "ns",
                "name": "web",
                "apiGroup": "apps",
                "apiVersion": "v1",
                "subresource": "scale",
            },
        ),
        (
            "GET",
            "/api/v1/namespaces/ns",
            {"resource": "namespaces", "namespace": "ns", "name": "ns", "apiVersion": "v1"},
        ),
        ("GET", "/healthz", None),
        ("GET", "/apis/apps/v1", None),
    ],
)
def test_object_ref_from(method, target, expected):
    assert object_ref_from(parse_request(method, target)) == expected


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("/api/v1/pods", "/api/v1/pods"),
        ("/api/v1/pods?limit=500&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ", "/api/v1/pods?limit=500&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ"),
        ("/api/v1/pods?access_token=eyJhbGci.x.y&watch=1", "/api/v1/pods?access_token=REDACTED&watch=1"),
        ("/api/v1/pods?watch=1&id_token=abc&TOKEN=def", "/api/v1/pods?watch=1&id_token=REDACTED&TOKEN=REDACTED"),
        ("/api/v1/pods?access%5Ftoken=abc", "/api/v1/pods?access%5Ftoken=REDACTED"),
        ("/api/v1/pods?client_secret=abc&password=p&api-key=k&sig=s", "/api/v1/pods?client_secret=REDACTED&password=REDACTED&api-key=REDACTED&sig=REDACTED"),
        (
            "/x?X-Amz-Credential=AKIA%2F20261121&X-Amz-Signature=abcd&X-Amz-Security-Token=FQo&X-Amz-Date=20261121T203000Z",
            "/x?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED&X-Amz-Date=20261121T203000Z",
        ),
        ("/api/v1/namespaces/ns/services/s/proxy/login?authorization=Bearer+x", "/api/v1/namespaces/ns/services/s/proxy/login?authorization=REDACTED"),
        ("/api/v1/pods?token", "/api/v1/pods?token"),
        ("/api/v1/pods?fieldSelector=metadata.name%3Dtoken&labelSelector=app%3Dsecret", "/api/v1/pods?fieldSelector=metadata.name%3Dtoken&labelSelector=app%3Dsecret"),
        ("/api/v1/pods?access_token=abc#frag", "/api/v1/pods?access_token=REDACTED"),
    ],
)
def test_request_uri_redaction(uri, expected):
    assert redact_request_uri(uri) == expected
    assert event(request_uri=uri)["requestURI"] == expected


# --- the log --------------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


def test_writes_one_compact_line_per_event(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.write(event(response_message="line one\nline two"))
        log.write(event(stage="ResponseStarted", response_code=None))
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2 and raw.endswith(b"\n")
    first = raw.split(b"\n")[0]
    assert b": " not in first and b", " not in first  # compact separators
    events = read_lines(path)
    assert events[0]["responseStatus"]["message"] == "line one\nline two"
    assert events[1]["stage"] == "ResponseStarted"


def test_appends_to_existing_log(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"earlier":true}\n')
    with AuditLog(path) as log:
        log.write({"later": True})
    assert read_lines(path) == [{"earlier": True}, {"later": True}]


def test_creates_private_dirs_and_file(tmp_path):
    path = tmp_path / "state" / "audit" / "audit.log"
    with AuditLog(path, fsync=True) as log:
        log.write(event())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "audit").stat().st_mode) == 0o700
    assert read_lines(path)[0]["auditID"] == event()["auditID"]


def test_concurrent_threads_never_interleave(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    threads, per_thread = 8, 150

    def writer(n: int) -> None:
        for i in range(per_thread):
            # lines of tens of kilobytes: far above PIPE_BUF, still one write each
            log.write({"thread": n, "i": i, "pad": chr(ord("a") + n) * (20_000 + i)})

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    log.close()
    events = read_lines(path)
    assert len(events) == threads * per_thread
    for e in events:
        assert e["pad"] == chr(ord("a") + e["thread"]) * (20_000 + e["i"])
    for n in range(threads):
        assert [e["i"] for e in events if e["thread"] == n] == list(range(per_thread))


WRITER = textwrap.dedent(
    """
    import sys
    from jitgate.audit.log import AuditLog
    log = AuditLog(sys.argv[1])
    tag = sys.argv[2]
    sys.stdin.readline()  # start together
    for i in range(300):
        log.write({"proc": tag, "i": i, "pad": tag * (30_000 + i)})
    log.close()
    """
)


def test_concurrent_processes_never_interleave(tmp_path):
    path = tmp_path / "audit.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], stdin=subprocess.PIPE)
        for tag in ("x", "y")
    ]
    try:
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.close()
        for p in procs:
            assert p.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    events = read_lines(path)
    assert len(events) == 600
    for e in events:
        assert e["pad"] == e["proc"] * (30_000 + e["i"])
    for tag in ("x", "y"):
        assert [e["i"] for e in events if e["proc"] == tag] == list(range(300))


def test_reopens_after_rotation_by_rename(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write({"n": 1})
    path.rename(tmp_path / "audit.log.1")
    log.write({"n": 2})
    log.write({"n": 3})
    log.close()
    assert read_lines(tmp_path / "audit.log.1") == [{"n": 1}]
    assert read_lines(path) == [{"n": 2}, {"n": 3}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reopens_after_deletion_and_replacement(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write({"n": 1})
    path.unlink()
    log.write({"n": 2})
    assert read_lines(path) == [{"n": 2}]
    # another process rotated and created the new file already
    path.rename(tmp_path / "audit.log.1")
    path.write_bytes(b'{"other":true}\n')
    log.write({"n": 3})
    log.close()
    assert read_lines(path) == [{"other": True}, {"n": 3}]


def test_copytruncate_rotation_keeps_appending(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write({"n": 1})
    os.truncate(path, 0)
    log.write({"n": 2})
    log.close()
    assert read_lines(path) == [{"n": 2}]


def test_failed_reopen_raises_and_recovers(tmp_path):
    logdir = tmp_path / "logs"
    path = logdir / "audit.log"
    log = AuditLog(path)
    log.write({"n": 1})
    logdir.rename(tmp_path / "moved")
    logdir.write_bytes(b"not a directory")
    with pytest.raises(AuditLogError):
        log.write({"n": 2})
    logdir.unlink()
    log.write({"n": 3})
    log.close()
    assert read_lines(path) == [{"n": 3}]
    assert read_lines(tmp_path / "moved" / "audit.log") == [{"n": 1}]


def test_full_disk_raises():
    log = AuditLog("/dev/full")
    with pytest.raises(AuditLogError, match="No space left"):
        log.write(event())
    log.close()


def test_write_after_close_raises(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    log.close()
    with pytest.raises(AuditLogError, match="closed"):
        log.write(event())


def test_descriptor_closed_underneath_raises(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    os.close(log._fd)
    with pytest.raises(AuditLogError, match="Bad file descriptor"):
        log.write(event())


def test_unserializable_event_raises(tmp_path):
    with AuditLog(tmp_path / "audit.log") as log:
        with pytest.raises(AuditLogError):
            log.write({"when": object()})
        with pytest.raises(AuditLogError):
            log.write({"ratio": float("nan")})
    assert (tmp_path / "audit.log").read_bytes() == b""


def refused_as_nobody(targets: list[str]) -> int:
    """How many of `targets` AuditLog refuses with "Permission denied", opened by a forked child
    that runs as `nobody` (root ignores directory modes; the venv's interpreter lives under
    /root, which `nobody` cannot execute, so the child is a fork, not a new interpreter)."""
    pid = os.fork()
    if pid == 0:
        refused = 0
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            for target in targets:
                try:
                    AuditLog(target).close()
                except AuditLogError as e:
                    refused += "Permission denied" in str(e)
        finally:
            os._exit(refused)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_read_only_directory_raises():
    base = Path(tempfile.mkdtemp(prefix="jitgate-audit-ro-"))
    readonly = base / "ro"
    try:
        readonly.mkdir()
        readonly.chmod(0o555)
        base.chmod(0o755)
        targets = [str(readonly / "audit.log"), str(readonly / "sub" / "audit.log")]
        if os.geteuid() == 0:
            assert refused_as_nobody(targets) == len(targets)
        else:
            for target in targets:
                with pytest.raises(AuditLogError, match="Permission denied"):
                    AuditLog(target)
        assert list(readonly.iterdir()) == []
    finally:
        readonly.chmod(0o755)
        readonly.rmdir()
        base.rmdir()


def test_stdout():
    code = "from jitgate.audit.log import AuditLog; log = AuditLog('-'); log.write({'a': 1}); log.write({'b': 2}); log.close()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=True).stdout
    assert out == b'{"a":1}\n{"b":2}\n'


# --- short and failed writes: the file stays JSON lines ------------------------------------------------


class FailingDevice:
    """os.write for the log's descriptor as a failing disk does it: `plan` says, per write, how many
    bytes it takes (None: all, an int: that many, OSError: fails); other descriptors are untouched."""

    def __init__(self, monkeypatch, log: AuditLog, plan: list) -> None:
        self.fd, self.plan, self.real = log._fd, list(plan), os.write
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data) -> int:
        if fd != self.fd or not self.plan:
            return self.real(fd, data)
        step = self.plan.pop(0)
        if isinstance(step, BaseException):
            raise step
        return self.real(fd, bytes(data) if step is None else bytes(data)[:step])


def assert_json_lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]  # each line exactly one event


def test_short_write_is_cut_off_again(tmp_path, monkeypatch):
    """A short write (a full disk takes part of the line) is truncated back: the next event starts
    its own line and the file is valid JSON lines throughout."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write({"n": 1})
    FailingDevice(monkeypatch, log, [5])
    with pytest.raises(AuditLogError, match="short write"):
        log.write({"n": 2, "pad": "x" * 100})
    assert path.read_bytes() == b'{"n":1}\n'
    log.write({"n": 3})
    log.close()
    assert assert_json_lines(path) == [{"n": 1}, {"n": 3}]


def test_short_write_that_cannot_be_cut_off_is_ended(tmp_path, monkeypatch):
    """Where the part cannot be cut off (ftruncate fails), it is ended with a newline at once."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    FailingDevice(monkeypatch, log, [5])
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(AuditLogError, match="short write"):
        log.write({"n": 1, "pad": "x" * 100})
    log.write({"n": 2})
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines == [b'{"n":', b'{"n":2}', b""], "the fragment is a line of its own, never joined to an event"


def test_partial_line_left_behind_starts_the_next_write_on_a_new_line(tmp_path, monkeypatch):
    """Neither cut off nor ended (the device fails again at once): the next write begins with a
    newline, so no reader sees two events on one line."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write({"n": 1})
    device = FailingDevice(monkeypatch, log, [5, OSError(28, "No space left on device")])
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(AuditLogError, match="short write"):
        log.write({"n": 2, "pad": "x" * 100})
    device.plan = [OSError(28, "No space left on device")]
    with pytest.raises(AuditLogError, match="No space left"):
        log.write({"n": 3})  # failed writes leave nothing and change nothing
    log.write({"n": 4})
    log.write({"n": 5})
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines == [b'{"n":1}', b'{"n":', b'{"n":4}', b'{"n":5}', b""]
    parsed = []
    for line in lines[:-1]:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            assert b"}{" not in line and line.count(b'{"n"') == 1, "a fragment, never two events"
    assert parsed == [{"n": 1}, {"n": 4}, {"n": 5}]


def test_short_write_after_another_process_appended_is_ended_not_cut(tmp_path, monkeypatch):
    """Cutting back is only safe when nobody appended after the fragment (processes share a log)."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    real = os.write

    def short_then_someone_appends(fd, data):
        if fd != log._fd:
            return real(fd, data)
        monkeypatch.setattr(os, "write", real)
        n = real(fd, bytes(data)[:5])
        with open(path, "ab") as other:
            other.write(b'{"other":1}\n')
        return n

    monkeypatch.setattr(os, "write", short_then_someone_appends)
    with pytest.raises(AuditLogError, match="short write"):
        log.write({"n": 1, "pad": "x" * 100})
    log.write({"n": 2})
    log.close()
    raw = path.read_bytes()
    assert b'{"other":1}\n' in raw, "another process's line is never cut off"
    assert raw.endswith(b'\n{"n":2}\n')


def test_partial_line_on_stdout_starts_the_next_on_a_new_line(monkeypatch):
    log = AuditLog("-")
    r, w = os.pipe()
    log._fd = w
    real = os.write
    calls = {"n": 0}

    def pipe_breaks_midway(fd, data):
        if fd != w:
            return real(fd, data)
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, bytes(data)[:4])
        if calls["n"] == 2:
            raise OSError(32, "Broken pipe")
        return real(fd, data)

    monkeypatch.setattr(os, "write", pipe_breaks_midway)
    with pytest.raises(AuditLogError, match="Broken pipe"):
        log.write({"n": 1})
    log.write({"n": 2})
    os.close(w)
    out = os.read(r, 4096)
    os.close(r)
    assert out == b'{"n"\n{"n":2}\n'
