"""Ending a session says why, and only when no active grant covers it any more.

Real kubectl through the gateway: a revoked grant ends `get -w` with an ERROR event carrying a
Status (kubectl prints it), `exec` with a Status on the error channel, `logs -f` with a final line;
a session under a grant that ends while another grant of the caller covers it moves to that grant.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from jitgate.access.errors import InvalidRequest
from jitgate.access.workflow import check_reason
from jitgate.kube import stream_endings
from testkit.standin.process import KUBECTL, kubectl_env, read_until
from tests.test_self_review import Env

ENDED = "jitgate: this session ended: grant revoked by rita@example.com"


# --- the plain module -------------------------------------------------------------------------


def test_endings_in_each_protocols_own_shape() -> None:
    event = json.loads(stream_endings.watch_error_event("gone"))
    assert event["type"] == "ERROR" and event["object"]["kind"] == "Status"
    assert (event["object"]["message"], event["object"]["code"], event["object"]["reason"]) == ("gone", 403, "Forbidden")
    (v5,) = stream_endings.exec_error_frames("v5.channel.k8s.io", "gone")
    assert v5[0] == 3 and json.loads(v5[1:])["status"] == "Failure" and json.loads(v5[1:])["message"] == "gone"
    assert stream_endings.websocket_close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert [f[0] for f in stream_endings.exec_error_frames("V4.channel.k8s.io", "gone")] == [3]
    assert stream_endings.exec_error_frames("channel.k8s.io", "gone") == [b"\x03gone"]
    assert stream_endings.exec_error_frames("v5.base64.channel.k8s.io", "gone")[0].startswith(b"3")
    assert stream_endings.exec_error_frames("spdy/3.1", "gone") == []
    assert stream_endings.stream_ending("text/plain", "", True, "a\nb") == b"a b\n"
    assert stream_endings.stream_ending("application/json", "", False, "gone").startswith(b'{"type":"ERROR"')
    assert stream_endings.stream_ending("application/json", "gzip", False, "gone") is None
    assert stream_endings.stream_ending("application/vnd.kubernetes.protobuf;stream=watch", "", False, "gone") is None


def test_reason_messages_read_as_sentences() -> None:
    with pytest.raises(InvalidRequest) as e:
        check_reason(" ", True, "access rule 'prod-operate' requires a reason")
    assert str(e.value.message) == "access rule 'prod-operate' requires a reason"
    with pytest.raises(InvalidRequest) as e:
        check_reason("", True, "a reason for the denial")
    assert str(e.value.message) == "a reason for the denial is required"


# --- through the gateway ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(stack, ca, tmp_path_factory: pytest.TempPathFactory):
    e = Env(stack, ca, tmp_path_factory.mktemp("session-endings"))
    yield e
    e.stop()


def popen(env: Env, mode: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=kubectl_env(env.kubeconfig("dev", mode)))


def finish(proc: subprocess.Popen, timeout: float = 10) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def ended_events(env: Env, grant_id: str) -> list[dict]:
    return [e for e in env.gateway.audit_events() if e["annotations"].get("jitgate.dev/terminated", "").startswith("grant revoked")
            and e["annotations"].get("jitgate.dev/grant") == grant_id]


# Both modes: in regular (proxy) mode the notice goes through the CONNECT tunnel (the HTTP/2 and
# HTTP/1.1 combinations are in test_session_endings_modes).
@pytest.mark.parametrize("mode", ["reverse", "proxy"])
def test_revoked_watch_exec_and_log_follow_say_why(env: Env, mode: str) -> None:
    grant = env.grant("dev", ("dev",), ("pods", "pods/log", "pods/exec"), ("get", "list", "watch", "create"))
    watch = popen(env, mode, "get", "pods", "-n", "dev", "-w")
    shell = popen(env, mode, "exec", "-n", "dev", "toolbox", "--", "sh", "-c", "echo started; sleep 60")
    logs = popen(env, mode, "logs", "-f", "-n", "dev", "toolbox")
    try:
        assert b"toolbox" in read_until(watch.stdout, b"toolbox")
        assert shell.stdout.readline() == b"started\n"
        assert logs.stdout.readline()
        revoked_at = time.monotonic()
        env.revoke(grant)
        # kubectl get -w prints an ERROR event's Status as a row (STATUS REASON MESSAGE) and stops.
        code, out, err = finish(watch)
        assert "Forbidden   " + ENDED in out, (out, err)
        assert "Request access (rule dev-work" in out and "jitgate request --cluster dev" in out
        code, out, err = finish(shell)
        assert code != 0 and ENDED in err, (code, out, err)
        code, out, err = finish(logs)
        assert ENDED in out.splitlines()[-1], out[-500:]
        assert "unexpected EOF" not in err, err
        assert time.monotonic() - revoked_at < 10
    finally:
        for proc in (watch, shell, logs):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    # An exec session's last event is written when the gateway closes it, a moment after the notice
    # that ended kubectl: wait for it rather than race it.
    deadline = time.monotonic() + 10
    while True:
        events = [e for e in ended_events(env, grant) if e["stage"] == "ResponseComplete"]
        if {e["objectRef"].get("subresource", "") for e in events} >= {"", "exec", "log"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {e["objectRef"].get("subresource", "") for e in events} >= {"", "exec", "log"}, events
    assert all(e["annotations"]["jitgate.dev/termination-notice"] == "sent" for e in events)
    assert "has crashed" not in env.gateway.log()


def test_a_session_moves_to_another_grant_that_covers_it(env: Env) -> None:
    first = env.grant("dev", ("default",), ("pods",), ("get", "list", "watch"))
    watch = popen(env, "reverse", "get", "pods", "-n", "default", "-w")
    try:
        assert b"nginx" in read_until(watch.stdout, b"nginx")
        second = env.grant("dev", ("default",), ("pods", "configmaps"), ("get", "list", "watch"))
        env.revoke(first)
        time.sleep(3)
        assert watch.poll() is None, "another grant still covers the watch"
        env.revoke(second)
        code, out, err = finish(watch)
        assert ENDED in out, (out, err)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(5)
    ended = ended_events(env, second)
    assert ended and ended[-1]["annotations"]["jitgate.dev/grant-moved"] == f"{first} -> {second} (grant revoked by rita@example.com)"


def test_expiry_of_a_short_grant_does_not_cut_a_session_a_longer_one_covers(env: Env) -> None:
    env.grant("dev", ("default",), ("pods",), ("get", "list", "watch"), duration=4)
    results: list = []
    watch = popen(env, "reverse", "get", "pods", "-n", "default", "-w")
    reader = threading.Thread(target=lambda: results.append(read_until(watch.stdout, b"nginx")))
    reader.start()
    reader.join(10)
    assert results and b"nginx" in results[0]
    longer = env.grant("dev", ("default",), ("pods",), ("get", "list", "watch"))  # after the watch started
    try:
        time.sleep(7)  # the short grant expired and was swept
        assert watch.poll() is None, "the longer grant covers the watch"
        env.revoke(longer)
        code, out, err = finish(watch)
        assert ENDED in out, (out, err)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(5)
    (event,) = [e for e in ended_events(env, longer) if e["stage"] == "ResponseComplete"]
    assert event["annotations"]["jitgate.dev/grant-moved"].endswith(f"-> {longer} (grant expired)")
