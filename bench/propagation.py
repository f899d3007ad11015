"""Event propagation across a 3-node cluster on loopback.

A worker emits a probe event (POST /probe on a non-master node); the latency is the time
from emission to the moment the last of the 3 nodes applied it (each node records when it
applied every event; all run on one machine, so they share a clock).

    uv run python bench/propagation.py [--events 300] [--interval-ms 10]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import percentile
from tests.cluster import converged, running_cluster, wait_until

SEED_TARGET_MS = 500.0
OUR_TARGET_P99_MS = 50.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, running_cluster(Path(directory), 3) as nodes:
        wait_until(lambda: converged(nodes, 3), 10.0, "the cluster to converge")
        master_id = nodes[0].state()["master_node_id"]
        emitter = next(node for node in nodes if node.node_id() != master_id)
        sent: dict[str, float] = {}
        with httpx.Client(timeout=5.0) as client:
            for _ in range(args.events):
                reply = client.post(emitter.url + "/probe").json()
                sent[reply["event_id"]] = reply["sent_at"]
                time.sleep(args.interval_ms / 1000)

        def all_applied() -> bool:
            return all(
                sent.keys() <= {e["event"]["event_id"] for e in node.all_events()} for node in nodes
            )

        wait_until(all_applied, 30.0, "every probe on every node")
        latest: dict[str, float] = {}
        for node in nodes:
            for entry in node.all_events():
                event_id = entry["event"]["event_id"]
                if event_id in sent:
                    latest[event_id] = max(latest.get(event_id, 0.0), entry["applied_at"])
    latencies_ms = [(latest[event_id] - sent[event_id]) * 1000 for event_id in sent]
    p50, p99 = percentile(latencies_ms, 0.50), percentile(latencies_ms, 0.99)
    print(f"events: {len(latencies_ms)} from one worker, applied on 3 nodes (loopback)")
    print(
        f"p50 {p50:.2f} ms   p99 {p99:.2f} ms   max {max(latencies_ms):.2f} ms   mean {statistics.mean(latencies_ms):.2f} ms"
    )
    print(
        f"seed target  < {SEED_TARGET_MS:.0f} ms : p99/target = {p99 / SEED_TARGET_MS:.3f}  {'OK' if p99 < SEED_TARGET_MS else 'MISSED'}"
    )
    print(
        f"our target p99 < {OUR_TARGET_P99_MS:.0f} ms : p99/target = {p99 / OUR_TARGET_P99_MS:.3f}  {'OK' if p99 < OUR_TARGET_P99_MS else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
