"""How big a node's log gets, and how fast a joining node catches up.

1. **Idle growth.** A 3-node loopback cluster (one simulated GPU per node, default
   telemetry and link probing) idles for ``--idle-s`` seconds; the events it logs give the
   idle rate (events and bytes per hour per node, without compaction).
2. **24 hours at idle.** The events of that idle sample are replayed (fresh ids) into a
   node's store at the measured rate for 24 simulated hours, with compaction as a node does
   it; the bench prints the log's and the snapshot's size at the end and the largest the
   events directory got, against the size the log would have without compaction.
3. **Catch-up.** For each size N, a home is prepared offline holding a log of N events
   (MemberJoined for its node, then the idle sample replayed), compacted as a node would
   have done. A node starts on it, then a fresh node joins; the bench prints the time from
   the joiner's API answering to its log reaching the master's last index.

    uv run python bench/log_growth.py [--idle-s 60] [--sizes 10000,100000,1000000]
"""

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger

from exo.routing.term_store import TERM_FILE, TermRecord
from exo.shared.event_log import encode_record
from exo.shared.event_store import EventStore
from exo.shared.types.events import EventAdapter, IndexedEvent, MemberJoined
from exo.shared.types.ids import NodeId, new_event_id
from tests.cluster import ExoNode, converged, running_cluster, wait_until
from tests.simulated import device, write_devices

SECONDS_PER_DAY = 86_400


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


MEMBERSHIP_KINDS = {"MemberJoined", "NodeTimedOut", "MasterElected"}


def idle_sample(
    base: Path, idle_s: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """The events that describe a 3-node cluster (its start-up, without membership), the
    events it logs while idle, and the seconds they span."""
    files = [
        write_devices(base / f"gpus{i}.json", [device("cuda:0", "Sim", 24, 1000)]) for i in range(3)
    ]
    with running_cluster(base / "idle", 3, lambda i: ["--simulate-gpus", str(files[i])]) as nodes:
        wait_until(lambda: converged(nodes, 3), 15.0, "the cluster to converge")
        time.sleep(5.0)  # let start-up reports settle
        first = nodes[0].state()["last_event_applied_idx"]
        started = time.monotonic()
        time.sleep(idle_s)
        elapsed = time.monotonic() - started
        logged = nodes[0].all_events()
    startup = [
        e["event"]
        for e in logged
        if e["idx"] <= first and e["event"]["kind"] not in MEMBERSHIP_KINDS
    ]
    events = [
        e["event"]
        for e in logged
        if e["idx"] > first and e["event"]["kind"] not in MEMBERSHIP_KINDS
    ]
    return startup, events, elapsed


def mean_record_bytes(sample: list[dict[str, Any]]) -> float:
    """Mean size of a sample event's record on disk (at a seven-digit index)."""
    records = [
        encode_record(IndexedEvent(idx=1_000_000, term=1, event=EventAdapter.validate_python(e)))
        for e in sample
    ]
    return sum(map(len, records)) / max(len(records), 1)


def replayed(sample: list[dict[str, Any]], count: int) -> list[Any]:
    """count events cycling through the sample, each with a fresh id."""
    return [
        EventAdapter.validate_python({**sample[i % len(sample)], "event_id": new_event_id()})
        for i in range(count)
    ]


def store_with(
    directory: Path,
    node_id: NodeId,
    startup: list[dict[str, Any]],
    sample: list[dict[str, Any]],
    count: int,
) -> int:
    """A compacted log of count events in directory (the node's membership, the idle
    cluster's start-up, then its idle events replayed); returns the largest size it
    reached."""
    store = EventStore(directory)
    store.load()
    store.append(IndexedEvent(idx=0, term=1, event=MemberJoined(node_id=node_id)))
    for event in startup:
        store.append(
            IndexedEvent(idx=store.last_idx + 1, term=1, event=EventAdapter.validate_python(event))
        )
    largest = 0
    batch = 500
    idx = store.last_idx + 1
    while idx < count:
        for event in replayed(sample, min(batch, count - idx)):
            store.append(IndexedEvent(idx=idx, term=1, event=event))
            store.compact_if_due(idx)  # a node compacts as its events commit
            idx += 1
        largest = max(largest, directory_bytes(directory))
    store.close()
    return largest


def twenty_four_hours(
    base: Path, startup: list[dict[str, Any]], sample: list[dict[str, Any]], events_per_s: float
) -> None:
    count = round(events_per_s * SECONDS_PER_DAY)
    directory = base / "day" / "events"
    mean_record = mean_record_bytes(sample)
    started = time.perf_counter()
    largest = store_with(directory, NodeId("day-node"), startup, sample, count)
    log_bytes = (directory / "global_events.jsonl").stat().st_size
    snapshot_bytes = (directory / "snapshot.json").stat().st_size
    print(
        f"24 h at idle: {count} events; without compaction about {count * mean_record / 1e6:.1f} MB; "
        f"with it: log {log_bytes / 1e6:.2f} MB + snapshot {snapshot_bytes / 1e3:.1f} kB "
        f"(largest {largest / 1e6:.2f} MB; replayed in {time.perf_counter() - started:.0f} s)"
    )


def catch_up(
    base: Path, startup: list[dict[str, Any]], sample: list[dict[str, Any]], count: int
) -> None:
    home = base / f"master{count}"
    node_id = NodeId(str(uuid.uuid4()))
    home.mkdir(parents=True)
    (home / "node_id").write_text(node_id)
    (home / TERM_FILE).write_text(TermRecord(term=1).model_dump_json())
    store_with(home / "events", node_id, startup, sample, count)
    master = ExoNode(home, [])
    master.start()
    joiner = ExoNode(base / f"joiner{count}", [master.endpoint])
    try:
        master.wait_ready()
        wait_until(lambda: master.state()["master_node_id"] == node_id, 30.0, "the master")
        joiner.start()
        joiner.wait_ready()
        started = time.monotonic()
        target = master.state()["last_event_applied_idx"]
        wait_until(
            lambda: joiner.state()["last_event_applied_idx"] >= target,
            120.0,
            "the joiner to catch up",
        )
        elapsed = time.monotonic() - started
        print(f"catch-up of a log of {count} events (to index {target}): {elapsed:.2f} s")
    finally:
        joiner.kill()
        master.kill()


def main() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        startup, sample, elapsed = idle_sample(base, args.idle_s)
        kinds: dict[str, int] = {}
        for event in sample:
            kinds[event["kind"]] = kinds.get(event["kind"], 0) + 1
        rate = len(sample) / elapsed
        mean_record = mean_record_bytes(sample)
        print(
            f"idle: {len(sample)} events in {elapsed:.0f} s ({rate:.2f}/s: {kinds}); "
            f"{rate * 3600:.0f} events and {rate * 3600 * mean_record / 1e6:.2f} MB per hour "
            f"per node without compaction"
        )
        if not sample:
            print("no idle events: nothing to replay")
            return
        twenty_four_hours(base, startup, sample, rate)
        for size in (int(part) for part in args.sizes.split(",")):
            catch_up(base, startup, sample, size)


if __name__ == "__main__":
    main()
