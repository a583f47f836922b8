"""Command line: argv + EDGEPROXY_* environment -> Settings -> run; nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from edgeproxy import __version__
from edgeproxy.core.logs import configure
from edgeproxy.core.settings import OPTIONS, Address, SettingsError, load_settings, parse_address


def _epilog() -> str:
    width = max(len(o.env) for o in OPTIONS)
    lines = ["settings (environment variables, validated at start):"]
    for o in OPTIONS:
        default = o.default if o.default else "(unset)"
        lines.append(f"  {o.env:<{width}}  {o.doc} [default: {default}]")
    lines.append("")
    lines.append("Docker is reached as the docker SDK does: DOCKER_HOST (e.g. unix:///var/run/"
                 "docker.sock or tcp://socket-proxy:2375), DOCKER_TLS_VERIFY, DOCKER_CERT_PATH.")
    lines.append("An invalid setting exits with status 2 and one line naming it.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; --help lists every setting."""
    parser = argparse.ArgumentParser(
        prog="edgeproxy",
        description="Docker-label-driven edge proxy: routes requests to containers by their "
                    "gateway.* labels.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run the proxy (the default)")
    check = sub.add_parser("check", help="validate gateway.* labels in compose files, offline "
                           "(exit 1 on problems)")
    check.add_argument("files", nargs="+", metavar="compose.yml")
    check.add_argument("-p", "--project-name", default=None, metavar="NAME",
                       help="the Compose project name, which prefixes network names (default: "
                       "COMPOSE_PROJECT_NAME, else the file's name:, else its folder's name)")
    migrate = sub.add_parser("migrate", help="print compose files with gateway.* labels in place "
                             "of Traefik labels and nginx-proxy variables, offline (exit 1 when "
                             "something was not carried over: see its comment)")
    migrate.add_argument("files", nargs="+", metavar="compose.yml")
    how = migrate.add_mutually_exclusive_group()
    how.add_argument("--keep", dest="replace", action="store_false", default=False,
                     help="add the gateway labels beside the old ones (the default)")
    how.add_argument("--replace", dest="replace", action="store_true",
                     help="remove the old labels and variables that were carried over")
    explain = sub.add_parser("explain", help="ask the running proxy which route, policies and "
                             "replica a request would get, without sending it")
    explain.add_argument("url", help="e.g. http://api.example.com/orders/7")
    explain.add_argument("--method", "-X", default="GET")
    explain.add_argument("--header", "-H", action="append", default=[], metavar="K:V")
    explain.add_argument("--admin", default=None,
                         help="admin address (default: EDGEPROXY_ADMIN_LISTEN or 127.0.0.1:8081)")
    explain.add_argument("--json", action="store_true", help="print the raw JSON answer")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgeproxy` command."""
    args = build_parser().parse_args(argv)
    if args.command == "check":
        from edgeproxy.ops.check import run_check

        prefix = os.environ.get("EDGEPROXY_LABEL_PREFIX", "gateway")
        return run_check(list(args.files), label_prefix=prefix, project=args.project_name)
    if args.command == "migrate":
        from edgeproxy.ops.migrate import run_migrate

        prefix = os.environ.get("EDGEPROXY_LABEL_PREFIX", "gateway")
        return run_migrate(list(args.files), replace=args.replace, prefix=prefix)
    if args.command == "explain":
        return _explain(args)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    from edgeproxy.workers import EXIT_LISTEN_FAILED, run

    try:
        from edgeproxy.policies.config import jwt_config

        jwt_config(settings)  # reads the key file: a bad path is a settings error, exit 2
        from edgeproxy.telemetry.tracing import check_env

        check_env()  # OTEL_*: a protocol we cannot export with is a settings error, exit 2
        if settings.tls_listen is not None:
            from edgeproxy.core.tls import CertError, CertStore

            try:
                CertStore(settings.tls_certs_dir, settings.tls_cert, settings.tls_key).load()
            except CertError as exc:
                raise SettingsError("EDGEPROXY_TLS_CERT" if settings.tls_cert else
                                    "EDGEPROXY_TLS_CERTS_DIR", str(exc.source),
                                    f"a readable certificate and key ({exc.problem})") from None
    except SettingsError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 2
    if settings.swarm == "true":
        from edgeproxy.control.providers.swarm import SwarmModeError, probe

        try:
            probe(settings)
        except SwarmModeError as exc:
            print(f"edgeproxy: {exc}", file=sys.stderr)
            return 2
    code = run(settings)
    return 1 if code == EXIT_LISTEN_FAILED else code


def _explain(args: argparse.Namespace) -> int:
    admin = args.admin or os.environ.get("EDGEPROXY_ADMIN_LISTEN", "127.0.0.1:8081")
    try:
        address = parse_address(admin)
    except ValueError as exc:
        print(f"edgeproxy explain: --admin={admin!r}: expected {exc}", file=sys.stderr)
        return 2
    host = "127.0.0.1" if address.host in ("0.0.0.0", "::") else address.host
    query = urllib.parse.urlencode([("url", args.url), ("method", args.method)]
                                   + [("header", h) for h in args.header])
    endpoint = f"http://{Address(host, address.port)}/explain?{query}"
    try:
        with urllib.request.urlopen(endpoint, timeout=5) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as exc:
        print(f"edgeproxy explain: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edgeproxy explain: cannot reach the admin API at {host}:{address.port}: "
              f"{getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"{answer['method']} {answer['url']}")
    print(f"  host: {answer['host'] or '(none)'}   path: {answer.get('path', '-')}")
    route = answer.get("route")
    if route:
        print(f"  route: {route['name']} ({route['source']}) matched prefix "
              f"{answer['matched_prefix']} -> forwards {answer['forwarded_path']}")
        policies = route.get("policies") or {}
        print("  policies: " + (", ".join(f"{k}={v}" for k, v in policies.items()) or "none"))
        for u in route["replicas"]:
            mark = "*" if answer.get("replica") and u["name"] == answer["replica"]["name"] else " "
            print(f"   {mark} {u['name']:<30} {u['address'] or '-':<22} {u['state']}"
                  + (f" ({u['reason']})" if u.get("reason") else ""))
    print(f"  decision: {answer['decision']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
