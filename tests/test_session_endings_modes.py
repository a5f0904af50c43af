"""Ending a session says why in every proxy mode and HTTP version.

Real kubectl through one real gateway, in reverse mode (kubeconfig `server:` at the gateway) and in
regular mode (kubeconfig `proxy-url:`, a CONNECT tunnel), with kubectl on HTTP/2 (its default) or
HTTP/1.1 (`DISABLE_HTTP2`, client-go's switch), to a stand-in that speaks HTTP/1.1 only or one that
offers HTTP/2 as kube-apiserver does. A revoked grant ends `get -w` (a quiet watch) with an ERROR
event, `logs -f` with a final line and `exec` (WebSocket, always HTTP/1.1) with a Status on the
error channel; kubectl prints each, and the audit says `termination-notice: sent`.

The gateway offers the cluster what the client offered, so HTTP/2 reaches the cluster only from an
HTTP/2 client: the cases are client/cluster h2/h2, h2/h1 (an HTTP/1.1-only cluster) and h1/h1.
First, in process: the route that takes the gateway's last words to the flow's own stream.
"""

from __future__ import annotations

import subprocess
import textwrap
import time

import pytest
from mitmproxy.options import Options
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpLayer,
    HTTPMode,
    HttpStream,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
)
from mitmproxy.test import tflow

from jitgate.chain import flow as chain_flow
from testkit.gateway import GatewayProcess
from testkit.standin.process import KUBECTL, StandinProcess, kubectl_env, read_until
from tests.conftest import ALICE
from tests.test_session_endings import finish
from tests.test_self_review import Env

CLUSTER_TOKEN = "modes-cluster-token-held-by-the-gateway"
HOSTS = {"h1": "api.h1.jitgate.test", "h2": "api.h2.jitgate.test"}  # names only the gateway maps
ENDED = "jitgate: this session ended: grant revoked by rita@example.com"

RULES = """\
access_rules:
  - name: modes-work
    requesters: [oidc:developers]
    clusters: [h1, h2]
    namespaces: [dev]
    resources: [pods, pods/log, pods/exec]
    verbs: [get, list, watch, create]
    duration: {default: 10m, max: 1h}
    approval: {mode: reviewers, reviewers: [oidc:sre], required: 1}
"""


# --- the route of a delivery, in process (jitgate.chain.flow) --------------------------------


def recording(node: layer.Layer) -> list[events.Event]:
    """Replace a layer's handler with one that records the events it gets."""
    seen: list[events.Event] = []

    def handle(event: events.Event):
        seen.append(event)
        yield from ()

    node._handle_event = handle
    return seen


def test_a_delivery_goes_down_its_path_and_everything_else_to_mitmproxy() -> None:
    http_layer = HttpLayer(Context(tflow.tclient_conn(), Options()), HTTPMode.transparent)
    http_layer._handle_event = chain_flow._DeliveryRoute(http_layer)
    list(http_layer.handle_event(events.Start()))
    assert http_layer.connections, "any other event is mitmproxy's HttpLayer's (Start set up the client side)"

    tunnel, target = HttpStream(http_layer.context.fork(), 1), HttpStream(http_layer.context.fork(), 3)
    http_layer.streams.update({1: tunnel, 3: target})
    in_tunnel, at_target = recording(tunnel), recording(target)
    cluster = layer.NextLayer(target.context.fork())
    http_layer.connections[target.context.server] = cluster
    at_cluster = recording(cluster)

    # A hop on the way (a CONNECT stream) gets the delivery itself, to pass on into its tunnel.
    on_the_way = chain_flow._Delivery(tflow.tflow(), (http_layer, tunnel), target, [], detach=True)
    list(http_layer.handle_event(on_the_way))
    assert in_tunnel == [on_the_way] and at_target == []

    # The flow's own stream gets the events, with its own id; then nothing more reaches it, and the
    # cluster's side of it is cancelled.
    target.server_state = target.state_stream_response_body
    ending = [ResponseData(3, b"last words\n"), ResponseEndOfMessage(3)]
    delivery = chain_flow._Delivery(tflow.tflow(), (http_layer, target), target, ending, detach=True)
    list(http_layer.handle_event(delivery))
    assert at_target == ending and 3 not in http_layer.streams and 1 in http_layer.streams
    assert [(type(e), e.stream_id, e.code) for e in at_cluster] == [(RequestProtocolError, 3, ErrorCode.CANCEL)]

    # A stream that has ended meanwhile, or whose response has, is left alone.
    list(http_layer.handle_event(delivery))
    http_layer.streams[3] = target
    target.server_state = target.state_done
    list(http_layer.handle_event(delivery))
    assert at_target == ending and len(at_cluster) == 1


# --- through the gateway ----------------------------------------------------------------------


class ModesEnv(Env):
    """A gateway in front of an HTTP/1.1-only stand-in (`h1`) and one that offers HTTP/2 (`h2`)."""

    def __init__(self, ca, idp, work) -> None:  # sets what Env's kubeconfig, grant and revoke use
        self.work = work
        # A chatty log (a line every 50 ms): the notice must still be its last line.
        self.clusters = {name: StandinProcess(work / name).start(ca, tokens=[CLUSTER_TOKEN], hostnames=[host],
                                                                 h2=name == "h2", log_interval=0.05)
                         for name, host in HOSTS.items()}
        (work / "cluster-token").write_text(CLUSTER_TOKEN + "\n")
        clusters = "".join(textwrap.dedent(f"""\
              - name: {name}
                endpoint: https://{HOSTS[name]}
                connect: 127.0.0.1:{api.port}
                ca_file: {ca.cert_path}
                credential:
                  token_file: {work / "cluster-token"}
            """) for name, api in self.clusters.items())
        self.policy = work / "policy.yaml"
        self.policy.write_text(RULES + "clusters:\n" + textwrap.indent(clusters, "  ") + idp.policy_section())
        self.store = work / "grants.db"
        self.gateway = GatewayProcess(work / "gw", self.policy,
                                      reverse_endpoints={name: f"https://{host}" for name, host in HOSTS.items()},
                                      options={"grant_store": str(self.store)}).start()
        self.token = idp.token("alice", email=ALICE[0], email_verified=True, groups=["developers"])

    def stop(self) -> None:
        self.gateway.stop()
        for api in self.clusters.values():
            api.stop()


@pytest.fixture(scope="module")
def env(ca, idp, tmp_path_factory: pytest.TempPathFactory):
    e = ModesEnv(ca, idp, tmp_path_factory.mktemp("session-endings-modes"))
    yield e
    e.stop()


# (kubectl's HTTP version, the stand-in it reaches): an HTTP/1.1 client reaches the stand-in that
# offers HTTP/2, which shows the gateway keeps to HTTP/1.1 there.
@pytest.mark.parametrize(("client", "cluster"), [("h2", "h2"), ("h2", "h1"), ("h1", "h2")], ids=["h2-h2", "h2-h1", "h1-h1"])
@pytest.mark.parametrize("mode", ["reverse", "proxy"])
def test_a_revoked_grant_ends_each_session_with_its_reason(env: ModesEnv, mode: str, client: str, cluster: str) -> None:
    config = env.kubeconfig(cluster, mode)
    kube_env = kubectl_env(config)
    if client == "h1":
        kube_env["DISABLE_HTTP2"] = "1"

    def kubectl(*args: str) -> subprocess.Popen:
        return subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kube_env)

    api = env.clusters[cluster]
    api.clear_seen()
    grant = env.grant(cluster, ("dev",), ("pods", "pods/log", "pods/exec"), ("get", "list", "watch", "create"))
    revoked = False
    watch = kubectl("get", "pods", "-n", "dev", "-w")
    logs = kubectl("logs", "-f", "-n", "dev", "toolbox")
    shell = kubectl("exec", "-n", "dev", "toolbox", "--", "sh", "-c", "echo started; sleep 60")
    try:
        assert b"toolbox" in read_until(watch.stdout, b"toolbox")
        assert logs.stdout.readline()
        assert shell.stdout.readline() == b"started\n"
        env.revoke(grant)
        revoked, revoked_at = True, time.monotonic()
        code, out, err = finish(watch)
        assert "Forbidden   " + ENDED in out, (out, err)  # kubectl prints the ERROR event's Status
        assert f"jitgate request --cluster {cluster}" in out, out
        code, out, err = finish(logs)
        assert ENDED in out.splitlines()[-1], out[-500:]  # the last line: nothing of the cluster after it
        assert "unexpected EOF" not in err, err
        code, out, err = finish(shell)
        assert code != 0 and ENDED in err, (code, out, err)
        assert time.monotonic() - revoked_at < 10, "the quiet watch got its notice promptly"
    finally:
        for proc in (watch, logs, shell):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if not revoked:
            env.revoke(grant)

    # The combination this case is about reached the cluster (exec's WebSocket is HTTP/1.1 always).
    seen = {(r["path"].rsplit("/", 1)[-1], r["protocol"]) for r in api.requests_seen() if r["path"].startswith("/api/v1/")}
    expected = "HTTP/2" if client == cluster == "h2" else "HTTP/1.1"
    assert {("pods", expected), ("log", expected), ("exec", "HTTP/1.1")} <= seen, seen

    deadline = time.monotonic() + 10
    while True:  # an exec session's last event is written as the gateway closes it, after the notice
        events = [e for e in env.gateway.audit_events() if e["stage"] == "ResponseComplete"
                  and e["annotations"].get("jitgate.dev/grant") == grant
                  and e["annotations"].get("jitgate.dev/terminated", "").startswith("grant revoked")]
        if {e["objectRef"].get("subresource", "") for e in events} >= {"", "log", "exec"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(e["objectRef"].get("subresource", "") for e in events) == ["", "exec", "log"], events
    assert all(e["annotations"]["jitgate.dev/termination-notice"] == "sent" for e in events), events
    assert "has crashed" not in env.gateway.log()
