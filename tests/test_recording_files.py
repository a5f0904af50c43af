"""The recording's plain modules and its addon in mitmproxy's own harness: flow-file bytes (against
mitmproxy's FlowWriter), a HAR that stays valid and is repaired, credential scrubbing, session ids,
typed input and terminal casts, the index, retention, bounded stream capture.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from mitmproxy import io as mitmproxy_io
from mitmproxy.io import tnetstring
from mitmproxy.test import taddons, tflow, tutils

from jitgate.chain.flow import call_of
from jitgate.cli.sessions import parse_since
from jitgate.kube.request_info import parse_request
from jitgate.masking.detectors import DetectorSet
from jitgate.recording import flowfile, har
from jitgate.recording.cast import (
    PROMPTED_SECRET,
    TerminalRecorder,
    TypedInput,
    stored_messages,
)
from jitgate.recording.index import Filters, Index, call_row
from jitgate.recording.recorder import FlowFile, Recorder
from jitgate.recording.retention import AGE, SIZE, Retention, Usage, plan
from jitgate.recording.scrub import (
    MARKER,
    scrub_bytes,
    scrub_headers,
    scrub_state,
    scrub_target,
)
from jitgate.recording.sessions import SessionRef, session_for
from testkit.recording import HAR_SCHEMA, load_cast, load_har

REPO = Path(__file__).resolve().parents[1]
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsImF1ZCI6ImppdGdhdGUifQ.c2lnbmF0dXJl"
EKS = "k8s-aws-v1.aHR0cHM6Ly9zdHMuYW1hem9uYXdzLmNvbS8_QWN0aW9uPUdldENhbGxlcklkZW50aXR5"


def recording_module():
    spec = importlib.util.spec_from_file_location("jitgate_recording_under_test", REPO / "addons/recording.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- flow files ---------------------------------------------------------------------------------------


def test_flow_bytes_are_what_mitmproxys_flow_writer_writes() -> None:
    module = recording_module()
    flows = [tflow.tflow(resp=True), tflow.tflow(err=True), tflow.twebsocketflow(), tflow.tflow(resp=True),
             tflow.tflow(req=tutils.treq(content=b"q" * 5000), resp=tutils.tresp(content=b"{}" * 40_000))]
    flows[3].client_conn, flows[3].server_conn = flows[0].client_conn, flows[0].server_conn  # one kept-alive connection
    flows[0].metadata["jitgate"] = {"auditID": "a", "user": {"username": "alice", "groups": ["x"]}, "n": 1.5, "ok": True}
    parts = module.ConnectionParts()
    for f in flows:
        assert module.flow_state(f) == {**f.get_state(), "metadata": f.metadata}  # mitmproxy 12.2's own shape
        state = module.flow_state(f, parts.state)
        pieces = parts.flow_pieces(state, f)
        mine = b"".join(pieces)
        if _encode is not None:  # bodies are written from where they are, never copied
            assert all(any(p is body for p in pieces) for body in (state["request"]["content"], (state["response"] or {}).get("content"))
                       if body and len(body) >= flowfile.PIECE_MIN)
        theirs = io.BytesIO()
        mitmproxy_io.FlowWriter(theirs).add(f)
        assert mine == theirs.getvalue()
    for value in ({"b": [1, -2, 3.25, None, True, False], "a": "é", "c": (b"\x00", {})}, [], 10**30, ""):
        assert flowfile.dumps(value) == tnetstring.dumps(value)


# The C encoders are optional only where no C compiler exists (pyproject: optional = true); where one
# does, a missing build fails these tests instead of skipping them.
try:
    from jitgate.recording import _encode
except ImportError:
    _encode = None
needs_c_encoder = pytest.mark.skipif(
    _encode is None and shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler on this machine, so the optional C encoder could not be built")
ENCODER_NOT_BUILT = "a C compiler is here but jitgate.recording._encode was not built (pip install -e .)"
TEXT_ALPHABET = [chr(c) for c in range(0x30)] + list('abc"\\/é€😀\u2028\x7f') + ["x"] * 30


def random_value(rng: random.Random, depth: int = 0):
    """A value of every type a flow state holds, nested (dict items in random order, repeated keys)."""
    kind = rng.randrange(10 if depth < 4 else 7)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 20))
    if kind == 1:
        return "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randrange(0, 10)))
    if kind == 2:
        return None
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return rng.choice([0, -1, 7, 2**70, -2**65, rng.randrange(-10**6, 10**6)])
    if kind == 5:
        return rng.choice([0.0, -0.0, 1.5, 1e300, 5e-324, float("inf"), float("-inf"), float("nan"), rng.random()])
    if kind == 6:
        return b""
    if kind == 7:
        return {f"k{rng.randrange(50)}": random_value(rng, depth + 1) for _ in range(rng.randrange(0, 40))}
    if kind == 8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return tuple(random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5)))


def test_the_python_tnetstring_is_mitmproxys_on_generated_values() -> None:
    rng = random.Random(7)
    for _ in range(1500):
        value = random_value(rng)
        assert flowfile.py_dumps(value) == tnetstring.dumps(value), value


@needs_c_encoder
def test_the_c_tnetstring_is_mitmproxys_and_leaves_other_types_to_python() -> None:
    assert _encode is not None, ENCODER_NOT_BUILT
    rng = random.Random(11)
    for _ in range(3000):
        value = random_value(rng)
        assert _encode.tnetstring(value) == tnetstring.dumps(value), value

    class Text(str):
        pass

    for value in (Text("x"), {"a": [1, Text("x")]}, [True, {"b": Text("")}]):
        assert _encode.tnetstring(value) is None  # a subclass: the Python twin writes it, as mitmproxy would
        assert flowfile.dumps(value) == tnetstring.dumps(value)
    with pytest.raises(ValueError):
        flowfile.dumps({"a": bytearray(b"x")})  # neither writes what mitmproxy cannot
    deep = []
    for _ in range(200):  # deeper than the C encoder goes: the twin writes it
        deep = [deep]
    assert _encode.tnetstring(deep) is None and flowfile.dumps(deep) == tnetstring.dumps(deep)
    with pytest.raises(UnicodeEncodeError):
        _encode.tnetstring({"a": "\udcff"})  # as mitmproxy's own encoder refuses it


def test_the_python_json_text_is_what_json_writes() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randrange(0, 60)))
        assert har.py_json_text(text.encode()) == json.dumps(text, ensure_ascii=False)[1:-1].encode(), text


@needs_c_encoder
def test_the_c_json_text_is_what_json_writes() -> None:
    assert _encode is not None, ENCODER_NOT_BUILT
    rng = random.Random(5)
    for _ in range(20000):  # every length around the 8-byte steps, escapes at every offset
        text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randrange(0, 60)))
        assert _encode.json_text(text.encode()) == json.dumps(text, ensure_ascii=False)[1:-1].encode(), text
    for text in ('"' * 5000 + "\x01" * 5000, "plain" * 1000, ""):  # past the first guess of the output size
        assert _encode.json_text(text.encode()) == json.dumps(text, ensure_ascii=False)[1:-1].encode()
    assert _encode.json_text(bytearray(b'a"b')) == b'a\\"b'


def test_a_flow_cut_short_by_a_kill_is_dropped_when_the_file_opens_again(tmp_path: Path) -> None:
    path = tmp_path / "flows.mitm"
    writer = io.BytesIO()
    for _ in range(3):
        mitmproxy_io.FlowWriter(writer).add(tflow.tflow(resp=True))
    whole = writer.getvalue()
    path.write_bytes(whole + whole[: len(whole) // 5])  # a fourth flow, cut
    flow_file = FlowFile(path)
    mitmproxy_io.FlowWriter(extra := io.BytesIO()).add(tflow.tflow(resp=True))
    flow_file.append([extra.getvalue()])
    flow_file.close()
    with path.open("rb") as f:
        assert len(list(mitmproxy_io.FlowReader(f).stream())) == 4


def test_a_gathered_write_cut_short_is_finished(tmp_path: Path, monkeypatch) -> None:
    # A signal or a full disk can cut writev/pwritev short; the rest follows, so no piece is lost.
    real_writev, real_pwritev = os.writev, os.pwritev
    monkeypatch.setattr(os, "writev", lambda fd, pieces: real_writev(fd, [bytes(pieces[0])[:3]]))
    monkeypatch.setattr(os, "pwritev", lambda fd, pieces, offset: real_pwritev(fd, [bytes(pieces[0])[:1]], offset))
    flow_file = FlowFile(tmp_path / "flows.mitm")
    state = tflow.tflow(resp=True).get_state()
    pieces = flowfile.flow_pieces(state, {})
    flow_file.append(pieces)
    flow_file.close()
    assert (tmp_path / "flows.mitm").read_bytes() == b"".join(pieces) == tnetstring.dumps(state)
    file = har.HarFile(tmp_path / "session.har", "s1", 1 << 20)
    assert file.add([entry_bytes(1)], time.time()) and file.add([entry_bytes(2)], time.time())
    file.close()
    doc = json.loads((tmp_path / "session.har").read_bytes())
    assert [e["_jitgate"]["auditID"] for e in doc["log"]["entries"]] == ["id-1", "id-2"]


# --- HAR -------------------------------------------------------------------------------------------------


def entry_bytes(i: int, size: int = 100) -> bytes:
    state = tflow.tflow(resp=True).get_state()
    state["response"]["content"] = b'{"n":%d,"pad":"%s"}' % (i, b"x" * size)
    return har.dumps(har.entry(state, {"auditID": f"id-{i}", "decision": "allow"}))


def test_the_har_parses_after_every_write_and_reopens_where_it_ended(tmp_path: Path) -> None:
    path = tmp_path / "session.har"
    file = har.HarFile(path, "s1", 1 << 20)
    load_har(path)
    for i in range(5):
        assert file.add([entry_bytes(i)], time.time())
        doc = load_har(path)  # HAR 1.2, whatever the moment the gateway is killed
        assert [e["_jitgate"]["auditID"] for e in doc["log"]["entries"]] == [f"id-{n}" for n in range(i + 1)]
    file.close()
    again = har.HarFile(path, "s1", 1 << 20)
    again.add([entry_bytes(5)], time.time())
    again.close()
    assert len(load_har(path)["log"]["entries"]) == 6
    assert len(list(mitmproxy_io.FlowReader(path.open("rb")).stream())) == 6
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_har_cut_short_is_repaired_to_its_complete_entries(tmp_path: Path) -> None:
    path = tmp_path / "session.har"
    file = har.HarFile(path, "s1", 1 << 20)
    for i in range(3):
        file.add([entry_bytes(i)], time.time())
    file.close()
    data = path.read_bytes()
    cut = data[: data.rindex(b'{"startedDateTime"') + 40]  # the third entry half written, no suffix
    path.write_bytes(cut)
    assert len(json.loads(har.repaired(cut))["log"]["entries"]) == 2
    reopened = har.HarFile(path, "s1", 1 << 20)
    reopened.add([entry_bytes(9)], time.time())
    reopened.close()
    assert [e["_jitgate"]["auditID"] for e in load_har(path)["log"]["entries"]] == ["id-0", "id-1", "id-9"]


def test_the_har_cap_ends_with_one_truncation_entry(tmp_path: Path) -> None:
    path = tmp_path / "session.har"
    file = har.HarFile(path, "s1", har.MIN_MAX_BYTES)
    added = [file.add([entry_bytes(i, 4000)], time.time()) for i in range(40)]
    assert added[0] and not added[-1] and added.index(False) > 5
    assert all(not a for a in added[added.index(False):])
    entries = load_har(path)["log"]["entries"]
    assert entries[-1][har.TRUNCATED_KEY] is True and "recording_har_max_bytes" in entries[-1]["comment"]
    assert sum(1 for e in entries if e.get(har.TRUNCATED_KEY)) == 1
    assert path.stat().st_size <= har.MIN_MAX_BYTES
    file.close()
    assert not har.HarFile(path, "s1", har.MIN_MAX_BYTES).add([entry_bytes(99)], time.time())  # still capped after a restart


def test_har_times_are_what_datetime_writes() -> None:
    import datetime

    rng = random.Random(2)
    moments = [0, 1.9995, 1.9999995, 5e-7, 1764612345.9999, 1764612346.0] + [rng.uniform(0, 2e9) for _ in range(20000)]
    for moment in moments:  # one cached second after another, and back
        want = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).isoformat(timespec="milliseconds")
        assert har._iso(moment) == want.replace("+00:00", "Z"), moment


def test_har_bodies_are_escaped_like_json_and_binary_is_base64() -> None:
    state = tflow.tflow(resp=True).get_state()
    state["request"]["content"] = "tab\there \"quoted\" back\\slash\nline é \x01".encode()
    state["response"]["content"] = b"\x00\xff\xfe binary"
    entry = json.loads(har.dumps(har.entry(state, {"decision": "deny", "reason": "no"})))
    assert entry["request"]["postData"]["text"] == "tab\there \"quoted\" back\\slash\nline é \x01"
    assert entry["response"]["content"]["encoding"] == "base64"
    assert base64.b64decode(entry["response"]["content"]["text"]) == b"\x00\xff\xfe binary"
    import jsonschema

    jsonschema.validate({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": [entry]}}, HAR_SCHEMA)


# --- credentials ------------------------------------------------------------------------------------------


def test_credentials_are_removed_from_headers_queries_and_bodies() -> None:
    headers = scrub_headers([(b"Authorization", b"Bearer " + JWT.encode()), (b"Cookie", b"session=abc"),
                             (b"X-Auth-Token", b"t0ken"), (b"Accept", b"application/json"),
                             (b"Sec-WebSocket-Protocol", b"v5.channel.k8s.io, base64url.bearer.authorization.k8s.io."
                              + base64.urlsafe_b64encode(JWT.encode()).rstrip(b"=")),
                             (b"Referer", b"https://x/?t=" + EKS.encode())])
    assert dict(headers)[b"Authorization"] == dict(headers)[b"Cookie"] == dict(headers)[b"X-Auth-Token"] == MARKER.encode()
    assert dict(headers)[b"Accept"] == b"application/json"
    assert dict(headers)[b"Sec-WebSocket-Protocol"] == b"v5.channel.k8s.io, base64url.bearer.authorization.k8s.io." + MARKER.encode()
    assert EKS.encode() not in dict(headers)[b"Referer"]
    target = scrub_target(b"/api/v1/pods?watch=1&access_token=" + JWT.encode() + b"&id_token=x&labelSelector=app%3Dweb")
    assert target == b"/api/v1/pods?watch=1&access_token=jitgate:removed&id_token=jitgate:removed&labelSelector=app%3Dweb"
    body = f'{{"token":"{JWT}","note":"Authorization: Bearer abcdefghijklmnop","eks":"{EKS}"}}'.encode()
    scrubbed = scrub_bytes(body)
    assert JWT.encode() not in scrubbed and b"abcdefghijklmnop" not in scrubbed and EKS.encode() not in scrubbed
    json.loads(scrubbed)
    # Where the masking detectors ran (they mask JWTs and bearer tokens), the cluster credential's shapes still go.
    assert EKS.encode() not in scrub_bytes(body, detected=True)
    plain = json.dumps({"items": [{"name": f"pod-{i}"} for i in range(100)]}).encode()
    assert scrub_bytes(plain) is plain
    state = tflow.twebsocketflow().get_state()
    state["websocket"]["messages"] = [(2, False, b"\x01" + JWT.encode(), 1.0, False, False)]
    state["error"] = {"msg": f"failed with {JWT}", "timestamp": 1.0}
    scrub_state(state)
    assert JWT.encode() not in state["websocket"]["messages"][0][2] and JWT not in state["error"]["msg"]


# --- sessions -----------------------------------------------------------------------------------------------


def test_session_ids_by_grant_by_hour_and_anonymous() -> None:
    when = 1796126400.0  # 2026-12-01T12:00:00Z
    user = {"username": "Alice.Smith@Example.com", "groups": []}
    assert session_for({"user": user, "grant": "grant-ab12", "rule": "r", "cluster": "dev"}, when) == \
        SessionRef("alice-smith-example-com-grant-ab12", "grant", "Alice.Smith@Example.com", "grant-ab12", "r", "dev")
    assert session_for({"user": user}, when).id == "alice-smith-example-com-2026120112"
    assert session_for({}, when).id == "anonymous-2026120112"
    other = session_for({"user": {"username": "alice-smith@example.com"}}, when).disambiguated()
    assert other.id.startswith("alice-smith-example-com-") and other.id.endswith("-2026120112") and len(other.id) == 41


# --- terminals --------------------------------------------------------------------------------------------


DETECTORS = DetectorSet()


def test_typed_lines_are_edited_masked_and_secret_prompts_hide_the_answer() -> None:
    typed = TypedInput(DETECTORS)
    assert typed.feed(b"ls -l\x7f\x7fa\r") == ["ls a"]
    assert typed.feed(b"export DB_PASSWORD=hunter2-secret\r")[0].startswith("export DB_PASSWORD=[masked:")
    typed.output("mysql -u root -p\r\nEnter password: ")
    assert typed.feed(b"correct-horse\r") == [PROMPTED_SECRET]
    assert typed.feed(b"select 1;\r") == ["select 1;"]  # the next line needs a prompt of its own
    typed.feed(b"echo unfinished")
    assert typed.pending() == "echo unfinished"


def test_a_terminal_recording_is_asciicast_v2(tmp_path: Path) -> None:
    path = tmp_path / "exec-x.cast"
    from jitgate.recording.cast import CastFile

    def open_cast(width, height):
        return CastFile(path, width, height, 1000.0, "alice: kubectl exec", {"TERM": "xterm-256color"})

    terminal = TerminalRecorder(open_cast, "v5.channel.k8s.io", tty=True, detectors=DETECTORS)
    terminal.client_frame(b'\x04{"Width":120,"Height":40}', 1000.1)
    terminal.server_frame(b"\x01# ", 1000.2)
    terminal.client_frame(b"\x00echo API_TOKEN=abc123secret", 1000.3)
    terminal.client_frame(b"\x00\r", 1000.2)  # a timestamp out of order still gives increasing times
    terminal.server_frame(b"\x01API_TOKEN=[masked:secret-pair]\r\n", 1000.5)
    terminal.client_frame(b'\x04{"Width":100,"Height":30}', 1000.6)
    terminal.server_frame(b'\x03{"metadata":{},"status":"Success"}', 1000.7)
    terminal.finish(1000.8)
    header, events = load_cast(path)
    assert (header["width"], header["height"], header["timestamp"]) == (120, 40, 1000)
    assert [e[1] for e in events] == ["o", "i", "o", "r", "m"]
    assert events[1][2].startswith("echo API_TOKEN=[masked:") and events[1][2].endswith("\r")
    assert events[3][2] == "100x30" and events[4][2] == "exit: Success"

    plain = TerminalRecorder(lambda w, h: CastFile(tmp_path / "b.cast", w, h, 1.0, "t"), "v4.channel.k8s.io", tty=False,
                             detectors=DETECTORS)
    plain.server_frame(b"\x01one\ntwo\n", 1.1)
    plain.finish(1.2)
    header, events = load_cast(tmp_path / "b.cast")
    assert (header["width"], header["height"]) == (80, 24) and events == [[0.1, "o", "one\r\ntwo\r\n"]]


def test_stored_messages_keep_typed_lines_not_keystrokes() -> None:
    messages = [(2, True, b'\x04{"Width":80,"Height":24}', 1.0, False, False),
                (2, True, b"\x00e", 1.1, False, False), (2, True, b"\x00cho TOKEN=s3cr3tvalue\r", 1.2, False, False),
                (2, False, b"\x01", 1.25, True, False),  # held by masking, never delivered
                (2, False, b"\x01TOKEN=[masked:secret-pair]\r\n", 1.3, False, True),
                (2, True, b"\x00exi", 1.4, False, False)]
    out = stored_messages(messages, "v5.channel.k8s.io", DETECTORS, tty=True)
    client = [m[2] for m in out if m[1]]
    assert client[0].startswith(b"\x04") and client[1].startswith(b"\x00echo TOKEN=[masked:") and client[2] == b"\x00exi"
    assert [m[2] for m in out if not m[1]] == [b"\x01TOKEN=[masked:secret-pair]\r\n"]
    revealed = stored_messages([(2, False, b"\x01DB_PASSWORD=plain-secret-1\n", 1.0, False, False)],
                               "v5.channel.k8s.io", DETECTORS, tty=False, reveal=True)
    assert b"plain-secret-1" not in b"".join(m[2] for m in revealed)
    forwarded = stored_messages([(2, False, b"\x00\x50\x00data", 1.0, False, False)], "v4.channel.k8s.io", DETECTORS,
                                tty=False, portforward=True)
    assert forwarded[0][2] == b""


# --- index and retention ---------------------------------------------------------------------------------


def test_the_gateways_index_is_checkpointed_by_its_own_thread_not_by_the_writer(tmp_path: Path, monkeypatch) -> None:
    ref = SessionRef("s1", "grant", "alice", "g1", "rule", "dev")
    row = call_row("s1", {"auditID": "a", "request": {"verb": "get"}}, time.time(), 200, "/api", 1.0)

    def main_file_after(index: Index, rows: int) -> int:
        index.add_session(ref, time.time())
        for _ in range(rows):
            index.add_call(row)
        deadline = time.monotonic() + 5
        while index.checkpointer is not None and time.monotonic() < deadline and index.path.stat().st_size < 40_000:
            time.sleep(0.02)
        return index.path.stat().st_size

    reader = Index(tmp_path / "plain.db")  # a reader's (or retention's) connection: SQLite's own checkpoints
    assert reader.checkpointer is None and main_file_after(reader, 300) < 40_000  # all still in the WAL
    reader.close()
    writer = Index(tmp_path / "writer.db", checkpoint_every=0.05)
    assert writer.db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)  # the writer never checkpoints
    import sqlite3

    from jitgate.recording import index as index_module

    connect, failures = sqlite3.connect, []

    def flaky_connect(*args, **kwargs):  # the checkpointer's first connection fails: it tries again
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("disk I/O error")
        return connect(*args, **kwargs)

    monkeypatch.setattr(index_module.sqlite3, "connect", flaky_connect)
    assert main_file_after(writer, 300) >= 40_000  # the thread copied the WAL into the database
    assert failures and writer.checkpointer.is_alive()
    thread = writer.checkpointer
    writer.close()
    assert not thread.is_alive()
    assert len(Index(tmp_path / "writer.db").calls("s1")) == 300


def test_the_index_lists_sessions_by_user_cluster_namespace_grant_decision_and_time(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    a = SessionRef("alice-grant-1", "grant", "alice@example.com", "grant-1", "dev-read", "dev")
    b = SessionRef("bob-2026120112", "hour", "bob@example.com", cluster="prod")
    for ref in (a, b):
        index.add_session(ref, 100.0)
    record = {"auditID": "1", "decision": "allow", "user": {"username": "alice@example.com"}, "cluster": "dev",
              "request": {"verb": "get", "resource": "pods", "namespace": "dev"}, "grant": "grant-1", "rule": "dev-read"}
    index.add_call(call_row(a.id, record, 200.0, 200, "/api/v1/namespaces/dev/pods", 1.0))
    denied = {**record, "auditID": "2", "decision": "deny", "user": {"username": "bob@example.com"}, "cluster": "prod",
              "request": {"verb": "delete", "resource": "pods", "namespace": "prod"}, "grant": "", "rule": ""}
    index.add_call(call_row(b.id, denied, 300.0, 403, "/api/v1/namespaces/prod/pods/x", 1.0))
    ids = lambda **kw: [s.id for s in index.sessions(Filters(**kw))]  # noqa: E731
    assert ids() == [b.id, a.id]
    assert ids(user="alice") == ids(user="alice@example.com") == ids(grant="grant-1") == [a.id]
    assert ids(cluster="prod") == ids(namespace="prod") == ids(decision="deny") == [b.id]
    assert ids(since=250.0) == [b.id] and ids(user="al%") == []
    assert index.session(a.id).calls == 1 and index.session(b.id).denied == 1
    index.delete_session(b.id)
    assert ids() == [a.id] and index.calls(b.id) == []
    index.close()


def test_retention_plans_by_age_then_by_size_oldest_first() -> None:
    now = 1_000_000.0
    usages = [Usage("old", Path("old"), 10, 1, now - 100 * 86400), Usage("a", Path("a"), 400, 1, now - 3600),
              Usage("b", Path("b"), 400, 1, now - 60), Usage("c", Path("c"), 400, 1, now - 7200)]
    assert [(u.id, why) for u, why in plan(usages, now, 30 * 86400, 700)] == [("old", AGE), ("c", SIZE), ("a", SIZE)]
    assert [u.id for u, _ in plan(usages, now, 30 * 86400, 900)] == ["old", "c"]
    assert plan(usages, now, 0, 0) == []


def test_retention_never_deletes_a_session_being_recorded(tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    recorder = Recorder(root, 1 << 20)
    busy, idle = SessionRef("busy-1", "grant", "a"), SessionRef("idle-1", "grant", "b")
    for ref in (busy, idle):
        recorder.record(ref, [b""], [b"{}"], time.time(), call_row(ref.id, {"auditID": ref.id}, time.time(), 200, "/", 1.0))
        old = time.time() - 10 * 86400
        for path in (*(root / ref.id).iterdir(), root / ref.id):
            os.utime(path, (old, old))
    recorder.hold(busy.id)
    deleted = Retention(recorder, 86400, 0).run()
    assert [d.session for d, _ in deleted] == ["idle-1"] and deleted[0][1]["user"] == "b"
    assert (root / "busy-1").exists() and not (root / "idle-1").exists()
    assert json.loads((root / "deletions.jsonl").read_text())["session"] == "idle-1"
    recorder.release(busy.id)
    assert [d.session for d, _ in Retention(recorder, 86400, 0).run()] == ["busy-1"]
    recorder.close()


# --- the addon in mitmproxy's harness ----------------------------------------------------------------------


@pytest.fixture
def addon(tmp_path: Path):
    module = recording_module()
    step = module.Recording()
    with taddons.context(step) as tctx:
        tctx.configure(step, recordings=str(tmp_path / "recordings"), recording_body_max_bytes="64k")
        yield step, tmp_path / "recordings"


def streamed(path: str) -> object:
    flow = tflow.tflow(req=tutils.treq(path=path.encode()), resp=tutils.tresp(headers=((b"Content-Type", b"application/json"),)))
    call = call_of(flow)
    call.info = parse_request("GET", path)
    flow.response.stream = True
    return flow


def test_a_long_watch_keeps_at_most_the_body_limit(addon) -> None:
    step, root = addon
    flow = streamed("/api/v1/namespaces/dev/pods?watch=true")
    step.responseheaders(flow)
    event = b'{"type":"MODIFIED","object":{"kind":"Pod","metadata":{"name":"p"}}}\n'
    for _ in range(5000):  # 340 KB through the stream: every byte passes, 64 KB are kept
        assert flow.response.stream(event) == event
    assert flow.response.stream(b"") == b""
    step.error(flow)  # the client ended the watch
    (session,) = [p for p in root.iterdir() if p.is_dir()]
    (stored,) = mitmproxy_io.FlowReader((session / "flows.mitm").open("rb")).stream()
    assert len(stored.response.content) == 64 * 1024 and stored.response.content.startswith(event)
    assert "streamed body cut at 65536 bytes" in stored.comment
    (entry,) = load_har(session / "session.har")["log"]["entries"]
    assert "cut at 65536" in entry["response"]["content"]["comment"]


def test_flows_read_back_are_never_recorded_again(addon) -> None:
    step, root = addon
    flow = tflow.tflow(resp=True)
    flow.live = False
    step.response(flow)
    assert not [p for p in root.iterdir() if p.is_dir()]


def test_since_reads_durations_dates_and_times() -> None:
    now = 2_000_000_000.0
    assert parse_since("2h", now) == now - 7200
    assert parse_since("2026-12-01", now) == 1796083200.0
    assert parse_since("2026-12-01T10:00:00Z", now) == 1796119200.0


def test_what_a_revealing_grant_showed_is_kept_masked(addon) -> None:
    from jitgate.access.model import Grant
    from jitgate.access.scope import Scope
    from jitgate.identity.oidc import Identity
    from testkit.recording import leaks

    step, root = addon
    canary = "revealed-canary-91c3"
    path = "/api/v1/namespaces/dev/secrets/db"
    body = json.dumps({"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "db"},
                       "data": {"password": base64.b64encode(canary.encode()).decode()}}).encode()
    flow = tflow.tflow(req=tutils.treq(path=path.encode(), method=b"GET"),
                       resp=tutils.tresp(content=body, headers=((b"Content-Type", b"application/json"),)))
    call = call_of(flow)
    call.info = parse_request("GET", path)
    call.identity = Identity("bob@example.com", ("oidc:sre",), "https://idp", "bob", time.time() + 60)
    scope = Scope("dev", ("dev",), False, ("secrets",), ("get",), reveal=True)
    call.grant = Grant("grant-r", "req-r", "bob@example.com", "reveal-secrets", scope, None, time.time(), time.time() + 60)
    call.allow("allowed by grant grant-r")
    step.response(flow)
    assert flow.response.content == body, "the caller still gets what the grant reveals"
    assert (root / "bob-example-com-grant-r" / "flows.mitm").exists()
    assert leaks(root, {"canary": canary}) == []


def test_request_bodies_are_masked_json_patches_included(addon) -> None:
    from testkit.recording import leaks

    step, root = addon
    canary = "patched-canary-40d2"
    bodies = {
        "/api/v1/namespaces/dev/secrets/db": (b"application/json-patch+json", json.dumps(
            [{"op": "replace", "path": "/data/password", "value": base64.b64encode(canary.encode()).decode()}])),
        "/api/v1/namespaces/dev/pods/web": (b"application/json-patch+json", json.dumps(
            [{"op": "add", "path": "/spec/containers/0/env/-", "value": {"name": "X", "value": canary}},
             {"op": "replace", "path": "/metadata/labels/app", "value": "web"}])),
        "/api/v1/namespaces/dev/secrets": (b"application/json", json.dumps(
            {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "n"}, "stringData": {"k": canary}})),
        "/api/v1/namespaces/dev/configmaps": (b"application/apply-patch+yaml", f"data:\n  DB_PASSWORD: {canary}\n"),
    }
    for path, (content_type, body) in bodies.items():
        flow = tflow.tflow(req=tutils.treq(path=path.encode(), method=b"PATCH", content=body.encode(),
                                           headers=((b"Content-Type", content_type),)), resp=True)
        call_of(flow).info = parse_request("PATCH", path)
        step.response(flow)
    assert leaks(root, {"canary": canary}) == []
    (session,) = [p for p in root.iterdir() if p.is_dir()]
    stored = {f.request.path: f for f in mitmproxy_io.FlowReader((session / "flows.mitm").open("rb")).stream()}
    assert json.loads(stored["/api/v1/namespaces/dev/pods/web"].request.content)[1]["value"] == "web"


def test_recorded_bodies_are_kept_decoded_and_an_undecodable_one_is_left_out_with_a_note() -> None:
    import gzip

    body = b'{"kind":"PodList","items":[]}'
    message = {"headers": ((b"Content-Type", b"application/json"), (b"Content-Encoding", b"gzip"),
                           (b"Content-Length", b"99")), "content": gzip.compress(body)}
    assert har.undo_content_encoding(message, "response") == ""
    assert message["content"] == body and message["headers"] == ((b"Content-Type", b"application/json"),)
    broken = {"headers": ((b"content-encoding", b"gzip"),), "content": b"not gzip at all"}
    assert har.undo_content_encoding(broken, "request") == "request body not recorded: content encoding 'gzip' could not be undone"
    assert broken["content"] == b"" and broken["headers"] == ()
    plain = {"headers": ((b"Content-Length", b"2"),), "content": b"{}"}
    assert har.undo_content_encoding(plain, "response") == "" and plain["headers"] == ((b"Content-Length", b"2"),)
