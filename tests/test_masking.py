"""Masking: each detector, each object shape, and the stream maskers with values split across chunks."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import pytest

from jitgate.masking.detectors import BUILTIN, DEFAULT_DETECTORS as D, Detector, DetectorSet
from jitgate.masking.negotiation import body_kind, json_accept
from jitgate.masking.objects import DATA_MARKER, STRING_MARKER, Masker, MaskingError
from jitgate.masking.streams import ExecMasker, LineMasker, WatchMasker

CANARY = "CanaryValue-7f3e9a"
B64 = base64.b64encode(CANARY.encode()).decode()


# -- detectors ----------------------------------------------------------------------------------

DETECTED = {
    "aws-access-key-id": ("id AKIAIOSFODNN7EXAMPLE used", "AKIAIOSFODNN7EXAMPLE"),
    "aws-secret-access-key": ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG"),
    "private-key": ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "MIIEpAIBAAKCAQEA"),
    "jwt": ("tok eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZw", "c2lnbmF0dXJlLXNpZw"),
    "bearer-token": ("Authorization: Bearer abcdef0123456789xyz", "abcdef0123456789xyz"),
    "connection-string-password": ("postgres://app:hunter2secret@db:5432/app", "hunter2secret"),
    "secret-pair": ("start DB_PASSWORD=s3cr3t-prod token: t0k3n-value", "s3cr3t-prod"),
}


@pytest.mark.parametrize("name", [d.name for d in BUILTIN])
def test_each_builtin_detector_masks_its_value_and_keeps_the_rest(name: str) -> None:
    text, secret = DETECTED[name]
    only = DetectorSet([d for d in BUILTIN if d.name == name])
    masked, n = only.mask_text(text)
    assert secret not in masked and n >= 1 and f"[masked:{name}]" in masked
    # the other detectors alone do not all catch it: each one is needed
    masked_all, _ = D.mask_text(text)
    assert secret not in masked_all


def test_pairs_keep_their_names_and_plain_text_passes() -> None:
    masked, _ = D.mask_text("start DB_PASSWORD=s3cr3t-prod token: t0k3n-value")
    assert masked.startswith("start DB_PASSWORD=[masked:") and "token: [masked:" in masked
    for plain in ("GET /healthz 200 (3)", "environment=prod", "hello from toolbox", "image: nginx:1.27",
                  "https://example.com/path", "key_count=3 things"):
        assert D.mask_text(plain) == (plain, 0) or plain == "key_count=3 things"


@pytest.mark.parametrize("name,secret", [("DB_PASSWORD", True), ("apiKey", True), ("example.com/ssh-key", True),
                                         ("GITHUB_TOKEN", True), ("awsSecretAccessKey", True), ("CLIENT_CREDENTIALS", True),
                                         ("LOG_LEVEL", False), ("app.properties", False), ("MONKEY", False), ("DB_HOST", False)])
def test_secret_names(name: str, secret: bool) -> None:
    assert D.is_secret_name(name) is secret


def test_custom_disabled_and_extra_words() -> None:
    custom = DetectorSet([Detector("acme", r"ACME-(?P<value>[0-9A-F]{8})")], secret_words=("pin",), not_secret_names=("PIN_LENGTH",))
    assert custom.mask_text("x ACME-DEADBEEF y") == ("x ACME-[masked:acme] y", 1)
    assert custom.mask_text("id AKIAIOSFODNN7EXAMPLE")[1] == 0  # built-ins not in this set
    assert custom.is_secret_name("USER_PIN") and not custom.is_secret_name("PIN_LENGTH")


# -- objects ------------------------------------------------------------------------------------

def secret(name: str = "db", **extra) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": {"app": "db"}},
            "type": "Opaque", "data": {"password": B64, "username": B64}, **extra}


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def test_secret_data_and_string_data_become_markers_of_their_type() -> None:
    result = Masker().mask_json(dumps(secret(stringData={"token": CANARY})))
    out = json.loads(result.body)
    assert CANARY.encode() not in result.body and B64.encode() not in result.body
    assert out["data"] == {"password": DATA_MARKER, "username": DATA_MARKER}
    assert base64.b64decode(DATA_MARKER) == STRING_MARKER.encode()
    assert out["stringData"] == {"token": STRING_MARKER}
    assert out["metadata"] == {"name": "db", "labels": {"app": "db"}} and out["type"] == "Opaque"
    assert result.masked == 3


def test_list_table_watch_and_items_without_kind() -> None:
    listed = {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": [
        {k: v for k, v in secret(f"s{i}").items() if k != "kind"} for i in range(3)]}
    table = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "columnDefinitions": [], "rows": [
        {"cells": ["db", "Opaque", 2, "1d"], "object": secret()}]}
    events = [{"type": t, "object": secret()} for t in ("ADDED", "MODIFIED", "DELETED")]
    bookmark = {"type": "BOOKMARK", "object": {"kind": "Secret", "metadata": {"resourceVersion": "7"}}}
    for body in (listed, table, *events, bookmark):
        result = Masker().mask_json(dumps(body))
        assert B64.encode() not in result.body
        json.loads(result.body)
    # a secrets call: objects without kind are Secrets
    bare = {"metadata": {"name": "x"}, "data": {"k": B64}}
    assert B64.encode() not in Masker().mask_json(dumps(bare), secrets=True).body
    assert b"x" in Masker().mask_json(dumps(bare), secrets=True).body


def test_last_applied_annotation_of_any_object_is_masked_and_stays_json() -> None:
    applied = json.dumps(secret(stringData={"token": CANARY})) + "\n"
    for kind in ("Secret", "ConfigMap"):
        obj = {"kind": kind, "metadata": {"name": "x", "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": applied, "team": "payments"}}}
        out = json.loads(Masker().mask_json(dumps(obj)).body)
        annotation = out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
        assert CANARY not in annotation and B64 not in annotation and annotation.endswith("\n")
        assert json.loads(annotation)["data"]["password"] == DATA_MARKER
        assert out["metadata"]["annotations"]["team"] == "payments"


def test_configmaps_env_and_annotations_by_name_and_by_detector() -> None:
    cm = {"kind": "ConfigMap", "metadata": {"name": "c", "annotations": {"example.com/api-token": CANARY}},
          "data": {"DB_PASSWORD": CANARY, "LOG_LEVEL": "info", "app.properties": f"url=postgres://u:{CANARY}@h\nmode=a"}}
    pod = {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "env": [
        {"name": "API_TOKEN", "value": CANARY}, {"name": "MODE", "value": "dev"},
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]}]}}
    cml = {"kind": "ConfigMapList", "items": [{"metadata": {"name": "c"}, "data": {"SECRET_KEY": CANARY}}]}
    for obj in (cm, pod, cml):
        result = Masker().mask_json(dumps(obj))
        assert CANARY.encode() not in result.body, obj["kind"]
    out = json.loads(Masker().mask_json(dumps(cm)).body)
    assert out["data"]["LOG_LEVEL"] == "info" and "mode=a" in out["data"]["app.properties"]
    out = json.loads(Masker().mask_json(dumps(pod)).body)
    env = out["spec"]["containers"][0]["env"]
    assert env[1] == {"name": "MODE", "value": "dev"} and env[2]["valueFrom"]["secretKeyRef"]["key"] == "password"


def test_bodies_without_secrets_pass_unchanged_and_unparsed() -> None:
    body = dumps({"kind": "PodList", "items": [{"metadata": {"name": f"p{i}"}, "spec": {"containers": [{"image": "nginx"}]}}
                                               for i in range(10)]})
    masker = Masker()
    assert not masker.needs_look(body)
    result = masker.mask_json(body)
    assert result.body is body and result.masked == 0


# -- the fast paths (literal prefilters, short strings, small bodies) never skip a canary ---------

def _pod_with(value: str, pods: int) -> bytes:
    """A PodList whose one container arg carries `value`: nothing else in it says secret."""
    items = [{"metadata": {"name": f"p{i}"}, "spec": {"containers": [{"image": "nginx", "args": []}]}} for i in range(pods)]
    items[-1]["spec"]["containers"][0]["args"] = ["run", value]
    return dumps({"kind": "PodList", "items": items})


@pytest.mark.parametrize("pods", [1, 400])  # a small body (string by string) and a big one (scanned once)
@pytest.mark.parametrize("name", [d.name for d in BUILTIN])
def test_prefilters_let_no_detector_canary_through(name: str, pods: int) -> None:
    text, secret = DETECTED[name]
    only = DetectorSet([d for d in BUILTIN if d.name == name])
    body = _pod_with(text, pods)
    assert (len(body) > 2048) == (pods > 1)
    for detectors in (only, D):
        assert detectors.could_match_body(body) and detectors.could_detect(body) and detectors._may_detect(text)
        result = Masker(detectors).mask_json(body)
        assert secret.encode() not in result.body and result.masked >= 1, (name, pods)
    # the same canary alone on a line of a log, where the per-string check decides
    assert secret not in LineMasker(only).feed(text.encode() + b"\n").decode()


def test_prefilters_literal_escaped_in_json_and_unhinted_custom_patterns() -> None:
    # a JSON \u escape spells a detector's literal in other bytes: such a body is always parsed
    for pods in (1, 400):
        escaped = _pod_with("id AKIAIOSFODNN7EXAMPLE used", pods).replace(b"AKIA", b"\\u0041KIA")
        assert b"AKIA" not in escaped and D.could_match_body(escaped)
        assert b"IOSFODNN7EXAMPLE" not in Masker().mask_json(escaped).body
    # a case-insensitive detector also matches letters that fold to ASCII ones (the long s)
    folded = "aws_\u017fecret = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEXYZ"  # no other literal in it
    assert D.mask_text(folded)[1] >= 1 and "wJalrXUtnFEMI" not in D.mask_text(folded)[0]
    for pods in (1, 400):
        body = json.dumps(json.loads(_pod_with(folded, pods)), ensure_ascii=False).encode()
        assert D.could_detect(body) and b"wJalrXUtnFEMI" not in Masker().mask_json(body).body
    # a custom pattern has no literals: it is searched in every string of every body
    custom = DetectorSet([Detector("acme", r"ACME-(?P<value>[0-9A-F]{8})")])
    for pods in (1, 400):
        body = _pod_with("x ACME-DEADBEEF", pods)
        assert custom.could_match_body(body) and b"DEADBEEF" not in Masker(custom).mask_json(body).body
    # the shortest possible match is still searched: a string shorter than it cannot match
    assert D.min_length > 0 and all(len(DETECTED[n][0]) >= D.min_length for n in DETECTED)
    short = DetectorSet([Detector("pin", r"PIN\d{4}")])
    assert short.min_length == 7 and short.mask_text("PIN1234") == ("[masked:pin]", 1)
    assert short.mask_text("PIN123") == ("PIN123", 0)


def test_secret_words_in_names_reach_the_parse_in_big_bodies() -> None:
    pod = {"metadata": {"name": "api", "annotations": {"example.com/api-token": CANARY}},
           "spec": {"containers": [{"image": "nginx", "env": [{"name": "DB_PASSWD", "value": CANARY}]}]}}
    cm = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"CLIENT_CREDENTIALS": CANARY, "creds": CANARY, "PWD": CANARY}}
    for extra in (0, 400):
        filler = [{"metadata": {"name": f"p{i}"}, "spec": {"containers": [{"image": "nginx"}]}} for i in range(extra)]
        for body in (dumps({"kind": "PodList", "items": [*filler, pod]}), dumps({"kind": "ConfigMapList", "items": [cm], "x": filler})):
            assert D.could_match_body(body)
            out = Masker().mask_json(body)
            assert CANARY.encode() not in out.body and out.masked >= 1


def test_unreadable_json_is_an_error() -> None:
    with pytest.raises(MaskingError):
        Masker().mask_json(b'{"kind":"Secret","data":{"a":')


# -- streams ------------------------------------------------------------------------------------

def test_watch_event_split_across_chunks_is_masked() -> None:
    stream = b"".join(dumps({"type": "ADDED", "object": secret(f"s{i}")}) + b"\n" for i in range(3))
    stream += dumps({"type": "ERROR", "object": {"kind": "Status", "message": f"password={CANARY}"}}) + b"\n"
    for size in (1, 7, 50, len(stream)):
        watch = WatchMasker(Masker(), secrets=True)
        out = b"".join(watch.feed(stream[i:i + size]) for i in range(0, len(stream), size)) + watch.feed(b"")
        assert B64.encode() not in out and CANARY.encode() not in out
        assert [json.loads(line)["type"] for line in out.splitlines()] == ["ADDED", "ADDED", "ADDED", "ERROR"]
        assert watch.masked == 7


def test_watch_stream_bounded_and_fails_closed() -> None:
    watch = WatchMasker(Masker(), max_event=100)
    out = watch.feed(b'{"type":"ADDED","object":{"kind":"Secret","data":{"a":"' + b"x" * 200)
    assert json.loads(out)["type"] == "ERROR" and watch.feed(b'"}}}\n') == b""
    broken = WatchMasker(Masker())
    assert json.loads(broken.feed(b'{"kind":"Secret", nope\n'))["object"]["code"] == 502


def test_log_value_split_across_chunks_is_masked_and_lines_released_at_their_end() -> None:
    text = f"INFO environment: DB_HOST=db DB_PASSWORD={CANARY} LOG_LEVEL=info\nINFO ready\n".encode()
    for size in (1, 3, 16, len(text)):
        lines = LineMasker(D)
        pieces = [lines.feed(text[i:i + size]) for i in range(0, len(text), size)]
        out = b"".join(pieces) + lines.feed(b"")
        assert CANARY.encode() not in out and b"DB_HOST=db" in out and b"INFO ready\n" in out
    lines = LineMasker(D)
    assert lines.feed(b"first line\nsecond ") == b"first line\n"  # released at its end, the partial held
    assert lines.feed(b"") == b"second "


def test_log_private_key_block_across_lines_and_chunks() -> None:
    text = b"key:\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\nafter\n"
    lines = LineMasker(D)
    out = b"".join(lines.feed(text[i:i + 5]) for i in range(0, len(text), 5)) + lines.feed(b"")
    assert b"MIIEvQ" not in out and b"hkiG9w" not in out and b"after\n" in out and b"[masked:private-key]" in out


def test_line_memory_is_bounded() -> None:
    lines = LineMasker(D, max_line=100)
    out = lines.feed(b"x" * 250)
    assert len(out) >= 250 and lines.held == ""


def test_timed_flush_masks_the_rest_of_a_value_that_goes_on() -> None:
    lines = LineMasker(D)
    lines.feed(b"DB_PASSWORD=s3cr")
    assert lines.flush() == b"DB_PASSWORD=[masked:secret-pair]"
    assert lines.feed(b"3t-rest more\n") == b" more\n"


def test_exec_frames_split_value_masked_per_channel_v5_and_base64() -> None:
    session = ExecMasker(D, "v5.channel.k8s.io")
    assert session.frame(b"\x01DB_PASSWORD=" + CANARY[:5].encode()) == (1, b"")
    assert session.frame(b"\x02stderr line\n") == (2, b"stderr line\n")
    channel, out = session.frame(b"\x01" + CANARY[5:].encode() + b"\nnext")
    assert channel == 1 and CANARY[5:].encode() not in out and out.startswith(b"DB_PASSWORD=[masked:")
    assert session.frame(b"\x00input") == (None, None) and session.frame(b"\x03{}") == (None, None)
    assert session.finish() == [(1, b"next")]
    b64 = ExecMasker(D, "v4.base64.channel.k8s.io")
    channel, out = b64.frame("1" + base64.b64encode(f"token: {CANARY}\n".encode()).decode())
    assert channel == 1 and CANARY.encode() not in base64.b64decode(b64.encode(1, out)[1:])


# -- negotiation ----------------------------------------------------------------------------------

def test_accept_is_rewritten_away_from_protobuf_keeping_tables() -> None:
    kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
    assert json_accept(kubectl) == kubectl
    assert json_accept("application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json") == \
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    assert json_accept("application/vnd.kubernetes.protobuf;stream=watch") == "application/json"
    assert body_kind("application/json; charset=utf-8") == "json" and body_kind("text/plain") == "text"
    assert body_kind("application/vnd.kubernetes.protobuf") == "other"


# -- the addon on mitmproxy test flows ----------------------------------------------------------

def _addon():
    path = Path(__file__).resolve().parents[1] / "addons" / "masking.py"
    spec = importlib.util.spec_from_file_location("jitgate_addons_masking_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flow(path: str, body: bytes, content_type: str = "application/json", method: str = "GET"):
    from mitmproxy.test import tflow
    from jitgate.chain.flow import call_of
    from jitgate.kube.request_info import parse_request

    flow = tflow.tflow(resp=True)
    flow.request.method, flow.request.path = method, path
    flow.request.headers["Accept"] = "application/vnd.kubernetes.protobuf,application/json"
    call = call_of(flow)
    call.info = parse_request(method, path, {})
    call.allow("test")
    flow.response.headers["Content-Type"] = content_type
    flow.response.content = body
    return flow, call


def test_addon_masks_buffered_bodies_sets_header_and_annotation() -> None:
    from mitmproxy.test import taddons

    module = _addon()
    addon = module.Masking()
    with taddons.context(addon):
        flow, call = _flow("/api/v1/namespaces/dev/secrets/db", dumps(secret()))
        response, flow.response = flow.response, None  # not answered yet
        addon.request(flow)
        flow.response = response
        assert flow.request.headers["Accept"] == "application/json" and flow.request.headers["Accept-Encoding"] == "identity"
        addon.response(flow)
        assert B64.encode() not in flow.response.content
        assert flow.response.headers["X-Jitgate-Masked"] == "2" and call.annotations["jitgate.dev/masked"] == "2"

        flow, call = _flow("/api/v1/namespaces/dev/secrets/db", b"\x6b\x38\x73\x00protobuf", "application/vnd.kubernetes.protobuf")
        addon.response(flow)
        assert flow.response.status_code == 502 and b"could not be read for masking" in flow.response.content
        assert call.denied

        flow, call = _flow("/api/v1/namespaces/dev/pods/api/log", f"DB_PASSWORD={CANARY}\n".encode(), "text/plain")
        addon.response(flow)
        assert CANARY.encode() not in flow.response.content

        # a create of a Secret: forwarded as sent, but the request kept on the flow is masked
        flow, call = _flow("/api/v1/namespaces/dev/secrets", dumps(secret()), method="POST")
        flow.request.headers["Content-Type"] = "application/json"
        flow.request.content = dumps(secret())
        addon.response(flow)
        assert B64.encode() not in flow.request.content and B64.encode() not in flow.response.content


def test_addon_header_passes_rewrite_every_field_and_replace_the_clusters_count() -> None:
    from mitmproxy.test import taddons

    module = _addon()
    addon = module.Masking()
    with taddons.context(addon):
        flow, _call = _flow("/api/v1/namespaces/dev/pods/api", dumps({"kind": "Pod", "metadata": {"name": "api"}}))
        response, flow.response = flow.response, None
        flow.request.headers.add("accept", "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io")
        flow.request.headers["Accept-Encoding"] = "gzip, br"
        flow.request.headers.add("accept-encoding", "zstd")
        addon.request(flow)
        assert flow.request.headers.get_all("Accept") == ["application/json", "application/json;as=Table;v=v1;g=meta.k8s.io"]
        assert flow.request.headers.get_all("Accept-Encoding") == ["identity"]
        flow.response = response
        # a count the cluster sent must not pass as the gateway's: one header, ours
        flow.response.headers.add("x-jitgate-masked", "0")
        flow.response.content = dumps(secret())
        flow.response.headers["Content-Encoding"] = "identity"
        addon.response(flow)
        assert flow.response.headers.get_all("X-Jitgate-Masked") == ["2"] and B64.encode() not in flow.response.content


def test_addon_streams_watch_and_compressed_bodies() -> None:
    import gzip

    from mitmproxy.test import taddons

    module = _addon()
    addon = module.Masking()
    with taddons.context(addon):
        stream = b"".join(dumps({"type": "ADDED", "object": secret(f"s{i}")}) + b"\n" for i in range(2))
        flow, call = _flow("/api/v1/namespaces/dev/secrets?watch=true", b"")
        flow.response.headers["Content-Encoding"] = "gzip"
        flow.response.headers["X-Jitgate-Masked"] = "0"  # the cluster's own: replaced by ours
        flow.response.stream = True
        addon.responseheaders(flow)
        assert flow.response.headers.get_all("X-Jitgate-Masked") == ["stream"]
        fn = flow.response.stream
        packed = gzip.compress(stream)
        out = b"".join(fn(packed[i:i + 9]) for i in range(0, len(packed), 9)) + fn(b"")
        assert B64.encode() not in out and len(out.splitlines()) == 2 and "Content-Encoding" not in flow.response.headers
        assert call.annotations["jitgate.dev/masked"] == "4"


def test_reveal_grant_passes_values_and_is_annotated() -> None:
    from mitmproxy.test import taddons

    from jitgate.access.model import Grant
    from jitgate.access.scope import Scope

    module = _addon()
    addon = module.Masking()
    with taddons.context(addon):
        flow, call = _flow("/api/v1/namespaces/dev/secrets/db", dumps(secret()))
        scope = Scope("dev", ("dev",), False, ("secrets",), ("get",), reveal=True)
        call.grant = type("G", (), {"scope": scope})()
        addon.responseheaders(flow)
        addon.response(flow)
        assert B64.encode() in flow.response.content and call.annotations["jitgate.dev/revealed"] == "true"
    assert Grant  # the real model type exists; the call only reads grant.scope


def test_reveal_scope_rules_and_storage() -> None:
    from jitgate.access.scope import Scope

    plain = Scope("dev", ("dev",), False, ("secrets",), ("get",))
    reveal = Scope("dev", ("dev",), False, ("secrets",), ("get",), reveal=True)
    assert "reveal" not in plain.to_dict() and Scope.from_dict(reveal.to_dict()) == reveal
    assert reveal.contains(plain) and not plain.contains(reveal)
    assert "revealed" in reveal.describe()


# -- detector selection: the literal and `requires` filters never skip a detector that would match --

_FRAGMENTS = ["postgres://app:", "hunter2", "@db", "DB_PASSWORD", "=", ": ", "token", "x", "aws_secret_access_key",
              "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "Bearer ", "abcdef0123456789xyz", "eyJhbGciOiJSUzI1NiJ9.",
              "eyJzdWIiOiJ4In0.", "c2ln", "AKIAIOSFODNN7EXAMPLE", " ", "/", "'", '"', "apiKey", "-----BEGIN RSA PRIVATE KEY-----\n",
              "MIIE", "\n-----END RSA PRIVATE KEY-----", "containerd://", "0" * 40, "ſecret", "K", "é", "pass"]
# The patterns before their rewrite (lazy name prefix, backtracking runs): the rewritten ones must
# match exactly the same values.
_OLD_PAIR_NAME = r"(?<![A-Za-z0-9_.-])[A-Za-z0-9_.-]*?(?i:passw(?:or)?d|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)[A-Za-z0-9_.-]*"
_OLD = {
    "secret-pair": _OLD_PAIR_NAME + r"[\"']?[ \t]*[:=][ \t]*[\"']?(?P<value>(?!\[masked:)[^\s\"',;&]{3,})",
    "connection-string-password": r"[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"']+:(?P<value>[^\s@/\"']+)@",
}


def _reference_mask(detectors: DetectorSet, text: str) -> tuple[str, int]:
    """Every detector over the text, in order, with no filter: what mask_text must equal."""
    import re as _re

    count = 0
    for d in detectors.detectors:
        regex = _re.compile(_OLD.get(d.name, d.pattern))

        group = "value" if "value" in regex.groupindex else 0

        def replace(m, marker=d.marker, group=group):
            nonlocal count
            if m.group(group) == "":
                return m.group(0)
            count += 1
            s, e = m.start(group) - m.start(), m.end(group) - m.start()
            return m.group(0)[:s] + marker + m.group(0)[e:]

        text = regex.sub(replace, text)
    return text, count


def test_detector_filters_agree_with_running_every_detector() -> None:
    import random

    rng = random.Random(7)
    texts = [t for t, _ in DETECTED.values()]
    texts += ["".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 8))) for _ in range(4000)]
    hits = 0
    for text in texts:
        got = D.mask_text(text)
        assert got == _reference_mask(D, text), text
        hits += got[1] > 0
    assert hits > 500  # the corpus does exercise the detectors, not only the fast "no" path


def test_exec_command_query_values_are_masked_and_the_rest_kept() -> None:
    from jitgate.masking.targets import mask_command_query

    target = "/api/v1/namespaces/dev/pods/p/exec?command=env&command=DB_PASSWORD%3Ds3cr3t-prod&command=true&stdout=true"
    masked, n = mask_command_query(target, D)
    assert n == 1 and "s3cr3t-prod" not in masked
    assert masked.startswith("/api/v1/namespaces/dev/pods/p/exec?command=env&command=DB_PASSWORD%3D%5Bmasked%3Asecret-pair%5D")
    assert masked.endswith("&command=true&stdout=true")
    assert mask_command_query("/api/v1/namespaces/dev/pods/p/exec?command=ls", D) == ("/api/v1/namespaces/dev/pods/p/exec?command=ls", 0)


# Policy patterns and texts they match, some in other cases or split by the parser's factoring.
_CUSTOM = {
    r"exk_[A-Za-z0-9]{12}": ["exk_AbCdEf012345", "x=exk_000000000000;"],
    r"(?i)acme-(?:key|token)_(?P<value>[a-z0-9]{6})": ["ACME-KEY_abc123", "Acme-token_zzzzzz"],
    r"ghp_[A-Za-z0-9]{8}|github_pat_[A-Za-z0-9_]{8}": ["ghp_aaaaaaaa", "github_pat_bbbb_bbb"],
    r"(?:tok_)+(?P<value>\d{4})": ["tok_tok_1234"],
    r"ab?cdef(?P<value>\d{3})": ["acdef123", "abcdef999"],
    r"(?x) corp \s* - (?P<value> [0-9]{5})": ["corp-12345", "corp -54321"],
    r"(?s)BEGIN.(?P<value>.{4})END": ["BEGIN\nabcdEND"],
    r"(?P<value>[0-9a-f]{32})": ["0123456789abcdef0123456789abcdef"],  # no literal: no hints
    r"x(?i:secretive)(?P<value>\d+)": ["xSECRETIVE42"],  # scoped flags: no hints
}


def test_hints_derived_from_policy_patterns_are_in_every_match() -> None:
    from jitgate.masking.detectors import derived_hints

    import re as _re

    assert derived_hints(r"exk_[A-Za-z0-9]{12}") == ((), ("exk_",))
    assert derived_hints(r"(?i)acme-(?:key|token)_(?P<value>[a-z0-9]{6})") == (("acme-",), ())
    assert derived_hints(r"(?P<value>[0-9a-f]{32})") == ((), ())
    assert derived_hints(r"x(?i:secretive)(?P<value>\d+)") == ((), ())
    assert derived_hints(r"(?:tok_)*\d+") == ((), ())  # a repeat of zero may not hold it
    for pattern, texts in _CUSTOM.items():
        hints, exact = derived_hints(pattern)
        for text in texts:
            assert _re.search(pattern, text), (pattern, text)
            for m in _re.finditer(pattern, text):
                found = m.group(0)
                assert not (hints or exact) or any(h in found.lower() for h in hints) or any(h in found for h in exact), (pattern, found)


def test_custom_detectors_with_derived_hints_mask_what_running_every_detector_masks() -> None:
    import random

    from jitgate.masking.detectors import derived_hints

    custom = DetectorSet(list(BUILTIN) + [Detector(f"custom-{i}", p, "", *derived_hints(p)) for i, p in enumerate(_CUSTOM)])
    rng = random.Random(9)
    fragments = _FRAGMENTS + [t for texts in _CUSTOM.values() for t in texts] + ["exk_", "ACME-", "tok_", "corp", "-", "END"]
    hits = 0
    for _ in range(4000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 8)))
        got = custom.mask_text(text)
        assert got == _reference_mask(custom, text), text
        hits += got[1] > 0
    assert hits > 500


def test_a_policy_with_a_hinted_custom_detector_still_masks_pod_lists_without_a_parse(tmp_path, monkeypatch) -> None:
    import textwrap

    from jitgate.policy.document import Node
    from jitgate.policy.loader import _read_file
    from jitgate.policy.masking import parse_masking
    from scripts.bench import bodies

    # The policy file's own section, read as the loader reads it (where hints are derived).
    (tmp_path / "policy.yaml").write_text(textwrap.dedent("""
        masking:
          detectors:
            - name: example-api-key
              pattern: "exk_[A-Za-z0-9]{32}"
        """))
    root = Node(_read_file(tmp_path / "policy.yaml"), tmp_path / "policy.yaml", "")
    masker = Masker(parse_masking(root.child("masking")).detectors())
    assert masker.hits.usable  # without hints a custom detector sends every body to the object walk
    pods = [bodies.pod(i) for i in range(5)]
    pods[2]["spec"]["containers"][0]["args"] = ["--header", "X-Example: exk_" + "Q" * 32]  # only the custom one sees it
    body = json.dumps({"kind": "PodList", "items": pods}).encode()
    parsed = []
    monkeypatch.setattr("jitgate.masking.objects._decode", lambda text: parsed.append(1) or json.loads(text))
    result = masker.mask_json(body)
    assert b"Q" * 32 not in result.body and b"[masked:example-api-key]" in result.body and not parsed


def test_a_connection_string_glued_to_digits_is_masked() -> None:
    # Found by the custom-detector differential above: the backtracking-free rewrite of the pattern
    # started schemes only after a non-scheme character, so `54321postgres://...` passed unmasked.
    assert D.mask_text("id=54321postgres://app:hunter2@db:5432") == (
        "id=54321postgres://app:[masked:connection-string-password]@db:5432", 1)


def test_derived_hints_hold_only_characters_a_json_body_shows_as_written() -> None:
    from jitgate.masking.detectors import derived_hints

    # A newline, quote or backslash is escaped in JSON (`\n`, `\"`, `\\`): a hint holding one would
    # never be found in a body's bytes, and the detector would never run.
    hints, exact = derived_hints(r"BEGIN\nACME KEY(?P<value>[0-9]{6})")
    assert exact == ("ACME KEY",) and not hints
    assert derived_hints(r'x"quoted"y') == ((), ("quoted",))
    custom = DetectorSet([Detector("acme", r"BEGIN\nACME KEY(?P<value>[0-9]{6})", "", *derived_hints(r"BEGIN\nACME KEY(?P<value>[0-9]{6})"))])
    body = json.dumps({"kind": "ConfigMap", "data": {"cert": "BEGIN\nACME KEY123456"}}).encode()
    result = Masker(custom).mask_json(body)
    assert b"123456" not in result.body and result.masked == 1


def test_digit_strings_skip_the_detectors_only_while_no_literal_is_made_of_digits() -> None:
    from jitgate.masking.detectors import derived_hints

    assert D.digits_undetectable and not D.may_detect("123456789")
    card = DetectorSet(list(BUILTIN) + [Detector("card", r"4111(?P<value>\d{12})", "", *derived_hints(r"4111(?P<value>\d{12})"))])
    assert not card.digits_undetectable and card.may_detect("4111111111111111")
    assert card.mask_text("4111111111111111") == ("4111[masked:card]", 1)
    body = json.dumps({"kind": "ConfigMap", "data": {"n": "4111111111111111"}, "metadata": {"resourceVersion": "4111111111111111"}}).encode()
    result = Masker(card).mask_json(body)
    assert b"111111111111" not in result.body and result.masked == 2


def test_the_masker_reads_and_writes_json_as_the_json_module_does() -> None:
    import random

    from jitgate.masking import objects

    rng = random.Random(4)

    def value(depth: int = 0):
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return "".join(rng.choice('ab"\\é\n\u2028\x01 ') for _ in range(rng.randrange(6)))
        if kind == 1:
            return rng.choice([0, -3, 10**20, 1.5, -0.0, 1e300, True, False, None])
        if kind == 2:
            return rng.choice([float("nan"), float("inf")]) if rng.random() < 0.1 else "x"
        if kind in (3, 4):
            return rng.randrange(100)
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{rng.randrange(9)}": value(depth + 1) for _ in range(rng.randrange(5))}

    for _ in range(3000):
        v = value()
        text = json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        assert objects._encode(v) == text
        padded = rng.choice(["", " ", "\n\t "]) + json.dumps(v, indent=rng.choice([None, 1])) + rng.choice(["", "\n", " \r\n"])
        assert objects._encode(objects._decode(padded)) == text
    for bad in ("", "  ", "{", '{"a":1} x', "[1,]", '{"a":1}{"b":2}', "nul"):
        with pytest.raises(ValueError):
            json.loads(bad)
        with pytest.raises(ValueError):
            objects._decode(bad)
