"""The ``edge-agent`` command: serve one bundle in the foreground, or run the fleet daemon.

``edge-agent serve --bundle B ...`` loads a verified bundle and serves it over REST and gRPC until
SIGTERM or SIGINT (``edgedeploy deploy --target local`` runs exactly this in the background).
``edge-agent --config agent.yaml [--check]`` runs (or validates the config of) the fleet daemon.
``edge-agent install DIR|BUNDLE --config agent.yaml`` applies an offline export while the daemon is
stopped (:mod:`edge_agent.offline`).
Errors print one ``error:`` line and exit 1, or 2 for bad usage, like ``edgedeploy``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.atomic import atomic_write_json
from edge_agent.errors import EdgeDeployError, NotFoundError, UsageError
from edge_agent.serving_config import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_REQUEST_BYTES, ServingConfig

__all__ = ["ServeConfig", "build_parser", "main", "serve"]

log = logging.getLogger(__name__)



class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one ``error:`` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


@dataclasses.dataclass(kw_only=True)
class ServeConfig(ServingConfig):
    """The one configuration of an ``edge-agent serve`` process (printed by ``--print-config``):
    the server settings plus what to serve."""

    bundle: Path
    name: str | None = None
    state_file: Path | None = None
    workdir: Path | None = None
    trusted_keys: list[Path] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view, paths as strings."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def build_parser() -> argparse.ArgumentParser:
    """The ``edge-agent`` parser."""
    parser = _Parser(prog="edge-agent", description="Serve models on this device, or run the fleet agent.")
    parser.add_argument("--config", type=Path, help="agent.yaml: run the fleet daemon with this config")
    parser.add_argument("--check", action="store_true", help="with --config: validate the file and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve_parser = sub.add_parser("serve", help="serve one bundle over REST and gRPC in the foreground")
    _add_serve_options(serve_parser)
    install = sub.add_parser("install", help="install an offline export (or a bundle file) while the daemon is "
                                             "stopped; the daemon reports it when it next reaches the broker")
    install.add_argument("source", type=Path, metavar="DIR|BUNDLE")
    install.add_argument("--config", type=Path, dest="install_config", help="agent.yaml of this device")
    install.add_argument("--allow-downgrade", action="store_true",
                         help="install a lower model version than the active one (a rollback by hand)")
    return parser


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="the signed bundle to serve")
    parser.add_argument("--name", help="serve the model under this name (default: the bundle's model name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=0, help="REST port; 0 picks a free one")
    parser.add_argument("--grpc-port", type=int, default=0, help="gRPC port; 0 picks a free one")
    parser.add_argument("--keys-file", type=Path,
                        help='JSON {"primary_key","secondary_key"}, re-read when it changes')
    parser.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                        help="require a key (default: off on loopback, on otherwise)")
    parser.add_argument("--state-file", type=Path, help="write ports, pid and readiness here (JSON)")
    parser.add_argument("--workdir", type=Path,
                        help="where models are unpacked (default: a folder beside the bundle)")
    parser.add_argument("--trusted-key", type=Path, action="append", default=[],
                        help="trust this public key (repeatable; default: the local trust store)")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body or gRPC message (default 64 MiB)")
    parser.add_argument("--max-inflight-bytes", type=int, default=DEFAULT_MAX_INFLIGHT_BYTES,
                        help="request bytes answered at once, REST and gRPC together; beyond it 503 / "
                             "RESOURCE_EXHAUSTED (default 256 MiB)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the ports with the server this one replaces (zero-downtime container update)")
    parser.add_argument("--print-config", action="store_true", dest="serve_print_config",
                        help="print the effective configuration and exit")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Check the serve options and turn them into one :class:`ServeConfig`."""
    auth = args.auth if args.auth is not None else not _is_loopback(args.host)
    for label, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port)):
        if not 0 <= port <= 65535:
            raise UsageError(f"{label} {port} is not a TCP port (0-65535; 0 picks a free one)")
    if auth and args.keys_file is None:
        raise UsageError("auth is on but no --keys-file was given; pass one, or --no-auth")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.max_request_bytes <= 0 or args.max_inflight_bytes <= 0:
        raise UsageError("--max-request-bytes and --max-inflight-bytes must be positive")
    bundle = args.bundle.expanduser().resolve()
    workdir = args.workdir or bundle.parent / f".{bundle.stem}-work"
    return ServeConfig(
        bundle=bundle, name=args.name, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        keys_file=args.keys_file, auth_enabled=auth, state_file=args.state_file, workdir=workdir,
        trusted_keys=list(args.trusted_key), tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_request_bytes=args.max_request_bytes, max_inflight_bytes=args.max_inflight_bytes,
        reuse_port=args.reuse_port,
    )


def _write_state(config: ServeConfig, **fields: Any) -> None:
    if config.state_file is None:
        return
    document = {"pid": os.getpid(), "host": config.host, "updated": time.time(), **fields}
    atomic_write_json(config.state_file, document)


def _trust(config: ServeConfig) -> Any:
    from edge_agent.trust import TrustStore

    return TrustStore.from_files(config.trusted_keys) if config.trusted_keys else TrustStore.local()


def _model_failure(repository: Any, name: str | None) -> str | None:
    """The reason a loaded model is not ready (a failing ``init()``), or None when it is."""
    for entry in repository.index():
        if (name is None or entry.get("name") == name) and str(entry.get("state")) != "READY":
            reason = entry.get("reason") or "no reason given"
            return f"model {entry.get('name')!r} is {entry.get('state')}: {reason}"
    return None


async def serve(config: ServeConfig, stop: asyncio.Event | None = None) -> None:
    """Load the bundle, start the REST and gRPC servers, and serve until ``stop`` (or a signal)."""
    from edge_agent.dataplane import DataPlane
    from edge_agent.metrics import MetricsRegistry
    from edge_agent.repository import ModelRepository
    from edge_agent.server import ServingApp

    stop = stop or _stop_on_signals()
    assert config.workdir is not None
    config.workdir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsRegistry()
    repository = ModelRepository(config.workdir, trust=_trust(config), metrics=metrics)
    app = None
    try:
        await repository.load_bundle(config.bundle, name=config.name)
        failure = _model_failure(repository, config.name)
        if failure:
            _write_state(config, ready=False, error=failure)
            raise EdgeDeployError(failure)
        app = ServingApp(DataPlane(repository, metrics), config)
        await app.start()
        _write_state(config, ready=True, http_port=app.http_port, grpc_port=app.grpc_port,
                     models=repository.index())
        log.info("serving on http://%s:%s and grpc %s:%s",
                 config.host, app.http_port, config.host, app.grpc_port)
        await stop.wait()
        log.info("stopping: finishing requests in flight")
        _write_state(config, ready=False, stopping=True)
    except (EdgeDeployError, OSError) as exc:
        _write_state(config, ready=False, error=str(exc))
        raise
    finally:
        if app is not None:
            await app.stop(grace=5.0)
        await repository.close()


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _run_serve(args: argparse.Namespace, print_config: bool) -> int:
    config = serve_config(args)
    if print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    if not config.bundle.is_file():
        raise NotFoundError(f"bundle not found: {config.bundle}")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        raise EdgeDeployError(f"cannot serve on {config.host}: {exc}") from None
    return 0


def _run_daemon(args: argparse.Namespace) -> int:
    agent_config = importlib.import_module("edge_agent.config")

    loaded = agent_config.load_agent_config(args.config)
    # main() configured logging before the config was read: the file's log_level applies from here on
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else loaded.log_level)
    if args.check or args.print_config:
        if args.print_config:
            print(json.dumps(_as_dict(loaded), indent=2, sort_keys=True, default=str))
        else:
            print(f"ok: {args.config} is a valid agent configuration")
        return 0
    result = importlib.import_module("edge_agent.daemon").run(args.config)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return int(result or 0)


def _as_dict(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return vars(value) if hasattr(value, "__dict__") else value


def _run_install(args: argparse.Namespace) -> int:
    config_path = args.install_config or args.config
    if config_path is None:
        raise UsageError("install needs --config agent.yaml (the device's agent configuration)")
    config = importlib.import_module("edge_agent.config").load_agent_config(config_path)
    # the daemon's steps log their transitions; here the outcome is the one line printed (-v shows them)
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    report = importlib.import_module("edge_agent.offline").install(config, args.source, args.allow_downgrade)
    active = report.active
    print(f"installed {report.name} version {active.version} (bundle {active.bundle_sha256[:12]}) from "
          f"{args.source}; the agent reports it when it next reaches the broker")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "install":
        return _run_install(args)
    if args.command == "serve":
        if args.config is not None:
            raise UsageError("--config runs the fleet daemon; it does not go with 'serve'")
        return _run_serve(args, args.print_config or args.serve_print_config)
    if args.config is None:
        raise UsageError("nothing to do: give 'serve --bundle B' or '--config agent.yaml'")
    return _run_daemon(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edge-agent``; returns the process exit code."""
    from edge_agent.exit_codes import exit_code_of

    def body() -> int:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return _dispatch(args)

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())
