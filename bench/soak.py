"""A soak: 8 nodes x 8 simulated devices for 10 minutes, chats streaming the whole time,
writes going on, and the master killed (kill -9) twice and started again.

Checks, and prints:
- **no node wedges**: a poller per node reads ``GET /state`` twice a second; the longest a
  running node went without answering (the killed node's downtime is not counted);
- **no acknowledged write lost**: a writer creates planning-only instances (``rebalance:
  off``) one after another through a random node; at the end every instance a 201
  acknowledged is in every node's state;
- **every stream ends cleanly**: a client streams chats of the bundled model (placed over
  2 nodes, healed when a kill takes a shard) through a random node other than the master;
  each stream must finish (``finish_reason``) or end with an error frame, never just stop.

    uv run python bench/soak.py [--minutes 10] [--nodes 8] [--devices 8] [--kills 2] [--keep DIR]

Exits 1 when any check fails.
"""

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.workdir import KEEP_HELP, work_directory
from tests.cluster import ExoNode, converged, wait_until
from tests.simulated import device, write_devices

CHAT_MODEL = "SmolLM2-135M-Instruct"
WRITE_MODEL = "Llama-3.1-8B-Instruct-4bit"
"""A planning-only card: a real command through the master and the log, and no runner."""


@dataclass
class Cluster:
    nodes: list[ExoNode]
    down: set[int] = field(default_factory=set[int])
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def master_index(self) -> int | None:
        for index, node in enumerate(self.nodes):
            if index in self.down:
                continue
            view = node.try_get("/state")
            if view is not None and view["this_node"]["role"] == "master":
                return index
        return None

    def pick(self, avoid_master: bool) -> ExoNode:
        master = self.master_index() if avoid_master else None
        with self.lock:
            choices = [i for i in range(len(self.nodes)) if i not in self.down and i != master]
        return self.nodes[random.choice(choices)]


@dataclass
class Outcomes:
    acknowledged: list[str] = field(default_factory=list[str])
    write_refusals: Counter[int] = field(default_factory=Counter[int])
    streams: Counter[str] = field(default_factory=Counter[str])
    bad_streams: list[str] = field(default_factory=list[str])
    longest_silence_s: dict[int, float] = field(default_factory=dict[int, float])


def write_loop(cluster: Cluster, outcomes: Outcomes) -> None:
    with httpx.Client(timeout=20.0) as client:
        while not cluster.stop.is_set():
            node = cluster.pick(avoid_master=False)
            try:
                response = client.post(
                    node.url + "/instance",
                    json={"model_id": WRITE_MODEL, "allow_planning_only": True, "rebalance": "off"},
                )
            except httpx.HTTPError:
                outcomes.write_refusals[0] += 1
                continue
            if response.status_code == 201:
                outcomes.acknowledged.append(response.json()["instance_id"])
            else:
                outcomes.write_refusals[response.status_code] += 1
            cluster.stop.wait(1.0)


def stream_once(node: ExoNode) -> str:
    """completed | error frame | refused NNN; raises on a stream that just stopped."""
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
    }
    finished = False
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=120.0) as r:
        if r.status_code != 200:
            r.read()
            return f"refused {r.status_code}"
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line[len("data: ") :])
            if "error" in frame:
                return "error frame"
            if frame["choices"] and frame["choices"][0].get("finish_reason"):
                finished = True
    if not finished:
        raise RuntimeError("the stream ended without a finish reason or an error frame")
    return "completed"


def stream_loop(cluster: Cluster, outcomes: Outcomes) -> None:
    while not cluster.stop.is_set():
        node = cluster.pick(avoid_master=True)
        index = cluster.nodes.index(node)
        try:
            outcomes.streams[stream_once(node)] += 1
        except (httpx.HTTPError, RuntimeError) as error:
            if index in cluster.down:
                outcomes.streams["its API node was killed"] += 1
            else:
                outcomes.bad_streams.append(f"{node.url}: {error!r}")
        cluster.stop.wait(0.2)


def poll_loop(cluster: Cluster, index: int, outcomes: Outcomes) -> None:
    node = cluster.nodes[index]
    last = time.monotonic()
    with httpx.Client(timeout=2.0) as client:
        while not cluster.stop.is_set():
            if index in cluster.down:
                last = time.monotonic()
            else:
                try:
                    if client.get(node.url + "/state").status_code == 200:
                        last = time.monotonic()
                except httpx.HTTPError:
                    pass
            silence = time.monotonic() - last
            outcomes.longest_silence_s[index] = max(
                outcomes.longest_silence_s.get(index, 0), silence
            )
            cluster.stop.wait(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--keep", type=Path, help=KEEP_HELP)
    args = parser.parse_args()
    outcomes = Outcomes()
    with work_directory(args.keep) as base:
        nodes: list[ExoNode] = []
        for index in range(args.nodes):
            gpus = write_devices(
                base / f"gpus{index}.json",
                [device(f"cuda:{d}", "Sim GPU", 200, 1000) for d in range(args.devices)],
            )
            simulated = ["--gpu-backend", "simulated", "--simulate-gpus", str(gpus)]
            nodes.append(ExoNode(base / f"node{index}", [], simulated))
        for node in nodes:
            node.peers = [other.endpoint for other in nodes]
        cluster = Cluster(nodes)
        threads: list[threading.Thread] = []
        try:
            for node in nodes:
                node.start()
            for node in nodes:
                node.wait_ready(60.0)
            wait_until(lambda: converged(nodes, args.nodes), 120.0, "the cluster to converge")
            placed = httpx.post(
                nodes[0].url + "/instance",
                json={"model_id": CHAT_MODEL, "min_nodes": 2},
                timeout=30,
            )
            placed.raise_for_status()
            print(
                f"{args.nodes} nodes x {args.devices} devices up; {CHAT_MODEL} placed over 2 nodes"
            )
            wait_until(lambda: stream_once(nodes[1]) == "completed", 180.0, "the first chat")
            for target in (write_loop, stream_loop):
                threads.append(threading.Thread(target=target, args=(cluster, outcomes)))
            for index in range(args.nodes):
                threads.append(threading.Thread(target=poll_loop, args=(cluster, index, outcomes)))
            for thread in threads:
                thread.start()
            duration_s = args.minutes * 60
            started = time.monotonic()
            kill_at = [duration_s * (k + 1) / (args.kills + 1) for k in range(args.kills)]
            for when in kill_at:
                time.sleep(max(0.0, started + when - time.monotonic()))
                master = cluster.master_index()
                if master is None:
                    print("no master to kill right now: FAILED")
                    outcomes.bad_streams.append("no master at a kill time")
                    continue
                with cluster.lock:
                    cluster.down.add(master)
                killed_at = time.monotonic()
                nodes[master].kill()
                print(f"{time.monotonic() - started:5.0f} s: killed the master, node{master}")
                wait_until(
                    lambda m=master: cluster.master_index() not in (None, m),
                    30.0,
                    "a new master",
                )
                print(f"      new master after {time.monotonic() - killed_at:.1f} s")
                nodes[master].start()
                nodes[master].wait_ready(60.0)
                with cluster.lock:
                    cluster.down.discard(master)
            time.sleep(max(0.0, started + duration_s - time.monotonic()))
            cluster.stop.set()
            for thread in threads:
                thread.join(150.0)

            def all_hold_every_write() -> bool:
                acknowledged = set(outcomes.acknowledged)
                return all(acknowledged <= set(node.state()["instances"]) for node in nodes)

            lost = False
            try:
                wait_until(
                    all_hold_every_write, 60.0, "every node to hold every acknowledged write"
                )
            except AssertionError:
                lost = True
        finally:
            cluster.stop.set()
            for node in nodes:
                node.kill()
    silence = max(outcomes.longest_silence_s.values(), default=0.0)
    print(
        f"writes: {len(outcomes.acknowledged)} acknowledged, refused {dict(outcomes.write_refusals)}"
    )
    print(f"acknowledged writes lost: {'SOME (FAILED)' if lost else 'none'}")
    print(
        f"streams: {dict(outcomes.streams)}; ended without finish or error frame: {len(outcomes.bad_streams)}"
    )
    for bad in outcomes.bad_streams[:5]:
        print(f"  {bad}")
    print(f"longest a running node went without answering GET /state: {silence:.1f} s")
    failed = lost or bool(outcomes.bad_streams) or silence > 5.0
    print("FAILED" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
