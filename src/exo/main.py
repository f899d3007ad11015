"""A node's command line: parse the flags, check them, run one node (``exo`` without a
client command, see :mod:`exo.command`)."""

import argparse
import faulthandler
import json
import logging
import os
import sys
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from loguru import logger
from pydantic import ValidationError

from exo.api.guard import ApiExposureError, check_api_exposure
from exo.gpu.backend import GPUBackendError
from exo.gpu.backends.simulated import load_simulated_file
from exo.master.planning import RING_BASE_PORT, RING_PORTS_PER_NODE
from exo.master.replacement import ReplacementConfig
from exo.node import NodeConfig, StartupError, run_node
from exo.routing.router import TlsFiles, TransportError, check_tls, validate_endpoint

if TYPE_CHECKING:
    from loguru import Message

DEFAULT_API_PORT = 52415
DEFAULT_LISTEN = "tcp/0.0.0.0:52414"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exo",
        description="Run one node of an exo cluster: discover peers, elect a master, share "
        "one event-sourced state, report GPUs, place and run models. "
        "`exo status`, `exo place MODEL` and `exo chat MODEL PROMPT` talk to a running "
        "node instead (`exo status --help`).",
    )
    parser.add_argument("--version", action="version", version=f"exo {version('exo')}")
    parser.add_argument(
        "--api-host",
        default="127.0.0.1",
        help="address the HTTP API binds (default 127.0.0.1; any other needs --api-key or "
        "--insecure-api)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every API request (default $EXO_API_KEY)",
    )
    parser.add_argument(
        "--insecure-api",
        action="store_true",
        help="let the API listen beyond loopback without a key (logs a warning)",
    )
    parser.add_argument(
        "--api-port",
        type=int,
        default=DEFAULT_API_PORT,
        help=f"HTTP API port (default {DEFAULT_API_PORT})",
    )
    parser.add_argument(
        "--ring-port",
        type=int,
        default=RING_BASE_PORT,
        help="first port this node's runner ranks listen on for the MLX ring, one per rank "
        f"from there up (default {RING_BASE_PORT})",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ENDPOINT",
        help=f"zenoh endpoint to listen on, repeatable (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="zenoh endpoint of a peer to connect to, e.g. tcp/192.168.1.10:52414; repeatable",
    )
    parser.add_argument(
        "--cluster-secret",
        default=None,
        metavar="SECRET",
        help="the secret every node of the cluster holds (default $EXO_CLUSTER_SECRET, else "
        "the one in the home, made on the first start)",
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM certificate for tls/ endpoints"
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM certificate of the CA that signed the nodes' certificates (checks peers; "
        "with --tls-cert and --tls-key, links are mutual TLS)",
    )
    parser.add_argument(
        "--no-discovery",
        action="store_true",
        help="disable multicast discovery of peers on the LAN",
    )
    parser.add_argument(
        "--namespace", default="exo", help="cluster name; nodes only talk within one (default exo)"
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="state directory: node id and event log (default $EXO_HOME or ~/.exo)",
    )
    parser.add_argument("--no-worker", action="store_true", help="do not run a worker on this node")
    parser.add_argument(
        "--friendly-name", default=None, help="name shown for this node (default hostname)"
    )
    parser.add_argument(
        "--election-settle",
        type=float,
        default=1.5,
        metavar="SECONDS",
        help="time a starting node listens for peers before it may act as master (default 1.5)",
    )
    parser.add_argument(
        "--link-probe-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often the worker measures latency and throughput to each peer (default 60)",
    )
    parser.add_argument(
        "--gpu-backend",
        choices=["auto", "cuda", "metal", "cpu", "simulated"],
        default="auto",
        help="GPU backend (default auto: CUDA, then Metal, then CPU; $EXO_GPU_BACKEND overrides auto)",
    )
    parser.add_argument(
        "--simulate-gpus",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON file describing simulated devices (implies --gpu-backend simulated); re-read on change",
    )
    parser.add_argument(
        "--telemetry-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often GPU telemetry is sampled (default 2)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory of MLX model directories to serve, one per subdirectory "
        "(default $EXO_MODELS_DIR)",
    )
    defaults = ReplacementConfig()
    parser.add_argument(
        "--move-margin",
        type=float,
        default=defaults.move_margin,
        metavar="SHARE",
        help="move an instance when a fresh placement is predicted to save this share of its "
        f"time per token (default {defaults.move_margin})",
    )
    parser.add_argument(
        "--move-sustain",
        type=float,
        default=defaults.move_sustain_s,
        metavar="SECONDS",
        help=f"...for this long without a break (default {defaults.move_sustain_s:g})",
    )
    parser.add_argument(
        "--max-moves-per-hour",
        type=int,
        default=defaults.max_moves_per_hour,
        metavar="N",
        help=f"moves per instance in any hour (default {defaults.max_moves_per_hour}; 0: never move)",
    )
    parser.add_argument(
        "--move-settle",
        type=float,
        default=defaults.settle_s,
        metavar="SECONDS",
        help="no move is considered this long after a heal or move ends "
        f"(default {defaults.settle_s:g})",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: trace)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines (default), or one JSON object per line for log collectors",
    )
    return parser


def configure_logging(verbose: int, quiet: bool, log_format: str = "text") -> None:
    level = "WARNING" if quiet else {0: "INFO", 1: "DEBUG"}.get(verbose, "TRACE")
    logger.remove()
    # Libraries that log through the standard library (uvicorn, asyncio, httpx) go through
    # loguru too, so every line has one format; only their warnings and errors.
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
    if log_format == "json":
        logger.add(_json_log_line, level=level, format="{message}")
        return
    logger.add(sys.stderr, level=level, format="{time:HH:mm:ss.SSS} {level: <7} {name}: {message}")


class _ToLoguru(logging.Handler):
    """A standard-library record, logged by loguru under the library's logger name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.patch(
            lambda loguru_record: loguru_record.update(
                name=record.name, function=record.funcName, line=record.lineno
            )
        ).opt(exception=record.exc_info).log(level, record.getMessage())


def _json_log_line(message: "Message") -> None:
    """``--log-format json``: one object per line on stderr (``time`` ISO 8601 with its
    offset, ``level``, ``logger`` (the module), ``function``, ``line``, ``message``, and
    ``exception`` with the traceback when there is one)."""
    record = message.record
    entry: dict[str, object] = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "logger": record["name"],
        "function": record["function"],
        "line": record["line"],
        "message": record["message"],
    }
    exception = record["exception"]
    if exception is not None:
        entry["exception"] = "".join(
            traceback.format_exception(exception.type, exception.value, exception.traceback)
        )
    sys.stderr.write(json.dumps(entry, default=str) + "\n")


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    listen: list[str] = args.listen or [DEFAULT_LISTEN]
    connect: list[str] = args.connect
    for endpoint in [*listen, *connect]:
        problem = validate_endpoint(endpoint)
        if problem is not None:
            raise StartupError(problem)
    tls = TlsFiles(
        certificate=args.tls_cert, private_key=args.tls_key, certificate_authority=args.tls_ca
    )
    tls_problem = check_tls(listen, connect, tls)
    if tls_problem is not None:
        raise StartupError(tls_problem)
    try:
        replacement = ReplacementConfig(
            move_margin=args.move_margin,
            move_sustain_s=args.move_sustain,
            max_moves_per_hour=args.max_moves_per_hour,
            settle_s=args.move_settle,
        )
    except ValidationError as error:
        raise StartupError(
            "--move-margin must be between 0 and 1 (exclusive), and --move-sustain, "
            "--move-settle and --max-moves-per-hour must not be negative"
        ) from error
    if not 0 < args.api_port < 65536:
        raise StartupError(f"--api-port {args.api_port} is not a port number (1-65535)")
    if not 1024 <= args.ring_port <= 65535 - RING_PORTS_PER_NODE:
        raise StartupError(
            f"--ring-port {args.ring_port} is not a port from 1024 to "
            f"{65535 - RING_PORTS_PER_NODE} (ranks take the ports above it)"
        )
    if args.link_probe_interval <= 0 or args.election_settle < 0:
        raise StartupError(
            "--link-probe-interval must be positive and --election-settle not negative"
        )
    if args.telemetry_interval <= 0:
        raise StartupError("--telemetry-interval must be positive")
    if args.simulate_gpus is not None:
        try:
            load_simulated_file(args.simulate_gpus)
        except GPUBackendError as error:
            raise StartupError(f"--simulate-gpus: {error}") from error
    if not args.namespace or "/" in args.namespace or "*" in args.namespace:
        raise StartupError("--namespace must be a non-empty name without '/' or '*'")
    home: Path = args.home or Path(os.environ.get("EXO_HOME", "~/.exo"))
    models_dir: Path | None = args.models_dir
    models_dir_source = "--models-dir"
    if models_dir is None and os.environ.get("EXO_MODELS_DIR"):
        models_dir, models_dir_source = Path(os.environ["EXO_MODELS_DIR"]), "EXO_MODELS_DIR"
    if models_dir is not None:
        models_dir = models_dir.expanduser()
        if not models_dir.is_dir():
            raise StartupError(f"{models_dir_source} {models_dir} is not a directory")
    api_key: str | None = args.api_key or os.environ.get("EXO_API_KEY") or None
    try:
        api_warning = check_api_exposure(args.api_host, api_key, args.insecure_api)
    except ApiExposureError as error:
        raise StartupError(str(error)) from error
    if api_warning is not None:
        logger.warning(api_warning)
    return NodeConfig(
        home=home.expanduser(),
        namespace=args.namespace,
        listen=listen,
        connect=connect,
        discovery=not args.no_discovery,
        api_host=args.api_host,
        api_port=args.api_port,
        ring_port=args.ring_port,
        api_key=api_key,
        cluster_secret=args.cluster_secret,
        tls=tls,
        run_worker=not args.no_worker,
        friendly_name=args.friendly_name,
        election_settle_s=args.election_settle,
        link_probe_interval_s=args.link_probe_interval,
        gpu_backend="simulated" if args.simulate_gpus is not None else args.gpu_backend,
        simulate_gpus_file=args.simulate_gpus,
        telemetry_interval_s=args.telemetry_interval,
        models_dir=models_dir,
        replacement=replacement,
    )


def main(argv: list[str] | None = None) -> None:
    # A native crash (zenoh, MLX) prints every thread's Python stack before the process dies.
    faulthandler.enable()
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet, args.log_format)
    try:
        config = config_from_args(args)
        anyio.run(run_node, config)
        if argv is None:  # run as the program, not called from Python with arguments
            _exit_after_orderly_stop()
    except (StartupError, TransportError) as error:
        print(f"exo: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        _interrupted_again()
    except BaseExceptionGroup as group:
        startup = group.subgroup(StartupError)
        if startup is not None:
            print(f"exo: {_first_leaf(startup)}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        _interrupted_again()


def _exit_after_orderly_stop() -> None:
    """End the process once the node has stopped in order (log synced, zenoh session
    closed, runners stopped) without the interpreter's own finalisation: there the native
    libraries' threads and destructors (zenoh's runtime, MLX) can race the interpreter's
    teardown and abort the process (exit −6) after everything was already saved."""
    logger.complete()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _first_leaf(group: BaseExceptionGroup[StartupError]) -> StartupError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _interrupted_again() -> None:
    """The first SIGINT/SIGTERM shuts the node down in order; a second one during that
    shutdown ends it at once, without a traceback (the log is flushed per event)."""
    print("exo: interrupted again; stopped before the shutdown finished", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
