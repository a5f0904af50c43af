"""The jitgate benchmark: direct vs bare mitmdump vs the full gateway, side by side in one run.

    scripts/benchmark            # full run (< 10 minutes on 2 cores)
    scripts/benchmark --quick    # a minute or two: one concurrency, fewer rounds, smaller curves
    scripts/benchmark --rounds 9 # more rounds per row: a tighter median on a noisy machine

Starts nginx (the Kubernetes API stand-in and the OIDC issuer, canned bodies over TLS), STS
(moto_server), bare mitmdump and the gateway (same listeners and options), then measures every
combination of mode (reverse, regular), connection reuse and concurrency, the scaling curves and
memory per idle watch.

Each combination is one row: direct once, then --rounds short rounds of --duration seconds in
which bare mitmdump and the gateway run back to back (bare, gateway, gateway, bare, ...). Every
round gives one gateway/bare ratio; the row reports their median, min-max and spread, and the
CPU-per-request ratio beside it. A row whose ratios spread over more than 10 percentage points is
flagged as too wide to judge: the machine's other load moved it more than the gateway did.

Writes results/bench-<stamp>/ (report.md, results.json, PNG plots, logs) and results/latest.md,
and prints the headline ratios. Everything it starts is stopped by its handle, also on Ctrl-C and
errors.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jitgate.cli.client import ApiError, Client, ClientError, Connection, StaticToken  # noqa: E402
from jitgate.policy.loader import load_policy  # noqa: E402
from scripts.bench import bodies, curves, load, report, watches  # noqa: E402
from scripts.bench import guardrail_approval as bench_approval  # noqa: E402
from scripts.bench import guardrails as bench_guardrails  # noqa: E402
from scripts.bench import mcp_front as bench_mcp  # noqa: E402
from scripts.bench import self_review as bench_self_review  # noqa: E402
from scripts.bench.proxies import ProcStat, ProxyProcess  # noqa: E402
from scripts.bench.upstream import (  # noqa: E402
    CLUSTER_NAME,
    NAMESPACE,
    Backends,
    WatchServer,
    gateway_env,
)

MODES = ("reverse", "regular")
CONCURRENCY = (1, 10, 50)
PAIR = ("bare", "gateway")
PHASE_PAUSE = 0.3  # lets closed connections drain between phases
PROFILE_RATE = 400  # samples/s; --nonblocking, so the proxy is never paused
# Steps whose cost the benchmark reports on their own (issue targets: masking ≤ 3 points of the full
# chain's ratio against bare mitmdump, recording ≤ 10).
FEATURE_STEPS = ("masking", "recording")
# Every measured call pays the whole recording: the benchmark's one session would reach the default
# HAR cap (256m) after about 3,600 calls of its 52 KB body, and later calls would skip the HAR.
GATEWAY_OPTIONS = {"recording_har_max_bytes": "100g"}
VARIANT_SCRIPT = REPO / "scripts" / "bench" / "gateway_variant.py"


class Bench:
    """One benchmark run: the processes it started, and the results it collects."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack, workdir: Path) -> None:
        self.args = args
        self.stack = stack
        self.workdir = workdir
        cpus = sorted(os.sched_getaffinity(0))
        self.pinning = not args.no_pin and len(cpus) >= 2
        # The proxy under test gets a core of its own; upstream, load generators and this driver share
        # the other. A mitmdump process runs on one core at a time anyway (one event loop, the GIL).
        self.side_cpus = {cpus[0]} if self.pinning else None
        self.proxy_cpus = {cpus[1]} if self.pinning else None
        if self.side_cpus:
            os.sched_setaffinity(0, self.side_cpus)
        self.backends: Backends | None = None
        self.proxies: dict[str, ProxyProcess] = {}
        self.runs: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.counted_from: dict[str, Any] = {}
        self.log = print

    # -- processes ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.log(f"bench: starting nginx, {'' if self.args.no_sts else 'STS (moto_server), '}bare mitmdump and the gateway ...")
        self.backends = Backends.start(self.workdir / "backends", cpus=self.side_cpus, with_sts=not self.args.no_sts)
        self.stack.callback(self.backends.stop)
        b = self.backends
        policy = b.write_policy(self.workdir / "policy.yaml", b.nginx.api_url)
        env = gateway_env(self.workdir)
        for name, kwargs in (("bare", {}), ("gateway", {"policy": policy, "env": env, "extra_options": GATEWAY_OPTIONS})):
            proxy = ProxyProcess(name, self.workdir, b.nginx.api_url, b.ca.cert_path, cpus=self.proxy_cpus, **kwargs)
            self.stack.callback(proxy.stop)
            self.proxies[name] = proxy.launch()
        for proxy in self.proxies.values():
            proxy.wait_ready()
        self.grant_access(self.proxies["gateway"])

    def grant_access(self, gateway: ProxyProcess) -> None:
        """The just-in-time flow, through the gateway's access API as the CLI does it: the user asks to
        read pods (approved at once by its rule) and Secrets (approved by a reviewer)."""
        b = self.backends

        def client(token: str) -> Client:
            return Client(Connection(gateway.reverse_url, StaticToken(token), ca_file=self.proxy_ca(gateway.name)))

        user, reviewer = client(b.token), client(b.reviewer_token)
        # The listeners open before mitmproxy's `running` hooks have set up the access API.
        deadline = time.monotonic() + 20
        while True:
            try:
                user.whoami()
                break
            except ApiError as e:
                if e.code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            except ClientError as e:  # not answered at all: say what became of the process
                state = "running" if gateway.alive() else f"exited with {gateway.proc.returncode}"
                raise RuntimeError(f"{gateway.name} ({state}) did not answer: {e}\n{gateway.log_tail()}") from None
        common = {"cluster": CLUSTER_NAME, "namespaces": [NAMESPACE], "duration": "8h", "reason": "benchmark"}
        pods = user.create_request({**common, "resources": ["pods"], "verbs": ["get", "list", "watch"]})
        secrets = user.create_request({**common, "resources": ["secrets"], "verbs": ["get", "list"]})
        approved = reviewer.decide(secrets["id"], "approve", "benchmark")
        if (pods["state"], approved["state"]) != ("approved", "approved"):
            raise RuntimeError(f"{gateway.name}: access requests not approved: pods {pods['state']}, "
                               f"secrets {approved['state']}")

    def proxy_ca(self, name: str) -> Path:
        return self.proxies[name].workdir / "confdir" / "mitmproxy-ca-cert.pem"

    def target(self, name: str, mode: str, path: str = bodies.PODS_PATH, authenticated: bool = True,
               verify: bool = False) -> load.Target:
        """Where a load generator sends requests for `name` (direct, bare, gateway) in `mode`."""
        b = self.backends
        token = b.token if authenticated else None
        if name == "direct":
            return load.Target(b.nginx.api_url + path, token, ca_file=b.ca.cert_path if verify else None)
        proxy = self.proxies[name]
        ca = self.proxy_ca(name) if verify else None
        if mode == "reverse":
            return load.Target(proxy.reverse_url + path, token, ca_file=ca)
        return load.Target(b.nginx.api_url + path, token, proxy=proxy.regular_proxy, ca_file=ca)

    # -- checks ------------------------------------------------------------------------------------

    def check_chain(self) -> None:
        """Before measuring: every canned path answers 200 through the gateway in both modes, and a call
        without a token is refused, so the numbers are of the full chain doing its work."""
        for mode in MODES:
            for path in bodies.API_PATHS:
                result = load.run_python(self.target("gateway", mode, path, verify=True), 1, 10, True, max_requests=1)
                if result.ok != 1:
                    raise RuntimeError(f"gateway ({mode}) did not answer {path}: {result.note}\n"
                                       f"{self.proxies['gateway'].log_tail()}")
            refused = load.run_python(self.target("gateway", mode, authenticated=False, verify=True), 1, 10, True, max_requests=1)
            if refused.note != "HTTP 401":
                raise RuntimeError(f"gateway ({mode}) did not refuse a call without a token: {refused}")
        self.log("bench: the gateway answers every canned path in both modes and refuses calls without a token")

    # -- load --------------------------------------------------------------------------------------

    def generator(self, mode: str) -> tuple[str, Callable[..., load.LoadResult]]:
        return load.generator_for(mode == "regular", prefer_native=not self.args.python_load)

    def warm_up(self, seconds: float = 1) -> None:
        """Connections, certificates, discovery/JWKS and the STS session: paid once, before counting."""
        for mode in MODES:
            _, run = self.generator(mode)
            for name in ("bare", "gateway"):
                for keepalive in (True, False):
                    run(self.target(name, mode), 2, seconds, keepalive, cpus=self.side_cpus)
        time.sleep(PHASE_PAUSE)

    def phase(self, mode: str, keepalive: bool, connections: int, name: str,
              round_index: int | None = None) -> dict[str, Any]:
        tool, run = self.generator(mode)
        proxy = self.proxies.get(name)
        nginx_stats = [ProcStat(pid) for pid in self.backends.nginx.worker_pids()]
        nginx_before = sum(s.cpu_seconds() for s in nginx_stats)
        if proxy is not None:
            proxy.stat.reset_peak()
            cpu_before = proxy.stat.cpu_seconds()
        result = run(self.target(name, mode), connections, self.args.duration, keepalive, cpus=self.side_cpus)
        row: dict[str, Any] = {
            "mode": mode, "keepalive": keepalive, "connections": connections, "target": name, "round": round_index,
            "tool": result.tool,
            "ok": result.ok, "errors": result.errors, "seconds": round(result.seconds, 3), "rps": result.rps,
            "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "note": result.note,
        }
        handled = max(1, result.ok + result.errors)
        row["upstream_cpu_s_per_1k"] = (sum(s.cpu_seconds() for s in nginx_stats) - nginx_before) / handled * 1000
        if proxy is not None:
            cpu = proxy.stat.cpu_seconds() - cpu_before
            row["cpu_s_per_1k"] = cpu / handled * 1000
            row["peak_rss_mb"] = proxy.stat.peak_rss_kb() / 1024
            if not proxy.alive():
                raise RuntimeError(f"{name} exited during {mode} c={connections}:\n{proxy.log_tail()}")
        time.sleep(PHASE_PAUSE)
        return row

    def row(self, mode: str, keepalive: bool, connections: int,
            done: Callable[[dict[str, Any]], None] = lambda run: None) -> list[dict[str, Any]]:
        """One headline row: direct once (the reference), then `--rounds` short rounds of bare mitmdump
        and the gateway back to back. A shared machine's load drifts over seconds: short rounds put
        both proxies under nearly the same load, so each round's ratio is fair, and the median of the
        ratios ignores a round that a burst of other load spoiled. `done` sees each run as it ends."""
        runs = []
        for round_index in [None] + list(range(self.args.rounds)):
            if round_index is None:
                names: tuple[str, ...] = ("direct",)
            else:
                # Who goes first alternates (bare, gateway, gateway, bare, ...): drift within a row
                # then favours neither, and each round's two runs stay next to each other.
                names = PAIR if round_index % 2 == 0 else PAIR[::-1]
            for name in names:
                run = self.phase(mode, keepalive, connections, name, round_index)
                runs.append(run)
                done(run)
        return runs

    def matrix(self) -> None:
        concurrency = self.args.concurrency
        total = len(MODES) * 2 * len(concurrency) * (1 + 2 * self.args.rounds)
        count = 0

        def progress(run: dict[str, Any]) -> None:
            nonlocal count
            count += 1
            where = "" if run["round"] is None else f" round {run['round'] + 1}"
            self.log(f"bench: [{count:3}/{total}] {run['mode']:<7} {'keep-alive' if run['keepalive'] else 'new-conn':<10} "
                     f"c={run['connections']:<3} {run['target']:<8}{where:<9} {run['rps']:9.1f} req/s  "
                     f"p50 {run['p50_ms']:7.2f} ms  p99 {run['p99_ms']:7.2f} ms"
                     + (f"  errors {run['errors']}" if run["errors"] else ""))

        for mode in MODES:
            for keepalive in (True, False):
                for connections in concurrency:
                    runs = self.row(mode, keepalive, connections, progress)
                    self.runs += runs
                    for line in report.headline({"runs": runs}):
                        self.log("bench:" + report.headline_line(line))

    def start_counting(self) -> None:
        """Steady state starts here: calls to the IdP and STS from now on should not happen."""
        b = self.backends
        self.counted_from = {"oidc": b.nginx.oidc_hits(), "sts": b.assume_role_calls(), "audit": self.audit_lines(),
                             "runs": len(self.runs)}

    def steady_state(self) -> dict[str, Any]:
        b, start = self.backends, self.counted_from
        oidc_calls = b.nginx.oidc_hits() - start["oidc"]
        sts_calls = None if start["sts"] is None else b.assume_role_calls() - start["sts"]
        requests = sum(r["ok"] + r["errors"] for r in self.runs[start["runs"]:] if r["target"] == "gateway")
        return {
            "oidc_calls": oidc_calls, "sts_calls": "n/a (--no-sts)" if sts_calls is None else sts_calls,
            "oidc_per_1k": oidc_calls / requests * 1000 if requests else None,
            "sts_per_1k": sts_calls / requests * 1000 if requests and sts_calls is not None else None,
            "gateway_requests": requests, "audit_events": self.audit_lines() - start["audit"],
            "warmup_oidc_calls": start["oidc"], "warmup_sts_calls": start["sts"],
        }

    def pinning_description(self) -> str:
        if not self.pinning:
            return "off"
        return f"proxy on CPU {sorted(self.proxy_cpus)}, upstream + load generators on CPU {sorted(self.side_cpus)}"

    def audit_lines(self) -> int:
        path = self.proxies["gateway"].workdir / "audit.log"
        with path.open("rb") as f:
            return sum(1 for _ in f)

    # -- profile -----------------------------------------------------------------------------------

    def profile(self, outdir: Path) -> dict[str, Any] | None:
        """py-spy on bare mitmdump and on the gateway, each during the same reverse keep-alive load: where
        the CPU goes in each (collapsed stacks, summarized) and a flame graph of the gateway."""
        pyspy = Path(sys.executable).with_name("py-spy")
        if not pyspy.exists():
            self.notes.append("profile skipped: py-spy is not installed in .venv (pip install py-spy)")
            return None
        connections, seconds = 10, max(3, self.args.duration)
        found: dict[str, Any] = {"phase": f"reverse mode, keep-alive, {connections} connections, {seconds} s each"}
        for name, fmt, out in (("bare", "raw", outdir / "profile-bare.txt"),
                               ("gateway", "raw", outdir / "profile-gateway.txt"),
                               ("gateway", "flamegraph", outdir / "profile.svg")):
            spy = subprocess.Popen([str(pyspy), "record", "--pid", str(self.proxies[name].proc.pid), "--duration",
                                    str(seconds), "--rate", str(PROFILE_RATE), "--nonblocking", "--format", fmt,
                                    "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)  # attached before the load starts
            self.generator("reverse")[1](self.target(name, "reverse"), connections, seconds, True, cpus=self.side_cpus)
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0:
                self.notes.append(f"profile failed: py-spy: {err.strip()[-300:]}")
                return None
            if fmt == "raw":
                found[name] = summarize_profile(out.read_text())
        found["svg"] = True
        return found

    # -- curves and watches ------------------------------------------------------------------------

    def curves(self, max_size: int, calls: int = 20_000) -> tuple[list[dict], list]:
        """The in-process scaling curves, up to `max_size` identities, grants, extra guardrail rules,
        access rules (x 10) and masked bytes (x 5,000), each point timed over `calls` calls, the
        masking ratios on lists of `calls` / 4 objects and a watch of `calls` events (the smoke test
        asks for few)."""
        b = self.backends
        policy = load_policy(self.workdir / "policy.yaml")
        identities = [c for c in curves.IDENTITY_COUNTS if c <= max_size]
        grants = [c for c in curves.GRANT_COUNTS if c <= max_size]
        rules = [c for c in curves.RULE_COUNTS if c <= max_size * 10]
        self.log(f"bench: curves: identity cache up to {max(identities):,}, grants up to {max(grants):,}, "
                 f"access rules up to {max(rules):,} ...")
        found = [curves.identity_cache_curve(b.issuer, str(b.ca.cert_path), identities),
                 curves.grant_decision_curve(policy, grants),
                 curves.rule_decision_curve(policy, rules, calls)]
        found.append(curves.masking_curve(max_size * 5_000, secret_items=calls // 4, watch_events=calls))
        extra_rules = tuple(c for c in bench_guardrails.EXTRA_COUNTS if c <= max_size)  # default pack + extra rules
        found.append(bench_guardrails.decision_curve(extra_rules, calls))
        found.append(bench_approval.approval_curve(max(100, calls // 10)))  # digest and permit transaction
        found.append(bench_self_review.cost_curve(calls))  # kubectl auth whoami/can-i: the guard every call pays
        # Copies: a curve object may be reused by its module afterwards (one CI run reported empty
        # curves that had been measured); the results must keep what was measured.
        return [copy.deepcopy(vars(c)) for c in found], curves.request_parsing_costs(max(250, calls // 4))

    def watch_memory(self, counts: tuple[int, ...], proxies: tuple[str, ...] = ("bare", "gateway")) -> list[dict]:
        b = self.backends
        server = WatchServer(self.workdir, b.server_cert, b.server_key, cpus=self.side_cpus)
        self.stack.callback(server.stop)
        server.start()
        policy = b.write_policy(self.workdir / "watch-policy.yaml", server.url)
        found = []
        for name, kwargs in (("bare-watch", {"extra_options": {"stream_large_bodies": "1"}}),
                             ("gateway-watch", {"policy": policy, "env": gateway_env(self.workdir)})):
            if name.removesuffix("-watch") not in proxies:
                continue
            self.log(f"bench: {name}: memory with {', '.join(map(str, counts))} idle watches ...")
            proxy = ProxyProcess(name, self.workdir, server.url, b.ca.cert_path, cpus=self.proxy_cpus, **kwargs)
            self.stack.callback(proxy.stop)
            proxy.start()
            self.proxies[name] = proxy
            if proxy.is_gateway:
                self.grant_access(proxy)
            result = watches.idle_watch_memory(proxy, self.proxy_ca(name), b.token if proxy.is_gateway else None, counts)
            proxy.stop()
            found.append({"proxy": "bare mitmdump" if name == "bare-watch" else "jitgate gateway",
                          "baseline_kb": result.baseline_kb, "points": result.points,
                          "per_watch_kb": result.per_watch_kb(), "failures": result.failures[:3]})
        return found

    def feature_costs(self, mode: str = "reverse", connections: int = 10) -> dict[str, Any]:
        """What masking and recording each cost the full chain, in points of its ratio against bare
        mitmdump: the gateway without the step (scripts/bench/gateway_variant.py) runs in the same
        rounds as bare mitmdump and the full gateway, the order rotating from round to round."""
        b = self.backends
        policy = self.workdir / "policy.yaml"
        variants = {f"without-{step}": step for step in FEATURE_STEPS}
        # A fresh full chain beside the fresh variants: all start with the same empty state (store,
        # recordings, caches), so what differs between them is the step alone.
        started = {"full": ""} | variants
        step_times = self.workdir / "full-step-times.json"  # the full chain times its steps' hooks too
        for name, step in started.items():
            # The variants time theirs as well (unread): the timing's own cost is then the same in
            # every process compared, and no part of a difference.
            env = {**gateway_env(self.workdir), "JITGATE_BENCH_WITHOUT": step,
                   "JITGATE_BENCH_STEP_TIMES": str(step_times if name == "full" else self.workdir / f"{name}-step-times.json")}
            proxy = ProxyProcess(name, self.workdir, b.nginx.api_url, b.ca.cert_path, cpus=self.proxy_cpus,
                                 policy=policy, env=env, script=VARIANT_SCRIPT, extra_options=GATEWAY_OPTIONS)
            self.stack.callback(proxy.stop)
            self.proxies[name] = proxy.launch()
        for name in started:
            self.proxies[name].wait_ready()
            self.grant_access(self.proxies[name])
        self.check_variants(variants, full="full")
        names = ("bare", "full", *variants)
        _, run = self.generator(mode)
        for name in names:  # connections and certificates of the new processes, before counting
            run(self.target(name, mode), 2, 1, True, cpus=self.side_cpus)
        self.log(f"bench: feature costs: {mode} keep-alive c={connections}, {self.args.rounds} rounds of "
                 f"{', '.join(names)} ...")
        rounds = []
        for index in range(self.args.rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            measured = {}
            for name in order:
                before = read_step_times(step_times) if name == "full" else None
                measured[name] = self.phase(mode, True, connections, name, index)
                if before is not None:
                    time.sleep(STEP_TIMES_EVERY * 2.5)  # the file holds the phase's last calls
                    measured[name]["step_ms"] = step_ms_per_call(before, read_step_times(step_times))
            measured["gateway"] = measured.pop("full")
            rounds.append(measured)
        for name in started:
            self.proxies.pop(name).stop()
        return report.feature_costs(rounds, variants, mode=mode, connections=connections)

    def check_variants(self, variants: dict[str, str], full: str = "gateway") -> None:
        """Each variant lacks its step and only it: the one without masking answers the canned
        Secrets unmasked (the full chain masks them), the one without recording writes no recording."""
        def secrets(name: str) -> tuple[str, bytes]:
            target = self.target(name, "reverse", bodies.SECRETS_PATH, verify=True)
            context = ssl.create_default_context(cafile=str(target.ca_file))
            request = urllib.request.Request(target.url, headers={"Authorization": f"Bearer {target.token}"})
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return response.headers.get("X-Jitgate-Masked", ""), response.read()

        for name, step in variants.items():
            recordings = self.proxies[name].workdir / "state" / "recordings"
            before = sorted(p.name for p in recordings.rglob("*")) if recordings.exists() else []
            masked, body = secrets(name)
            full_masked, full_body = secrets(full)
            if not full_masked or full_body == body and step == "masking":
                raise RuntimeError(f"{name}: the full chain and the variant answer Secrets alike")
            if (step == "masking") == bool(masked):
                raise RuntimeError(f"{name}: X-Jitgate-Masked is {masked!r}: the variant is not the chain without {step}")
            after = sorted(p.name for p in recordings.rglob("*")) if recordings.exists() else []
            if step == "recording" and after:
                raise RuntimeError(f"{name}: recorded {after[:5]} with the recording step left out")
            if step != "recording" and after == before:
                raise RuntimeError(f"{name}: recorded nothing, but only {step} was left out")

    def stage(self, name: str, run: Callable[[], None]) -> None:
        try:
            run()
        except Exception as e:
            self.log(f"bench: {name} failed: {type(e).__name__}: {e}")
            self.notes.append(f"{name} failed: {type(e).__name__}: {str(e)[:500]}")

    def gateway_log_excerpt(self) -> str:
        lines = []
        for name in ("gateway", "gateway-watch"):
            proxy = self.proxies.get(name)
            if proxy is None or not proxy.log_path.exists():
                continue
            for line in proxy.log_path.read_text(errors="replace").splitlines():
                if re.search(r"warn|error|Traceback|exception", line, re.I):
                    lines.append(f"{name}: {line}")
        counted = Counter(lines)
        return "\n".join(f"{line}" + (f"  (x{n})" if n > 1 else "") for line, n in list(counted.items())[:40])


ADDON_SCRIPTS = {path.name for path in (REPO / "addons").glob("*.py")}
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?):\d+\)$")


def _frame_file(frame: str) -> str:
    match = _FRAME.match(frame)
    return match.group("file") if match else ""


def _is_jitgate_addon(file: str) -> bool:
    # py-spy names script-loaded modules (mitmdump -s) by their bare file name.
    return "/" not in file and file in ADDON_SCRIPTS


PROFILE_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("jitgate addon code (addons/*.py)", _is_jitgate_addon),
    ("jitgate package (jitgate/*.py)", lambda f: f.startswith("jitgate/")),
    ("mitmproxy's own addons (mitmproxy/addons/)", lambda f: f.startswith("mitmproxy/addons/")),
    ("mitmproxy hook dispatch (addonmanager.py, incl. the hooks it runs)", lambda f: f == "mitmproxy/addonmanager.py"),
    ("TLS (pyOpenSSL)", lambda f: f.startswith("OpenSSL/")),
    ("HTTP/1 layer (mitmproxy/proxy/layers/http)", lambda f: f.startswith("mitmproxy/proxy/layers/http/")),
    ("asyncio (transports, tasks)", lambda f: f.startswith("asyncio/")),
)
DISPATCH_ONLY = "hook dispatch itself (no addon code below it)"


STEP_TIMES_EVERY = 0.5  # how often gateway_variant.py writes its step times


def read_step_times(path: Path) -> dict[str, Any]:
    for _ in range(50):  # written twice a second (replaced whole): there soon after the start
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(f"the full chain wrote no step times to {path}")


def step_ms_per_call(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU ms inside each step's synchronous hooks per response, between two readings."""
    calls = after["responses"] - before["responses"]
    if calls <= 0:
        return {}
    return {step: (seconds - before["seconds"].get(step, 0.0)) / calls * 1000 for step, seconds in after["seconds"].items()}


def summarize_profile(raw: str) -> dict[str, Any]:
    """Group py-spy's collapsed stacks (root first, leaf last): share of CPU samples per part of the
    stack (inclusive), the pure cost of mitmproxy's hook dispatch, and the top functions by self time."""
    inclusive: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        files = [_frame_file(f) for f in frames]
        for label, matches in PROFILE_GROUPS:
            if any(matches(f) for f in files):
                inclusive[label] += n
        for file in {f for f in files if _is_jitgate_addon(f) or f.startswith("jitgate/")}:
            by_file[file if "/" in file else f"addons/{file}"] += n
        if "mitmproxy/addonmanager.py" in files:
            below = files[len(files) - 1 - files[::-1].index("mitmproxy/addonmanager.py"):]
            if not any(_is_jitgate_addon(f) or f.startswith(("mitmproxy/addons/", "jitgate/")) for f in below):
                inclusive[DISPATCH_ONLY] += n
        match = _FRAME.match(frames[-1])
        self_time[f"{match.group('function')} ({match.group('file')})" if match else frames[-1]] += n
    share = (lambda n: n / total) if total else (lambda n: 0.0)
    labels = [label for label, _ in PROFILE_GROUPS] + [DISPATCH_ONLY]
    return {"samples": total, "groups": {label: share(inclusive[label]) for label in labels},
            "jitgate_files": [(name, share(n)) for name, n in by_file.most_common()],
            "top_self": [(name, share(n)) for name, n in self_time.most_common(15)]}


def tool_versions() -> dict[str, str]:
    versions = {"Python": platform.python_version(), "OpenSSL": ssl.OPENSSL_VERSION.split()[1]}
    for dist in ("mitmproxy", "pyjwt", "cryptography", "matplotlib", "py-spy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    for tool, cmd in (("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "-v"])):
        if shutil.which(tool):
            out = subprocess.run(cmd, capture_output=True, text=True)
            match = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
            versions[tool] = match.group(1) if match else "?"
    if shutil.which("hey") and shutil.which("dpkg-query"):
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "hey"], capture_output=True, text=True)
        versions["hey"] = out.stdout.strip() or "?"
    return versions


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}, {os.cpu_count()} × {cpu}, Linux {platform.release()}"


def interrupted(signum: int, frame: object) -> None:
    # SIGTERM ends the run like Ctrl-C: through the ExitStack, which stops every process by handle.
    raise KeyboardInterrupt()


def run_meta(args: argparse.Namespace, started: datetime.datetime, loadavg: tuple[float, float, float],
             pinning: str, notes: list[str], elapsed: int) -> dict[str, Any]:
    """What the report says about the run: machine, settings, versions, and how it measured."""
    busy = loadavg[0] > 0.5 * (os.cpu_count() or 1)
    return {
        "started": started.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "loadavg": " / ".join(f"{x:.2f}" for x in loadavg), "quick": args.quick, "duration": args.duration,
        "rounds": args.rounds,
        "pinning": pinning, "elapsed": elapsed, "versions": tool_versions(),
        "noisy_note": (f"The machine was busy when this ran (load average {loadavg[0]:.2f} on {os.cpu_count()} CPUs): "
                       "treat the numbers as noisy and re-run on a quiet machine.") if busy else "",
        "notes": notes + [
            "Load target: `GET /api/v1/namespaces/default/pods` (a 20-pod PodList, about 52 kB) with an RS256 OIDC ID "
            "token in `Authorization`; every target gets the same request bytes.",
            "Upstream: nginx (1 worker, keep-alive, TLS) with canned bodies; its CPU per 1,000 requests is shown to prove "
            "it is not the bottleneck. The gateway's cluster credential is EKS (AssumeRole at moto_server, cached) "
            "with impersonation headers on." if not args.no_sts else
            "Upstream: nginx (1 worker, keep-alive, TLS) with canned bodies; cluster credential: a token file.",
            "Bare mitmdump and the gateway run with identical listeners and options: `flow_detail=0`, "
            "`termlog_verbosity=warn`, `connection_strategy=lazy` (what jitgate enforces), upstream verified "
            "against the test CA; the only difference is `-s addons/gateway.py` and its policy/audit options.",
            "Clients: wrk for reverse mode and direct (its latency starts after the client's TCP+TLS handshake); hey "
            "for regular mode (`-x`: a CONNECT tunnel per connection; its latency includes connection setup); "
            "'python' is the pure-Python client (verifies certificates). New connection = `Connection: close` (wrk) "
            "or `-disable-keepalive` (hey): a new TCP+TLS connection, and in regular mode a new tunnel, per request.",
            "Access: before measuring, the benchmark user asks for grants through the gateway's access API, as the "
            "CLI does (pods: a rule that approves at once; Secrets: a rule that needs a reviewer, who approves with "
            "a second identity), so every measured call passes the full chain with a real grant lookup.",
            f"Rounds: each row runs direct once, then {args.rounds} rounds of {args.duration} s in which bare mitmdump "
            "and the gateway run back to back, the order alternating (bare first in odd rounds, gateway first in even "
            "ones). Each round gives one throughput ratio and one CPU-per-request ratio; the headline shows their "
            f"medians and min–max, and flags rows whose throughput ratios spread over {report.SPREAD_LIMIT_POINTS} "
            "points. Per-target figures are medians over the rounds.",
            "CPU s / 1k req: utime+stime of the proxy process (/proc/<pid>/stat) over the phase, per 1,000 answered "
            "requests. Peak RSS: VmHWM, reset to the current RSS before each phase (clear_refs), highest of the rounds; "
            "memory a Python process has touched is rarely returned, so later rows carry the high-water mark of "
            "earlier ones (order: reverse before regular, keep-alive before new connections, 1 before 50).",
            "Steady state: OIDC calls are lines in nginx's access log of the issuer, STS calls are AssumeRole calls "
            "recorded by moto_server, both counted from the end of warm-up to the end of the load matrix.",
            "Recording: every gateway runs with recording_har_max_bytes=100g, so every measured call is written to "
            "flows.mitm, session.har and the index (the benchmark's single session would otherwise reach the default "
            "256m HAR cap after about 3,600 calls, and later calls would skip the HAR).",
            "Feature costs: a fresh full gateway and fresh gateways without masking and without recording are "
            "started together for that stage (same empty store and recordings), so the step is the only difference.",
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="a minute or two: concurrency 10, 3 rounds, smaller curves")
    parser.add_argument("--duration", type=int, help="seconds per target and round (default 2)")
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds of bare mitmdump and the gateway per row; the report gives the median "
                             "ratio and its spread (default 5, quick 3; at least 2 for a spread)")
    parser.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")),
                        help="comma-separated connection counts (default 1,10,50; quick 10)")
    parser.add_argument("--profile", action="store_true", help="profile the gateway with py-spy (flame graph + summary)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the load side to separate cores")
    parser.add_argument("--no-sts", action="store_true",
                        help="cluster credential from a token file instead of EKS via moto_server (no STS count)")
    parser.add_argument("--python-load", action="store_true", help="use the pure-Python load generator everywhere")
    parser.add_argument("--skip-curves", action="store_true", help="only the side-by-side load matrix")
    parser.add_argument("--skip-mcp", action="store_true",
                        help="no MCP front rows (tools/call direct, through bare mitmdump, through the front)")
    parser.add_argument("--skip-features", action="store_true",
                        help="no feature-cost rows (the gateway without masking, without recording)")
    parser.add_argument("--out", type=Path, default=REPO / "results", help="results folder (default: results/)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.duration = args.duration or 2
    args.concurrency = args.concurrency or ((10,) if args.quick else CONCURRENCY)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now()
    t0 = time.monotonic()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    outdir = args.out / f"bench-{stamp}"
    outdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="jitgate-bench-"))
    watches.raise_open_file_limit(8192)  # before any child starts: 1,000 watches hold 3,000+ sockets
    signal.signal(signal.SIGTERM, interrupted)
    results: dict[str, Any] = {"runs": []}
    loadavg = os.getloadavg()
    try:
        with ExitStack() as stack:
            bench = Bench(args, stack, workdir)
            bench.start()
            bench.check_chain()
            bench.log("bench: warming up (certificates, keys, STS session) ...")
            bench.warm_up()
            bench.start_counting()
            bench.matrix()
            results["runs"] = bench.runs
            results["steady_state"] = bench.steady_state()
            print(report.headline_text(results))
            # Each later stage on its own: one that fails is reported, the others still run.
            def profile() -> None:
                bench.log("bench: profiling bare mitmdump and the gateway with py-spy ...")
                results["profile"] = bench.profile(outdir)

            def scaling_curves() -> None:
                results["curves"], results["parse_costs"] = bench.curves(10_000 if args.quick else 100_000)

            def idle_watches() -> None:
                results["watches"] = bench.watch_memory((10, 100) if args.quick else (10, 100, 1000))

            def feature_costs() -> None:
                results["feature_costs"] = bench.feature_costs()
                print("\n".join(report.feature_cost_lines(results["feature_costs"])))

            def mcp() -> None:
                bench.log("bench: MCP front: tools/call direct, through bare mitmdump and through the front ...")
                results["mcp"] = {"in_process_us": bench_mcp.in_process(2000 if args.quick else 5000),
                                  "round_trip_ms": bench_mcp.end_to_end(100 if args.quick else 300)}

            if not args.skip_features:
                bench.stage("feature costs", feature_costs)
            if not args.skip_mcp:
                bench.stage("MCP front", mcp)
            if args.profile:
                bench.stage("profile", profile)
            if not args.skip_curves:
                bench.stage("scaling curves", scaling_curves)
                bench.stage("idle watches", idle_watches)
            results["gateway_log"] = bench.gateway_log_excerpt()
            notes, pinning = bench.notes, bench.pinning_description()
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        logs = outdir / "logs"
        logs.mkdir(exist_ok=True)
        for log in list(workdir.rglob("*.log")) + list(workdir.rglob("*.out")):
            if log.name != "audit.log":
                shutil.copy(log, logs / f"{log.parent.name}-{log.name}")
        shutil.rmtree(workdir, ignore_errors=True)

    results["meta"] = run_meta(args, started, loadavg, pinning, notes, elapsed=round(time.monotonic() - t0))
    latest = args.out / "latest.md"
    path = report.write(results, outdir, latest)
    print(f"bench: report {path}\nbench: latest {latest}\nbench: took {results['meta']['elapsed']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
