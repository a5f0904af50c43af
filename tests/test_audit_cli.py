"""`jitgate audit` (the real console script) reading, filtering and following real audit logs."""

from __future__ import annotations

import gzip
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from jitgate.audit.log import AuditLog
from jitgate.kube.audit_event import build_event

REPO = Path(__file__).resolve().parents[1]
JITGATE = REPO / ".venv" / "bin" / "jitgate"
LONG_REASON = "no active grant covers get on pods in namespace prod of cluster dev; request one with: " \
              "jitgate request --cluster dev --namespace prod --resource pods --verb get"


def ev(audit_id: str, *, user="alice@example.com", cluster="dev", namespace="dev", verb="get", resource="pods",
       name="web-0", decision="allow", code=200, stage="ResponseComplete", ago=60.0, reason="granted by grant-1",
       subresource=None, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    ref = {"resource": resource, "namespace": namespace, "name": name, "apiVersion": "v1", "subresource": subresource}
    return build_event(
        audit_id=audit_id, stage=stage, request_uri=f"/api/v1/namespaces/{namespace}/{resource}/{name}",
        verb=verb, user={"username": user, "groups": ["sre"]}, source_ips=["10.0.0.7"], user_agent="kubectl/v1.37.1",
        object_ref={k: v for k, v in ref.items() if v}, response_code=None if stage == "RequestReceived" else code,
        request_received=now - ago - 0.1, stage_timestamp=now - ago,
        annotations={"jitgate.dev/decision": decision, "jitgate.dev/cluster": cluster, "jitgate.dev/reason": reason},
    )


def events(now: float) -> list[dict]:
    return [
        ev("a1", stage="RequestReceived", ago=3600, now=now),
        ev("a1", ago=3599, now=now),
        ev("b2", user="bob@example.com", namespace="prod", decision="deny", code=403, ago=1800, reason=LONG_REASON, now=now),
        ev("c3", cluster="lab", verb="delete", name="cache", resource="configmaps", ago=600, now=now),
        ev("d4", verb="create", resource="pods", subresource="exec", stage="ResponseStarted", code=101, ago=120, now=now),
        ev("d4", verb="create", resource="pods", subresource="exec", code=101, ago=30, now=now),
        ev("e5", user="carol@corp.example", verb="list", name="", ago=5, now=now),
    ]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    with AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db") as log:
        for e in events(time.time()):
            log.write(e)
    return path


def jitgate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(JITGATE), "audit", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rows(stdout: str) -> list[list[str]]:
    return [re.split(r" {3,}", line.strip()) for line in stdout.splitlines()]


def ids_of(result: subprocess.CompletedProcess) -> list[str]:
    """The auditIDs printed by `-o json`."""
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["auditID"] for line in result.stdout.splitlines()]


def test_table(log_path: Path):
    result = jitgate("--log", str(log_path))
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table[0] == ["TIME", "USER", "CLUSTER", "DECISION", "VERB", "RESOURCE", "CODE", "REASON"]
    assert len(table) == 1 + 6, "RequestReceived lines are hidden by default"
    denied = table[2]
    assert denied[1:7] == ["bob@example.com", "dev", "deny", "get", "pods prod/web-0", "403"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", denied[0])
    assert denied[7].endswith("…") and len(denied[7]) == 60 and LONG_REASON.startswith(denied[7][:-1])
    assert table[4][5:7] == ["pods/exec dev/web-0", "101 (started)"]
    assert table[3][2:6] == ["lab", "allow", "delete", "configmaps dev/cache"]
    assert table[6][5] == "pods dev", "a list names the namespace only"


def test_filters(log_path: Path):
    log = ["--log", str(log_path), "-o", "json"]
    assert ids_of(jitgate(*log, "--user", "bob@example.com")) == ["b2"]
    assert ids_of(jitgate(*log, "--user", "*@example.com")) == ["a1", "b2", "c3", "d4", "d4"]
    assert ids_of(jitgate(*log, "--cluster", "lab")) == ["c3"]
    assert ids_of(jitgate(*log, "--namespace", "prod")) == ["b2"]
    assert ids_of(jitgate(*log, "--verb", "delete,list")) == ["c3", "e5"]
    assert ids_of(jitgate(*log, "--verb", "delete", "--verb", "create")) == ["c3", "d4", "d4"]
    assert ids_of(jitgate(*log, "--decision", "deny")) == ["b2"]
    assert ids_of(jitgate(*log, "--decision", "allow", "--cluster", "dev", "--verb", "get")) == ["a1"]
    assert ids_of(jitgate(*log, "--stage", "received")) == ["a1"]
    assert ids_of(jitgate(*log, "--stage", "all")) == ["a1", "a1", "b2", "c3", "d4", "d4", "e5"]
    assert ids_of(jitgate(*log, "--stage", "started")) == ["d4"]


def test_time_window(log_path: Path):
    log = ["--log", str(log_path), "-o", "json"]
    assert ids_of(jitgate(*log, "--since", "15m")) == ["c3", "d4", "d4", "e5"]
    assert ids_of(jitgate(*log, "--since", "5m", "--until", "20s")) == ["d4", "d4"]
    now = time.time()
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 2000))
    end = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 1000))
    assert ids_of(jitgate(*log, "--since", start, "--until", end)) == ["b2"]


def test_json_output_is_the_log_lines(log_path: Path):
    result = jitgate("--log", str(log_path), "-o", "json", "--stage", "all")
    assert result.returncode == 0
    assert result.stdout.encode() == log_path.read_bytes(), "each line as written, chain member included"


def test_yaml_output(log_path: Path):
    result = jitgate("--log", str(log_path), "-o", "yaml", "--decision", "deny")
    docs = list(YAML(typ="safe").load_all(result.stdout))
    assert [d["auditID"] for d in docs] == ["b2"] and docs[0]["responseStatus"]["code"] == 403


def test_reads_rotated_copies_oldest_first(tmp_path: Path):
    path = tmp_path / "audit.log"
    with AuditLog(path, chain=True) as log:
        log.write(ev("one", ago=300))
        os.rename(path, tmp_path / "audit.log.2")
        log.write(ev("two", ago=200))
        os.rename(path, tmp_path / "audit.log.1")
        log.write(ev("three", ago=100))
    gz = tmp_path / "audit.log.2.gz"
    gz.write_bytes(gzip.compress((tmp_path / "audit.log.2").read_bytes()))
    (tmp_path / "audit.log.2").unlink()
    assert ids_of(jitgate("--log", str(path), "-o", "json")) == ["one", "two", "three"]
    verified = subprocess.run([str(JITGATE), "audit", "verify", "--log", str(path)], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
    assert verified.returncode == 0 and "verified 3 events" in verified.stdout, verified.stdout


def test_default_log_is_the_gateways(log_path: Path):
    state = log_path.parent / "state"
    state.mkdir()
    log_path.rename(state / "audit.log")
    assert ids_of(jitgate("-o", "json", "--decision", "deny", cwd=log_path.parent)) == ["b2"]


def test_no_match_and_errors(log_path: Path, tmp_path: Path):
    none = jitgate("--log", str(log_path), "--user", "nobody")
    assert none.returncode == 0 and none.stdout == "" and "No matching audit events." in none.stderr
    missing = jitgate("--log", str(tmp_path / "nothing.log"))
    assert missing.returncode == 2 and "no audit log" in missing.stderr
    bad = jitgate("--log", str(log_path), "--since", "yesterday")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr
    naive = jitgate("--log", str(log_path), "--since", "2026-12-01T10:00:00")
    assert naive.returncode == 2 and "time zone" in naive.stderr
    stage = jitgate("--log", str(log_path), "--stage", "done")
    assert stage.returncode == 2 and "unknown stage" in stage.stderr
    assert jitgate("--log", str(log_path), "--decision", "maybe").returncode == 2


class Output:
    """The lines a running process prints, read on a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def take(self, count: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        got = []
        while len(got) < count:
            got.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
        return got


def follow(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(JITGATE), "audit", "--follow", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_follow_prints_new_events_across_rotations(tmp_path: Path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db")
    log.write(ev("old-1", ago=50))
    os.rename(path, tmp_path / "audit.log.1")  # a rotated copy: printed first
    log.write(ev("old-2", ago=40))
    proc = follow("--log", str(path), "-o", "json")
    out = Output(proc)
    try:
        assert [json.loads(line)["auditID"] for line in out.take(2)] == ["old-1", "old-2"]
        log.write(ev("new-1", ago=0))
        assert json.loads(out.take(1)[0])["auditID"] == "new-1"
        os.rename(path, tmp_path / "audit.log.2")  # logrotate: rename, the writer reopens
        log.write(ev("new-2", ago=0))
        log.write(ev("new-3", ago=0, decision="deny"))
        assert [json.loads(line)["auditID"] for line in out.take(2)] == ["new-2", "new-3"]
        os.truncate(path, 0)  # copytruncate
        log.write(ev("new-4", ago=0))
        assert json.loads(out.take(1)[0])["auditID"] == "new-4"
    finally:
        code = stop(proc)
        log.close()
    assert code == 130
    assert out.lines.empty(), "each event once"


def test_follow_table_with_filters_and_a_log_that_appears_later(tmp_path: Path):
    path = tmp_path / "audit.log"
    proc = follow("--log", str(path), "--decision", "deny")
    out = Output(proc)
    try:
        assert out.take(1)[0].split() == ["TIME", "USER", "CLUSTER", "DECISION", "VERB", "RESOURCE", "CODE", "REASON"]
        with AuditLog(path, chain=True) as log:
            log.write(ev("allowed", ago=0))
            log.write(ev("denied", ago=0, user="mallory@example.com", decision="deny", code=403, reason=LONG_REASON))
        line = out.take(1)[0]
        assert "mallory@example.com" in line and " deny " in line and "403" in line
        assert line.endswith("…") and len(line) < 250
    finally:
        stop(proc)
    assert out.lines.empty()
