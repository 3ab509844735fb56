"""`presence-svc serve` runs a node; `presence-svc token` mints a token for scripting;
`presence-svc bench` runs the benchmark harness (docs/performance.md); `presence-svc capacity`
sizes a deployment from its figures (docs/capacity.md)."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import LOGGING_CONFIG

from presence_svc import __version__
from presence_svc.auth import ALL_STUDIES, issue_token
from presence_svc.logs import configure_logging, install_redaction
from presence_svc.settings import DEV_JWT_SECRET, SettingsError, load_settings


class _DrainingServer(uvicorn.Server):
    """Reports not ready from the first SIGTERM/SIGINT on, while uvicorn drains.

    Uvicorn then stops accepting, closes every WebSocket with 1012 (clients reconnect through
    the load balancer; their sessions wait out the leave grace) and gives connections
    PRESENCE_DRAIN_TIMEOUT seconds before the app releases its remaining leases and exits.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything built by now (modules, the app, the node) lives as long as the process:
        # out of the cyclic GC's sight, or its full collections rescan ~90k objects several
        # times a second under load (about 15 % of a busy node's CPU). A larger young
        # generation lets the objects of calls in flight die young instead of being promoted.
        gc.freeze()
        gc.set_threshold(10_000, 20, 50)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        node = getattr(self._app.state, "node", None)
        if node is not None:
            node.draining = True
        super().handle_exit(sig, frame)


def _node_id(app: Starlette) -> str | None:
    """The running node's id for log lines; None before start-up built the node."""
    node = getattr(app.state, "node", None)
    if node is None:
        return None
    node_id: str = node.leases.node_id
    return node_id


def _count_protocol_close(app: Starlette) -> Callable[[str], None]:
    """Counts a socket the protocol layer closed (presence_svc.web.protocol) in the metrics."""

    def count(reason: str) -> None:
        node = getattr(app.state, "node", None)
        if node is not None:  # sockets are only served once start-up built the node
            node.metrics.protocol_closes.labels(reason).inc()

    return count


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"presence-svc: {exc}", file=sys.stderr)
        return 2
    from presence_svc.app import create_app
    from presence_svc.web.protocol import protocol_class

    level = args.log_level or settings.log_level
    app = create_app(settings)
    configure_logging(settings.log_format, level, node_id=lambda: _node_id(app))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        # A Unix socket instead of host/port: an app in the same pod reaches its sidecar
        # through a shared volume without opening a TCP port (deploy/README.md).
        uds=args.uds,
        log_level=level,
        # json: uvicorn's loggers keep the root's JSON handler instead of getting their own.
        log_config=LOGGING_CONFIG if settings.log_format == "text" else None,
        lifespan="on",
        # uvicorn's `websockets-sansio` protocol, measured cheaper per message than the legacy
        # `websockets` one (compressing every small event cost more CPU than it saved, see
        # docs/performance.md), with limits on what that layer does by itself: pongs,
        # oversized handshakes, invalid UTF-8.
        ws=protocol_class(settings.ws_max_outgoing_buffer, _count_protocol_close(app)),
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout)),
        ws_max_size=settings.ws_max_message_size,
    )
    install_redaction()  # after uvicorn configured its loggers
    _DrainingServer(config, app).run()
    return 0


def _token(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get("PRESENCE_JWT_SECRET") or DEV_JWT_SECRET
    if len(secret.encode()) < 32:
        print("presence-svc: the secret must be at least 32 bytes long", file=sys.stderr)
        return 2
    try:
        studies = ALL_STUDIES if args.all_studies else args.study
        print(issue_token(args.user, secret, args.ttl, studies))
    except ValueError as exc:
        print(f"presence-svc: {exc}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="presence-svc", description=__doc__)
    root.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a node (settings come from PRESENCE_*)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--uds", metavar="PATH", help="listen on this Unix socket instead of --host/--port"
    )
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: $PRESENCE_LOG_LEVEL, else info)",
    )
    serve.set_defaults(run=_serve)

    token = commands.add_parser("token", help="print an HS256 JWT for USER")
    token.add_argument("user", metavar="USER", help="the user id (the token's sub)")
    token.add_argument(
        "--secret", help="signing secret (default: $PRESENCE_JWT_SECRET, else the dev secret)"
    )
    token.add_argument(
        "--ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds until it expires (default: %(default)g, one hour)",
    )
    grants = token.add_mutually_exclusive_group()
    grants.add_argument(
        "--study", action="append", metavar="STUDY_ID", help="grant this study (repeatable)"
    )
    grants.add_argument("--all-studies", action="store_true", help='grant every study ("*")')
    token.set_defaults(run=_token)

    from presence_svc.bench.command import add_bench_command  # argparse only, no harness

    add_bench_command(commands)
    from presence_svc.bench.capacity.command import add_capacity_command  # arithmetic only

    add_capacity_command(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
