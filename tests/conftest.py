"""Session-wide real processes: a test CA, the OIDC provider, STS (moto), stand-in clusters, the gateway.

Starting them once per session keeps the end-to-end suite fast; tests that need a gateway with other
settings start their own from `testkit.gateway`.
"""

from __future__ import annotations

import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.gateway import GatewayProcess
from testkit.moto import MotoServer
from testkit.net import TestCA
from testkit.oidc_provider import OIDCProviderProcess
from testkit.standin.process import StandinProcess

DEV_HOST = "api.dev.jitgate.test"  # non-loopback names only the gateway maps to a stand-in
LAB_HOST = "api.lab.jitgate.test"
LAB_CLUSTER_TOKEN = "lab-cluster-token-held-by-the-gateway"
INSPECTOR_TOKEN = "test-inspector-token"  # lets tests read what a stand-in saw; the gateway never has it


def aws_env(base: dict[str, str], tmp: Path) -> dict[str, str]:
    """The gateway's own AWS credentials (boto3's chain: here, environment variables only)."""
    env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="AKIAGATEWAYBASEKEY01", AWS_SECRET_ACCESS_KEY="gateway-base-secret",
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def idp(ca: TestCA, tmp_path_factory: pytest.TempPathFactory):
    with OIDCProviderProcess(tmp_path_factory.mktemp("idp")).start(ca) as provider:
        yield provider


@pytest.fixture(scope="session")
def sts(ca: TestCA, tmp_path_factory: pytest.TempPathFactory):
    server = MotoServer.start(tmp_path_factory.mktemp("moto"), ca)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dev_cluster(ca: TestCA, tmp_path_factory: pytest.TempPathFactory):
    """The EKS-style cluster: accepts only EKS tokens minted for cluster name `dev`."""
    with StandinProcess(tmp_path_factory.mktemp("standin-dev")).start(ca, tokens=[INSPECTOR_TOKEN], eks_cluster="dev", hostnames=[DEV_HOST]) as api:
        yield api


@pytest.fixture(scope="session")
def lab_cluster(ca: TestCA, tmp_path_factory: pytest.TempPathFactory):
    """A cluster reached with a token file, with impersonation on."""
    with StandinProcess(tmp_path_factory.mktemp("standin-lab")).start(ca, tokens=[LAB_CLUSTER_TOKEN], hostnames=[LAB_HOST]) as api:
        yield api


@dataclass
class Stack:
    gateway: GatewayProcess
    idp: OIDCProviderProcess
    sts: MotoServer
    dev: StandinProcess
    lab: StandinProcess
    role_arn: str
    policy: Path
    grant_store: Path
    readonly_role_arn: str


# Broad access for the data-path tests, granted through the real workflow (one reviewer approves).
E2E_RULES = """\
access_rules:
  - name: e2e-admin
    requesters: [oidc:developers]
    clusters: ["*"]
    namespaces: ["*"]
    cluster_wide: true
    resources: ["*", secrets, pods/log, pods/exec, pods/attach]
    verbs: [get, list, watch, create, update, patch, delete, deletecollection]
    duration: {default: 8h, max: 8h}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
"""

ALICE = ("alice@example.com", ("oidc:developers", "oidc:sre"))
REVIEWER = ("rita@example.com", ("oidc:sre",))


def grant_everything(grant_store: Path, policy: Path, cluster: str, user: tuple = ALICE) -> str:
    """File and approve (by another person) a cluster-wide grant for `user`; returns the grant id."""
    from jitgate.access.model import Person
    from jitgate.access.scope import Scope
    from jitgate.policy.loader import load_policy
    from jitgate.store.sqlite import SQLiteStore

    rules = load_policy(policy).access_rules
    scope = Scope(cluster, (), True, ("*", "secrets", "pods/log", "pods/exec", "pods/attach"),
                  ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"))
    with SQLiteStore(grant_store) as store:
        now = time.time()
        request = store.create_request(rules, Person(*user), scope, now=now, reason="end-to-end tests")
        approved = store.review(rules, request.id, Person(*REVIEWER), "approve", "ok", now=now)
        return approved.grant.id


def write_policy(folder: Path, ca: TestCA, idp: OIDCProviderProcess, sts: MotoServer, role_arn: str,
                 dev: StandinProcess, lab: StandinProcess, readonly_role_arn: str) -> Path:
    (folder / "lab-token").write_text(LAB_CLUSTER_TOKEN + "\n")
    policy = folder / "policy.yaml"
    policy.write_text(E2E_RULES + textwrap.dedent(f"""\
        clusters:
          - name: dev
            endpoint: https://{DEV_HOST}
            connect: 127.0.0.1:{dev.port}
            ca_file: {ca.cert_path}
            credential:
              eks:
                region: us-east-1
                cluster_name: dev
                role_arn: {role_arn}
                sts_endpoint: {sts.endpoint_url}
                sts_ca_file: {sts.ca_bundle}
                roles:
                  readonly: {readonly_role_arn}
          - name: lab
            endpoint: https://{LAB_HOST}:6443
            connect: 127.0.0.1:{lab.port}
            ca_file: {ca.cert_path}
            credential:
              token_file: lab-token
            impersonate: true
        """) + idp.policy_section())
    return policy


@pytest.fixture(scope="session")
def stack(ca, idp, sts, dev_cluster, lab_cluster, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("gateway")
    role_arn = sts.create_role("jitgate-dev")
    readonly_role_arn = sts.create_role("jitgate-dev-readonly")
    policy = write_policy(work, ca, idp, sts, role_arn, dev_cluster, lab_cluster, readonly_role_arn)
    grant_store = work / "jitgate.db"
    for cluster in ("dev", "lab"):
        grant_everything(grant_store, policy, cluster)
    gateway = GatewayProcess(work, policy, reverse_endpoints={"dev": f"https://{DEV_HOST}", "lab": f"https://{LAB_HOST}:6443"},
                             options={"grant_store": str(grant_store)}, env=aws_env(dict(os.environ), work)).start()
    yield Stack(gateway, idp, sts, dev_cluster, lab_cluster, role_arn, policy, grant_store, readonly_role_arn)
    gateway.stop()
