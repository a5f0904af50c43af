"""`python -m testkit.standin` (from the checkout's root): run the Kubernetes API stand-in until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from .auth import DenyRule
from .h2front import H2Front
from .server import StandinConfig, StandinServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jitgate-standin", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0 picks a free one)")
    p.add_argument("--cert", required=True, help="server certificate (PEM)")
    p.add_argument("--key", required=True, help="server private key (PEM)")
    p.add_argument("--token", action="append", default=[], metavar="TOKEN",
                   help="an accepted bearer token (repeatable); it authenticates as standin-admin")
    p.add_argument("--token-file", action="append", default=[], metavar="FILE",
                   help="a file holding an accepted bearer token (repeatable); keeps it out of the process list")
    p.add_argument("--eks-cluster", metavar="NAME",
                   help="accept EKS tokens (k8s-aws-v1.…, checked by shape) for the cluster NAME")
    p.add_argument("--client-ca", metavar="CA", help="accept TLS client certificates issued by this CA (PEM)")
    p.add_argument("--deny", action="append", default=[], metavar="RULE",
                   help="answer 403 Forbidden to requests matching RULE, e.g. 'user=alice,verb=delete,resource=pods' "
                        "(keys: user, group, verb, resource, namespace, name; values are globs; repeatable)")
    p.add_argument("--log-interval", type=float, default=0.5, help="seconds between followed log lines")
    p.add_argument("--bookmark-interval", type=float, default=5.0,
                   help="seconds between watch BOOKMARK events when a client allows them")
    p.add_argument("--no-seed", action="store_true", help="start with only the namespaces (no pods, secrets, ...)")
    p.add_argument("--h2", action="store_true",
                   help="offer HTTP/2 (ALPN h2, then http/1.1) as kube-apiserver does; not with --client-ca")
    p.add_argument("--verbose", "-v", action="store_true", help="log every refusal to stderr")
    return p


def ssl_context(cert: str, key: str, client_ca: str | None, h2: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"] if h2 else ["http/1.1"])
    if client_ca:
        # Optional: bearer-token clients present no certificate and must still get through.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(client_ca)
    return ctx


async def serve(server: StandinServer, host: str, port: int, context: ssl.SSLContext,
                stop: asyncio.Event, h2: bool = False) -> None:
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    front = listener = None
    with tempfile.TemporaryDirectory(prefix="standin-") as private:
        if h2:
            # The app behind the HTTP/2 front, on a socket only this process knows.
            backend = str(Path(private) / "app.sock")
            await web.UnixSite(runner, backend).start()
            front = H2Front(backend)
            listener = await asyncio.start_server(front.handle, host, port, ssl=context)
            bound = listener.sockets[0].getsockname()[1]
        else:
            site = web.TCPSite(runner, host, port, ssl_context=context)
            await site.start()
            bound = site._server.sockets[0].getsockname()[1] if port == 0 else port  # noqa: SLF001 - aiohttp has no API
        server.config.server_address = f"{host}:{bound}"
        print(f"jitgate-standin listening on https://{host}:{bound}" + (" (h2, http/1.1)" if h2 else ""), flush=True)
        try:
            await stop.wait()
        finally:
            server.end_streams()
            if listener is not None:
                listener.close()
                front.close()
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        deny = [DenyRule.parse(rule) for rule in args.deny]
    except ValueError as e:
        print(f"jitgate-standin: {e}", file=sys.stderr)
        return 2
    tokens = list(args.token)
    for path in args.token_file:
        try:
            tokens.append(Path(path).read_text().strip())
        except OSError as e:
            print(f"jitgate-standin: cannot read token file {path}: {e.strerror}", file=sys.stderr)
            return 2
    if args.h2 and args.client_ca:
        print("jitgate-standin: --h2 cannot check client certificates (they do not cross the HTTP/2 front)", file=sys.stderr)
        return 2
    if not (tokens or args.eks_cluster or args.client_ca):
        print("jitgate-standin: give at least one of --token, --token-file, --eks-cluster, --client-ca", file=sys.stderr)
        return 2
    config = StandinConfig(tokens=tokens, eks_cluster=args.eks_cluster, deny=deny,
                           log_interval=args.log_interval, bookmark_interval=args.bookmark_interval,
                           seed=not args.no_seed)
    try:
        context = ssl_context(args.cert, args.key, args.client_ca, args.h2)
    except (OSError, ssl.SSLError) as e:
        print(f"jitgate-standin: cannot load TLS material: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(StandinServer(config), args.host, args.port, context, stop, args.h2)

    try:
        asyncio.run(run())
    except OSError as e:
        print(f"jitgate-standin: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
