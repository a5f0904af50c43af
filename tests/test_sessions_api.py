"""Recorded sessions through the gateway's access API, end to end: a real gateway (mitmdump with the
whole chain) records real kubectl sessions of two requesters under grants of two access rules; then
real OIDC tokens of the requesters, each rule's reviewer, an auditor and an outsider ask for them
over HTTPS, directly and with `jitgate sessions`.

Who sees what (policy `sessions: {auditors: [oidc:auditors]}`, reviewers of a rule see its grants'
sessions): a requester their own sessions only, a reviewer the grant sessions under the rule they
review, an auditor everything; anyone else gets 404 for the id, the same 404 as for an id that does
not exist, and never sees it listed. Exports are the stored, masked recordings (no canary secret, no
token used here); ids that try to leave the recordings folder are refused; every view and export is
an audit event. Each test also asserts something the visibility check alone decides.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from jitgate.recording import har as harfile
from testkit.gateway import GatewayProcess
from testkit.net import stop
from testkit.recording import JITGATE, index_calls, leaks, load_cast, load_har, read_flows, web_flows
from testkit.standin.process import run_kubectl
from testkit.standin.seed import API_TOKEN, SECRET_VALUES
from tests.conftest import DEV_HOST, LAB_CLUSTER_TOKEN, aws_env

SESSIONS = "/jitgate/v1/sessions"
OPS_RULE = """\
  - name: ops-read
    requesters: [oidc:developers]
    clusters: [dev]
    namespaces: [dev, prod]
    resources: [pods, secrets, pods/exec]
    verbs: [get, list, create]
    duration: 1h
    approval: {mode: reviewers, reviewers: [oidc:ops]}
"""
SESSIONS_POLICY = """
sessions:
  auditors: [oidc:auditors]
"""
# name -> (email, groups as the OIDC provider sends them; the policy prefixes "oidc:")
PEOPLE = {
    "alice": ("alice@example.com", ["developers"]),  # requester, grant under e2e-admin
    "erin": ("erin@example.com", ["developers"]),  # requester, grant under ops-read
    "rita": ("rita@example.com", ["sre"]),  # reviews e2e-admin
    "olga": ("olga@example.com", ["ops"]),  # reviews ops-read
    "carol": ("carol@example.com", ["auditors"]),  # the policy's auditor
    "dave": ("dave@example.com", ["developers"]),  # neither: no session of anyone else
}


class World:
    def __init__(self, stack, work: Path) -> None:
        self.stack, self.work = stack, work
        work.mkdir(parents=True, exist_ok=True)
        text = stack.policy.read_text()
        text = re.sub(r"^clusters:$", OPS_RULE.rstrip("\n") + "\nclusters:", text, count=1, flags=re.M)
        self.policy = work / "policy.yaml"
        self.policy.write_text(text + SESSIONS_POLICY)
        shutil.copy(stack.policy.parent / "lab-token", work / "lab-token")
        self.store = work / "grants.db"
        self.recordings = work / "recordings"
        self.tokens = {name: stack.idp.token(name, email=email, email_verified=True, groups=groups)
                       for name, (email, groups) in PEOPLE.items()}
        self.gateway = GatewayProcess(work / "gw", self.policy, reverse_endpoints={"dev": f"https://{DEV_HOST}"},
                                      options={"grant_store": str(self.store), "recordings": str(self.recordings)},
                                      env=aws_env(dict(__import__("os").environ), work))
        self.grants: dict[str, str] = {}

    def start(self) -> World:
        self.gateway.start()
        return self

    def grant(self, who: str, reviewer: str, rule: str, namespaces, resources, verbs) -> str:
        from jitgate.access.model import Person
        from jitgate.access.scope import Scope
        from jitgate.policy.loader import load_policy
        from jitgate.store.sqlite import SQLiteStore

        rules = load_policy(self.policy).access_rules
        person = lambda name: Person(PEOPLE[name][0], tuple(f"oidc:{g}" for g in PEOPLE[name][1]))  # noqa: E731
        with SQLiteStore(self.store) as store:
            now = time.time()
            request = store.create_request(rules, person(who), Scope("dev", tuple(namespaces), False, tuple(resources), tuple(verbs)),
                                           now=now, reason="sessions API tests", rule_name=rule)
            grant = store.review(rules, request.id, person(reviewer), "approve", "ok", now=now).grant.id
        self.grants[who] = grant
        return grant

    def kubeconfig(self, who: str) -> Path:
        path = self.work / f"kubeconfig-{who}"
        if not path.exists():
            subprocess.run([JITGATE, "kubeconfig", "--policy", str(self.policy), "--cluster", "dev", "--user", who,
                            "--token", self.tokens[who], "--gateway-ca", str(self.gateway.ca_path),
                            "--server", self.gateway.reverse_url("dev"), "-o", str(path)], check=True, capture_output=True)
        return path

    def kubectl(self, who: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_kubectl(self.kubeconfig(who), *args, **kw)

    # -- the API, over HTTPS with a real token

    def api(self, who: str | None, target: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        port = self.gateway.reverse["dev"][1]
        context = ssl.create_default_context(cafile=str(self.gateway.ca_path))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        headers = {"Accept": "*/*"}
        token = token or (self.tokens[who] if who else None)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(self, who: str | None, target: str, expect: int = 200) -> dict:
        code, _, body = self.api(who, target)
        assert code == expect, (who, target, code, body[:500])
        return json.loads(body)

    def listed(self, who: str, query: str = "") -> dict[str, dict]:
        return {s["id"]: s for s in self.json(who, SESSIONS + query)["items"]}

    def cli(self, who: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`jitgate sessions ...` pointed at the gateway, with `who`'s token ($JITGATE_TOKEN, never in argv)."""
        env = {**__import__("os").environ, "JITGATE_TOKEN": self.tokens[who]}
        env.pop("JITGATE_RECORDINGS", None)
        command = [JITGATE, "sessions", *args, "--server", self.gateway.reverse_url("dev"), "--ca", str(self.gateway.ca_path)]
        done = subprocess.run(command, capture_output=True, env=env, timeout=60)
        if check:
            assert done.returncode == 0, (args, done.stderr.decode(errors="replace"))
        return done

    def audit(self, username: str, action: str) -> list[dict]:
        return [e for e in self.gateway.audit_events() if e["stage"] == "ResponseComplete"
                and e.get("user", {}).get("username") == username and e.get("annotations", {}).get("jitgate.dev/api-action") == action]

    def calls(self) -> list[dict]:
        return index_calls(self.recordings)


@pytest.fixture(scope="module")
def world(stack, tmp_path_factory):
    w = World(stack, tmp_path_factory.mktemp("sessions-api")).start()
    try:
        alice = w.grant("alice", "rita", "e2e-admin", ("dev",), ("pods", "pods/exec", "secrets"), ("get", "list", "create"))
        erin = w.grant("erin", "olga", "ops-read", ("dev", "prod"), ("pods", "secrets", "pods/exec"), ("get", "list", "create"))
        w.kubectl("alice", "get", "pods", "-n", "dev", check=True)
        w.outputs = {"alice secret": w.kubectl("alice", "get", "secret", "db-credentials", "-n", "dev", "-o", "json", check=True).stdout,
                     "alice exec": w.kubectl("alice", "exec", "-n", "dev", "toolbox", "--", "sh", "-c", "echo one; echo two",
                                             check=True).stdout,
                     "erin secrets": w.kubectl("erin", "get", "secrets", "-n", "prod", "-o", "yaml", check=True).stdout,
                     "erin exec": w.kubectl("erin", "exec", "-n", "prod", "api", "--", "env", check=True).stdout}
        denied = w.kubectl("alice", "get", "deployments", "-n", "dev")  # no grant covers it: alice's session of the hour
        assert denied.returncode != 0
        anonymous = w.kubectl("alice", "get", "pods", "-n", "dev", "--token", "not-a-valid-token")
        assert anonymous.returncode != 0
        calls = wait_for(w.calls, lambda calls: sum(bool(c["cast_file"]) for c in calls) >= 2
                         and any(c["session"].startswith("anonymous-") for c in calls)
                         and any(c["decision"] == "deny" and c["user"] == "alice@example.com" for c in calls))
        w.ids = {
            "alice": f"alice-example-com-{alice}",
            "erin": f"erin-example-com-{erin}",
            "alice-hour": next(c["session"] for c in calls if c["decision"] == "deny" and c["user"] == "alice@example.com"),
            "anonymous": next(c["session"] for c in calls if c["session"].startswith("anonymous-")),
        }
        assert {w.ids["alice"], w.ids["erin"]} <= {c["session"] for c in calls}
        yield w
    finally:
        w.gateway.stop()


def wait_for(read, predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def own(who: str, ids) -> set[str]:
    """`who`'s own sessions of the hour (their API calls are recorded there) among `ids`."""
    return {i for i in ids if i.startswith(f"{who}-example-com-20")}


def not_found(world: World, who: str, target: str) -> str:
    code, headers, body = world.api(who, target)
    assert code == 404, (who, target, code, body[:300])
    answer = json.loads(body)
    assert answer["kind"] == "Status" and answer["code"] == 404 and headers["content-type"] == "application/json"
    return answer["message"]


# -- who sees what ---------------------------------------------------------------------------------


def test_a_requester_sees_their_own_sessions_and_nobody_elses(world: World) -> None:
    ids = world.ids
    alice = world.listed("alice")
    assert {ids["alice"], ids["alice-hour"]} <= set(alice)
    assert set(alice) - own("alice", alice) == {ids["alice"]}, "only alice's own sessions"
    assert {s["visible_as"] for s in alice.values()} == {"owner"}
    assert alice[ids["alice"]]["grant"] == world.grants["alice"] and alice[ids["alice"]]["rule"] == "e2e-admin"
    erin = world.listed("erin")
    assert ids["erin"] in erin and not {ids["alice"], ids["alice-hour"], ids["anonymous"]} & set(erin)
    # Filters narrow what one sees; they never widen it.
    assert set(world.listed("alice", "?user=erin")) == set()
    assert set(world.listed("alice", f"?grant={world.grants['erin']}")) == set()
    denied = set(world.listed("alice", "?decision=deny"))
    assert ids["alice-hour"] in denied and denied == own("alice", denied)
    assert set(world.listed("alice", "?cluster=dev&namespace=dev&since=1h&until=2099-01-01")) >= {ids["alice"]}
    assert set(world.listed("alice", "?until=2000-01-01")) == set()
    # By id: another's session is exactly as absent as one that never existed.
    for path in ("", "/har", "/flows"):
        hidden = not_found(world, "alice", f"{SESSIONS}/{ids['erin']}{path}")
        absent = not_found(world, "alice", f"{SESSIONS}/erin-example-com-grant-nothere0{path}")
        assert hidden.replace(ids["erin"], "X") == absent.replace("erin-example-com-grant-nothere0", "X")
    erin_exec = next(c["audit_id"] for c in world.calls() if c["session"] == ids["erin"] and c["cast_file"])
    not_found(world, "alice", f"{SESSIONS}/{ids['erin']}/casts/{erin_exec}")
    not_found(world, "alice", f"{SESSIONS}/{ids['alice']}/casts/{erin_exec}")  # erin's exec under alice's own session
    not_found(world, "erin", f"{SESSIONS}/{ids['alice']}")
    not_found(world, "erin", f"{SESSIONS}/{ids['anonymous']}")
    assert world.json("alice", f"{SESSIONS}/{ids['alice']}")["visible_as"] == "owner"


def test_a_reviewer_sees_the_sessions_of_the_rule_they_review(world: World) -> None:
    ids = world.ids
    rita = world.listed("rita")
    assert set(rita) - own("rita", rita) == {ids["alice"]} and rita[ids["alice"]]["visible_as"] == "reviewer"
    olga = world.listed("olga")
    assert set(olga) - own("olga", olga) == {ids["erin"]} and olga[ids["erin"]]["visible_as"] == "reviewer"
    shown = world.json("rita", f"{SESSIONS}/{ids['alice']}")
    assert shown["visible_as"] == "reviewer" and shown["user"] == "alice@example.com"
    assert {c["grant"] for c in shown["timeline"]} == {world.grants["alice"]}
    code, headers, _ = world.api("rita", f"{SESSIONS}/{ids['alice']}/har")
    assert code == 200 and headers["content-type"] == "application/json"
    # Not the other rule's sessions, nor sessions without a grant (they belong to no rule), nor anonymous ones.
    for target in (ids["erin"], ids["alice-hour"], ids["anonymous"]):
        not_found(world, "rita", f"{SESSIONS}/{target}")
        not_found(world, "rita", f"{SESSIONS}/{target}/flows")
    not_found(world, "olga", f"{SESSIONS}/{ids['alice']}/har")
    # Somebody who reviews nothing and audits nothing sees only their own.
    dave = world.listed("dave")
    assert set(dave) == own("dave", dave)
    not_found(world, "dave", f"{SESSIONS}/{ids['alice']}")


def test_an_auditor_sees_every_session(world: World) -> None:
    ids = world.ids
    carol = world.listed("carol", "?limit=1000")
    assert set(ids.values()) <= set(carol)
    assert {carol[i]["visible_as"] for i in ids.values()} == {"auditor"}
    assert carol[ids["anonymous"]]["user"] == "" and carol[ids["anonymous"]]["kind"] == "anonymous"
    for target in ids.values():
        assert world.json("carol", f"{SESSIONS}/{target}")["visible_as"] == "auditor"
        code, _, body = world.api("carol", f"{SESSIONS}/{target}/flows")
        assert code == 200 and read_flows_bytes(body, world.work / f"{target}.mitm")
    assert set(world.listed("carol", "?user=erin")) == {i for i in carol if i.startswith("erin-example-com-")}
    assert world.listed("carol", "?limit=1") and len(world.listed("carol", "?limit=1")) == 1
    for target in (ids["anonymous"], ids["erin"]):  # which is the auditor's, not everybody's
        not_found(world, "dave", f"{SESSIONS}/{target}/har")


def read_flows_bytes(data: bytes, path: Path) -> list:
    path.write_bytes(data)
    return read_flows(path)


def test_without_a_valid_token_the_answer_is_401(world: World) -> None:
    session = f"{SESSIONS}/{world.ids['alice']}"
    for target in (SESSIONS, session, session + "/har", session + "/flows"):
        for token in (None, "not-a-valid-token", world.tokens["alice"][:-4] + "AAAA"):
            code, _, body = world.api(None, target, token=token)
            assert code == 401, (target, token and token[:10], code, body[:200])
            assert b"alice@example.com" not in body and b"toolbox" not in body
        # A valid token is not enough: it must be the token of somebody allowed to see it.
        if target == SESSIONS:
            assert world.ids["alice"] not in world.listed("dave")
        else:
            not_found(world, "dave", target)


# -- what comes back -------------------------------------------------------------------------------


def test_exports_are_the_masked_recordings_without_credentials(world: World, stack, tmp_path: Path) -> None:
    ids = world.ids
    folder = world.recordings / ids["alice"]
    answers: dict[str, bytes] = {}
    code, headers, answers["har"] = world.api("alice", f"{SESSIONS}/{ids['alice']}/har")
    assert code == 200 and headers["cache-control"] == "no-store"
    assert headers["content-disposition"] == f'attachment; filename="{ids["alice"]}.har"'
    (tmp_path / "a.har").write_bytes(answers["har"])
    doc = load_har(tmp_path / "a.har")  # HAR 1.2
    stored = harfile.repaired((folder / "session.har").read_bytes())
    assert len(doc["log"]["entries"]) == len(json.loads(stored)["log"]["entries"]) >= 3
    code, headers, answers["flows"] = world.api("alice", f"{SESSIONS}/{ids['alice']}/flows")
    assert code == 200 and headers["content-type"] == "application/octet-stream"
    flows = read_flows_bytes(answers["flows"], tmp_path / "a.mitm")
    assert {f.metadata["jitgate"]["grant"] for f in flows} == {world.grants["alice"]}
    assert (folder / "flows.mitm").read_bytes().startswith(answers["flows"])
    shown = world.json("alice", f"{SESSIONS}/{ids['alice']}")
    answers["timeline"] = json.dumps(shown).encode()
    (cast,) = shown["casts"]
    code, headers, answers["cast"] = world.api("alice", f"{SESSIONS}/{ids['alice']}/casts/{cast['exec']}")
    assert code == 200 and headers["content-type"] == "application/x-asciicast"
    assert answers["cast"] == (folder / f"exec-{cast['exec']}.cast").read_bytes()
    (tmp_path / "a.cast").write_bytes(answers["cast"])
    _, events = load_cast(tmp_path / "a.cast")
    assert "".join(d for _, kind, d in events if kind == "o") == "one\r\ntwo\r\n"
    # erin's session, as its reviewer and an auditor see it: her exec printed the Secret-fed DB_PASSWORD.
    for who in ("olga", "carol"):
        code, _, answers[f"erin har for {who}"] = world.api(who, f"{SESSIONS}/{ids['erin']}/har")
        assert code == 200
        erin = world.json(who, f"{SESSIONS}/{ids['erin']}")
        code, _, answers[f"erin cast for {who}"] = world.api(who, f"{SESSIONS}/{ids['erin']}/casts/{erin['casts'][0]['exec']}")
        assert code == 200 and b"DB_PASSWORD=" in answers[f"erin cast for {who}"]
    code, _, answers["carol list"] = world.api("carol", SESSIONS)
    canaries = {"dev password": SECRET_VALUES["dev"]["password"], "prod password": SECRET_VALUES["prod"]["password"],
                "prod api token": API_TOKEN, "lab cluster token": LAB_CLUSTER_TOKEN,
                **{f"{name}'s ID token": token for name, token in world.tokens.items()}}
    assert "DB_PASSWORD=" in world.outputs["erin exec"] and "one" in world.outputs["alice exec"]
    for name, text in world.outputs.items():  # the gateway masked what kubectl printed...
        assert not [v for v in canaries.values() if v in text], name
    answered = tmp_path / "answers"  # ...and nothing the API hands out holds any of it, in any form
    answered.mkdir()
    for name, data in answers.items():
        (answered / name.replace(" ", "-")).write_bytes(data)
        assert b"k8s-aws-v1." not in data and b"X-Amz-Signature" not in data, name
    assert leaks(answered, canaries) == []
    assert world.api("dave", f"{SESSIONS}/{ids['alice']}/har")[0] == 404  # and only to those who may see it


def test_session_ids_that_leave_the_recordings_folder_are_refused(world: World) -> None:
    session = world.ids["alice"]
    (world.recordings / "index.db").stat()  # what a traversal would be after
    for bad in ("..", ".", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2E%2E%2Findex.db", "index.db", ".lock", "deletions.jsonl",
                f"{session}%2F..", f"{session}%2F..%2F{world.ids['erin']}", f"..%2F{session}", session.upper(), f"%20{session}",
                f"{session}%00", "a" * 200, f"{session}/..", f"x/../{session}"):
        for tail in ("", "/har", "/flows"):
            code, _, body = world.api("carol", f"{SESSIONS}/{bad}{tail}")  # the auditor: visibility is not what stops these
            assert code in (400, 404), (bad, tail, code, body[:200])
            assert json.loads(body)["kind"] == "Status" and b"SQLite" not in body and b"HAR" not in body[:20]
    exec_id = world.json("alice", f"{SESSIONS}/{session}")["casts"][0]["exec"]
    for bad in ("..%2Fsession.json", "..%2F..%2Findex.db", f"{exec_id}.cast", f"..%2F{session}%2Fexec-{exec_id}",
                "%2e%2e", exec_id.upper(), "session.json", "..", "x%2F..%2F..%2Fflows.mitm"):
        code, _, body = world.api("carol", f"{SESSIONS}/{session}/casts/{bad}")
        assert code in (400, 404), (bad, code, body[:200])
    assert world.api("carol", f"{SESSIONS}/{session}/casts/{exec_id}")[0] == 200
    not_found(world, "erin", f"{SESSIONS}/{session}/casts/{exec_id}")  # the right path, the wrong person


def test_every_view_and_export_is_audited(world: World) -> None:
    ids = world.ids
    session = f"{SESSIONS}/{ids['erin']}"
    assert world.api("carol", session + "/har")[0] == 200
    assert world.api("olga", session + "/flows")[0] == 200
    assert world.api("erin", session)[0] == 200
    assert world.api("alice", session + "/har")[0] == 404
    assert world.api("alice", SESSIONS)[0] == 200

    def event(username: str, action: str, uri: str) -> dict:
        found = wait_for(lambda: [e for e in world.audit(username, action) if e["requestURI"] == uri], bool)
        assert found, (username, action, uri)
        return found[-1]

    har = event("carol@example.com", "get_session_har", session + "/har")["annotations"]
    assert (har["jitgate.dev/api-session"], har["jitgate.dev/api-session-user"], har["jitgate.dev/api-session-visibility"],
            har["jitgate.dev/api-session-export"], har["jitgate.dev/decision"]) == (ids["erin"], "erin@example.com", "auditor", "har", "allow")
    assert har["jitgate.dev/api-outcome"].startswith(f"exported har {ids['erin']}.har (")
    flows = event("olga@example.com", "get_session_flows", session + "/flows")["annotations"]
    assert (flows["jitgate.dev/api-session-visibility"], flows["jitgate.dev/api-session-export"]) == ("reviewer", "flows")
    shown = event("erin@example.com", "get_session", session)["annotations"]
    assert (shown["jitgate.dev/api-session"], shown["jitgate.dev/api-session-visibility"]) == (ids["erin"], "owner")
    refused = event("alice@example.com", "get_session_har", session + "/har")
    assert refused["responseStatus"]["code"] == 404 and refused["annotations"]["jitgate.dev/decision"] == "deny"
    assert refused["annotations"]["jitgate.dev/api-session"] == ids["erin"]
    assert "jitgate.dev/api-session-user" not in refused["annotations"]  # nothing about the session it may not see
    listed = event("alice@example.com", "list_sessions", SESSIONS)["annotations"]
    assert int(listed["jitgate.dev/api-sessions-listed"]) >= 2
    # The audit log holds none of the tokens used.
    log = world.gateway.audit_path.read_text()
    assert not [name for name, token in world.tokens.items() if token in log]


# -- the CLI through the gateway -------------------------------------------------------------------


def test_the_cli_lists_shows_plays_and_exports_through_the_gateway(world: World, tmp_path: Path) -> None:
    ids = world.ids
    listed = json.loads(world.cli("rita", "-o", "json").stdout)
    assert {s["id"] for s in listed} - own("rita", {s["id"] for s in listed}) == {ids["alice"]}
    table = world.cli("alice", "--decision", "deny").stdout.decode()
    assert ids["alice-hour"] in table and ids["alice"] not in table and "SEEN AS" in table and "owner" in table
    shown = world.cli("rita", "show", ids["alice"]).stdout.decode()
    assert f"grant    {world.grants['alice']} (rule e2e-admin)" in shown and "seen as  reviewer" in shown
    assert re.search(r"create\s+pods/exec -n dev toolbox\s+101\s+allow\s+e2e-admin/" + world.grants["alice"], shown), shown
    played = world.cli("alice", "play", ids["alice"], "--speed", "1000")
    assert played.stdout == b"one\r\ntwo\r\n"
    har, flows = tmp_path / "out.har", tmp_path / "out.mitm"
    world.cli("carol", "export", ids["erin"], "--har", str(har), "--flows", str(flows))
    assert load_har(har)["log"]["entries"] and read_flows(flows)
    assert har.stat().st_mode & 0o777 == 0o600 and flows.stat().st_mode & 0o777 == 0o600
    # Refused the gateway's way: its message, exit status 1; nothing written.
    denied = world.cli("rita", "export", ids["erin"], "--har", str(tmp_path / "no.har"), check=False)
    assert denied.returncode == 1 and b"no session" in denied.stderr and not (tmp_path / "no.har").exists()
    assert world.cli("dave", "show", ids["alice"], check=False).returncode == 1
    mixed = subprocess.run([JITGATE, "sessions", "--dir", str(world.recordings), "--server", world.gateway.reverse_url("dev")],
                           capture_output=True, text=True)
    assert mixed.returncode == 2 and "--dir" in mixed.stderr


def test_the_cli_opens_a_downloaded_session_in_mitmweb(world: World) -> None:
    import os

    env = {**os.environ, "JITGATE_TOKEN": world.tokens["rita"]}
    proc = subprocess.Popen([JITGATE, "sessions", "open", world.ids["alice"], "--server", world.gateway.reverse_url("dev"),
                             "--ca", str(world.gateway.ca_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = proc.stdout.readline()
        assert "mitmweb: http://127.0.0.1:" in url, url + (proc.stdout.read() if proc.poll() is not None else "")
        password = proc.stdout.readline().split(": ", 1)[1].strip()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", url).group(1))
        count = sum(c["session"] == world.ids["alice"] for c in world.calls())
        flows = web_flows(port, password, want=count)
        assert len(flows) == count and all(world.grants["alice"] in f["comment"] for f in flows)
        (temp,) = [Path(p) for p in _mitmweb_reads(proc.pid)]
        assert temp.parent.stat().st_mode & 0o777 == 0o700 and temp.stat().st_mode & 0o777 == 0o600
    finally:
        stop(proc)
    assert not temp.parent.exists(), "the downloaded flow file outlived `jitgate sessions open`"
    # Not for somebody who may not see it: nothing is downloaded, no viewer starts.
    env["JITGATE_TOKEN"] = world.tokens["olga"]
    refused = subprocess.Popen([JITGATE, "sessions", "open", world.ids["alice"], "--server", world.gateway.reverse_url("dev"),
                                "--ca", str(world.gateway.ca_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = refused.communicate(timeout=60)
    finally:
        stop(refused)  # SIGTERM: a viewer it should not have started ends with it
    assert refused.returncode == 1 and "no session" in err and "mitmweb:" not in out


def _mitmweb_reads(parent_pid: int) -> list[str]:
    """The flow file the mitmweb child of `parent_pid` was started with (`-r FILE`)."""
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()
    files = []
    for child in children:
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"-r" in argv:
            files.append(argv[argv.index(b"-r") + 1].decode())
    return files


# -- the handler against docs/openapi.yaml, and the policy section (no gateway) --------------------

from jitgate.api.access_api import MAX_BODY, SESSION_ROUTES, AccessAPI  # noqa: E402
from jitgate.identity.oidc import Identity  # noqa: E402

T0 = 1_700_000_000.0
AUDIT_ID = "6f1c2e0a-7b8d-4e0f-9a1b-2c3d4e5f6a7b"


def person(name: str, *groups: str) -> Identity:
    return Identity(username=f"{name}@example.com", groups=tuple(f"oidc:{g}" for g in groups),
                    issuer="https://idp.example.com", subject=name, expires_at=T0 + 86400)


def _doc() -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load((Path(__file__).resolve().parents[1] / "docs/openapi.yaml").read_text())


def _recordings(root: Path) -> str:
    """A recordings folder as the gateway writes it: one grant session of alice with one exec."""
    from jitgate.recording import flowfile
    from jitgate.recording.har import HarFile
    from jitgate.recording.index import Index, call_row
    from jitgate.recording.sessions import session_for

    root.mkdir(mode=0o700)
    record = {"auditID": AUDIT_ID, "decision": "allow", "cluster": "dev", "grant": "grant-abc", "rule": "dev-read",
              "user": {"username": "alice@example.com", "groups": ["oidc:developers"]},
              "request": {"verb": "create", "resource": "pods", "subresource": "exec", "namespace": "dev", "name": "toolbox"}}
    ref = session_for(record, T0)
    folder = root / ref.id
    folder.mkdir(mode=0o700)
    (folder / "flows.mitm").write_bytes(flowfile.dumps({"id": "1", "metadata": {"jitgate": record}}))
    HarFile(folder / "session.har", ref.id, 1 << 20).close()
    (folder / f"exec-{AUDIT_ID}.cast").write_text('{"version": 2, "width": 80, "height": 24, "timestamp": 1700000000}\n[0.1, "o", "hi"]\n')
    index = Index(root / "index.db")
    index.add_session(ref, T0)
    index.add_call(call_row(ref.id, record, T0, 101, "/api/v1/namespaces/dev/pods/toolbox/exec?command=sh", 5.0,
                            f"exec-{AUDIT_ID}.cast"))
    index.close()
    return ref.id


def _views(root: Path, **policy):
    from jitgate.api.sessions_api import SessionViews
    from jitgate.policy.sessions import SessionsPolicy
    from tests.test_api import parse_rules

    rules = parse_rules(root.parent)  # dev-read: reviewed by oidc:sre and oidc:security
    return SessionViews(root, lambda: rules, lambda: SessionsPolicy(**policy))


def test_the_sessions_routes_answer_as_docs_openapi_yaml_says(tmp_path: Path, monkeypatch) -> None:
    from openapi_schema_validator import OAS31Validator

    import jitgate.api.sessions_api as sessions_api

    doc = _doc()
    session = _recordings(tmp_path / "recordings")
    alice = person("alice", "developers")
    targets = {"list_sessions": SESSIONS, "get_session": f"{SESSIONS}/{session}", "get_session_har": f"{SESSIONS}/{session}/har",
               "get_session_flows": f"{SESSIONS}/{session}/flows", "get_session_cast": f"{SESSIONS}/{session}/casts/{AUDIT_ID}"}
    assert set(targets) == {r.action for r in SESSION_ROUTES}
    assert doc["components"]["parameters"]["limit"]["schema"] == {
        "type": "integer", "minimum": 1, "maximum": sessions_api.MAX_LIMIT, "default": sessions_api.DEFAULT_LIMIT}

    def resolve(obj: dict) -> dict:
        while "$ref" in obj:
            node = doc
            for part in obj["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            obj = node
        return obj

    for route in SESSION_ROUTES:
        operation = doc["paths"][route.path]["get"]
        params = [resolve(p) for p in operation.get("parameters", ())]
        assert {p["name"] for p in params if p["in"] == "query"} == route.query, route.path
        views = _views(tmp_path / "recordings")
        api = AccessAPI(None, views.rules_provider, now=lambda: T0 + 60, sessions=views)
        target = targets[route.action]
        answers: dict[int, object] = {}

        def call(who=alice, path=target, body=b"", api=api):
            code, answer = api.handle("GET", path, body, who, None)
            answers.setdefault(code, answer)
            return code

        assert call() == 200
        call(who=None)
        call(who=person("system:admin"))
        call(path=target + "?nosuch=1")
        call(body=b"x" * (MAX_BODY + 1))
        call(path=target.replace(session, "bob-example-com-grant-xyz")) if route.action != "list_sessions" else None
        call(who=person("dave", "developers")) if route.action != "list_sessions" else None
        if route.action == "list_sessions":
            call(path=target + "?decision=maybe")
        if isinstance(answers[200], sessions_api.Download):
            monkeypatch.setattr(sessions_api, "MAX_DOWNLOAD", 10)
            call()
            monkeypatch.undo()
            assert set(operation["responses"]["200"]["content"]) == {answers[200].content_type}
        call(api=AccessAPI(None, views.rules_provider, sessions=None))  # a gateway that keeps no recordings
        broken = _views(tmp_path / "recordings")
        broken.policy_provider = lambda: 1 / 0
        call(api=AccessAPI(None, views.rules_provider, sessions=broken))
        damaged = tmp_path / f"damaged-{route.action}"
        shutil.copytree(tmp_path / "recordings", damaged)
        (damaged / "index.db").write_bytes(b"not a database" * 100)
        call(api=AccessAPI(None, views.rules_provider, sessions=_views(damaged)))
        views.close()
        assert set(answers) == {int(c) for c in operation["responses"]}, route.path
        for code, answer in answers.items():
            if isinstance(answer, sessions_api.Download):
                continue
            schema = resolve(operation["responses"][str(code)])["content"]["application/json"]["schema"]
            OAS31Validator({**schema, "components": doc["components"]}).validate(answer)
    assert set(doc["paths"][f"{SESSIONS}/{{id}}"]["get"]["responses"]) == {"200", "400", "401", "403", "404", "413", "500", "503"}


def test_reviewers_false_leaves_sessions_to_their_owners_and_the_auditors(tmp_path: Path) -> None:
    session = _recordings(tmp_path / "recordings")
    bob = person("bob", "sre")  # reviews dev-read
    for policy, seen in (({}, "reviewer"), ({"reviewers": False}, None), ({"reviewers": False, "auditors": ("oidc:sre",)}, "auditor")):
        views = _views(tmp_path / "recordings", **policy)
        api = AccessAPI(None, views.rules_provider, sessions=views)
        code, answer = api.handle("GET", f"{SESSIONS}/{session}", b"", bob, None)
        assert (code, answer.get("visible_as")) == ((200, seen) if seen else (404, None)), (policy, answer)
        code, answer = api.handle("GET", SESSIONS, b"", bob, None)
        assert [s["id"] for s in answer["items"]] == ([session] if seen else [])
        views.close()


@pytest.mark.parametrize("text, where, message", [
    ("sessions:\n  auditors: [oidc:ok, \"system:masters\"]\n", ":2: sessions.auditors[1]", "reserved \"system:\" prefix"),
    ("sessions:\n  reviewers: [oidc:sre]\n", ":2: sessions.reviewers", "expected true or false"),
    ("sessions:\n  auditor: [oidc:x]\n", ":2: sessions.auditor", "unknown field"),
    ("sessions: [oidc:x]\n", ":1: sessions", "expected a mapping"),
])
def test_a_wrong_sessions_section_names_its_file_and_line(tmp_path: Path, stack, text: str, where: str, message: str) -> None:
    from jitgate.policy.document import PolicyError
    from jitgate.policy.loader import load_policy

    folder = tmp_path / "policy"
    folder.mkdir()
    shutil.copy(stack.policy, folder / "a.yaml")
    shutil.copy(stack.policy.parent / "lab-token", folder / "lab-token")
    (folder / "b.yaml").write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(folder)
    assert f"b.yaml{where}" in str(e.value) and message in str(e.value), str(e.value)
    (folder / "b.yaml").write_text("sessions:\n  auditors: oidc:audit\n  reviewers: false\n")
    assert load_policy(folder).sessions.auditors == ("oidc:audit",) and not load_policy(folder).sessions.reviewers
    (folder / "c.yaml").write_text("sessions: {auditors: [x]}\n")
    with pytest.raises(PolicyError, match="already defined in an earlier file"):
        load_policy(folder)
