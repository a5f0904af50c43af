"""The audit log's hash chain and checkpoint, and `jitgate audit verify` finding each kind of tampering.

Logs are written by the real AuditLog (real files, real SQLite checkpoints, real rotation by
rename, real concurrent processes) and checked with the real console script.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from jitgate.audit.chain import (
    CHAIN_KEY,
    GENESIS,
    Head,
    Link,
    chained_line,
    link_hash,
    read_line,
)
from jitgate.audit.checkpoint import TABLE, read_checkpoint
from jitgate.audit.log import AuditLog, AuditLogError
from jitgate.audit.verify import verify
from jitgate.kube.audit_event import build_event, new_audit_id

REPO = Path(__file__).resolve().parents[1]
JITGATE = REPO / ".venv" / "bin" / "jitgate"


def event(i: int, verb: str = "get", user: str = "alice@example.com") -> dict:
    return build_event(
        audit_id=new_audit_id(), stage="ResponseComplete", request_uri=f"/api/v1/namespaces/dev/pods/web-{i}",
        verb=verb, user={"username": user, "groups": ["sre"]}, source_ips=["10.0.0.7"], user_agent="kubectl/v1.37.1",
        object_ref={"resource": "pods", "namespace": "dev", "name": f"web-{i}", "apiVersion": "v1"},
        response_code=200, request_received=1_796_000_000 + i, stage_timestamp=1_796_000_000.25 + i,
        annotations={"jitgate.dev/decision": "allow", "jitgate.dev/cluster": "dev"},
    )


def write_log(folder: Path, count: int, rotate_after: tuple[int, ...] = (), **kwargs) -> Path:
    """`count` events through a chained AuditLog checkpointing in folder/state.db; after the n-th
    event of `rotate_after` the log is renamed as logrotate does (audit.log -> .1 -> .2 ...)."""
    path = folder / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=folder / "state.db", **kwargs)
    for i in range(1, count + 1):
        log.write(event(i))
        if i in rotate_after:
            rotate(path)
    log.close()
    return path


def rotate(path: Path) -> None:
    numbered = sorted((int(p.name.rsplit(".", 1)[1]), p) for p in path.parent.glob(path.name + ".*")
                      if p.name.rsplit(".", 1)[1].isdigit())
    for n, p in reversed(numbered):
        p.rename(path.with_name(f"{path.name}.{n + 1}"))
    path.rename(path.with_name(path.name + ".1"))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def put_lines(path: Path, content: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in content))


def jitgate_verify(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(JITGATE), "audit", "verify", "--log", str(folder / "audit.log"),
                           "--store", str(folder / "state.db"), *args],
                          capture_output=True, text=True, timeout=60, cwd=folder)


def assert_fails_at(result: subprocess.CompletedProcess, where: str, *words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(where + ":"), first
    for word in words:
        assert word in first, first


# --- the scheme ------------------------------------------------------------------------------------


def test_line_format_and_hash_are_the_documented_ones():
    body = json.dumps(event(1), separators=(",", ":")).encode()
    line, head = chained_line(body, None)
    parsed = json.loads(line)
    assert parsed[CHAIN_KEY] == {"seq": 1, "prev": GENESIS, "hash": head.hash}
    assert {k: v for k, v in parsed.items() if k != CHAIN_KEY} == event(1) | {"auditID": parsed["auditID"]}
    # The documented recipe, spelled out independently of the module.
    import hashlib

    expected = hashlib.sha256(b"jitgate-audit-chain/1\n" + GENESIS.encode() + b"\n1\n" + body).hexdigest()
    assert head.hash == expected
    second, head2 = chained_line(body, head)
    assert json.loads(second)[CHAIN_KEY] == {"seq": 2, "prev": head.hash, "hash": link_hash(head.hash, 2, body)}
    assert read_line(second) == Link(2, head.hash, head2.hash, True)
    assert chained_line(b"{}", None)[0].startswith(b'{"jitgate.dev/chain":{"seq":1,')
    assert read_line(chained_line(b"{}", None)[0]).intact


def test_every_line_is_chained_and_the_log_refuses_a_chain_member(tmp_path):
    path = write_log(tmp_path, 5)
    seqs = [json.loads(line)[CHAIN_KEY]["seq"] for line in lines(path)]
    assert seqs == [1, 2, 3, 4, 5]
    with AuditLog(path, chain=True) as log:
        with pytest.raises(AuditLogError, match="must not carry"):
            log.write({"n": 1, CHAIN_KEY: {"seq": 99}})
        written = log.write({"n": 2})
    assert written.seq == 6 and json.loads(written.line)[CHAIN_KEY]["hash"] == written.hash


def test_chain_goes_on_across_restart_and_rotation(tmp_path):
    path = write_log(tmp_path, 10, rotate_after=(4, 8))
    with AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db") as log:  # a restart
        assert log.head.seq == 10
        log.write(event(11))
    rotate(path)  # while stopped: the new writer starts on an empty file
    with AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db") as log:
        log.write(event(12))
    files = [tmp_path / n for n in ("audit.log.3", "audit.log.2", "audit.log.1", "audit.log")]
    assert [len(lines(f)) for f in files] == [4, 4, 3, 1]
    first_new = json.loads(lines(path)[0])[CHAIN_KEY]
    last_old = json.loads(lines(tmp_path / "audit.log.1")[-1])[CHAIN_KEY]
    assert first_new["prev"] == last_old["hash"] and first_new["seq"] == last_old["seq"] + 1
    report = verify(files, read_checkpoint(tmp_path / "state.db", path)[0])
    assert report.ok and report.events == 12 and report.checkpoint_found


def test_untouched_log_verifies_across_rotation(tmp_path):
    write_log(tmp_path, 30, rotate_after=(10, 20))
    result = jitgate_verify(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("verified 30 events (seq 1..30) in 3 files")
    assert "checkpoint: seq 30" in result.stdout and "audit.log:10" in result.stdout
    report = json.loads(jitgate_verify(tmp_path, "-o", "json").stdout)
    assert report["ok"] and report["events"] == 30 and report["checkpoint"]["foundAt"].endswith("audit.log:10")


def test_checkpoint_is_in_the_store_and_only_moves_forward(tmp_path):
    write_log(tmp_path, 7)
    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute(f"SELECT log, seq FROM {TABLE}").fetchall()
        assert rows == [(str((tmp_path / "audit.log").resolve()), 7)]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    from jitgate.audit.checkpoint import Checkpoint

    cp = Checkpoint(tmp_path / "state.db", tmp_path / "audit.log")
    cp.save(Head(3, "b" * 64))  # an older writer's late checkpoint
    assert cp.load()[0].seq == 7
    cp.close()


def test_checkpoints_at_most_every_n_lines_and_on_close(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db", checkpoint_every=10, checkpoint_interval=3600)
    for i in range(1, 26):
        log.write(event(i))
    assert read_checkpoint(tmp_path / "state.db", path)[0].seq == 20
    log.close()
    assert read_checkpoint(tmp_path / "state.db", path)[0].seq == 25


def test_checkpoint_after_an_interval(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db", checkpoint_every=1000, checkpoint_interval=0.05)
    log.write(event(1))
    time.sleep(0.1)
    log.write(event(2))
    assert read_checkpoint(tmp_path / "state.db", path)[0].seq == 2
    log.close()


def test_a_failing_checkpoint_fails_the_write_then_catches_up(tmp_path):
    """Fail closed: a store that cannot take the checkpoint (here: another process holds its write
    lock past the busy timeout) is an AuditLogError; the line itself is in the log."""
    path = tmp_path / "audit.log"
    store = tmp_path / "state.db"
    log = AuditLog(path, chain=True, checkpoint_store=store, checkpoint_every=1)
    log.write(event(1))
    blocker = sqlite3.connect(store, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(AuditLogError, match="checkpoint"):
            log.write(event(2))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    log.write(event(3))
    assert read_checkpoint(store, path)[0].seq == 3
    log.close()
    assert jitgate_verify(tmp_path).returncode == 0


def test_unopenable_checkpoint_store_refuses_to_open(tmp_path):
    (tmp_path / "store-is-a-dir").mkdir()
    with pytest.raises(AuditLogError, match="checkpoint store"):
        AuditLog(tmp_path / "audit.log", chain=True, checkpoint_store=tmp_path / "store-is-a-dir")


# --- tampering, each found at its line --------------------------------------------------------------


def test_edited_field(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    content[4] = content[4].replace(b'"verb":"get"', b'"verb":"delete"')
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:5", "changed", "no longer matches its hash")


def test_edited_field_with_its_hash_recomputed(tmp_path):
    """An attacker who fixes up the edited line's own hash is caught by the next line's prev."""
    path = write_log(tmp_path, 12)
    content = lines(path)
    line = content[4]
    member = line[line.index(b',"jitgate.dev/chain"'):]
    body = line[: line.index(b',"jitgate.dev/chain"')].replace(b'"name":"web-5"', b'"name":"web-X"') + b"}"
    prev = json.loads(line)[CHAIN_KEY]["prev"]
    forged, _ = chained_line(body, Head(4, prev))
    content[4] = forged
    assert member != forged[len(body) - 1:]
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:5", "rewritten")


def test_deleted_line(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    del content[6]
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:7", "1 line removed", "seq 7 missing")


def test_deleted_lines_in_the_middle(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    del content[2:5]
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:3", "3 lines removed", "seq 3..5")


def test_inserted_unchained_line(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    content.insert(3, json.dumps(event(99, verb="delete"), separators=(",", ":")).encode())
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:4", "no chain member", "inserted")


def test_inserted_copy_of_a_line(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    content.insert(6, content[1])
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:7", "inserted", f"a copy of {path}:2")


def test_inserted_forged_chained_line(tmp_path):
    """A made-up line that links correctly to the one before: the next real line shows it."""
    path = write_log(tmp_path, 12)
    content = lines(path)
    prev = json.loads(content[5])[CHAIN_KEY]
    forged, _ = chained_line(json.dumps(event(99, verb="delete"), separators=(",", ":")).encode(),
                             Head(prev["seq"], prev["hash"]))
    content.insert(6, forged)
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:7", "inserted", f"appears again at {path}:8")


def test_inserted_forged_line_after_the_original(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    prev = json.loads(content[5])[CHAIN_KEY]
    forged, _ = chained_line(json.dumps(event(99, verb="delete"), separators=(",", ":")).encode(),
                             Head(prev["seq"], prev["hash"]))
    content.insert(7, forged)  # after the real seq 7
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:8", "inserted", f"seq 7 again (first at {path}:7)")


def test_inserted_line_with_a_wrong_link(tmp_path):
    """A made-up line with the due seq that does not link: the next real line links past it."""
    path = write_log(tmp_path, 12)
    content = lines(path)
    forged, _ = chained_line(json.dumps(event(99, verb="delete"), separators=(",", ":")).encode(), Head(6, "c" * 64))
    content.insert(6, forged)
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:7", "inserted", "does not link", f"next line ({path}:8)")


def test_swapped_lines(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    content[4], content[5] = content[5], content[4]
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:5", "out of order", f"seq 5 comes later, at {path}:6")


def test_line_moved_far(tmp_path):
    path = write_log(tmp_path, 12)
    content = lines(path)
    content.append(content.pop(2))
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:3", "out of order", f"{path}:12")


def test_swapped_rotated_files(tmp_path):
    write_log(tmp_path, 20, rotate_after=(10,))
    result = subprocess.run([str(JITGATE), "audit", "verify", "--store", str(tmp_path / "state.db"),
                             str(tmp_path / "audit.log"), str(tmp_path / "audit.log.1")],
                            capture_output=True, text=True, timeout=60)
    assert_fails_at(result, f"{tmp_path / 'audit.log.1'}:1", "out of order")


def test_truncated_end(tmp_path):
    path = write_log(tmp_path, 12)
    put_lines(path, lines(path)[:-1])  # even one line, because close() checkpointed the last
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:11", "truncated", "seq 12 was checkpointed", "at least 1 line")


def test_truncated_to_nothing(tmp_path):
    path = write_log(tmp_path, 12)
    path.write_bytes(b"")
    result = jitgate_verify(tmp_path)
    assert result.returncode == 1 and "truncated" in result.stdout and "no chained line" in result.stdout


def test_truncation_across_rotation(tmp_path):
    """The live file gone and the end of the rotated one cut: the checkpoint shows it."""
    path = write_log(tmp_path, 20, rotate_after=(10,))
    rotated = tmp_path / "audit.log.1"
    put_lines(rotated, lines(rotated)[:-3])
    path.unlink()
    path.write_bytes(b"")
    assert_fails_at(jitgate_verify(tmp_path), f"{rotated}:7", "truncated", "ends at seq 7", "seq 20 was checkpointed")


def test_rotated_file_cut_short_is_a_gap(tmp_path):
    write_log(tmp_path, 20, rotate_after=(10,))
    rotated = tmp_path / "audit.log.1"
    put_lines(rotated, lines(rotated)[:-2])
    assert_fails_at(jitgate_verify(tmp_path), f"{tmp_path / 'audit.log'}:1", "2 lines removed", "seq 9..10")


def test_rotated_file_removed_is_a_gap(tmp_path):
    write_log(tmp_path, 30, rotate_after=(10, 20))
    (tmp_path / "audit.log.1").unlink()
    assert_fails_at(jitgate_verify(tmp_path), f"{tmp_path / 'audit.log'}:1", "10 lines removed", "seq 11..20")


def test_oldest_files_rotated_away_still_verify(tmp_path):
    """Retention deletes the oldest copies: the chain then starts past seq 1, which is reported."""
    write_log(tmp_path, 30, rotate_after=(10, 20))
    (tmp_path / "audit.log.2").unlink()
    result = jitgate_verify(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "verified 20 events (seq 11..30)" in result.stdout and "starts at seq 11" in result.stdout


def test_truncation_while_stopped_leaves_a_gap_the_next_start_keeps(tmp_path):
    """Cut off while the gateway was down: at start the writer sees the checkpoint ahead of the file
    and goes on from it, so the gap stays in the chain even after new lines follow."""
    path = write_log(tmp_path, 12)
    put_lines(path, lines(path)[:-4])
    with AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db") as log:
        assert log.head.seq == 12
        log.write(event(13))
        log.write(event(14))
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:9", "4 lines removed", "seq 9..12")


def test_truncation_under_a_running_writer_leaves_a_gap(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db")
    for i in range(1, 11):
        log.write(event(i))
    put_lines(path, lines(path)[:-3])  # someone cuts the live file; the writer reads its new end
    log.write(event(11))
    log.close()
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:8", "3 lines removed", "seq 8..10")


def test_truncation_within_the_checkpoint_window_is_not_caught(tmp_path):
    """The documented limit: lines written after the last checkpoint (a crash, no close) can be cut
    off unseen; cutting one more, the checkpointed one, is caught."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db", checkpoint_every=10, checkpoint_interval=3600)
    for i in range(1, 16):
        log.write(event(i))
    os.close(log._fd)  # the process dies: no close(), no last checkpoint
    log._fd = -1
    assert read_checkpoint(tmp_path / "state.db", path)[0].seq == 10
    put_lines(path, lines(path)[:10])
    assert jitgate_verify(tmp_path).returncode == 0
    put_lines(path, lines(path)[:9])
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:9", "truncated", "seq 10 was checkpointed")


def test_checkpointed_line_rewritten_is_caught(tmp_path):
    """Rewriting the whole chain from some line on (every hash recomputed) passes the chain checks,
    but not the checkpoint."""
    path = write_log(tmp_path, 12)
    content = lines(path)
    head: Head | None = Head(4, json.loads(content[3])[CHAIN_KEY]["hash"])
    for i in range(4, 12):
        line = content[i]
        body = line[: line.index(b',"jitgate.dev/chain"')] + b"}"
        if i == 5:
            body = body.replace(b'"verb":"get"', b'"verb":"list"')
        content[i], head = chained_line(body, head)
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:12", "checkpointed with another hash")


def test_fragment_of_a_failed_write_is_skipped(tmp_path, monkeypatch):
    """A failing disk's fragment (the writer could not cut it off) is no tampering: the chain goes on
    across it, and verify says it skipped it."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db")
    log.write(event(1))
    real_write, real_truncate = os.write, os.ftruncate
    state = {"armed": True}

    def short(fd, data):
        if fd == log._fd and state["armed"]:
            state["armed"] = False
            return real_write(fd, bytes(data)[:20])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short)
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(AuditLogError, match="short write"):
        log.write(event(2))
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "ftruncate", real_truncate)
    log.write(event(3))
    log.close()
    assert len(lines(path)) == 3
    result = jitgate_verify(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "verified 2 events" in result.stdout and f"{path}:2" in result.stdout


def test_fragment_where_a_line_was_is_named(tmp_path):
    path = write_log(tmp_path, 8)
    content = lines(path)
    content[3] = content[3][:30]  # a line damaged into a fragment
    put_lines(path, content)
    assert_fails_at(jitgate_verify(tmp_path), f"{path}:4", "damaged", "seq 4 is missing")


def test_log_begun_before_chaining(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path) as plain:
        plain.write(event(1))
        plain.write(event(2))
    with AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db") as log:
        log.write(event(3))
    result = jitgate_verify(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "verified 1 events" in result.stdout and "2 earlier lines carry no chain" in result.stdout


def test_no_checkpoint_is_said(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path, chain=True) as log:
        log.write(event(1))
    result = subprocess.run([str(JITGATE), "audit", "verify", "--log", str(path)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and "no checkpoint" in result.stdout


def test_missing_log_is_a_usage_error(tmp_path):
    result = jitgate_verify(tmp_path)
    assert result.returncode == 2 and "no audit log" in result.stderr


# --- several writers, one chain -----------------------------------------------------------------------


WRITER = textwrap.dedent(
    """
    import sys
    from jitgate.audit.log import AuditLog
    log = AuditLog(sys.argv[1], chain=True, checkpoint_store=sys.argv[2], checkpoint_every=7)
    tag = sys.argv[3]
    sys.stdin.readline()  # start together
    for i in range(400):
        log.write({"proc": tag, "i": i, "pad": tag * (1000 + i)})
    log.close()
    """
)


def test_concurrent_processes_build_one_chain_across_rotations(tmp_path):
    """Two processes and four threads write one log while it is rotated under them: one unbroken chain."""
    path = tmp_path / "audit.log"
    store = tmp_path / "state.db"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(store), tag], stdin=subprocess.PIPE)
             for tag in ("x", "y")]
    local = AuditLog(path, chain=True, checkpoint_store=store, checkpoint_every=5)

    def thread_writer(n: int) -> None:
        for i in range(100):
            local.write({"thread": n, "i": i})
            time.sleep(0.002)

    threads = [threading.Thread(target=thread_writer, args=(n,)) for n in range(4)]
    try:
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.close()
        for t in threads:
            t.start()
        rotations, deadline = 0, time.monotonic() + 60
        while rotations < 3 and time.monotonic() < deadline:
            if path.exists() and path.stat().st_size > 100_000:  # rotate under the running writers
                rotate(path)
                rotations += 1
            time.sleep(0.01)
        assert rotations == 3
        for t in threads:
            t.join()
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    local.close()
    result = jitgate_verify(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "verified 1200 events (seq 1..1200)" in result.stdout
    assert "checkpoint: seq 1200" in result.stdout


# --- through a real gateway ----------------------------------------------------------------------------


POLICY = """\
clusters:
  - name: dev
    endpoint: https://api.dev.jitgate.test
    connect: 127.0.0.1:9
    ca_file: {ca}
    credential:
      token_file: {token}
identity_providers:
  - issuer: https://idp.jitgate.test
    client_ids: [jitgate]
    ca_file: {ca}
"""


def test_gateway_run_writes_a_verifiable_chain_checkpointed_in_its_store(tmp_path):
    """The real gateway (mitmdump -s addons/gateway.py): refused calls are audited, chained, and the
    head lands in audit-chain.db beside the log; the same log then fails verification once a line is edited."""
    import http.client
    import ssl

    from testkit.gateway import GatewayProcess
    from testkit.net import TestCA

    ca = TestCA.create(tmp_path / "ca")
    (tmp_path / "token").write_text("cluster-token\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(ca=ca.cert_path, token=tmp_path / "token"))
    store = tmp_path / "gw" / "state" / "jitgate.db"
    gateway = GatewayProcess(tmp_path / "gw", policy, reverse_endpoints={"dev": "https://api.dev.jitgate.test"},
                             options={"grant_store": str(store)}).start()
    try:
        context = ssl.create_default_context(cafile=str(gateway.ca_path))
        for i in range(5):  # no token: 401, audited
            conn = http.client.HTTPSConnection("127.0.0.1", gateway.reverse["dev"][1], context=context, timeout=10)
            conn.request("GET", f"/api/v1/namespaces/dev/pods/p{i}")
            assert conn.getresponse().status == 401
            conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", gateway.proxy_port, timeout=10)
        conn.request("CONNECT", "elsewhere.example:443")  # no cluster: 403, audited
        assert conn.getresponse().status == 403
        conn.close()
    finally:
        gateway.stop()
    events = gateway.audit_events()
    assert len(events) == 6 and [e[CHAIN_KEY]["seq"] for e in events] == list(range(1, 7))
    head = read_checkpoint(gateway.audit_path.parent / "audit-chain.db", gateway.audit_path)
    assert head is not None and head[0].seq == 6, "checkpointed beside the log at stop"
    ok = subprocess.run([str(JITGATE), "audit", "verify", "--log", str(gateway.audit_path), "--store", str(store)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("verified 6 events"), ok.stdout + ok.stderr
    content = lines(gateway.audit_path)
    content[2] = content[2].replace(b"system:anonymous", b"system:nobody")
    put_lines(gateway.audit_path, content)
    bad = subprocess.run([str(JITGATE), "audit", "verify", "--log", str(gateway.audit_path), "--store", str(store)],
                         capture_output=True, text=True, timeout=60)
    assert_fails_at(bad, f"{gateway.audit_path}:3", "changed")


# --- the chained writer under the failures the plain one survives -------------------------------------------


def test_chained_failed_reopen_raises_and_the_chain_goes_on(tmp_path):
    logdir = tmp_path / "logs"
    path = logdir / "audit.log"
    log = AuditLog(path, chain=True, checkpoint_store=tmp_path / "state.db")
    log.write(event(1))
    logdir.rename(tmp_path / "moved")
    logdir.write_bytes(b"not a directory")
    with pytest.raises(AuditLogError, match="Not a directory"):
        log.write(event(2))
    logdir.unlink()
    log.write(event(3))
    log.close()
    moved = tmp_path / "moved" / "audit.log"
    assert [json.loads(line)[CHAIN_KEY]["seq"] for line in lines(moved) + lines(path)] == [1, 2]
    report = verify([moved, path], read_checkpoint(tmp_path / "state.db", path)[0])
    assert report.ok and report.events == 2


def test_chained_write_errors_are_audit_log_errors(tmp_path):
    with pytest.raises(AuditLogError, match="No space left"):
        with AuditLog("/dev/full", chain=True) as full:
            full.write(event(1))
    log = AuditLog(tmp_path / "audit.log", chain=True)
    os.close(log._fd)
    with pytest.raises(AuditLogError, match="Bad file descriptor"):
        log.write(event(1))
    log._fd = -1
    with pytest.raises(AuditLogError, match="closed"):
        log.write(event(2))


def test_chained_stdout():
    code = ("from jitgate.audit.log import AuditLog; log = AuditLog('-', chain=True); "
            "log.write({'a': 1}); log.write({'b': 2}); log.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=True).stdout
    first, second = [read_line(line) for line in out.splitlines()]
    assert first.seq == 1 and first.prev == GENESIS and second.prev == first.hash and first.intact and second.intact
