"""Re-placement on loopback clusters with the bundled model.

Heal: 3 CPU nodes, the model over 2 of them; kill -9 a node that holds a shard (not the
master) while a client keeps asking. Reports the model's load time at placement (the
baseline), the time from the kill to the new set serving and its ratio to the load time,
and what the client's requests got meanwhile.

Moves: 3 nodes with simulated GPUs slow enough that weights dominate; clients stream
requests back to back; a serving device starts throttling, the instance moves, the device
recovers, and again. Reports each move's decision-to-switch and drain times and the
requests that failed during the moves (goal: 0).

    uv run python bench/replacement.py [--moves 2] [--clients 2]
"""

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import running_cluster, wait_until
from tests.test_inference_cluster import QUESTION, ask
from tests.test_replacement_cluster import (
    RequestLoad,
    answer,
    changes,
    serve_over_two,
    the_instance,
    throttleable_cluster,
    throttled,
)

HEAL_TARGET_S = 15.0


def heal_round(directory: Path) -> None:
    with running_cluster(directory, 3) as nodes:
        served = serve_over_two(nodes, ready_timeout_s=120.0)
        instance, load_s, reference = served.instance, served.load_s, served.reference
        master = nodes[0].state()["master_node_id"]
        ids = {node.node_id(): node for node in nodes}
        victim = next(s["node_id"] for s in instance["shards"] if s["node_id"] != master)
        survivor = ids[master]
        with RequestLoad(survivor, streaming=False) as load:
            time.sleep(1.0)
            ids[victim].kill()
            heal_s = wait_until(lambda: bool(changes(survivor, "heal")), 120.0, "the heal")
            text = answer(ask(survivor, QUESTION))
        answered = sum(1 for outcome in load.outcomes if outcome == (200, reference))
        refused = sum(1 for status, _ in load.outcomes if status == 503)
        other = len(load.outcomes) - answered - refused
        print(
            f"heal: load at placement {load_s:.1f} s (baseline); kill -9 to serving again "
            f"{heal_s:.1f} s = {heal_s / load_s:.2f}× the load time "
            f"(target max(15 s, load + 5 s) = {max(HEAL_TARGET_S, load_s + 5):.1f} s); "
            f"same text after: {text == reference}; requests meanwhile: {answered} answered, "
            f"{refused} got 503, {other} other"
        )


def move_rounds(directory: Path, moves: int, clients: int) -> None:
    with throttleable_cluster(directory, max_moves_per_hour=60) as (nodes, files):
        reference = serve_over_two(nodes, ready_timeout_s=120.0).reference
        ids = [node.node_id() for node in nodes]
        loads = [RequestLoad(nodes[index % 3], streaming=True) for index in range(clients)]
        switch_s: list[float] = []
        drain_s: list[float] = []
        for load in loads:
            load.__enter__()
        try:
            for move in range(moves):
                hot = ids.index(the_instance(nodes[0])["shards"][1]["node_id"])
                throttled(files[hot], hot=True)
                wait_until(
                    lambda before=move: len(changes(nodes[0], "move")) > before, 120.0, "the move"
                )
                done = changes(nodes[0], "move")[-1]
                started = datetime.fromisoformat(done["started_at"])
                finished = datetime.fromisoformat(done["finished_at"])
                switch_s.append((finished - started).total_seconds())
                drain_s.append(
                    wait_until(
                        lambda: the_instance(nodes[0])["retiring_shards"] == [],
                        120.0,
                        "the old set to drain",
                    )
                )
                throttled(files[hot], hot=False)
                time.sleep(2.0)
        finally:
            for load in loads:
                load.__exit__()
        outcomes = [outcome for load in loads for outcome in load.outcomes]
        failed = [outcome for outcome in outcomes if outcome != (200, reference)]
        print(
            f"moves: {moves} under {clients} streaming clients; decision to switch "
            f"median {statistics.median(switch_s):.1f} s, old set drained "
            f"{statistics.median(drain_s):.1f} s after; requests {len(outcomes)}, "
            f"failed {len(failed)} (goal 0){': ' + repr(failed[:3]) if failed else ''}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--moves", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--skip-heal", action="store_true")
    args = parser.parse_args()
    if not args.skip_heal:
        with tempfile.TemporaryDirectory() as directory:
            heal_round(Path(directory))
    with tempfile.TemporaryDirectory() as directory:
        move_rounds(Path(directory), args.moves, args.clients)


if __name__ == "__main__":
    main()
