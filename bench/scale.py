"""The control plane at scale: N nodes x D simulated devices on loopback.

Starts N real nodes, each with D simulated GPUs (every node knows every other node's
endpoint), and measures, while a poller thread per node reads ``GET /gpus`` four times a
second:

- **devices seen**: from the last node's API answering until every node's ``/gpus`` lists
  all N x D devices;
- **API latency**: p50/p99/max of those reads during the start-up burst and at idle, and
  the longest any node went without an answer;
- **event propagation**: a probe event (``POST /probe``) on a node, until every node has
  applied it (p50/p99 over ``--probes`` probes);
- **idle**: events per second, log bytes per hour per node (the events directory) and CPU
  per node (% of one core) over ``--idle-s`` seconds (after ``--settle-s``) with the
  pollers paused (nothing asks the nodes anything); then API latency and CPU over another
  ``--idle-s`` seconds with the pollers reading again.

    uv run python bench/scale.py --nodes 16 --devices 16
    uv run python bench/scale.py --nodes 32 --devices 1

Exits 1 when a node stopped answering for longer than ``--wedge-s`` (the cluster wedged) or
when not every node saw every device within ``--deadline-s``.
"""

import argparse
import contextlib
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil

from bench.timing import percentile
from bench.workdir import KEEP_HELP, work_directory
from tests.cluster import ExoNode, wait_until
from tests.simulated import device, write_devices


@dataclass
class NodeWatch:
    """What the poller of one node saw."""

    node: ExoNode
    latencies: list[tuple[float, float]] = field(default_factory=list[tuple[float, float]])
    """(when, seconds) of every answered read."""
    devices_seen: int = 0
    all_devices_at: float | None = None
    last_answer: float = 0.0
    longest_silence_s: float = 0.0
    path: str = "/gpus"
    """What the poller reads: ``/gpus`` until every device is seen, then ``/node_id`` (a
    read that costs the node next to nothing, so the idle CPU is the node's own)."""


def poll(watch: NodeWatch, expected: int, stop: threading.Event, quiet: threading.Event) -> None:
    """Read the node four times a second until ``stop``; nothing while ``quiet``."""
    with httpx.Client(timeout=5.0) as client:
        watch.last_answer = time.monotonic()
        while not stop.is_set():
            started = time.monotonic()
            if quiet.is_set():
                watch.last_answer = started
                stop.wait(0.25)
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError):
                path = watch.path
                response = client.get(watch.node.url + path)
                if response.status_code == 200:
                    now = time.monotonic()
                    watch.latencies.append((now, now - started))
                    watch.longest_silence_s = max(watch.longest_silence_s, now - watch.last_answer)
                    watch.last_answer = now
                    if path == "/gpus":
                        watch.devices_seen = len(response.json())
                        if watch.devices_seen >= expected and watch.all_devices_at is None:
                            watch.all_devices_at = now
                            watch.path = "/node_id"
            watch.longest_silence_s = max(
                watch.longest_silence_s, time.monotonic() - watch.last_answer
            )
            stop.wait(max(0.0, 0.25 - (time.monotonic() - started)))


def events_dir_bytes(node: ExoNode) -> int:
    return sum(
        path.stat().st_size for path in (node.home / "events").glob("**/*") if path.is_file()
    )


def probe_latencies(nodes: list[ExoNode], count: int) -> list[float]:
    """Seconds from POST /probe to the probe applied on every node, one probe at a time."""
    latencies: list[float] = []
    for index in range(count):
        origin = nodes[index % len(nodes)]
        since = {node.url: node.state()["last_event_applied_idx"] for node in nodes}
        started = time.time()
        probe_id = httpx.post(origin.url + "/probe", timeout=5.0).json()["probe_id"]
        applied: dict[str, float] = {}
        everywhere = partial(applied_everywhere, nodes, since, probe_id, applied)
        wait_until(everywhere, 30.0, f"probe {index} applied on every node")
        latencies.append(max(applied.values()) - started)
    return latencies


def applied_everywhere(
    nodes: list[ExoNode], since: dict[str, int], probe_id: str, applied: dict[str, float]
) -> bool:
    """Whether every node applied the probe; ``applied`` keeps each node's applied time."""
    for node in nodes:
        if node.url in applied:
            continue
        page = node.get(f"/events?since={since[node.url]}&limit=10000")["events"]
        for entry in page:
            event = entry["event"]
            if event["kind"] == "ProbeEmitted" and event["probe_id"] == probe_id:
                applied[node.url] = entry["applied_at"]
    return len(applied) == len(nodes)


def summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (
        f"p50 {percentile(values, 0.5) * 1000:.0f} ms, p99 {percentile(values, 0.99) * 1000:.0f} "
        f"ms, max {max(values) * 1000:.0f} ms ({len(values)} reads)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument(
        "--settle-s",
        type=float,
        default=0.0,
        help="wait this long before the idle window (a node measures its links to at most "
        "4 peers a minute, so at 16 nodes the first measurements take about 4 minutes)",
    )
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=120.0)
    parser.add_argument("--wedge-s", type=float, default=5.0)
    parser.add_argument("--keep", type=Path, help=KEEP_HELP)
    args = parser.parse_args()
    expected = args.nodes * args.devices
    with work_directory(args.keep) as base:
        nodes: list[ExoNode] = []
        for index in range(args.nodes):
            gpus = write_devices(
                base / f"gpus{index}.json",
                [device(f"cuda:{d}", "Sim GPU", 24, 1000) for d in range(args.devices)],
            )
            nodes.append(
                ExoNode(
                    base / f"node{index}",
                    [],
                    ["--gpu-backend", "simulated", "--simulate-gpus", str(gpus)],
                )
            )
        for node in nodes:
            node.peers = [other.endpoint for other in nodes]
        stop, quiet = threading.Event(), threading.Event()
        watches = [NodeWatch(node) for node in nodes]
        pollers: list[threading.Thread] = []
        try:
            started = time.monotonic()
            for node in nodes:
                node.start()
            for node in nodes:
                node.wait_ready(60.0)
            last_api = time.monotonic()
            print(
                f"{args.nodes} nodes x {args.devices} devices: every API answered after "
                f"{last_api - started:.1f} s"
            )
            for watch in watches:
                thread = threading.Thread(
                    target=poll, args=(watch, expected, stop, quiet), daemon=True
                )
                thread.start()
                pollers.append(thread)
            deadline = last_api + args.deadline_s
            while time.monotonic() < deadline and any(w.all_devices_at is None for w in watches):
                time.sleep(0.25)
            seen = [w.all_devices_at for w in watches]
            burst_end = time.monotonic()
            burst = [s for w in watches for when, s in w.latencies if when <= burst_end]
            if None in seen:
                counts = sorted(w.devices_seen for w in watches)
                print(
                    f"FAILED: after {args.deadline_s:.0f} s nodes see {counts} of {expected} devices"
                )
                for watch in watches:
                    with contextlib.suppress(httpx.HTTPError):
                        state = watch.node.state()
                        print(
                            f"  {watch.node.home.name}: {watch.devices_seen} devices, "
                            f"{len(state['nodes'])} nodes, master {state['master_node_id']}, "
                            f"last event {state['last_event_applied_idx']}"
                        )
            else:
                print(
                    f"every node sees all {expected} devices {max(s for s in seen if s) - last_api:.1f} s "
                    "after the last API answered"
                )
            print(f"API latency during start-up: {summary(burst)}")
            if None not in seen:
                probes = probe_latencies(nodes, args.probes)
                print(f"event propagation to all {args.nodes} nodes: {summary(probes)}")
                if args.settle_s > 0:
                    print(f"settling for {args.settle_s:.0f} s before the idle window")
                    time.sleep(args.settle_s)
                processes = [psutil.Process(node.process.pid) for node in nodes if node.process]
                quiet.set()  # idle: nothing asks the nodes anything
                for process in processes:
                    process.cpu_percent()
                index_before = nodes[0].state()["last_event_applied_idx"]
                bytes_before = [events_dir_bytes(node) for node in nodes]
                idle_start = time.monotonic()
                time.sleep(args.idle_s)
                idle_s = time.monotonic() - idle_start
                cpu = [process.cpu_percent() for process in processes]
                index_after = nodes[0].state()["last_event_applied_idx"]
                page = nodes[0].get(f"/events?since={index_before}&limit=10000")["events"]
                kinds = Counter(entry["event"]["kind"] for entry in page)
                grown = [
                    events_dir_bytes(node) - b for node, b in zip(nodes, bytes_before, strict=True)
                ]
                rate = (index_after - index_before) / idle_s
                print(
                    f"idle over {idle_s:.0f} s: {rate:.2f} events/s, log growth per node "
                    f"{max(grown) / idle_s * 3600 / 1e6:.2f} MB/h max "
                    f"({sum(grown) / len(grown) / idle_s * 86400 / 1e6:.1f} MB/day mean), CPU per "
                    f"node {statistics_line(cpu)}"
                )
                master_id = nodes[0].state()["master_node_id"]
                roles = [node.node_id() == master_id for node in nodes]
                if any(roles) and not all(roles):
                    master_cpu = next(
                        c for c, is_master in zip(cpu, roles, strict=True) if is_master
                    )
                    followers = [
                        c for c, is_master in zip(cpu, roles, strict=True) if not is_master
                    ]
                    print(
                        f"idle CPU: the master {master_cpu:.1f} %, followers "
                        f"{statistics_line(followers)}"
                    )
                print(
                    "idle events by kind (per minute): "
                    + ", ".join(f"{k} {n / idle_s * 60:.1f}" for k, n in kinds.most_common())
                )
                quiet.clear()
                for process in processes:
                    process.cpu_percent()
                polled_from = time.monotonic()
                time.sleep(args.idle_s)
                cpu = [process.cpu_percent() for process in processes]
                idle = [s for w in watches for when, s in w.latencies if when > polled_from]
                print(
                    f"API latency at idle (each node read 4 times a second): {summary(idle)}; "
                    f"CPU per node meanwhile {statistics_line(cpu)}"
                )
        finally:
            stop.set()
            for thread in pollers:
                thread.join(10)
            for node in nodes:
                node.kill()
        stands, highest = elections(nodes)
        print(f"elections: {stands} candidacies, highest term {highest}")
        silences = [w.longest_silence_s for w in watches]
        print(f"longest a node went without answering: {max(silences):.1f} s")
        wedged = max(silences) > args.wedge_s
        if wedged:
            print(f"FAILED: a node did not answer for more than {args.wedge_s:.0f} s")
            for watch in watches:
                if watch.longest_silence_s > args.wedge_s:
                    print(
                        f"--- {watch.node.home.name} log tail ---\n{watch.node.log_text()[-1500:]}"
                    )
        return 1 if wedged or None in seen else 0


STANDING = re.compile(r"standing for master in term (\d+)")


def elections(nodes: list[ExoNode]) -> tuple[int, int]:
    """(how many times a node stood for master, the highest term any stood in), from the
    nodes' logs."""
    terms = [int(m.group(1)) for node in nodes for m in STANDING.finditer(node.log_text())]
    return len(terms), max(terms, default=0)


def statistics_line(values: list[float]) -> str:
    return f"mean {sum(values) / len(values):.1f} %, max {max(values):.1f} % of a core"


if __name__ == "__main__":
    sys.exit(main())
