"""The `jitgate` command: policy checks and kubeconfigs that reach clusters only through the gateway."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jitgate import kubeconfig
from jitgate.policy import Policy, PolicyError, load_policy

DEFAULT_GATEWAY_CA = "certs/mitmproxy-ca-cert.pem"


def _policy(path: str) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as e:
        raise SystemExit(f"jitgate: policy error: {e}") from None


def cmd_policy_check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.paths:
        try:
            policy = load_policy(path)
        except PolicyError as e:
            print(f"{e}", file=sys.stderr)
            failed = True
            continue
        print(f"{path}: ok ({len(policy.clusters)} cluster(s), {len(policy.identity_providers)} identity provider(s), "
              f"files: {', '.join(str(p) for p in policy.sources)})")
    return 1 if failed else 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    policy = _policy(args.policy)
    cluster = policy.by_name.get(args.cluster)
    if cluster is None:
        raise SystemExit(f"jitgate: no cluster {args.cluster!r} in the policy (known: {', '.join(policy.by_name)})")
    ca_path = Path(args.gateway_ca)
    try:
        ca_pem = ca_path.read_bytes()
    except OSError as e:
        raise SystemExit(f"jitgate: cannot read the gateway CA {ca_path}: {e.strerror} "
                         "(it is created in certs/ when the gateway first starts)") from None
    if args.oidc_issuer:
        tokens = kubeconfig.TokenSource(exec_command=kubeconfig.oidc_login_command(
            args.oidc_issuer, args.oidc_client_id, args.oidc_client_secret, tuple(args.oidc_extra_scope)))
    elif args.exec_command:
        tokens = kubeconfig.TokenSource(exec_command=tuple(args.exec_command))
    else:
        tokens = kubeconfig.TokenSource(token=args.token, token_file=args.token_file)
    config = kubeconfig.build_kubeconfig(
        cluster, args.user, ca_pem, tokens,
        proxy_url=args.proxy, server_url=args.server, namespace=args.namespace,
    )
    if args.output == "-":
        sys.stdout.write(kubeconfig.dump(config))
    else:
        kubeconfig.write(config, Path(args.output))
        print(f"wrote {args.output} (context {config['current-context']})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jitgate", description="Just-in-time access gateway for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command", required=True)
    check = policy.add_parser("check", help="validate policy files without starting anything")
    check.add_argument("paths", nargs="+", help="policy files or folders")
    check.set_defaults(func=cmd_policy_check)

    kc = sub.add_parser("kubeconfig", help="write a kubeconfig that reaches a cluster through the gateway")
    kc.add_argument("--policy", default="policies", help="policy file or folder (default: policies)")
    kc.add_argument("--cluster", required=True, help="cluster name from the policy")
    kc.add_argument("--user", required=True, help="name of the kubeconfig user entry (e.g. your email)")
    mode = kc.add_mutually_exclusive_group(required=True)
    mode.add_argument("--proxy", metavar="URL", help="regular mode: the gateway as proxy-url, e.g. http://127.0.0.1:8080")
    mode.add_argument("--server", metavar="URL", help="reverse mode: the gateway's listener for this cluster, e.g. https://127.0.0.1:7443")
    kc.add_argument("--gateway-ca", default=DEFAULT_GATEWAY_CA, help=f"the gateway's CA certificate (default: {DEFAULT_GATEWAY_CA})")
    kc.add_argument("--namespace", help="default namespace of the context")
    token = kc.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="a static OIDC ID token (expires; for tests and demos)")
    token.add_argument("--token-file", help="a file kubectl reads the OIDC ID token from")
    token.add_argument("--oidc-issuer", metavar="URL", help="use kubelogin (kubectl oidc-login) with this issuer")
    token.add_argument("--exec-command", nargs="+", metavar="ARG", help="any exec credential plugin printing an ExecCredential")
    kc.add_argument("--oidc-client-id", default="jitgate", help="OIDC client id for kubelogin (default: jitgate)")
    kc.add_argument("--oidc-client-secret", help="OIDC client secret for kubelogin, if the client has one")
    kc.add_argument("--oidc-extra-scope", action="append", default=[], help="extra scope for kubelogin (repeatable)")
    kc.add_argument("-o", "--output", default="-", help="file to write (0600), or - for standard output (default)")
    kc.set_defaults(func=cmd_kubeconfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
