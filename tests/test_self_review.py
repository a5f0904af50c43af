"""kubectl's own questions (auth whoami, can-i, can-i --list): answered for every authenticated caller.

Unit tests of jitgate.kube.reviews, then real kubectl through a gateway in both modes: against the
EKS-style stand-in (the gateway's own credential) and a stand-in with `impersonate: true` whose deny
rule names the caller, so a "no" from the cluster's RBAC shows the review was asked as the caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from jitgate.kube import reviews
from testkit.gateway import GatewayProcess
from testkit.standin.process import StandinProcess, run_kubectl
from tests.conftest import ALICE, REVIEWER, aws_env

REPO = Path(__file__).resolve().parents[1]
JITGATE = str(REPO / ".venv/bin/jitgate")
IMP_HOST = "api.imp.jitgate.test"
IMP_TOKEN = "imp-cluster-token-held-by-the-gateway"

RULES = """\
access_rules:
  - name: dev-work
    requesters: [oidc:developers]
    clusters: [dev, imp]
    namespaces: [dev, default]
    resources: [pods, pods/log, pods/exec, configmaps]
    verbs: [get, list, watch, create, delete]
    duration: {default: 1h, max: 8h}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
"""


# --- the plain module -------------------------------------------------------------------------


def _pb(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (lengths < 128 here)."""
    assert len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


def protobuf_review(kind: str, spec: bytes) -> bytes:
    type_meta = _pb(1, b"authorization.k8s.io/v1") + _pb(2, kind.encode())
    return reviews.MAGIC + _pb(1, type_meta) + _pb(2, _pb(2, spec))


def test_reads_kubectls_protobuf_and_json_reviews() -> None:
    attrs = _pb(1, b"dev") + _pb(2, b"delete") + _pb(5, b"pods") + _pb(7, b"web")
    spec = reviews.read_spec(protobuf_review("SelfSubjectAccessReview", _pb(1, attrs)), "SelfSubjectAccessReview")
    question = reviews.access_question(spec)
    assert question == reviews.AccessQuestion(verb="delete", namespace="dev", resource="pods", name="web")
    info = question.request_info()
    assert (info.is_resource_request, info.verb, info.namespace, info.resource, info.name) == (True, "delete", "dev", "pods", "web")
    path = reviews.access_question(reviews.read_spec(
        protobuf_review("SelfSubjectAccessReview", _pb(2, _pb(1, b"/api") + _pb(2, b"get"))), "SelfSubjectAccessReview"))
    assert (path.path, path.verb, path.is_resource) == ("/api", "get", False)
    rules_spec = reviews.read_spec(protobuf_review("SelfSubjectRulesReview", _pb(1, b"dev")), "SelfSubjectRulesReview")
    assert rules_spec == {"namespace": "dev"}
    as_json = json.dumps({"kind": "SelfSubjectAccessReview", "spec": {"resourceAttributes": {"verb": "get", "resource": "pods"}}})
    assert reviews.access_question(reviews.read_spec(as_json.encode(), "SelfSubjectAccessReview")).resource == "pods"
    for body, kind in ((protobuf_review("SelfSubjectRulesReview", b""), "SelfSubjectAccessReview"), (b"\x00junk", "SelfSubjectAccessReview"),
                       (b'{"kind":"Pod"}', "SelfSubjectAccessReview"), (reviews.MAGIC + b"\x0a\x7f", "SelfSubjectRulesReview")):
        with pytest.raises(reviews.ReviewError):
            reviews.read_spec(body, kind)
    with pytest.raises(reviews.ReviewError, match="exactly one"):
        reviews.access_question({"resourceAttributes": {"verb": "get"}, "nonResourceAttributes": {"path": "/api"}})
    with pytest.raises(reviews.ReviewError, match="exactly one"):
        reviews.access_question({})


def test_answers_have_the_shapes_kubectl_reads() -> None:
    who = json.loads(reviews.self_subject_review("authentication.k8s.io/v1beta1", "alice", ("a", "b")))
    assert who["apiVersion"] == "authentication.k8s.io/v1beta1" and who["status"]["userInfo"] == {"username": "alice", "groups": ["a", "b"]}
    question = reviews.AccessQuestion(verb="get", namespace="dev", resource="pods")
    no = json.loads(reviews.access_review("authorization.k8s.io/v1", question, False, "why not", denied=True))
    assert no["status"] == {"allowed": False, "denied": True, "reason": "why not"}
    assert no["spec"] == {"resourceAttributes": {"verb": "get", "namespace": "dev", "resource": "pods"}}
    sent = json.loads(reviews.access_review_request(question))
    assert "status" not in sent and sent["spec"] == no["spec"]
    assert reviews.cluster_answer(b'{"kind":"SelfSubjectAccessReview","status":{"allowed":true}}') == (True, False, "")
    with pytest.raises(reviews.ReviewError):
        reviews.cluster_answer(b'{"kind":"Status"}')
    scopes = [reviews.GrantedScope("g1", ("dev",), False, (("", "pods", ""), ("", "pods", "log"), ("apps", "deployments", "")), ("get", "list")),
              reviews.GrantedScope("g2", ("prod",), False, (("", "secrets", ""),), ("get",)),
              reviews.GrantedScope("g3", (), True, (("", "*", ""),), ("get",))]
    listed = json.loads(reviews.rules_review("dev", scopes, ("secrets",)))["status"]
    assert {"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods", "pods/log"]} in listed["resourceRules"]
    assert {"verbs": ["get", "list"], "apiGroups": ["apps"], "resources": ["deployments"]} in listed["resourceRules"]
    assert not any("secrets" in r["resources"] for r in listed["resourceRules"]), "a grant in another namespace"
    assert listed["incomplete"] is True and "secrets" in listed["evaluationError"]
    assert listed["nonResourceRules"] == [reviews.DISCOVERY_RULE]
    assert json.loads(reviews.rules_review("dev", scopes[:1]))["status"]["incomplete"] is False


# --- through the gateway with real kubectl ----------------------------------------------------


class Env:
    """A gateway with RULES over the session's EKS-style `dev` cluster and an impersonating `imp` one."""

    def __init__(self, stack, ca, work: Path, rules: str = RULES, deny: tuple[str, ...] = ()) -> None:
        self.stack, self.work = stack, work
        self.imp = StandinProcess(work / "imp").start(ca, tokens=[IMP_TOKEN], hostnames=[IMP_HOST], deny=deny)
        (work / "imp-token").write_text(IMP_TOKEN + "\n")
        (work / "lab-token").write_text((stack.policy.parent / "lab-token").read_text())
        text = stack.policy.read_text()
        clusters = text[text.index("\nclusters:") + 1:]
        imp = (f"  - name: imp\n    endpoint: https://{IMP_HOST}\n    connect: 127.0.0.1:{self.imp.port}\n"
               f"    ca_file: {ca.cert_path}\n    credential:\n      token_file: {work / 'imp-token'}\n    impersonate: true\n")
        clusters = clusters.replace("\nidentity_providers:", "\n" + imp + "identity_providers:", 1)
        self.policy = work / "policy.yaml"
        self.policy.write_text(rules + clusters)
        self.store = work / "grants.db"
        self.gateway = GatewayProcess(work / "gw", self.policy,
                                      reverse_endpoints={"dev": "https://api.dev.jitgate.test", "imp": f"https://{IMP_HOST}"},
                                      options={"grant_store": str(self.store)}, env=aws_env(dict(os.environ), work)).start()
        self.token = stack.idp.token("alice", email=ALICE[0], email_verified=True, groups=["developers"])
        self.reviewer_token = stack.idp.token("rita", email=REVIEWER[0], email_verified=True, groups=["sre"])

    def stop(self) -> None:
        self.gateway.stop()
        self.imp.stop()

    def kubeconfig(self, cluster: str, mode: str, token: str | None = None, name: str = "alice") -> Path:
        path = self.work / f"kubeconfig-{name}-{cluster}-{mode}"
        args = [JITGATE, "kubeconfig", "--policy", str(self.policy), "--cluster", cluster, "--user", name,
                "--token", token or self.token, "--gateway-ca", str(self.gateway.ca_path), "-o", str(path)]
        args += ["--server", self.gateway.reverse_url(cluster)] if mode == "reverse" else ["--proxy", self.gateway.proxy_url]
        subprocess.run(args, check=True, capture_output=True)
        return path

    def grant(self, cluster: str, namespaces: tuple[str, ...], resources: tuple[str, ...], verbs: tuple[str, ...],
              duration: int | None = None) -> str:
        """File and approve a grant for alice through the store (as the CLI does); returns its id."""
        from jitgate.access.model import Person
        from jitgate.access.scope import Scope
        from jitgate.policy.loader import load_policy
        from jitgate.store.sqlite import SQLiteStore

        rules = load_policy(self.policy).access_rules
        with SQLiteStore(self.store) as store:
            now = time.time()
            request = store.create_request(rules, Person(ALICE[0], ("oidc:developers",)),
                                           Scope(cluster, namespaces, False, resources, verbs), now=now,
                                           reason="self-review tests", duration=duration)
            return store.review(rules, request.id, Person(*REVIEWER), "approve", "ok", now=now).grant.id

    def revoke(self, grant_id: str) -> None:
        from jitgate.access.model import Person
        from jitgate.policy.loader import load_policy
        from jitgate.store.sqlite import SQLiteStore

        with SQLiteStore(self.store) as store:
            store.revoke_grant(load_policy(self.policy).access_rules, grant_id, Person(*REVIEWER), "done here",
                               now=time.time())


@pytest.fixture(scope="module")
def env(stack, ca, tmp_path_factory: pytest.TempPathFactory):
    e = Env(stack, ca, tmp_path_factory.mktemp("self-review"), deny=(f"user={ALICE[0]},verb=delete,resource=configmaps",))
    for cluster in ("dev", "imp"):
        e.grant(cluster, ("dev",), ("pods", "configmaps"), ("get", "list", "delete"))
    yield e
    e.stop()


@pytest.mark.parametrize("mode", ["reverse", "proxy"])
@pytest.mark.parametrize("cluster", ["dev", "imp"])
def test_whoami_and_can_i_without_a_grant_for_them(env: Env, cluster: str, mode: str) -> None:
    config = env.kubeconfig(cluster, mode)
    who = run_kubectl(config, "auth", "whoami", check=True).stdout
    assert ALICE[0] in who and "oidc:developers" in who, who

    yes = run_kubectl(config, "auth", "can-i", "get", "pods", "-n", "dev")
    assert (yes.returncode, yes.stdout.strip()) == (0, "yes"), yes
    no = run_kubectl(config, "auth", "can-i", "create", "pods", "-n", "dev")
    assert no.returncode == 1 and no.stdout.startswith("no"), no
    assert "jitgate request --cluster " + cluster in no.stdout + no.stderr, "the reason says how to request it"
    elsewhere = run_kubectl(config, "auth", "can-i", "get", "pods", "-n", "prod")
    assert elsewhere.returncode == 1 and "no active grant" in elsewhere.stdout

    # The grant covers `delete configmaps`; only the impersonating cluster's RBAC denies alice.
    cm = run_kubectl(config, "auth", "can-i", "delete", "configmaps", "-n", "dev")
    if cluster == "imp":
        assert cm.returncode == 1 and "the cluster's RBAC does not allow it" in cm.stdout, cm
        assert "stand-in deny rule" in cm.stdout
    else:
        assert (cm.returncode, cm.stdout.strip()) == (0, "yes"), cm

    listed = run_kubectl(config, "auth", "can-i", "--list", "-n", "dev")
    assert listed.returncode == 0, listed
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert "pods" in rows and "[get list delete]" in rows["pods"] and "configmaps" in rows, listed.stdout
    assert "/api/*" in listed.stdout
    assert "secrets" not in rows
    other = run_kubectl(config, "auth", "can-i", "--list", "-n", "prod", check=True).stdout
    assert "pods" not in other


def test_reviews_are_audited_and_reach_the_cluster_only_when_granted(env: Env) -> None:
    config = env.kubeconfig("imp", "reverse")
    env.imp.clear_seen()
    assert run_kubectl(config, "auth", "can-i", "get", "pods", "-n", "dev").stdout.strip() == "yes"
    assert run_kubectl(config, "auth", "can-i", "get", "secrets", "-n", "dev").returncode == 1
    assert run_kubectl(config, "auth", "can-i", "--list", "-n", "dev").returncode == 0
    seen = [r for r in env.imp.requests_seen() if "review" in r["path"]]
    # Only the granted question went to the cluster, as alice, carrying the attributes decided on.
    assert [r["path"] for r in seen] == ["/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"], seen
    assert seen[0]["impersonate_user"] == ALICE[0] and seen[0]["status"] == 201
    events = [e for e in env.gateway.audit_events() if e.get("objectRef", {}).get("resource", "").startswith("selfsubject")
              and e["stage"] == "ResponseComplete"]
    by_resource = {e["objectRef"]["resource"] for e in events}
    assert by_resource >= {"selfsubjectaccessreviews", "selfsubjectrulesreviews"}
    assert all(e["annotations"]["jitgate.dev/decision"] == "allow" and e["responseStatus"]["code"] == 201 for e in events)
    assert any("no grant covers it" == e["annotations"].get("jitgate.dev/self-review") for e in events)
    granted = [e for e in events if e["annotations"].get("jitgate.dev/self-review", "").startswith("grant ")]
    assert granted and granted[-1]["annotations"]["jitgate.dev/grant"]


def test_a_review_body_that_is_not_one_is_refused(env: Env) -> None:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(env.gateway.ca_path))
    request = urllib.request.Request(env.gateway.reverse_url("dev") + "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                     data=b'{"kind":"SelfSubjectAccessReview","spec":{}}', method="POST",
                                     headers={"Authorization": f"Bearer {env.token}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=10)
    assert refused.value.code == 400 and b"exactly one of resourceAttributes" in refused.value.read()
