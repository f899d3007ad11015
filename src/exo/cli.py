"""``exo status``, ``exo place`` and ``exo chat``: a node's HTTP API from the command line.

Each talks to one node (``--api``, default ``$EXO_API`` or the local node) and prints what a
person wants to read; ``--api-key`` (default ``$EXO_API_KEY``) is sent as a Bearer token.
A failure is one sentence on stderr and exit code 1.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import httpx
from pydantic import ValidationError

from exo.shared.runner_sets import instance_health
from exo.shared.types.instances import Instance
from exo.shared.types.memory import format_bytes
from exo.shared.types.state import State

COMMANDS = ("status", "place", "chat")
DEFAULT_API = "http://127.0.0.1:52415"
EXIT_FAILED = 1
TIMEOUT_S = 30.0
DEFAULT_WAIT_S = 60.0
RETRY_S = 0.5
STARTING_REASONS = ("no master elected yet", "no node in the cluster offers a device")
"""503s a node gives while it starts; a command waits them out (nothing was changed)."""
CHAT_TIMEOUT_S = 600.0


class CliError(Exception):
    """One sentence for the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo", description="talk to a running exo node")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api",
        default=os.environ.get("EXO_API", DEFAULT_API),
        metavar="URL",
        help=f"the node's API (default $EXO_API or {DEFAULT_API})",
    )
    common.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help="while the node is starting (not answering yet, no master, no device reported "
        f"yet), keep trying this long (default {DEFAULT_WAIT_S:g})",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("EXO_API_KEY"),
        metavar="KEY",
        help="Bearer key of a node started with --api-key (default $EXO_API_KEY)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", parents=[common], help="nodes, devices and instances as tables")
    place = commands.add_parser(
        "place", parents=[common], help="place a model on the cluster (or preview it)"
    )
    place.add_argument("model", help="model id (see GET /v1/models)")
    place.add_argument("--min-nodes", type=int, default=1, metavar="N")
    place.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    place.add_argument("--rebalance", choices=["auto", "heal_only", "off"], default="auto")
    place.add_argument(
        "--dry-run", action="store_true", help="show the placement without creating it"
    )
    chat = commands.add_parser("chat", parents=[common], help="ask a model; the answer streams")
    chat.add_argument("model")
    chat.add_argument("prompt")
    chat.add_argument("--max-tokens", type=int, default=256, metavar="N")
    chat.add_argument("--temperature", type=float, default=0.7)
    return parser


def main(argv: Sequence[str]) -> NoReturn:
    args = build_parser().parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    transport = StartingNodeTransport(args.wait)
    with httpx.Client(
        base_url=args.api, headers=headers, timeout=TIMEOUT_S, transport=transport
    ) as client:
        try:
            match args.command:
                case "status":
                    print(status(client))
                case "place":
                    print(
                        place(
                            client,
                            args.model,
                            args.min_nodes,
                            args.objective,
                            args.rebalance,
                            args.dry_run,
                        )
                    )
                case _:
                    for piece in chat(
                        client, args.model, args.prompt, args.max_tokens, args.temperature
                    ):
                        print(piece, end="", flush=True)
                    print()
        except CliError as error:
            print(f"exo: {error}", file=sys.stderr)
            sys.exit(EXIT_FAILED)
        except httpx.TransportError as error:
            print(
                f"exo: cannot reach the node's API at {args.api} ({error}); is `uv run exo` "
                "running there?",
                file=sys.stderr,
            )
            sys.exit(EXIT_FAILED)
    sys.exit(0)


# --- requests -------------------------------------------------------------------------------
class StartingNodeTransport(httpx.HTTPTransport):
    """Sends a request again while the node is starting: its API not listening yet, or a
    503 that says the cluster is still forming (nothing was changed), until ``wait_s``
    has passed since the first try. Says once on stderr that it is waiting."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self._wait_s = wait_s
        self._told = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + self._wait_s
        while True:
            try:
                response = super().handle_request(request)
            except httpx.ConnectError:
                if time.monotonic() >= deadline:
                    raise
                self._waiting(request)
                continue
            if response.status_code != 503 or time.monotonic() >= deadline:
                return response
            response.read()
            if not any(reason in response.text for reason in STARTING_REASONS):
                return response
            response.close()
            self._waiting(request)

    def _waiting(self, request: httpx.Request) -> None:
        if not self._told:
            print(
                f"waiting for the node at {request.url.host}:{request.url.port} …", file=sys.stderr
            )
            self._told = True
        time.sleep(RETRY_S)


def _error_text(response: httpx.Response) -> str:
    """The API's reason from either of its error shapes."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        error: Any = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])  # pyright: ignore[reportUnknownArgumentType]
        if "detail" in body:
            return str(body["detail"])  # pyright: ignore[reportUnknownArgumentType]
    return response.text[:200]


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise CliError(f"{response.status_code}: {_error_text(response)}")
    return response.json()


def status(client: httpx.Client) -> str:
    try:
        state = State.model_validate(_checked(client.get("/state")))
    except ValidationError as error:
        raise CliError(f"the node's /state is not what this exo understands: {error}") from error
    return render_status(state)


def place(
    client: httpx.Client,
    model: str,
    min_nodes: int,
    objective: str,
    rebalance: str,
    dry_run: bool,
) -> str:
    if dry_run:
        body = _checked(
            client.get(
                "/instance/placement",
                params={"model_id": model, "min_nodes": min_nodes, "objective": objective},
            )
        )
    else:
        body = _checked(
            client.post(
                "/instance",
                json={
                    "model_id": model,
                    "min_nodes": min_nodes,
                    "objective": objective,
                    "rebalance": rebalance,
                },
            )
        )
    instance = Instance.model_validate(body)
    heading = "would place" if dry_run else f"placed instance {instance.instance_id}:"
    return f"{heading} {instance.model_id}\n" + render_placement(instance)


def chat(
    client: httpx.Client, model: str, prompt: str, max_tokens: int, temperature: float
) -> Iterable[str]:
    """The answer's text as it streams."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=CHAT_TIMEOUT_S) as reply:
        if reply.status_code >= 400:
            reply.read()
            raise CliError(f"{reply.status_code}: {_error_text(reply)}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame: Any = json.loads(line[len("data: ") :])
            if "error" in frame:
                raise CliError(f"the request failed: {frame['error'].get('message')}")
            for choice in frame.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield str(text)


# --- rendering ------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def _short(identifier: str) -> str:
    return identifier[:8]


def render_status(state: State) -> str:
    names = {node_id: node.friendly_name for node_id, node in state.nodes.items()}
    node_rows = [
        [
            node.friendly_name,
            _short(node_id) + (" (master)" if node_id == state.master_node_id else ""),
            str(node.cpu_count),
            f"{format_bytes(node.ram_available_bytes)} / {format_bytes(node.ram_total_bytes)}",
        ]
        for node_id, node in sorted(state.nodes.items(), key=lambda item: item[1].friendly_name)
    ]
    sections = [
        f"nodes ({len(state.nodes)}):",
        table(["name", "id", "cpus", "ram free / total"], node_rows) if node_rows else "  none",
    ]
    device_rows: list[list[str]] = []
    for node_id, readings in sorted(state.gpu_device_state.items()):
        for device_id, reading in sorted(readings.items()):
            info = state.gpu_device_info.get(node_id, {}).get(device_id)
            temperature = (
                f"{reading.thermal_temperature_c:.0f}/{reading.thermal_throttle_threshold_c:.0f} °C"
                if reading.thermal_temperature_c >= 0
                else "-"
            )
            device_rows.append(
                [
                    names.get(node_id, _short(node_id)),
                    device_id,
                    info.name if info is not None else "?",
                    f"{format_bytes(reading.memory_used_bytes)} / "
                    f"{format_bytes(reading.memory_total_bytes)}",
                    f"{reading.compute_utilization_percent:.0f} %",
                    temperature,
                    "THROTTLING" if reading.is_thermal_throttling else "",
                ]
            )
    sections += [
        f"\ndevices ({len(device_rows)}):",
        table(["node", "device", "name", "memory used / total", "util", "temp", ""], device_rows)
        if device_rows
        else "  none reported yet",
    ]
    instance_rows = [
        [
            _short(instance.instance_id),
            instance.model_id,
            instance_health(state, instance)[0]
            + (f" ({instance.incoming.change.kind} loading)" if instance.incoming else ""),
            ", ".join(
                f"{names.get(shard.node_id, _short(shard.node_id))}/{shard.device_id} "
                f"{shard.start_layer}-{shard.end_layer}"
                for shard in sorted(instance.shards, key=lambda shard: shard.rank)
            ),
            f"{instance.placement.predicted_ms_per_token:.1f}",
            f"{instance.measured_ms_per_token:.1f}" if instance.measured_ms_per_token else "-",
        ]
        for instance in state.instances.values()
    ]
    sections += [
        f"\ninstances ({len(instance_rows)}):",
        table(
            ["id", "model", "status", "layers", "predicted ms/tok", "measured ms/tok"],
            instance_rows,
        )
        if instance_rows
        else "  none (exo place MODEL)",
    ]
    return "\n".join(sections)


def render_placement(instance: Instance) -> str:
    decision = instance.placement
    rows = [
        [
            str(shard.rank),
            _short(shard.node_id),
            shard.device_id,
            f"{shard.start_layer}-{shard.end_layer}",
            f"{shard.predicted_stage_ms:.1f}" if shard.predicted_stage_ms is not None else "-",
        ]
        for shard in sorted(instance.shards, key=lambda shard: shard.rank)
    ]
    lines = [
        table(["rank", "node", "device", "layers", "predicted stage ms"], rows),
        f"strategy {decision.strategy}, objective {decision.objective}: predicted "
        f"{decision.predicted_ms_per_token:.1f} ms/token (greedy split "
        f"{decision.greedy_ms_per_token:.1f})",
        *(f"- {reason}" for reason in decision.reasons),
    ]
    return "\n".join(lines)
