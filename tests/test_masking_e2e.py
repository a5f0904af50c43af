"""Masking end to end: real kubectl through the gateway (reverse and proxy modes) against the stand-in.

Canary values planted in Secrets (data, stringData, the last-applied annotation of `kubectl apply`),
a ConfigMap, pod env, pod logs and exec output never show in any kubectl output, nor in the audit
log or any file under the gateway's state folder; names, keys and other fields do. A grant with
`reveal: true` lets the values through, and the audit says so.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit.gateway import GatewayProcess
from testkit.standin.process import KUBECTL, kubectl_env, run_kubectl
from testkit.standin.seed import SECRET_VALUES
from tests.conftest import DEV_HOST, REVIEWER, aws_env, grant_everything, write_policy

REPO = Path(__file__).resolve().parents[1]
CANARY_DATA = "canary-data-5e1f0c2d"
CANARY_STRING = "canary-stringdata-9b7a"
CANARY_CM = "canary-configmap-3d4c"
CANARY_ENV = "canary-env-8f2e6a"
BOB = ("bob@example.com", ("oidc:developers", "oidc:sre"))

REVEAL_RULE = """\
  - name: reveal-secrets
    requesters: [oidc:developers]
    clusters: [dev]
    namespaces: ["*"]
    cluster_wide: true
    resources: [secrets, configmaps, pods, pods/log, pods/exec]
    verbs: ["*"]
    duration: 1h
    reveal: true
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
"""

MANIFEST = f"""\
apiVersion: v1
kind: Secret
metadata:
  name: canary
  namespace: dev
  labels: {{app: canary}}
type: Opaque
data:
  dbpass: {base64.b64encode(CANARY_DATA.encode()).decode()}
stringData:
  apitoken: {CANARY_STRING}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: canary-config
  namespace: dev
data:
  DB_PASSWORD: {CANARY_CM}
  LOG_LEVEL: debug
---
apiVersion: v1
kind: Pod
metadata:
  name: canary-pod
  namespace: dev
spec:
  containers:
    - name: app
      image: busybox:1.36
      command: [sleep, infinity]
      env:
        - {{name: API_TOKEN, value: {CANARY_ENV}}}
        - {{name: MODE, value: canary-mode}}
"""


def canaries() -> list[str]:
    values = [CANARY_DATA, CANARY_STRING, CANARY_CM, CANARY_ENV, SECRET_VALUES["prod"]["password"], SECRET_VALUES["dev"]["password"]]
    return values + [base64.b64encode(v.encode()).decode() for v in values]


def assert_clean(text: str, where: str) -> None:
    for canary in canaries():
        assert canary not in text, f"{canary} leaked in {where}"


@pytest.fixture(scope="module")
def gw(ca, idp, sts, dev_cluster, lab_cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("masking-gw")
    role_arn, readonly = sts.create_role("jitgate-mask"), sts.create_role("jitgate-mask-ro")
    policy = write_policy(work, ca, idp, sts, role_arn, dev_cluster, lab_cluster, readonly)
    policy.write_text(policy.read_text().replace("\nclusters:\n", "\n" + REVEAL_RULE + "clusters:\n", 1))
    store = work / "jitgate.db"
    grant_everything(store, policy, "dev")
    reveal_grant(store, policy)
    gateway = GatewayProcess(work / "state", policy, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                             options={"grant_store": str(store), "save_stream_file": str(work / "state" / "flows.mitm")},
                             env=aws_env(dict(os.environ), work)).start()
    configs = {}
    for user, (email, groups) in (("alice", ("alice@example.com", ["developers", "sre"])), ("bob", (BOB[0], ["developers", "sre"]))):
        token = idp.token(user, email=email, email_verified=True, groups=groups)
        for mode in ("reverse", "proxy"):
            path = work / f"kc-{user}-{mode}"
            args = [sys.executable, "-c", "from jitgate.cli.main import main; main()", "kubeconfig", "--policy", str(policy), "--cluster", "dev", "--user", user,
                    "--token", token, "--gateway-ca", str(gateway.ca_path), "-o", str(path)]
            args += ["--server", gateway.reverse_url("dev")] if mode == "reverse" else ["--proxy", gateway.proxy_url]
            subprocess.run(args, check=True, cwd=REPO)
            configs[user, mode] = path
    alice = configs["alice", "reverse"]
    run_kubectl(alice, "apply", "-f", "-", input=MANIFEST, check=True)
    yield gateway, configs, work
    gateway.stop()


def reveal_grant(store_path: Path, policy: Path) -> None:
    from jitgate.access.model import Person
    from jitgate.access.scope import Scope
    from jitgate.policy.loader import load_policy
    from jitgate.store.sqlite import SQLiteStore

    rules = load_policy(policy).access_rules
    scope = Scope("dev", (), True, ("secrets", "configmaps", "pods", "pods/log", "pods/exec"), ("*",), reveal=True)
    with SQLiteStore(store_path) as store:
        now = time.time()
        request = store.create_request(rules, Person(*BOB), scope, now=now, reason="incident 42", rule_name="reveal-secrets")
        store.review(rules, request.id, Person(*REVIEWER), "approve", "ok", now=now)


def follow(config: Path, *args: str, seconds: float = 3.0, during=None) -> str:
    proc = subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=kubectl_env(config))
    time.sleep(1.0)
    if during:
        during()
    time.sleep(seconds)
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out.decode(errors="replace")


@pytest.mark.parametrize("mode", ["reverse", "proxy"])
def test_no_canary_in_any_kubectl_output(gw, mode: str, tmp_path: Path) -> None:
    gateway, configs, _ = gw
    kc = configs["alice", mode]
    outputs: dict[str, str] = {}

    def run(name: str, *args: str, **kw) -> str:
        result = run_kubectl(kc, *args, **kw)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        outputs[name] = result.stdout + result.stderr
        return result.stdout

    secret = json.loads(run("get-json", "get", "secret", "canary", "-n", "dev", "-o", "json"))
    assert set(secret["data"]) == {"dbpass", "apitoken"} and secret["metadata"]["labels"] == {"app": "canary"}
    assert base64.b64decode(secret["data"]["dbpass"]) == b"jitgate:masked"
    assert "last-applied-configuration" in json.dumps(secret)
    run("get-yaml", "get", "secrets", "-n", "dev", "-o", "yaml")
    assert "canary" in run("table", "get", "secrets", "-n", "dev")
    run("table-all", "get", "secrets,configmaps,pods", "-A", "-o", "wide")
    run("describe", "describe", "secret", "canary", "-n", "dev")
    cm = json.loads(run("cm", "get", "configmap", "canary-config", "-n", "dev", "-o", "json"))
    assert cm["data"]["LOG_LEVEL"] == "debug" and "DB_PASSWORD" in cm["data"]
    pod = json.loads(run("pod", "get", "pod", "canary-pod", "-n", "dev", "-o", "json"))
    assert {"name": "MODE", "value": "canary-mode"} in pod["spec"]["containers"][0]["env"]
    run("describe-pod", "describe", "pod", "canary-pod", "-n", "dev")
    logs = run("logs", "logs", "api", "-n", "prod")
    assert "DB_PASSWORD=" in logs and "ready" in logs
    run("logs-canary", "logs", "canary-pod", "-n", "dev")
    assert "MODE=" in run("exec-env", "exec", "-n", "dev", "canary-pod", "--", "env")
    run("exec-prod", "exec", "-n", "prod", "api", "--", "sh", "-c", "env; echo done")
    env = dict(kubectl_env(kc), KUBE_EDITOR="cat")
    edited = subprocess.run([KUBECTL, "edit", "secret", "canary", "-n", "dev"], capture_output=True, env=env, timeout=20)
    outputs["edit-cat"] = edited.stdout.decode() + edited.stderr.decode()
    assert "dbpass" in outputs["edit-cat"]
    env["KUBE_EDITOR"] = "sed -i s/canary-mode/edited-mode/"
    edited = subprocess.run([KUBECTL, "edit", "configmap", "canary-config", "-n", "dev"], capture_output=True, env=env, timeout=20)
    outputs["edit-sed"] = edited.stdout.decode() + edited.stderr.decode()

    def change():
        run_kubectl(kc, "patch", "secret", "canary", "-n", "dev", "-p", json.dumps({"stringData": {"apitoken": CANARY_STRING}}))
    outputs["watch"] = follow(kc, "get", "secrets", "-n", "dev", "-w", "-o", "json", during=change)
    assert "canary" in outputs["watch"]
    outputs["logs-f"] = follow(kc, "logs", "-f", "api", "-n", "prod")
    assert "DB_PASSWORD=" in outputs["logs-f"]
    for name, text in outputs.items():
        assert_clean(text, name)


def test_no_canary_in_audit_or_state_folder(gw) -> None:
    gateway, configs, work = gw
    run_kubectl(configs["alice", "reverse"], "get", "secret", "canary", "-n", "dev", "-o", "yaml", check=True)
    time.sleep(0.5)
    events = gateway.audit_events()
    assert any(e["annotations"].get("jitgate.dev/masked") for e in events)
    for path in (work / "state").rglob("*"):
        if path.is_file():
            assert_clean(path.read_bytes().decode(errors="replace"), str(path))


def test_apply_of_a_secret_still_works_and_reaches_the_cluster_unmasked(gw) -> None:
    gateway, configs, _ = gw
    alice, bob = configs["alice", "reverse"], configs["bob", "reverse"]
    run_kubectl(alice, "apply", "-f", "-", input=MANIFEST.replace(CANARY_STRING, CANARY_STRING + "-2"), check=True)
    out = run_kubectl(bob, "get", "secret", "canary", "-n", "dev", "-o", "json", check=True).stdout
    assert json.loads(out)["stringData" if "stringData" in json.loads(out) else "data"]
    assert base64.b64decode(json.loads(out)["data"]["apitoken"]).decode() == CANARY_STRING + "-2"


def test_reveal_grant_shows_values_and_is_audited(gw) -> None:
    gateway, configs, _ = gw
    bob = configs["bob", "reverse"]
    secret = json.loads(run_kubectl(bob, "get", "secret", "canary", "-n", "dev", "-o", "json", check=True).stdout)
    assert base64.b64decode(secret["data"]["dbpass"]).decode() == CANARY_DATA
    logs = run_kubectl(bob, "logs", "api", "-n", "prod", check=True).stdout
    assert SECRET_VALUES["prod"]["password"] in logs
    time.sleep(0.3)
    revealed = [e for e in gateway.audit_events() if e["annotations"].get("jitgate.dev/revealed") == "true"]
    assert revealed and all(e["user"]["username"].startswith("bob") for e in revealed)
