"""The Kubernetes API stand-in, driven by the real kubectl over TLS and by plain HTTPS requests."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import queue
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from testkit.net import TestCA
from testkit.standin.auth import AuthError, DenyRule, parse_eks_token
from testkit.standin.container import Container, ProcessIO, Shell, ShellExit
from testkit.standin.errors import ApiError
from testkit.standin.patch import json_patch, merge_patch, strategic_merge_patch
from testkit.standin.process import (
    KUBECTL,
    StandinProcess,
    TerminalSession,
    kubectl_env,
    run_kubectl,
    token_sha256,
)
from testkit.standin.seed import SECRET_VALUES
from testkit.standin.selectors import field_matcher, label_matcher

TOKEN = "gateway-token-5f1c"
OTHER_TOKEN = "second-token-77aa"
EKS_CLUSTER = "dev-cluster"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("standin")


@pytest.fixture(scope="module")
def ca(dirs) -> TestCA:
    return TestCA.create(dirs / "ca")


@pytest.fixture(scope="module")
def client_ca(dirs) -> TestCA:
    return TestCA.create(dirs / "client-ca", name="jitgate test client CA")


@pytest.fixture(scope="module")
def api(ca, client_ca, dirs):
    standin = StandinProcess(dirs / "run").start(
        ca, tokens=[TOKEN, OTHER_TOKEN], eks_cluster=EKS_CLUSTER, client_ca=client_ca.cert_path,
        hostnames=["api.dev.jitgate.test"], log_interval=0.2, bookmark_interval=0.5,
        deny=["user=alice,verb=delete", "user=bob,resource=secrets"],
    )
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def kubeconfig(api, dirs) -> Path:
    return api.write_kubeconfig(dirs / "kubeconfig", token=TOKEN)


def kubectl(kubeconfig: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_kubectl(kubeconfig, *args, **kwargs)


def ok(kubeconfig: Path, *args: str, **kwargs) -> str:
    return run_kubectl(kubeconfig, *args, check=True, **kwargs).stdout


def eks_token(cluster: str = EKS_CLUSTER, signed_header: bool = True) -> str:
    session = boto3.Session(aws_access_key_id="ASIAEXAMPLEKEY", aws_secret_access_key="secret",
                            aws_session_token="session", region_name="eu-west-1")
    sts = session.client("sts", endpoint_url="https://sts.eu-west-1.amazonaws.com")
    if signed_header:
        sts.meta.events.register("before-sign.sts.GetCallerIdentity",
                                 lambda request, **_: request.headers.__setitem__("x-k8s-aws-id", cluster))
    url = sts.generate_presigned_url("get_caller_identity", Params={}, ExpiresIn=60, HttpMethod="GET")
    return "k8s-aws-v1." + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


def reencode(token: str, old: str, new: str) -> str:
    payload = token[len("k8s-aws-v1."):]
    url = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode().replace(old, new)
    return "k8s-aws-v1." + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


class LineReader:
    """Lines of a process's stdout (or any file), collected by a thread so tests can wait with timeouts."""

    def __init__(self, stream):
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.put(raw.decode(errors="replace"))

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if text in line:
                return line
        raise AssertionError(f"no line containing {text!r} within {timeout}s")


def watch_events(api: StandinProcess, path: str, accept: str = "application/json") -> list[dict]:
    """Read a (short, timeoutSeconds-bounded) watch stream to its end."""
    req = urllib.request.Request(api.url + path, headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept})
    with urllib.request.urlopen(req, context=api.ssl_context(), timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return [json.loads(line) for line in resp if line.strip()]


# kubectl: reading --------------------------------------------------------------------------------

def test_get_across_namespaces(kubeconfig):
    out = ok(kubeconfig, "get", "pods", "-A")
    header = out.splitlines()[0].split()
    assert header == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    rows = {tuple(line.split()[:2]) for line in out.splitlines()[1:]}
    assert {("default", "nginx"), ("prod", "api"), ("prod", "worker"), ("dev", "toolbox")} <= rows
    assert sum(1 for ns, name in rows if ns == "dev" and name.startswith("web-")) == 2
    assert "Running" in out

    namespaces = ok(kubeconfig, "get", "ns", "-o", "name").split()
    assert {"namespace/default", "namespace/kube-system", "namespace/dev", "namespace/prod"} <= set(namespaces)
    secrets = ok(kubeconfig, "get", "secrets", "-n", "prod")
    assert secrets.splitlines()[0].split() == ["NAME", "TYPE", "DATA", "AGE"]
    assert "db-credentials" in secrets and "Opaque" in secrets
    deploy = ok(kubeconfig, "get", "deploy", "-n", "dev")
    assert deploy.splitlines()[1].split()[:4] == ["web", "2/2", "2", "2"]
    wide = ok(kubeconfig, "get", "pods", "-n", "prod", "-o", "wide")
    assert "IP" in wide.splitlines()[0] and "standin-node" in wide
    password = ok(kubeconfig, "get", "secret", "db-credentials", "-n", "dev", "-o", "jsonpath={.data.password}")
    assert base64.b64decode(password).decode() == SECRET_VALUES["dev"]["password"]
    listed = json.loads(ok(kubeconfig, "get", "cm", "-n", "prod", "-l", "app=config", "-o", "json"))
    assert [i["metadata"]["name"] for i in listed["items"]] == ["app-config"]


def test_describe_pod(kubeconfig):
    out = ok(kubeconfig, "describe", "pod", "api", "-n", "prod")
    assert "Name:             api" in out
    assert "Namespace:        prod" in out
    assert "Status:           Running" in out
    assert "<set to the key 'password' in secret 'db-credentials'>" in out
    assert "Started container api" in out


# kubectl: writing --------------------------------------------------------------------------------

MANIFEST = """
apiVersion: v1
kind: ConfigMap
metadata:
  name: applied
  namespace: dev
data:
  key: "{value}"
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: applied
  namespace: dev
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: applied}}}}
  template:
    metadata: {{labels: {{app: applied}}}}
    spec:
      containers:
      - name: main
        image: busybox:1.36
"""


def test_apply_label_delete(kubeconfig, dirs):
    manifest = dirs / "applied.yaml"
    manifest.write_text(MANIFEST.format(value="one", replicas=1))
    assert ok(kubeconfig, "apply", "-f", str(manifest)).split("\n")[:2] == [
        "configmap/applied created", "deployment.apps/applied created"]
    manifest.write_text(MANIFEST.format(value="two", replicas=3))
    applied = kubectl(kubeconfig, "apply", "-f", str(manifest))
    assert applied.returncode == 0 and applied.stderr == ""
    assert "configmap/applied configured" in applied.stdout
    assert ok(kubeconfig, "get", "cm", "applied", "-n", "dev", "-o", "jsonpath={.data.key}") == "two"
    pods = ok(kubeconfig, "get", "pods", "-n", "dev", "-l", "app=applied", "-o", "name").split()
    assert len(pods) == 3

    assert ok(kubeconfig, "label", "cm", "applied", "-n", "dev", "team=blue").strip() == "configmap/applied labeled"
    assert ok(kubeconfig, "get", "cm", "-n", "dev", "-l", "team=blue", "-o", "name").split() == ["configmap/applied"]
    again = kubectl(kubeconfig, "create", "-f", str(manifest))
    assert 'Error from server (AlreadyExists): error when creating "' in again.stderr
    assert 'configmaps "applied" already exists' in again.stderr

    deleted = ok(kubeconfig, "delete", "-f", str(manifest))
    assert 'configmap "applied" deleted' in deleted
    gone = kubectl(kubeconfig, "get", "cm", "applied", "-n", "dev")
    assert gone.returncode == 1
    assert gone.stderr.strip() == 'Error from server (NotFound): configmaps "applied" not found'
    assert ok(kubeconfig, "get", "pods", "-n", "dev", "-l", "app=applied", "-o", "name").strip() == ""


def test_server_side_apply_and_scale(kubeconfig, dirs):
    manifest = dirs / "ssa.yaml"
    manifest.write_text(MANIFEST.format(value="ssa", replicas=1).replace("name: applied", "name: ssa"))
    out = ok(kubeconfig, "apply", "--server-side", "-f", str(manifest))
    assert "configmap/ssa serverside-applied" in out
    assert ok(kubeconfig, "scale", "deploy/ssa", "-n", "dev", "--replicas=2").strip() == "deployment.apps/ssa scaled"
    assert ok(kubeconfig, "get", "deploy", "ssa", "-n", "dev", "-o", "jsonpath={.status.readyReplicas}") == "2"
    ok(kubeconfig, "delete", "-f", str(manifest))


# kubectl: streams ---------------------------------------------------------------------------------

def test_watch_sees_create_from_another_client(api, kubeconfig):
    proc = subprocess.Popen([KUBECTL, "get", "pods", "-n", "default", "-w"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=kubectl_env(kubeconfig))
    try:
        reader = LineReader(proc.stdout)
        reader.wait_for("nginx", 10)
        # Created after kubectl printed its list: only the watch, still open, can deliver it (from
        # the list's resourceVersion, so it does not matter whether kubectl is watching yet).
        code, body = api.json("POST", "/api/v1/namespaces/default/pods", {
            "metadata": {"name": "watched"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        assert code == 201, body
        line = reader.wait_for("watched", 10)
        assert line.split()[:3] == ["watched", "1/1", "Running"]
        assert api.json("DELETE", "/api/v1/namespaces/default/pods/watched")[0] == 200
        assert "Terminating" in reader.wait_for("watched", 3)
    finally:
        proc.terminate()
        proc.wait(5)


def test_logs_and_follow(kubeconfig):
    logs = ok(kubeconfig, "logs", "api", "-n", "prod")
    assert logs.splitlines()[0] == "INFO [api/api] starting ghcr.io/example/api:2.3.1 in namespace prod"
    assert f"DB_PASSWORD={SECRET_VALUES['prod']['password']}" in logs
    assert ok(kubeconfig, "logs", "api", "-n", "prod", "--tail=1").strip() == "INFO [api/api] GET /healthz 200 (6)"

    proc = subprocess.Popen([KUBECTL, "logs", "-f", "nginx", "--tail=1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=kubectl_env(kubeconfig))
    try:
        reader = LineReader(proc.stdout)
        reader.wait_for("GET /healthz 200 (6)", 5)
        reader.wait_for("heartbeat 1", 2)
        reader.wait_for("heartbeat 3", 2)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(5)


def test_exec(kubeconfig):
    assert ok(kubeconfig, "exec", "nginx", "--", "echo", "hi", "there") == "hi there\n"
    assert ok(kubeconfig, "exec", "-i", "nginx", "--", "cat", input="line one\nline two\n") == "line one\nline two\n"
    assert ok(kubeconfig, "exec", "nginx", "--", "cat", "/etc/hostname") == "nginx\n"
    env = ok(kubeconfig, "exec", "-n", "prod", "api", "--", "env")
    assert "HOSTNAME=api\n" in env and f"DB_PASSWORD={SECRET_VALUES['prod']['password']}\n" in env
    assert ok(kubeconfig, "exec", "-n", "dev", "toolbox", "-c", "shell", "--", "sh", "-c",
              'echo "$GREETING" > /tmp/g; cat /tmp/g | wc -l') == "1\n"

    failed = kubectl(kubeconfig, "exec", "nginx", "--", "sh", "-c", "echo partial; exit 3")
    assert failed.returncode == 3
    assert failed.stdout == "partial\n"
    assert "command terminated with exit code 3" in failed.stderr
    missing = kubectl(kubeconfig, "exec", "nginx", "--", "no-such-tool")
    assert missing.returncode == 1
    assert 'exec: "no-such-tool": executable file not found in $PATH' in missing.stderr


def test_interactive_shell(kubeconfig):
    session = TerminalSession([KUBECTL, "exec", "-it", "-n", "prod", "api", "--", "sh"], kubectl_env(kubeconfig))
    try:
        session.expect(b"api:/# ")
        session.type(b"echo hello $HOSTNAME")
        session.expect(b"hello api\r\n")
        session.type(b"cd /etc/app; cat LOG_LEVEL")
        session.expect(b"info")
        session.type(b"exit 7")
        assert session.proc.wait(10) == 7
        session.expect(b"command terminated with exit code 7")
    finally:
        session.close()


# kubectl: refusals --------------------------------------------------------------------------------

def test_error_messages(kubeconfig, dirs):
    missing = kubectl(kubeconfig, "get", "pod", "nope")
    assert missing.stderr.strip() == 'Error from server (NotFound): pods "nope" not found'
    deploy = kubectl(kubeconfig, "get", "deploy", "nope", "-n", "dev")
    assert deploy.stderr.strip() == 'Error from server (NotFound): deployments.apps "nope" not found'
    denied = kubectl(kubeconfig, "delete", "pod", "nginx", "--as", "alice")
    assert denied.returncode == 1
    assert denied.stderr.strip() == ('Error from server (Forbidden): pods "nginx" is forbidden: User "alice" cannot '
                                     'delete resource "pods" in API group "" in the namespace "default"')
    listing = kubectl(kubeconfig, "get", "secrets", "-n", "dev", "--as", "bob")
    assert listing.stderr.strip() == ('Error from server (Forbidden): secrets is forbidden: User "bob" cannot list '
                                      'resource "secrets" in API group "" in the namespace "dev"')
    assert kubectl(kubeconfig, "auth", "can-i", "delete", "pods", "--as", "alice").stdout.startswith("no")
    assert kubectl(kubeconfig, "auth", "can-i", "get", "pods", "--as", "alice").stdout.strip() == "yes"
    assert "alice" in ok(kubeconfig, "auth", "whoami", "--as", "alice")
    no_ns = kubectl(kubeconfig, "create", "configmap", "x", "-n", "nowhere")
    assert no_ns.stderr.strip() == 'error: failed to create configmap: namespaces "nowhere" not found'


def test_wrong_token_is_unauthorized(api, dirs):
    bad = api.write_kubeconfig(dirs / "bad-kubeconfig", token="not-the-token")
    out = run_kubectl(bad, "get", "pods")
    assert out.returncode == 1
    # Discovery fails first, so kubectl words it as a real cluster's 401 makes it do.
    assert "error: You must be logged in to the server" in out.stderr
    seen = [r for r in api.requests_seen() if r["token_sha256"] == token_sha256("not-the-token")]
    assert seen and all(r["auth_kind"] == "rejected" and r["status"] == 401 for r in seen)
    code, body = api.json("GET", "/api/v1/pods", token=None)
    assert code == 401 and body["reason"] == "Unauthorized" and body["kind"] == "Status"


def test_request_record(api, kubeconfig):
    api.clear_seen()
    ok(kubeconfig, "get", "pods", "-n", "dev", "--as", "alice", "--as-group", "devs", "--as-group", "qa")
    seen = api.requests_seen()
    assert seen, "nothing recorded"
    get = next(r for r in seen if r["path"] == "/api/v1/namespaces/dev/pods")
    assert get["auth_kind"] == "token" and get["token_sha256"] == token_sha256(TOKEN)
    assert get["impersonate_user"] == "alice"
    assert get["impersonate_groups"] == ["devs", "qa"]
    assert get["user_agent"].startswith("kubectl/")
    assert "Authorization" not in get["headers"] and TOKEN not in json.dumps(seen)
    assert get["status"] == 200 and "as=Table" in get["headers"]["Accept"]
    api.clear_seen()
    assert api.requests_seen() == []
    assert api.json("GET", "/_standin/requests", token=None)[0] == 401


# Direct HTTP: authentication -------------------------------------------------------------------------

def test_eks_token_shape(api):
    token = eks_token()
    code, body = api.json("GET", "/api/v1/namespaces/dev/pods", token=token)
    assert code == 200 and body["kind"] == "PodList"
    record = [r for r in api.requests_seen() if r["token_sha256"] == token_sha256(token)][-1]
    assert record["auth_kind"] == "eks"
    assert record["eks"]["access_key_id"] == "ASIAEXAMPLEKEY" and record["eks"]["region"] == "eu-west-1"
    assert record["eks"]["cluster"] == EKS_CLUSTER and record["eks"]["session_token"] is True

    old = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 16 * 60))
    stale = reencode(token, _amz_date(token), old)
    assert api.json("GET", "/api/v1/pods", token=stale)[0] == 401
    assert api.json("GET", "/api/v1/pods", token=eks_token(signed_header=False))[0] == 401
    assert api.json("GET", "/api/v1/pods", token=reencode(token, "GetCallerIdentity", "GetSessionToken"))[0] == 401
    assert api.json("GET", "/api/v1/pods", token="k8s-aws-v1.!!!")[0] == 401


def _amz_date(token: str) -> str:
    payload = token[len("k8s-aws-v1."):]
    url = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    return url.split("X-Amz-Date=")[1].split("&")[0]


def test_client_certificate(api, client_ca, ca, dirs):
    cert, key = client_ca.issue("carol", hosts=[], client=True)
    code, body = api.json("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                          {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                          token=None, client_cert=cert, client_key=key)
    assert code == 201 and body["status"]["userInfo"]["username"] == "carol"
    record = api.requests_seen()[-1]
    assert record["auth_kind"] == "cert" and record["cert_subject"] == "CN=carol"
    # A certificate from any other CA does not get through the TLS handshake.
    stranger_cert, stranger_key = ca.issue("mallory", hosts=[], client=True)
    with pytest.raises((ssl.SSLError, OSError)):
        api.request("GET", "/api/v1/pods", token=None, client_cert=stranger_cert, client_key=stranger_key)


# Direct HTTP: API semantics ---------------------------------------------------------------------------

def test_discovery(api):
    code, core = api.json("GET", "/api/v1")
    assert code == 200 and core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods"]["shortNames"] == ["po"] and by_name["pods"]["namespaced"] is True
    assert by_name["namespaces"]["namespaced"] is False and by_name["configmaps"]["shortNames"] == ["cm"]
    assert {"pods/log", "pods/exec", "pods/attach", "pods/portforward", "pods/status"} <= set(by_name)
    assert api.json("GET", "/apis")[1]["groups"][0]["name"] == "apps"
    apps = {r["name"] for r in api.json("GET", "/apis/apps/v1")[1]["resources"]}
    assert {"deployments", "deployments/status", "deployments/scale"} <= apps
    code, headers, raw = api.request("GET", "/apis", headers={
        "Accept": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"})
    assert headers["Content-Type"] == "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    assert json.loads(raw)["items"][0]["metadata"]["name"] == "apps"
    assert api.json("GET", "/version")[1]["major"] == "1"


def test_crud_semantics(api):
    base = "/api/v1/namespaces/dev/configmaps"
    code, made = api.json("POST", base, {"metadata": {"generateName": "gen-", "labels": {"suite": "crud"}},
                                         "data": {"a": "1"}})
    assert code == 201 and made["metadata"]["name"].startswith("gen-") and len(made["metadata"]["name"]) == 9
    name, rv = made["metadata"]["name"], made["metadata"]["resourceVersion"]
    assert made["metadata"]["uid"] and made["metadata"]["creationTimestamp"]

    code, updated = api.json("PUT", f"{base}/{name}", {**made, "data": {"a": "2"}})
    assert code == 200 and int(updated["metadata"]["resourceVersion"]) > int(rv)
    code, stale = api.json("PUT", f"{base}/{name}", {**made, "data": {"a": "3"}})
    assert code == 409 and stale["reason"] == "Conflict"
    assert stale["message"].startswith(f'Operation cannot be fulfilled on configmaps "{name}": the object has been '
                                       "modified")

    code, patched = api.json("PATCH", f"{base}/{name}", [{"op": "add", "path": "/data/b", "value": "x"}],
                             content_type="application/json-patch+json")
    assert code == 200 and patched["data"] == {"a": "2", "b": "x"}
    code, merged = api.json("PATCH", f"{base}/{name}", {"data": {"a": None}},
                            content_type="application/merge-patch+json")
    assert merged["data"] == {"b": "x"}

    code, listed = api.json("GET", f"/api/v1/configmaps?fieldSelector=metadata.name%3D{name}")
    assert code == 200 and listed["kind"] == "ConfigMapList" and listed["apiVersion"] == "v1"
    assert [i["metadata"]["name"] for i in listed["items"]] == [name]
    code, paged = api.json("GET", "/api/v1/configmaps?limit=2")
    assert len(paged["items"]) == 2 and paged["metadata"]["continue"]

    code, nowhere = api.json("POST", "/api/v1/namespaces/nowhere/configmaps", {"metadata": {"name": "x"}})
    assert code == 404 and nowhere["message"] == 'namespaces "nowhere" not found'
    code, gone = api.json("DELETE", base + "?labelSelector=suite%3Dcrud")
    assert code == 200 and [i["metadata"]["name"] for i in gone["items"]] == [name]
    code, missing = api.json("GET", f"{base}/{name}")
    assert code == 404 and missing["message"] == f'configmaps "{name}" not found'
    assert missing["details"] == {"name": name, "group": "", "kind": "configmaps"}


def test_table_responses(api):
    code, headers, raw = api.request("GET", "/api/v1/namespaces/prod/pods", headers={"Accept": TABLE})
    tbl = json.loads(raw)
    assert tbl["kind"] == "Table" and tbl["apiVersion"] == "meta.k8s.io/v1"
    columns = [c["name"] for c in tbl["columnDefinitions"] if c["priority"] == 0]
    assert columns == ["Name", "Ready", "Status", "Restarts", "Age"]
    assert [r["cells"][:4] for r in tbl["rows"]] == [["api", "1/1", "Running", 0], ["worker", "1/1", "Running", 0]]
    assert tbl["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    full = json.loads(api.request("GET", "/api/v1/namespaces/prod/pods/api?includeObject=Object",
                                  headers={"Accept": TABLE})[2])
    assert full["rows"][0]["object"]["kind"] == "Pod" and full["rows"][0]["object"]["spec"]["containers"]
    bare = json.loads(api.request("GET", "/api/v1/namespaces/prod/pods?includeObject=None",
                                  headers={"Accept": TABLE})[2])
    assert all("object" not in r for r in bare["rows"])


def test_watch_resource_versions(api):
    base = "/api/v1/namespaces/prod/configmaps"
    listed_rv = api.json("GET", base)[1]["metadata"]["resourceVersion"]
    assert api.json("POST", base, {"metadata": {"name": "w1"}})[0] == 201
    later = watch_events(api, f"{base}?watch=true&resourceVersion={listed_rv}&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in later] == [("ADDED", "w1")]
    assert later[0]["object"]["kind"] == "ConfigMap"

    everything = watch_events(api, "/api/v1/watch/namespaces/prod/configmaps?timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in everything] == [
        ("ADDED", "app-config"), ("ADDED", "w1")]

    rv = api.json("GET", f"{base}/w1")[1]["metadata"]["resourceVersion"]
    assert api.json("DELETE", f"{base}/w1")[0] == 200
    deleted = watch_events(api, f"{base}?watch=1&resourceVersion={rv}&timeoutSeconds=1"
                                "&fieldSelector=metadata.name%3Dw1")
    assert [e["type"] for e in deleted] == ["DELETED"]

    marks = watch_events(api, f"{base}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2")
    bookmarks = [e for e in marks if e["type"] == "BOOKMARK"]
    assert bookmarks and int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv)

    initial = watch_events(api, f"{base}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"
                                "&resourceVersionMatch=NotOlderThan&timeoutSeconds=1")
    assert initial[0]["type"] == "ADDED" and initial[0]["object"]["metadata"]["name"] == "app-config"
    assert initial[1]["type"] == "BOOKMARK"
    assert initial[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_of_tables(api):
    rv = api.json("GET", "/api/v1/namespaces/kube-system/pods")[1]["metadata"]["resourceVersion"]
    for name in ("t1", "t2"):
        api.json("POST", "/api/v1/namespaces/kube-system/pods",
                 {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    events = watch_events(api, f"/api/v1/namespaces/kube-system/pods?watch=true&resourceVersion={rv}"
                               "&timeoutSeconds=1", accept=TABLE)
    assert [e["type"] for e in events] == ["ADDED", "ADDED"]
    assert all(e["object"]["kind"] == "Table" for e in events)
    assert events[0]["object"]["columnDefinitions"] and events[1]["object"]["columnDefinitions"] == []
    assert [e["object"]["rows"][0]["cells"][0] for e in events] == ["t1", "t2"]


def test_log_and_exec_parameters(api):
    code, body = api.json("GET", "/api/v1/namespaces/dev/pods/toolbox/log")
    assert code == 400 and body["message"] == ("a container name must be specified for pod toolbox, choose one of: "
                                               "[shell sidecar]")
    code, body = api.json("GET", "/api/v1/namespaces/dev/pods/toolbox/log?container=nope")
    assert code == 400 and body["message"] == "container nope is not valid for pod toolbox"
    code, _, raw = api.request("GET", "/api/v1/namespaces/dev/pods/toolbox/log?container=sidecar&tailLines=2")
    assert code == 200 and raw.decode().splitlines() == ["INFO [toolbox/sidecar] GET /healthz 200 (5)",
                                                         "INFO [toolbox/sidecar] GET /healthz 200 (6)"]
    code, body = api.json("POST", "/api/v1/namespaces/default/pods/nginx/exec?command=ls&stdout=true",
                          headers={"Upgrade": "SPDY/3.1", "Connection": "Upgrade"})
    assert code == 400 and "WebSocket" in body["message"]


def test_certificate_names(api):
    """The server certificate also carries the extra hostname a gateway maps to 127.0.0.1."""
    for name in ("api.dev.jitgate.test", "localhost"):
        with socket.create_connection(("127.0.0.1", api.port), timeout=5) as raw:
            with api.ssl_context().wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                assert tls.selected_alpn_protocol() in (None, "http/1.1")


# Pure pieces ------------------------------------------------------------------------------------------

def test_strategic_merge_patch():
    pod = {"spec": {"containers": [{"name": "a", "image": "x:1", "env": [{"name": "K", "value": "1"}]},
                                   {"name": "b", "image": "y:1"}]},
           "metadata": {"labels": {"app": "p", "old": "yes"}, "finalizers": ["f1"]}}
    patched = strategic_merge_patch(pod, {
        "spec": {"containers": [{"name": "a", "env": [{"name": "L", "value": "2"}]},
                                {"name": "b", "$patch": "delete"}, {"name": "c", "image": "z:1"}]},
        "metadata": {"labels": {"old": None}, "finalizers": ["f2"]},
    })
    assert [c["name"] for c in patched["spec"]["containers"]] == ["a", "c"]
    assert patched["spec"]["containers"][0] == {"name": "a", "image": "x:1", "env": [
        {"name": "K", "value": "1"}, {"name": "L", "value": "2"}]}
    assert patched["metadata"] == {"labels": {"app": "p"}, "finalizers": ["f1", "f2"]}
    # A JSON merge patch replaces lists whole.
    assert merge_patch(pod, {"spec": {"containers": []}})["spec"]["containers"] == []


def test_json_patch_errors_are_invalid():
    with pytest.raises(ApiError) as e:
        json_patch({"a": {}}, [{"op": "replace", "path": "/a/missing", "value": 1}])
    assert e.value.code == 422 and "doc is missing path: /a/missing" in e.value.status["message"]
    with pytest.raises(ApiError):
        json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])
    assert json_patch({"a": [1, 3]}, [{"op": "add", "path": "/a/1", "value": 2}]) == {"a": [1, 2, 3]}


def test_selectors():
    obj = {"metadata": {"name": "x", "labels": {"app": "web", "tier": "fe"}}, "status": {"phase": "Running"}}
    assert label_matcher("app in (web,api),tier!=be,!canary")(obj)
    assert not label_matcher("app notin (web)")(obj)
    assert label_matcher("tier")(obj) and not label_matcher("missing")(obj)
    assert field_matcher("metadata.name=x,status.phase==Running")(obj)
    assert not field_matcher("status.phase!=Running")(obj)
    with pytest.raises(ApiError):
        label_matcher("app in (web")


def test_eks_token_times_and_deny_rules():
    token = eks_token()
    signed = datetime.datetime.strptime(_amz_date(token), "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    assert "x-k8s-aws-id" in parse_eks_token(token, now=signed + datetime.timedelta(minutes=14))["signed_headers"]
    for offset in (datetime.timedelta(minutes=16), -datetime.timedelta(minutes=6)):
        with pytest.raises(AuthError):
            parse_eks_token(token, now=signed + offset)
    rule = DenyRule.parse("user=ali*,verb=delete,namespace=prod")
    assert rule.matches("alice", (), {"verb": "delete", "resource": "pods", "namespace": "prod", "name": "x"})
    assert not rule.matches("alice", (), {"verb": "delete", "resource": "pods", "namespace": "dev", "name": "x"})
    with pytest.raises(ValueError):
        DenyRule.parse("colour=blue")


def test_shell_language():
    container = Container({"metadata": {"name": "p", "namespace": "n", "uid": "u"},
                           "spec": {"containers": [{"name": "c"}]}}, "c", {"X": "a b", "E": ""},
                          {"/etc/hostname": b"p\n"})
    written: list[tuple[int, bytes]] = []

    async def write(channel: int, data: bytes) -> None:
        written.append((channel, data))

    async def run(line: str) -> tuple[int, str, str]:
        written.clear()
        status = await shell.run_line(line, ProcessIO(write, tty=False, stdin=False))
        return (status, b"".join(d for c, d in written if c == 1).decode(),
                b"".join(d for c, d in written if c == 2).decode())

    shell = Shell(container)
    assert asyncio.run(run('echo "$X" $E end  # comment')) == (0, "a b end\n", "")
    assert asyncio.run(run("echo 'a;$X' \"c && d\"")) == (0, "a;$X c && d\n", "")
    assert asyncio.run(run("false || echo recovered && echo chained")) == (0, "recovered\nchained\n", "")
    assert asyncio.run(run("nosuch; echo $?")) == (0, "127\n", "sh: nosuch: not found\n")
    assert asyncio.run(run("echo data > /tmp/f; cat /tmp/f /etc/hostname | grep -v p")) == (0, "data\n", "")
    assert asyncio.run(run("cat /missing"))[0] == 1
    with pytest.raises(ShellExit):
        asyncio.run(run("exit 3"))


def test_followed_log_ends_with_its_pod(api):
    path = "/api/v1/namespaces/default/pods"
    assert api.json("POST", path, {"metadata": {"name": "short-lived"},
                                   "spec": {"containers": [{"name": "c", "image": "busybox"}]}})[0] == 201
    req = urllib.request.Request(api.url + f"{path}/short-lived/log?follow=true&tailLines=0",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, context=api.ssl_context(), timeout=10) as resp:
        assert b"heartbeat 1" in resp.readline()
        assert api.json("DELETE", f"{path}/short-lived")[0] == 200
        ended = threading.Event()
        threading.Thread(target=lambda: (resp.read(), ended.set()), daemon=True).start()
        # read() returns only when the server ends the stream; otherwise heartbeats go on forever.
        assert ended.wait(10)


def test_token_file_keeps_the_token_off_the_command_line(ca, tmp_path):
    """A token read from a file: not visible in the process list, and one starting with "-" (which
    argparse would take for an option) works."""
    import ssl
    import subprocess
    import sys
    import urllib.request

    from testkit.net import free_port, stop, wait_for_port

    token = "-starts-like-an-option"
    token_file = tmp_path / "cluster-token"
    token_file.write_text(token + "\n")
    cert, key = ca.issue("standin-token-file", hosts=["127.0.0.1"])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "testkit.standin", "--port", str(port), "--cert", str(cert),
                             "--key", str(key), "--token-file", str(token_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        assert token not in open(f"/proc/{proc.pid}/cmdline", "rb").read().decode(errors="replace")
        request = urllib.request.Request(f"https://127.0.0.1:{port}/api/v1/namespaces", headers={"Authorization": f"Bearer {token}"})
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            assert resp.status == 200
    finally:
        stop(proc)
