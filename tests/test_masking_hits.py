"""Masking from where the secret words are (jitgate/masking/hits.py, _scan.c) gives what the object
walk gives, on every body: generated Kubernetes objects with secrets, secret-named env vars,
annotations and ConfigMap keys, last-applied configurations and detector-shaped values placed at
random, serialised compactly, with spaces and indented, with escapes and non-ASCII text."""

from __future__ import annotations

import base64
import json
import random
import shutil

import pytest

from jitgate.masking import hits as hits_module
from jitgate.masking.hits import NAMED_MAPS, HitScanner, py_string_hits
from jitgate.masking.objects import Masker, MaskingError

try:
    from jitgate.masking._scan import string_hits as c_string_hits
except ImportError:  # pragma: no cover - the extension is built by `pip install -e .`
    c_string_hits = None

WORDS = ["web", "api", "token", "path", "secret", "Secret", "key", "password", "DB_PASSWORD", "LOG_LEVEL", "name",
         "value", "kind", "data", "annotations", "serviceAccountToken", "secretKeyRef", "apiKey", "monkey", "pass",
         "creds", "bearer", "x", "é", "ſecret", "日本", 'quote"inside', "back\\slash", "new\nline", "/var/run/secrets/x"]
VALUES = ["info", "nginx:1.27", "AKIAIOSFODNN7EXAMPLE", "postgres://app:hunter2@db:5432/app", "Bearer abcdef0123456789xyz",
          "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "password=s3cr3t-prod", "token: t0k3n-value", "plain",
          "containerd://" + "0" * 40, "", "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
          "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "canary-7f3e"]


def _value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        return rng.choice(VALUES + WORDS) if rng.random() < 0.8 else rng.choice([1, 2.5, True, None, False])
    if roll < 0.7:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(WORDS): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _object(rng: random.Random):
    shape = rng.randrange(9)
    meta = {"name": rng.choice(["a", "db", "api-token"]), "namespace": "dev"}
    if rng.random() < 0.5:
        meta["annotations"] = {rng.choice(WORDS + ["example.com/api-token", "note"]): rng.choice(VALUES) for _ in range(rng.randint(0, 3))}
    if rng.random() < 0.2:
        applied = {"kind": rng.choice(["Secret", "ConfigMap", "Pod"]), "data": {"k": rng.choice(VALUES)}}
        meta.setdefault("annotations", {})["kubectl.kubernetes.io/last-applied-configuration"] = json.dumps(applied) + "\n"
    env = [{"name": rng.choice(["LOG_LEVEL", "DB_PASSWORD", "API_TOKEN", "HOME"]),
            **({"value": rng.choice(VALUES)} if rng.random() < 0.6 else
               {"valueFrom": {"secretKeyRef": {"name": "db", "key": rng.choice(["password", "user"])}}})}
           for _ in range(rng.randint(0, 3))]
    pod = {"kind": "Pod", "metadata": meta, "spec": {
        "containers": [{"name": "web", "image": "nginx", "env": env, "args": [rng.choice(VALUES)]}],
        "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]}, "extra": _value(rng)}
    if shape == 0:
        return {"kind": "Secret", "metadata": meta, "data": {"password": base64.b64encode(b"canary").decode()}}
    if shape == 1:
        return {"kind": "ConfigMap", "metadata": meta, "data": {rng.choice(["DB_PASSWORD", "app.properties", "token"]): rng.choice(VALUES)}}
    if shape == 2:
        return {"kind": "PodList", "items": [pod, pod]}
    if shape == 3:
        return {"type": "ADDED", "object": pod}
    if shape == 4:
        return {"kind": "Table", "rows": [{"cells": [rng.choice(VALUES), "x"], "object": pod}]}
    if shape == 5:
        return {"kind": "List", "items": [pod, {"kind": "Secret", "metadata": meta, "data": {"k": "Y2FuYXJ5"}}]}
    if shape == 6:
        return _value(rng)
    return pod


def _dump(rng: random.Random, obj) -> bytes:
    style = rng.randrange(4)
    if style == 0:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    elif style == 1:
        text = json.dumps(obj, ensure_ascii=False)
    elif style == 2:
        text = json.dumps(obj, indent=rng.choice([1, 2, "\t"]), ensure_ascii=False)
    else:
        text = json.dumps(obj, separators=(" , ", " : "), ensure_ascii=rng.random() < 0.3)
    return text.encode()


def _bodies(n: int, seed: int = 11):
    rng = random.Random(seed)
    return [_dump(rng, _object(rng)) for _ in range(n)]


# The extension is optional only where no C compiler exists (pyproject: optional = true); where one
# does, a missing build fails the tests below instead of skipping them.
needs_c_scanner = pytest.mark.skipif(
    c_string_hits is None and shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler on this machine, so the optional C scanner could not be built")
BUILT = "a C compiler is here but jitgate.masking._scan was not built (pip install -e .)"


@needs_c_scanner
def test_the_c_scanner_and_its_python_twin_agree() -> None:
    assert c_string_hits is not None, BUILT
    scanner = HitScanner(Masker().detectors)
    bodies = _bodies(3000) + [b'"a\\\\"', b'{"k":"x\\"token\\"y"}', b'{"a" :  "token"}', b'["token"]', b'"token', b'{"x\\u0074oken":1}',
                              b'{"q\\\\":"key"}', b'{"a":{"b":[{"token":1}]}}', b'{"annotations":{"api-token":"v"}}']
    for body in bodies:
        assert c_string_hits(body, scanner.lowered, scanner.exact, 4096) == py_string_hits(body, scanner.lowered, scanner.exact, 4096), body
    # Passing over what is known: the same values remembered by a masker that saw every body once
    # (env names that say secret among them), and the same hits left, or the same None, from both.
    learned = Masker()
    for body in bodies:
        try:
            learned.mask_json(body)
        except MaskingError:
            pass  # the few that are no JSON
    clean = learned.hits.clean
    assert any(clean.values()) and not all(clean.values())
    left = 0
    for body in bodies:
        c_hits = c_string_hits(body, scanner.lowered, scanner.exact, 4096, NAMED_MAPS, clean)
        assert c_hits == py_string_hits(body, scanner.lowered, scanner.exact, 4096, NAMED_MAPS, clean), body
        left += c_hits is not None and len(c_hits) < len(c_string_hits(body, scanner.lowered, scanner.exact, 4096) or ())
    assert left > 500, left
    for scan in (c_string_hits, py_string_hits):  # the two go together, and `clean` is a dict
        with pytest.raises(TypeError):
            scan(b'{"a":"token"}', scanner.lowered, scanner.exact, 64, NAMED_MAPS)
    with pytest.raises(TypeError):
        c_string_hits(b'{"a":"token"}', scanner.lowered, scanner.exact, 64, NAMED_MAPS, [])


@pytest.mark.parametrize("native", [True, False])
def test_masking_from_the_hits_gives_what_the_walk_gives(native: bool) -> None:
    fast, walk = Masker(), Masker()
    fast.hits = HitScanner(fast.detectors, native=native)
    walk.hits.usable = False
    taken = changed = 0
    for body in _bodies(2500, seed=5 if native else 6):
        expected = walk.mask_json(body)
        got = fast.mask_json(body)
        assert json.loads(got.body) == json.loads(expected.body), body
        assert got.masked == expected.masked, body
        if fast.hits.scan(body) is not None:
            taken += 1
            changed += got.masked > 0
    # The generated bodies do exercise the path: many are decided from the hits, some of them masked.
    assert taken > 400 and changed > 100, (taken, changed)


def test_what_needs_the_walk_is_never_decided_from_the_hits() -> None:
    scanner = Masker().hits
    secret = base64.b64encode(b"canary").decode()
    for body in [
        json.dumps({"kind": "Secret", "data": {"a": secret}}),
        json.dumps({"kind"   : "Secret", "data": {"a": secret}}, indent=8),
        json.dumps({"metadata": {"annotations": {"example.com/api-token": "v"}}}),
        json.dumps({"kind": "ConfigMap", "data": {"DB_PASSWORD": "v"}}),
        json.dumps({"env": [{"name": "DB_PASSWORD", "value": "v"}]}),
        json.dumps({"env": [{"value": "v", "name": "DB_PASSWORD"}]}),
        json.dumps({"metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": '{"kind":"Secret"}'}}}),
        '{"x\\u0074oken": "a"}',
        json.dumps({"a": "ſecret=value"}, ensure_ascii=False),
    ]:
        assert scanner.scan(body.encode()) is None, body


def test_a_pod_list_is_decided_from_the_hits_without_a_parse(monkeypatch) -> None:
    from scripts.bench import bodies

    body = json.dumps({"kind": "PodList", "items": [bodies.pod(i) for i in range(20)]}, separators=(",", ":")).encode()
    masker = Masker()
    parsed = []
    monkeypatch.setattr("jitgate.masking.objects._decode", lambda text: parsed.append(1) or json.loads(text))
    result = masker.mask_json(body)
    assert result.body == body and result.masked == 0 and not parsed
    assert hits_module._c_string_hits is None or masker.hits.string_hits is hits_module._c_string_hits


@needs_c_scanner
def test_the_c_scanner_rebuilds_its_pair_table_for_other_literals() -> None:
    assert c_string_hits is not None, BUILT
    # The table of pairs a literal can start with is kept between calls for the same literal tuples;
    # other tuples (another policy, a test's own) must never be judged by a stale one.
    body = b'{"A":"SeCrEt","b":"xq","c":"Pass","d":"k"}'
    sets = [((b"secret",), ()), ((b"q",), (b"Pa",)), ((), (b"k",)), ((b"secret",), ()), ((b"x", b"pass"), ())]
    for _ in range(3):
        for lowered, exact in sets:
            assert c_string_hits(body, lowered, exact, 64) == py_string_hits(body, lowered, exact, 64), (lowered, exact)
    # Equal tuples that are other objects give the same answers too.
    assert c_string_hits(body, tuple([b"sec" + b"ret"]), (), 64) == [(5, 12, 0, 1, 3)]


def test_values_remembered_across_bodies_are_only_those_passed_unmasked() -> None:
    masker = Masker()
    secret = "postgres://app:" + "canary-pw-7781" + "@db:5432/app"
    body = json.dumps({"kind": "PodList", "items": [
        {"metadata": {"name": f"p{i}"}, "spec": {"containers": [{"image": "x", "args": ["--db", secret],
                                                                  "volumeMounts": [{"mountPath": "/var/run/secrets/x"}]}]}}
        for i in range(3)]}).encode()
    for _ in range(3):  # the second and third pass use what the first remembered
        result = masker.mask_json(body)
        assert b"canary-pw-7781" not in result.body and result.masked == 3
    remembered = masker.hits.clean
    assert remembered and b'"mountPath": "/var/run/secrets/x"' in remembered
    assert not any(b"canary-pw-7781" in span for span in remembered)
    masker.mask_json(json.dumps({"k" * 1000: "/var/run/secrets/x", "a": "/var/run/secrets/" + "y" * 1000}).encode())
    assert max(map(len, masker.hits.clean)) <= hits_module.CLEAN_SPAN_MAX  # neither a long key nor a long value kept
    for i in range(hits_module.CLEAN_VALUES + 10):  # bounded: past the limit it starts over
        masker.mask_json(json.dumps({"a": f"/var/run/secrets/{i}"}).encode())
    assert 0 < len(masker.hits.clean) <= hits_module.CLEAN_VALUES


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_c_scanner), False])
def test_a_pod_list_seen_before_leaves_no_hit_to_look_at(native: bool) -> None:
    from scripts.bench import bodies

    body = json.dumps({"kind": "PodList", "items": [bodies.pod(i) for i in range(20)]}).encode()
    masker = Masker()
    masker.hits = scanner = HitScanner(masker.detectors, native=native)
    assert not native or hits_module._c_string_hits is not None, BUILT
    assert masker.mask_json(body).masked == 0
    everything = scanner.string_hits(body, scanner.lowered, scanner.exact, 4096)
    assert len(everything) >= 100  # secretKeyRef, DB_PASSWORD, "path": "token", /var/run/secrets, ...
    assert scanner.string_hits(body, scanner.lowered, scanner.exact, 4096, NAMED_MAPS, scanner.clean) == []
    # The next pod list differs where lists do (names, ids, versions): the new values are looked at once.
    other = body.replace(b"web-7c9d8f6b5", b"api-5b6c7d8e9").replace(b"containerd://0", b"containerd://1")
    left = scanner.string_hits(other, scanner.lowered, scanner.exact, 4096, NAMED_MAPS, scanner.clean)
    assert left and all(b"containerd://1" in other[s:e] for s, e, *_ in left), left
    assert masker.mask_json(other).masked == 0
    assert scanner.string_hits(other, scanner.lowered, scanner.exact, 4096, NAMED_MAPS, scanner.clean) == []


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_c_scanner), False])
def test_an_env_name_known_clean_is_looked_at_again_when_its_var_has_a_value(native: bool) -> None:
    # `DB_PASSWORD` taken from a Secret is remembered as clean, and as a name that says secret: the
    # same name with a value of its own (after it, or before it) must still have that value masked.
    masker = Masker()
    masker.hits = scanner = HitScanner(masker.detectors, native=native)
    assert not native or hits_module._c_string_hits is not None, BUILT
    ref = {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
    first = json.dumps({"kind": "Pod", "spec": {"containers": [{"name": "web", "env": [ref]}]}}).encode()
    assert masker.mask_json(first).masked == 0 and scanner.clean.get(b'"name": "DB_PASSWORD"') is True
    for env in ({"name": "DB_PASSWORD", "value": "canary-env-5521"}, {"value": "canary-env-5521", "name": "DB_PASSWORD"},
                {"name": "DB_PASSWORD", "x": {"y": [1]}, "value": "canary-env-5521"}):
        body = json.dumps({"kind": "Pod", "spec": {"containers": [{"name": "web", "env": [ref, env]}]}}).encode()
        assert scanner.scan(body) is None, env
        result = masker.mask_json(body)
        assert b"canary-env-5521" not in result.body and result.masked == 1, env
    # A known name whose object cannot be read back within the window: the walk decides too.
    env = {"value": "canary-env-5521", "pad": "p" * 9000, "name": "DB_PASSWORD"}
    far = json.dumps({"kind": "Pod", "spec": {"containers": [{"name": "web", "env": [ref, env]}]}}).encode()
    assert scanner.scan(far) is None
    assert b"canary-env-5521" not in masker.mask_json(far).body


def test_strings_remembered_across_bodies_by_the_walk_are_only_clean_ones() -> None:
    masker = Masker()
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    for i in range(3):
        body = json.dumps({"type": "MODIFIED", "object": {"kind": "Secret", "metadata": {
            "name": f"s{i}", "annotations": {"note": token}}, "data": {"k": "dg=="}}}).encode()
        result = masker.mask_json(body, secrets=True)
        assert token.encode() not in result.body and b"dg==" not in result.body and result.masked == 2
    assert "Secret" in masker.clean and token not in masker.clean and not any("eyJ" in s for s in masker.clean)


def test_an_escaped_slash_is_never_read_past_by_the_byte_scans() -> None:
    # `\/` is JSON for `/`: a connection string written `postgres:\/\/...` holds the `://` literal
    # only once decoded, so the scans must not decide from its bytes (Go and Python never write it,
    # any other producer may).
    body = b'{"kind": "ConfigMap", "data": {"url": "postgres:\\/\\/app:hunter2pw@db:5432\\/app"}}'
    scanner = Masker().hits
    assert py_string_hits(body, scanner.lowered, scanner.exact, 64) is None
    if c_string_hits is not None:
        assert c_string_hits(body, scanner.lowered, scanner.exact, 64) is None
    assert Masker().detectors.could_match_body(body)
    result = Masker().mask_json(body)
    assert b"hunter2pw" not in result.body and result.masked == 1
