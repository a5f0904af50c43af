"""Recordings survive a killed gateway, stay within their caps, and retention deletes what is too old
or too much, recording every deletion. Real kubectl through a real gateway (mitmdump) that records.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from testkit.recording import RecordingGateway, load_cast, load_har, read_flows
from testkit.standin.process import KUBECTL, kubectl_env, read_until

READ_PODS = ("pods", "pods/log", "pods/exec")


def recorded_ids(env: RecordingGateway) -> dict[str, set[str]]:
    """The audit IDs in each kind of file, over every session; every file must parse."""
    ids: dict[str, set[str]] = {"flows": set(), "har": set(), "index": {c["audit_id"] for c in env.calls()}, "casts": set()}
    for folder in (p for p in env.recordings.iterdir() if p.is_dir()):
        ids["flows"] |= {f.metadata["jitgate"]["auditID"] for f in read_flows(folder / "flows.mitm")}
        ids["har"] |= {e["_jitgate"]["auditID"] for e in load_har(folder / "session.har")["log"]["entries"]}
        for cast in folder.glob("exec-*.cast"):
            load_cast(cast)
            ids["casts"].add(cast.name[len("exec-"):-len(".cast")])
    return ids


def completed(env: RecordingGateway) -> set[str]:
    return {e["auditID"] for e in env.gateway.audit_events() if e["stage"] == "ResponseComplete"}


def test_sigkill_mid_session_leaves_every_completed_call_in_every_file(stack, tmp_path: Path) -> None:
    env = RecordingGateway(stack, tmp_path).start()
    streams: list[subprocess.Popen] = []
    try:
        env.grant("dev", ("dev",), READ_PODS, ("get", "list", "watch", "create"))
        env.kubectl("get", "pods", "-n", "dev", check=True)
        env.kubectl("get", "pod", "toolbox", "-n", "dev", "-o", "yaml", check=True)
        assert env.kubectl("exec", "-n", "dev", "toolbox", "--", "echo", "before-the-kill", check=True).stdout == "before-the-kill\n"
        env.kubectl("get", "deployments", "-n", "dev")  # denied
        config = env.kubeconfig()
        for args in (("get", "pods", "-n", "dev", "-w"), ("logs", "-f", "toolbox", "-n", "dev", "-c", "shell")):
            streams.append(subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, env=kubectl_env(config)))
        assert b"toolbox" in read_until(streams[0].stdout, b"toolbox")
        assert streams[1].stdout.readline()
        done = completed(env)
        env.wait_for_calls(lambda calls: done <= {c["audit_id"] for c in calls})
        env.kill()  # SIGKILL, sessions open, a watch and a log follow streaming
    finally:
        for proc in streams:
            proc.kill()
            proc.wait(10)
        env.stop()
    done = completed(env)
    assert len(done) >= 6, done
    ids = recorded_ids(env)
    for kind in ("flows", "har", "index"):
        assert ids[kind] == done, (kind, ids[kind] ^ done)
    assert len(ids["casts"]) == 1 and ids["casts"] <= done

    # The gateway starts again on the same folder: the session goes on in the same files.
    env.start()
    try:
        env.kubectl("get", "pods", "-n", "dev", check=True)
        env.kubectl("exec", "-n", "dev", "toolbox", "--", "echo", "after-the-restart", check=True)
        done = completed(env)
        env.wait_for_calls(lambda calls: done <= {c["audit_id"] for c in calls})
    finally:
        env.stop()
    ids = recorded_ids(env)
    for kind in ("flows", "har", "index"):
        assert ids[kind] == completed(env), kind
    assert len(ids["casts"]) == 2


def test_the_har_cap_marks_the_truncation_and_the_flow_file_keeps_everything(stack, tmp_path: Path) -> None:
    env = RecordingGateway(stack, tmp_path, options={"recording_har_max_bytes": "64k"}).start()
    try:
        grant = env.grant("dev", ("dev",), ("pods",), ("get", "list"))
        for _ in range(25):
            env.kubectl("get", "pods", "-n", "dev", "-o", "json", check=True)
        env.wait_for_calls(lambda calls: sum(c["grant_id"] == grant for c in calls) >= 25)
    finally:
        env.stop()
    folder = env.session_folder(f"alice-example-com-{grant}")
    har_path = folder / "session.har"
    assert 40_000 < har_path.stat().st_size <= 64 * 1024
    entries = load_har(har_path)["log"]["entries"]
    assert entries[-1].get("_jitgateTruncated") is True and "recording_har_max_bytes" in entries[-1]["comment"]
    assert 1 < len(entries) < 25
    assert len(read_flows(folder / "flows.mitm")) == 25
    truncated = [e for e in env.gateway.audit_events() if e["annotations"].get("jitgate.dev/recording-har") == "truncated"]
    assert len(truncated) == 25 - (len(entries) - 1)


def make_session(root: Path, name: str, size: int, age: float, user: str = "bob@example.com") -> Path:
    folder = root / name
    folder.mkdir(parents=True, mode=0o700)
    (folder / "session.json").write_text(json.dumps({"id": name, "kind": "hour", "user": user, "grant": "", "rule": ""}))
    (folder / "flows.mitm").write_bytes(b"x" * size)
    stamp = time.time() - age
    for path in (*folder.iterdir(), folder):
        os.utime(path, (stamp, stamp))
    return folder


def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def deletions(env: RecordingGateway) -> list[dict]:
    path = env.recordings / "deletions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_retention_deletes_old_and_oversized_sessions_and_records_each_deletion(stack, tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    root.mkdir(mode=0o700)
    make_session(root, "bob-example-com-2020010100", 1000, age=200 * 86400)
    for hours in (3, 2, 1):
        make_session(root, f"carol-example-com-20261201{10 - hours:02d}", 300_000, age=hours * 3600, user="carol@example.com")
    env = RecordingGateway(stack, tmp_path, options={"recording_max_age": "30d", "recording_max_total_bytes": "700k",
                                                     "recording_retention_interval": "10"}).start()
    try:
        wait_for(lambda: len(deletions(env)) >= 2)  # the pass at start
        first = deletions(env)
        assert [(d["session"], d["reason"]) for d in first] == [("bob-example-com-2020010100", "age"),
                                                                 ("carol-example-com-2026120107", "size")]
        assert first[0]["user"] == "bob@example.com" and first[1]["bytes"] > 300_000
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["carol-example-com-2026120108", "carol-example-com-2026120109"]

        # A session the gateway itself recorded, gone quiet for longer than the age limit: the next
        # periodic pass deletes it, with its index rows.
        grant = env.grant("dev", ("dev",), ("pods",), ("get", "list"))
        env.kubectl("get", "pods", "-n", "dev", check=True)
        session = f"alice-example-com-{grant}"
        env.wait_for_calls(lambda calls: any(c["session"] == session for c in calls))
        old = time.time() - 40 * 86400
        for path in (*env.session_folder(session).iterdir(), env.session_folder(session)):
            os.utime(path, (old, old))
        wait_for(lambda: len(deletions(env)) >= 3, timeout=30)
        assert deletions(env)[2]["session"] == session and deletions(env)[2]["grant"] == grant
        assert not env.session_folder(session).exists()
        assert not [c for c in env.calls() if c["session"] == session]
        audited = [e for e in env.gateway.audit_events() if "jitgate.dev/recording-deleted" in e["annotations"]]
        assert [e["annotations"]["jitgate.dev/recording-deleted"] for e in audited] == [d["session"] for d in deletions(env)]
        assert {e["verb"] for e in audited} == {"delete"}
        assert audited[2]["annotations"]["jitgate.dev/recording-grant"] == grant
        assert (root / "deletions.jsonl").stat().st_mode & 0o777 == 0o600
    finally:
        env.stop()


def test_one_gateway_per_recordings_folder(stack, tmp_path: Path) -> None:
    shared = {"recordings": str(tmp_path / "shared")}
    first = RecordingGateway(stack, tmp_path / "one", options=shared).start()
    try:
        first.wait_for_calls(lambda _: (tmp_path / "shared" / "index.db").exists())
        second = RecordingGateway(stack, tmp_path / "two", options=shared)
        try:
            second.start()
        except RuntimeError:
            pass  # it may already have exited while starting
        assert second.gateway.proc.wait(30) != 0
        assert "is written by another gateway process" in second.gateway.log()
        first.kill()  # the lock goes with the process: a killed gateway never blocks the next one
        second.start()
        second.kubectl("version", "-o", "json")  # discovery: recorded in alice's session of the hour
        assert second.wait_for_calls(lambda calls: calls), "the second gateway records into the folder"
        second.stop()
    finally:
        first.stop()
