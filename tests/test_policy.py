"""Policy loading: good files parse into clusters and issuers; every mistake names file, line and field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from jitgate.cli.main import main as cli_main
from jitgate.policy.clusters import ClientCertCredential, TokenFileCredential
from jitgate.policy.document import PolicyError
from jitgate.policy.loader import load_policy, load_policy_cached
from jitgate.upstream.eks import EKSClusterCredentialConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("ca.pem", "token", "client.pem", "client-key.pem"):
        (tmp_path / name).write_text("x")
    return tmp_path


def write(folder: Path, text: str, name: str = "policy.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


GOOD = """
    clusters:
      - name: dev
        endpoint: https://API.dev.example:6443
        connect: 127.0.0.1:16443
        ca_file: ca.pem
        credential:
          eks:
            region: eu-west-1
            cluster_name: dev
            role_arn: arn:aws:iam::123456789012:role/jitgate-dev
        impersonate: true
      - name: staging
        endpoint: https://staging.example
        ca_file: ca.pem
        credential:
          token_file: token
      - name: lab
        endpoint: https://lab.example
        ca_file: ca.pem
        credential:
          client_cert: {cert_file: client.pem, key_file: client-key.pem}
    identity_providers:
      - issuer: https://idp.example
        client_ids: [jitgate]
        username_claim: email
        groups_prefix: "oidc:"
        required_claims: {hd: example.com}
"""


def test_good_policy(files: Path) -> None:
    policy = load_policy(write(files, GOOD))
    dev, staging, lab = policy.clusters
    assert (dev.host, dev.port, dev.connect_address) == ("api.dev.example", 6443, ("127.0.0.1", 16443))
    assert dev.endpoint == "https://api.dev.example:6443"
    assert isinstance(dev.credential, EKSClusterCredentialConfig) and dev.credential.region == "eu-west-1"
    assert dev.impersonate and not staging.impersonate
    assert isinstance(staging.credential, TokenFileCredential) and staging.credential.path == files / "token"
    assert (staging.port, staging.connect_address) == (443, ("staging.example", 443))
    assert isinstance(lab.credential, ClientCertCredential)
    assert policy.cluster_for("api.dev.example", 6443) is dev
    assert policy.cluster_for("api.dev.example", 443) is None
    assert policy.by_endpoint_host("lab.example") is lab
    (idp,) = policy.identity_providers
    assert idp.audiences == ("jitgate",) and idp.username_claim == "email" and idp.groups_prefix == "oidc:"
    assert dict(idp.required_claims) == {"hd": "example.com"}


def test_folder_merges_files_in_name_order(files: Path) -> None:
    folder = files / "policies"
    folder.mkdir()
    clusters, idps = GOOD.split("    identity_providers:")
    write(folder, clusters.replace("ca.pem", "../ca.pem").replace("token\n", "../token\n")
          .replace("client.pem", "../client.pem").replace("client-key.pem", "../client-key.pem"), "10-clusters.yaml")
    write(folder, "    identity_providers:" + idps, "20-idp.yml")
    (folder / "README.txt").write_text("not a policy")
    policy = load_policy(folder)
    assert [c.name for c in policy.clusters] == ["dev", "staging", "lab"]
    assert [p.name for p in policy.sources] == ["10-clusters.yaml", "20-idp.yml"]


@pytest.mark.parametrize(
    ("mutation", "line", "field", "message"),
    [
        (("region: eu-west-1", "regoin: eu-west-1"), 8, "clusters[0].credential.eks", "missing required field 'region'"),
        (("impersonate: true", "impersonate: yes please"), 11, "clusters[0].impersonate", "expected true or false"),
        (("endpoint: https://staging.example", "endpoint: http://staging.example"), 13, "clusters[1].endpoint", "must be an https:// URL"),
        (("endpoint: https://staging.example", "endpoint: https://staging.example/k8s"), 13, "clusters[1].endpoint", "no path"),
        (("connect: 127.0.0.1:16443", "connect: 127.0.0.1:99999"), 4, "clusters[0].connect", "invalid port"),
        (("connect: 127.0.0.1:16443", "connect: 127.0.0.1"), 4, "clusters[0].connect", "expected host:port"),
        (("          token_file: token", "          token_file: missing-token"), 16, "clusters[1].credential.token_file", "file not found"),
        (("        impersonate: true", "        impersonate: true\n        imperonate: false"), 12, "clusters[0].imperonate", "unknown field"),
        (("client_ids: [jitgate]", "client_ids: []"), 24, "identity_providers[0].client_ids", "at least one"),
        (("- name: staging", "- name: dev"), 12, "clusters[1].name", "already defined"),
        (("endpoint: https://lab.example", "endpoint: https://staging.example:8443"), 18, "clusters[2].endpoint", "already used"),
        (("          token_file: token", "          token_file: token\n          client_cert: {cert_file: client.pem, key_file: client-key.pem}"),
         16, "clusters[1].credential", "exactly one of"),
        (("role_arn: arn:aws:iam::123456789012:role/jitgate-dev", "role_arn: 42"), 10, "clusters[0].credential.eks.role_arn", "expected a string"),
        (("required_claims: {hd: example.com}", "required_claims: [hd]"), 27, "identity_providers[0].required_claims",
         "expected a mapping, got a list"),
    ],
)
def test_mistakes_name_file_line_and_field(files: Path, mutation: tuple[str, str], line: int, field: str, message: str) -> None:
    old, new = mutation
    assert old in GOOD
    path = write(files, GOOD.replace(old, new, 1))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), line, field), str(err.value)
    assert message in err.value.message
    assert str(err.value).startswith(f"{path}:{line}: {field}: ")


def test_hmac_algorithm_is_refused_where_written(files: Path) -> None:
    path = write(files, GOOD.replace("username_claim: email", "username_claim: email\n        algorithms: [HS256]"))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert err.value.line == 23 and err.value.field == "identity_providers[0]"
    assert "HS256" in err.value.message


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("clusters:\n  - name: [unclosed\n", 3, "invalid YAML"),
        ("- just\n- a list\n", 1, "top level must be a mapping"),
        ("clusters: []\nidentity_providers: []\nguardrials: {}\n", 3, "unknown section 'guardrials'"),
        ("clusters:\n  - name: a\n    name: b\n", 3, "duplicate key"),
        ("clusters:\n  - just-a-string\n", 2, "expected a mapping"),
    ],
)
def test_broken_files(files: Path, text: str, line: int | None, message: str) -> None:
    path = write(files, text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert err.value.line == line and message in str(err.value)


def test_empty_policy_says_what_is_missing(files: Path) -> None:
    with pytest.raises(PolicyError, match="no cluster is defined"):
        load_policy(write(files, "# nothing yet\n"))
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(files / "nope.yaml")
    empty = files / "empty"
    empty.mkdir()
    with pytest.raises(PolicyError, match="no \\*.yaml policy files"):
        load_policy(empty)


def test_cached_load_reparses_only_on_change(files: Path) -> None:
    path = write(files, GOOD)
    first = load_policy_cached(path)
    assert load_policy_cached(path) is first
    path.write_text(path.read_text().replace("name: lab", "name: lab2"))
    second = load_policy_cached(path)
    assert second is not first and second.clusters[2].name == "lab2"


def test_policy_check_command(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(files, GOOD)
    bad = write(files, GOOD.replace("ca_file: ca.pem", "ca_file: nope.pem", 1), "bad.yaml")
    assert cli_main(["policy", "check", str(good)]) == 0
    assert "ok (3 cluster(s), 1 identity provider(s), 0 access rule(s), 0 webhook(s)" in capsys.readouterr().out
    assert cli_main(["policy", "check", str(good), str(bad)]) == 1
    assert f"{bad}:5: clusters[0].ca_file: file not found" in capsys.readouterr().err


def test_shipped_examples_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The EKS example is valid once its placeholder CA files and its webhook secret exist."""
    monkeypatch.setenv("JITGATE_SLACK_WEBHOOK", "https://hooks.slack.example/services/T0/B0/x")
    text = (REPO / "policies/examples/eks.yaml").read_text()
    for ca in ("prod-eu-ca.pem", "staging-ca.pem"):
        (tmp_path / ca).write_text("x")
        text = text.replace(f"/etc/jitgate/clusters/{ca}", str(tmp_path / ca))
    policy = load_policy(write(tmp_path, text))
    assert [c.name for c in policy.clusters] == ["prod-eu", "staging"]
    assert policy.clusters[1].connect == ("10.0.12.34", 443)
    assert policy.clusters[0].upstream_roles == {"readonly": "arn:aws:iam::123456789012:role/jitgate-prod-eu-readonly"}
    assert [r.name for r in policy.access_rules] == ["prod-read", "staging-operate"]
    assert policy.access_rules[0].upstream_role == "readonly" and len(policy.webhooks) == 1
    monkeypatch.delenv("JITGATE_SLACK_WEBHOOK")
    with pytest.raises(PolicyError, match="JITGATE_SLACK_WEBHOOK is not set"):
        load_policy(tmp_path / "policy.yaml")


RULES = """
    access_rules:
      - name: dev-read
        requesters: [oidc:developers]
        clusters: [dev]
        namespaces: [dev]
        resources: [pods, pods/log]
        verbs: [get, list, watch]
        duration: {default: 1h, max: 4h}
        approval: {mode: reviewers, reviewers: [oidc:sre], required: 2}
"""


def test_access_rules_section(files: Path) -> None:
    policy = load_policy(write(files, GOOD + RULES))
    (rule,) = policy.access_rules
    assert rule.name == "dev-read" and rule.approval.required == 2


def test_access_rules_may_name_clusters_from_another_file(files: Path) -> None:
    folder = files / "split"
    folder.mkdir()
    write(folder, RULES, "00-rules.yaml")
    write(folder, GOOD.replace(": ca.pem", ": ../ca.pem").replace("token_file: token", "token_file: ../token")
          .replace("client.pem,", "../client.pem,").replace("client-key.pem}", "../client-key.pem}"), "10-base.yaml")
    assert [r.name for r in load_policy(folder).access_rules] == ["dev-read"]


def test_access_rule_errors_are_located(files: Path) -> None:
    path = write(files, GOOD + RULES.replace("clusters: [dev]", "clusters: [nope]"))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "clusters: [nope]" in l)
    assert err.value.line == line and "access_rules[0].clusters" in str(err.value) and "nope" in str(err.value)


# ---------------------------------------------------------------------------------------------
# The schema, declared once: the JSON Schema for editors and README's reference come from it


SCHEMA_FILE = REPO / "docs/policy.schema.json"
EXAMPLES = (REPO / "policies/demo.yaml", REPO / "policies/examples/eks.yaml")


def test_every_field_is_explained() -> None:
    from jitgate.policy.loader import POLICY

    for path, section in POLICY.sections():
        assert section.help.strip(), path
        for f in section.fields:
            assert f.help.strip().endswith((".", "?")), f"{path}.{f.key}: help text missing or unfinished"


def test_committed_json_schema_is_the_generated_one() -> None:
    from jitgate.policy.loader import policy_json_schema

    assert SCHEMA_FILE.read_text(encoding="utf-8") == policy_json_schema(), \
        "docs/policy.schema.json is stale: run `jitgate policy schema -o docs/policy.schema.json`"


def test_readme_reference_is_the_generated_one() -> None:
    from jitgate.policy.loader import policy_reference

    begin, end = "<!-- policy-reference:begin -->", "<!-- policy-reference:end -->"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert begin in readme and end in readme, f"README.md has no {begin} ... {end} block"
    committed = readme.split(begin, 1)[1].split(end, 1)[0]
    assert committed.strip("\n") == policy_reference().strip("\n"), \
        "README's policy reference is stale: paste `jitgate policy schema --markdown` between its markers"


def test_policy_schema_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jitgate.policy.loader import policy_reference

    out = tmp_path / "schema.json"
    assert cli_main(["policy", "schema", "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == SCHEMA_FILE.read_text(encoding="utf-8")
    capsys.readouterr()
    assert cli_main(["policy", "schema", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert text == policy_reference()
    assert "| `ca_file` | file path | required | CA that verifies the cluster's serving certificate" in text
    assert "#### `access_rules[].approval`" in text


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_name_the_schema_for_editors(example: Path) -> None:
    first = example.read_text(encoding="utf-8").splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix)
    assert (example.parent / first.removeprefix(prefix)).resolve() == SCHEMA_FILE


def test_policies_match_the_json_schema(files: Path) -> None:
    import jsonschema  # a pinned test dependency: this check never skips
    from ruamel.yaml import YAML

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)

    def errors(text: str) -> list[str]:
        return [e.message for e in validator.iter_errors(YAML(typ="safe", pure=True).load(text))]

    for example in EXAMPLES:
        assert errors(example.read_text(encoding="utf-8")) == [], example
    good = textwrap.dedent(GOOD + RULES)
    assert errors(good) == []
    # What the loader refuses for its shape, the schema refuses too.
    for old, new in [
        ("impersonate: true", "imperonate: true"),
        ("impersonate: true", "impersonate: yes please"),
        ("region: eu-west-1", "regoin: eu-west-1"),
        ("token_file: token", "token_file: token\n      client_cert: {cert_file: a, key_file: b}"),
        ("client_ids: [jitgate]", "client_ids: []"),
        ("mode: reviewers", "mode: vote"),
        ("verbs: [get, list, watch]", "verbs: [get, exec]"),
        ("max: 4h", "max: 4 hours"),
        ("required: 2", "required: 0"),
    ]:
        assert old in good
        assert errors(good.replace(old, new, 1)), (old, new)


# --- the guardrails section ---------------------------------------------------------------------------

GUARDRAILS = """
    guardrails:
      - name: no-ns-delete
        action: deny
        resources: [namespaces]
        verbs: [delete]
      - name: typo
        action: audit
        verbs: [delet]
        resources: [deployments]
"""


def test_guardrails_section_with_warnings(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(files, GOOD + GUARDRAILS)
    policy = load_policy(path)
    assert [r.name for r in policy.guardrails.rules] == ["no-ns-delete", "typo"]
    assert len(policy.guardrails.warnings) == 2
    assert cli_main(["policy", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}:" in err and "did you mean 'delete'" in err and "write deployments.apps" in err


def test_guardrail_errors_stop_the_load_with_file_and_line(files: Path) -> None:
    path = write(files, GOOD + GUARDRAILS.replace("verbs: [delete]", "verbs: [delete]\n        commands: ['re:[']"))
    with pytest.raises(PolicyError, match=r"guardrails\[0\]\.commands\[0\]: invalid regular expression") as e:
        load_policy(path)
    assert e.value.line == path.read_text().splitlines().index("    commands: ['re:[']") + 1
    path = write(files, GOOD + GUARDRAILS.replace("action: deny", "action: deny\n        namespace: [prod]"))
    with pytest.raises(PolicyError, match=r"guardrails\[0\]\.namespace: unknown field 'namespace'"):
        load_policy(path)


def test_the_default_pack_loads_beside_a_policy(files: Path) -> None:
    folder = files / "policy"
    folder.mkdir()
    write(folder, GOOD.replace("ca.pem", "../ca.pem").replace("token_file: token", "token_file: ../token")
          .replace("client.pem", "../client.pem").replace("client-key.pem", "../client-key.pem"))
    (folder / "guardrails.yaml").write_text((REPO / "policies/guardrails.yaml").read_text())
    policy = load_policy(folder)
    assert len(policy.guardrails.rules) >= 10 and policy.guardrails.warnings == ()
