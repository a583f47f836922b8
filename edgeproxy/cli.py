"""Command line: argv + EDGEPROXY_* environment -> Settings -> run; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from edgeproxy import __version__
from edgeproxy.logs import configure
from edgeproxy.settings import OPTIONS, SettingsError, load_settings


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgeproxy` command."""
    build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    from edgeproxy.server import ListenError, serve

    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        runner = asyncio.run
    else:  # pragma: no cover - optional speed-up
        runner = uvloop.run
    try:
        runner(serve(settings))
    except ListenError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
