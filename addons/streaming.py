"""Streaming: watches and log follows flow through as the cluster sends them.

Without this, mitmproxy buffers a whole response body and `kubectl get -w` shows nothing until the
watch ends. Long-running calls are also marked so audit records their start and their end.

    mitmdump -s addons/streaming.py
"""

from __future__ import annotations

from mitmproxy import ctx, http

from jitgate.chain.flow import call_of

# mitmproxy's default idle timeout (600 s) would cut quiet watches; kube's own watches last up to
# ~30 minutes (min-request-timeout 1800 s), so idle connections may live a little longer than that.
LONG_RUNNING_IDLE_TIMEOUT = 2 * 3600


def is_long_running(flow: http.HTTPFlow) -> bool:
    info = call_of(flow).info
    if info is None:
        return False
    if info.verb == "watch":
        return True
    if info.subresource == "log" and flow.request.query.get("follow", "") in ("true", "1"):
        return True
    return info.subresource in ("exec", "attach", "portforward")


class Streaming:
    def load(self, loader) -> None:
        loader.add_option(
            "watch_idle_timeout", int, LONG_RUNNING_IDLE_TIMEOUT,
            "Seconds a quiet connection (an idle watch) may stay open; raises mitmproxy's tcp_timeout to this.",
        )

    def configure(self, updated: set[str]) -> None:
        if "watch_idle_timeout" in updated or "tcp_timeout" in updated:
            if ctx.options.tcp_timeout < ctx.options.watch_idle_timeout:
                ctx.options.tcp_timeout = ctx.options.watch_idle_timeout

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if is_long_running(flow) and flow.response is not None:
            call.long_running = True
            if not flow.response.stream:
                flow.response.stream = True


addons = [Streaming()]
